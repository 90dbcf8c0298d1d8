//! `kernels/info_nce.cu` on the GPU: cross-entropy of each row of the logits with its
//! diagonal as the target, its mean, and the gradient into the normalised rows.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::{Kernels, buf, buf_mut};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::kernels::Launcher;
use crate::kernels::info_nce as plan;
pub use crate::kernels::info_nce::Side;
use crate::shape::RowShape;

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
    let (logits, _logits_guard) = buf(logits, stream);
    let (row_lse, _lse_guard) = buf_mut(row_lse, stream);
    let (row_loss, _loss_guard) = buf_mut(row_loss, stream);
    kernels
        .on(stream)?
        .launch(&plan::info_nce_forward(shape, logits, row_lse, row_loss)?)
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
    let (row_loss, _row_loss_guard) = buf(row_loss, stream);
    let (loss, _loss_guard) = buf_mut(loss, stream);
    kernels
        .on(stream)?
        .launch(&plan::info_nce_loss(row_loss, loss, accumulate)?)
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
    tau: f64,
    side: Side,
    logits: &impl DevicePtr<f32>,
    row_lse: &impl DevicePtr<f32>,
    row_loss: &impl DevicePtr<f32>,
    other: &impl DevicePtr<T>,
    upstream: &impl DevicePtr<f32>,
    grad: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    let (logits, _logits_guard) = buf(logits, stream);
    let (row_lse, _lse_guard) = buf(row_lse, stream);
    let (row_loss, _loss_guard) = buf(row_loss, stream);
    let (other, _other_guard) = buf(other, stream);
    let (upstream, _upstream_guard) = buf(upstream, stream);
    let (grad, _grad_guard) = buf_mut(grad, stream);
    let launch = plan::info_nce_backward::<T>(
        shape, tau, side, logits, row_lse, row_loss, other, upstream, grad,
    )?;
    kernels.on(stream)?.launch(&launch)
}
