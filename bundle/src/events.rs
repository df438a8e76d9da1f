//! The lifecycle's decisions as telemetry events, in the buffer the store's sessions
//! record into (the process-wide one by default; none when the sessions record nothing),
//! uploaded with everything else as OTLP log records.
//!
//! | event | attributes |
//! |---|---|
//! | `tern.model.installed` | `model`, `version`, `golden_worst_share` |
//! | `tern.model.install_refused` | `error_kind`, and `model`, `version` when the bundle was readable |
//! | `tern.model.activated` | `model`, `version` |
//! | `tern.model.rolled_back` | `model`, `from`, `to`, `reason` (`app`, `crash_loop`) |
//! | `tern.model.crash_detected` | `model`, `version`, `crashes` |
//! | `tern.model.quarantined` | `model`, `version`, `reason` (`crash_loop`, `rollout`) |
//! | `tern.model.updated` | `model`, `outcome` (`installed`, `up_to_date`), `version` |
//! | `tern.model.update_failed` | `model`, `error_kind` |
//! | `tern.rollout.started` | `model`, `active`, `candidate`, `stage` |
//! | `tern.rollout.verdict` | `model`, `active`, `candidate`, `verdict`, `reason`, `candidate_runs` |
//!
//! Spans of sessions the store builds carry the bundle's name and version as the model's
//! (`tern.model`, `tern.model.version`), and in a rollout `tern.rollout.arm`; golden-check
//! runs carry `tern.purpose = golden_check`.

use tern::telemetry::AttrValue;
use tern::{SessionOptions, Telemetry, TelemetryChoice};

use crate::error::Error;
use crate::rollout::{RolloutEvent, Verdict};
use crate::store::StoreEvent;

/// Where a store's events go.
#[derive(Debug, Clone)]
pub(crate) struct Events(Option<Telemetry>);

fn v(n: u64) -> AttrValue {
    AttrValue::from(i64::try_from(n).unwrap_or(i64::MAX))
}

impl Events {
    /// The buffer `options`' sessions record into.
    pub(crate) fn for_sessions(options: &SessionOptions) -> Events {
        Events(match &options.telemetry.buffer {
            TelemetryChoice::Global => tern::telemetry::global(),
            TelemetryChoice::To(t) => Some(t.clone()),
            _ => None,
        })
    }

    /// Records `name` with `attributes`.
    pub(crate) fn emit(&self, name: &str, attributes: &[(&str, AttrValue)]) {
        if let Some(t) = &self.0 {
            t.event(name, attributes);
        }
    }

    pub(crate) fn installed(&self, model: &str, version: u64, worst_share: f64) {
        self.emit(
            "tern.model.installed",
            &[
                ("model", model.into()),
                ("version", v(version)),
                ("golden_worst_share", worst_share.into()),
            ],
        );
    }

    pub(crate) fn refused(&self, event: &str, bundle: Option<(&str, u64)>, error: &Error) {
        let mut attrs = vec![("error_kind", AttrValue::from(error.kind()))];
        if let Some((model, version)) = bundle {
            attrs.push(("model", model.into()));
            attrs.push(("version", v(version)));
        }
        self.emit(event, &attrs);
    }

    pub(crate) fn store_event(&self, event: &StoreEvent) {
        match event {
            StoreEvent::CrashDetected {
                name,
                version,
                crashes,
            } => self.emit(
                "tern.model.crash_detected",
                &[
                    ("model", name.as_str().into()),
                    ("version", v(*version)),
                    ("crashes", v(u64::from(*crashes))),
                ],
            ),
            StoreEvent::Quarantined { name, version } => self.emit(
                "tern.model.quarantined",
                &[
                    ("model", name.as_str().into()),
                    ("version", v(*version)),
                    ("reason", "crash_loop".into()),
                ],
            ),
            StoreEvent::RolledBack { name, from, to } => {
                self.rolled_back(name, *from, *to, "crash_loop")
            }
        }
    }

    pub(crate) fn rolled_back(&self, model: &str, from: u64, to: u64, reason: &str) {
        self.emit(
            "tern.model.rolled_back",
            &[
                ("model", model.into()),
                ("from", v(from)),
                ("to", v(to)),
                ("reason", reason.into()),
            ],
        );
    }

    pub(crate) fn verdict(&self, e: &RolloutEvent) {
        let (verdict, reason) = match e.verdict {
            Verdict::Promote => ("promote", String::new()),
            Verdict::RollBack(r) => ("roll_back", r.to_string()),
            _ => ("continue", String::new()),
        };
        self.emit(
            "tern.rollout.verdict",
            &[
                ("model", e.name.as_str().into()),
                ("active", v(e.active)),
                ("candidate", v(e.candidate)),
                ("verdict", verdict.into()),
                ("reason", reason.into()),
                ("candidate_runs", v(e.candidate_runs)),
            ],
        );
        if let Verdict::RollBack(_) = e.verdict {
            self.emit(
                "tern.model.quarantined",
                &[
                    ("model", e.name.as_str().into()),
                    ("version", v(e.candidate)),
                    ("reason", "rollout".into()),
                ],
            );
        }
    }
}
