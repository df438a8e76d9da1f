//! What runs a served model's requests: its session alone, its session behind a
//! micro-batcher (concurrent requests stacked along the batch axis into one run), or a
//! flow from a flow file (cascades, fan-outs, pipelines with caches, breakers and
//! fallbacks) — one interface for the server.

use std::sync::Arc;

use serde_json::{Map, Value};
use tern::{Outputs, Session, Tensor, TensorInfo};
use tern_flows::{BatchOptions, Batcher, Flows};

use crate::error::AgentError;

/// Runs a served model's requests.
pub enum Runner {
    /// The session, one run per request.
    Session(Arc<Session>),
    /// The session behind a micro-batcher.
    Batched {
        /// The session (for its signature).
        session: Arc<Session>,
        /// The batcher its requests go through.
        batcher: Batcher,
    },
    /// A flow of a flow file.
    Flow {
        /// Every flow of the file.
        flows: Arc<Flows>,
        /// This one's name.
        name: String,
    },
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Runner::Session(_) => f.write_str("Session"),
            Runner::Batched { .. } => f.write_str("Batched"),
            Runner::Flow { name, .. } => write!(f, "Flow({name})"),
        }
    }
}

impl Runner {
    /// `session` alone, or behind a batcher when `batch` is given and the model has a
    /// batch axis (a model without one is served unbatched, and logged).
    pub fn for_session(session: Session, batch: Option<&BatchOptions>, name: &str) -> Runner {
        let session = Arc::new(session);
        match batch {
            None => Runner::Session(session),
            Some(options) => match Batcher::new(session.clone(), options.clone()) {
                Ok(batcher) => Runner::Batched { session, batcher },
                Err(e) => {
                    tracing::info!(model = %name, reason = %e, "served unbatched");
                    Runner::Session(session)
                }
            },
        }
    }

    fn session(&self) -> Option<&Session> {
        match self {
            Runner::Session(s) | Runner::Batched { session: s, .. } => Some(s),
            Runner::Flow { .. } => None,
        }
    }

    /// The inputs a request must carry (a flow's are not declared: none listed).
    pub fn inputs(&self) -> Vec<TensorInfo> {
        self.session().map(Session::inputs).unwrap_or_default()
    }

    /// The outputs an answer carries (a flow's are not declared: none listed).
    pub fn outputs(&self) -> Vec<TensorInfo> {
        self.session()
            .map(|s| s.outputs().to_vec())
            .unwrap_or_default()
    }

    /// The output names, in order, when declared.
    pub fn output_names(&self) -> Option<&[String]> {
        self.session().map(Session::output_names)
    }

    /// Runs one request; the parameters say, for a flow, who answered.
    pub fn run(
        &self,
        inputs: Vec<(String, Tensor)>,
    ) -> Result<(Outputs, Map<String, Value>), AgentError> {
        match self {
            Runner::Session(s) => Ok((s.run(inputs)?, Map::new())),
            Runner::Batched { batcher, .. } => Ok((batcher.run(inputs)?, Map::new())),
            Runner::Flow { flows, name } => {
                let answer = flows.run(name, &inputs)?;
                let mut parameters = Map::new();
                parameters.insert(
                    "answered_by".into(),
                    Value::from(
                        answer
                            .answered
                            .iter()
                            .map(|(step, source)| format!("{step}:{}", source.as_str()))
                            .collect::<Vec<_>>(),
                    ),
                );
                if let Some(stage) = answer.stage {
                    parameters.insert("stage".into(), Value::from(stage));
                }
                if !answer.missing.is_empty() {
                    parameters.insert(
                        "missing".into(),
                        Value::from(
                            answer
                                .missing
                                .iter()
                                .map(|m| format!("{}:{}", m.step, m.failure.as_str()))
                                .collect::<Vec<_>>(),
                        ),
                    );
                }
                Ok((answer.outputs, parameters))
            }
        }
    }
}
