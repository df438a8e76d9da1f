//! # tern-kernels — tern's own compute kernels
//!
//! The hot paths tern owns instead of leaving them to tract's generic code, as onnxruntime
//! owns MLAS and XNNPACK. Every kernel here:
//!
//! - takes plain slices and a small parameter struct (no tract types), so the graph
//!   rewrites that call it live in the backend and the kernel can be tested and fuzzed alone;
//! - has a **scalar reference** that defines its result, and each vectorised path is held
//!   bit-identical to it on random shapes (`tests` in each module), on every instruction
//!   set this CPU has, forced through [`Isa`];
//! - picks its instruction set at run time ([`Isa::detect`]); `TERN_KERNELS_ISA=scalar`
//!   forces the reference everywhere (for debugging a suspected kernel bug in an app),
//!   `avx2` caps it there (to measure one path against another).
//!
//! Kernels: [`depthwise`] (int8 depthwise convolution with requantization fused, the
//! ONNX `QLinearConv` with `group == channels`) and [`depthwise_f32`] (its float twin,
//! sharing its vector loop); [`im2col`] and [`quant`], the passes around a matrix product
//! that make a general convolution (the product itself runs on tract-linalg's kernels,
//! called from the CPU backend); [`epilogue`], the float ops after a product (int8 or
//! float) folded into one pass per row; [`lut`], byte table lookups (AVX-512 VBMI);
//! [`softmax`], over short rows (attention) as well as long ones.

#![warn(missing_docs)]

pub mod depthwise;
pub mod depthwise_f32;
pub mod epilogue;
pub mod geometry;
pub mod im2col;
pub mod lut;
pub mod pool;
pub mod quant;
pub mod softmax;

pub use geometry::Geometry;

/// Why a layer cannot be run by a kernel here (the caller keeps its generic path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "int8 kernel: {}", self.0)
    }
}

impl std::error::Error for Unsupported {}

/// An instruction set a kernel can run with.
/// Ordered: each one's CPUs can run the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust: the reference every other path must match.
    Scalar,
    /// x86-64 AVX2 with FMA.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL, VBMI) with VNNI: 64-byte vectors, byte shuffles across a
    /// whole vector (`vpermb`) and int8 dot products (`vpdpbusd`). A kernel without a path
    /// of its own for it takes its AVX2 path (every such CPU has AVX2 and FMA).
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU has, or at most the one `TERN_KERNELS_ISA` names
    /// (`scalar`, `avx2`, `avx512`): for debugging a suspected kernel bug in an app, and
    /// for measuring one path against another.
    pub fn detect() -> Isa {
        let best = Isa::available().last().copied().unwrap_or(Isa::Scalar);
        let cap = match std::env::var("TERN_KERNELS_ISA").as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("avx2") => Isa::Avx2,
            _ => return best,
        };
        Isa::available()
            .iter()
            .copied()
            .rfind(|isa| *isa <= cap)
            .unwrap_or(Isa::Scalar)
    }

    /// Every instruction set this CPU can run, the reference first (detected once).
    pub fn available() -> &'static [Isa] {
        static AVAILABLE: std::sync::OnceLock<Vec<Isa>> = std::sync::OnceLock::new();
        AVAILABLE.get_or_init(|| {
            #[allow(unused_mut)]
            let mut isas = vec![Isa::Scalar];
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vbmi")
                    && is_x86_feature_detected!("avx512vnni")
                {
                    isas.push(Isa::Avx512);
                }
            }
            isas
        })
    }

    /// Whether this CPU can run it.
    pub fn is_available(self) -> bool {
        Isa::available().contains(&self)
    }
}
