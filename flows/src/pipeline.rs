//! A pipeline: steps in sequence, each one fed by the request's inputs and what the steps
//! before it produced (pre-processing → model → post-processing; a detector → a
//! classifier).
//!
//! The tensors a step sees are the request's inputs and every earlier step's outputs, a
//! later name hiding an earlier one. A session step takes only the inputs its model
//! declares; a callback step takes them all. The pipeline's answer is the last step's.
//!
//! When built, every session step's declared inputs are checked against what the steps
//! before it declare they produce (names, element types, fixed dimensions), so a
//! mismatch fails at [`PipelineBuilder::build`], not at the first request. A callback
//! declares nothing, so after one the names cannot be checked.

use std::time::{Duration, Instant};

use tern::telemetry::Outcome;
use tern::{Dim, Outputs, Tensor, TensorInfo};

use crate::error::{Error, Result};
use crate::step::{self, Answer, Inputs, Signature, Source, Step};

/// A pipeline's answer.
#[derive(Debug, Clone)]
pub struct PipelineAnswer {
    /// The last step's outputs.
    pub outputs: Outputs,
    /// Every step, with who answered for it (a fallback or the cache may have).
    pub answered: Vec<(String, Source)>,
    /// Why the first step a fallback answered for did not answer itself.
    pub failure: Option<crate::step::Failure>,
    /// How long the request took.
    pub elapsed: Duration,
}

/// Steps run in sequence (see the module docs). `Send + Sync`.
#[derive(Debug)]
pub struct Pipeline {
    name: String,
    steps: Vec<Step>,
    deadline: Option<Duration>,
}

/// Builds a [`Pipeline`]; from [`Pipeline::builder`].
#[derive(Debug)]
pub struct PipelineBuilder {
    name: String,
    steps: Vec<Step>,
    deadline: Option<Duration>,
}

impl Pipeline {
    /// A pipeline called `name` (its span's name in telemetry).
    pub fn builder(name: impl Into<String>) -> PipelineBuilder {
        PipelineBuilder {
            name: name.into(),
            steps: Vec::new(),
            deadline: None,
        }
    }

    /// The pipeline's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs the steps in order; the first step that fails (with no fallback answering)
    /// fails the request.
    pub fn run(&self, inputs: &Inputs) -> Result<PipelineAnswer> {
        let start = Instant::now();
        let deadline = self.deadline.map(|d| start + d);
        let mut span = self.steps.first().and_then(Step::span);
        let mut seen: Vec<(String, Tensor)> = inputs.to_vec();
        let mut answered = Vec::with_capacity(self.steps.len());
        let mut last: Option<Answer> = None;
        let mut failure = None;
        let mut result = Ok(());
        for step in &self.steps {
            let feed: Vec<(String, Tensor)> = match step.signature() {
                Some(sig) => sig
                    .inputs
                    .iter()
                    .filter_map(|i| {
                        seen.iter()
                            .rev()
                            .find(|(n, _)| *n == i.name)
                            .map(|(n, t)| (n.clone(), t.clone()))
                    })
                    .collect(),
                None => visible(&seen),
            };
            let r = step.run_until(&feed, deadline);
            if let Some(span) = span.as_mut() {
                span.stages.push(step::stage(step.name(), &r));
            }
            match r {
                Ok(answer) => {
                    answered.push((step.name().to_string(), answer.source));
                    if failure.is_none() {
                        failure.clone_from(&answer.failure);
                    }
                    seen.extend(
                        answer
                            .outputs
                            .iter()
                            .map(|(n, t)| (n.to_string(), t.clone())),
                    );
                    last = Some(answer);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let result = match (result, last) {
            (Ok(()), Some(answer)) => Ok(PipelineAnswer {
                outputs: answer.outputs,
                answered,
                failure,
                elapsed: start.elapsed(),
            }),
            (Err(e), _) => Err(e),
            (Ok(()), None) => Err(Error::BadFlow {
                flow: self.name.clone(),
                reason: "no step".into(),
            }),
        };
        if let Some(span) = span.as_mut() {
            span.model = self.name.clone();
            span.outcome = match &result {
                Ok(a) if a.answered.iter().all(|(_, s)| *s == Source::Cache) => Outcome::CacheHit,
                Ok(a)
                    if a.answered
                        .iter()
                        .any(|(_, s)| *s != Source::Model && *s != Source::Cache) =>
                {
                    Outcome::Fallback
                }
                Ok(_) => Outcome::Ok,
                Err(Error::Timeout { .. }) => Outcome::Timeout,
                Err(e) => Outcome::Error(e.telemetry_kind()),
            };
        }
        if let Some(first) = self.steps.first() {
            first.record(span);
        }
        result
    }

    /// The inputs of the first step and the outputs of the last, when both are declared.
    pub(crate) fn signature(&self) -> Option<Signature> {
        Some(Signature {
            inputs: self.steps.first()?.signature()?.inputs.clone(),
            outputs: self.steps.last()?.signature()?.outputs.clone(),
        })
    }
}

/// The tensors a step without a declared signature sees: every name once, the latest.
fn visible(seen: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = Vec::with_capacity(seen.len());
    for (n, t) in seen.iter().rev() {
        if !out.iter().any(|(m, _)| m == n) {
            out.push((n.clone(), t.clone()));
        }
    }
    out.reverse();
    out
}

/// Why a tensor declared as `given` cannot be the input declared as `wanted`, if it cannot.
pub(crate) fn misfit(given: &TensorInfo, wanted: &TensorInfo) -> Option<String> {
    if let (Some(a), Some(b)) = (given.dtype, wanted.dtype) {
        if a != b {
            return Some(format!("{} is {}, not {}", given.name, a.name(), b.name()));
        }
    }
    if let (Some(a), Some(b)) = (&given.shape, &wanted.shape) {
        let clash = a.len() != b.len()
            || a.iter().zip(b).any(|(x, y)| match (x, y) {
                (Dim::Fixed(x), Dim::Fixed(y)) => x != y,
                _ => false,
            });
        if clash {
            return Some(format!(
                "{} has shape {}, not {}",
                given.name,
                given.shape_string(),
                wanted.shape_string()
            ));
        }
    }
    None
}

impl PipelineBuilder {
    /// Adds the next step.
    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// The whole request's deadline: each step gets what is left of it (default: none).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The pipeline. Fails with [`Error::InvalidOption`] for no step or a deadline of 0;
    /// with [`Error::BadFlow`] when two steps share a name, or a session step takes an
    /// input that the request (the first step's declared inputs) and the earlier steps'
    /// declared outputs do not give, or give with another element type or fixed shape.
    pub fn build(self) -> Result<Pipeline> {
        let bad = |reason: String| {
            Err(Error::BadFlow {
                flow: self.name.clone(),
                reason,
            })
        };
        if self.steps.is_empty() {
            return Err(Error::InvalidOption {
                reason: format!("pipeline {:?}: no step", self.name),
            });
        }
        if self.deadline.is_some_and(|d| d.is_zero()) {
            return Err(Error::InvalidOption {
                reason: format!("pipeline {:?}: a deadline of 0 can never be met", self.name),
            });
        }
        for (i, s) in self.steps.iter().enumerate() {
            if self.steps[..i].iter().any(|t| t.name() == s.name()) {
                return bad(format!("two steps are called {:?}", s.name()));
            }
        }
        // What is known to be available before each step; `None` once a step without a
        // declared signature (a callback) may have produced anything.
        let mut known: Option<Vec<TensorInfo>> =
            self.steps[0].signature().map(|s| s.inputs.clone());
        for (i, step) in self.steps.iter().enumerate() {
            let sig = step.signature();
            if let (Some(known), Some(sig), true) = (&known, sig, i > 0) {
                for wanted in &sig.inputs {
                    match known.iter().rev().find(|k| k.name == wanted.name) {
                        None => {
                            return bad(format!(
                                "step {:?} takes input {:?}, which neither the request nor an earlier step gives (they give {:?})",
                                step.name(),
                                wanted.name,
                                known.iter().map(|k| &k.name).collect::<Vec<_>>()
                            ))
                        }
                        Some(given) => {
                            if let Some(why) = misfit(given, wanted) {
                                return bad(format!(
                                    "step {:?} cannot take what comes before it: {why}",
                                    step.name()
                                ));
                            }
                        }
                    }
                }
            }
            known = match (known, sig) {
                (Some(mut k), Some(sig)) => {
                    k.extend(sig.outputs.iter().cloned());
                    Some(k)
                }
                _ => None,
            };
        }
        Ok(Pipeline {
            name: self.name,
            steps: self.steps,
            deadline: self.deadline,
        })
    }
}
