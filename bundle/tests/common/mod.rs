//! Helpers the bundle test files share: magika (the embedded model), seeded samples,
//! signed bundles, stores.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use tern::{Model, SessionOptions, Tensor};
use tern_bundle::{create, BundleSpec, KeyPair, ModelState, ModelStore, StoreOptions, Trust};

/// The embedded magika model's bytes.
pub fn model_bytes() -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/magika/model.onnx");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `n` seeded random inputs for magika.
pub fn samples(n: u64) -> Vec<Vec<(String, Tensor)>> {
    let model = Model::from_bytes(&model_bytes()).unwrap();
    (0..n)
        .map(|seed| model.random_inputs(seed, &BTreeMap::new()).unwrap())
        .collect()
}

/// Session options on the CPU backend.
pub fn cpu() -> SessionOptions {
    SessionOptions::new().backend(tern::Backend::Cpu)
}

/// A bundle of magika with two golden samples, signed by `key`.
pub fn signed_with(key: &KeyPair, spec: BundleSpec) -> Vec<u8> {
    let mut bundle = create(model_bytes(), &spec, &samples(2), cpu()).unwrap();
    bundle.sign(key).unwrap();
    bundle.to_bytes().unwrap()
}

/// A store in `dir` trusting `key`, golden checks on the CPU.
pub fn open_store(dir: &std::path::Path, key: &KeyPair, options: StoreOptions) -> ModelStore {
    let trust = Trust::new([key.public()], 1).unwrap();
    ModelStore::open(dir, trust, options.session(cpu())).unwrap()
}

/// Magika's state in `store` (default when absent).
pub fn magika_state(store: &ModelStore) -> ModelState {
    store.status().unwrap().remove("magika").unwrap_or_default()
}
