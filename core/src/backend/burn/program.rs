//! A lowered model: device steps over numbered value slots, run with burn's backend ops.
//!
//! Everything here is generic over burn's [`Backend`], so the same program runs on wgpu
//! (Vulkan, Metal, DX12, WebGPU) in apps and on burn's CPU backend in the unit tests. Ops use burn's
//! rank-agnostic primitive API (`B::float_add`, `B::conv2d`…), which suits an interpreter
//! whose tensor ranks are only known at run time.

use burn_backend::ops::{ConvTransposeOptions, PadMode};
use burn_backend::tensor::{Device, FloatTensor, IntTensor};
use burn_backend::{
    get_or_init_device_settings, Backend, FloatDType, Scalar, Shape, Slice, TensorData,
};
use burn_backend::{read_sync, TensorMetadata};
use tract_onnx::tract_core::axes::AxesMapping;

use crate::error::Result;
use crate::error::{catch_panic, Error};
use crate::tensor::Tensor;
use burn_backend::ops::ConvOptions;

/// The backend's name in errors.
pub(crate) const NAME: crate::Backend = crate::Backend::Gpu;

/// An element-wise binary operation (inputs of equal rank, size-1 dims broadcast).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinKind {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
}

impl BinKind {
    /// From tract's binary mini-op name.
    pub(crate) fn from_name(name: &str) -> Option<BinKind> {
        Some(match name {
            "Add" => BinKind::Add,
            "Sub" => BinKind::Sub,
            "Mul" => BinKind::Mul,
            "Div" => BinKind::Div,
            "Pow" => BinKind::Pow,
            "Max" => BinKind::Max,
            "Min" => BinKind::Min,
            _ => return None,
        })
    }

    /// `a op b == b op a`.
    pub(crate) fn commutes(self) -> bool {
        matches!(
            self,
            BinKind::Add | BinKind::Mul | BinKind::Max | BinKind::Min
        )
    }
}

/// An element-wise unary operation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum UnaryKind {
    /// `x` where positive, `alpha * x` elsewhere.
    LeakyRelu(f32),
    /// The tanh approximation of GELU.
    GeluTanh,
    Sigmoid,
    Tanh,
    Exp,
    Ln,
    Sqrt,
    Rsqrt,
    Recip,
    Abs,
    Neg,
    Square,
    Erf,
    HardSwish,
    Silu,
    Gelu,
    Floor,
    Ceil,
    Round,
    Sin,
    Cos,
}

impl UnaryKind {
    /// From tract's element-wise mini-op name.
    pub(crate) fn from_name(name: &str) -> Option<UnaryKind> {
        use UnaryKind::*;
        Some(match name {
            "Sigmoid" => Sigmoid,
            "Tanh" => Tanh,
            "Exp" => Exp,
            "Ln" => Ln,
            "Sqrt" => Sqrt,
            "Rsqrt" => Rsqrt,
            "Recip" => Recip,
            "Abs" => Abs,
            "Neg" => Neg,
            "Square" => Square,
            "Erf" => Erf,
            "HardSwish" => HardSwish,
            "Silu" => Silu,
            "GeluExact" => Gelu,
            "GeluApproximate" => GeluTanh,
            "Floor" => Floor,
            "Ceil" => Ceil,
            // burn rounds half to even, like ONNX's Round.
            "RoundHalfToEven" => Round,
            "Sin" => Sin,
            "Cos" => Cos,
            _ => return None,
        })
    }
}

/// The geometry of a 1-D or 2-D sliding-window op, padding resolved for the input size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    /// `(before, after)` per spatial axis.
    pub padding: Vec<(usize, usize)>,
    /// The input has a batch axis (NCHW); without one (CHW) it is added for the op.
    pub batched: bool,
}

impl Window {
    fn lift<const F: usize>(v: &[usize]) -> [usize; 2] {
        match v {
            [a] => [F, *a],
            [a, b] => [*a, *b],
            _ => [F, F],
        }
    }
}

/// How an einsum with two inputs runs as one batched matmul `[bt, m, k] × [bt, k, n]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MatMulPlan {
    a: Layout,
    b: Layout,
    /// The matmul result's dims unflattened: batch…, m…, n…, output-only (size 1)…
    c_dims: Vec<usize>,
    /// Permutation from that order to the output's axis order (`None` when identity).
    c_perm: Option<Vec<usize>>,
}

/// Permute → broadcast batch dims → reshape to 3-D, for one matmul operand.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    perm: Option<Vec<usize>>,
    expand: Option<Vec<usize>>,
    shape3: [usize; 3],
}

impl Layout {
    fn new(perm: Vec<usize>, shape: &[usize], target: Vec<usize>, shape3: [usize; 3]) -> Layout {
        let permuted: Vec<usize> = perm.iter().map(|&i| shape[i]).collect();
        Layout {
            perm: (!perm.iter().enumerate().all(|(i, &p)| i == p)).then_some(perm),
            expand: (permuted != target).then_some(target),
            shape3,
        }
    }

    fn apply<B: Backend>(&self, mut x: FloatTensor<B>) -> FloatTensor<B> {
        if let Some(perm) = &self.perm {
            x = B::float_permute(x, perm);
        }
        if let Some(shape) = &self.expand {
            x = B::float_expand(x, Shape::from(shape.clone()));
        }
        B::float_reshape(x, Shape::from(self.shape3.to_vec()))
    }
}

impl MatMulPlan {
    /// Classifies the einsum's axes (batch: in A, B and C; m: A and C; n: B and C; k: A
    /// and B) and derives the layouts. Fails for what one matmul cannot express.
    pub(crate) fn new(
        axes: &AxesMapping,
        a: &[usize],
        b: &[usize],
        c: &[usize],
    ) -> std::result::Result<MatMulPlan, String> {
        let one = |v: &[usize]| -> std::result::Result<Option<usize>, String> {
            match v {
                [] => Ok(None),
                [p] => Ok(Some(*p)),
                _ => Err("an axis repeated within one operand".into()),
            }
        };
        // (position in A, in B, in C) per axis, by category.
        let (mut batch, mut m, mut n, mut k, mut c_only) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut a_only, mut b_only) = (vec![], vec![]);
        for axis in axes.iter_all_axes() {
            let pa = one(&axis.inputs[0])?;
            let pb = one(&axis.inputs[1])?;
            let pc = one(&axis.outputs[0])?;
            match (pa, pb, pc) {
                (Some(x), Some(y), Some(z)) => batch.push((x, y, z)),
                (Some(x), None, Some(z)) => m.push((x, z)),
                (None, Some(y), Some(z)) => n.push((y, z)),
                (Some(x), Some(y), None) => {
                    if a[x] != b[y] {
                        return Err(format!("contracted sizes differ: {} vs {}", a[x], b[y]));
                    }
                    k.push((x, y))
                }
                (None, None, Some(z)) if c[z] == 1 => c_only.push(z),
                (Some(x), None, None) if a[x] == 1 => a_only.push(x),
                (None, Some(y), None) if b[y] == 1 => b_only.push(y),
                _ => return Err(format!("axis {} cannot be a matmul axis", axis.repr)),
            }
        }
        let prod = |v: &mut dyn Iterator<Item = usize>| v.product::<usize>();
        let bt = prod(&mut batch.iter().map(|&(_, _, z)| c[z]));
        let mm = prod(&mut m.iter().map(|&(x, _)| a[x]));
        let nn = prod(&mut n.iter().map(|&(y, _)| b[y]));
        let kk = prod(&mut k.iter().map(|&(x, _)| a[x]));
        let batch_c: Vec<usize> = batch.iter().map(|&(_, _, z)| c[z]).collect();

        let a_perm: Vec<usize> = batch
            .iter()
            .map(|t| t.0)
            .chain(m.iter().map(|t| t.0))
            .chain(k.iter().map(|t| t.0))
            .chain(a_only.iter().copied())
            .collect();
        let a_target: Vec<usize> = batch_c
            .iter()
            .copied()
            .chain(m.iter().map(|&(x, _)| a[x]))
            .chain(k.iter().map(|&(x, _)| a[x]))
            .chain(a_only.iter().map(|_| 1))
            .collect();
        let b_perm: Vec<usize> = batch
            .iter()
            .map(|t| t.1)
            .chain(k.iter().map(|t| t.1))
            .chain(n.iter().map(|t| t.0))
            .chain(b_only.iter().copied())
            .collect();
        let b_target: Vec<usize> = batch_c
            .iter()
            .copied()
            .chain(k.iter().map(|&(_, y)| b[y]))
            .chain(n.iter().map(|&(y, _)| b[y]))
            .chain(b_only.iter().map(|_| 1))
            .collect();
        // Output axes in the order the matmul produces them.
        let c_order: Vec<usize> = batch
            .iter()
            .map(|t| t.2)
            .chain(m.iter().map(|t| t.1))
            .chain(n.iter().map(|t| t.1))
            .chain(c_only.iter().copied())
            .collect();
        let c_dims: Vec<usize> = c_order.iter().map(|&z| c[z]).collect();
        let mut c_perm = vec![0; c.len()];
        for (ix, &z) in c_order.iter().enumerate() {
            c_perm[z] = ix;
        }
        Ok(MatMulPlan {
            a: Layout::new(a_perm, a, a_target, [bt, mm, kk]),
            b: Layout::new(b_perm, b, b_target, [bt, kk, nn]),
            c_dims,
            c_perm: (!c_perm.iter().enumerate().all(|(i, &p)| i == p)).then_some(c_perm),
        })
    }

    pub(crate) fn run<B: Backend>(&self, a: FloatTensor<B>, b: FloatTensor<B>) -> FloatTensor<B> {
        let c = B::float_matmul(self.a.apply::<B>(a), self.b.apply::<B>(b));
        let c = B::float_reshape(c, Shape::from(self.c_dims.clone()));
        match &self.c_perm {
            Some(perm) => B::float_permute(c, perm),
            None => c,
        }
    }
}

/// One device operation with its attributes resolved.
pub(crate) enum Op<B: Backend> {
    Bin {
        kind: BinKind,
        /// Broadcast each operand to the output shape first (`None`: already that shape).
        expand: [Option<Vec<usize>>; 2],
    },
    BinScalar {
        kind: BinKind,
        value: f32,
    },
    Unary(UnaryKind),
    Conv {
        window: Window,
        groups: usize,
        out_channels: usize,
    },
    /// 2-D transposed convolution (NCHW); optional bias as a third input.
    ConvTranspose {
        options: ConvTransposeOptions<2>,
        out_channels: usize,
        /// `Some(groups)`: the kernel input is in tract's `[O, I/g, kh, kw]` layout and is
        /// rearranged to burn's `[I, O/g, kh, kw]` on the device.
        regroup: Option<usize>,
        /// `(before, after)` cropped from each (2-D lifted) spatial axis of the output:
        /// asymmetric padding, which burn's kernel cannot apply.
        crop: Option<[(usize, usize); 2]>,
    },
    /// Integer nearest upsampling: reshape to `split` (a size-1 axis after each upsampled
    /// one), broadcast to `expanded` (that axis to its scale), reshape to `out`.
    Upsample {
        split: Vec<usize>,
        expanded: Vec<usize>,
        out: Vec<usize>,
    },
    MatMul(Box<MatMulPlan>),
    ReduceSum(Vec<usize>),
    ReduceMax(Vec<usize>),
    ReduceMin(Vec<usize>),
    ReduceProd(Vec<usize>),
    ReduceMeanOfSquares(Vec<usize>),
    /// `x / sqrt(mean(x², axis) + eps)`.
    RmsNorm {
        axis: usize,
        eps: f32,
    },
    Softmax {
        axis: usize,
        log: bool,
    },
    Permute(Vec<usize>),
    Reshape(Vec<usize>),
    Concat(usize),
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    Gather {
        axis: usize,
        indices: IntTensor<B>,
        out_shape: Vec<usize>,
    },
    Expand(Vec<usize>),
    Pad {
        pads: Vec<(usize, usize)>,
        value: f32,
    },
    MaxPool(Window),
    AvgPool {
        window: Window,
        count_include_pad: bool,
        normalize: bool,
    },
}

impl<B: Backend> Op<B> {
    /// Ops that run in f32 inside an f16 program: sums and products accumulate past f16's
    /// range (65504) and precision, and `exp` overflows it above 11.
    fn keeps_f32(&self) -> bool {
        matches!(
            self,
            Op::ReduceSum(_)
                | Op::ReduceProd(_)
                | Op::ReduceMeanOfSquares(_)
                | Op::RmsNorm { .. }
                | Op::Softmax { .. }
                | Op::Unary(UnaryKind::Exp)
                | Op::Bin {
                    kind: BinKind::Pow,
                    ..
                }
                | Op::BinScalar {
                    kind: BinKind::Pow,
                    ..
                }
        )
    }

    /// A short description for errors and traces.
    pub(crate) fn name(&self) -> String {
        match self {
            Op::Bin { kind, expand } => format!("{kind:?} expand={expand:?}"),
            Op::BinScalar { kind, value } => format!("{kind:?} scalar {value}"),
            Op::Unary(kind) => format!("{kind:?}"),
            Op::Conv { window, groups, .. } => format!("Conv {window:?} groups {groups}"),
            Op::ConvTranspose { options, .. } => format!("ConvTranspose {options:?}"),
            Op::Upsample { expanded, .. } => format!("Upsample to {expanded:?}"),
            Op::MatMul(plan) => format!("MatMul {plan:?}"),
            Op::ReduceSum(a) => format!("ReduceSum {a:?}"),
            Op::ReduceMax(a) => format!("ReduceMax {a:?}"),
            Op::ReduceMin(a) => format!("ReduceMin {a:?}"),
            Op::ReduceProd(a) => format!("ReduceProd {a:?}"),
            Op::ReduceMeanOfSquares(a) => format!("ReduceMeanOfSquares {a:?}"),
            Op::RmsNorm { axis, .. } => format!("RmsNorm {axis}"),
            Op::Softmax { axis, log } => format!("Softmax {axis} log={log}"),
            Op::Permute(p) => format!("Permute {p:?}"),
            Op::Reshape(s) => format!("Reshape {s:?}"),
            Op::Concat(a) => format!("Concat {a}"),
            Op::Slice { axis, start, end } => format!("Slice {axis} {start}..{end}"),
            Op::Gather { axis, .. } => format!("Gather {axis}"),
            Op::Expand(s) => format!("Expand {s:?}"),
            Op::Pad { pads, value } => format!("Pad {pads:?} {value}"),
            Op::MaxPool(w) => format!("MaxPool {w:?}"),
            Op::AvgPool { window, .. } => format!("AvgPool {window:?}"),
        }
    }
}

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
                        backend: NAME,
                        reason: format!("node {:?} reads an empty slot {s}", step.node),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            // A burn kernel that panics is reported with the node it ran for.
            let y = catch_panic("gpu step", || Ok(self.step(&step.op, args))).map_err(|e| {
                Error::Inference {
                    backend: NAME,
                    reason: format!("node {:?} ({}): {e}", step.node, step.op.name()),
                }
            })?;
            slots[step.output] = Some(y);
        }
        self.outputs
            .iter()
            .map(|(slot, shape)| {
                let t = slots[*slot].clone().ok_or_else(|| Error::Inference {
                    backend: NAME,
                    reason: format!("output slot {slot} was never written"),
                })?;
                let data = read_sync(B::float_into_data(self.to_f32(t))).map_err(|e| {
                    Error::Inference {
                        backend: NAME,
                        reason: format!("reading an output back from the device: {e:?}"),
                    }
                })?;
                let values = data.try_into_vec::<f32>().map_err(|e| Error::Inference {
                    backend: NAME,
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
            return self.eval(op, args);
        }
        let args = args.into_iter().map(|a| self.to_f32(a)).collect();
        self.cast(self.eval(op, args), self.precision)
    }

    fn eval(&self, op: &Op<B>, mut args: Vec<FloatTensor<B>>) -> FloatTensor<B> {
        let mut arg = || args.remove(0);
        match op {
            Op::Bin { kind, expand } => {
                let mut a = arg();
                let mut b = arg();
                if let Some(s) = &expand[0] {
                    a = B::float_expand(a, Shape::from(s.clone()));
                }
                if let Some(s) = &expand[1] {
                    b = B::float_expand(b, Shape::from(s.clone()));
                }
                self.binary(*kind, a, b)
            }
            Op::BinScalar { kind, value } => {
                let x = arg();
                let v = Scalar::from(*value);
                match kind {
                    BinKind::Add => B::float_add_scalar(x, v),
                    BinKind::Sub => B::float_sub_scalar(x, v),
                    BinKind::Mul => B::float_mul_scalar(x, v),
                    BinKind::Div => B::float_div_scalar(x, v),
                    BinKind::Pow => B::float_powf_scalar(x, v),
                    BinKind::Max => B::float_clamp_min(x, v),
                    BinKind::Min => B::float_clamp_max(x, v),
                }
            }
            Op::Unary(kind) => unary::<B>(*kind, arg()),
            Op::Conv {
                window,
                groups,
                out_channels,
            } => {
                let x = arg();
                let w = arg();
                let bias = (!args.is_empty())
                    .then(|| B::float_reshape(args.remove(0), Shape::from(vec![*out_channels])));
                let options = conv_options(window, *groups);
                let w = if window.kernel.len() == 1 {
                    let ws = w.shape().to_vec();
                    B::float_reshape(w, Shape::from(vec![ws[0], ws[1], 1, ws[2]]))
                } else {
                    w
                };
                let y = B::conv2d(to_4d::<B>(x, window), w, bias, options);
                from_4d::<B>(y, window)
            }
            Op::ConvTranspose {
                options,
                out_channels,
                regroup,
                crop,
            } => {
                let (mut x, mut w) = (arg(), arg());
                if let Some(g) = *regroup {
                    w = regroup_deconv_kernel::<B>(w, g);
                }
                let one_d = x.shape().num_dims() == 3;
                if one_d {
                    let (xs, ws) = (lift_height(&x.shape()), lift_height(&w.shape()));
                    x = B::float_reshape(x, Shape::from(xs));
                    w = B::float_reshape(w, Shape::from(ws));
                }
                let bias = (!args.is_empty())
                    .then(|| B::float_reshape(args.remove(0), Shape::from(vec![*out_channels])));
                let mut y = B::conv_transpose2d(x, w, bias, options.clone());
                if let Some(c) = crop {
                    let dims = y.shape().to_vec();
                    let slices = [
                        Slice::new(0, None, 1),
                        Slice::new(0, None, 1),
                        Slice::new(c[0].0 as isize, Some((dims[2] - c[0].1) as isize), 1),
                        Slice::new(c[1].0 as isize, Some((dims[3] - c[1].1) as isize), 1),
                    ];
                    y = B::float_slice(y, &slices);
                }
                if one_d {
                    let mut dims = y.shape().to_vec();
                    dims.remove(2);
                    B::float_reshape(y, Shape::from(dims))
                } else {
                    y
                }
            }
            Op::Upsample {
                split,
                expanded,
                out,
            } => {
                let x = B::float_reshape(arg(), Shape::from(split.clone()));
                let x = B::float_expand(x, Shape::from(expanded.clone()));
                B::float_reshape(x, Shape::from(out.clone()))
            }
            Op::MatMul(plan) => {
                let a = arg();
                plan.run::<B>(a, arg())
            }
            Op::ReduceSum(axes) => reduce::<B>(arg(), axes, B::float_sum_dim),
            Op::ReduceMax(axes) => reduce::<B>(arg(), axes, B::float_max_dim),
            Op::ReduceMin(axes) => reduce::<B>(arg(), axes, B::float_min_dim),
            Op::ReduceProd(axes) => reduce::<B>(arg(), axes, B::float_prod_dim),
            Op::ReduceMeanOfSquares(axes) => {
                let x = arg();
                let sq = B::float_mul(x.clone(), x);
                reduce::<B>(sq, axes, B::float_mean_dim)
            }
            Op::RmsNorm { axis, eps } => {
                let x = arg();
                let ms = B::float_mean_dim(B::float_mul(x.clone(), x.clone()), *axis);
                let rms = B::float_sqrt(B::float_add_scalar(ms, Scalar::from(*eps)));
                B::float_div(x.clone(), B::float_expand(rms, x.shape()))
            }
            Op::Softmax { axis, log } => {
                if *log {
                    B::log_softmax(arg(), *axis)
                } else {
                    B::softmax(arg(), *axis)
                }
            }
            Op::Permute(perm) => B::float_permute(arg(), perm),
            Op::Reshape(shape) => B::float_reshape(arg(), Shape::from(shape.clone())),
            Op::Concat(axis) => B::float_cat(args, *axis),
            Op::Slice { axis, start, end } => {
                let x = arg();
                let slices: Vec<Slice> = (0..x.shape().num_dims())
                    .map(|a| {
                        if a == *axis {
                            Slice::new(*start as isize, Some(*end as isize), 1)
                        } else {
                            Slice::new(0, None, 1)
                        }
                    })
                    .collect();
                B::float_slice(x, &slices)
            }
            Op::Gather {
                axis,
                indices,
                out_shape,
            } => {
                let y = B::float_select(arg(), *axis, indices.clone());
                B::float_reshape(y, Shape::from(out_shape.clone()))
            }
            Op::Expand(shape) => B::float_expand(arg(), Shape::from(shape.clone())),
            Op::Pad { pads, value } => B::float_pad(arg(), pads, PadMode::Constant(*value)),
            Op::MaxPool(window) => {
                let (x, padding) = lift_2d::<B>(arg(), window, f32::NEG_INFINITY);
                let y = B::max_pool2d(
                    x,
                    Window::lift::<1>(&window.kernel),
                    Window::lift::<1>(&window.strides),
                    padding,
                    Window::lift::<1>(&window.dilations),
                    false,
                );
                from_4d::<B>(y, window)
            }
            Op::AvgPool {
                window,
                count_include_pad,
                normalize,
            } => {
                let (x, padding) = lift_2d::<B>(arg(), window, 0.0);
                let kernel = Window::lift::<1>(&window.kernel);
                let y = B::avg_pool2d(
                    x,
                    kernel,
                    Window::lift::<1>(&window.strides),
                    padding,
                    *count_include_pad,
                    false,
                );
                let y = if *normalize {
                    y
                } else {
                    B::float_mul_scalar(y, Scalar::from((kernel[0] * kernel[1]) as f32))
                };
                from_4d::<B>(y, window)
            }
        }
    }

    fn binary(&self, kind: BinKind, a: FloatTensor<B>, b: FloatTensor<B>) -> FloatTensor<B> {
        let bool_dtype = get_or_init_device_settings::<B>(&self.device).bool_dtype;
        match kind {
            BinKind::Add => B::float_add(a, b),
            BinKind::Sub => B::float_sub(a, b),
            BinKind::Mul => B::float_mul(a, b),
            BinKind::Div => B::float_div(a, b),
            BinKind::Pow => B::float_powf(a, b),
            BinKind::Max => {
                let mask = B::float_lower(a.clone(), b.clone(), bool_dtype);
                B::float_mask_where(a, mask, b)
            }
            BinKind::Min => {
                let mask = B::float_greater(a.clone(), b.clone(), bool_dtype);
                B::float_mask_where(a, mask, b)
            }
        }
    }
}

/// Reduces `axes` (sorted), keeping them as size 1. Consecutive axes are merged into one
/// and reduced in a single pass: fewer kernels, and chained per-axis reductions on wgpu gave
/// wrong sums for batch > 1 (seen on lavapipe with burn 0.22's `sum_dim`).
fn reduce<B: Backend>(
    x: FloatTensor<B>,
    axes: &[usize],
    f: fn(FloatTensor<B>, usize) -> FloatTensor<B>,
) -> FloatTensor<B> {
    let shape = x.shape().to_vec();
    let consecutive = axes.windows(2).all(|w| w[1] == w[0] + 1);
    match (axes.first(), axes.last()) {
        (Some(&first), Some(&last)) if consecutive && last > first => {
            let mut merged: Vec<usize> = shape[..first].to_vec();
            merged.push(shape[first..=last].iter().product());
            merged.extend_from_slice(&shape[last + 1..]);
            let y = f(B::float_reshape(x, Shape::from(merged)), first);
            let mut out = shape;
            for &a in axes {
                out[a] = 1;
            }
            B::float_reshape(y, Shape::from(out))
        }
        _ => axes.iter().fold(x, |x, &a| f(x, a)),
    }
}

fn unary<B: Backend>(kind: UnaryKind, x: FloatTensor<B>) -> FloatTensor<B> {
    use UnaryKind::*;
    match kind {
        Sigmoid => B::sigmoid(x),
        Tanh => B::float_tanh(x),
        Exp => B::float_exp(x),
        Ln => B::float_log(x),
        Sqrt => B::float_sqrt(x),
        Rsqrt => B::float_recip(B::float_sqrt(x)),
        Recip => B::float_recip(x),
        Abs => B::float_abs(x),
        Neg => B::float_neg(x),
        Square => B::float_mul(x.clone(), x),
        Erf => B::float_erf(x),
        HardSwish => {
            // x * clamp(x + 3, 0, 6) / 6
            let gate = B::float_clamp(
                B::float_add_scalar(x.clone(), Scalar::from(3.0f32)),
                Scalar::from(0.0f32),
                Scalar::from(6.0f32),
            );
            B::float_div_scalar(B::float_mul(x, gate), Scalar::from(6.0f32))
        }
        Silu => B::float_mul(x.clone(), B::sigmoid(x)),
        Gelu => B::gelu(x),
        GeluTanh => {
            // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            let cube = B::float_mul(B::float_mul(x.clone(), x.clone()), x.clone());
            let inner = B::float_add(
                x.clone(),
                B::float_mul_scalar(cube, Scalar::from(0.044715f32)),
            );
            let t = B::float_tanh(B::float_mul_scalar(inner, Scalar::from(0.797_884_6_f32)));
            B::float_mul(
                B::float_mul_scalar(x, Scalar::from(0.5f32)),
                B::float_add_scalar(t, Scalar::from(1.0f32)),
            )
        }
        LeakyRelu(alpha) => B::leaky_relu(x, Scalar::from(alpha)),
        Floor => B::float_floor(x),
        Ceil => B::float_ceil(x),
        Round => B::float_round(x),
        Sin => B::float_sin(x),
        Cos => B::float_cos(x),
    }
}

/// A transposed convolution's kernel from tract's layout `[O, I/g, k…]` to burn's
/// `[I, O/g, k…]`: `[g, O/g, I/g, k…]`, its axes 1 and 2 swapped, merged back.
pub(crate) fn regroup_deconv_kernel<B: Backend>(
    w: FloatTensor<B>,
    groups: usize,
) -> FloatTensor<B> {
    let s = w.shape().to_vec();
    let (o, i) = (s[0] / groups, s[1]);
    let mut split = vec![groups, o, i];
    split.extend_from_slice(&s[2..]);
    let mut perm: Vec<usize> = (0..split.len()).collect();
    perm.swap(1, 2);
    let w = B::float_permute(B::float_reshape(w, Shape::from(split)), &perm);
    let mut merged = vec![groups * i, o];
    merged.extend_from_slice(&s[2..]);
    B::float_reshape(w, Shape::from(merged))
}

/// A 3-D shape `[a, b, l]` as `[a, b, 1, l]` (a 1-D op's operand lifted to 2-D).
fn lift_height(shape: &Shape) -> Vec<usize> {
    let mut dims = shape.to_vec();
    dims.insert(2, 1);
    dims
}

/// A window op's input as `[N, C, H, W]`: a batch axis of 1 added to a CHW input, a height
/// of 1 to a 1-D input.
fn to_4d<B: Backend>(x: FloatTensor<B>, w: &Window) -> FloatTensor<B> {
    let s = x.shape().to_vec();
    let mut dims = if w.batched {
        s
    } else {
        [&[1], s.as_slice()].concat()
    };
    if w.kernel.len() == 1 {
        dims.insert(2, 1);
    }
    B::float_reshape(x, Shape::from(dims))
}

/// The inverse of [`to_4d`] on the op's output.
fn from_4d<B: Backend>(y: FloatTensor<B>, w: &Window) -> FloatTensor<B> {
    let mut dims = y.shape().to_vec();
    if w.kernel.len() == 1 {
        dims.remove(2);
    }
    if !w.batched {
        dims.remove(0);
    }
    B::float_reshape(y, Shape::from(dims))
}

/// A window op's input as `[N, C, H, W]` ([`to_4d`]), with asymmetric padding applied
/// explicitly (burn's pools pad symmetrically). Returns the input and the symmetric padding
/// left to the op.
fn lift_2d<B: Backend>(x: FloatTensor<B>, w: &Window, fill: f32) -> (FloatTensor<B>, [usize; 2]) {
    let x = to_4d::<B>(x, w);
    let pads: Vec<(usize, usize)> = match w.padding.as_slice() {
        [p] => vec![(0, 0), *p],
        other => other.to_vec(),
    };
    if pads.iter().all(|(b, a)| b == a) {
        return (x, [pads[0].0, pads[1].0]);
    }
    let mut full = vec![(0, 0), (0, 0)];
    full.extend(pads);
    (B::float_pad(x, &full, PadMode::Constant(fill)), [0, 0])
}

/// 2-D convolution options from a window (1-D windows are lifted to 2-D by the caller).
pub(crate) fn conv_options(w: &Window, groups: usize) -> ConvOptions<2> {
    let two = |v: &[usize], fill: usize| -> [usize; 2] {
        match v {
            [a] => [fill, *a],
            [a, b] => [*a, *b],
            _ => [fill, fill],
        }
    };
    let padding = match w.padding.as_slice() {
        [p] => [(0, 0), *p],
        [p, q] => [*p, *q],
        _ => [(0, 0), (0, 0)],
    };
    ConvOptions {
        stride: two(&w.strides, 1),
        padding,
        dilation: two(&w.dilations, 1),
        groups,
    }
}
