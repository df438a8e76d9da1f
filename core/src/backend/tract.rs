//! CPU backend: tract's pipeline — inference graph → typed → decluttered → optimized →
//! runnable plan — and the choice of which plans to build.
//!
//! **Plans and shapes.** A model whose inputs have symbolic dimensions (`batch`,
//! `height`…) can run on one plan built for the symbolic shapes, but tract's kernels are
//! much faster when they know the sizes: a 16-channel 3×3 depthwise convolution at 112×112
//! took 5.6 ms on a symbolic batch and 0.15 ms on a concrete one. So, under
//! [`ShapePolicy::Measure`] (the default), the first run's shape gets a concrete plan of
//! its own, and its next runs race it against the symbolic plan ([`race`](super::race)).
//! If the concrete plan wins, later shapes get theirs too, each once its runs on the
//! symbolic plan have added up to what its compilation cost (the ski-rental rule: never
//! more than twice the better of always and never compiling, so a stream of ever-changing
//! widths stays on the symbolic plan); if it loses, the symbolic plan serves every run.
//! Concrete plans live in a [`PlanCache`] of the most recent [`CAPACITY`] shapes.
//!
//! Some models compile symbolically but fail at run time (tract cannot evaluate a symbol
//! at a `Resize`), and some real models do shape arithmetic tract cannot prove
//! symbolically at all (a `Concat` of feature maps of sizes `ceil(h / 32) * 8` and
//! `2 * ceil(h / 16) * 4`); onnxruntime users expect both to run. A symbolic plan that
//! fails a run is retried on a concrete plan, and the session sticks to concrete plans;
//! one that cannot be built makes every shape concrete from the start.
//!
//! **Runs.** Each plan is shared; a concurrent run takes a [`TypedSimpleState`] from the
//! plan's pool (so buffers and op states are reused between runs) and returns it
//! afterwards. With more than one thread the session owns a rayon pool handed to tract's
//! kernels — for the runs of each plan where measuring shows it helps ([`threads`]).

mod budget;
mod contracts;
mod guard;
mod linalg;
mod rewrite;
mod threads;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tract_linalg::multithread::{multithread_tract_scope, Executor as ThreadPool};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::EvalContext;

use super::plan_cache::{shape_key, PlanCache, ShapeKey, CAPACITY};
use super::race::{Arm, Outcome, Race, RaceRules};
use super::{frontend, optim};
use super::{Backend, Executor, NodeTime, PlanReport, Prepared, Ran, Specialisation};
use crate::error::{chain, Error, Result};
use crate::model::Model;
use crate::options::{OptLevel, SessionOptions, ShapePolicy, ThreadPolicy};
use crate::sync::lock;
use crate::tensor::{DType, Tensor};
use budget::Footprint;
use contracts::Contracts;

const NAME: Backend = Backend::Cpu;

fn compile_err(e: anyhow::Error) -> Error {
    Error::Compile {
        backend: NAME,
        reason: chain(&e),
    }
}

/// A failed run as tern's error: one tern raised inside the plan (a size guard's
/// [`Error::ResourceLimit`]) keeps its kind; tract's own are inference errors.
fn inference_err(e: anyhow::Error) -> Error {
    match e.downcast::<Error>() {
        Ok(e) => e,
        Err(e) => Error::Inference {
            backend: NAME,
            reason: chain(&e),
        },
    }
}

/// A runnable plan, its pool of reusable run states, and whether its runs use the threads.
struct Plan {
    plan: Arc<TypedSimplePlan>,
    states: Mutex<Vec<TypedSimpleState>>,
    /// Some op keeps state between turns (tract's `Scan` behind ONNX `LSTM`/`GRU`/`Scan`
    /// carries its hidden state over for streaming): each run then gets a fresh state,
    /// as an ONNX graph is a function of its inputs alone.
    carries_state: bool,
    /// Alone (incumbent) or with the session's pool (challenger).
    threading: Race,
    /// tern's own rewrites that replaced nodes: (pass, nodes).
    rewrites: Vec<(&'static str, usize)>,
    /// Dimension equalities its kernels rely on, checked before a run (symbolic plans).
    contracts: Contracts,
    /// The sizes of the values it computes, checked against the memory limit.
    footprint: Footprint,
    /// The session's memory limit, in bytes.
    memory_limit: u64,
    /// Input shapes that passed [`Plan::check`] (at most [`CHECKED_SHAPES`]).
    checked: Mutex<HashSet<ShapeKey>>,
}

/// Shapes remembered as checked per plan; past this the memory starts over.
const CHECKED_SHAPES: usize = 256;

impl Plan {
    /// Refuses inputs that break the plan's shape contracts or would make the run hold more
    /// than the memory limit: before any kernel runs. A shape is checked once.
    fn check(&self, key: &ShapeKey, inputs: &[Tensor]) -> Result<()> {
        if lock(&self.checked).contains(key) {
            return Ok(());
        }
        let symbols = self.contracts.symbols(inputs);
        self.contracts.check_values(&symbols)?;
        self.footprint.check(&symbols, self.memory_limit)?;
        let mut checked = lock(&self.checked);
        if checked.len() >= CHECKED_SHAPES {
            checked.clear();
        }
        checked.insert(key.clone());
        Ok(())
    }

    /// Runs the plan, on the calling thread or with `pool` as its threading race says.
    fn run(&self, inputs: &[Tensor], pool: Option<&ThreadPool>) -> Result<Vec<Tensor>> {
        let pooled = lock(&self.states).pop();
        let mut state = match pooled {
            Some(s) => s,
            None => self.plan.spawn().map_err(inference_err)?,
        };
        let inputs: TVec<TValue> = inputs
            .iter()
            .map(|t| t.tract().clone().into_tvalue())
            .collect();
        let (arm, timed) = self.threading.next();
        let executor = match (arm, pool) {
            (threads::POOL, Some(pool)) => pool.clone(),
            _ => ThreadPool::SingleThread,
        };
        // Only the measuring runs read the clock.
        let started = timed.then(Instant::now);
        // A panic in a kernel is this run's error (the state it leaves is dropped), so a
        // symbolic plan's caller can retry on a concrete plan.
        let outputs = crate::error::catch_panic("inference", || {
            multithread_tract_scope(executor, || state.run(inputs)).map_err(inference_err)
        })?;
        if let Some(started) = started {
            if let Some(o) = self.threading.record(arm, started.elapsed()) {
                tracing::debug!(
                    pool = o.winner == threads::POOL,
                    alone_ms = o.incumbent.as_secs_f64() * 1e3,
                    pool_ms = o.challenger.as_secs_f64() * 1e3,
                    "tract plan threading measured"
                );
            }
        }
        if !self.carries_state {
            lock(&self.states).push(state);
        }
        outputs
            .into_iter()
            .map(|v| Tensor::from_tract(v.into_arc_tensor()))
            .collect()
    }

    /// Runs once on the calling thread with every node timed.
    fn profile(&self, inputs: &[Tensor]) -> Result<Vec<NodeTime>> {
        let mut state = self.plan.spawn().map_err(inference_err)?;
        let inputs: TVec<TValue> = inputs
            .iter()
            .map(|t| t.tract().clone().into_tvalue())
            .collect();
        let mut times = Vec::new();
        multithread_tract_scope(ThreadPool::SingleThread, || {
            state.run_plan_with_eval(inputs, |session, op_state, node, inputs| {
                let started = Instant::now();
                let outputs = tract_onnx::tract_core::plan::eval(session, op_state, node, inputs);
                times.push(NodeTime {
                    node: node.name.clone(),
                    op: node.op().name().to_string(),
                    time: started.elapsed(),
                });
                outputs
            })
        })
        .map_err(inference_err)?;
        Ok(times)
    }
}

/// Builds plans with the session's settings.
struct Compiler {
    optimization: OptLevel,
    /// QDQ convolutions fused to `QLinearConv` in the graph it compiles (reported first
    /// among the rewrites).
    fused_qdq: usize,
    tern_kernels: bool,
    has_pool: bool,
    thread_policy: ThreadPolicy,
    /// The session's memory limit, in bytes.
    memory_limit: u64,
}

impl Compiler {
    /// inference graph → typed → decluttered/optimized → plan.
    fn compile(&self, graph: InferenceModel) -> Result<Plan> {
        // tract computes f16 in software where the CPU has no f16 arithmetic (x86, older
        // ARM): 80x slower than f32. Such models compute in f32 instead, the way
        // onnxruntime's CPU kernels do; the model's inputs and outputs keep their types.
        let mut typed = frontend::typed(graph, !tract_linalg::has_fp16()).map_err(compile_err)?;
        let mut rewrites = Vec::new();
        if self.fused_qdq > 0 {
            rewrites.push(("qdq-fusion", self.fused_qdq));
        }
        optim::declutter(&mut typed).map_err(compile_err)?;
        // Read from the decluttered graph, where every matrix product is still an einsum.
        let contracts = Contracts::of(&typed)?;
        if self.optimization == OptLevel::Full {
            // tern's rewrites before the batch tiling: they read per-channel constants
            // as `[.., C, 1, 1]`, which the tiling would turn into `[N, C, 1, 1]`.
            match self.tern_kernels {
                true => rewrite::run_passes(&mut typed),
                false => Ok(Vec::new()),
            }
            .and_then(|done| {
                rewrites.extend(done);
                tile_batch_constants(&mut typed)
            })
            .and_then(|_| optim::optimize(&mut typed))
            .map_err(compile_err)?;
        }
        guard::wrap(&mut typed, self.memory_limit).map_err(compile_err)?;
        // No executor in the plan: each run scopes the one its threading race chooses.
        let plan = typed.into_runnable().map_err(compile_err)?;
        let footprint = Footprint::of(&plan);
        // A plan for concrete shapes knows every size now: one over the limit is refused
        // here rather than at every run.
        footprint.check(&SymbolValues::default(), self.memory_limit)?;
        let context = EvalContext::out_of_plan();
        let mut carries_state = false;
        for node in plan.model().nodes() {
            carries_state |= node.op.state(&context).map_err(compile_err)?.is_some();
        }
        Ok(Plan {
            plan,
            carries_state,
            states: Mutex::new(Vec::new()),
            threading: threads::threading(self.has_pool, self.thread_policy),
            rewrites,
            contracts,
            footprint,
            memory_limit: self.memory_limit,
            checked: Mutex::new(HashSet::new()),
        })
    }
}

/// The shape race: 2 untimed runs of the concrete plan, 3 timed runs of each, and concrete
/// plans kept only when 10 % faster (each costs a compilation and memory).
const SHAPE_RULES: RaceRules = RaceRules {
    warmup: 2,
    trials: 3,
    margin: 0.9,
};

/// At most this many shapes are counted towards their rent at once.
const RENT_LEDGER: usize = 1024;

/// Which plan serves a run whose shape has no concrete plan yet.
enum Choice {
    /// No run yet (the first one starts the race).
    Undecided,
    /// The first shape's concrete plan is being built.
    Building,
    /// The symbolic plan (incumbent) against the concrete plan (challenger) of `key`.
    Racing {
        key: ShapeKey,
        race: Arc<Race>,
        compile: Duration,
    },
    /// Concrete plans are faster: a shape gets one once it has paid its [`Rent`].
    Rent(Rent),
    /// The symbolic plan serves every run.
    Symbolic,
    /// Every shape gets a concrete plan on its first run.
    PerShape,
    /// Every run gets a plan for its shapes with the value inputs' values folded in.
    PerValue,
}

/// The ski-rental rule for concrete plans: each run of a shape on the symbolic plan costs
/// `gain` more than a concrete plan would have; once a shape's runs add up to what a
/// concrete plan costs to compile, it gets one. Shapes that never recur never pay for a
/// compilation; shapes that do pay at most twice the best choice in hindsight.
struct Rent {
    gain: Duration,
    compile: Duration,
    runs: HashMap<ShapeKey, u32>,
}

impl Rent {
    fn new(gain: Duration, compile: Duration) -> Self {
        Rent {
            gain,
            compile,
            runs: HashMap::new(),
        }
    }

    /// Counts a run of `key` on the symbolic plan; true when the shape has now paid for a
    /// concrete plan (its count starts again, in case that plan is later evicted).
    fn pay(&mut self, key: &ShapeKey) -> bool {
        if self.runs.len() >= RENT_LEDGER && !self.runs.contains_key(key) {
            self.runs.clear();
        }
        let paid = self.runs.entry(key.clone()).or_insert(0);
        *paid += 1;
        let due = self.gain.saturating_mul(*paid) >= self.compile;
        if due {
            self.runs.remove(key);
        }
        due
    }
}

/// A model tract cannot plan with all its declared symbols may plan with fewer: ppocr_rec
/// not with a symbolic batch, height and width, but with only the width symbolic. The
/// axes that keep their size over the first two distinct input shapes are fixed to it, the
/// others stay symbolic; if that plan builds, it serves as the shared plan (raced against
/// concrete plans like a symbolic one) for the shapes that match it.
enum Partial {
    /// The distinct shapes seen so far.
    Watching(Vec<ShapeKey>),
    /// Tried (or not wanted).
    Done,
}

/// The axes all `shapes` agree on (their size), and the others (`None`).
fn common_axes(shapes: &[ShapeKey]) -> Vec<Vec<Option<usize>>> {
    let Some(first) = shapes.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(ix, dims)| {
            dims.iter()
                .enumerate()
                .map(|(axis, &d)| {
                    shapes
                        .iter()
                        .all(|s| s.get(ix).and_then(|i| i.get(axis)) == Some(&d))
                        .then_some(d)
                })
                .collect()
        })
        .collect()
}

/// Where one run goes.
enum Route {
    Symbolic,
    Concrete,
    /// Build the first concrete plan and start the race.
    StartRace,
    Race(Arc<Race>),
}

/// Runs tract plans.
pub(crate) struct TractExecutor {
    /// The graph with its input facts, for concrete plans.
    graph: InferenceModel,
    /// The int32 casts of shape values a partly symbolic plan retypes to int64.
    shape_casts: Arc<Vec<String>>,
    /// The plan for the planned shapes: concrete when every input is fixed or pinned,
    /// symbolic otherwise; when tract cannot plan the symbolic shapes, unset — or, later,
    /// a [`Partial`] plan.
    planned: OnceLock<Plan>,
    /// The input axes `planned` has fixed, when it is a partial plan (`None`: symbolic).
    partial_axes: OnceLock<Vec<Vec<Option<usize>>>>,
    /// The search for a partial plan.
    partial: Mutex<Partial>,
    /// Every input is fixed or pinned: `planned` serves every run.
    fixed: bool,
    concrete: PlanCache<Plan>,
    /// The model inputs read as values ([`ModelInfo::value_inputs`](crate::ModelInfo)),
    /// by position: what a per-value plan folds in.
    value_inputs: Vec<usize>,
    /// Plans with the value inputs' values folded in.
    by_value: PlanCache<Plan, ValueKey>,
    choice: Mutex<Choice>,
    compiler: Compiler,
    /// The session's rayon pool, when it has more than one thread.
    pool: Option<ThreadPool>,
}

/// A value input is folded into a plan only up to this many elements (shapes, axes and
/// per-channel parameters are far smaller; a large tensor is data, not a plan parameter).
const MAX_FOLDED_ELEMENTS: usize = 1 << 16;

/// A per-value plan's key: every input's shape and the bytes of each value input.
type ValueKey = (ShapeKey, Vec<Vec<u8>>);

/// Builds the CPU executor: names or pins every input dimension, then types, optimizes and
/// plans — and prepares plans per concrete shape as the shape policy says.
pub(crate) fn prepare(model: &Model, options: &SessionOptions, reason: String) -> Result<Prepared> {
    let cpu = &options.cpu;
    // QDQ convolutions fused to integer ops, where tern's int8 kernels run and the CPU
    // multiplies bytes natively (elsewhere tract's float path for QDQ is the faster one).
    let fused = match model.integer_graph() {
        Some(fused)
            if cpu.tern_kernels && cpu.optimization == OptLevel::Full && linalg::native_int8() =>
        {
            Some(fused)
        }
        _ => None,
    };
    let source = fused.map_or(model.graph(), |(graph, _)| graph);
    let graph = frontend::with_input_facts(model, source, options).map_err(compile_err)?;
    let fixed = frontend::fixed_shapes(model, options).is_some();
    let value_inputs: Vec<usize> = model
        .inputs()
        .iter()
        .enumerate()
        .filter(|(_, i)| model.info().value_inputs.contains(&i.name))
        .map(|(ix, _)| ix)
        .collect();
    let compiler = Compiler {
        optimization: cpu.optimization,
        fused_qdq: fused.map_or(0, |(_, n)| n),
        tern_kernels: cpu.tern_kernels,
        has_pool: cpu.threads > 1,
        thread_policy: cpu.thread_policy,
        memory_limit: options.limits.memory_limit(),
    };
    let (planned, input_dtypes, choice, reason) = match compiler.compile(graph.clone()) {
        Ok(plan) => {
            let dtypes = input_dtypes(plan.plan.model())?;
            let (choice, how) = match cpu.shape_policy {
                _ if fixed => (Choice::Symbolic, ""),
                ShapePolicy::Measure => (
                    Choice::Undecided,
                    "; concrete plans per input shape where measured faster",
                ),
                ShapePolicy::Symbolic => (Choice::Symbolic, "; one symbolic plan"),
                ShapePolicy::PerShape => (Choice::PerShape, "; a plan per input shape"),
            };
            let kernels: Vec<String> = plan
                .rewrites
                .iter()
                .map(|(pass, n)| format!("{pass} ×{n}"))
                .collect();
            let kernels = match kernels.is_empty() {
                true => String::new(),
                false => format!("; tern kernels: {}", kernels.join(", ")),
            };
            (
                Some(plan),
                dtypes,
                choice,
                format!("{reason}{how}{kernels}"),
            )
        }
        // Fixed shapes that fail will fail at every run, unless the values of some inputs
        // are what tract is missing: report it now.
        Err(e) if fixed && value_inputs.is_empty() => return Err(e),
        Err(e) => {
            tracing::info!("tract cannot plan the declared shapes, specialising: {e}");
            let dtypes = model
                .inputs()
                .iter()
                .map(|i| {
                    i.dtype.ok_or_else(|| Error::Compile {
                        backend: NAME,
                        reason: format!("input {:?} declares no supported element type", i.name),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            // The first line of tract's explanation, so an app (and `tern run --json`) can
            // see what stopped the symbolic plan.
            let why = e.to_string();
            let why = why.lines().next().unwrap_or_default();
            let why: String = why.chars().take(300).collect();
            let (choice, how) = match fixed {
                true => (Choice::PerValue, "input values"),
                false => (Choice::PerShape, "input shape"),
            };
            let reason = format!("{reason}; plans specialised per {how} (no shared plan: {why})");
            (None, dtypes, choice, reason)
        }
    };
    // A partial plan is looked for only when measuring and nothing symbolic was built.
    let partial = match (&planned, cpu.shape_policy, fixed) {
        (None, ShapePolicy::Measure, false) => Partial::Watching(Vec::new()),
        _ => Partial::Done,
    };
    let planned = match planned {
        Some(plan) => OnceLock::from(plan),
        None => OnceLock::new(),
    };
    Ok(Prepared {
        executor: Box::new(TractExecutor {
            graph,
            shape_casts: model.shape_casts(),
            planned,
            partial_axes: OnceLock::new(),
            partial: Mutex::new(partial),
            fixed,
            concrete: PlanCache::new(CAPACITY),
            value_inputs,
            by_value: PlanCache::new(CAPACITY),
            choice: Mutex::new(choice),
            compiler,
            pool: (cpu.threads > 1).then(|| ThreadPool::multithread_with_name(cpu.threads, "tern")),
        }),
        backend: Backend::Cpu,
        reason,
        input_dtypes,
    })
}

/// Constants up to this many elements are tiled along the batch by [`tile_batch_constants`].
const TILE_LIMIT: usize = 1 << 16;

/// Tiles per-channel constants along the batch axis of the tensor they combine with.
///
/// A BatchNormalization that tract cannot fold into a convolution stays as `x * scale + shift`
/// with constants of shape `[1, C, 1, 1]`. At batch 1 tract runs these with its fast
/// by-scalar kernel; at batch N > 1 the leading `1 ≠ N` sends them to its generic
/// broadcasting loop, which made ppocr_cls 4× slower at batch 2 than at batch 1 (66 such
/// nodes took 56 % of the run). With the constant tiled to `[N, C, 1, 1]` (N × C values)
/// the fast kernel applies at every batch size.
fn tile_batch_constants(model: &mut TypedModel) -> TractResult<()> {
    let mut tiles = Vec::new();
    for node in model.nodes() {
        if node
            .op_as::<tract_onnx::tract_core::ops::binary::TypedBinOp>()
            .is_none()
            || node.inputs.len() != 2
        {
            continue;
        }
        let facts = model.node_input_facts(node.id)?;
        for (k, x) in [(0, 1), (1, 0)] {
            let (Some(konst), Some(x_shape)) = (&facts[k].konst, facts[x].shape.as_concrete())
            else {
                continue;
            };
            let batch = x_shape.first().copied().unwrap_or(1);
            if konst.rank() == x_shape.len()
                && konst.rank() >= 2
                && konst.shape()[0] == 1
                && batch > 1
                && konst.len() > 1
                && konst.len() * batch <= TILE_LIMIT
            {
                let mut shape = konst.shape().to_vec();
                shape[0] = batch;
                tiles.push((InletId::new(node.id, k), konst.broadcast_to_shape(&shape)?));
            }
        }
    }
    for (inlet, tiled) in tiles {
        let name = format!("{}.batch_tiled.{}", model.node(inlet.node).name, inlet.slot);
        let konst = model.add_const(name, tiled)?;
        model.add_edge(konst, inlet)?;
    }
    Ok(())
}

fn input_dtypes(typed: &TypedModel) -> Result<Vec<DType>> {
    (0..typed.inputs.len())
        .map(|ix| {
            let dt = typed.input_fact(ix).map_err(compile_err)?.datum_type;
            DType::from_tract(dt).ok_or_else(|| Error::Compile {
                backend: NAME,
                reason: format!("input {ix} has unsupported type {dt:?}"),
            })
        })
        .collect()
}

impl TractExecutor {
    /// The plan for `inputs`' shapes with the value inputs' values folded in (built on first
    /// use), and the inputs it takes: the others, in order.
    fn value_plan(&self, inputs: &[Tensor]) -> Result<(Arc<Plan>, Vec<Tensor>)> {
        let mut values = Vec::with_capacity(self.value_inputs.len());
        let mut folded = Vec::with_capacity(self.value_inputs.len());
        for &ix in &self.value_inputs {
            let value = inputs.get(ix).ok_or_else(|| Error::Compile {
                backend: NAME,
                reason: format!("no input #{ix} to plan by value"),
            })?;
            if value.len() > MAX_FOLDED_ELEMENTS {
                return Err(Error::Compile {
                    backend: NAME,
                    reason: format!(
                        "the plan needs input #{ix}'s values as constants, and it has {} \
                         elements (at most {MAX_FOLDED_ELEMENTS} are folded)",
                        value.len()
                    ),
                });
            }
            values.push(value.as_bytes()?.to_vec());
            folded.push((ix, value.tract().clone()));
        }
        let key = (shape_key(inputs), values);
        let plan = self.by_value.get_or_build(&key, || {
            let graph = frontend::concretize(&self.graph, &key.0)
                .and_then(|graph| frontend::fold_inputs(&graph, &folded))
                .map_err(compile_err)?;
            self.compiler.compile(graph)
        })?;
        let rest = inputs
            .iter()
            .enumerate()
            .filter(|(ix, _)| !self.value_inputs.contains(ix))
            .map(|(_, t)| t.clone())
            .collect();
        Ok((plan, rest))
    }

    /// A concrete plan could not be built (`error`): if the model has value inputs, a
    /// per-value plan runs instead, and every later run is planned by value too.
    fn run_by_value_instead(&self, inputs: &[Tensor], error: Error) -> Result<Vec<Tensor>> {
        if self.value_inputs.is_empty() {
            return Err(error);
        }
        let (plan, rest) = self.value_plan(inputs)?;
        let outputs = plan.run(&rest, self.pool.as_ref())?;
        tracing::info!("no plan without the value inputs' values ({error}): planning by value");
        *lock(&self.choice) = Choice::PerValue;
        Ok(outputs)
    }

    /// Whether the shared plan serves `key` (a partial plan only the shapes of its fixed axes).
    fn shares(&self, key: &ShapeKey) -> bool {
        let Some(axes) = self.partial_axes.get() else {
            return true;
        };
        axes.len() == key.len()
            && axes.iter().zip(key).all(|(fixed, dims)| {
                fixed.len() == dims.len()
                    && fixed
                        .iter()
                        .zip(dims)
                        .all(|(f, d)| f.is_none_or(|f| f == *d))
            })
    }

    /// Counts `key` towards a partial plan; at the second distinct shape, builds one with
    /// the axes they agree on fixed. If it builds, it becomes the shared plan and the shape
    /// race starts over.
    fn look_for_partial(&self, key: &ShapeKey) {
        let shapes = {
            let mut partial = lock(&self.partial);
            let Partial::Watching(seen) = &mut *partial else {
                return;
            };
            if !seen.contains(key) {
                seen.push(key.clone());
            }
            if seen.len() < 2 {
                return;
            }
            let shapes = std::mem::take(seen);
            *partial = Partial::Done;
            shapes
        };
        let axes = common_axes(&shapes);
        // With its shape arithmetic kept symbolic, where a detour through int32 would
        // make a Reshape's shape unknown for the axes left symbolic.
        let graph = Model::widen_shape_casts(&self.graph, &self.shape_casts);
        let built = frontend::partially_concretize(&graph, &axes)
            .map_err(compile_err)
            .and_then(|graph| self.compiler.compile(graph));
        match built {
            Ok(plan) => {
                tracing::info!(
                    ?axes,
                    "a partly symbolic plan serves the shapes that match it"
                );
                if self.planned.set(plan).is_ok() {
                    let _ = self.partial_axes.set(axes);
                    *lock(&self.choice) = Choice::Undecided;
                }
            }
            Err(e) => tracing::debug!("no partly symbolic plan either: {e}"),
        }
    }

    fn per_value(&self) -> bool {
        matches!(*lock(&self.choice), Choice::PerValue)
    }

    /// The concrete plan for `key`, built on first use.
    fn concrete_plan(&self, key: &ShapeKey) -> Result<Arc<Plan>> {
        self.concrete.get_or_build(key, || {
            let graph = frontend::concretize(&self.graph, key).map_err(compile_err)?;
            self.compiler.compile(graph)
        })
    }

    /// Where a run of shape `key` goes, updating the choice's bookkeeping.
    fn route(&self, key: &ShapeKey) -> Route {
        let mut choice = lock(&self.choice);
        if let Choice::Racing {
            key: racing, race, ..
        } = &*choice
        {
            return if racing == key {
                Route::Race(race.clone())
            } else {
                Route::Symbolic
            };
        }
        if self.concrete.get(key).is_some() {
            return Route::Concrete;
        }
        match &mut *choice {
            Choice::Undecided => {
                *choice = Choice::Building;
                Route::StartRace
            }
            Choice::Rent(rent) => {
                if rent.pay(key) {
                    Route::Concrete
                } else {
                    Route::Symbolic
                }
            }
            Choice::PerShape | Choice::PerValue => Route::Concrete,
            Choice::Building | Choice::Racing { .. } | Choice::Symbolic => Route::Symbolic,
        }
    }

    /// Acts on the outcome of the shape race.
    fn decide(&self, outcome: Outcome) {
        let mut choice = lock(&self.choice);
        let Choice::Racing { compile, .. } = &*choice else {
            return;
        };
        let compile = *compile;
        tracing::debug!(
            concrete = outcome.winner == Arm::Challenger,
            symbolic_ms = outcome.incumbent.as_secs_f64() * 1e3,
            concrete_ms = outcome.challenger.as_secs_f64() * 1e3,
            compile_ms = compile.as_secs_f64() * 1e3,
            "tract shape specialisation measured"
        );
        *choice = match outcome.winner {
            Arm::Challenger => Choice::Rent(Rent::new(
                outcome.incumbent.saturating_sub(outcome.challenger),
                compile,
            )),
            Arm::Incumbent => {
                self.concrete.clear();
                Choice::Symbolic
            }
        };
    }

    /// Runs the symbolic plan; if it fails, retries on a concrete plan and, if that runs,
    /// keeps to concrete plans from now on.
    fn run_symbolic(
        &self,
        symbolic: &Plan,
        key: &ShapeKey,
        inputs: &[Tensor],
    ) -> Result<Vec<Tensor>> {
        let error = match symbolic.run(inputs, self.pool.as_ref()) {
            Ok(outputs) => return Ok(outputs),
            Err(e) => e,
        };
        let retried = self
            .concrete_plan(key)
            .and_then(|plan| plan.run(inputs, self.pool.as_ref()));
        match retried {
            Ok(outputs) => {
                tracing::warn!(
                    "the symbolic plan failed a run ({error}); a concrete plan ran it: \
                     using concrete plans from now on"
                );
                *lock(&self.choice) = Choice::PerShape;
                Ok(outputs)
            }
            Err(_) => Err(error),
        }
    }

    fn run_inputs(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let pool = self.pool.as_ref();
        if self.per_value() {
            let (plan, rest) = self.value_plan(inputs)?;
            return plan.run(&rest, pool);
        }
        let key = shape_key(inputs);
        if self.planned.get().is_none() {
            self.look_for_partial(&key);
        }
        let shared = self.planned.get().filter(|_| self.shares(&key));
        let Some(planned) = shared else {
            return match self.concrete_plan(&key) {
                Ok(plan) => plan.run(inputs, pool),
                Err(e) => self.run_by_value_instead(inputs, e),
            };
        };
        // Inputs that break the symbolic plan's contracts or memory limit are refused
        // before any plan, symbolic or concrete, is built or run for them.
        planned.check(&key, inputs)?;
        if self.fixed {
            return planned.run(inputs, pool);
        }
        match self.route(&key) {
            Route::Symbolic => self.run_symbolic(planned, &key, inputs),
            Route::Concrete => self.concrete_plan(&key)?.run(inputs, pool),
            Route::StartRace => {
                let started = Instant::now();
                let plan = match self.concrete_plan(&key) {
                    Ok(plan) => plan,
                    Err(e) => {
                        tracing::info!(
                            "no concrete plan for {key:?}, keeping the symbolic one: {e}"
                        );
                        *lock(&self.choice) = Choice::Symbolic;
                        return self.run_symbolic(planned, &key, inputs);
                    }
                };
                *lock(&self.choice) = Choice::Racing {
                    key,
                    race: Arc::new(Race::new(SHAPE_RULES)),
                    compile: started.elapsed(),
                };
                plan.run(inputs, pool)
            }
            Route::Race(race) => {
                let (arm, timed) = race.next();
                let started = timed.then(Instant::now);
                let outputs = match arm {
                    Arm::Incumbent => self.run_symbolic(planned, &key, inputs),
                    Arm::Challenger => self.concrete_plan(&key)?.run(inputs, pool),
                }?;
                if let Some(started) = started {
                    if let Some(outcome) = race.record(arm, started.elapsed()) {
                        self.decide(outcome);
                    }
                }
                Ok(outputs)
            }
        }
    }
}

impl Executor for TractExecutor {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Ran> {
        Ok(Ran {
            outputs: self.run_inputs(&inputs)?,
            fallback: false,
        })
    }

    fn profile(&self, inputs: Vec<Tensor>) -> Result<Vec<NodeTime>> {
        if self.per_value() {
            let (plan, rest) = self.value_plan(&inputs)?;
            return plan.profile(&rest);
        }
        let key = shape_key(&inputs);
        let symbolic = self.fixed || matches!(*lock(&self.choice), Choice::Symbolic);
        match self.planned.get().filter(|_| self.shares(&key)) {
            Some(planned) if symbolic => {
                planned.check(&key, &inputs)?;
                planned.profile(&inputs)
            }
            _ => self.concrete_plan(&key)?.profile(&inputs),
        }
    }

    fn plans(&self) -> PlanReport {
        let choice = lock(&self.choice);
        let specialisation = if matches!(*choice, Choice::PerValue) {
            Specialisation::PerValue
        } else if self.fixed {
            Specialisation::Fixed
        } else {
            match &*choice {
                Choice::Undecided => Specialisation::Undecided,
                Choice::Building | Choice::Racing { .. } => Specialisation::Measuring,
                Choice::Rent(_) => Specialisation::Concrete,
                Choice::Symbolic => Specialisation::Symbolic,
                Choice::PerShape => Specialisation::PerShape,
                Choice::PerValue => Specialisation::PerValue,
            }
        };
        let per_value = matches!(*choice, Choice::PerValue);
        drop(choice);
        let (concrete, newest) = match per_value {
            true => {
                let keys = self.by_value.keys();
                let newest = keys.last().and_then(|key| self.by_value.get(key));
                (keys.into_iter().map(|(shapes, _)| shapes).collect(), newest)
            }
            false => {
                let keys = self.concrete.keys();
                let newest = keys.last().and_then(|key| self.concrete.get(key));
                (keys, newest)
            }
        };
        let rewrites = match (&newest, self.planned.get()) {
            (Some(plan), _) => plan.rewrites.clone(),
            (None, Some(plan)) => plan.rewrites.clone(),
            (None, None) => Vec::new(),
        };
        PlanReport {
            specialisation,
            shared_plan: self.planned.get().is_some(),
            concrete,
            tern_kernels: rewrites
                .into_iter()
                .map(|(k, n)| (k.to_string(), n))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math;

    /// `x * scale + shift` with per-channel `[1, 4, 1, 1]` constants: a BatchNormalization
    /// tract did not fold.
    fn per_channel(batch: usize) -> TypedModel {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([batch, 4, 5, 5])).unwrap();
        let scale = tensor1(&[0.5f32, 1.5, -2.0, 3.0]).into_shape(&[1, 4, 1, 1]);
        let shift = tensor1(&[1f32, 2.0, 3.0, 4.0]).into_shape(&[1, 4, 1, 1]);
        let scale = m.add_const("scale", scale.unwrap()).unwrap();
        let shift = m.add_const("shift", shift.unwrap()).unwrap();
        let y = m.wire_node("mul", math::mul(), &[x, scale]).unwrap();
        let z = m.wire_node("add", math::add(), &[y[0], shift]).unwrap();
        m.select_output_outlets(&z).unwrap();
        m
    }

    fn run(m: TypedModel, x: &tract_onnx::prelude::Tensor) -> tract_onnx::prelude::Tensor {
        let plan = m.into_runnable().unwrap();
        let out = plan.run(tvec!(x.clone().into_tvalue())).unwrap();
        out[0].clone().into_tensor()
    }

    #[test]
    fn a_shape_gets_a_plan_once_its_runs_have_paid_for_it() {
        let ms = Duration::from_millis;
        let mut rent = Rent::new(ms(10), ms(35));
        let wide = vec![vec![1, 3, 48, 320]];
        // 10 ms lost per run on the symbolic plan, 35 ms to compile: the 4th run builds.
        assert_eq!(
            (0..4).map(|_| rent.pay(&wide)).collect::<Vec<_>>(),
            [false, false, false, true]
        );
        // The count starts again (a plan evicted later must earn its way back).
        assert!(!rent.pay(&wide));
        // A stream of shapes that never recur never compiles.
        assert!((0..5000).all(|w| !rent.pay(&vec![vec![1, 3, 48, w]])));
        assert!(rent.runs.len() <= RENT_LEDGER);
        // No gain at all: nothing ever pays.
        let mut free = Rent::new(Duration::ZERO, ms(35));
        assert!((0..100).all(|_| !free.pay(&wide)));
    }

    #[test]
    fn per_channel_constants_are_tiled_along_the_batch_and_keep_the_values() {
        let x = tract_onnx::prelude::Tensor::from_shape(
            &[3, 4, 5, 5],
            &(0..300).map(|i| i as f32 * 0.1 - 7.0).collect::<Vec<_>>(),
        )
        .unwrap();
        let want = run(per_channel(3), &x);
        let mut m = per_channel(3);
        m.declutter().unwrap();
        tile_batch_constants(&mut m).unwrap();
        for name in ["mul", "add"] {
            let node = m.node_by_name(name).unwrap();
            let k = m
                .outlet_fact(node.inputs[1])
                .unwrap()
                .konst
                .clone()
                .unwrap();
            assert_eq!(k.shape(), &[3, 4, 1, 1], "{name}");
        }
        m.optimize().unwrap();
        // No node is left on tract's generic broadcasting path.
        let generic: Vec<String> = m
            .nodes()
            .iter()
            .filter(|n| {
                n.op_as::<tract_onnx::tract_core::ops::binary::TypedBinOp>()
                    .is_some()
            })
            .map(|n| n.name.clone())
            .collect();
        assert!(generic.is_empty(), "generic binary ops left: {generic:?}");
        assert_eq!(run(m, &x), want);

        // At batch 1 tract's fast kernels apply already: nothing is tiled.
        let mut m = per_channel(1);
        m.declutter().unwrap();
        let before = m.nodes().len();
        tile_batch_constants(&mut m).unwrap();
        assert_eq!(m.nodes().len(), before);
    }
}
