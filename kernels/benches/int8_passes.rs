//! The passes around an int8 matrix product, in bytes per second: im2col (plain,
//! straight into the K4 layout a VNNI kernel reads, and the wide form read from the
//! padded input's phase planes in one pass), per-row requantization, and the
//! quantize / dequantize passes between layers. `cargo bench -p tern-kernels`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tern_kernels::im2col::{im2col_q8, im2col_q8_k4, im2col_q8_k4_wide, k4_len, Wide};
use tern_kernels::quant::{
    dequantize_u8, dynamic_range, quantize_dynamic_u8, quantize_u8, requantize_rows, DynamicQuant,
};
use tern_kernels::{Geometry, Isa};

fn bench(c: &mut Criterion) {
    // ppocr-style 3x3 layer input and a 1x1 one.
    for (name, g) in [
        (
            "3x3_s1_24ch_30x44",
            Geometry {
                channels: 24,
                input: [30, 44],
                kernel: [3, 3],
                strides: [1, 1],
                dilations: [1, 1],
                pads: [1; 4],
            },
        ),
        (
            "3x3_s2_3ch_48x192",
            Geometry {
                channels: 3,
                input: [48, 192],
                kernel: [3, 3],
                strides: [2, 2],
                dilations: [1, 1],
                pads: [1; 4],
            },
        ),
        (
            "1x1_64ch_24x96",
            Geometry {
                channels: 64,
                input: [24, 96],
                kernel: [1, 1],
                strides: [1, 1],
                dilations: [1, 1],
                pads: [0; 4],
            },
        ),
    ] {
        let x: Vec<u8> = (0..g.input_len()).map(|i| (i * 31 % 256) as u8).collect();
        let [oh, ow] = g.output().expect("valid layer");
        let len = g.channels * g.kernel[0] * g.kernel[1] * oh * ow;
        let mut group = c.benchmark_group(format!("im2col/{name}"));
        group.throughput(Throughput::Bytes(len as u64));
        let mut plain = vec![0i8; len];
        group.bench_function("plain", |b| {
            b.iter(|| im2col_q8(&g, black_box(&x), 3, &mut plain).expect("run"))
        });
        let mut packed = vec![0u8; k4_len(&g, 16)];
        group.bench_function("k4_r16", |b| {
            b.iter(|| im2col_q8_k4(&g, black_box(&x), 3, 16, &mut packed).expect("run"))
        });
        if let Some(wide) = Wide::of(&g) {
            let (mut packed, mut scratch) = (vec![0u8; wide.k4_len(&g, 16)], Vec::new());
            group.bench_function("k4_r16_wide", |b| {
                b.iter(|| {
                    im2col_q8_k4_wide(&g, black_box(&x), 3, 16, &mut scratch, &mut packed)
                        .expect("run")
                })
            });
        }
        group.finish();
    }
    let n = 64 * 1024;
    let floats: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.37 - 100.0).collect();
    let bytes: Vec<u8> = (0..n).map(|i| (i * 7 % 256) as u8).collect();
    let acc: Vec<i32> = (0..n).map(|i| (i as i32 % 5000) - 2500).collect();
    let scales = vec![3e-3f32; 64];
    let mut group = c.benchmark_group("quant_64k");
    group.throughput(Throughput::Elements(n as u64));
    for &isa in Isa::available() {
        let mut q = vec![0u8; n];
        let mut q8 = vec![0u8; n];
        group.bench_function(format!("quantize/{isa:?}"), |b| {
            b.iter(|| quantize_u8(isa, black_box(&floats), 0.1, 128, &mut q).expect("run"))
        });
        group.bench_function(format!("dynamic_quantize/{isa:?}"), |b| {
            b.iter(|| {
                let q = DynamicQuant::of(dynamic_range(isa, black_box(&floats)));
                quantize_dynamic_u8(isa, &floats, q, &mut q8).expect("run")
            })
        });
        let mut f = vec![0f32; n];
        group.bench_function(format!("dequantize/{isa:?}"), |b| {
            b.iter(|| dequantize_u8(isa, black_box(&bytes), 0.1, 128, &mut f).expect("run"))
        });
        group.bench_function(format!("requantize_rows/{isa:?}"), |b| {
            b.iter(|| requantize_rows(isa, black_box(&acc), &scales, 128, &mut q).expect("run"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
