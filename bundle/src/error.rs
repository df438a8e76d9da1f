//! The one error type of `tern-bundle`: every refusal a bundle can meet, each a variant an
//! app (or the CLI's `--json`) can branch on through [`ErrorKind`].

use std::fmt;
use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a bundle, a key or a golden check was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The bytes are not a bundle: not a tar archive, a manifest that is not the first
    /// entry, JSON that does not parse or does not fit the manifest's schema.
    #[error("not a valid bundle: {reason}")]
    Malformed {
        /// What is wrong.
        reason: String,
    },

    /// An entry whose path could escape the bundle (`..`, an absolute path), or that is
    /// not a regular file (a symlink, a hard link, a device).
    #[error("bundle entry {path:?} refused: {reason}")]
    UnsafeEntry {
        /// The entry's path as written in the archive.
        path: String,
        /// Why it is refused.
        reason: &'static str,
    },

    /// Something is larger than the limits allow (the manifest, a file, the whole bundle).
    #[error("{what} is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// What was measured.
        what: String,
        /// Its size.
        size: u64,
        /// The limit in force.
        limit: u64,
    },

    /// Fewer valid signatures by trusted keys than the threshold (tampered metadata, a
    /// wrong or unknown key, no signature at all).
    #[error(
        "signature check failed: {valid} valid signature(s) by trusted keys, {threshold} needed"
    )]
    Signature {
        /// Distinct trusted keys whose signature verified.
        valid: usize,
        /// How many are needed.
        threshold: usize,
    },

    /// The signed metadata's expiry date has passed (a replayed, frozen old bundle).
    #[error("the bundle's metadata expired at {expires}")]
    Expired {
        /// The expiry date (RFC 3339).
        expires: String,
    },

    /// The bundle's version is lower than the installed one (a rollback attack).
    #[error("version {version} is lower than the installed version {installed}: rollback refused")]
    Rollback {
        /// The bundle's version.
        version: u64,
        /// The installed version.
        installed: u64,
    },

    /// The bundle needs a newer tern than this one.
    #[error("the bundle needs tern {needed} or newer; this is tern {this}")]
    NeedsNewerTern {
        /// The bundle's `min_tern`.
        needed: String,
        /// This library's version.
        this: String,
    },

    /// A file's bytes disagree with the signed manifest, or the set of files does.
    #[error("file {path:?}: {problem}")]
    FileMismatch {
        /// The file's path in the bundle.
        path: String,
        /// How it disagrees.
        problem: FileProblem,
    },

    /// A golden sample's output on this device is outside the bundle's tolerance.
    #[error("golden sample {sample}, output {output:?}: {detail}")]
    GoldenMismatch {
        /// The sample's index in the manifest.
        sample: usize,
        /// The output that disagrees.
        output: String,
        /// By how much, or how (dtype, shape).
        detail: String,
    },

    /// A key file is not an ed25519 key in the expected format.
    #[error("invalid key: {reason}")]
    Key {
        /// What is wrong with it.
        reason: String,
    },

    /// An option given to create or verify a bundle is invalid.
    #[error("invalid option: {reason}")]
    InvalidOption {
        /// What is wrong.
        reason: String,
    },

    /// A store has no such model version (or it is quarantined).
    #[error("model {name:?} version {version} is not installed in the store")]
    NotInstalled {
        /// The model's name.
        name: String,
        /// The version asked for.
        version: u64,
    },

    /// The version was quarantined — the process died while loading it, repeatedly (a crash
    /// loop), or its rollout rolled it back — and it is never activated again.
    #[error("model {name:?} version {version} is quarantined: {reason}")]
    Quarantined {
        /// The model's name.
        name: String,
        /// The version.
        version: u64,
        /// Why.
        reason: crate::store::QuarantineReason,
    },

    /// A repository file could not be fetched.
    #[error("cannot fetch {path}: {source}")]
    Fetch {
        /// The file's path in the repository.
        path: String,
        /// Why.
        #[source]
        source: crate::update::FetchError,
    },

    /// The model failed to load or run (golden samples, contract).
    #[error(transparent)]
    Model(#[from] tern::Error),
}

/// How a file disagrees with the signed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FileProblem {
    /// Listed in the manifest but absent from the bundle.
    Missing,
    /// Present in the bundle but not listed in the manifest.
    Unlisted,
    /// Present twice.
    Duplicate,
    /// Another length than the manifest says.
    Length {
        /// The signed length.
        expected: u64,
        /// The entry's length.
        actual: u64,
    },
    /// Another SHA-256 than the manifest says.
    Hash,
}

impl fmt::Display for FileProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileProblem::Missing => f.write_str("listed in the manifest, missing from the bundle"),
            FileProblem::Unlisted => f.write_str("not listed in the signed manifest"),
            FileProblem::Duplicate => f.write_str("present more than once"),
            FileProblem::Length { expected, actual } => {
                write!(f, "{actual} bytes where the manifest says {expected}")
            }
            FileProblem::Hash => f.write_str("SHA-256 differs from the manifest's"),
        }
    }
}

/// What kind of failure an [`Error`] is: one value per variant, with a stable name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::Io`].
    Io,
    /// [`Error::Malformed`].
    Malformed,
    /// [`Error::UnsafeEntry`].
    UnsafeEntry,
    /// [`Error::TooLarge`].
    TooLarge,
    /// [`Error::Signature`].
    Signature,
    /// [`Error::Expired`].
    Expired,
    /// [`Error::Rollback`].
    Rollback,
    /// [`Error::NeedsNewerTern`].
    NeedsNewerTern,
    /// [`Error::FileMismatch`].
    FileMismatch,
    /// [`Error::GoldenMismatch`].
    GoldenMismatch,
    /// [`Error::Key`].
    Key,
    /// [`Error::InvalidOption`].
    InvalidOption,
    /// [`Error::NotInstalled`].
    NotInstalled,
    /// [`Error::Quarantined`].
    Quarantined,
    /// [`Error::Fetch`].
    Fetch,
    /// [`Error::Model`].
    Model,
}

impl ErrorKind {
    /// The stable machine-readable name, e.g. `"rollback"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::Malformed => "malformed",
            ErrorKind::UnsafeEntry => "unsafe_entry",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Signature => "signature",
            ErrorKind::Expired => "expired",
            ErrorKind::Rollback => "rollback",
            ErrorKind::NeedsNewerTern => "needs_newer_tern",
            ErrorKind::FileMismatch => "file_mismatch",
            ErrorKind::GoldenMismatch => "golden_mismatch",
            ErrorKind::Key => "key",
            ErrorKind::InvalidOption => "invalid_option",
            ErrorKind::NotInstalled => "not_installed",
            ErrorKind::Quarantined => "quarantined",
            ErrorKind::Fetch => "fetch",
            ErrorKind::Model => "model",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    /// What kind of failure this is.
    pub fn error_kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Malformed { .. } => ErrorKind::Malformed,
            Error::UnsafeEntry { .. } => ErrorKind::UnsafeEntry,
            Error::TooLarge { .. } => ErrorKind::TooLarge,
            Error::Signature { .. } => ErrorKind::Signature,
            Error::Expired { .. } => ErrorKind::Expired,
            Error::Rollback { .. } => ErrorKind::Rollback,
            Error::NeedsNewerTern { .. } => ErrorKind::NeedsNewerTern,
            Error::FileMismatch { .. } => ErrorKind::FileMismatch,
            Error::GoldenMismatch { .. } => ErrorKind::GoldenMismatch,
            Error::Key { .. } => ErrorKind::Key,
            Error::InvalidOption { .. } => ErrorKind::InvalidOption,
            Error::NotInstalled { .. } => ErrorKind::NotInstalled,
            Error::Quarantined { .. } => ErrorKind::Quarantined,
            Error::Fetch { .. } => ErrorKind::Fetch,
            Error::Model(_) => ErrorKind::Model,
        }
    }

    /// The stable name of the variant ([`Error::error_kind`] as a string).
    pub fn kind(&self) -> &'static str {
        self.error_kind().as_str()
    }

    pub(crate) fn malformed(reason: impl Into<String>) -> Self {
        Error::Malformed {
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
