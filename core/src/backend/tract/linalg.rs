//! The one place tern reaches into tract-linalg's matrix-product internals (kernel
//! selection, packing, fused specs). tract is pinned at `=0.23.9`; an upgrade that changes
//! these APIs changes this file alone.
//!
//! [`QGemm`] is an `i8 × i8 → i32` product with the weights packed once, at plan time, and
//! a bias added per output row in the kernel's epilogue. The product splits over the
//! session's thread pool inside tract-linalg.
//!
//! **Kernel choice is measured, not assumed.** tract-linalg ranks its int8 kernels by a
//! static preference and its tiers send narrow products (`m ≤ 8`) to an 8×8 tile; on this
//! project's CI machine (AMD EPYC, AVX-512 VNNI) both 8×8 VNNI kernels and the AVX2 one run
//! at 0.4–3 GMAC/s where the 16×16 VNNI kernel runs at 50–140 (an 8×8×2304 product: 0.38
//! against 0.028 ms), which made the first, narrow layers of a MobileNet slower in int8 than
//! in f32. So each process times every int8 kernel it can run once ([`ranking`], ~1 ms),
//! and a product takes the one with the least estimated time for its shape (throughput
//! measured, rows and columns padded to the kernel's tile). `TERN_INT8_KERNEL=NAME` forces
//! one (for tests and for comparing kernels).

use std::sync::{Arc, Mutex};

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
    static NATIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NATIVE.get_or_init(|| {
        QGemm::new(&[0; 64 * 64], 64, 64, 64).is_ok_and(|gemm| gemm.is_native_int8())
    })
}

/// `C[m, n] = A[m, k] · B[k, n] + bias[m]` in i32, with `A` (the weights) packed once.
#[derive(Debug, Clone)]
pub(crate) struct QGemm {
    mmm: Box<dyn MatMatMul>,
    packing: usize,
    weights: Box<dyn MMMInputValue>,
    activations: Box<dyn MMMInputFormat>,
    m: usize,
    k: usize,
    /// Buffers for activations packed by the caller ([`QGemm::run_k4`]), reused across runs
    /// (a fresh one per run costs its page faults every time).
    buffers: Arc<Mutex<Vec<Blob>>>,
}

/// Alignment of packed activation buffers (what `PackedI8K4` allocates with).
const K4_ALIGN: usize = 16;

/// An int8 kernel this CPU runs, one of its packings, and its measured throughput.
struct Ranked {
    mmm: Box<dyn MatMatMul>,
    packing: usize,
    /// Multiply-adds per second in the probe.
    macs_per_s: f64,
}

/// What tract-linalg offers for an `i8 × i8 → i32` product with an `i32` store, weights
/// packed ahead of time (no panel extractor).
fn int8_query(m: usize, k: usize, n: usize) -> Query {
    Query {
        weight: WeightType::Plain(i8::datum_type()),
        activation: i8::datum_type(),
        accumulators: tvec!(i32::datum_type()),
        store: Some(i32::datum_type()),
        allow_extractor: false,
        m: Some(m),
        k: Some(k),
        n: Some(n),
    }
}

/// Every int8 kernel this CPU can run, timed once per process on one product
/// ([`PROBE`]), fastest first; a kernel the probe cannot run is left out.
fn ranking() -> &'static [Ranked] {
    static RANKING: std::sync::OnceLock<Vec<Ranked>> = std::sync::OnceLock::new();
    RANKING.get_or_init(|| {
        let [m, k, n] = PROBE;
        let mut ranked: Vec<Ranked> = MmmDispatch::native()
            .suitable(&int8_query(m, k, n))
            .into_iter()
            .filter(|(_, _, extractor)| extractor.is_none())
            .filter_map(|(mmm, packing, _)| {
                let macs_per_s = probe(&*mmm, packing).ok()?;
                tracing::debug!(
                    kernel = mmm.name(),
                    gmacs = macs_per_s / 1e9,
                    "int8 kernel probed"
                );
                Some(Ranked {
                    mmm,
                    packing,
                    macs_per_s,
                })
            })
            .collect();
        ranked.sort_by(|a, b| b.macs_per_s.total_cmp(&a.macs_per_s));
        ranked
    })
}

/// The probe's product, `[m, k, n]`: small enough that the slowest kernel (~0.4 GMAC/s)
/// takes ~0.3 ms, large enough to fill every kernel's tiles.
const PROBE: [usize; 3] = [32, 64, 64];

/// The throughput of `mmm` on the [`PROBE`] product: the best of a few runs after one
/// warm-up (the minimum rejects a busy machine's interruptions).
fn probe(mmm: &dyn MatMatMul, packing: usize) -> TractResult<f64> {
    let [m, k, n] = PROBE;
    let mmm = tract_onnx::tract_core::dyn_clone::clone_box(mmm);
    let gemm = QGemm::on(mmm, packing, &[1; PROBE[0] * PROBE[1]], m, k)?;
    let b = Tensor::zero::<i8>(&[k, n])?;
    let packed = gemm.activations.prepare_one(&b, 0, 1)?;
    let bias = Tensor::zero::<i32>(&[m])?;
    let mut c = Tensor::zero::<i32>(&[m, n])?;
    gemm.product(&*packed, n, &bias, &mut c)?;
    let mut best = std::time::Duration::MAX;
    for _ in 0..4 {
        let started = std::time::Instant::now();
        gemm.product(&*packed, n, &bias, &mut c)?;
        best = best.min(started.elapsed());
    }
    Ok((m * k * n) as f64 / best.as_secs_f64().max(1e-9))
}

/// The kernel for an `m × k × n` product: `TERN_INT8_KERNEL`'s if set and runnable, else
/// the least estimated time (the probe's throughput over the product padded to the
/// kernel's tile), else tract-linalg's own pick.
fn choose(m: usize, k: usize, n: usize) -> TractResult<(Box<dyn MatMatMul>, usize)> {
    let ranked = ranking();
    if let Ok(name) = std::env::var("TERN_INT8_KERNEL") {
        let forced = ranked.iter().find(|r| r.mmm.name() == name);
        let r = forced.with_context(|| {
            let names: Vec<&str> = ranked.iter().map(|r| r.mmm.name()).collect();
            format!("TERN_INT8_KERNEL={name}: not one of this CPU's int8 kernels {names:?}")
        })?;
        return Ok((r.mmm.clone(), r.packing));
    }
    let cost = |r: &Ranked| {
        let padded = m.next_multiple_of(r.mmm.mr()) * n.next_multiple_of(r.mmm.nr()) * k;
        padded as f64 / r.macs_per_s
    };
    if let Some(best) = ranked.iter().min_by(|a, b| cost(a).total_cmp(&cost(b))) {
        return Ok((best.mmm.clone(), best.packing));
    }
    let (mmm, packing, _) = MmmDispatch::native()
        .pick(&int8_query(m, k, n))
        .context("no i8 matrix-product kernel in this build")?;
    Ok((mmm, packing))
}

impl QGemm {
    /// Packs `weights`, row-major `[m, k]`, for the kernel this CPU runs best at `n`
    /// columns.
    pub(crate) fn new(weights: &[i8], m: usize, k: usize, n: usize) -> TractResult<QGemm> {
        ensure!(
            m > 0 && k > 0 && weights.len() == m * k,
            "{} weights for a {m}×{k} matrix",
            weights.len()
        );
        let (mmm, packing) = choose(m, k, n)?;
        QGemm::on(mmm, packing, weights, m, k)
    }

    /// Packs `weights` for the kernel `mmm` with its packing `packing`.
    fn on(
        mmm: Box<dyn MatMatMul>,
        packing: usize,
        weights: &[i8],
        m: usize,
        k: usize,
    ) -> TractResult<QGemm> {
        let (a_format, b_format) = &mmm.packings()[packing];
        let a = Tensor::from_shape(&[m, k], weights)?;
        let weights = a_format.prepare_one(&a, 1, 0)?;
        Ok(QGemm {
            activations: b_format.clone(),
            mmm,
            packing,
            weights,
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
    /// bits) to overwrite. Only for a kernel with a [`QGemm::k4_panel`].
    pub(crate) fn run_k4(
        &self,
        n: usize,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> TractResult<()>,
        bias: &Tensor,
        c: &mut Tensor,
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
        let result = self.product(&packed, n, bias, c);
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
        ["vnni", "amx", "dot", "sve", "sme"]
            .iter()
            .any(|k| name.contains(k))
    }

    /// `c = weights · b + bias`: `b` is i8 `[k, n]`, `bias` i32 `[m]`, `c` i32 `[m, n]`.
    pub(crate) fn run(&self, b: &Tensor, bias: &Tensor, c: &mut Tensor) -> TractResult<()> {
        let n = b.shape().get(1).copied().unwrap_or(0);
        ensure!(
            b.datum_type() == i8::datum_type()
                && b.shape() == [self.k, n]
                && bias.datum_type() == i32::datum_type()
                && bias.shape() == [self.m]
                && c.datum_type() == i32::datum_type()
                && c.shape() == [self.m, n],
            "QGemm {}×{}: b {:?} {:?}, bias {:?}, c {:?} {:?}",
            self.m,
            self.k,
            b.datum_type(),
            b.shape(),
            bias.shape(),
            c.datum_type(),
            c.shape()
        );
        if n == 0 {
            return Ok(());
        }
        let packed = self.activations.prepare_one(b, 0, 1)?;
        self.product(&*packed, n, bias, c)
    }

    /// The product itself, over activations packed in this kernel's format.
    fn product(
        &self,
        packed: &dyn MMMInputValue,
        n: usize,
        bias: &Tensor,
        c: &mut Tensor,
    ) -> TractResult<()> {
        ensure!(
            bias.datum_type() == i32::datum_type()
                && bias.shape() == [self.m]
                && c.datum_type() == i32::datum_type()
                && c.shape() == [self.m, n],
            "QGemm {}×{}×{n}: bias {:?}, c {:?} {:?}",
            self.m,
            self.k,
            bias.shape(),
            c.datum_type(),
            c.shape()
        );
        // SAFETY: the shapes and datum types were checked above: `c` is an i32 [m, n]
        // tensor the kernel writes in full, `bias` has one i32 per row, and both packed
        // operands are in this kernel's own formats for these m, k and n.
        unsafe {
            let store = self.mmm.c_view(Some(0), Some(1)).wrap(&c.view_mut());
            self.mmm.run(
                self.m,
                n,
                &[
                    FusedSpec::AddMatMul {
                        a: AsInputValue::Borrowed(&*self.weights),
                        b: AsInputValue::Borrowed(packed),
                        packing: self.packing,
                    },
                    FusedSpec::BinPerRow(bias.view(), BinOp::Add),
                    FusedSpec::Store(store),
                ],
            )
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
        assert!(!ranking().is_empty(), "no int8 kernel passed the probe");
        for r in ranking() {
            check_against_definition(|w, m, k, _| QGemm::on(r.mmm.clone(), r.packing, w, m, k))?;
        }
        check_against_definition(QGemm::new)
    }

    /// The products of `make`'s QGemm against the definition.
    fn check_against_definition(
        make: impl Fn(&[i8], usize, usize, usize) -> TractResult<QGemm>,
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
            let gemm = make(&w, m, k, n)?;
            let mut c = Tensor::zero::<i32>(&[m, n])?;
            gemm.run(
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
            let gemm = QGemm::new(&vec![3; m * k], m, k, n)?;
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
            gemm.run(&Tensor::from_shape(&[k, n], &b)?, &bias, &mut want)?;
            for _ in 0..2 {
                let mut got = Tensor::zero::<i32>(&[m, n])?;
                let fill = |bytes: &mut [u8]| {
                    im2col_q8_k4(&g, &x, 0, r, bytes).map_err(|e| anyhow::anyhow!(e))
                };
                gemm.run_k4(n, k4_len(&g, r), fill, &bias, &mut got)?;
                assert_eq!(got, want, "{m}×{k}×{n}");
            }
            assert!(gemm.run_k4(n, 7, |_| Ok(()), &bias, &mut want).is_err());
        }
        Ok(())
    }

    /// A narrow product gets a kernel at least as fast by the probe's estimate as the one
    /// tract-linalg's tiers pick (on this project's CI machine they pick an 8×8 tile that
    /// runs 13× slower than the 16×16 one).
    #[test]
    fn the_chosen_kernel_is_the_fastest_estimate() -> TractResult<()> {
        let (m, k, n) = (8, 8, 2304);
        let chosen = QGemm::new(&[1; 64], m, k, n)?;
        let estimate = |name: &str| {
            let r = ranking().iter().find(|r| r.mmm.name() == name)?;
            let padded = m.next_multiple_of(r.mmm.mr()) * n.next_multiple_of(r.mmm.nr()) * k;
            Some(padded as f64 / r.macs_per_s)
        };
        let (tracts, _, _) = MmmDispatch::native()
            .pick(&int8_query(m, k, n))
            .context("a kernel")?;
        if let (Some(ours), Some(theirs)) = (estimate(chosen.kernel()), estimate(tracts.name())) {
            assert!(ours <= theirs, "{} over {}", chosen.kernel(), tracts.name());
        }
        Ok(())
    }

    #[test]
    fn wrong_shapes_are_errors() -> TractResult<()> {
        assert!(QGemm::new(&[1, 2, 3], 2, 2, 1).is_err());
        let gemm = QGemm::new(&[1, 2, 3, 4], 2, 2, 3)?;
        let mut c = Tensor::zero::<i32>(&[2, 3])?;
        let bias = Tensor::zero::<i32>(&[2])?;
        assert!(gemm
            .run(&Tensor::zero::<i8>(&[3, 3])?, &bias, &mut c)
            .is_err());
        assert!(gemm
            .run(
                &Tensor::zero::<i8>(&[2, 3])?,
                &Tensor::zero::<i32>(&[3])?,
                &mut c
            )
            .is_err());
        assert!(gemm
            .run(&Tensor::zero::<i8>(&[2, 3])?, &bias, &mut c)
            .is_ok());
        Ok(())
    }
}
