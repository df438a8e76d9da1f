//! `conv-q8`: int8 convolutions with one group (pointwise and full) as im2col →
//! tract-linalg's int8 matrix product → requantization.
//!
//! With `x' = x - 128` (the `i8` the kernels multiply, see `tern_kernels::im2col`) and
//! symmetric weights (every weight zero point 0):
//!
//! ```text
//! acc[o, p] = bias[o] + Σ_k (x[k, p] - x_zero) · w[o, k]
//!           = (bias[o] - (x_zero - 128) · Σ_k w[o, k]) + Σ_k x'[k, p] · w[o, k]
//! ```
//!
//! so the zero point and bias become one per-channel term, added in the product's
//! epilogue. Layers with a non-zero weight zero point stay with tract.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;

use tern_kernels::im2col::{im2col_q8, im2col_q8_k4, k4_len};
use tern_kernels::quant::{requantize_rows, rescale_rows};
use tern_kernels::{Geometry, Isa};

use super::super::linalg::QGemm;
use super::{for_each_chunk, replace_qconvs, QConv, TASK};

/// Replaces quantized one-group convolutions by [`ConvQ8Op`].
pub(super) fn pass(model: &mut TypedModel) -> TractResult<usize> {
    let isa = Isa::detect();
    replace_qconvs(model, |q| match ConvQ8Op::new(q, isa) {
        Ok(op) => op,
        Err(e) => {
            tracing::debug!("convolution left to tract: {e}");
            None
        }
    })
}

/// Folds the `Cast → Mul(per-channel const) [→ Add(per-channel const)]` after an `i32`
/// [`ConvQ8Op`] (what QDQ fusion writes for a convolution whose output stays float) into
/// the op's epilogue: one pass writing f32 instead of three element-wise ops.
pub(super) fn rescale_pass(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<ConvQ8Op>() else {
            continue;
        };
        if op.output_type != i32::datum_type() || op.rescale.is_some() {
            continue;
        }
        let channels = op.output_channels;
        let Some(cast) = single_succ(model, node)
            .filter(|n| n.op_as::<Cast>().is_some_and(|c| c.to == f32::datum_type()))
        else {
            continue;
        };
        let Some((mul, scale)) =
            single_succ(model, cast).and_then(|n| per_channel_operand(model, n, "Mul", channels))
        else {
            continue;
        };
        let (last, bias) = match single_succ(model, mul)
            .and_then(|n| per_channel_operand(model, n, "Add", channels))
        {
            Some((add, bias)) => (add, bias),
            None => (mul, vec![0.0; channels]),
        };
        let fused = ConvQ8Op {
            output_type: f32::datum_type(),
            rescale: Some(Arc::new((scale, bias))),
            ..op.clone()
        };
        let (name, last) = (node.name.clone(), OutletId::new(last.id, 0));
        let mut patch = TypedModelPatch::default();
        let tap = patch.tap_model(model, node.inputs[0])?;
        let out = patch.wire_node(format!("{name}.rescaled"), fused, &[tap])?[0];
        patch.shunt_outside(model, last, out)?;
        patch.apply(model)?;
        folded += 1;
    }
    if folded > 0 {
        model.compact()?;
    }
    Ok(folded)
}

/// The only node reading `node`'s output, if exactly one does and the output is not a
/// model output.
fn single_succ<'m>(model: &'m TypedModel, node: &TypedNode) -> Option<&'m TypedNode> {
    let [succ] = node.outputs.first()?.successors.as_slice() else {
        return None;
    };
    let outlet = OutletId::new(node.id, 0);
    (!model.output_outlets().ok()?.contains(&outlet)).then(|| model.node(succ.node))
}

/// For a binary `op_name` node with a constant operand of `channels` f32 values along the
/// channel axis (`[.., C, 1, 1]`), that node and the values.
fn per_channel_operand<'m>(
    model: &'m TypedModel,
    node: &'m TypedNode,
    op_name: &str,
    channels: usize,
) -> Option<(&'m TypedNode, Vec<f32>)> {
    let bin = node.op_as::<TypedBinOp>()?;
    if bin.0.name() != op_name || node.inputs.len() != 2 {
        return None;
    }
    let konst = node
        .inputs
        .iter()
        .find_map(|i| model.outlet_fact(*i).ok()?.konst.clone())?;
    let shape = konst.shape();
    let per_channel = konst.datum_type() == f32::datum_type()
        && konst.len() == channels
        && shape.len() >= 3
        && shape[shape.len() - 3..] == [channels, 1, 1];
    if !per_channel {
        return None;
    }
    let values = konst
        .try_as_plain_ram()
        .ok()?
        .as_slice::<f32>()
        .ok()?
        .to_vec();
    Some((node, values))
}

/// An int8 convolution with one group (NCHW, `u8` in and out) run as im2col, an int8
/// matrix product and a requantization pass.
#[derive(Debug, Clone)]
pub(crate) struct ConvQ8Op {
    geometry: Geometry,
    out: [usize; 2],
    output_channels: usize,
    gemm: Arc<QGemm>,
    /// i32 `[output_channels]`: the bias with the input zero point folded in.
    bias: Arc<Tensor>,
    /// One per output channel.
    scale: Arc<Vec<f32>>,
    x_zero: u8,
    y_zero: u8,
    isa: Isa,
    output_type: DatumType,
    /// The output's shape (`[N, M, oh, ow]`, or without `N` where tract dropped a batch of
    /// 1).
    output_shape: TVec<usize>,
    /// For an `i32` convolution whose Cast → Mul [→ Add] to f32 was folded in
    /// ([`rescale_pass`]): the per-channel scale and bias, and the output is f32.
    rescale: Option<Arc<(Vec<f32>, Vec<f32>)>>,
}

impl ConvQ8Op {
    /// The op for `q`, `None` when it is not a one-group convolution with symmetric
    /// weights.
    fn new(q: QConv, isa: Isa) -> TractResult<Option<ConvQ8Op>> {
        if q.group != 1 || q.w_zero.iter().any(|z| *z != 0) {
            return Ok(None);
        }
        let g = q.geometry;
        let m = q.output_channels;
        let k = g.channels * g.kernel[0] * g.kernel[1];
        ensure!(q.weights.len() == m * k, "weights for {m}×{k}");
        let x_zero = i32::from(q.x_zero) - 128;
        let bias: Vec<i32> = q
            .weights
            .chunks(k)
            .zip(&q.bias)
            .map(|(row, b)| {
                let sum: i32 = row.iter().map(|w| i32::from(*w)).sum();
                b.checked_sub(x_zero.checked_mul(sum)?)
            })
            .collect::<Option<_>>()
            .context("bias and zero-point fold overflows i32")?;
        let scale = match q.scale.len() {
            1 => vec![q.scale[0]; m],
            _ => q.scale,
        };
        let gemm = QGemm::new(&q.weights, m, k, q.out[0] * q.out[1])?;
        Ok(Some(ConvQ8Op {
            geometry: g,
            out: q.out,
            output_channels: m,
            gemm: Arc::new(gemm),
            bias: Arc::new(Tensor::from_shape(&[m], &bias)?),
            scale: Arc::new(scale),
            x_zero: q.x_zero,
            y_zero: q.y_zero,
            isa,
            output_type: q.output_type,
            output_shape: q.output_shape,
            rescale: None,
        }))
    }
}

impl PartialEq for ConvQ8Op {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.gemm, &other.gemm) && self.output_type == other.output_type
    }
}

impl Eq for ConvQ8Op {}

impl Op for ConvQ8Op {
    fn name(&self) -> StaticName {
        "TernConvQ8".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("kernel: {}", self.gemm.kernel())])
    }

    op_as_typed_op!();
}

impl EvalOp for ConvQ8Op {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.first().context("TernConvQ8 takes one input")?;
        let g = &self.geometry;
        let batch = x.len() / g.input_len().max(1);
        ensure!(
            x.len() == batch * g.input_len(),
            "TernConvQ8 planned for images of [{}, {}, {}], got {:?}",
            g.channels,
            g.input[0],
            g.input[1],
            x.shape()
        );
        ensure!(
            x.datum_type().unquantized() == u8::datum_type(),
            "TernConvQ8 reads u8"
        );
        let [oh, ow] = self.out;
        let (m, cols) = (self.output_channels, oh * ow);
        let k = g.channels * g.kernel[0] * g.kernel[1];
        // Where the kernel reads the K4 layout, im2col writes it directly (no `columns`).
        let k4 = self.gemm.k4_panel();
        let columns_width = if k4.is_some() { 0 } else { cols };
        // SAFETY: numbers have no invalid values, and every value of these three is
        // written before it is read: `columns` by the im2col of each image (every row, every
        // column), `acc` by the product (its whole m × cols store), `y` by the
        // requantization or rescale of each image (every row).
        let (mut y, mut columns, mut acc) = unsafe {
            (
                Tensor::uninitialized_dt(self.output_type, &self.output_shape)?,
                Tensor::uninitialized::<i8>(&[k, columns_width])?,
                Tensor::uninitialized::<i32>(&[m, cols])?,
            )
        };
        let xs = x.try_as_plain_ram()?.as_bytes();
        let (plane_in, plane_out) = (g.input_len(), m * cols);
        ensure!(
            y.len() == batch * plane_out,
            "TernConvQ8 planned for {:?}, fed {batch} images",
            self.output_shape
        );
        let mut y_view = y.try_as_plain_ram_mut()?;
        let taps = g.kernel[0] * g.kernel[1];
        let plane = Geometry { channels: 1, ..*g };
        let plane_len = plane.input_len();
        for i in 0..batch {
            let x = &xs[i * plane_in..(i + 1) * plane_in];
            match k4 {
                // im2col written straight into the kernel's packed layout.
                Some(r) => self.gemm.run_k4(
                    cols,
                    k4_len(g, r),
                    |packed| {
                        im2col_q8_k4(g, x, self.x_zero, r, packed).map_err(|e| anyhow::anyhow!(e))
                    },
                    &self.bias,
                    &mut acc,
                )?,
                None => {
                    // im2col split by channel over the session's pool, as the product
                    // is inside tract-linalg; the product packs it again.
                    let mut cols_view = columns.try_as_plain_ram_mut()?;
                    for_each_chunk(cols_view.as_slice_mut::<i8>()?, taps * cols, |(c, rows)| {
                        let x = &x[c * plane_len..(c + 1) * plane_len];
                        im2col_q8(&plane, x, self.x_zero, rows)
                    })
                    .map_err(|e| anyhow::anyhow!(e))?;
                    self.gemm.run(&columns, &self.bias, &mut acc)?;
                }
            }
            let acc = acc.try_as_plain_ram()?;
            if let Some(rescale) = &self.rescale {
                let (scale, bias) = &**rescale;
                let y = &mut y_view.as_slice_mut::<f32>()?[i * plane_out..(i + 1) * plane_out];
                rescale_rows(acc.as_slice::<i32>()?, scale, bias, y)
                    .map_err(|e| anyhow::anyhow!(e))?;
                continue;
            }
            let ys = y_view.as_bytes_mut();
            if self.output_type == i32::datum_type() {
                // ConvInteger: the accumulators are the output.
                let bytes = acc.as_bytes();
                ys[i * bytes.len()..(i + 1) * bytes.len()].copy_from_slice(bytes);
                continue;
            }
            let acc = acc.as_slice::<i32>()?;
            let y = &mut ys[i * plane_out..(i + 1) * plane_out];
            // Whole rows per task, enough of them that a task outweighs its scheduling.
            let rows = (TASK / cols.max(1)).clamp(1, m);
            for_each_chunk(y, rows * cols, |(t, y)| {
                let first = t * rows;
                let here = y.len() / cols.max(1);
                let acc = &acc[first * cols..(first + here) * cols];
                requantize_rows(
                    self.isa,
                    acc,
                    &self.scale[first..first + here],
                    self.y_zero,
                    y,
                )
            })
            .map_err(|e| anyhow::anyhow!(e))?;
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for ConvQ8Op {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.output_type.fact(self.output_shape.clone())))
    }

    as_op!();
}
