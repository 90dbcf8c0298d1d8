//! `kernels/similarity.cu` on the GPU: the logits `q kᵀ / tau`.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::Kernels;
use crate::dtype::Dtype;
use crate::error::Result;
use crate::launch::Launcher;
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
    let launcher = kernels.on(stream)?;
    let q = launcher.read(q);
    let k = launcher.read(k);
    let logits = launcher.write(logits);
    launcher.launch(&plan::similarity::<T>(shape, tau, q, k, logits)?)
}
