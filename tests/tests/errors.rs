//! Bad input gets a typed error, never a panic: one test per error kind.

use std::sync::Arc;

use tern::{Backend, Error, Model, NanPolicy, Session, SessionOptions, Tensor};
use tern_tests::fixtures::{div_model, model, node, value, with_initializer, FLOAT, INT64};
use tern_tests::workspace;

fn magika_bytes() -> Vec<u8> {
    std::fs::read(workspace().join("models/magika/model.onnx")).unwrap()
}

fn div_session(policy: NanPolicy) -> Session {
    let model = Model::from_bytes(&div_model()).unwrap();
    Session::new(&model, SessionOptions::new().nan_policy(policy)).unwrap()
}

fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_slice(shape, v).unwrap()
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let err = Model::load("/nonexistent/model.onnx").unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if path.ends_with("model.onnx")),
        "{err:?}"
    );
    assert_eq!(err.kind(), "io");
}

/// Runs `f` on its own thread and fails the test if it has not returned within 20 s (a hang
/// would otherwise stall the suite rather than fail it).
fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("hung on a special file")
}

#[cfg(unix)]
fn fifo(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-fifo-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let status = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    path
}

#[test]
#[cfg(unix)]
fn special_files_are_refused_instead_of_hanging() {
    // A FIFO blocks its reader until a writer comes; /dev/zero never ends; a directory is
    // not a model.
    let pipe = fifo("model.onnx");
    for path in [pipe.clone(), "/dev/zero".into(), std::env::temp_dir()] {
        let err = within_20s(move || Model::load(&path).unwrap_err());
        assert_eq!(err.kind(), "io", "{err}");
    }

    // An initializer whose external data file is a FIFO.
    use tract_onnx::pb;
    let data = fifo("weights.bin");
    let bytes = with_initializer(
        &model(
            vec![node("add", "Add", "", &["x", "w"], &["y"])],
            vec![value("x", FLOAT, &["1"])],
            vec![value("y", FLOAT, &["1"])],
        ),
        pb::TensorProto {
            name: "w".into(),
            dims: vec![1],
            data_type: FLOAT,
            data_location: Some(1),
            external_data: vec![pb::StringStringEntryProto {
                key: "location".into(),
                value: "weights.bin".into(),
            }],
            ..Default::default()
        },
    );
    let path = data.with_file_name("model-external.onnx");
    std::fs::write(&path, bytes).unwrap();
    let err = within_20s(move || Model::load(&path).unwrap_err());
    assert_eq!(err.kind(), "invalid_model", "{err}");
    assert!(err.to_string().contains("weights.bin"), "{err}");
    let _ = std::fs::remove_dir_all(pipe.parent().unwrap());
    let _ = std::fs::remove_dir_all(data.parent().unwrap());
}

#[test]
fn window_attributes_out_of_range_and_dangling_outputs_are_invalid_models_naming_them() {
    use prost::Message;
    use tract_onnx::pb;
    // A MaxPool with a 0 stride (tract divides by it), a negative pad, a 0 kernel.
    for (attr, ints) in [
        ("strides", vec![0, 1]),
        ("pads", vec![0, -1, 0, 0]),
        ("kernel_shape", vec![2, 0]),
    ] {
        let mut pool = node("the_pool", "MaxPool", "", &["x"], &["y"]);
        let mut attrs = vec![("kernel_shape", vec![2, 2]), ("strides", vec![1, 1])];
        attrs.retain(|(name, _)| *name != attr);
        attrs.push((attr, ints.clone()));
        pool.attribute = attrs
            .into_iter()
            .map(|(name, ints)| pb::AttributeProto {
                name: name.into(),
                r#type: pb::attribute_proto::AttributeType::Ints as i32,
                ints,
                ..Default::default()
            })
            .collect();
        let bytes = model(
            vec![pool],
            vec![value("x", FLOAT, &["1", "1", "4", "4"])],
            vec![value("y", FLOAT, &[])],
        );
        let err = Model::from_bytes(&bytes).unwrap_err();
        assert_eq!(err.kind(), "invalid_model", "{attr}: {err}");
        assert!(
            err.to_string().contains("the_pool") && err.to_string().contains(attr),
            "{err}"
        );
    }
    // A graph output nothing produces.
    let mut proto = pb::ModelProto::decode(&div_model()[..]).unwrap();
    proto
        .graph
        .as_mut()
        .unwrap()
        .output
        .push(value("ghost", FLOAT, &["1"]));
    let err = Model::from_bytes(&proto.encode_to_vec()).unwrap_err();
    assert_eq!(err.kind(), "invalid_model", "{err}");
    assert!(err.to_string().contains("ghost"), "{err}");
}

#[test]
fn garbage_and_empty_bytes_are_invalid_models() {
    for bytes in [
        &b""[..],
        b"this is not a protobuf at all \xff\xff\xff\xff",
        &[0x08; 64],
    ] {
        let err = Model::from_bytes(bytes).unwrap_err();
        assert_eq!(err.kind(), "invalid_model", "{err}");
    }
}

#[test]
fn truncated_real_model_is_invalid_at_every_cut() {
    let bytes = magika_bytes();
    for cut in [10, 1000, bytes.len() / 3, bytes.len() / 2, bytes.len() - 7] {
        let err = Model::from_bytes(&bytes[..cut]).unwrap_err();
        assert!(
            matches!(err.kind(), "invalid_model" | "compile"),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn flipped_bytes_never_panic() {
    let original = magika_bytes();
    // Deterministic corruption at 200 spread positions: any outcome but a panic is fine.
    for i in 0..200usize {
        let mut bytes = original.clone();
        let pos = (i * 7919 * 104729) % bytes.len();
        bytes[pos] ^= 0x5a;
        match Model::from_bytes(&bytes) {
            Ok(m) => {
                if let Ok(s) = Session::new(&m, SessionOptions::default()) {
                    let input = Tensor::from_vec(&[1, 2048], vec![7i32; 2048]).unwrap();
                    let _ = s.run([("bytes", input)]);
                }
            }
            Err(e) => assert_ne!(e.kind(), "panic", "{e}"),
        }
    }
}

#[test]
fn unsupported_op_names_op_domain_and_node() {
    let bytes = model(
        vec![node("my_node", "FancyOp", "com.example", &["x"], &["y"])],
        vec![value("x", FLOAT, &["2"])],
        vec![value("y", FLOAT, &["2"])],
    );
    match Model::from_bytes(&bytes).unwrap_err() {
        Error::UnsupportedOp {
            op_type,
            domain,
            node,
        } => {
            assert_eq!(
                (op_type.as_str(), domain.as_str(), node.as_str()),
                ("FancyOp", "com.example", "my_node")
            );
        }
        other => panic!("expected UnsupportedOp, got {other:?}"),
    }
}

#[test]
fn wrong_input_names_are_reported() {
    let s = div_session(NanPolicy::Reject);
    let x = f32s(&[1, 3], &[1., 2., 3.]);
    let err = s.run([("x", x.clone()), ("nope", x.clone())]).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownInput { name, expected } if name == "nope" && expected == &["x", "y"])
    );
    let err = s.run([("x", x.clone())]).unwrap_err();
    assert!(
        matches!(&err, Error::MissingInput { name } if name == "y"),
        "{err:?}"
    );
    let err = s.run([("x", x.clone()), ("x", x.clone())]).unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateInput { name } if name == "x"),
        "{err:?}"
    );
}

#[test]
fn wrong_dtype_is_reported() {
    let s = div_session(NanPolicy::Reject);
    let x = Tensor::from_vec(&[1, 3], vec![1i64, 2, 3]).unwrap();
    let err = s
        .run([("x", x), ("y", f32s(&[1, 3], &[1., 1., 1.]))])
        .unwrap_err();
    assert!(
        matches!(&err, Error::DTypeMismatch { name, expected: tern::DType::F32, actual: tern::DType::I64 } if name == "x"),
        "{err:?}"
    );
}

#[test]
fn wrong_shapes_are_reported_with_symbolic_names() {
    let s = div_session(NanPolicy::Reject);
    let ok = f32s(&[2, 3], &[1.; 6]);
    // wrong rank
    let err = s
        .run([("x", f32s(&[6], &[1.; 6])), ("y", ok.clone())])
        .unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { expected, .. } if expected == "[batch, 3]"),
        "{err:?}"
    );
    // wrong fixed dimension
    let err = s
        .run([("x", f32s(&[3, 2], &[1.; 6])), ("y", ok.clone())])
        .unwrap_err();
    assert_eq!(err.kind(), "shape_mismatch");
    // `batch` bound to 2 by x, then 1 by y
    let err = s
        .run([("x", ok.clone()), ("y", f32s(&[1, 3], &[1.; 3]))])
        .unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { name, actual, .. } if name == "y" && actual == &[1, 3]),
        "{err:?}"
    );
    // and a consistent batch works, for two different batch sizes on one session
    for batch in [2, 5] {
        let x = f32s(&[batch, 3], &vec![6.; batch * 3]);
        let y = f32s(&[batch, 3], &vec![3.; batch * 3]);
        let out = s.run([("x", x), ("y", y)]).unwrap();
        assert_eq!(
            out.get("z").unwrap().as_slice::<f32>().unwrap(),
            vec![2.; batch * 3].as_slice()
        );
    }
}

#[test]
fn nan_policy_is_enforced_on_inputs_and_outputs() {
    let nan_in = || {
        [
            ("x", f32s(&[1, 3], &[f32::NAN, 1., 1.])),
            ("y", f32s(&[1, 3], &[1.; 3])),
        ]
    };
    let nan_out = || {
        [
            ("x", f32s(&[1, 3], &[0., 1., 1.])),
            ("y", f32s(&[1, 3], &[0., 1., 1.])),
        ]
    };

    let reject = div_session(NanPolicy::Reject);
    let err = reject.run(nan_in()).unwrap_err();
    assert!(
        matches!(&err, Error::NanValues { which: tern::TensorRole::Input, name, count: 1, .. } if name == "x"),
        "{err:?}"
    );
    let err = reject.run(nan_out()).unwrap_err();
    assert!(
        matches!(&err, Error::NanValues { which: tern::TensorRole::Output, name, count: 1, .. } if name == "z"),
        "{err:?}"
    );

    let inputs_only = div_session(NanPolicy::RejectInputs);
    assert_eq!(inputs_only.run(nan_in()).unwrap_err().kind(), "nan");
    assert!(inputs_only.run(nan_out()).unwrap()[0]
        .as_slice::<f32>()
        .unwrap()[0]
        .is_nan());

    let allow = div_session(NanPolicy::Allow);
    assert!(allow.run(nan_in()).unwrap()[0].as_slice::<f32>().unwrap()[0].is_nan());
    // Infinity is a value, not an error.
    let inf = [
        ("x", f32s(&[1, 3], &[1., 1., 1.])),
        ("y", f32s(&[1, 3], &[0., 1., 1.])),
    ];
    assert_eq!(
        reject.run(inf).unwrap()[0].as_slice::<f32>().unwrap()[0],
        f32::INFINITY
    );
}

#[test]
fn invalid_options_are_reported() {
    let model = Model::from_bytes(&div_model()).unwrap();
    let err = Session::new(
        &model,
        SessionOptions::new().pin_input_shape("nope", &[1, 3]),
    )
    .unwrap_err();
    assert_eq!(err.kind(), "invalid_option");
    let err =
        Session::new(&model, SessionOptions::new().pin_input_shape("x", &[1, 4])).unwrap_err();
    assert_eq!(err.kind(), "invalid_option", "{err}");
    // A thread count no machine has is a typed error, not minutes spent creating threads.
    let err = Session::new(&model, SessionOptions::new().threads(100_000)).unwrap_err();
    assert_eq!(err.kind(), "invalid_option", "{err}");
    assert!(err.to_string().contains("at most 256"), "{err}");
    assert_eq!(
        "measure".parse::<tern::ThreadPolicy>().unwrap(),
        tern::ThreadPolicy::Measure
    );
    assert_eq!(
        "sometimes"
            .parse::<tern::ThreadPolicy>()
            .unwrap_err()
            .kind(),
        "invalid_option"
    );
    assert_eq!(
        "tpu".parse::<Backend>().unwrap_err().kind(),
        "invalid_option"
    );
}

#[test]
fn pinned_shapes_are_enforced() {
    let model = Model::from_bytes(&div_model()).unwrap();
    let options = SessionOptions::new()
        .pin_input_shape("x", &[2, 3])
        .pin_input_shape("y", &[2, 3]);
    let s = Session::new(&model, options).unwrap();
    let err = s
        .run([
            ("x", f32s(&[1, 3], &[1.; 3])),
            ("y", f32s(&[1, 3], &[1.; 3])),
        ])
        .unwrap_err();
    assert!(
        matches!(&err, Error::ShapeMismatch { expected, .. } if expected == "[2, 3]"),
        "{err:?}"
    );
    let out = s
        .run([
            ("x", f32s(&[2, 3], &[4.; 6])),
            ("y", f32s(&[2, 3], &[2.; 6])),
        ])
        .unwrap();
    assert_eq!(out[0].as_slice::<f32>().unwrap(), &[2.; 6]);
}

#[cfg(not(feature = "gpu"))]
#[test]
fn gpu_backend_unavailable_without_the_feature_and_auto_falls_back() {
    let model = Model::from_bytes(&div_model()).unwrap();
    let err = Session::new(&model, SessionOptions::new().backend(Backend::Gpu)).unwrap_err();
    assert_eq!(err.kind(), "backend_unavailable");
    let s = Session::new(&model, SessionOptions::new().backend(Backend::Auto)).unwrap();
    assert_eq!(s.backend(), Backend::Cpu);
    assert!(s.backend_reason().contains("gpu"), "{}", s.backend_reason());
}

#[test]
fn integer_models_validate_dtypes_too() {
    let bytes = model(
        vec![node("add", "Add", "", &["a", "b"], &["c"])],
        vec![value("a", INT64, &["n"]), value("b", INT64, &["n"])],
        vec![value("c", INT64, &["n"])],
    );
    let s = Session::new(
        &Model::from_bytes(&bytes).unwrap(),
        SessionOptions::default(),
    )
    .unwrap();
    let a = Tensor::from_vec(&[3], vec![1i64, 2, 3]).unwrap();
    let out = s.run([("a", a.clone()), ("b", a.clone())]).unwrap();
    assert_eq!(out[0].as_slice::<i64>().unwrap(), &[2, 4, 6]);
    let f = f32s(&[3], &[1.; 3]);
    assert_eq!(
        s.run([("a", a), ("b", f)]).unwrap_err().kind(),
        "dtype_mismatch"
    );
}

#[test]
fn one_session_serves_many_threads_with_identical_results() {
    let model = Model::from_bytes(&magika_bytes()).unwrap();
    for threads in [1, 2] {
        let session =
            Arc::new(Session::new(&model, SessionOptions::new().threads(threads)).unwrap());
        let input = |seed: i32| {
            Tensor::from_vec(&[1, 2048], (0..2048).map(|i| (i * seed) % 257).collect()).unwrap()
        };
        let expected: Vec<Vec<f32>> = (1..=4)
            .map(|seed| {
                session.run([("bytes", input(seed))]).unwrap()[0]
                    .to_f32_vec()
                    .unwrap()
            })
            .collect();
        std::thread::scope(|s| {
            for t in 0..8 {
                let session = session.clone();
                let expected = &expected;
                s.spawn(move || {
                    for round in 0..5 {
                        let seed = (t + round) % 4 + 1;
                        let out = session.run([("bytes", input(seed as i32))]).unwrap();
                        assert_eq!(out[0].to_f32_vec().unwrap(), expected[seed - 1]);
                    }
                });
            }
        });
    }
}

#[test]
fn metadata_describes_the_model() {
    let model = Model::from_bytes(&magika_bytes()).unwrap();
    let info = model.info();
    assert_eq!(info.inputs[0].name, "bytes");
    assert_eq!(info.inputs[0].dtype, Some(tern::DType::I32));
    assert_eq!(info.inputs[0].shape_string(), "[unk__214, 2048]");
    assert_eq!(info.outputs[0].shape_string(), "[unk__215, 214]");
    assert_eq!(info.default_opset(), 15);
    assert_eq!(info.op_histogram.get("Conv"), Some(&1));
    assert_eq!(info.node_count, info.op_histogram.values().sum::<usize>());
    assert!(
        info.parameter_count > 100_000 && info.parameter_bytes >= info.parameter_count * 4 - 16
    );
    assert!(!info.quantized);
}

/// A `MatMul` whose inputs are declared `[n, k]` and `[m, p]` is planned with unrelated
/// symbols for `k` and `m`; run with `k != m` tract's kernel read out of bounds (SIGSEGV
/// with `b = [1000, 1]`, garbage with `[2, 5] × [3, 2]`). Both are typed errors naming the
/// node now, and a good run afterwards still works.
#[test]
fn matmul_inner_dimensions_that_disagree_are_refused_before_the_kernel() {
    let bytes = model(
        vec![node("the_matmul", "MatMul", "", &["a", "b"], &["y"])],
        vec![
            value("a", FLOAT, &["n", "k"]),
            value("b", FLOAT, &["m", "p"]),
        ],
        vec![value("y", FLOAT, &[])],
    );
    let model = Model::from_bytes(&bytes).unwrap();
    let session = Session::new(&model, SessionOptions::new().without_telemetry()).unwrap();
    let ones = |shape: &[usize]| f32s(shape, &vec![1.0; shape.iter().product()]);
    for (a, b) in [
        (&[1usize, 1][..], &[1000usize, 1][..]),
        (&[1, 1], &[4_000_000, 1]),
        (&[2, 5], &[3, 2]),
    ] {
        let err = session
            .run([("a", ones(a)), ("b", ones(b))])
            .expect_err("inner dimensions disagree");
        assert_eq!(err.kind(), "shape_conflict", "{a:?} x {b:?}: {err}");
        assert!(err.to_string().contains("the_matmul"), "{err}");
    }
    let y = session
        .run([("a", ones(&[2, 3])), ("b", ones(&[3, 4]))])
        .unwrap();
    assert_eq!(y[0].shape(), &[2, 4]);
    assert_eq!(y[0].to_f32_vec().unwrap(), vec![3.0; 8]);
}

/// A Transpose whose `perm` repeats an axis made tract allocate gigabytes and abort.
#[test]
fn transpose_perm_that_is_not_a_permutation_is_an_invalid_model() {
    use tract_onnx::pb;
    for perm in [vec![0, 0], vec![1, 2], vec![0, -1]] {
        let mut t = node("the_transpose", "Transpose", "", &["x"], &["y"]);
        t.attribute = vec![pb::AttributeProto {
            name: "perm".into(),
            r#type: pb::attribute_proto::AttributeType::Ints as i32,
            ints: perm.clone(),
            ..Default::default()
        }];
        let bytes = model(
            vec![t],
            vec![value("x", FLOAT, &["2", "2"])],
            vec![value("y", FLOAT, &[])],
        );
        let err = Model::from_bytes(&bytes).unwrap_err();
        assert_eq!(err.kind(), "invalid_model", "{perm:?}: {err}");
        assert!(err.to_string().contains("the_transpose"), "{err}");
    }
}

/// A run whose values would hold more than the session's memory limit is refused before
/// it starts, naming the node with the largest value; within the limit it runs.
#[test]
fn runs_over_the_memory_limit_are_refused_before_they_start() {
    // x [n, 1000] → Relu → y: x and y alive at once, 8000·n bytes.
    let bytes = model(
        vec![node("the_relu", "Relu", "", &["x"], &["y"])],
        vec![value("x", FLOAT, &["n", "1000"])],
        vec![value("y", FLOAT, &[])],
    );
    let model = Model::from_bytes(&bytes).unwrap();
    let options = SessionOptions::new()
        .without_telemetry()
        .memory_limit(8000 * 100);
    let session = Session::new(&model, options).unwrap();
    let x = |n: usize| f32s(&[n, 1000], &vec![0.5; n * 1000]);
    assert!(session.run([("x", x(100))]).is_ok());
    let err = session.run([("x", x(101))]).unwrap_err();
    assert_eq!(err.kind(), "resource_limit", "{err}");
    assert!(
        matches!(
            err,
            Error::ResourceLimit {
                needed: 808_000,
                limit: 800_000,
                ..
            }
        ),
        "{err}"
    );
    // A fixed-shape session over the limit is refused at creation.
    let pinned = SessionOptions::new()
        .without_telemetry()
        .memory_limit(1000)
        .pin_input_shape("x", &[1, 1000]);
    let err = Session::new(&model, pinned).unwrap_err();
    assert_eq!(err.kind(), "resource_limit", "{err}");
    // The default limit is half the device's memory.
    let limits = tern::LimitOptions::default();
    if let Some(device) = tern::LimitOptions::device_memory() {
        assert_eq!(limits.memory_limit(), device / 2);
    }
}

/// `y = Range(a, b, c)` over three f32 scalar inputs.
fn range_model() -> Vec<u8> {
    model(
        vec![node("the_range", "Range", "", &["a", "b", "c"], &["y"])],
        vec![
            value("a", FLOAT, &[]),
            value("b", FLOAT, &[]),
            value("c", FLOAT, &[]),
        ],
        vec![value("y", FLOAT, &[])],
    )
}

/// A value whose size only the run knows (a `Range` over input bounds) is checked just
/// before it is computed: over the memory limit it is a typed error, not an allocation of
/// terabytes (an allocator panic) or of gigabytes the OS later kills the app for.
#[test]
fn values_sized_by_input_values_are_checked_before_they_are_allocated() {
    let bytes = range_model();
    let model = Model::from_bytes(&bytes).unwrap();
    let options = SessionOptions::new()
        .without_telemetry()
        .memory_limit(1 << 20);
    let session = Session::new(&model, options).unwrap();
    let scalar = |v: f32| f32s(&[], &[v]);
    let run = |end: f32| session.run([("a", scalar(0.0)), ("b", scalar(end)), ("c", scalar(1.0))]);
    let y = run(10.0).unwrap();
    assert_eq!(
        y[0].to_f32_vec().unwrap(),
        (0..10).map(|v| v as f32).collect::<Vec<_>>()
    );
    for end in [1e6, 1e13] {
        let err = run(end).unwrap_err();
        assert_eq!(err.kind(), "resource_limit", "{end}: {err}");
        assert!(err.to_string().contains("Range"), "{err}");
    }
    // Still fine afterwards.
    assert_eq!(run(3.0).unwrap()[0].shape(), &[3]);
}

/// Values computed from constants while tract types the graph (before any run) are checked
/// at session creation: a `ConstantOfShape` of `[100000, 100000, 100]` (4 TB) was an
/// allocator panic during typing.
#[test]
fn values_folded_from_constants_are_checked_at_session_creation() {
    use tract_onnx::pb;
    let shape = |name: &str, dims: Vec<i64>| pb::TensorProto {
        name: name.into(),
        data_type: INT64,
        dims: vec![dims.len() as i64],
        int64_data: dims,
        ..Default::default()
    };
    for (dims, limit, refused) in [
        (vec![100_000, 100_000, 100], None, true),
        (vec![1000, 1000], Some(1 << 20), true),
        (vec![100, 100], Some(1 << 20), false),
    ] {
        let bytes = with_initializer(
            &model(
                vec![
                    node("the_fill", "ConstantOfShape", "", &["s"], &["f"]),
                    node("add", "Add", "", &["f", "x"], &["y"]),
                ],
                vec![value("x", FLOAT, &["1"])],
                vec![value("y", FLOAT, &[])],
            ),
            shape("s", dims.clone()),
        );
        let model = Model::from_bytes(&bytes).unwrap();
        let mut options = SessionOptions::new().without_telemetry();
        if let Some(limit) = limit {
            options = options.memory_limit(limit);
        }
        match Session::new(&model, options) {
            Err(err) if refused => {
                assert_eq!(err.kind(), "resource_limit", "{dims:?}: {err}");
                assert!(err.to_string().contains("the_fill"), "{err}");
            }
            Ok(_) if !refused => {}
            other => panic!("{dims:?}: {:?}", other.err()),
        }
    }
}

/// Indices past the end and integer division by zero were tract panics (kind `panic`, a
/// message and backtrace note on stderr); they are `invalid_value` errors naming the node,
/// and the session keeps working.
#[test]
fn out_of_range_indices_and_integer_division_by_zero_are_invalid_values() {
    let i64s = |v: &[i64]| Tensor::from_vec(&[v.len()], v.to_vec()).unwrap();
    let gather = model(
        vec![node("the_gather", "Gather", "", &["x", "i"], &["y"])],
        vec![value("x", FLOAT, &["4", "2"]), value("i", INT64, &["2"])],
        vec![value("y", FLOAT, &[])],
    );
    let session = Session::new(
        &Model::from_bytes(&gather).unwrap(),
        SessionOptions::new().without_telemetry(),
    )
    .unwrap();
    let x = || f32s(&[4, 2], &[0., 1., 2., 3., 4., 5., 6., 7.]);
    for bad in [[1, 100], [-5, 0]] {
        let err = session.run([("x", x()), ("i", i64s(&bad))]).unwrap_err();
        assert_eq!(err.kind(), "invalid_value", "{bad:?}: {err}");
    }
    let y = session.run([("x", x()), ("i", i64s(&[3, -4]))]).unwrap();
    assert_eq!(y[0].to_f32_vec().unwrap(), vec![6., 7., 0., 1.]);
    for op in ["Mod", "Div"] {
        let bytes = model(
            vec![node("the_division", op, "", &["a", "b"], &["y"])],
            vec![value("a", INT64, &["2"]), value("b", INT64, &["2"])],
            vec![value("y", INT64, &[])],
        );
        let session = Session::new(
            &Model::from_bytes(&bytes).unwrap(),
            SessionOptions::new().without_telemetry(),
        )
        .unwrap();
        let err = session
            .run([("a", i64s(&[5, 7])), ("b", i64s(&[2, 0]))])
            .unwrap_err();
        assert_eq!(err.kind(), "invalid_value", "{op}: {err}");
        let y = session
            .run([("a", i64s(&[5, 7])), ("b", i64s(&[2, 3]))])
            .unwrap();
        assert_eq!(
            y[0].as_slice::<i64>().unwrap(),
            if op == "Mod" { &[1, 1] } else { &[2, 2] }
        );
    }
}

/// A graph bigger than the session's limit (nodes plus node inputs) is refused at session
/// creation instead of taking minutes to type (tract's typing is quadratic in graph size).
#[test]
fn graphs_over_the_size_limit_are_refused_at_session_creation() {
    let chain: Vec<_> = (0..10)
        .map(|i| {
            let (x, y) = (format!("t{i}"), format!("t{}", i + 1));
            node(&format!("relu{i}"), "Relu", "", &[&x], &[&y])
        })
        .collect();
    let bytes = model(
        chain,
        vec![value("t0", FLOAT, &["2"])],
        vec![value("t10", FLOAT, &[])],
    );
    let model = Model::from_bytes(&bytes).unwrap();
    assert_eq!(
        (model.info().node_count, model.info().node_inputs),
        (10, 10)
    );
    let options = || SessionOptions::new().without_telemetry();
    let err = Session::new(&model, options().max_graph_size(19)).unwrap_err();
    assert_eq!(err.kind(), "resource_limit", "{err}");
    assert!(err.to_string().contains("graph_size"), "{err}");
    assert!(Session::new(&model, options().max_graph_size(20)).is_ok());
    assert!(Session::new(&model, options()).is_ok());
}

/// A `Range` with a zero step and a `TopK` asking for more elements than its axis has were
/// tract panics; they are `invalid_value` errors.
#[test]
fn range_with_a_zero_step_and_topk_past_the_axis_are_invalid_values() {
    let range = range_model();
    // NaN allowed in, so that the Range itself sees it.
    let session = Session::new(
        &Model::from_bytes(&range).unwrap(),
        SessionOptions::new()
            .without_telemetry()
            .nan_policy(NanPolicy::Allow),
    )
    .unwrap();
    let s = |v: f32| f32s(&[], &[v]);
    for (end, step) in [(10.0, 0.0), (f32::NAN, 1.0), (10.0, f32::INFINITY)] {
        let err = session
            .run([("a", s(0.0)), ("b", s(end)), ("c", s(step))])
            .unwrap_err();
        assert_eq!(err.kind(), "invalid_value", "{end} {step}: {err}");
    }
    let topk = model(
        vec![node("the_topk", "TopK", "", &["x", "k"], &["v", "i"])],
        vec![value("x", FLOAT, &["4"]), value("k", INT64, &["1"])],
        vec![value("v", FLOAT, &[]), value("i", INT64, &[])],
    );
    let session = Session::new(
        &Model::from_bytes(&topk).unwrap(),
        SessionOptions::new().without_telemetry(),
    )
    .unwrap();
    let x = || f32s(&[4], &[3., 1., 4., 1.]);
    let k = |k: i64| Tensor::from_vec(&[1], vec![k]).unwrap();
    for bad in [5, 1 << 40, -1] {
        let err = session.run([("x", x()), ("k", k(bad))]).unwrap_err();
        assert_eq!(err.kind(), "invalid_value", "k = {bad}: {err}");
    }
    let top = session.run([("x", x()), ("k", k(2))]).unwrap();
    assert_eq!(top[0].to_f32_vec().unwrap(), vec![4., 3.]);
}
