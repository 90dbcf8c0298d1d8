//! The shape of every native op, as in the candle integration: an [`Op`] is its CPU half (the
//! float64 reference on host tensors) and its CUDA half (the kernels, generic over the
//! [`Launcher`], so the Rust tests run it on the CPU emulator), and [`run`] is what each
//! `#[pyfunction]` does with it: release the GIL, pick the half for the device and the storage
//! type for the dtype, and turn the crate's errors into Python's.

use ccpl::launch::Launcher;
use ccpl::{Dtype, Error, Result, dispatch_dtype};
use pyo3::prelude::*;

use crate::{HostDtype, cuda, to_py};

/// One native op over the tensors Python passed (`Raw` addresses), checked when it was made.
pub trait Op {
    /// The CPU half: the float64 reference, on host tensors whose storage type is `T`.
    ///
    /// # Safety
    ///
    /// Every tensor the op names is a live contiguous host tensor of the type the op reads it
    /// as (features and gradients of `T`, saved tensors of float64, the loss and its upstream
    /// gradient of `T::Loss`), not accessed elsewhere during the call.
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()>;

    /// The CUDA half: the kernels on `launcher`, for tensors of `T` (the launcher's contract
    /// says the addresses are live there).
    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error>;
}

/// Where an op runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The host: the float64 reference.
    Cpu,
    /// CUDA device `ordinal`, on the stream `stream` (a `CUstream`, PyTorch's
    /// `torch.cuda.current_stream(device).cuda_stream`).
    Cuda {
        /// The device's ordinal.
        ordinal: usize,
        /// The raw stream handle, borrowed.
        stream: usize,
    },
}

/// Where an op runs and on what, as Python passes it (the package's `target`): `(dtype,
/// device.index or None, stream)`, the dtype one of "f32", "f16", "bf16" ("f64" too on the
/// CPU).
#[derive(Debug, Clone, FromPyObject)]
pub struct Target(pub String, pub Option<usize>, pub usize);

impl Target {
    /// The device the op runs on.
    pub fn device(&self) -> Device {
        match *self {
            Target(_, None, _) => Device::Cpu,
            Target(_, Some(ordinal), stream) => Device::Cuda { ordinal, stream },
        }
    }
}

/// Makes the op with `make` (which checks shapes, centres and tau) and runs it at `target`,
/// without the GIL: the skeleton every `#[pyfunction]` shares. A bad value is a Python
/// exception ([`to_py`]).
pub fn run<O: Op>(
    py: Python<'_>,
    target: Target,
    make: impl FnOnce() -> Result<O> + Send,
) -> PyResult<()> {
    let (dtype, device) = (target.0.as_str(), target.device());
    py.detach(|| {
        let op = make()?;
        match device {
            Device::Cuda { ordinal, stream } => dispatch_dtype!(dtype, T => unsafe {
                // SAFETY: live device tensors on this stream (the package's contract).
                cuda::on_stream(ordinal, stream, |l| op.cuda::<T, _>(l))
            }, other => Err(Error::Dtype(format!(
                "{other} on CUDA (the kernels take f32, f16 and bf16)"
            )))),
            Device::Cpu => dispatch_dtype!(dtype, T => unsafe {
                // SAFETY: live contiguous host tensors of the named types (the package's
                // contract).
                op.cpu::<T>()
            }, f64, other => Err(Error::Dtype(format!(
                "{other} on the CPU (f64, f32, f16 and bf16 are supported)"
            )))),
        }
    })
    .map_err(to_py)
}
