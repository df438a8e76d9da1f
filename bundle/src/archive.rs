//! Reading and writing `.tern` bundles: a tar archive whose first entry is the signed
//! manifest, then every file it lists.
//!
//! Reading follows TUF's order of checks, so nothing untrusted is parsed:
//! 1. the manifest entry, at most [`Limits::manifest_bytes`], is read and its signatures
//!    checked against the trusted keys (then its expiry, version and `min_tern`);
//! 2. every other entry must be a regular file with a safe relative path, listed in the
//!    manifest, of exactly the signed length (checked from its header, before reading),
//!    with the signed SHA-256; none may be missing or repeated;
//! 3. only then are the model and the tensors parsed, by their users.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::time::SystemTime;

use tern::{Model, Tensor};

use crate::error::{Error, FileProblem, Result};
use crate::keys::{KeyPair, Trust};
use crate::manifest::{FileMeta, Manifest, MANIFEST_FILE};
use crate::signed::{Envelope, Signature};

/// Sizes a bundle may not exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// The manifest entry (default 1 MiB).
    pub manifest_bytes: u64,
    /// All files together (default 2 GiB).
    pub bundle_bytes: u64,
    /// How many files (default 4096).
    pub files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            manifest_bytes: 1 << 20,
            bundle_bytes: 2 << 30,
            files: 4096,
        }
    }
}

impl Limits {
    /// These limits with another total size.
    pub fn with_bundle_bytes(mut self, bytes: u64) -> Self {
        self.bundle_bytes = bytes;
        self
    }

    /// These limits with another manifest size.
    pub fn with_manifest_bytes(mut self, bytes: u64) -> Self {
        self.manifest_bytes = bytes;
        self
    }
}

/// What reading a bundle checks.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    trust: Option<Trust>,
    check_expiry: bool,
    installed_version: Option<u64>,
    now: SystemTime,
    limits: Limits,
}

impl VerifyOptions {
    /// Full verification: signatures by `trust`, expiry against the clock, `min_tern`.
    pub fn trusting(trust: Trust) -> VerifyOptions {
        VerifyOptions {
            trust: Some(trust),
            check_expiry: true,
            installed_version: None,
            now: SystemTime::now(),
            limits: Limits::default(),
        }
    }

    /// Files checked against the manifest, but the manifest itself not: no signature,
    /// expiry, version or `min_tern` check. For inspecting and signing a bundle, never for
    /// installing one.
    pub fn unchecked() -> VerifyOptions {
        VerifyOptions {
            trust: None,
            check_expiry: false,
            installed_version: None,
            now: SystemTime::now(),
            limits: Limits::default(),
        }
    }

    /// Refuses bundles whose version is lower than `version` (the installed one).
    pub fn installed_version(mut self, version: u64) -> Self {
        self.installed_version = Some(version);
        self
    }

    /// Skips the expiry check: for a bundle already installed, whose freshness was checked
    /// when it arrived (expiry guards updates against replay; it must not stop a device
    /// from running the model it has).
    pub fn ignoring_expiry(mut self) -> Self {
        self.check_expiry = false;
        self
    }

    /// Checks expiry against `now` instead of the system clock.
    pub fn now(mut self, now: SystemTime) -> Self {
        self.now = now;
        self
    }

    /// Other size limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// A bundle whose files match its manifest (and, when read with
/// [`VerifyOptions::trusting`], whose manifest is signed, fresh and not a rollback).
#[derive(Debug, Clone)]
pub struct Bundle {
    envelope: Envelope,
    manifest: Manifest,
    files: BTreeMap<String, Vec<u8>>,
}

impl Bundle {
    /// Assembles a bundle from its manifest and files (checked against each other); the
    /// manifest is unsigned until [`Bundle::sign`].
    pub fn new(manifest: Manifest, files: BTreeMap<String, Vec<u8>>) -> Result<Bundle> {
        manifest.check_references()?;
        for (path, meta) in &manifest.files {
            let bytes = files
                .get(path)
                .ok_or_else(|| mismatch(path, FileProblem::Missing))?;
            check_file(path, meta, bytes)?;
        }
        if let Some(path) = files.keys().find(|p| !manifest.files.contains_key(*p)) {
            return Err(mismatch(path, FileProblem::Unlisted));
        }
        Ok(Bundle {
            envelope: Envelope::new(&manifest)?,
            manifest,
            files,
        })
    }

    /// Reads and verifies the bundle file at `path`.
    pub fn read(path: &Path, options: &VerifyOptions) -> Result<Bundle> {
        let meta = std::fs::metadata(path).map_err(Error::io(path))?;
        if !meta.is_file() {
            return Err(Error::Io {
                path: path.into(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let file = std::fs::File::open(path).map_err(Error::io(path))?;
        Bundle::from_reader(std::io::BufReader::new(file), options)
    }

    /// Reads and verifies a bundle from a stream (a download, a file).
    pub fn from_reader(reader: impl Read, options: &VerifyOptions) -> Result<Bundle> {
        let mut archive = tar::Archive::new(reader);
        let mut entries = archive
            .entries()
            .map_err(|e| Error::malformed(format!("not a tar archive: {e}")))?;

        let first = entries
            .next()
            .ok_or_else(|| Error::malformed("empty archive"))?
            .map_err(|e| Error::malformed(format!("not a tar archive: {e}")))?;
        let (path, size) = entry_facts(&first)?;
        if path != MANIFEST_FILE {
            return Err(Error::malformed(format!(
                "the first entry is {path:?}, not {MANIFEST_FILE}"
            )));
        }
        if size > options.limits.manifest_bytes {
            return Err(Error::TooLarge {
                what: MANIFEST_FILE.into(),
                size,
                limit: options.limits.manifest_bytes,
            });
        }
        let envelope = Envelope::parse(&read_exact_entry(first, &path, size)?)?;
        let manifest: Manifest = match &options.trust {
            Some(trust) => envelope.verify(trust)?,
            None => envelope.read()?,
        };
        manifest.check_references()?;
        if options.trust.is_some() {
            check_policy(&manifest, options)?;
        }
        if manifest.files.len() > options.limits.files {
            return Err(Error::TooLarge {
                what: "the manifest's file count".into(),
                size: manifest.files.len() as u64,
                limit: options.limits.files as u64,
            });
        }
        if manifest.total_length() > options.limits.bundle_bytes {
            return Err(Error::TooLarge {
                what: "the bundle's files".into(),
                size: manifest.total_length(),
                limit: options.limits.bundle_bytes,
            });
        }

        let mut files = BTreeMap::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::malformed(format!("corrupt tar entry: {e}")))?;
            let (path, size) = entry_facts(&entry)?;
            let meta = manifest
                .files
                .get(&path)
                .ok_or_else(|| mismatch(&path, FileProblem::Unlisted))?;
            if files.contains_key(&path) {
                return Err(mismatch(&path, FileProblem::Duplicate));
            }
            if size != meta.length {
                return Err(mismatch(
                    &path,
                    FileProblem::Length {
                        expected: meta.length,
                        actual: size,
                    },
                ));
            }
            let bytes = read_exact_entry(entry, &path, size)?;
            check_file(&path, meta, &bytes)?;
            files.insert(path, bytes);
        }
        if let Some(path) = manifest.files.keys().find(|p| !files.contains_key(*p)) {
            return Err(mismatch(path, FileProblem::Missing));
        }
        Ok(Bundle {
            envelope,
            manifest,
            files,
        })
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The signatures on the manifest (checked only if the bundle was read trusting keys).
    pub fn signatures(&self) -> &[Signature] {
        &self.envelope.signatures
    }

    /// A file's bytes, by its path in the bundle.
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        self.files.get(path).map(Vec::as_slice)
    }

    /// Loads the bundle's model, its external data (if any) from the bundle's files next to
    /// it. Nothing outside the bundle is read.
    pub fn model(&self) -> Result<Model> {
        let bytes = self
            .file(&self.manifest.model)
            .ok_or_else(|| mismatch(&self.manifest.model, FileProblem::Missing))?;
        let dir = match self.manifest.model.rsplit_once('/') {
            Some((dir, _)) => format!("{dir}/"),
            None => String::new(),
        };
        Ok(Model::from_bytes_with_data(bytes, &|location| {
            self.file(&format!("{dir}{location}"))
        })?)
    }

    /// A tensor file of the bundle (a golden input or output).
    pub fn tensor(&self, path: &str) -> Result<Tensor> {
        let bytes = self
            .file(path)
            .ok_or_else(|| mismatch(path, FileProblem::Missing))?;
        Ok(Tensor::from_npy(bytes)?)
    }

    /// Adds (or replaces) `key`'s signature of the manifest.
    pub fn sign(&mut self, key: &KeyPair) -> Result<()> {
        self.envelope.sign(key)
    }

    /// The bundle as a tar archive: the manifest first, then the files in path order, with
    /// fixed modes and times (the same bundle gives the same bytes).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut append = |path: &str, bytes: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            builder
                .append_data(&mut header, path, bytes)
                .map_err(|e| Error::malformed(format!("cannot write entry {path:?}: {e}")))
        };
        append(MANIFEST_FILE, &self.envelope.to_bytes())?;
        for (path, bytes) in &self.files {
            append(path, bytes)?;
        }
        builder
            .into_inner()
            .map_err(|e| Error::malformed(format!("cannot finish the archive: {e}")))
    }

    /// Writes the bundle to `path` atomically: a temporary file beside it, synced, then
    /// renamed over it (a crash leaves the old file or the new one, never a part).
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::fsio::write_atomic(path, &self.to_bytes()?)
    }
}

/// Checks signed-metadata policy: expiry, rollback, `min_tern`.
fn check_policy(manifest: &Manifest, options: &VerifyOptions) -> Result<()> {
    match crate::signed::check_expiry(&manifest.expires, options.now) {
        Err(Error::Expired { .. }) if !options.check_expiry => {}
        other => other?,
    }
    if let Some(installed) = options.installed_version {
        if manifest.version < installed {
            return Err(Error::Rollback {
                version: manifest.version,
                installed,
            });
        }
    }
    let needed = semver::Version::parse(&manifest.min_tern)
        .map_err(|e| Error::malformed(format!("min_tern {:?}: {e}", manifest.min_tern)))?;
    let this = semver::Version::parse(tern::VERSION)
        .map_err(|e| Error::malformed(format!("tern's own version: {e}")))?;
    if needed > this {
        return Err(Error::NeedsNewerTern {
            needed: manifest.min_tern.clone(),
            this: tern::VERSION.into(),
        });
    }
    Ok(())
}

/// A path inside a bundle must be relative, `/`-separated, made of plain names only.
pub(crate) fn check_path(path: &str) -> Result<()> {
    let refuse = |reason| {
        Err(Error::UnsafeEntry {
            path: path.into(),
            reason,
        })
    };
    if path.is_empty() || path.len() > 255 {
        return refuse("empty, or longer than 255 bytes");
    }
    if path.starts_with('/') {
        return refuse("absolute path");
    }
    if path.contains('\\') || path.contains('\0') || path.contains(':') {
        return refuse("backslash, NUL or colon in the path");
    }
    for part in path.split('/') {
        match part {
            "" => return refuse("empty path component"),
            "." | ".." => return refuse("`.` or `..` component"),
            _ => {}
        }
    }
    Ok(())
}

/// A tar entry's path (checked) and size, refusing anything but a regular file.
fn entry_facts<R: Read>(entry: &tar::Entry<'_, R>) -> Result<(String, u64)> {
    let raw = entry.path_bytes();
    let path = String::from_utf8(raw.to_vec()).map_err(|_| Error::UnsafeEntry {
        path: String::from_utf8_lossy(&raw).into_owned(),
        reason: "path is not UTF-8",
    })?;
    let kind = entry.header().entry_type();
    if kind != tar::EntryType::Regular {
        return Err(Error::UnsafeEntry {
            path,
            reason: match kind {
                tar::EntryType::Symlink => "symbolic link",
                tar::EntryType::Link => "hard link",
                tar::EntryType::Directory => "directory",
                _ => "not a regular file",
            },
        });
    }
    check_path(&path)?;
    let size = entry
        .header()
        .size()
        .map_err(|e| Error::malformed(format!("entry {path:?}: bad size: {e}")))?;
    Ok((path, size))
}

/// Reads exactly `size` bytes of an entry (never more; fewer is a truncated bundle).
fn read_exact_entry(entry: impl Read, path: &str, size: u64) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(size.min(64 << 20) as usize);
    entry
        .take(size)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::malformed(format!("entry {path:?}: {e}")))?;
    if bytes.len() as u64 != size {
        return Err(mismatch(
            path,
            FileProblem::Length {
                expected: size,
                actual: bytes.len() as u64,
            },
        ));
    }
    Ok(bytes)
}

fn check_file(path: &str, meta: &FileMeta, bytes: &[u8]) -> Result<()> {
    let actual = FileMeta::of(bytes);
    if actual.length != meta.length {
        return Err(mismatch(
            path,
            FileProblem::Length {
                expected: meta.length,
                actual: actual.length,
            },
        ));
    }
    if actual.hashes.sha256 != meta.hashes.sha256 {
        return Err(mismatch(path, FileProblem::Hash));
    }
    Ok(())
}

fn mismatch(path: &str, problem: FileProblem) -> Error {
    Error::FileMismatch {
        path: path.into(),
        problem,
    }
}
