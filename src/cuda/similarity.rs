//! `kernels/similarity.cu` on the GPU: the logits `q kᵀ / tau`.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::{Kernels, buf, buf_mut};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::kernels::Launcher;
use crate::kernels::similarity as plan;
use crate::shape::RowShape;

/// Writes `logits[b, i, j] = q[b, i, :] . k[b, j, :] / tau` (float32, `(B, S, S)`) for `q`
/// and `k` of shape `(B, S, C)`. Any `S` and `C`.
///
/// Everything is validated before the launch; nothing is allocated and nothing waits.
pub fn similarity<T: Dtype>(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &RowShape,
    tau: f64,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    logits: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    let (q, _q_guard) = buf(q, stream);
    let (k, _k_guard) = buf(k, stream);
    let (logits, _logits_guard) = buf_mut(logits, stream);
    kernels
        .on(stream)?
        .launch(&plan::similarity::<T>(shape, tau, q, k, logits)?)
}
