//! `conv-f32`: float convolutions with one group as im2col → tract-linalg's f32 matrix
//! product → the layer's epilogue, image by image.
//!
//! For a batch of images tract first moves the batch axis next to the spatial ones (a
//! copy of the input per layer) and then runs the bias, a BatchNormalization left unfolded
//! and the activation as separate passes over the output. Here each image's product
//! writes straight into the output (a 1×1 convolution with stride 1 reads the image itself
//! as its right-hand matrix; any other goes through `tern_kernels::im2col::im2col_f32`),
//! and whatever the `epilogue` pass folded in runs over the rows the product just wrote,
//! while they are in cache.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use tern_kernels::epilogue::{epilogue_rows, epilogue_rows_in_place, Epilogue, Out};
use tern_kernels::im2col::im2col_f32;
use tern_kernels::{Geometry, Isa};

use super::super::linalg::Gemm;
use super::epilogue::{datum_type, Epilogued};
use super::{for_each_chunk, replace_fconvs, FConv, TASK};

/// Replaces float one-group convolutions by [`ConvF32Op`].
pub(super) fn pass(model: &mut TypedModel) -> TractResult<usize> {
    let isa = Isa::detect();
    replace_fconvs(model, |f| match ConvF32Op::new(f, isa) {
        Ok(op) => op,
        Err(e) => {
            tracing::debug!("float convolution left to tract: {e}");
            None
        }
    })
}

/// A float convolution with one group (NCHW, f32 in) run as im2col, an f32 matrix product
/// and an epilogue.
#[derive(Debug, Clone)]
pub(crate) struct ConvF32Op {
    geometry: Geometry,
    out: [usize; 2],
    output_channels: usize,
    gemm: Arc<Gemm>,
    /// 1×1, stride 1, no padding: each image is its own im2col matrix.
    direct: bool,
    isa: Isa,
    /// f32, or u8 when the epilogue quantizes for a next int8 layer.
    output_type: DatumType,
    /// The output's shape (`[N, M, oh, ow]`, or without `N` where tract dropped a batch of
    /// 1).
    output_shape: TVec<usize>,
    /// The bias, and what the `epilogue` pass folded in after it.
    epilogue: Arc<Epilogue>,
}

impl ConvF32Op {
    /// The op for `f`, `None` when it is not a one-group convolution, or is one tract
    /// runs faster: a convolution other than 1×1 on a single image, which tract's lazy
    /// im2col packs straight from the image where this op would write its im2col matrix
    /// and then pack it (ppocr_det's 3×3 layers: 0.9 ms in tract, 2.4 ms here). On a
    /// batch tract writes its im2col matrix too, and moves the batch axis first.
    fn new(f: FConv, isa: Isa) -> TractResult<Option<ConvF32Op>> {
        let g = f.geometry;
        let direct = g.kernel == [1, 1] && g.strides == [1, 1] && g.pads == [0; 4];
        let batch = match *f.output_shape {
            [n, _, _, _] => n,
            _ => 1,
        };
        if f.group != 1 || (!direct && batch == 1) {
            return Ok(None);
        }
        let (m, k) = (f.output_channels, g.channels * g.kernel[0] * g.kernel[1]);
        ensure!(f.weights.len() == m * k, "weights for {m}×{k}");
        let gemm = Gemm::new(
            &Tensor::from_shape(&[m, k], &f.weights)?,
            f.out[0] * f.out[1],
        )?;
        Ok(Some(ConvF32Op {
            direct,
            geometry: g,
            out: f.out,
            output_channels: m,
            gemm: Arc::new(gemm),
            isa,
            output_type: f32::datum_type(),
            output_shape: f.output_shape,
            epilogue: Arc::new(Epilogue::affine(vec![1.0; m], f.bias)),
        }))
    }
}

impl Epilogued for ConvF32Op {
    fn channels(&self) -> usize {
        self.output_channels
    }

    fn output_type(&self) -> DatumType {
        self.output_type
    }

    fn epilogue(&self) -> Option<&Epilogue> {
        Some(&self.epilogue)
    }

    fn with_epilogue(&self, e: Epilogue) -> Self {
        ConvF32Op {
            output_type: datum_type(&e),
            epilogue: Arc::new(e),
            ..self.clone()
        }
    }
}

impl PartialEq for ConvF32Op {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.gemm, &other.gemm) && Arc::ptr_eq(&self.epilogue, &other.epilogue)
    }
}

impl Eq for ConvF32Op {}

impl Op for ConvF32Op {
    fn name(&self) -> StaticName {
        "TernConvF32".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("kernel: {}", self.gemm.kernel())])
    }

    op_as_typed_op!();
}

/// Whether `e` leaves a float product's outputs as they are (no bias, no activation).
fn is_identity(e: &Epilogue) -> bool {
    e.quantize.is_none()
        && e.hard_swish.is_none()
        && e.clamp == (f32::NEG_INFINITY, f32::INFINITY)
        && e.scale.iter().all(|s| *s == 1.0)
        && e.bias.iter().all(|b| *b == 0.0)
}

impl EvalOp for ConvF32Op {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.first().context("TernConvF32 takes one input")?;
        let g = &self.geometry;
        let batch = x.len() / g.input_len().max(1);
        ensure!(
            x.datum_type() == f32::datum_type() && x.len() == batch * g.input_len(),
            "TernConvF32 planned for f32 images of [{}, {}, {}], got {:?} {:?}",
            g.channels,
            g.input[0],
            g.input[1],
            x.datum_type(),
            x.shape()
        );
        let xs = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let [oh, ow] = self.out;
        let (m, cols) = (self.output_channels, oh * ow);
        let k = g.channels * g.kernel[0] * g.kernel[1];
        let e = &*self.epilogue;
        let quantized = e.quantize.is_some();
        ensure!(
            self.output_shape.iter().product::<usize>() == batch * m * cols,
            "TernConvF32 planned for {:?}, fed {batch} images",
            self.output_shape
        );
        // SAFETY: numbers have no invalid values, and every value of these is written
        // before it is read: `y` by the product or the epilogue of each image (every row,
        // every column), `columns` by the im2col of each image, `acc` by the product.
        let (mut y, mut columns, mut acc) = unsafe {
            (
                Tensor::uninitialized_dt(self.output_type, &[batch, m, cols])?,
                Tensor::uninitialized::<f32>(&[k, if self.direct { 0 } else { cols }])?,
                Tensor::uninitialized::<f32>(&[m, if quantized { cols } else { 0 }])?,
            )
        };
        let (plane_in, plane_out) = (g.input_len(), m * cols);
        let taps = g.kernel[0] * g.kernel[1];
        let plane = Geometry { channels: 1, ..*g };
        let plane_len = plane.input_len();
        let identity = is_identity(e);
        // Whole rows per task, enough of them that a task outweighs its scheduling.
        let rows = (TASK / cols.max(1)).clamp(1, m);
        let (shape, strides) = ([k, cols], [cols as isize, 1]);
        for i in 0..batch {
            let image = &xs[i * plane_in..(i + 1) * plane_in];
            if !self.direct {
                // im2col split by channel over the session's pool, as the product is
                // inside tract-linalg.
                let mut cols_view = columns.try_as_plain_ram_mut()?;
                for_each_chunk(
                    cols_view.as_slice_mut::<f32>()?,
                    taps * cols,
                    |(c, rows)| {
                        im2col_f32(&plane, &image[c * plane_len..(c + 1) * plane_len], rows)
                    },
                )
                .map_err(|e| anyhow::anyhow!(e))?;
            }
            let b = match self.direct {
                // SAFETY: image `i` of `x` is `k × cols` contiguous f32 values (k = C and
                // cols = H·W for a 1×1 convolution with stride 1 and no padding) starting
                // at that offset, inside `x` (its length was checked above).
                true => unsafe {
                    TensorView::from_bytes(
                        x,
                        (i * plane_in * size_of::<f32>()) as isize,
                        &shape,
                        &strides,
                    )
                },
                false => columns.view(),
            };
            if quantized {
                self.gemm.run(&b, None, &mut acc.view_mut())?;
                let acc = acc.try_as_plain_ram()?;
                let acc = acc.as_slice::<f32>()?;
                let mut y_view = y.try_as_plain_ram_mut()?;
                let y = &mut y_view.as_bytes_mut()[i * plane_out..(i + 1) * plane_out];
                for_each_chunk(y, rows * cols, |(t, y)| {
                    let first = t * rows;
                    let acc = &acc[first * cols..first * cols + y.len()];
                    epilogue_rows(self.isa, acc, cols, e, first, Out::U8(y))
                })
                .map_err(|e| anyhow::anyhow!(e))?;
                continue;
            }
            self.gemm.run(&b, None, &mut y.view_at_prefix_mut(&[i])?)?;
            if !identity {
                let mut y_view = y.try_as_plain_ram_mut()?;
                let y = &mut y_view.as_slice_mut::<f32>()?[i * plane_out..(i + 1) * plane_out];
                for_each_chunk(y, rows * cols, |(t, y)| {
                    epilogue_rows_in_place(self.isa, y, cols, e, t * rows)
                })
                .map_err(|e| anyhow::anyhow!(e))?;
            }
        }
        Ok(tvec!(y.into_shape(&self.output_shape)?.into_tvalue()))
    }
}

impl TypedOp for ConvF32Op {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.output_type.fact(self.output_shape.clone())))
    }

    as_op!();
}
