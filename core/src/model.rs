//! Loading ONNX models and describing them.
//!
//! Loading is the first stage of the pipeline: bytes → ONNX protobuf (decoded with
//! tract-onnx's prost types) → [`ModelInfo`] (metadata read straight from the protobuf) →
//! tract's inference graph, checked for operators no backend implements. A [`Model`] is
//! immutable and cheap to clone; build any number of [`Session`](crate::Session)s from it.

mod contrib;
mod shape_casts;
mod value_inputs;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::Digest as _;
use tract_onnx::pb;
use tract_onnx::prelude::InferenceModel;

use crate::baseline::{self, Baseline};
use crate::error::Result;
use crate::error::{catch_panic, chain, Error};
use crate::onnx;
use crate::tensor::{DType, Tensor};

/// One dimension of a declared tensor shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A named symbolic size such as `batch` or `sequence`, bound when the model runs.
    Symbolic(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
        }
    }
}

/// Name, element type and shape of a model input or output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorInfo {
    /// The tensor's name in the graph.
    pub name: String,
    /// Element type, when the model declares a supported one.
    pub dtype: Option<DType>,
    /// Declared shape; `None` when the model does not declare the rank. Dimensions the
    /// model leaves unnamed (or names `?`) get a generated name (`<input>_d<axis>`).
    pub shape: Option<Vec<Dim>>,
}

impl TensorInfo {
    /// Whether a tensor of `shape` could be this one as declared: the same rank (when the
    /// rank is declared) and every fixed dimension equal (symbols are not bound here).
    pub fn accepts(&self, shape: &[usize]) -> bool {
        self.shape.as_ref().is_none_or(|dims| {
            dims.len() == shape.len()
                && dims
                    .iter()
                    .zip(shape)
                    .all(|(d, s)| !matches!(d, Dim::Fixed(n) if n != s))
        })
    }

    /// The shape as text, e.g. `[batch, 3, 224, 224]`, or `?` when unknown.
    pub fn shape_string(&self) -> String {
        match &self.shape {
            None => "?".to_string(),
            Some(dims) => {
                let dims: Vec<String> = dims.iter().map(Dim::to_string).collect();
                format!("[{}]", dims.join(", "))
            }
        }
    }
}

/// An operator set the model imports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Opset {
    /// Domain; `""` is the default `ai.onnx` domain.
    pub domain: String,
    /// Version of that domain's operator set.
    pub version: i64,
}

/// What a model is: its interface, provenance, operators and size.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    /// Graph inputs that are not initializers, in graph order.
    pub inputs: Vec<TensorInfo>,
    /// Graph outputs, in graph order.
    pub outputs: Vec<TensorInfo>,
    /// Imported operator sets.
    pub opsets: Vec<Opset>,
    /// ONNX IR version.
    pub ir_version: i64,
    /// Producer name and version, e.g. `pytorch 2.1`.
    pub producer: String,
    /// The model's version: `metadata_props["version"]`, else the protobuf `model_version`
    /// when set, else empty. Telemetry groups by it.
    pub version: String,
    /// Graph name.
    pub graph_name: String,
    /// `metadata_props` key/value pairs.
    pub metadata: BTreeMap<String, String>,
    /// Number of nodes per op type (nested subgraphs included); non-default domains are
    /// prefixed, e.g. `com.microsoft.QGemm`.
    pub op_histogram: BTreeMap<String, usize>,
    /// Total node count (nested subgraphs included).
    pub node_count: usize,
    /// Inputs of all nodes together (graph edges), in every subgraph.
    pub node_inputs: usize,
    /// Number of weight elements (initializers and `Constant` tensors).
    pub parameter_count: u64,
    /// Bytes of weight data.
    pub parameter_bytes: u64,
    /// Whether the model is quantized (QDQ or QOperator int8 ops present).
    pub quantized: bool,
    /// Size of the serialized model in bytes.
    pub file_bytes: u64,
    /// SHA-256 of the serialized model, lowercase hex: what identifies the model's content
    /// (result caches key on it, so a changed model never answers from an old entry).
    #[serde(default)]
    pub sha256: String,
    /// Inputs whose values, not only their shapes, decide the plan: a `Reshape`'s shape, a
    /// `Slice`'s starts, a `Resize`'s sizes, `Reduce` axes, `Pad` pads, quantization scales,
    /// normalization parameters. The CPU backend plans them as constants when it must, a
    /// plan per value ([`Specialisation::PerValue`](crate::Specialisation::PerValue)).
    #[serde(default)]
    pub value_inputs: Vec<String>,
}

impl ModelInfo {
    /// The default-domain opset version (0 when not declared).
    pub fn default_opset(&self) -> i64 {
        self.opsets
            .iter()
            .find(|o| onnx::is_default_domain(&o.domain))
            .map_or(0, |o| o.version)
    }

    fn from_proto(proto: &pb::ModelProto, file_bytes: u64) -> Result<ModelInfo> {
        let graph = proto.graph.as_ref().ok_or_else(|| Error::InvalidModel {
            reason: "the model has no graph".into(),
        })?;
        let initializers: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs = graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()))
            .map(tensor_info)
            .collect();
        let outputs = graph.output.iter().map(tensor_info).collect();
        let mut stats = GraphStats::default();
        stats.visit(graph);
        let producer = [
            proto.producer_name.as_str(),
            proto.producer_version.as_str(),
        ]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
        let quantized = stats
            .ops
            .keys()
            .any(|op| QUANTIZED_OPS.contains(&op.as_str()));
        Ok(ModelInfo {
            inputs,
            outputs,
            opsets: proto
                .opset_import
                .iter()
                .map(|o| Opset {
                    domain: o.domain.clone(),
                    version: o.version,
                })
                .collect(),
            ir_version: proto.ir_version,
            producer,
            version: proto
                .metadata_props
                .iter()
                .find(|p| p.key == "version")
                .map(|p| p.value.clone())
                .or_else(|| (proto.model_version != 0).then(|| proto.model_version.to_string()))
                .unwrap_or_default(),
            graph_name: graph.name.clone(),
            metadata: proto
                .metadata_props
                .iter()
                .map(|p| (p.key.clone(), p.value.clone()))
                .collect(),
            node_count: stats.ops.values().sum(),
            node_inputs: stats.inputs,
            op_histogram: stats.ops,
            parameter_count: stats.params,
            parameter_bytes: stats.param_bytes,
            quantized,
            file_bytes,
            sha256: String::new(),
            value_inputs: value_inputs::value_inputs(graph),
        })
    }
}

/// Op types (domain-prefixed outside `ai.onnx`) whose presence makes a model quantized.
pub const QUANTIZED_OPS: &[&str] = &[
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "com.microsoft.QLinearAdd",
    "com.microsoft.QGemm",
];

#[derive(Default)]
struct GraphStats {
    ops: BTreeMap<String, usize>,
    params: u64,
    param_bytes: u64,
    inputs: usize,
}

impl GraphStats {
    fn visit(&mut self, graph: &pb::GraphProto) {
        for t in &graph.initializer {
            self.count_tensor(t);
        }
        for node in &graph.node {
            *self.ops.entry(onnx::op_key(node)).or_default() += 1;
            self.inputs += node.input.len();
            for attr in &node.attribute {
                if node.op_type == "Constant" {
                    if let Some(t) = &attr.t {
                        self.count_tensor(t);
                    }
                }
                if let Some(g) = &attr.g {
                    self.visit(g);
                }
                for g in &attr.graphs {
                    self.visit(g);
                }
            }
        }
    }

    fn count_tensor(&mut self, t: &pb::TensorProto) {
        let n: u64 = t.dims.iter().map(|d| (*d).max(0) as u64).product();
        self.params += n;
        let size = DType::from_onnx(t.data_type)
            .and_then(DType::size_of)
            .unwrap_or(0) as u64;
        self.param_bytes += n * size;
    }
}

fn tensor_info(v: &pb::ValueInfoProto) -> TensorInfo {
    let tensor_type = v.r#type.as_ref().and_then(|t| match &t.value {
        Some(pb::type_proto::Value::TensorType(tt)) => Some(tt),
        _ => None,
    });
    let dtype = tensor_type.and_then(|t| DType::from_onnx(t.elem_type));
    let shape = tensor_type.and_then(|t| t.shape.as_ref()).map(|s| {
        s.dim
            .iter()
            .enumerate()
            .map(|(axis, d)| match &d.value {
                Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if *n >= 0 => {
                    Dim::Fixed(*n as usize)
                }
                // "?" is what some exporters (paddle2onnx) write for every unknown dimension:
                // it names nothing, so each one gets its own name like an unnamed dimension.
                Some(pb::tensor_shape_proto::dimension::Value::DimParam(p))
                    if !p.is_empty() && p != "?" =>
                {
                    Dim::Symbolic(p.clone())
                }
                _ => Dim::Symbolic(format!("{}_d{axis}", v.name)),
            })
            .collect()
    });
    TensorInfo {
        name: v.name.clone(),
        dtype,
        shape,
    }
}

/// A loaded ONNX model: its [`ModelInfo`] and its parsed graph, ready to make sessions.
///
/// Cheap to clone (shared, immutable).
#[derive(Clone)]
pub struct Model {
    info: Arc<ModelInfo>,
    graph: Arc<InferenceModel>,
    /// The graph with its QDQ convolutions fused to `QLinearConv` (see `crate::qdq`), and
    /// how many were, when any could be: what the CPU backend plans when it runs tern's
    /// int8 kernels.
    integer_graph: Option<Arc<(InferenceModel, usize)>>,
    name: String,
    baseline: Option<Arc<Baseline>>,
    /// The first node of each op type (keys as in [`ModelInfo::op_histogram`]).
    first_nodes: Arc<BTreeMap<String, String>>,
    /// The largest value tract computes from constants while typing the graph: its node
    /// and bytes (at least). Checked against a session's memory limit before typing.
    largest_folded: Option<(String, u64)>,
    /// The int32 casts of shape values a partly symbolic plan retypes to int64 (see
    /// `shape_casts`), by output name.
    shape_casts: Arc<Vec<String>>,
}

/// An ONNX model's bytes with the external data files its tensors name (by location,
/// relative to the model): what a bundle carries, whole in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelFiles {
    /// The serialized model.
    pub model: Vec<u8>,
    /// Each external data file's bytes, by the location the model names it with.
    pub data: BTreeMap<String, Vec<u8>>,
}

impl From<Vec<u8>> for ModelFiles {
    fn from(model: Vec<u8>) -> ModelFiles {
        ModelFiles {
            model,
            data: BTreeMap::new(),
        }
    }
}

impl ModelFiles {
    /// Reads a model file and the external data files its tensors name next to it (regular
    /// files only; the model up to [`crate::fs::MAX_MODEL_BYTES`], each data file up to
    /// `max_data_bytes`).
    pub fn read(path: impl AsRef<Path>, max_data_bytes: u64) -> Result<ModelFiles> {
        let path = path.as_ref();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let model = crate::fs::read_regular(path, crate::fs::MAX_MODEL_BYTES).map_err(io(path))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let data = onnx::external_locations(&model)?
            .into_iter()
            .map(|location| {
                let file = dir.join(&location);
                let bytes = crate::fs::read_regular(&file, max_data_bytes).map_err(io(&file))?;
                Ok((location, bytes))
            })
            .collect::<Result<_>>()?;
        Ok(ModelFiles { model, data })
    }

    /// Loads the model, its external values taken from [`ModelFiles::data`].
    pub fn load(&self) -> Result<Model> {
        Model::from_bytes_with_data(&self.model, &|location| {
            self.data.get(location).map(Vec::as_slice)
        })
    }
}

impl Model {
    /// Loads an ONNX model file. External tensor data is resolved next to the file.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        let bytes =
            crate::fs::read_regular(path, crate::fs::MAX_MODEL_BYTES).map_err(|source| {
                Error::Io {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Model::parse(&bytes, path.parent().map(Path::to_path_buf), name, &|_| {
            None
        })
    }

    /// Loads an ONNX model from memory (e.g. bytes embedded in the app). A model with
    /// external tensor data is [`Error::InvalidModel`] here: load it with [`Model::load`] or
    /// from its [`ModelFiles`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Model> {
        Model::parse(bytes, None, String::new(), &|_| None)
    }

    /// Loads an ONNX model from memory whose tensors keep their values in external data
    /// files, given by `data(location)` (e.g. files of a signed bundle). No file is read.
    pub fn from_bytes_with_data<'a>(
        bytes: &[u8],
        data: &dyn Fn(&str) -> Option<&'a [u8]>,
    ) -> Result<Model> {
        Model::parse(bytes, None, String::new(), data)
    }

    /// `dir`: where tract resolves external data (a file load); without it, external
    /// values come from `data` and are moved into the model before tract sees it.
    fn parse<'a>(
        bytes: &[u8],
        dir: Option<PathBuf>,
        name: String,
        data: &dyn Fn(&str) -> Option<&'a [u8]>,
    ) -> Result<Model> {
        catch_panic("model loading", || {
            let mut proto = onnx::decode(bytes)?;
            if dir.is_none() {
                onnx::inline_external_data(&mut proto, data)?;
            }
            if proto.ir_version <= 0 {
                return Err(Error::InvalidModel {
                    reason: "no IR version: the bytes are not an ONNX model".into(),
                });
            }
            let mut info = ModelInfo::from_proto(&proto, bytes.len() as u64)?;
            info.sha256 = format!("{:x}", sha2::Sha256::digest(bytes));
            check_external_data(&proto, dir.as_deref())?;
            check_graph(&proto)?;
            // onnxruntime's contrib ops tract lacks, as the standard ops they mean.
            let decomposed = contrib::decompose(&mut proto);
            if decomposed > 0 {
                tracing::debug!("{decomposed} com.microsoft nodes rewritten to standard ops");
            }
            // Shape arithmetic that detours through int32, kept symbolic in partly
            // symbolic plans.
            let shape_casts = shape_casts::shape_casts(&proto);
            let dir = dir.as_ref().and_then(|d| d.to_str());
            // value_info shapes are hints in ONNX (onnxruntime re-infers them), and some
            // tools write wrong ones; tract would take them as facts, so they are ignored.
            let parsed = tract_onnx::onnx()
                .with_ignore_value_info(true)
                .parse(&proto, dir)
                .map_err(|e| Error::Compile {
                    backend: crate::Backend::Cpu,
                    reason: chain(&e),
                })?;
            if !parsed.unresolved_inputs.is_empty() {
                return Err(Error::InvalidModel {
                    reason: format!(
                        "nodes read undefined tensors: {:?}",
                        parsed.unresolved_inputs
                    ),
                });
            }
            check_supported(&proto, &parsed.model)?;
            let name = if name.is_empty() {
                info.graph_name.clone()
            } else {
                name
            };
            let baseline = match info.metadata.get(baseline::METADATA_KEY) {
                Some(json) => Some(Arc::new(Baseline::from_json(json).map_err(|e| {
                    Error::InvalidModel {
                        reason: format!("metadata {:?}: {e}", baseline::METADATA_KEY),
                    }
                })?)),
                None => None,
            };
            let mut first_nodes = BTreeMap::new();
            if let Some(graph) = &proto.graph {
                for node in &graph.node {
                    let name = match (node.name.is_empty(), node.output.first()) {
                        (true, Some(output)) => output.clone(),
                        _ => node.name.clone(),
                    };
                    first_nodes.entry(onnx::op_key(node)).or_insert(name);
                }
            }
            // A fused graph that tract cannot parse is dropped: the model runs unfused.
            let integer_graph = crate::qdq::fuse(&proto).and_then(|(fused, n)| {
                match tract_onnx::onnx()
                    .with_ignore_value_info(true)
                    .parse(&fused, dir)
                {
                    Ok(p) if p.unresolved_inputs.is_empty() => Some(Arc::new((p.model, n))),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::debug!("QDQ fusion dropped: {}", chain(&e));
                        None
                    }
                }
            });
            let largest_folded = proto.graph.as_ref().and_then(largest_folded);
            Ok(Model {
                largest_folded,
                info: Arc::new(info),
                graph: Arc::new(parsed.model),
                integer_graph,
                name,
                baseline,
                first_nodes: Arc::new(first_nodes),
                shape_casts: Arc::new(shape_casts),
            })
        })
    }

    /// The model's metadata.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// A short name: the file stem for a loaded file, else the graph name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The drift baseline the model ships (`metadata_props["tern.baseline"]`), if any.
    pub fn baseline(&self) -> Option<&Baseline> {
        self.baseline.as_deref()
    }

    /// Seeded random inputs for every model input (for benchmarks, smoke tests and
    /// quantization evaluation): floats uniform in [0, 1), integers in [0, 100) (i64) or
    /// [0, 256) (i32), symbolic dimensions sized from `dims` (default 1).
    pub fn random_inputs(
        &self,
        seed: u64,
        dims: &BTreeMap<String, usize>,
    ) -> Result<Vec<(String, Tensor)>> {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        self.inputs()
            .iter()
            .map(|info| {
                let shape: Vec<usize> = info
                    .shape
                    .as_ref()
                    .ok_or_else(|| Error::InvalidOption {
                        reason: format!("input {:?} declares no shape", info.name),
                    })?
                    .iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => *n,
                        Dim::Symbolic(s) => dims.get(s).copied().unwrap_or(1),
                    })
                    .collect();
                let n: usize = shape.iter().product();
                let t = match info.dtype.unwrap_or(DType::F32) {
                    DType::F32 => {
                        Tensor::from_vec(&shape, (0..n).map(|_| rng.random::<f32>()).collect())?
                    }
                    DType::F16 => Tensor::from_vec(
                        &shape,
                        (0..n).map(|_| half::f16::from_f32(rng.random())).collect(),
                    )?,
                    DType::F64 => {
                        Tensor::from_vec(&shape, (0..n).map(|_| rng.random::<f64>()).collect())?
                    }
                    DType::I64 => Tensor::from_vec(
                        &shape,
                        (0..n).map(|_| rng.random_range(0..100i64)).collect(),
                    )?,
                    DType::I32 => Tensor::from_vec(
                        &shape,
                        (0..n).map(|_| rng.random_range(0..256i32)).collect(),
                    )?,
                    DType::U8 => {
                        Tensor::from_vec(&shape, (0..n).map(|_| rng.random::<u8>()).collect())?
                    }
                    DType::I8 => {
                        Tensor::from_vec(&shape, (0..n).map(|_| rng.random::<i8>()).collect())?
                    }
                    DType::Bool => {
                        Tensor::from_vec(&shape, (0..n).map(|_| rng.random::<bool>()).collect())?
                    }
                    other => {
                        return Err(Error::InvalidOption {
                            reason: format!(
                                "cannot make random {other} values for input {:?}",
                                info.name
                            ),
                        })
                    }
                };
                Ok((info.name.clone(), t))
            })
            .collect()
    }

    /// The model inputs (initializers excluded).
    pub fn inputs(&self) -> &[TensorInfo] {
        &self.info.inputs
    }

    /// The model outputs.
    pub fn outputs(&self) -> &[TensorInfo] {
        &self.info.outputs
    }

    pub(crate) fn graph(&self) -> &InferenceModel {
        &self.graph
    }

    /// The graph with QDQ convolutions fused to integer ops and how many were, if any.
    pub(crate) fn largest_folded(&self) -> Option<(&str, u64)> {
        self.largest_folded.as_ref().map(|(n, b)| (n.as_str(), *b))
    }

    /// The int32 casts of shape values (by output name) a partly symbolic plan of this
    /// model retypes to int64.
    pub(crate) fn shape_casts(&self) -> Arc<Vec<String>> {
        self.shape_casts.clone()
    }

    /// `graph` (this model's, or its integer twin) with its shape casts retyped to int64.
    pub(crate) fn widen_shape_casts(graph: &InferenceModel, casts: &[String]) -> InferenceModel {
        let (widened, found) = shape_casts::widen(graph, casts);
        if found > 0 {
            tracing::debug!("{found} int32 casts of shape values kept in int64");
        }
        widened
    }

    pub(crate) fn integer_graph(&self) -> Option<(&InferenceModel, usize)> {
        self.integer_graph.as_deref().map(|(g, n)| (g, *n))
    }

    /// The name of the first top-level node with this op type (a key of
    /// [`ModelInfo::op_histogram`]).
    pub fn first_node_of(&self, op: &str) -> Option<&str> {
        self.first_nodes.get(op).map(String::as_str)
    }
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("inputs", &self.info.inputs)
            .field("outputs", &self.info.outputs)
            .finish()
    }
}

/// Fails unless every external data file the model's initializers name is a regular file
/// (a FIFO would block the load forever, a device never end it).
fn check_external_data(proto: &pb::ModelProto, dir: Option<&Path>) -> Result<()> {
    let Some(graph) = &proto.graph else {
        return Ok(());
    };
    for tensor in &graph.initializer {
        let Some(location) = tensor.external_data.iter().find(|e| e.key == "location") else {
            continue;
        };
        let Some(dir) = dir else {
            continue;
        };
        crate::fs::check_regular(&dir.join(&location.value), u64::MAX).map_err(|e| {
            Error::InvalidModel {
                reason: format!(
                    "external data of {:?} ({:?}): {e}",
                    tensor.name, location.value
                ),
            }
        })?;
    }
    Ok(())
}

/// Ops whose window attributes (`kernel_shape`, `strides`, `dilations`, `pads`) tract's
/// kernels index by: a 0 stride divides by zero there.
const WINDOWED_OPS: &[&str] = &[
    "AveragePool",
    "Conv",
    "ConvInteger",
    "ConvTranspose",
    "LpPool",
    "MaxPool",
    "QLinearConv",
];

/// Static checks tract would otherwise fail with a panic (a vague `panic` kind) or worse:
/// window attributes out of range in the top-level graph, Transpose permutations that are
/// not permutations, and graph outputs nothing produces.
fn check_graph(proto: &pb::ModelProto) -> Result<()> {
    let Some(graph) = &proto.graph else {
        return Ok(());
    };
    let windowed = |n: &&pb::NodeProto| {
        onnx::is_default_domain(&n.domain) && WINDOWED_OPS.contains(&n.op_type.as_str())
    };
    for node in graph.node.iter().filter(windowed) {
        for attr in &node.attribute {
            let least = match attr.name.as_str() {
                "kernel_shape" | "strides" | "dilations" => 1,
                "pads" | "output_padding" => 0,
                _ => continue,
            };
            if let Some(bad) = attr.ints.iter().find(|v| **v < least) {
                return Err(Error::InvalidModel {
                    reason: format!(
                        "node {:?} ({}): {} must be at least {least}, got {bad} in {:?}",
                        node.name, node.op_type, attr.name, attr.ints
                    ),
                });
            }
        }
    }
    for node in graph
        .node
        .iter()
        .filter(|n| onnx::is_default_domain(&n.domain) && n.op_type == "Transpose")
    {
        // tract builds the output from `perm` as given: a repeated axis makes it allocate
        // for a shape that does not exist (gigabytes, then an abort).
        let Some(perm) = node.attribute.iter().find(|a| a.name == "perm") else {
            continue;
        };
        let mut sorted = perm.ints.clone();
        sorted.sort_unstable();
        if sorted.iter().zip(0..).any(|(v, i)| *v != i) {
            return Err(Error::InvalidModel {
                reason: format!(
                    "node {:?} (Transpose): perm {:?} is not a permutation of 0..{}",
                    node.name,
                    perm.ints,
                    perm.ints.len()
                ),
            });
        }
    }
    let produced: std::collections::HashSet<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter())
        .chain(graph.input.iter().map(|i| &i.name))
        .chain(graph.initializer.iter().map(|t| &t.name))
        .map(String::as_str)
        .collect();
    if let Some(output) = graph
        .output
        .iter()
        .find(|o| !produced.contains(o.name.as_str()))
    {
        return Err(Error::InvalidModel {
            reason: format!("graph output {:?} is produced by no node", output.name),
        });
    }
    Ok(())
}

/// Of the nodes whose output size constant inputs decide — which tract evaluates while it
/// types the graph, before any run — the one with the largest output: its name and a lower
/// bound of its bytes. A hostile `ConstantOfShape` of `[100000, 100000, 100]` asks for
/// 4 TB there; sessions refuse it against their memory limit instead.
fn largest_folded(graph: &pb::GraphProto) -> Option<(String, u64)> {
    // Small constants (shapes, bounds, repeats) by name: initializers and Constant nodes.
    let small = |t: &pb::TensorProto| t.dims.iter().product::<i64>() <= 64;
    let mut consts: HashMap<&str, Vec<f64>> = HashMap::new();
    let values = |t: &pb::TensorProto| -> Option<Vec<f64>> {
        let resolver = tract_onnx::data_resolver::default();
        let tensor = tract_onnx::tensor::load_tensor(&*resolver, t, None).ok()?;
        let tensor = tensor.cast_to::<f64>().ok()?;
        let view = tensor.to_plain_array_view::<f64>().ok()?;
        Some(view.iter().copied().collect())
    };
    for t in graph.initializer.iter().filter(|t| small(t)) {
        if let Some(v) = values(t) {
            consts.insert(&t.name, v);
        }
    }
    for node in graph.node.iter().filter(|n| n.op_type == "Constant") {
        let value = node.attribute.iter().find(|a| a.name == "value");
        if let (Some(t), Some(out)) = (value.and_then(|a| a.t.as_ref()), node.output.first()) {
            if let Some(v) = small(t).then(|| values(t)).flatten() {
                consts.insert(out, v);
            }
        }
    }
    let input = |node: &pb::NodeProto, ix: usize| {
        node.input
            .get(ix)
            .and_then(|name| consts.get(name.as_str()))
    };
    let elements = |v: &[f64]| {
        v.iter()
            .fold(1u64, |n, d| n.saturating_mul(d.max(0.0) as u64))
    };
    graph
        .node
        .iter()
        .filter(|n| onnx::is_default_domain(&n.domain))
        .filter_map(|node| {
            let bytes = match node.op_type.as_str() {
                // The fill value's type (f32 by default) times the shape.
                "ConstantOfShape" => {
                    let width = node
                        .attribute
                        .iter()
                        .find(|a| a.name == "value")
                        .and_then(|a| a.t.as_ref())
                        .and_then(|t| DType::from_onnx(t.data_type))
                        .and_then(DType::size_of)
                        .unwrap_or(4);
                    elements(input(node, 0)?).saturating_mul(width as u64)
                }
                // At least one byte per element of the target shape or the repeats.
                "Expand" | "Tile" => elements(input(node, 1)?),
                "Range" => {
                    let (start, limit, delta) = (
                        input(node, 0)?.first()?,
                        input(node, 1)?.first()?,
                        input(node, 2)?.first()?,
                    );
                    let n = ((limit - start) / delta).ceil();
                    if n.is_finite() && n > 0.0 {
                        n.min(u64::MAX as f64) as u64
                    } else {
                        0
                    }
                }
                _ => return None,
            };
            let name = match node.name.is_empty() {
                true => node.output.first().cloned().unwrap_or_default(),
                false => node.name.clone(),
            };
            Some((name, bytes))
        })
        .max_by_key(|(_, bytes)| *bytes)
}

/// Fails with [`Error::UnsupportedOp`] naming the first node tract has no implementation for.
fn check_supported(proto: &pb::ModelProto, graph: &InferenceModel) -> Result<()> {
    let Some(node) = graph
        .nodes()
        .iter()
        .find(|n| n.op_is::<tract_onnx::tract_hir::ops::unimpl::UnimplementedOp>())
    else {
        return Ok(());
    };
    let pb_node = proto
        .graph
        .iter()
        .flat_map(|g| g.node.iter())
        .find(|p| p.name == node.name || p.output.first().is_some_and(|o| *o == node.name));
    Err(Error::UnsupportedOp {
        op_type: pb_node.map_or_else(|| node.op.name().to_string(), |p| p.op_type.clone()),
        domain: pb_node.map(|p| p.domain.clone()).unwrap_or_default(),
        node: node.name.clone(),
    })
}
