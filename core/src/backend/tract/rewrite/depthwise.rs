//! `depthwise-q8`: int8 depthwise convolutions on `tern-kernels`' direct kernel: `u8` out
//! (QLinearConv), or `i32` accumulators (ConvInteger) that `super::epilogue` then turns
//! into the float or `u8` output the layer's next ops want, plane by plane.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use tern_kernels::depthwise::{DepthwiseQ8, Quant};
use tern_kernels::epilogue::{epilogue_rows, Epilogue, Out};
use tern_kernels::{Geometry, Isa};

use super::epilogue::{datum_type, Epilogued};
use super::lut::{ChannelTables, Tabled};
use super::{for_each_plane, replace_qconvs, QConv};

/// Replaces quantized depthwise convolutions by [`DepthwiseQ8Op`].
pub(super) fn pass(model: &mut TypedModel) -> TractResult<usize> {
    let isa = Isa::detect();
    replace_qconvs(model, |q| {
        let output_type = q.output_type;
        Some(DepthwiseQ8Op {
            kernel: Arc::new(kernel(q)?),
            isa,
            output_type,
            epilogue: None,
            table: None,
        })
    })
}

/// The kernel for a quantized convolution, if it is a depthwise one.
fn kernel(q: QConv) -> Option<DepthwiseQ8> {
    let channels = q.geometry.channels;
    if q.group != channels
        || q.output_channels != channels
        || ![u8::datum_type(), i32::datum_type()].contains(&q.output_type.unquantized())
    {
        return None;
    }
    let quant = Quant {
        x_zero: q.x_zero,
        w_zero: q.w_zero,
        scale: q.scale,
        y_zero: q.y_zero,
    };
    match DepthwiseQ8::new(q.geometry, &q.weights, &q.bias, &quant) {
        Ok(k) if k.output_shape() == q.out => Some(k),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!("depthwise convolution left to tract: {e}");
            None
        }
    }
}

/// The output shape of a depthwise convolution (`g`, output planes `oh × ow`) over an
/// input of shape `shape`: `[N, C, H, W]`, or `[C, H, W]` where tract's declutter dropped
/// a batch of 1; an error naming `op` for any other.
pub(super) fn output_shape(
    op: StaticName,
    shape: &[usize],
    g: &Geometry,
    [oh, ow]: [usize; 2],
) -> TractResult<TVec<usize>> {
    let image = &shape[shape.len().saturating_sub(3)..];
    ensure!(
        (shape.len() == 4 || shape.len() == 3) && image == [g.channels, g.input[0], g.input[1]],
        "{op} planned for [N, {}, {}, {}], got {shape:?}",
        g.channels,
        g.input[0],
        g.input[1]
    );
    Ok(match shape.len() {
        4 => tvec![shape[0], g.channels, oh, ow],
        _ => tvec![g.channels, oh, ow],
    })
}

/// The output fact of a depthwise convolution writing `dt` (see [`output_shape`]).
pub(super) fn output_fact(
    dt: DatumType,
    input: &TypedFact,
    g: &Geometry,
    [oh, ow]: [usize; 2],
) -> TypedFact {
    let mut shape: TVec<TDim> = tvec![g.channels.to_dim(), oh.to_dim(), ow.to_dim()];
    if input.rank() == 4 {
        shape.insert(0, input.shape[0].clone());
    }
    dt.fact(shape)
}

/// An int8 depthwise convolution run by `tern-kernels` (NCHW, `u8` in).
#[derive(Debug, Clone)]
pub(crate) struct DepthwiseQ8Op {
    kernel: Arc<DepthwiseQ8>,
    isa: Isa,
    /// The output's datum type: `u8` (or `QU8` with the layer's output quantization) when
    /// the kernel requantizes; `i32` accumulators; or what the epilogue writes.
    output_type: DatumType,
    /// For an `i32` layer whose float ops after it were folded in.
    epilogue: Option<Arc<Epilogue>>,
    /// The table lookup after the layer, applied to each plane of `u8` it writes.
    table: Option<Arc<ChannelTables>>,
}

impl Tabled for DepthwiseQ8Op {
    fn writes_u8(&self) -> bool {
        self.output_type.unquantized() == u8::datum_type()
    }

    fn output_channels(&self) -> usize {
        self.kernel.geometry().channels
    }

    fn output_table(&self) -> Option<&ChannelTables> {
        self.table.as_deref()
    }

    fn with_output_table(&self, table: ChannelTables) -> Self {
        DepthwiseQ8Op {
            output_type: u8::datum_type(),
            table: Some(Arc::new(table)),
            ..self.clone()
        }
    }
}

impl Epilogued for DepthwiseQ8Op {
    fn channels(&self) -> usize {
        self.kernel.geometry().channels
    }

    fn output_type(&self) -> DatumType {
        self.output_type
    }

    fn epilogue(&self) -> Option<&Epilogue> {
        self.epilogue.as_deref()
    }

    fn with_epilogue(&self, e: Epilogue) -> Self {
        DepthwiseQ8Op {
            output_type: datum_type(&e),
            epilogue: Some(Arc::new(e)),
            ..self.clone()
        }
    }
}

impl PartialEq for DepthwiseQ8Op {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.kernel, &other.kernel)
            && self.output_type == other.output_type
            && self.table == other.table
    }
}

impl Eq for DepthwiseQ8Op {}

impl Op for DepthwiseQ8Op {
    fn name(&self) -> StaticName {
        "TernDepthwiseQ8".into()
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseQ8Op {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.first().context("TernDepthwiseQ8 takes one input")?;
        let g = self.kernel.geometry();
        ensure!(
            x.datum_type().unquantized() == u8::datum_type(),
            "TernDepthwiseQ8 reads u8"
        );
        let out_shape = output_shape(self.name(), x.shape(), g, self.kernel.output_shape())?;
        // SAFETY: numbers have no invalid values, and the kernel writes every output of
        // every image before `y` is read (or `y` is dropped with the error).
        let mut y = unsafe { Tensor::uninitialized_dt(self.output_type, &out_shape)? };
        let xs = x.try_as_plain_ram()?.as_bytes();
        let (plane_in, plane_out) = (self.kernel.plane_in(), self.kernel.plane_out());
        let (kernel, isa) = (&*self.kernel, self.isa);
        let input = |i: usize| &xs[i * plane_in..(i + 1) * plane_in];
        // The accumulators of plane `i` (image i / C, channel i % C) in `acc`, then `e`
        // over them.
        let through = |e: &Epilogue, acc: &mut Vec<i32>, i: usize, y: Out<'_>| {
            acc.resize(plane_out, 0);
            kernel.run_plane_acc(isa, i % g.channels, input(i), acc)?;
            epilogue_rows(isa, acc, plane_out, e, i % g.channels, y)
        };
        // The layer's table (if any) over plane `i`'s bytes.
        let look_up = |i: usize, y: &mut [u8]| match &self.table {
            Some(t) => t.apply(isa, i % g.channels, y),
            None => Ok(()),
        };
        let mut y_view = y.try_as_plain_ram_mut()?;
        // Planes split over the session's pool when this run has one (the plan's thread
        // race decides), else on the calling thread.
        match (&self.epilogue, self.output_type.unquantized()) {
            (None, dt) if dt == u8::datum_type() => {
                for_each_plane(y_view.as_bytes_mut(), plane_out, |_: &mut (), i, y| {
                    kernel.run_plane(isa, i % g.channels, input(i), &mut *y)?;
                    look_up(i, y)
                })
            }
            (None, _) => for_each_plane(
                y_view.as_slice_mut::<i32>()?,
                plane_out,
                |_: &mut (), i, y| kernel.run_plane_acc(isa, i % g.channels, input(i), y),
            ),
            (Some(e), dt) if dt == u8::datum_type() => {
                for_each_plane(y_view.as_bytes_mut(), plane_out, |acc, i, y| {
                    through(e, acc, i, Out::U8(&mut *y))?;
                    look_up(i, y)
                })
            }
            (Some(e), _) => {
                for_each_plane(y_view.as_slice_mut::<f32>()?, plane_out, |acc, i, y| {
                    through(e, acc, i, Out::F32(y))
                })
            }
        }
        .map_err(|e| anyhow::anyhow!(e))?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for DepthwiseQ8Op {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (g, out) = (self.kernel.geometry(), self.kernel.output_shape());
        Ok(tvec!(output_fact(self.output_type, inputs[0], g, out)))
    }

    as_op!();
}
