//! `matmul-q8`: ONNX `MatMulInteger` with constant weights (a dynamically quantized
//! transformer's and recogniser's linear layers) on tract-linalg's int8 matrix product,
//! with the float ops onnxruntime's dynamic quantizer writes after it folded in.
//!
//! tract declutters `MatMulInteger` into a quantized `EinSum` (`amk,kn,…->amn`) and runs
//! it as a product plus separate graph ops for the zero points; the `Cast → Mul(scale) →
//! Add(bias)` after it are three more passes over the output (the broadcast `Add` alone
//! was a fifth of MiniLM's int8 run). Here the product is `C[n, m] = Wᵀ[n, k] · Xᵀ[k, m]`
//! with the weights packed once and the activations' rows packed per run as the product's
//! columns (`tern_kernels::im2col::pack_rows_k4`), stored through a transposed view so
//! that `C` lands row-major as `[m, n]`. With `x' = x - 128` (the `i8` the kernels
//! multiply) and weights with zero point 0:
//!
//! ```text
//! acc[m, n] = Σ_k (x[m, k] - x_zero) · w[k, n] = Σ_k x'[m, k] · w[k, n] - (x_zero - 128) · Σ_k w[k, n]
//! y[m, n]   = acc[m, n] · scale[n] + bias[n]          (when the Cast → Mul [→ Add] follow)
//! ```
//!
//! The zero point is an input (a `DynamicQuantizeLinear` computes it per run), so its
//! term is one `i32` per column made at each run; the scale is an input too (the
//! activation's scale times the weights'), one value or one per column.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::einsum::EinSum;

use tern_kernels::im2col::{pack_rows_k4, rows_k4_len};
use tern_kernels::quant::dequantize_cols_in_place;
use tern_kernels::Isa;

use super::super::linalg::Gemm;
use super::epilogue::{bin_name, single_succ};
use super::{for_each_chunk, konst, plain_vec, TASK};

/// Replaces each `MatMulInteger` tern's kernels can take by [`MatMulQ8Op`], with the
/// `Cast → Mul [→ Add]` after it when they are there.
pub(super) fn pass(model: &mut TypedModel) -> TractResult<usize> {
    let isa = Isa::detect();
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = MatMulQ8Op::read(model, node, isa)? else {
            continue;
        };
        let (op, last, scale) = match rescale(model, node, op.n) {
            Some((last, scale, bias)) => (op.rescaled(bias), last, Some(scale)),
            None => (op, id, None),
        };
        let name = node.name.clone();
        let mut patch = TypedModelPatch::default();
        let mut inputs = vec![
            patch.tap_model(model, node.inputs[0])?,
            patch.tap_model(model, node.inputs[3])?,
        ];
        if let Some(scale) = scale {
            inputs.push(patch.tap_model(model, scale)?);
        }
        let out = patch.wire_node(format!("{name}.q8"), op, &inputs)?[0];
        patch.shunt_outside(model, OutletId::new(last, 0), out)?;
        patch
            .apply(model)
            .with_context(|| format!("rewriting {name}"))?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// For an einsum whose axes are a matrix product of the last axis of input 0 with the
/// first of a two-axis input 1 (`amk,kn,…->amn`: any leading axes, kept in order by the
/// output or dropped from it, as tract drops a batch of 1), the seven quantization inputs
/// axis-less: the leading axes of input 0 the output drops.
fn matmul_drops(axes: &str) -> Option<TVec<usize>> {
    let (inputs, output) = axes.split_once("->")?;
    let inputs: Vec<Vec<char>> = inputs.split(',').map(|s| s.chars().collect()).collect();
    let output: Vec<char> = output.chars().collect();
    let [x, w, rest @ ..] = inputs.as_slice() else {
        return None;
    };
    let (&[k, n], (xk, lead), (on, out_lead)) =
        (w.as_slice(), x.split_last()?, output.split_last()?)
    else {
        return None;
    };
    if rest.len() != 7
        || rest.iter().any(|r| !r.is_empty())
        || *xk != k
        || *on != n
        || k == n
        || lead.contains(&k)
        || lead.contains(&n)
    {
        return None;
    }
    let drops: TVec<usize> = (0..lead.len())
        .filter(|i| !out_lead.contains(&lead[*i]))
        .collect();
    let kept: Vec<char> = lead
        .iter()
        .copied()
        .filter(|c| out_lead.contains(c))
        .collect();
    (kept == out_lead).then_some(drops)
}

/// The scalar value of a constant input, as `f64` (any numeric type).
fn scalar(model: &TypedModel, node: &TypedNode, slot: usize) -> Option<f64> {
    let t = konst(model, node, slot)?;
    if t.len() != 1 {
        return None;
    }
    let t = t.cast_to::<f64>().ok()?;
    plain_vec::<f64>(&t)?.first().copied()
}

/// The `Mul(scale) [→ Add(bias)]` after `node`'s `Cast` to f32: the last node folded, the
/// scale's wire (one value, or one per column along the last axis), the bias (one per
/// column).
fn rescale(model: &TypedModel, node: &TypedNode, n: usize) -> Option<(usize, OutletId, Vec<f32>)> {
    let cast = single_succ(model, node)
        .filter(|c| c.op_as::<Cast>().is_some_and(|c| c.to == f32::datum_type()))?;
    let mul = single_succ(model, cast).filter(|m| bin_name(m) == Some("Mul"))?;
    let cast_out = OutletId::new(cast.id, 0);
    let shape = &cast.outputs[0].fact.shape;
    let [a, b] = mul.inputs.as_slice() else {
        return None;
    };
    let scale = if *a == cast_out { *b } else { *a };
    let scale_fact = model.outlet_fact(scale).ok()?;
    if scale == cast_out
        || scale_fact.datum_type != f32::datum_type()
        || !per_column(&scale_fact.shape, shape.rank(), n)
        || mul.outputs[0].fact.shape != *shape
    {
        return None;
    }
    let bias = single_succ(model, mul).and_then(|add| {
        if bin_name(add) != Some("Add") || add.outputs[0].fact.shape != *shape {
            return None;
        }
        let other = add
            .inputs
            .iter()
            .find(|i| **i != OutletId::new(mul.id, 0))?;
        let fact = model.outlet_fact(*other).ok()?;
        let k = fact.konst.as_ref()?;
        if k.datum_type() != f32::datum_type() || !per_column(&fact.shape, shape.rank(), n) {
            return None;
        }
        let values = plain_vec::<f32>(k)?;
        Some((
            add.id,
            if values.len() == 1 {
                vec![values[0]; n]
            } else {
                values
            },
        ))
    });
    Some(match bias {
        Some((last, bias)) => (last, scale, bias),
        None => (mul.id, scale, vec![0.0; n]),
    })
}

/// Whether a shape broadcasts to one value per column of a rank-`rank` output with `n`
/// columns, changing nothing else: every axis 1 but possibly the last, which is 1 or `n`.
fn per_column(shape: &ShapeFact, rank: usize, n: usize) -> bool {
    let Some(dims) = shape.as_concrete() else {
        return false;
    };
    dims.len() <= rank
        && match dims.split_last() {
            None => true,
            Some((last, rest)) => rest.iter().all(|d| *d == 1) && (*last == 1 || *last == n),
        }
}

/// What a [`MatMulQ8Op`] writes.
#[derive(Debug, Clone, PartialEq)]
enum Output {
    /// The `i32` accumulators (`MatMulInteger`'s own output).
    Accumulators,
    /// `acc · scale + bias` in f32, the scale read from input 2; one bias per column.
    Rescaled(Arc<Vec<f32>>),
}

/// `MatMulInteger` of `u8` activations `[.., k]` (zero point from input 1) by constant
/// `i8` weights `[k, n]` (zero point 0, or `u8` ones with zero point 128), on tract-linalg's
/// int8 product in the `K4` layout.
#[derive(Debug, Clone)]
pub(crate) struct MatMulQ8Op {
    k: usize,
    n: usize,
    /// Leading axes of the activations (each of size 1) the output drops.
    drops: TVec<usize>,
    /// `Wᵀ`, `[n, k]`, packed.
    gemm: Arc<Gemm>,
    /// `Σ_k w[k, n]` per column: the activation zero point's term is `-(zero - 128)` times it.
    col_sums: Arc<Vec<i32>>,
    /// The einsum's constant `i32` bias, per column.
    bias: Arc<Vec<i32>>,
    output: Output,
    isa: Isa,
}

impl PartialEq for MatMulQ8Op {
    fn eq(&self, other: &Self) -> bool {
        // Two ops with the same weights would be the same: identity is enough here.
        Arc::ptr_eq(&self.gemm, &other.gemm) && self.output == other.output
    }
}

impl Eq for MatMulQ8Op {}

impl MatMulQ8Op {
    /// The op for `node` if it is a `MatMulInteger` einsum tern's kernels take: `u8`
    /// activations with a concrete last axis, constant weights with a zero point the
    /// `i8` product can absorb, unit scales, a scalar activation zero point, a kernel
    /// reading the `K4` layout.
    fn read(model: &TypedModel, node: &TypedNode, isa: Isa) -> TractResult<Option<MatMulQ8Op>> {
        let Some(einsum) = node.op_as::<EinSum>() else {
            return Ok(None);
        };
        if einsum.q_params != Some(i32::datum_type()) || node.inputs.len() != 9 {
            return Ok(None);
        }
        let Some(drops) = matmul_drops(&einsum.axes.to_string()) else {
            return Ok(None);
        };
        let x = model.outlet_fact(node.inputs[0])?;
        // The axes the output drops hold one value.
        if drops.iter().any(|a| x.shape.get(*a) != Some(&1.to_dim())) {
            return Ok(None);
        }
        let zero = model.outlet_fact(node.inputs[3])?;
        let Some(weights) = konst(model, node, 1) else {
            return Ok(None);
        };
        let (&[k, n], Some(xk)) = (
            weights.shape(),
            x.shape.last().and_then(|d| d.to_usize().ok()),
        ) else {
            return Ok(None);
        };
        let unit = |slot| scalar(model, node, slot) == Some(1.0);
        let zero_at = |slot| scalar(model, node, slot) == Some(0.0);
        if x.datum_type.unquantized() != u8::datum_type()
            || ![u8::datum_type(), i32::datum_type()].contains(&zero.datum_type.unquantized())
            || zero.shape.volume() != 1.to_dim()
            || xk != k
            || k == 0
            || n == 0
            || !(unit(4) && unit(6) && unit(8) && zero_at(7))
        {
            return Ok(None);
        }
        // i8 weights with zero point 0, or u8 ones with 128 (the same values shifted).
        let w_zero = scalar(model, node, 5);
        let wt: Vec<i8> = match weights.datum_type().unquantized() {
            DatumType::I8 if w_zero == Some(0.0) => {
                let w = weights.cast_to::<i8>()?;
                plain_vec::<i8>(&w).context("weights in plain memory")?
            }
            DatumType::U8 if w_zero == Some(128.0) => {
                let w = weights.cast_to::<u8>()?;
                let w = plain_vec::<u8>(&w).context("weights in plain memory")?;
                w.into_iter().map(|w| (w ^ 0x80) as i8).collect()
            }
            _ => return Ok(None),
        };
        let Some(bias) = konst(model, node, 2) else {
            return Ok(None);
        };
        let bias = bias.cast_to::<i32>()?;
        let bias = plain_vec::<i32>(&bias).unwrap_or_default();
        let bias = match bias.len() {
            1 => vec![bias[0]; n],
            len if len == n => bias,
            _ => return Ok(None),
        };
        // Wᵀ: the product's rows are the output columns.
        let mut transposed = vec![0i8; n * k];
        let mut col_sums = vec![0i32; n];
        for (kk, row) in wt.chunks_exact(n).enumerate() {
            for (j, w) in row.iter().enumerate() {
                transposed[j * k + kk] = *w;
                col_sums[j] += i32::from(*w);
            }
        }
        // The rows a run multiplies, for the kernel choice: known in a concrete plan.
        let rows = x
            .shape
            .as_concrete()
            .map_or(64, |s| s.iter().product::<usize>() / k.max(1));
        let gemm = Gemm::new(&Tensor::from_shape(&[n, k], &transposed)?, rows.max(1))?;
        if gemm.k4_panel().is_none() {
            return Ok(None);
        }
        Ok(Some(MatMulQ8Op {
            k,
            n,
            drops,
            gemm: Arc::new(gemm),
            col_sums: Arc::new(col_sums),
            bias: Arc::new(bias),
            output: Output::Accumulators,
            isa,
        }))
    }

    /// The same product writing `acc · scale + bias` in f32.
    fn rescaled(self, bias: Vec<f32>) -> MatMulQ8Op {
        MatMulQ8Op {
            output: Output::Rescaled(Arc::new(bias)),
            ..self
        }
    }

    /// The output's shape: the activations' with `n` for `k`, without the dropped axes.
    fn output_shape<D: Clone>(&self, x: &[D], n: D) -> TVec<D> {
        let lead = x.len().saturating_sub(1);
        let mut shape: TVec<D> = x[..lead]
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.drops.contains(i))
            .map(|(_, d)| d.clone())
            .collect();
        shape.push(n);
        shape
    }
}

impl Op for MatMulQ8Op {
    fn name(&self) -> StaticName {
        "TernMatMulQ8".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{}×{} weights, {}{}",
            self.k,
            self.n,
            self.gemm.kernel(),
            match self.output {
                Output::Accumulators => "",
                Output::Rescaled(_) => ", rescaled to f32",
            }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for MatMulQ8Op {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, zero) = match inputs.as_slice() {
            [x, zero, ..] => (x, zero),
            _ => bail!("a MatMulInteger takes the activations and their zero point"),
        };
        let (k, n) = (self.k, self.n);
        ensure!(
            x.shape().last() == Some(&k),
            "activations {:?} for {k}×{n} weights",
            x.shape()
        );
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<u8>()?;
        let rows = xs.len() / k;
        let zero = zero.cast_to_scalar::<i32>()?;
        let shape = self.output_shape(x.shape(), n);
        // SAFETY: i32 has no invalid values; the product writes every `[rows, n]` value
        // (or its error drops the tensor unread).
        let mut acc = unsafe { Tensor::uninitialized::<i32>(&shape)? };
        if rows > 0 {
            let r = self
                .gemm
                .k4_panel()
                .context("the kernel reads the K4 layout")?;
            let terms: Vec<i32> = self
                .col_sums
                .iter()
                .zip(self.bias.iter())
                .map(|(s, b)| b.wrapping_sub((zero - 128).wrapping_mul(*s)))
                .collect();
            let terms = Tensor::from_shape(&[n], &terms)?;
            let (dims, strides) = ([n, rows], [1, n as isize]);
            // SAFETY: `acc` holds `rows · n` i32 values, row-major `[rows, n]`: the view
            // `[n, rows]` with strides `[1, n]` covers exactly those values, transposed.
            let mut view = unsafe { TensorView::from_bytes(&acc, 0, &dims, &strides) };
            self.gemm.run_k4(
                rows,
                rows_k4_len(rows, k, r),
                |packed| pack_rows_k4(xs, k, r, packed).map_err(|e| anyhow::anyhow!(e)),
                &terms,
                &mut view,
            )?;
        }
        let Output::Rescaled(bias) = &self.output else {
            return Ok(tvec!(acc.into_tvalue()));
        };
        let scale = inputs
            .get(2)
            .context("a rescaled product takes its scale")?;
        let scale = scale.cast_to::<f32>()?;
        let scale = scale.try_as_plain_ram()?;
        let scale = match scale.as_slice::<f32>()? {
            [s] => vec![*s; n],
            s if s.len() == n => s.to_vec(),
            s => bail!("{} scales for {n} columns", s.len()),
        };
        let isa = self.isa;
        let per_task = (TASK / n).max(1) * n;
        for_each_chunk(
            acc.try_as_plain_ram_mut()?.as_slice_mut::<i32>()?,
            per_task,
            |(_, data)| dequantize_cols_in_place(isa, data, &scale, bias),
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        // SAFETY: every value now holds the bits of an f32 (`dequantize_cols_in_place`),
        // and f32 has the size and alignment of i32.
        unsafe { acc.set_datum_type(f32::datum_type()) };
        Ok(tvec!(acc.into_tvalue()))
    }
}

impl TypedOp for MatMulQ8Op {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs.first().context("no activations")?;
        let dt = match self.output {
            Output::Accumulators => i32::datum_type(),
            Output::Rescaled(_) => f32::datum_type(),
        };
        Ok(tvec!(dt.fact(self.output_shape(&x.shape, self.n.to_dim()))))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_matrix_products_only() {
        let drops = |axes| matmul_drops(axes).map(|d| d.to_vec());
        assert_eq!(drops("amk,kn,,,,,,,->amn"), Some(vec![]));
        assert_eq!(drops("k,kn,,,,,,,->n"), Some(vec![]));
        assert_eq!(drops("abmk,kn,,,,,,,->abmn"), Some(vec![]));
        assert_eq!(drops("amk,kn,,,,,,,->mn"), Some(vec![0]));
        assert_eq!(drops("abmk,kn,,,,,,,->an"), Some(vec![1, 2]));
        assert_eq!(drops("amk,kn,,,,,,,->man"), None);
        assert_eq!(drops("amk,kn,,,,,,,->anm"), None);
        assert_eq!(drops("amk,nk,,,,,,,->amn"), None);
        assert_eq!(drops("amk,kn->amn"), None);
        assert_eq!(drops("amk,kn,,,,,,a,->amn"), None);
        assert_eq!(drops("amk,akn,,,,,,,->amn"), None);
    }

    /// The op against the definition, `Σ (x - zero) · w`, rescaled or not, on shapes
    /// around the kernels' tiles.
    #[test]
    fn matches_the_definition() -> TractResult<()> {
        let mut seed = 7u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 24) as u8
        };
        for (lead, k, n) in [(vec![1], 1, 1), (vec![2, 16], 37, 20), (vec![3, 7], 64, 48)] {
            let rows: usize = lead.iter().product();
            let w: Vec<i8> = (0..k * n).map(|_| next() as i8).collect();
            let x: Vec<u8> = (0..rows * k).map(|_| next()).collect();
            let zero = next();
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.25 - 2.0).collect();
            let transposed: Vec<i8> = (0..n * k).map(|i| w[i % k * n + i / k]).collect();
            let gemm = Gemm::new(&Tensor::from_shape(&[n, k], &transposed)?, rows)?;
            if gemm.k4_panel().is_none() {
                eprintln!("{}: no K4 layout on this CPU", gemm.kernel());
                return Ok(());
            }
            let col_sums = (0..n)
                .map(|j| (0..k).map(|kk| i32::from(w[kk * n + j])).sum())
                .collect();
            let op = MatMulQ8Op {
                k,
                n,
                drops: tvec![],
                gemm: Arc::new(gemm),
                col_sums: Arc::new(col_sums),
                bias: Arc::new(vec![5; n]),
                output: Output::Accumulators,
                isa: Isa::detect(),
            };
            let mut shape = lead.clone();
            shape.push(k);
            let xt = Tensor::from_shape(&shape, &x)?;
            let want: Vec<i32> = (0..rows * n)
                .map(|at| {
                    let (m, j) = (at / n, at % n);
                    5 + (0..k)
                        .map(|kk| {
                            (i32::from(x[m * k + kk]) - i32::from(zero)) * i32::from(w[kk * n + j])
                        })
                        .sum::<i32>()
                })
                .collect();
            let ctx = EvalContext::out_of_plan();
            let inputs = || tvec!(xt.clone().into_tvalue(), tensor0(zero).into_tvalue());
            let got = op.eval(&ctx, inputs())?.remove(0);
            assert_eq!(got.shape()[..lead.len()], lead[..]);
            assert_eq!(got.try_as_plain_ram()?.as_slice::<i32>()?, &want[..]);

            let rescaled = op.clone().rescaled(bias.clone());
            let mut with_scale = inputs();
            with_scale.push(tensor1(&[0.5f32]).into_tvalue());
            let got = rescaled.eval(&ctx, with_scale)?.remove(0);
            let got = got.try_as_plain_ram()?;
            let got = got.as_slice::<f32>()?;
            for (at, (g, a)) in got.iter().zip(&want).enumerate() {
                assert_eq!(*g, *a as f32 * 0.5 + bias[at % n], "{k}×{n} at {at}");
            }
        }
        Ok(())
    }
}
