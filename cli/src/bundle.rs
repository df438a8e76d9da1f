//! `tern bundle keygen | create | sign | verify | inspect`: signed model bundles
//! (`tern-bundle`); `init-repo | rotate-root | publish`: the update repository. Each
//! command reports JSON with `--json`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use tern::{Session, Tensor};
use tern_bundle::repo::{self, Role, RootSpec};
use tern_bundle::{Bundle, BundleSpec, KeyPair, PublicKey, Trust, VerifyOptions};

use crate::SessionArgs;

/// What `tern bundle` does.
#[derive(Subcommand)]
pub enum BundleAction {
    /// Make an ed25519 key pair: KEY (private, mode 0600) and KEY.pub (the public key a
    /// device trusts, in TUF's key format).
    Keygen {
        /// Where to write the key pair (never overwritten).
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Build a bundle from an ONNX model: manifest, model and golden samples (the outputs
    /// this build of tern gives for the sample inputs), signed with each --key.
    Create {
        /// The ONNX model (external data files it names, next to it, go into the bundle).
        model: PathBuf,
        /// The bundle's model name.
        #[arg(long)]
        name: String,
        /// The bundle's version (a store never goes down in version).
        #[arg(long)]
        version: u64,
        /// Where to write the bundle.
        #[arg(long, short)]
        out: PathBuf,
        /// A golden sample's inputs as NAME=FILE,NAME=FILE (.npy or .json); repeat per sample.
        #[arg(long)]
        sample: Vec<String>,
        /// Seeded random golden samples, when no --sample is given.
        #[arg(long, default_value_t = 2)]
        random_samples: u64,
        /// Size of a symbolic dimension for random samples, as SYMBOL=N (default 1).
        #[arg(long)]
        dim: Vec<String>,
        /// Days the signed manifest stays valid.
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
        /// The model's licence.
        #[arg(long)]
        licence: Option<String>,
        /// The oldest tern that may run it (default: this version).
        #[arg(long)]
        min_tern: Option<String>,
        /// Golden absolute tolerance.
        #[arg(long, default_value_t = 1e-4)]
        atol: f64,
        /// Golden relative tolerance.
        #[arg(long, default_value_t = 1e-3)]
        rtol: f64,
        /// Sign with this key pair file. Repeatable.
        #[arg(long)]
        key: Vec<PathBuf>,
        #[command(flatten)]
        rollout: BundleRollout,
    },
    /// Add signatures to a bundle (its files are checked against its manifest first).
    Sign {
        /// The bundle.
        bundle: PathBuf,
        /// A key pair file. Repeatable.
        #[arg(long, required = true)]
        key: Vec<PathBuf>,
        /// Write the signed bundle here (default: in place, atomically).
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Verify a bundle as a device would: signatures by trusted keys, expiry, version,
    /// tern version, every file's length and hash; then (--golden) its golden samples on
    /// this machine's backend.
    Verify {
        /// The bundle.
        bundle: PathBuf,
        /// A trusted public key file. Repeatable.
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        /// How many of the trusted keys must have signed.
        #[arg(long, default_value_t = 1)]
        threshold: usize,
        /// Refuse a version lower than this one (the installed version).
        #[arg(long)]
        installed_version: Option<u64>,
        /// Also run the golden samples and compare within the bundle's tolerances.
        #[arg(long)]
        golden: bool,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Show a bundle's manifest, signatures and files (files are checked against the
    /// manifest; signatures are listed, not trusted).
    Inspect {
        /// The bundle.
        bundle: PathBuf,
    },
    /// Create an update repository (TUF's layout, static files) with its first root,
    /// signed by each --sign key (the root role's private keys).
    InitRepo {
        /// The repository's directory.
        dir: PathBuf,
        #[command(flatten)]
        roles: RootRoles,
    },
    /// Rotate the repository's root keys: a new root (version + 1), signed by --sign keys
    /// holding the threshold of both the current root keys and the new ones.
    RotateRoot {
        /// The repository's directory.
        dir: PathBuf,
        #[command(flatten)]
        roles: RootRoles,
    },
    /// Publish bundles: copy them under targets/ and write new targets, snapshot and
    /// timestamp metadata (in that order), each signed by its role's key.
    Publish {
        /// The repository's directory.
        dir: PathBuf,
        /// Bundles to add.
        bundle: Vec<PathBuf>,
        /// The targets role's key pair. Repeatable.
        #[arg(long, required = true)]
        targets_key: Vec<PathBuf>,
        /// The snapshot role's key pair. Repeatable.
        #[arg(long, required = true)]
        snapshot_key: Vec<PathBuf>,
        /// The timestamp role's key pair. Repeatable.
        #[arg(long, required = true)]
        timestamp_key: Vec<PathBuf>,
        /// Days the targets metadata stays valid.
        #[arg(long, default_value_t = 90)]
        targets_days: u64,
        /// Days the snapshot stays valid.
        #[arg(long, default_value_t = 7)]
        snapshot_days: u64,
        /// Hours the timestamp stays valid (re-publish before then).
        #[arg(long, default_value_t = 24)]
        timestamp_hours: u64,
    },
}

/// The rollout policy a bundle carries in its signed manifest (devices follow it when their
/// app sets none).
#[derive(clap::Args)]
pub struct BundleRollout {
    /// The stage (without it, the bundle carries no policy).
    #[arg(long, value_enum)]
    rollout_stage: Option<crate::store::StageKind>,
    /// The share of requests, devices or users.
    #[arg(long, default_value_t = 0.1)]
    rollout_share: f64,
    /// Candidate runs before any verdict.
    #[arg(long, default_value_t = 100)]
    rollout_min_requests: u64,
    /// Healthy candidate runs after which it is promoted (0: the app promotes).
    #[arg(long, default_value_t = 1000)]
    rollout_promote_after: u64,
    /// Roll back below this share of agreeing shadow runs.
    #[arg(long, default_value_t = 0.95)]
    rollout_min_agreement: f64,
    /// Roll back above the active version's p95 latency times this.
    #[arg(long, default_value_t = 1.5)]
    rollout_max_p95_ratio: f64,
}

impl BundleRollout {
    fn policy(&self) -> Option<tern_bundle::RolloutPolicy> {
        let stage = self.rollout_stage?;
        let mut health = tern_bundle::HealthPolicy::default();
        health.min_requests = self.rollout_min_requests;
        health.promote_after =
            (self.rollout_promote_after > 0).then_some(self.rollout_promote_after);
        health.min_agreement = self.rollout_min_agreement;
        health.max_p95_ratio = self.rollout_max_p95_ratio;
        Some(crate::store::policy(
            stage,
            self.rollout_share,
            tern_bundle::Agreement::TopClass,
            health,
        ))
    }
}

/// The keys of a root: public keys per role, and the root keys that sign it.
#[derive(clap::Args)]
pub struct RootRoles {
    /// A root role public key file. Repeatable.
    #[arg(long, required = true)]
    root_pub: Vec<PathBuf>,
    /// How many root keys must sign a root.
    #[arg(long, default_value_t = 1)]
    root_threshold: u64,
    /// A targets role public key file. Repeatable.
    #[arg(long, required = true)]
    targets_pub: Vec<PathBuf>,
    /// A snapshot role public key file. Repeatable.
    #[arg(long, required = true)]
    snapshot_pub: Vec<PathBuf>,
    /// A timestamp role public key file. Repeatable.
    #[arg(long, required = true)]
    timestamp_pub: Vec<PathBuf>,
    /// Days the root stays valid.
    #[arg(long, default_value_t = 365)]
    valid_days: u64,
    /// A key pair that signs the root. Repeatable.
    #[arg(long, required = true)]
    sign: Vec<PathBuf>,
}

impl RootRoles {
    fn spec(&self) -> Result<(RootSpec, Vec<KeyPair>)> {
        let mut roles = std::collections::BTreeMap::new();
        roles.insert(
            Role::Root,
            (trusted_keys(&self.root_pub)?, self.root_threshold),
        );
        for (role, files) in [
            (Role::Targets, &self.targets_pub),
            (Role::Snapshot, &self.snapshot_pub),
            (Role::Timestamp, &self.timestamp_pub),
        ] {
            roles.insert(role, (trusted_keys(files)?, 1));
        }
        let spec = RootSpec {
            roles,
            valid_for: Duration::from_secs(self.valid_days.saturating_mul(86_400)),
        };
        Ok((spec, key_pairs(&self.sign)?))
    }
}

fn key_pairs(paths: &[PathBuf]) -> Result<Vec<KeyPair>> {
    Ok(paths
        .iter()
        .map(|p| KeyPair::read(p))
        .collect::<tern_bundle::Result<Vec<_>>>()?)
}

/// The public keys in `paths`.
pub fn trusted_keys(paths: &[PathBuf]) -> Result<Vec<PublicKey>> {
    Ok(paths
        .iter()
        .map(|p| PublicKey::read(p))
        .collect::<tern_bundle::Result<Vec<_>>>()?)
}

/// Runs one `tern bundle` action; returns the JSON document it reports.
pub fn run(action: &BundleAction) -> Result<serde_json::Value> {
    match action {
        BundleAction::Keygen { out } => {
            let pair = KeyPair::generate()?;
            pair.write(out)?;
            let public = public_path(out);
            write_new(
                &public,
                &serde_json::to_vec_pretty(&pair.public().to_json())?,
            )?;
            Ok(serde_json::json!({
                "key": out, "public_key": public, "key_id": pair.public().key_id(),
            }))
        }
        BundleAction::Create {
            model,
            name,
            version,
            out,
            sample,
            random_samples,
            dim,
            valid_days,
            licence,
            min_tern,
            atol,
            rtol,
            key,
            rollout,
        } => {
            let files = tern::ModelFiles::read(model, 4 << 30)?;
            let loaded = files.load()?;
            let samples = if sample.is_empty() {
                let dims = crate::parse_dims(dim)?;
                (0..*random_samples)
                    .map(|seed| loaded.random_inputs(seed, &dims))
                    .collect::<tern::Result<Vec<_>>>()?
            } else {
                sample
                    .iter()
                    .map(|s| parse_sample(s))
                    .collect::<Result<_>>()?
            };
            let mut spec = BundleSpec::new(name, *version)
                .valid_for(Duration::from_secs(valid_days.saturating_mul(86_400)))
                .tolerance(*atol, *rtol);
            if let Some(l) = licence {
                spec = spec.licence(l);
            }
            if let Some(v) = min_tern {
                spec = spec.min_tern(v);
            }
            if let Some(policy) = rollout.policy() {
                spec = spec.rollout(policy);
            }
            let options = tern::SessionOptions::new().backend(tern::Backend::Cpu);
            let mut bundle = tern_bundle::create(files, &spec, &samples, options)?;
            for k in key {
                bundle.sign(&KeyPair::read(k)?)?;
            }
            bundle.write(out)?;
            Ok(describe(&bundle, Some(out)))
        }
        BundleAction::Sign { bundle, key, out } => {
            let mut read = Bundle::read(bundle, &VerifyOptions::unchecked())?;
            for k in key {
                read.sign(&KeyPair::read(k)?)?;
            }
            let target = out.as_ref().unwrap_or(bundle);
            read.write(target)?;
            Ok(describe(&read, Some(target)))
        }
        BundleAction::Verify {
            bundle,
            trust,
            threshold,
            installed_version,
            golden,
            session,
        } => {
            let keys = trusted_keys(trust)?;
            let mut options = VerifyOptions::trusting(Trust::new(keys, *threshold)?);
            if let Some(v) = installed_version {
                options = options.installed_version(*v);
            }
            let read = Bundle::read(bundle, &options)?;
            let mut doc = describe(&read, Some(bundle));
            doc["verified"] = true.into();
            if *golden {
                let model = read.model()?;
                let session = Session::new(&model, session.options()?)?;
                let report = read.check_golden(&session)?;
                doc["golden"] = serde_json::json!({
                    "backend": session.backend(),
                    "samples": report.samples,
                    "worst_share_of_tolerance": report.worst_share(),
                    "outputs": report.outputs,
                });
            }
            Ok(doc)
        }
        BundleAction::Inspect { bundle } => {
            let read = Bundle::read(bundle, &VerifyOptions::unchecked())?;
            Ok(describe(&read, Some(bundle)))
        }
        BundleAction::InitRepo { dir, roles } => {
            let (spec, signers) = roles.spec()?;
            let root = repo::init(dir, &spec, &signers)?;
            Ok(serde_json::json!({ "repository": dir, "root_version": root.version, "root": root }))
        }
        BundleAction::RotateRoot { dir, roles } => {
            let (spec, signers) = roles.spec()?;
            let root = repo::rotate_root(dir, &spec, &signers)?;
            Ok(serde_json::json!({ "repository": dir, "root_version": root.version, "root": root }))
        }
        BundleAction::Publish {
            dir,
            bundle,
            targets_key,
            snapshot_key,
            timestamp_key,
            targets_days,
            snapshot_days,
            timestamp_hours,
        } => {
            let (t, s, ts) = (
                key_pairs(targets_key)?,
                key_pairs(snapshot_key)?,
                key_pairs(timestamp_key)?,
            );
            let signers = repo::Signers {
                targets: &t,
                snapshot: &s,
                timestamp: &ts,
            };
            let mut validity = repo::Validity::default();
            validity.targets = Duration::from_secs(targets_days.saturating_mul(86_400));
            validity.snapshot = Duration::from_secs(snapshot_days.saturating_mul(86_400));
            validity.timestamp = Duration::from_secs(timestamp_hours.saturating_mul(3_600));
            let published = repo::publish(dir, bundle, signers, validity)?;
            Ok(serde_json::json!({ "repository": dir, "published": published }))
        }
    }
}

/// Prints a report: the JSON document, or a few lines for people.
pub fn print(doc: &serde_json::Value, json: bool) {
    if json {
        println!("{doc}");
        return;
    }
    if let Some(id) = doc.get("key_id") {
        println!("key id {}", id.as_str().unwrap_or_default());
        println!("wrote {} and {}", doc["key"], doc["public_key"]);
        return;
    }
    let m = &doc["manifest"];
    println!(
        "{} version {} ({} file(s), {} bytes), expires {}, tern ≥ {}",
        m["name"].as_str().unwrap_or_default(),
        m["version"],
        m["files"].as_object().map_or(0, |f| f.len()),
        doc["bytes"],
        m["expires"].as_str().unwrap_or_default(),
        m["min_tern"].as_str().unwrap_or_default()
    );
    let signers: Vec<&str> = doc["signed_by"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    println!(
        "signatures: {}",
        if signers.is_empty() {
            "none".to_string()
        } else {
            signers.join(", ")
        }
    );
    if doc.get("verified").is_some() {
        println!("verified: signatures, expiry, version and every file's length and SHA-256");
    }
    if let Some(g) = doc.get("golden") {
        println!(
            "golden: {} sample(s) within tolerance on {} (worst at {:.3} of the allowed difference)",
            g["samples"],
            g["backend"].as_str().unwrap_or_default(),
            g["worst_share_of_tolerance"].as_f64().unwrap_or_default()
        );
    }
}

fn describe(bundle: &Bundle, path: Option<&Path>) -> serde_json::Value {
    let bytes = bundle.manifest().total_length();
    serde_json::json!({
        "path": path,
        "bytes": bytes,
        "manifest": bundle.manifest(),
        "signed_by": bundle.signatures().iter().map(|s| s.keyid.clone()).collect::<Vec<_>>(),
    })
}

/// `KEY` → `KEY.pub`.
fn public_path(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// `NAME=FILE,NAME=FILE` → one sample's inputs.
fn parse_sample(spec: &str) -> Result<Vec<(String, Tensor)>> {
    spec.split(',')
        .map(|part| {
            let (name, file) = part
                .split_once('=')
                .with_context(|| format!("--sample {spec}: use NAME=FILE,NAME=FILE"))?;
            Ok((
                name.to_string(),
                crate::tensor_io::read_tensor(file.as_ref())?,
            ))
        })
        .collect()
}
