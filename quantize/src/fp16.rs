//! fp16 weight storage: float initializers become float16, each followed by a `Cast` back to
//! float. The file shrinks by half; inputs, outputs and compute stay fp32 (tract folds the
//! casts at load, so a tern session runs at fp32 speed — unlike a fully fp16 graph, which
//! tract computes in software on x86).

use std::collections::HashSet;

use tract_onnx::pb;

use crate::error::{QuantizeError, Result};
use crate::graph::{self, int_attr, node, tensor, FLOAT, FLOAT16};

/// Converts float initializers to fp16 storage, except those read by a node whose op type is
/// in `block_ops`. Returns how many were converted.
pub fn convert_fp16(model: &mut pb::ModelProto, block_ops: &HashSet<String>) -> Result<usize> {
    let g = graph::graph_mut(model);
    graph::constants_to_initializers(g);
    let graph_inputs: HashSet<String> = g.input.iter().map(|i| i.name.clone()).collect();
    let blocked: HashSet<String> = g
        .node
        .iter()
        .filter(|n| block_ops.contains(&n.op_type))
        .flat_map(|n| n.input.iter().cloned())
        .collect();
    let mut casts = Vec::new();
    let mut converted = 0;
    for t in g.initializer.iter_mut() {
        if graph_inputs.contains(&t.name) || blocked.contains(&t.name) {
            continue;
        }
        let Some(values) = graph::f32_values(t) else {
            continue;
        };
        let name = std::mem::take(&mut t.name);
        let stored = format!("{name}_fp16");
        let raw = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        *t = tensor(&stored, FLOAT16, &t.dims, raw);
        casts.push(node(
            "Cast",
            &format!("{name}_to_f32"),
            &[&stored],
            &[&name],
            vec![int_attr("to", FLOAT as i64)],
        ));
        converted += 1;
    }
    if converted == 0 {
        return Err(QuantizeError::NothingToDo(
            "no float initializers to convert".into(),
        ));
    }
    // The casts go first so that every consumer comes after its producer.
    casts.append(&mut g.node);
    g.node = casts;
    Ok(converted)
}
