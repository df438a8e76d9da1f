//! The on-device model store: verified, golden-checked bundles kept by name and version,
//! one active version per model, installed and switched atomically.
//!
//! ```text
//! DIR/state.json                 which versions are installed, active, previous; the highest
//!                                version ever accepted (the rollback floor)
//! DIR/bundles/NAME/VERSION.tern  the bundles
//! DIR/lock                       held while the store changes (between processes too)
//! DIR/loading/NAME               held (shared) by every load of NAME in progress
//! ```
//!
//! Every change is crash-safe: a bundle is written to a temporary file, synced and renamed
//! into place before `state.json` names it, and `state.json` itself is replaced by rename. A
//! process killed at any point leaves the previous state, whose files are all there; the
//! next [`ModelStore::open`] removes what the killed process left half-done.
//!
//! Loading is guarded against crash loops: [`ModelStore::begin_load`] writes a breadcrumb
//! (`loading` in `state.json`) before a version loads and [`Loading::finish`] clears it. A
//! breadcrumb no live load holds was left by a process that died while loading; after
//! [`CRASH_LIMIT`] such deaths the version is quarantined and the previous one is active
//! again, so a model that kills its host app cannot do so forever.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tern::{Session, SessionOptions};

use crate::archive::{Bundle, Limits, VerifyOptions};
use crate::error::{Error, Result};
use crate::events::Events;
use crate::fsio::write_atomic;
use crate::golden::GoldenReport;
use crate::keys::Trust;
use crate::rollout::{
    RollbackReason, Rollout, RolloutEvent, RolloutPolicy, Verdict, VerdictHook, Version,
};

/// How a store keeps and checks bundles.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Versions kept per model, the active and previous ones included (default 3, at least 2).
    pub keep: usize,
    /// Bytes all bundles may take together (default 1 GiB); the active and previous
    /// versions are never removed to make room.
    pub quota_bytes: u64,
    /// The session a new version's golden samples run on: the backend it will serve with.
    pub session: SessionOptions,
    /// Size limits for incoming bundles.
    pub limits: Limits,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            keep: 3,
            quota_bytes: 1 << 30,
            session: SessionOptions::new(),
            limits: Limits::default(),
        }
    }
}

impl StoreOptions {
    /// Sets the versions kept per model.
    pub fn keep(mut self, n: usize) -> Self {
        self.keep = n;
        self
    }

    /// Sets the byte quota.
    pub fn quota_bytes(mut self, bytes: u64) -> Self {
        self.quota_bytes = bytes;
        self
    }

    /// Sets the golden checks' session options.
    pub fn session(mut self, options: SessionOptions) -> Self {
        self.session = options;
        self
    }
}

/// One model's versions in a store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelState {
    /// The version serving requests.
    pub active: Option<u64>,
    /// The version before it, kept to roll back to.
    pub previous: Option<u64>,
    /// Every version on disk.
    pub installed: BTreeSet<u64>,
    /// The highest version ever accepted: no lower one is installed again.
    pub highest: u64,
    /// The version whose load began and has not finished: the crash breadcrumb. A process
    /// that dies while loading leaves it here for the next [`ModelStore::begin_load`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loading: Option<u64>,
    /// Per version, the loads that never finished since its last good load.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub crashes: BTreeMap<u64, u32>,
    /// Versions never activated or installed again, and why: they crashed the process
    /// [`CRASH_LIMIT`] times while loading, or their rollout rolled them back.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub quarantined: BTreeMap<u64, QuarantineReason>,
    /// The version being rolled out beside the active one ([`ModelStore::stage`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<u64>,
}

/// Why a version is quarantined.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "why", rename_all = "snake_case")]
#[non_exhaustive]
pub enum QuarantineReason {
    /// The process died while loading it this many times in a row.
    CrashLoop {
        /// Loads that never finished.
        crashes: u32,
    },
    /// Its rollout's health checks rolled it back.
    Rollout {
        /// What was out of bounds.
        rollback: RollbackReason,
    },
}

impl std::fmt::Display for QuarantineReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuarantineReason::CrashLoop { crashes } => {
                write!(f, "the process died while loading it {crashes} times")
            }
            QuarantineReason::Rollout { rollback } => {
                write!(f, "its rollout rolled it back ({rollback})")
            }
        }
    }
}

// The store's state compares as a whole (recovery saves only what changed): the reasons'
// floats come from health ratios, never NaN.
impl Eq for QuarantineReason {}

/// Unfinished loads of one version after which it is quarantined.
pub const CRASH_LIMIT: u32 = 2;

/// What a store decided on its own while opening a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum StoreEvent {
    /// A load of `version` never finished: the process died during it.
    CrashDetected {
        /// The model.
        name: String,
        /// The version that was loading.
        version: u64,
        /// Its unfinished loads so far.
        crashes: u32,
    },
    /// `version` reached [`CRASH_LIMIT`] unfinished loads and is quarantined.
    Quarantined {
        /// The model.
        name: String,
        /// The quarantined version.
        version: u64,
    },
    /// The active version was quarantined and the previous one took its place.
    RolledBack {
        /// The model.
        name: String,
        /// The version rolled back from.
        from: u64,
        /// The version now active.
        to: u64,
    },
}

/// A load of a model's active version in progress: its breadcrumb is in the store until
/// [`Loading::finish`]. Dropping it unfinished (or the process dying) leaves the breadcrumb,
/// which the next [`ModelStore::begin_load`] counts as a crash.
#[derive(Debug)]
#[must_use = "a load that is never finished counts as a crash"]
pub struct Loading<'a> {
    store: &'a ModelStore,
    name: String,
    version: u64,
    events: Vec<StoreEvent>,
    // A shared lock on DIR/loading/NAME while this load lives: a breadcrumb whose lock
    // nobody holds was left by a process that died; one whose lock is held belongs to a
    // load still running (another process, or another handle).
    _alive: File,
}

impl Loading<'_> {
    /// The version being loaded.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// What the store decided before this load (crashes detected, quarantine, rollback).
    pub fn events(&self) -> &[StoreEvent] {
        &self.events
    }

    /// The active bundle, read back and verified ([`ModelStore::active`]).
    pub fn bundle(&self) -> Result<Bundle> {
        self.store.read_verified(&self.name, self.version)
    }

    /// The load went well: clears the breadcrumb and the version's crash count.
    pub fn finish(self) -> Result<()> {
        self.store.end_load(&self.name, self.version)
    }

    /// The load failed with an error the process survived (not a crash): clears the
    /// breadcrumb, keeps the crash count.
    pub fn abandon(self) -> Result<()> {
        let _lock = self.store.lock()?;
        let mut state = self.store.state()?;
        if let Some(m) = state.models.get_mut(&self.name) {
            if m.loading == Some(self.version) {
                m.loading = None;
                return self.store.save(&state);
            }
        }
        Ok(())
    }
}

/// A model loaded from the store by [`ModelStore::load`].
#[derive(Debug)]
#[non_exhaustive]
pub struct LoadedModel {
    /// The version serving.
    pub version: u64,
    /// Its bundle.
    pub bundle: Bundle,
    /// A session on it, with the store's session options.
    pub session: Session,
    /// Its golden samples, run again on this session.
    pub golden: GoldenReport,
    /// What the store decided before this load.
    pub events: Vec<StoreEvent>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    models: BTreeMap<String, ModelState>,
}

/// What [`ModelStore::install`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Installed {
    /// The model's name.
    pub name: String,
    /// The version installed (not yet active).
    pub version: u64,
    /// Its golden check on this device.
    pub golden: GoldenReport,
    /// Older versions removed to stay within `keep` and the quota.
    pub removed: Vec<u64>,
}

/// A directory of verified bundles (see the module docs). Cloning gives another handle on
/// the same directory.
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
    trust: Trust,
    options: StoreOptions,
    events: Events,
}

const STATE: &str = "state.json";
const MAX_STATE_BYTES: u64 = 16 << 20;

impl ModelStore {
    /// Opens (creating if needed) the store in `dir`, trusting `trust` for new bundles, and
    /// clears what an interrupted change left: temporary files, bundles no state names,
    /// versions whose file is gone.
    pub fn open(
        dir: impl Into<PathBuf>,
        trust: Trust,
        options: StoreOptions,
    ) -> Result<ModelStore> {
        if options.keep < 2 {
            return Err(Error::InvalidOption {
                reason: format!(
                    "keep {} must be at least 2 (active and previous)",
                    options.keep
                ),
            });
        }
        let store = ModelStore {
            dir: dir.into(),
            trust,
            events: Events::for_sessions(&options.session),
            options,
        };
        let bundles = store.dir.join("bundles");
        std::fs::create_dir_all(&bundles).map_err(Error::io(&bundles))?;
        let _lock = store.lock()?;
        store.recover()?;
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every model's versions.
    pub fn status(&self) -> Result<BTreeMap<String, ModelState>> {
        Ok(self.state()?.models)
    }

    /// Verifies a bundle (signatures, expiry, files, no version below the highest accepted
    /// for its name), runs its golden samples on this device, and stores it, inactive.
    /// On any failure the store is unchanged.
    pub fn install(&self, reader: impl Read) -> Result<Installed> {
        let options = VerifyOptions::trusting(self.trust.clone()).limits(self.options.limits);
        let bundle = match Bundle::from_reader(reader, &options) {
            Ok(b) => b,
            Err(e) => {
                self.events.refused("tern.model.install_refused", None, &e);
                return Err(e);
            }
        };
        let (name, version) = (bundle.manifest().name.clone(), bundle.manifest().version);
        match self.install_verified(bundle) {
            Ok(installed) => {
                let worst = installed.golden.worst_share();
                self.events
                    .installed(&installed.name, installed.version, worst);
                Ok(installed)
            }
            Err(e) => {
                let bundle = Some((name.as_str(), version));
                self.events
                    .refused("tern.model.install_refused", bundle, &e);
                Err(e)
            }
        }
    }

    fn install_verified(&self, bundle: Bundle) -> Result<Installed> {
        let floor = |state: &State, name: &str| state.models.get(name).map(|m| m.highest);
        // The floor is checked now, before the golden check, and again under the lock.
        if let Some(m) = self.state()?.models.get(&bundle.manifest().name) {
            check_floor(&bundle, m.highest)?;
            check_not_quarantined(&bundle.manifest().name, m, bundle.manifest().version)?;
        }
        let options = self
            .identified(&bundle.manifest().name, bundle.manifest().version)
            .span_label("tern.purpose", "golden_check");
        let session = Session::new(&bundle.model()?, options)?;
        let golden = bundle.check_golden(&session)?;
        let bytes = bundle.to_bytes()?;
        let (name, version) = (bundle.manifest().name.clone(), bundle.manifest().version);

        let _lock = self.lock()?;
        let mut state = self.state()?;
        if let Some(h) = floor(&state, &name) {
            check_floor(&bundle, h)?;
        }
        let model = state.models.entry(name.clone()).or_default();
        check_not_quarantined(&name, model, version)?;
        let protected: u64 = [model.active, model.previous]
            .into_iter()
            .flatten()
            .filter(|v| *v != version)
            .map(|v| self.size_of(&name, v))
            .sum();
        if protected + bytes.len() as u64 > self.options.quota_bytes {
            return Err(Error::TooLarge {
                what: format!("{name} version {version} with the active and previous versions"),
                size: protected + bytes.len() as u64,
                limit: self.options.quota_bytes,
            });
        }
        let path = self.bundle_path(&name, version);
        let folder = self.dir.join("bundles").join(&name);
        std::fs::create_dir_all(&folder).map_err(Error::io(&folder))?;
        write_atomic(&path, &bytes)?;
        model.installed.insert(version);
        model.highest = model.highest.max(version);
        let removed = self.prune(&name, model, version);
        self.save(&state)?;
        for v in &removed {
            let _ = std::fs::remove_file(self.bundle_path(&name, *v));
        }
        Ok(Installed {
            name,
            version,
            golden,
            removed,
        })
    }

    /// Installs the bundle file at `path` ([`ModelStore::install`]).
    pub fn install_file(&self, path: &Path) -> Result<Installed> {
        let meta = std::fs::metadata(path).map_err(Error::io(path))?;
        if !meta.is_file() {
            return Err(Error::Io {
                path: path.into(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let file = File::open(path).map_err(Error::io(path))?;
        self.install(std::io::BufReader::new(file))
    }

    /// Makes an installed version the active one; the active one becomes the previous.
    pub fn activate(&self, name: &str, version: u64) -> Result<()> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let model = state
            .models
            .get_mut(name)
            .filter(|m| m.installed.contains(&version))
            .ok_or_else(|| not_installed(name, version))?;
        check_not_quarantined(name, model, version)?;
        if model.candidate == Some(version) {
            model.candidate = None;
        }
        if model.active != Some(version) {
            model.previous = model.active;
            model.active = Some(version);
        }
        self.save(&state)?;
        self.events.emit(
            "tern.model.activated",
            &[
                ("model", name.into()),
                ("version", i64::try_from(version).unwrap_or(i64::MAX).into()),
            ],
        );
        Ok(())
    }

    /// Goes back to the previous version; returns it. The version rolled back from stays
    /// installed (for inspection) until pruned.
    pub fn rollback(&self, name: &str) -> Result<u64> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let model = state
            .models
            .get_mut(name)
            .ok_or_else(|| not_installed(name, 0))?;
        let previous = model.previous.ok_or_else(|| not_installed(name, 0))?;
        let from = model.active.replace(previous);
        model.previous = None;
        self.save(&state)?;
        self.events
            .rolled_back(name, from.unwrap_or(0), previous, "app");
        Ok(previous)
    }

    /// The active version of `name` and its bundle, read back from disk and verified again
    /// (signatures and every file's hash; expiry is not checked again for what is
    /// installed).
    pub fn active(&self, name: &str) -> Result<(u64, Bundle)> {
        let version = self
            .state()?
            .models
            .get(name)
            .and_then(|m| m.active)
            .ok_or_else(|| not_installed(name, 0))?;
        Ok((version, self.read_verified(name, version)?))
    }

    /// Begins loading `name`'s active version, leaving a breadcrumb in the store first.
    ///
    /// A breadcrumb found here means the last load never finished: the process died during
    /// it. That counts as a crash of the version; at [`CRASH_LIMIT`] the version is
    /// quarantined and, if it was active, the previous version takes its place (the
    /// [`Loading::events`] say so). A quarantined active version with nothing to roll back
    /// to is [`Error::Quarantined`].
    pub fn begin_load(&self, name: &str) -> Result<Loading<'_>> {
        self.begin(name, Slot::Active)
    }

    fn begin(&self, name: &str, slot: Slot) -> Result<Loading<'_>> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let model = state
            .models
            .get_mut(name)
            .ok_or_else(|| not_installed(name, 0))?;
        let alive = self.open_lock_file(&self.dir.join("loading").join(name))?;
        let someone_loading = match alive.try_lock() {
            Ok(()) => false,
            Err(std::fs::TryLockError::WouldBlock) => true,
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io(self.dir.join("loading"))(e))
            }
        };
        // Under the store's lock nobody else takes this one exclusively: shared never waits.
        let _ = alive.unlock();
        alive
            .lock_shared()
            .map_err(Error::io(self.dir.join("loading")))?;
        let mut events = Vec::new();
        if someone_loading {
            // A live load's breadcrumb: not a crash.
        } else if let Some(v) = model.loading.take() {
            let crashes = model.crashes.entry(v).or_default();
            *crashes += 1;
            events.push(StoreEvent::CrashDetected {
                name: name.into(),
                version: v,
                crashes: *crashes,
            });
            let crashes = *crashes;
            if crashes >= CRASH_LIMIT && !model.quarantined.contains_key(&v) {
                model
                    .quarantined
                    .insert(v, QuarantineReason::CrashLoop { crashes });
                events.push(StoreEvent::Quarantined {
                    name: name.into(),
                    version: v,
                });
                if model.candidate == Some(v) {
                    model.candidate = None;
                }
                if model.active == Some(v) {
                    let to = model
                        .previous
                        .filter(|p| !model.quarantined.contains_key(p));
                    model.active = to;
                    model.previous = None;
                    if let Some(to) = to {
                        events.push(StoreEvent::RolledBack {
                            name: name.into(),
                            from: v,
                            to,
                        });
                    }
                }
            }
        }
        let wanted = match slot {
            Slot::Active => model.active,
            Slot::Candidate => model.candidate,
        };
        let version = match wanted {
            Some(v) => {
                model.loading = Some(v);
                Ok(v)
            }
            None => Err(match (slot, model.quarantined.last_key_value()) {
                (Slot::Active, Some((&version, &reason))) => Error::Quarantined {
                    name: name.into(),
                    version,
                    reason,
                },
                _ => not_installed(name, 0),
            }),
        };
        // Saved even when there is nothing to load: the crash count and quarantine stand.
        self.save(&state)?;
        for e in &events {
            self.events.store_event(e);
        }
        Ok(Loading {
            store: self,
            name: name.into(),
            version: version?,
            events,
            _alive: alive,
        })
    }

    /// Loads `name`'s active version under a crash breadcrumb ([`ModelStore::begin_load`]):
    /// reads and verifies its bundle, builds a session with the store's session options and
    /// runs its golden samples on it, then clears the breadcrumb. An error the process
    /// survives clears the breadcrumb too and is returned.
    pub fn load(&self, name: &str) -> Result<LoadedModel> {
        self.load_slot(name, Slot::Active, None)
    }

    /// The store's session options, naming the model as the bundle does in telemetry.
    fn identified(&self, name: &str, version: u64) -> SessionOptions {
        self.options
            .session
            .clone()
            .model_identity(name, version.to_string())
    }

    pub(crate) fn events(&self) -> &Events {
        &self.events
    }

    /// Loads a slot's version; `arm` labels its spans (in a rollout).
    fn load_slot(&self, name: &str, slot: Slot, arm: Option<&str>) -> Result<LoadedModel> {
        let loading = self.begin(name, slot)?;
        let mut options = self.identified(name, loading.version);
        if let Some(arm) = arm {
            options = options.span_label("tern.rollout.arm", arm);
        }
        let result = (|| {
            let bundle = loading.bundle()?;
            let session = Session::new(&bundle.model()?, options)?;
            let golden = bundle.check_golden(&session)?;
            Ok((bundle, session, golden))
        })();
        match result {
            Ok((bundle, session, golden)) => {
                let (version, events) = (loading.version, loading.events.clone());
                loading.finish()?;
                Ok(LoadedModel {
                    version,
                    bundle,
                    session,
                    golden,
                    events,
                })
            }
            Err(e) => {
                loading.abandon()?;
                Err(e)
            }
        }
    }

    /// Makes an installed version the candidate of `name`'s next [`ModelStore::rollout`]
    /// (replacing any other candidate). It must not be the active version or quarantined.
    pub fn stage(&self, name: &str, version: u64) -> Result<()> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let model = state
            .models
            .get_mut(name)
            .filter(|m| m.installed.contains(&version))
            .ok_or_else(|| not_installed(name, version))?;
        check_not_quarantined(name, model, version)?;
        if model.active == Some(version) {
            return Err(Error::InvalidOption {
                reason: format!("{name} version {version} is already active"),
            });
        }
        model.candidate = Some(version);
        self.save(&state)
    }

    /// Starts the rollout of `name`'s candidate ([`ModelStore::stage`]) beside its active
    /// version on this device (`install_id`: a stable id the app keeps, see
    /// [`Rollout::new`]) under `policy`, or the policy the candidate's signed manifest
    /// carries when the app gives none ([`Error::InvalidOption`] when neither has one).
    /// Both load as [`ModelStore::load`] loads (crash breadcrumb, golden samples). The rollout's verdict is applied to the store as soon as it is reached — a
    /// promoted candidate becomes active, a rolled-back one is quarantined — and then
    /// passed to `on_event` (for the app's telemetry).
    pub fn rollout(
        &self,
        name: &str,
        policy: Option<RolloutPolicy>,
        install_id: &str,
        on_event: Option<VerdictHook>,
    ) -> Result<Rollout> {
        let active = self.load_slot(name, Slot::Active, Some("active"))?;
        let candidate = self.load_slot(name, Slot::Candidate, Some("candidate"))?;
        let policy = policy
            .or(candidate.bundle.manifest().rollout)
            .ok_or_else(|| Error::InvalidOption {
                reason: format!(
                    "no rollout policy: none given, and {name} version {} carries none",
                    candidate.version
                ),
            })?;
        self.events.emit(
            "tern.rollout.started",
            &[
                ("model", name.into()),
                (
                    "active",
                    i64::try_from(active.version).unwrap_or(i64::MAX).into(),
                ),
                (
                    "candidate",
                    i64::try_from(candidate.version).unwrap_or(i64::MAX).into(),
                ),
                ("stage", format!("{:?}", policy.stage).into()),
            ],
        );
        let store = self.clone();
        let hook = move |event: &RolloutEvent| {
            // A verdict the store cannot record is reached again by the next rollout.
            let _ = store.conclude(&event.name, event.candidate, event.verdict);
            store.events.verdict(event);
            if let Some(app) = &on_event {
                app(event);
            }
        };
        Rollout::new(
            name,
            Version {
                version: active.version,
                session: active.session,
            },
            Version {
                version: candidate.version,
                session: candidate.session,
            },
            policy,
            install_id,
            Some(Box::new(hook)),
        )
    }

    /// Applies a rollout's verdict on `name`'s `candidate`: [`Verdict::Promote`] makes it
    /// active (the active version becomes the previous one), [`Verdict::RollBack`]
    /// quarantines it. Nothing happens if `candidate` is no longer the candidate.
    pub fn conclude(&self, name: &str, candidate: u64, verdict: Verdict) -> Result<()> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        let Some(model) = state.models.get_mut(name) else {
            return Ok(());
        };
        if model.candidate != Some(candidate) {
            return Ok(());
        }
        match verdict {
            Verdict::Continue => return Ok(()),
            Verdict::Promote => {
                model.previous = model.active;
                model.active = Some(candidate);
            }
            Verdict::RollBack(rollback) => {
                model
                    .quarantined
                    .insert(candidate, QuarantineReason::Rollout { rollback });
            }
        }
        model.candidate = None;
        self.save(&state)
    }

    fn end_load(&self, name: &str, version: u64) -> Result<()> {
        let _lock = self.lock()?;
        let mut state = self.state()?;
        if let Some(m) = state.models.get_mut(name) {
            if m.loading == Some(version) {
                m.loading = None;
            }
            m.crashes.remove(&version);
            return self.save(&state);
        }
        Ok(())
    }

    fn read_verified(&self, name: &str, version: u64) -> Result<Bundle> {
        let options = VerifyOptions::trusting(self.trust.clone())
            .ignoring_expiry()
            .limits(self.options.limits);
        Bundle::read(&self.bundle_path(name, version), &options)
    }

    /// Where a version's bundle lives.
    pub fn bundle_path(&self, name: &str, version: u64) -> PathBuf {
        self.dir
            .join("bundles")
            .join(name)
            .join(format!("{version}.tern"))
    }

    fn size_of(&self, name: &str, version: u64) -> u64 {
        std::fs::metadata(self.bundle_path(name, version)).map_or(0, |m| m.len())
    }

    /// Versions to remove, oldest first, to keep at most `keep` and stay in the quota; never
    /// the active, previous or `new` one.
    fn prune(&self, name: &str, model: &mut ModelState, new: u64) -> Vec<u64> {
        let keep = |v: &u64| Some(*v) == model.active || Some(*v) == model.previous || *v == new;
        let mut removable: Vec<u64> = model
            .installed
            .iter()
            .copied()
            .filter(|v| !keep(v))
            .collect();
        let mut total: u64 = model.installed.iter().map(|v| self.size_of(name, *v)).sum();
        let mut removed = Vec::new();
        removable.reverse(); // pop() takes the oldest
        while model.installed.len() > self.options.keep || total > self.options.quota_bytes {
            let Some(v) = removable.pop() else { break };
            total -= self.size_of(name, v);
            model.installed.remove(&v);
            removed.push(v);
        }
        removed
    }

    fn lock(&self) -> Result<File> {
        let file = self.open_lock_file(&self.dir.join("lock"))?;
        file.lock().map_err(Error::io(self.dir.join("lock")))?;
        Ok(file)
    }

    fn open_lock_file(&self, path: &Path) -> Result<File> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(Error::io(path))
    }

    fn state(&self) -> Result<State> {
        let path = self.dir.join(STATE);
        match tern::fs::read_regular(&path, MAX_STATE_BYTES) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::malformed(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(Error::io(path)(e)),
        }
    }

    fn save(&self, state: &State) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| Error::malformed(format!("store state: {e}")))?;
        write_atomic(&self.dir.join(STATE), &bytes)
    }

    /// Clears an interrupted change (under the lock).
    fn recover(&self) -> Result<()> {
        let mut state = self.state()?;
        let before = state.clone();
        for (name, model) in state.models.iter_mut() {
            let present: BTreeSet<u64> = model
                .installed
                .iter()
                .copied()
                .filter(|v| self.bundle_path(name, *v).is_file())
                .collect();
            model.installed = present;
            if model.active.is_some_and(|v| !model.installed.contains(&v)) {
                model.active = model.previous.filter(|v| model.installed.contains(v));
                model.previous = None;
            }
            if model
                .previous
                .is_some_and(|v| !model.installed.contains(&v))
            {
                model.previous = None;
            }
        }
        if state != before {
            self.save(&state)?;
        }
        // Temporary files, and bundles no state names (killed between rename and save).
        remove_temporaries(&self.dir);
        let bundles = self.dir.join("bundles");
        for folder in read_dir(&bundles) {
            let name = folder.file_name().to_string_lossy().into_owned();
            let listed = state.models.get(&name);
            for file in read_dir(&folder.path()) {
                let keep = file
                    .file_name()
                    .to_str()
                    .and_then(|f| f.strip_suffix(".tern"))
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|v| listed.is_some_and(|m| m.installed.contains(&v)));
                if !keep {
                    let _ = std::fs::remove_file(file.path());
                }
            }
        }
        Ok(())
    }
}

fn check_floor(bundle: &Bundle, highest: u64) -> Result<()> {
    let version = bundle.manifest().version;
    if version < highest {
        return Err(Error::Rollback {
            version,
            installed: highest,
        });
    }
    Ok(())
}

fn check_not_quarantined(name: &str, model: &ModelState, version: u64) -> Result<()> {
    match model.quarantined.get(&version) {
        Some(&reason) => Err(Error::Quarantined {
            name: name.into(),
            version,
            reason,
        }),
        None => Ok(()),
    }
}

/// Which of a model's versions a load is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Active,
    Candidate,
}

fn not_installed(name: &str, version: u64) -> Error {
    Error::NotInstalled {
        name: name.into(),
        version,
    }
}

fn read_dir(dir: &Path) -> Vec<std::fs::DirEntry> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().collect())
        .unwrap_or_default()
}

fn remove_temporaries(dir: &Path) {
    for e in read_dir(dir) {
        if e.file_name().to_string_lossy().ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
