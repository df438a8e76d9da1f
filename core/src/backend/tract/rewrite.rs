//! tern's own ops in tract plans: rewrites that hand layers to `tern-kernels`.
//!
//! Each rewrite runs on the decluttered typed model, before tract's optimizer would lower
//! the layer to its generic kernels, and replaces a node only when every parameter the
//! kernel needs is a constant of the expected type and every shape it needs is concrete;
//! anything else stays with tract. The passes are listed in [`PASSES`], run in that order
//! by the CPU backend's compiler; each lives in a file with its op:
//!
//! - `depthwise-q8` ([`depthwise`]): a quantized convolution with one `u8` input channel
//!   per group (ONNX `QLinearConv` with `group == channels`, as in MobileNet's depthwise
//!   layers). tract would run it as C one-row matrix products over a materialised im2col
//!   plus separate zero-point correction ops.
//! - `conv-q8` ([`conv`]): any other quantized convolution with one group (pointwise and
//!   full convolutions), as im2col → tract-linalg's int8 matrix product (VNNI where the
//!   CPU has it) with the zero points and bias folded into one per-channel term → a
//!   vectorised requantization. tract would correct the zero points with separate graph
//!   ops and requantize with a scalar loop.
//! - `matmul-q8` ([`matmul`]): ONNX `MatMulInteger` by constant weights (dynamically
//!   quantized linear layers) on the same int8 product, the activations' rows packed as
//!   its columns, with the `Cast → Mul(scale) → Add(bias)` after it folded in. tract
//!   would correct the zero points with separate ops and run three passes after it.
//! - `depthwise-f32` ([`depthwise_f32`]): a float depthwise convolution on `tern-kernels`'
//!   direct kernel (tract's generic one takes a slow path on every border output).
//! - `conv-f32` ([`conv_f32`]): any other float convolution with one group, as im2col (none
//!   for a 1×1 one: the image is its matrix) → tract-linalg's f32 product, image by image
//!   (tract moves the batch axis next to the spatial ones first, a copy per layer).
//!   Both float ops take the `epilogue` pass, so a convolution's bias, BatchNormalization
//!   and activation are one pass over its output instead of one per op.
//! - `rescale-f32` ([`epilogue`]): the `Cast → Mul → Add` QDQ fusion writes after an `i32`
//!   convolution (one-group or depthwise, whose output stays float) folded into that
//!   convolution's epilogue.
//! - `quant-u8` ([`quant`]): the `f32 ↔ u8` quantize and dequantize passes left between
//!   quantized layers, vectorised (tract's are scalar loops).
//! - `quant-dynamic` ([`quant`]): ONNX `DynamicQuantizeLinear` (the range, scale and
//!   bytes before each `MatMulInteger` of a dynamically quantized model), vectorised.
//! - `epilogue` ([`epilogue`]): the float ops after a `rescale-f32` or float convolution
//!   folded into its epilogue (`tern_kernels::epilogue`): an unfolded BatchNormalization, Relu/Clip,
//!   HardSwish, and the quantization for the next int8 layer, so the layer writes `u8`.
//! - `lut-u8` ([`lut`]): a dequantize → element-wise float ops (constants varying at most
//!   along the channels) → quantize chain, as quantization-aware-trained QDQ models put
//!   around every BatchNormalization and activation, as one per-channel 256-entry table
//!   computed by running the chain's own ops on every value. A region may read its `u8`
//!   tensor through several dequantizes, directly or through a table already built
//!   (QAT's HardSwish: `DQ(x) · DQ(lut(x))`).
//! - `lut-compose` ([`lut`]): a table lookup of a table lookup as one table.
//! - `lut-fold` ([`lut`]): a table lookup of a quantized layer's output done by the layer
//!   itself, on each row or plane as it writes it.
//! - `binary-u8` ([`binary`]): `Q(DQ(a) + DQ(b))` and `Q(DQ(a) · DQ(b))` (residual Adds,
//!   squeeze-and-excitation Muls with one value per channel) on bytes, the float tensors
//!   never written.
//! - `mean-u8` ([`pool`]): GlobalAveragePool's `Q(Σ DQ(x) / n)` as an integer sum.
//! - `maxpool-u8` ([`pool`]): `Q(MaxPool(DQ(x)))` as a MaxPool on bytes (and a table).
//! - `maxpool` ([`maxpool`]): 2-D max pools over `f32` or `u8` planes on tern's kernel.
//! - `softmax` ([`softmax`]): an f32 softmax over the last axis, one vectorised pass per
//!   row (tract calls three generic kernels per row: slow on an attention's short rows).

mod binary;
mod conv;
mod conv_f32;
mod depthwise;
mod depthwise_f32;
mod epilogue;
mod lut;
mod matmul;
mod maxpool;
mod pool;
mod quant;
mod softmax;

use std::sync::Arc;

use rayon::prelude::*;
use tract_linalg::multithread::{current_tract_executor, Executor};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::DataFormat;

use tern_kernels::Geometry;

/// A rewrite of the typed model: returns how many nodes it replaced.
type Pass = fn(&mut TypedModel) -> TractResult<usize>;

/// The rewrites, by name, in the order they run (between declutter and optimize).
pub(crate) const PASSES: &[(&str, Pass)] = &[
    ("depthwise-q8", depthwise::pass),
    ("conv-q8", conv::pass),
    ("matmul-q8", matmul::pass),
    ("depthwise-f32", depthwise_f32::pass),
    ("conv-f32", conv_f32::pass),
    ("rescale-f32", epilogue::rescale_pass),
    ("quant-u8", quant::pass),
    ("quant-dynamic", quant::dynamic_pass),
    ("epilogue", epilogue::pass),
    ("maxpool-u8", pool::maxpool_pass),
    ("maxpool", maxpool::pass),
    ("lut-u8", lut::pass),
    ("lut-compose", lut::compose_pass),
    ("lut-fold", lut::fold_pass),
    ("binary-u8", binary::binary_pass),
    ("mean-u8", pool::mean_pass),
    ("softmax", softmax::pass),
];

/// Runs every pass; returns `(name, nodes replaced)` for those that replaced any.
pub(crate) fn run_passes(model: &mut TypedModel) -> TractResult<Vec<(&'static str, usize)>> {
    let mut done = Vec::new();
    for (name, pass) in PASSES {
        let n = pass(model)?;
        if n > 0 {
            done.push((*name, n));
        }
    }
    Ok(done)
}

/// Replaces every node that `make` builds an op for by that op, reading the node's inputs;
/// returns how many it replaced.
fn replace_each<O: TypedOp>(
    model: &mut TypedModel,
    make: impl Fn(&TypedModel, &TypedNode) -> TractResult<Option<O>>,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = make(model, node)? else {
            continue;
        };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// Replaces every quantized convolution that `make` builds an op for (reading its input 0
/// alone); returns how many it replaced.
fn replace_qconvs<O: TypedOp>(
    model: &mut TypedModel,
    make: impl Fn(QConv) -> Option<O>,
) -> TractResult<usize> {
    replace_convs(model, qconv, make)
}

/// Replaces every float convolution that `make` builds an op for (reading its input 0
/// alone); returns how many it replaced.
fn replace_fconvs<O: TypedOp>(
    model: &mut TypedModel,
    make: impl Fn(FConv) -> Option<O>,
) -> TractResult<usize> {
    replace_convs(model, fconv, make)
}

/// Replaces every node that `read` describes and `make` builds an op for (reading its
/// input 0 alone); returns how many it replaced.
fn replace_convs<C, O: TypedOp>(
    model: &mut TypedModel,
    read: fn(&TypedModel, &TypedNode) -> Option<C>,
    make: impl Fn(C) -> Option<O>,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = read(model, node).and_then(&make) else {
            continue;
        };
        let name = node.name.clone();
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs[..1], op)
            .with_context(|| format!("rewriting {name}"))?;
        patch.apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        // The old convolutions' constant inputs are read by nothing now.
        model.compact()?;
    }
    Ok(replaced)
}

/// Makes the consumers of node `id`'s output read instead the last of `ops`, chained from
/// `inputs` (the first op reads `inputs`, each next one its predecessor's output), each
/// named after the node with its suffix.
fn reroute(
    model: &mut TypedModel,
    id: usize,
    inputs: &[OutletId],
    ops: Vec<(&str, Box<dyn TypedOp>)>,
) -> TractResult<()> {
    let name = model.node(id).name.clone();
    let mut patch = TypedModelPatch::default();
    let mut wires = inputs
        .iter()
        .map(|&i| patch.tap_model(model, i))
        .collect::<TractResult<TVec<_>>>()?;
    for (suffix, op) in ops {
        wires = patch.wire_node(format!("{name}.{suffix}"), op, &wires)?;
    }
    let out = *wires.first().context("nothing to reroute to")?;
    patch.shunt_outside(model, id.into(), out)?;
    patch.apply(model)
}

/// Elements per task when an op splits its work over the session's pool: enough that a
/// task outweighs its scheduling.
const TASK: usize = 16 * 1024;

/// Runs `f` on each `chunk`-long piece of `data` with its index: on the session's pool
/// when this run has one (the plan's thread race decides), else on the calling thread.
fn for_each_chunk<T: Send, E: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn((usize, &mut [T])) -> Result<(), E> + Send + Sync,
) -> Result<(), E> {
    match current_tract_executor() {
        Executor::MultiThread(pool) => {
            pool.install(|| data.par_chunks_mut(chunk).enumerate().try_for_each(f))
        }
        _ => data.chunks_mut(chunk).enumerate().try_for_each(f),
    }
}

/// Runs `f` on each `plane`-long piece of `data` with its index, several planes to a task
/// (enough that a task outweighs its scheduling, as [`for_each_chunk`] splits them), each
/// task with a `scratch` of its own that `f` may reuse from plane to plane.
fn for_each_plane<T: Send, S: Default, E: Send>(
    data: &mut [T],
    plane: usize,
    f: impl Fn(&mut S, usize, &mut [T]) -> Result<(), E> + Send + Sync,
) -> Result<(), E> {
    if plane == 0 {
        return Ok(());
    }
    let per_task = (TASK / plane).max(1);
    for_each_chunk(data, per_task * plane, |(t, planes)| {
        let mut scratch = S::default();
        planes
            .chunks_mut(plane)
            .enumerate()
            .try_for_each(|(j, y)| f(&mut scratch, t * per_task + j, y))
    })
}

/// A constant input of `node`, if it is one.
fn konst(model: &TypedModel, node: &TypedNode, slot: usize) -> Option<Arc<Tensor>> {
    model
        .outlet_fact(*node.inputs.get(slot)?)
        .ok()?
        .konst
        .clone()
}

/// A constant's values as `T`, flattened (`None` if they are not in plain memory or not
/// `T`).
fn plain_vec<T: Datum + Copy>(t: &Tensor) -> Option<Vec<T>> {
    Some(t.try_as_plain_ram().ok()?.as_slice::<T>().ok()?.to_vec())
}

/// The values of a constant scalar or vector input of type `T`.
fn values<T: Datum + Copy>(model: &TypedModel, node: &TypedNode, slot: usize) -> Option<Vec<T>> {
    let t = konst(model, node, slot)?;
    if t.datum_type() != T::datum_type() || t.rank() > 1 {
        return None;
    }
    plain_vec(&t)
}

/// Everything a quantized 2-D convolution (`u8` in and out, `i8` weights, NCHW/OIHW,
/// concrete shapes, constant parameters) needs from its tract node.
#[derive(Debug, Clone)]
struct QConv {
    geometry: Geometry,
    /// Output height and width.
    out: [usize; 2],
    group: usize,
    output_channels: usize,
    /// `[output_channels, channels / group, kh, kw]`, flattened.
    weights: Vec<i8>,
    /// One per output channel.
    bias: Vec<i32>,
    x_zero: u8,
    /// One, or one per output channel.
    w_zero: Vec<i8>,
    /// `x_scale · w_scale[c] / y_scale`: one, or one per output channel.
    scale: Vec<f32>,
    y_zero: u8,
    /// The output's datum type (`u8`, or `QU8` with the layer's output quantization, or
    /// `i32` accumulators).
    output_type: DatumType,
    /// The output's concrete shape, as the node states it.
    output_shape: TVec<usize>,
}

/// Everything a float 2-D convolution (f32, NCHW/OIHW, one group or depthwise, concrete
/// shapes, constant weights and bias) needs from its tract node.
#[derive(Debug, Clone)]
struct FConv {
    geometry: Geometry,
    /// Output height and width.
    out: [usize; 2],
    group: usize,
    output_channels: usize,
    /// `[output_channels, channels / group, kh, kw]`, flattened.
    weights: Vec<f32>,
    /// One per output channel (zeros where the node has none).
    bias: Vec<f32>,
    /// The output's concrete shape, as the node states it.
    output_shape: TVec<usize>,
}

/// The shape of a convolution as its tract op states it.
struct Layout {
    geometry: Geometry,
    group: usize,
    output_channels: usize,
    /// The weights' shape, as the op holds them.
    weight_shape: TVec<usize>,
    /// The quantized output type (`None` for a float convolution).
    q_params: Option<DatumType>,
}

/// The concrete `[N, C, H, W]` shape of `node`'s first input, if it is one.
fn nchw(model: &TypedModel, node: &TypedNode) -> Option<[usize; 4]> {
    let fact = model.outlet_fact(*node.inputs.first()?).ok()?;
    match *fact.shape.as_concrete()? {
        [n, c, h, w] => Some([n, c, h, w]),
        // A batch of 1 that tract's declutter dropped.
        [c, h, w] => Some([1, c, h, w]),
        _ => None,
    }
}

/// The layout of an NCHW (or CHW) / OIHW 2-D `Conv` with concrete input shape.
fn conv_layout(model: &TypedModel, node: &TypedNode, conv: &Conv) -> Option<Layout> {
    let channels = conv.input_channels();
    let group = conv.group;
    if conv.kernel_fmt != KernelFormat::OIHW
        // NCHW, or CHW where tract's declutter dropped a batch of 1.
        || ![DataFormat::NCHW, DataFormat::CHW].contains(&conv.pool_spec.data_format)
        || conv.pool_spec.kernel_shape.len() != 2
        || group == 0
        || !channels.is_multiple_of(group)
    {
        return None;
    }
    let [_, c, h, w] = nchw(model, node)?;
    if c != channels {
        return None;
    }
    let [kh, kw] = [
        conv.pool_spec.kernel_shape[0],
        conv.pool_spec.kernel_shape[1],
    ];
    let padding = conv.pool_spec.computed_padding(&[h, w]);
    let geometry = Geometry {
        channels,
        input: [h, w],
        kernel: [kh, kw],
        strides: [conv.pool_spec.stride(0), conv.pool_spec.stride(1)],
        dilations: [conv.pool_spec.dilation(0), conv.pool_spec.dilation(1)],
        pads: [
            padding[0].pad_before,
            padding[1].pad_before,
            padding[0].pad_after,
            padding[1].pad_after,
        ],
    };
    if geometry.check().ok()? != [padding[0].convoluted, padding[1].convoluted] {
        return None;
    }
    let output_channels = conv.output_channels();
    Some(Layout {
        geometry,
        group,
        output_channels,
        weight_shape: tvec![output_channels, channels / group, kh, kw],
        q_params: conv.q_params,
    })
}

/// The layout of a 1×1 convolution that tract's declutter turned into an `EinSum`
/// (`NIHW,OI,…->NOHW`: for a quantized one, the same nine inputs as the convolution; for a
/// float one, the image and the weights, its bias an `Add` after it; a batch of 1 may
/// have lost its `N` on either side). On a 1×1 map (a squeeze-and-excitation layer) the
/// declutter also drops `HW` from the input or the output (`NI,OI->NOHW`,
/// `NIHW,OI->NO`): the same product, one column per image.
fn pointwise_layout(model: &TypedModel, node: &TypedNode, einsum: &EinSum) -> Option<Layout> {
    let axes = einsum.axes.to_string();
    let (inputs, output) = axes.split_once("->")?;
    let mut inputs = inputs.split(',');
    let input = inputs.next()?;
    if !(["NIHW", "IHW", "NI", "I"].contains(&input)
        && inputs.next()? == "OI"
        && ["NOHW", "OHW", "NO", "O"].contains(&output))
    {
        return None;
    }
    // Batch and image axes tract dropped (a squeeze-and-excitation's 1×1 convolutions
    // over a pooled [C] or [N, C]) are of size 1.
    let [_, c, h, w] = match input {
        "NI" | "I" => match *model
            .outlet_fact(*node.inputs.first()?)
            .ok()?
            .shape
            .as_concrete()?
        {
            [n, c] => [n, c, 1, 1],
            [c] => [1, c, 1, 1],
            _ => return None,
        },
        _ => nchw(model, node)?,
    };
    // Without `HW` on one side, the map must be 1×1 on the other.
    if (!input.ends_with("HW") || !output.ends_with("HW")) && [h, w] != [1, 1] {
        return None;
    }
    let weights = model.outlet_fact(*node.inputs.get(1)?).ok()?;
    let [o, i] = weights.shape.as_concrete()? else {
        return None;
    };
    if *i != c {
        return None;
    }
    Some(Layout {
        geometry: Geometry {
            channels: c,
            input: [h, w],
            kernel: [1, 1],
            strides: [1, 1],
            dilations: [1, 1],
            pads: [0; 4],
        },
        group: 1,
        output_channels: *o,
        weight_shape: tvec![*o, c],
        q_params: einsum.q_params,
    })
}

/// A bias as one value per output channel: `none` for each when there is none, a scalar
/// repeated; `None` for any other length.
fn per_output_channel<T: Copy>(values: Vec<T>, channels: usize, none: T) -> Option<Vec<T>> {
    match values.len() {
        0 => Some(vec![none; channels]),
        1 => Some(vec![values[0]; channels]),
        n if n == channels => Some(values),
        _ => None,
    }
}

/// The layout of the convolution `node` is (a `Conv`, or a 1×1 one decluttered to an
/// `EinSum`), if it is one tern's kernels could take.
fn layout(model: &TypedModel, node: &TypedNode) -> Option<Layout> {
    if let Some(conv) = node.op_as::<Conv>() {
        conv_layout(model, node, conv)
    } else if let Some(einsum) = node.op_as::<EinSum>() {
        pointwise_layout(model, node, einsum)
    } else {
        None
    }
}

/// The float convolution `node` is, if tern's kernels can take it: f32 in and out, one
/// group or depthwise (one input channel per group), constant weights and bias, concrete
/// shapes.
fn fconv(model: &TypedModel, node: &TypedNode) -> Option<FConv> {
    let Layout {
        geometry,
        group,
        output_channels,
        weight_shape,
        q_params,
    } = layout(model, node)?;
    let f32_type = f32::datum_type();
    let x = model.outlet_fact(node.inputs[0]).ok()?;
    let depthwise = group == geometry.channels && output_channels == group;
    if q_params.is_some()
        || x.datum_type != f32_type
        || node.outputs[0].fact.datum_type != f32_type
        || !(group == 1 || depthwise)
    {
        return None;
    }
    let weights = konst(model, node, 1)?;
    if weights.datum_type() != f32_type || weights.shape() != &*weight_shape {
        return None;
    }
    // A Conv has its bias as input 2; a decluttered 1×1 one has it in an Add after it
    // (which the `epilogue` pass folds).
    let bias = match node.inputs.len() {
        2 if node.op_is::<EinSum>() => Vec::new(),
        3 if node.op_is::<Conv>() => {
            let bias = konst(model, node, 2)?;
            (bias.datum_type() == f32_type && bias.rank() <= 1).then_some(())?;
            plain_vec::<f32>(&bias)?
        }
        _ => return None,
    };
    let bias = per_output_channel(bias, output_channels, 0.0)?;
    Some(FConv {
        geometry,
        out: geometry.output()?,
        group,
        output_channels,
        weights: plain_vec::<f32>(&weights)?,
        bias,
        output_shape: node.outputs[0].fact.shape.as_concrete()?.into(),
    })
}

/// The quantized convolution `node` is (a `Conv`, or a 1×1 one decluttered to an
/// `EinSum`), if tern's kernels can take it: `u8` in and out, `i8` weights, constant
/// parameters, concrete shapes.
fn qconv(model: &TypedModel, node: &TypedNode) -> Option<QConv> {
    let Layout {
        geometry,
        group,
        output_channels,
        weight_shape,
        q_params,
    } = layout(model, node)?;
    let out_type = q_params?;
    let x = model.outlet_fact(node.inputs[0]).ok()?;
    // u8 out (QLinearConv), or the raw i32 accumulators (ConvInteger).
    let raw = out_type == i32::datum_type();
    if !(out_type.unquantized() == u8::datum_type() || raw)
        || x.datum_type.unquantized() != u8::datum_type()
        || !output_channels.is_multiple_of(group)
        || node.inputs.len() != 9
    {
        return None;
    }
    let weights = konst(model, node, 1)?;
    if weights.datum_type().unquantized() != i8::datum_type() || weights.shape() != &*weight_shape {
        return None;
    }
    let weights = plain_vec::<i8>(&weights)?;
    let bias = values::<i32>(model, node, 2)?;
    let bias = per_output_channel(bias, output_channels, 0)?;
    let x_zero = u8::try_from(*values::<i32>(model, node, 3)?.first()?).ok()?;
    let x_scale = *values::<f32>(model, node, 4)?.first()?;
    let w_zero = values::<i32>(model, node, 5)?
        .into_iter()
        .map(i8::try_from)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let w_scale = values::<f32>(model, node, 6)?;
    let y_zero = u8::try_from(*values::<i32>(model, node, 7)?.first()?).ok()?;
    let y_scale = *values::<f32>(model, node, 8)?.first()?;
    if y_scale.is_nan()
        || y_scale <= 0.0
        || ![1, output_channels].contains(&w_scale.len())
        || (raw && (y_zero != 0 || y_scale != 1.0))
    {
        return None;
    }
    let out = geometry.output()?;
    Some(QConv {
        geometry,
        out,
        group,
        output_channels,
        weights,
        bias,
        x_zero,
        w_zero,
        scale: w_scale.iter().map(|ws| x_scale * ws / y_scale).collect(),
        y_zero,
        output_type: node.outputs[0].fact.datum_type,
        output_shape: node.outputs[0].fact.shape.as_concrete()?.into(),
    })
}
