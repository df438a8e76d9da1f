//! [`Flow`]: any of the request-path patterns behind one type and one answer, so a flow
//! can be run by name (a flow file, the CLI, the bindings) and nested as a step of
//! another ([`Step::flow`]).

use std::sync::Arc;
use std::time::Duration;

use tern::Outputs;

use crate::cascade::Cascade;
use crate::error::Result;
use crate::fanout::{FanOut, Missing};
use crate::pipeline::Pipeline;
use crate::step::{Compute, Failure, Inputs, Source, Step, StepBuilder};

/// A built flow of any kind.
#[derive(Debug)]
pub enum Flow {
    /// Early exit: [`Cascade`].
    Cascade(Cascade),
    /// Parallel steps merged under a deadline: [`FanOut`].
    FanOut(FanOut),
    /// Steps in sequence: [`Pipeline`].
    Pipeline(Pipeline),
}

/// Any flow's answer: the outputs and what produced them.
#[derive(Debug, Clone)]
pub struct FlowAnswer {
    /// The outputs.
    pub outputs: Outputs,
    /// The steps whose answers make the outputs, each with who answered for it: the
    /// answering stage of a cascade, the merged steps of a fan-out, every step of a
    /// pipeline.
    pub answered: Vec<(String, Source)>,
    /// A fan-out's steps that did not contribute, with why.
    pub missing: Vec<Missing>,
    /// A cascade's answering stage.
    pub stage: Option<usize>,
    /// A cascade's confidence per stage that ran and has an exit.
    pub confidences: Vec<f32>,
    /// Why a step the answer should have come from did not answer itself (a cascade's
    /// last stage that failed after an earlier one answered, a step a fallback answered
    /// for).
    pub failure: Option<Failure>,
    /// How long the request took.
    pub elapsed: Duration,
}

impl Flow {
    /// The flow's name.
    pub fn name(&self) -> &str {
        match self {
            Flow::Cascade(c) => c.name(),
            Flow::FanOut(f) => f.name(),
            Flow::Pipeline(p) => p.name(),
        }
    }

    /// Runs one request.
    pub fn run(&self, inputs: &Inputs) -> Result<FlowAnswer> {
        let empty = |outputs, elapsed| FlowAnswer {
            outputs,
            answered: Vec::new(),
            missing: Vec::new(),
            stage: None,
            confidences: Vec::new(),
            failure: None,
            elapsed,
        };
        Ok(match self {
            Flow::Cascade(c) => {
                let a = c.run(inputs)?;
                let name = c.stage_name(a.stage).to_string();
                FlowAnswer {
                    answered: vec![(name, a.answer.source)],
                    stage: Some(a.stage),
                    confidences: a.confidences,
                    failure: a.answer.failure,
                    ..empty(a.answer.outputs, a.elapsed)
                }
            }
            Flow::FanOut(f) => {
                let a = f.run(inputs)?;
                FlowAnswer {
                    answered: a.answered,
                    missing: a.missing,
                    ..empty(a.outputs, a.elapsed)
                }
            }
            Flow::Pipeline(p) => {
                let a = p.run(inputs)?;
                FlowAnswer {
                    answered: a.answered,
                    failure: a.failure,
                    ..empty(a.outputs, a.elapsed)
                }
            }
        })
    }

    pub(crate) fn signature(&self) -> Option<crate::step::Signature> {
        match self {
            Flow::Cascade(c) => c.signature(),
            Flow::FanOut(f) => f.signature(),
            Flow::Pipeline(p) => p.signature(),
        }
    }
}

impl Compute for Flow {
    fn compute(&self, inputs: &Inputs) -> Result<Outputs> {
        self.run(inputs).map(|a| a.outputs)
    }
}

impl Step {
    /// A step that runs a whole flow (a fan-out as a cascade's last stage, a cascade
    /// inside a pipeline), with the flow's declared inputs and outputs checked where it
    /// is chained. Its cache entries are keyed by the flow's name.
    pub fn flow(name: impl Into<String>, flow: Arc<Flow>) -> StepBuilder {
        let signature = flow.signature();
        let name = name.into();
        let identity = format!("flow:{}", flow.name());
        StepBuilder::new(name, flow, identity).declared(signature)
    }
}
