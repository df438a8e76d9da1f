//! Blockwise 4-bit weight-only quantization of `MatMul`/`Gemm` with constant weights, in
//! the form onnxruntime's `MatMulNBitsQuantizer` writes: each weight becomes a
//! `com.microsoft.MatMulNBits` whose weight is packed two values a byte, with one scale (and,
//! asymmetric, one 4-bit zero point) per block of `block_size` values along K.
//!
//! ```text
//! A ─ MatMulNBits(B: u8 [N, K/bs, bs/2], scales [N·K/bs], zero points) ─ (+ bias) ─ Y
//! ```
//!
//! Activations stay float; only the weights shrink (about 7× at block size 32: 4 bits and a
//! float scale per 32 values). tern runs it through tract's `MatMulNBits`, which keeps a
//! block-32 weight in 4-bit blocks in memory; onnxruntime runs it as its own.

use tract_onnx::pb;

use crate::dynamic::replace_weights;
use crate::error::{QuantizeError, Result};
use crate::graph::{self, f32_tensor, int_attr, node, tensor};

/// `TensorProto.DataType` of `uint8`.
const UINT8: i32 = pb::tensor_proto::DataType::Uint8 as i32;

/// The contrib domain `MatMulNBits` lives in.
const MS: &str = "com.microsoft";

/// Options for [`quantize_int4`].
#[derive(Debug, Clone)]
pub struct Int4Options {
    /// Values per scale along K: a power of two ≥ 16 (32 is what tract keeps packed).
    pub block_size: usize,
    /// Symmetric blocks (zero point 8, no zero-point tensor) instead of min/max ones.
    pub symmetric: bool,
    /// Nodes (by name or op type) to leave in float.
    pub exclude: graph::Exclusions,
}

impl Default for Int4Options {
    fn default() -> Self {
        Int4Options {
            block_size: 32,
            symmetric: false,
            exclude: Default::default(),
        }
    }
}

/// One weight in `MatMulNBits` form.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// `[N, blocks, block_size / 2]`: two 4-bit values a byte, the even one low.
    pub data: Vec<u8>,
    /// `[N · blocks]`.
    pub scales: Vec<f32>,
    /// `[N · ceil(blocks / 2)]` 4-bit zero points, two a byte; empty when symmetric.
    pub zero_points: Vec<u8>,
    /// Blocks along K.
    pub blocks: usize,
}

/// Quantizes a `[K, N]` row-major weight blockwise along K (the tail block padded with 0).
pub fn pack(values: &[f32], k: usize, n: usize, block_size: usize, symmetric: bool) -> Packed {
    let blocks = k.div_ceil(block_size);
    let mut data = vec![0u8; n * blocks * block_size / 2];
    let mut scales = Vec::with_capacity(n * blocks);
    let mut zeros = Vec::with_capacity(n * blocks);
    let mut block = vec![0f32; block_size];
    for col in 0..n {
        for b in 0..blocks {
            for (i, v) in block.iter_mut().enumerate() {
                let row = b * block_size + i;
                *v = if row < k { values[row * n + col] } else { 0.0 };
            }
            let (scale, zero) = if symmetric {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                (amax / 7.0, 8u8)
            } else {
                // The range always holds 0, so a zero weight stays exactly zero.
                let lo = block.iter().fold(0f32, |m, v| m.min(*v));
                let hi = block.iter().fold(0f32, |m, v| m.max(*v));
                let scale = (hi - lo) / 15.0;
                let zero = if scale > 0.0 {
                    (-lo / scale).round().clamp(0.0, 15.0) as u8
                } else {
                    0
                };
                (scale, zero)
            };
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let base = (col * blocks + b) * block_size / 2;
            for (i, v) in block.iter().enumerate() {
                let q = ((v * inverse).round() + f32::from(zero)).clamp(0.0, 15.0) as u8;
                data[base + i / 2] |= if i % 2 == 0 { q } else { q << 4 };
            }
            scales.push(scale);
            zeros.push(zero);
        }
    }
    let zero_points = if symmetric {
        Vec::new()
    } else {
        zeros
            .chunks(blocks)
            .flat_map(|col| {
                col.chunks(2)
                    .map(|p| p[0] | (p.get(1).copied().unwrap_or(0) << 4))
            })
            .collect()
    };
    Packed {
        data,
        scales,
        zero_points,
        blocks,
    }
}

/// The weight `packed` stands for, `[K, N]` row-major (the reference [`pack`] is held to).
pub fn unpack(packed: &Packed, k: usize, n: usize, block_size: usize) -> Vec<f32> {
    let per_col = packed.blocks.div_ceil(2);
    let mut out = vec![0f32; k * n];
    for col in 0..n {
        for row in 0..k {
            let (b, i) = (row / block_size, row % block_size);
            let byte = packed.data[(col * packed.blocks + b) * block_size / 2 + i / 2];
            let q = if i % 2 == 0 { byte & 15 } else { byte >> 4 };
            let zero = match packed.zero_points.get(col * per_col + b / 2) {
                Some(z) if b % 2 == 0 => z & 15,
                Some(z) => z >> 4,
                None => 8,
            };
            let scale = packed.scales[col * packed.blocks + b];
            out[row * n + col] = (f32::from(q) - f32::from(zero)) * scale;
        }
    }
    out
}

/// Quantizes every eligible `MatMul`/`Gemm` weight to 4 bits; returns how many.
pub fn quantize_int4(model: &mut pb::ModelProto, options: &Int4Options) -> Result<usize> {
    let bs = options.block_size;
    if bs < 16 || !bs.is_power_of_two() {
        return Err(QuantizeError::InvalidModel(format!(
            "block size {bs}: MatMulNBits takes a power of two ≥ 16"
        )));
    }
    graph::ensure_not_quantized(model)?;
    let converted = replace_weights(model, &options.exclude, |n, ix, values, k, cols| {
        let mut nodes = Vec::new();
        let mut new_inits = Vec::new();
        let packed = pack(values, k, cols, bs, options.symmetric);
        let p = format!(
            "{}_q4_{ix}",
            if n.name.is_empty() { "node" } else { &n.name }
        );
        let name = |s: &str| format!("{p}_{s}");
        let dims = [cols as i64, packed.blocks as i64, bs as i64 / 2];
        new_inits.push(tensor(&name("B"), UINT8, &dims, packed.data.clone()));
        new_inits.push(f32_tensor(
            &name("scales"),
            &[packed.scales.len() as i64],
            &packed.scales,
        ));
        let mut inputs = vec![n.input[0].clone(), name("B"), name("scales")];
        if !options.symmetric {
            let zp = packed.zero_points.len() as i64;
            new_inits.push(tensor(
                &name("zero_points"),
                UINT8,
                &[zp],
                packed.zero_points,
            ));
            inputs.push(name("zero_points"));
        }
        let bias = (n.op_type == "Gemm")
            .then(|| n.input.get(2).filter(|b| !b.is_empty()).cloned())
            .flatten();
        let y = match &bias {
            Some(_) => name("Y"),
            None => n.output[0].clone(),
        };
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let mut nbits = node(
            "MatMulNBits",
            &name("matmul"),
            &inputs,
            &[&y],
            vec![
                int_attr("K", k as i64),
                int_attr("N", cols as i64),
                int_attr("bits", 4),
                int_attr("block_size", bs as i64),
            ],
        );
        nbits.domain = MS.into();
        nodes.push(nbits);
        if let Some(bias) = bias {
            nodes.push(node(
                "Add",
                &name("bias"),
                &[&y, &bias],
                &[&n.output[0]],
                vec![],
            ));
        }
        (nodes, new_inits)
    })?;
    if !model.opset_import.iter().any(|o| o.domain == MS) {
        model.opset_import.push(pb::OperatorSetIdProto {
            domain: MS.into(),
            version: 1,
        });
    }
    Ok(converted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[K, N]` weight with columns of very different ranges and a K that is not a
    /// multiple of the block.
    fn weight(k: usize, n: usize) -> Vec<f32> {
        (0..k * n)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * [0.01, 1.0, 30.0][i % n % 3])
            .collect()
    }

    #[test]
    fn every_value_comes_back_within_half_a_step_of_its_block() {
        let (k, n, bs) = (70, 5, 32);
        let w = weight(k, n);
        for symmetric in [false, true] {
            let packed = pack(&w, k, n, bs, symmetric);
            assert_eq!(packed.blocks, 3);
            assert_eq!(packed.data.len(), n * 3 * bs / 2);
            assert_eq!(packed.zero_points.len(), if symmetric { 0 } else { n * 2 });
            let back = unpack(&packed, k, n, bs);
            for row in 0..k {
                for col in 0..n {
                    let scale = packed.scales[col * 3 + row / bs];
                    let (v, b) = (w[row * n + col], back[row * n + col]);
                    // Half a step, or the symmetric clamp at −8·scale (never reached: ±7).
                    assert!(
                        (v - b).abs() <= scale / 2.0 + 1e-6,
                        "{v} → {b} (scale {scale})"
                    );
                }
            }
        }
    }

    #[test]
    fn a_zero_block_stays_zero() {
        let packed = pack(&[0.0; 64], 32, 2, 32, false);
        assert!(unpack(&packed, 32, 2, 32).iter().all(|v| *v == 0.0));
    }
}
