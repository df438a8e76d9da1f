//! A hostile model, end to end: any bytes are loaded as a model, a session is built on the
//! CPU (a 64 MiB memory limit, one thread) and run once on inputs of the declared types
//! and shapes (symbolic dimensions 1 to 3). Errors of any kind are fine; a crash, an
//! abort or a panic that escapes tern is a finding. Seeded by `scripts/fuzz` with the
//! small real and generated models from `scripts/fetch-models`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::{Backend, DType, Dim, Model, Session, SessionOptions, Tensor};

fuzz_target!(|data: &[u8]| {
    let Ok(model) = Model::from_bytes(data) else {
        return;
    };
    let options = SessionOptions::new()
        .backend(Backend::Cpu)
        .threads(1)
        .without_telemetry()
        .memory_limit(64 << 20);
    let Ok(session) = Session::new(&model, options) else {
        return;
    };
    let mut seed = data.len();
    let inputs: Option<Vec<(String, Tensor)>> = model
        .inputs()
        .iter()
        .map(|info| {
            let shape: Vec<usize> = info
                .shape
                .as_ref()?
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n,
                    _ => {
                        seed = seed.wrapping_mul(31).wrapping_add(7);
                        1 + seed % 3
                    }
                })
                .collect();
            if shape.iter().product::<usize>() > 1 << 16 {
                return None;
            }
            let dtype = info.dtype.unwrap_or(DType::F32);
            Some((info.name.clone(), Tensor::zeros(dtype, &shape).ok()?))
        })
        .collect();
    if let Some(inputs) = inputs {
        let _ = session.run(inputs);
    }
});
