//! The `tern-quantize` binary as a user meets it: a JSON report on success, and a one-line
//! `error:` with exit code 1 — never a panic — for bad arguments, files and data.

use std::path::PathBuf;
use std::process::{Command, Output};

/// A fetched model (scripts/fetch-models, run first by the README's test command).
fn model(name: &str) -> PathBuf {
    tern::fs::fetched(&format!("models/{name}/model.onnx")).unwrap_or_else(|e| panic!("{e}"))
}

fn tern_quantize(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern-quantize"))
        .args(args)
        .output()
        .expect("run tern-quantize")
}

fn out(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("tern-quantize-cli-{}-{name}", std::process::id()))
        .to_string_lossy()
        .into_owned()
}

#[test]
fn prune_prints_a_json_report() {
    let (src, dst) = (model("ppocr_cls"), out("slim.onnx"));
    let o = tern_quantize(&[
        "prune",
        src.to_str().unwrap(),
        &dst,
        "--channels",
        "0.25",
        "--dim",
        "x_d2=48",
        "--dim",
        "x_d3=192",
        "--eval",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &v["report"];
    assert!(r["size_ratio"].as_f64().unwrap() < 0.8, "{v}");
    assert_eq!(r["eval_inputs"], 2);
    assert!(v["transformation"]
        .as_str()
        .unwrap()
        .contains("channels removed"));
    assert!(std::path::Path::new(&dst).exists());
}

#[test]
fn bad_input_is_an_error_line_not_a_panic() {
    let src = model("ppocr_cls");
    let src = src.to_str().unwrap();
    let garbage = out("garbage.onnx");
    std::fs::write(&garbage, b"not a model").unwrap();
    let empty_dir = out("no-images");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let images = |preprocess| {
        let calib = ["--calib-images", &empty_dir, "--preprocess", preprocess];
        [&["static", src, "/tmp/x.onnx"][..], &calib].concat()
    };
    let cases: &[(&[&str], &str)] = &[
        (
            &["static", "/nonexistent.onnx", "/tmp/x.onnx"],
            "cannot access",
        ),
        (&["dynamic", &garbage, "/tmp/x.onnx"], "invalid ONNX model"),
        (
            &["static", src, "/tmp/x.onnx", "--dim", "width=3"],
            "no such symbol",
        ),
        (
            &["static", src, "/tmp/x.onnx", "--method", "median"],
            "calibration method",
        ),
        (
            &["static", src, "/tmp/x.onnx", "--calib", "x"],
            "expected NAME=FILE.npy",
        ),
        (&images("size=48x192"), "no .png/.jpg/.jpeg images"),
        (&images("size=48"), "size must be HxW"),
        (
            &["prune", src, "/tmp/x.onnx", "--sparsity", "1.5"],
            "expected a value in [0, 1)",
        ),
    ];
    for (args, wanted) in cases {
        let o = tern_quantize(args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            stderr.contains(wanted),
            "{args:?}: wanted {wanted:?} in {stderr}"
        );
    }
}
