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
        let batcher = Arc::new(
            Batcher::new(
                session.clone(),
                BatchOptions::default()
                    .max_batch(4)
                    .max_wait(Duration::from_millis(200)),
            )
            .unwrap(),
        );
        let got = concurrently(&batcher, requests, |_, r| r.unwrap());
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
            "12 callers released at once with a 200 ms window were never batched: {stats:?}"
        );
        assert_eq!(stats.rerun_alone, 0, "{stats:?}");
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
    for eager in [true, false] {
        let batcher = Batcher::new(
            session(&double_model(), SessionOptions::new()),
            BatchOptions::default().max_wait(wait).eager(eager),
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

    let e = Batcher::new(
        session(&double_model(), SessionOptions::new()),
        BatchOptions::default().max_batch(0),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidOption, "{e}");
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
