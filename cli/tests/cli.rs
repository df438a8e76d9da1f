//! The `tern` binary end to end: each command's output, `--json`, and failing cleanly (exit
//! code 1, a typed error kind) on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .expect("run tern")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn magika() -> String {
    root()
        .join("models/magika/model.onnx")
        .display()
        .to_string()
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tern-cli-{}-{name}", std::process::id()))
}

/// A `.npy` file of int32 values, shape [1, N].
fn npy_i32(path: &Path, values: &[i32]) {
    let tensor = tern::Tensor::from_slice(&[1, values.len()], values).unwrap();
    std::fs::write(path, tensor.to_npy().unwrap()).unwrap();
}

#[test]
fn identify_names_content_types() {
    let rs = root().join("core/src/lib.rs");
    let toml = root().join("Cargo.toml");
    let out = tern(&[
        "identify",
        "--json",
        rs.to_str().unwrap(),
        toml.to_str().unwrap(),
        &magika(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let labels: Vec<String> = json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["label"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(labels, ["rust", "toml", "onnx"]);
}

#[test]
fn inspect_reports_interface_and_operators() {
    let out = tern(&["inspect", "--json", &magika()]);
    assert!(out.status.success());
    let info = json(&out);
    assert_eq!(info["inputs"][0]["name"], "bytes");
    assert_eq!(info["inputs"][0]["shape"][1], 2048);
    assert_eq!(info["op_histogram"]["Conv"], 1);
    let human = String::from_utf8(tern(&["inspect", &magika()]).stdout).unwrap();
    assert!(
        human.contains("unk__214, 2048") && human.contains("tf2onnx"),
        "{human}"
    );
}

#[test]
fn run_reads_npy_and_writes_json_outputs() {
    let input = temp("run-input.npy");
    npy_i32(&input, &(0..2048).map(|i| i % 256).collect::<Vec<_>>());
    let output = temp("run-output.json");
    let out = tern(&[
        "run",
        &magika(),
        "--input",
        &format!("bytes={}", input.display()),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    let probs: Vec<f64> = doc["outputs"]["target_label"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(probs.len(), 214);
    assert!(
        (probs.iter().sum::<f64>() - 1.0).abs() < 1e-3,
        "softmax sums to 1"
    );
}

/// `--pin` fixes the random inputs' shape too (they were built with every symbolic size
/// 1, which the pinned session refused).
#[test]
fn bench_with_a_pinned_shape_makes_inputs_of_that_shape() {
    let out = tern(&[
        "bench",
        "--json",
        &magika(),
        "--pin",
        "bytes=3,2048",
        "--runs",
        "2",
        "--warmup",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        json(&out)["input_shapes"]["bytes"],
        serde_json::json!([3, 2048])
    );
}

#[test]
fn bench_reports_latency_and_memory() {
    let out = tern(&["bench", "--json", &magika(), "--runs", "3", "--warmup", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out);
    assert_eq!(r["runs"], 3);
    for key in [
        "load_ms",
        "cold_start_ms",
        "median_ms",
        "p95_ms",
        "p99_ms",
        "peak_rss_mib",
    ] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(r["cold_start_ms"].as_f64().unwrap() >= r["load_ms"].as_f64().unwrap());
}

#[test]
fn baseline_is_written_into_the_model() {
    let (a, b) = (temp("base-a.npy"), temp("base-b.npy"));
    npy_i32(&a, &(0..2048).map(|i| i % 97).collect::<Vec<_>>());
    npy_i32(&b, &(0..2048).map(|i| (i * 7) % 256).collect::<Vec<_>>());
    let output = temp("with-baseline.onnx");
    let out = tern(&[
        "baseline",
        "--json",
        &magika(),
        "--input",
        &format!("bytes={}", a.display()),
        "--input",
        &format!("bytes={}", b.display()),
        "--watch",
        "bytes",
        "--watch",
        "target_label:-1",
        "-o",
        output.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json(&out)["samples"], 2);
    let model = tern::Model::load(&output).unwrap();
    let baseline = model.baseline().expect("baseline stored");
    assert_eq!(baseline.tensors.len(), 2);
    assert_eq!(
        baseline.tensors[1].proportions.len(),
        214,
        "per-feature rows for the output"
    );
}

#[test]
fn errors_exit_nonzero_with_a_typed_kind() {
    let missing = tern(&["inspect", "--json", "/nonexistent/model.onnx"]);
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(json(&missing)["error"]["kind"], "io");
    let junk = temp("junk.onnx");
    std::fs::write(&junk, b"junk").unwrap();
    assert_eq!(
        json(&tern(&["inspect", "--json", junk.to_str().unwrap()]))["error"]["kind"],
        "invalid_model"
    );
    let input = temp("short.npy");
    npy_i32(&input, &[1, 2, 3]);
    let bad = tern(&[
        "run",
        "--json",
        &magika(),
        "--input",
        &format!("bytes={}", input.display()),
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(json(&bad)["error"]["kind"], "shape_mismatch");
    let human = tern(&[
        "run",
        &magika(),
        "--input",
        &format!("bytes={}", input.display()),
    ]);
    assert!(String::from_utf8_lossy(&human.stderr)
        .starts_with("error: input \"bytes\" must have shape"));
}

#[test]
fn bad_options_are_invalid_option_errors_like_any_other() {
    // Each used to exit 2 with clap's text, even under --json.
    for args in [
        &["--backend", "foo"][..],
        &["--gpu-precision", "f8"],
        &["--thread-policy", "bogus"],
        &["--shape-policy", "sometimes"],
        &["--nan-policy", "maybe"],
        &["--threads", "-1"],
    ] {
        let mut all = vec!["run", "--json", "model.onnx"];
        all.extend_from_slice(args);
        let out = tern(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let doc = json(&out);
        assert_eq!(doc["error"]["kind"], "invalid_option", "{args:?}");
        assert!(!doc["error"]["message"].as_str().unwrap().is_empty());
        let human = tern(
            &all[..1]
                .iter()
                .chain(&all[2..])
                .copied()
                .collect::<Vec<_>>(),
        );
        assert_eq!(human.status.code(), Some(1), "{args:?}");
        assert!(String::from_utf8_lossy(&human.stderr).contains("error:"));
    }
    assert_eq!(tern(&["--help"]).status.code(), Some(0));
}

/// `tern jobs`: submit (idempotent with a key), run, status, take (once), typed errors.
#[test]
fn jobs_are_queued_run_and_collected() {
    let dir = temp("jobs");
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.display().to_string();
    let input = temp("jobs-input.npy");
    npy_i32(&input, &[0; 2048]);
    let input = format!("bytes={}", input.display());
    let submit = |key: &str| {
        json(&tern(&[
            "jobs",
            "--dir",
            &d,
            "submit",
            &magika(),
            "-i",
            &input,
            "--key",
            key,
            "--json",
        ]))
    };
    assert_eq!(submit("zeros.1")["id"], "zeros.1");
    assert_eq!(submit("zeros.1")["id"], "zeros.1", "a key is one job");
    let status = json(&tern(&["jobs", "--dir", &d, "status", "zeros.1", "--json"]));
    assert_eq!(status["status"], "pending");
    let ran = json(&tern(&["jobs", "--dir", &d, "run", "--json"]));
    assert_eq!(
        (ran["succeeded"].as_u64(), ran["pending"].as_u64()),
        (Some(1), Some(0)),
        "{ran}"
    );
    let took = json(&tern(&["jobs", "--dir", &d, "take", "zeros.1", "--json"]));
    assert_eq!(took["status"], "done");
    assert_eq!(
        took["outputs"]["target_label"]["shape"],
        serde_json::json!([1, 214])
    );
    let again = tern(&["jobs", "--dir", &d, "take", "zeros.1", "--json"]);
    assert_eq!(again.status.code(), Some(1));
    let bad = tern(&[
        "jobs",
        "--dir",
        &d,
        "submit",
        &magika(),
        "-i",
        &input,
        "--key",
        "a/b",
        "--json",
    ]);
    assert_eq!(json(&bad)["error"]["kind"], "invalid_option");
}

/// `tern stream` over silero VAD and the audio fixture's raw samples: one JSON line per
/// 512-sample chunk, each probability onnxruntime's within 1e-4, then the summary; a state
/// pair the model does not have is a `bad_state` error.
#[test]
fn stream_prints_a_line_per_chunk_like_onnxruntime() {
    let model = tern::fs::fetched("models/silero_vad_lstm/model.onnx").unwrap();
    let samples = tern::fs::fetched("audio/speech.f32").unwrap();
    let reference = tern::Tensor::from_npy(
        &std::fs::read(tern::fs::fetched("audio/speech_probs.npy").unwrap()).unwrap(),
    )
    .unwrap()
    .to_f32_vec()
    .unwrap();
    let (model, samples) = (model.display().to_string(), samples.display().to_string());
    let out = tern(&[
        "stream",
        &model,
        "--chunk",
        "input=512",
        "--context",
        "input=64",
        "--carry",
        "hn=h",
        "--carry",
        "cn=c",
        "--samples",
        &samples,
        "--rate",
        "16000",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (summary, chunks) = lines.split_last().unwrap();
    assert_eq!(chunks.len(), reference.len());
    for (i, (line, want)) in chunks.iter().zip(&reference).enumerate() {
        assert_eq!(line["chunk"], i);
        assert!(
            line["outputs"].get("hn").is_none(),
            "carried state is not printed"
        );
        let p = line["outputs"]["speech_probs"]["data"][0].as_f64().unwrap();
        assert!(
            (p - f64::from(*want)).abs() <= 1e-4,
            "chunk {i}: {p} vs {want}"
        );
    }
    assert_eq!(summary["summary"]["chunks"], reference.len());
    assert!(summary["summary"]["real_time_factor"].as_f64().unwrap() > 0.0);
    let bad = tern(&[
        "stream",
        &model,
        "--chunk",
        "input=512",
        "--carry",
        "hn=nope",
        "--samples",
        &samples,
        "--json",
    ]);
    assert_eq!(json(&bad)["error"]["kind"], "bad_state");
}

/// `tern bench --callers`: a row per caller count, batched runs carrying several requests.
#[test]
fn bench_callers_compares_unbatched_and_batched() {
    let out = tern(&[
        "bench",
        &magika(),
        "--callers",
        "1,4",
        "--runs",
        "5",
        "--warmup",
        "1",
        "--max-wait-ms",
        "5",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&out);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert!(row["unbatched"]["requests_per_s"].as_f64().unwrap() > 0.0);
        assert!(row["batched"]["p99_ms"].as_f64().unwrap() > 0.0);
    }
    assert!(rows[1]["mean_batch"].as_f64().unwrap() >= 1.0, "{report}");
}

/// `tern flow`: a cascade of magika before itself, a fan-out vote and a cached pipeline
/// from one flow file answer what `tern run` answers; a bad file is a `bad_flow` error.
#[test]
fn flow_runs_a_flow_file() {
    let dir = temp("flow");
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("bytes.npy");
    npy_i32(
        &input,
        &(0..2048).map(|i| (i * 7) % 256).collect::<Vec<_>>(),
    );
    let file = dir.join("flows.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[sessions.magika]
model = "{model}"
[sessions.magika2]
model = "{model}"
[caches.c]
max_bytes = 100000
[steps.small]
session = "magika"
cache = "c"
[steps.big]
session = "magika2"
[flows.cascade]
cascade = [
  {{ step = "small", exit = {{ output = "target_label", confidence = "max_probability", threshold = 1.5 }} }},
  {{ step = "big" }},
]
[flows.vote]
fan_out = [{{ step = "small" }}, {{ step = "big" }}]
merge = {{ vote = "target_label" }}
deadline_ms = 10000
"#,
            model = magika()
        ),
    )
    .unwrap();
    let reference = json(&tern(&[
        "run",
        "--json",
        &magika(),
        "--input",
        &format!("bytes={}", input.display()),
    ]));
    let flow = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "flow",
            "--json",
            file.to_str().unwrap(),
            "--flow",
            name,
            "--input",
        ];
        let spec = format!("bytes={}", input.display());
        args.push(&spec);
        args.extend_from_slice(extra);
        let out = tern(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        json(&out)
    };
    let c = flow("cascade", &["--repeat", "3"]);
    assert_eq!(c["outputs"], reference["outputs"]);
    assert_eq!(c["stage"], 1, "a threshold above 1 never exits early");
    assert_eq!(c["answered"][0]["step"], "big");
    assert_eq!(c["runs"], 3);
    assert_eq!(
        c["caches"]["c"]["hits"], 2,
        "the cheap step's cache answers runs 2 and 3"
    );
    assert_eq!(c["steps"]["big"]["ok"], 3);
    let v = flow("vote", &[]);
    assert_eq!(v["outputs"], reference["outputs"]);
    assert_eq!(v["missing"], serde_json::json!([]));

    std::fs::write(&file, "[flows.f]\npipeline = [\"nope\"]\n").unwrap();
    let bad = tern(&["flow", "--json", file.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(json(&bad)["error"]["kind"], "bad_flow");
    assert!(json(&bad)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("\"nope\""));
}

#[test]
fn bundles_are_created_signed_verified_and_refused_when_tampered() {
    let dir = temp("bundle");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, bundle) = (dir.join("release.key"), dir.join("magika.tern"));
    let (key_s, bundle_s) = (key.to_str().unwrap(), bundle.to_str().unwrap());
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(dir.join("release.key.pub"));
    let made = json(&tern(&["bundle", "keygen", "--json", "--out", key_s]));
    assert_eq!(made["key_id"].as_str().unwrap().len(), 64);
    let public = format!("{key_s}.pub");
    // keygen never overwrites a key.
    assert_eq!(
        tern(&["bundle", "keygen", "--out", key_s]).status.code(),
        Some(1)
    );

    let sample = dir.join("sample.npy");
    npy_i32(&sample, &vec![7; 2048]);
    let created = tern(&[
        "bundle",
        "create",
        &magika(),
        "--json",
        "--name",
        "magika",
        "--version",
        "5",
        "--out",
        bundle_s,
        "--sample",
        &format!("bytes={}", sample.display()),
        "--licence",
        "Apache-2.0",
    ]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    assert_eq!(json(&created)["signed_by"].as_array().unwrap().len(), 0);
    // Unsigned: refused by a device.
    let unsigned = tern(&["bundle", "verify", "--json", bundle_s, "--trust", &public]);
    assert_eq!(json(&unsigned)["error"]["kind"], "signature");

    let signed = json(&tern(&[
        "bundle", "sign", "--json", bundle_s, "--key", key_s,
    ]));
    assert_eq!(signed["signed_by"][0], made["key_id"]);
    let verified = tern(&[
        "bundle",
        "verify",
        "--json",
        bundle_s,
        "--trust",
        &public,
        "--golden",
        "--backend",
        "cpu",
    ]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    let verified = json(&verified);
    assert_eq!(verified["verified"], true);
    assert_eq!(verified["golden"]["samples"], 1);
    assert_eq!(verified["manifest"]["version"], 5);
    assert_eq!(verified["manifest"]["licence"], "Apache-2.0");
    let human = tern(&["bundle", "inspect", bundle_s]);
    assert!(String::from_utf8_lossy(&human.stdout).starts_with("magika version 5"));

    let rollback = tern(&[
        "bundle",
        "verify",
        "--json",
        bundle_s,
        "--trust",
        &public,
        "--installed-version",
        "6",
    ]);
    assert_eq!(json(&rollback)["error"]["kind"], "rollback");
    // One flipped byte in the model (the archive's last entry ends 1024 bytes of zeros and
    // padding before the end; the model is the largest entry, so its middle is the file's).
    let mut bytes = std::fs::read(&bundle).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    let tampered = dir.join("tampered.tern");
    std::fs::write(&tampered, bytes).unwrap();
    let refused = tern(&[
        "bundle",
        "verify",
        "--json",
        tampered.to_str().unwrap(),
        "--trust",
        &public,
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(json(&refused)["error"]["kind"], "file_mismatch");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A trust key pair on disk and signed magika bundles of the given versions, built with the
/// library (golden outputs computed once).
fn store_fixture(dir: &Path, versions: std::ops::RangeInclusive<u64>) -> (PathBuf, Vec<PathBuf>) {
    use tern_bundle::{create, create_with_outputs, BundleSpec, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let key = KeyPair::generate().unwrap();
    let public = dir.join("trust.pub");
    std::fs::write(
        &public,
        serde_json::to_vec(&key.public().to_json()).unwrap(),
    )
    .unwrap();
    let model = std::fs::read(magika()).unwrap();
    let inputs = vec![(
        "bytes".to_string(),
        tern::Tensor::from_vec(&[1, 2048], vec![7i32; 2048]).unwrap(),
    )];
    let options = tern::SessionOptions::new().backend(tern::Backend::Cpu);
    let first = create(
        model.clone(),
        &BundleSpec::new("magika", 0),
        std::slice::from_ref(&inputs),
        options,
    )
    .unwrap();
    let sample = &first.manifest().golden[0];
    let outputs: std::collections::BTreeMap<String, tern::Tensor> = sample
        .outputs
        .iter()
        .map(|(name, path)| (name.clone(), first.tensor(path).unwrap()))
        .collect();
    let bundles = versions
        .map(|v| {
            let spec = BundleSpec::new("magika", v);
            let mut b =
                create_with_outputs(model.clone(), &spec, &[(inputs.clone(), outputs.clone())])
                    .unwrap();
            b.sign(&key).unwrap();
            let path = dir.join(format!("magika-{v}.tern"));
            b.write(&path).unwrap();
            path
        })
        .collect();
    (public, bundles)
}

fn store_args<'a>(dir: &'a str, public: &'a str) -> Vec<&'a str> {
    vec!["store", "--json", "--dir", dir, "--trust", public]
}

/// The store as a fresh process sees it: every version it lists is on disk and nothing
/// else is, and the active version loads and verifies.
fn check_store(dir: &Path, public: &Path) -> tern_bundle::ModelState {
    let trust =
        tern_bundle::Trust::new([tern_bundle::PublicKey::read(public).unwrap()], 1).unwrap();
    let store = tern_bundle::ModelStore::open(dir, trust, Default::default()).unwrap();
    let state = store.status().unwrap().remove("magika").unwrap();
    let mut files: Vec<String> = std::fs::read_dir(dir.join("bundles/magika"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    files.sort_by_key(|f| {
        f.trim_end_matches(".tern")
            .parse::<u64>()
            .unwrap_or(u64::MAX)
    });
    let listed: Vec<String> = state
        .installed
        .iter()
        .map(|v| format!("{v}.tern"))
        .collect();
    assert_eq!(files, listed, "{state:?}");
    let (version, bundle) = store.active("magika").unwrap();
    assert_eq!(Some(version), state.active);
    assert_eq!(bundle.manifest().version, version);
    state
}

#[test]
fn a_store_killed_anywhere_in_an_install_keeps_a_loadable_active_model() {
    let dir = temp("store-kill");
    let _ = std::fs::remove_dir_all(&dir);
    let (public, bundles) = store_fixture(&dir.join("in"), 1..=21);
    let store = dir.join("store");
    let (d, p) = (store.to_str().unwrap(), public.to_str().unwrap());
    let install = |bundle: &Path| {
        let mut args = store_args(d, p);
        args.extend([
            "install",
            bundle.to_str().unwrap(),
            "--activate",
            "--backend",
            "cpu",
        ]);
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // One whole install, timed: the kills below are spread over that time.
    let start = std::time::Instant::now();
    assert!(install(&bundles[0]).wait().unwrap().success());
    let whole = start.elapsed();
    assert_eq!(check_store(&store, &public).active, Some(1));

    let (mut completed, mut interrupted) = (0, 0);
    for (i, bundle) in bundles[1..].iter().enumerate() {
        let before = check_store(&store, &public);
        let mut child = install(bundle);
        std::thread::sleep(whole.mul_f64(1.2 * i as f64 / 20.0));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        let after = check_store(&store, &public);
        let version = i as u64 + 2;
        if status.success() {
            completed += 1;
            assert_eq!(after.active, Some(version));
        } else {
            interrupted += 1;
            // Killed: the old version or (if the kill came after the switch) the new one.
            assert!(
                after.active == before.active || after.active == Some(version),
                "{after:?}"
            );
        }
        assert!(after.installed.len() <= 3);
    }
    eprintln!("{interrupted} installs killed, {completed} completed");
    assert!(
        interrupted >= 5,
        "the kills must land inside installs ({interrupted})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_version_killed_twice_while_loading_is_quarantined_and_the_previous_one_serves() {
    let dir = temp("store-crash-loop");
    let _ = std::fs::remove_dir_all(&dir);
    let (public, bundles) = store_fixture(&dir.join("in"), 1..=2);
    let store = dir.join("store");
    let (d, p) = (store.to_str().unwrap(), public.to_str().unwrap());
    for bundle in &bundles {
        let mut args = store_args(d, p);
        args.extend(["install", bundle.to_str().unwrap(), "--activate"]);
        assert!(tern(&args).status.success());
    }
    let mut load = store_args(d, p);
    load.extend(["load", "magika", "--backend", "cpu"]);

    // Kill `tern store load` as soon as its breadcrumb is in the state file, with the
    // crash it found counted (so a breadcrumb a killed process left is not taken for the
    // new one's): a process dying while the model loads. A load can finish before it is
    // seen (the count starts again); then once more.
    let state = store.join("state.json");
    let breadcrumb = || {
        let text = std::fs::read(&state).unwrap_or_default();
        let doc: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
        let m = &doc["models"]["magika"];
        (m["loading"] == 2, m["crashes"]["2"].as_u64().unwrap_or(0))
    };
    let mut kills = 0;
    for _ in 0..50 {
        let (loading, crashes) = breadcrumb();
        if loading && crashes == 1 {
            break; // two deaths in a row: the next load quarantines
        }
        let expected = (true, crashes + u64::from(loading));
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(&load)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        loop {
            if breadcrumb() == expected {
                let _ = child.kill(); // SIGKILL
                kills += u32::from(!child.wait().unwrap().success());
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success());
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
    assert_eq!(
        breadcrumb(),
        (true, 1),
        "two loads in a row must be killed mid-load"
    );
    eprintln!("{kills} loads killed");

    let out = tern(&load);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let doc = json(&out);
    assert_eq!(doc["loaded"]["version"], 1, "{doc}");
    let events: Vec<&str> = doc["loaded"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        ["crash_detected", "quarantined", "rolled_back"],
        "{doc}"
    );
    assert_eq!(
        doc["models"]["magika"]["quarantined"],
        serde_json::json!({"2": {"crashes": 2, "why": "crash_loop"}})
    );
    let mut activate = store_args(d, p);
    activate.extend(["activate", "magika", "2"]);
    let out = tern(&activate);
    assert_eq!(json(&out)["error"]["kind"], "quarantined");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_staged_candidate_is_rolled_out_in_shadow_and_promoted() {
    let dir = temp("store-rollout");
    let _ = std::fs::remove_dir_all(&dir);
    let (public, bundles) = store_fixture(&dir.join("in"), 1..=2);
    let store = dir.join("store");
    let (d, p) = (store.to_str().unwrap(), public.to_str().unwrap());
    let run = |extra: &[&str]| {
        let mut args = store_args(d, p);
        args.extend(extra);
        let out = tern(&args);
        (out.status.code(), json(&out))
    };
    let (b1, b2) = (bundles[0].to_str().unwrap(), bundles[1].to_str().unwrap());
    assert_eq!(run(&["install", b1, "--activate"]).0, Some(0));
    assert_eq!(run(&["install", b2]).0, Some(0));
    let (code, doc) = run(&["stage", "magika", "1"]);
    assert_eq!(
        (code, doc["error"]["kind"].as_str()),
        (Some(1), Some("invalid_option"))
    );
    let (code, doc) = run(&["rollout", "magika"]);
    assert_eq!(
        (code, doc["error"]["kind"].as_str()),
        (Some(1), Some("not_installed"))
    );
    assert_eq!(run(&["stage", "magika", "2"]).0, Some(0));

    let (code, doc) = run(&[
        "rollout",
        "magika",
        "--stage",
        "shadow",
        "--share",
        "0.5",
        "--requests",
        "60",
        "--min-requests",
        "10",
        "--promote-after",
        "20",
        "--max-p95-ratio",
        "1000",
    ]);
    assert_eq!(code, Some(0), "{doc}");
    let r = &doc["rollout"];
    assert_eq!(r["verdict"]["verdict"], "promote", "{doc}");
    assert_eq!(r["served"]["active v1"], 40, "{doc}");
    assert_eq!(r["served"]["candidate v2"], 20, "{doc}");
    assert_eq!(
        (
            r["health"]["compared"].as_u64(),
            r["health"]["agreed"].as_u64()
        ),
        (Some(20), Some(20))
    );
    assert_eq!(r["events"][0]["verdict"]["verdict"], "promote");
    let m = &doc["models"]["magika"];
    assert_eq!(
        (m["active"].as_u64(), m["previous"].as_u64()),
        (Some(2), Some(1)),
        "{doc}"
    );
    assert!(m.get("candidate").is_none(), "{doc}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_full_disk_during_an_install_is_an_io_error_and_changes_nothing() {
    let dir = temp("store-full");
    let _ = std::fs::remove_dir_all(&dir);
    let (public, bundles) = store_fixture(&dir.join("in"), 1..=2);
    let store = dir.join("store");
    let (d, p) = (store.to_str().unwrap(), public.to_str().unwrap());
    let mut args = store_args(d, p);
    args.extend(["install", bundles[0].to_str().unwrap(), "--activate"]);
    assert!(tern(&args).status.success());
    let before = check_store(&store, &public);

    // Writes past 1 MB fail with EFBIG (the bundle is about 3 MB).
    let mut args = store_args(d, p);
    args.extend(["install", bundles[1].to_str().unwrap(), "--activate"]);
    let out = Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 2048 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_tern"))
        .args(&args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        json(&out)["error"]["kind"],
        "io",
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(check_store(&store, &public), before);
    assert!(!std::fs::read_dir(store.join("bundles/magika"))
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".tmp")));
    // With room again, the same install goes through.
    assert!(tern(&args).status.success());
    assert_eq!(check_store(&store, &public).active, Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}
