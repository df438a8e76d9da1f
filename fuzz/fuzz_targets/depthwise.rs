//! Any geometry, weights, quantization and image: the kernel either refuses the parameters
//! or runs, and every instruction set gives the scalar reference's bytes (and its raw
//! accumulators). The AVX2 path's
//! unsafe loads and stores run here under the fuzzer's sanitizers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_fuzz::Bytes;
use tern_kernels::depthwise::{DepthwiseQ8, Quant};
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
    let Ok(kernel) = DepthwiseQ8::new(geometry, &weights, &bias, &quant) else {
        return;
    };
    let x: Vec<u8> = (0..geometry.input_len()).map(|_| next(255)).collect();
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
