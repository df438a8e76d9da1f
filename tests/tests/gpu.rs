//! The GPU backend through wgpu — on CI, Mesa's lavapipe (a software Vulkan) — against
//! onnxruntime's references and tern's CPU backend; `Auto` selection and the run-time
//! fallback to the CPU. Built only with `--features gpu`; every test's name starts with
//! `wgpu_` so scripts/test can select them alongside the executor's unit tests.
#![cfg(feature = "gpu")]

use std::time::Instant;

use tern::telemetry::{Outcome, Record, Telemetry, TelemetryConfig};
use tern::{Backend, GpuPrecision, Model, NanPolicy, Session, SessionOptions, Tensor};
use tern_tests::fixtures::{model, node, value, FLOAT};
use tern_tests::node_suite::{check_expected_failures, listed, manifest, per_op, run_cases};
use tern_tests::{compare, fetched, model_manifest, reports_dir, workspace, Diff};
use tract_onnx::pb;

#[derive(serde::Serialize)]
struct Row {
    model: String,
    status: String,
    vs_onnxruntime: Option<Diff>,
    vs_cpu: Option<Diff>,
    gpu_ms: Option<f64>,
}

fn gpu_options() -> SessionOptions {
    SessionOptions::new()
        .backend(Backend::Gpu)
        .without_telemetry()
}

/// Every fetched model on the GPU: one that runs must match onnxruntime and the CPU backend
/// within its tolerance; any other must be refused with `unsupported_op` or
/// `backend_unavailable` at session creation, never a panic or wrong numbers. The CNN and
/// the transformer must run.
#[test]
fn wgpu_real_models_on_gpu_match_onnxruntime_and_cpu() {
    let adapter = tern::backend::gpu_adapter().expect("a wgpu adapter (CI installs lavapipe)");
    let mut rows = Vec::new();
    let mut ran = Vec::new();
    for entry in model_manifest().iter().filter(|e| e.expect == "pass") {
        let model = entry.load().unwrap();
        let inputs = entry.reference_inputs();
        let mut options = gpu_options();
        for (name, t) in &inputs {
            options = options.pin_input_shape(name.clone(), t.shape());
        }
        let session = match Session::new(&model, options) {
            Ok(s) => s,
            Err(e) => {
                // Ops outside the list are refused up front; a listed op the GPU cannot
                // lower here (int8 data, say) is refused when the program is built.
                assert!(
                    ["unsupported_op", "backend_unavailable"].contains(&e.kind()),
                    "{}: {e}",
                    entry.name
                );
                rows.push(Row {
                    model: entry.name.clone(),
                    status: format!("not on GPU: {e}"),
                    vs_onnxruntime: None,
                    vs_cpu: None,
                    gpu_ms: None,
                });
                continue;
            }
        };
        assert_eq!(session.backend(), Backend::Gpu);
        let cpu = Session::new(
            &model,
            SessionOptions::new()
                .backend(Backend::Cpu)
                .without_telemetry(),
        )
        .unwrap();
        let start = Instant::now();
        let outputs = session.run(inputs.clone()).unwrap();
        let gpu_ms = start.elapsed().as_secs_f64() * 1e3;
        let cpu_outputs = cpu.run(inputs).unwrap();
        let vs_ort = entry
            .compare_with_reference(&outputs)
            .unwrap_or_else(|e| panic!("{} vs onnxruntime: {e}", entry.name));
        let mut vs_cpu = Diff::default();
        for name in &entry.outputs {
            let d = compare(
                outputs.get(name).unwrap(),
                cpu_outputs.get(name).unwrap(),
                entry.atol,
                entry.rtol,
            )
            .unwrap_or_else(|e| panic!("{} output {name} vs CPU: {e}", entry.name));
            vs_cpu = vs_cpu.worst(d);
        }
        ran.push(entry.name.clone());
        rows.push(Row {
            model: entry.name.clone(),
            status: "pass".into(),
            vs_onnxruntime: Some(vs_ort),
            vs_cpu: Some(vs_cpu),
            gpu_ms: Some(gpu_ms),
        });
    }
    std::fs::write(
        reports_dir().join("gpu.json"),
        serde_json::to_vec_pretty(&rows).unwrap(),
    )
    .unwrap();
    println!(
        "GPU parity on {adapter}: {} models run on the GPU: {ran:?}",
        ran.len()
    );
    for name in ["ppocr_cls", "ppocr_rec", "ppocr_det", "ppocr_cls_fp16"] {
        assert!(ran.iter().any(|r| r == name), "{name} must run on the GPU");
    }
}

/// f16 compute on the adapter (lavapipe has shader-f16): the CNN and the transformer stay
/// within f16's ~3 digits of onnxruntime's f32 outputs and pick the same classes. On a
/// software adapter `Auto` keeps f32, and the session says so.
#[test]
fn wgpu_f16_programs_match_onnxruntime_within_half_precision() {
    for entry in model_manifest()
        .into_iter()
        .filter(|e| ["ppocr_cls", "ppocr_rec"].contains(&e.name.as_str()))
    {
        let model = entry.load().unwrap();
        let inputs = entry.reference_inputs();
        let pinned = |mut options: SessionOptions| {
            for (name, t) in &inputs {
                options = options.pin_input_shape(name.clone(), t.shape());
            }
            options
        };
        let auto = Session::new(&model, pinned(gpu_options())).unwrap();
        assert!(
            auto.backend_reason().contains("computes in f32"),
            "{}",
            auto.backend_reason()
        );
        let f16 = match Session::new(
            &model,
            pinned(gpu_options().gpu_precision(GpuPrecision::F16)),
        ) {
            Ok(s) => s,
            Err(e) => panic!("{}: f16 on this adapter: {e}", entry.name),
        };
        assert!(
            f16.backend_reason().contains("computes in f16"),
            "{}",
            f16.backend_reason()
        );
        let outputs = f16.run(inputs.clone()).unwrap();
        let reference = tern_tests::read_npy(&entry.dir().join("ref").join(&entry.output_files[0]));
        let got = outputs.get(&entry.outputs[0]).unwrap();
        let d = compare(got, &reference, 2e-2, 0.0)
            .unwrap_or_else(|e| panic!("{} in f16 vs onnxruntime: {e}", entry.name));
        let classes = |t: &Tensor| -> Vec<usize> {
            let row = *t.shape().last().unwrap();
            t.to_f32_vec()
                .unwrap()
                .chunks(row)
                .map(|r| (0..row).fold(0, |b, i| if r[i] > r[b] { i } else { b }))
                .collect()
        };
        assert_eq!(
            classes(got),
            classes(&reference),
            "{}: f16 picks other classes",
            entry.name
        );
        println!(
            "{} in f16 on the GPU: max abs {:.2e} vs onnxruntime",
            entry.name, d.max_abs
        );
    }
}

/// Symbolic input shapes: the GPU builds a program per shape on first use.
#[test]
fn wgpu_symbolic_shapes_get_a_program_per_shape() {
    let model = Model::load(fetched("models/ppocr_cls/model.onnx")).unwrap();
    let gpu = Session::new(&model, gpu_options()).unwrap();
    assert!(
        gpu.backend_reason().contains("per input shape"),
        "{}",
        gpu.backend_reason()
    );
    let cpu = Session::new(&model, SessionOptions::new().backend(Backend::Cpu)).unwrap();
    for (batch, width) in [(1, 96), (2, 192), (1, 96)] {
        let dims = [("x_d0", batch), ("x_d2", 48), ("x_d3", width)]
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        let inputs = model.random_inputs(batch as u64, &dims).unwrap();
        let got = gpu.run(inputs.clone()).unwrap();
        let want = cpu.run(inputs).unwrap();
        compare(&got[0], &want[0], 1e-4, 1e-3).unwrap();
    }
}

/// `Auto` never picks a software rasteriser on its own, and picks it when allowed.
#[test]
fn wgpu_auto_declines_a_software_adapter_unless_allowed() {
    let model = Model::load(fetched("models/ppocr_cls/model.onnx")).unwrap();
    let auto = Session::new(&model, SessionOptions::new().without_telemetry()).unwrap();
    let adapter = tern::backend::gpu_adapter().unwrap();
    if adapter.contains("llvmpipe") || adapter.contains("lavapipe") {
        assert_eq!(auto.backend(), Backend::Cpu);
        assert!(
            auto.backend_reason().contains("software rasteriser"),
            "{}",
            auto.backend_reason()
        );
    }
    let allowed = Session::new(
        &model,
        SessionOptions::new()
            .allow_software_gpu(true)
            .without_telemetry(),
    )
    .unwrap();
    assert_eq!(
        allowed.backend(),
        Backend::Gpu,
        "{}",
        allowed.backend_reason()
    );
    // A model with an op the GPU lacks goes to the CPU, and the reason names the op.
    let lstm = Model::load(fetched("models/silero_vad_lstm/model.onnx")).unwrap();
    let auto = Session::new(
        &lstm,
        SessionOptions::new()
            .allow_software_gpu(true)
            .without_telemetry(),
    )
    .unwrap();
    assert_eq!(auto.backend(), Backend::Cpu);
    assert!(
        auto.backend_reason().contains("unsupported_op"),
        "{}",
        auto.backend_reason()
    );
    // Asked for explicitly, the same model is a typed error naming an op the GPU lacks.
    let err = Session::new(&lstm, gpu_options()).unwrap_err();
    assert_eq!(err.kind(), "unsupported_op");
    let tern::Error::UnsupportedOp { op_type, node, .. } = &err else {
        unreachable!()
    };
    assert!(!tern::backend::gpu_supported_ops().contains(&op_type.as_str()));
    assert_eq!(lstm.first_node_of(op_type), Some(node.as_str()), "{err}");
}

/// `y = float(int(x))`: both ops are on the GPU list, but the integer in between is not
/// something the GPU computes; the shape is symbolic, so that shows only at the first run.
fn runtime_int_model() -> Model {
    let cast = |name: &str, from: &str, to: &str, dtype: i64| {
        let mut n = node(name, "Cast", "", &[from], &[to]);
        n.attribute.push(pb::AttributeProto {
            name: "to".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: dtype,
            ..Default::default()
        });
        n
    };
    let bytes = model(
        vec![cast("to_int", "x", "ix", 7), cast("to_float", "ix", "y", 1)],
        vec![value("x", FLOAT, &["n"])],
        vec![value("y", FLOAT, &["n"])],
    );
    Model::from_bytes(&bytes).unwrap()
}

/// A GPU failure at run time under `Auto` moves the session to the CPU: the run still
/// returns the right values and its span records the fallback.
#[test]
fn wgpu_auto_falls_back_to_cpu_once_and_records_it() {
    let dir = std::env::temp_dir().join(format!("tern-gpu-fallback-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let telemetry = Telemetry::open(&dir, TelemetryConfig::default()).unwrap();
    let model = runtime_int_model();
    let session = Session::new(
        &model,
        SessionOptions::new()
            .allow_software_gpu(true)
            .telemetry(telemetry.clone()),
    )
    .unwrap();
    assert_eq!(
        session.backend(),
        Backend::Gpu,
        "{}",
        session.backend_reason()
    );
    let x = Tensor::from_vec(&[3], vec![2.7f32, -0.5, 3.0]).unwrap();
    for _ in 0..2 {
        let out = session.run([("x", x.clone())]).unwrap();
        assert_eq!(out[0].to_f32_vec().unwrap(), vec![2.0, 0.0, 3.0]);
    }
    // Explicitly on the GPU, the same failure is a typed error naming the node.
    let gpu = Session::new(&model, gpu_options()).unwrap();
    let err = gpu.run([("x", x)]).unwrap_err();
    assert_eq!(err.kind(), "unsupported_op", "{err}");
    assert!(err.to_string().contains("to_int"), "{err}");
    telemetry.flush().unwrap();
    let outcomes: Vec<Outcome> = telemetry
        .stored_records()
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Span(s) => Some(s.outcome),
            _ => None,
        })
        .collect();
    assert_eq!(outcomes, vec![Outcome::Fallback, Outcome::Fallback]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The ONNX node tests of the GPU's ops (cases that pass on the CPU) through the GPU,
/// held to `tests/conformance/expected_failures_gpu.txt` the way the CPU suite is held to
/// its list: a new failure or a newly passing case fails the test.
#[test]
fn wgpu_onnx_node_suite_for_gpu_ops() {
    let manifest = manifest();
    let cpu_failing = listed(&workspace().join("tests/conformance/expected_failures.txt"));
    let names: Vec<&String> = manifest
        .iter()
        .filter(|(name, case)| {
            tern::backend::gpu_supported_ops().contains(&case.op.as_str())
                && !cpu_failing.contains(*name)
        })
        .map(|(name, _)| name)
        .collect();
    let options = SessionOptions::new()
        .backend(Backend::Gpu)
        .nan_policy(NanPolicy::Allow)
        .without_telemetry();
    let results = run_cases(&manifest, &names, &options);
    let per_op = per_op(&results);
    let passed = results.iter().filter(|r| r.passed).count();
    println!(
        "GPU node conformance: {passed}/{} cases of the GPU's ops pass (the rest are typed refusals listed in tests/conformance/expected_failures_gpu.txt)",
        results.len()
    );
    for (op, (p, t)) in &per_op {
        println!("  {op:<24} {p}/{t}");
    }
    std::fs::write(
        reports_dir().join("gpu-conformance.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "per_op": per_op, "cases": results }))
            .unwrap(),
    )
    .unwrap();
    // A failure must be a typed refusal, never wrong numbers.
    for r in results.iter().filter(|r| !r.passed) {
        assert!(
            r.reason.starts_with("[unsupported_op]")
                || r.reason.starts_with("[backend_unavailable]"),
            "{}: {}",
            r.name,
            r.reason
        );
    }
    check_expected_failures(
        &results,
        &workspace().join("tests/conformance/expected_failures_gpu.txt"),
        "# ONNX node tests of the GPU's ops that the GPU backend refuses (typed errors), with the\n\
         # reason. Regenerate with: TERN_BLESS=1 cargo test -p tern-tests --features gpu --test gpu\n",
    );
}

/// Adds a tensor-valued attribute to `node`.
fn tensor_attribute(node: &mut pb::NodeProto, name: &str, t: pb::TensorProto) {
    node.attribute.push(pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Tensor as i32,
        t: Some(t),
        ..Default::default()
    });
}

/// A `Constant` node holding `t`.
fn constant(name: &str, t: pb::TensorProto) -> pb::NodeProto {
    let mut n = node(name, "Constant", "", &[], &[name]);
    tensor_attribute(&mut n, "value", t);
    n
}

/// A `Constant` node holding an int64 tensor.
fn int_constant(name: &str, dims: &[i64], values: &[i64]) -> pb::NodeProto {
    constant(
        name,
        pb::TensorProto {
            dims: dims.to_vec(),
            data_type: tern_tests::fixtures::INT64,
            int64_data: values.to_vec(),
            ..Default::default()
        },
    )
}

/// An f32 tensor.
fn float_tensor(dims: &[i64], values: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        dims: dims.to_vec(),
        data_type: FLOAT,
        float_data: values.to_vec(),
        ..Default::default()
    }
}

fn string_attribute(node: &mut pb::NodeProto, name: &str, value: &str) {
    node.attribute.push(pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::String as i32,
        s: value.as_bytes().to_vec(),
        ..Default::default()
    });
}

/// A Resize by constant scales `[1, 1, 2, 3]` of a `[1, 2, 2, 3]` input, in `mode`.
fn resize(mode: &str) -> Vec<pb::NodeProto> {
    let mut resize = node("resize", "Resize", "", &["x", "", "scales"], &["y"]);
    string_attribute(&mut resize, "mode", mode);
    string_attribute(&mut resize, "coordinate_transformation_mode", "asymmetric");
    string_attribute(&mut resize, "nearest_mode", "floor");
    vec![
        constant("scales", float_tensor(&[4], &[1.0, 1.0, 2.0, 3.0])),
        resize,
    ]
}

/// An op under test: its name, its nodes, and the input and output dims.
type OpCase = (
    &'static str,
    Vec<pb::NodeProto>,
    Vec<&'static str>,
    Vec<&'static str>,
);

/// Ops whose operands come from constants (indices, pads, target shapes) — the form
/// exporters write — on the GPU against the CPU backend, values checked exactly.
#[test]
fn wgpu_constant_operand_ops_match_cpu() {
    let mut pad = node("pad", "Pad", "", &["x", "pads"], &["y"]);
    string_attribute(&mut pad, "mode", "constant");
    let mut fill = node("fill", "ConstantOfShape", "", &["shape"], &["ones"]);
    tensor_attribute(&mut fill, "value", float_tensor(&[1], &[1.5]));
    let cases: Vec<OpCase> = vec![
        (
            "Gather",
            vec![
                int_constant("ix", &[2, 2], &[0, 2, 3, -1]),
                node("gather", "Gather", "", &["x", "ix"], &["y"]),
            ],
            vec!["4", "3"],
            vec!["2", "2", "3"],
        ),
        (
            "Pad",
            vec![int_constant("pads", &[4], &[0, 1, 2, 0]), pad],
            vec!["4", "3"],
            vec!["6", "4"],
        ),
        (
            "Expand",
            vec![
                int_constant("shape", &[3], &[2, 4, 3]),
                node("expand", "Expand", "", &["x", "shape"], &["y"]),
            ],
            vec!["4", "1"],
            vec!["2", "4", "3"],
        ),
        (
            "Resize",
            resize("nearest"),
            vec!["1", "2", "2", "3"],
            vec!["1", "2", "4", "9"],
        ),
        (
            "ConstantOfShape",
            vec![
                node("shape_of", "Shape", "", &["x"], &["shape"]),
                fill,
                node("add", "Add", "", &["x", "ones"], &["y"]),
            ],
            vec!["4", "3"],
            vec!["4", "3"],
        ),
    ];
    for (op, nodes, x_dims, y_dims) in cases {
        let bytes = model(
            nodes,
            vec![value("x", FLOAT, &x_dims)],
            vec![value("y", FLOAT, &y_dims)],
        );
        let model = Model::from_bytes(&bytes).unwrap();
        let n: usize = x_dims.iter().map(|d| d.parse::<usize>().unwrap()).product();
        let shape: Vec<usize> = x_dims.iter().map(|d| d.parse().unwrap()).collect();
        let x = Tensor::from_vec(&shape, (0..n).map(|i| i as f32 * 0.5 - 1.0).collect()).unwrap();
        let gpu = Session::new(&model, gpu_options()).unwrap_or_else(|e| panic!("{op}: {e}"));
        let cpu = Session::new(&model, SessionOptions::new().backend(Backend::Cpu)).unwrap();
        let got = gpu
            .run([("x", x.clone())])
            .unwrap_or_else(|e| panic!("{op}: {e}"));
        let want = cpu.run([("x", x)]).unwrap();
        assert_eq!(got[0].shape(), want[0].shape(), "{op}");
        compare(&got[0], &want[0], 0.0, 0.0).unwrap_or_else(|e| panic!("{op}: {e}"));
    }
}

/// A Resize the GPU has no kernel for (linear here; integer nearest upsampling is what it
/// runs) is refused at session creation with the node named, and `Auto` runs it on the CPU.
#[test]
fn wgpu_unsupported_resize_is_refused_and_auto_uses_the_cpu() {
    let bytes = model(
        resize("linear"),
        vec![value("x", FLOAT, &["1", "2", "2", "3"])],
        vec![value("y", FLOAT, &["1", "2", "4", "9"])],
    );
    let model = Model::from_bytes(&bytes).unwrap();
    let Err(err) = Session::new(&model, gpu_options()) else {
        panic!("linear Resize must not run on the GPU");
    };
    assert_eq!(err.kind(), "unsupported_op", "{err}");
    assert!(err.to_string().contains("resize"), "{err}");
    let auto = Session::new(
        &model,
        SessionOptions::new()
            .allow_software_gpu(true)
            .without_telemetry(),
    )
    .unwrap();
    assert_eq!(auto.backend(), Backend::Cpu, "{}", auto.backend_reason());
}
