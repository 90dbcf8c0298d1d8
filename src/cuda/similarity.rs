//! `kernels/similarity.cu` on the GPU: the logits `q kᵀ / tau`.

use crate::launch::similarity as plan;
use crate::shape::RowShape;
use crate::tau::Tau;

kernel_wrappers! {
    /// Writes `logits[b, i, j] = q[b, i, :] . k[b, j, :] / tau` (float32, `(B, S, S)`) for `q`
    /// and `k` of shape `(B, S, C)`. Any `S` and `C`.
    pub fn similarity<T>(shape: value &RowShape, tau: value Tau, q: read T, k: read T, logits: write f32);
}
