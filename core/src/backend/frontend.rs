//! The front end both backends share: tract's inference graph made ready to type.
//!
//! Each backend starts from the same place — the model's ONNX graph as tract parsed it —
//! and needs the same first steps: every input given its element type and the shape it is
//! planned for (pinned, else declared, symbolic dimensions as tract symbols), a copy with
//! concrete shapes for a per-shape plan (and with some inputs' values folded in, for a
//! per-value plan), and the graph typed, with an fp16 model that
//! computes in f16 between f32 inputs and outputs widened to f32 where f16 arithmetic is
//! not wanted. What happens after typing (tract's optimizer, or lowering to burn) is the
//! backend's own business.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::transform::ModelTransform;
use tract_onnx::tract_hir::infer::InferenceModelExt;

use crate::model::{Dim, Model, TensorInfo};
use crate::options::SessionOptions;

/// The shape an input is planned for: its pinned shape if the options pin it, else the
/// shape the model declares (`None` when the model does not declare the rank).
pub(crate) fn planned_shape(options: &SessionOptions, info: &TensorInfo) -> Option<Vec<Dim>> {
    match options.inputs.pinned_shapes.get(&info.name) {
        Some(pinned) => Some(pinned.iter().copied().map(Dim::Fixed).collect()),
        None => info.shape.clone(),
    }
}

/// The planned shapes of all inputs when every dimension of every input is fixed or
/// pinned; `None` if any is symbolic or undeclared.
pub(crate) fn fixed_shapes(model: &Model, options: &SessionOptions) -> Option<Vec<Vec<usize>>> {
    model
        .inputs()
        .iter()
        .map(|info| {
            planned_shape(options, info)?
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => Some(*n),
                    Dim::Symbolic(_) => None,
                })
                .collect()
        })
        .collect()
}

/// `graph` (the model's own, or a rewrite of it with the same inputs) with every input's
/// declared element type and planned shape (symbolic dimensions become tract symbols of
/// the same name).
pub(crate) fn with_input_facts(
    model: &Model,
    graph: &InferenceModel,
    options: &SessionOptions,
) -> TractResult<InferenceModel> {
    let mut graph = graph.clone();
    for (ix, info) in model.inputs().iter().enumerate() {
        let mut fact = graph.input_fact(ix)?.clone();
        if let Some(dims) = planned_shape(options, info) {
            let dims: Vec<TDim> = dims
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => TDim::from(*n),
                    Dim::Symbolic(s) => graph.symbols.sym(s).into(),
                })
                .collect();
            fact = fact.with_shape(dims);
        }
        if let Some(dt) = info.dtype {
            fact = fact.with_datum_type(dt.to_tract());
        }
        graph.set_input_fact(ix, fact)?;
    }
    Ok(graph)
}

/// A copy of `graph` with its inputs fixed to these concrete shapes.
pub(crate) fn concretize(
    graph: &InferenceModel,
    shapes: &[Vec<usize>],
) -> TractResult<InferenceModel> {
    let mut concrete = graph.clone();
    for (ix, shape) in shapes.iter().enumerate() {
        let fact = concrete.input_fact(ix)?.clone().with_shape(shape.clone());
        concrete.set_input_fact(ix, fact)?;
    }
    Ok(concrete)
}

/// A copy of `graph` with the input axes given a size fixed to it, the others (`None`)
/// left as the graph has them.
pub(crate) fn partially_concretize(
    graph: &InferenceModel,
    axes: &[Vec<Option<usize>>],
) -> TractResult<InferenceModel> {
    use tract_onnx::tract_hir::infer::Factoid;
    let mut partial = graph.clone();
    for (ix, fixed) in axes.iter().enumerate() {
        let fact = partial.input_fact(ix)?.clone();
        let dims = fact
            .shape
            .dims()
            .zip(fixed)
            .map(|(dim, size)| match size {
                Some(n) => Ok(TDim::from(*n)),
                None => dim
                    .concretize()
                    .ok_or_else(|| anyhow::anyhow!("input #{ix} has an unnamed dimension")),
            })
            .collect::<TractResult<Vec<TDim>>>()?;
        partial.set_input_fact(ix, fact.with_shape(dims))?;
    }
    Ok(partial)
}

/// A copy of `graph` with the inputs at these positions replaced by constants of these
/// values: no longer inputs, so a run passes only the others (in their order).
pub(crate) fn fold_inputs(
    graph: &InferenceModel,
    values: &[(usize, Arc<Tensor>)],
) -> TractResult<InferenceModel> {
    let mut folded = graph.clone();
    let mut outlets = Vec::with_capacity(values.len());
    for (ix, value) in values {
        let outlet = *folded
            .inputs
            .get(*ix)
            .ok_or_else(|| anyhow::anyhow!("no input #{ix} to fold"))?;
        let node = folded.node_mut(outlet.node);
        node.op = Box::new(Const::new(value.clone())?);
        node.outputs[outlet.slot].fact = TypedFact::try_from(value.clone())?.into();
        outlets.push(outlet);
    }
    folded.inputs.retain(|o| !outlets.contains(o));
    Ok(folded)
}

/// Types the graph; an f16-computing graph (see [`computes_in_f16`]) is widened to f32
/// when `widen_f16` says so.
pub(crate) fn typed(graph: InferenceModel, widen_f16: bool) -> TractResult<TypedModel> {
    let mut typed = graph.into_typed()?;
    if widen_f16 && computes_in_f16(&typed) {
        FloatPrecisionTranslator::new(f16::datum_type(), f32::datum_type())
            .transform(&mut typed)?;
    }
    Ok(typed)
}

/// Whether the graph computes in f16 between inputs and outputs of other types (a model
/// converted to fp16 with its I/O kept in f32, the common form). Models with f16 inputs or
/// outputs are left alone so their declared types stay what the app passes and gets.
fn computes_in_f16(typed: &TypedModel) -> bool {
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
