//! Reading input tensors from `.npy` / `.json` files (the reading and parsing itself is
//! [`tern::Tensor::read_file`]; outputs are written with `Tensor::to_json`).

use std::path::Path;

use anyhow::{Context, Result};
use tern::Tensor;

/// Reads a tensor from a `.npy` file or a `.json` file (see [`Tensor::from_json`]).
pub fn read_tensor(path: &Path) -> Result<Tensor> {
    Tensor::read_file(path).with_context(|| format!("reading tensor file {}", path.display()))
}
