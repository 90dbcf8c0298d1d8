//! Plan of `kernels/similarity.cu`: the logits `q kᵀ / tau` of every image.

use super::{Buf, LaunchPlan, row_shape, tile_grid};
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
    check_len("q", shape.len(), q.len)?;
    check_len("k", shape.len(), k.len)?;
    check_len("logits", shape.logits_len(), logits.len)?;
    Ok(LaunchPlan::new(
        format!("similarity_{}", T::SUFFIX),
        tile_grid(shape.batch(), shape.rows(), shape.rows())?,
        ffi::CCPL_TILE_THREADS,
        ffi::ccpl_similarity_params {
            q: q.addr,
            k: k.addr,
            logits: logits.addr,
            shape: row_shape(shape)?,
            inv_tau,
        },
    ))
}
