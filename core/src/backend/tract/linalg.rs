//! The one place tern reaches into tract-linalg's matrix-product internals (kernel
//! selection, packing, fused specs). tract is pinned at `=0.23.9`; an upgrade that changes
//! these APIs changes this file alone.
//!
//! [`Gemm`] is a product `C[m, n] = A[m, k] · B[k, n] (+ bias[m])` with the weights `A`
//! packed once, at plan time, in one of two [`Precision`]s: `i8 × i8 → i32` for int8
//! layers, `f32 × f32 → f32` for float ones. The product splits over the session's thread
//! pool inside tract-linalg.
//!
//! **Kernel choice is measured, not assumed.** tract-linalg ranks its kernels by a static
//! preference and its tiers send narrow products (`m ≤ 8`) to an 8×8 tile; on this
//! project's CI machine (AMD EPYC, AVX-512 VNNI) both 8×8 VNNI kernels and the AVX2 int8
//! one run at 0.4–3 GMAC/s where the 16×16 VNNI kernel runs at 50–140 (an 8×8×2304 product:
//! 0.38 against 0.028 ms), which made the first, narrow layers of a MobileNet slower in int8
//! than in f32. So each process times every kernel of a precision it can run once, on a
//! shallow and a deep product ([`ranking`], ~1–2 ms: AMX's int8 kernel is slower than
//! VNNI's at depth 64 and twice as fast at 384), and a product takes the one with the
//! least estimated time for its shape (the throughput measured at its depth, rows and
//! columns padded to the kernel's tile).
//! `TERN_INT8_KERNEL=NAME` / `TERN_F32_KERNEL=NAME` force one (for tests and for comparing
//! kernels).
//!
//! **Kernel choice is checked, too.** The probe's product has known values, and a kernel
//! whose result is not that of its precision is never used: on an Intel CPU with AMX,
//! tract-linalg offers `avx512amx_mmm_f32_16x16` among the f32 kernels, which rounds its
//! operands to bfloat16 (8 bits of mantissa: -0.5586 for -0.56) — the fastest f32 kernel
//! there, and wrong for an f32 model.

use std::sync::{Arc, Mutex, OnceLock};

use tract_linalg::mmm::{
    AsInputValue, EagerPackedInput, FusedSpec, MMMInputFormat, MMMInputValue, MatMatMul,
    MmmDispatch, PackedExoticFact, Query,
};
use tract_linalg::pack::PackedI8K4;
use tract_linalg::{BinOp, WeightType};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// Whether this CPU's int8 matrix product multiplies bytes natively (VNNI, AMX, ARM dot
/// products): where an int8 layer beats its f32 twin. tract-linalg's AVX2 int8 kernel
/// does not (3–5× slower than f32).
pub(crate) fn native_int8() -> bool {
    static NATIVE: OnceLock<bool> = OnceLock::new();
    *NATIVE.get_or_init(|| {
        Tensor::zero::<i8>(&[64, 64])
            .and_then(|w| Gemm::new(&w, 64))
            .is_ok_and(|gemm| gemm.is_native_int8())
    })
}

/// The element types of a [`Gemm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Precision {
    /// `i8` weights and activations, `i32` accumulators and output.
    Int8,
    /// `f32` throughout.
    F32,
}

impl Precision {
    /// The precision of weights of type `dt`, if tern runs products of it.
    fn of(dt: DatumType) -> Option<Precision> {
        match dt.unquantized() {
            DatumType::I8 => Some(Precision::Int8),
            DatumType::F32 => Some(Precision::F32),
            _ => None,
        }
    }

    /// The weights' and activations' type.
    fn input(self) -> DatumType {
        match self {
            Precision::Int8 => i8::datum_type(),
            Precision::F32 => f32::datum_type(),
        }
    }

    /// The accumulators' (and output's) type.
    fn acc(self) -> DatumType {
        match self {
            Precision::Int8 => i32::datum_type(),
            Precision::F32 => f32::datum_type(),
        }
    }

    /// The variable that forces a kernel.
    fn env(self) -> &'static str {
        match self {
            Precision::Int8 => "TERN_INT8_KERNEL",
            Precision::F32 => "TERN_F32_KERNEL",
        }
    }

    /// What tract-linalg offers for an `m × k × n` product in this precision, weights
    /// packed ahead of time (no panel extractor).
    fn query(self, m: usize, k: usize, n: usize) -> Query {
        Query {
            weight: WeightType::Plain(self.input()),
            activation: self.input(),
            accumulators: tvec!(self.acc()),
            store: Some(self.acc()),
            allow_extractor: false,
            m: Some(m),
            k: Some(k),
            n: Some(n),
        }
    }
}

/// `C[m, n] = A[m, k] · B[k, n] (+ bias[m])`, with `A` (the weights) packed once.
#[derive(Debug, Clone)]
pub(crate) struct Gemm {
    precision: Precision,
    mmm: Box<dyn MatMatMul>,
    packing: usize,
    weights: Box<dyn MMMInputValue>,
    activations: Box<dyn MMMInputFormat>,
    m: usize,
    k: usize,
    /// Buffers for activations packed by the caller ([`Gemm::run_k4`]), reused across runs
    /// (a fresh one per run costs its page faults every time).
    buffers: Arc<Mutex<Vec<Blob>>>,
}

/// Alignment of packed activation buffers (what `PackedI8K4` allocates with).
const K4_ALIGN: usize = 16;

/// A kernel this CPU runs, one of its packings, and its measured throughput.
struct Ranked {
    mmm: Box<dyn MatMatMul>,
    packing: usize,
    /// Multiply-adds per second in each of the [`PROBES`].
    macs_per_s: [f64; 2],
}

impl Ranked {
    /// The measured throughput for a product of depth `k`: the shallow probe's below
    /// [`DEEP_FROM`], the deep one's from there.
    fn macs_per_s(&self, k: usize) -> f64 {
        self.macs_per_s[usize::from(k >= DEEP_FROM)]
    }
}

/// Every kernel of `precision` this CPU can run, timed once per process on the
/// [`PROBES`], fastest first (on the shallow one); a kernel the probe cannot run is left
/// out.
fn ranking(precision: Precision) -> &'static [Ranked] {
    static RANKINGS: [OnceLock<Vec<Ranked>>; 2] = [OnceLock::new(), OnceLock::new()];
    RANKINGS[precision as usize].get_or_init(|| {
        let [m, k, n] = PROBES[0];
        let mut ranked: Vec<Ranked> = MmmDispatch::native()
            .suitable(&precision.query(m, k, n))
            .into_iter()
            .filter(|(_, _, extractor)| extractor.is_none())
            .filter_map(|(mmm, packing, _)| {
                let shallow = probe(&*mmm, packing, precision, PROBES[0]).ok()?;
                Some(Ranked {
                    mmm,
                    packing,
                    macs_per_s: [shallow; 2],
                })
            })
            .collect();
        // The deep probe for the kernels within reach of the best shallow one (a kernel 8×
        // slower there would take milliseconds on it, and does not win by depth).
        let best = ranked.iter().map(|r| r.macs_per_s[0]).fold(0.0, f64::max);
        for r in ranked.iter_mut().filter(|r| r.macs_per_s[0] * 8.0 >= best) {
            if let Ok(deep) = probe(&*r.mmm, r.packing, precision, PROBES[1]) {
                r.macs_per_s[1] = deep;
            }
            tracing::debug!(
                kernel = r.mmm.name(),
                shallow_gmacs = r.macs_per_s[0] / 1e9,
                deep_gmacs = r.macs_per_s[1] / 1e9,
                "matrix-product kernel probed"
            );
        }
        ranked.sort_by(|a, b| b.macs_per_s[0].total_cmp(&a.macs_per_s[0]));
        ranked
    })
}

/// The probes' products, `[m, k, n]`. The shallow one is small enough that the slowest
/// kernel (~0.4 GMAC/s) takes ~0.3 ms and large enough to fill every kernel's tiles. The
/// deep one is a transformer's linear layer in miniature: kernels with a per-tile setup
/// cost (AMX loads its tile configuration) rank low on the shallow product and high on
/// deep ones — on a Xeon with AMX its int8 kernel runs 72 GMAC/s at k = 64 and 316 at
/// k = 384, where the AVX-512 VNNI one runs 91 and 148.
const PROBES: [[usize; 3]; 2] = [[32, 64, 64], [64, 384, 64]];

/// Products at least this deep are costed with the deep probe's throughput (about the
/// geometric mean of the two probes' depths).
const DEEP_FROM: usize = 160;

/// The probe's operands: small integers in `[-50, 50]` (for f32, divided by 25, which
/// bfloat16 cannot hold exactly).
fn probe_operand(
    precision: Precision,
    rows: usize,
    cols: usize,
    seed: usize,
) -> TractResult<Tensor> {
    let value = |i: usize| ((i + seed) * 37 % 101) as i32 - 50;
    let len = rows * cols;
    match precision {
        Precision::Int8 => Tensor::from_shape(
            &[rows, cols],
            &(0..len).map(|i| value(i) as i8).collect::<Vec<_>>(),
        ),
        Precision::F32 => Tensor::from_shape(
            &[rows, cols],
            &(0..len).map(|i| value(i) as f32 / 25.0).collect::<Vec<_>>(),
        ),
    }
}

/// Whether `c = a · b` holds as the precision defines it: exactly for `i8 → i32`, within
/// f32 rounding over `k` terms for f32 (relative to the sum of the terms' magnitudes).
fn exact(precision: Precision, a: &Tensor, b: &Tensor, c: &Tensor) -> TractResult<bool> {
    let (m, k, n) = (a.shape()[0], a.shape()[1], b.shape()[1]);
    let (a, b, c) = (
        a.cast_to::<f64>()?,
        b.cast_to::<f64>()?,
        c.cast_to::<f64>()?,
    );
    let (a, b, c) = (
        a.try_as_plain_ram()?.as_slice::<f64>()?,
        b.try_as_plain_ram()?.as_slice::<f64>()?,
        c.try_as_plain_ram()?.as_slice::<f64>()?,
    );
    Ok((0..m * n).all(|at| {
        let (i, j) = (at / n, at % n);
        let terms = (0..k).map(|x| a[i * k + x] * b[x * n + j]);
        let want: f64 = terms.clone().sum();
        let tolerance = match precision {
            Precision::Int8 => 0.0,
            Precision::F32 => 1e-6 * terms.map(f64::abs).sum::<f64>().max(1.0),
        };
        (c[at] - want).abs() <= tolerance
    }))
}

/// The throughput of `mmm` on the product `[m, k, n]`: the best of a few runs after one
/// warm-up (the minimum rejects a busy machine's interruptions). An error if the kernel's
/// result is not the exact product of its precision.
fn probe(
    mmm: &dyn MatMatMul,
    packing: usize,
    precision: Precision,
    [m, k, n]: [usize; 3],
) -> TractResult<f64> {
    let mmm = tract_onnx::tract_core::dyn_clone::clone_box(mmm);
    let weights = probe_operand(precision, m, k, 0)?;
    let gemm = Gemm::on(mmm, packing, &weights)?;
    let b = probe_operand(precision, k, n, 7)?;
    let packed = gemm.activations.prepare_one(&b, 0, 1)?;
    let mut c = Tensor::zero_dt(precision.acc(), &[m, n])?;
    gemm.product(&*packed, n, None, &mut c.view_mut())?;
    if !exact(precision, &weights, &b, &c)? {
        tracing::debug!(
            kernel = gemm.kernel(),
            "matrix-product kernel is inexact: not used"
        );
        bail!(
            "{} does not compute an exact {precision:?} product",
            gemm.kernel()
        );
    }
    let mut best = std::time::Duration::MAX;
    for _ in 0..4 {
        let started = std::time::Instant::now();
        gemm.product(&*packed, n, None, &mut c.view_mut())?;
        best = best.min(started.elapsed());
    }
    Ok((m * k * n) as f64 / best.as_secs_f64().max(1e-9))
}

/// The kernel for an `m × k × n` product: the forcing variable's if set and runnable,
/// else the least estimated time (the probe's throughput over the product padded to the
/// kernel's tile), else tract-linalg's own pick.
fn choose(
    precision: Precision,
    m: usize,
    k: usize,
    n: usize,
) -> TractResult<(Box<dyn MatMatMul>, usize)> {
    let ranked = ranking(precision);
    if let Ok(name) = std::env::var(precision.env()) {
        let forced = ranked.iter().find(|r| r.mmm.name() == name);
        let r = forced.with_context(|| {
            let names: Vec<&str> = ranked.iter().map(|r| r.mmm.name()).collect();
            format!(
                "{}={name}: not one of this CPU's kernels {names:?}",
                precision.env()
            )
        })?;
        return Ok((r.mmm.clone(), r.packing));
    }
    let cost = |r: &Ranked| {
        let padded = m.next_multiple_of(r.mmm.mr()) * n.next_multiple_of(r.mmm.nr()) * k;
        padded as f64 / r.macs_per_s(k)
    };
    if let Some(best) = ranked.iter().min_by(|a, b| cost(a).total_cmp(&cost(b))) {
        return Ok((best.mmm.clone(), best.packing));
    }
    let (mmm, packing, _) = MmmDispatch::native()
        .pick(&precision.query(m, k, n))
        .with_context(|| format!("no {precision:?} matrix-product kernel in this build"))?;
    Ok((mmm, packing))
}

impl Gemm {
    /// Packs `weights`, `[m, k]` (`i8` or `f32`), for the kernel this CPU runs best at
    /// `n` columns.
    pub(crate) fn new(weights: &Tensor, n: usize) -> TractResult<Gemm> {
        let (precision, m, k) = Gemm::matrix(weights)?;
        let (mmm, packing) = choose(precision, m, k, n)?;
        Gemm::on(mmm, packing, weights)
    }

    /// The precision and `[m, k]` of a weight matrix, refused when it is empty, not a
    /// matrix, or of a type tern has no product for.
    fn matrix(weights: &Tensor) -> TractResult<(Precision, usize, usize)> {
        let precision = Precision::of(weights.datum_type())
            .with_context(|| format!("no product of {:?} weights", weights.datum_type()))?;
        let &[m, k] = weights.shape() else {
            bail!("weights of shape {:?}, not a matrix", weights.shape());
        };
        ensure!(m > 0 && k > 0, "an empty {m}×{k} weight matrix");
        Ok((precision, m, k))
    }

    /// Packs `weights` (`[m, k]`) for the kernel `mmm` with its packing `packing`.
    fn on(mmm: Box<dyn MatMatMul>, packing: usize, weights: &Tensor) -> TractResult<Gemm> {
        let (precision, m, k) = Gemm::matrix(weights)?;
        let (a_format, b_format) = &mmm.packings()[packing];
        let packed = a_format.prepare_one(weights, 1, 0)?;
        Ok(Gemm {
            precision,
            activations: b_format.clone(),
            mmm,
            packing,
            weights: packed,
            m,
            k,
            buffers: Arc::default(),
        })
    }

    /// The panel width when the kernel reads its activations in the 4-deep `K4` layout
    /// (`tern_kernels::im2col::im2col_q8_k4` writes it), `None` for other layouts.
    pub(crate) fn k4_panel(&self) -> Option<usize> {
        self.activations.downcast_ref::<PackedI8K4>().map(|f| f.r)
    }

    /// `c = weights · b + bias`, with `b` (`[k, n]`) written by `fill` straight into the
    /// kernel's `K4` layout: `fill` gets a zeroed buffer of `len` bytes (the `i8` values'
    /// bits) to overwrite. Only for a kernel with a [`Gemm::k4_panel`]. `c` may be any
    /// `[m, n]` view (a transposed one too).
    pub(crate) fn run_k4(
        &self,
        n: usize,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> TractResult<()>,
        bias: &Tensor,
        c: &mut TensorView,
    ) -> TractResult<()> {
        let format = self
            .activations
            .downcast_ref::<PackedI8K4>()
            .context("the kernel does not read the K4 layout")?;
        let r = format.r;
        let panel = self.k.div_ceil(4) * 4 * r;
        ensure!(
            len == n.div_ceil(r) * panel,
            "{len} bytes for {n} columns of {} in panels of {r}",
            self.k
        );
        let pooled = crate::sync::lock(&self.buffers).pop();
        let mut blob = match pooled {
            Some(blob) if blob.len() == len => blob,
            _ => {
                // SAFETY: K4_ALIGN is a power of two and `len` a buffer size; the bytes
                // are zeroed at once, before anything reads them.
                let mut blob = unsafe { Blob::new_for_size_and_align(len, K4_ALIGN) };
                blob.as_bytes_mut().fill(0);
                blob
            }
        };
        fill(blob.as_bytes_mut())?;
        let packed = EagerPackedInput {
            fact: PackedExoticFact {
                format: Box::new(format.clone()),
                mn: n.to_dim(),
                k: self.k,
            },
            packed: Arc::new(blob),
            panel_bytes: panel,
            mn: n,
        };
        let result = self.product(&packed, n, Some(bias), c);
        if let Ok(blob) = Arc::try_unwrap(packed.packed) {
            crate::sync::lock(&self.buffers).push(blob);
        }
        result
    }

    /// The kernel's name (for the plan report), e.g. `avx512vnni_mmm_i32_16x16`.
    pub(crate) fn kernel(&self) -> &str {
        self.mmm.name()
    }

    /// Whether the kernel multiplies bytes natively (see [`native_int8`]).
    fn is_native_int8(&self) -> bool {
        let name = self.mmm.name();
        self.precision == Precision::Int8
            && ["vnni", "amx", "dot", "sve", "sme"]
                .iter()
                .any(|k| name.contains(k))
    }

    /// `c = weights · b (+ bias)`: `b` is `[k, n]`, `bias` `[m]`, `c` `[m, n]`, in this
    /// product's types (`i8` in and `i32` out, or `f32`). `b` and `c` may be views into
    /// larger tensors (one image of a batch).
    pub(crate) fn run(
        &self,
        b: &TensorView,
        bias: Option<&Tensor>,
        c: &mut TensorView,
    ) -> TractResult<()> {
        let n = b.shape().get(1).copied().unwrap_or(0);
        ensure!(
            b.datum_type().unquantized() == self.precision.input() && b.shape() == [self.k, n],
            "Gemm {}×{} ({:?}): b {:?} {:?}",
            self.m,
            self.k,
            self.precision,
            b.datum_type(),
            b.shape(),
        );
        if n == 0 {
            return Ok(());
        }
        let packed = self.activations.prepare_one_view(b, 0, 1)?;
        self.product(&*packed, n, bias, c)
    }

    /// The product itself, over activations packed in this kernel's format.
    fn product(
        &self,
        packed: &dyn MMMInputValue,
        n: usize,
        bias: Option<&Tensor>,
        c: &mut TensorView,
    ) -> TractResult<()> {
        let acc = self.precision.acc();
        ensure!(
            bias.is_none_or(|b| b.datum_type() == acc && b.shape() == [self.m])
                && c.datum_type() == acc
                && c.shape() == [self.m, n],
            "Gemm {}×{}×{n} ({:?}): bias {:?}, c {:?} {:?}",
            self.m,
            self.k,
            self.precision,
            bias.map(|b| b.shape()),
            c.datum_type(),
            c.shape()
        );
        let matmul = FusedSpec::AddMatMul {
            a: AsInputValue::Borrowed(&*self.weights),
            b: AsInputValue::Borrowed(packed),
            packing: self.packing,
        };
        // SAFETY: the shapes and datum types were checked above: `c` is an [m, n] view of
        // the accumulator type (its strides as the view states them) the kernel writes in
        // full, `bias` has one accumulator per row, and both packed operands are in this
        // kernel's own formats for these m, k and n.
        unsafe {
            let store = FusedSpec::Store(self.mmm.c_view(Some(0), Some(1)).wrap(c));
            match bias {
                Some(bias) => self.mmm.run(
                    self.m,
                    n,
                    &[matmul, FusedSpec::BinPerRow(bias.view(), BinOp::Add), store],
                ),
                None => self.mmm.run(self.m, n, &[matmul, store]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product against the definition, on shapes around the kernels' tile sizes, with
    /// the kernel chosen for the shape and with every kernel this CPU runs.
    #[test]
    fn matches_the_definition() -> TractResult<()> {
        assert!(
            !ranking(Precision::Int8).is_empty(),
            "no int8 kernel passed the probe"
        );
        for r in ranking(Precision::Int8) {
            check_against_definition(|w, _| Gemm::on(r.mmm.clone(), r.packing, w))?;
        }
        check_against_definition(Gemm::new)
    }

    /// Wraps `c` in a view for [`Gemm::run`].
    fn run(gemm: &Gemm, b: &Tensor, bias: &Tensor, c: &mut Tensor) -> TractResult<()> {
        gemm.run(&b.view(), Some(bias), &mut c.view_mut())
    }

    /// The products of `make`'s Gemm against the definition.
    fn check_against_definition(
        make: impl Fn(&Tensor, usize) -> TractResult<Gemm>,
    ) -> TractResult<()> {
        let mut seed = 1u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 24) as u8 as i8
        };
        for (m, k, n) in [
            (1, 1, 1),
            (8, 3, 5),
            (17, 33, 9),
            (16, 64, 16),
            (40, 27, 130),
        ] {
            let w: Vec<i8> = (0..m * k).map(|_| next()).collect();
            let b: Vec<i8> = (0..k * n).map(|_| next()).collect();
            let bias: Vec<i32> = (0..m).map(|i| i as i32 * 1000 - 7000).collect();
            let gemm = make(&Tensor::from_shape(&[m, k], &w)?, n)?;
            let mut c = Tensor::zero::<i32>(&[m, n])?;
            run(
                &gemm,
                &Tensor::from_shape(&[k, n], &b)?,
                &Tensor::from_shape(&[m], &bias)?,
                &mut c,
            )?;
            let c = c.try_as_plain_ram()?.as_slice::<i32>()?.to_vec();
            for i in 0..m {
                for j in 0..n {
                    let want: i32 = bias[i]
                        + (0..k)
                            .map(|x| i32::from(w[i * k + x]) * i32::from(b[x * n + j]))
                            .sum::<i32>();
                    assert_eq!(
                        c[i * n + j],
                        want,
                        "{m}×{k}×{n} at {i},{j} ({})",
                        gemm.kernel()
                    );
                }
            }
        }
        Ok(())
    }

    /// Activations written straight into the K4 layout give the product of the same
    /// matrix packed by tract-linalg.
    #[test]
    fn the_k4_layout_written_by_terns_im2col_matches_tracts_packing() -> TractResult<()> {
        use tern_kernels::im2col::{im2col_q8_k4, k4_len};
        use tern_kernels::Geometry;
        for (m, k, n) in [(8, 5, 13), (24, 64, 100), (3, 200, 17)] {
            let gemm = Gemm::new(&Tensor::from_shape(&[m, k], &vec![3i8; m * k])?, n)?;
            let Some(r) = gemm.k4_panel() else {
                eprintln!("{}: no K4 layout on this CPU", gemm.kernel());
                return Ok(());
            };
            // A 1×1 convolution's im2col is its input, shifted to i8.
            let x: Vec<u8> = (0..k * n).map(|i| (i * 37 % 256) as u8).collect();
            let b: Vec<i8> = x.iter().map(|v| (v ^ 0x80) as i8).collect();
            let g = Geometry {
                channels: k,
                input: [1, n],
                kernel: [1, 1],
                strides: [1, 1],
                dilations: [1, 1],
                pads: [0; 4],
            };
            let bias = Tensor::from_shape(&[m], &(0..m as i32).collect::<Vec<_>>())?;
            let mut want = Tensor::zero::<i32>(&[m, n])?;
            run(&gemm, &Tensor::from_shape(&[k, n], &b)?, &bias, &mut want)?;
            for _ in 0..2 {
                let mut got = Tensor::zero::<i32>(&[m, n])?;
                let fill = |bytes: &mut [u8]| {
                    im2col_q8_k4(&g, &x, 0, r, bytes).map_err(|e| anyhow::anyhow!(e))
                };
                gemm.run_k4(n, k4_len(&g, r), fill, &bias, &mut got.view_mut())?;
                assert_eq!(got, want, "{m}×{k}×{n}");
            }
            assert!(gemm
                .run_k4(n, 7, |_| Ok(()), &bias, &mut want.view_mut())
                .is_err());
        }
        Ok(())
    }

    /// A narrow product gets a kernel at least as fast by the probe's estimate as the one
    /// tract-linalg's tiers pick (on this project's CI machine they pick an 8×8 tile that
    /// runs 13× slower than the 16×16 one).
    #[test]
    fn the_chosen_kernel_is_the_fastest_estimate() -> TractResult<()> {
        let (m, k, n) = (8, 8, 2304);
        let chosen = Gemm::new(&Tensor::from_shape(&[m, k], &[1i8; 64])?, n)?;
        let estimate = |name: &str| {
            let r = ranking(Precision::Int8)
                .iter()
                .find(|r| r.mmm.name() == name)?;
            let padded = m.next_multiple_of(r.mmm.mr()) * n.next_multiple_of(r.mmm.nr()) * k;
            Some(padded as f64 / r.macs_per_s(k))
        };
        let (tracts, _, _) = MmmDispatch::native()
            .pick(&Precision::Int8.query(m, k, n))
            .context("a kernel")?;
        if let (Some(ours), Some(theirs)) = (estimate(chosen.kernel()), estimate(tracts.name())) {
            assert!(ours <= theirs, "{} over {}", chosen.kernel(), tracts.name());
        }
        Ok(())
    }

    /// The float product, on every f32 kernel this CPU runs, against the definition in
    /// f64 (relative tolerance: f32 rounding over k terms), into a view of one image of a
    /// batch.
    #[test]
    fn float_products_match_the_definition() -> TractResult<()> {
        assert!(
            !ranking(Precision::F32).is_empty(),
            "no f32 kernel passed the probe"
        );
        let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 25.0;
        for (m, k, n) in [(1, 1, 1), (8, 3, 5), (17, 33, 9), (40, 27, 130)] {
            let w: Vec<f32> = (0..m * k).map(value).collect();
            let b: Vec<f32> = (0..2 * k * n).map(|i| value(i + 7)).collect();
            let weights = Tensor::from_shape(&[m, k], &w)?;
            let batch = Tensor::from_shape(&[2, k, n], &b)?;
            let mut gemms = vec![Gemm::new(&weights, n)?];
            for r in ranking(Precision::F32) {
                gemms.push(Gemm::on(r.mmm.clone(), r.packing, &weights)?);
            }
            for gemm in gemms {
                let mut c = Tensor::zero::<f32>(&[2, m, n])?;
                for image in 0..2 {
                    let b = batch.view_at_prefix(&[image])?;
                    gemm.run(&b, None, &mut c.view_at_prefix_mut(&[image])?)?;
                }
                let c = c.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
                for (at, got) in c.iter().enumerate() {
                    let (image, i, j) = (at / (m * n), at / n % m, at % n);
                    let terms = (0..k)
                        .map(|x| f64::from(w[i * k + x]) * f64::from(b[(image * k + x) * n + j]));
                    let want: f64 = terms.clone().sum();
                    let size: f64 = terms.map(f64::abs).sum();
                    assert!(
                        (f64::from(*got) - want).abs() <= 1e-6 * size.max(1.0),
                        "{m}×{k}×{n} image {image} at {i},{j}: {got} vs {want} ({})",
                        gemm.kernel()
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn wrong_shapes_are_errors() -> TractResult<()> {
        assert!(Gemm::new(&Tensor::zero::<i8>(&[3])?, 1).is_err());
        assert!(Gemm::new(&Tensor::zero::<i32>(&[2, 2])?, 1).is_err());
        assert!(Gemm::new(&Tensor::zero::<i8>(&[0, 2])?, 1).is_err());
        let gemm = Gemm::new(&Tensor::from_shape(&[2, 2], &[1i8, 2, 3, 4])?, 3)?;
        let mut c = Tensor::zero::<i32>(&[2, 3])?;
        let bias = Tensor::zero::<i32>(&[2])?;
        assert!(run(&gemm, &Tensor::zero::<i8>(&[3, 3])?, &bias, &mut c).is_err());
        assert!(run(
            &gemm,
            &Tensor::zero::<i8>(&[2, 3])?,
            &Tensor::zero::<i32>(&[3])?,
            &mut c
        )
        .is_err());
        assert!(run(&gemm, &Tensor::zero::<f32>(&[2, 3])?, &bias, &mut c).is_err());
        assert!(run(&gemm, &Tensor::zero::<i8>(&[2, 3])?, &bias, &mut c).is_ok());
        let mut wrong = Tensor::zero::<f32>(&[2, 3])?;
        assert!(run(&gemm, &Tensor::zero::<i8>(&[2, 3])?, &bias, &mut wrong).is_err());
        Ok(())
    }
}
