//! The GPU executor on burn's pure-Rust CPU backend (burn-flex, no adapter needed) against
//! tract, and the matmul layout planner against tract's own einsum.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn_flex::{Flex, FlexDevice};
use tract_onnx::prelude::{tract_ndarray, tvec, Datum, IntoTValue, IntoTensor};
use tract_onnx::tract_core::axes::AxesMapping;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_hir::internal::EvalOp;

use super::ops::linear::MatMulPlan;
use super::*;
use crate::options::SessionOptions;

fn cached_model(name: &str) -> PathBuf {
    crate::fs::fetched(&format!("models/{name}/model.onnx")).unwrap_or_else(|e| panic!("{e}"))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// How far apart two outputs are: the largest absolute difference, and whether the
/// largest element of every row of the last axis is at the same place (the class picked).
struct Gap {
    max_abs: f32,
    same_argmax: bool,
}

fn gap(got: &crate::Tensor, want: &crate::Tensor) -> Gap {
    assert_eq!(got.shape(), want.shape());
    let (g, w) = (got.to_f32_vec().unwrap(), want.to_f32_vec().unwrap());
    let row = *want.shape().last().unwrap_or(&1);
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0
    };
    Gap {
        max_abs: max_abs_diff(&g, &w),
        same_argmax: g
            .chunks(row)
            .zip(w.chunks(row))
            .all(|(a, b)| argmax(a) == argmax(b)),
    }
}

/// Runs `model` on Flex through the GPU executor in `precision` and on tract, same seeded
/// inputs; returns each output's gap and the GPU session's reason.
fn run_against_tract(
    name: &str,
    dims: &[(&str, usize)],
    precision: GpuPrecision,
) -> (Vec<Gap>, String) {
    let model = Model::load(cached_model(name)).unwrap();
    let dims: BTreeMap<String, usize> = dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let inputs = model.random_inputs(7, &dims).unwrap();
    let mut options = SessionOptions::new()
        .without_telemetry()
        .gpu_precision(precision);
    for (input, t) in &inputs {
        options = options.pin_input_shape(input.clone(), t.shape());
    }
    let tensors: Vec<crate::Tensor> = inputs.iter().map(|(_, t)| t.clone()).collect();
    let gpu = prepare_on::<Flex>(&model, &options, FlexDevice, true, "test".into()).unwrap();
    assert!(gpu.reason.contains("warmed up"), "{}", gpu.reason);
    let cpu = super::super::tract::prepare(&model, &options, "test".into()).unwrap();
    let got = gpu.executor.run(tensors.clone()).unwrap().outputs;
    let want = cpu.executor.run(tensors).unwrap().outputs;
    assert_eq!(got.len(), want.len());
    let gaps = got.iter().zip(&want).map(|(g, w)| gap(g, w)).collect();
    (gaps, gpu.reason)
}

fn compare_with_tract(name: &str, dims: &[(&str, usize)], tol: f32) {
    let (gaps, reason) = run_against_tract(name, dims, GpuPrecision::F32);
    assert!(reason.contains("computes in f32"), "{reason}");
    for g in gaps {
        assert!(
            g.max_abs <= tol,
            "{name}: max abs diff {} > {tol}",
            g.max_abs
        );
    }
}

const CLS_DIMS: &[(&str, usize)] = &[("x_d0", 2), ("x_d2", 48), ("x_d3", 192)];
const REC_DIMS: &[(&str, usize)] = &[
    ("p2o.DynamicDimension.0", 1),
    ("x_d2", 48),
    ("p2o.DynamicDimension.1", 320),
];

#[test]
fn cnn_matches_tract_on_burn_cpu() {
    compare_with_tract("ppocr_cls", CLS_DIMS, 1e-4);
}

#[test]
fn transformer_matches_tract_on_burn_cpu() {
    compare_with_tract("ppocr_rec", REC_DIMS, 1e-3);
}

/// The text detector (DBNet: transposed convolutions and nearest upsampling in its FPN).
#[test]
fn detector_matches_tract_on_burn_cpu() {
    compare_with_tract(
        "ppocr_det",
        &[
            ("p2o.DynamicDimension.0", 1),
            ("p2o.DynamicDimension.1", 96),
            ("p2o.DynamicDimension.2", 160),
        ],
        1e-4,
    );
}

/// In f16 (weights and activations stored as f16, reductions, softmax and exp in f32) the
/// real models still pick the same classes as tract in f32, within f16's ~3 digits.
#[test]
fn f16_programs_match_tract_within_half_precision() {
    for (name, dims, tol) in [("ppocr_cls", CLS_DIMS, 2e-2), ("ppocr_rec", REC_DIMS, 2e-2)] {
        let (gaps, reason) = run_against_tract(name, dims, GpuPrecision::F16);
        assert!(reason.contains("computes in f16"), "{reason}");
        for g in gaps {
            eprintln!("{name} f16: max abs {}", g.max_abs);
            assert!(
                g.max_abs <= tol,
                "{name}: f16 max abs diff {} > {tol}",
                g.max_abs
            );
            assert!(g.same_argmax, "{name}: f16 picks other classes than f32");
        }
    }
}

/// `Auto` computes in f16 only on hardware with f16; `F32` always in f32.
#[test]
fn precision_follows_the_request_and_the_adapter() {
    let f16 = |requested, hardware| {
        precision::<Flex>(requested, &FlexDevice, hardware)
            .unwrap()
            .0
    };
    assert_eq!(f16(GpuPrecision::Auto, true), FloatDType::F16);
    assert_eq!(f16(GpuPrecision::Auto, false), FloatDType::F32);
    assert_eq!(f16(GpuPrecision::F32, true), FloatDType::F32);
    assert_eq!(f16(GpuPrecision::F16, false), FloatDType::F16);
}

#[test]
fn unsupported_op_is_named_before_any_work() {
    let model = Model::load(cached_model("silero_vad_lstm")).unwrap();
    let options = SessionOptions::new().without_telemetry();
    let err = prepare_on::<Flex>(&model, &options, FlexDevice, false, "test".into())
        .err()
        .expect("LSTM is not a GPU op");
    match err {
        Error::UnsupportedOp { op_type, node, .. } => {
            assert!(supported_onnx_ops()
                .binary_search(&op_type.as_str())
                .is_err());
            assert_eq!(model.first_node_of(&op_type), Some(node.as_str()));
        }
        other => panic!("expected unsupported_op, got {other}"),
    }
}

#[test]
fn supported_ops_are_the_families_lists_sorted_and_unique() {
    let ops = supported_onnx_ops();
    assert!(ops.windows(2).all(|w| w[0] < w[1]));
    let listed = ops::elementwise::ONNX.len()
        + ops::linear::ONNX.len()
        + ops::reduce::ONNX.len()
        + ops::layout::ONNX.len()
        + ops::pool::ONNX.len();
    assert_eq!(ops.len(), listed, "an ONNX op is claimed by two families");
}

/// Every einsum layout the planner accepts computes what tract's einsum computes.
#[test]
fn matmul_plans_match_tract_einsum() {
    let cases: &[(&str, &[usize], &[usize])] = &[
        ("mk,kn->mn", &[3, 4], &[4, 5]),
        ("bmk,kn->bmn", &[2, 3, 4], &[4, 5]),
        ("bmk,bnk->bmn", &[2, 3, 4], &[2, 5, 4]),
        ("bhmk,bhkn->bhmn", &[1, 2, 3, 4], &[1, 2, 4, 5]),
        ("bmk,bkn->bnm", &[2, 3, 4], &[1, 4, 5]),
        ("km,kn->nm", &[4, 3], &[4, 5]),
        ("amk,kn->amn", &[1, 3, 4], &[4, 2]),
    ];
    let device = FlexDevice;
    for (expr, sa, sb) in cases {
        let axes: AxesMapping = expr.parse().unwrap();
        let n = |s: &[usize]| s.iter().product::<usize>();
        let a = tract_ndarray::ArrayD::from_shape_vec(
            sa.to_vec(),
            (0..n(sa)).map(|i| (i as f32 * 0.37).sin()).collect(),
        )
        .unwrap()
        .into_tensor();
        let b = tract_ndarray::ArrayD::from_shape_vec(
            sb.to_vec(),
            (0..n(sb)).map(|i| (i as f32 * 0.11).cos()).collect(),
        )
        .unwrap()
        .into_tensor();
        let op = EinSum::new(axes.clone(), f32::datum_type());
        let want = op
            .eval_out_of_plan(tvec!(a.clone().into_tvalue(), b.clone().into_tvalue()))
            .unwrap()
            .expect("einsum evaluates out of a plan")
            .remove(0);
        let plan = MatMulPlan::new(&axes, sa, sb, want.shape()).unwrap();
        let upload = |t: &tract_onnx::prelude::Tensor| {
            <Flex as burn_backend::ops::FloatTensorOps<Flex>>::float_from_data(
                burn_backend::TensorData::new(
                    t.to_plain_array_view::<f32>()
                        .unwrap()
                        .iter()
                        .copied()
                        .collect::<Vec<_>>(),
                    t.shape().to_vec(),
                ),
                &device,
            )
        };
        let got = plan.run::<Flex>(upload(&a), upload(&b));
        let got = burn_backend::read_sync(
            <Flex as burn_backend::ops::FloatTensorOps<Flex>>::float_into_data(got),
        )
        .unwrap()
        .try_into_vec::<f32>()
        .unwrap();
        let want: Vec<f32> = want
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect();
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{expr}: max abs diff {d}");
    }
}

/// Every step of a wgpu program computes what the same step computes on burn's CPU
/// backend, at batch 2 (needs a Vulkan/Metal/DX12 adapter; CI installs lavapipe). This is
/// the test that localises a wrong device kernel to one node.
#[test]
fn wgpu_steps_match_burn_cpu_steps() {
    let adapter = wgpu_adapter().expect("a wgpu adapter (scripts/gpu-env installs lavapipe)");
    for (name, dims) in [
        ("ppocr_cls", vec![("x_d0", 2), ("x_d2", 48), ("x_d3", 96)]),
        (
            "ppocr_rec",
            vec![
                ("p2o.DynamicDimension.0", 1),
                ("x_d2", 48),
                ("p2o.DynamicDimension.1", 64),
            ],
        ),
    ] {
        let model = Model::load(cached_model(name)).unwrap();
        let dims: BTreeMap<String, usize> = dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let inputs: Vec<crate::Tensor> = model
            .random_inputs(3, &dims)
            .unwrap()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let cpu = BurnExecutor::<Flex> {
            graph: model.graph().clone(),
            device: FlexDevice,
            precision: FloatDType::F32,
            cache: Default::default(),
        };
        let gpu = BurnExecutor::<burn_wgpu::Wgpu> {
            graph: model.graph().clone(),
            device: adapter.device.clone().into(),
            precision: FloatDType::F32,
            cache: Default::default(),
        };
        let (cpu, gpu) = (cpu.program(&shapes).unwrap(), gpu.program(&shapes).unwrap());
        let want = cpu.run(&inputs).unwrap();
        let got = gpu.run(&inputs).unwrap();
        let d = max_abs_diff(
            &got[0].to_f32_vec().unwrap(),
            &want[0].to_f32_vec().unwrap(),
        );
        assert!(d < 1e-4, "{name}: wgpu vs burn CPU outputs differ by {d}");
        let want = cpu.run_steps(&inputs);
        let got = gpu.run_steps(&inputs);
        for ((node, op, w), (_, _, g)) in want.iter().zip(&got) {
            let scale = w.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let d = max_abs_diff(g, w);
            assert!(
                d <= 1e-3 * scale,
                "{name}: step {node} ({op}) differs by {d} (scale {scale})"
            );
        }
    }
}
