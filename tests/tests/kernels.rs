//! tern's own kernels inside real plans, held to onnxruntime: the rewrite takes over the
//! layers it should, the outputs stay onnxruntime's, and switching the kernels off gives
//! tract's path back.

use tern::{Backend, Session, SessionOptions};
use tern_tests::{model_manifest, ModelEntry};

fn entry(name: &str) -> ModelEntry {
    model_manifest()
        .into_iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("{name} is not in the manifest: run scripts/fetch-models"))
}

fn session(entry: &ModelEntry, tern_kernels: bool) -> Session {
    let options = SessionOptions::new()
        .backend(Backend::Cpu)
        .tern_kernels(tern_kernels)
        .without_telemetry();
    Session::new(&entry.load().unwrap(), options).unwrap()
}

fn kernels(s: &Session) -> Vec<(String, usize)> {
    s.plans().tern_kernels
}

/// Runs `name` with tern's kernels, which must be `expected`, holds it bit-exact to
/// onnxruntime (rounded as MLAS rounds: not one output step apart), then without them
/// (tract's path) within the manifest's tolerance.
fn bit_exact_on_terns_kernels(name: &str, expected: &[(&str, usize)]) {
    let model = entry(name);
    let s = session(&model, true);
    let outputs = s.run(model.reference_inputs()).unwrap();
    let expected: Vec<(String, usize)> =
        expected.iter().map(|(k, n)| (k.to_string(), *n)).collect();
    assert_eq!(kernels(&s), expected);
    let diff = model.compare_with_reference(&outputs).unwrap();
    assert_eq!(diff.max_abs, 0.0, "{diff:?}");

    let s = session(&model, false);
    let outputs = s.run(model.reference_inputs()).unwrap();
    assert!(kernels(&s).is_empty());
    model.compare_with_reference(&outputs).unwrap();
}

#[test]
fn int8_depthwise_layers_run_on_terns_kernel_bit_exact_with_onnxruntime() {
    // Six QLinearConv depthwise layers: strides 1 and 2, a 5x5, dilation 2, asymmetric
    // pads, per-tensor and per-channel scales, a weight zero point.
    bit_exact_on_terns_kernels("qlinear_depthwise", &[("depthwise-q8", 6), ("quant-u8", 2)]);
}

#[test]
fn int8_convolutions_run_on_the_integer_matrix_product_bit_exact_with_onnxruntime() {
    // Six QLinearConv layers with one group on a batch of 2: pointwise, 3x3, stride 2, a
    // dilated 5x5, asymmetric pads; the last has a weight zero point and stays with tract.
    bit_exact_on_terns_kernels("qlinear_conv", &[("conv-q8", 5), ("quant-u8", 2)]);
}

#[test]
fn a_real_quantized_model_keeps_onnxruntimes_numbers_on_terns_kernels() {
    // ppocr_cls in QOperator form (onnxruntime's quantizer): its 11 depthwise layers, and
    // its stem, 23 pointwise layers and the 18 squeeze-excite ones on a 1×1 map (which
    // tract's declutter writes as `NI,OI->NOHW` / `NIHW,OI->NO` products).
    let model = entry("ppocr_cls_int8_qop");
    let s = session(&model, true);
    let outputs = s.run(model.reference_inputs()).unwrap();
    assert_eq!(
        kernels(&s),
        [
            ("depthwise-q8".to_string(), 11),
            ("conv-q8".to_string(), 42),
            ("quant-u8".to_string(), 108),
            ("maxpool".to_string(), 1),
            // Dequantize → HardSwish → quantize between layers, as one table each, 24 of
            // them looked up by the layer before as it writes its rows.
            ("lut-u8".to_string(), 27),
            ("lut-fold".to_string(), 24),
            // The classifier's closing softmax.
            ("softmax".to_string(), 1),
        ]
    );
    model.compare_with_reference(&outputs).unwrap();
}

#[test]
fn a_qdq_model_is_fused_onto_the_integer_kernels_within_its_tolerance() {
    // ppocr_cls as tern-quantize writes it (QDQ): its convolutions become QLinearConv at
    // load where the CPU multiplies bytes natively, then tern's kernels take them.
    let model = entry("ppocr_cls_int8_qdq");
    let s = session(&model, true);
    let outputs = s.run(model.reference_inputs()).unwrap();
    let fused = [
        ("qdq-fusion".to_string(), 53),
        ("depthwise-q8".to_string(), 11),
        ("conv-q8".to_string(), 42),
        ("quant-u8".to_string(), 299),
        // Dequantize → BatchNormalization/activation → quantize chains (quantization-aware
        // training's fake quantization around every float op), as one table each, with
        // HardSwish's `DQ(x) · DQ(lut(x))` too; then a table of a table is one table.
        // The MaxPool on bytes (dequantize and quantize commute with the maximum).
        ("maxpool-u8".to_string(), 1),
        ("maxpool".to_string(), 1),
        ("lut-u8".to_string(), 117),
        ("lut-compose".to_string(), 45),
        // Every table but the one after the MaxPool applied by the layer before it.
        ("lut-fold".to_string(), 53),
        // Residual Adds and squeeze-and-excitation Muls of two quantized tensors, and
        // GlobalAveragePool, on bytes.
        ("binary-u8".to_string(), 16),
        ("mean-u8".to_string(), 10),
        ("softmax".to_string(), 1),
    ];
    // Without native int8 products (VNNI, ARM dot products) tract's float path for QDQ is
    // the faster one, and the model stays unfused (its quantize passes still vectorised).
    let on = kernels(&s);
    assert!(
        on == fused
            || on.iter().all(
                |(pass, _)| !["qdq-fusion", "depthwise-q8", "conv-q8"].contains(&pass.as_str())
            ),
        "{on:?}"
    );
    let diff = model.compare_with_reference(&outputs).unwrap();
    eprintln!("tern kernels {on:?}: {diff:?}");

    let s = session(&model, false);
    let outputs = s.run(model.reference_inputs()).unwrap();
    assert!(kernels(&s).is_empty());
    let diff = model.compare_with_reference(&outputs).unwrap();
    eprintln!("tract: {diff:?}");
}

#[test]
fn float_convolutions_run_on_terns_kernels_within_onnxruntimes_tolerance() {
    // The three fp32 CNNs: every depthwise layer on tern's float depthwise kernel, the 1×1
    // convolutions (and on a batch, the others too) on tract-linalg's f32 product image
    // by image, the bias,
    // BatchNormalization and HardSwish/ReLU after each folded into its epilogue. Held to
    // onnxruntime's reference within the manifest's tolerance (as tract's own path is).
    for (name, expected) in [
        ("ppocr_cls", [11, 42, 44]),
        ("ppocr_det", [14, 42, 42]),
        ("ppocr_rec", [14, 18, 30]),
    ] {
        let model = entry(name);
        let s = session(&model, true);
        let ours = s.run(model.reference_inputs()).unwrap();
        let passes: Vec<(String, usize)> = ["depthwise-f32", "conv-f32", "epilogue"]
            .iter()
            .zip(expected)
            .map(|(k, n)| (k.to_string(), n))
            .collect();
        let (others, convs): (Vec<_>, Vec<_>) = kernels(&s)
            .into_iter()
            .partition(|(k, _)| ["maxpool", "softmax"].contains(&k.as_str()));
        assert_eq!(convs, passes, "{name}");
        // ppocr_cls's 2×2 stride-2 MaxPool on tern's pooling kernel too, and the softmax
        // closing the classifier; the recogniser's attention and closing softmaxes.
        let softmax = |n| ("softmax".to_string(), n);
        match name {
            "ppocr_cls" => assert_eq!(others, [("maxpool".to_string(), 1), softmax(1)]),
            "ppocr_rec" => assert_eq!(others, [softmax(3)]),
            _ => assert!(others.is_empty(), "{others:?}"),
        }
        let diff = model.compare_with_reference(&ours).unwrap();
        let tracts = session(&model, false)
            .run(model.reference_inputs())
            .unwrap();
        let against_tract = model.compare_with_reference(&tracts).unwrap();
        eprintln!("{name}: tern kernels {diff:?}, tract {against_tract:?}");
    }
}

#[test]
fn a_dynamically_quantized_model_quantizes_its_activations_on_terns_kernel() {
    // ppocr_rec as onnxruntime's dynamic quantizer writes it: 9 `DynamicQuantizeLinear`
    // before its 9 `MatMulInteger`s, each the range, scale and bytes of one activation, and
    // the products on the int8 kernel with their `Cast → Mul → Add` folded in (where the
    // kernel reads the K4 layout: VNNI, AMX).
    let model = entry("ppocr_rec_int8_dyn");
    let s = session(&model, true);
    let outputs = s.run(model.reference_inputs()).unwrap();
    let on = kernels(&s);
    assert!(on.contains(&("quant-dynamic".to_string(), 9)), "{on:?}");
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512vnni") {
        assert!(on.contains(&("matmul-q8".to_string(), 9)), "{on:?}");
    }
    let diff = model.compare_with_reference(&outputs).unwrap();
    eprintln!("tern kernels {on:?}: {diff:?}");

    let s = session(&model, false);
    let outputs = s.run(model.reference_inputs()).unwrap();
    assert!(kernels(&s).is_empty());
    model.compare_with_reference(&outputs).unwrap();
}
