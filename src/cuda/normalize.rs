//! `kernels/normalize.cu` on the GPU: rows divided by their norm plus epsilon, and back.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::Kernels;
use crate::dtype::Dtype;
use crate::error::Result;
use crate::launch::normalize as plan;
use crate::shape::RowShape;

/// Writes `out = rows / (||row|| + 1e-7)` and `norms = ||row||` (float32, one per row) for
/// the `B*S` rows of width `C` of `shape`. A zero row gives a zero row. Right at any magnitude
/// (the norm is taken at scale); a norm past float32's range is written as `inf`.
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
    kernels.launch_one(stream, |launcher| {
        plan::normalize_rows::<T>(
            shape,
            launcher.read(rows),
            launcher.write(out),
            launcher.write(norms),
        )
    })
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
    kernels.launch_one(stream, |launcher| {
        plan::normalize_rows_backward::<T>(
            shape,
            launcher.read(rows),
            launcher.read(norms),
            launcher.read(grad_out),
            launcher.write(grad_rows),
        )
    })
}

/// [`normalize_rows_backward`] from the forward's normalised rows (`normalized`, its `out`)
/// instead of the rows before normalisation: `T` holds the normalised rows where it may not
/// hold the rows (the output of
/// [`neighbor_diff_normalize`](super::neighbor::neighbor_diff_normalize)).
///
/// Everything is validated before the launch; nothing is allocated and nothing waits.
pub fn normalize_rows_backward_normalized<T: Dtype>(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &RowShape,
    normalized: &impl DevicePtr<T>,
    norms: &impl DevicePtr<f32>,
    grad_out: &impl DevicePtr<T>,
    grad_rows: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    kernels.launch_one(stream, |launcher| {
        plan::normalize_rows_backward_normalized::<T>(
            shape,
            launcher.read(normalized),
            launcher.read(norms),
            launcher.read(grad_out),
            launcher.write(grad_rows),
        )
    })
}
