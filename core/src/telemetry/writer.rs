//! The writer thread: drains the queue into the active segment, syncs, rolls, evicts, and
//! writes every loss as a `dropped` record.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::record::{self, DropReason, Record};
use super::store::{self, Store};
use super::TelemetryConfig;
use crate::sync::lock;

/// What the handle sends the writer.
pub(super) enum Msg {
    /// A record to store.
    Record(Record),
    /// Write out and fsync everything queued before; answer on the channel.
    Flush(SyncSender<std::io::Result<()>>),
    /// As `Flush`, then seal the active segment (so it can be read or uploaded).
    Roll(SyncSender<std::io::Result<()>>),
}

/// The writer thread: drains the queue into the active segment, syncs, rolls, evicts.
pub(super) struct Writer {
    pub(super) rx: Receiver<Msg>,
    pub(super) store: Arc<Mutex<Store>>,
    pub(super) config: TelemetryConfig,
    /// Losses not yet written as `Dropped` records, by reason.
    pub(super) pending_dropped: BTreeMap<DropReason, u64>,
    pub(super) dropped_total: Arc<AtomicU64>,
}

impl Writer {
    pub(super) fn run(mut self) {
        let mut last_sync = Instant::now();
        let mut unsynced = false;
        loop {
            let first = match self.rx.recv_timeout(self.config.sync_interval) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let mut frames = Vec::new();
            let mut count = 0u64;
            let mut acks: Vec<(bool, SyncSender<std::io::Result<()>>)> = Vec::new();
            let mut next = first;
            while let Some(msg) = next {
                match msg {
                    Msg::Record(r) => {
                        frames.extend(store::encode(&r));
                        count += 1;
                    }
                    Msg::Flush(ack) => acks.push((false, ack)),
                    Msg::Roll(ack) => acks.push((true, ack)),
                }
                if !acks.is_empty() || frames.len() as u64 >= self.config.segment_bytes {
                    break;
                }
                next = self.rx.try_recv().ok();
            }
            let records = count;
            let drained = std::mem::take(&mut self.pending_dropped);
            for (reason, n) in &drained {
                frames.extend(store::encode(&Record::dropped(*n, *reason)));
                count += 1;
            }
            let store_handle = self.store.clone();
            let mut store = lock(&store_handle);
            let mut result = Ok(());
            if count > 0 {
                match store.append(&frames, count) {
                    Ok(()) => unsynced = true,
                    Err(e) => {
                        // Keep the loss counts for the next attempt and add this batch to them.
                        for (reason, n) in drained {
                            *self.pending_dropped.entry(reason).or_default() += n;
                        }
                        self.lose(records, DropReason::IoError);
                        result = Err(e);
                    }
                }
            }
            let sync_due = last_sync.elapsed() >= self.config.sync_interval;
            if unsynced && (sync_due || !acks.is_empty()) {
                if let Err(e) = store.sync() {
                    result = result.and(Err(e));
                }
                unsynced = false;
                last_sync = Instant::now();
            }
            let roll_requested = acks.iter().any(|(roll, _)| *roll);
            if store.active_bytes >= self.config.segment_bytes || roll_requested {
                if let Err(e) = store.roll() {
                    result = result.and(Err(e));
                }
            }
            self.enforce_caps(&mut store);
            drop(store);
            for (_, ack) in acks {
                let _ = ack.send(match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                });
            }
        }
        let mut store = lock(&self.store);
        let _ = store.sync();
    }

    fn lose(&mut self, n: u64, reason: DropReason) {
        if n > 0 {
            *self.pending_dropped.entry(reason).or_default() += n;
            self.dropped_total.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn enforce_caps(&mut self, store: &mut Store) {
        let oldest_allowed = record::now_ns().saturating_sub(self.config.max_age.as_nanos() as u64);
        while let Some(seg) = store.sealed.first().cloned() {
            let reason = if store.total_bytes() > self.config.max_bytes {
                DropReason::ByteCap
            } else if seg.modified_ns < oldest_allowed {
                DropReason::AgeCap
            } else {
                break;
            };
            let lost = store.remove(seg.id).unwrap_or(0);
            self.lose(lost, reason);
        }
        if store.total_bytes() > self.config.max_bytes && store.active_bytes > 0 {
            // A single oversized active segment: seal it so the next pass can evict it.
            let _ = store.roll();
        }
    }
}
