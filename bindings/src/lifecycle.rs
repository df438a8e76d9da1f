//! The model lifecycle across the FFI (`tern-bundle`): [`TernModelStore`] installs signed
//! bundles (verified, golden-checked, atomically), pulls updates from a repository through
//! the app's [`ModelFetcher`] (the app owns the network), loads the active version under the
//! crash breadcrumb, and rolls a candidate out beside it ([`TernRollout`]), telling the
//! app's [`RolloutListener`] of the verdict it reaches by itself.

use std::sync::Arc;

use tern_bundle::{Arm, CanaryUnit, ErrorKind as BundleErrorKind, RollbackReason, StoreEvent};

use crate::{
    from_tern, on_worker, to_tern, Result, SessionConfig, TensorData, TernError, TernSession,
};

impl From<tern_bundle::Error> for TernError {
    fn from(e: tern_bundle::Error) -> Self {
        match e {
            tern_bundle::Error::Model(e) => e.into(),
            e => TernError::Bundle {
                kind: e.error_kind(),
                detail: e.to_string(),
            },
        }
    }
}

#[uniffi::remote(Enum)]
#[non_exhaustive]
pub enum BundleErrorKind {
    Io,
    Malformed,
    UnsafeEntry,
    TooLarge,
    Signature,
    Expired,
    Rollback,
    NeedsNewerTern,
    FileMismatch,
    GoldenMismatch,
    Key,
    InvalidOption,
    NotInstalled,
    Quarantined,
    Fetch,
    Model,
}

#[uniffi::remote(Enum)]
#[non_exhaustive]
pub enum StoreEvent {
    CrashDetected {
        name: String,
        version: u64,
        crashes: u32,
    },
    Quarantined {
        name: String,
        version: u64,
    },
    RolledBack {
        name: String,
        from: u64,
        to: u64,
    },
}

#[uniffi::remote(Enum)]
pub enum Arm {
    Active,
    Candidate,
}

#[uniffi::remote(Enum)]
#[non_exhaustive]
pub enum CanaryUnit {
    Request,
    Device,
}

#[uniffi::remote(Enum)]
#[non_exhaustive]
pub enum RollbackReason {
    ErrorRate {
        candidate: f64,
        active: f64,
    },
    Latency {
        candidate_p95_ms: f64,
        active_p95_ms: f64,
    },
    Disagreement {
        agreement: f64,
    },
}

/// How a store keeps and checks bundles (`tern_bundle::StoreOptions`).
#[derive(Debug, Clone, uniffi::Record)]
pub struct StoreConfig {
    /// Versions kept per model, the active and previous ones included (at least 2).
    #[uniffi(default = 3)]
    pub keep: u32,
    /// Bytes all bundles may take together.
    #[uniffi(default = 1073741824)]
    pub quota_bytes: u64,
    /// The sessions golden checks, loads and rollouts use: the backend that will serve.
    pub session: SessionConfig,
}

/// A version quarantined, and why.
#[derive(Debug, Clone, uniffi::Record)]
pub struct QuarantinedVersion {
    /// The version.
    pub version: u64,
    /// Why (a crash loop, or its rollout's verdict), in words.
    pub reason: String,
}

/// One model's versions in a store.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ModelStatus {
    /// The model.
    pub name: String,
    /// The version serving.
    pub active: Option<u64>,
    /// The one before it.
    pub previous: Option<u64>,
    /// The version staged for a rollout.
    pub candidate: Option<u64>,
    /// Every version on disk.
    pub installed: Vec<u64>,
    /// The highest version ever accepted.
    pub highest: u64,
    /// Versions never activated again.
    pub quarantined: Vec<QuarantinedVersion>,
}

/// A version installed (not yet active).
#[derive(Debug, Clone, uniffi::Record)]
pub struct InstallResult {
    /// The model.
    pub name: String,
    /// The version.
    pub version: u64,
    /// Golden samples run on this device.
    pub golden_samples: u64,
    /// The largest difference from a golden output as a share of its tolerance (≤ 1).
    pub golden_worst_share: f64,
    /// Older versions removed to stay within `keep` and the quota.
    pub removed: Vec<u64>,
}

impl From<tern_bundle::Installed> for InstallResult {
    fn from(i: tern_bundle::Installed) -> Self {
        InstallResult {
            golden_samples: i.golden.samples as u64,
            golden_worst_share: i.golden.worst_share(),
            name: i.name,
            version: i.version,
            removed: i.removed,
        }
    }
}

/// What an update did.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum UpdateResult {
    /// Nothing newer than what the store accepted before.
    UpToDate {
        /// The repository's newest version of the model, if it has one.
        newest: Option<u64>,
    },
    /// A newer version was downloaded, verified, golden-checked and installed (inactive).
    Installed {
        /// What was installed.
        result: InstallResult,
    },
}

/// The active version, loaded.
#[derive(Clone, uniffi::Record)]
pub struct LoadedModel {
    /// The version.
    pub version: u64,
    /// A session on it.
    pub session: Arc<TernSession>,
    /// What the store decided before loading it (crash detected, quarantine, rollback).
    pub events: Vec<StoreEvent>,
    /// Its golden samples' worst share of tolerance on this session.
    pub golden_worst_share: f64,
}

/// What [`ModelFetcher::fetch`] got.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum FetchResult {
    /// The bytes: at most `max_bytes`, fewer at the file's end, none past it.
    Data {
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The repository has no such file.
    NotFound,
    /// Anything else (no network, a server error).
    Failed {
        /// Why.
        reason: String,
    },
}

/// Implemented by the app: reads a byte range of a repository file with its own network
/// stack (OkHttp, URLSession…), when and how the app decides. An exception it throws counts
/// as `Failed`.
#[uniffi::export(with_foreign)]
pub trait ModelFetcher: Send + Sync {
    /// Up to `max_bytes` of the file at `path` (relative to the repository) from `offset`.
    fn fetch(&self, path: String, offset: u64, max_bytes: u64) -> Result<FetchResult>;
}

struct ForeignFetcher(Arc<dyn ModelFetcher>);

impl tern_bundle::Fetcher for ForeignFetcher {
    fn fetch(
        &self,
        path: &str,
        offset: u64,
        max_bytes: u64,
    ) -> std::result::Result<Vec<u8>, tern_bundle::FetchError> {
        match self.0.fetch(path.to_string(), offset, max_bytes) {
            Ok(FetchResult::Data { bytes }) => Ok(bytes),
            Ok(FetchResult::NotFound) => Err(tern_bundle::FetchError::NotFound),
            Ok(FetchResult::Failed { reason }) => Err(tern_bundle::FetchError::Failed { reason }),
            Err(e) => Err(tern_bundle::FetchError::Failed {
                reason: e.to_string(),
            }),
        }
    }
}

/// How a rollout splits requests.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum RolloutStage {
    /// The active version answers; the candidate also runs on `sample` of requests, off
    /// the request's path, and its agreement is recorded.
    Shadow {
        /// Share of requests shadowed (0..=1).
        sample: f64,
    },
    /// The candidate answers `share` of requests, or every request on `share` of devices.
    Canary {
        /// The share (0..=1).
        share: f64,
        /// Of requests or of devices.
        unit: CanaryUnit,
    },
    /// Sticky arms: `share` of users get the candidate.
    Ab {
        /// The share (0..=1).
        share: f64,
    },
}

/// A rollout's stage and health bounds (`tern_bundle::RolloutPolicy`); every bound has
/// tern's default.
#[derive(Debug, Clone, uniffi::Record)]
pub struct RolloutConfig {
    /// The stage.
    pub stage: RolloutStage,
    /// Candidate runs before any verdict.
    #[uniffi(default = 100)]
    pub min_requests: u64,
    /// Roll back above the active version's error rate plus this.
    #[uniffi(default = 0.01)]
    pub max_error_rate_increase: f64,
    /// Roll back above the active version's p95 latency times this.
    #[uniffi(default = 1.5)]
    pub max_p95_ratio: f64,
    /// Roll back below this share of agreeing shadow runs.
    #[uniffi(default = 0.95)]
    pub min_agreement: f64,
    /// Promote after this many healthy candidate runs (`None`: the app promotes).
    #[uniffi(default = Some(1000))]
    pub promote_after: Option<u64>,
    /// Shadow agreement within these tolerances instead of the same top class.
    #[uniffi(default = None)]
    pub close_within: Option<Tolerances>,
}

/// Absolute and relative tolerances.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Tolerances {
    /// Absolute.
    pub atol: f64,
    /// Relative.
    pub rtol: f64,
}

impl RolloutConfig {
    fn policy(&self) -> tern_bundle::RolloutPolicy {
        let stage = match self.stage {
            RolloutStage::Shadow { sample } => tern_bundle::Stage::Shadow { sample },
            RolloutStage::Canary { share, unit } => tern_bundle::Stage::Canary { share, unit },
            RolloutStage::Ab { share } => tern_bundle::Stage::Ab { share },
        };
        let mut health = tern_bundle::HealthPolicy::default();
        health.min_requests = self.min_requests;
        health.max_error_rate_increase = self.max_error_rate_increase;
        health.max_p95_ratio = self.max_p95_ratio;
        health.min_agreement = self.min_agreement;
        health.promote_after = self.promote_after;
        let agreement = match &self.close_within {
            Some(t) => tern_bundle::Agreement::Close {
                atol: t.atol,
                rtol: t.rtol,
            },
            None => tern_bundle::Agreement::TopClass,
        };
        tern_bundle::RolloutPolicy::new(stage)
            .agreement(agreement)
            .health(health)
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, uniffi::Enum)]
pub enum RolloutVerdict {
    /// Not enough evidence yet.
    Continue,
    /// The candidate replaced the active version.
    Promote,
    /// The candidate was rolled back and quarantined.
    RollBack {
        /// Why.
        reason: RollbackReason,
    },
}

impl From<tern_bundle::Verdict> for RolloutVerdict {
    fn from(v: tern_bundle::Verdict) -> Self {
        match v {
            tern_bundle::Verdict::Promote => RolloutVerdict::Promote,
            tern_bundle::Verdict::RollBack(reason) => RolloutVerdict::RollBack { reason },
            _ => RolloutVerdict::Continue,
        }
    }
}

/// A verdict, as the listener hears it.
#[derive(Debug, Clone, uniffi::Record)]
pub struct RolloutEvent {
    /// The model.
    pub name: String,
    /// The active version.
    pub active: u64,
    /// The candidate.
    pub candidate: u64,
    /// The verdict.
    pub verdict: RolloutVerdict,
    /// Candidate runs when it was reached.
    pub candidate_runs: u64,
}

/// Implemented by the app: hears a rollout's verdict once it is applied to the store (to
/// record it, or to reload). An exception it throws is ignored.
#[uniffi::export(with_foreign)]
pub trait RolloutListener: Send + Sync {
    /// Called once, from the thread whose request reached the verdict.
    fn on_verdict(&self, event: RolloutEvent) -> Result<()>;
}

/// A rollout's health so far.
#[derive(Debug, Clone, uniffi::Record)]
pub struct RolloutHealth {
    /// Active version runs.
    pub active_runs: u64,
    /// Of which failed.
    pub active_errors: u64,
    /// Its p95 latency, ms.
    pub active_p95_ms: Option<f64>,
    /// Candidate runs.
    pub candidate_runs: u64,
    /// Of which failed.
    pub candidate_errors: u64,
    /// Its p95 latency, ms.
    pub candidate_p95_ms: Option<f64>,
    /// Shadow runs compared.
    pub compared: u64,
    /// Of which agreed.
    pub agreed: u64,
    /// Shadow runs skipped (busy).
    pub shadow_skipped: u64,
}

/// One request's answer in a rollout.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Served {
    /// The outputs.
    pub outputs: Vec<TensorData>,
    /// The version that answered.
    pub version: u64,
    /// Its arm.
    pub arm: Arm,
}

/// A directory of signed, verified model bundles on the device.
#[derive(uniffi::Object)]
pub struct TernModelStore {
    inner: tern_bundle::ModelStore,
}

#[uniffi::export]
impl TernModelStore {
    /// Opens (creating) the store in `dir`, trusting bundles signed by `threshold` of
    /// `trusted_keys` (public keys in TUF's JSON form: the `.pub` files `tern bundle
    /// keygen` writes).
    #[uniffi::constructor]
    pub fn open(
        dir: String,
        trusted_keys: Vec<String>,
        threshold: u32,
        config: StoreConfig,
    ) -> Result<Arc<Self>> {
        let keys = trusted_keys
            .iter()
            .map(|k| tern_bundle::PublicKey::from_json(k.as_bytes()))
            .collect::<tern_bundle::Result<Vec<_>>>()?;
        let trust = tern_bundle::Trust::new(keys, threshold as usize)?;
        let options = tern_bundle::StoreOptions::default()
            .keep(config.keep as usize)
            .quota_bytes(config.quota_bytes)
            .session(config.session.options());
        Ok(Arc::new(TernModelStore {
            inner: tern_bundle::ModelStore::open(dir, trust, options)?,
        }))
    }

    /// Verifies, golden-checks and stores the bundle file at `path` (inactive).
    pub fn install_file(&self, path: String) -> Result<InstallResult> {
        Ok(self.inner.install_file(path.as_ref())?.into())
    }

    /// Verifies, golden-checks and stores a bundle given as bytes (inactive).
    pub fn install_bytes(&self, bytes: Vec<u8>) -> Result<InstallResult> {
        Ok(self.inner.install(bytes.as_slice())?.into())
    }

    /// Makes an installed version active.
    pub fn activate(&self, name: String, version: u64) -> Result<()> {
        Ok(self.inner.activate(&name, version)?)
    }

    /// Goes back to the previous version; returns it.
    pub fn rollback(&self, name: String) -> Result<u64> {
        Ok(self.inner.rollback(&name)?)
    }

    /// Makes an installed version the candidate of the next rollout.
    pub fn stage(&self, name: String, version: u64) -> Result<()> {
        Ok(self.inner.stage(&name, version)?)
    }

    /// Every model's versions.
    pub fn status(&self) -> Result<Vec<ModelStatus>> {
        Ok(self
            .inner
            .status()?
            .into_iter()
            .map(|(name, m)| ModelStatus {
                name,
                active: m.active,
                previous: m.previous,
                candidate: m.candidate,
                installed: m.installed.into_iter().collect(),
                highest: m.highest,
                quarantined: m
                    .quarantined
                    .iter()
                    .map(|(v, why)| QuarantinedVersion {
                        version: *v,
                        reason: why.to_string(),
                    })
                    .collect(),
            })
            .collect())
    }

    /// Loads the active version under the crash breadcrumb (a version the process died
    /// loading twice is quarantined and the previous one loads instead), golden-checked.
    pub fn load(&self, name: String) -> Result<LoadedModel> {
        load(&self.inner, &name)
    }

    /// [`TernModelStore::load`] on a tern thread (a `suspend fun` in Kotlin).
    pub async fn load_async(&self, name: String) -> Result<LoadedModel> {
        let store = self.inner.clone();
        on_worker(move || load(&store, &name)).await
    }

    /// Pulls `name`'s newest version from the repository `fetcher` reads: TUF metadata
    /// verified from `initial_root` (first run only; the store keeps newer roots) up, the
    /// bundle downloaded resumably, verified, golden-checked and installed (inactive).
    pub fn update(
        &self,
        name: String,
        initial_root: Vec<u8>,
        fetcher: Arc<dyn ModelFetcher>,
    ) -> Result<UpdateResult> {
        update(&self.inner, &name, &initial_root, fetcher)
    }

    /// [`TernModelStore::update`] on a tern thread (a `suspend fun` in Kotlin, `async` in
    /// Swift): downloads never block the caller's thread.
    pub async fn update_async(
        &self,
        name: String,
        initial_root: Vec<u8>,
        fetcher: Arc<dyn ModelFetcher>,
    ) -> Result<UpdateResult> {
        let store = self.inner.clone();
        on_worker(move || update(&store, &name, &initial_root, fetcher)).await
    }

    /// Rolls `name`'s staged candidate out beside its active version on this device
    /// (`install_id`: a stable id the app keeps) under `config`, or without one the policy
    /// the candidate's signed manifest carries. The verdict is applied to the store when
    /// reached, then `listener` hears it.
    pub fn rollout(
        &self,
        name: String,
        config: Option<RolloutConfig>,
        install_id: String,
        listener: Option<Arc<dyn RolloutListener>>,
    ) -> Result<Arc<TernRollout>> {
        let hook: Option<tern_bundle::VerdictHook> = listener.map(|l| {
            Box::new(move |e: &tern_bundle::RolloutEvent| {
                let _ = l.on_verdict(RolloutEvent {
                    name: e.name.clone(),
                    active: e.active,
                    candidate: e.candidate,
                    verdict: e.verdict.into(),
                    candidate_runs: e.candidate_runs,
                });
            }) as tern_bundle::VerdictHook
        });
        let inner = self
            .inner
            .rollout(&name, config.map(|c| c.policy()), &install_id, hook)?;
        Ok(Arc::new(TernRollout {
            inner: Arc::new(inner),
        }))
    }
}

fn load(store: &tern_bundle::ModelStore, name: &str) -> Result<LoadedModel> {
    let loaded = store.load(name)?;
    Ok(LoadedModel {
        version: loaded.version,
        golden_worst_share: loaded.golden.worst_share(),
        events: loaded.events,
        session: Arc::new(TernSession {
            inner: Arc::new(loaded.session),
        }),
    })
}

fn update(
    store: &tern_bundle::ModelStore,
    name: &str,
    initial_root: &[u8],
    fetcher: Arc<dyn ModelFetcher>,
) -> Result<UpdateResult> {
    let updater = tern_bundle::Updater::new(
        store.clone(),
        initial_root,
        Arc::new(ForeignFetcher(fetcher)),
    )?;
    Ok(match updater.update(name)? {
        tern_bundle::UpdateOutcome::Installed(i) => UpdateResult::Installed { result: i.into() },
        tern_bundle::UpdateOutcome::UpToDate { newest } => UpdateResult::UpToDate { newest },
        _ => UpdateResult::UpToDate { newest: None },
    })
}

/// A candidate version served beside the active one; share it across threads.
#[derive(uniffi::Object)]
pub struct TernRollout {
    inner: Arc<tern_bundle::Rollout>,
}

fn serve(
    rollout: &tern_bundle::Rollout,
    inputs: Vec<TensorData>,
    user: Option<String>,
) -> Result<Served> {
    let served = rollout.run(to_tern(&inputs)?, user.as_deref())?;
    Ok(Served {
        outputs: from_tern(&served.outputs)?,
        version: served.version,
        arm: served.arm,
    })
}

#[uniffi::export]
impl TernRollout {
    /// Answers one request (`user` keys an A/B arm; without it the device is the user).
    pub fn run(&self, inputs: Vec<TensorData>, user: Option<String>) -> Result<Served> {
        serve(&self.inner, inputs, user)
    }

    /// [`TernRollout::run`] on a tern thread.
    pub async fn run_async(&self, inputs: Vec<TensorData>, user: Option<String>) -> Result<Served> {
        let rollout = self.inner.clone();
        on_worker(move || serve(&rollout, inputs, user)).await
    }

    /// The verdict so far.
    pub fn verdict(&self) -> RolloutVerdict {
        self.inner.verdict().into()
    }

    /// What it has recorded.
    pub fn health(&self) -> RolloutHealth {
        let h = self.inner.health();
        RolloutHealth {
            active_runs: h.active.runs,
            active_errors: h.active.errors,
            active_p95_ms: h.active.latency_ms.quantile(0.95),
            candidate_runs: h.candidate.runs,
            candidate_errors: h.candidate.errors,
            candidate_p95_ms: h.candidate.latency_ms.quantile(0.95),
            compared: h.compared,
            agreed: h.agreed,
            shadow_skipped: h.shadow_skipped,
        }
    }

    /// Waits until every shadow run queued so far is recorded.
    pub fn wait_for_shadows(&self) {
        self.inner.wait_for_shadows();
    }
}
