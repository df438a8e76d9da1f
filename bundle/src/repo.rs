//! The update repository: The Update Framework's four top-level roles as static files, so
//! any HTTP server, CDN or bucket serves a fleet, and the publishing side that writes them.
//!
//! ```text
//! DIR/1.root.json, 2.root.json, …   every root, each signed by the previous root's keys and
//!                                   its own (a device walks them to rotate keys)
//! DIR/root.json                     the newest root (what a new device ships with)
//! DIR/targets.json                  every bundle's path, length, SHA-256, name and version
//! DIR/snapshot.json                 the targets metadata's version
//! DIR/timestamp.json                the snapshot's version, length and hash (short-lived)
//! DIR/targets/NAME/VERSION.tern     the bundles
//! ```
//!
//! The formats are TUF's (specification 1.0): envelopes over canonical JSON, key objects by
//! key id, `keyids` and `threshold` per role, `meta` and `targets` with `length` and
//! `hashes.sha256`. Publishing writes targets, then snapshot, then timestamp, so a device
//! (which starts from the timestamp) sees a new release whole or not at all.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::archive::{Bundle, VerifyOptions};
use crate::error::{Error, Result};
use crate::fsio::write_atomic;
use crate::keys::{KeyPair, PublicKey, Trust};
use crate::manifest::{check_name, FileMeta, Hashes};
use crate::signed::{expires_after, Envelope};

/// The TUF specification version the metadata follows.
pub const TUF_SPEC_VERSION: &str = "1.0.31";

/// A top-level role, and the `_type` of its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Names the keys of every role, itself included.
    Root,
    /// Lists the bundles.
    Targets,
    /// Pins the targets metadata's version.
    Snapshot,
    /// Pins the snapshot; re-signed often, expires soon.
    Timestamp,
}

impl Role {
    /// The metadata's file name.
    pub fn file(self) -> &'static str {
        match self {
            Role::Root => "root.json",
            Role::Targets => "targets.json",
            Role::Snapshot => "snapshot.json",
            Role::Timestamp => "timestamp.json",
        }
    }
}

/// A role's keys and threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleKeys {
    /// The key ids that may sign for the role.
    pub keyids: Vec<String>,
    /// How many of them must.
    pub threshold: u64,
}

/// The root metadata: every role's keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// Always [`Role::Root`].
    #[serde(rename = "_type")]
    pub kind: Role,
    /// [`TUF_SPEC_VERSION`].
    pub spec_version: String,
    /// Whether metadata and targets are published under versioned names (tern writes
    /// `false`: one name per file).
    pub consistent_snapshot: bool,
    /// The root's version: each rotation adds one.
    pub version: u64,
    /// When it stops being valid (RFC 3339).
    pub expires: String,
    /// Key objects by key id.
    pub keys: BTreeMap<String, serde_json::Value>,
    /// Each role's key ids and threshold.
    pub roles: BTreeMap<Role, RoleKeys>,
}

impl Root {
    /// The keys and threshold of `role`. A key whose id is not the SHA-256 of its canonical
    /// form is refused.
    pub fn trust(&self, role: Role) -> Result<Trust> {
        let keys = self
            .roles
            .get(&role)
            .ok_or_else(|| Error::malformed(format!("the root names no {role:?} role")))?;
        let mut public = Vec::new();
        for id in &keys.keyids {
            let object = self
                .keys
                .get(id)
                .ok_or_else(|| Error::malformed(format!("the root lists no key {id}")))?;
            let bytes = serde_json::to_vec(object).map_err(|e| Error::malformed(e.to_string()))?;
            let key = PublicKey::from_json(&bytes)?;
            if key.key_id() != *id {
                return Err(Error::Key {
                    reason: format!("key id {id} is not its key's id {}", key.key_id()),
                });
            }
            public.push(key);
        }
        let threshold = usize::try_from(keys.threshold).unwrap_or(usize::MAX);
        Trust::new(public, threshold)
    }
}

/// A metadata file's version, and (for the snapshot, in the timestamp) its length and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaFile {
    /// The file's version.
    pub version: u64,
    /// Its length in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// Its hashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashes: Option<Hashes>,
}

/// The timestamp or snapshot metadata: versions (and hashes) of other metadata files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaList {
    /// [`Role::Timestamp`] or [`Role::Snapshot`].
    #[serde(rename = "_type")]
    pub kind: Role,
    /// [`TUF_SPEC_VERSION`].
    pub spec_version: String,
    /// The document's version.
    pub version: u64,
    /// When it stops being valid.
    pub expires: String,
    /// The files it pins, by name (`snapshot.json` in the timestamp, `targets.json` in the
    /// snapshot).
    pub meta: BTreeMap<String, MetaFile>,
}

/// What tern adds to a target: the bundle's name and version, so a device picks its
/// update without downloading anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetCustom {
    /// The bundle's model name.
    pub name: String,
    /// Its version.
    pub version: u64,
}

/// One target: a bundle's length, hash and identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    /// Its length in bytes.
    pub length: u64,
    /// Its hashes.
    pub hashes: Hashes,
    /// Its name and version.
    pub custom: TargetCustom,
}

/// The targets metadata: every bundle the repository serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Always [`Role::Targets`].
    #[serde(rename = "_type")]
    pub kind: Role,
    /// [`TUF_SPEC_VERSION`].
    pub spec_version: String,
    /// The document's version.
    pub version: u64,
    /// When it stops being valid.
    pub expires: String,
    /// Targets by path under `targets/`.
    pub targets: BTreeMap<String, TargetFile>,
}

/// What every role's metadata has.
pub trait Metadata: Serialize + DeserializeOwned {
    /// Its `_type`.
    fn kind(&self) -> Role;
    /// Its version.
    fn version(&self) -> u64;
    /// Its expiry date.
    fn expires(&self) -> &str;
}

macro_rules! metadata {
    ($($t:ty),*) => {$(
        impl Metadata for $t {
            fn kind(&self) -> Role {
                self.kind
            }
            fn version(&self) -> u64 {
                self.version
            }
            fn expires(&self) -> &str {
                &self.expires
            }
        }
    )*};
}
metadata!(Root, MetaList, Targets);

/// Verifies `bytes` as `role`'s metadata signed by `trust`, then reads it: signatures
/// first, then the type, nothing interpreted before.
pub fn verify<T: Metadata>(bytes: &[u8], role: Role, trust: &Trust) -> Result<T> {
    let doc: T = Envelope::parse(bytes)?.verify(trust)?;
    if doc.kind() != role {
        return Err(Error::malformed(format!(
            "{:?} metadata where {role:?} was expected",
            doc.kind()
        )));
    }
    Ok(doc)
}

/// The keys of each role for a new root, and how long it is valid.
#[derive(Debug, Clone)]
pub struct RootSpec {
    /// Each role's public keys and threshold.
    pub roles: BTreeMap<Role, (Vec<PublicKey>, u64)>,
    /// How long the root is valid (default 365 days).
    pub valid_for: Duration,
}

impl RootSpec {
    /// One key per role, threshold 1, valid for a year.
    pub fn single(
        root: PublicKey,
        targets: PublicKey,
        snapshot: PublicKey,
        timestamp: PublicKey,
    ) -> RootSpec {
        let one = |k: PublicKey| (vec![k], 1);
        RootSpec {
            roles: BTreeMap::from([
                (Role::Root, one(root)),
                (Role::Targets, one(targets)),
                (Role::Snapshot, one(snapshot)),
                (Role::Timestamp, one(timestamp)),
            ]),
            valid_for: Duration::from_secs(365 * 24 * 3600),
        }
    }

    fn root(&self, version: u64) -> Result<Root> {
        let mut keys = BTreeMap::new();
        let mut roles = BTreeMap::new();
        for role in [Role::Root, Role::Targets, Role::Snapshot, Role::Timestamp] {
            let (public, threshold) =
                self.roles.get(&role).ok_or_else(|| Error::InvalidOption {
                    reason: format!("no keys for the {role:?} role"),
                })?;
            let mut keyids: Vec<String> = public.iter().map(PublicKey::key_id).collect();
            keyids.sort();
            keyids.dedup();
            if *threshold == 0 || *threshold > keyids.len() as u64 {
                return Err(Error::InvalidOption {
                    reason: format!(
                        "{role:?}: threshold {threshold} with {} key(s)",
                        keyids.len()
                    ),
                });
            }
            for k in public {
                keys.insert(k.key_id(), k.to_json());
            }
            roles.insert(
                role,
                RoleKeys {
                    keyids,
                    threshold: *threshold,
                },
            );
        }
        Ok(Root {
            kind: Role::Root,
            spec_version: TUF_SPEC_VERSION.into(),
            consistent_snapshot: false,
            version,
            expires: expires_after(SystemTime::now(), self.valid_for)?,
            keys,
            roles,
        })
    }
}

/// The private keys that sign a release.
#[derive(Debug, Clone, Copy)]
pub struct Signers<'a> {
    /// For the targets metadata.
    pub targets: &'a [KeyPair],
    /// For the snapshot metadata.
    pub snapshot: &'a [KeyPair],
    /// For the timestamp metadata.
    pub timestamp: &'a [KeyPair],
}

/// How long each role's metadata stays valid when published.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Validity {
    /// Targets (default 90 days).
    pub targets: Duration,
    /// Snapshot (default 7 days).
    pub snapshot: Duration,
    /// Timestamp (default 1 day): a device that cannot get a fresh one stops trusting
    /// the repository's view after this (a freeze attack lasts no longer).
    pub timestamp: Duration,
}

impl Default for Validity {
    fn default() -> Self {
        let days = |d: u64| Duration::from_secs(d * 24 * 3600);
        Validity {
            targets: days(90),
            snapshot: days(7),
            timestamp: days(1),
        }
    }
}

/// What [`publish`] wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Published {
    /// The new targets version.
    pub targets_version: u64,
    /// Bundles added, as (name, version).
    pub added: Vec<(String, u64)>,
    /// Every target the repository now serves.
    pub targets: Vec<String>,
}

/// Creates a repository in `dir` with its first root, signed by `signers` (the root
/// role's keys).
pub fn init(dir: &Path, spec: &RootSpec, signers: &[KeyPair]) -> Result<Root> {
    if dir.join(Role::Root.file()).exists() {
        return Err(Error::InvalidOption {
            reason: format!("{} already holds a repository", dir.display()),
        });
    }
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    write_root(dir, spec.root(1)?, signers, None)
}

/// Rotates the root: version + 1 with `spec`'s keys, signed by `signers`, which must hold
/// the threshold of both the current root's keys and the new root's (as a device checks).
pub fn rotate_root(dir: &Path, spec: &RootSpec, signers: &[KeyPair]) -> Result<Root> {
    let current = read_unverified::<Root>(dir, Role::Root.file())?;
    write_root(
        dir,
        spec.root(current.version + 1)?,
        signers,
        Some(&current),
    )
}

fn write_root(
    dir: &Path,
    root: Root,
    signers: &[KeyPair],
    previous: Option<&Root>,
) -> Result<Root> {
    let mut envelope = Envelope::new(&root)?;
    for key in signers {
        envelope.sign(key)?;
    }
    let bytes = envelope.to_bytes();
    // What a device will check: the new root signed by its own root keys and the old one's.
    verify::<Root>(&bytes, Role::Root, &root.trust(Role::Root)?)?;
    if let Some(previous) = previous {
        verify::<Root>(&bytes, Role::Root, &previous.trust(Role::Root)?)?;
    }
    write_atomic(&dir.join(format!("{}.root.json", root.version)), &bytes)?;
    write_atomic(&dir.join(Role::Root.file()), &bytes)?;
    Ok(root)
}

/// Adds `bundles` to the repository in `dir` and publishes new targets, snapshot and
/// timestamp metadata signed by `signers`. Each bundle is read (its files checked against
/// its manifest, signatures not: the device checks those against its own trust) and copied
/// to `targets/NAME/VERSION.tern`; a version already published with other bytes is refused.
pub fn publish(
    dir: &Path,
    bundles: &[PathBuf],
    signers: Signers<'_>,
    validity: Validity,
) -> Result<Published> {
    let root: Root = read_unverified(dir, Role::Root.file())?;
    let previous: Option<Targets> = read_optional(dir, Role::Targets.file())?;
    let mut targets = previous
        .as_ref()
        .map(|t| t.targets.clone())
        .unwrap_or_default();
    let mut added = Vec::new();
    for path in bundles {
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        let bundle = Bundle::from_reader(bytes.as_slice(), &VerifyOptions::unchecked())?;
        let (name, version) = (bundle.manifest().name.clone(), bundle.manifest().version);
        check_name(&name).map_err(Error::malformed)?;
        let target = format!("{name}/{version}.tern");
        let meta = FileMeta::of(&bytes);
        if let Some(old) = targets.get(&target) {
            if old.hashes != meta.hashes {
                return Err(Error::InvalidOption {
                    reason: format!(
                        "{target} is already published with other bytes; publish a new version"
                    ),
                });
            }
            continue;
        }
        let folder = dir.join("targets").join(&name);
        std::fs::create_dir_all(&folder).map_err(Error::io(&folder))?;
        write_atomic(&folder.join(format!("{version}.tern")), &bytes)?;
        targets.insert(
            target,
            TargetFile {
                length: meta.length,
                hashes: meta.hashes,
                custom: TargetCustom {
                    name: name.clone(),
                    version,
                },
            },
        );
        added.push((name, version));
    }
    let now = SystemTime::now();
    let next = |old: Option<u64>| old.map_or(1, |v| v + 1);
    let targets_doc = Targets {
        kind: Role::Targets,
        spec_version: TUF_SPEC_VERSION.into(),
        version: next(previous.as_ref().map(|t| t.version)),
        expires: expires_after(now, validity.targets)?,
        targets,
    };
    let targets_bytes = sign_checked(&targets_doc, signers.targets, &root, Role::Targets)?;
    let old_snapshot: Option<MetaList> = read_optional(dir, Role::Snapshot.file())?;
    let snapshot = MetaList {
        kind: Role::Snapshot,
        spec_version: TUF_SPEC_VERSION.into(),
        version: next(old_snapshot.map(|s| s.version)),
        expires: expires_after(now, validity.snapshot)?,
        meta: BTreeMap::from([(
            Role::Targets.file().to_string(),
            MetaFile {
                version: targets_doc.version,
                length: None,
                hashes: None,
            },
        )]),
    };
    let snapshot_bytes = sign_checked(&snapshot, signers.snapshot, &root, Role::Snapshot)?;
    let old_timestamp: Option<MetaList> = read_optional(dir, Role::Timestamp.file())?;
    let snapshot_meta = FileMeta::of(&snapshot_bytes);
    let timestamp = MetaList {
        kind: Role::Timestamp,
        spec_version: TUF_SPEC_VERSION.into(),
        version: next(old_timestamp.map(|t| t.version)),
        expires: expires_after(now, validity.timestamp)?,
        meta: BTreeMap::from([(
            Role::Snapshot.file().to_string(),
            MetaFile {
                version: snapshot.version,
                length: Some(snapshot_meta.length),
                hashes: Some(snapshot_meta.hashes),
            },
        )]),
    };
    let timestamp_bytes = sign_checked(&timestamp, signers.timestamp, &root, Role::Timestamp)?;
    // Targets, then snapshot, then timestamp: a device starts from the timestamp.
    write_atomic(&dir.join(Role::Targets.file()), &targets_bytes)?;
    write_atomic(&dir.join(Role::Snapshot.file()), &snapshot_bytes)?;
    write_atomic(&dir.join(Role::Timestamp.file()), &timestamp_bytes)?;
    Ok(Published {
        targets_version: targets_doc.version,
        added,
        targets: targets_doc.targets.keys().cloned().collect(),
    })
}

/// Signs `doc` with `keys` and checks the result against the root's keys for `role`, so a
/// wrong key fails at publishing, not on every device.
fn sign_checked<T: Metadata>(
    doc: &T,
    keys: &[KeyPair],
    root: &Root,
    role: Role,
) -> Result<Vec<u8>> {
    let mut envelope = Envelope::new(doc)?;
    for key in keys {
        envelope.sign(key)?;
    }
    let bytes = envelope.to_bytes();
    verify::<T>(&bytes, role, &root.trust(role)?)?;
    Ok(bytes)
}

fn read_unverified<T: DeserializeOwned>(dir: &Path, file: &str) -> Result<T> {
    read_optional(dir, file)?.ok_or_else(|| Error::InvalidOption {
        reason: format!(
            "{} holds no {file}: not a repository (tern bundle init-repo)",
            dir.display()
        ),
    })
}

fn read_optional<T: DeserializeOwned>(dir: &Path, file: &str) -> Result<Option<T>> {
    let path = dir.join(file);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(Envelope::parse(&bytes)?.read()?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path)(e)),
    }
}
