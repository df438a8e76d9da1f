//! Updates through a TUF repository, end to end on the embedded magika model: publish,
//! rotate root keys, and a device pulling from it; then each attack TUF names against the
//! metadata, each a typed error that leaves the device's trust and store as they were.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{magika_state, open_store, signed_with};
use tern_bundle::repo::{self, RootSpec, Signers, Validity};
use tern_bundle::{
    BundleSpec, DirFetcher, ErrorKind, FetchError, Fetcher, KeyPair, StoreOptions, UpdateLimits,
    UpdateOutcome, Updater,
};

/// A repository and the keys behind it.
struct Repo {
    dir: PathBuf,
    root: KeyPair,
    targets: KeyPair,
    snapshot: KeyPair,
    timestamp: KeyPair,
    release: KeyPair,
}

impl Repo {
    fn new(dir: &Path) -> Repo {
        let k = || KeyPair::generate().unwrap();
        let r = Repo {
            dir: dir.join("repo"),
            root: k(),
            targets: k(),
            snapshot: k(),
            timestamp: k(),
            release: k(),
        };
        repo::init(&r.dir, &r.spec(), std::slice::from_ref(&r.root)).unwrap();
        r
    }

    fn spec(&self) -> RootSpec {
        RootSpec::single(
            self.root.public(),
            self.targets.public(),
            self.snapshot.public(),
            self.timestamp.public(),
        )
    }

    fn signers(&self) -> (Vec<KeyPair>, Vec<KeyPair>, Vec<KeyPair>) {
        let c = |k: &KeyPair| {
            vec![KeyPair::from_json(&serde_json::to_vec(&k.to_json()).unwrap()).unwrap()]
        };
        (c(&self.targets), c(&self.snapshot), c(&self.timestamp))
    }

    /// Publishes magika `version` (a fresh bundle signed by the release key).
    fn publish(&self, version: u64) -> repo::Published {
        self.publish_with(version, Validity::default())
    }

    fn publish_with(&self, version: u64, validity: Validity) -> repo::Published {
        let path = self.dir.with_file_name(format!("magika-{version}.tern"));
        if !path.exists() {
            std::fs::write(
                &path,
                signed_with(&self.release, BundleSpec::new("magika", version)),
            )
            .unwrap();
        }
        let (t, s, ts) = self.signers();
        let signers = Signers {
            targets: &t,
            snapshot: &s,
            timestamp: &ts,
        };
        repo::publish(&self.dir, &[path], signers, validity).unwrap()
    }

    fn root_json(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("1.root.json")).unwrap()
    }

    /// A device: a store trusting the release key, updating from this repository.
    fn device(&self, dir: &Path, fetcher: Arc<dyn Fetcher>) -> Updater {
        let store = open_store(dir, &self.release, StoreOptions::default());
        Updater::new(store, &self.root_json(), fetcher).unwrap()
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(file)).unwrap()
    }

    fn write(&self, file: &str, bytes: &[u8]) {
        std::fs::write(self.dir.join(file), bytes).unwrap();
    }
}

fn installed(outcome: UpdateOutcome) -> u64 {
    match outcome {
        UpdateOutcome::Installed(i) => i.version,
        other => panic!("{other:?}"),
    }
}

fn kind(result: Result<UpdateOutcome, tern_bundle::Error>) -> ErrorKind {
    let err = result.expect_err("refused");
    eprintln!("refused: {err}");
    err.error_kind()
}

#[test]
fn a_device_pulls_the_newest_version_and_nothing_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let published = repo.publish(1);
    assert_eq!(published.added, [("magika".to_string(), 1)]);
    repo.publish(2);
    let device_dir = tmp.path().join("device");
    let device = repo.device(&device_dir, Arc::new(DirFetcher::new(&repo.dir)));

    assert_eq!(installed(device.update("magika").unwrap()), 2, "the newest");
    assert_eq!(
        device.update("magika").unwrap(),
        UpdateOutcome::UpToDate { newest: Some(2) }
    );
    assert_eq!(
        device.update("other").unwrap(),
        UpdateOutcome::UpToDate { newest: None }
    );
    let p = repo.publish(3);
    assert_eq!(
        p.targets,
        ["magika/1.tern", "magika/2.tern", "magika/3.tern"]
    );
    assert_eq!(p.targets_version, 3);
    assert_eq!(installed(device.update("magika").unwrap()), 3);
    let s = magika_state(&device_store(&device_dir, &repo));
    assert_eq!(s.installed.iter().copied().collect::<Vec<_>>(), [2, 3]);
    assert_eq!(s.active, None, "installed, not activated");
    // Publishing the same version again with other bytes is refused.
    std::fs::remove_file(repo.dir.with_file_name("magika-3.tern")).unwrap();
    let (t, s, ts) = repo.signers();
    let other = repo.dir.with_file_name("magika-3.tern");
    std::fs::write(
        &other,
        signed_with(&repo.release, BundleSpec::new("magika", 3).licence("x")),
    )
    .unwrap();
    let signers = Signers {
        targets: &t,
        snapshot: &s,
        timestamp: &ts,
    };
    let err = repo::publish(&repo.dir, &[other], signers, Validity::default()).unwrap_err();
    assert_eq!(err.error_kind(), ErrorKind::InvalidOption, "{err}");
}

/// The device's store, opened again.
fn device_store(dir: &Path, repo: &Repo) -> tern_bundle::ModelStore {
    open_store(dir, &repo.release, StoreOptions::default())
}

#[test]
fn publishing_with_a_key_the_root_does_not_name_fails_at_the_publisher() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let path = repo.dir.with_file_name("magika-1.tern");
    std::fs::write(
        &path,
        signed_with(&repo.release, BundleSpec::new("magika", 1)),
    )
    .unwrap();
    let stranger = [KeyPair::generate().unwrap()];
    let (_, s, ts) = repo.signers();
    let signers = Signers {
        targets: &stranger,
        snapshot: &s,
        timestamp: &ts,
    };
    let err = repo::publish(&repo.dir, &[path], signers, Validity::default()).unwrap_err();
    assert_eq!(err.error_kind(), ErrorKind::Signature, "{err}");
    assert!(
        !repo.dir.join("timestamp.json").exists(),
        "nothing published"
    );
}

#[test]
fn root_rotations_are_walked_and_old_keys_stop_counting() {
    let tmp = tempfile::tempdir().unwrap();
    let mut repo = Repo::new(tmp.path());
    repo.publish(1);
    let device = repo.device(
        &tmp.path().join("device"),
        Arc::new(DirFetcher::new(&repo.dir)),
    );
    assert_eq!(installed(device.update("magika").unwrap()), 1);
    let old_timestamp = repo.read("timestamp.json");

    // Rotate the root and the timestamp keys (version 2, signed by old and new root keys),
    // then again (version 3), and publish with the new timestamp key.
    for _ in 0..2 {
        let new_root = KeyPair::generate().unwrap();
        repo.timestamp = KeyPair::generate().unwrap();
        let old_root = std::mem::replace(&mut repo.root, new_root);
        let signers = [
            old_root,
            KeyPair::from_json(&serde_json::to_vec(&repo.root.to_json()).unwrap()).unwrap(),
        ];
        repo::rotate_root(&repo.dir, &repo.spec(), &signers).unwrap();
    }
    repo.publish(2);
    assert_eq!(installed(device.update("magika").unwrap()), 2);
    assert_eq!(device.root().unwrap().version, 3);

    // The old timestamp key no longer counts: its (older, validly signed) timestamp is
    // refused by signature.
    repo.write("timestamp.json", &old_timestamp);
    assert_eq!(kind(device.update("magika")), ErrorKind::Signature);

    // A rotation signed by the new keys alone (not the trusted root's) is refused.
    let rogue = KeyPair::generate().unwrap();
    repo.root = KeyPair::from_json(&serde_json::to_vec(&rogue.to_json()).unwrap()).unwrap();
    let dir = tmp.path().join("rogue");
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(&repo.dir).unwrap().flatten() {
        if f.file_type().unwrap().is_file() {
            std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
        }
    }
    repo.dir = dir;
    repo::rotate_root(&repo.dir, &repo.spec(), &[rogue]).unwrap_err(); // the publisher checks too
                                                                       // Forge it by hand: a version-4 root signed only by the rogue key.
    let mut root: repo::Root = serde_json::from_value(
        serde_json::from_slice::<serde_json::Value>(&repo.read("3.root.json")).unwrap()["signed"]
            .clone(),
    )
    .unwrap();
    root.version = 4;
    let forged_root = {
        let mut r = root.clone();
        r.keys
            .insert(repo.root.public().key_id(), repo.root.public().to_json());
        r.roles.get_mut(&tern_bundle::Role::Root).unwrap().keyids =
            vec![repo.root.public().key_id()];
        r
    };
    let mut envelope = tern_bundle::signed::Envelope::new(&forged_root).unwrap();
    envelope.sign(&repo.root).unwrap();
    repo.write("4.root.json", &envelope.to_bytes());
    let rogue_device = Updater::new(
        open_store(
            &tmp.path().join("device"),
            &repo.release,
            StoreOptions::default(),
        ),
        &[],
        Arc::new(DirFetcher::new(&repo.dir)),
    )
    .unwrap();
    assert_eq!(kind(rogue_device.update("magika")), ErrorKind::Signature);
    assert_eq!(
        rogue_device.root().unwrap().version,
        3,
        "the trusted root stays"
    );
}

#[test]
fn frozen_replayed_and_mixed_metadata_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    repo.publish(1);
    let (old_timestamp, old_snapshot) = (repo.read("timestamp.json"), repo.read("snapshot.json"));
    repo.publish(2);
    let device = repo.device(
        &tmp.path().join("device"),
        Arc::new(DirFetcher::new(&repo.dir)),
    );
    assert_eq!(installed(device.update("magika").unwrap()), 2);
    let (timestamp, snapshot) = (repo.read("timestamp.json"), repo.read("snapshot.json"));

    // Replay: an older, validly signed timestamp.
    repo.write("timestamp.json", &old_timestamp);
    assert_eq!(kind(device.update("magika")), ErrorKind::Rollback);
    // Mix and match: the current timestamp with an older snapshot.
    repo.write("timestamp.json", &timestamp);
    repo.write("snapshot.json", &old_snapshot);
    assert_eq!(kind(device.update("magika")), ErrorKind::FileMismatch);
    repo.write("snapshot.json", &snapshot);
    // Freeze: the same metadata a week later (the timestamp lives a day).
    let later = device_at(
        &repo,
        &tmp.path().join("device"),
        SystemTime::now() + Duration::from_secs(7 * 86400),
    );
    assert_eq!(kind(later.update("magika")), ErrorKind::Expired);
    // Tampered targets metadata (a raised length) no longer matches the snapshot's version
    // or its signature.
    let text = String::from_utf8(repo.read("targets.json")).unwrap();
    repo.write(
        "targets.json",
        text.replacen("\"length\": ", "\"length\": 1", 1).as_bytes(),
    );
    assert_eq!(kind(device.update("magika")), ErrorKind::Signature);
    // The device's trust is what it was.
    repo.publish(3);
    let fresh = repo.device(
        &tmp.path().join("device"),
        Arc::new(DirFetcher::new(&repo.dir)),
    );
    assert_eq!(installed(fresh.update("magika").unwrap()), 3);
}

fn device_at(repo: &Repo, dir: &Path, now: SystemTime) -> Updater {
    repo.device(dir, Arc::new(DirFetcher::new(&repo.dir)))
        .now(now)
}

/// A fetcher that records requests and can fail once after some bytes of a bundle, or
/// send more than asked.
struct Flaky {
    inner: DirFetcher,
    fail_after: Mutex<Option<u64>>,
    oversend: bool,
    offsets: Mutex<Vec<u64>>,
}

impl Fetcher for Flaky {
    fn fetch(&self, path: &str, offset: u64, max: u64) -> Result<Vec<u8>, FetchError> {
        if path.starts_with("targets/") {
            self.offsets.lock().unwrap().push(offset);
            let mut fail = self.fail_after.lock().unwrap();
            if fail.is_some_and(|n| offset >= n) {
                *fail = None;
                return Err(FetchError::Failed {
                    reason: "connection reset".into(),
                });
            }
            if self.oversend {
                let mut bytes = self.inner.fetch(path, offset, max)?;
                bytes.extend([0u8; 100]);
                return Ok(bytes);
            }
        }
        self.inner.fetch(path, offset, max)
    }
}

#[test]
fn interrupted_downloads_resume_and_bundles_are_cut_at_their_length() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    repo.publish(1);
    let flaky = Arc::new(Flaky {
        inner: DirFetcher::new(&repo.dir),
        fail_after: Mutex::new(Some(200_000)),
        oversend: false,
        offsets: Mutex::new(Vec::new()),
    });
    let mut limits = UpdateLimits::default();
    limits.chunk_bytes = 64 << 10;
    let device_dir = tmp.path().join("device");
    let device = repo.device(&device_dir, flaky.clone()).limits(limits);
    assert_eq!(kind(device.update("magika")), ErrorKind::Fetch);
    let part = device_dir.join("downloads/magika-1.part");
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept >= 200_000, "{kept}");
    flaky.offsets.lock().unwrap().clear();
    assert_eq!(installed(device.update("magika").unwrap()), 1);
    assert_eq!(
        flaky.offsets.lock().unwrap()[0],
        kept,
        "resumed where it stopped"
    );
    assert!(!part.exists());

    // Bytes appended on the server beyond the signed length are never downloaded.
    repo.publish(2);
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(repo.dir.join("targets/magika/2.tern"))
        .unwrap();
    std::io::Write::write_all(&mut file, &vec![7u8; 1 << 20]).unwrap();
    assert_eq!(installed(device.update("magika").unwrap()), 2);

    // A fetcher that sends more than it was asked for is refused; a changed bundle (same
    // length) fails its hash and its partial download is dropped.
    repo.publish(3);
    let greedy = Arc::new(Flaky {
        inner: DirFetcher::new(&repo.dir),
        fail_after: Mutex::new(None),
        oversend: true,
        offsets: Mutex::new(Vec::new()),
    });
    let device = repo.device(&device_dir, greedy);
    assert_eq!(kind(device.update("magika")), ErrorKind::TooLarge);
    let target = repo.dir.join("targets/magika/3.tern");
    let mut bytes = std::fs::read(&target).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&target, bytes).unwrap();
    let _ = std::fs::remove_file(device_dir.join("downloads/magika-3.part"));
    let device = repo.device(&device_dir, Arc::new(DirFetcher::new(&repo.dir)));
    assert_eq!(kind(device.update("magika")), ErrorKind::FileMismatch);
    assert!(!device_dir.join("downloads/magika-3.part").exists());
    assert_eq!(magika_state(&device_store(&device_dir, &repo)).highest, 2);
}
