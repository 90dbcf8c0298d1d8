//! `ccpl._ccpl`: the native half of the Python package `ccpl`, the CCP loss for PyTorch.
//!
//! The package's torch custom ops (`python/ccpl/*.py`) check every tensor (type, dtype, device,
//! shape, layout, contiguity) and allocate every buffer with PyTorch (so CUDA memory comes
//! from its caching allocator), then call these functions with raw tensor addresses:
//!
//! - on the CPU, the crate's float64 reference ([`ccpl::reference`]);
//! - on CUDA, the crate's launch plans ([`ccpl::launch`], [`ccpl::loss`]) on PyTorch's current stream of the
//!   tensors' device, borrowed, never synchronised ([`cuda`]).
//!
//! One module per op, forward and backward side by side: [`neighbor`] (difference rows and
//! their scatter), [`rows`] (the loss of a learned head's rows), [`layer`] (one layer's loss
//! with the identity head), [`loss`] (every layer's loss with the identity head, on the
//! crate's [`ccpl::loss::multi_layer::LossPlan`]), [`sampled`] (every layer's difference rows
//! at centres drawn on the device, for learned heads), [`small_rows`] (the rows loss of
//! several layers' heads on the small-S path). Each is an [`op::Op`], candle's shape: a CPU half and a CUDA half
//! generic over the [`Launcher`] (so the Rust tests run it on the CPU emulator against the CPU
//! half), run by the one [`op::run`].
//!
//! These functions are private to the package: they trust the addresses and lengths they are
//! given (a tensor's `data_ptr()` and `numel()`, contiguous, of the named dtype, on the named
//! device). Everything else, shapes, centres, tau, is checked again here, and a bad value is a
//! Python exception, never a crash.
//!
//! [`Launcher`]: ccpl::launch::Launcher

pub mod carve;
pub mod cuda;
pub mod layer;
pub mod loss;
pub mod neighbor;
pub mod op;
pub mod rows;
pub mod sampled;
pub mod small_rows;
#[cfg(test)]
mod tests;

use ccpl::launch::Buf;
use ccpl::{Element, Error, check_len};
use half::{bf16, f16};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

/// A tensor as Python passes it: `(data_ptr(), numel())`, contiguous, of the dtype named next
/// to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromPyObject)]
pub struct Raw(pub u64, pub usize);

impl Raw {
    /// The tensor as a kernel buffer (a device address on CUDA).
    pub fn buf(self) -> Buf {
        Buf {
            addr: self.0,
            len: self.1,
        }
    }

    /// The host tensor's elements.
    ///
    /// # Safety
    ///
    /// `self` is a live, contiguous host tensor of `T`, not written during the borrow.
    pub unsafe fn host<'a, T>(self) -> &'a [T] {
        if self.1 == 0 {
            return &[];
        }
        // SAFETY: by the contract above.
        unsafe { std::slice::from_raw_parts(self.0 as *const T, self.1) }
    }

    /// The host tensor's elements, to write.
    ///
    /// # Safety
    ///
    /// `self` is a live, contiguous host tensor of `T`, not otherwise accessed during the
    /// borrow.
    pub unsafe fn host_mut<'a, T>(self) -> &'a mut [T] {
        if self.1 == 0 {
            return &mut [];
        }
        // SAFETY: by the contract above.
        unsafe { std::slice::from_raw_parts_mut(self.0 as *mut T, self.1) }
    }
}

/// What a loss's backward reads and writes, as Python passes it (the package's
/// `backward_buffers`): `((saved_rows, stats), upstream, scratch or None, (grad_q, grad_k or
/// None))`; the scratch only on CUDA.
#[derive(Debug, Clone, Copy, FromPyObject)]
pub struct BackwardBufs([Raw; 2], Raw, Option<Raw>, (Raw, Option<Raw>));

/// A loss backward's buffers on the host.
pub struct HostBackward<'a, T> {
    /// What the forward kept: `[rows, stats]`, float64.
    pub saved: [&'a [f64]; 2],
    /// The loss's upstream gradient.
    pub upstream: f64,
    /// The gradients to write.
    pub grads: HostGrads<'a, T>,
}

/// A loss backward's buffers on a device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceBackward {
    /// What the forward kept: `[rows, stats]`.
    pub saved: [Buf; 2],
    /// The loss's upstream gradient, one float32.
    pub upstream: Buf,
    /// The backward's scratch.
    pub scratch: Buf,
    /// The gradient of q.
    pub grad_q: Buf,
    /// The gradient of k, when asked for.
    pub grad_k: Option<Buf>,
}

impl BackwardBufs {
    /// On the host: what the forward kept (float64), the upstream gradient and the gradients.
    ///
    /// # Safety
    ///
    /// Every tensor is a live contiguous host tensor of the type it is read as (saved float64,
    /// the upstream gradient of `T::Loss`, the gradients of `T`), not otherwise accessed
    /// during the borrow.
    pub unsafe fn host<'a, T: HostDtype>(self) -> ccpl::Result<HostBackward<'a, T>> {
        let BackwardBufs([rows, stats], upstream, _, (grad_q, grad_k)) = self;
        // SAFETY: the caller's contract.
        unsafe {
            Ok(HostBackward {
                saved: [rows.host(), stats.host()],
                upstream: host_scalar::<T::Loss>(upstream)?,
                grads: (grad_q.host_mut(), grad_k.map(|g| g.host_mut())),
            })
        }
    }

    /// On a device, where the scratch is needed.
    pub fn device(self) -> ccpl::Result<DeviceBackward> {
        let BackwardBufs(saved, upstream, scratch, (grad_q, grad_k)) = self;
        Ok(DeviceBackward {
            saved: saved.map(Raw::buf),
            upstream: upstream.buf(),
            scratch: cuda_only(scratch, "the backward's scratch")?.buf(),
            grad_q: grad_q.buf(),
            grad_k: grad_k.map(Raw::buf),
        })
    }
}

/// A backward's host gradients: q's, and k's when asked for.
pub type HostGrads<'a, T> = (&'a mut [T], Option<&'a mut [T]>);

/// A storage type of a host tensor: the kernels' three and float64 (for `gradcheck`). The loss
/// is kept in `Loss`, float64 for float64 tensors and float32 otherwise, as the CUDA path.
pub trait HostDtype: Element {
    /// The loss's type for tensors of this type.
    type Loss: Element;
}
impl HostDtype for f64 {
    type Loss = f64;
}
impl HostDtype for f32 {
    type Loss = f32;
}
impl HostDtype for f16 {
    type Loss = f32;
}
impl HostDtype for bf16 {
    type Loss = f32;
}

/// A buffer that only the CUDA path takes (the centres' device table, a backward's scratch).
pub fn cuda_only(buf: Option<Raw>, what: &str) -> ccpl::Result<Raw> {
    buf.ok_or_else(|| Error::Shape(format!("a CUDA op needs {what}")))
}

/// The error of a small-S op (`op`) called with CPU tensors: the path is the kernels'; on the
/// CPU the package runs the float64 reference through the op's general form.
pub fn small_s_on_host(op: &str) -> Error {
    Error::Shape(format!(
        "the small-S {op} runs on CUDA tensors; on the CPU the float64 reference runs instead"
    ))
}

/// The one value of a host tensor of `T` (an upstream gradient), as float64.
///
/// # Safety
///
/// `raw` is a live contiguous host tensor of `T`.
pub unsafe fn host_scalar<T: Element>(raw: Raw) -> ccpl::Result<f64> {
    check_len("upstream gradient", 1, raw.1)?;
    // SAFETY: the caller's contract.
    Ok(unsafe { raw.host::<T>() }[0].to_f64())
}

/// `buf` cut into `N` consecutive buffers of `len` elements of `T`, after checking that it
/// holds exactly that many: how a saved tensor of shape `(N, ...)` holds several workspace
/// buffers.
pub fn split<T, const N: usize>(
    what: &'static str,
    buf: Buf,
    len: usize,
) -> ccpl::Result<[Buf; N]> {
    check_len(what, N * len, buf.len)?;
    Ok(std::array::from_fn(|i| Buf {
        addr: buf.addr + (i * len * size_of::<T>()) as u64,
        len,
    }))
}

/// The same for host memory: `N` consecutive slices of `len` elements.
pub fn split_host<'a, T, const N: usize>(
    what: &'static str,
    data: &'a [T],
    len: usize,
) -> ccpl::Result<[&'a [T]; N]> {
    check_len(what, N * len, data.len())?;
    Ok(std::array::from_fn(|i| &data[i * len..(i + 1) * len]))
}

/// Rounds float64 values into a host buffer of `T`.
pub fn store<T: Element>(out: &mut [T], values: &[f64]) -> ccpl::Result<()> {
    check_len("output", values.len(), out.len())?;
    for (o, &v) in out.iter_mut().zip(values) {
        *o = T::from_f64(v);
    }
    Ok(())
}

/// Stores a forward's loss in its host tensor, one value of `T`'s loss type.
///
/// # Safety
///
/// `loss` is a live contiguous host tensor of `T::Loss`, not otherwise accessed meanwhile.
pub unsafe fn store_loss<T: HostDtype>(loss: Raw, value: f64) -> ccpl::Result<()> {
    // SAFETY: the caller's contract.
    store(unsafe { loss.host_mut::<T::Loss>() }, &[value])
}

/// Adds float64 values into a host buffer of `T` (a gradient accumulated as the kernels do).
pub fn accumulate<T: Element>(out: &mut [T], values: &[f64]) -> ccpl::Result<()> {
    check_len("gradient", values.len(), out.len())?;
    for (o, &v) in out.iter_mut().zip(values) {
        *o = T::from_f64(o.to_f64() + v);
    }
    Ok(())
}

/// A host buffer of `T` as float64.
pub fn widen<T: Element>(data: &[T]) -> Vec<f64> {
    data.iter().map(|x| x.to_f64()).collect()
}

/// The crate's errors as Python's: a wrong type is a `TypeError`, no GPU or a failed launch a
/// `RuntimeError`, every other bad input (shapes, centres, tau) a `ValueError`.
pub fn to_py(e: Error) -> PyErr {
    let msg = e.to_string();
    match e {
        Error::Dtype(_) => PyTypeError::new_err(msg),
        Error::NoGpu(_)
        | Error::KernelsNotBuilt(_)
        | Error::Cuda(_)
        | Error::BackwardBeforeForward => PyRuntimeError::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// Whether the CUDA kernels were built into this package (nvcc was found at build time).
#[pyfunction]
fn kernels_built() -> bool {
    ccpl::cuda::kernels_built().is_ok()
}

/// `tau` checked by the crate's one rule (`ccpl::Tau`: finite, > 0, 2/tau finite in float32):
/// a ValueError that names the rule broken.
#[pyfunction]
fn check_tau(tau: f64) -> PyResult<f64> {
    Ok(ccpl::Tau::new(tau).map_err(to_py)?.get())
}

/// The crate version.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _ccpl(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(kernels_built, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(check_tau, m)?)?;
    m.add("NORM_EPS", ccpl::ffi::CCPL_NORM_EPS)?;
    m.add("DEFAULT_TAU", ccpl::Tau::DEFAULT.get())?;
    m.add("TAU_MIN", ccpl::Tau::MIN.get())?;
    m.add("SMALL_S_MAX_ROWS", ccpl::launch::small_s::MAX_ROWS)?;
    m.add("SMALL_S_MAX_LAYERS", ccpl::launch::small_s::MAX_LAYERS)?;
    for function in [
        wrap_pyfunction!(neighbor::center_table, m)?,
        wrap_pyfunction!(neighbor::neighbor_diff, m)?,
        wrap_pyfunction!(neighbor::neighbor_diff_backward, m)?,
        wrap_pyfunction!(rows::rows_forward, m)?,
        wrap_pyfunction!(rows::rows_backward, m)?,
        wrap_pyfunction!(small_rows::small_rows_layout, m)?,
        wrap_pyfunction!(small_rows::small_rows_forward, m)?,
        wrap_pyfunction!(small_rows::small_rows_backward, m)?,
        wrap_pyfunction!(sampled::sampled_layout, m)?,
        wrap_pyfunction!(sampled::sampled_rows, m)?,
        wrap_pyfunction!(sampled::sampled_forward, m)?,
        wrap_pyfunction!(sampled::sampled_backward, m)?,
        wrap_pyfunction!(layer::layer_forward, m)?,
        wrap_pyfunction!(layer::layer_backward, m)?,
        wrap_pyfunction!(layer::small_layer_layout, m)?,
        wrap_pyfunction!(layer::small_layer_forward, m)?,
        wrap_pyfunction!(layer::small_layer_backward, m)?,
        wrap_pyfunction!(loss::loss_layout, m)?,
        wrap_pyfunction!(loss::philox_centers, m)?,
        wrap_pyfunction!(loss::loss_forward, m)?,
        wrap_pyfunction!(loss::loss_backward, m)?,
    ] {
        m.add_function(function)?;
    }
    Ok(())
}
