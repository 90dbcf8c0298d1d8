//! `kernels/info_nce.cu` on the GPU: cross-entropy of each row of the logits with its
//! diagonal as the target, its mean, and the gradient into the normalised rows.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::Kernels;
use crate::dtype::Dtype;
use crate::error::Result;
use crate::launch::info_nce as plan;
pub use crate::launch::info_nce::Side;
use crate::shape::RowShape;
use crate::tau::Tau;

/// Writes, per row of the logits `(B, S, S)`, `row_lse = logsumexp_j L[b,i,j]` and
/// `row_loss = row_lse - L[b,i,i]` (float32, `B*S` each). Stable at any temperature. The
/// width of `shape` is not used.
///
/// Everything is validated before the launch; nothing is allocated and nothing waits.
pub fn info_nce_forward(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &RowShape,
    logits: &impl DevicePtr<f32>,
    row_lse: &mut impl DevicePtrMut<f32>,
    row_loss: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    kernels.launch_one(stream, |launcher| {
        plan::info_nce_forward(
            shape,
            launcher.read(logits),
            launcher.write(row_lse),
            launcher.write(row_loss),
        )
    })
}

/// Writes `loss[0] = mean(row_loss)`, or adds it with `accumulate` (to sum several layers on
/// the device). Deterministic: the same bits on every run.
///
/// Everything is validated before the launch; nothing is allocated and nothing waits.
pub fn info_nce_loss(
    kernels: &Kernels,
    stream: &CudaStream,
    row_loss: &impl DevicePtr<f32>,
    loss: &mut impl DevicePtrMut<f32>,
    accumulate: bool,
) -> Result<()> {
    kernels.launch_one(stream, |launcher| {
        plan::info_nce_loss(launcher.read(row_loss), launcher.write(loss), accumulate)
    })
}

/// Writes the gradient of the loss with respect to the normalised rows of `side` into `grad`
/// `(B, S, C)`: with `G = (softmax(L) - I) * upstream[0] / (B*S)`, `dq = G k / tau` (`other`
/// is `k`) or `dk = Gᵀ q / tau` (`other` is `q`). `upstream` is one float32 on the device,
/// `row_lse` and `row_loss` the forward's.
///
/// Everything is validated before the launch; nothing is allocated and nothing waits.
#[allow(clippy::too_many_arguments)]
pub fn info_nce_backward<T: Dtype>(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &RowShape,
    tau: Tau,
    side: Side,
    logits: &impl DevicePtr<f32>,
    row_lse: &impl DevicePtr<f32>,
    row_loss: &impl DevicePtr<f32>,
    other: &impl DevicePtr<T>,
    upstream: &impl DevicePtr<f32>,
    grad: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    kernels.launch_one(stream, |launcher| {
        plan::info_nce_backward::<T>(
            shape,
            tau,
            side,
            launcher.read(logits),
            launcher.read(row_lse),
            launcher.read(row_loss),
            launcher.read(other),
            launcher.read(upstream),
            launcher.write(grad),
        )
    })
}
