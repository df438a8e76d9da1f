//! Child process for the job queue's kill test: opens the queue in DIR, serves the model
//! `double` (`y = x + x` over `[batch, n]` f32) and runs every due job, printing `drained`
//! when none is left. The parent SIGKILLs it at random moments and checks what survived.

use std::sync::Arc;
use std::time::Duration;

use tern::{Model, Session, SessionOptions};
use tern_flows::{JobOptions, JobQueue};

fn main() {
    let dir = std::env::args().nth(1).expect("usage: job-runner DIR");
    let queue = match JobQueue::open(&dir, JobOptions::default().max_attempts(1000)) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("cannot open: {e}");
            std::process::exit(2);
        }
    };
    let model = Model::from_bytes(&tern_tests::fixtures::double_model()).expect("fixture");
    let session = Session::new(&model, SessionOptions::new().without_telemetry()).expect("session");
    queue.register("double", Arc::new(session));
    match queue.run_pending(Duration::from_secs(600)) {
        Ok(report) if report.pending == 0 => println!("drained"),
        Ok(report) => println!("left {}", report.pending),
        Err(e) => {
            eprintln!("run failed: {e}");
            std::process::exit(3);
        }
    }
}
