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

use tern_kernels::epilogue::{epilogue_rows, Epilogue, Out};
use tern_kernels::im2col::{im2col_q8, im2col_q8_k4_wide, Wide};
use tern_kernels::quant::requantize_rows;
use tern_kernels::{Geometry, Isa};

use super::super::linalg::Gemm;
use super::epilogue::Epilogued;
use super::lut::{ChannelTables, Tabled};
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

/// An int8 convolution with one group (NCHW, `u8` in and out) run as im2col, an int8
/// matrix product and a requantization pass.
#[derive(Debug, Clone)]
pub(crate) struct ConvQ8Op {
    geometry: Geometry,
    out: [usize; 2],
    output_channels: usize,
    gemm: Arc<Gemm>,
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
    /// For an `i32` convolution whose float ops after it were folded in
    /// (`super::epilogue`): the output is f32, or u8 when the epilogue quantizes.
    epilogue: Option<Arc<Epilogue>>,
    /// Buffers for the input's phase planes (`tern_kernels::im2col::Wide`), one per run
    /// in flight.
    scratch: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    /// The table lookup after the layer, applied to each row of `u8` it writes.
    table: Option<Arc<ChannelTables>>,
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
        let gemm = Gemm::new(
            &Tensor::from_shape(&[m, k], &q.weights)?,
            q.out[0] * q.out[1],
        )?;
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
            epilogue: None,
            scratch: Arc::default(),
            table: None,
        }))
    }
}

impl Epilogued for ConvQ8Op {
    fn channels(&self) -> usize {
        self.output_channels
    }

    fn output_type(&self) -> DatumType {
        self.output_type
    }

    fn epilogue(&self) -> Option<&Epilogue> {
        self.epilogue.as_deref()
    }

    fn with_epilogue(&self, e: Epilogue) -> Self {
        ConvQ8Op {
            output_type: super::epilogue::datum_type(&e),
            epilogue: Some(Arc::new(e)),
            ..self.clone()
        }
    }
}

impl Tabled for ConvQ8Op {
    fn writes_u8(&self) -> bool {
        self.output_type.unquantized() == u8::datum_type()
    }

    fn output_channels(&self) -> usize {
        self.output_channels
    }

    fn output_table(&self) -> Option<&ChannelTables> {
        self.table.as_deref()
    }

    fn with_output_table(&self, table: ChannelTables) -> Self {
        ConvQ8Op {
            output_type: u8::datum_type(),
            table: Some(Arc::new(table)),
            ..self.clone()
        }
    }
}

impl PartialEq for ConvQ8Op {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.gemm, &other.gemm)
            && self.output_type == other.output_type
            && self.table == other.table
    }
}

impl Eq for ConvQ8Op {}

impl Op for ConvQ8Op {
    fn name(&self) -> StaticName {
        "TernConvQ8".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let table = if self.table.is_some() {
            ", then a table lookup"
        } else {
            ""
        };
        Ok(vec![format!("kernel: {}{table}", self.gemm.kernel())])
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
        // Where the kernel reads the K4 layout, im2col writes it directly (no `columns`),
        // from the padded input's phase planes in one pass (`Wide`), the product then
        // running over the planes' width and its rows compacted.
        let k4 = match self.gemm.k4_panel() {
            Some(r) => Some((
                r,
                Wide::of(g).context("TernConvQ8 planned for a bad geometry")?,
            )),
            None => None,
        };
        let columns_width = if k4.is_some() { 0 } else { cols };
        let acc_cols = k4.map_or(cols, |(_, w)| w.cols);
        // The phase planes' buffer, reused from run to run (a fresh one costs its page
        // faults every time).
        let mut scratch = crate::sync::lock(&self.scratch).pop().unwrap_or_default();
        // SAFETY: numbers have no invalid values, and every value of these three is
        // written before it is read: `columns` by the im2col of each image (every row, every
        // column), `acc` by the product (its whole m × cols store), `y` by the
        // requantization or rescale of each image (every row).
        let (mut y, mut columns, mut acc) = unsafe {
            (
                Tensor::uninitialized_dt(self.output_type, &self.output_shape)?,
                Tensor::uninitialized::<i8>(&[k, columns_width])?,
                Tensor::uninitialized::<i32>(&[m, acc_cols])?,
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
                Some((r, w)) => {
                    self.gemm.run_k4(
                        w.cols,
                        w.k4_len(g, r),
                        |packed| {
                            im2col_q8_k4_wide(g, x, self.x_zero, r, &mut scratch, packed)
                                .map(|_| ())
                                .map_err(|e| anyhow::anyhow!(e))
                        },
                        &self.bias,
                        &mut acc.view_mut(),
                    )?;
                    w.compact(acc.try_as_plain_ram_mut()?.as_slice_mut::<i32>()?, m)
                        .map_err(|e| anyhow::anyhow!(e))?;
                }
                None => {
                    // im2col split by channel over the session's pool, as the product
                    // is inside tract-linalg; the product packs it again.
                    let mut cols_view = columns.try_as_plain_ram_mut()?;
                    for_each_chunk(cols_view.as_slice_mut::<i8>()?, taps * cols, |(c, rows)| {
                        let x = &x[c * plane_len..(c + 1) * plane_len];
                        im2col_q8(&plane, x, self.x_zero, rows)
                    })
                    .map_err(|e| anyhow::anyhow!(e))?;
                    self.gemm
                        .run(&columns.view(), Some(&self.bias), &mut acc.view_mut())?;
                }
            }
            let acc = acc.try_as_plain_ram()?;
            // Whole rows per task, enough of them that a task outweighs its scheduling.
            let rows = (TASK / cols.max(1)).clamp(1, m);
            if let Some(e) = &self.epilogue {
                let acc = acc.as_slice::<i32>()?;
                let run = |t: usize, y: Out<'_>, len: usize| {
                    let first = t * rows;
                    let acc = &acc[first * cols..first * cols + len];
                    epilogue_rows(self.isa, acc, cols, e, first, y)
                };
                match e.quantize {
                    Some(_) => {
                        let y = &mut y_view.as_bytes_mut()[i * plane_out..(i + 1) * plane_out];
                        for_each_chunk(y, rows * cols, |(t, y)| {
                            let len = y.len();
                            run(t, Out::U8(&mut *y), len)?;
                            self.look_up(t * rows, cols, y)
                        })
                    }
                    None => {
                        let y =
                            &mut y_view.as_slice_mut::<f32>()?[i * plane_out..(i + 1) * plane_out];
                        for_each_chunk(y, rows * cols, |(t, y)| {
                            let len = y.len();
                            run(t, Out::F32(y), len)
                        })
                    }
                }
                .map_err(|e| anyhow::anyhow!(e))?;
                continue;
            }
            let ys = y_view.as_bytes_mut();
            if self.output_type == i32::datum_type() {
                // ConvInteger: the accumulators are the output.
                let bytes = &acc.as_bytes()[..plane_out * 4];
                ys[i * bytes.len()..(i + 1) * bytes.len()].copy_from_slice(bytes);
                continue;
            }
            let acc = acc.as_slice::<i32>()?;
            let y = &mut ys[i * plane_out..(i + 1) * plane_out];
            for_each_chunk(y, rows * cols, |(t, y)| {
                let first = t * rows;
                let here = y.len() / cols.max(1);
                let acc = &acc[first * cols..(first + here) * cols];
                requantize_rows(
                    self.isa,
                    acc,
                    &self.scale[first..first + here],
                    self.y_zero,
                    &mut *y,
                )?;
                self.look_up(first, cols, y)
            })
            .map_err(|e| anyhow::anyhow!(e))?;
        }
        crate::sync::lock(&self.scratch).push(scratch);
        Ok(tvec!(y.into_tvalue()))
    }
}

impl ConvQ8Op {
    /// Applies the layer's table (if any) to `y`, rows of `cols` values from output
    /// channel `first` on.
    fn look_up(
        &self,
        first: usize,
        cols: usize,
        y: &mut [u8],
    ) -> Result<(), tern_kernels::Unsupported> {
        let Some(table) = &self.table else {
            return Ok(());
        };
        for (r, row) in y.chunks_mut(cols.max(1)).enumerate() {
            table.apply(self.isa, first + r, row)?;
        }
        Ok(())
    }
}

impl TypedOp for ConvQ8Op {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.output_type.fact(self.output_shape.clone())))
    }

    as_op!();
}
