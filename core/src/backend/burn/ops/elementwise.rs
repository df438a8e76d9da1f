//! Element-wise ops: binary arithmetic (operands broadcast to the output, or one of them a
//! folded scalar), unary math and activations, and the f32 → f32 casts tract leaves behind.

use burn_backend::tensor::{Device, FloatTensor};
use burn_backend::{get_or_init_device_settings, Backend, Scalar, Shape};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_onnx::tract_core::ops::element_wise::{ElementWiseMiniOp, ElementWiseOp};
use tract_onnx::tract_core::ops::{cast::Cast, math, nn};

use super::{Cx, Found, Lowered};
use crate::backend::burn::context::unsupported;

/// ONNX ops that become element-wise steps (BatchNormalization, Clip, Relu, HardSigmoid,
/// Mean and Sum are decomposed into them by tract).
pub(crate) const ONNX: &[&str] = &[
    "Abs",
    "Add",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Cos",
    "Div",
    "Erf",
    "Exp",
    "Floor",
    "Gelu",
    "HardSigmoid",
    "HardSwish",
    "LeakyRelu",
    "Log",
    "Max",
    "Mean",
    "Min",
    "Mul",
    "Neg",
    "Pow",
    "Reciprocal",
    "Relu",
    "Round",
    "Sigmoid",
    "Sin",
    "Sqrt",
    "Sub",
    "Sum",
    "Tanh",
];

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
    /// tract's binary mini-op as one of ours.
    fn of(op: &dyn BinMiniOp) -> Option<BinKind> {
        Some(if op.is::<math::Add>() {
            BinKind::Add
        } else if op.is::<math::Sub>() {
            BinKind::Sub
        } else if op.is::<math::Mul>() {
            BinKind::Mul
        } else if op.is::<math::Div>() {
            BinKind::Div
        } else if op.is::<math::Pow>() {
            BinKind::Pow
        } else if op.is::<math::Max>() {
            BinKind::Max
        } else if op.is::<math::Min>() {
            BinKind::Min
        } else {
            return None;
        })
    }

    /// `a op b == b op a`.
    fn commutes(self) -> bool {
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
    /// tract's element-wise mini-op as one of ours.
    fn of(op: &dyn ElementWiseMiniOp) -> Option<UnaryKind> {
        use UnaryKind::*;
        if let Some(leaky) = op.downcast_ref::<nn::LeakyRelu>() {
            return Some(LeakyRelu(leaky.alpha));
        }
        let table: [(bool, UnaryKind); 20] = [
            (op.is::<nn::Sigmoid>(), Sigmoid),
            (op.is::<math::Tanh>(), Tanh),
            (op.is::<math::Exp>(), Exp),
            (op.is::<math::Ln>(), Ln),
            (op.is::<math::Sqrt>(), Sqrt),
            (op.is::<math::Rsqrt>(), Rsqrt),
            (op.is::<math::Recip>(), Recip),
            (op.is::<math::Abs>(), Abs),
            (op.is::<math::Neg>(), Neg),
            (op.is::<math::Square>(), Square),
            (op.is::<math::Erf>(), Erf),
            (op.is::<nn::HardSwish>(), HardSwish),
            (op.is::<nn::Silu>(), Silu),
            (op.is::<nn::GeluExact>(), Gelu),
            (op.is::<nn::GeluApproximate>(), GeluTanh),
            (op.is::<math::Floor>(), Floor),
            (op.is::<math::Ceil>(), Ceil),
            // burn rounds half to even, like ONNX's Round.
            (op.is::<math::RoundHalfToEven>(), Round),
            (op.is::<math::Sin>(), Sin),
            (op.is::<math::Cos>(), Cos),
        ];
        table.into_iter().find(|(is, _)| *is).map(|(_, kind)| kind)
    }
}

/// An element-wise step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Elementwise {
    /// Two tensors; each is broadcast to the output shape first where `expand` says so.
    Bin {
        kind: BinKind,
        expand: [Option<Vec<usize>>; 2],
    },
    /// A tensor and a folded scalar.
    BinScalar {
        kind: BinKind,
        value: f32,
    },
    Unary(UnaryKind),
}

/// Lowers tract's binary and element-wise ops and f32 → f32 casts.
pub(crate) fn lower<B: Backend>(cx: &mut Cx<B>, node: &TypedNode, out: &[usize]) -> Found<B> {
    let op: &dyn TypedOp = node.op.as_ref();
    let step = |op, inputs| Ok(Some(Lowered::Step(super::Op::Elementwise(op), inputs)));
    if let Some(bin) = op.downcast_ref::<TypedBinOp>() {
        let kind = BinKind::of(bin.0.as_ref()).ok_or_else(|| unsupported(node, "binary"))?;
        let (a, b) = (node.inputs[0], node.inputs[1]);
        if let Some(value) = cx.scalar(b) {
            if cx.shape(a)? == out {
                return step(Elementwise::BinScalar { kind, value }, vec![cx.float(a)?]);
            }
        }
        if let Some(value) = cx.scalar(a) {
            if kind.commutes() && cx.shape(b)? == out {
                return step(Elementwise::BinScalar { kind, value }, vec![cx.float(b)?]);
            }
        }
        let expand = [
            (cx.shape(a)? != out).then(|| out.to_vec()),
            (cx.shape(b)? != out).then(|| out.to_vec()),
        ];
        step(Elementwise::Bin { kind, expand }, cx.floats(&[a, b])?)
    } else if let Some(ew) = op.downcast_ref::<ElementWiseOp>() {
        let kind = UnaryKind::of(ew.0.as_ref()).ok_or_else(|| unsupported(node, "element-wise"))?;
        step(Elementwise::Unary(kind), vec![cx.float(node.inputs[0])?])
    } else if let Some(cast) = op.downcast_ref::<Cast>() {
        let from = cx.fact(node.inputs[0])?.datum_type;
        if cast.to != f32::datum_type() || from != f32::datum_type() {
            return Err(unsupported(node, format!("cast {from:?} to {:?}", cast.to)));
        }
        Ok(Some(Lowered::Alias(cx.float(node.inputs[0])?)))
    } else {
        Ok(None)
    }
}

impl Elementwise {
    /// `exp` overflows f16 above 11 and `pow` easily does: both run in f32.
    pub(crate) fn keeps_f32(&self) -> bool {
        matches!(
            self,
            Elementwise::Unary(UnaryKind::Exp)
                | Elementwise::Bin {
                    kind: BinKind::Pow,
                    ..
                }
                | Elementwise::BinScalar {
                    kind: BinKind::Pow,
                    ..
                }
        )
    }

    pub(crate) fn eval<B: Backend>(
        &self,
        device: &Device<B>,
        args: Vec<FloatTensor<B>>,
    ) -> FloatTensor<B> {
        let mut args = args.into_iter();
        let mut arg = || args.next().expect("lowering gave the step its inputs");
        match self {
            Elementwise::Bin { kind, expand } => {
                let (mut a, mut b) = (arg(), arg());
                if let Some(s) = &expand[0] {
                    a = B::float_expand(a, Shape::from(s.clone()));
                }
                if let Some(s) = &expand[1] {
                    b = B::float_expand(b, Shape::from(s.clone()));
                }
                binary::<B>(device, *kind, a, b)
            }
            Elementwise::BinScalar { kind, value } => {
                let (x, v) = (arg(), Scalar::from(*value));
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
            Elementwise::Unary(kind) => unary::<B>(*kind, arg()),
        }
    }
}

fn binary<B: Backend>(
    device: &Device<B>,
    kind: BinKind,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
) -> FloatTensor<B> {
    let bool_dtype = get_or_init_device_settings::<B>(device).bool_dtype;
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
