//! A cascade (early exit): a cheap step answers when it is confident enough; otherwise the
//! next, bigger step runs (a larger model, the fp32 model behind an int8 one, the GPU).
//!
//! Every stage but the last has an [`Exit`]: which output holds the class scores, how its
//! [`Confidence`] is measured, and the threshold at or above which the stage answers. A
//! stage that fails (an error, its budget, an open breaker) passes the request on; when the
//! last stage fails, the most recent earlier answer is returned with the last stage's
//! [`crate::Failure`] rather than nothing. [`Calibration`] picks a threshold from data.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern::{Outputs, Tensor};

use crate::error::{Error, Result};
use crate::step::{self, Answer, Inputs, Step};

/// An app's confidence measure of a stage's outputs.
pub type ConfidenceFn = Arc<dyn Fn(&Outputs) -> Result<f32> + Send + Sync>;

/// Input names and element types, sorted by name.
type InputTypes = Vec<(String, Option<tern::DType>)>;

/// How sure a stage is of its answer, from one output's scores along its last axis (each
/// row of a batch measured alone; the batch's confidence is its least sure row's).
#[derive(Clone)]
pub enum Confidence {
    /// The largest probability (1 / classes … 1).
    MaxProbability,
    /// The largest probability minus the second largest (0 … 1).
    Margin,
    /// 1 − entropy / ln(classes): 1 for a one-hot answer, 0 for a uniform one.
    Entropy,
    /// The app's own measure of the stage's outputs.
    Custom(ConfidenceFn),
}

impl std::fmt::Debug for Confidence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Confidence::MaxProbability => "MaxProbability",
            Confidence::Margin => "Margin",
            Confidence::Entropy => "Entropy",
            Confidence::Custom(_) => "Custom(..)",
        })
    }
}

/// When a stage answers instead of passing the request on.
#[derive(Debug, Clone)]
pub struct Exit {
    /// The output holding the class scores.
    pub output: String,
    /// How confidence is measured.
    pub confidence: Confidence,
    /// The stage answers when its confidence is at least this.
    pub threshold: f32,
    /// Whether the scores are logits (softmax is applied first) rather than probabilities.
    pub logits: bool,
}

impl Exit {
    /// Exit when `confidence` of `output`'s probabilities reaches `threshold`.
    pub fn new(output: impl Into<String>, confidence: Confidence, threshold: f32) -> Exit {
        Exit {
            output: output.into(),
            confidence,
            threshold,
            logits: false,
        }
    }

    /// The scores are logits: softmax them before measuring.
    pub fn logits(mut self) -> Exit {
        self.logits = true;
        self
    }

    /// The confidence of `outputs` (the least sure row's).
    pub fn measure(&self, outputs: &Outputs) -> Result<f32> {
        if let Confidence::Custom(f) = &self.confidence {
            return f(outputs);
        }
        let rows = self.rows(outputs)?;
        let mut least = f32::INFINITY;
        for p in &rows {
            let c = match self.confidence {
                Confidence::MaxProbability => p.iter().copied().fold(0.0, f32::max),
                Confidence::Margin => {
                    let (a, b) = top2(p);
                    a - b
                }
                Confidence::Entropy => {
                    let h: f32 = p.iter().filter(|&&x| x > 0.0).map(|&x| -x * x.ln()).sum();
                    match p.len() {
                        0 | 1 => 1.0,
                        n => 1.0 - h / (n as f32).ln(),
                    }
                }
                Confidence::Custom(_) => unreachable!("handled above"),
            };
            least = least.min(c);
        }
        Ok(least)
    }

    /// The output's rows as probabilities.
    fn rows(&self, outputs: &Outputs) -> Result<Vec<Vec<f32>>> {
        let rows = scores(outputs, &self.output)?;
        Ok(if self.logits {
            rows.into_iter().map(|r| softmax(&r)).collect()
        } else {
            rows
        })
    }
}

/// `output`'s values as rows along its last axis.
pub(crate) fn scores(outputs: &Outputs, output: &str) -> Result<Vec<Vec<f32>>> {
    let t: &Tensor = outputs.get(output).ok_or_else(|| Error::BadFlow {
        flow: String::new(),
        reason: format!("no output {output:?} to measure"),
    })?;
    let values = t.to_f32_vec()?;
    let width = t.shape().last().copied().unwrap_or(1).max(1);
    if values.is_empty() {
        return Err(Error::BadFlow {
            flow: String::new(),
            reason: format!("output {output:?} is empty"),
        });
    }
    Ok(values.chunks(width).map(<[f32]>::to_vec).collect())
}

/// The index of each row's largest value.
pub(crate) fn argmax_rows(rows: &[Vec<f32>]) -> Vec<usize> {
    rows.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0
        })
        .collect()
}

/// The two largest values; a single class has no runner-up (its margin is its value).
fn top2(p: &[f32]) -> (f32, f32) {
    let (a, b) = p
        .iter()
        .fold((f32::NEG_INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
            if x > a {
                (x, a)
            } else {
                (a, b.max(x))
            }
        });
    (a, if b.is_finite() { b } else { 0.0 })
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// A cascade's answer.
#[derive(Debug, Clone)]
pub struct CascadeAnswer {
    /// The answering stage's answer (its source, and the last stage's failure when an
    /// earlier stage answered because the last one failed).
    pub answer: Answer,
    /// The index of the stage that answered.
    pub stage: usize,
    /// The confidence of each stage that ran and has an exit, in order.
    pub confidences: Vec<f32>,
    /// How long the request took.
    pub elapsed: Duration,
}

/// Requests and exits per stage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CascadeStats {
    /// Requests answered.
    pub requests: u64,
    /// Requests answered by each stage.
    pub exits: Vec<u64>,
}

impl CascadeStats {
    /// The share of answered requests stage `i` answered.
    pub fn exit_rate(&self, i: usize) -> f64 {
        match self.requests {
            0 => 0.0,
            n => self.exits.get(i).copied().unwrap_or(0) as f64 / n as f64,
        }
    }
}

/// A cascade of steps (see the module docs). `Send + Sync`; share it in an `Arc`.
#[derive(Debug)]
pub struct Cascade {
    name: String,
    stages: Vec<(Step, Option<Exit>)>,
    deadline: Option<Duration>,
    requests: AtomicU64,
    exits: Vec<AtomicU64>,
}

/// Builds a [`Cascade`]; from [`Cascade::builder`].
#[derive(Debug)]
pub struct CascadeBuilder {
    name: String,
    stages: Vec<(Step, Option<Exit>)>,
    deadline: Option<Duration>,
}

impl Cascade {
    /// A cascade called `name` (its span's name in telemetry).
    pub fn builder(name: impl Into<String>) -> CascadeBuilder {
        CascadeBuilder {
            name: name.into(),
            stages: Vec::new(),
            deadline: None,
        }
    }

    /// Runs the request through the stages until one answers.
    pub fn run(&self, inputs: &Inputs) -> Result<CascadeAnswer> {
        let start = Instant::now();
        let deadline = self.deadline.map(|d| start + d);
        let mut span = self.stages.first().and_then(|(s, _)| s.span());
        if let Some(span) = span.as_mut() {
            span.model = self.name.clone();
        }
        let mut confidences = Vec::new();
        let mut earlier: Option<(usize, Answer)> = None;
        let mut result = Err(Error::BadFlow {
            flow: self.name.clone(),
            reason: "no stage".into(),
        });
        for (i, (step, exit)) in self.stages.iter().enumerate() {
            let r = step.run_until(inputs, deadline);
            if let Some(span) = span.as_mut() {
                span.stages.push(step::stage(step.name(), &r));
            }
            match (r, exit) {
                (Ok(answer), Some(exit)) => {
                    let c = exit
                        .measure(&answer.outputs)
                        .map_err(|e| e.in_flow(&self.name))?;
                    confidences.push(c);
                    if c >= exit.threshold {
                        result = Ok((i, answer));
                        break;
                    }
                    earlier = Some((i, answer));
                }
                (Ok(answer), None) => {
                    result = Ok((i, answer));
                    break;
                }
                (Err(e), _) => {
                    let last = i + 1 == self.stages.len();
                    if last {
                        result = match earlier.take() {
                            Some((j, mut answer)) => {
                                answer.failure = Some(crate::Failure::of(&e));
                                Ok((j, answer))
                            }
                            None => Err(e),
                        };
                    }
                }
            }
        }
        let result = result.map(|(stage, answer)| {
            self.requests.fetch_add(1, Ordering::Relaxed);
            self.exits[stage].fetch_add(1, Ordering::Relaxed);
            CascadeAnswer {
                answer,
                stage,
                confidences,
                elapsed: start.elapsed(),
            }
        });
        if let Some(span) = span.as_mut() {
            span.outcome = match &result {
                Ok(a) if a.answer.failure.is_some() => tern::telemetry::Outcome::Fallback,
                Ok(a) => a.answer.source.outcome(),
                Err(Error::Timeout { .. }) => tern::telemetry::Outcome::Timeout,
                Err(e) => tern::telemetry::Outcome::Error(e.telemetry_kind()),
            };
        }
        if let Some((s, _)) = self.stages.first() {
            s.record(span);
        }
        result
    }

    /// The cascade's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of stage `i`'s step.
    pub fn stage_name(&self, i: usize) -> &str {
        self.stages.get(i).map_or("", |(s, _)| s.name())
    }

    /// The first stage's declared inputs and the last stage's declared outputs.
    pub(crate) fn signature(&self) -> Option<crate::step::Signature> {
        Some(crate::step::Signature {
            inputs: self.stages.first()?.0.signature()?.inputs.clone(),
            outputs: self.stages.last()?.0.signature()?.outputs.clone(),
        })
    }

    /// Requests and exits per stage so far.
    pub fn stats(&self) -> CascadeStats {
        CascadeStats {
            requests: self.requests.load(Ordering::Relaxed),
            exits: self
                .exits
                .iter()
                .map(|e| e.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

impl CascadeBuilder {
    /// Adds a stage that answers when `exit` says it is confident enough.
    pub fn stage(mut self, step: Step, exit: Exit) -> Self {
        self.stages.push((step, Some(exit)));
        self
    }

    /// Adds the last stage, which always answers.
    pub fn last(mut self, step: Step) -> Self {
        self.stages.push((step, None));
        self
    }

    /// The whole request's deadline: a stage gets what is left of it (default: none).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The cascade. Fails with [`Error::BadFlow`] when there is no last stage (or a stage
    /// after it), an exit reads an output its session does not have, a threshold is not
    /// a number, or the sessions' inputs differ (each stage gets the same inputs); with
    /// [`Error::InvalidOption`] for a deadline of 0.
    pub fn build(self) -> Result<Cascade> {
        let bad = |reason: String| {
            Err(Error::BadFlow {
                flow: self.name.clone(),
                reason,
            })
        };
        if self.deadline.is_some_and(|d| d.is_zero()) {
            return Err(Error::InvalidOption {
                reason: format!("cascade {:?}: a deadline of 0 can never be met", self.name),
            });
        }
        match self.stages.iter().position(|(_, e)| e.is_none()) {
            None => return bad("no last stage (one without an exit)".into()),
            Some(i) if i + 1 != self.stages.len() => {
                return bad(format!(
                    "stage {:?} has no exit, so the stages after it never run",
                    self.stages[i].0.name()
                ))
            }
            Some(_) => {}
        }
        let mut first_inputs: Option<(&str, InputTypes)> = None;
        for (step, exit) in &self.stages {
            let Some(sig) = step.signature() else {
                continue;
            };
            if let Some(exit) = exit {
                if !exit.threshold.is_finite() {
                    return bad(format!(
                        "stage {:?}: the threshold is not a number",
                        step.name()
                    ));
                }
                if !matches!(exit.confidence, Confidence::Custom(_))
                    && !sig.outputs.iter().any(|o| o.name == exit.output)
                {
                    return bad(format!(
                        "stage {:?} exits on output {:?}, which its model does not have (it has {:?})",
                        step.name(),
                        exit.output,
                        sig.outputs.iter().map(|o| &o.name).collect::<Vec<_>>()
                    ));
                }
            }
            let mut inputs: Vec<_> = sig
                .inputs
                .iter()
                .map(|i| (i.name.clone(), i.dtype))
                .collect();
            inputs.sort_by(|a, b| a.0.cmp(&b.0));
            match &first_inputs {
                None => first_inputs = Some((step.name(), inputs)),
                Some((first, want)) if *want != inputs => {
                    return bad(format!(
                        "stages {first:?} and {:?} take different inputs ({want:?} vs {inputs:?}); every stage gets the same inputs",
                        step.name()
                    ))
                }
                Some(_) => {}
            }
        }
        let exits = self.stages.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Cascade {
            name: self.name,
            stages: self.stages,
            deadline: self.deadline,
            requests: AtomicU64::new(0),
            exits,
        })
    }
}

/// One threshold's outcome in a [`Calibration`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CalibrationPoint {
    /// The threshold.
    pub threshold: f32,
    /// The share of samples the first stage would answer.
    pub exit_rate: f64,
    /// The share of samples whose cascade answer (the first stage's class when it exits,
    /// else the second's) equals the reference: the label, or the second stage's class.
    pub agreement: f64,
}

/// Exit rate against agreement for a range of thresholds, from running a small and a big
/// step once on each sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// One point per threshold, in the order asked.
    pub points: Vec<CalibrationPoint>,
}

impl Calibration {
    /// Runs `small` and `big` on every sample, measures the small step's confidence with
    /// `exit` (its threshold is ignored), and sweeps `thresholds`. The reference is
    /// `labels` (one class per sample) when given, else the big step's class (the argmax
    /// of `exit.output` in both steps' outputs).
    pub fn run(
        small: &Step,
        big: &Step,
        exit: &Exit,
        samples: &[Vec<(String, Tensor)>],
        labels: Option<&[usize]>,
        thresholds: &[f32],
    ) -> Result<Calibration> {
        if labels.is_some_and(|l| l.len() != samples.len()) {
            return Err(Error::InvalidOption {
                reason: "calibration needs one label per sample".into(),
            });
        }
        let mut measured = Vec::with_capacity(samples.len());
        for (i, sample) in samples.iter().enumerate() {
            let s = small.run_until(sample, None)?.outputs;
            let b = big.run_until(sample, None)?.outputs;
            let small_class = argmax_rows(&scores(&s, &exit.output)?);
            let big_class = argmax_rows(&scores(&b, &exit.output)?);
            let reference = match labels {
                Some(l) => vec![l[i]; small_class.len()],
                None => big_class.clone(),
            };
            measured.push((
                exit.measure(&s)?,
                small_class == reference,
                big_class == reference,
            ));
        }
        let n = measured.len().max(1) as f64;
        let points = thresholds
            .iter()
            .map(|&t| {
                let exits = measured.iter().filter(|m| m.0 >= t).count();
                let agree = measured
                    .iter()
                    .filter(|m| if m.0 >= t { m.1 } else { m.2 })
                    .count();
                CalibrationPoint {
                    threshold: t,
                    exit_rate: exits as f64 / n,
                    agreement: agree as f64 / n,
                }
            })
            .collect();
        Ok(Calibration { points })
    }

    /// The point with the highest exit rate whose agreement is at least `target` (the
    /// lowest such threshold on ties), if any.
    pub fn pick(&self, target: f64) -> Option<CalibrationPoint> {
        self.points
            .iter()
            .filter(|p| p.agreement >= target)
            .copied()
            .max_by(|a, b| {
                a.exit_rate
                    .total_cmp(&b.exit_rate)
                    .then(b.threshold.total_cmp(&a.threshold))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probs(p: &[f32]) -> Outputs {
        Outputs::from_pairs(vec![(
            "p".into(),
            Tensor::from_slice(&[1, p.len()], p).expect("tensor"),
        )])
    }

    #[test]
    fn confidence_measures() {
        let o = probs(&[0.7, 0.2, 0.1]);
        let m = |c| Exit::new("p", c, 0.5).measure(&o).expect("measure");
        assert!((m(Confidence::MaxProbability) - 0.7).abs() < 1e-6);
        assert!((m(Confidence::Margin) - 0.5).abs() < 1e-6);
        let h = -(0.7f32 * 0.7f32.ln() + 0.2 * 0.2f32.ln() + 0.1 * 0.1f32.ln());
        assert!((m(Confidence::Entropy) - (1.0 - h / 3f32.ln())).abs() < 1e-6);
        let uniform = probs(&[0.25; 4]);
        let e = Exit::new("p", Confidence::Entropy, 0.5)
            .measure(&uniform)
            .expect("measure");
        assert!(e.abs() < 1e-6, "uniform has no confidence: {e}");
        // Logits: softmax([ln 7, ln 2, ln 1]) = [0.7, 0.2, 0.1].
        let logits = probs(&[7f32.ln(), 2f32.ln(), 0.0]);
        let l = Exit::new("p", Confidence::MaxProbability, 0.5).logits();
        assert!((l.measure(&logits).expect("measure") - 0.7).abs() < 1e-6);
        // A batch is as sure as its least sure row.
        let batch = Outputs::from_pairs(vec![(
            "p".into(),
            Tensor::from_slice(&[2, 2], &[0.9f32, 0.1, 0.6, 0.4]).expect("tensor"),
        )]);
        let b = Exit::new("p", Confidence::MaxProbability, 0.5)
            .measure(&batch)
            .expect("measure");
        assert!((b - 0.6).abs() < 1e-6);
        assert!(matches!(
            Exit::new("q", Confidence::Margin, 0.5).measure(&o),
            Err(Error::BadFlow { .. })
        ));
    }

    #[test]
    fn pick_takes_the_highest_exit_rate_that_meets_the_target() {
        let point = |threshold, exit_rate, agreement| CalibrationPoint {
            threshold,
            exit_rate,
            agreement,
        };
        let c = Calibration {
            points: vec![
                point(0.5, 0.95, 0.90),
                point(0.7, 0.80, 0.97),
                point(0.8, 0.80, 0.99),
                point(0.9, 0.60, 1.00),
            ],
        };
        assert_eq!(c.pick(0.97).map(|p| p.threshold), Some(0.7));
        assert_eq!(c.pick(0.995).map(|p| p.threshold), Some(0.9));
        assert_eq!(c.pick(1.01), None);
    }
}
