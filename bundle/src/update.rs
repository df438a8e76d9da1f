//! Updates from a repository ([`crate::repo`]) into a [`ModelStore`], the way a TUF client
//! updates: the root first (walking each rotation, every new root signed by the old keys
//! and its own), then a fresh timestamp, the snapshot it pins, the targets the snapshot
//! pins — each verified, never older than what this device trusted before, not expired —
//! and only then the bundle, whose length and hash the targets metadata fixes.
//!
//! The network belongs to the app: a [`Fetcher`] reads a range of a repository file (over
//! HTTP in the CLI, over the app's own stack on a phone, from a directory for a USB stick:
//! [`DirFetcher`]). Downloads resume where a previous attempt stopped
//! (`DIR/downloads/NAME-VERSION.part`) and are never read past the length the metadata
//! gives.
//!
//! What the device trusts is kept in the store: `DIR/tuf/{root,timestamp,snapshot,targets}.json`.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, FileProblem, Result};
use crate::fsio::write_atomic;
use crate::repo::{verify, MetaList, Role, Root, TargetFile, Targets};
use crate::signed::check_expiry;
use crate::store::{Installed, ModelStore};

/// Why a fetch failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The repository has no such file (how a device learns there is no newer root).
    #[error("not found")]
    NotFound,
    /// Anything else: no network, a server error, a timeout.
    #[error("{reason}")]
    Failed {
        /// What happened.
        reason: String,
    },
}

/// Reads repository files: the app's network stack, or the CLI's HTTP client.
pub trait Fetcher: Send + Sync {
    /// Up to `max_bytes` of the file at `path` (relative to the repository, `/`-separated)
    /// from byte `offset`: fewer at its end, none past it. Returning more than `max_bytes`
    /// is refused as [`Error::TooLarge`].
    fn fetch(
        &self,
        path: &str,
        offset: u64,
        max_bytes: u64,
    ) -> std::result::Result<Vec<u8>, FetchError>;
}

/// A repository in a local directory (a mounted medium, a synced folder, tests).
#[derive(Debug, Clone)]
pub struct DirFetcher {
    root: PathBuf,
}

impl DirFetcher {
    /// Reads the repository in `root`.
    pub fn new(root: impl Into<PathBuf>) -> DirFetcher {
        DirFetcher { root: root.into() }
    }
}

impl Fetcher for DirFetcher {
    fn fetch(
        &self,
        path: &str,
        offset: u64,
        max_bytes: u64,
    ) -> std::result::Result<Vec<u8>, FetchError> {
        use std::io::Seek;
        let failed = |e: std::io::Error| FetchError::Failed {
            reason: e.to_string(),
        };
        crate::archive::check_path(path).map_err(|e| FetchError::Failed {
            reason: e.to_string(),
        })?;
        let mut file = match File::open(self.root.join(path)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(FetchError::NotFound),
            Err(e) => return Err(failed(e)),
        };
        file.seek(std::io::SeekFrom::Start(offset))
            .map_err(failed)?;
        let mut bytes = Vec::new();
        file.take(max_bytes)
            .read_to_end(&mut bytes)
            .map_err(failed)?;
        Ok(bytes)
    }
}

/// Upper bounds on what a repository may send before its metadata gives exact lengths.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct UpdateLimits {
    /// A root (default 512 KiB).
    pub root_bytes: u64,
    /// The timestamp (default 16 KiB).
    pub timestamp_bytes: u64,
    /// The snapshot, when the timestamp gives no length (default 2 MiB).
    pub snapshot_bytes: u64,
    /// The targets metadata (default 16 MiB).
    pub targets_bytes: u64,
    /// Root rotations walked in one refresh (default 32).
    pub root_rotations: u64,
    /// Bytes asked for per fetch of a bundle (default 4 MiB): the unit of resumption.
    pub chunk_bytes: u64,
}

impl Default for UpdateLimits {
    fn default() -> Self {
        UpdateLimits {
            root_bytes: 512 << 10,
            timestamp_bytes: 16 << 10,
            snapshot_bytes: 2 << 20,
            targets_bytes: 16 << 20,
            root_rotations: 32,
            chunk_bytes: 4 << 20,
        }
    }
}

/// What [`Updater::update`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum UpdateOutcome {
    /// The repository has nothing newer for the model than the store.
    UpToDate {
        /// The repository's newest version of the model, if it has one.
        newest: Option<u64>,
    },
    /// A newer version was downloaded, verified, golden-checked and installed (inactive).
    Installed(Installed),
}

/// Brings a store's models up to date from a repository (see the module docs).
pub struct Updater {
    store: ModelStore,
    fetcher: Arc<dyn Fetcher>,
    limits: UpdateLimits,
    now: Option<SystemTime>,
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater")
            .field("store", &self.store.dir())
            .finish()
    }
}

impl Updater {
    /// An updater for `store` from the repository `fetcher` reads. `initial_root` (the
    /// root the app ships with) is trusted on the first run only, and only if it is signed
    /// by its own root keys; afterwards the store's newer trusted root prevails.
    pub fn new(
        store: ModelStore,
        initial_root: &[u8],
        fetcher: Arc<dyn Fetcher>,
    ) -> Result<Updater> {
        let updater = Updater {
            store,
            fetcher,
            limits: UpdateLimits::default(),
            now: None,
        };
        let dir = updater.tuf_dir();
        std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        if updater.trusted::<Root>(Role::Root)?.is_none() {
            Self::self_signed_root(initial_root)?;
            write_atomic(&dir.join(Role::Root.file()), initial_root)?;
        }
        Ok(updater)
    }

    /// Sets the limits.
    pub fn limits(mut self, limits: UpdateLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Checks expiry against `now` instead of the clock (tests, devices with a known
    /// skew).
    pub fn now(mut self, now: SystemTime) -> Self {
        self.now = Some(now);
        self
    }

    fn clock(&self) -> SystemTime {
        self.now.unwrap_or_else(SystemTime::now)
    }

    fn tuf_dir(&self) -> PathBuf {
        self.store.dir().join("tuf")
    }

    fn self_signed_root(bytes: &[u8]) -> Result<Root> {
        let claimed: Root = crate::signed::Envelope::parse(bytes)?.read()?;
        verify::<Root>(bytes, Role::Root, &claimed.trust(Role::Root)?)
    }

    /// The root this device trusts now.
    pub fn root(&self) -> Result<Root> {
        self.trusted::<Root>(Role::Root)?
            .map(|(root, _)| root)
            .ok_or_else(|| Error::malformed("the store trusts no root"))
    }

    /// Reads a trusted metadata file back; roots are checked against their own keys,
    /// others against the trusted root's.
    fn trusted<T: crate::repo::Metadata>(&self, role: Role) -> Result<Option<(T, Vec<u8>)>> {
        let path = self.tuf_dir().join(role.file());
        let bytes = match tern::fs::read_regular(&path, self.limits.targets_bytes) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path)(e)),
        };
        let trust = match role {
            Role::Root => {
                let claimed: Root = crate::signed::Envelope::parse(&bytes)?.read()?;
                claimed.trust(Role::Root)?
            }
            _ => self.root()?.trust(role)?,
        };
        Ok(Some((verify::<T>(&bytes, role, &trust)?, bytes)))
    }

    fn fetch_all(&self, path: &str, max: u64) -> Result<Vec<u8>> {
        let bytes = self
            .fetcher
            .fetch(path, 0, max)
            .map_err(|source| Error::Fetch {
                path: path.into(),
                source,
            })?;
        if bytes.len() as u64 > max {
            return Err(Error::TooLarge {
                what: path.into(),
                size: bytes.len() as u64,
                limit: max,
            });
        }
        Ok(bytes)
    }

    /// Refreshes the trusted metadata (root rotations, timestamp, snapshot, targets) and
    /// returns the targets. On any failure what was trusted before stays trusted.
    pub fn refresh(&self) -> Result<Targets> {
        let dir = self.tuf_dir();
        let now = self.clock();

        // Root: walk N+1.root.json while the repository has one.
        let first = self.root()?;
        let mut root = first.clone();
        for _ in 0..self.limits.root_rotations {
            let next = root.version + 1;
            let bytes =
                match self
                    .fetcher
                    .fetch(&format!("{next}.root.json"), 0, self.limits.root_bytes)
                {
                    Err(FetchError::NotFound) => break,
                    Err(source) => {
                        return Err(Error::Fetch {
                            path: format!("{next}.root.json"),
                            source,
                        })
                    }
                    Ok(b) if b.len() as u64 > self.limits.root_bytes => {
                        return Err(Error::TooLarge {
                            what: format!("{next}.root.json"),
                            size: b.len() as u64,
                            limit: self.limits.root_bytes,
                        })
                    }
                    Ok(b) => b,
                };
            // Signed by the trusted root's keys, and by its own.
            verify::<Root>(&bytes, Role::Root, &root.trust(Role::Root)?)?;
            let new = Self::self_signed_root(&bytes)?;
            if new.version != next {
                return Err(Error::Rollback {
                    version: new.version,
                    installed: next,
                });
            }
            write_atomic(&dir.join(Role::Root.file()), &bytes)?;
            root = new;
        }
        check_expiry(&root.expires, now)?;
        // New timestamp or snapshot keys: what they signed before is no longer trusted
        // (TUF's recovery from a fast-forward attack).
        for role in [Role::Timestamp, Role::Snapshot] {
            if root.roles.get(&role) != first.roles.get(&role) {
                let _ = std::fs::remove_file(dir.join(Role::Timestamp.file()));
                let _ = std::fs::remove_file(dir.join(Role::Snapshot.file()));
            }
        }

        // Timestamp.
        let bytes = self.fetch_all(Role::Timestamp.file(), self.limits.timestamp_bytes)?;
        let timestamp: MetaList = verify(&bytes, Role::Timestamp, &root.trust(Role::Timestamp)?)?;
        let pinned = timestamp
            .meta
            .get(Role::Snapshot.file())
            .ok_or_else(|| Error::malformed("the timestamp pins no snapshot.json"))?
            .clone();
        if let Some((old, _)) = self.trusted::<MetaList>(Role::Timestamp)? {
            no_older(timestamp.version, old.version)?;
            if let Some(old_pin) = old.meta.get(Role::Snapshot.file()) {
                no_older(pinned.version, old_pin.version)?;
            }
        }
        check_expiry(&timestamp.expires, now)?;

        // Snapshot, exactly as the timestamp pins it.
        let max = pinned.length.unwrap_or(self.limits.snapshot_bytes);
        let snapshot_bytes = self.fetch_all(Role::Snapshot.file(), max)?;
        check_meta_file(Role::Snapshot.file(), &snapshot_bytes, &pinned)?;
        let snapshot: MetaList = verify(
            &snapshot_bytes,
            Role::Snapshot,
            &root.trust(Role::Snapshot)?,
        )?;
        if snapshot.version != pinned.version {
            return Err(Error::malformed(format!(
                "snapshot version {} where the timestamp pins {}",
                snapshot.version, pinned.version
            )));
        }
        let targets_pin = snapshot
            .meta
            .get(Role::Targets.file())
            .ok_or_else(|| Error::malformed("the snapshot pins no targets.json"))?
            .clone();
        if let Some((old, _)) = self.trusted::<MetaList>(Role::Snapshot)? {
            if let Some(old_pin) = old.meta.get(Role::Targets.file()) {
                no_older(targets_pin.version, old_pin.version)?;
            }
        }
        check_expiry(&snapshot.expires, now)?;

        // Targets, as the snapshot pins them.
        let max = targets_pin.length.unwrap_or(self.limits.targets_bytes);
        let targets_bytes = self.fetch_all(Role::Targets.file(), max)?;
        check_meta_file(Role::Targets.file(), &targets_bytes, &targets_pin)?;
        let targets: Targets = verify(&targets_bytes, Role::Targets, &root.trust(Role::Targets)?)?;
        if targets.version != targets_pin.version {
            return Err(Error::malformed(format!(
                "targets version {} where the snapshot pins {}",
                targets.version, targets_pin.version
            )));
        }
        check_expiry(&targets.expires, now)?;

        // All verified: trust the new view.
        write_atomic(&dir.join(Role::Timestamp.file()), &bytes)?;
        write_atomic(&dir.join(Role::Snapshot.file()), &snapshot_bytes)?;
        write_atomic(&dir.join(Role::Targets.file()), &targets_bytes)?;
        Ok(targets)
    }

    /// Refreshes, and if the repository has a version of `name` above every version the
    /// store ever accepted, downloads it (resuming an interrupted download), checks its
    /// length and hash against the targets metadata, and installs it (verified and
    /// golden-checked by the store; not activated).
    pub fn update(&self, name: &str) -> Result<UpdateOutcome> {
        let events = self.store.events();
        match self.update_inner(name) {
            Ok(outcome) => {
                let (what, version) = match &outcome {
                    UpdateOutcome::Installed(i) => ("installed", Some(i.version)),
                    UpdateOutcome::UpToDate { newest } => ("up_to_date", *newest),
                };
                let version = version.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
                events.emit(
                    "tern.model.updated",
                    &[
                        ("model", name.into()),
                        ("outcome", what.into()),
                        ("version", version.into()),
                    ],
                );
                Ok(outcome)
            }
            Err(e) => {
                events.emit(
                    "tern.model.update_failed",
                    &[("model", name.into()), ("error_kind", e.kind().into())],
                );
                Err(e)
            }
        }
    }

    fn update_inner(&self, name: &str) -> Result<UpdateOutcome> {
        let targets = self.refresh()?;
        let newest = targets
            .targets
            .iter()
            .filter(|(path, t)| {
                t.custom.name == name && **path == format!("{name}/{}.tern", t.custom.version)
            })
            .max_by_key(|(_, t)| t.custom.version);
        let floor = self.store.status()?.get(name).map(|m| m.highest);
        let Some((path, target)) =
            newest.filter(|(_, t)| floor.is_none_or(|h| t.custom.version > h))
        else {
            return Ok(UpdateOutcome::UpToDate {
                newest: newest.map(|(_, t)| t.custom.version),
            });
        };
        let part = self.download(path, target)?;
        let installed = self.store.install_file(&part);
        let _ = std::fs::remove_file(&part);
        Ok(UpdateOutcome::Installed(installed?))
    }

    /// Downloads a target into `DIR/downloads/`, resuming a partial file, never past the
    /// target's length; returns the checked file.
    fn download(&self, path: &str, target: &TargetFile) -> Result<PathBuf> {
        let dir = self.store.dir().join("downloads");
        std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        let part = dir.join(format!(
            "{}-{}.part",
            target.custom.name, target.custom.version
        ));
        let mut have = std::fs::metadata(&part).map_or(0, |m| m.len());
        if have > target.length {
            let _ = std::fs::remove_file(&part);
            have = 0;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(Error::io(&part))?;
        let remote = format!("targets/{path}");
        while have < target.length {
            let ask = (target.length - have).min(self.limits.chunk_bytes.max(1));
            let chunk = self
                .fetcher
                .fetch(&remote, have, ask)
                .map_err(|source| Error::Fetch {
                    path: remote.clone(),
                    source,
                })?;
            if chunk.len() as u64 > ask {
                return Err(Error::TooLarge {
                    what: remote,
                    size: have + chunk.len() as u64,
                    limit: target.length,
                });
            }
            if chunk.is_empty() {
                return Err(Error::FileMismatch {
                    path: remote,
                    problem: FileProblem::Length {
                        expected: target.length,
                        actual: have,
                    },
                });
            }
            file.write_all(&chunk).map_err(Error::io(&part))?;
            have += chunk.len() as u64;
        }
        file.sync_all().map_err(Error::io(&part))?;
        drop(file);
        if sha256_file(&part)? != target.hashes.sha256 {
            let _ = std::fs::remove_file(&part);
            return Err(Error::FileMismatch {
                path: remote,
                problem: FileProblem::Hash,
            });
        }
        Ok(part)
    }
}

/// A metadata version below the trusted one is a rollback attack.
fn no_older(version: u64, trusted: u64) -> Result<()> {
    if version < trusted {
        return Err(Error::Rollback {
            version,
            installed: trusted,
        });
    }
    Ok(())
}

fn check_meta_file(path: &str, bytes: &[u8], pin: &crate::repo::MetaFile) -> Result<()> {
    if let Some(length) = pin.length {
        if bytes.len() as u64 != length {
            return Err(Error::FileMismatch {
                path: path.into(),
                problem: FileProblem::Length {
                    expected: length,
                    actual: bytes.len() as u64,
                },
            });
        }
    }
    if let Some(hashes) = &pin.hashes {
        if hex::encode(Sha256::digest(bytes)) != hashes.sha256 {
            return Err(Error::FileMismatch {
                path: path.into(),
                problem: FileProblem::Hash,
            });
        }
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(Error::io(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(Error::io(path))?;
    Ok(hex::encode(hasher.finalize()))
}
