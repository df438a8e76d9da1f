//! The passes around a matrix product, on any input: quantize, dequantize, per-row
//! requantization, the epilogue (from i32 or f32 accumulators, into a buffer or in place)
//! and byte table lookups give the scalar definition's values on every instruction set
//! (their AVX2 and AVX-512 VBMI paths run here under the fuzzer's sanitizers), and im2col
//! in the packed K4 layout (plain and wide) holds the same matrix as the plain one, or
//! all refuse the geometry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_fuzz::Bytes;
use tern_kernels::epilogue::{epilogue_rows, epilogue_rows_in_place, Epilogue, HardSwish, Out};
use tern_kernels::im2col::{im2col_q8, im2col_q8_k4, im2col_q8_k4_wide, k4_len, Wide};
use tern_kernels::lut::lookup_u8;
use tern_kernels::quant::{
    dequantize_cols_in_place, dequantize_u8, dynamic_range, quantize_dynamic_u8, quantize_u8,
    requantize_rows, DynamicQuant,
};
use tern_kernels::softmax::softmax_rows;
use tern_kernels::Isa;

/// `values` cycled to `n` values (at least one).
fn floats_or_one(values: &[f32], n: usize) -> Vec<f32> {
    (0..n.max(1)).map(|i| values[i % values.len()]).collect()
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes::new(data);
    let mut next = |max: u8| bytes.next(max);
    let n = next(100) as usize;
    let zero = next(255);
    let scale = f32::from(next(200)) * 1e-3;
    let floats: Vec<f32> = (0..n)
        .map(|_| {
            f32::from_bits(u32::from_le_bytes([
                next(255),
                next(255),
                next(255),
                next(255),
            ]))
        })
        .collect();
    let raw: Vec<u8> = (0..n).map(|_| next(255)).collect();
    let rows = 1 + next(4) as usize;
    let acc: Vec<i32> = (0..rows * n)
        .map(|_| i32::from_le_bytes([next(255), next(255), next(255), next(255)]))
        .collect();
    let scales: Vec<f32> = (0..rows).map(|_| f32::from(next(255)) * 1e-4).collect();
    let run = |isa: Isa| {
        let mut q = vec![0u8; n];
        quantize_u8(isa, &floats, scale, zero, &mut q).expect("same lengths");
        let mut f = vec![0f32; n];
        dequantize_u8(isa, &raw, scale, zero, &mut f).expect("same lengths");
        let mut r = vec![0u8; rows * n];
        requantize_rows(isa, &acc, &scales, zero, &mut r).expect("whole rows");
        // DynamicQuantizeLinear: the range (NaN skipped) and the bytes.
        let range = dynamic_range(isa, &floats);
        let mut d = vec![0u8; n];
        quantize_dynamic_u8(isa, &floats, DynamicQuant::of(range), &mut d).expect("same lengths");
        let range = (range.0.to_bits(), range.1.to_bits());
        // A MatMulInteger's accumulators to f32, one scale and bias per column.
        let mut cols = acc.clone();
        dequantize_cols_in_place(
            isa,
            &mut cols,
            &floats_or_one(&scales, n),
            &floats_or_one(&scales, n),
        )
        .ok();
        // Softmax over rows of n (any bits: NaN rows stay NaN rows).
        let mut soft = floats.clone();
        if n > 0 {
            softmax_rows(isa, &mut soft, n).expect("whole rows");
        }
        let nan_free = |v: &[f32]| {
            v.iter()
                .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
                .collect::<Vec<_>>()
        };
        (
            q,
            f.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            r,
            range,
            d,
            cols,
            nan_free(&soft),
        )
    };
    let want = run(Isa::Scalar);
    for &isa in Isa::available() {
        assert_eq!(run(isa), want, "{isa:?}");
    }
    // Byte table lookups (AVX-512 VBMI where the CPU has it) over the raw bytes, at every
    // length up to n (the masked tail included).
    let table: Vec<u8> = (0..256u32)
        .map(|v| (v as u8).wrapping_mul(zero | 1) ^ next(255))
        .collect();
    let lookups = |isa: Isa| {
        let mut y = vec![0u8; n];
        lookup_u8(isa, &table, &raw, &mut y).expect("256 entries, same lengths");
        y
    };
    let want = lookups(Isa::Scalar);
    for (y, x) in want.iter().zip(&raw) {
        assert_eq!(*y, table[usize::from(*x)]);
    }
    for &isa in Isa::available() {
        assert_eq!(lookups(isa), want, "lookup {isa:?}");
    }
    if n > 0 {
        let mut e = Epilogue::affine(scales.clone(), scales.iter().map(|s| s * -3e3).collect());
        if next(2) == 1 {
            e.clamp = (0.0, f32::from(next(12)));
        }
        if next(2) == 1 {
            e.hard_swish = Some(HardSwish {
                add: 3.0,
                lo: 0.0,
                hi: 6.0,
                mul: 1.0 / 6.0,
            });
        }
        let floats: Vec<f32> = acc.iter().map(|a| *a as f32 * 1e-6).collect();
        let epilogue = |isa: Isa| {
            let mut from_i32 = vec![0f32; rows * n];
            epilogue_rows(isa, &acc, n, &e, 0, Out::F32(&mut from_i32)).expect("whole rows");
            let mut in_place = floats.clone();
            epilogue_rows_in_place(isa, &mut in_place, n, &e, 0).expect("whole rows");
            let bits = |v: Vec<f32>| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            (bits(from_i32), bits(in_place))
        };
        let want = epilogue(Isa::Scalar);
        for &isa in Isa::available() {
            assert_eq!(epilogue(isa), want, "epilogue {isa:?}");
        }
    }

    let g = bytes.geometry([12, 20], 4, 3, 3);
    let mut next = |max: u8| bytes.next(max);
    let x: Vec<u8> = (0..g.input_len()).map(|_| next(255)).collect();
    let r = [8, 16][next(2) as usize];
    let Some([oh, ow]) = g.output().filter(|_| g.check().is_ok()) else {
        assert!(im2col_q8_k4(&g, &x, zero, r, &mut []).is_err());
        assert!(Wide::of(&g).is_none());
        assert!(im2col_q8_k4_wide(&g, &x, zero, r, &mut Vec::new(), &mut []).is_err());
        return;
    };
    let (k, cols) = (g.channels * g.kernel[0] * g.kernel[1], oh * ow);
    let mut plain = vec![0i8; k * cols];
    im2col_q8(&g, &x, zero, &mut plain).expect("valid buffers");
    let mut packed = vec![0u8; k4_len(&g, r)];
    im2col_q8_k4(&g, &x, zero, r, &mut packed).expect("valid buffers");
    let panel = k.div_ceil(4) * 4 * r;
    for kk in 0..k {
        for col in 0..cols {
            let at = col / r * panel + kk / 4 * 4 * r + col % r * 4 + kk % 4;
            assert_eq!(packed[at] as i8, plain[kk * cols + col], "{g:?} r{r}");
        }
    }
    let wide = Wide::of(&g).expect("a valid geometry");
    let mut packed = vec![0u8; wide.k4_len(&g, r)];
    im2col_q8_k4_wide(&g, &x, zero, r, &mut Vec::new(), &mut packed).expect("valid buffers");
    for kk in 0..k {
        for col in 0..cols {
            let n = col / ow * wide.stride + col % ow;
            let at = n / r * panel + kk / 4 * 4 * r + n % r * 4 + kk % 4;
            assert_eq!(packed[at] as i8, plain[kk * cols + col], "wide {g:?} r{r}");
        }
    }
});
