//! A lowered model: device steps over numbered value slots, run with burn's backend ops.
//!
//! Everything here is generic over burn's [`Backend`], so the same program runs on wgpu
//! (Vulkan, Metal, DX12, WebGPU) in apps and on burn's CPU backend in the unit tests. What
//! each step computes is its op family's business ([`super::ops`]); the program owns the
//! slots, the order, the f16 ↔ f32 casts around ops that keep f32, and the read-back.

use burn_backend::read_sync;
use burn_backend::tensor::{Device, FloatTensor};
use burn_backend::{Backend, FloatDType, TensorData};

use super::ops::Op;
use crate::error::Result;
use crate::error::{catch_panic, Error};
use crate::tensor::Tensor;
use crate::Backend as TernBackend;

/// One step: an op reading slots and writing one.
pub(crate) struct Step<B: Backend> {
    pub op: Op<B>,
    pub inputs: Vec<usize>,
    pub output: usize,
    /// The graph node it came from (for errors).
    pub node: String,
}

/// A model lowered for one device and one set of input shapes.
pub(crate) struct Program<B: Backend> {
    device: Device<B>,
    /// The float type values are kept in between steps (f32 or f16).
    precision: FloatDType,
    /// Constants, uploaded once, with the slot each fills.
    consts: Vec<(usize, FloatTensor<B>)>,
    steps: Vec<Step<B>>,
    /// For each step, its inputs read for the last time there (taken, not cloned).
    last_use: Vec<Vec<bool>>,
    n_slots: usize,
    inputs: Vec<usize>,
    outputs: Vec<(usize, Vec<usize>)>,
}

impl<B: Backend> Program<B> {
    pub(crate) fn new(
        device: Device<B>,
        precision: FloatDType,
        consts: Vec<(usize, FloatTensor<B>)>,
        steps: Vec<Step<B>>,
        n_slots: usize,
        inputs: Vec<usize>,
        outputs: Vec<(usize, Vec<usize>)>,
    ) -> Program<B> {
        let mut last = vec![usize::MAX; n_slots];
        for (ix, step) in steps.iter().enumerate() {
            for &s in &step.inputs {
                last[s] = ix;
            }
        }
        for &(s, _) in &outputs {
            last[s] = usize::MAX;
        }
        let mut seen = vec![false; n_slots];
        let last_use = steps
            .iter()
            .enumerate()
            .map(|(ix, step)| {
                // A slot read twice by one step is taken only at its final read.
                let mut flags = vec![false; step.inputs.len()];
                for (j, &s) in step.inputs.iter().enumerate().rev() {
                    if last[s] == ix && !seen[s] {
                        flags[j] = true;
                        seen[s] = true;
                    }
                }
                flags
            })
            .collect();
        Program {
            device,
            precision,
            consts,
            steps,
            last_use,
            n_slots,
            inputs,
            outputs,
        }
    }

    /// How many device steps the program runs.
    pub(crate) fn len(&self) -> usize {
        self.steps.len()
    }

    /// Uploads the inputs (f32, in model order), runs every step, reads the outputs back.
    pub(crate) fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut slots: Vec<Option<FloatTensor<B>>> = vec![None; self.n_slots];
        for (slot, tensor) in &self.consts {
            slots[*slot] = Some(tensor.clone());
        }
        for (slot, tensor) in self.inputs.iter().zip(inputs) {
            slots[*slot] = Some(self.upload(tensor.as_slice::<f32>()?, tensor.shape()));
        }
        for (step, last) in self.steps.iter().zip(&self.last_use) {
            let args = step
                .inputs
                .iter()
                .zip(last)
                .map(|(&s, &take)| {
                    let v = if take {
                        slots[s].take()
                    } else {
                        slots[s].clone()
                    };
                    v.ok_or_else(|| Error::Inference {
                        backend: TernBackend::Gpu,
                        reason: format!("node {:?} reads an empty slot {s}", step.node),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            // A burn kernel that panics is reported with the node it ran for.
            let y = catch_panic("gpu step", || Ok(self.step(&step.op, args))).map_err(|e| {
                Error::Inference {
                    backend: TernBackend::Gpu,
                    reason: format!("node {:?} ({}): {e}", step.node, step.op.name()),
                }
            })?;
            slots[step.output] = Some(y);
        }
        self.outputs
            .iter()
            .map(|(slot, shape)| {
                let t = slots[*slot].clone().ok_or_else(|| Error::Inference {
                    backend: TernBackend::Gpu,
                    reason: format!("output slot {slot} was never written"),
                })?;
                let data = read_sync(B::float_into_data(self.to_f32(t))).map_err(|e| {
                    Error::Inference {
                        backend: TernBackend::Gpu,
                        reason: format!("reading an output back from the device: {e:?}"),
                    }
                })?;
                let values = data.try_into_vec::<f32>().map_err(|e| Error::Inference {
                    backend: TernBackend::Gpu,
                    reason: format!("output is not f32: {e:?}"),
                })?;
                Tensor::from_vec(shape, values)
            })
            .collect()
    }

    /// Runs like [`Program::run`] but reads every step's output back: `(node, values)`.
    #[cfg(test)]
    pub(crate) fn run_steps(&self, inputs: &[Tensor]) -> Vec<(String, String, Vec<f32>)> {
        let mut slots: Vec<Option<FloatTensor<B>>> = vec![None; self.n_slots];
        for (slot, tensor) in &self.consts {
            slots[*slot] = Some(tensor.clone());
        }
        for (slot, tensor) in self.inputs.iter().zip(inputs) {
            slots[*slot] = Some(self.upload(tensor.as_slice::<f32>().unwrap(), tensor.shape()));
        }
        let mut trace = Vec::new();
        for step in &self.steps {
            let args = step
                .inputs
                .iter()
                .map(|&s| slots[s].clone().unwrap())
                .collect();
            let y = self.step(&step.op, args);
            let values = read_sync(B::float_into_data(self.to_f32(y.clone())))
                .unwrap()
                .try_into_vec::<f32>()
                .unwrap();
            trace.push((step.node.clone(), step.op.name(), values));
            slots[step.output] = Some(y);
        }
        trace
    }

    /// An f32 input uploaded and stored in the program's precision.
    fn upload(&self, values: &[f32], shape: &[usize]) -> FloatTensor<B> {
        let t = B::float_from_data(
            TensorData::new(values.to_vec(), shape.to_vec()),
            &self.device,
        );
        self.cast(t, self.precision)
    }

    /// A value in f32 (for reading back).
    fn to_f32(&self, t: FloatTensor<B>) -> FloatTensor<B> {
        self.cast(t, FloatDType::F32)
    }

    /// `t` cast to `to` (in an f32 program every value is already f32: nothing to do).
    fn cast(&self, t: FloatTensor<B>, to: FloatDType) -> FloatTensor<B> {
        if self.precision == FloatDType::F32 {
            t
        } else {
            B::float_cast(t, to)
        }
    }

    /// Runs one op; in an f16 program, ops that need f32 get their inputs widened and
    /// their output narrowed back.
    fn step(&self, op: &Op<B>, args: Vec<FloatTensor<B>>) -> FloatTensor<B> {
        if self.precision == FloatDType::F32 || !op.keeps_f32() {
            return op.eval(&self.device, args);
        }
        let args = args.into_iter().map(|a| self.to_f32(a)).collect();
        self.cast(op.eval(&self.device, args), self.precision)
    }
}
