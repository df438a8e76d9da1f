//! `lut-u8`: a dequantize → per-channel float ops → quantize chain, as one table lookup.
//!
//! Quantization-aware-trained QDQ models (PaddleOCR's, onnxruntime's QDQ format with
//! fake-quantized activations) wrap every float op between two layers in its own
//! `DequantizeLinear → … → QuantizeLinear`: a convolution writes `u8`, then
//! `DQ → BatchNormalization → Relu → Q` brings it back to `u8`. Every op in such a chain is
//! element-wise, and its constants vary at most along the channel axis, so the chain maps
//! each `u8` value of each channel to one `u8` value: 256 entries per channel. The table is
//! computed at plan time by running the chain's own ops (cloned, with their constants) on
//! every value of every channel, so a lookup gives exactly what the chain gave, and the
//! three-to-six passes over the activation (one of them `f32`, four bytes a value) become
//! one pass over bytes.

use std::collections::HashMap;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;

use tern_kernels::lut::{lookup_u8, lookup_u8_in_place};
use tern_kernels::{Isa, Unsupported};

use super::conv::ConvQ8Op;
use super::depthwise::DepthwiseQ8Op;
use super::quant::QuantU8Op;
use super::{for_each_chunk, konst, reroute, TASK};

/// The largest table built (channels × 256 bytes).
const MAX_TABLE: usize = 1 << 20;

/// Replaces each `TernDequantizeU8 → element-wise f32 ops → TernQuantizeU8` chain by a
/// [`LutU8Op`] on the dequantize's input.
pub(super) fn pass(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    let order = model.eval_order()?;
    let position: HashMap<usize, usize> =
        order.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    for id in order {
        let node = model.node(id);
        if node
            .op_as::<QuantU8Op>()
            .is_none_or(|q| q.quantize().is_none())
        {
            continue;
        }
        let Some(chain) = chain_to(model, id, &position) else {
            continue;
        };
        let Some(table) = build_table(model, &chain)? else {
            continue;
        };
        let source = chain.source;
        reroute(model, id, &[source], vec![("lut", Box::new(table))])?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// Composes each table lookup of a table lookup (the second read by nothing else) into
/// one: `b[c][a[c][v]]` per channel, when both tables vary along the same axis or one of
/// them along none.
pub(super) fn compose_pass(model: &mut TypedModel) -> TractResult<usize> {
    let mut composed = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(outer) = node.op_as::<LutU8Op>() else {
            continue;
        };
        let first = model.node(node.inputs[0].node);
        let Some(inner) = first.op_as::<LutU8Op>() else {
            continue;
        };
        let alone = first.outputs[0].successors.len() == 1
            && !model.output_outlets()?.contains(&node.inputs[0]);
        let Some(table) = inner.then(outer).filter(|_| alone) else {
            continue;
        };
        let source = first.inputs[0];
        reroute(model, id, &[source], vec![("composed", Box::new(table))])?;
        composed += 1;
    }
    if composed > 0 {
        model.compact()?;
    }
    Ok(composed)
}

/// Folds each table lookup of a quantized layer's `u8` output (the layer's output read by
/// nothing else) into the layer, which then looks its rows up as it writes them, while
/// they are in cache: one pass over the activation fewer per layer (ppocr_cls int8: 54).
pub(super) fn fold_pass(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(lut) = node.op_as::<LutU8Op>() else {
            continue;
        };
        let source = node.inputs[0];
        let layer = model.node(source.node);
        if layer.outputs[0].successors.len() != 1 || model.output_outlets()?.contains(&source) {
            continue;
        }
        let rank = model.outlet_fact(source)?.rank();
        let op: Option<Box<dyn TypedOp>> = if let Some(conv) = layer.op_as::<ConvQ8Op>() {
            fold(conv, lut, rank).map(|op| Box::new(op) as _)
        } else if let Some(dw) = layer.op_as::<DepthwiseQ8Op>() {
            fold(dw, lut, rank).map(|op| Box::new(op) as _)
        } else {
            None
        };
        let Some(op) = op else {
            continue;
        };
        let inputs = layer.inputs.clone();
        reroute(model, id, &inputs, vec![("layer", op)])?;
        folded += 1;
    }
    if folded > 0 {
        model.compact()?;
    }
    Ok(folded)
}

/// `layer` with `lut` after its own table (if any), when it writes `u8` and the table
/// varies along its channels or along nothing.
fn fold<L: Tabled>(layer: &L, lut: &LutU8Op, rank: usize) -> Option<L> {
    if !layer.writes_u8() {
        return None;
    }
    // The channel axis of an NCHW output, or of one whose batch of 1 (and image axes, for
    // a 1×1 map) tract dropped: [N, C, H, W], [C, H, W], [N, C], [C].
    let axis = match rank {
        4 | 2 => 1,
        _ => 0,
    };
    let channels = lut.tables.channels;
    if channels != 1 && (lut.axis != axis || channels != layer.output_channels()) {
        return None;
    }
    let table = match layer.output_table() {
        Some(inner) => inner.then(&lut.tables),
        None => lut.tables.clone(),
    };
    Some(layer.with_output_table(table))
}

/// A quantized layer that can look its `u8` outputs up in an [`ChannelTables`].
pub(super) trait Tabled: Sized {
    /// Whether it writes `u8` (not `i32` accumulators or floats).
    fn writes_u8(&self) -> bool;
    /// Its output channels.
    fn output_channels(&self) -> usize;
    /// The table it applies, if any.
    fn output_table(&self) -> Option<&ChannelTables>;
    /// The same layer applying `table` to what it writes (its output plain `u8`).
    fn with_output_table(&self, table: ChannelTables) -> Self;
}

/// Per-channel 256-entry tables: a [`LutU8Op`]'s, or the ones a quantized layer applies
/// to the `u8` values it writes (a `lut-u8` table folded into the layer before it,
/// `lut-fold`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChannelTables {
    /// 1 (one table for every channel), or the layer's output channels.
    channels: usize,
    /// `channels` rows of 256 entries.
    table: Arc<Vec<u8>>,
}

impl ChannelTables {
    /// `y = table[channel][y]` over values of output channel `channel`.
    pub(super) fn apply(&self, isa: Isa, channel: usize, y: &mut [u8]) -> Result<(), Unsupported> {
        let c = if self.channels == 1 { 0 } else { channel };
        let row = self
            .table
            .get(c * 256..c * 256 + 256)
            .ok_or_else(|| Unsupported(format!("no table for channel {channel}")))?;
        lookup_u8_in_place(isa, row, y)
    }

    /// The table of channel `c` (every channel's when there is one).
    fn row(&self, c: usize) -> &[u8] {
        let c = if self.channels == 1 { 0 } else { c };
        &self.table[c * 256..c * 256 + 256]
    }

    /// `outer` after `self` (`outer[c][self[c][v]]`), per channel; with channels both, the
    /// same count.
    fn then(&self, outer: &ChannelTables) -> ChannelTables {
        let channels = self.channels.max(outer.channels);
        let mut table = Vec::with_capacity(channels * 256);
        for c in 0..channels {
            let (a, b) = (self.row(c), outer.row(c));
            table.extend(a.iter().map(|&v| b[usize::from(v)]));
        }
        ChannelTables {
            channels,
            table: Arc::new(table),
        }
    }
}

/// A region of element-wise float ops between dequantizes of one `u8` tensor and a
/// quantize.
struct Chain {
    /// The `u8` tensor every value of the region is a function of.
    source: OutletId,
    /// The dequantizes the region reads: each of the source, or of a table lookup of it
    /// (QAT's HardSwish: `DQ(x) · DQ(lut(x))`).
    dequantizes: Vec<usize>,
    /// The float ops that compute the quantize's input from the dequantize's output, in
    /// evaluation order (a DAG: HardSwish reads its input twice).
    ops: Vec<usize>,
    quantize: usize,
    /// The axis the constants vary along, and its size (`(0, 1)` when none does).
    axis: usize,
    channels: usize,
}

/// The most float ops a region may hold.
const MAX_OPS: usize = 24;

/// Walks back from the quantize node `q` through element-wise ops whose inputs are
/// constants varying along one axis at most (the channels: axis 1 of NCHW, 0 of the CHW
/// plans tern makes for one image) or other ops of the region, to `u8 → f32` dequantizes
/// of one `u8` tensor (or of one table lookup of it). `position` orders nodes as the model
/// evaluates them.
fn chain_to(model: &TypedModel, q: usize, position: &HashMap<usize, usize>) -> Option<Chain> {
    let start = model.node(q).inputs[0];
    let shape = model.outlet_fact(start).ok()?.shape.as_concrete()?.to_vec();
    let (mut axis, mut channels) = (0, 1);
    let mut dequantizes: Vec<usize> = Vec::new();
    let mut ops: Vec<usize> = Vec::new();
    let mut stack = vec![start];
    // Merges a constant's (or a table's) varying axis into the region's.
    let mut vary = |a: usize, d: usize| -> Option<()> {
        if d == 1 {
            return Some(());
        }
        if d != shape[a] || (channels > 1 && a != axis) {
            return None;
        }
        (axis, channels) = (a, d);
        Some(())
    };
    while let Some(outlet) = stack.pop() {
        let node = model.node(outlet.node);
        if outlet.slot != 0 || ops.contains(&node.id) || dequantizes.contains(&node.id) {
            continue;
        }
        if node
            .op_as::<QuantU8Op>()
            .is_some_and(|op| op.quantize().is_none())
        {
            dequantizes.push(node.id);
            continue;
        }
        let pointwise = node.op_is::<ElementWiseOp>() || node.op_is::<TypedBinOp>();
        let fact = &node.outputs.first()?.fact;
        if ops.len() >= MAX_OPS
            || !pointwise
            || node.outputs.len() != 1
            || fact.datum_type != f32::datum_type()
            || fact.shape.as_concrete()? != shape.as_slice()
        {
            return None;
        }
        for (slot, input) in node.inputs.iter().enumerate() {
            match konst(model, node, slot) {
                Some(k) => {
                    if k.rank() != shape.len() {
                        return None;
                    }
                    for (a, &d) in k.shape().iter().enumerate() {
                        vary(a, d)?;
                    }
                }
                None => stack.push(*input),
            }
        }
        ops.push(node.id);
    }
    // The source: the one tensor every dequantize reads, itself or through a table.
    let inputs: Vec<OutletId> = dequantizes
        .iter()
        .map(|&dq| model.node(dq).inputs[0])
        .collect();
    let through_table = |i: &OutletId| -> Option<(OutletId, &LutU8Op)> {
        let node = model.node(i.node);
        let table = node.op_as::<LutU8Op>()?;
        Some((*node.inputs.first()?, table))
    };
    let source = *inputs.iter().find(|&&s| {
        inputs
            .iter()
            .all(|i| *i == s || through_table(i).is_some_and(|(x, _)| x == s))
    })?;
    if model.outlet_fact(source).ok()?.shape.as_concrete()? != shape.as_slice() {
        return None;
    }
    for i in inputs.iter().filter(|&&i| i != source) {
        let (_, table) = through_table(i)?;
        vary(table.axis, table.tables.channels)?;
    }
    ops.sort_by_key(|id| position.get(id).copied().unwrap_or(usize::MAX));
    Some(Chain {
        source,
        dequantizes,
        ops,
        quantize: q,
        axis,
        channels,
    })
}

/// Runs the region's ops (cloned, with their constants) on every `u8` value of every
/// channel: `[256, 1, …, channels, …, 1]` in (the region's rank plus a leading axis of the
/// 256 values; its constants get the leading axis too), the table out.
fn build_table(model: &TypedModel, chain: &Chain) -> TractResult<Option<LutU8Op>> {
    let q = model.node(chain.quantize);
    let rank = model.outlet_fact(q.inputs[0])?.rank();
    if chain.channels * 256 > MAX_TABLE {
        return Ok(None);
    }
    let mut shape = vec![1usize; rank + 1];
    shape[0] = 256;
    shape[chain.axis + 1] = chain.channels;
    let mut tiny = TypedModel::default();
    let source = tiny.add_source("x", u8::fact(&shape))?;
    let mut wired: HashMap<OutletId, OutletId> = HashMap::new();
    for &id in &chain.dequantizes {
        let dq = model.node(id);
        let mut at = source;
        if dq.inputs[0] != chain.source {
            // Through a table of the source: the same table, with the leading axis.
            let lookup = model.node(dq.inputs[0].node);
            let table = lookup
                .op_as::<LutU8Op>()
                .context("a dequantize reads outside its region")?;
            let shifted = LutU8Op {
                axis: table.axis + 1,
                ..table.clone()
            };
            at = tiny.wire_node(&lookup.name, shifted, &[at])?[0];
        }
        wired.insert(
            OutletId::new(id, 0),
            tiny.wire_node(&dq.name, dq.op.clone(), &[at])?[0],
        );
    }
    for &id in chain.ops.iter().chain([chain.quantize].iter()) {
        let node = model.node(id);
        let mut inputs = tvec!();
        for (slot, input) in node.inputs.iter().enumerate() {
            match konst(model, node, slot) {
                // It varies along the channels at most: with the leading axis, it
                // broadcasts over the table's input.
                Some(k) => {
                    let mut k = (*k).clone();
                    k.insert_axis(0)?;
                    inputs.push(tiny.add_const(format!("{}.{slot}", node.name), k)?)
                }
                None => inputs.push(
                    *wired
                        .get(input)
                        .with_context(|| format!("{} reads outside its region", node.name))?,
                ),
            }
        }
        let out = tiny.wire_node(&node.name, node.op.clone(), &inputs)?[0];
        wired.insert(OutletId::new(id, 0), out);
    }
    let at = wired[&OutletId::new(chain.quantize, 0)];
    tiny.select_output_outlets(&[at])?;
    let mut x = Tensor::zero::<u8>(&shape)?;
    {
        let mut view = x.try_as_plain_ram_mut()?;
        let xs = view.as_slice_mut::<u8>()?;
        for v in 0..256 {
            for c in 0..chain.channels {
                xs[v * chain.channels + c] = v as u8;
            }
        }
    }
    let out = tiny.into_runnable()?.run(tvec!(x.into_tvalue()))?;
    let out = out[0].try_as_plain_ram()?;
    let ys = out.as_slice::<u8>()?;
    // Transposed to one 256-entry row per channel.
    let mut table = vec![0u8; chain.channels * 256];
    for v in 0..256 {
        for c in 0..chain.channels {
            table[c * 256 + v] = ys[v * chain.channels + c];
        }
    }
    Ok(Some(LutU8Op {
        isa: Isa::detect(),
        axis: chain.axis,
        tables: ChannelTables {
            channels: chain.channels,
            table: Arc::new(table),
        },
    }))
}

/// `y = table[channel][x]` over a `u8` tensor (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LutU8Op {
    isa: Isa,
    /// The channel axis.
    axis: usize,
    /// A row per channel along it (or one row for every value).
    tables: ChannelTables,
}

impl LutU8Op {
    /// One table for every value of a tensor.
    pub(super) fn per_tensor(table: [u8; 256]) -> LutU8Op {
        LutU8Op {
            isa: Isa::detect(),
            axis: 0,
            tables: ChannelTables {
                channels: 1,
                table: Arc::new(table.to_vec()),
            },
        }
    }

    /// The table of `outer` after `self` (`outer[c][self[c][v]]`), or `None` when the
    /// two vary along different axes.
    fn then(&self, outer: &LutU8Op) -> Option<LutU8Op> {
        let axis = match (self.tables.channels, outer.tables.channels) {
            (1, _) => outer.axis,
            (_, 1) => self.axis,
            (a, b) if a == b && self.axis == outer.axis => self.axis,
            _ => return None,
        };
        Some(LutU8Op {
            isa: self.isa,
            axis,
            tables: self.tables.then(&outer.tables),
        })
    }
}

impl Op for LutU8Op {
    fn name(&self) -> StaticName {
        "TernLutU8".into()
    }

    op_as_typed_op!();
}

impl EvalOp for LutU8Op {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.first().context("a table lookup takes one input")?;
        let shape = x.shape();
        // Values per channel run: the product of the axes after the channel axis.
        let channels = self.tables.channels;
        let inner: usize = if channels == 1 {
            x.len().max(1)
        } else {
            ensure!(
                shape.get(self.axis) == Some(&channels),
                "table of {} channels along axis {} for a tensor of shape {shape:?}",
                channels,
                self.axis
            );
            shape[self.axis + 1..].iter().product::<usize>().max(1)
        };
        let xs = x.try_as_plain_ram()?;
        let xs = xs.as_slice::<u8>()?;
        let mut y = Tensor::zero::<u8>(shape)?;
        let mut view = y.try_as_plain_ram_mut()?;
        let ys = view.as_slice_mut::<u8>()?;
        let piece = TASK.div_ceil(inner).max(1) * inner;
        for_each_chunk(ys, piece, |(i, y)| -> TractResult<()> {
            let start = i * piece;
            for (j, run) in y.chunks_mut(inner).enumerate() {
                let at = start + j * inner;
                let c = (at / inner) % channels;
                lookup_u8(self.isa, self.tables.row(c), &xs[at..at + run.len()], run)
                    .map_err(|e| anyhow::anyhow!(e))?;
            }
            Ok(())
        })?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for LutU8Op {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == u8::datum_type(),
            "a table lookup reads u8"
        );
        Ok(tvec!(u8::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math;
    use tract_onnx::tract_core::ops::quant::{quantize_linear_u8, DequantizeLinearF32};

    /// `x: u8` → dequantize → × and + per channel along `axis` → HardSwish as a DAG
    /// (`x · min(max(x + 3, 0), 6) / 6`, reading its input twice) → quantize. With
    /// `spread`, the second constant also varies along another axis (no table can hold it).
    fn chain(shape: &[usize], axis: usize, spread: bool) -> TractResult<TypedModel> {
        let mut m = TypedModel::default();
        let x = m.add_source("x", u8::fact(shape))?;
        let dq = DequantizeLinearF32 {
            scale: 0.05,
            zero_point: 121,
        };
        let mut at = m.wire_node("dq", dq, &[x])?[0];
        let per_channel = |m: &mut TypedModel, name: &str, base: f32, spread: bool| {
            let mut kshape = vec![1usize; shape.len()];
            kshape[axis] = shape[axis];
            if spread {
                let other = (axis + 1) % shape.len();
                kshape[other] = shape[other];
            }
            let n: usize = kshape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| base + 0.37 * i as f32).collect();
            let t = tensor1(&values).into_shape(&kshape)?;
            m.add_const(name, t)
        };
        let scalar = |m: &mut TypedModel, name: &str, v: f32| {
            let t = tensor0(v).broadcast_into_rank(shape.len())?;
            m.add_const(name, t)
        };
        let k = per_channel(&mut m, "scale", -1.3, false)?;
        at = m.wire_node("scale.mul", math::mul(), &[at, k])?[0];
        let k = per_channel(&mut m, "shift", 0.4, spread)?;
        at = m.wire_node("shift.add", math::add(), &[at, k])?[0];
        let three = scalar(&mut m, "three", 3.0)?;
        let zero = scalar(&mut m, "zero", 0.0)?;
        let six = scalar(&mut m, "six", 6.0)?;
        let sixth = scalar(&mut m, "sixth", 1.0 / 6.0)?;
        let t = m.wire_node("hs.add", math::add(), &[at, three])?[0];
        let t = m.wire_node("hs.max", math::max(), &[t, zero])?[0];
        let t = m.wire_node("hs.min", math::min(), &[t, six])?[0];
        let t = m.wire_node("hs.mul", math::mul(), &[at, t])?[0];
        let t = m.wire_node("hs.div", math::mul(), &[t, sixth])?[0];
        let y = m.wire_node("q", quantize_linear_u8(1.0 / 0.03, 97), &[t])?[0];
        m.select_output_outlets(&[y])?;
        Ok(m)
    }

    fn run(m: TypedModel, shape: &[usize]) -> TractResult<Vec<u8>> {
        let n: usize = shape.iter().product();
        let x: Vec<u8> = (0..n).map(|i| ((i * 37 + 11) % 256) as u8).collect();
        let x = tensor1(&x).into_shape(shape)?;
        let y = m.into_runnable()?.run(tvec!(x.into_tvalue()))?;
        Ok(y[0].try_as_plain_ram()?.as_slice::<u8>()?.to_vec())
    }

    /// The table gives, byte for byte, what the chain's own ops gave (tract's scalar
    /// quantize and dequantize, its float ops), for NCHW (channels on axis 1), the CHW
    /// plans of one image (axis 0) and a rank-1 vector; a constant varying along two axes
    /// leaves the chain alone.
    #[test]
    fn a_table_gives_what_the_chain_gave() -> TractResult<()> {
        for (shape, axis) in [(vec![2, 3, 4, 5], 1), (vec![3, 4, 5], 0), (vec![6], 0)] {
            let original = chain(&shape, axis, false)?;
            let mut rewritten = original.clone();
            super::super::quant::pass(&mut rewritten)?;
            assert_eq!(pass(&mut rewritten)?, 1, "{shape:?}");
            assert!(rewritten.nodes().iter().any(|n| n.op_is::<LutU8Op>()));
            assert_eq!(run(original, &shape)?, run(rewritten, &shape)?, "{shape:?}");
        }
        let mut spread = chain(&[2, 3, 4, 5], 1, true)?;
        super::super::quant::pass(&mut spread)?;
        assert_eq!(pass(&mut spread)?, 0);
        Ok(())
    }

    /// QAT's HardSwish: `Q(DQ(x) · DQ(lut(x)))`, a region reading its tensor directly and
    /// through a per-channel table, then a table after it: one composed table, byte for
    /// byte what the ops gave.
    #[test]
    fn a_region_through_a_table_and_a_table_of_a_table_are_one_table() -> TractResult<()> {
        let shape = [2usize, 3, 4, 5];
        let mut m = TypedModel::default();
        let x = m.add_source("x", u8::fact(shape))?;
        let table: Vec<u8> = (0..3 * 256)
            .map(|i| ((i * 7 + i / 256 * 31) % 256) as u8)
            .collect();
        let lut = LutU8Op {
            isa: Isa::detect(),
            axis: 1,
            tables: ChannelTables {
                channels: 3,
                table: Arc::new(table),
            },
        };
        let clipped = m.wire_node("clip.lut", lut, &[x])?[0];
        let dq = |scale: f32, zero_point: i32| DequantizeLinearF32 { scale, zero_point };
        let a = m.wire_node("dq.x", dq(0.05, 121), &[x])?[0];
        let b = m.wire_node("dq.clip", dq(0.02, 3), &[clipped])?[0];
        let t = m.wire_node("mul", math::mul(), &[a, b])?[0];
        let t = m.wire_node("q", quantize_linear_u8(1.0 / 0.04, 90), &[t])?[0];
        let t = m.wire_node("dq.after", dq(0.04, 90), &[t])?[0];
        let sixth = m.add_const("sixth", tensor0(1.0f32 / 6.0).broadcast_into_rank(4)?)?;
        let t = m.wire_node("div", math::mul(), &[t, sixth])?[0];
        let y = m.wire_node("q.after", quantize_linear_u8(1.0 / 0.01, 7), &[t])?[0];
        m.select_output_outlets(&[y])?;

        let mut rewritten = m.clone();
        super::super::quant::pass(&mut rewritten)?;
        assert_eq!(pass(&mut rewritten)?, 2);
        assert_eq!(compose_pass(&mut rewritten)?, 1);
        let lookups = rewritten
            .nodes()
            .iter()
            .filter(|n| n.op_is::<LutU8Op>())
            .count();
        let others = rewritten.nodes().len() - lookups - 1;
        assert_eq!((lookups, others), (1, 0), "one table from the source");
        assert_eq!(run(m, &shape)?, run(rewritten, &shape)?);
        Ok(())
    }
}
