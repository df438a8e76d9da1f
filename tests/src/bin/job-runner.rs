//! Child process for the job queue's kill and full-disk tests: opens the queue in DIR,
//! serves the model `double` (`y = x + x` over `[batch, n]` f32) and runs every due job,
//! printing `drained` when none is left. The parent SIGKILLs it at random moments, or runs
//! it under a file-size limit, and checks what survived. `job-runner DIR submit N` instead
//! submits one job of N values and prints `submitted ID` or `error KIND`.

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
    if std::env::args().nth(2).as_deref() == Some("submit") {
        let n: usize = std::env::args()
            .nth(3)
            .and_then(|n| n.parse().ok())
            .expect("usage: job-runner DIR submit N");
        let x = tern::Tensor::from_vec(&[1, n], vec![1.0f32; n]).expect("tensor");
        match queue.submit(
            "double",
            vec![("x".into(), x)],
            tern_flows::Priority::Normal,
            None,
        ) {
            Ok(id) => println!("submitted {id}"),
            Err(e) => {
                println!("error {}", e.kind().as_str());
                eprintln!("{e}");
                std::process::exit(4);
            }
        }
        return;
    }
    let model = Model::from_bytes(&tern_tests::fixtures::double_model()).expect("fixture");
    let session = Session::new(&model, SessionOptions::new().without_telemetry()).expect("session");
    queue.register("double", Arc::new(session));
    match queue.run_pending(Duration::from_secs(600)) {
        Ok(report) if report.pending == 0 => println!("drained"),
        Ok(report) => println!("left {}", report.pending),
        Err(e) => {
            println!("error {}", e.kind().as_str());
            eprintln!("run failed: {e}");
            std::process::exit(3);
        }
    }
}
