//! `tern store install | status | activate | rollback | load | update | stage | rollout`:
//! the on-device model store (`tern_bundle::ModelStore`), each command reporting JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use tern_bundle::{
    Agreement, Arm, CanaryUnit, HealthPolicy, ModelStore, RolloutPolicy, Stage, StoreOptions,
    Trust, UpdateOutcome, Updater,
};

use crate::bundle::trusted_keys;
use crate::SessionArgs;

/// Where the store is and whom it trusts.
#[derive(clap::Args)]
pub struct StoreArgs {
    /// The store's directory (created if needed).
    #[arg(long)]
    dir: PathBuf,
    /// A trusted public key file. Repeatable.
    #[arg(long, required = true)]
    trust: Vec<PathBuf>,
    /// How many of the trusted keys must have signed.
    #[arg(long, default_value_t = 1)]
    threshold: usize,
    /// Versions kept per model (active and previous included).
    #[arg(long, default_value_t = 3)]
    keep: usize,
    /// Bytes all bundles may take together.
    #[arg(long, default_value_t = 1 << 30)]
    quota_bytes: u64,
}

/// What `tern store` does.
#[derive(Subcommand)]
pub enum StoreAction {
    /// Verify a bundle, run its golden samples on this device, and store it (atomically).
    Install {
        /// The bundle.
        bundle: PathBuf,
        /// Make it the active version once installed.
        #[arg(long)]
        activate: bool,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Each model's installed, active and previous versions.
    Status,
    /// Make an installed version active.
    Activate {
        /// The model.
        name: String,
        /// The version.
        version: u64,
    },
    /// Go back to the previous version.
    Rollback {
        /// The model.
        name: String,
    },
    /// Load the active version as an app would (under the crash breadcrumb: a version the
    /// process died loading twice is quarantined and the previous one returns), and run its
    /// golden samples.
    Load {
        /// The model.
        name: String,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Pull the newest version of a model from an update repository (TUF metadata verified
    /// from the root up; the bundle resumed if a download was cut), verify and golden-check
    /// it, and install it; --then stage or activate it.
    Update {
        /// The model.
        name: String,
        /// The repository: an http(s):// URL or a directory.
        #[arg(long)]
        repo: String,
        /// The repository's root metadata this device starts from (used on the first
        /// update only; later the store's newer trusted root prevails).
        #[arg(long)]
        root: PathBuf,
        /// What to do with a new version once installed.
        #[arg(long, value_enum, default_value_t = Then::Stage)]
        then: Then,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Make an installed version the candidate of the model's next rollout.
    Stage {
        /// The model.
        name: String,
        /// The version.
        version: u64,
    },
    /// Roll the staged candidate out beside the active version on this device for
    /// --requests seeded random requests: report which version answered, each arm's
    /// health and the verdict, which the store applies (promote, or quarantine).
    Rollout {
        /// The model.
        name: String,
        #[command(flatten)]
        rollout: RolloutArgs,
        #[command(flatten)]
        session: SessionArgs,
    },
}

/// `--then`: what `tern store update` does with a new version.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Then {
    /// Leave it installed.
    Install,
    /// Make it the candidate of the next rollout.
    Stage,
    /// Make it active at once.
    Activate,
}

/// How `tern store rollout` splits requests and judges the candidate.
#[derive(clap::Args)]
pub struct RolloutArgs {
    /// The stage. Without it, the policy the candidate's signed manifest carries (and the
    /// flags below are not used).
    #[arg(long, value_enum)]
    stage: Option<StageKind>,
    /// The share of requests (shadow, canary), devices (canary-device) or users (ab).
    #[arg(long, default_value_t = 0.1)]
    share: f64,
    /// This device's install id (canary-device and ab hash it).
    #[arg(long, default_value = "tern-cli")]
    install_id: String,
    /// Requests to run, with seeded random inputs.
    #[arg(long, default_value_t = 200)]
    requests: u64,
    /// Size of a symbolic dimension of the random inputs, as SYMBOL=N (default 1).
    #[arg(long)]
    dim: Vec<String>,
    /// A/B user keys the requests cycle through (without any, the device is the user).
    #[arg(long)]
    users: Option<u64>,
    /// How a shadowed answer agrees: the same top class, or every output within
    /// --atol/--rtol.
    #[arg(long, value_enum, default_value_t = AgreementKind::TopClass)]
    agreement: AgreementKind,
    /// Absolute tolerance for --agreement close.
    #[arg(long, default_value_t = 1e-4)]
    atol: f64,
    /// Relative tolerance for --agreement close.
    #[arg(long, default_value_t = 1e-3)]
    rtol: f64,
    /// Candidate runs before any verdict.
    #[arg(long, default_value_t = 100)]
    min_requests: u64,
    /// Healthy candidate runs after which it is promoted (0: never by itself).
    #[arg(long, default_value_t = 1000)]
    promote_after: u64,
    /// Roll back below this agreement share.
    #[arg(long, default_value_t = 0.95)]
    min_agreement: f64,
    /// Roll back when the candidate's p95 latency exceeds the active one's times this.
    #[arg(long, default_value_t = 1.5)]
    max_p95_ratio: f64,
    /// Roll back when the candidate's error rate exceeds the active one's by more.
    #[arg(long, default_value_t = 0.01)]
    max_error_rate_increase: f64,
}

/// `--stage`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum StageKind {
    /// The candidate runs beside the active version on --share of requests.
    Shadow,
    /// The candidate answers --share of requests.
    Canary,
    /// The candidate answers every request on --share of devices.
    CanaryDevice,
    /// Sticky arms: --share of users get the candidate.
    Ab,
}

/// `--agreement`.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum AgreementKind {
    /// The same largest entry along each float output's last axis.
    TopClass,
    /// Every output within --atol/--rtol.
    Close,
}

impl RolloutArgs {
    /// The policy these flags describe, or `None` (the bundle's) without `--stage`.
    fn policy(&self) -> Option<RolloutPolicy> {
        let stage = self.stage?;
        let agreement = match self.agreement {
            AgreementKind::TopClass => Agreement::TopClass,
            AgreementKind::Close => Agreement::Close {
                atol: self.atol,
                rtol: self.rtol,
            },
        };
        let mut health = HealthPolicy::default();
        health.min_requests = self.min_requests;
        health.promote_after = (self.promote_after > 0).then_some(self.promote_after);
        health.min_agreement = self.min_agreement;
        health.max_p95_ratio = self.max_p95_ratio;
        health.max_error_rate_increase = self.max_error_rate_increase;
        Some(policy(stage, self.share, agreement, health))
    }
}

/// A rollout policy from the CLI's stage and share (the one conversion `tern store rollout`
/// and `tern bundle create --rollout-stage` share).
pub fn policy(
    stage: StageKind,
    share: f64,
    agreement: Agreement,
    health: HealthPolicy,
) -> RolloutPolicy {
    let stage = match stage {
        StageKind::Shadow => Stage::Shadow { sample: share },
        StageKind::Canary => Stage::Canary {
            share,
            unit: CanaryUnit::Request,
        },
        StageKind::CanaryDevice => Stage::Canary {
            share,
            unit: CanaryUnit::Device,
        },
        StageKind::Ab => Stage::Ab { share },
    };
    RolloutPolicy::new(stage)
        .agreement(agreement)
        .health(health)
}

/// Runs one `tern store` action; returns the JSON document it reports.
pub fn store(args: &StoreArgs, action: &StoreAction) -> Result<serde_json::Value> {
    let keys = trusted_keys(&args.trust)?;
    let mut options = StoreOptions::default()
        .keep(args.keep)
        .quota_bytes(args.quota_bytes);
    if let StoreAction::Install { session, .. }
    | StoreAction::Load { session, .. }
    | StoreAction::Rollout { session, .. }
    | StoreAction::Update { session, .. } = action
    {
        options = options.session(session.options()?);
    }
    let store = ModelStore::open(&args.dir, Trust::new(keys, args.threshold)?, options)?;
    let doc = match action {
        StoreAction::Install {
            bundle, activate, ..
        } => {
            let installed = store.install_file(bundle)?;
            if *activate {
                store.activate(&installed.name, installed.version)?;
            }
            serde_json::json!({ "installed": installed, "activated": activate })
        }
        StoreAction::Status => serde_json::json!({}),
        StoreAction::Activate { name, version } => {
            store.activate(name, *version)?;
            serde_json::json!({ "activated": { "name": name, "version": version } })
        }
        StoreAction::Rollback { name } => {
            let version = store.rollback(name)?;
            serde_json::json!({ "rolled_back_to": { "name": name, "version": version } })
        }
        StoreAction::Load { name, .. } => {
            let loaded = store.load(name)?;
            serde_json::json!({ "loaded": {
                "name": name,
                "version": loaded.version,
                "golden": loaded.golden,
                "events": loaded.events,
            } })
        }
        StoreAction::Stage { name, version } => {
            store.stage(name, *version)?;
            serde_json::json!({ "staged": { "name": name, "version": version } })
        }
        StoreAction::Rollout { name, rollout, .. } => run_rollout(&store, name, rollout)?,
        StoreAction::Update {
            name,
            repo,
            root,
            then,
            ..
        } => {
            let root_bytes = tern::fs::read_regular(root, 1 << 20)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", root.display()))?;
            let updater = Updater::new(
                store.clone(),
                &root_bytes,
                tern_bundle::http::for_repo(repo),
            )?;
            let outcome = updater.update(name)?;
            if let UpdateOutcome::Installed(i) = &outcome {
                match then {
                    Then::Install => {}
                    Then::Stage => store.stage(&i.name, i.version)?,
                    Then::Activate => store.activate(&i.name, i.version)?,
                }
            }
            serde_json::json!({ "update": outcome, "root_version": updater.root()?.version })
        }
    };
    let mut doc = doc;
    doc["models"] = serde_json::to_value(store.status()?)?;
    Ok(doc)
}

/// Drives `args.requests` seeded random requests through a rollout of `name`'s candidate.
fn run_rollout(store: &ModelStore, name: &str, args: &RolloutArgs) -> Result<serde_json::Value> {
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = events.clone();
    let hook: tern_bundle::VerdictHook = Box::new(move |e| {
        tern::sync::lock(&sink).push(e.clone());
    });
    let rollout = store.rollout(name, args.policy(), &args.install_id, Some(hook))?;
    let (_, bundle) = store.active(name)?;
    let model = bundle.model()?;
    let dims = crate::parse_dims(&args.dim)?;
    let mut served: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..args.requests {
        let user = args.users.map(|n| format!("user-{}", i % n.max(1)));
        let answer = rollout.run(model.random_inputs(i, &dims)?, user.as_deref())?;
        let arm = match answer.arm {
            Arm::Active => "active",
            Arm::Candidate => "candidate",
        };
        *served
            .entry(format!("{arm} v{}", answer.version))
            .or_default() += 1;
        // One request at a time: every shadow run is recorded (none skipped as busy).
        rollout.wait_for_shadows();
    }
    let health = rollout.health();
    let arm = |h: &tern_bundle::rollout::ArmHealth| {
        serde_json::json!({
            "runs": h.runs,
            "errors": h.errors,
            "p50_ms": h.latency_ms.quantile(0.5),
            "p95_ms": h.latency_ms.quantile(0.95),
        })
    };
    let (active, candidate) = rollout.versions();
    let events = tern::sync::lock(&events).clone();
    Ok(serde_json::json!({ "rollout": {
        "name": name,
        "active": active,
        "candidate": candidate,
        "served": served,
        "health": {
            "active": arm(&health.active),
            "candidate": arm(&health.candidate),
            "compared": health.compared,
            "agreed": health.agreed,
        },
        "verdict": rollout.verdict(),
        "events": events,
    } }))
}
