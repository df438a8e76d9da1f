//! Flow files: request-path flows described in TOML (or JSON) and built into runnable
//! [`Flows`] — what `tern flow FLOW.toml` runs and what the bindings load, so a device
//! can change its flows without new code.
//!
//! ```toml
//! [sessions.small]                 # a model, loaded once, shared by the steps that use it
//! model = "cls_int8.onnx"          # relative to the file
//! threads = 1                      # optional; also `backend = "cpu" | "gpu" | "auto"`
//!
//! [sessions.big]
//! model = "cls.onnx"
//!
//! [caches.shared]                  # a result cache, shared by the steps that name it
//! ttl_ms = 60000
//! max_bytes = 16777216
//!
//! [steps.small]
//! session = "small"                # or `callback = "name"` (given by the app), or `flow = "name"`
//! budget_ms = 50
//! cache = "shared"
//! breaker = { failures = 3, window_ms = 30000, cooldown_ms = 10000 }
//! fallbacks = ["last_good", { rule = "callback-name" }, { static = { label = "unknown.npy" } }]
//!
//! [steps.big]
//! session = "big"
//!
//! [flows.classify]
//! cascade = [
//!   { step = "small", exit = { output = "prob", confidence = "max_probability", threshold = 0.6 } },
//!   { step = "big" },
//! ]
//! deadline_ms = 100
//!
//! [flows.both]
//! fan_out = [{ step = "small" }, { step = "big", weight = 2.0 }]
//! merge = "weighted_mean"          # or "first_good", or { vote = "prob" }
//! deadline_ms = 30
//!
//! [flows.pre_then_model]
//! pipeline = ["normalise", "big"]
//! ```
//!
//! Everything is checked when the file is built, before any request: unknown fields,
//! sessions, caches, callbacks, steps and flows; a step or flow that is neither or both of
//! its kinds; flows that use each other in a cycle (through `flow = …` steps); and every
//! flow's own checks (a cascade's exits against its models' outputs, a pipeline's step
//! outputs against the next step's inputs, zero deadlines, budgets and cache sizes). Each
//! failure is a typed [`Error`] naming the file and what is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tern::{Backend, Model, Outputs, Session, SessionOptions, Tensor};

use crate::breaker::{BreakerOptions, BreakerState};
use crate::cache::{CacheOptions, CacheStats, ResultCache};
use crate::cascade::{Cascade, Confidence, Exit};
use crate::error::{Error, Result};
use crate::fanout::{FanOut, Merge};
use crate::flow::{Flow, FlowAnswer};
use crate::pipeline::Pipeline;
use crate::step::{Compute, Fallback, Inputs, Step, StepStats};

/// The largest flow file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// A flow file as written (see the module docs); [`FlowFile::build`] turns it into
/// [`Flows`].
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowFile {
    /// Models by name.
    #[serde(default)]
    pub sessions: BTreeMap<String, SessionSpec>,
    /// Result caches by name.
    #[serde(default)]
    pub caches: BTreeMap<String, CacheSpec>,
    /// Steps by name.
    #[serde(default)]
    pub steps: BTreeMap<String, StepSpec>,
    /// Flows by name.
    #[serde(default)]
    pub flows: BTreeMap<String, FlowSpec>,
}

/// A model the flows run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    /// The ONNX model, relative to the flow file.
    pub model: PathBuf,
    /// The backend (default: the build options').
    pub backend: Option<Backend>,
    /// CPU threads (default: the build options').
    pub threads: Option<usize>,
}

/// A result cache's limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    /// Milliseconds an entry answers (default [`CacheOptions::default`]'s).
    pub ttl_ms: Option<u64>,
    /// The byte budget (default [`CacheOptions::default`]'s).
    pub max_bytes: Option<u64>,
}

/// A step: exactly one of `session`, `callback` and `flow`, and what protects it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Runs this session.
    pub session: Option<String>,
    /// Runs the app's callback of this name ([`BuildOptions::callback`]).
    pub callback: Option<String>,
    /// Runs this flow.
    pub flow: Option<String>,
    /// The latency budget in milliseconds.
    pub budget_ms: Option<u64>,
    /// The result cache, by name.
    pub cache: Option<String>,
    /// A circuit breaker.
    pub breaker: Option<BreakerSpec>,
    /// Fallbacks, tried in order.
    #[serde(default)]
    pub fallbacks: Vec<FallbackSpec>,
    /// Timed-out runs that may still be running before the step answers busy.
    pub max_abandoned: Option<usize>,
}

/// A circuit breaker's settings (defaults: [`BreakerOptions::default`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSpec {
    /// Failures within the window that open it.
    pub failures: Option<u32>,
    /// The window, in milliseconds.
    pub window_ms: Option<u64>,
    /// How long it stays open, in milliseconds.
    pub cooldown_ms: Option<u64>,
}

/// A fallback: `"last_good"`, `{ rule = "callback" }` or `{ static = { output = "file" } }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FallbackSpec {
    /// [`Fallback::LastGood`].
    LastGood,
    /// [`Fallback::Rule`] with the app's callback of this name.
    Rule(String),
    /// [`Fallback::Static`]: each output read from a `.npy` or JSON tensor file.
    Static(BTreeMap<String, PathBuf>),
}

/// A flow: exactly one of `cascade`, `fan_out` and `pipeline`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSpec {
    /// A cascade's stages; all but the last have an exit.
    pub cascade: Option<Vec<StageSpec>>,
    /// A fan-out's steps.
    pub fan_out: Option<Vec<BranchSpec>>,
    /// A pipeline's steps, in order.
    pub pipeline: Option<Vec<String>>,
    /// The request's deadline in milliseconds (a fan-out must have one).
    pub deadline_ms: Option<u64>,
    /// A fan-out's merge (default `weighted_mean`).
    pub merge: Option<MergeSpec>,
    /// A fan-out's fewest answers (default 1).
    pub min_answers: Option<usize>,
}

/// A cascade stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// The step.
    pub step: String,
    /// When it answers; the last stage has none.
    pub exit: Option<ExitSpec>,
}

/// A cascade stage's exit ([`Exit`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitSpec {
    /// The output holding the class scores.
    pub output: String,
    /// How confidence is measured.
    pub confidence: ConfidenceSpec,
    /// The stage answers at or above it.
    pub threshold: f32,
    /// The scores are logits.
    #[serde(default)]
    pub logits: bool,
}

/// [`Confidence`] as written.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceSpec {
    /// [`Confidence::MaxProbability`].
    MaxProbability,
    /// [`Confidence::Margin`].
    Margin,
    /// [`Confidence::Entropy`].
    Entropy,
}

/// A fan-out step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchSpec {
    /// The step.
    pub step: String,
    /// Its weight in the merge (default 1).
    pub weight: Option<f32>,
}

/// [`Merge`] as written: `"weighted_mean"`, `"first_good"` or `{ vote = "output" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MergeSpec {
    /// [`Merge::WeightedMean`].
    WeightedMean,
    /// [`Merge::FirstGood`].
    FirstGood,
    /// [`Merge::Vote`] on this output.
    Vote(String),
}

/// What a flow file is built with besides itself.
#[derive(Clone, Default)]
pub struct BuildOptions {
    /// Where relative paths start (the file's folder for [`FlowFile::load`]).
    pub base_dir: PathBuf,
    /// Options every session starts from (threads, telemetry, …).
    pub session: SessionOptions,
    /// The app's callbacks, by the names the file uses.
    pub callbacks: BTreeMap<String, Arc<dyn Compute>>,
}

impl std::fmt::Debug for BuildOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildOptions")
            .field("base_dir", &self.base_dir)
            .field("callbacks", &self.callbacks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl BuildOptions {
    /// Relative paths start at `dir`.
    pub fn base_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.base_dir = dir.into();
        self
    }

    /// Sessions start from `options`.
    pub fn session(mut self, options: SessionOptions) -> Self {
        self.session = options;
        self
    }

    /// The file's `callback = name` steps and `rule = name` fallbacks run `compute`.
    pub fn callback(mut self, name: impl Into<String>, compute: Arc<dyn Compute>) -> Self {
        self.callbacks.insert(name.into(), compute);
        self
    }
}

/// The flows of a built file, by name. `Send + Sync`; share it in an `Arc`.
#[derive(Debug)]
pub struct Flows {
    flows: BTreeMap<String, Arc<Flow>>,
    steps: BTreeMap<String, Step>,
    caches: BTreeMap<String, ResultCache>,
}

impl Flows {
    /// Runs flow `name` once; [`Error::BadFlow`] for a name the file does not have.
    pub fn run(&self, name: &str, inputs: &Inputs) -> Result<FlowAnswer> {
        self.get(name)
            .ok_or_else(|| Error::BadFlow {
                flow: name.to_string(),
                reason: format!("no such flow (there are {:?})", self.names()),
            })?
            .run(inputs)
    }

    /// The flow called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Flow>> {
        self.flows.get(name)
    }

    /// The flows' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.flows.keys().cloned().collect()
    }

    /// Counters of every step, by name.
    pub fn step_stats(&self) -> BTreeMap<String, StepStats> {
        self.steps
            .iter()
            .map(|(n, s)| (n.clone(), s.stats()))
            .collect()
    }

    /// Every step's breaker state, by name (`Closed` for a step without one).
    pub fn breaker_states(&self) -> BTreeMap<String, BreakerState> {
        self.steps
            .iter()
            .map(|(n, s)| (n.clone(), s.breaker_state()))
            .collect()
    }

    /// Hits and misses of every cache, by name.
    pub fn cache_stats(&self) -> BTreeMap<String, CacheStats> {
        self.caches
            .iter()
            .map(|(n, c)| (n.clone(), c.stats()))
            .collect()
    }
}

impl FlowFile {
    /// Parses TOML.
    pub fn from_toml(text: &str) -> Result<FlowFile> {
        toml::from_str(text).map_err(|e| bad_file(format!("not a valid flow file: {e}")))
    }

    /// Parses JSON.
    pub fn from_json(text: &str) -> Result<FlowFile> {
        serde_json::from_str(text).map_err(|e| bad_file(format!("not a valid flow file: {e}")))
    }

    /// Reads a `.json` file as JSON and anything else as TOML, and builds it with relative
    /// paths starting at the file's folder.
    pub fn load(path: &Path, options: BuildOptions) -> Result<Flows> {
        let bytes = tern::fs::read_regular(path, MAX_FILE_BYTES).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let text = String::from_utf8(bytes)
            .map_err(|_| bad_file(format!("{} is not UTF-8 text", path.display())))?;
        let file = if path.extension().is_some_and(|e| e == "json") {
            FlowFile::from_json(&text)
        } else {
            FlowFile::from_toml(&text)
        }
        .map_err(|e| in_file(e, path))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        file.build(options.base_dir(base))
            .map_err(|e| in_file(e, path))
    }

    /// Loads the sessions, builds the caches, steps and flows, and checks them all (see
    /// the module docs).
    pub fn build(&self, options: BuildOptions) -> Result<Flows> {
        if self.flows.is_empty() {
            return Err(bad_file("no flow ([flows.NAME])".into()));
        }
        let order = self.flow_order()?;
        let mut b = Builder {
            file: self,
            options: &options,
            sessions: BTreeMap::new(),
            caches: BTreeMap::new(),
            steps: BTreeMap::new(),
            flows: BTreeMap::new(),
        };
        for name in order {
            let flow = b.flow(&name)?;
            b.flows.insert(name, Arc::new(flow));
        }
        // Steps no flow uses are still checked.
        for name in self.steps.keys() {
            b.step(name)?;
        }
        Ok(Flows {
            flows: b.flows,
            steps: b.steps,
            caches: b.caches,
        })
    }

    /// The flows in an order where every flow comes after the flows its steps run; a
    /// cycle is [`Error::BadFlow`] naming it.
    fn flow_order(&self) -> Result<Vec<String>> {
        // Flow → the flows its steps run.
        let mut uses: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (name, spec) in &self.flows {
            let mut used = BTreeSet::new();
            for step in spec.step_names() {
                let s = self.steps.get(step).ok_or_else(|| {
                    bad_file(format!(
                        "flow {name:?} uses step {step:?}, which is not in [steps]"
                    ))
                })?;
                if let Some(f) = &s.flow {
                    if !self.flows.contains_key(f) {
                        return Err(bad_file(format!(
                            "step {step:?} runs flow {f:?}, which is not in [flows]"
                        )));
                    }
                    used.insert(f.as_str());
                }
            }
            uses.insert(name, used);
        }
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            Open,
            Done,
        }
        fn visit<'a>(
            name: &'a str,
            uses: &BTreeMap<&'a str, BTreeSet<&'a str>>,
            marks: &mut BTreeMap<&'a str, Mark>,
            path: &mut Vec<&'a str>,
            order: &mut Vec<String>,
        ) -> Result<()> {
            match marks.get(name) {
                Some(Mark::Done) => return Ok(()),
                Some(Mark::Open) => {
                    let from = path.iter().position(|p| *p == name).unwrap_or(0);
                    let mut cycle: Vec<&str> = path[from..].to_vec();
                    cycle.push(name);
                    return Err(bad_file(format!(
                        "flows use each other in a cycle: {}",
                        cycle.join(" → ")
                    )));
                }
                None => {}
            }
            marks.insert(name, Mark::Open);
            path.push(name);
            for next in uses.get(name).into_iter().flatten() {
                visit(next, uses, marks, path, order)?;
            }
            path.pop();
            marks.insert(name, Mark::Done);
            order.push(name.to_string());
            Ok(())
        }
        let mut marks = BTreeMap::new();
        let mut order = Vec::new();
        for name in uses.keys() {
            visit(name, &uses, &mut marks, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }
}

impl FlowSpec {
    fn step_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        names.extend(self.cascade.iter().flatten().map(|s| s.step.as_str()));
        names.extend(self.fan_out.iter().flatten().map(|s| s.step.as_str()));
        names.extend(self.pipeline.iter().flatten().map(String::as_str));
        names
    }
}

/// Builds one file's parts once each, on demand.
struct Builder<'a> {
    file: &'a FlowFile,
    options: &'a BuildOptions,
    sessions: BTreeMap<String, Arc<Session>>,
    caches: BTreeMap<String, ResultCache>,
    steps: BTreeMap<String, Step>,
    flows: BTreeMap<String, Arc<Flow>>,
}

impl Builder<'_> {
    fn path(&self, p: &Path) -> PathBuf {
        self.options.base_dir.join(p)
    }

    fn session(&mut self, name: &str) -> Result<Arc<Session>> {
        if let Some(s) = self.sessions.get(name) {
            return Ok(s.clone());
        }
        let spec = self
            .file
            .sessions
            .get(name)
            .ok_or_else(|| bad_file(format!("no session {name:?} in [sessions]")))?;
        let mut options = self.options.session.clone();
        if let Some(b) = spec.backend {
            options = options.backend(b);
        }
        if let Some(t) = spec.threads {
            options = options.threads(t);
        }
        let model = Model::load(self.path(&spec.model))?;
        let session = Arc::new(Session::new(&model, options)?);
        self.sessions.insert(name.to_string(), session.clone());
        Ok(session)
    }

    fn cache(&mut self, name: &str) -> Result<ResultCache> {
        if let Some(c) = self.caches.get(name) {
            return Ok(c.clone());
        }
        let spec = self
            .file
            .caches
            .get(name)
            .ok_or_else(|| bad_file(format!("no cache {name:?} in [caches]")))?;
        let mut options = CacheOptions::default();
        if let Some(ms) = spec.ttl_ms {
            options = options.ttl(Some(Duration::from_millis(ms)));
        }
        if let Some(b) = spec.max_bytes {
            options = options.max_bytes(b);
        }
        let cache = ResultCache::new(options)
            .map_err(|e| invalid(format!("cache {name:?}: {}", reason(&e))))?;
        self.caches.insert(name.to_string(), cache.clone());
        Ok(cache)
    }

    fn callback(&self, name: &str, user: &str) -> Result<Arc<dyn Compute>> {
        self.options.callbacks.get(name).cloned().ok_or_else(|| {
            bad_file(format!(
                "{user} uses callback {name:?}, which the app did not give (it gave {:?})",
                self.options.callbacks.keys().collect::<Vec<_>>()
            ))
        })
    }

    fn step(&mut self, name: &str) -> Result<Step> {
        if let Some(s) = self.steps.get(name) {
            return Ok(s.clone());
        }
        let spec = self
            .file
            .steps
            .get(name)
            .ok_or_else(|| bad_file(format!("no step {name:?} in [steps]")))?;
        let user = format!("step {name:?}");
        let mut b = match (&spec.session, &spec.callback, &spec.flow) {
            (Some(s), None, None) => Step::session(name, self.session(s)?),
            (None, Some(c), None) => Step::compute(name, self.callback(c, &user)?),
            (None, None, Some(f)) => {
                let flow = self.flows.get(f).cloned().ok_or_else(|| {
                    bad_file(format!("{user} runs flow {f:?}, which is not built yet"))
                })?;
                Step::flow(name, flow)
            }
            _ => {
                return Err(bad_file(format!(
                    "{user} needs exactly one of session, callback and flow"
                )))
            }
        };
        if let Some(ms) = spec.budget_ms {
            b = b.budget(Duration::from_millis(ms));
        }
        if let Some(c) = &spec.cache {
            b = b.cache(&self.cache(c)?);
        }
        if let Some(br) = &spec.breaker {
            let mut o = BreakerOptions::default();
            if let Some(n) = br.failures {
                o = o.failures(n);
            }
            if let Some(ms) = br.window_ms {
                o = o.window(Duration::from_millis(ms));
            }
            if let Some(ms) = br.cooldown_ms {
                o = o.cooldown(Duration::from_millis(ms));
            }
            b = b.breaker(o);
        }
        if let Some(n) = spec.max_abandoned {
            b = b.max_abandoned(n);
        }
        for f in &spec.fallbacks {
            b = b.fallback(match f {
                FallbackSpec::LastGood => Fallback::LastGood,
                FallbackSpec::Rule(c) => Fallback::Rule(self.callback(c, &user)?),
                FallbackSpec::Static(files) => {
                    let mut outputs = Vec::new();
                    for (output, file) in files {
                        outputs.push((output.clone(), Tensor::read_file(&self.path(file))?));
                    }
                    Fallback::Static(Outputs::from_pairs(outputs))
                }
            });
        }
        let step = b.build()?;
        self.steps.insert(name.to_string(), step.clone());
        Ok(step)
    }

    fn flow(&mut self, name: &str) -> Result<Flow> {
        let spec = &self.file.flows[name];
        let deadline = spec.deadline_ms.map(Duration::from_millis);
        let kinds = [
            spec.cascade.is_some(),
            spec.fan_out.is_some(),
            spec.pipeline.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(bad_file(format!(
                "flow {name:?} needs exactly one of cascade, fan_out and pipeline"
            )));
        }
        let fan_out_only = spec.merge.is_some() || spec.min_answers.is_some();
        if fan_out_only && spec.fan_out.is_none() {
            return Err(bad_file(format!(
                "flow {name:?}: merge and min_answers are for fan_out flows"
            )));
        }
        let flow = if let Some(stages) = &spec.cascade {
            let mut c = Cascade::builder(name);
            for stage in stages {
                let step = self.step(&stage.step)?;
                c = match &stage.exit {
                    Some(e) => {
                        let confidence = match e.confidence {
                            ConfidenceSpec::MaxProbability => Confidence::MaxProbability,
                            ConfidenceSpec::Margin => Confidence::Margin,
                            ConfidenceSpec::Entropy => Confidence::Entropy,
                        };
                        let mut exit = Exit::new(&e.output, confidence, e.threshold);
                        if e.logits {
                            exit = exit.logits();
                        }
                        c.stage(step, exit)
                    }
                    None => c.last(step),
                };
            }
            if let Some(d) = deadline {
                c = c.deadline(d);
            }
            Flow::Cascade(c.build()?)
        } else if let Some(branches) = &spec.fan_out {
            let deadline = deadline
                .ok_or_else(|| bad_file(format!("flow {name:?}: a fan_out needs a deadline_ms")))?;
            let mut f = FanOut::builder(name, deadline);
            for branch in branches {
                f = f.weighted(self.step(&branch.step)?, branch.weight.unwrap_or(1.0));
            }
            if let Some(m) = &spec.merge {
                f = f.merge(match m {
                    MergeSpec::WeightedMean => Merge::WeightedMean,
                    MergeSpec::FirstGood => Merge::FirstGood,
                    MergeSpec::Vote(output) => Merge::Vote {
                        output: output.clone(),
                    },
                });
            }
            if let Some(n) = spec.min_answers {
                f = f.min_answers(n);
            }
            Flow::FanOut(f.build()?)
        } else {
            let mut p = Pipeline::builder(name);
            for step in spec.pipeline.iter().flatten() {
                p = p.step(self.step(step)?);
            }
            if let Some(d) = deadline {
                p = p.deadline(d);
            }
            Flow::Pipeline(p.build()?)
        };
        Ok(flow)
    }
}

/// The name a file-level error carries until [`FlowFile::load`] names the file.
const THE_FILE: &str = "flow file";

fn bad_file(reason: String) -> Error {
    Error::BadFlow {
        flow: THE_FILE.to_string(),
        reason,
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidOption { reason }
}

/// An error's reason without its variant's prefix.
fn reason(e: &Error) -> String {
    match e {
        Error::InvalidOption { reason } | Error::BadFlow { reason, .. } => reason.clone(),
        e => e.to_string(),
    }
}

/// A file-level [`Error::BadFlow`] named after the file it was found in.
fn in_file(e: Error, path: &Path) -> Error {
    match e {
        Error::BadFlow { flow, reason } if flow == THE_FILE => Error::BadFlow {
            flow: path.display().to_string(),
            reason,
        },
        e => e,
    }
}
