//! The models the agent serves, from one of two [`Source`]s, and their hot reload.
//!
//! **A model store** (`tern store`'s directory, [`ModelStore`]): each model's active
//! version, loaded under the store's crash breadcrumb — a version the process died loading
//! [`CRASH_LIMIT`](tern_bundle::CRASH_LIMIT) times is quarantined and the previous one
//! serves — with its golden samples run again. A version that fails to load on this device
//! is rolled back to the previous one. The agent's updater
//! ([`crate::update`]) installs and activates new versions; each scan serves what is
//! active.
//!
//! **A directory**: each entry is a model named after it:
//! - `NAME.onnx`, an ONNX file;
//! - `NAME/model.onnx`, a folder (for models with external data beside them);
//! - `NAME.tern`, a signed bundle: verified against the configured keys (never served
//!   without them), its version never going down, its golden samples run on this device
//!   before it is served.
//!
//! [`Repository::scan`] compares each entry's size and modification time with what it saw
//! last. A changed file is loaded only once it has stayed unchanged for one scan (so a
//! file still being copied is not read half-written), into a new session beside the one
//! serving: only when it loaded is it swapped in, atomically. A request already running
//! holds the old version (an `Arc`) and finishes on it. A file that fails to load is
//! refused, logged and counted, and the version before it keeps serving; it is tried
//! again when it changes. A removed file stops being served.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use tern::{Model, Session, SessionOptions};
use tern_bundle::{Bundle, ModelStore, StoreEvent, Trust, VerifyOptions};

use crate::metrics::{LoadOutcome, Metrics};
use crate::runner::Runner;
use tern_flows::{BatchOptions, Flows};

/// What a model is loaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// An ONNX file (`NAME.onnx` or `NAME/model.onnx`).
    Onnx,
    /// A signed `.tern` bundle.
    Bundle,
    /// A flow of the flow file.
    Flow,
}

/// A model being served.
#[derive(Debug)]
pub struct ServedModel {
    /// Its name (the directory entry's).
    pub name: String,
    /// Its version: the bundle's, or for ONNX files a count of loads since the agent
    /// started (1, 2, …).
    pub version: String,
    /// What runs its requests.
    pub runner: Runner,
    /// The file it was loaded from.
    pub source: PathBuf,
    /// What kind of file that is.
    pub kind: SourceKind,
}

/// What a scan did, one event per model that changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoEvent {
    /// A version is now served.
    Loaded {
        /// The model.
        name: String,
        /// The version.
        version: String,
    },
    /// A file was refused; the version before it, if any, keeps serving.
    Refused {
        /// The model.
        name: String,
        /// Why.
        reason: String,
    },
    /// A model's file went away.
    Removed {
        /// The model.
        name: String,
    },
}

/// A file's identity for change detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
}

/// What the scanner knows about one name.
#[derive(Debug, Default)]
struct Watched {
    /// The fingerprint seen at the last scan.
    seen: Option<Fingerprint>,
    /// The fingerprint last loaded or refused (not tried again until it changes).
    tried: Option<Fingerprint>,
    /// Successful loads of this name (the version of an ONNX model).
    loads: u64,
}

/// Where the served models come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory of ONNX files, folders and bundles.
    Directory(PathBuf),
    /// A model store: each model's active version.
    Store(Box<ModelStore>),
}

/// What the repository serves besides its source's models.
#[derive(Default)]
pub struct Serving {
    /// Micro-batching for every model with a batch axis.
    pub batch: Option<BatchOptions>,
    /// A flow file's flows, each served as a model of its name.
    pub flows: Option<Arc<Flows>>,
}

/// The served models and where they come from.
pub struct Repository {
    source: Source,
    batch: Option<BatchOptions>,
    /// The flows' names (served beside the source's models, never dropped by a scan).
    flow_names: BTreeSet<String>,
    session: SessionOptions,
    trust: Option<Trust>,
    metrics: Arc<Metrics>,
    served: RwLock<BTreeMap<String, Arc<ServedModel>>>,
    watched: Mutex<BTreeMap<String, Watched>>,
    /// Names already warned about (two entries for one name), not to repeat it each scan.
    warned: Mutex<BTreeSet<String>>,
    /// Per store model, the active version last loaded or refused (not tried again).
    tried: Mutex<BTreeMap<String, u64>>,
}

impl Repository {
    /// A repository over `source`, nothing loaded yet ([`Repository::scan`] loads). A
    /// store's models get the store's session options, `session` the directory's.
    pub fn new(
        source: Source,
        serving: Serving,
        session: SessionOptions,
        trust: Option<Trust>,
        metrics: Arc<Metrics>,
    ) -> Repository {
        let mut served = BTreeMap::new();
        if let Some(flows) = &serving.flows {
            for name in flows.names() {
                served.insert(
                    name.clone(),
                    Arc::new(ServedModel {
                        name: name.clone(),
                        version: "1".into(),
                        runner: Runner::Flow {
                            flows: flows.clone(),
                            name,
                        },
                        source: PathBuf::new(),
                        kind: SourceKind::Flow,
                    }),
                );
            }
        }
        Repository {
            source,
            batch: serving.batch,
            flow_names: served.keys().cloned().collect(),
            session,
            trust,
            metrics,
            served: RwLock::new(served),
            watched: Mutex::default(),
            warned: Mutex::default(),
            tried: Mutex::default(),
        }
    }

    /// The served version of `name`.
    pub fn get(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.served
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Every served model, by name.
    pub fn all(&self) -> Vec<Arc<ServedModel>> {
        self.served
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// The directory's model entries: name → (file to load, kind).
    fn entries(&self, dir: &Path) -> std::io::Result<BTreeMap<String, (PathBuf, SourceKind)>> {
        let mut found: BTreeMap<String, (PathBuf, SourceKind)> = BTreeMap::new();
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        paths.sort();
        for path in paths {
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let entry = if path.is_dir() {
                let model = path.join("model.onnx");
                model
                    .is_file()
                    .then(|| (file_name.to_string(), (model, SourceKind::Onnx)))
            } else if let Some(stem) = file_name.strip_suffix(".onnx") {
                Some((stem.to_string(), (path.clone(), SourceKind::Onnx)))
            } else {
                file_name
                    .strip_suffix(".tern")
                    .map(|stem| (stem.to_string(), (path.clone(), SourceKind::Bundle)))
            };
            let Some((name, source)) = entry else {
                continue;
            };
            if !valid_name(&name) {
                continue;
            }
            if let Some((first, _)) = found.get(&name) {
                let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
                if warned.insert(name.clone()) {
                    tracing::warn!(model = %name, serving = %first.display(), ignored = %path.display(),
                        "two entries for one model name; the first is served");
                }
                continue;
            }
            found.insert(name, source);
        }
        Ok(found)
    }

    /// Checks the source once and loads, reloads or drops what changed. In a directory,
    /// on the first scan (`settle` false) files are loaded as found; afterwards a changed
    /// file is loaded once it is unchanged since the previous scan.
    pub fn scan(&self, settle: bool) -> Vec<RepoEvent> {
        let events = match &self.source {
            Source::Directory(dir) => self.scan_directory(dir, settle),
            Source::Store(store) => self.scan_store(store),
        };
        self.metrics.set_models(
            self.served
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
        );
        events
    }

    /// Serves `model` as `name`, in place of the version before it.
    fn serve(&self, model: ServedModel) -> RepoEvent {
        let (name, version) = (model.name.clone(), model.version.clone());
        tracing::info!(model = %name, version = %version, source = %model.source.display(), "model loaded");
        self.metrics.load(&name, LoadOutcome::loaded);
        self.served
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.clone(), Arc::new(model));
        RepoEvent::Loaded { name, version }
    }

    /// Counts and logs a refusal.
    fn refuse(&self, name: &str, source: &Path, reason: String) -> RepoEvent {
        let current = self.get(name);
        tracing::warn!(model = %name, source = %source.display(), reason = %reason,
            serving = current.as_ref().map_or("nothing", |m| m.version.as_str()),
            "model refused");
        self.metrics.load(name, LoadOutcome::refused);
        RepoEvent::Refused {
            name: name.to_string(),
            reason,
        }
    }

    /// Stops serving the models `keep` does not name.
    fn drop_others(&self, keep: impl Fn(&str) -> bool, events: &mut Vec<RepoEvent>) {
        let mut served = self.served.write().unwrap_or_else(PoisonError::into_inner);
        let gone: Vec<String> = served
            .keys()
            .filter(|n| !keep(n) && !self.flow_names.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            served.remove(&name);
            tracing::info!(model = %name, "model removed");
            self.metrics.load(&name, LoadOutcome::removed);
            events.push(RepoEvent::Removed { name });
        }
    }

    /// One scan of a model store: each model whose active version is not the one served
    /// is loaded (under the crash breadcrumb); one that fails is rolled back.
    fn scan_store(&self, store: &ModelStore) -> Vec<RepoEvent> {
        let status = match store.status() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(store = %store.dir().display(), error = %e, "cannot read the model store");
                return Vec::new();
            }
        };
        let mut events = Vec::new();
        let mut tried = self.tried.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, state) in &status {
            let Some(active) = state.active else { continue };
            let served = self.get(name).map(|m| m.version.clone());
            if served.as_deref() == Some(active.to_string().as_str())
                || tried.get(name) == Some(&active)
            {
                continue;
            }
            tried.insert(name.clone(), active);
            let path = store.bundle_path(name, active);
            match store.load(name) {
                Ok(loaded) => {
                    for e in &loaded.events {
                        log_store_event(e);
                    }
                    tried.insert(name.clone(), loaded.version);
                    events.push(self.serve(ServedModel {
                        name: name.clone(),
                        version: loaded.version.to_string(),
                        source: store.bundle_path(name, loaded.version),
                        runner: Runner::for_session(loaded.session, self.batch.as_ref(), name),
                        kind: SourceKind::Bundle,
                    }));
                }
                Err(e) => {
                    events.push(self.refuse(name, &path, e.to_string()));
                    // The active version does not load here: back to the one before it,
                    // which the next scan serves.
                    if state.previous.is_some() {
                        match store.rollback(name) {
                            Ok(to) => {
                                tracing::warn!(model = %name, from = active, to, "rolled back")
                            }
                            Err(e) => tracing::error!(model = %name, error = %e, "rollback failed"),
                        }
                    }
                }
            }
        }
        tried.retain(|n, _| status.contains_key(n));
        self.drop_others(
            |n| status.get(n).is_some_and(|s| s.active.is_some()),
            &mut events,
        );
        events
    }

    /// One scan of a model directory.
    fn scan_directory(&self, dir: &Path, settle: bool) -> Vec<RepoEvent> {
        let entries = match self.entries(dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "cannot read the model directory");
                return Vec::new();
            }
        };
        let mut events = Vec::new();
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, (path, kind)) in &entries {
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            let print = Fingerprint {
                len: meta.len(),
                modified: meta.modified().ok(),
            };
            let w = watched.entry(name.clone()).or_default();
            let stable = w.seen == Some(print);
            w.seen = Some(print);
            if w.tried == Some(print) || (settle && !stable) {
                continue;
            }
            w.tried = Some(print);
            let current = self.get(name);
            match self.load(name, path, *kind, w.loads + 1, current.as_deref()) {
                Ok(model) => {
                    w.loads += 1;
                    events.push(self.serve(model));
                }
                Err(reason) => events.push(self.refuse(name, path, reason)),
            }
        }
        watched.retain(|name, _| entries.contains_key(name));
        drop(watched);
        self.drop_others(|n| entries.contains_key(n), &mut events);
        events
    }

    /// Loads one entry into a session; the error is the reason it is refused.
    fn load(
        &self,
        name: &str,
        path: &Path,
        kind: SourceKind,
        next_load: u64,
        current: Option<&ServedModel>,
    ) -> Result<ServedModel, String> {
        let session = |model: &Model, version: &str| {
            Session::new(model, self.session.clone().model_identity(name, version))
                .map_err(|e| e.to_string())
        };
        let (version, session) = match kind {
            SourceKind::Flow => return Err("a flow is built from the flow file".into()),
            SourceKind::Onnx => {
                let model = Model::load(path).map_err(|e| e.to_string())?;
                let version = next_load.to_string();
                let s = session(&model, &version)?;
                (version, s)
            }
            SourceKind::Bundle => {
                let trust = self
                    .trust
                    .clone()
                    .ok_or("a bundle, and no keys are trusted (set `trust`)")?;
                let mut verify = VerifyOptions::trusting(trust);
                if let Some(v) = current
                    .filter(|c| c.kind == SourceKind::Bundle)
                    .and_then(|c| c.version.parse().ok())
                {
                    verify = verify.installed_version(v);
                }
                let bundle = Bundle::read(path, &verify).map_err(|e| e.to_string())?;
                if bundle.manifest().name != name {
                    return Err(format!(
                        "the bundle is model '{}', not '{name}'",
                        bundle.manifest().name
                    ));
                }
                let model = bundle.model().map_err(|e| e.to_string())?;
                let version = bundle.manifest().version.to_string();
                let s = session(&model, &version)?;
                bundle
                    .check_golden(&s)
                    .map_err(|e| format!("golden check: {e}"))?;
                (version, s)
            }
        };
        Ok(ServedModel {
            name: name.to_string(),
            version,
            runner: Runner::for_session(session, self.batch.as_ref(), name),
            source: path.to_path_buf(),
            kind,
        })
    }
}

fn log_store_event(e: &StoreEvent) {
    match e {
        StoreEvent::CrashDetected {
            name,
            version,
            crashes,
        } => {
            tracing::warn!(model = %name, version, crashes, "an earlier load of this version never finished")
        }
        StoreEvent::Quarantined { name, version } => {
            tracing::warn!(model = %name, version, "quarantined: it kept killing the process while loading")
        }
        StoreEvent::RolledBack { name, from, to } => {
            tracing::warn!(model = %name, from, to, "rolled back")
        }
        other => tracing::warn!(event = ?other, "model store event"),
    }
}

/// A model name the URL paths can carry unescaped: ASCII letters, digits, `-`, `_`, `.`,
/// not starting with `.` (hidden and temporary files are not models).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        assert!(valid_name("ppocr_cls-int8.v2"));
        assert!(!valid_name(".partial"));
        assert!(!valid_name("a b"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
    }
}
