//! Lowering: a decluttered tract graph with concrete shapes → a [`Program`] of device steps.
//!
//! tract has already done the front-end work by the time a graph gets here: ONNX parsing,
//! typing, constant folding (every `Shape`/`Gather`/`Concat` chain that only computes sizes
//! is gone) and decluttering into a small set of core ops (`Conv`, `EinSum` for every
//! `MatMul`/`Gemm`, `TypedBinOp`, `ElementWiseOp`, `Reduce`, `Softmax`, `AxisOp`…). This
//! module maps each of those to one [`Op`], resolves its attributes for the concrete shapes
//! (padding, permutations, matmul layouts), and uploads constant tensors to the device once.
//! A node it has no mapping for is an [`Error::UnsupportedOp`] naming the node.

use std::collections::HashMap;

use burn_backend::ops::ConvTransposeOptions;
use burn_backend::tensor::{Device, FloatTensor, IntTensor};
use burn_backend::{Backend, FloatDType, TensorData};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::cnn::{KernelFormat, PoolSpec};
use tract_onnx::tract_core::ops::nn::{DataFormat, Reducer};

use super::program::{
    regroup_deconv_kernel, BinKind, MatMulPlan, Op, Program, Step, UnaryKind, NAME,
};
use crate::error::Error;
use crate::error::Result;

fn unsupported(node: &TypedNode, why: impl std::fmt::Display) -> Error {
    Error::UnsupportedOp {
        op_type: format!("{} ({why})", node.op.name()),
        domain: String::new(),
        node: node.name.clone(),
    }
}

fn compile_err(e: impl std::fmt::Display) -> Error {
    Error::Compile {
        backend: NAME,
        reason: e.to_string(),
    }
}

/// A tract tensor's elements cast to `T`, in row-major order.
fn values<T: Datum + Copy>(t: &Tensor) -> Result<Vec<T>> {
    let cast = t.cast_to::<T>().map_err(compile_err)?;
    let view = cast.to_plain_array_view::<T>().map_err(compile_err)?;
    Ok(view.iter().copied().collect())
}

fn concrete(shape: &ShapeFact) -> Result<Vec<usize>> {
    shape
        .as_concrete()
        .map(|s| s.to_vec())
        .ok_or_else(|| compile_err(format!("shape {shape:?} is not concrete")))
}

/// Turns a tract typed graph (concrete shapes, decluttered) into a device program that
/// computes in `precision` (f32 or f16).
pub(crate) fn lower<B: Backend>(
    model: &TypedModel,
    device: &Device<B>,
    precision: FloatDType,
) -> Result<Program<B>> {
    let mut lowering = Lowering::<B> {
        model,
        device: device.clone(),
        precision,
        slots: HashMap::new(),
        consts: Vec::new(),
        steps: Vec::new(),
        n_slots: 0,
    };
    let mut inputs = Vec::new();
    for outlet in model.input_outlets().map_err(compile_err)? {
        // Input types were checked by `prepare_on`, and programs type every input as f32.
        let fact = model.outlet_fact(*outlet).map_err(compile_err)?;
        let shape = concrete(&fact.shape)?;
        if shape.is_empty() || shape.contains(&0) {
            return Err(unsupported(
                model.node(outlet.node),
                format!("input of shape {shape:?}: scalar and empty tensors stay on the CPU"),
            ));
        }
        inputs.push(lowering.new_slot(*outlet));
    }
    let order = model.eval_order().map_err(compile_err)?;
    for id in order {
        let node = model.node(id);
        if model
            .input_outlets()
            .map_err(compile_err)?
            .contains(&id.into())
        {
            continue;
        }
        // Folded values (constants, shape arithmetic) are uploaded when a step reads them.
        if node.outputs.iter().all(|o| o.fact.konst.is_some()) {
            continue;
        }
        lowering.node(node)?;
    }
    let mut outputs = Vec::new();
    for outlet in model.output_outlets().map_err(compile_err)? {
        let fact = model.outlet_fact(*outlet).map_err(compile_err)?;
        if fact.datum_type != f32::datum_type() {
            return Err(unsupported(
                model.node(outlet.node),
                format!(
                    "output is {:?}; the GPU backend computes f32",
                    fact.datum_type
                ),
            ));
        }
        outputs.push((lowering.float(*outlet)?, concrete(&fact.shape)?));
    }
    Ok(Program::new(
        device.clone(),
        precision,
        lowering.consts,
        lowering.steps,
        lowering.n_slots,
        inputs,
        outputs,
    ))
}

struct Lowering<'m, B: Backend> {
    model: &'m TypedModel,
    device: Device<B>,
    /// What float constants are stored as on the device.
    precision: FloatDType,
    /// The slot that holds each float value computed or uploaded so far.
    slots: HashMap<OutletId, usize>,
    consts: Vec<(usize, FloatTensor<B>)>,
    steps: Vec<Step<B>>,
    n_slots: usize,
}

impl<B: Backend> Lowering<'_, B> {
    fn new_slot(&mut self, outlet: OutletId) -> usize {
        let slot = self.n_slots;
        self.n_slots += 1;
        self.slots.insert(outlet, slot);
        slot
    }

    fn fact(&self, outlet: OutletId) -> Result<&TypedFact> {
        self.model.outlet_fact(outlet).map_err(compile_err)
    }

    fn rank(&self, outlet: OutletId) -> Option<usize> {
        self.fact(outlet).ok().map(|f| f.rank())
    }

    fn shape(&self, outlet: OutletId) -> Result<Vec<usize>> {
        concrete(&self.fact(outlet)?.shape)
    }

    /// The slot of a float value; a constant is uploaded (once) on first use.
    fn float(&mut self, outlet: OutletId) -> Result<usize> {
        if let Some(slot) = self.slots.get(&outlet) {
            return Ok(*slot);
        }
        let fact = self.fact(outlet)?;
        let Some(konst) = fact.konst.clone() else {
            return Err(compile_err(format!(
                "value {outlet:?} is read before it is computed"
            )));
        };
        if konst.rank() == 0 || konst.len() == 0 {
            return Err(unsupported(
                self.model.node(outlet.node),
                "scalar or empty constant used as a tensor",
            ));
        }
        let slot = self.upload(&konst)?;
        self.slots.insert(outlet, slot);
        Ok(slot)
    }

    /// Uploads a host tensor as a constant of the program, in a slot of its own.
    fn upload(&mut self, konst: &Tensor) -> Result<usize> {
        let data = TensorData::new(values::<f32>(konst)?, konst.shape().to_vec());
        let mut tensor = B::float_from_data(data, &self.device);
        if self.precision != FloatDType::F32 {
            tensor = B::float_cast(tensor, self.precision);
        }
        let slot = self.n_slots;
        self.n_slots += 1;
        self.consts.push((slot, tensor));
        Ok(slot)
    }

    /// A folded constant's value, if the value is one.
    fn konst(&self, outlet: OutletId) -> Option<Arc<Tensor>> {
        self.fact(outlet).ok().and_then(|f| f.konst.clone())
    }

    /// The single value of a constant with one element, as f32.
    fn scalar(&self, outlet: OutletId) -> Option<f32> {
        let k = self.konst(outlet)?;
        if k.len() != 1 {
            return None;
        }
        k.cast_to_scalar::<f32>().ok()
    }

    fn push(&mut self, node: &TypedNode, op: Op<B>, inputs: Vec<usize>) {
        let output = self.new_slot(OutletId::new(node.id, 0));
        self.steps.push(Step {
            op,
            inputs,
            output,
            node: node.name.clone(),
        });
    }

    fn node(&mut self, node: &TypedNode) -> Result<()> {
        if node.outputs.len() != 1 {
            return Err(unsupported(node, "more than one output"));
        }
        let out_fact = &node.outputs[0].fact;
        if out_fact.datum_type != f32::datum_type() {
            return Err(unsupported(
                node,
                format!(
                    "produces {:?}; the GPU backend computes f32",
                    out_fact.datum_type
                ),
            ));
        }
        let out_shape = out_fact
            .shape
            .as_concrete()
            .map(|s| s.to_vec())
            .ok_or_else(|| unsupported(node, "output shape known only at run time"))?;
        if out_shape.is_empty()
            || out_shape.contains(&0)
            || node
                .inputs
                .iter()
                .any(|i| self.rank(*i) == Some(0) && self.konst(*i).is_none())
        {
            return Err(unsupported(node, "scalar or empty tensors"));
        }
        let op: &dyn TypedOp = node.op.as_ref();
        let input = |ix: usize| node.inputs[ix];

        if let Some(bin) = op.downcast_ref::<ops::binary::TypedBinOp>() {
            let kind =
                BinKind::from_name(bin.0.name()).ok_or_else(|| unsupported(node, "binary"))?;
            let (a, b) = (input(0), input(1));
            if let Some(v) = self.scalar(b) {
                if self.shape(a)? == out_shape {
                    let x = self.float(a)?;
                    self.push(node, Op::BinScalar { kind, value: v }, vec![x]);
                    return Ok(());
                }
            }
            if let Some(v) = self.scalar(a) {
                if kind.commutes() && self.shape(b)? == out_shape {
                    let x = self.float(b)?;
                    self.push(node, Op::BinScalar { kind, value: v }, vec![x]);
                    return Ok(());
                }
            }
            let (x, y) = (self.float(a)?, self.float(b)?);
            let expand = [
                (self.shape(a)? != out_shape).then(|| out_shape.clone()),
                (self.shape(b)? != out_shape).then(|| out_shape.clone()),
            ];
            self.push(node, Op::Bin { kind, expand }, vec![x, y]);
        } else if let Some(ew) = op.downcast_ref::<ops::element_wise::ElementWiseOp>() {
            let kind = if let Some(leaky) = ew.0.downcast_ref::<ops::nn::LeakyRelu>() {
                UnaryKind::LeakyRelu(leaky.alpha)
            } else {
                UnaryKind::from_name(&ew.0.name())
                    .ok_or_else(|| unsupported(node, "element-wise"))?
            };
            let x = self.float(input(0))?;
            self.push(node, Op::Unary(kind), vec![x]);
        } else if let Some(conv) = op.downcast_ref::<ops::cnn::Conv>() {
            self.conv(node, conv)?;
        } else if let Some(deconv) = op.downcast_ref::<ops::cnn::Deconv>() {
            self.deconv(node, deconv, &out_shape)?;
        } else if let Some(up) = op.downcast_ref::<ops::nn::resize::NearestUpsample>() {
            // Each upsampled axis split off a size-1 axis, broadcast to its scale, merged.
            let shape = self.shape(input(0))?;
            let (mut split, mut expanded) = (Vec::new(), Vec::new());
            for (&d, &scale) in shape.iter().zip(&up.scales) {
                split.push(d);
                expanded.push(d);
                if scale > 1 {
                    split.push(1);
                    expanded.push(scale);
                }
            }
            let x = self.float(input(0))?;
            self.push(
                node,
                Op::Upsample {
                    split,
                    expanded,
                    out: out_shape,
                },
                vec![x],
            );
        } else if let Some(einsum) = op.downcast_ref::<ops::einsum::EinSum>() {
            if einsum.q_params.is_some() || node.inputs.len() != 2 {
                return Err(unsupported(node, "quantized or n-ary einsum"));
            }
            let plan = MatMulPlan::new(
                &einsum.axes,
                &self.shape(input(0))?,
                &self.shape(input(1))?,
                &out_shape,
            )
            .map_err(|e| unsupported(node, e))?;
            let (a, b) = (self.float(input(0))?, self.float(input(1))?);
            self.push(node, Op::MatMul(Box::new(plan)), vec![a, b]);
        } else if let Some(reduce) = op.downcast_ref::<ops::nn::Reduce>() {
            let op = match reduce.reducer {
                Reducer::Sum => Op::ReduceSum(reduce.axes.to_vec()),
                Reducer::Max => Op::ReduceMax(reduce.axes.to_vec()),
                Reducer::Min => Op::ReduceMin(reduce.axes.to_vec()),
                Reducer::Prod => Op::ReduceProd(reduce.axes.to_vec()),
                Reducer::MeanOfSquares => Op::ReduceMeanOfSquares(reduce.axes.to_vec()),
                _ => return Err(unsupported(node, format!("{:?}", reduce.reducer))),
            };
            let x = self.float(input(0))?;
            self.push(node, op, vec![x]);
        } else if let Some(rms) = op.downcast_ref::<ops::nn::RmsNorm>() {
            let eps = rms.eps.cast_to_scalar::<f32>().map_err(compile_err)?;
            let x = self.float(input(0))?;
            self.push(
                node,
                Op::RmsNorm {
                    axis: rms.axis,
                    eps,
                },
                vec![x],
            );
        } else if let Some(softmax) = op.downcast_ref::<ops::nn::Softmax>() {
            if softmax.axes.len() != 1 || softmax.quant_output_dt.is_some() {
                return Err(unsupported(node, "multi-axis or quantized softmax"));
            }
            let log = matches!(softmax.kind, ops::nn::SoftmaxKind::LogSoftmax);
            let x = self.float(input(0))?;
            self.push(
                node,
                Op::Softmax {
                    axis: softmax.axes[0],
                    log,
                },
                vec![x],
            );
        } else if let Some(axis_op) = op.downcast_ref::<AxisOp>() {
            let x = self.float(input(0))?;
            let op = match axis_op {
                AxisOp::Move(from, to) => {
                    let rank = out_shape.len();
                    let mut perm: Vec<usize> = (0..rank).collect();
                    let axis = perm.remove(*from);
                    perm.insert(*to, axis);
                    Op::Permute(perm)
                }
                _ => Op::Reshape(out_shape),
            };
            self.push(node, op, vec![x]);
        } else if let Some(concat) = op.downcast_ref::<ops::array::TypedConcat>() {
            let xs = (0..node.inputs.len())
                .map(|ix| self.float(input(ix)))
                .collect::<Result<Vec<_>>>()?;
            self.push(node, Op::Concat(concat.axis), xs);
        } else if let Some(slice) = op.downcast_ref::<ops::array::Slice>() {
            let start = slice
                .start
                .to_i64()
                .map(|v| v as usize)
                .map_err(compile_err)?;
            let end = slice
                .end
                .to_i64()
                .map(|v| v as usize)
                .map_err(compile_err)?;
            let x = self.float(input(0))?;
            self.push(
                node,
                Op::Slice {
                    axis: slice.axis,
                    start,
                    end,
                },
                vec![x],
            );
        } else if let Some(gather) = op.downcast_ref::<ops::array::Gather>() {
            let indices = self
                .konst(input(1))
                .ok_or_else(|| unsupported(node, "indices computed at run time"))?;
            let size = self.shape(input(0))?[gather.axis] as i64;
            let flat: Vec<i32> = values::<i64>(&indices)?
                .iter()
                .map(|&i| (if i < 0 { i + size } else { i }) as i32)
                .collect();
            let n = flat.len();
            let indices: IntTensor<B> =
                B::int_from_data(TensorData::new(flat, vec![n]), &self.device);
            let x = self.float(input(0))?;
            self.push(
                node,
                Op::Gather {
                    axis: gather.axis,
                    indices,
                    out_shape,
                },
                vec![x],
            );
        } else if op.downcast_ref::<ops::array::MultiBroadcastTo>().is_some() {
            let x = self.float(input(0))?;
            self.push(node, Op::Expand(out_shape), vec![x]);
        } else if let Some(pad) = op.downcast_ref::<ops::array::Pad>() {
            let ops::array::PadMode::Constant(value) = &pad.mode else {
                return Err(unsupported(node, "non-constant padding"));
            };
            let value = value.cast_to_scalar::<f32>().map_err(compile_err)?;
            let x = self.float(input(0))?;
            self.push(
                node,
                Op::Pad {
                    pads: pad.pads.clone(),
                    value,
                },
                vec![x],
            );
        } else if let Some(pool) = op.downcast_ref::<ops::cnn::MaxPool>() {
            if pool.with_index_outputs.is_some() {
                return Err(unsupported(node, "max pool with indices"));
            }
            let window = self.window(node, &pool.pool_spec)?;
            let x = self.float(input(0))?;
            self.push(node, Op::MaxPool(window), vec![x]);
        } else if let Some(pool) = op.downcast_ref::<ops::cnn::SumPool>() {
            let window = self.window(node, &pool.pool_spec)?;
            if window.padding.iter().any(|(b, a)| b != a) {
                return Err(unsupported(node, "asymmetric average pool padding"));
            }
            if window.dilations.iter().any(|d| *d != 1) {
                return Err(unsupported(node, "dilated average pool"));
            }
            let x = self.float(input(0))?;
            self.push(
                node,
                Op::AvgPool {
                    window,
                    count_include_pad: pool.count_include_pad,
                    normalize: pool.normalize,
                },
                vec![x],
            );
        } else if let Some(cast) = op.downcast_ref::<ops::cast::Cast>() {
            let from = self.fact(input(0))?.datum_type;
            if cast.to != f32::datum_type() || from != f32::datum_type() {
                return Err(unsupported(node, format!("cast {from:?} to {:?}", cast.to)));
            }
            let x = self.float(input(0))?;
            self.slots.insert(OutletId::new(node.id, 0), x);
        } else {
            return Err(unsupported(node, "no GPU kernel"));
        }
        Ok(())
    }

    fn conv(&mut self, node: &TypedNode, conv: &ops::cnn::Conv) -> Result<()> {
        if conv.q_params.is_some() {
            return Err(unsupported(node, "quantized convolution"));
        }
        if conv.kernel_fmt != KernelFormat::OIHW {
            return Err(unsupported(node, "kernel layout other than OIHW"));
        }
        let window = self.window(node, &conv.pool_spec)?;
        let x = self.float(node.inputs[0])?;
        let w = self.float(node.inputs[1])?;
        let mut inputs = vec![x, w];
        let out_channels = conv.pool_spec.output_channels;
        if let Some(bias) = self.bias(node, node.inputs.get(2), out_channels)? {
            inputs.push(bias);
        }
        self.push(
            node,
            Op::Conv {
                window,
                groups: conv.group,
                out_channels,
            },
            inputs,
        );
        Ok(())
    }

    /// ConvTranspose: 2-D, NCHW, symmetric padding (burn's kernel pads both sides alike).
    fn deconv(
        &mut self,
        node: &TypedNode,
        deconv: &ops::cnn::Deconv,
        out_shape: &[usize],
    ) -> Result<()> {
        let spec = &deconv.pool_spec;
        let rank = spec.kernel_shape.len();
        if spec.data_format != DataFormat::NCHW || !(1..=2).contains(&rank) {
            return Err(unsupported(
                node,
                "ConvTranspose other than 1-D or 2-D NCHW",
            ));
        }
        if deconv.kernel_format != KernelFormat::OIHW {
            return Err(unsupported(node, "kernel layout other than OIHW"));
        }
        let input = self.shape(node.inputs[0])?;
        let padded = spec
            .padding
            .compute_for_deconv(
                &input[2..],
                &spec.kernel_shape,
                &spec.dilations(),
                &spec.strides(),
                &deconv.adjustments,
            )
            .map_err(compile_err)?;
        // burn pads both sides alike; asymmetric padding (SAME_*) runs unpadded and the
        // output is cropped.
        let symmetric = padded.iter().all(|p| p.pad_before == p.pad_after);
        // A 1-D op runs as 2-D with a height of 1.
        let two = |v: &[usize], fill: usize| match v {
            [a] => [fill, *a],
            _ => [v[0], v[1]],
        };
        let before: Vec<usize> = padded.iter().map(|p| p.pad_before).collect();
        let after: Vec<usize> = padded.iter().map(|p| p.pad_after).collect();
        let options = ConvTransposeOptions {
            stride: two(&spec.strides(), 1),
            padding: if symmetric { two(&before, 0) } else { [0, 0] },
            padding_out: two(&deconv.adjustments, 0),
            dilation: two(&spec.dilations(), 1),
            groups: deconv.group,
        };
        let (kernel2, in2, out2) = (
            two(&spec.kernel_shape, 1),
            two(&input[2..], 1),
            two(&out_shape[2..], 1),
        );
        // burn's output size; tract's (the model's) must be the same.
        let size = |ax: usize| {
            ((in2[ax] - 1) * options.stride[ax]
                + options.dilation[ax] * (kernel2[ax] - 1)
                + 1
                + options.padding_out[ax])
                .checked_sub(2 * options.padding[ax])
        };
        let crop = (!symmetric).then(|| {
            let (b, a) = (two(&before, 0), two(&after, 0));
            [(b[0], a[0]), (b[1], a[1])]
        });
        let cropped = |ax: usize| match crop {
            Some(c) => size(ax).and_then(|s| s.checked_sub(c[ax].0 + c[ax].1)),
            None => size(ax),
        };
        if [cropped(0), cropped(1)] != [Some(out2[0]), Some(out2[1])] {
            return Err(unsupported(node, "ConvTranspose output size"));
        }
        // tract holds the kernel as [O, I/g, k…]; burn takes [I, O/g, k…]: a constant kernel
        // is rearranged once here, one computed at run time in every run.
        let group = deconv.group;
        let (kernel, regroup) = match self.konst(node.inputs[1]) {
            Some(k) => {
                let slot = self.upload(&k)?;
                if let Some((_, t)) = self.consts.last_mut() {
                    *t = regroup_deconv_kernel::<B>(t.clone(), group);
                }
                (slot, None)
            }
            None => (self.float(node.inputs[1])?, Some(group)),
        };
        let out_channels = spec.output_channels;
        let mut inputs = vec![self.float(node.inputs[0])?, kernel];
        if let Some(bias) = self.bias(node, node.inputs.get(2), out_channels)? {
            inputs.push(bias);
        }
        self.push(
            node,
            Op::ConvTranspose {
                options,
                out_channels,
                regroup,
                crop,
            },
            inputs,
        );
        Ok(())
    }

    /// The slot of a convolution's bias, `None` when it is absent or all zeros; its
    /// elements must be one per output channel.
    fn bias(
        &mut self,
        node: &TypedNode,
        bias: Option<&OutletId>,
        out_channels: usize,
    ) -> Result<Option<usize>> {
        let Some(&bias) = bias else {
            return Ok(None);
        };
        let is_zero = self
            .konst(bias)
            .and_then(|k| values::<f32>(&k).ok())
            .is_some_and(|v| v.iter().all(|x| *x == 0.0));
        if is_zero {
            return Ok(None);
        }
        let bias_shape = self.shape(bias)?;
        if bias_shape.iter().product::<usize>() != out_channels {
            return Err(unsupported(node, format!("bias of shape {bias_shape:?}")));
        }
        self.float(bias).map(Some)
    }

    /// Kernel, strides, dilations and explicit padding of a 1-D or 2-D NCHW/CHW window op.
    fn window(&self, node: &TypedNode, spec: &PoolSpec) -> Result<super::program::Window> {
        let batched = match spec.data_format {
            DataFormat::NCHW => true,
            DataFormat::CHW => false,
            other => return Err(unsupported(node, format!("{other:?} layout"))),
        };
        let rank = spec.kernel_shape.len();
        if !(1..=2).contains(&rank) {
            return Err(unsupported(node, format!("{rank}-D window")));
        }
        let input = self.shape(node.inputs[0])?;
        let spatial = &input[if batched { 2 } else { 1 }..];
        let padding = spec
            .computed_padding(spatial)
            .iter()
            .map(|p| (p.pad_before, p.pad_after))
            .collect::<Vec<_>>();
        let window = super::program::Window {
            kernel: spec.kernel_shape.to_vec(),
            strides: spec.strides().to_vec(),
            dilations: spec.dilations().to_vec(),
            padding,
            batched,
        };
        // burn's kernels floor the output size; ceil-mode pooling needs more than padding.
        let out = concrete(&node.outputs[0].fact.shape)?;
        let out_spatial = &out[out.len() - rank..];
        let floored: Vec<usize> = (0..rank)
            .map(|i| {
                let (before, after) = window.padding[i];
                let span = window.dilations[i] * (window.kernel[i] - 1) + 1;
                (spatial[i] + before + after).saturating_sub(span) / window.strides[i] + 1
            })
            .collect();
        if floored != out_spatial {
            return Err(unsupported(node, "ceil-mode output size"));
        }
        Ok(window)
    }
}
