//! Repository fetchers for the [`Updater`](crate::Updater) (`tern store update`, `tern
//! agent`'s scheduled updates): HTTP(S) through `ureq` with rustls (Range requests for
//! resumable downloads, conditional requests for metadata that has not changed), or a
//! local directory. Behind the cargo feature `http`.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::Duration;

use crate::{DirFetcher, FetchError, Fetcher};

/// A repository served over HTTP or HTTPS.
pub struct HttpFetcher {
    base: String,
    agent: ureq::Agent,
    // Validators and bodies of whole files fetched before (metadata), for conditional
    // requests: a 304 answers from here.
    cache: Mutex<HashMap<String, Cached>>,
}

struct Cached {
    etag: Option<String>,
    last_modified: Option<String>,
    body: Vec<u8>,
}

impl HttpFetcher {
    /// A fetcher for the repository at `base` (`http://…` or `https://…`).
    pub fn new(base: &str) -> HttpFetcher {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_global(Some(Duration::from_secs(120)))
            .build();
        HttpFetcher {
            base: base.trim_end_matches('/').to_string(),
            agent: config.into(),
            cache: Mutex::new(HashMap::new()),
        }
    }
}

fn failed(reason: impl ToString) -> FetchError {
    FetchError::Failed {
        reason: reason.to_string(),
    }
}

impl Fetcher for HttpFetcher {
    fn fetch(&self, path: &str, offset: u64, max_bytes: u64) -> Result<Vec<u8>, FetchError> {
        if max_bytes == 0 {
            return Ok(Vec::new());
        }
        let url = format!("{}/{path}", self.base);
        let mut request = self.agent.get(&url).header(
            "Range",
            format!("bytes={offset}-{}", offset.saturating_add(max_bytes - 1)),
        );
        let whole = offset == 0;
        if whole {
            if let Some(c) = tern::sync::lock(&self.cache).get(path) {
                if let Some(etag) = &c.etag {
                    request = request.header("If-None-Match", etag);
                }
                if let Some(date) = &c.last_modified {
                    request = request.header("If-Modified-Since", date);
                }
            }
        }
        let mut response = request.call().map_err(failed)?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let (etag, date) = (header("etag"), header("date"));
        let last_modified = header("last-modified").filter(|lm| strong(lm, date.as_deref()));
        let skip = match response.status().as_u16() {
            304 => {
                let cache = tern::sync::lock(&self.cache);
                let body = cache.get(path).map(|c| c.body.clone()).unwrap_or_default();
                return Ok(body.into_iter().take(max_bytes as usize).collect());
            }
            404 | 410 => return Err(FetchError::NotFound),
            416 => return Ok(Vec::new()), // the range starts at or past the end
            206 => 0,
            200 => offset, // the server ignored the range: skip to it
            code => return Err(failed(format!("HTTP {code} for {url}"))),
        };
        let mut reader = response.body_mut().as_reader();
        std::io::copy(&mut reader.by_ref().take(skip), &mut std::io::sink()).map_err(failed)?;
        let mut body = Vec::new();
        reader
            .take(max_bytes)
            .read_to_end(&mut body)
            .map_err(failed)?;
        if whole && (etag.is_some() || last_modified.is_some()) {
            tern::sync::lock(&self.cache).insert(
                path.to_string(),
                Cached {
                    etag,
                    last_modified,
                    body: body.clone(),
                },
            );
        }
        Ok(body)
    }
}

/// Whether a `Last-Modified` date can validate a conditional request: only if the response
/// was made at least a second after it (RFC 9110, 8.8.2.2). A file changed within the
/// second it was served may change again in that second and keep the same date, and a
/// conditional request would then be answered 304 for content never fetched (found when
/// a repository published two versions within one second).
fn strong(last_modified: &str, date: Option<&str>) -> bool {
    match (
        httpdate::parse_http_date(last_modified),
        date.map(httpdate::parse_http_date),
    ) {
        (Ok(modified), Some(Ok(served))) => served
            .duration_since(modified)
            .is_ok_and(|d| d >= Duration::from_secs(1)),
        _ => false,
    }
}

/// The fetcher for `repo`: HTTP(S) for a URL, else a local directory.
pub fn for_repo(repo: &str) -> std::sync::Arc<dyn Fetcher> {
    if repo.starts_with("http://") || repo.starts_with("https://") {
        std::sync::Arc::new(HttpFetcher::new(repo))
    } else {
        std::sync::Arc::new(DirFetcher::new(repo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// Python's static file server on a free port (what the deploy e2e serves with):
    /// no Range support, `Last-Modified` validators, a log line per request on stderr.
    fn python_server(dir: &std::path::Path) -> (std::process::Child, String) {
        let mut child = std::process::Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        let port = line.split_whitespace().nth(5).unwrap().to_string();
        (child, format!("http://127.0.0.1:{port}"))
    }

    #[test]
    fn http_fetches_ranges_whole_files_conditionally_and_knows_a_missing_file() {
        let dir = std::env::temp_dir().join(format!("tern-fetch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join("timestamp.json"), &bytes).unwrap();
        // Written a minute ago: its Last-Modified is a strong validator.
        std::fs::File::options()
            .write(true)
            .open(dir.join("timestamp.json"))
            .unwrap()
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
            .unwrap();
        // Written now: fetched, rewritten within the same second, fetched again.
        std::fs::write(dir.join("fresh.json"), b"one").unwrap();
        let (mut server, url) = python_server(&dir);
        let fetcher = HttpFetcher::new(&url);

        assert_eq!(fetcher.fetch("timestamp.json", 0, 1 << 20).unwrap(), bytes);
        // The server ignores Range (200): the fetcher skips to the offset itself.
        assert_eq!(
            fetcher.fetch("timestamp.json", 1000, 300).unwrap(),
            bytes[1000..1300]
        );
        assert_eq!(
            fetcher.fetch("timestamp.json", 4990, 100).unwrap(),
            bytes[4990..]
        );
        assert_eq!(
            fetcher.fetch("2.root.json", 0, 100).unwrap_err(),
            FetchError::NotFound
        );
        // Unchanged since the first fetch: a 304, answered from the cache.
        assert_eq!(fetcher.fetch("timestamp.json", 0, 1 << 20).unwrap(), bytes);
        // Changed within the second it was served: its date validates nothing, so the
        // second fetch is not conditional and sees the change.
        assert_eq!(fetcher.fetch("fresh.json", 0, 100).unwrap(), b"one");
        std::fs::write(dir.join("fresh.json"), b"two").unwrap();
        assert_eq!(fetcher.fetch("fresh.json", 0, 100).unwrap(), b"two");
        let unreachable = HttpFetcher::new("http://127.0.0.1:9");
        assert!(matches!(
            unreachable.fetch("timestamp.json", 0, 10),
            Err(FetchError::Failed { .. })
        ));
        server.kill().unwrap();
        let mut log = String::new();
        server
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut log)
            .unwrap();
        let _ = server.wait();
        let _ = std::fs::remove_dir_all(&dir);
        let statuses: Vec<&str> = log
            .lines()
            .filter_map(|l| l.split("\" ").nth(1)?.split_whitespace().next())
            .collect();
        assert_eq!(
            statuses,
            ["200", "200", "200", "404", "304", "200", "200"],
            "{log}"
        );
    }
}
