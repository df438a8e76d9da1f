//! Signed model bundles for tern.
//!
//! A `.tern` bundle is a tar archive: a signed manifest first (the model's name, version,
//! input/output contract, licence, expiry, the oldest tern that runs it, and the length
//! and SHA-256 of every file), then the ONNX model and **golden samples** (inputs with the
//! outputs the model gave where it was built, and tolerances).
//!
//! Trust follows The Update Framework's metadata format and threat model: documents are
//! signed with ed25519 over their canonical JSON, by keys named by TUF key ids, with a
//! threshold ([`Trust`]); signed metadata expires; a version never goes down; every file's
//! length and hash are checked before anything parses it; paths cannot leave the bundle.
//!
//! - [`keys`]: key pairs and public keys in TUF's format, [`Trust`].
//! - [`signed`]: the signed envelope, canonical JSON.
//! - [`manifest`]: what a bundle says about itself.
//! - [`archive`]: reading ([`Bundle::read`], with [`VerifyOptions`]) and writing bundles.
//! - [`golden`]: running the golden samples on this device ([`Bundle::check_golden`]).
//! - [`create`](mod@create): building a bundle from a model and sample inputs.
//! - [`store`]: the on-device [`ModelStore`]: install (verify, golden check, atomic
//!   write), activate, roll back, with a version floor and a byte quota; loads under a
//!   crash breadcrumb, quarantining a version that keeps killing the process.
//! - [`repo`]: the update repository, TUF's root/targets/snapshot/timestamp as static
//!   files, and publishing to it (`init`, `publish`, `rotate_root`).
//! - [`update`]: the device side: an [`Updater`] walks root rotations, verifies fresh
//!   metadata and downloads (resumably, through the app's [`Fetcher`]) into the store.
//! - [`http`] (feature `http`): the [`Fetcher`] for repositories served over HTTP(S).
//! - [`rollout`]: a candidate version served beside the active one (shadow, canary, A/B)
//!   with health checks that promote it or roll it back by themselves.
//!
//! Every refusal is a typed [`Error`] with a stable [`ErrorKind`].

pub mod archive;
pub mod create;
pub mod error;
mod events;
mod fsio;
pub mod golden;
#[cfg(feature = "http")]
pub mod http;
pub mod keys;
pub mod manifest;
pub mod repo;
pub mod rollout;
pub mod signed;
pub mod store;
pub mod update;

pub use archive::{Bundle, Limits, VerifyOptions};
pub use create::{create, create_with_outputs, BundleSpec, GoldenPair, MODEL_FILE};
pub use error::{Error, ErrorKind, FileProblem, Result};
pub use golden::{GoldenReport, OutputCheck};
pub use keys::{KeyId, KeyPair, PublicKey, Trust};
pub use manifest::{FileMeta, GoldenSample, Manifest, Tolerance};
pub use repo::{Published, Role, RootSpec, Signers, Validity};
pub use rollout::{
    Agreement, Arm, CanaryUnit, Health, HealthPolicy, RollbackReason, Rollout, RolloutEvent,
    RolloutPolicy, Served, Stage, Verdict, VerdictHook,
};
pub use store::{
    Installed, LoadedModel, Loading, ModelState, ModelStore, QuarantineReason, StoreEvent,
    StoreOptions, CRASH_LIMIT,
};
pub use update::{DirFetcher, FetchError, Fetcher, UpdateLimits, UpdateOutcome, Updater};
