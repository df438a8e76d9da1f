//! The process-wide buffer: set once at app start, read by every session built afterwards.

use std::path::Path;
use std::sync::RwLock;

use super::{Telemetry, TelemetryConfig};
use crate::error::Result;
use crate::sync::{read, write};

/// The process-wide buffer sessions use by default.
static GLOBAL: RwLock<Option<Telemetry>> = RwLock::new(None);

/// Opens the buffer in `dir` and makes it the process-wide default: every session created
/// afterwards records into it (unless its options say otherwise). Call once at app start.
pub fn init(dir: impl AsRef<Path>, config: TelemetryConfig) -> Result<Telemetry> {
    let t = Telemetry::open(dir, config)?;
    *write(&GLOBAL) = Some(t.clone());
    Ok(t)
}

/// The process-wide buffer, if [`init`] was called.
pub fn global() -> Option<Telemetry> {
    read(&GLOBAL).clone()
}

/// Stops using a process-wide buffer (sessions created afterwards record nothing).
pub fn clear_global() {
    *write(&GLOBAL) = None;
}
