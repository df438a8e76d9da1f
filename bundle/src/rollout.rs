//! Staged rollout of a candidate version beside the active one, decided on the device.
//!
//! A [`Rollout`] serves requests from two sessions — the active version and a candidate —
//! by its [`Stage`]:
//!
//! - [`Stage::Shadow`]: the active version answers every request; on a share of them the
//!   candidate runs too, on a background thread (off the request's path, skipped when it
//!   is busy), and whether it agreed with the active answer is recorded.
//! - [`Stage::Canary`]: the candidate answers a share of requests, or every request on a
//!   share of devices (a stable hash of the install id, so a device stays in or out).
//! - [`Stage::Ab`]: each user (or the device, without a user key) is in one arm for good,
//!   by a stable hash of the key.
//!
//! Every run is recorded in a [`Health`] per arm (errors, latency sketch) and, in shadow,
//! the agreement; after each one the [`HealthPolicy`] gives a [`Verdict`]: roll back when
//! the candidate's error rate, p95 latency or agreement is out of bounds, promote after
//! enough healthy runs. A verdict is final: from then on one version serves everything, and
//! the `on_verdict` hook (the store's, through [`ModelStore::rollout`]) persists it.
//! A candidate that fails a request never costs the caller an answer: the active version
//! answers instead, and the failure counts against the candidate.
//!
//! [`ModelStore::rollout`]: crate::ModelStore::rollout

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tern::telemetry::sketch::ExpHistogram;
use tern::tensor::compare_close;
use tern::{DType, Outputs, Session, Tensor};

use crate::error::{Error, Result};

/// How requests are split between the active version and the candidate. Shares and
/// bounds are written as decimal strings, so a policy can sit in signed metadata
/// (canonical JSON has no floats).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Stage {
    /// The active version answers; the candidate also runs on `sample` (0..=1) of requests,
    /// its answers discarded and compared.
    Shadow {
        /// The share of requests shadowed.
        #[serde(with = "crate::manifest::decimal")]
        sample: f64,
    },
    /// The candidate answers `share` (0..=1) of requests or devices.
    Canary {
        /// The share.
        #[serde(with = "crate::manifest::decimal")]
        share: f64,
        /// Whether the share is of requests or of devices.
        unit: CanaryUnit,
    },
    /// Sticky arms: `share` (0..=1) of users (or devices) get the candidate.
    Ab {
        /// The share in the candidate's arm.
        #[serde(with = "crate::manifest::decimal")]
        share: f64,
    },
}

/// What a canary's share counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CanaryUnit {
    /// A share of this device's requests.
    Request,
    /// A share of devices, by a stable hash of the install id: all or none of a device's.
    Device,
}

/// When a shadowed candidate agrees with the active version.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Agreement {
    /// Every float output has the same largest entry along its last axis in every row (the
    /// same class); other outputs are equal.
    TopClass,
    /// Every output is within `atol + rtol·|active|` of the active one.
    Close {
        /// Absolute tolerance.
        #[serde(with = "crate::manifest::decimal")]
        atol: f64,
        /// Relative tolerance.
        #[serde(with = "crate::manifest::decimal")]
        rtol: f64,
    },
}

/// When the candidate is rolled back or promoted.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HealthPolicy {
    /// Candidate runs before any verdict (default 100).
    pub min_requests: u64,
    /// Roll back when the candidate's error rate exceeds the active one's by more than this
    /// (default 0.01).
    #[serde(with = "crate::manifest::decimal")]
    pub max_error_rate_increase: f64,
    /// Roll back when the candidate's p95 latency exceeds the active one's times this
    /// (default 1.5).
    #[serde(with = "crate::manifest::decimal")]
    pub max_p95_ratio: f64,
    /// Roll back when the shadowed candidate agrees on less than this share (default 0.95).
    #[serde(with = "crate::manifest::decimal")]
    pub min_agreement: f64,
    /// Promote after this many healthy candidate runs (default 1000); `None` leaves
    /// promotion to the app.
    pub promote_after: Option<u64>,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            min_requests: 100,
            max_error_rate_increase: 0.01,
            max_p95_ratio: 1.5,
            min_agreement: 0.95,
            promote_after: Some(1000),
        }
    }
}

/// A rollout's stage, agreement rule and health bounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RolloutPolicy {
    /// How requests are split.
    pub stage: Stage,
    /// When a shadowed run agrees.
    pub agreement: Agreement,
    /// When to roll back or promote.
    pub health: HealthPolicy,
}

impl RolloutPolicy {
    /// A policy for `stage` with top-class agreement and the default health bounds.
    pub fn new(stage: Stage) -> RolloutPolicy {
        RolloutPolicy {
            stage,
            agreement: Agreement::TopClass,
            health: HealthPolicy::default(),
        }
    }

    /// Sets the agreement rule.
    pub fn agreement(mut self, agreement: Agreement) -> Self {
        self.agreement = agreement;
        self
    }

    /// Sets the health bounds.
    pub fn health(mut self, health: HealthPolicy) -> Self {
        self.health = health;
        self
    }

    /// Shares within 0..=1, bounds that make sense: [`Error::InvalidOption`] otherwise.
    pub fn check(&self) -> Result<()> {
        let share = match self.stage {
            Stage::Shadow { sample } => sample,
            Stage::Canary { share, .. } | Stage::Ab { share } => share,
        };
        let h = &self.health;
        let bad = if !(0.0..=1.0).contains(&share) {
            Some(format!("the stage's share {share} is not within 0..=1"))
        } else if !(0.0..=1.0).contains(&h.min_agreement) {
            Some(format!(
                "min_agreement {} is not within 0..=1",
                h.min_agreement
            ))
        } else if h.max_p95_ratio.is_nan()
            || h.max_p95_ratio < 1.0
            || h.max_error_rate_increase.is_nan()
            || h.max_error_rate_increase < 0.0
        {
            Some("max_p95_ratio must be ≥ 1 and max_error_rate_increase ≥ 0".into())
        } else if let Agreement::Close { atol, rtol } = self.agreement {
            (!(atol >= 0.0 && rtol >= 0.0)).then(|| "tolerances must be ≥ 0".into())
        } else {
            None
        };
        match bad {
            Some(reason) => Err(Error::InvalidOption { reason }),
            None => Ok(()),
        }
    }
}

/// Which version answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    /// The active version.
    Active,
    /// The candidate.
    Candidate,
}

/// Why a candidate was rolled back.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RollbackReason {
    /// Its error rate was above the active version's by more than the policy allows.
    ErrorRate {
        /// The candidate's error rate.
        candidate: f64,
        /// The active version's.
        active: f64,
    },
    /// Its p95 latency was above the active version's times the policy's ratio.
    Latency {
        /// The candidate's p95, milliseconds.
        candidate_p95_ms: f64,
        /// The active version's.
        active_p95_ms: f64,
    },
    /// In shadow, it agreed with the active version less often than the policy asks.
    Disagreement {
        /// The share of shadowed runs that agreed.
        agreement: f64,
    },
}

impl std::fmt::Display for RollbackReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RollbackReason::ErrorRate { candidate, active } => write!(
                f,
                "error rate {:.2} % against the active version's {:.2} %",
                candidate * 100.0,
                active * 100.0
            ),
            RollbackReason::Latency {
                candidate_p95_ms,
                active_p95_ms,
            } => write!(
                f,
                "p95 latency {candidate_p95_ms:.2} ms against the active version's {active_p95_ms:.2} ms"
            ),
            RollbackReason::Disagreement { agreement } => write!(
                f,
                "agreed with the active version on {:.1} % of shadowed requests",
                agreement * 100.0
            ),
        }
    }
}

/// What the health bounds say now.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Verdict {
    /// Not enough evidence either way yet.
    Continue,
    /// The candidate is healthy: it replaces the active version.
    Promote,
    /// The candidate is not: the active version serves everything.
    RollBack(RollbackReason),
}

/// Runs and errors of one arm, with its latency sketch.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmHealth {
    /// Runs recorded.
    pub runs: u64,
    /// Of which failed.
    pub errors: u64,
    /// Latencies in milliseconds.
    pub latency_ms: ExpHistogram,
}

impl Default for ArmHealth {
    fn default() -> Self {
        ArmHealth {
            runs: 0,
            errors: 0,
            latency_ms: ExpHistogram::new(),
        }
    }
}

impl ArmHealth {
    /// Errors over runs (0 with no runs).
    pub fn error_rate(&self) -> f64 {
        if self.runs == 0 {
            0.0
        } else {
            self.errors as f64 / self.runs as f64
        }
    }
}

/// What a rollout has seen until its verdict: each arm's runs, and the shadow comparisons.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    /// The active version's runs.
    pub active: ArmHealth,
    /// The candidate's runs.
    pub candidate: ArmHealth,
    /// Shadowed runs compared with the active answer.
    pub compared: u64,
    /// Of which agreed.
    pub agreed: u64,
    /// Shadow runs skipped because the shadow thread was busy.
    pub shadow_skipped: u64,
}

impl Health {
    /// Records one run of `arm`.
    pub fn record(&mut self, arm: Arm, ok: bool, latency: Duration) {
        let h = match arm {
            Arm::Active => &mut self.active,
            Arm::Candidate => &mut self.candidate,
        };
        h.runs += 1;
        if ok {
            h.latency_ms.record(latency.as_secs_f64() * 1e3);
        } else {
            h.errors += 1;
        }
    }

    /// Records one shadow comparison.
    pub fn record_agreement(&mut self, agreed: bool) {
        self.compared += 1;
        self.agreed += u64::from(agreed);
    }

    /// What `policy` says of what was recorded: nothing before `min_requests` candidate
    /// runs; then roll back on errors, on disagreement (once `min_requests` runs were
    /// compared), on latency (once both arms have `min_requests` timed runs), in that order;
    /// else promote after `promote_after` runs.
    pub fn verdict(&self, policy: &HealthPolicy) -> Verdict {
        let (c, a) = (&self.candidate, &self.active);
        if c.runs < policy.min_requests.max(1) {
            return Verdict::Continue;
        }
        if c.error_rate() > a.error_rate() + policy.max_error_rate_increase {
            return Verdict::RollBack(RollbackReason::ErrorRate {
                candidate: c.error_rate(),
                active: a.error_rate(),
            });
        }
        if self.compared >= policy.min_requests.max(1) {
            let agreement = self.agreed as f64 / self.compared as f64;
            if agreement < policy.min_agreement {
                return Verdict::RollBack(RollbackReason::Disagreement { agreement });
            }
        }
        let timed = policy.min_requests.max(1);
        if a.latency_ms.count >= timed && c.latency_ms.count >= timed {
            if let (Some(cp), Some(ap)) = (c.latency_ms.quantile(0.95), a.latency_ms.quantile(0.95))
            {
                if cp > ap * policy.max_p95_ratio {
                    return Verdict::RollBack(RollbackReason::Latency {
                        candidate_p95_ms: cp,
                        active_p95_ms: ap,
                    });
                }
            }
        }
        match policy.promote_after {
            Some(n) if c.runs >= n => Verdict::Promote,
            _ => Verdict::Continue,
        }
    }
}

/// What a rollout decided, as it tells its `on_verdict` hook.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct RolloutEvent {
    /// The model.
    pub name: String,
    /// The active version.
    pub active: u64,
    /// The candidate.
    pub candidate: u64,
    /// The verdict (never [`Verdict::Continue`]).
    pub verdict: Verdict,
    /// Candidate runs when it was reached.
    pub candidate_runs: u64,
}

/// One request's answer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Served {
    /// The outputs.
    pub outputs: Outputs,
    /// The version that gave them.
    pub version: u64,
    /// Its arm.
    pub arm: Arm,
}

/// A version and its session.
#[derive(Debug)]
pub struct Version {
    /// The version number.
    pub version: u64,
    /// A session on it.
    pub session: Session,
}

/// What a rollout calls with its verdict.
pub type VerdictHook = Box<dyn Fn(&RolloutEvent) + Send + Sync>;

struct Inner {
    name: String,
    active: Version,
    candidate: Version,
    policy: RolloutPolicy,
    install_id: String,
    requests: AtomicU64,
    state: Mutex<(Health, Verdict)>,
    on_verdict: Option<VerdictHook>,
    shadows_pending: Mutex<usize>,
    shadows_done: Condvar,
}

struct ShadowJob {
    inputs: Vec<(String, Tensor)>,
    active: Outputs,
}

/// A candidate version served beside the active one (see the module docs). `Send + Sync`:
/// share it between the threads serving requests.
pub struct Rollout {
    inner: Arc<Inner>,
    shadow: Option<SyncSender<ShadowJob>>,
}

impl std::fmt::Debug for Rollout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollout")
            .field("name", &self.inner.name)
            .field("active", &self.inner.active.version)
            .field("candidate", &self.inner.candidate.version)
            .field("policy", &self.inner.policy)
            .finish()
    }
}

impl Rollout {
    /// A rollout of `candidate` beside `active` for the model `name` on the device
    /// `install_id` (a stable, app-chosen id: canaries by device and A/B arms without a user
    /// key hash it). `on_verdict` is called once, from the thread that reached the verdict.
    pub fn new(
        name: impl Into<String>,
        active: Version,
        candidate: Version,
        policy: RolloutPolicy,
        install_id: impl Into<String>,
        on_verdict: Option<VerdictHook>,
    ) -> Result<Rollout> {
        policy.check()?;
        let inner = Arc::new(Inner {
            name: name.into(),
            active,
            candidate,
            policy,
            install_id: install_id.into(),
            requests: AtomicU64::new(0),
            state: Mutex::new((Health::default(), Verdict::Continue)),
            on_verdict,
            shadows_pending: Mutex::new(0),
            shadows_done: Condvar::new(),
        });
        let shadow = match policy.stage {
            Stage::Shadow { .. } => {
                // One job in flight and one waiting: shadowing never queues up work.
                let (tx, rx) = sync_channel::<ShadowJob>(1);
                let worker = Arc::clone(&inner);
                std::thread::Builder::new()
                    .name("tern-shadow".into())
                    .spawn(move || {
                        for job in rx {
                            worker.shadow(job);
                        }
                    })
                    .map_err(|e| Error::io("tern-shadow thread")(e))?;
                Some(tx)
            }
            _ => None,
        };
        Ok(Rollout { inner, shadow })
    }

    /// Answers one request. `user` keys an A/B arm (without it, the device is the user).
    pub fn run(&self, inputs: Vec<(String, Tensor)>, user: Option<&str>) -> Result<Served> {
        let inner = &self.inner;
        let n = inner.requests.fetch_add(1, Ordering::Relaxed);
        let verdict = tern::sync::lock(&inner.state).1;
        let arm = match verdict {
            Verdict::Promote => return inner.serve_only(&inner.candidate, Arm::Candidate, inputs),
            Verdict::RollBack(_) => return inner.serve_only(&inner.active, Arm::Active, inputs),
            Verdict::Continue => match inner.policy.stage {
                Stage::Shadow { .. } => Arm::Active,
                Stage::Canary {
                    share,
                    unit: CanaryUnit::Request,
                } => pick(stride(n, share)),
                Stage::Canary {
                    share,
                    unit: CanaryUnit::Device,
                } => pick(in_share(&inner.key(None), share)),
                Stage::Ab { share } => pick(in_share(&inner.key(user), share)),
            },
        };
        if arm == Arm::Candidate {
            let start = Instant::now();
            match inner.candidate.session.run(inputs.iter().cloned()) {
                Ok(outputs) => {
                    inner.observe(|h| h.record(Arm::Candidate, true, start.elapsed()));
                    return Ok(Served {
                        outputs,
                        version: inner.candidate.version,
                        arm,
                    });
                }
                // The caller still gets an answer: the active version's.
                Err(_) => inner.observe(|h| h.record(Arm::Candidate, false, start.elapsed())),
            }
        }
        let start = Instant::now();
        let result = inner.active.session.run(inputs.iter().cloned());
        inner.observe(|h| h.record(Arm::Active, result.is_ok(), start.elapsed()));
        let outputs = result?;
        if let (Some(tx), Stage::Shadow { sample }) = (&self.shadow, inner.policy.stage) {
            if stride(n, sample) {
                self.send_shadow(tx, inputs, outputs.clone());
            }
        }
        Ok(Served {
            outputs,
            version: inner.active.version,
            arm: Arm::Active,
        })
    }

    fn send_shadow(
        &self,
        tx: &SyncSender<ShadowJob>,
        inputs: Vec<(String, Tensor)>,
        active: Outputs,
    ) {
        let inner = &self.inner;
        *tern::sync::lock(&inner.shadows_pending) += 1;
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            tx.try_send(ShadowJob { inputs, active })
        {
            inner.shadow_finished();
            inner.observe(|h| h.shadow_skipped += 1);
        }
    }

    /// The verdict so far.
    pub fn verdict(&self) -> Verdict {
        tern::sync::lock(&self.inner.state).1
    }

    /// What the rollout has recorded.
    pub fn health(&self) -> Health {
        tern::sync::lock(&self.inner.state).0.clone()
    }

    /// The active and candidate versions.
    pub fn versions(&self) -> (u64, u64) {
        (self.inner.active.version, self.inner.candidate.version)
    }

    /// Waits until every shadow run queued so far has been recorded.
    pub fn wait_for_shadows(&self) {
        let mut pending = tern::sync::lock(&self.inner.shadows_pending);
        while *pending > 0 {
            pending = self
                .inner
                .shadows_done
                .wait(pending)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

fn pick(candidate: bool) -> Arm {
    if candidate {
        Arm::Candidate
    } else {
        Arm::Active
    }
}

/// Whether request `n` is in a `share` of requests spread evenly: the last of every
/// `1/share` requests, so exactly `share` of any run of `k/share` requests.
fn stride(n: u64, share: f64) -> bool {
    let at = |k: u64| (k as f64 * share).floor();
    at(n + 1) > at(n)
}

/// Whether `key` hashes into the lowest `share` of the 64-bit range (SHA-256: the same
/// on every platform and release, so a device or user keeps its arm).
fn in_share(key: &str, share: f64) -> bool {
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let x = u64::from_be_bytes(first) as f64 / 2f64.powi(64);
    x < share
}

impl Inner {
    /// The hash key of a canary device or an A/B user: the model and candidate are in it, so
    /// a device is not in every rollout's canary at once.
    fn key(&self, user: Option<&str>) -> String {
        format!(
            "{}\u{0}{}\u{0}{}",
            self.name,
            self.candidate.version,
            user.unwrap_or(&self.install_id)
        )
    }

    fn serve_only(&self, v: &Version, arm: Arm, inputs: Vec<(String, Tensor)>) -> Result<Served> {
        Ok(Served {
            outputs: v.session.run(inputs)?,
            version: v.version,
            arm,
        })
    }

    /// Records under the lock, then reaches a verdict once.
    fn observe(&self, f: impl FnOnce(&mut Health)) {
        let event = {
            let mut state = tern::sync::lock(&self.state);
            f(&mut state.0);
            if state.1 != Verdict::Continue {
                return;
            }
            let verdict = state.0.verdict(&self.policy.health);
            if verdict == Verdict::Continue {
                return;
            }
            state.1 = verdict;
            RolloutEvent {
                name: self.name.clone(),
                active: self.active.version,
                candidate: self.candidate.version,
                verdict,
                candidate_runs: state.0.candidate.runs,
            }
        };
        if let Some(hook) = &self.on_verdict {
            hook(&event);
        }
    }

    fn shadow(&self, job: ShadowJob) {
        if tern::sync::lock(&self.state).1 == Verdict::Continue {
            let start = Instant::now();
            let result = self.candidate.session.run(job.inputs);
            let elapsed = start.elapsed();
            let agreed = result
                .as_ref()
                .ok()
                .map(|c| agrees(&job.active, c, self.policy.agreement));
            self.observe(|h| {
                h.record(Arm::Candidate, result.is_ok(), elapsed);
                if let Some(agreed) = agreed {
                    h.record_agreement(agreed);
                }
            });
        }
        self.shadow_finished();
    }

    fn shadow_finished(&self) {
        let mut pending = tern::sync::lock(&self.shadows_pending);
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            self.shadows_done.notify_all();
        }
    }
}

/// Whether the candidate's outputs agree with the active version's under `rule`.
pub fn agrees(active: &Outputs, candidate: &Outputs, rule: Agreement) -> bool {
    active.iter().all(|(name, a)| {
        let Some(c) = candidate.get(name) else {
            return false;
        };
        match rule {
            Agreement::Close { atol, rtol } => compare_close(c, a, atol, rtol).is_ok(),
            Agreement::TopClass => match (a.as_slice::<f32>(), c.as_slice::<f32>()) {
                (Ok(x), Ok(y)) if a.dtype() == DType::F32 && a.shape() == c.shape() => {
                    let row = a.shape().last().copied().unwrap_or(1).max(1);
                    x.chunks(row)
                        .zip(y.chunks(row))
                        .all(|(p, q)| argmax(p) == argmax(q))
                }
                _ => compare_close(c, a, 0.0, 0.0).is_ok(),
            },
        }
    })
}

fn argmax(row: &[f32]) -> Option<usize> {
    row.iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_take_exactly_their_share() {
        for share in [0.0, 0.01, 0.1, 0.25, 0.5, 1.0] {
            let taken = (0..10_000).filter(|n| stride(*n, share)).count();
            assert_eq!(taken, (10_000.0 * share) as usize, "{share}");
        }
    }

    #[test]
    fn hashed_shares_are_stable_and_close_to_their_share() {
        let keys: Vec<String> = (0..20_000).map(|i| format!("device-{i}")).collect();
        let inside = keys.iter().filter(|k| in_share(k, 0.1)).count();
        assert!((1_700..2_300).contains(&inside), "{inside}");
        // Stable: the same key, the same answer; a larger share keeps everyone already in.
        assert!(keys.iter().all(
            |k| in_share(k, 0.1) == in_share(k, 0.1) && (!in_share(k, 0.1) || in_share(k, 0.2))
        ));
        // A value from Python's hashlib (the first 8 bytes of SHA-256("device-0") are
        // 0.27429… of 2^64), so a change of hash, which would move devices between arms,
        // fails here.
        assert!(in_share("device-0", 0.2743) && !in_share("device-0", 0.2742));
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn verdicts_follow_the_policy() {
        let policy = HealthPolicy {
            min_requests: 10,
            promote_after: Some(40),
            ..HealthPolicy::default()
        };
        let mut h = Health::default();
        for _ in 0..9 {
            h.record(Arm::Active, true, ms(10));
            h.record(Arm::Candidate, false, ms(10));
        }
        assert_eq!(h.verdict(&policy), Verdict::Continue, "too few runs");
        h.record(Arm::Candidate, false, ms(10));
        assert!(matches!(
            h.verdict(&policy),
            Verdict::RollBack(RollbackReason::ErrorRate { .. })
        ));

        let mut h = Health::default();
        for _ in 0..20 {
            h.record(Arm::Active, true, ms(10));
            h.record(Arm::Candidate, true, ms(14));
        }
        assert_eq!(h.verdict(&policy), Verdict::Continue, "1.4× is within 1.5×");
        for _ in 0..20 {
            h.record(Arm::Candidate, true, ms(40));
        }
        assert!(matches!(
            h.verdict(&policy),
            Verdict::RollBack(RollbackReason::Latency { .. })
        ));

        let mut h = Health::default();
        for i in 0..40 {
            h.record(Arm::Active, true, ms(10));
            h.record(Arm::Candidate, true, ms(10));
            h.record_agreement(i % 10 != 0);
        }
        assert!(matches!(
            h.verdict(&policy),
            Verdict::RollBack(RollbackReason::Disagreement { agreement }) if agreement == 0.9
        ));
        let mut h = Health::default();
        for _ in 0..39 {
            h.record(Arm::Active, true, ms(10));
            h.record(Arm::Candidate, true, ms(10));
            h.record_agreement(true);
        }
        assert_eq!(h.verdict(&policy), Verdict::Continue);
        h.record(Arm::Candidate, true, ms(10));
        assert_eq!(h.verdict(&policy), Verdict::Promote);
    }

    #[test]
    fn bad_policies_are_invalid_options() {
        let bad = [
            RolloutPolicy::new(Stage::Shadow { sample: 1.5 }),
            RolloutPolicy::new(Stage::Ab { share: f64::NAN }),
            RolloutPolicy::new(Stage::Ab { share: 0.5 }).agreement(Agreement::Close {
                atol: -1.0,
                rtol: 0.0,
            }),
            RolloutPolicy::new(Stage::Ab { share: 0.5 }).health(HealthPolicy {
                max_p95_ratio: 0.5,
                ..HealthPolicy::default()
            }),
        ];
        for policy in bad {
            assert!(policy.check().is_err(), "{policy:?}");
        }
    }

    #[test]
    fn top_class_agreement_compares_each_rows_largest_entry() {
        let t = |v: Vec<f32>| Tensor::from_vec(&[2, 3], v).unwrap();
        let out = |v| Outputs::from_pairs(vec![("p".into(), t(v))]);
        let a = out(vec![0.1, 0.7, 0.2, 0.5, 0.4, 0.1]);
        let same = out(vec![0.3, 0.4, 0.3, 0.9, 0.0, 0.1]);
        let other = out(vec![0.3, 0.4, 0.3, 0.1, 0.9, 0.0]);
        assert!(agrees(&a, &same, Agreement::TopClass));
        assert!(!agrees(&a, &other, Agreement::TopClass));
        assert!(!agrees(
            &a,
            &same,
            Agreement::Close {
                atol: 0.1,
                rtol: 0.0
            }
        ));
        assert!(agrees(
            &a,
            &a,
            Agreement::Close {
                atol: 0.0,
                rtol: 0.0
            }
        ));
        let missing = Outputs::from_pairs(vec![("q".into(), t(vec![0.0; 6]))]);
        assert!(!agrees(&a, &missing, Agreement::TopClass));
    }
}
