//! Plans of `kernels/info_nce_fused.cu`: the InfoNCE forward and backward of the logits
//! `q kᵀ / tau` recomputed tile by tile on the chip, never stored. The results are those of
//! [`similarity`](super::similarity) followed by [`info_nce`](super::info_nce), in
//! `O(B*S*C)` memory instead of `O(B*S*S)`.

use super::info_nce::{Side, info_nce_grad};
use super::{Buf, LaunchPlan, check_row_matrices, row_count, row_shape, row_stats};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::ffi;
use crate::shape::RowShape;
use crate::tau::Tau;

/// `info_nce_fused_forward_{T}`: per row of the logits `L = q kᵀ / tau` of normalised rows
/// `q`, `k` `(B, S, C)`, `row_lse = logsumexp_j L[b,i,j]` and `row_loss = row_lse - L[b,i,i]`
/// (float32, `B*S` each). One block per 64 rows of an image; the mean is
/// [`info_nce_loss`](super::info_nce::info_nce_loss)'s.
pub fn info_nce_fused_forward<T: Dtype>(
    shape: &RowShape,
    tau: Tau,
    q: Buf,
    k: Buf,
    row_lse: Buf,
    row_loss: Buf,
) -> Result<LaunchPlan<ffi::ccpl_info_nce_fused_forward_params>> {
    let rows = row_count(shape)?;
    check_row_matrices(shape, &[("q", q), ("k", k)])?;
    let stats = row_stats(rows, row_lse, row_loss)?;
    // grid.y the 64-row tile, grid.z the image.
    LaunchPlan::tiled::<T>(
        "info_nce_fused_forward",
        shape,
        1,
        ffi::ccpl_info_nce_fused_forward_params {
            q: q.addr,
            k: k.addr,
            stats,
            shape: row_shape(shape)?,
            inv_tau: tau.inverse(),
        },
    )
}

/// `info_nce_fused_backward_{T}`: with `G = (softmax(L) - I) * upstream[0] / (B*S)` and
/// `L = q kᵀ / tau` recomputed, the gradient of the loss with respect to the normalised rows
/// of `side`: `dq = G k / tau` or `dk = Gᵀ q / tau`, written to `grad` `(B, S, C)`.
/// `upstream` is one float32 on the device; `row_lse` and `row_loss` are the forward's. One
/// block per 64x64 tile of `grad`.
#[allow(clippy::too_many_arguments)]
pub fn info_nce_fused_backward<T: Dtype>(
    shape: &RowShape,
    tau: Tau,
    side: Side,
    q: Buf,
    k: Buf,
    row_lse: Buf,
    row_loss: Buf,
    upstream: Buf,
    grad: Buf,
) -> Result<LaunchPlan<ffi::ccpl_info_nce_fused_backward_params>> {
    check_row_matrices(shape, &[("q", q), ("k", k)])?;
    let grad = info_nce_grad(shape, tau, side, [row_lse, row_loss, upstream, grad])?;
    LaunchPlan::tiled::<T>(
        "info_nce_fused_backward",
        shape,
        shape.width(),
        ffi::ccpl_info_nce_fused_backward_params {
            q: q.addr,
            k: k.addr,
            grad,
        },
    )
}
