//! Any geometry, weights, quantization and image: the int8 kernel either refuses the
//! parameters or runs, and every instruction set gives the scalar reference's bytes (and
//! its raw accumulators); the float kernel on the same geometry and values gives the
//! reference's floats on every instruction set. The AVX2 paths' unsafe loads and stores
//! run here under the fuzzer's sanitizers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_fuzz::Bytes;
use tern_kernels::depthwise::{DepthwiseQ8, Quant};
use tern_kernels::depthwise_f32::DepthwiseF32;
use tern_kernels::Isa;

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes::new(data);
    let geometry = bytes.geometry([24, 48], 6, 4, 4);
    let mut next = |max: u8| bytes.next(max);
    let per_channel = next(2) == 1;
    let n = if per_channel { geometry.channels } else { 1 };
    let quant = Quant {
        x_zero: next(255),
        w_zero: (0..n).map(|_| next(7) as i8 - 3).collect(),
        scale: (0..n).map(|_| f32::from(next(255)) * 1e-4).collect(),
        y_zero: next(255),
    };
    let taps = geometry.kernel[0] * geometry.kernel[1];
    let weights: Vec<i8> = (0..geometry.channels * taps)
        .map(|_| next(255) as i8)
        .collect();
    let bias: Vec<i32> = (0..geometry.channels)
        .map(|_| (i32::from(next(255)) - 128) * 97)
        .collect();
    let x: Vec<u8> = (0..geometry.input_len()).map(|_| next(255)).collect();
    // The float kernel over the same values (finite: a padded tap times an infinite
    // weight is NaN on the vector path, skipped by the reference).
    let weights_f32: Vec<f32> = weights.iter().map(|w| f32::from(*w) * 0.37).collect();
    let bias_f32: Vec<f32> = bias.iter().map(|b| *b as f32 * 1e-3).collect();
    if let Ok(kernel) = DepthwiseF32::new(geometry, &weights_f32, &bias_f32) {
        let xf: Vec<f32> = x.iter().map(|v| f32::from(*v) * 0.37 - 40.0).collect();
        let (plane_in, plane_out) = (kernel.plane_in(), kernel.plane_out());
        for c in 0..geometry.channels {
            let x = &xf[c * plane_in..(c + 1) * plane_in];
            let mut want = vec![0f32; plane_out];
            kernel
                .run_plane(Isa::Scalar, c, x, &mut want)
                .expect("valid buffers");
            for &isa in Isa::available() {
                let mut y = vec![0f32; plane_out];
                kernel.run_plane(isa, c, x, &mut y).expect("valid buffers");
                assert_eq!(y, want, "f32 {isa:?} {geometry:?} channel {c}");
            }
        }
    }
    let Ok(kernel) = DepthwiseQ8::new(geometry, &weights, &bias, &quant) else {
        return;
    };
    let mut want = vec![0u8; geometry.output_len()];
    kernel
        .run(Isa::Scalar, &x, &mut want)
        .expect("valid buffers");
    for &isa in Isa::available() {
        let mut y = vec![0u8; geometry.output_len()];
        kernel.run(isa, &x, &mut y).expect("valid buffers");
        assert_eq!(y, want, "{isa:?} {geometry:?}");
    }
    // The raw accumulators (for a float epilogue), plane by plane, on every path.
    let (plane_in, plane_out) = (kernel.plane_in(), kernel.plane_out());
    for c in 0..geometry.channels {
        let x = &x[c * plane_in..(c + 1) * plane_in];
        let mut want = vec![0i32; plane_out];
        kernel
            .run_plane_acc(Isa::Scalar, c, x, &mut want)
            .expect("valid buffers");
        for &isa in Isa::available() {
            let mut acc = vec![0i32; plane_out];
            kernel
                .run_plane_acc(isa, c, x, &mut acc)
                .expect("valid buffers");
            assert_eq!(acc, want, "{isa:?} {geometry:?} channel {c}");
        }
    }
});
