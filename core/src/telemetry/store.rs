//! Append-only segment files with checksummed frames.
//!
//! A segment is `seg-<20-digit number>.log`; the highest-numbered one is active (appended
//! to), the others are sealed (immutable, uploadable, evictable). Each record is a frame:
//!
//! ```text
//! MAGIC (4 bytes "TRN1") | payload length (u32 LE) | CRC-32 of payload (u32 LE) | payload (JSON)
//! ```
//!
//! Reading never trusts a frame it cannot verify: on a bad magic, length or checksum it
//! moves one byte on and looks for the next magic. A torn tail (a write cut short by a
//! kill or power loss) or a corrupted region costs only the records it touches; every
//! intact frame around it is recovered.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::record::{DropReason, Record};

const MAGIC: &[u8; 4] = b"TRN1";
const HEADER: usize = 12;
/// Frames larger than this are treated as corruption.
pub(crate) const MAX_RECORD: usize = 1 << 20;

/// Encodes one record as a frame (a record serde cannot encode becomes a drop notice).
pub(crate) fn encode(record: &Record) -> Vec<u8> {
    let payload = serde_json::to_vec(record).unwrap_or_else(|_| {
        let dropped = Record::Dropped {
            at_ns: super::record::now_ns(),
            count: 1,
            reason: DropReason::Unencodable,
        };
        serde_json::to_vec(&dropped).unwrap_or_default()
    });
    let mut frame = Vec::with_capacity(HEADER + payload.len());
    frame.extend_from_slice(MAGIC);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// Bytes read from a segment file at a time.
const CHUNK: usize = 64 << 10;

/// Reads frames from `src` a chunk at a time, handing each intact frame's payload to
/// `take` and skipping damaged regions. Memory stays within one frame and one chunk however
/// long the source; returns the offset just past the last intact frame (where a torn or
/// damaged tail begins) and how many bytes were read.
fn scan(mut src: impl Read, mut take: impl FnMut(&[u8])) -> io::Result<(u64, u64)> {
    let mut buf: Vec<u8> = Vec::with_capacity(2 * CHUNK);
    // File offset of `buf[0]`, the scan position in `buf`, and whether `src` is done.
    let (mut base, mut pos, mut eof) = (0u64, 0usize, false);
    let mut good_end = 0u64;
    loop {
        // The bytes the frame starting at `pos` needs, once its header is in the buffer.
        let mut need = HEADER;
        if pos + HEADER <= buf.len() {
            if &buf[pos..pos + 4] != MAGIC {
                // Jump to the next byte that could start a magic.
                let rest = &buf[pos + 1..];
                pos += 1 + rest
                    .iter()
                    .position(|b| *b == MAGIC[0])
                    .unwrap_or(rest.len());
                continue;
            }
            let len = u32::from_le_bytes([buf[pos + 4], buf[pos + 5], buf[pos + 6], buf[pos + 7]]);
            if len as usize > MAX_RECORD {
                pos += 1;
                continue;
            }
            need = HEADER + len as usize;
        }
        if pos + need > buf.len() {
            if eof {
                if pos + HEADER > buf.len() {
                    break;
                }
                pos += 1; // a frame cut short: look for the next one in what is left
                continue;
            }
            // Keep what is still to scan, then read one more chunk.
            buf.drain(..pos);
            base += pos as u64;
            pos = 0;
            let old = buf.len();
            buf.resize(old + CHUNK.max(need), 0);
            let mut filled = old;
            while filled < buf.len() {
                match src.read(&mut buf[filled..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            buf.truncate(filled);
            continue;
        }
        let crc = u32::from_le_bytes([buf[pos + 8], buf[pos + 9], buf[pos + 10], buf[pos + 11]]);
        let payload = &buf[pos + HEADER..pos + need];
        if crc32fast::hash(payload) != crc {
            pos += 1;
            continue;
        }
        take(payload);
        pos += need;
        good_end = base + pos as u64;
    }
    Ok((good_end, base + buf.len() as u64))
}

/// A frame's record; an intact frame that is not a record we can read (e.g. a NaN
/// attribute, which JSON writes as null) is kept visible as a loss rather than skipped.
fn decode(payload: &[u8]) -> Record {
    serde_json::from_slice::<Record>(payload).unwrap_or(Record::Dropped {
        at_ns: 0,
        count: 1,
        reason: DropReason::Undecodable,
    })
}

/// Decodes every intact frame in `bytes`, skipping damaged regions. Returns the records
/// and the end offset of the last intact frame (where a torn tail begins).
#[cfg(test)]
pub(crate) fn decode_all(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let (good_end, _) = scan(bytes, |p| records.push(decode(p))).unwrap_or_default();
    (records, good_end as usize)
}

/// The records of the segment file at `path` (at most `limit` bytes of it are read).
fn read_records(path: &Path, limit: u64) -> io::Result<Vec<Record>> {
    let mut records = Vec::new();
    scan(File::open(path)?.take(limit), |p| records.push(decode(p)))?;
    Ok(records)
}

/// One segment file.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub id: u64,
    pub path: PathBuf,
    pub bytes: u64,
    /// Modification time of the file (its newest record), Unix ns.
    pub modified_ns: u64,
}

/// The segment directory.
pub(crate) struct Store {
    dir: PathBuf,
    /// Sealed segments, oldest first.
    pub sealed: Vec<Segment>,
    /// The active segment, opened lazily on first write.
    active_id: u64,
    active: Option<File>,
    pub active_bytes: u64,
    pub active_records: u64,
}

fn segment_id(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

fn modified_ns(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Store {
    /// Opens (creating) the directory, recovers existing segments (dropping torn tails) and
    /// starts a fresh active segment after the last one. Returns the store and how many
    /// damaged bytes recovery skipped. Segments are scanned frame by frame, and only their
    /// first `max_bytes` (the store's cap: no segment of ours is larger): memory and time
    /// stay bounded whatever is on disk.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<(Store, u64)> {
        fs::create_dir_all(dir)?;
        let mut segments = Vec::new();
        let mut skipped = 0;
        // The highest id of anything named like a segment, ours or not, so that the new
        // active segment never lands on a name something else holds.
        let mut highest = 0;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(id) = segment_id(&path) else {
                continue;
            };
            highest = highest.max(id);
            let meta = fs::symlink_metadata(&path)?;
            if !meta.file_type().is_file() {
                // Not ours (a directory, link or device): never read it, never write
                // through it, and do not let it stop the intact segments from loading.
                tracing::warn!(
                    "telemetry store: ignoring {}, not a regular file",
                    path.display()
                );
                continue;
            }
            let mut records = 0u64;
            let (good_end, _) = scan(File::open(&path)?.take(max_bytes), |_| records += 1)?;
            let damaged = meta.len().saturating_sub(good_end);
            if records == 0 {
                fs::remove_file(&path)?;
                skipped += meta.len();
                continue;
            }
            if damaged > 0 {
                // Cut the torn tail so later appends start on a frame boundary.
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(good_end)?;
                skipped += damaged;
            }
            segments.push(Segment {
                id,
                path,
                bytes: good_end,
                modified_ns: modified_ns(&meta),
            });
        }
        segments.sort_by_key(|s| s.id);
        let active_id = highest + 1;
        Ok((
            Store {
                dir: dir.to_path_buf(),
                sealed: segments,
                active_id,
                active: None,
                active_bytes: 0,
                active_records: 0,
            },
            skipped,
        ))
    }

    fn active_path(&self) -> PathBuf {
        self.dir.join(format!("seg-{:020}.log", self.active_id))
    }

    /// Appends frames to the active segment (not yet synced).
    pub fn append(&mut self, frames: &[u8], records: u64) -> io::Result<()> {
        if self.active.is_none() {
            self.active = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.active_path())?,
            );
        }
        let file = self
            .active
            .as_mut()
            .ok_or_else(|| io::Error::other("no active segment"))?;
        if let Err(e) = file.write_all(frames) {
            // Do not leave a half frame behind, and reopen next time (the disk may have room
            // again by then).
            let _ = file.set_len(self.active_bytes);
            self.active = None;
            return Err(e);
        }
        self.active_bytes += frames.len() as u64;
        self.active_records += records;
        Ok(())
    }

    /// Makes everything appended so far durable (fsync).
    pub fn sync(&mut self) -> io::Result<()> {
        match self.active.as_mut() {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// Seals the active segment (if it has data) and starts a new one.
    pub fn roll(&mut self) -> io::Result<()> {
        if self.active_bytes == 0 {
            return Ok(());
        }
        self.sync()?;
        self.active = None;
        let path = self.active_path();
        self.sealed.push(Segment {
            id: self.active_id,
            path,
            bytes: self.active_bytes,
            modified_ns: super::record::now_ns(),
        });
        self.active_id += 1;
        self.active_bytes = 0;
        self.active_records = 0;
        Ok(())
    }

    /// Bytes on disk, sealed and active.
    pub fn total_bytes(&self) -> u64 {
        self.sealed.iter().map(|s| s.bytes).sum::<u64>() + self.active_bytes
    }

    /// Removes a sealed segment, returning how many records it held.
    pub fn remove(&mut self, id: u64) -> io::Result<u64> {
        let Some(pos) = self.sealed.iter().position(|s| s.id == id) else {
            return Ok(0);
        };
        let seg = self.sealed.remove(pos);
        let mut records = 0u64;
        if let Ok(file) = File::open(&seg.path) {
            let _ = scan(file.take(seg.bytes), |_| records += 1);
        }
        match fs::remove_file(&seg.path) {
            Ok(()) => Ok(records),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(records),
            Err(e) => Err(e),
        }
    }

    /// Reads a sealed segment's records.
    pub fn read(&self, id: u64) -> io::Result<Vec<Record>> {
        let seg = self
            .sealed
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| io::Error::other("no such segment"))?;
        read_records(&seg.path, seg.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::record::Record;

    #[test]
    fn a_directory_named_like_a_segment_does_not_hide_the_intact_ones() {
        let dir = std::env::temp_dir().join(format!("tern-store-dir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        {
            let (mut store, _) = Store::open(&dir, 8 << 20).unwrap();
            let frame = encode(&Record::Dropped {
                at_ns: 1,
                count: 3,
                reason: DropReason::IoError,
            });
            store.append(&frame, 1).unwrap();
            store.roll().unwrap();
        }
        // Used to fail the whole open (remove_file on a directory).
        fs::create_dir(dir.join(format!("seg-{:020}.log", 7))).unwrap();
        let (store, _) = Store::open(&dir, 8 << 20).unwrap();
        assert_eq!(store.sealed.len(), 1);
        assert_eq!(store.read(store.sealed[0].id).unwrap().len(), 1);
        // The next segment goes past the directory's number.
        assert_eq!(store.active_id, 8);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn dropped(n: u64) -> Record {
        Record::Dropped {
            at_ns: n,
            count: n,
            reason: DropReason::IoError,
        }
    }

    #[test]
    fn unreadable_records_become_drop_notices() {
        let bad = Record::Event(crate::telemetry::EventRecord {
            at_ns: 1,
            name: "e".into(),
            increment: None,
            attributes: [(
                "x".to_string(),
                crate::telemetry::AttrValue::Float(f64::NAN),
            )]
            .into(),
        });
        let (records, _) = decode_all(&encode(&bad));
        assert!(
            matches!(&records[..], [Record::Dropped { reason, count: 1, .. }] if *reason == DropReason::Undecodable)
        );
    }

    /// A segment file far larger than the store's cap (a 3 GiB sparse file) is scanned only
    /// up to the cap, frame by frame: its intact records are recovered, the rest is cut.
    #[test]
    fn a_huge_segment_is_read_only_up_to_the_cap() {
        let dir = std::env::temp_dir().join(format!("tern-store-huge-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("seg-{:020}.log", 3));
        let mut frames = encode(&dropped(1));
        frames.extend(encode(&dropped(2)));
        fs::write(&path, &frames).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(3 << 30)
            .unwrap();
        let (store, skipped) = Store::open(&dir, 1 << 20).unwrap();
        assert_eq!(store.sealed.len(), 1);
        assert_eq!(store.read(3).unwrap(), vec![dropped(1), dropped(2)]);
        assert_eq!(skipped, (3 << 30) - frames.len() as u64);
        assert_eq!(fs::metadata(&path).unwrap().len(), frames.len() as u64);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Frames straddling the chunk boundaries the scanner reads by come out whole.
    #[test]
    fn frames_across_chunk_boundaries_are_read_whole() {
        let mut bytes = Vec::new();
        let mut expected = Vec::new();
        for i in 0..20_000u64 {
            if i % 7 == 0 {
                bytes.extend_from_slice(b"TRN1junk");
            }
            bytes.extend(encode(&dropped(i)));
            expected.push(dropped(i));
        }
        assert!(bytes.len() > 4 * CHUNK);
        let (records, good_end) = decode_all(&bytes);
        assert_eq!(records, expected);
        assert_eq!(good_end, bytes.len());
    }

    #[test]
    fn frames_round_trip_and_survive_garbage_between_them() {
        let mut bytes = encode(&dropped(1));
        bytes.extend_from_slice(b"garbage TRN1 \xff\xff\xff\xff more");
        bytes.extend(encode(&dropped(2)));
        let torn = encode(&dropped(3));
        bytes.extend_from_slice(&torn[..torn.len() - 3]);
        let (records, good_end) = decode_all(&bytes);
        assert_eq!(records, vec![dropped(1), dropped(2)]);
        assert_eq!(good_end, bytes.len() - (torn.len() - 3));
    }
}
