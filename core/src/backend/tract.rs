//! CPU backend: tract's pipeline — inference graph → typed → decluttered → optimized →
//! runnable plan.
//!
//! tract plans are best built once for symbolic shapes (`batch`, `sequence`…) and reused
//! for every run. Some real models do shape arithmetic tract cannot prove symbolically
//! (e.g. a `Concat` of feature maps whose sizes are `ceil(h / 32) * 8` and
//! `2 * ceil(h / 16) * 4`); onnxruntime users expect those to run anyway. So when the
//! symbolic plan fails, the executor specialises: it builds a plan per concrete input shape
//! on first use and keeps the most recent [`SHAPE_CACHE`] of them.
//!
//! Each plan is shared; a concurrent run takes a [`TypedSimpleState`] from the plan's pool
//! (so buffers and op states are reused between runs) and returns it afterwards. With more
//! than one thread the session owns a rayon pool handed to tract's kernels — for the runs
//! of each plan where measuring shows it helps ([`threads`]).

mod threads;

use self::threads::{Mode, Threading};

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tract_linalg::multithread::{multithread_tract_scope, Executor as ThreadPool};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
use tract_onnx::tract_core::plan::EvalContext;
use tract_onnx::tract_core::transform::ModelTransform;
use tract_onnx::tract_hir::infer::InferenceModelExt;

use super::{Backend, Executor, Prepared, Ran};
use crate::error::{chain, Error};
use crate::model::{Dim, Model};
use crate::session::{OptLevel, SessionOptions, ThreadPolicy};
use crate::tensor::{DType, Tensor};
use crate::Result;

const NAME: &str = "tract";

/// How many per-shape plans a specialising executor keeps.
pub(crate) const SHAPE_CACHE: usize = 8;

fn compile_err(e: anyhow::Error) -> Error {
    Error::Compile {
        backend: NAME,
        reason: chain(&e),
    }
}

fn inference_err(e: &anyhow::Error) -> Error {
    Error::Inference {
        backend: NAME,
        reason: chain(e),
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
    threading: Threading,
}

impl Plan {
    /// Runs the plan, on the calling thread or with `pool` as [`Threading`] says.
    fn run(&self, inputs: &[Tensor], pool: Option<&ThreadPool>) -> Result<Vec<Tensor>> {
        let pooled = self.states.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut state = match pooled {
            Some(s) => s,
            None => self.plan.spawn().map_err(|e| inference_err(&e))?,
        };
        let inputs: TVec<TValue> = inputs
            .iter()
            .map(|t| t.tract().clone().into_tvalue())
            .collect();
        let (mode, timed) = self.threading.next();
        let executor = match (mode, pool) {
            (Mode::Pool, Some(pool)) => pool.clone(),
            _ => ThreadPool::SingleThread,
        };
        // Only the measuring runs read the clock.
        let started = timed.then(Instant::now);
        let outputs = multithread_tract_scope(executor, || state.run(inputs))
            .map_err(|e| inference_err(&e))?;
        if let Some(started) = started {
            self.threading.record(mode, started.elapsed());
        }
        if !self.carries_state {
            self.states
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(state);
        }
        outputs
            .into_iter()
            .map(|v| Tensor::from_tract(v.into_arc_tensor()))
            .collect()
    }
}

/// Plans for one shape signature at a time, most recently used last.
type ShapeCache = Mutex<Vec<(Vec<Vec<usize>>, Arc<Plan>)>>;

enum Plans {
    /// One plan for every input shape (symbolic or pinned).
    Shared(Plan),
    /// A plan per concrete input shape, built on first use.
    PerShape {
        graph: InferenceModel,
        cache: ShapeCache,
    },
}

/// Runs tract plans.
pub(crate) struct TractExecutor {
    plans: Plans,
    optimization: OptLevel,
    /// The session's rayon pool, when it has more than one thread.
    pool: Option<ThreadPool>,
    thread_policy: ThreadPolicy,
}

/// Builds the CPU executor: names or pins every input dimension, then types, optimizes and
/// plans — or prepares to specialise per shape when the symbolic plan cannot be built.
pub(crate) fn prepare(model: &Model, options: &SessionOptions, reason: String) -> Result<Prepared> {
    let mut graph = model.graph().clone();
    let mut all_fixed = true;
    for (ix, info) in model.inputs().iter().enumerate() {
        let dims: Option<Vec<TDim>> = match (options.input_shapes.get(&info.name), &info.shape) {
            (Some(p), _) => Some(p.iter().map(|d| TDim::from(*d)).collect()),
            (None, Some(shape)) => Some(
                shape
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => TDim::from(*n),
                        Dim::Symbolic(s) => {
                            all_fixed = false;
                            graph.symbols.sym(s).into()
                        }
                    })
                    .collect(),
            ),
            (None, None) => {
                all_fixed = false;
                None
            }
        };
        let mut fact = graph.input_fact(ix).map_err(compile_err)?.clone();
        if let Some(dims) = dims {
            fact = fact.with_shape(dims);
        }
        if let Some(dt) = info.dtype {
            fact = fact.with_datum_type(dt.to_tract());
        }
        graph.set_input_fact(ix, fact).map_err(compile_err)?;
    }
    let mut executor = TractExecutor {
        plans: Plans::PerShape {
            graph: InferenceModel::default(),
            cache: Mutex::new(Vec::new()),
        },
        optimization: options.optimization,
        pool: (options.threads > 1)
            .then(|| ThreadPool::multithread_with_name(options.threads, "tern")),
        thread_policy: options.thread_policy,
    };
    let (plans, input_dtypes, reason) = match executor.compile(graph.clone()) {
        Ok(plan) => {
            let dtypes = input_dtypes(plan.plan.model())?;
            (Plans::Shared(plan), dtypes, reason)
        }
        // Fixed shapes that fail will fail at every run: report it now.
        Err(e) if all_fixed => return Err(e),
        Err(e) => {
            tracing::info!("tract cannot plan symbolic shapes, specialising per shape: {e}");
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
            let reason = format!("{reason}; plans specialised per input shape");
            (
                Plans::PerShape {
                    graph,
                    cache: Mutex::new(Vec::new()),
                },
                dtypes,
                reason,
            )
        }
    };
    executor.plans = plans;
    Ok(Prepared {
        executor: Box::new(executor),
        backend: Backend::Cpu,
        reason,
        input_dtypes,
    })
}

/// Whether the graph computes in f16 between inputs and outputs of other types (a model
/// converted to fp16 with its I/O kept in f32, the common form). Models with f16 inputs or
/// outputs are left alone so their declared types stay what the app passes and gets.
/// Such a graph is widened to f32 by [`widen_f16`] where f16 arithmetic is not wanted.
pub(crate) fn computes_in_f16(typed: &TypedModel) -> bool {
    let f16 = f16::datum_type();
    let io_is_f16 = |outlets: &[OutletId]| {
        outlets
            .iter()
            .any(|o| typed.outlet_fact(*o).is_ok_and(|f| f.datum_type == f16))
    };
    !io_is_f16(&typed.inputs)
        && !io_is_f16(&typed.outputs)
        && typed
            .nodes()
            .iter()
            .any(|n| n.outputs.iter().any(|o| o.fact.datum_type == f16))
}

/// Rewrites an f16-computing graph (see [`computes_in_f16`]) to compute in f32.
pub(crate) fn widen_f16(typed: &mut TypedModel) -> TractResult<()> {
    FloatPrecisionTranslator::new(f16::datum_type(), f32::datum_type()).transform(typed)
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
    /// inference graph → typed → decluttered/optimized → plan.
    fn compile(&self, graph: InferenceModel) -> Result<Plan> {
        let mut typed = graph.into_typed().map_err(compile_err)?;
        if !tract_linalg::has_fp16() && computes_in_f16(&typed) {
            // tract computes f16 in software where the CPU has no f16 arithmetic (x86, older
            // ARM): 80x slower than f32. Compute such models in f32 instead, the way
            // onnxruntime's CPU kernels do; the model's inputs and outputs keep their types.
            widen_f16(&mut typed).map_err(compile_err)?;
        }
        match self.optimization {
            OptLevel::Full => typed
                .declutter()
                .and_then(|_| tile_batch_constants(&mut typed))
                .and_then(|_| typed.optimize()),
            OptLevel::Declutter => typed.declutter(),
        }
        .map_err(compile_err)?;
        // No executor in the plan: each run scopes the one its Threading chooses.
        let plan = typed.into_runnable().map_err(compile_err)?;
        let context = EvalContext::out_of_plan();
        let mut carries_state = false;
        for node in plan.model().nodes() {
            carries_state |= node.op.state(&context).map_err(compile_err)?.is_some();
        }
        Ok(Plan {
            plan,
            carries_state,
            states: Mutex::new(Vec::new()),
            threading: Threading::new(self.pool.is_some(), self.thread_policy),
        })
    }

    /// The plan for these concrete input shapes, built and cached on first use.
    fn plan_for(
        &self,
        graph: &InferenceModel,
        cache: &ShapeCache,
        inputs: &[Tensor],
    ) -> Result<Arc<Plan>> {
        let key: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pos) = cache.iter().position(|(k, _)| *k == key) {
                let entry = cache.remove(pos);
                let plan = entry.1.clone();
                cache.push(entry);
                return Ok(plan);
            }
        }
        let mut concrete = graph.clone();
        for (ix, shape) in key.iter().enumerate() {
            let fact = concrete
                .input_fact(ix)
                .map_err(compile_err)?
                .clone()
                .with_shape(shape.clone());
            concrete.set_input_fact(ix, fact).map_err(compile_err)?;
        }
        let plan = Arc::new(self.compile(concrete)?);
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= SHAPE_CACHE {
            cache.remove(0);
        }
        cache.push((key, plan.clone()));
        Ok(plan)
    }
}

impl Executor for TractExecutor {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Ran> {
        let outputs = match &self.plans {
            Plans::Shared(plan) => plan.run(&inputs, self.pool.as_ref()),
            Plans::PerShape { graph, cache } => self
                .plan_for(graph, cache, &inputs)?
                .run(&inputs, self.pool.as_ref()),
        }?;
        Ok(Ran {
            outputs,
            fallback: false,
        })
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
