//! `depthwise-f32`: float depthwise convolutions on `tern-kernels`' direct kernel, plane by
//! plane, each plane going through the layer's epilogue (bias, an unfolded
//! BatchNormalization, the activation) while it is in cache.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use tern_kernels::depthwise_f32::DepthwiseF32;
use tern_kernels::epilogue::{epilogue_rows, epilogue_rows_in_place, Epilogue, Out};
use tern_kernels::Isa;

use super::depthwise::{output_fact, output_shape};
use super::epilogue::{datum_type, Epilogued};
use super::{for_each_plane, replace_fconvs};

/// Replaces float depthwise convolutions by [`DepthwiseF32Op`].
pub(super) fn pass(model: &mut TypedModel) -> TractResult<usize> {
    let isa = Isa::detect();
    replace_fconvs(model, |f| {
        let channels = f.geometry.channels;
        if f.group != channels || f.output_channels != channels {
            return None;
        }
        // The bias goes to the epilogue, where the ops after it fold in.
        match DepthwiseF32::new(f.geometry, &f.weights, &[]) {
            Ok(kernel) if kernel.output_shape() == f.out => Some(DepthwiseF32Op {
                kernel: Arc::new(kernel),
                isa,
                output_type: f32::datum_type(),
                epilogue: Arc::new(Epilogue::affine(vec![1.0; channels], f.bias)),
            }),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!("float depthwise convolution left to tract: {e}");
                None
            }
        }
    })
}

/// A float depthwise convolution run by `tern-kernels` (NCHW or CHW, f32 in).
#[derive(Debug, Clone)]
pub(crate) struct DepthwiseF32Op {
    kernel: Arc<DepthwiseF32>,
    isa: Isa,
    /// f32, or u8 when the epilogue quantizes for a next int8 layer.
    output_type: DatumType,
    /// The bias, and what the `epilogue` pass folded in after it.
    epilogue: Arc<Epilogue>,
}

impl Epilogued for DepthwiseF32Op {
    fn channels(&self) -> usize {
        self.kernel.geometry().channels
    }

    fn output_type(&self) -> DatumType {
        self.output_type
    }

    fn epilogue(&self) -> Option<&Epilogue> {
        Some(&self.epilogue)
    }

    fn with_epilogue(&self, e: Epilogue) -> Self {
        DepthwiseF32Op {
            output_type: datum_type(&e),
            epilogue: Arc::new(e),
            ..self.clone()
        }
    }
}

impl PartialEq for DepthwiseF32Op {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.kernel, &other.kernel) && Arc::ptr_eq(&self.epilogue, &other.epilogue)
    }
}

impl Eq for DepthwiseF32Op {}

impl Op for DepthwiseF32Op {
    fn name(&self) -> StaticName {
        "TernDepthwiseF32".into()
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseF32Op {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.first().context("TernDepthwiseF32 takes one input")?;
        let g = self.kernel.geometry();
        ensure!(
            x.datum_type() == f32::datum_type(),
            "TernDepthwiseF32 reads f32"
        );
        let out_shape = output_shape(self.name(), x.shape(), g, self.kernel.output_shape())?;
        // SAFETY: numbers have no invalid values, and the kernel (or the epilogue) writes
        // every output of every plane before `y` is read (or `y` is dropped with the
        // error).
        let mut y = unsafe { Tensor::uninitialized_dt(self.output_type, &out_shape)? };
        let xs = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let (plane_in, plane_out) = (self.kernel.plane_in(), self.kernel.plane_out());
        let (kernel, isa, e) = (&*self.kernel, self.isa, &*self.epilogue);
        let input = |i: usize| &xs[i * plane_in..(i + 1) * plane_in];
        let mut y_view = y.try_as_plain_ram_mut()?;
        // Planes split over the session's pool when this run has one (the plan's thread
        // race decides), else on the calling thread.
        match e.quantize {
            None => for_each_plane(
                y_view.as_slice_mut::<f32>()?,
                plane_out,
                |_: &mut (), i, y| {
                    let c = i % g.channels;
                    kernel.run_plane(isa, c, input(i), y)?;
                    epilogue_rows_in_place(isa, y, plane_out, e, c)
                },
            ),
            Some(_) => for_each_plane(
                y_view.as_bytes_mut(),
                plane_out,
                |acc: &mut Vec<f32>, i, y| {
                    let c = i % g.channels;
                    acc.resize(plane_out, 0.0);
                    kernel.run_plane(isa, c, input(i), acc)?;
                    epilogue_rows(isa, acc, plane_out, e, c, Out::U8(y))
                },
            ),
        }
        .map_err(|e| anyhow::anyhow!(e))?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for DepthwiseF32Op {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (g, out) = (self.kernel.geometry(), self.kernel.output_shape());
        Ok(tvec!(output_fact(self.output_type, inputs[0], g, out)))
    }

    as_op!();
}
