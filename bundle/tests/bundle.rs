//! Bundles end to end on the embedded magika model: create, sign, write, read as a device
//! would, golden check; then every bad bundle the threat model names, each a typed error.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

mod common;

use common::{cpu, magika_state, model_bytes, open_store, samples, signed_with};
use tern::{Model, Session, SessionOptions, Tensor};
use tern_bundle::signed::Envelope;
use tern_bundle::{
    create, create_with_outputs, Arm, Bundle, BundleSpec, CanaryUnit, ErrorKind, HealthPolicy,
    KeyPair, Limits, ModelStore, QuarantineReason, RollbackReason, Rollout, RolloutEvent,
    RolloutPolicy, Stage, StoreEvent, StoreOptions, Trust, Verdict, VerifyOptions,
};

/// A signed bundle of magika, and the key that signed it.
fn signed(spec: BundleSpec) -> (Vec<u8>, KeyPair) {
    let key = KeyPair::generate().unwrap();
    (signed_with(&key, spec), key)
}

fn trusting(key: &KeyPair) -> VerifyOptions {
    VerifyOptions::trusting(Trust::new([key.public()], 1).unwrap())
}

fn read(bytes: &[u8], options: &VerifyOptions) -> Result<Bundle, ErrorKind> {
    Bundle::from_reader(bytes, options).map_err(|e| {
        eprintln!("refused: {e}");
        e.error_kind()
    })
}

/// Rewrites a bundle's tar entries raw (no checks): `edit` returns the entries to write.
fn rewrite(
    bytes: &[u8],
    edit: impl FnOnce(Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)>,
) -> Vec<u8> {
    let mut archive = tar::Archive::new(bytes);
    let entries: Vec<(String, Vec<u8>)> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let path = String::from_utf8(e.path_bytes().to_vec()).unwrap();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            (path, data)
        })
        .collect();
    let mut out = tar::Builder::new(Vec::new());
    for (path, data) in edit(entries) {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        // Raw name bytes: the builder would refuse `..` and absolute paths.
        let name = &mut header.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_cksum();
        out.append(&header, data.as_slice()).unwrap();
    }
    out.into_inner().unwrap()
}

#[test]
fn a_signed_bundle_verifies_and_its_golden_samples_pass_on_this_device() {
    let spec = BundleSpec::new("magika", 3).licence("Apache-2.0");
    let (bytes, key) = signed(spec);
    let bundle = read(&bytes, &trusting(&key)).unwrap();
    let m = bundle.manifest();
    assert_eq!((m.name.as_str(), m.version), ("magika", 3));
    assert_eq!(m.golden.len(), 2);
    assert_eq!(
        m.files.len(),
        1 + 2 * 2,
        "model + one input and one output per sample"
    );
    assert_eq!(
        m.inputs,
        Model::from_bytes(&model_bytes()).unwrap().inputs()
    );
    assert_eq!(bundle.file("model.onnx"), Some(model_bytes().as_slice()));

    let session = Session::new(&bundle.model().unwrap(), cpu()).unwrap();
    let report = bundle.check_golden(&session).unwrap();
    assert_eq!(report.samples, 2);
    assert_eq!(report.outputs.len(), 2);
    assert!(report.worst_share() <= 1.0);

    // Written and read back from a file, byte for byte the same; re-serialising is stable.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("magika.tern");
    bundle.write(&path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    Bundle::read(&path, &trusting(&key)).unwrap();

    // Two of two keys: one signature is not enough, both are.
    let second = KeyPair::generate().unwrap();
    let both = Trust::new([key.public(), second.public()], 2).unwrap();
    assert_eq!(
        read(&bytes, &VerifyOptions::trusting(both.clone())).unwrap_err(),
        ErrorKind::Signature
    );
    let mut cosigned = bundle.clone();
    cosigned.sign(&second).unwrap();
    read(
        &cosigned.to_bytes().unwrap(),
        &VerifyOptions::trusting(both),
    )
    .unwrap();
}

#[test]
fn golden_outputs_given_from_elsewhere_are_checked_within_tolerance() {
    let model = Model::from_bytes(&model_bytes()).unwrap();
    let session = Session::new(&model, cpu()).unwrap();
    let inputs = samples(1).remove(0);
    let outputs: BTreeMap<String, Tensor> = session
        .run(inputs.clone())
        .unwrap()
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    let nudge = |by: f32| -> BTreeMap<String, Tensor> {
        outputs
            .iter()
            .map(|(n, t)| {
                let v: Vec<f32> = t.to_f32_vec().unwrap().iter().map(|x| x + by).collect();
                (n.clone(), Tensor::from_vec(t.shape(), v).unwrap())
            })
            .collect()
    };
    let spec = BundleSpec::new("magika", 1).tolerance(1e-3, 0.0);
    // Within tolerance (half of atol off): passes, and says how close it came.
    let near = create_with_outputs(model_bytes(), &spec, &[(inputs.clone(), nudge(5e-4))]).unwrap();
    let share = near.check_golden(&session).unwrap().worst_share();
    assert!((0.4..=0.6).contains(&share), "{share}");
    // Outside: a typed golden mismatch naming the sample and output.
    let far = create_with_outputs(model_bytes(), &spec, &[(inputs, nudge(2e-3))]).unwrap();
    let err = far.check_golden(&session).unwrap_err();
    assert_eq!(err.error_kind(), ErrorKind::GoldenMismatch, "{err}");
    assert!(err.to_string().contains("golden sample 0"), "{err}");
}

#[test]
fn tampering_wrong_keys_expiry_rollback_and_newer_tern_are_refused() {
    let (bytes, key) = signed(BundleSpec::new("magika", 3));
    let ok = trusting(&key);

    // Model bytes changed, same length: the hash differs.
    let tampered = rewrite(&bytes, |mut e| {
        let model = e.iter_mut().find(|(p, _)| p == "model.onnx").unwrap();
        let mid = model.1.len() / 2;
        model.1[mid] ^= 1;
        e
    });
    assert_eq!(read(&tampered, &ok).unwrap_err(), ErrorKind::FileMismatch);
    // Model bytes appended to: the length differs (refused before reading the entry).
    let longer = rewrite(&bytes, |mut e| {
        e.iter_mut()
            .find(|(p, _)| p == "model.onnx")
            .unwrap()
            .1
            .push(0);
        e
    });
    assert_eq!(read(&longer, &ok).unwrap_err(), ErrorKind::FileMismatch);

    // The manifest edited (a higher version, or a new hash for a swapped model): the
    // signature no longer covers it.
    let edited = rewrite(&bytes, |mut e| {
        let mut env = Envelope::parse(&e[0].1).unwrap();
        env.signed["version"] = serde_json::json!(4);
        e[0].1 = env.to_bytes();
        e
    });
    assert_eq!(read(&edited, &ok).unwrap_err(), ErrorKind::Signature);
    // Signatures stripped.
    let stripped = rewrite(&bytes, |mut e| {
        let mut env = Envelope::parse(&e[0].1).unwrap();
        env.signatures.clear();
        e[0].1 = env.to_bytes();
        e
    });
    assert_eq!(read(&stripped, &ok).unwrap_err(), ErrorKind::Signature);

    // Another key.
    let other = trusting(&KeyPair::generate().unwrap());
    assert_eq!(read(&bytes, &other).unwrap_err(), ErrorKind::Signature);

    // Expired: the same bundle read 400 days from now.
    let later = trusting(&key).now(SystemTime::now() + Duration::from_secs(400 * 86_400));
    assert_eq!(read(&bytes, &later).unwrap_err(), ErrorKind::Expired);

    // Rollback: version 3 where 4 is installed; the installed version itself is fine.
    assert_eq!(
        read(&bytes, &trusting(&key).installed_version(4)).unwrap_err(),
        ErrorKind::Rollback
    );
    read(&bytes, &trusting(&key).installed_version(3)).unwrap();

    // A bundle for a newer tern.
    let (newer, key2) = signed(BundleSpec::new("magika", 3).min_tern("99.0.0"));
    assert_eq!(
        read(&newer, &trusting(&key2)).unwrap_err(),
        ErrorKind::NeedsNewerTern
    );

    // Unchecked reading (inspect, sign) still checks every file against the manifest.
    assert_eq!(
        read(&tampered, &VerifyOptions::unchecked()).unwrap_err(),
        ErrorKind::FileMismatch
    );
    read(&stripped, &VerifyOptions::unchecked()).unwrap();
}

#[test]
fn entries_that_escape_the_bundle_or_disagree_with_the_manifest_are_refused() {
    let (bytes, key) = signed(BundleSpec::new("magika", 3));
    let ok = trusting(&key);
    for evil in [
        "../evil",
        "/etc/evil",
        "golden/../../evil",
        "a//b",
        "./model.onnx",
        "c:\\evil",
    ] {
        let escaped = rewrite(&bytes, |mut e| {
            e.push((evil.to_string(), b"x".to_vec()));
            e
        });
        assert_eq!(
            read(&escaped, &ok).unwrap_err(),
            ErrorKind::UnsafeEntry,
            "{evil}"
        );
    }

    // A symbolic link in place of the model.
    let mut archive = tar::Builder::new(Vec::new());
    let mut entries = tar::Archive::new(bytes.as_slice());
    for e in entries.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8(e.path_bytes().to_vec()).unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        if path == "model.onnx" {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            archive.append_link(&mut h, &path, "/etc/passwd").unwrap();
        } else {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            archive.append_data(&mut h, &path, data.as_slice()).unwrap();
        }
    }
    let linked = archive.into_inner().unwrap();
    assert_eq!(read(&linked, &ok).unwrap_err(), ErrorKind::UnsafeEntry);

    // An extra file, a missing one, a repeated one, the manifest not first.
    let extra = rewrite(&bytes, |mut e| {
        e.push(("notes.txt".into(), b"hi".to_vec()));
        e
    });
    assert_eq!(read(&extra, &ok).unwrap_err(), ErrorKind::FileMismatch);
    let missing = rewrite(&bytes, |mut e| {
        e.retain(|(p, _)| p != "model.onnx");
        e
    });
    assert_eq!(read(&missing, &ok).unwrap_err(), ErrorKind::FileMismatch);
    let repeated = rewrite(&bytes, |mut e| {
        let last = e.last().unwrap().clone();
        e.push(last);
        e
    });
    assert_eq!(read(&repeated, &ok).unwrap_err(), ErrorKind::FileMismatch);
    let reordered = rewrite(&bytes, |mut e| {
        e.rotate_left(1);
        e
    });
    assert_eq!(read(&reordered, &ok).unwrap_err(), ErrorKind::Malformed);
}

#[test]
fn truncated_oversized_and_garbage_bundles_are_typed_errors() {
    let (bytes, key) = signed(BundleSpec::new("magika", 3));
    let ok = trusting(&key);
    // Cut anywhere (a download that stopped): never a panic, never accepted.
    for tenth in 0..10 {
        let cut = &bytes[..bytes.len() * tenth / 10];
        let kind = read(cut, &ok).unwrap_err();
        assert!(
            matches!(kind, ErrorKind::Malformed | ErrorKind::FileMismatch),
            "cut at {tenth}/10: {kind}"
        );
    }
    // Cut inside the zero blocks that end the archive: every entry is whole, so it reads.
    read(&bytes[..bytes.len() - 512], &ok).unwrap();

    let total = Bundle::from_reader(bytes.as_slice(), &ok)
        .unwrap()
        .manifest()
        .total_length();
    let small = ok
        .clone()
        .limits(Limits::default().with_bundle_bytes(total - 1));
    assert_eq!(read(&bytes, &small).unwrap_err(), ErrorKind::TooLarge);
    let tiny_manifest = ok
        .clone()
        .limits(Limits::default().with_manifest_bytes(100));
    assert_eq!(
        read(&bytes, &tiny_manifest).unwrap_err(),
        ErrorKind::TooLarge
    );

    assert_eq!(
        read(b"not a bundle at all", &ok).unwrap_err(),
        ErrorKind::Malformed
    );
    assert_eq!(read(&[0u8; 4096], &ok).unwrap_err(), ErrorKind::Malformed);
    // A manifest that is not JSON, and one with a float (no canonical form to verify).
    for manifest in [
        b"{".to_vec(),
        br#"{"signed": {"x": 0.5}, "signatures": []}"#.to_vec(),
    ] {
        let bad = rewrite(&bytes, |mut e| {
            e[0].1 = manifest;
            e
        });
        assert_eq!(read(&bad, &ok).unwrap_err(), ErrorKind::Malformed);
    }
}

#[test]
fn bad_specs_are_invalid_options() {
    for spec in [
        BundleSpec::new("", 1),
        BundleSpec::new("../up", 1),
        BundleSpec::new("magika", 1).min_tern("soon"),
        BundleSpec::new("magika", 1).tolerance(f64::NAN, 0.0),
        BundleSpec::new("magika", 1).tolerance(0.0, -1.0),
        BundleSpec::new("magika", 1).valid_for(Duration::ZERO),
    ] {
        let err = create(model_bytes(), &spec, &samples(1), cpu()).unwrap_err();
        assert_eq!(err.error_kind(), ErrorKind::InvalidOption, "{err}");
    }
    let err = create(b"not onnx".to_vec(), &BundleSpec::new("m", 1), &[], cpu()).unwrap_err();
    assert_eq!(err.error_kind(), ErrorKind::Model, "{err}");
}

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_store_installs_activates_rolls_back_prunes_and_keeps_its_floor() {
    let key = KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), &key, StoreOptions::default());
    let v = |n| signed_with(&key, BundleSpec::new("magika", n));

    let first = store.install(v(1).as_slice()).unwrap();
    assert_eq!(
        (first.name.as_str(), first.version, first.golden.samples),
        ("magika", 1, 2)
    );
    assert_eq!(magika_state(&store).active, None, "installed, not active");
    store.activate("magika", 1).unwrap();
    store.install(v(2).as_slice()).unwrap();
    store.activate("magika", 2).unwrap();
    let s = magika_state(&store);
    assert_eq!((s.active, s.previous, s.highest), (Some(2), Some(1), 2));

    assert_eq!(store.rollback("magika").unwrap(), 1);
    let s = magika_state(&store);
    assert_eq!((s.active, s.previous), (Some(1), None));
    assert_eq!(
        store.rollback("magika").unwrap_err().error_kind(),
        ErrorKind::NotInstalled
    );
    let (version, bundle) = store.active("magika").unwrap();
    assert_eq!((version, bundle.manifest().version), (1, 1));

    // Rolling back on the device never lowers the floor: version 1 cannot come in again
    // from outside, while 2 (the highest accepted) can.
    let err = store.install(v(1).as_slice()).unwrap_err();
    assert_eq!(err.error_kind(), ErrorKind::Rollback, "{err}");
    store.install(v(2).as_slice()).unwrap();

    // keep = 3: installing 3 and 4 removes the oldest version neither active nor previous.
    assert!(store.install(v(3).as_slice()).unwrap().removed.is_empty());
    assert_eq!(store.install(v(4).as_slice()).unwrap().removed, vec![2]);
    let s = magika_state(&store);
    assert_eq!(
        s.installed.iter().copied().collect::<Vec<_>>(),
        vec![1, 3, 4]
    );
    assert_eq!(s.active, Some(1));
    assert_eq!(
        files_in(&dir.path().join("bundles/magika")),
        ["1.tern", "3.tern", "4.tern"]
    );
    assert_eq!(
        store.activate("magika", 2).unwrap_err().error_kind(),
        ErrorKind::NotInstalled
    );

    // The same state after reopening.
    drop(store);
    let again = open_store(dir.path(), &key, StoreOptions::default());
    assert_eq!(magika_state(&again), s);
}

#[test]
fn bad_bundles_leave_the_store_unchanged() {
    let key = KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), &key, StoreOptions::default());
    store
        .install(signed_with(&key, BundleSpec::new("magika", 1)).as_slice())
        .unwrap();
    store.activate("magika", 1).unwrap();
    let before = store.status().unwrap();

    // Golden outputs this device does not reproduce: never stored, never activated.
    let model = Model::from_bytes(&model_bytes()).unwrap();
    let session = Session::new(&model, cpu()).unwrap();
    let inputs = samples(1).remove(0);
    let wrong: BTreeMap<String, Tensor> = session
        .run(inputs.clone())
        .unwrap()
        .iter()
        .map(|(n, t)| {
            let v: Vec<f32> = t.to_f32_vec().unwrap().iter().map(|x| x + 0.5).collect();
            (n.to_string(), Tensor::from_vec(t.shape(), v).unwrap())
        })
        .collect();
    let mut bad = create_with_outputs(
        model_bytes(),
        &BundleSpec::new("magika", 2),
        &[(inputs, wrong)],
    )
    .unwrap();
    bad.sign(&key).unwrap();
    let err = store
        .install(bad.to_bytes().unwrap().as_slice())
        .unwrap_err();
    assert_eq!(err.error_kind(), ErrorKind::GoldenMismatch, "{err}");

    // Tampered, unsigned, signed by a stranger, too big for the quota.
    let good2 = signed_with(&key, BundleSpec::new("magika", 2));
    let mut tampered = good2.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 1;
    assert_eq!(
        store.install(tampered.as_slice()).unwrap_err().error_kind(),
        ErrorKind::FileMismatch
    );
    let stranger = signed_with(&KeyPair::generate().unwrap(), BundleSpec::new("magika", 2));
    assert_eq!(
        store.install(stranger.as_slice()).unwrap_err().error_kind(),
        ErrorKind::Signature
    );
    let small = open_store(
        dir.path(),
        &key,
        StoreOptions::default().quota_bytes(good2.len() as u64),
    );
    assert_eq!(
        small.install(good2.as_slice()).unwrap_err().error_kind(),
        ErrorKind::TooLarge
    );

    assert_eq!(store.status().unwrap(), before);
    assert_eq!(files_in(&dir.path().join("bundles/magika")), ["1.tern"]);
    assert_eq!(store.active("magika").unwrap().0, 1);

    // A bundle corrupted on disk after install is caught when it is loaded.
    store.install(good2.as_slice()).unwrap();
    store.activate("magika", 2).unwrap();
    let path = store.bundle_path("magika", 2);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    assert_eq!(
        store.active("magika").unwrap_err().error_kind(),
        ErrorKind::FileMismatch
    );
    assert_eq!(store.rollback("magika").unwrap(), 1);
    store.active("magika").unwrap();
}

#[test]
fn opening_a_store_clears_what_an_interrupted_change_left() {
    let key = KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open_store(dir.path(), &key, StoreOptions::default());
        for n in [1, 2] {
            store
                .install(signed_with(&key, BundleSpec::new("magika", n)).as_slice())
                .unwrap();
            store.activate("magika", n).unwrap();
        }
    }
    let folder = dir.path().join("bundles/magika");
    // Killed mid-write (a temporary file), between rename and state (an unlisted bundle),
    // and a file lost under the store (the active version's).
    std::fs::write(folder.join(".3.tern.999.tmp"), b"half").unwrap();
    std::fs::write(dir.path().join(".state.json.999.tmp"), b"{").unwrap();
    std::fs::copy(folder.join("2.tern"), folder.join("3.tern")).unwrap();
    std::fs::remove_file(folder.join("2.tern")).unwrap();

    let store = open_store(dir.path(), &key, StoreOptions::default());
    let s = magika_state(&store);
    assert_eq!((s.active, s.previous), (Some(1), None), "{s:?}");
    assert_eq!(s.installed.iter().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!(s.highest, 2, "the floor survives");
    assert_eq!(files_in(&folder), ["1.tern"]);
    assert!(!files_in(dir.path()).iter().any(|f| f.ends_with(".tmp")));
    store.active("magika").unwrap();
}

#[test]
fn a_version_that_keeps_dying_while_loading_is_quarantined_and_the_previous_one_returns() {
    let key = KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), &key, StoreOptions::default());
    for v in [1, 2] {
        store
            .install(signed_with(&key, BundleSpec::new("magika", v)).as_slice())
            .unwrap();
        store.activate("magika", v).unwrap();
    }

    // A load that finishes leaves nothing behind.
    let loaded = store.load("magika").unwrap();
    assert_eq!((loaded.version, loaded.golden.samples), (2, 2));
    assert!(loaded.events.is_empty());
    let s = magika_state(&store);
    assert_eq!((s.loading, s.crashes.len()), (None, 0));

    // A load dropped unfinished is what a process killed mid-load leaves: the breadcrumb.
    drop(store.begin_load("magika").unwrap());
    assert_eq!(magika_state(&store).loading, Some(2));
    // A second handle on the store (another process) sees the first crash; still version 2.
    let other = open_store(dir.path(), &key, StoreOptions::default());
    let second = other.begin_load("magika").unwrap();
    assert_eq!(second.version(), 2);
    assert_eq!(
        second.events(),
        [StoreEvent::CrashDetected {
            name: "magika".into(),
            version: 2,
            crashes: 1
        }]
    );
    // While `second` is loading, a third load is concurrent, not a sign of a crash.
    let third = store.begin_load("magika").unwrap();
    assert!(third.events().is_empty(), "{:?}", third.events());
    drop(third);
    drop(second);

    // The second death: version 2 is quarantined and version 1 serves.
    let loaded = store.load("magika").unwrap();
    assert_eq!(loaded.version, 1);
    assert_eq!(
        loaded.events,
        [
            StoreEvent::CrashDetected {
                name: "magika".into(),
                version: 2,
                crashes: 2
            },
            StoreEvent::Quarantined {
                name: "magika".into(),
                version: 2
            },
            StoreEvent::RolledBack {
                name: "magika".into(),
                from: 2,
                to: 1
            },
        ]
    );
    let s = magika_state(&store);
    assert_eq!((s.active, s.previous, s.loading), (Some(1), None, None));
    assert_eq!(s.quarantined.keys().copied().collect::<Vec<_>>(), [2]);

    // A quarantined version is never activated or installed again; a newer one is.
    let err = store.activate("magika", 2).unwrap_err();
    assert_eq!(err.error_kind(), ErrorKind::Quarantined, "{err}");
    let err = store
        .install(signed_with(&key, BundleSpec::new("magika", 2)).as_slice())
        .unwrap_err();
    assert_eq!(err.error_kind(), ErrorKind::Quarantined, "{err}");
    store
        .install(signed_with(&key, BundleSpec::new("magika", 3)).as_slice())
        .unwrap();
    store.activate("magika", 3).unwrap();
    assert_eq!(store.load("magika").unwrap().version, 3);

    // Version 3 loaded well once (its count starts again), then dies twice: back to 1.
    drop(store.begin_load("magika").unwrap());
    drop(store.begin_load("magika").unwrap());
    assert_eq!(store.load("magika").unwrap().version, 1);
    // With nothing to roll back to, a crash loop leaves no active model: a typed error.
    drop(store.begin_load("magika").unwrap());
    drop(store.begin_load("magika").unwrap());
    let err = store.load("magika").unwrap_err();
    assert_eq!(err.error_kind(), ErrorKind::Quarantined, "{err}");
    let s = magika_state(&store);
    assert_eq!(s.active, None);
    assert_eq!(s.quarantined.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
}

#[test]
fn a_load_that_fails_without_dying_is_not_a_crash() {
    let key = KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), &key, StoreOptions::default());
    store
        .install(signed_with(&key, BundleSpec::new("magika", 1)).as_slice())
        .unwrap();
    store.activate("magika", 1).unwrap();
    // Corrupt the active bundle on disk: the load is a typed error, three times over, and
    // the version is not quarantined for it.
    let path = store.bundle_path("magika", 1);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    for _ in 0..3 {
        let err = store.load("magika").unwrap_err();
        assert_ne!(err.error_kind(), ErrorKind::Quarantined, "{err}");
    }
    let s = magika_state(&store);
    assert_eq!(
        (s.loading, s.crashes.len(), s.quarantined.len()),
        (None, 0, 0)
    );
    assert_eq!(
        store.load("nothing").unwrap_err().error_kind(),
        ErrorKind::NotInstalled
    );
}

// ---- staged rollout ----

/// Magika with one class's logit raised by 1000 before the softmax: a "retrained" model
/// that always answers that class — the least likely one for the first sample.
fn biased_magika() -> Vec<u8> {
    let bytes = model_bytes();
    let session = Session::new(&Model::from_bytes(&bytes).unwrap(), cpu()).unwrap();
    let probs = session.run(samples(1).remove(0)).unwrap();
    let p = probs
        .get("target_label")
        .unwrap()
        .as_slice::<f32>()
        .unwrap();
    let class = (0..p.len()).min_by(|a, b| p[*a].total_cmp(&p[*b])).unwrap();
    let mut proto = tern::onnx::decode(&bytes).unwrap();
    let graph = proto.graph.as_mut().unwrap();
    let bias = graph
        .initializer
        .iter_mut()
        .find(|t| t.name.ends_with("Dense_1/Reshape:0"))
        .expect("magika's last bias");
    if bias.raw_data.is_empty() {
        bias.float_data[class] += 1000.0;
    } else {
        let at = class * 4;
        let v = f32::from_le_bytes(bias.raw_data[at..at + 4].try_into().unwrap()) + 1000.0;
        bias.raw_data[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    tern::onnx::encode(&proto)
}

fn signed_model(key: &KeyPair, model: Vec<u8>, version: u64) -> Vec<u8> {
    let mut bundle = create(
        model,
        &BundleSpec::new("magika", version),
        &samples(2),
        cpu(),
    )
    .unwrap();
    bundle.sign(key).unwrap();
    bundle.to_bytes().unwrap()
}

/// A store with version 1 active and `candidate` installed as version 2 and staged.
fn staged(dir: &std::path::Path, candidate: Vec<u8>) -> ModelStore {
    let key = KeyPair::generate().unwrap();
    let store = open_store(dir, &key, StoreOptions::default());
    store
        .install(signed_with(&key, BundleSpec::new("magika", 1)).as_slice())
        .unwrap();
    store.activate("magika", 1).unwrap();
    store
        .install(signed_model(&key, candidate, 2).as_slice())
        .unwrap();
    store.stage("magika", 2).unwrap();
    store
}

type Events = std::sync::Arc<std::sync::Mutex<Vec<RolloutEvent>>>;

fn recorder() -> (Events, tern_bundle::VerdictHook) {
    let events = Events::default();
    let sink = events.clone();
    (
        events,
        Box::new(move |e: &RolloutEvent| sink.lock().unwrap().push(e.clone())),
    )
}

/// Health bounds with a latency bound no run here meets: latency verdicts are tested with
/// given durations (verdicts_follow_the_policy); a p95 over the few timed runs of these
/// tests on a busy machine bounds nothing.
fn health(min_requests: u64, promote_after: Option<u64>) -> HealthPolicy {
    let mut h = HealthPolicy::default();
    h.max_p95_ratio = 1000.0;
    h.min_requests = min_requests;
    h.promote_after = promote_after;
    h
}

#[test]
fn a_shadowed_candidate_that_agrees_is_promoted_by_its_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let store = staged(dir.path(), model_bytes());
    assert_eq!(magika_state(&store).candidate, Some(2));
    let policy = RolloutPolicy::new(Stage::Shadow { sample: 0.5 }).health(health(10, Some(20)));
    let (events, hook) = recorder();
    let rollout = store
        .rollout("magika", Some(policy), "device-1", Some(hook))
        .unwrap();
    assert_eq!(rollout.versions(), (1, 2));

    let inputs = samples(4);
    let mut served = Vec::new();
    for i in 0..60 {
        let s = rollout.run(inputs[i % 4].clone(), None).unwrap();
        served.push((s.arm, s.version));
        rollout.wait_for_shadows();
    }
    // The active version answers until 20 shadowed runs (of every second request) agreed.
    assert!(
        served[..40].iter().all(|s| *s == (Arm::Active, 1)),
        "{served:?}"
    );
    assert!(
        served[40..].iter().all(|s| *s == (Arm::Candidate, 2)),
        "{served:?}"
    );
    let h = rollout.health();
    // Recorded until the verdict.
    assert_eq!(
        (h.compared, h.agreed, h.candidate.runs, h.candidate.errors),
        (20, 20, 20, 0)
    );
    assert_eq!(rollout.verdict(), Verdict::Promote);
    let events = events.lock().unwrap().clone();
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].verdict, events[0].candidate_runs),
        (Verdict::Promote, 20)
    );

    // The store applied the verdict: 2 is active, 1 is kept to roll back to.
    let s = magika_state(&store);
    assert_eq!(
        (s.active, s.previous, s.candidate),
        (Some(2), Some(1), None)
    );
    assert_eq!(store.load("magika").unwrap().version, 2);
}

#[test]
fn a_shadowed_candidate_that_disagrees_is_rolled_back_and_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let store = staged(dir.path(), biased_magika());
    let policy = RolloutPolicy::new(Stage::Shadow { sample: 1.0 }).health(health(10, Some(1000)));
    let (events, hook) = recorder();
    let rollout = store
        .rollout("magika", Some(policy), "device-1", Some(hook))
        .unwrap();
    let inputs = samples(10);
    for i in 0..30 {
        let s = rollout.run(inputs[i % 10].clone(), None).unwrap();
        assert_eq!((s.arm, s.version), (Arm::Active, 1));
        rollout.wait_for_shadows();
    }
    let Verdict::RollBack(RollbackReason::Disagreement { agreement }) = rollout.verdict() else {
        panic!("{:?}", rollout.verdict());
    };
    assert!(agreement < 0.95, "{agreement}");
    assert_eq!(
        rollout.health().compared,
        10,
        "no shadow runs after the verdict"
    );
    assert_eq!(events.lock().unwrap().len(), 1);

    let s = magika_state(&store);
    assert_eq!((s.active, s.candidate), (Some(1), None));
    assert!(matches!(
        s.quarantined.get(&2),
        Some(QuarantineReason::Rollout {
            rollback: RollbackReason::Disagreement { .. }
        })
    ));
    for err in [store.activate("magika", 2), store.stage("magika", 2)] {
        assert_eq!(err.unwrap_err().error_kind(), ErrorKind::Quarantined);
    }
    let err = store
        .rollout("magika", Some(policy), "device-1", None)
        .unwrap_err();
    assert_eq!(
        err.error_kind(),
        ErrorKind::NotInstalled,
        "no candidate: {err}"
    );
}

fn magika_version(version: u64, options: SessionOptions) -> tern_bundle::rollout::Version {
    let model = Model::from_bytes(&model_bytes()).unwrap();
    tern_bundle::rollout::Version {
        version,
        session: Session::new(&model, options).unwrap(),
    }
}

#[test]
fn a_failing_canary_costs_callers_nothing_and_is_rolled_back_on_its_error_rate() {
    // The candidate's runs all fail: it may hold 1 KiB of values at once.
    let candidate = magika_version(2, cpu().memory_limit(1024));
    let policy = RolloutPolicy::new(Stage::Canary {
        share: 0.25,
        unit: CanaryUnit::Request,
    })
    .health(health(5, None));
    let (events, hook) = recorder();
    let rollout = Rollout::new(
        "magika",
        magika_version(1, cpu()),
        candidate,
        policy,
        "d",
        Some(hook),
    )
    .unwrap();
    let inputs = samples(1).remove(0);
    for _ in 0..40 {
        // Every caller gets the active version's answer.
        let s = rollout.run(inputs.clone(), None).unwrap();
        assert_eq!((s.arm, s.version), (Arm::Active, 1));
    }
    let h = rollout.health();
    // A quarter of the first 20 requests went to the candidate (each answered by the
    // active version after the candidate failed); then it was rolled back, and health is
    // recorded until the verdict.
    assert_eq!(
        (h.candidate.runs, h.candidate.errors, h.active.runs),
        (5, 5, 20)
    );
    assert!(matches!(
        rollout.verdict(),
        Verdict::RollBack(RollbackReason::ErrorRate { candidate, active }) if candidate == 1.0 && active == 0.0
    ));
    assert_eq!(events.lock().unwrap().len(), 1);
}

#[test]
fn canaries_and_ab_arms_split_by_share_and_stay_sticky() {
    let inputs = samples(1).remove(0);
    let rollout = |stage, install: &str| {
        let policy = RolloutPolicy::new(stage).health(health(1_000_000, None));
        Rollout::new(
            "magika",
            magika_version(1, cpu()),
            magika_version(2, cpu()),
            policy,
            install,
            None,
        )
        .unwrap()
    };
    // By request: exactly the share.
    let r = rollout(
        Stage::Canary {
            share: 0.25,
            unit: CanaryUnit::Request,
        },
        "d",
    );
    let arms: Vec<Arm> = (0..20)
        .map(|_| r.run(inputs.clone(), None).unwrap().arm)
        .collect();
    assert_eq!(arms.iter().filter(|a| **a == Arm::Candidate).count(), 5);

    // By device: all of a device's requests or none; about the share of devices.
    let mut in_canary = 0;
    for d in 0..40 {
        let r = rollout(
            Stage::Canary {
                share: 0.5,
                unit: CanaryUnit::Device,
            },
            &format!("device-{d}"),
        );
        let arms: Vec<Arm> = (0..3)
            .map(|_| r.run(inputs.clone(), None).unwrap().arm)
            .collect();
        assert!(arms.iter().all(|a| *a == arms[0]), "{arms:?}");
        in_canary += usize::from(arms[0] == Arm::Candidate);
    }
    assert!((10..=30).contains(&in_canary), "{in_canary} of 40 devices");

    // A/B: a user keeps an arm across requests (and across rollout objects).
    let a = rollout(Stage::Ab { share: 0.5 }, "d");
    let b = rollout(Stage::Ab { share: 0.5 }, "other-device");
    let mut candidates = 0;
    for u in 0..40 {
        let user = format!("user-{u}");
        let arm = a.run(inputs.clone(), Some(&user)).unwrap().arm;
        assert_eq!(b.run(inputs.clone(), Some(&user)).unwrap().arm, arm);
        assert_eq!(a.run(inputs.clone(), Some(&user)).unwrap().arm, arm);
        candidates += usize::from(arm == Arm::Candidate);
    }
    assert!((10..=30).contains(&candidates), "{candidates} of 40 users");
}

#[test]
fn shadow_runs_never_queue_up_behind_requests() {
    let policy = RolloutPolicy::new(Stage::Shadow { sample: 0.5 }).health(health(1_000, None));
    let rollout = Rollout::new(
        "magika",
        magika_version(1, cpu()),
        magika_version(2, cpu()),
        policy,
        "d",
        None,
    )
    .unwrap();
    let inputs = samples(1).remove(0);
    // Requests as fast as they come, from two threads: a shadow run that finds the shadow
    // thread busy is skipped, never waited for; every one is either compared or skipped.
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..25 {
                    assert_eq!(rollout.run(inputs.clone(), None).unwrap().arm, Arm::Active);
                }
            });
        }
    });
    rollout.wait_for_shadows();
    let h = rollout.health();
    assert_eq!(h.active.runs, 50);
    assert_eq!(h.compared + h.shadow_skipped, 25, "{h:?}");
    assert_eq!((h.agreed, h.candidate.runs), (h.compared, h.compared));
    eprintln!("{} shadowed, {} skipped", h.compared, h.shadow_skipped);
}

/// Collects what an upload pass sends.
#[derive(Default)]
struct Collect(std::sync::Mutex<Vec<String>>);

impl tern::telemetry::Uploader for Collect {
    fn upload(&self, batch: &tern::telemetry::UploadBatch) -> tern::telemetry::UploadResult {
        let mut seen = self.0.lock().unwrap();
        seen.extend(batch.payloads.iter().map(|p| p.json.clone()));
        tern::telemetry::UploadResult::Accepted
    }
}

#[test]
fn lifecycle_decisions_are_telemetry_events_and_spans_name_the_bundle_and_arm() {
    let dir = tempfile::tempdir().unwrap();
    let buffer = tern::Telemetry::open(dir.path().join("telemetry"), Default::default()).unwrap();
    let key = KeyPair::generate().unwrap();
    let trust = Trust::new([key.public()], 1).unwrap();
    let options = StoreOptions::default().session(cpu().telemetry(buffer.clone()));
    let store = ModelStore::open(dir.path().join("store"), trust, options).unwrap();
    for v in [1, 2] {
        store
            .install(signed_with(&key, BundleSpec::new("magika", v)).as_slice())
            .unwrap();
    }
    store.activate("magika", 1).unwrap();
    store.stage("magika", 2).unwrap();
    let policy = RolloutPolicy::new(Stage::Canary {
        share: 0.5,
        unit: CanaryUnit::Request,
    })
    .health(health(2, Some(4)));
    let rollout = store.rollout("magika", Some(policy), "d", None).unwrap();
    let inputs = samples(1).remove(0);
    for _ in 0..8 {
        rollout.run(inputs.clone(), None).unwrap();
    }
    assert_eq!(rollout.verdict(), Verdict::Promote);
    // A refused bundle: signed by a stranger.
    let stranger = KeyPair::generate().unwrap();
    let err = store
        .install(signed_with(&stranger, BundleSpec::new("magika", 3)).as_slice())
        .unwrap_err();
    assert_eq!(err.error_kind(), ErrorKind::Signature);
    drop(rollout);
    buffer.flush().unwrap();
    let sink = Collect::default();
    buffer.upload_pending(&sink).unwrap();
    let text = sink.0.lock().unwrap().join("\n");
    let bodies: Vec<&str> = text
        .split("\"body\":{\"stringValue\":\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .collect();
    for event in [
        "tern.model.installed",
        "tern.model.activated",
        "tern.rollout.started",
        "tern.rollout.verdict",
        "tern.model.install_refused",
    ] {
        assert!(bodies.contains(&event), "{event} not in {bodies:?}");
    }
    assert!(text.contains("\"stringValue\":\"promote\""), "{text}");
    assert!(text.contains("\"stringValue\":\"signature\""), "{text}");
    // Spans: the bundle's name and version, the arm, and golden checks marked as such.
    for attr in [
        r#"{"key":"tern.model.version","value":{"stringValue":"2"}}"#,
        r#"{"key":"tern.rollout.arm","value":{"stringValue":"candidate"}}"#,
        r#"{"key":"tern.rollout.arm","value":{"stringValue":"active"}}"#,
        r#"{"key":"tern.purpose","value":{"stringValue":"golden_check"}}"#,
    ] {
        assert!(text.contains(attr), "{attr} not in the upload");
    }
}

#[test]
fn a_policy_in_the_signed_manifest_drives_the_rollout_when_the_app_sets_none() {
    let key = KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), &key, StoreOptions::default());
    store
        .install(signed_with(&key, BundleSpec::new("magika", 1)).as_slice())
        .unwrap();
    store.activate("magika", 1).unwrap();
    // Version 2 says: canary on a quarter of requests, promote after 5 healthy runs.
    let policy = RolloutPolicy::new(Stage::Canary {
        share: 0.25,
        unit: CanaryUnit::Request,
    })
    .health(health(2, Some(5)));
    let spec = BundleSpec::new("magika", 2).rollout(policy);
    let mut bundle = create(model_bytes(), &spec, &samples(2), cpu()).unwrap();
    bundle.sign(&key).unwrap();
    let bytes = bundle.to_bytes().unwrap();
    let read = Bundle::from_reader(bytes.as_slice(), &trusting(&key)).unwrap();
    assert_eq!(
        read.manifest().rollout,
        Some(policy),
        "signed and read back"
    );
    store.install(bytes.as_slice()).unwrap();
    store.stage("magika", 2).unwrap();
    let rollout = store.rollout("magika", None, "d", None).unwrap();
    let inputs = samples(1).remove(0);
    let arms: Vec<Arm> = (0..24)
        .map(|_| rollout.run(inputs.clone(), None).unwrap().arm)
        .collect();
    assert_eq!(
        arms[..4],
        [Arm::Active, Arm::Active, Arm::Active, Arm::Candidate]
    );
    assert_eq!(rollout.verdict(), Verdict::Promote);
    assert_eq!(magika_state(&store).active, Some(2));

    // A candidate without a policy, and none from the app: a typed refusal.
    store
        .install(signed_with(&key, BundleSpec::new("magika", 3)).as_slice())
        .unwrap();
    store.stage("magika", 3).unwrap();
    let err = store.rollout("magika", None, "d", None).unwrap_err();
    assert_eq!(err.error_kind(), ErrorKind::InvalidOption, "{err}");
    // A policy out of bounds is refused when the bundle is made.
    let bad = RolloutPolicy::new(Stage::Ab { share: 2.0 });
    let err = create(
        model_bytes(),
        &BundleSpec::new("magika", 4).rollout(bad),
        &[],
        cpu(),
    )
    .unwrap_err();
    assert_eq!(err.error_kind(), ErrorKind::InvalidOption, "{err}");
}
