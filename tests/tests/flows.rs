//! tern-flows: the micro-batcher and streaming sessions, on real models against unbatched
//! runs and onnxruntime, and on small models built here for every refusal and fault.

use std::collections::BTreeMap;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use tern::{Model, NanPolicy, Session, SessionOptions, Tensor};
use tern_flows::{BatchOptions, Batcher, ErrorKind, Stream, StreamOptions};
use tern_tests::fixtures::{div_model, double_model, model, node, value, FLOAT};
use tern_tests::{fetched, read_npy, workspace};

fn session(bytes: &[u8], options: SessionOptions) -> Arc<Session> {
    Arc::new(Session::new(&Model::from_bytes(bytes).unwrap(), options).unwrap())
}

fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_slice(shape, v).unwrap()
}

/// Runs `requests` from one thread each, all released at once, through `batcher`.
fn concurrently<T: Send + 'static>(
    batcher: &Arc<Batcher>,
    requests: Vec<Vec<(String, Tensor)>>,
    check: impl Fn(usize, tern_flows::Result<tern::Outputs>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let barrier = Arc::new(Barrier::new(requests.len()));
    let check = Arc::new(check);
    let threads: Vec<_> = requests
        .into_iter()
        .enumerate()
        .map(|(i, inputs)| {
            let (batcher, barrier, check) = (batcher.clone(), barrier.clone(), check.clone());
            std::thread::spawn(move || {
                barrier.wait();
                check(i, batcher.run(inputs))
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Largest absolute difference between two f32 tensors of one shape.
fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Each of 12 concurrent callers gets what an unbatched run gives it, on a real CNN (ppocr's
/// text-direction classifier, float) and a real byte classifier (magika, int32 input), and
/// the runs were batched. Tolerance: 1e-4 absolute on the probabilities (a batch runs other
/// kernels than one image: im2col + one product instead of tract's lazy im2col).
#[test]
fn batched_callers_get_what_unbatched_runs_give_them() {
    let cases = [
        (
            fetched("models/ppocr_cls/model.onnx"),
            BTreeMap::from([("x_d2".to_string(), 48), ("x_d3".to_string(), 192)]),
        ),
        (
            workspace().join("models/magika/model.onnx"),
            BTreeMap::new(),
        ),
    ];
    for (path, dims) in cases {
        let model = Model::load(&path).unwrap();
        let session = Arc::new(Session::new(&model, SessionOptions::new().threads(1)).unwrap());
        let requests: Vec<_> = (0..12)
            .map(|seed| model.random_inputs(seed, &dims).unwrap())
            .collect();
        let expected: Vec<_> = requests
            .iter()
            .map(|r| session.run(r.clone()).unwrap())
            .collect();
        // One worker, and two running batches side by side.
        for workers in [1, 2] {
            let batcher = Arc::new(
                Batcher::new(
                    session.clone(),
                    BatchOptions::default()
                        .max_batch(4)
                        .max_wait(Duration::from_millis(200))
                        .workers(workers),
                )
                .unwrap(),
            );
            let got = concurrently(&batcher, requests.clone(), |_, r| r.unwrap());
            for (want, got) in expected.iter().zip(&got) {
                assert_eq!(want.len(), got.len());
                for ((wn, w), (gn, g)) in want.iter().zip(got.iter()) {
                    assert_eq!(wn, gn);
                    let diff = max_abs(w, g);
                    assert!(diff <= 1e-4, "{}: {wn} differs by {diff}", path.display());
                }
            }
            let stats = batcher.stats();
            assert_eq!(stats.requests, 12, "{stats:?}");
            assert!(
                stats.batched_runs >= 1 && stats.runs < 12,
                "12 callers released at once with a 200 ms window were never batched ({workers} workers): {stats:?}"
            );
            assert_eq!(stats.rerun_alone, 0, "{stats:?}");
        }
    }
}

/// Requests of two row widths in one window are run as two batches, not failed; a caller
/// whose input the session rejects (NaN under `Reject`) gets its own typed error while the
/// others in its batch get their results (the batch is re-run request by request).
#[test]
fn mixed_shapes_are_split_and_one_bad_request_fails_alone() {
    let batcher = Arc::new(
        Batcher::new(
            session(&double_model(), SessionOptions::new()),
            BatchOptions::default()
                .max_batch(16)
                .max_wait(Duration::from_millis(300)),
        )
        .unwrap(),
    );
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let n = if i % 2 == 0 { 3 } else { 5 };
            let v: Vec<f32> = (0..n).map(|j| (i * 10 + j) as f32).collect();
            vec![("x".to_string(), f32s(&[1, n], &v))]
        })
        .collect();
    concurrently(&batcher, requests, |i, r| {
        let y = r.unwrap()[0].to_f32_vec().unwrap();
        let n = if i % 2 == 0 { 3 } else { 5 };
        let want: Vec<f32> = (0..n).map(|j| 2.0 * (i * 10 + j) as f32).collect();
        assert_eq!(y, want, "caller {i}");
    });
    let stats = batcher.stats();
    assert_eq!(stats.requests, 6);
    assert!(stats.runs >= 2, "two widths need two runs: {stats:?}");

    let div = Arc::new(
        Batcher::new(
            session(
                &div_model(),
                SessionOptions::new().nan_policy(NanPolicy::Reject),
            ),
            BatchOptions::default()
                .max_batch(8)
                .max_wait(Duration::from_millis(300))
                .eager(false),
        )
        .unwrap(),
    );
    let requests: Vec<_> = (0..4)
        .map(|i| {
            let x = if i == 2 {
                [0.0; 3]
            } else {
                [i as f32 + 1.0; 3]
            };
            vec![
                ("x".to_string(), f32s(&[1, 3], &x)),
                (
                    "y".to_string(),
                    f32s(&[1, 3], &[if i == 2 { 0.0 } else { 2.0 }; 3]),
                ),
            ]
        })
        .collect();
    concurrently(&div, requests, |i, r| match r {
        Ok(out) => {
            assert_ne!(i, 2, "0/0 was not refused");
            assert_eq!(
                out[0].to_f32_vec().unwrap(),
                vec![(i as f32 + 1.0) / 2.0; 3]
            );
        }
        Err(e) => {
            assert_eq!(i, 2, "caller {i} failed: {e}");
            assert_eq!(e.model_kind(), Some(tern::ErrorKind::Nan), "{e}");
        }
    });
    let stats = div.stats();
    assert!(
        stats.rerun_alone >= 2,
        "the failed batch was not re-run alone: {stats:?}"
    );
}

/// Requests the session itself would refuse get the session's own typed error, not a hang
/// or a batch failure; an oversized request runs alone.
#[test]
fn requests_the_session_refuses_get_its_typed_error() {
    let batcher = Batcher::new(
        session(&double_model(), SessionOptions::new()),
        BatchOptions::default().max_batch(2),
    )
    .unwrap();
    let e = batcher.run([("nope", f32s(&[1, 1], &[1.0]))]).unwrap_err();
    assert_eq!(e.model_kind(), Some(tern::ErrorKind::UnknownInput), "{e}");
    let e = batcher
        .run([("x", Tensor::from_slice(&[1, 1], &[1i64]).unwrap())])
        .unwrap_err();
    assert_eq!(e.model_kind(), Some(tern::ErrorKind::DtypeMismatch), "{e}");
    let e = batcher
        .run([("x", f32s(&[3], &[1.0, 2.0, 3.0]))])
        .unwrap_err();
    assert_eq!(e.model_kind(), Some(tern::ErrorKind::ShapeMismatch), "{e}");
    let big = batcher
        .run([("x", f32s(&[3, 1], &[1.0, 2.0, 3.0]))])
        .unwrap();
    assert_eq!(big[0].to_f32_vec().unwrap(), vec![2.0, 4.0, 6.0]);
}

/// A lone caller is not delayed by an eager batcher (the default: nobody else is waiting),
/// and waits for companions at most `max_wait` when the window is held open: with a 300 ms
/// window its answer comes after the window and well before a window more.
#[test]
fn a_lone_caller_waits_at_most_the_window() {
    let wait = Duration::from_millis(300);
    for (eager, workers) in [(true, 1), (true, 2), (false, 1)] {
        let batcher = Batcher::new(
            session(&double_model(), SessionOptions::new()),
            BatchOptions::default()
                .max_wait(wait)
                .eager(eager)
                .workers(workers),
        )
        .unwrap();
        for _ in 0..3 {
            let start = Instant::now();
            let out = batcher.run([("x", f32s(&[1, 2], &[1.0, 2.0]))]).unwrap();
            let took = start.elapsed();
            assert_eq!(out[0].to_f32_vec().unwrap(), vec![2.0, 4.0]);
            if eager {
                assert!(took < wait, "an eager batcher held a lone caller: {took:?}");
            } else {
                assert!(took >= wait, "answered before the window closed: {took:?}");
                assert!(took < 2 * wait, "waited more than the window: {took:?}");
            }
        }
    }
}

/// Models that cannot be batched, and options out of range, are refused when the batcher is
/// built, with a typed error naming the input.
#[test]
fn models_without_a_batch_axis_are_refused_when_built() {
    let fixed = model(
        vec![node("add", "Add", "", &["x", "x"], &["y"])],
        vec![value("x", FLOAT, &["1", "3"])],
        vec![value("y", FLOAT, &["1", "3"])],
    );
    let e = Batcher::new(
        session(&fixed, SessionOptions::new()),
        BatchOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotBatchable, "{e}");
    assert!(e.to_string().contains("\"x\""), "{e}");

    let two_symbols = model(
        vec![node("add", "Add", "", &["x", "y"], &["z"])],
        vec![
            value("x", FLOAT, &["a", "3"]),
            value("y", FLOAT, &["b", "3"]),
        ],
        vec![value("z", FLOAT, &["a", "3"])],
    );
    let e = Batcher::new(
        session(&two_symbols, SessionOptions::new()),
        BatchOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotBatchable, "{e}");

    for options in [
        BatchOptions::default().max_batch(0),
        BatchOptions::default().workers(0),
    ] {
        let e = Batcher::new(session(&double_model(), SessionOptions::new()), options).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidOption, "{e}");
    }
}

/// `acc = x + h` with `h` carried from `acc`: a running sum over `[1, 2]` chunks.
fn accumulator_model(h_dims: &[&str]) -> Vec<u8> {
    model(
        vec![
            node("add", "Add", "", &["x", "h"], &["acc"]),
            node("copy", "Identity", "", &["acc"], &["y"]),
        ],
        vec![value("x", FLOAT, &["1", "2"]), value("h", FLOAT, h_dims)],
        vec![
            value("y", FLOAT, &["1", "2"]),
            value("acc", FLOAT, &["1", "2"]),
        ],
    )
}

/// The state goes round, `reset` starts over, a failed chunk leaves the state as it was, and
/// a context prefixes each chunk with the previous one's end.
#[test]
fn streams_carry_state_and_context() {
    let s = session(&accumulator_model(&["1", "2"]), SessionOptions::new());
    let mut stream = Stream::new(s.clone(), StreamOptions::new().carry("acc", "h")).unwrap();
    let sums = |stream: &mut Stream| -> Vec<Vec<f32>> {
        (1..=3)
            .map(|i| {
                let out = stream
                    .push([("x", f32s(&[1, 2], &[i as f32, 10.0]))])
                    .unwrap();
                out.get("y").unwrap().to_f32_vec().unwrap()
            })
            .collect()
    };
    assert_eq!(
        sums(&mut stream),
        vec![vec![1.0, 10.0], vec![3.0, 20.0], vec![6.0, 30.0]]
    );
    assert_eq!(stream.chunks(), 3);
    // A chunk the session refuses changes nothing.
    let e = stream.push([("x", f32s(&[1, 3], &[1.0; 3]))]).unwrap_err();
    assert_eq!(e.model_kind(), Some(tern::ErrorKind::ShapeMismatch), "{e}");
    let (name, h) = stream.state().next().unwrap();
    assert_eq!((name, h.to_f32_vec().unwrap()), ("h", vec![6.0, 30.0]));
    stream.reset();
    assert_eq!(
        sums(&mut stream),
        vec![vec![1.0, 10.0], vec![3.0, 20.0], vec![6.0, 30.0]]
    );
    // An initial value other than zeros.
    let mut from_100 = Stream::new(
        s,
        StreamOptions::new()
            .carry("acc", "h")
            .initial("h", f32s(&[1, 2], &[100.0, 0.0])),
    )
    .unwrap();
    let out = from_100.push([("x", f32s(&[1, 2], &[1.0, 1.0]))]).unwrap();
    assert_eq!(
        out.get("y").unwrap().to_f32_vec().unwrap(),
        vec![101.0, 1.0]
    );

    // Context: Identity over [1, n] shows what the model was given.
    let identity = model(
        vec![node("copy", "Identity", "", &["w"], &["seen"])],
        vec![value("w", FLOAT, &["1", "n"])],
        vec![value("seen", FLOAT, &["1", "n"])],
    );
    let mut windows = Stream::new(
        session(&identity, SessionOptions::new()),
        StreamOptions::new().context("w", 2),
    )
    .unwrap();
    let seen = |out: tern::Outputs| out[0].to_f32_vec().unwrap();
    let first = windows
        .push([("w", f32s(&[1, 3], &[1.0, 2.0, 3.0]))])
        .unwrap();
    assert_eq!(seen(first), vec![0.0, 0.0, 1.0, 2.0, 3.0]);
    let second = windows.push([("w", f32s(&[1, 1], &[4.0]))]).unwrap();
    assert_eq!(seen(second), vec![2.0, 3.0, 4.0]);
    let third = windows.push([("w", f32s(&[1, 2], &[5.0, 6.0]))]).unwrap();
    assert_eq!(seen(third), vec![3.0, 4.0, 5.0, 6.0]);
    let e = windows
        .push([("w", f32s(&[2, 1], &[7.0, 8.0]))])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadChunk, "{e}");
}

/// Every state or context that is not an output/input pair the model can carry is refused
/// when the stream is built; a chunk that passes a carried input is refused when pushed.
#[test]
fn bad_stream_state_is_refused_when_built() {
    let s = session(&accumulator_model(&["1", "2"]), SessionOptions::new());
    let build = |o: StreamOptions| Stream::new(s.clone(), o).unwrap_err();
    for (options, kind) in [
        (StreamOptions::new().carry("nope", "h"), ErrorKind::BadState),
        (
            StreamOptions::new().carry("acc", "nope"),
            ErrorKind::BadState,
        ),
        (
            StreamOptions::new().carry("acc", "h").carry("y", "h"),
            ErrorKind::BadState,
        ),
        (
            StreamOptions::new()
                .carry("acc", "h")
                .initial("h", f32s(&[1, 3], &[0.0; 3])),
            ErrorKind::BadState,
        ),
        (
            StreamOptions::new().initial("x", f32s(&[1, 2], &[0.0; 2])),
            ErrorKind::BadState,
        ),
        (
            StreamOptions::new().carry("acc", "h").context("h", 1),
            ErrorKind::BadChunk,
        ),
        (StreamOptions::new().context("x", 0), ErrorKind::BadChunk),
        (StreamOptions::new().context("nope", 4), ErrorKind::BadChunk),
    ] {
        let e = build(options.clone());
        assert_eq!(e.kind(), kind, "{options:?}: {e}");
    }
    // A free dimension in the state's shape needs an initial value.
    let free = session(&accumulator_model(&["1", "k"]), SessionOptions::new());
    let e = Stream::new(free.clone(), StreamOptions::new().carry("acc", "h")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadState, "{e}");
    assert!(e.to_string().contains("initial value"), "{e}");
    Stream::new(
        free,
        StreamOptions::new()
            .carry("acc", "h")
            .initial("h", f32s(&[1, 2], &[0.0; 2])),
    )
    .unwrap();

    let mut stream = Stream::new(s, StreamOptions::new().carry("acc", "h")).unwrap();
    let e = stream
        .push([
            ("x", f32s(&[1, 2], &[1.0; 2])),
            ("h", f32s(&[1, 2], &[1.0; 2])),
        ])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadChunk, "{e}");
}

/// silero VAD (its LSTM sequence form) streamed over real speech — espeak-ng's voice with
/// silence and noise around it, made by `scripts/audio-fixture` — in 512-sample windows with
/// 64 samples of context and `h`/`c` carried: every frame's speech probability matches
/// onnxruntime's frame-by-frame run within 1e-4 (the model's parity tolerance), and the
/// detector does find the speech (so the fixture is speech, not silence).
#[test]
fn silero_vad_streams_real_speech_like_onnxruntime() {
    let samples: Vec<f32> = std::fs::read(fetched("audio/speech.f32"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let reference = read_npy(&fetched("audio/speech_probs.npy"))
        .to_f32_vec()
        .unwrap();
    let model = Model::load(fetched("models/silero_vad_lstm/model.onnx")).unwrap();
    let session = Arc::new(Session::new(&model, SessionOptions::new().threads(1)).unwrap());
    let mut stream = Stream::new(
        session,
        StreamOptions::new()
            .carry("hn", "h")
            .carry("cn", "c")
            .context("input", 64),
    )
    .unwrap();
    let mut probs = Vec::new();
    for frame in samples.chunks(512) {
        let mut window = frame.to_vec();
        window.resize(512, 0.0);
        let out = stream.push([("input", f32s(&[1, 512], &window))]).unwrap();
        probs.push(out.get("speech_probs").unwrap().to_f32_vec().unwrap()[0]);
    }
    assert_eq!(probs.len(), reference.len());
    let worst = probs
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(worst <= 1e-4, "frame probabilities differ by up to {worst}");
    let speech = probs.iter().filter(|p| **p > 0.5).count();
    let lead = probs.iter().take(40).filter(|p| **p > 0.5).count();
    assert!(
        speech >= 50,
        "only {speech} of {} frames were speech",
        probs.len()
    );
    assert_eq!(lead, 0, "speech detected in the leading 1.5 s of silence");
}

// ---------------------------------------------------------------------------------------
// Request-path patterns: steps (budget, breaker, cache, fallbacks), cascade, fan-out.

use std::sync::atomic::{AtomicUsize, Ordering};

use tern::telemetry::{Outcome, Record, Telemetry, TelemetryConfig};
use tern::Outputs;
use tern_flows::{
    BreakerOptions, BreakerState, CacheOptions, Calibration, Cascade, Confidence, Exit, Failure,
    Fallback, FanOut, Merge, ResultCache, Source, Step,
};

fn x(v: &[f32]) -> Vec<(String, Tensor)> {
    vec![("x".to_string(), f32s(&[1, v.len()], v))]
}

fn y_of(o: &Outputs) -> Vec<f32> {
    o.get("y").expect("output y").to_f32_vec().unwrap()
}

/// A callback answering `y = value` (one element) after `delay`, counting its calls.
fn constant(name: &str, value: f32, delay: Duration, calls: Arc<AtomicUsize>) -> Step {
    Step::callback(name, move |_: &tern_flows::Inputs| {
        calls.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(delay);
        Ok(Outputs::from_pairs(vec![(
            "y".into(),
            f32s(&[1, 1], &[value]),
        )]))
    })
    .build()
    .unwrap()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-flows-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The text-direction classifier on rendered text lines (scripts/make_text_images.py: 120
/// lines, some upside down): tern-quantize's int8 model first, the fp32 model when it is unsure.
/// Calibration is exact bookkeeping over the two models' answers, so the cascade built
/// with the picked threshold must reproduce its exit rate and agreement; stage-1 answers
/// are the fp32 session's own outputs, bit for bit.
#[test]
fn int8_before_fp32_cascade_on_rendered_text_lines() {
    let dir = temp_dir("text-lines");
    let lines = tern_tests::text_lines(&dir, 120, 11, "x", tern_tests::CLS_PREPROCESS);
    let labels: Vec<usize> = lines
        .iter()
        .map(|(_, angle)| (*angle == 180) as usize)
        .collect();
    let samples: Vec<Vec<(String, Tensor)>> = lines.into_iter().map(|(s, _)| s).collect();
    let load = |name: &str| {
        let m = Model::load(fetched(&format!("models/{name}/model.onnx"))).unwrap();
        Arc::new(Session::new(&m, SessionOptions::new().threads(1)).unwrap())
    };
    let (small, big) = (load("ppocr_cls_int8_qdq"), load("ppocr_cls"));
    let output = big.output_names()[0].clone();
    let small_step = Step::session("int8", small).build().unwrap();
    let big_step = Step::session("fp32", big.clone()).build().unwrap();
    let exit = Exit::new(&output, Confidence::MaxProbability, 0.0);
    let thresholds: Vec<f32> = (0..=20).map(|i| 0.5 + i as f32 * 0.025).collect();
    let by_big =
        Calibration::run(&small_step, &big_step, &exit, &samples, None, &thresholds).unwrap();
    let by_label = Calibration::run(
        &small_step,
        &big_step,
        &exit,
        &samples,
        Some(&labels),
        &thresholds,
    )
    .unwrap();
    let never = by_big.points.last().unwrap();
    assert_eq!(never.threshold, 1.0);
    // The fp32 model answers everything the int8 one is not sure of (p == 1.0 is rare).
    assert!(never.exit_rate < 0.1 && never.agreement > 0.99, "{never:?}");
    let fp32_accuracy = by_label.points.last().unwrap().agreement;
    assert!(
        fp32_accuracy >= 0.9,
        "fp32 reads rendered lines at {fp32_accuracy}"
    );
    let picked = by_big
        .pick(0.98)
        .expect("some threshold reaches 98 % agreement");
    assert!(
        picked.exit_rate > 0.2,
        "int8 answers too little: {picked:?}"
    );

    let cascade = Cascade::builder("direction")
        .stage(
            small_step,
            Exit::new(&output, Confidence::MaxProbability, picked.threshold),
        )
        .last(big_step)
        .build()
        .unwrap();
    let mut agree = 0;
    for sample in &samples {
        let a = cascade.run(sample).unwrap();
        let want = big.run(sample.clone()).unwrap();
        let class = |o: &Outputs| {
            let v = o.get(&output).unwrap().to_f32_vec().unwrap();
            (v[1] > v[0]) as usize
        };
        agree += (class(&a.answer.outputs) == class(&want)) as usize;
        assert_eq!(a.confidences.len(), 1);
        if a.stage == 0 {
            assert!(a.confidences[0] >= picked.threshold);
        } else {
            assert!(a.confidences[0] < picked.threshold);
            assert_eq!(
                max_abs(
                    a.answer.outputs.get(&output).unwrap(),
                    want.get(&output).unwrap()
                ),
                0.0
            );
        }
    }
    let stats = cascade.stats();
    assert_eq!(stats.requests, samples.len() as u64);
    let n = samples.len() as f64;
    assert!(
        (stats.exit_rate(0) - picked.exit_rate).abs() < 1e-9,
        "{stats:?} vs {picked:?}"
    );
    assert!((agree as f64 / n - picked.agreement).abs() < 1e-9);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fan-out with one step far slower than the deadline answers by the deadline every time
/// (p100 within 40 ms of it on a busy 2-core machine), flags the slow step as missing,
/// and never has more than `max_abandoned` of its runs out: beyond that the slow step is
/// answered `Busy` at once.
#[test]
fn fan_out_holds_its_deadline_and_bounds_abandoned_runs() {
    let fast = Step::session("double", session(&double_model(), SessionOptions::new()))
        .build()
        .unwrap();
    let slow_calls = Arc::new(AtomicUsize::new(0));
    let slow = Step::callback("slow", {
        let calls = slow_calls.clone();
        move |_: &tern_flows::Inputs| {
            calls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(400));
            Ok(Outputs::from_pairs(vec![(
                "y".into(),
                f32s(&[1, 2], &[0.0, 0.0]),
            )]))
        }
    })
    .max_abandoned(2)
    .build()
    .unwrap();
    let deadline = Duration::from_millis(60);
    let fan = FanOut::builder("both", deadline)
        .step(fast)
        .step(slow.clone())
        .build()
        .unwrap();
    let mut worst = Duration::ZERO;
    let mut busy = 0;
    for _ in 0..6 {
        let t = Instant::now();
        let a = fan.run(&x(&[1.0, 2.0])).unwrap();
        worst = worst.max(t.elapsed());
        assert!(a.partial);
        assert_eq!(
            y_of(&a.outputs),
            vec![2.0, 4.0],
            "the fast step's answer alone"
        );
        assert_eq!(a.answered, vec![("double".to_string(), Source::Model)]);
        assert_eq!(a.missing.len(), 1);
        assert_eq!(a.missing[0].step, "slow");
        busy += (a.missing[0].failure == Failure::Busy) as usize;
        assert!(slow.abandoned_runs() <= 2);
    }
    assert!(
        worst <= deadline + Duration::from_millis(40),
        "waited {worst:?}"
    );
    assert!(
        busy >= 3,
        "6 requests 60 ms apart with 400 ms runs and 2 allowed out: {busy} busy"
    );
    assert!(slow_calls.load(Ordering::SeqCst) <= 3);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        slow.abandoned_runs(),
        0,
        "abandoned runs finish and are uncounted"
    );
    let too_few = FanOut::builder("strict", deadline)
        .step(slow)
        .min_answers(1)
        .build()
        .unwrap()
        .run(&x(&[1.0]))
        .unwrap_err();
    assert_eq!(too_few.kind(), ErrorKind::TooFewAnswers);
}

/// Weighted mean, vote and first-good merges of callbacks with known answers.
#[test]
fn fan_out_merges() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = |name, v, ms| constant(name, v, Duration::from_millis(ms), calls.clone());
    let deadline = Duration::from_secs(5);
    let mean = FanOut::builder("mean", deadline)
        .weighted(c("one", 1.0, 0), 1.0)
        .weighted(c("four", 4.0, 0), 2.0)
        .build()
        .unwrap()
        .run(&x(&[0.0]))
        .unwrap();
    assert_eq!(y_of(&mean.outputs), vec![3.0]);
    assert!(!mean.partial);

    let class = |name: &str, hot: usize, ms| {
        Step::callback(name, move |_: &tern_flows::Inputs| {
            std::thread::sleep(Duration::from_millis(ms));
            let mut p = vec![0.1f32; 3];
            p[hot] = 0.8;
            Ok(Outputs::from_pairs(vec![("p".into(), f32s(&[1, 3], &p))]))
        })
        .build()
        .unwrap()
    };
    let vote = FanOut::builder("vote", deadline)
        .weighted(class("a", 2, 0), 1.0)
        .weighted(class("b", 1, 0), 1.5)
        .weighted(class("c", 2, 0), 1.0)
        .merge(Merge::Vote { output: "p".into() })
        .build()
        .unwrap()
        .run(&x(&[0.0]))
        .unwrap();
    let p = vote.outputs.get("p").unwrap().to_f32_vec().unwrap();
    assert_eq!(p[2], 0.8, "class 2 has weight 2 against 1.5");

    let t = Instant::now();
    let first = FanOut::builder("first", deadline)
        .step(c("slow", 1.0, 300))
        .step(c("quick", 2.0, 0))
        .merge(Merge::FirstGood)
        .build()
        .unwrap()
        .run(&x(&[0.0]))
        .unwrap();
    assert!(t.elapsed() < Duration::from_millis(250));
    assert_eq!(y_of(&first.outputs), vec![2.0]);
    assert_eq!(first.missing[0].step, "slow");
}

/// The cache answers repeated inputs without running the model, is shared by steps over
/// the same model, and misses for a model with other bytes; spans say `cache_hit`.
#[test]
fn result_cache_is_keyed_by_model_and_input() {
    let telemetry = Telemetry::open(temp_dir("cache"), TelemetryConfig::default()).unwrap();
    let options = || SessionOptions::new().telemetry(telemetry.clone());
    let cache = ResultCache::new(CacheOptions::default()).unwrap();
    let a = Step::session("a", session(&double_model(), options()))
        .cache(&cache)
        .build()
        .unwrap();
    let b = Step::session("b", session(&double_model(), options()))
        .cache(&cache)
        .build()
        .unwrap();
    let changed = tern_tests::fixtures::with_metadata(&double_model(), "version", "2");
    let c = Step::session("c", session(&changed, options()))
        .cache(&cache)
        .build()
        .unwrap();
    assert_eq!(a.run(&x(&[1.0, 2.0])).unwrap().source, Source::Model);
    let hit = a.run(&x(&[1.0, 2.0])).unwrap();
    assert_eq!(
        (hit.source, y_of(&hit.outputs)),
        (Source::Cache, vec![2.0, 4.0])
    );
    assert_eq!(
        b.run(&x(&[1.0, 2.0])).unwrap().source,
        Source::Cache,
        "same model, shared"
    );
    assert_eq!(
        c.run(&x(&[1.0, 2.0])).unwrap().source,
        Source::Model,
        "changed model"
    );
    assert_eq!(
        a.run(&x(&[1.0, 2.5])).unwrap().source,
        Source::Model,
        "other input"
    );
    let s = cache.stats();
    assert_eq!((s.hits, s.misses), (2, 3));
    telemetry.flush().unwrap();
    let spans: Vec<_> = telemetry
        .stored_records()
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Span(s) if ["a", "b", "c"].contains(&s.model.as_str()) => Some(s),
            _ => None,
        })
        .collect();
    let outcomes: Vec<_> = spans.iter().map(|s| s.outcome.clone()).collect();
    assert_eq!(
        outcomes,
        vec![
            Outcome::Ok,
            Outcome::CacheHit,
            Outcome::CacheHit,
            Outcome::Ok,
            Outcome::Ok
        ]
    );
    assert_eq!(spans[0].stages[0].0, "a");
}

/// A failing step answers from its last good result for that input, then from the static
/// default; after 2 failures its breaker opens (refusing without running), a probe after
/// the cool-down closes it again. A panicking callback is a typed error, or the rule's
/// answer when it has one.
#[test]
fn fallbacks_breaker_and_panics() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let step = Step::callback("flaky", {
        let (failing, calls) = (failing.clone(), calls.clone());
        move |inputs: &tern_flows::Inputs| {
            calls.fetch_add(1, Ordering::SeqCst);
            if failing.load(Ordering::SeqCst) {
                return Err(tern_flows::Error::Callback {
                    step: "flaky".into(),
                    reason: "down".into(),
                    panicked: false,
                });
            }
            Ok(Outputs::from_pairs(vec![("y".into(), inputs[0].1.clone())]))
        }
    })
    .breaker(
        BreakerOptions::default()
            .failures(2)
            .cooldown(Duration::from_millis(100)),
    )
    .fallback(Fallback::LastGood)
    .fallback(Fallback::Static(Outputs::from_pairs(vec![(
        "y".into(),
        f32s(&[1, 1], &[-1.0]),
    )])))
    .build()
    .unwrap();
    assert_eq!(step.run(&x(&[5.0])).unwrap().source, Source::Model);
    failing.store(true, Ordering::SeqCst);
    let last = step.run(&x(&[5.0])).unwrap();
    assert_eq!(
        (last.source, y_of(&last.outputs)),
        (Source::LastGood, vec![5.0])
    );
    assert!(matches!(
        last.failure,
        Some(Failure::Error {
            kind: ErrorKind::Callback,
            ..
        })
    ));
    let default = step.run(&x(&[6.0])).unwrap();
    assert_eq!(
        (default.source, y_of(&default.outputs)),
        (Source::Default, vec![-1.0])
    );
    assert_eq!(step.breaker_state(), BreakerState::Open);
    let before = calls.load(Ordering::SeqCst);
    let refused = step.run(&x(&[5.0])).unwrap();
    assert_eq!(refused.failure, Some(Failure::BreakerOpen));
    assert_eq!(refused.source, Source::LastGood);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "an open breaker does not run"
    );
    std::thread::sleep(Duration::from_millis(150));
    failing.store(false, Ordering::SeqCst);
    assert_eq!(
        step.run(&x(&[7.0])).unwrap().source,
        Source::Model,
        "the probe"
    );
    assert_eq!(step.breaker_state(), BreakerState::Closed);
    let s = step.stats();
    assert_eq!((s.ok, s.errors, s.refused, s.fallbacks), (2, 2, 1, 3));

    let panics = || {
        Step::callback(
            "boom",
            |_: &tern_flows::Inputs| -> tern_flows::Result<Outputs> { panic!("app bug") },
        )
    };
    let err = panics().build().unwrap().run(&x(&[1.0])).unwrap_err();
    assert!(
        matches!(&err, tern_flows::Error::Callback { panicked: true, reason, .. } if reason == "app bug"),
        "{err:?}"
    );
    let rule = panics()
        .budget(Duration::from_secs(5))
        .fallback(Fallback::Rule(Arc::new(|_: &tern_flows::Inputs| {
            Ok(Outputs::from_pairs(vec![(
                "y".into(),
                f32s(&[1, 1], &[9.0]),
            )]))
        })))
        .build()
        .unwrap()
        .run(&x(&[1.0]))
        .unwrap();
    assert_eq!(
        (rule.source, y_of(&rule.outputs)),
        (Source::Rule, vec![9.0])
    );
}

/// Flows that cannot work are refused when built, with a typed error.
#[test]
fn bad_flows_are_refused_when_built() {
    let double = || {
        Step::session("double", session(&double_model(), SessionOptions::new()))
            .build()
            .unwrap()
    };
    let div = Step::session("div", session(&div_model(), SessionOptions::new()))
        .build()
        .unwrap();
    let kind = |r: tern_flows::Result<Cascade>| r.unwrap_err().kind();
    let exit = |o: &str| Exit::new(o, Confidence::MaxProbability, 0.9);
    assert_eq!(
        kind(
            Cascade::builder("c")
                .stage(double(), exit("nope"))
                .last(double())
                .build()
        ),
        ErrorKind::BadFlow,
        "an exit on an output the model does not have"
    );
    assert_eq!(
        kind(
            Cascade::builder("c")
                .stage(double(), exit("y"))
                .last(div)
                .build()
        ),
        ErrorKind::BadFlow,
        "stages that take other inputs"
    );
    assert_eq!(
        kind(Cascade::builder("c").stage(double(), exit("y")).build()),
        ErrorKind::BadFlow,
        "no last stage"
    );
    assert_eq!(
        kind(Cascade::builder("c").last(double()).last(double()).build()),
        ErrorKind::BadFlow,
        "a stage after the last"
    );
    assert_eq!(
        kind(
            Cascade::builder("c")
                .last(double())
                .deadline(Duration::ZERO)
                .build()
        ),
        ErrorKind::InvalidOption
    );
    let fan = |merge| {
        FanOut::builder("f", Duration::from_secs(1))
            .step(double())
            .merge(merge)
            .build()
    };
    assert_eq!(
        fan(Merge::Vote { output: "p".into() }).unwrap_err().kind(),
        ErrorKind::BadFlow
    );
    assert_eq!(
        FanOut::builder("f", Duration::ZERO)
            .step(double())
            .build()
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidOption
    );
    assert_eq!(
        FanOut::builder("f", Duration::from_secs(1))
            .step(double())
            .step(double())
            .build()
            .unwrap_err()
            .kind(),
        ErrorKind::BadFlow,
        "two steps with one name"
    );
    assert_eq!(
        Step::session("s", session(&double_model(), SessionOptions::new()))
            .budget(Duration::ZERO)
            .build()
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidOption
    );
    assert_eq!(
        ResultCache::new(CacheOptions::default().max_bytes(0))
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidOption
    );
}

/// 8 threads × 25 requests through one cascade (a flaky, sometimes slow callback before a
/// session) and one fan-out sharing its steps: every request answers (no deadlock: the
/// whole run must end within 60 s), and the counters add up.
#[test]
fn flows_under_concurrent_use() {
    let n = Arc::new(AtomicUsize::new(0));
    let flaky = Step::callback("flaky", {
        let n = n.clone();
        move |inputs: &tern_flows::Inputs| {
            let i = n.fetch_add(1, Ordering::SeqCst);
            if i.is_multiple_of(5) {
                std::thread::sleep(Duration::from_millis(30));
            }
            if i.is_multiple_of(7) {
                panic!("flaky {i}");
            }
            let v = inputs[0].1.to_f32_vec()?;
            Ok(Outputs::from_pairs(vec![(
                "y".into(),
                f32s(&[1, 2], &[v[0], 1.0 - v[0]]),
            )]))
        }
    })
    .budget(Duration::from_millis(20))
    .max_abandoned(4)
    .breaker(BreakerOptions::default().failures(50))
    .build()
    .unwrap();
    let double = Step::session("double", session(&double_model(), SessionOptions::new()))
        .cache(&ResultCache::new(CacheOptions::default()).unwrap())
        .build()
        .unwrap();
    let cascade = Arc::new(
        Cascade::builder("c")
            .stage(
                flaky.clone(),
                Exit::new("y", Confidence::MaxProbability, 0.8),
            )
            .last(double.clone())
            .deadline(Duration::from_millis(500))
            .build()
            .unwrap(),
    );
    let fan = Arc::new(
        FanOut::builder("f", Duration::from_millis(100))
            .step(flaky)
            .step(double)
            .merge(Merge::FirstGood)
            .build()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    for t in 0..8 {
        let (cascade, fan, tx) = (cascade.clone(), fan.clone(), tx.clone());
        std::thread::spawn(move || {
            let mut ok = 0;
            for r in 0..25 {
                let v = ((t * 25 + r) % 10) as f32 / 10.0;
                ok += cascade.run(&x(&[v, 0.5])).is_ok() as usize;
                ok += fan.run(&x(&[v, 0.5])).is_ok() as usize;
            }
            tx.send(ok).unwrap();
        });
    }
    drop(tx);
    let mut total = 0;
    for _ in 0..8 {
        total += rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a flow deadlocked or ran past 60 s");
    }
    assert_eq!(
        total, 400,
        "every request answers (the session step never fails)"
    );
    let stats = cascade.stats();
    assert_eq!(stats.requests, 200);
    assert_eq!(stats.exits.iter().sum::<u64>(), 200);
    assert!(stats.exits[0] > 0 && stats.exits[1] > 0, "{stats:?}");
}

use tern_flows::{BuildOptions, Compute, FlowFile};

/// `z = -y` over `[batch, n]` f32 tensors (chained after `double_model`'s `y`).
fn neg_model() -> Vec<u8> {
    model(
        vec![node("neg", "Neg", "", &["y"], &["z"])],
        vec![value("y", FLOAT, &["batch", "n"])],
        vec![value("z", FLOAT, &["batch", "n"])],
    )
}

/// A folder with `double.onnx` and `neg.onnx`, and the app's callbacks: `probs` answers
/// `y = [v, 1 − v]` from `x = [v, …]`; `slow` sleeps 300 ms.
fn flow_fixture(name: &str) -> (std::path::PathBuf, BuildOptions) {
    let dir = temp_dir(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("double.onnx"), double_model()).unwrap();
    std::fs::write(dir.join("neg.onnx"), neg_model()).unwrap();
    std::fs::write(dir.join("unknown.json"), "[[-1.0]]").unwrap();
    let probs: Arc<dyn Compute> = Arc::new(|inputs: &tern_flows::Inputs| {
        let v = inputs[0].1.to_f32_vec()?[0];
        Ok(Outputs::from_pairs(vec![(
            "y".into(),
            f32s(&[1, 2], &[v, 1.0 - v]),
        )]))
    });
    let slow: Arc<dyn Compute> = Arc::new(|_: &tern_flows::Inputs| {
        std::thread::sleep(Duration::from_millis(300));
        Ok(Outputs::from_pairs(vec![(
            "y".into(),
            f32s(&[1, 1], &[9.0]),
        )]))
    });
    let options = BuildOptions::default()
        .base_dir(&dir)
        .callback("probs", probs)
        .callback("slow", slow);
    (dir, options)
}

const FLOW_FILE: &str = r#"
[sessions.double]
model = "double.onnx"
threads = 1

[sessions.neg]
model = "neg.onnx"

[caches.shared]
ttl_ms = 60000
max_bytes = 65536

[steps.double]
session = "double"
cache = "shared"

[steps.neg]
session = "neg"

[steps.probs]
callback = "probs"

[steps.slow]
callback = "slow"
budget_ms = 50
fallbacks = ["last_good", { static = { y = "unknown.json" } }]

[steps.chain]
flow = "double_then_neg"

[flows.double_then_neg]
pipeline = ["double", "neg"]

[flows.classify]
cascade = [
  { step = "probs", exit = { output = "y", confidence = "max_probability", threshold = 0.8 } },
  { step = "double" },
]
deadline_ms = 1000

[flows.nested]
cascade = [
  { step = "probs", exit = { output = "y", confidence = "margin", threshold = 0.6 } },
  { step = "chain" },
]

[flows.race]
fan_out = [{ step = "double" }, { step = "slow", weight = 2.0 }]
merge = "first_good"
deadline_ms = 200

[flows.guarded]
pipeline = ["slow"]
"#;

/// A flow file with every kind of flow, a shared cache, callbacks, a static fallback and a
/// nested flow: each flow answers what its steps compute, says who answered, and the file
/// loads the same from TOML and from JSON.
#[test]
fn flow_files_build_and_run() {
    let (dir, options) = flow_fixture("file");
    let path = dir.join("flows.toml");
    std::fs::write(&path, FLOW_FILE).unwrap();
    let flows = FlowFile::load(&path, options.clone()).unwrap();
    assert_eq!(
        flows.names(),
        ["classify", "double_then_neg", "guarded", "nested", "race"]
    );
    let sources = |a: &tern_flows::FlowAnswer| -> Vec<(String, Source)> { a.answered.clone() };

    let a = flows.run("double_then_neg", &x(&[1.0, 2.0])).unwrap();
    assert_eq!(
        a.outputs.get("z").unwrap().to_f32_vec().unwrap(),
        [-2.0, -4.0]
    );
    assert_eq!(
        sources(&a),
        [
            ("double".into(), Source::Model),
            ("neg".into(), Source::Model)
        ]
    );
    let a = flows.run("double_then_neg", &x(&[1.0, 2.0])).unwrap();
    assert_eq!(a.answered[0].1, Source::Cache, "the shared cache answers");
    assert_eq!(flows.cache_stats()["shared"].hits, 1);

    let a = flows.run("classify", &x(&[0.875, 0.0])).unwrap();
    assert_eq!((a.stage, y_of(&a.outputs)), (Some(0), vec![0.875, 0.125]));
    let a = flows.run("classify", &x(&[0.5, 0.25])).unwrap();
    assert_eq!((a.stage, y_of(&a.outputs)), (Some(1), vec![1.0, 0.5]));
    assert_eq!(a.confidences, [0.5]);

    let a = flows.run("nested", &x(&[0.5, 0.25])).unwrap();
    assert_eq!(a.stage, Some(1));
    assert_eq!(
        a.outputs.get("z").unwrap().to_f32_vec().unwrap(),
        [-1.0, -0.5]
    );

    let a = flows.run("race", &x(&[3.0, 4.0])).unwrap();
    assert_eq!(y_of(&a.outputs), [6.0, 8.0], "the session answers first");
    assert_eq!(a.missing.len(), 1);
    assert_eq!(a.missing[0].step, "slow");

    let a = flows.run("guarded", &x(&[3.0])).unwrap();
    assert_eq!(y_of(&a.outputs), [-1.0]);
    assert_eq!(a.answered, [("slow".into(), Source::Default)]);
    assert!(
        matches!(a.failure, Some(Failure::Timeout { .. })),
        "{:?}",
        a.failure
    );
    assert!(
        a.elapsed < Duration::from_millis(250),
        "the budget holds: {:?}",
        a.elapsed
    );
    assert!(flows.step_stats()["slow"].timeouts >= 1);
    assert_eq!(
        flows.run("nope", &x(&[1.0])).unwrap_err().kind(),
        ErrorKind::BadFlow
    );

    // The same file as JSON.
    let json = serde_json::to_string(&toml_to_json(FLOW_FILE)).unwrap();
    let json_path = dir.join("flows.json");
    std::fs::write(&json_path, json).unwrap();
    let from_json = FlowFile::load(&json_path, options).unwrap();
    let a = from_json.run("double_then_neg", &x(&[1.0, 2.0])).unwrap();
    assert_eq!(
        a.outputs.get("z").unwrap().to_f32_vec().unwrap(),
        [-2.0, -4.0]
    );
}

/// The flow file as a JSON value (a TOML table maps one to one onto a JSON object).
fn toml_to_json(text: &str) -> serde_json::Value {
    let table: toml::Table = text.parse().unwrap();
    serde_json::to_value(table).unwrap()
}

/// Every mistake a flow file can hold fails when it is built, with its typed kind, and
/// the message names what is wrong.
#[test]
fn bad_flow_files_are_refused_when_built() {
    let (dir, options) = flow_fixture("bad-files");
    let header = r#"
[sessions.double]
model = "double.onnx"
[sessions.neg]
model = "neg.onnx"
[steps.double]
session = "double"
[steps.neg]
session = "neg"
"#;
    let cases: &[(&str, &str, ErrorKind, &str)] = &[
        (
            "a cycle",
            "[steps.a]\nflow = \"fa\"\n[steps.b]\nflow = \"fb\"\n[flows.fa]\npipeline = [\"b\"]\n[flows.fb]\npipeline = [\"double\", \"a\"]\n",
            ErrorKind::BadFlow,
            "cycle: fa → fb → fa",
        ),
        (
            "a flow that runs itself",
            "[steps.me]\nflow = \"f\"\n[flows.f]\npipeline = [\"me\"]\n",
            ErrorKind::BadFlow,
            "cycle: f → f",
        ),
        (
            "an unknown session",
            "[steps.s]\nsession = \"nope\"\n[flows.f]\npipeline = [\"s\"]\n",
            ErrorKind::BadFlow,
            "no session \"nope\"",
        ),
        (
            "an unknown step",
            "[flows.f]\npipeline = [\"double\", \"nope\"]\n",
            ErrorKind::BadFlow,
            "step \"nope\", which is not in [steps]",
        ),
        (
            "an unknown callback",
            "[steps.c]\ncallback = \"nope\"\n[flows.f]\npipeline = [\"c\"]\n",
            ErrorKind::BadFlow,
            "callback \"nope\"",
        ),
        (
            "a step whose outputs the next step cannot take",
            "[flows.f]\npipeline = [\"neg\", \"double\"]\n",
            ErrorKind::BadFlow,
            "takes input \"x\"",
        ),
        (
            "a cascade exit on an output the model lacks",
            "[flows.f]\ncascade = [{ step = \"double\", exit = { output = \"p\", confidence = \"entropy\", threshold = 0.5 } }, { step = \"neg\" }]\n",
            ErrorKind::BadFlow,
            "output \"p\"",
        ),
        (
            "a misspelt field",
            "[flows.f]\npipeline = [\"double\"]\ndeadline = 5\n",
            ErrorKind::BadFlow,
            "unknown field `deadline`",
        ),
        (
            "a step of two kinds",
            "[steps.s]\nsession = \"double\"\ncallback = \"probs\"\n[flows.f]\npipeline = [\"s\"]\n",
            ErrorKind::BadFlow,
            "exactly one of session, callback and flow",
        ),
        (
            "a flow of two kinds",
            "[flows.f]\npipeline = [\"double\"]\ncascade = [{ step = \"double\" }]\n",
            ErrorKind::BadFlow,
            "exactly one of cascade, fan_out and pipeline",
        ),
        (
            "a fan-out without a deadline",
            "[flows.f]\nfan_out = [{ step = \"double\" }]\n",
            ErrorKind::BadFlow,
            "needs a deadline_ms",
        ),
        (
            "a deadline of zero",
            "[flows.f]\npipeline = [\"double\"]\ndeadline_ms = 0\n",
            ErrorKind::InvalidOption,
            "deadline of 0",
        ),
        (
            "a budget of zero",
            "[steps.s]\nsession = \"double\"\nbudget_ms = 0\n[flows.f]\npipeline = [\"s\"]\n",
            ErrorKind::InvalidOption,
            "budget of 0",
        ),
        (
            "a cache budget of zero",
            "[caches.c]\nmax_bytes = 0\n[steps.s]\nsession = \"double\"\ncache = \"c\"\n[flows.f]\npipeline = [\"s\"]\n",
            ErrorKind::InvalidOption,
            "byte budget",
        ),
        (
            "no flow at all",
            "",
            ErrorKind::BadFlow,
            "no flow",
        ),
    ];
    for (what, text, kind, needle) in cases {
        let text = format!("{header}{text}");
        let e = FlowFile::from_toml(&text)
            .and_then(|f| f.build(options.clone()))
            .expect_err(what);
        assert_eq!(e.kind(), *kind, "{what}: {e}");
        assert!(e.to_string().contains(needle), "{what}: {e}");
    }
    // A missing model is tern's own typed error; the file's path names file-level errors.
    let path = dir.join("missing.toml");
    std::fs::write(
        &path,
        "[sessions.m]\nmodel = \"missing.onnx\"\n[steps.s]\nsession = \"m\"\n[flows.f]\npipeline = [\"s\"]\n",
    )
    .unwrap();
    let e = FlowFile::load(&path, options.clone()).unwrap_err();
    assert_eq!(e.model_kind(), Some(tern::ErrorKind::Io), "{e}");
    std::fs::write(&path, "[flows.f]\npipeline = [\"nope\"]\n").unwrap();
    let e = FlowFile::load(&path, options).unwrap_err();
    assert!(e.to_string().contains("missing.toml"), "{e}");
}

/// The flow files shown in docs/FLOWS.md and in `tern_flows::file`'s module docs parse
/// (their models are not here, so they are parsed, not built).
#[test]
fn documented_flow_files_parse() {
    let blocks = |text: &str, fence: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if line.trim() == fence {
                let block: Vec<&str> = lines
                    .by_ref()
                    .take_while(|l| !l.trim().ends_with("```"))
                    .collect();
                out.push(block.join("\n"));
            }
        }
        out
    };
    let docs = std::fs::read_to_string(workspace().join("docs/FLOWS.md")).unwrap();
    let module = std::fs::read_to_string(workspace().join("flows/src/file.rs")).unwrap();
    let module: String = module
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let found: Vec<String> = blocks(&docs, "```toml")
        .into_iter()
        .chain(blocks(&module, "```toml"))
        .collect();
    assert_eq!(found.len(), 2, "one example in each");
    for text in found {
        let file = FlowFile::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(!file.flows.is_empty() && !file.steps.is_empty());
    }
}
