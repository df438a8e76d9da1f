//! Data movement: permutes and reshapes (tract's `AxisOp`), concatenation, slices, gathers
//! with folded indices, broadcasts, constant padding and integer nearest upsampling.

use burn_backend::ops::PadMode;
use burn_backend::tensor::{FloatTensor, IntTensor};
use burn_backend::{Backend, Shape, Slice, TensorData, TensorMetadata};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::{
    Gather, MultiBroadcastTo, Pad, PadMode as TractPadMode, Slice as TractSlice, TypedConcat,
};
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::nn::resize::NearestUpsample;

use super::{single, Cx, Found, Lowered, Op};
use crate::backend::burn::context::{compile_err, unsupported, values};

/// ONNX ops that become data-movement steps, or nothing at all (shape arithmetic and
/// constants folded by tract, identities and dropouts removed).
pub(crate) const ONNX: &[&str] = &[
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Dropout",
    "Expand",
    "Flatten",
    "Gather",
    "Identity",
    "Pad",
    "Reshape",
    "Resize",
    "Shape",
    "Slice",
    "Split",
    "Squeeze",
    "Transpose",
    "Unsqueeze",
];

/// A data-movement step.
pub(crate) enum Layout<B: Backend> {
    Permute(Vec<usize>),
    Reshape(Vec<usize>),
    Concat(usize),
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// Rows `indices` (uploaded once) along `axis`, reshaped to `out_shape`.
    Gather {
        axis: usize,
        indices: IntTensor<B>,
        out_shape: Vec<usize>,
    },
    Expand(Vec<usize>),
    Pad {
        pads: Vec<(usize, usize)>,
        value: f32,
    },
    /// Integer nearest upsampling: reshape to `split` (a size-1 axis after each upsampled
    /// one), broadcast to `expanded` (that axis to its scale), reshape to `out`.
    Upsample {
        split: Vec<usize>,
        expanded: Vec<usize>,
        out: Vec<usize>,
    },
}

/// Lowers tract's axis, concat, slice, gather, broadcast, pad and nearest-upsample ops.
pub(crate) fn lower<B: Backend>(cx: &mut Cx<B>, node: &TypedNode, out: &[usize]) -> Found<B> {
    let op: &dyn TypedOp = node.op.as_ref();
    let out_shape = out.to_vec();
    let layout = if let Some(axis_op) = op.downcast_ref::<AxisOp>() {
        match axis_op {
            AxisOp::Move(from, to) => {
                let mut perm: Vec<usize> = (0..out.len()).collect();
                let axis = perm.remove(*from);
                perm.insert(*to, axis);
                Layout::Permute(perm)
            }
            _ => Layout::Reshape(out_shape),
        }
    } else if let Some(concat) = op.downcast_ref::<TypedConcat>() {
        let inputs = cx.floats(&node.inputs)?;
        return Ok(Some(Lowered::Step(
            Op::Layout(Layout::Concat(concat.axis)),
            inputs,
        )));
    } else if let Some(slice) = op.downcast_ref::<TractSlice>() {
        let bound = |d: &TDim| d.to_i64().map(|v| v as usize).map_err(compile_err);
        Layout::Slice {
            axis: slice.axis,
            start: bound(&slice.start)?,
            end: bound(&slice.end)?,
        }
    } else if let Some(gather) = op.downcast_ref::<Gather>() {
        let indices = cx
            .konst(node.inputs[1])
            .ok_or_else(|| unsupported(node, "indices computed at run time"))?;
        let size = cx.shape(node.inputs[0])?[gather.axis] as i64;
        let flat: Vec<i32> = values::<i64>(&indices)?
            .iter()
            .map(|&i| (if i < 0 { i + size } else { i }) as i32)
            .collect();
        let n = flat.len();
        Layout::Gather {
            axis: gather.axis,
            indices: B::int_from_data(TensorData::new(flat, vec![n]), &cx.device),
            out_shape,
        }
    } else if op.downcast_ref::<MultiBroadcastTo>().is_some() {
        Layout::Expand(out_shape)
    } else if let Some(pad) = op.downcast_ref::<Pad>() {
        let TractPadMode::Constant(value) = &pad.mode else {
            return Err(unsupported(node, "non-constant padding"));
        };
        Layout::Pad {
            pads: pad.pads.clone(),
            value: value.cast_to_scalar::<f32>().map_err(compile_err)?,
        }
    } else if let Some(up) = op.downcast_ref::<NearestUpsample>() {
        // Each upsampled axis split off a size-1 axis, broadcast to its scale, merged.
        let shape = cx.shape(node.inputs[0])?;
        let (mut split, mut expanded) = (Vec::new(), Vec::new());
        for (&d, &scale) in shape.iter().zip(&up.scales) {
            split.push(d);
            expanded.push(d);
            if scale > 1 {
                split.push(1);
                expanded.push(scale);
            }
        }
        Layout::Upsample {
            split,
            expanded,
            out: out_shape,
        }
    } else {
        return Ok(None);
    };
    let x = cx.float(node.inputs[0])?;
    Ok(Some(Lowered::Step(Op::Layout(layout), vec![x])))
}

impl<B: Backend> Layout<B> {
    /// A short description for errors and traces.
    pub(crate) fn name(&self) -> String {
        match self {
            Layout::Permute(p) => format!("Permute {p:?}"),
            Layout::Reshape(s) => format!("Reshape {s:?}"),
            Layout::Concat(a) => format!("Concat {a}"),
            Layout::Slice { axis, start, end } => format!("Slice {axis} {start}..{end}"),
            Layout::Gather { axis, .. } => format!("Gather {axis}"),
            Layout::Expand(s) => format!("Expand {s:?}"),
            Layout::Pad { pads, value } => format!("Pad {pads:?} {value}"),
            Layout::Upsample { expanded, .. } => format!("Upsample to {expanded:?}"),
        }
    }

    pub(crate) fn eval(&self, args: Vec<FloatTensor<B>>) -> FloatTensor<B> {
        if let Layout::Concat(axis) = self {
            return B::float_cat(args, *axis);
        }
        let x = single::<B>(args);
        match self {
            Layout::Permute(perm) => B::float_permute(x, perm),
            Layout::Reshape(shape) => B::float_reshape(x, Shape::from(shape.clone())),
            Layout::Concat(_) => x,
            Layout::Slice { axis, start, end } => {
                let slices: Vec<Slice> = (0..x.shape().num_dims())
                    .map(|a| {
                        if a == *axis {
                            Slice::new(*start as isize, Some(*end as isize), 1)
                        } else {
                            Slice::new(0, None, 1)
                        }
                    })
                    .collect();
                B::float_slice(x, &slices)
            }
            Layout::Gather {
                axis,
                indices,
                out_shape,
            } => {
                let y = B::float_select(x, *axis, indices.clone());
                B::float_reshape(y, Shape::from(out_shape.clone()))
            }
            Layout::Expand(shape) => B::float_expand(x, Shape::from(shape.clone())),
            Layout::Pad { pads, value } => B::float_pad(x, pads, PadMode::Constant(*value)),
            Layout::Upsample {
                split,
                expanded,
                out,
            } => {
                let x = B::float_reshape(x, Shape::from(split.clone()));
                let x = B::float_expand(x, Shape::from(expanded.clone()));
                B::float_reshape(x, Shape::from(out.clone()))
            }
        }
    }
}
