//! Fan-out / fan-in: several steps run in parallel on one request and what arrives before
//! the deadline is merged; the answer names the steps that are missing and why.
//!
//! The caller never waits past the deadline: each step runs on its own thread with the
//! deadline as its budget (see [`crate::step`]), so a step that cannot be cancelled
//! finishes in the background, its result dropped, and a step with too many such runs out
//! answers [`crate::Failure::Busy`] at once instead of piling up more.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern::telemetry::Outcome;
use tern::{Outputs, Tensor};

use crate::cascade::{argmax_rows, scores};
use crate::error::{Error, Result};
use crate::step::{self, Answer, Failure, Inputs, Source, Step};

/// An app's merge of `(step index, outputs)` pairs.
pub type MergeFn = Arc<dyn Fn(&[(usize, &Outputs)]) -> Result<Outputs> + Send + Sync>;

/// How the answers that arrived are combined.
#[derive(Clone)]
pub enum Merge {
    /// Each output the element-wise weighted mean of the answers' (as f32; the answers
    /// must have the same outputs and shapes).
    WeightedMean,
    /// The class (argmax of `output` per row) with the largest total weight wins; the
    /// answer is the outputs of the heaviest step that voted for it.
    Vote {
        /// The output holding the class scores.
        output: String,
    },
    /// The first answer to arrive, without waiting for the others.
    FirstGood,
    /// The app's merge of `(step index, outputs)` pairs, in the order steps were added.
    Custom(MergeFn),
}

impl std::fmt::Debug for Merge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Merge::WeightedMean => f.write_str("WeightedMean"),
            Merge::Vote { output } => f.debug_struct("Vote").field("output", output).finish(),
            Merge::FirstGood => f.write_str("FirstGood"),
            Merge::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// A step that did not contribute to a fan-out's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// The step.
    pub step: String,
    /// Why: [`Failure::Timeout`] when it had not answered by the deadline (or, with
    /// [`Merge::FirstGood`], when another step answered first).
    pub failure: Failure,
}

/// A fan-out's answer.
#[derive(Debug, Clone)]
pub struct FanOutAnswer {
    /// The merged outputs.
    pub outputs: Outputs,
    /// The steps merged, with who answered for each (a fallback may have).
    pub answered: Vec<(String, Source)>,
    /// The steps that did not contribute.
    pub missing: Vec<Missing>,
    /// Whether some step is missing.
    pub partial: bool,
    /// How long the request took.
    pub elapsed: Duration,
}

/// Parallel steps merged under a deadline (see the module docs). `Send + Sync`.
#[derive(Debug)]
pub struct FanOut {
    name: String,
    steps: Vec<(Step, f32)>,
    merge: Merge,
    deadline: Duration,
    min_answers: usize,
}

/// Builds a [`FanOut`]; from [`FanOut::builder`].
#[derive(Debug)]
pub struct FanOutBuilder {
    name: String,
    steps: Vec<(Step, f32)>,
    merge: Merge,
    deadline: Duration,
    min_answers: usize,
}

impl FanOut {
    /// A fan-out called `name` that waits at most `deadline`, merging with
    /// [`Merge::WeightedMean`] unless told otherwise.
    pub fn builder(name: impl Into<String>, deadline: Duration) -> FanOutBuilder {
        FanOutBuilder {
            name: name.into(),
            steps: Vec::new(),
            merge: Merge::WeightedMean,
            deadline,
            min_answers: 1,
        }
    }

    /// Runs every step on `inputs` and merges what arrives by the deadline.
    pub fn run(&self, inputs: &Inputs) -> Result<FanOutAnswer> {
        let start = Instant::now();
        let deadline = start + self.deadline;
        let (tx, rx) = mpsc::channel::<(usize, Result<Answer>)>();
        let shared: Arc<Vec<(String, Tensor)>> = Arc::new(inputs.to_vec());
        let mut failures: Vec<Option<Failure>> = vec![None; self.steps.len()];
        for (i, (step, _)) in self.steps.iter().enumerate() {
            let (step, tx, inputs) = (step.clone(), tx.clone(), shared.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("tern-fanout-{}", step.name()))
                .spawn(move || {
                    let _ = tx.send((i, step.run_until(&inputs, Some(deadline))));
                });
            if spawned.is_err() {
                failures[i] = Some(Failure::Busy);
            }
        }
        drop(tx);
        let mut arrived: Vec<(usize, Answer)> = Vec::new();
        let mut stages = Vec::new();
        let expected = failures.iter().filter(|f| f.is_none()).count();
        let mut received = 0;
        while received < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((i, result)) = rx.recv_timeout(left) else {
                break;
            };
            received += 1;
            stages.push(step::stage(self.steps[i].0.name(), &result));
            match result {
                Ok(answer) => {
                    arrived.push((i, answer));
                    if matches!(self.merge, Merge::FirstGood) {
                        break;
                    }
                }
                Err(e) => failures[i] = Some(Failure::of(&e)),
            }
        }
        let missing: Vec<Missing> = self
            .steps
            .iter()
            .enumerate()
            .filter(|(i, _)| !arrived.iter().any(|(j, _)| j == i))
            .map(|(i, (step, _))| Missing {
                step: step.name().to_string(),
                failure: failures[i].clone().unwrap_or(Failure::Timeout {
                    budget: self.deadline,
                }),
            })
            .collect();
        arrived.sort_by_key(|(i, _)| *i);
        let result = if arrived.len() < self.min_answers {
            Err(Error::TooFewAnswers {
                flow: self.name.clone(),
                answered: arrived.len(),
                required: self.min_answers,
                missing: missing
                    .iter()
                    .map(|m| format!("{} ({})", m.step, m.failure.as_str()))
                    .collect(),
            })
        } else {
            self.merge(&arrived).map(|outputs| FanOutAnswer {
                outputs,
                answered: arrived
                    .iter()
                    .map(|(i, a)| (self.steps[*i].0.name().to_string(), a.source))
                    .collect(),
                partial: !missing.is_empty(),
                missing,
                elapsed: start.elapsed(),
            })
        };
        self.record(stages, &result);
        result
    }

    /// The fan-out's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The first declared step's inputs and, unless the app merges, its outputs (which
    /// the built-in merges keep).
    pub(crate) fn signature(&self) -> Option<crate::step::Signature> {
        if matches!(self.merge, Merge::Custom(_)) {
            return None;
        }
        self.steps.iter().find_map(|(s, _)| s.signature().cloned())
    }

    fn record(&self, stages: Vec<(String, u64)>, result: &Result<FanOutAnswer>) {
        let Some((first, _)) = self.steps.iter().find(|(s, _)| s.telemetry().is_some()) else {
            return;
        };
        let mut span = first.span();
        if let Some(span) = span.as_mut() {
            span.model = self.name.clone();
            span.stages = stages;
            span.outcome = match result {
                Ok(a) if a.partial => Outcome::Fallback,
                Ok(a) if a.answered.iter().all(|(_, s)| *s == Source::Cache) => Outcome::CacheHit,
                Ok(a)
                    if a.answered
                        .iter()
                        .all(|(_, s)| *s == Source::Model || *s == Source::Cache) =>
                {
                    Outcome::Ok
                }
                Ok(_) => Outcome::Fallback,
                Err(_) => Outcome::Timeout,
            };
        }
        first.record(span);
    }

    fn merge(&self, arrived: &[(usize, Answer)]) -> Result<Outputs> {
        let weight = |i: usize| self.steps[i].1;
        match &self.merge {
            Merge::FirstGood => Ok(arrived[0].1.outputs.clone()),
            Merge::Custom(f) => {
                let pairs: Vec<(usize, &Outputs)> =
                    arrived.iter().map(|(i, a)| (*i, &a.outputs)).collect();
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&pairs))).unwrap_or_else(
                    |_| {
                        Err(Error::Callback {
                            step: self.name.clone(),
                            reason: "the merge callback panicked".into(),
                            panicked: true,
                        })
                    },
                )
            }
            Merge::Vote { output } => {
                let mut tally: Vec<(Vec<usize>, f32, usize, f32)> = Vec::new();
                for (i, a) in arrived {
                    let class = argmax_rows(
                        &scores(&a.outputs, output).map_err(|e| e.in_flow(&self.name))?,
                    );
                    match tally.iter_mut().find(|t| t.0 == class) {
                        Some(t) => {
                            t.1 += weight(*i);
                            if weight(*i) > t.3 {
                                (t.2, t.3) = (*i, weight(*i));
                            }
                        }
                        None => tally.push((class, weight(*i), *i, weight(*i))),
                    }
                }
                let winner = tally
                    .iter()
                    .fold(
                        None::<&(Vec<usize>, f32, usize, f32)>,
                        |best, t| match best {
                            Some(b) if b.1 >= t.1 => Some(b),
                            _ => Some(t),
                        },
                    )
                    .map(|t| t.2)
                    .unwrap_or(arrived[0].0);
                Ok(arrived
                    .iter()
                    .find(|(i, _)| *i == winner)
                    .map_or_else(|| arrived[0].1.outputs.clone(), |(_, a)| a.outputs.clone()))
            }
            Merge::WeightedMean => {
                let first = &arrived[0].1.outputs;
                let total: f32 = arrived.iter().map(|(i, _)| weight(*i)).sum();
                let mut merged = Vec::with_capacity(first.len());
                for (name, tensor) in first.iter() {
                    let mut acc = vec![0f32; tensor.len()];
                    for (i, a) in arrived {
                        let t = a.outputs.get(name).filter(|t| t.shape() == tensor.shape());
                        let Some(t) = t else {
                            return Err(Error::BadFlow {
                                flow: self.name.clone(),
                                reason: format!(
                                    "step {:?} has no output {name:?} of shape {:?} to average",
                                    self.steps[*i].0.name(),
                                    tensor.shape()
                                ),
                            });
                        };
                        let w = weight(*i) / total;
                        for (a, v) in acc.iter_mut().zip(t.to_f32_vec()?) {
                            *a += w * v;
                        }
                    }
                    merged.push((name.to_string(), Tensor::from_vec(tensor.shape(), acc)?));
                }
                Ok(Outputs::from_pairs(merged))
            }
        }
    }
}

impl FanOutBuilder {
    /// Adds a step with weight 1.
    pub fn step(self, step: Step) -> Self {
        self.weighted(step, 1.0)
    }

    /// Adds a step whose answer counts `weight` times in the merge.
    pub fn weighted(mut self, step: Step, weight: f32) -> Self {
        self.steps.push((step, weight));
        self
    }

    /// How answers are merged (default [`Merge::WeightedMean`]).
    pub fn merge(mut self, merge: Merge) -> Self {
        self.merge = merge;
        self
    }

    /// The fewest answers a result may be merged from (default 1); fewer is
    /// [`Error::TooFewAnswers`].
    pub fn min_answers(mut self, n: usize) -> Self {
        self.min_answers = n;
        self
    }

    /// The fan-out. Fails with [`Error::InvalidOption`] for a deadline of 0, no step, a
    /// weight that is not positive, or `min_answers` 0 or above the step count; with
    /// [`Error::BadFlow`] when two steps have one name, a vote reads an output a step's
    /// model does not have, or the steps' models disagree on their outputs under
    /// [`Merge::WeightedMean`].
    pub fn build(self) -> Result<FanOut> {
        let invalid = |reason: String| {
            Err(Error::InvalidOption {
                reason: format!("fan-out {:?}: {reason}", self.name),
            })
        };
        let bad = |reason: String| {
            Err(Error::BadFlow {
                flow: self.name.clone(),
                reason,
            })
        };
        if self.deadline.is_zero() {
            return invalid("a deadline of 0 can never be met".into());
        }
        if self.steps.is_empty() {
            return invalid("no step".into());
        }
        if self.steps.iter().any(|(_, w)| !(w.is_finite() && *w > 0.0)) {
            return invalid("weights must be positive numbers".into());
        }
        if self.min_answers == 0 || self.min_answers > self.steps.len() {
            return invalid(format!(
                "min_answers must be between 1 and the {} steps",
                self.steps.len()
            ));
        }
        for (i, (s, _)) in self.steps.iter().enumerate() {
            if self.steps[..i].iter().any(|(t, _)| t.name() == s.name()) {
                return bad(format!("two steps are called {:?}", s.name()));
            }
        }
        let signatures: Vec<_> = self
            .steps
            .iter()
            .filter_map(|(s, _)| s.signature().map(|sig| (s.name(), sig)))
            .collect();
        match &self.merge {
            Merge::Vote { output } => {
                for (name, sig) in &signatures {
                    if !sig.outputs.iter().any(|o| &o.name == output) {
                        return bad(format!(
                            "step {name:?} has no output {output:?} to vote with"
                        ));
                    }
                }
            }
            Merge::WeightedMean => {
                let names = |sig: &crate::step::Signature| {
                    sig.outputs
                        .iter()
                        .map(|o| o.name.clone())
                        .collect::<Vec<_>>()
                };
                if let Some((first, sig)) = signatures.first() {
                    for (name, other) in &signatures[1..] {
                        if names(sig) != names(other) {
                            return bad(format!(
                                "steps {first:?} and {name:?} have different outputs ({:?} vs {:?}) to average",
                                names(sig),
                                names(other)
                            ));
                        }
                    }
                }
            }
            Merge::FirstGood | Merge::Custom(_) => {}
        }
        Ok(FanOut {
            name: self.name,
            steps: self.steps,
            merge: self.merge,
            deadline: self.deadline,
            min_answers: self.min_answers,
        })
    }
}
