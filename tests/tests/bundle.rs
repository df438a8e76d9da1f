//! Golden samples against onnxruntime: a bundle whose golden outputs are onnxruntime's
//! passes its golden check on tern's CPU backend within the model's stated tolerance, and
//! the goldens tern records itself agree with onnxruntime's outputs for the same inputs.

use std::collections::BTreeMap;

use tern::{Session, SessionOptions, Tensor};
use tern_bundle::{create, create_with_outputs, BundleSpec};
use tern_tests::{model_manifest, read_npy};

#[test]
fn golden_samples_from_onnxruntime_pass_on_tern_and_tern_goldens_match_onnxruntime() {
    let manifest = model_manifest();
    let mut checked = 0;
    for name in ["ppocr_cls", "ppocr_cls_int8_qdq", "magika"] {
        let entry = manifest.iter().find(|m| m.name == name).expect(name);
        let model_bytes = std::fs::read(entry.dir().join("model.onnx")).unwrap();
        let inputs = entry.reference_inputs();
        let reference: BTreeMap<String, Tensor> = entry
            .outputs
            .iter()
            .zip(&entry.output_files)
            .map(|(o, f)| (o.clone(), read_npy(&entry.dir().join("ref").join(f))))
            .collect();
        let spec = BundleSpec::new(name, 1).tolerance(entry.atol, entry.rtol);
        let cpu = SessionOptions::new().backend(tern::Backend::Cpu);

        let theirs = create_with_outputs(
            model_bytes.clone(),
            &spec,
            &[(inputs.clone(), reference.clone())],
        )
        .unwrap();
        let session = Session::new(&theirs.model().unwrap(), cpu.clone()).unwrap();
        let report = theirs
            .check_golden(&session)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.outputs.len(), reference.len());
        eprintln!(
            "{name}: onnxruntime goldens pass at {:.3} of the tolerance",
            report.worst_share()
        );

        let ours = create(model_bytes, &spec, &[inputs], cpu).unwrap();
        let sample = &ours.manifest().golden[0];
        for (output, want) in &reference {
            let got = ours.tensor(&sample.outputs[output]).unwrap();
            tern::tensor::compare_close(&got, want, entry.atol, entry.rtol)
                .unwrap_or_else(|e| panic!("{name} {output}: tern's golden vs onnxruntime: {e}"));
        }
        checked += 1;
    }
    assert_eq!(checked, 3);
}

/// A model onnx saved with its weights in an external data file loads from the file (tract
/// reads the data next to it), from its files in memory ([`ModelFiles`]) and from a signed
/// bundle, and computes what onnxruntime computes for the model saved whole; without its
/// data, or with data too short or out of its directory, it is a typed `invalid_model`.
#[test]
fn a_model_with_external_data_runs_from_a_file_from_memory_and_from_a_bundle() {
    use tern::onnx::{decode, encode};
    use tern::{Model, ModelFiles};

    let manifest = model_manifest();
    let entry = manifest.iter().find(|m| m.name == "ppocr_cls").unwrap();
    let dir = std::env::temp_dir().join(format!("tern-external-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.onnx");
    // onnx's own writer: every tensor of 256 bytes or more (attribute values too) into
    // weights.bin, at the offsets and lengths onnx chooses.
    // (Its weights are Constant nodes' float_data, which onnx only moves out as raw_data.)
    let script = "import onnx, sys\n\
        from onnx import numpy_helper as nh, external_data_helper as xd\n\
        m = onnx.load(sys.argv[1])\n\
        for t in xd._get_all_tensors(m): t.CopyFrom(nh.from_array(nh.to_array(t), t.name))\n\
        xd.convert_model_to_external_data(m, True, 'weights.bin', 256, True)\n\
        onnx.save_model(m, sys.argv[2])\n";
    let out = std::process::Command::new(tern_tests::python())
        .args(["-c", script])
        .arg(entry.dir().join("model.onnx"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let files = ModelFiles::read(&path, 1 << 30).unwrap();
    assert_eq!(files.data.keys().collect::<Vec<_>>(), ["weights.bin"]);
    let whole = std::fs::metadata(entry.dir().join("model.onnx"))
        .unwrap()
        .len() as usize;
    assert!(
        files.model.len() * 4 < whole,
        "{} of {whole} bytes",
        files.model.len()
    );
    let run = |model: &Model| {
        let cpu = SessionOptions::new().backend(tern::Backend::Cpu);
        Session::new(model, cpu)
            .unwrap()
            .run(entry.reference_inputs())
            .unwrap()
    };
    let from_file = run(&Model::load(&path).unwrap());
    let diff = entry.compare_with_reference(&from_file).unwrap();
    eprintln!("external data from the file: {diff:?} against onnxruntime");
    let from_memory = run(&files.load().unwrap());
    for output in &entry.outputs {
        let npy = |o: &tern::Outputs| o.get(output).unwrap().to_npy().unwrap();
        assert!(npy(&from_memory) == npy(&from_file), "{output} differs");
    }

    // A bundle carries weights.bin beside the model; its golden check passes.
    let spec = BundleSpec::new("ppocr_cls", 1).tolerance(entry.atol, entry.rtol);
    let cpu = SessionOptions::new().backend(tern::Backend::Cpu);
    let bundle = create(
        files.clone(),
        &spec,
        &[entry.reference_inputs()],
        cpu.clone(),
    )
    .unwrap();
    assert!(bundle.manifest().files.contains_key("weights.bin"));
    let bytes = bundle.to_bytes().unwrap();
    let read =
        tern_bundle::Bundle::from_reader(&bytes[..], &tern_bundle::VerifyOptions::unchecked())
            .unwrap();
    let session = Session::new(&read.model().unwrap(), cpu).unwrap();
    read.check_golden(&session).unwrap();

    // Without its data, with it cut short, with a location out of the model's directory.
    let invalid = |result: tern::Result<Model>, needle: &str| {
        let Err(err) = result else {
            panic!("{needle}: the model loaded")
        };
        assert_eq!(err.kind(), "invalid_model", "{err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    };
    invalid(Model::from_bytes(&files.model), "weights.bin");
    let mut short = files.clone();
    let data = short.data.get_mut("weights.bin").unwrap();
    data.truncate(data.len() / 2);
    invalid(short.load(), "past the end");
    let mut proto = decode(&files.model).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let constants = graph.node.iter_mut().flat_map(|n| &mut n.attribute);
    let tensors = graph
        .initializer
        .iter_mut()
        .chain(constants.filter_map(|a| a.t.as_mut()));
    for t in tensors {
        for e in &mut t.external_data {
            if e.key == "location" {
                e.value = "../weights.bin".into();
            }
        }
    }
    let escaping = ModelFiles {
        model: encode(&proto),
        data: BTreeMap::from([(
            "../weights.bin".to_string(),
            files.data["weights.bin"].clone(),
        )]),
    };
    invalid(escaping.load(), "not a relative path inside");
    let _ = std::fs::remove_dir_all(&dir);
}
