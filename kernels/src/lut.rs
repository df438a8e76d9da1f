//! Table lookup over bytes: `y[i] = table[x[i]]` with a 256-entry table — the per-channel
//! tables that replace a dequantize → float ops → quantize chain (the CPU backend's
//! `lut-u8` rewrite).
//!
//! The scalar loop is the reference. With AVX-512 VBMI (`vpermi2b`: a byte shuffle across
//! two 64-byte registers, 128 entries) two shuffles and a blend on the index's top bit look
//! up 64 bytes at once, on [`Isa::Avx512`].

use crate::{Isa, Unsupported};

/// `y[i] = table[x[i]]`; `table` must have 256 entries and `y` the length of `x`.
pub fn lookup_u8(isa: Isa, table: &[u8], x: &[u8], y: &mut [u8]) -> Result<(), Unsupported> {
    let table: &[u8; 256] = table.try_into().map_err(|_| {
        Unsupported(format!(
            "a lookup table has 256 entries, not {}",
            table.len()
        ))
    })?;
    if x.len() != y.len() {
        return Err(Unsupported(format!(
            "lookup: {} values in, {} out",
            x.len(),
            y.len()
        )));
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: VBMI (with F and BW) is available (checked here); `x` and `y` have the
        // same length.
        Isa::Avx512 if isa.is_available() => unsafe { vbmi::lookup(table, x, y) },
        _ => scalar(table, x, y),
    }
    Ok(())
}

/// `y[i] = table[y[i]]` in place (a layer's output through the table that follows it),
/// 64 bytes at a time through a copy on the stack; `table` must have 256 entries.
pub fn lookup_u8_in_place(isa: Isa, table: &[u8], y: &mut [u8]) -> Result<(), Unsupported> {
    let mut block = [0u8; 64];
    for run in y.chunks_mut(64) {
        let x = &mut block[..run.len()];
        x.copy_from_slice(run);
        lookup_u8(isa, table, x, run)?;
    }
    Ok(())
}

fn scalar(table: &[u8; 256], x: &[u8], y: &mut [u8]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = table[usize::from(x)];
    }
}

#[cfg(target_arch = "x86_64")]
mod vbmi {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F, BW and VBMI must be available; `y` must be as long as `x`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn lookup(table: &[u8; 256], x: &[u8], y: &mut [u8]) {
        let t = table.as_ptr();
        // SAFETY: the table has 256 bytes: four unaligned 64-byte loads.
        let (t0, t1, t2, t3) = unsafe {
            (
                _mm512_loadu_si512(t.cast()),
                _mm512_loadu_si512(t.add(64).cast()),
                _mm512_loadu_si512(t.add(128).cast()),
                _mm512_loadu_si512(t.add(192).cast()),
            )
        };
        let one = |idx: __m512i| {
            // Bits 0-6 pick one of 128 entries of (t0, t1) or of (t2, t3); bit 7 picks
            // which pair.
            let lo = _mm512_permutex2var_epi8(t0, idx, t1);
            let hi = _mm512_permutex2var_epi8(t2, idx, t3);
            _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi)
        };
        let n = x.len();
        let mut i = 0;
        while i + 64 <= n {
            // SAFETY: i + 64 ≤ n = len(x) = len(y).
            unsafe {
                let idx = _mm512_loadu_si512(x.as_ptr().add(i).cast());
                _mm512_storeu_si512(y.as_mut_ptr().add(i).cast(), one(idx));
            }
            i += 64;
        }
        if i < n {
            let k: __mmask64 = (1u64 << (n - i)) - 1;
            // SAFETY: the masks cover the n - i < 64 bytes left of both slices only.
            unsafe {
                let idx = _mm512_maskz_loadu_epi8(k, x.as_ptr().add(i).cast());
                _mm512_mask_storeu_epi8(y.as_mut_ptr().add(i).cast(), k, one(idx));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every instruction set gives the scalar reference's bytes, for lengths around the
    /// 64-byte step and random tables; a table that is not 256 long is refused.
    #[test]
    fn lookups_match_the_reference() {
        let mut state = 0x2545_f491_u32;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        for n in [0, 1, 63, 64, 65, 127, 128, 200, 1000] {
            let table: Vec<u8> = (0..256).map(|_| next() as u8).collect();
            let x: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            let mut want = vec![0u8; n];
            lookup_u8(Isa::Scalar, &table, &x, &mut want).unwrap();
            for (i, (&w, &v)) in want.iter().zip(&x).enumerate() {
                assert_eq!(w, table[usize::from(v)], "reference at {i}");
            }
            for &isa in Isa::available() {
                let mut got = vec![0u8; n];
                lookup_u8(isa, &table, &x, &mut got).unwrap();
                assert_eq!(got, want, "{isa:?}, {n} values");
            }
        }
        for n in [0, 1, 63, 64, 65, 200] {
            let table: Vec<u8> = (0..256).map(|_| next() as u8).collect();
            let x: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            let mut want = vec![0u8; n];
            lookup_u8(Isa::Scalar, &table, &x, &mut want).unwrap();
            for &isa in Isa::available() {
                let mut got = x.clone();
                lookup_u8_in_place(isa, &table, &mut got).unwrap();
                assert_eq!(got, want, "in place, {isa:?}, {n} values");
            }
        }
        assert!(lookup_u8_in_place(Isa::Scalar, &[0; 255], &mut [1]).is_err());
        assert!(lookup_u8(Isa::Scalar, &[0; 255], &[], &mut []).is_err());
        assert!(lookup_u8(Isa::Scalar, &[0; 256], &[1], &mut []).is_err());
    }
}
