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
