//! Plan of `kernels/similarity.cu`: the logits `q kᵀ / tau` of every image.

use super::{Buf, LaunchPlan, check_row_matrices, row_shape};
use crate::dtype::Dtype;
use crate::error::{Result, check_len};
use crate::ffi;
use crate::shape::RowShape;
use crate::tau::Tau;

/// `similarity_{T}`: `logits[b, i, j] = q[b, i, :] . k[b, j, :] / tau`, `(B, S, S)` float32,
/// from `q` and `k` of shape `(B, S, C)`.
pub fn similarity<T: Dtype>(
    shape: &RowShape,
    tau: Tau,
    q: Buf,
    k: Buf,
    logits: Buf,
) -> Result<LaunchPlan<ffi::ccpl_similarity_params>> {
    let inv_tau = tau.inverse();
    check_row_matrices(shape, &[("q", q), ("k", k)])?;
    check_len("logits", shape.logits_len(), logits.len)?;
    LaunchPlan::tiled::<T>(
        "similarity",
        shape,
        shape.rows(),
        ffi::ccpl_similarity_params {
            q: q.addr,
            k: k.addr,
            logits: logits.addr,
            shape: row_shape(shape)?,
            inv_tau,
        },
    )
}
