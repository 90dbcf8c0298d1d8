//! Plans of `kernels/info_nce.cu`: cross-entropy of each row of the logits with its diagonal
//! as the target, the mean of it, and the gradient back into the normalised rows.

use super::{
    Buf, LaunchPlan, WARP, check_row_matrices, grid_stride_blocks, i32_of, row_count, row_shape,
    row_stats,
};
use crate::dtype::Dtype;
use crate::error::{Error, Result, check_len};
use crate::ffi;
use crate::shape::RowShape;
use crate::tau::Tau;

/// Which normalised rows a gradient is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `q`, the rows of `feat_q` (the generated image): `dq = G k / tau`.
    Q,
    /// `k`, the rows of `feat_k` (the content image): `dk = Gᵀ q / tau`.
    K,
}

/// `info_nce_forward`: per row of the logits `(B, S, S)` (the width of `shape` is not used),
/// `row_lse = logsumexp_j L[b,i,j]` and `row_loss = row_lse - L[b,i,i]`, float32.
pub fn info_nce_forward(
    shape: &RowShape,
    logits: Buf,
    row_lse: Buf,
    row_loss: Buf,
) -> Result<LaunchPlan<ffi::ccpl_info_nce_forward_params>> {
    let rows = row_count(shape)?;
    check_len("logits", shape.logits_len(), logits.len)?;
    let stats = row_stats(rows, row_lse, row_loss)?;
    // One warp per row.
    let block = ffi::CCPL_INFO_NCE_BLOCK;
    Ok(LaunchPlan::new(
        "info_nce_forward",
        (grid_stride_blocks(rows * WARP, block), 1, 1),
        block,
        ffi::ccpl_info_nce_forward_params {
            logits: logits.addr,
            stats,
            batch: i32_of(shape.batch())?,
            rows: i32_of(shape.rows())?,
        },
    ))
}

/// `info_nce_loss`: `loss[0] = mean(row_loss)`, or `loss[0] += mean(row_loss)` with
/// `accumulate` (to sum layers on the device). One block, a fixed order: deterministic.
pub fn info_nce_loss(
    row_loss: Buf,
    loss: Buf,
    accumulate: bool,
) -> Result<LaunchPlan<ffi::ccpl_info_nce_loss_params>> {
    if row_loss.len == 0 || row_loss.len > i32::MAX as usize {
        return Err(Error::Shape(format!(
            "{} row losses: at least 1 and within i32 are needed",
            row_loss.len
        )));
    }
    check_len("loss", 1, loss.len)?;
    Ok(LaunchPlan::new(
        "info_nce_loss",
        (1, 1, 1),
        ffi::CCPL_INFO_NCE_BLOCK,
        ffi::ccpl_info_nce_loss_params {
            row_loss: row_loss.addr,
            loss: loss.addr,
            count: i32_of(row_loss.len)?,
            accumulate: accumulate.into(),
        },
    ))
}

/// `info_nce_backward_{T}`: with `G = (softmax(L) - I) * upstream[0] / (B*S)`, the gradient
/// of the loss with respect to the normalised rows of `side`: `dq = G k / tau` (`other` is
/// `k`) or `dk = Gᵀ q / tau` (`other` is `q`). `upstream` is one float32 on the device, so
/// nothing waits on the host; `row_lse` and `row_loss` are the forward's.
#[allow(clippy::too_many_arguments)]
pub fn info_nce_backward<T: Dtype>(
    shape: &RowShape,
    tau: Tau,
    side: Side,
    logits: Buf,
    row_lse: Buf,
    row_loss: Buf,
    other: Buf,
    upstream: Buf,
    grad: Buf,
) -> Result<LaunchPlan<ffi::ccpl_info_nce_backward_params>> {
    let grad = info_nce_grad(shape, tau, side, [row_lse, row_loss, upstream, grad])?;
    check_len("logits", shape.logits_len(), logits.len)?;
    check_row_matrices(shape, &[("other", other)])?;
    LaunchPlan::tiled::<T>(
        "info_nce_backward",
        shape,
        shape.width(),
        ffi::ccpl_info_nce_backward_params {
            logits: logits.addr,
            other: other.addr,
            grad,
        },
    )
}

/// What both InfoNCE backwards take besides their inputs (`ccpl_info_nce_grad`), checked
/// against `shape`: the forward's `row_lse` and `row_loss`, the one float32 `upstream`, and
/// `grad`, the gradient of the rows of `side` they write.
pub(crate) fn info_nce_grad(
    shape: &RowShape,
    tau: Tau,
    side: Side,
    [row_lse, row_loss, upstream, grad]: [Buf; 4],
) -> Result<ffi::ccpl_info_nce_grad> {
    let stats = row_stats(row_count(shape)?, row_lse, row_loss)?;
    check_len("upstream", 1, upstream.len)?;
    check_len("grad", shape.len(), grad.len)?;
    Ok(ffi::ccpl_info_nce_grad {
        stats,
        upstream: upstream.addr,
        out: grad.addr,
        shape: row_shape(shape)?,
        transpose: (side == Side::K).into(),
        inv_tau: tau.inverse(),
    })
}
