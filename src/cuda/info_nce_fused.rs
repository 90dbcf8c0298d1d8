//! `kernels/info_nce_fused.cu` on the GPU: the InfoNCE loss of the logits `q kᵀ / tau` and
//! its backward, with the logits recomputed on the chip instead of stored (memory
//! `O(B*S*C)`).

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};

use super::Kernels;
use crate::dtype::Dtype;
use crate::error::Result;
pub use crate::launch::info_nce::Side;
use crate::launch::info_nce_fused as plan;
use crate::shape::RowShape;
use crate::tau::Tau;

/// Writes, per row of the logits `L = q kᵀ / tau` of the normalised rows `q`, `k` `(B, S, C)`,
/// `row_lse = logsumexp_j L[b,i,j]` and `row_loss = row_lse - L[b,i,i]` (float32, `B*S`
/// each), as [`similarity`](super::similarity::similarity) then
/// [`info_nce_forward`](super::info_nce::info_nce_forward) would, without the `(B, S, S)`
/// logits. Their mean: [`info_nce_loss`](super::info_nce::info_nce_loss).
///
/// Everything is validated before the launch; nothing is allocated and nothing waits.
#[allow(clippy::too_many_arguments)]
pub fn info_nce_fused_forward<T: Dtype>(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &RowShape,
    tau: Tau,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    row_lse: &mut impl DevicePtrMut<f32>,
    row_loss: &mut impl DevicePtrMut<f32>,
) -> Result<()> {
    kernels.launch_one(stream, |launcher| {
        plan::info_nce_fused_forward::<T>(
            shape,
            tau,
            launcher.read(q),
            launcher.read(k),
            launcher.write(row_lse),
            launcher.write(row_loss),
        )
    })
}

/// Writes the gradient of the loss with respect to the normalised rows of `side` into `grad`
/// `(B, S, C)`: with `G = (softmax(L) - I) * upstream[0] / (B*S)`, `dq = G k / tau` or
/// `dk = Gᵀ q / tau`, the logits recomputed from `q` and `k`. `upstream` is one float32 on
/// the device, `row_lse` and `row_loss` the forward's.
///
/// Everything is validated before the launch; nothing is allocated and nothing waits.
#[allow(clippy::too_many_arguments)]
pub fn info_nce_fused_backward<T: Dtype>(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &RowShape,
    tau: Tau,
    side: Side,
    q: &impl DevicePtr<T>,
    k: &impl DevicePtr<T>,
    row_lse: &impl DevicePtr<f32>,
    row_loss: &impl DevicePtr<f32>,
    upstream: &impl DevicePtr<f32>,
    grad: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    kernels.launch_one(stream, |launcher| {
        plan::info_nce_fused_backward::<T>(
            shape,
            tau,
            side,
            launcher.read(q),
            launcher.read(k),
            launcher.read(row_lse),
            launcher.read(row_loss),
            launcher.read(upstream),
            launcher.write(grad),
        )
    })
}
