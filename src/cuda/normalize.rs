//! `kernels/normalize.cu` on the GPU: rows divided by their norm plus epsilon, and back.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::{Kernels, buf, buf_mut};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::kernels::Launcher;
use crate::kernels::normalize as plan;
use crate::shape::RowShape;

/// Writes `out = rows / (||row|| + 1e-7)` and `norms = ||row||` (float32, one per row) for
/// the `B*S` rows of width `C` of `shape`. A zero row gives a zero row.
///
/// Everything is validated before the launch; nothing is allocated and nothing waits.
pub fn normalize_rows<T: Dtype>(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &RowShape,
    rows: &impl DevicePtr<T>,
    out: &mut impl DevicePtrMut<T>,
    norms: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let (rows, _rows_guard) = buf(rows, stream);
    let (out, _out_guard) = buf_mut(out, stream);
    let (norms, _norms_guard) = buf_mut(norms, stream);
    kernels
        .on(stream)?
        .launch(&plan::normalize_rows::<T>(shape, rows, out, norms)?)
}

/// Writes the gradient of the rows before normalisation, `grad_rows`, from the gradient of
/// the normalised rows `grad_out`, the rows and the forward's `norms`. Finite for a zero row
/// (`grad_out / 1e-7`), where PyTorch's normalisation gives NaN.
///
/// Everything is validated before the launch; nothing is allocated and nothing waits.
pub fn normalize_rows_backward<T: Dtype>(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &RowShape,
    rows: &impl DevicePtr<T>,
    norms: &impl DevicePtr<f32>,
    grad_out: &impl DevicePtr<T>,
    grad_rows: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    let (rows, _rows_guard) = buf(rows, stream);
    let (norms, _norms_guard) = buf(norms, stream);
    let (grad_out, _grad_out_guard) = buf(grad_out, stream);
    let (grad_rows, _grad_rows_guard) = buf_mut(grad_rows, stream);
    let launch = plan::normalize_rows_backward::<T>(shape, rows, norms, grad_out, grad_rows)?;
    kernels.on(stream)?.launch(&launch)
}
