//! `kernels/similarity.cu` on the GPU: the logits `q kᵀ / tau`.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::Kernels;
use crate::dtype::Dtype;
use crate::error::Result;
use crate::launch::similarity as plan;
use crate::shape::RowShape;
use crate::tau::Tau;

/// Writes `logits[b, i, j] = q[b, i, :] . k[b, j, :] / tau` (float32, `(B, S, S)`) for `q`
/// and `k` of shape `(B, S, C)`. Any `S` and `C`.
///
/// Everything is validated before the launch; nothing is allocated and nothing waits.
pub fn similarity<T: Dtype>(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &RowShape,
    tau: Tau,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    logits: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    kernels.launch_one(stream, |launcher| {
        plan::similarity::<T>(
            shape,
            tau,
            launcher.read(q),
            launcher.read(k),
            launcher.write(logits),
        )
    })
}
