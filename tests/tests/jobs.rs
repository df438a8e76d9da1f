//! tern-flows' persistent job queue: priorities, idempotency, bounds, typed failures, every
//! state a killed process can leave behind, and a child process SIGKILLed again and again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tern::{Model, Session, SessionOptions, Tensor};
use tern_flows::{ErrorKind, JobError, JobOptions, JobOutcome, JobQueue, JobStatus, Priority};
use tern_tests::fixtures::double_model;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tern-jobs-{name}-{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn double_session() -> Arc<Session> {
    let model = Model::from_bytes(&double_model()).unwrap();
    Arc::new(Session::new(&model, SessionOptions::new().without_telemetry()).unwrap())
}

fn x(values: &[f32]) -> Vec<(String, Tensor)> {
    vec![(
        "x".to_string(),
        Tensor::from_slice(&[1, values.len()], values).unwrap(),
    )]
}

fn open(dir: &Path) -> JobQueue {
    let q = JobQueue::open(dir, JobOptions::default()).unwrap();
    q.register("double", double_session());
    q
}

/// The doubled values of a finished job.
fn done(q: &JobQueue, id: &str) -> Vec<f32> {
    match q.take_result(id).unwrap() {
        Some(JobOutcome::Done(out)) => out.get("y").unwrap().to_f32_vec().unwrap(),
        other => panic!("job {id}: {other:?}"),
    }
}

/// Job i of `ids` doubled `[i, 1]`; collecting each leaves every directory of the queue
/// empty (nothing pending, half-written or quarantined).
fn collected_once_and_nothing_left(q: &JobQueue, dir: &Path, ids: &[String]) {
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(done(q, id), vec![2.0 * i as f32, 2.0], "job {id}");
    }
    for sub in ["pending", "running", "done", "corrupt", "tmp"] {
        assert!(
            files(dir, sub).is_empty(),
            "{sub}/ holds {:?}",
            files(dir, sub)
        );
    }
}

fn files(dir: &Path, sub: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join(sub))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Jobs run highest priority first (a zero budget runs exactly one), results are collected
/// once, and a key makes submitting idempotent.
#[test]
fn jobs_run_by_priority_and_results_are_collected_once() {
    let dir = temp_dir("priority");
    let q = open(&dir);
    let low = q.submit("double", x(&[1.0]), Priority::Low, None).unwrap();
    let normal = q
        .submit("double", x(&[2.0]), Priority::Normal, None)
        .unwrap();
    let high = q
        .submit("double", x(&[3.0]), Priority::High, Some("photo.3"))
        .unwrap();
    assert_eq!(high, "photo.3");
    assert_eq!(
        q.submit("double", x(&[3.0]), Priority::High, Some("photo.3"))
            .unwrap(),
        "photo.3",
        "a key submitted twice is one job"
    );
    assert_eq!(q.status(&low).unwrap(), JobStatus::Pending { attempts: 0 });
    let first = q.run_pending(Duration::ZERO).unwrap();
    assert_eq!((first.succeeded, first.pending), (1, 2), "{first:?}");
    assert!(first.out_of_time);
    assert_eq!(q.status(&high).unwrap(), JobStatus::Finished);
    assert_eq!(
        q.status(&normal).unwrap(),
        JobStatus::Pending { attempts: 0 }
    );
    let rest = q.run_pending(Duration::from_secs(60)).unwrap();
    assert_eq!(
        (rest.succeeded, rest.pending, rest.out_of_time),
        (2, 0, false)
    );
    assert_eq!(done(&q, &high), vec![6.0]);
    assert_eq!(done(&q, &normal), vec![4.0]);
    assert_eq!(done(&q, &low), vec![2.0]);
    assert!(q.take_result(&low).unwrap().is_none(), "collected twice");
    assert_eq!(q.status(&low).unwrap(), JobStatus::Unknown);
    let e = q
        .submit("double", x(&[1.0]), Priority::Normal, Some("../escape"))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidOption, "{e}");
}

/// The queue is bounded; a second opener of the directory is refused; an unknown model and
/// inputs the session refuses fail for good with typed errors (no retry for bad inputs).
#[test]
fn bounds_and_failures_are_typed() {
    let dir = temp_dir("bounds");
    let q = JobQueue::open(&dir, JobOptions::default().capacity(2)).unwrap();
    q.register("double", double_session());
    let e = JobQueue::open(&dir, JobOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::QueueInUse, "{e}");
    let unknown = q
        .submit("deleted", x(&[1.0]), Priority::Normal, None)
        .unwrap();
    let bad = q
        .submit(
            "double",
            vec![(
                "nope".into(),
                Tensor::zeros(tern::DType::F32, &[1, 1]).unwrap(),
            )],
            Priority::Normal,
            None,
        )
        .unwrap();
    let e = q
        .submit("double", x(&[1.0]), Priority::Normal, None)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::QueueFull, "{e}");
    let report = q.run_pending(Duration::from_secs(60)).unwrap();
    assert_eq!((report.failed, report.retried), (2, 0), "{report:?}");
    match q.take_result(&unknown).unwrap() {
        Some(JobOutcome::Failed { error, .. }) => assert_eq!(error, JobError::UnknownModel),
        other => panic!("{other:?}"),
    }
    match q.take_result(&bad).unwrap() {
        Some(JobOutcome::Failed { error, message }) => {
            assert_eq!(
                error,
                JobError::Model(tern::ErrorKind::UnknownInput),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    // Collected results make room again.
    q.submit("double", x(&[1.0]), Priority::Normal, None)
        .unwrap();
    let e = JobQueue::open(temp_dir("zero"), JobOptions::default().capacity(0)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidOption, "{e}");
}

/// Every state a kill can leave: a job the process died running is pending again with one
/// more attempt, and failed as crashed once it has used them all; a finished job whose
/// running file was left is not run again; a leftover temporary file is removed; a damaged
/// job file is quarantined and its job fails as corrupt.
#[test]
fn what_a_killed_process_leaves_is_repaired_on_open() {
    let dir = temp_dir("repair");
    let options = JobOptions::default().max_attempts(2);
    let q = JobQueue::open(&dir, options.clone()).unwrap();
    let id = q
        .submit("double", x(&[5.0]), Priority::Normal, Some("crashy"))
        .unwrap();
    drop(q);
    let pending = files(&dir, "pending");
    let move_to_running = |name: &str| {
        std::fs::rename(
            dir.join("pending").join(name),
            dir.join("running").join(name),
        )
        .unwrap()
    };
    // Died while running it, once: pending again, attempt 1 of 2.
    move_to_running(&pending[0]);
    std::fs::write(dir.join("tmp").join("half-written"), b"TRNJ...").unwrap();
    let q = JobQueue::open(&dir, options.clone()).unwrap();
    assert_eq!(q.recovery().requeued, 1, "{:?}", q.recovery());
    assert_eq!(q.status(&id).unwrap(), JobStatus::Pending { attempts: 1 });
    assert!(files(&dir, "tmp").is_empty());
    drop(q);
    // Died while running it, twice: failed as crashed, never run a third time.
    move_to_running(&files(&dir, "pending")[0]);
    let q = JobQueue::open(&dir, options.clone()).unwrap();
    assert_eq!(q.recovery().crashed, 1, "{:?}", q.recovery());
    match q.take_result(&id).unwrap() {
        Some(JobOutcome::Failed { error, .. }) => assert_eq!(error, JobError::Crashed),
        other => panic!("{other:?}"),
    }

    // Finished, but killed before its running file was removed: not run again.
    let id = q
        .submit("double", x(&[7.0]), Priority::Normal, Some("finished"))
        .unwrap();
    let job = files(&dir, "pending")[0].clone();
    let bytes = std::fs::read(dir.join("pending").join(&job)).unwrap();
    q.register("double", double_session());
    assert_eq!(q.run_pending(Duration::from_secs(60)).unwrap().succeeded, 1);
    drop(q);
    std::fs::write(dir.join("running").join(&job), &bytes).unwrap();
    let q = JobQueue::open(&dir, options.clone()).unwrap();
    assert_eq!(q.recovery().finished, 1, "{:?}", q.recovery());
    q.register("double", double_session());
    assert_eq!(q.run_pending(Duration::from_secs(60)).unwrap().succeeded, 0);
    assert_eq!(done(&q, &id), vec![14.0]);

    // A damaged job file.
    let id = q
        .submit("double", x(&[1.0]), Priority::Normal, Some("damaged"))
        .unwrap();
    let job = dir.join("pending").join(&files(&dir, "pending")[0]);
    let mut bytes = std::fs::read(&job).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&job, bytes).unwrap();
    assert_eq!(q.run_pending(Duration::from_secs(60)).unwrap().failed, 1);
    match q.take_result(&id).unwrap() {
        Some(JobOutcome::Failed { error, .. }) => assert_eq!(error, JobError::Corrupt),
        other => panic!("{other:?}"),
    }
    assert_eq!(files(&dir, "corrupt").len(), 1);
}

/// A child process running the queue is SIGKILLed at 40 moments (during fsyncs, renames and
/// runs): no accepted job is lost, every job ends with exactly one result and the right
/// values, and nothing is left half-done or quarantined.
#[test]
fn sigkill_loses_no_job_and_leaves_nothing_half_done() {
    let exe = env!("CARGO_BIN_EXE_job-runner");
    let dir = temp_dir("kill");
    let jobs = 400;
    let ids: Vec<String> = {
        let q = JobQueue::open(&dir, JobOptions::default()).unwrap();
        (0..jobs)
            .map(|i| {
                let key = format!("k{i}");
                q.submit("double", x(&[i as f32, 1.0]), Priority::Normal, Some(&key))
                    .unwrap()
            })
            .collect()
    };
    let mut drained = false;
    let mut left_after: Vec<usize> = Vec::new();
    for round in 0..40u64 {
        let mut child = std::process::Command::new(exe)
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(2 + (round * 5) % 11));
        let _ = child.kill(); // SIGKILL (an error if it already exited)
        let out = child.wait_with_output().unwrap();
        drained |= String::from_utf8_lossy(&out.stdout).contains("drained");
        left_after.push(files(&dir, "pending").len() + files(&dir, "running").len());
    }
    // The kills landed while jobs were being worked through, not before or after.
    assert!(
        left_after.iter().any(|&n| n > 0 && n < jobs),
        "jobs left after each kill: {left_after:?}"
    );
    eprintln!("jobs left after each kill: {left_after:?}");
    // Then let one finish.
    let out = std::process::Command::new(exe).arg(&dir).output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("drained"),
        "the last runner: {out:?}"
    );
    let q = open(&dir);
    assert_eq!(
        q.recovery(),
        Default::default(),
        "the last runner left work behind"
    );
    collected_once_and_nothing_left(&q, &dir, &ids);
    eprintln!("a runner drained the queue before its kill: {drained}");
}

/// Runs the job-runner child with its file-size limit at `blocks` 512-byte blocks (SIGXFSZ
/// ignored, so a write past it fails with EFBIG as on a full disk).
fn runner_on_a_full_disk(blocks: u32, args: &[&str]) -> std::process::Output {
    let exe = env!("CARGO_BIN_EXE_job-runner");
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f {blocks} && exec \"$0\" \"$@\""
        ))
        .arg(exe)
        .args(args)
        .output()
        .unwrap()
}

/// A full disk (the process's writes fail with EFBIG): a submit fails with a typed `io`
/// error and leaves nothing behind; a runner that cannot write results fails with `io`
/// without losing a job; once there is room again every job runs once, with the right
/// values, and the queue holds nothing half-written.
#[test]
fn a_full_disk_is_a_typed_error_and_loses_nothing() {
    let dir = temp_dir("full-disk");
    let ids: Vec<String> = {
        let q = JobQueue::open(&dir, JobOptions::default()).unwrap();
        (0..3)
            .map(|i| {
                q.submit("double", x(&[i as f32, 1.0]), Priority::Normal, None)
                    .unwrap()
            })
            .collect()
    };
    let d = dir.to_str().unwrap();
    let out = runner_on_a_full_disk(1, &[d, "submit", "4096"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "error io",
        "{out:?}"
    );
    assert!(
        files(&dir, "tmp").is_empty(),
        "a half-written job stays behind"
    );
    assert_eq!(files(&dir, "pending").len(), 3);

    let out = runner_on_a_full_disk(0, &[d]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "error io",
        "{out:?}"
    );

    let q = open(&dir);
    let report = q.run_pending(Duration::from_secs(60)).unwrap();
    assert_eq!((report.succeeded, report.pending), (3, 0), "{report:?}");
    collected_once_and_nothing_left(&q, &dir, &ids);
}
