//! Reading input tensors from `.npy` / `.json` files (the parsing itself is
//! `tern::Tensor::from_npy` / `from_json`; outputs are written with `Tensor::to_json`).

use std::path::Path;

use anyhow::{Context, Result};
use tern::Tensor;

/// The largest input file read: a FIFO, a device or a huge file is refused rather than
/// blocking or exhausting memory.
const MAX_INPUT_BYTES: u64 = 1 << 30;

/// Reads a tensor from a `.npy` file or a `.json` file (see [`Tensor::from_json`]).
pub fn read_tensor(path: &Path) -> Result<Tensor> {
    let bytes = tern::fs::read_regular(path, MAX_INPUT_BYTES)
        .with_context(|| format!("reading {}", path.display()))?;
    let tensor = if bytes.starts_with(b"\x93NUMPY") {
        Tensor::from_npy(&bytes)
    } else {
        Tensor::from_json(&bytes)
    };
    tensor.with_context(|| format!("parsing tensor file {}", path.display()))
}
