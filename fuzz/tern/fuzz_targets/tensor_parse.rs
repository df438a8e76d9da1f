//! The tensor and baseline parsers on any bytes: `.npy`, ONNX `TensorProto`, JSON tensors
//! and drift baselines give a value or a typed error, never a crash. A tensor that parses
//! survives the trip to JSON and back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::baseline::Baseline;
use tern::Tensor;

fuzz_target!(|data: &[u8]| {
    let _ = Tensor::from_npy(data);
    let _ = Tensor::from_onnx_proto(data);
    if let Ok(t) = Tensor::from_json(data) {
        let json = t.to_json().expect("a parsed tensor converts back");
        let bytes = serde_json::to_vec(&json).expect("JSON");
        // Floats may lose NaN/inf on the way (JSON has no such numbers): only the shape
        // and type must come back.
        if let Ok(back) = Tensor::from_json(&bytes) {
            assert_eq!(back.shape(), t.shape());
            assert_eq!(back.dtype(), t.dtype());
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Baseline::from_json(text);
    }
});
