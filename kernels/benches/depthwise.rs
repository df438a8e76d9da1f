//! int8 depthwise convolution: each instruction set on MobileNet-style layers, with the
//! achieved multiply-accumulates per second printed next to the single-core peak of the
//! instructions used (AVX2 + FMA in f32: 2 FMA units × 8 lanes per cycle; AVX-512 VNNI:
//! one `vpdpbusd` of 16 lanes × 4 bytes per cycle; the clock is read from /proc/cpuinfo).
//! `cargo bench -p tern-kernels --bench depthwise`.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use tern_kernels::depthwise::{DepthwiseQ8, Geometry, Quant};
use tern_kernels::Isa;

fn layer(channels: usize, hw: [usize; 2], k: usize, s: usize) -> (DepthwiseQ8, Vec<u8>) {
    let g = Geometry {
        channels,
        input: hw,
        kernel: [k, k],
        strides: [s, s],
        dilations: [1, 1],
        pads: [k / 2; 4],
    };
    let weights: Vec<i8> = (0..channels * k * k)
        .map(|i| (i * 37 % 255) as i8)
        .collect();
    let bias: Vec<i32> = (0..channels).map(|i| i as i32 * 100 - 3000).collect();
    let quant = Quant {
        x_zero: 128,
        w_zero: vec![0],
        scale: vec![2e-4; channels],
        y_zero: 128,
    };
    let kernel = DepthwiseQ8::new(g, &weights, &bias, &quant).expect("valid layer");
    let x = (0..g.input_len()).map(|i| (i * 31 % 256) as u8).collect();
    (kernel, x)
}

fn clock_ghz() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some(mhz / 1e3)
}

fn bench(c: &mut Criterion) {
    let layers = [
        ("dw3x3_s1_64ch_48x192", layer(64, [48, 192], 3, 1)),
        ("dw3x3_s2_64ch_48x192", layer(64, [48, 192], 3, 2)),
        ("dw5x5_s1_128ch_12x48", layer(128, [12, 48], 5, 1)),
        // ppocr_cls's last stages: planes of a row or two of chunks.
        ("dw3x3_s1_96ch_6x24", layer(96, [6, 24], 3, 1)),
        ("dw5x5_s1_288ch_3x12", layer(288, [3, 12], 5, 1)),
    ];
    // One core's multiply-accumulates per cycle on each path: AVX2's two 8-lane FMAs, or
    // one 16-lane × 4-byte `vpdpbusd` (the int8 dot product the AVX-512 path uses).
    let per_cycle = |isa: Isa| match isa {
        Isa::Scalar => None,
        Isa::Avx2 => Some(16.0),
        Isa::Avx512 => Some(64.0),
    };
    let ghz = clock_ghz();
    for (name, (kernel, x)) in &layers {
        let mut y = vec![0u8; kernel.geometry().output_len()];
        for &isa in Isa::available() {
            c.bench_function(&format!("{name}/{isa:?}"), |b| {
                b.iter(|| kernel.run(isa, black_box(x), &mut y).expect("run"))
            });
            let runs = 200;
            let t = Instant::now();
            for _ in 0..runs {
                kernel.run(isa, black_box(x), &mut y).expect("run");
            }
            let gmacs = kernel.macs() as f64 * runs as f64 / t.elapsed().as_secs_f64() / 1e9;
            match ghz.zip(per_cycle(isa)).map(|(g, m)| g * m) {
                Some(p) => println!(
                    "{name}/{isa:?}: {gmacs:.2} GMAC/s, {:.0} % of one core's peak on it ({p:.1} GMAC/s)",
                    100.0 * gmacs / p
                ),
                None => println!("{name}/{isa:?}: {gmacs:.2} GMAC/s"),
            }
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
