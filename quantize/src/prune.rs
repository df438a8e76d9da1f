//! Pruning: zeroing or removing weights that matter least.
//!
//! - [`prune_magnitude`] (unstructured): in every `Conv`/`MatMul`/`Gemm` weight, the given
//!   share of the smallest-magnitude values becomes zero. Shapes and the file size stay the
//!   same (ONNX runtimes store tensors dense), but the model compresses much better — what an
//!   app download or an over-the-air update ships — and it is the starting point for sparse
//!   fine-tuning. Latency does not change on dense kernels.
//! - [`prune_channels`] (structured): whole output channels of convolutions are removed, with
//!   every tensor that carries them, so the model really is smaller and faster.
//!
//! ## How channel pruning finds what it may cut
//! Every tensor that carries the channels of a group-1 `Conv` output is put in one *channel
//! space* (union-find): element-wise ops, `BatchNormalization`, depthwise `Conv`, pooling and
//! `Add`/`Mul`/`Sub`/`Div` with another tensor of the space or with a scalar or per-channel
//! constant keep the space; a binary op of two spaces (a residual `Add`, a squeeze-and-
//! excitation `Mul`) joins them. A space ends at the inputs of group-1 `Conv`s, whose input
//! channels are cut to match. A space that reaches anything else — a `Reshape`, a graph output
//! — is locked and left whole. In each free space the channels with the smallest summed L1
//! norm of their producing filters go. No retraining happens here: accuracy drops with the
//! ratio, and the report says by how much.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use tract_onnx::pb;

use crate::error::{QuantizeError, Result};
use crate::graph::{self, attr_i, f32_tensor, int_attr};

/// Which weights pruning may touch.
#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    /// Nodes (by name or op type) to leave alone.
    pub exclude: graph::Exclusions,
}

impl PruneOptions {
    fn allows(&self, n: &pb::NodeProto) -> bool {
        self.exclude.allows(n)
    }
}

/// What [`prune_magnitude`] did.
#[derive(Debug, Clone, Serialize)]
pub struct MagnitudeSummary {
    /// Weight tensors pruned.
    pub tensors: usize,
    /// Values set to zero.
    pub zeroed: usize,
    /// Values in those tensors.
    pub total: usize,
}

/// Checks the ratio and the model, and returns its graph with constants as initializers.
fn prepare<'m>(
    model: &'m mut pb::ModelProto,
    ratio: f32,
    what: &str,
) -> Result<&'m mut pb::GraphProto> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(QuantizeError::BadArgument(format!(
            "{what} {ratio}: expected a value in [0, 1)"
        )));
    }
    graph::ensure_not_quantized(model)?;
    let g = graph::graph_mut(model);
    graph::constants_to_initializers(g);
    Ok(g)
}

/// Zeroes the `sparsity` share of smallest-magnitude values of each constant weight of
/// `Conv`, `MatMul` and `Gemm` (per tensor).
pub fn prune_magnitude(
    model: &mut pb::ModelProto,
    sparsity: f32,
    options: &PruneOptions,
) -> Result<MagnitudeSummary> {
    let g = prepare(model, sparsity, "sparsity")?;
    let weights: HashSet<String> = g
        .node
        .iter()
        .filter(|n| matches!(n.op_type.as_str(), "Conv" | "MatMul" | "Gemm") && options.allows(n))
        .filter_map(|n| n.input.get(1).cloned())
        .collect();
    let mut summary = MagnitudeSummary {
        tensors: 0,
        zeroed: 0,
        total: 0,
    };
    for t in g
        .initializer
        .iter_mut()
        .filter(|t| weights.contains(&t.name))
    {
        let Some(mut values) = graph::f32_values(t).filter(|_| t.dims.len() >= 2) else {
            continue;
        };
        let cut = (values.len() as f64 * f64::from(sparsity)).floor() as usize;
        if cut > 0 {
            let mut magnitudes: Vec<f32> = values.iter().map(|v| v.abs()).collect();
            let (_, threshold, _) = magnitudes.select_nth_unstable_by(cut - 1, f32::total_cmp);
            let threshold = *threshold;
            // Ties at the threshold: zero exactly `cut` values, smallest first.
            let mut left = cut;
            for v in values.iter_mut().filter(|v| v.abs() < threshold) {
                *v = 0.0;
                left -= 1;
            }
            for v in values
                .iter_mut()
                .filter(|v| v.abs() == threshold && **v != 0.0)
            {
                if left == 0 {
                    break;
                }
                *v = 0.0;
                left -= 1;
            }
            summary.zeroed += cut - left;
        }
        summary.tensors += 1;
        summary.total += values.len();
        *t = f32_tensor(&t.name, &t.dims, &values);
    }
    if summary.tensors == 0 {
        return Err(QuantizeError::NothingToDo(
            "no Conv/MatMul/Gemm with a constant weight to prune".into(),
        ));
    }
    Ok(summary)
}

/// What [`prune_channels`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelSummary {
    /// Channel spaces that could be pruned.
    pub spaces: usize,
    /// Channel spaces left whole (they reach an op that is not channel-wise).
    pub locked: usize,
    /// Channels removed over all pruned spaces.
    pub removed: usize,
    /// Channels those spaces had.
    pub total: usize,
    /// What was cut, space by space.
    pub cuts: Vec<SpaceCut>,
}

/// The channels removed from one channel space.
#[derive(Debug, Clone, Serialize)]
pub struct SpaceCut {
    /// Convs whose output channels these were.
    pub producers: Vec<String>,
    /// Group-1 Convs that read them (their input channels were cut).
    pub consumers: Vec<String>,
    /// Channels the space had.
    pub channels: usize,
    /// Indices of the channels removed.
    pub removed: Vec<usize>,
}

/// A tensor that carries a space's channels on `axis` and must be cut with it: input `slot`
/// of node `node`.
#[derive(Debug, Clone, Copy)]
struct Cut {
    node: usize,
    slot: usize,
    axis: usize,
}

/// One channel space: who produces its channels and what must shrink with them.
#[derive(Debug, Default)]
struct Space {
    locked: bool,
    channels: Option<usize>,
    /// Group-1 Convs whose output channels these are.
    producers: Vec<usize>,
    /// Group-1 Convs that read these channels.
    consumers: Vec<usize>,
    /// Per-channel constants (weights, biases, BN parameters) cut on their axis.
    cuts: Vec<Cut>,
    /// Depthwise Convs whose `group` follows the channel count.
    depthwise: Vec<usize>,
}

/// Union-find over tensor names.
#[derive(Default)]
struct Spaces {
    parent: HashMap<String, String>,
    data: HashMap<String, Space>,
}

impl Spaces {
    fn find(&mut self, t: &str) -> String {
        let mut root = t.to_string();
        while let Some(p) = self.parent.get(&root).filter(|p| **p != root) {
            root = p.clone();
        }
        self.parent.insert(t.to_string(), root.clone());
        root
    }

    fn space(&mut self, t: &str) -> &mut Space {
        let root = self.find(t);
        self.data.entry(root).or_default()
    }

    fn union(&mut self, a: &str, b: &str) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra == rb {
            return;
        }
        let moved = self.data.remove(&rb).unwrap_or_default();
        self.parent.insert(rb, ra.clone());
        let s = self.data.entry(ra).or_default();
        s.locked |= moved.locked;
        match (s.channels, moved.channels) {
            (Some(x), Some(y)) if x != y => s.locked = true,
            (None, y) => s.channels = y,
            _ => {}
        }
        s.producers.extend(moved.producers);
        s.consumers.extend(moved.consumers);
        s.cuts.extend(moved.cuts);
        s.depthwise.extend(moved.depthwise);
    }
}

/// The axis a per-channel constant of `dims` carries channels on when broadcast against an
/// NC… tensor: `[C,1,…]` or `[1,C,1,…]` shapes whose trailing ones cover the spatial axes.
/// `None` for scalars (nothing to cut) — and an error for anything else.
fn channel_axis(dims: &[i64]) -> std::result::Result<Option<usize>, ()> {
    let big: Vec<usize> = (0..dims.len()).filter(|i| dims[*i] != 1).collect();
    match big.as_slice() {
        [] => Ok(None),
        // rank-4 [1,C,1,1] against NCHW, rank-3 [C,1,1]; both leave two trailing ones.
        [i] if dims.len() >= 3 && *i == dims.len() - 3 => Ok(Some(*i)),
        _ => Err(()),
    }
}

/// Reshapes of constants into constants (exporters reshape biases to `[1,C,1,1]` this way).
fn fold_constant_reshapes(g: &mut pb::GraphProto) {
    let mut inits = graph::initializers(g);
    let mut kept = Vec::with_capacity(g.node.len());
    for n in std::mem::take(&mut g.node) {
        let folded = (n.op_type == "Reshape" && n.input.len() == 2 && n.output.len() == 1)
            .then(|| {
                let data = inits.get(&n.input[0])?;
                let shape = inits.get(&n.input[1])?;
                let shape = graph::i64_values(shape)?;
                let count: i64 = data.dims.iter().product();
                let mut dims: Vec<i64> = shape
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        if *d == 0 {
                            data.dims.get(i).copied().unwrap_or(1)
                        } else {
                            *d
                        }
                    })
                    .collect();
                let known: i64 = dims.iter().filter(|d| **d > 0).product();
                if let Some(d) = dims.iter_mut().find(|d| **d == -1) {
                    *d = count / known.max(1);
                }
                (dims.iter().product::<i64>() == count).then(|| {
                    let mut t = data.clone();
                    t.name = n.output[0].clone();
                    t.dims = dims;
                    t
                })
            })
            .flatten();
        match folded {
            Some(t) => {
                inits.insert(t.name.clone(), t.clone());
                g.initializer.push(t);
            }
            None => kept.push(n),
        }
    }
    g.node = kept;
}

const CHANNEL_WISE: &[&str] = &[
    "Relu",
    "Clip",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "Tanh",
    "Identity",
    "Neg",
    "Abs",
    "Elu",
    "Selu",
    "Softplus",
    "PRelu",
    "Dropout",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "MaxPool",
    "AveragePool",
];

/// The cuts that follow a `Conv`'s output channels: its weight's first axis and its bias.
fn own_channel_cuts(ix: usize, n: &pb::NodeProto) -> impl Iterator<Item = Cut> {
    (1..n.input.len().min(3)).map(move |slot| Cut {
        node: ix,
        slot,
        axis: 0,
    })
}

/// Builds the channel spaces of `g`.
fn channel_spaces(g: &pb::GraphProto, options: &PruneOptions) -> Spaces {
    let inits = graph::initializers(g);
    let mut spaces = Spaces::default();
    for o in &g.output {
        spaces.space(&o.name).locked = true;
    }
    for i in &g.input {
        spaces.space(&i.name).locked = true;
    }
    for (ix, n) in g.node.iter().enumerate() {
        let dynamic: Vec<&String> = n
            .input
            .iter()
            .filter(|i| !inits.contains_key(*i) && !i.is_empty())
            .collect();
        let lock_all = |spaces: &mut Spaces| {
            for t in dynamic.iter().copied().chain(&n.output) {
                spaces.space(t).locked = true;
            }
        };
        let weight = n.input.get(1).and_then(|w| inits.get(w));
        let out = n.output.first();
        match (n.op_type.as_str(), weight, out) {
            ("Conv", Some(w), Some(out)) if w.dims.len() >= 3 && graph::f32_values(w).is_some() => {
                let group = attr_i(n, "group", 1);
                let cout = w.dims[0] as usize;
                let bias_ok = n.input.get(2).is_none_or(|b| inits.contains_key(b));
                if group == 1 && bias_ok && options.allows(n) {
                    // A consumer of its input's channels, the producer of a new space.
                    let input = spaces.space(&n.input[0]);
                    input.cuts.push(Cut {
                        node: ix,
                        slot: 1,
                        axis: 1,
                    });
                    input.consumers.push(ix);
                    let s = spaces.space(out);
                    s.producers.push(ix);
                    s.channels = Some(cout);
                    s.cuts.extend(own_channel_cuts(ix, n));
                } else if group as usize == cout && w.dims[1] == 1 && bias_ok && options.allows(n) {
                    spaces.union(&n.input[0], out);
                    let s = spaces.space(out);
                    s.depthwise.push(ix);
                    s.cuts.extend(own_channel_cuts(ix, n));
                } else {
                    lock_all(&mut spaces);
                }
            }
            ("BatchNormalization", _, Some(out))
                if n.input.len() == 5 && n.input[1..].iter().all(|i| inits.contains_key(i)) =>
            {
                spaces.union(&n.input[0], out);
                let s = spaces.space(out);
                s.cuts.extend((1..5).map(|slot| Cut {
                    node: ix,
                    slot,
                    axis: 0,
                }));
            }
            (op, _, Some(out))
                if CHANNEL_WISE.contains(&op) || matches!(op, "Add" | "Mul" | "Sub" | "Div") =>
            {
                let mut ok = true;
                let mut cuts = Vec::new();
                for (slot, i) in n.input.iter().enumerate() {
                    if let Some(c) = inits.get(i) {
                        match channel_axis(&c.dims) {
                            Ok(None) => {}
                            // A per-channel operand of a binary op, or PRelu's slope.
                            Ok(Some(axis))
                                if matches!(op, "Add" | "Mul" | "Sub" | "Div" | "PRelu") =>
                            {
                                cuts.push(Cut {
                                    node: ix,
                                    slot,
                                    axis,
                                })
                            }
                            _ => ok = false,
                        }
                    }
                }
                if !ok || dynamic.is_empty() {
                    lock_all(&mut spaces);
                    continue;
                }
                for d in &dynamic {
                    spaces.union(d, out);
                }
                spaces.space(out).cuts.extend(cuts);
            }
            _ => lock_all(&mut spaces),
        }
    }
    spaces
}

/// Copies `t` keeping only the indices `keep` of `axis`.
fn select(t: &pb::TensorProto, axis: usize, keep: &[usize], name: &str) -> Option<pb::TensorProto> {
    let values = graph::f32_values(t)?;
    let dims: Vec<usize> = t.dims.iter().map(|d| *d as usize).collect();
    let outer: usize = dims[..axis].iter().product();
    let inner: usize = dims[axis + 1..].iter().product();
    let n = dims[axis];
    let mut out = Vec::with_capacity(outer * keep.len() * inner);
    for o in 0..outer {
        for k in keep {
            let start = (o * n + k) * inner;
            out.extend_from_slice(&values[start..start + inner]);
        }
    }
    let mut new_dims = t.dims.clone();
    new_dims[axis] = keep.len() as i64;
    Some(f32_tensor(name, &new_dims, &out))
}

/// Removes the `ratio` share of channels (fewest-L1 first, at least one kept) from every
/// prunable channel space of `model`.
pub fn prune_channels(
    model: &mut pb::ModelProto,
    ratio: f32,
    options: &PruneOptions,
) -> Result<ChannelSummary> {
    let g = prepare(model, ratio, "channel ratio")?;
    fold_constant_reshapes(g);
    let mut spaces = channel_spaces(g, options);
    let inits = graph::initializers(g);
    let mut summary = ChannelSummary {
        spaces: 0,
        locked: 0,
        removed: 0,
        total: 0,
        cuts: Vec::new(),
    };
    // A weight may be cut twice (a Conv's input and output channels): each cut applies to
    // the tensor as the previous one left it.
    let mut cut_tensors: BTreeMap<(usize, usize), pb::TensorProto> = BTreeMap::new();
    let roots: Vec<String> = spaces.data.keys().cloned().collect();
    for root in roots {
        let Some(space) = spaces.data.remove(&root) else {
            continue;
        };
        if space.producers.is_empty() {
            continue;
        }
        let tensor_of = |c: &Cut| &inits[&g.node[c.node].input[c.slot]];
        let Some(channels) = space.channels.filter(|ch| {
            !space.locked
                && space
                    .cuts
                    .iter()
                    .all(|c| tensor_of(c).dims.get(c.axis).copied() == Some(*ch as i64))
        }) else {
            summary.locked += 1;
            continue;
        };
        // Importance: L1 norm of each channel's filters, summed over the producers.
        let mut importance = vec![0f64; channels];
        for &p in &space.producers {
            let values = graph::f32_values(&inits[&g.node[p].input[1]]).unwrap_or_default();
            let per = (values.len() / channels.max(1)).max(1);
            for (c, chunk) in values.chunks(per).enumerate().take(channels) {
                importance[c] += chunk.iter().map(|v| f64::from(v.abs())).sum::<f64>() / per as f64;
            }
        }
        let cut = ((channels as f64 * f64::from(ratio)).floor() as usize).min(channels - 1);
        summary.spaces += 1;
        summary.total += channels;
        if cut == 0 {
            continue;
        }
        let mut order: Vec<usize> = (0..channels).collect();
        order.sort_by(|a, b| importance[*a].total_cmp(&importance[*b]));
        let mut keep: Vec<usize> = order[cut..].to_vec();
        keep.sort_unstable();
        for c in &space.cuts {
            let current = cut_tensors
                .get(&(c.node, c.slot))
                .unwrap_or_else(|| tensor_of(c));
            let name = format!("{}_pruned{}_{}", tensor_of(c).name, c.node, c.slot);
            let pruned = select(current, c.axis, &keep, &name).ok_or_else(|| {
                QuantizeError::InvalidModel(format!("{}: not an f32 constant", current.name))
            })?;
            cut_tensors.insert((c.node, c.slot), pruned);
        }
        for &d in &space.depthwise {
            let node = &mut g.node[d];
            node.attribute.retain(|a| a.name != "group");
            node.attribute.push(int_attr("group", keep.len() as i64));
        }
        summary.removed += cut;
        let names = |ixs: &[usize]| ixs.iter().map(|i| g.node[*i].name.clone()).collect();
        summary.cuts.push(SpaceCut {
            producers: names(&space.producers),
            consumers: names(&space.consumers),
            channels,
            removed: order[..cut].to_vec(),
        });
    }
    if summary.removed == 0 {
        return Err(QuantizeError::NothingToDo(format!(
            "no channel space can lose {ratio} of its channels ({} locked)",
            summary.locked
        )));
    }
    for ((node, slot), t) in cut_tensors {
        g.node[node].input[slot] = t.name.clone();
        g.initializer.push(t);
    }
    // Shapes recorded for intermediate tensors are stale now; runtimes infer them again.
    g.value_info.clear();
    graph::prune_initializers(g);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_axes_of_constants() {
        assert_eq!(channel_axis(&[]), Ok(None));
        assert_eq!(channel_axis(&[1, 1, 1, 1]), Ok(None));
        assert_eq!(channel_axis(&[1, 8, 1, 1]), Ok(Some(1)));
        assert_eq!(channel_axis(&[8, 1, 1]), Ok(Some(0)));
        // [C] broadcasts on the last (width) axis, not on channels.
        assert_eq!(channel_axis(&[8]), Err(()));
        assert_eq!(channel_axis(&[1, 8, 4, 1]), Err(()));
    }

    #[test]
    fn select_keeps_the_chosen_rows() {
        let t = f32_tensor("w", &[3, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let s = select(&t, 0, &[0, 2], "w2").unwrap();
        assert_eq!(s.dims, vec![2, 2]);
        assert_eq!(graph::f32_values(&s).unwrap(), vec![0.0, 1.0, 4.0, 5.0]);
        let s = select(&t, 1, &[1], "w3").unwrap();
        assert_eq!(graph::f32_values(&s).unwrap(), vec![1.0, 3.0, 5.0]);
    }

    #[test]
    fn ratios_outside_zero_one_are_refused() {
        let mut m = pb::ModelProto::default();
        for r in [-0.1, 1.0, f32::NAN] {
            assert!(matches!(
                prune_magnitude(&mut m, r, &Default::default()),
                Err(QuantizeError::BadArgument(_))
            ));
        }
    }
}
