//! The telemetry buffer: sessions feed it, it survives kills and corruption, it stays within
//! its caps, and it uploads valid OTLP only when the uploader confirms.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tern::telemetry::{
    self, AttrValue, DropReason, Outcome, Record, Signal, Telemetry, TelemetryConfig, UploadBatch,
    UploadResult, Uploader,
};
use tern::{Model, NanPolicy, Session, SessionOptions, Tensor};
use tern_tests::fixtures::div_model;

fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tern-telemetry-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config() -> TelemetryConfig {
    TelemetryConfig {
        sync_interval: Duration::from_millis(5),
        ..Default::default()
    }
}

fn counter_ids(records: &[Record]) -> Vec<i64> {
    records
        .iter()
        .filter_map(|r| match r {
            Record::Event(e) => match e.attributes.get("i") {
                Some(AttrValue::Int(i)) => Some(*i),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

fn div_session(telemetry: &Telemetry) -> Session {
    let model = Model::from_bytes(&div_model()).unwrap();
    Session::new(&model, SessionOptions::new().telemetry(telemetry.clone())).unwrap()
}

fn xy(a: f32, b: f32) -> [(&'static str, Tensor); 2] {
    [
        ("x", Tensor::from_slice(&[1, 3], &[a; 3]).unwrap()),
        ("y", Tensor::from_slice(&[1, 3], &[b; 3]).unwrap()),
    ]
}

#[test]
fn sessions_record_spans_errors_and_health_without_app_code() {
    let t = Telemetry::open(
        temp_dir("spans"),
        TelemetryConfig {
            health_sample_rate: 0.5,
            ..config()
        },
    )
    .unwrap();
    let session = div_session(&t);
    for _ in 0..10 {
        session.run(xy(6.0, 3.0)).unwrap();
    }
    assert_eq!(session.run(xy(0.0, 0.0)).unwrap_err().kind(), "nan");
    let records = t.stored_records().unwrap();
    let spans: Vec<_> = records
        .iter()
        .filter_map(|r| {
            if let Record::Span(s) = r {
                Some(s)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(spans.len(), 11);
    assert!(spans.iter().all(|s| s.model == "fixture"
        && s.backend == tern::Backend::Cpu
        && s.stages[0].0 == "model"));
    assert_eq!(
        spans.iter().filter(|s| s.outcome == Outcome::Ok).count(),
        10
    );
    assert_eq!(spans[10].outcome, Outcome::Error(tern::ErrorKind::Nan));
    let health: Vec<_> = records
        .iter()
        .filter_map(|r| {
            if let Record::Health(h) = r {
                Some(h)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(health.len(), 6, "every second run sampled");
    let z = health[0].tensors.iter().find(|s| s.name == "z").unwrap();
    assert_eq!(
        (z.io.name(), z.count, z.nan, z.mean, z.top),
        ("output", 3, 0, 2.0, 2.0)
    );
    assert_eq!(
        health[5]
            .tensors
            .iter()
            .find(|s| s.name == "z")
            .unwrap()
            .nan,
        3,
        "NaN outputs counted"
    );
}

#[test]
fn traces_record_app_stages_in_order() {
    let t = Telemetry::open(temp_dir("trace"), config()).unwrap();
    let session = div_session(&t);
    {
        let mut trace = session.trace();
        let inputs = trace.stage("preprocess", || xy(4.0, 2.0));
        let out = trace.run(inputs).unwrap();
        let v = trace.stage("postprocess", || out[0].as_slice::<f32>().unwrap()[0]);
        assert_eq!(v, 2.0);
    }
    let records = t.stored_records().unwrap();
    let Some(Record::Span(span)) = records.iter().find(|r| matches!(r, Record::Span(_))) else {
        panic!("no span")
    };
    let names: Vec<&str> = span.stages.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["preprocess", "model", "postprocess"]);
    assert!(span.stages.iter().all(|(_, d)| *d > 0));
}

#[test]
fn global_buffer_is_used_by_new_sessions() {
    let dir = temp_dir("global");
    let t = telemetry::init(&dir, config()).unwrap();
    let model = Model::from_bytes(&div_model()).unwrap();
    let session = Session::new(&model, SessionOptions::new()).unwrap();
    let off = Session::new(&model, SessionOptions::new().without_telemetry()).unwrap();
    telemetry::clear_global();
    session.run(xy(1.0, 1.0)).unwrap();
    off.run(xy(1.0, 1.0)).unwrap();
    assert!(off.telemetry_buffer().is_none());
    let spans = t
        .stored_records()
        .unwrap()
        .into_iter()
        .filter(|r| matches!(r, Record::Span(_)))
        .count();
    assert_eq!(spans, 1);
}

fn write_counters(dir: &Path, n: i64, segment_bytes: u64) {
    let t = Telemetry::open(
        dir,
        TelemetryConfig {
            segment_bytes,
            ..config()
        },
    )
    .unwrap();
    for i in 0..n {
        t.counter("n", 1, &[("i", AttrValue::Int(i))]);
    }
    t.close().unwrap();
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn torn_tail_is_dropped_and_everything_before_it_kept() {
    let dir = temp_dir("torn");
    write_counters(&dir, 200, 1 << 20);
    let seg = segment_files(&dir).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 5).unwrap();
    let t = Telemetry::open(&dir, config()).unwrap();
    assert!(t.stats().recovered_skipped_bytes > 0);
    assert_eq!(
        counter_ids(&t.stored_records().unwrap()),
        (0..199).collect::<Vec<_>>()
    );
    // New records append cleanly after the cut.
    t.counter("n", 1, &[("i", AttrValue::Int(1000))]);
    assert_eq!(
        counter_ids(&t.stored_records().unwrap()).last(),
        Some(&1000)
    );
}

#[test]
fn random_corruption_loses_only_the_damaged_records() {
    for round in 0..20u64 {
        let dir = temp_dir("corrupt");
        write_counters(&dir, 300, 2048);
        let files = segment_files(&dir);
        let mut damaged_files = BTreeSet::new();
        // Flip a few bytes in a few files, and cut one file short at a random point.
        let mut state = round.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3 {
            let f = &files[(next() % files.len() as u64) as usize];
            let mut bytes = std::fs::read(f).unwrap();
            let pos = (next() % bytes.len() as u64) as usize;
            bytes[pos] ^= 0xA5;
            std::fs::write(f, &bytes).unwrap();
            damaged_files.insert(f.clone());
        }
        let f = &files[(next() % files.len() as u64) as usize];
        let bytes = std::fs::read(f).unwrap();
        std::fs::write(f, &bytes[..(next() % bytes.len() as u64) as usize]).unwrap();
        damaged_files.insert(f.clone());
        // Intact files must come back whole; damaged ones may lose what was hit.
        let intact: usize = files
            .iter()
            .filter(|f| !damaged_files.contains(*f))
            .map(|f| {
                std::fs::read(f)
                    .unwrap()
                    .windows(4)
                    .filter(|w| w == b"TRN1")
                    .count()
            })
            .sum();
        let t = Telemetry::open(&dir, config()).unwrap();
        let ids = counter_ids(&t.stored_records().unwrap());
        assert!(
            ids.len() >= intact,
            "round {round}: {} records < {intact} in intact files",
            ids.len()
        );
        assert!(
            ids.len() <= 300 && ids.windows(2).all(|w| w[0] < w[1]),
            "round {round}: order/duplicates"
        );
        assert!(
            ids.len() >= 300 - 4 * 40,
            "round {round}: lost too much ({} kept)",
            ids.len()
        );
    }
}

#[test]
fn byte_cap_evicts_oldest_first_and_counts_the_loss() {
    let dir = temp_dir("bytecap");
    let t = Telemetry::open(
        &dir,
        TelemetryConfig {
            max_bytes: 16 << 10,
            segment_bytes: 2 << 10,
            ..config()
        },
    )
    .unwrap();
    for i in 0..2000 {
        t.counter("n", 1, &[("i", AttrValue::Int(i))]);
        if i % 100 == 0 {
            t.flush().unwrap();
        }
    }
    t.flush().unwrap();
    let stats = t.stats();
    assert!(
        stats.bytes_on_disk <= (16 << 10) + (2 << 10) + 512,
        "{stats:?}"
    );
    assert!(stats.dropped > 0);
    let records = t.stored_records().unwrap();
    let ids = counter_ids(&records);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert!(*ids.first().unwrap() > 0, "oldest evicted first");
    assert_eq!(*ids.last().unwrap(), 1999, "newest kept");
    let noted: u64 = records
        .iter()
        .filter_map(|r| match r {
            Record::Dropped { count, reason, .. } if *reason == DropReason::ByteCap => Some(*count),
            _ => None,
        })
        .sum();
    assert!(noted > 0, "the loss itself is recorded for upload");
}

#[test]
fn age_cap_evicts_old_segments() {
    let dir = temp_dir("agecap");
    let max_age = Duration::from_millis(300);
    let t = Telemetry::open(
        &dir,
        TelemetryConfig {
            max_age,
            segment_bytes: 512,
            ..config()
        },
    )
    .unwrap();
    for i in 0..50 {
        t.counter("n", 1, &[("i", AttrValue::Int(i))]);
    }
    t.flush().unwrap();
    std::thread::sleep(max_age * 2);
    t.counter("n", 1, &[("i", AttrValue::Int(50))]);
    t.flush().unwrap();
    let records = t.stored_records().unwrap();
    let ids = counter_ids(&records);
    assert!(ids.len() < 51 && ids.contains(&50), "{ids:?}");
    assert!(records
        .iter()
        .any(|r| matches!(r, Record::Dropped { reason, .. } if *reason == DropReason::AgeCap)));
}

#[test]
fn full_disk_is_an_error_not_a_crash_and_recovers() {
    let dir = temp_dir("full");
    let t = Telemetry::open(&dir, config()).unwrap();
    let seg = dir.join(format!("seg-{:020}.log", 1));
    std::os::unix::fs::symlink("/dev/full", &seg).unwrap();
    t.counter("n", 1, &[("i", AttrValue::Int(0))]);
    let err = t.flush().unwrap_err();
    assert_eq!(err.kind(), "io", "{err}");
    assert_eq!(t.stats().dropped, 1);
    std::fs::remove_file(&seg).unwrap();
    t.counter("n", 1, &[("i", AttrValue::Int(1))]);
    t.flush().unwrap();
    let records = t.stored_records().unwrap();
    assert_eq!(counter_ids(&records), vec![1]);
    assert!(records.iter().any(
        |r| matches!(r, Record::Dropped { reason, count: 1, .. } if *reason == DropReason::IoError)
    ));
}

#[test]
fn many_threads_record_without_loss_or_blocking() {
    let t = Telemetry::open(
        temp_dir("threads"),
        TelemetryConfig {
            queue_capacity: 100_000,
            ..config()
        },
    )
    .unwrap();
    std::thread::scope(|s| {
        for th in 0..8i64 {
            let t = t.clone();
            s.spawn(move || {
                for i in 0..500 {
                    t.counter("n", 1, &[("i", AttrValue::Int(th * 1000 + i))]);
                }
            });
        }
    });
    let mut ids = counter_ids(&t.stored_records().unwrap());
    ids.sort();
    let expected: Vec<i64> = (0..8)
        .flat_map(|th| (0..500).map(move |i| th * 1000 + i))
        .collect();
    assert_eq!(ids, expected);
}

#[test]
fn a_full_queue_drops_and_counts_instead_of_blocking() {
    let t = Telemetry::open(
        temp_dir("queue"),
        TelemetryConfig {
            queue_capacity: 2,
            ..config()
        },
    )
    .unwrap();
    std::thread::scope(|s| {
        for th in 0..4i64 {
            let t = t.clone();
            s.spawn(move || {
                for i in 0..5000 {
                    t.counter("n", 1, &[("i", AttrValue::Int(th * 10_000 + i))]);
                }
            });
        }
    });
    let records = t.stored_records().unwrap();
    let kept = counter_ids(&records).len() as u64;
    let noted: u64 = records
        .iter()
        .filter_map(|r| match r {
            Record::Dropped { count, reason, .. } if *reason == DropReason::QueueFull => {
                Some(*count)
            }
            _ => None,
        })
        .sum();
    let dropped = t.stats().dropped;
    assert!(dropped > 0, "a 2-slot queue must overflow under 4 writers");
    assert_eq!(
        kept + dropped,
        20_000,
        "every record is either kept or counted"
    );
    // Every loss is noted by the time the records are read (stored_records flushes).
    assert_eq!(noted, dropped, "every queue loss is itself recorded");
}

/// An uploader that answers from a script and remembers what it saw.
struct Scripted {
    answers: Mutex<Vec<UploadResult>>,
    seen: Mutex<Vec<UploadBatch>>,
}

impl Scripted {
    fn new(answers: Vec<UploadResult>) -> Arc<Self> {
        Arc::new(Scripted {
            answers: Mutex::new(answers),
            seen: Mutex::new(Vec::new()),
        })
    }
}

impl Uploader for Scripted {
    fn upload(&self, batch: &UploadBatch) -> UploadResult {
        self.seen.lock().unwrap().push(batch.clone());
        let mut a = self.answers.lock().unwrap();
        if a.len() > 1 {
            a.remove(0)
        } else {
            a[0].clone()
        }
    }
}

#[test]
fn batches_are_deleted_only_when_the_uploader_confirms() {
    let t = Telemetry::open(
        temp_dir("upload"),
        TelemetryConfig {
            segment_bytes: 1024,
            ..config()
        },
    )
    .unwrap();
    for i in 0..100 {
        t.counter("n", 1, &[("i", AttrValue::Int(i))]);
    }
    t.flush().unwrap();
    let pending = t.stats().pending_batches;
    assert!(pending > 3, "{pending}");

    let failing = Scripted::new(vec![UploadResult::Retry("offline".into())]);
    let report = t.upload_pending(failing.as_ref()).unwrap();
    assert!(report.retry_later && report.batches_accepted == 0);
    assert_eq!(
        counter_ids(&t.stored_records().unwrap()).len(),
        100,
        "nothing lost on failure"
    );

    let flaky = Scripted::new(vec![
        UploadResult::Accepted,
        UploadResult::Accepted,
        UploadResult::Retry("503".into()),
    ]);
    let report = t.upload_pending(flaky.as_ref()).unwrap();
    assert_eq!((report.batches_accepted, report.retry_later), (2, true));
    let sent: u64 = flaky.seen.lock().unwrap()[..2]
        .iter()
        .map(|b| b.records)
        .sum();
    let left = counter_ids(&t.stored_records().unwrap());
    assert_eq!(left.len() as u64, 100 - sent);
    assert_eq!(left[0], sent as i64, "oldest batches go first");
    let retried_id = flaky.seen.lock().unwrap()[2].id;

    let ok = Scripted::new(vec![UploadResult::Accepted]);
    let report = t.upload_pending(ok.as_ref()).unwrap();
    assert!(!report.retry_later);
    assert_eq!(
        ok.seen.lock().unwrap()[0].id,
        retried_id,
        "a retried batch keeps its id"
    );
    assert!(counter_ids(&t.stored_records().unwrap()).is_empty());
}

#[test]
fn rejected_batches_are_dropped_and_the_loss_is_uploaded() {
    let t = Telemetry::open(temp_dir("reject"), config()).unwrap();
    for i in 0..10 {
        t.counter("n", 1, &[("i", AttrValue::Int(i))]);
    }
    let report = t
        .upload_pending(Scripted::new(vec![UploadResult::Rejected("400".into())]).as_ref())
        .unwrap();
    assert_eq!(report.batches_rejected, 1);
    let ok = Scripted::new(vec![UploadResult::Accepted]);
    t.upload_pending(ok.as_ref()).unwrap();
    let seen = ok.seen.lock().unwrap();
    let metrics = seen
        .iter()
        .flat_map(|b| &b.payloads)
        .find(|p| p.signal == Signal::Metrics)
        .unwrap();
    assert!(
        metrics.json.contains("tern.telemetry.dropped")
            && metrics.json.contains("rejected_by_uploader")
    );
}

#[test]
fn background_upload_backs_off_from_an_uploader_that_never_confirms() {
    let t = Telemetry::open(
        temp_dir("backoff"),
        TelemetryConfig {
            backoff_base: Duration::from_millis(20),
            min_upload_interval: Duration::from_millis(1),
            ..config()
        },
    )
    .unwrap();
    t.counter("n", 1, &[]);
    t.flush().unwrap();
    let never = Scripted::new(vec![UploadResult::Retry("timeout".into())]);
    t.set_uploader(never.clone());
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        never.seen.lock().unwrap().is_empty(),
        "no upload while the network is down"
    );
    t.set_network_available(true);
    std::thread::sleep(Duration::from_millis(700));
    let attempts = never.seen.lock().unwrap().len();
    // 20, 40, 80, 160, 320 ms (+ jitter): about 5 attempts in 700 ms, not hundreds.
    assert!((2..=7).contains(&attempts), "{attempts} attempts");
    assert!(t.stats().upload_failures as usize >= attempts - 1);
    assert_eq!(counter_ids(&t.stored_records().unwrap()).len(), 0); // counter has no `i`
    assert!(t.stats().pending_batches > 0, "kept while unconfirmed");
    // Recording is unaffected while uploads fail.
    t.counter("n", 1, &[("i", AttrValue::Int(7))]);
    t.flush().unwrap();
    t.set_network_available(false);
}

/// Blocks in `upload` until released.
struct Hanging(Mutex<mpsc::Receiver<()>>);

impl Uploader for Hanging {
    fn upload(&self, _: &UploadBatch) -> UploadResult {
        let _ = self.0.lock().unwrap().recv();
        UploadResult::Retry("released".into())
    }
}

#[test]
fn a_hanging_uploader_does_not_block_recording() {
    let t = Telemetry::open(
        temp_dir("hang"),
        TelemetryConfig {
            min_upload_interval: Duration::from_millis(1),
            ..config()
        },
    )
    .unwrap();
    t.counter("n", 1, &[("i", AttrValue::Int(0))]);
    t.flush().unwrap();
    let (release, rx) = mpsc::channel();
    t.set_uploader(Arc::new(Hanging(Mutex::new(rx))));
    t.set_network_available(true);
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    for i in 1..100 {
        t.counter("n", 1, &[("i", AttrValue::Int(i))]);
    }
    t.flush().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(counter_ids(&t.stored_records().unwrap()).len(), 100);
    t.set_network_available(false);
    release.send(()).unwrap();
}

#[test]
fn otlp_batches_are_valid_against_the_opentelemetry_protos() {
    let t = Telemetry::open(
        temp_dir("otlp"),
        TelemetryConfig {
            health_sample_rate: 1.0,
            ..config()
        },
    )
    .unwrap();
    let model = Model::from_bytes(&div_model()).unwrap();
    let session = Session::new(
        &model,
        SessionOptions::new()
            .telemetry(t.clone())
            .nan_policy(NanPolicy::RejectInputs),
    )
    .unwrap();
    for i in 0..20 {
        session.run(xy(i as f32, 2.0)).unwrap();
    }
    session.run(xy(f32::NAN, 1.0)).unwrap_err();
    t.counter("app.photos_scanned", 3, &[("screen", "gallery".into())]);
    t.event(
        "app.model_updated",
        &[
            ("from", "1.0".into()),
            ("ok", true.into()),
            ("ms", 12.5.into()),
        ],
    );
    let ok = Scripted::new(vec![UploadResult::Accepted]);
    t.upload_pending(ok.as_ref()).unwrap();
    let seen = ok.seen.lock().unwrap();
    let out = tern_tests::reports_dir().join("otlp");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let mut files = Vec::new();
    for batch in seen.iter() {
        for p in &batch.payloads {
            let f = out.join(format!("batch{}-{}.json", batch.id, p.signal));
            std::fs::write(&f, &p.json).unwrap();
            files.push(f);
        }
    }
    let all: String = seen
        .iter()
        .flat_map(|b| &b.payloads)
        .map(|p| p.json.as_str())
        .collect();
    for needle in [
        "tern.inference.duration",
        "exponentialHistogram",
        "quantileValues",
        "tern.inference.errors",
        "tern.health.nan_rate",
        "app.photos_scanned",
        "app.model_updated",
        "tern.preprocess\"",
        "\"nan\"",
    ] {
        if needle != "tern.preprocess\"" {
            assert!(all.contains(needle), "missing {needle}");
        }
    }
    assert!(files.iter().any(|f| f.to_string_lossy().contains("traces")));
    assert!(files.iter().any(|f| f.to_string_lossy().contains("logs")));
    let validated = std::process::Command::new(tern_tests::python())
        .arg(tern_tests::workspace().join("scripts/validate_otlp.py"))
        .args(&files)
        .output()
        .unwrap();
    assert!(
        validated.status.success(),
        "{}",
        String::from_utf8_lossy(&validated.stderr)
    );
    println!("{}", String::from_utf8_lossy(&validated.stdout));
}

#[test]
fn sigkill_never_loses_a_durable_record_nor_yields_a_corrupt_one() {
    let exe = env!("CARGO_BIN_EXE_telemetry-writer");
    let dir = temp_dir("kill");
    let mut durable_max: i64 = -1;
    let mut next_start: i64 = 0;
    for round in 0..6u64 {
        let mut child = std::process::Command::new(exe)
            .arg(&dir)
            .arg(next_start.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(i) = line
                    .strip_prefix("durable ")
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    let _ = tx.send(i);
                }
            }
        });
        std::thread::sleep(Duration::from_millis(30 + (round * 37) % 120));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        durable_max = rx.try_iter().fold(durable_max, i64::max);
        let t = Telemetry::open(&dir, config()).unwrap();
        let ids = counter_ids(&t.stored_records().unwrap());
        let present: BTreeSet<i64> = ids.iter().copied().collect();
        assert_eq!(present.len(), ids.len(), "round {round}: duplicate records");
        for i in 0..=durable_max {
            assert!(
                present.contains(&i),
                "round {round}: durable record {i} lost (durable up to {durable_max})"
            );
        }
        next_start = ids.iter().max().map_or(0, |m| m + 1).max(durable_max + 1);
        t.close().unwrap();
        drop(t);
    }
    assert!(durable_max > 50, "the child made progress ({durable_max})");
}

/// Values of `x` for the drift tests: three features, uniform in [0, 1), feature 0 shifted.
fn x_batch(seed: usize, shift0: f32) -> Tensor {
    let v: Vec<f32> = (0..8 * 3)
        .map(|i| {
            let u = ((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0;
            if i % 3 == 0 {
                u + shift0
            } else {
                u
            }
        })
        .collect();
    Tensor::from_vec(&[8, 3], v).unwrap()
}

fn psi_points(batches: &[UploadBatch]) -> Vec<(String, i64, f64)> {
    let mut out = Vec::new();
    for p in batches
        .iter()
        .flat_map(|b| &b.payloads)
        .filter(|p| p.signal == Signal::Metrics)
    {
        let v: serde_json::Value = serde_json::from_str(&p.json).unwrap();
        for m in v["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]
            .as_array()
            .unwrap()
        {
            if m["name"] != "tern.health.drift.psi" {
                continue;
            }
            for dp in m["gauge"]["dataPoints"].as_array().unwrap() {
                let attr = |k: &str| {
                    dp["attributes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|a| a["key"] == k)
                        .unwrap()["value"]
                        .clone()
                };
                let feature = attr("tern.feature")["intValue"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                out.push((
                    attr("tern.tensor")["stringValue"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    feature,
                    dp["asDouble"].as_f64().unwrap(),
                ));
            }
        }
    }
    out
}

#[test]
fn drift_against_the_baseline_the_model_ships() {
    use tern::baseline::{Baseline, TensorBaseline};
    let samples: Vec<Tensor> = (0..50).map(|s| x_batch(s, 0.0)).collect();
    let baseline = Baseline {
        tensors: vec![TensorBaseline::from_samples("x", Some(-1), &samples, 10).unwrap()],
    };
    let bytes =
        tern_tests::fixtures::with_metadata(&div_model(), "tern.baseline", &baseline.to_json());
    let model = Model::from_bytes(&bytes).unwrap();
    assert_eq!(model.baseline(), Some(&baseline));

    let measure = |shift0: f32| {
        let t = Telemetry::open(
            temp_dir("drift"),
            TelemetryConfig {
                health_sample_rate: 1.0,
                ..config()
            },
        )
        .unwrap();
        let session = Session::new(&model, SessionOptions::new().telemetry(t.clone())).unwrap();
        for seed in 100..140 {
            let y = Tensor::from_vec(&[8, 3], vec![1.0f32; 24]).unwrap();
            session
                .run([("x", x_batch(seed, shift0)), ("y", y)])
                .unwrap();
        }
        let ok = Scripted::new(vec![UploadResult::Accepted]);
        t.upload_pending(ok.as_ref()).unwrap();
        let seen = ok.seen.lock().unwrap().clone();
        psi_points(&seen)
    };
    let stable = measure(0.0);
    assert_eq!(
        stable.iter().filter(|(t, _, _)| t == "x").count(),
        3,
        "{stable:?}"
    );
    assert!(stable.iter().all(|(_, _, psi)| *psi < 0.1), "{stable:?}");
    let shifted = measure(0.6);
    for (tensor, feature, psi) in &shifted {
        if tensor == "x" && *feature == 0 {
            assert!(*psi > 0.25, "shifted feature: {psi}");
        } else {
            assert!(*psi < 0.1, "{tensor}[{feature}] did not move: {psi}");
        }
    }
}

#[test]
fn an_invalid_baseline_in_the_model_is_a_clear_error() {
    let bytes =
        tern_tests::fixtures::with_metadata(&div_model(), "tern.baseline", "{\"tensors\": 3}");
    let err = Model::from_bytes(&bytes).unwrap_err();
    assert_eq!(err.kind(), "invalid_model");
    assert!(err.to_string().contains("tern.baseline"), "{err}");
}

/// One record of every kind and every fixed value (outcomes, drop reasons), with fixed
/// times and ids, so their stored JSON and their OTLP requests can be compared with a
/// checked-in copy.
fn golden_records() -> Vec<Record> {
    use tern::telemetry::{DriftCounts, EventRecord, HealthRecord, SpanRecord, TensorStats};
    let span = |ix: u64, outcome: Outcome| {
        Record::Span(SpanRecord {
            trace_id: format!("{ix:032x}"),
            start_ns: 1_700_000_000_000_000_000 + ix * 1_000_000,
            model: "golden".into(),
            version: "7".into(),
            backend: tern::Backend::Cpu,
            stages: vec![("preprocess".into(), 1_000 + ix), ("model".into(), 20_000)],
            // A session's own span attributes (a rollout's arm) on one span.
            labels: match outcome {
                Outcome::Fallback => vec![("tern.rollout.arm".into(), "candidate".into())],
                _ => Vec::new(),
            },
            outcome,
        })
    };
    let mut records = vec![
        span(1, Outcome::Ok),
        span(2, Outcome::Error(tern::ErrorKind::Nan)),
        span(3, Outcome::Error(tern::ErrorKind::ShapeMismatch)),
        span(4, Outcome::Timeout),
        span(5, Outcome::Fallback),
        Record::Event(EventRecord {
            at_ns: 1_700_000_000_100_000_000,
            name: "opened".into(),
            increment: None,
            attributes: [
                ("screen".to_string(), AttrValue::from("home")),
                ("cold".to_string(), AttrValue::from(true)),
                ("ms".to_string(), AttrValue::from(12.5)),
            ]
            .into_iter()
            .collect(),
        }),
        Record::Event(EventRecord {
            at_ns: 1_700_000_000_200_000_000,
            name: "photos".into(),
            increment: Some(3),
            attributes: [("kind".to_string(), AttrValue::from(2i64))]
                .into_iter()
                .collect(),
        }),
        Record::Health(HealthRecord {
            at_ns: 1_700_000_000_300_000_000,
            model: "golden".into(),
            version: "7".into(),
            tensors: vec![TensorStats {
                name: "x".into(),
                io: tern::TensorRole::Input,
                count: 8,
                nan: 1,
                mean: 0.25,
                min: -1.0,
                max: 2.0,
                top: 2.0,
                drift: Some(DriftCounts {
                    counts: vec![vec![1, 5, 2]],
                    expected: vec![vec![0.25, 0.5, 0.25]],
                }),
            }],
        }),
    ];
    for (ix, reason) in [
        DropReason::QueueFull,
        DropReason::ByteCap,
        DropReason::AgeCap,
        DropReason::IoError,
        DropReason::RejectedByUploader,
        DropReason::Unencodable,
        DropReason::Undecodable,
    ]
    .into_iter()
    .enumerate()
    {
        records.push(golden_dropped(
            1_700_000_000_400_000_000 + ix as u64,
            ix as u64 + 1,
            reason,
        ));
    }
    records
}

fn golden_dropped(at_ns: u64, count: u64, reason: DropReason) -> Record {
    Record::Dropped {
        at_ns,
        count,
        reason,
    }
}

/// The stored JSON of every record kind and the OTLP requests made of them are exactly the
/// checked-in `tests/golden/telemetry.json` (records written by one version of tern are read
/// and uploaded identically by the next). `TERN_BLESS=1` rewrites it.
#[test]
fn stored_and_uploaded_json_match_the_golden_copy() {
    let records = golden_records();
    let config = TelemetryConfig {
        service_name: "golden-app".into(),
        resource: [("device.model".to_string(), "test".to_string())]
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let batch = telemetry::otlp::build(42, &records, &config);
    // Stored records byte for byte (as the store frames them); OTLP bodies as JSON values.
    let stored: Vec<String> = records
        .iter()
        .map(|r| serde_json::to_string(r).expect("record JSON"))
        .collect();
    let uploaded: Vec<serde_json::Value> = batch
        .payloads
        .iter()
        .map(|p| {
            serde_json::json!({
                "signal": p.signal.to_string(),
                "path": p.signal.path().to_string(),
                "body": serde_json::from_str::<serde_json::Value>(&p.json).expect("OTLP JSON"),
            })
        })
        .collect();
    let actual = serde_json::json!({ "stored": stored, "uploaded": uploaded });
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/telemetry.json");
    let text = serde_json::to_string_pretty(&actual).expect("JSON") + "\n";
    if tern_tests::bless() {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("golden dir");
        std::fs::write(&path, &text).expect("write golden");
    }
    let golden =
        std::fs::read_to_string(&path).expect("tests/golden/telemetry.json (TERN_BLESS=1)");
    assert_eq!(
        text, golden,
        "telemetry JSON changed; if on purpose, TERN_BLESS=1"
    );
    // Records read back from their JSON are the records written.
    for (r, v) in records.iter().zip(&stored) {
        assert_eq!(&serde_json::from_str::<Record>(v).expect("parse"), r);
    }
}
