//! tern-quantize on real models: accuracy and size through tern, validity in onnxruntime,
//! and clear errors for inputs it cannot take.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use tern_quantize::{dynamic, fp16, graph, report, QuantizeError};
use tern_tests::{fetched, workspace};

fn out(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tern-quantize-{}-{name}", std::process::id()))
}

fn dims(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Cosine similarity of the two models' outputs in onnxruntime.
fn ort_cosine(a: &Path, b: &Path, dims: &[(&str, usize)]) -> f64 {
    let python = std::process::Command::new(workspace().join("scripts/python-env"))
        .output()
        .unwrap();
    let out = std::process::Command::new(String::from_utf8(python.stdout).unwrap().trim())
        .arg(workspace().join("scripts/ort_compare.py"))
        .args([a, b])
        .args(dims.iter().map(|(k, v)| format!("{k}={v}")))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "onnxruntime rejected the model: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["cosine"].as_f64().unwrap()
}

#[test]
fn dynamic_int8_on_a_transformer_keeps_accuracy_and_shrinks_it() {
    let src = fetched("models/ppocr_rec/model.onnx");
    let dst = out("rec-dyn.onnx");
    let mut model = graph::load(&src).unwrap();
    let n = dynamic::quantize_dynamic(&mut model, &dynamic::DynamicOptions::default()).unwrap();
    assert!(n >= 5, "{n} MatMuls quantized");
    graph::save(&model, &dst).unwrap();
    let d = dims(&[("x_d2", 48), ("p2o.DynamicDimension.1", 160)]);
    let eval = report::random_eval_inputs(&src, 6, 1000, &d).unwrap();
    let r = report::evaluate(&src, &dst, &eval, 1, 3).unwrap();
    let o = &r.outputs[0];
    assert!(o.cosine >= 0.99, "cosine {}", o.cosine);
    assert!(
        o.top1_agreement >= 0.95,
        "top-1 agreement {}",
        o.top1_agreement
    );
    assert!(r.size_ratio < 0.8, "size ratio {}", r.size_ratio);
    assert!(
        ort_cosine(
            &src,
            &dst,
            &[("x_d2", 48), ("?", 48), ("p2o.DynamicDimension.1", 160)]
        ) >= 0.99
    );
    // Quantizing twice is refused.
    let err = dynamic::quantize_dynamic(&mut model, &Default::default()).unwrap_err();
    assert!(matches!(err, QuantizeError::AlreadyQuantized(_)), "{err}");
}

#[test]
fn excluded_nodes_stay_in_float() {
    let src = fetched("models/ppocr_rec/model.onnx");
    let mut all = graph::load(&src).unwrap();
    let n = dynamic::quantize_dynamic(&mut all, &Default::default()).unwrap();
    // The first node that was quantized: its MatMulInteger is named after it.
    let victim = all
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .find(|x| x.op_type == "MatMulInteger")
        .unwrap()
        .name
        .clone();
    let victim = victim.rsplit_once("_dq").unwrap().0.to_string();
    let options = dynamic::DynamicOptions {
        exclude_nodes: HashSet::from([victim.clone()]),
        ..Default::default()
    };
    let mut some = graph::load(&src).unwrap();
    assert_eq!(
        dynamic::quantize_dynamic(&mut some, &options).unwrap(),
        n - 1
    );
    let kept = some
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .find(|x| x.name == victim)
        .unwrap();
    assert!(
        matches!(kept.op_type.as_str(), "MatMul" | "Gemm"),
        "{victim} stayed {}",
        kept.op_type
    );
    let options = dynamic::DynamicOptions {
        exclude_ops: HashSet::from(["MatMul".into(), "Gemm".into()]),
        ..Default::default()
    };
    let err = dynamic::quantize_dynamic(&mut graph::load(&src).unwrap(), &options).unwrap_err();
    assert!(matches!(err, QuantizeError::NothingToDo(_)), "{err}");
}

#[test]
fn fp16_weights_halve_a_cnn_without_losing_accuracy() {
    let src = fetched("models/ppocr_cls/model.onnx");
    let dst = out("cls-fp16.onnx");
    let mut model = graph::load(&src).unwrap();
    assert!(fp16::convert_fp16(&mut model, &HashSet::new()).unwrap() > 50);
    graph::save(&model, &dst).unwrap();
    let d = dims(&[("x_d2", 48), ("x_d3", 192)]);
    let eval = report::random_eval_inputs(&src, 8, 1000, &d).unwrap();
    let r = report::evaluate(&src, &dst, &eval, 1, 3).unwrap();
    assert!(r.size_ratio < 0.6, "size ratio {}", r.size_ratio);
    assert!(
        r.outputs[0].cosine >= 0.9999 && r.outputs[0].top1_agreement == 1.0,
        "{:?}",
        r.outputs[0]
    );
    assert!(ort_cosine(&src, &dst, &[("x_d2", 48), ("x_d3", 192)]) >= 0.9999);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let garbage = out("garbage.onnx");
    std::fs::write(&garbage, b"definitely not onnx").unwrap();
    assert!(matches!(
        graph::load(&garbage),
        Err(QuantizeError::InvalidModel(_))
    ));
    assert!(matches!(
        graph::load(Path::new("/nonexistent.onnx")),
        Err(QuantizeError::Io { .. })
    ));
    // A CNN has no MatMul with a 2-D constant weight to quantize dynamically... except its
    // classifier head; a model of only convolutions has none at all.
    let det = fetched("models/ppocr_det/model.onnx");
    let err = dynamic::quantize_dynamic(&mut graph::load(&det).unwrap(), &Default::default())
        .unwrap_err();
    assert!(matches!(err, QuantizeError::NothingToDo(_)), "{err}");
    let q = fetched("models/ppocr_cls_int8_qdq/model.onnx");
    let err =
        dynamic::quantize_dynamic(&mut graph::load(&q).unwrap(), &Default::default()).unwrap_err();
    assert!(matches!(err, QuantizeError::AlreadyQuantized(_)), "{err}");
}

#[test]
fn static_qdq_calibrated_through_tern_shrinks_a_transformer_and_a_cnn() {
    use tern_quantize::static_qdq;
    for (name, d, max_ratio, min_cosine) in [
        (
            "ppocr_rec",
            &[("x_d2", 48usize), ("p2o.DynamicDimension.1", 160)][..],
            0.3,
            0.97,
        ),
        ("ppocr_cls", &[("x_d2", 48), ("x_d3", 192)][..], 0.45, 0.99),
    ] {
        let src = fetched(&format!("models/{name}/model.onnx"));
        let dst = out(&format!("{name}-qdq.onnx"));
        let d = dims(d);
        let calib = report::random_eval_inputs(&src, 8, 0, &d).unwrap();
        let mut model = graph::load(&src).unwrap();
        let options = static_qdq::StaticOptions::default();
        let ranges = static_qdq::calibrate(&model, &calib, &options).unwrap();
        assert!(ranges.values().all(|(lo, hi)| lo <= hi), "{name}: ranges");
        assert!(static_qdq::quantize_static(&mut model, &ranges, &options).unwrap() > 10);
        graph::save(&model, &dst).unwrap();
        let eval = report::random_eval_inputs(&src, 8, 500, &d).unwrap();
        let r = report::evaluate(&src, &dst, &eval, 1, 2).unwrap();
        assert!(
            r.size_ratio <= max_ratio,
            "{name}: size ratio {}",
            r.size_ratio
        );
        assert!(
            r.outputs[0].cosine >= min_cosine,
            "{name}: cosine {}",
            r.outputs[0].cosine
        );
        let pairs: Vec<(&str, usize)> = d.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert!(
            ort_cosine(&src, &dst, &pairs) >= 0.9,
            "{name}: onnxruntime disagrees"
        );
    }
}

#[test]
fn static_qdq_needs_calibration_data() {
    use tern_quantize::static_qdq;
    let model = graph::load(&fetched("models/ppocr_cls/model.onnx")).unwrap();
    let err = static_qdq::calibrate(&model, &[], &Default::default()).unwrap_err();
    assert!(matches!(err, QuantizeError::NothingToDo(_)), "{err}");
    let (scale, zp) = static_qdq::activation_params(-1.0, 3.0);
    assert!(
        (scale - 4.0 / 255.0).abs() < 1e-7 && zp == 64,
        "{scale} {zp}"
    );
}
