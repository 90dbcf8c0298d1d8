//! What every op shares: checking the tensors before an op is made, reading candle's storages,
//! building its outputs, and reporting ccpl's errors as candle's.

use candle_core::{CpuStorage, DType, Device, Error, Layout, Result, Tensor, WithDType};

/// A candle error that names the op and the problem.
pub(crate) fn error(op: &str, problem: impl std::fmt::Display) -> Error {
    Error::msg(format!("{op}: {problem}")).bt()
}

/// Converts a ccpl error (bad shape, centres, tau) into candle's, naming the op.
pub(crate) fn ccpl_error(op: &'static str) -> impl Fn(ccpl::Error) -> Error {
    move |e| error(op, e)
}

/// The `N` dims of `tensor`, named `names` in the error when it has another rank.
pub(crate) fn dims<const N: usize>(
    op: &str,
    what: &str,
    tensor: &Tensor,
    names: &str,
) -> Result<[usize; N]> {
    tensor.dims().try_into().map_err(|_| {
        error(
            op,
            format!("{what} must be {names}, got shape {:?}", tensor.shape()),
        )
    })
}

/// Checks the storage type and device of `tensor`: `f32`, `f16` or `bf16` (what the kernels
/// store), and `f64` on the CPU, where the reference computes in it anyway; CPU or CUDA.
pub(crate) fn check_dtype(op: &str, what: &str, tensor: &Tensor) -> Result<()> {
    // candle-core's CUDA backend may be on (another crate asked for it) without this crate's.
    if tensor.device().is_cuda() && !cfg!(feature = "cuda") {
        return Err(error(
            op,
            format!("{what} is on CUDA, but ccpl-candle was built without its `cuda` feature"),
        ));
    }
    match (tensor.dtype(), tensor.device()) {
        (DType::F32 | DType::F16 | DType::BF16, Device::Cpu | Device::Cuda(_)) => Ok(()),
        (DType::F64, Device::Cpu) => Ok(()),
        (dtype, Device::Cpu) => Err(error(
            op,
            format!("{what} is {dtype:?}; f32, f16, bf16 or f64 are supported on the CPU"),
        )),
        (dtype, Device::Cuda(_)) => Err(error(
            op,
            format!(
                "{what} is {dtype:?}; the CUDA kernels store f32, f16 or bf16 (convert with to_dtype)"
            ),
        )),
        (_, device) => Err(error(
            op,
            format!("{what} is on {device:?}; the CPU and CUDA devices are supported"),
        )),
    }
}

/// Checks that two inputs of an op agree in shape, dtype and device.
pub(crate) fn check_pair(op: &str, (a, b): (&str, &str), x: &Tensor, y: &Tensor) -> Result<()> {
    if x.shape() != y.shape() {
        return Err(error(
            op,
            format!(
                "{a} and {b} must have the same shape, got {:?} and {:?}",
                x.shape(),
                y.shape()
            ),
        ));
    }
    if x.dtype() != y.dtype() {
        return Err(error(
            op,
            format!(
                "{a} and {b} must have the same dtype, got {:?} and {:?}",
                x.dtype(),
                y.dtype()
            ),
        ));
    }
    if !x.device().same_device(y.device()) {
        return Err(error(
            op,
            format!(
                "{a} and {b} must be on the same device, got {:?} and {:?}",
                x.device().location(),
                y.device().location()
            ),
        ));
    }
    Ok(())
}

/// The element range of a storage that `layout` covers, which must be C-contiguous (the
/// public functions make their inputs contiguous; this guards the ops themselves).
pub(crate) fn contiguous(op: &str, layout: &Layout) -> Result<(usize, usize)> {
    layout.contiguous_offsets().ok_or_else(|| {
        error(
            op,
            format!(
                "input of shape {:?} is not contiguous (stride {:?})",
                layout.shape(),
                layout.stride()
            ),
        )
    })
}

/// The elements of a CPU storage that `layout` covers, as `T` (the storage's own type).
pub(crate) fn cpu_elements<'a, T: WithDType>(
    op: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let (start, end) = contiguous(op, layout)?;
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// The one value of a float32 or float64 CPU storage (an upstream gradient), as float64.
pub(crate) fn cpu_scalar(op: &str, storage: &CpuStorage, layout: &Layout) -> Result<f64> {
    let value = match storage {
        CpuStorage::F64(_) => cpu_elements::<f64>(op, storage, layout)?.first().copied(),
        CpuStorage::F32(_) => cpu_elements::<f32>(op, storage, layout)?
            .first()
            .map(|&g| g as f64),
        other => {
            let dtype = candle_core::backend::BackendStorage::dtype(other);
            return Err(error(op, format!("an upstream gradient of {dtype:?}")));
        }
    };
    value.ok_or_else(|| error(op, "an empty upstream gradient"))
}

/// `values` rounded to `T`, as a CPU storage.
pub(crate) fn cpu_storage<T: WithDType>(values: impl Iterator<Item = f64>) -> CpuStorage {
    T::to_cpu_storage_owned(values.map(T::from_f64).collect())
}

/// Evaluates `$body` with `$t` the Rust type of a CPU storage's `dtype` (`f32`, `f16`, `bf16`,
/// `f64`); any other dtype is an error naming `$op`. The public functions reject those first.
macro_rules! with_cpu_type {
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {{
        let dtype: candle_core::DType = $dtype;
        ccpl::dispatch_dtype!(dtype.as_str(), $t => $body, f64, _other => Err($crate::storage::error(
            $op,
            format!("unsupported dtype {dtype:?}"),
        )))
    }};
}
pub(crate) use with_cpu_type;
