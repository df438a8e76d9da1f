//! The telemetry store's recovery on any bytes: a directory holding them as a segment is
//! opened (recovering what it can), its records read back and built into OTLP batches.
//! Errors are fine; a crash or a panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::telemetry::{otlp, Telemetry, TelemetryConfig};

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("tern-fuzz-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let _ = std::fs::write(dir.join(format!("seg-{:020}.log", 1)), data);
    let config = TelemetryConfig::default();
    if let Ok(telemetry) = Telemetry::open(&dir, config.clone()) {
        if let Ok(records) = telemetry.stored_records() {
            let _ = otlp::build(1, &records, &config);
        }
        let _ = telemetry.close();
    }
});
