//! Child process for the telemetry kill test: records counter `n` with attribute `i` = 0, 1,
//! 2… forever, flushing every 7 records and printing `durable <i>` once a flush returned.
//! The parent SIGKILLs it at a random moment and checks what survived.

use tern::telemetry::{AttrValue, Telemetry, TelemetryConfig};

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: telemetry-writer DIR");
    let config = TelemetryConfig {
        segment_bytes: 4096,
        sync_interval: std::time::Duration::from_millis(5),
        ..Default::default()
    };
    let telemetry = match Telemetry::open(&dir, config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot open: {e}");
            std::process::exit(2);
        }
    };
    let start: i64 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut i = start;
    loop {
        telemetry.counter("n", 1, &[("i", AttrValue::Int(i))]);
        if i % 7 == 6 && telemetry.flush().is_ok() {
            println!("durable {i}");
        }
        i += 1;
    }
}
