//! File reads that cannot hang or exhaust memory on a hostile path: only regular files
//! (a FIFO would block forever, `/dev/zero` would never end), and only up to a size bound.
//!
//! The check is made on the path before it is opened, so a file swapped for a FIFO between
//! the check and the read is not caught (docs/SECURITY.md lists this).

use std::io::{Error, ErrorKind, Read};
use std::path::{Path, PathBuf};

/// The largest model file tern reads: ONNX protobufs cannot exceed 2 GiB (weights beyond
/// that live in external data files).
pub const MAX_MODEL_BYTES: u64 = 2 << 30;

/// Reads `path` whole if it is a regular file (symlinks followed) of at most `max_bytes`;
/// an `InvalidInput` error otherwise, saying why.
pub fn read_regular(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    check_regular(path, max_bytes)?;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    // The size was checked, but a file can grow: never read past the bound.
    file.take(max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(max_bytes));
    }
    Ok(bytes)
}

/// Fails unless `path` is a regular file (symlinks followed) of at most `max_bytes`.
pub fn check_regular(path: &Path, max_bytes: u64) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        let what = match meta.file_type() {
            t if t.is_dir() => "a directory",
            _ => "not a regular file (a FIFO, socket or device)",
        };
        return Err(Error::new(ErrorKind::InvalidInput, what));
    }
    if meta.len() > max_bytes {
        return Err(too_large(max_bytes));
    }
    Ok(())
}

fn too_large(max_bytes: u64) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!("larger than the {max_bytes}-byte limit"),
    )
}

/// The directory tern's tools keep models and generated files in: `$TERN_CACHE`, else
/// `~/.cache/tern` (what `scripts/fetch-models` fills and the test suites, benchmarks and
/// examples read). Apps choose their own directories; nothing in a session reads this.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TERN_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tern")
        })
}

/// `rel` under [`cache_dir`], which `scripts/fetch-models` fills: the path, or `NotFound`
/// saying to run the script.
pub fn fetched(rel: &str) -> std::io::Result<PathBuf> {
    let path = cache_dir().join(rel);
    if path.exists() {
        Ok(path)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "{} is missing: run scripts/fetch-models first (the README's test command does)",
                path.display()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_oversized_files_are_refused() {
        let dir = std::env::temp_dir();
        assert!(read_regular(&dir, 10).is_err());
        #[cfg(unix)]
        assert!(read_regular(Path::new("/dev/zero"), 10).is_err());
        let file = dir.join(format!("tern-fs-{}", std::process::id()));
        std::fs::write(&file, b"12345").unwrap();
        assert_eq!(read_regular(&file, 5).unwrap(), b"12345");
        assert!(read_regular(&file, 4).is_err());
        std::fs::remove_file(&file).unwrap();
    }
}
