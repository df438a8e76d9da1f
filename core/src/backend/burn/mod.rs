//! GPU backend: tract's front end, burn's tensor ops on the device (cargo feature `gpu`).
//!
//! burn imports ONNX only as Rust code generated at build time; an SDK must run models that
//! ship after the app. So this backend interprets the graph at run time, in three stages:
//!
//! 1. **Front end** (tract): the ONNX graph is typed for the concrete input shapes of a run,
//!    constants and shape arithmetic are folded, and the graph is decluttered into tract's
//!    small set of core ops.
//! 2. **Lowering** ([`lower`]): each core op becomes one [`ops::Op`] of its family
//!    ([`ops`]: element-wise, linear, reduce, layout, pool) with its attributes resolved;
//!    weights are uploaded to the device once per program.
//! 3. **Execution** ([`program`]): the steps run with burn's backend ops, generic over
//!    burn's `Backend`, so the same code drives wgpu (Vulkan, Metal, DX12, WebGPU) in apps
//!    and burn's pure-Rust CPU backend (burn-flex) in the unit tests.
//!
//! Programs are built per input-shape signature: once at session creation when every input
//! dimension is fixed or pinned (and warmed up there, so shader compilation is not paid by
//! the first real run), otherwise on first use of each shape, in the backends' shared
//! [`PlanCache`].

mod context;
mod lower;
pub(crate) mod ops;
mod program;

use std::sync::OnceLock;

use burn_backend::tensor::Device;
use burn_backend::Backend as BurnBackend;
use burn_backend::{DType as BurnDType, FloatDType};
use tract_onnx::prelude::*;

use super::frontend;
use super::plan_cache::{shape_key, PlanCache, ShapeKey, CAPACITY};
use super::{Backend, Executor, PlanReport, Prepared, Ran, Specialisation};
use crate::error::{catch_panic, chain, Error, Result};
use crate::model::Model;
use crate::options::{GpuPrecision, SessionOptions};
use crate::tensor::{DType, Tensor};
pub use ops::supported_onnx_ops;
use program::Program;

/// The backend's name in errors.
const NAME: Backend = Backend::Gpu;

/// The wgpu adapter found for this process.
#[derive(Clone)]
struct Adapter {
    device: burn_wgpu::WgpuDevice,
    /// Name and graphics API, for the session's backend reason.
    name: String,
    /// A CPU rasteriser (llvmpipe/lavapipe, WARP…), not a GPU.
    software: bool,
}

/// The wgpu device, initialised once per process: `Err` says why no adapter could be used.
fn wgpu_adapter() -> std::result::Result<Adapter, String> {
    type Found = std::result::Result<Adapter, String>;
    static DEVICE: OnceLock<Found> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            if std::env::var_os("TERN_DISABLE_GPU").is_some() {
                return Err("disabled by TERN_DISABLE_GPU".into());
            }
            let device = burn_wgpu::WgpuDevice::default();
            let setup = catch_panic("gpu adapter", || {
                burn_wgpu::try_init_setup::<burn_wgpu::graphics::AutoGraphicsApi>(
                    &device,
                    burn_wgpu::RuntimeOptions::default(),
                )
                .map_err(|e| Error::BackendUnavailable {
                    backend: NAME,
                    reason: e.to_string(),
                })
            });
            match setup {
                Ok(setup) => {
                    let info = setup.adapter.get_info();
                    let name = format!("{} ({:?})", info.name, info.backend);
                    tracing::info!("gpu adapter: {name}");
                    Ok(Adapter {
                        device,
                        name,
                        software: info.device_type == burn_wgpu::wgpu::DeviceType::Cpu,
                    })
                }
                Err(e) => Err(format!("no usable GPU adapter: {e}")),
            }
        })
        .clone()
}

/// The name of the adapter the GPU backend uses, or why there is none.
pub fn gpu_adapter() -> std::result::Result<String, String> {
    wgpu_adapter().map(|a| a.name)
}

/// Fails with [`Error::UnsupportedOp`] naming the first node the GPU backend cannot run.
fn check_supported(model: &Model) -> Result<()> {
    match model
        .info()
        .op_histogram
        .keys()
        .find(|op| supported_onnx_ops().binary_search(&op.as_str()).is_err())
    {
        Some(op) => Err(Error::UnsupportedOp {
            op_type: op.clone(),
            domain: String::new(),
            node: model.first_node_of(op).unwrap_or_default().to_string(),
        }),
        None => Ok(()),
    }
}

/// Prepares the GPU backend on the process's wgpu adapter. `auto` declines a software
/// adapter unless the options allow one.
pub(crate) fn prepare(
    model: &Model,
    options: &SessionOptions,
    reason: String,
    auto: bool,
) -> Result<Prepared> {
    let adapter = wgpu_adapter().map_err(|reason| Error::BackendUnavailable {
        backend: NAME,
        reason,
    })?;
    if auto && adapter.software && !options.gpu.allow_software {
        return Err(Error::BackendUnavailable {
            backend: NAME,
            reason: format!(
                "the only adapter, {}, is a software rasteriser (slower than the CPU backend)",
                adapter.name
            ),
        });
    }
    let device = adapter.device.into();
    prepare_on::<burn_wgpu::Wgpu>(
        model,
        options,
        device,
        !adapter.software,
        format!("{reason} on {}", adapter.name),
    )
}

/// The float type a program computes in on `device`, and why. `hardware` says whether
/// [`GpuPrecision::Auto`] may choose f16 there.
fn precision<B: BurnBackend>(
    requested: GpuPrecision,
    device: &Device<B>,
    hardware: bool,
) -> Result<(FloatDType, &'static str)> {
    let has_f16 = B::supports_dtype(device, BurnDType::F16);
    match requested {
        GpuPrecision::F32 => Ok((FloatDType::F32, "f32 as requested")),
        GpuPrecision::F16 if has_f16 => Ok((FloatDType::F16, "f16 as requested")),
        GpuPrecision::F16 => Err(Error::BackendUnavailable {
            backend: NAME,
            reason: "f16 was requested and the adapter has no shader-f16".into(),
        }),
        GpuPrecision::Auto if has_f16 && hardware => {
            Ok((FloatDType::F16, "f16 (the adapter has shader-f16)"))
        }
        GpuPrecision::Auto if has_f16 => Ok((
            FloatDType::F32,
            "f32 (f16 is emulated on a software adapter)",
        )),
        GpuPrecision::Auto => Ok((FloatDType::F32, "f32 (the adapter has no shader-f16)")),
    }
}

/// Prepares the GPU executor on any burn backend (wgpu in apps, burn-flex in tests).
/// `hardware`: the device is a real GPU, on which [`GpuPrecision::Auto`] may pick f16.
pub(crate) fn prepare_on<B: BurnBackend>(
    model: &Model,
    options: &SessionOptions,
    device: Device<B>,
    hardware: bool,
    reason: String,
) -> Result<Prepared> {
    check_supported(model)?;
    let (precision, why_precision) = precision::<B>(options.gpu.precision, &device, hardware)?;
    for info in model.inputs() {
        if info.dtype != Some(DType::F32) {
            return Err(Error::BackendUnavailable {
                backend: NAME,
                reason: format!(
                    "the GPU backend computes f32; input {:?} is {}",
                    info.name,
                    info.dtype.map_or("undeclared".into(), |d| d.to_string())
                ),
            });
        }
    }
    let fixed = frontend::fixed_shapes(model, options);
    let executor = BurnExecutor::<B> {
        graph: model.graph().clone(),
        device,
        precision,
        cache: PlanCache::new(CAPACITY),
    };
    let reason = format!("{reason}; computes in {why_precision}");
    let reason = match fixed {
        Some(shapes) => {
            let program = executor.program(&shapes).map_err(|e| match e {
                // Per-value plans are the CPU backend's: the GPU declines, and `Auto` uses
                // the CPU.
                Error::Compile { .. } if !model.info().value_inputs.is_empty() => {
                    Error::BackendUnavailable {
                        backend: NAME,
                        reason: format!(
                            "the GPU backend cannot plan without the values of inputs {:?} \
                             (the CPU plans them by value): {e}",
                            model.info().value_inputs
                        ),
                    }
                }
                e => e,
            })?;
            // Warm-up: compiles the device kernels now rather than in the first real run.
            let zeros = shapes
                .iter()
                .map(|s| Tensor::zeros(DType::F32, s))
                .collect::<Result<Vec<_>>>()?;
            program.run(&zeros)?;
            format!("{reason}; {} device steps, warmed up", program.len())
        }
        None => format!("{reason}; programs built per input shape on first use"),
    };
    Ok(Prepared {
        executor: Box::new(executor),
        backend: Backend::Gpu,
        reason,
        input_dtypes: vec![DType::F32; model.inputs().len()],
    })
}

/// Runs lowered programs on one burn device.
struct BurnExecutor<B: BurnBackend> {
    graph: InferenceModel,
    device: Device<B>,
    /// The float type programs compute in.
    precision: FloatDType,
    cache: PlanCache<Program<B>>,
}

impl<B: BurnBackend> BurnExecutor<B> {
    /// The program for these input shapes: cached, or typed, folded, decluttered and lowered.
    fn program(&self, shapes: &ShapeKey) -> Result<std::sync::Arc<Program<B>>> {
        self.cache.get_or_build(shapes, || {
            let compile = |e: anyhow::Error| Error::Compile {
                backend: NAME,
                reason: chain(&e),
            };
            let graph = frontend::concretize(&self.graph, shapes).map_err(compile)?;
            // An fp16 model with f32 inputs and outputs is lowered as f32, then computed in
            // the session's precision (f16 on hardware that has it).
            let mut typed = frontend::typed(graph, true).map_err(compile)?;
            super::optim::declutter(&mut typed).map_err(compile)?;
            lower::lower::<B>(&typed, &self.device, self.precision)
        })
    }
}

impl<B: BurnBackend> Executor for BurnExecutor<B> {
    fn run(&self, inputs: Vec<Tensor>) -> Result<Ran> {
        Ok(Ran {
            outputs: self.program(&shape_key(&inputs))?.run(&inputs)?,
            fallback: false,
        })
    }

    fn plans(&self) -> PlanReport {
        PlanReport {
            specialisation: Specialisation::PerShape,
            shared_plan: false,
            concrete: self.cache.keys(),
            tern_kernels: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests;
