//! `kernels/info_nce_fused.cu` on the GPU: the InfoNCE loss of the logits `q kᵀ / tau` and
//! its backward, with the logits recomputed on the chip instead of stored (memory
//! `O(B*S*C)`).

pub use crate::launch::info_nce::Side;
use crate::launch::info_nce_fused as plan;
use crate::shape::RowShape;
use crate::tau::Tau;

kernel_wrappers! {
    /// Writes, per row of the logits `L = q kᵀ / tau` of the normalised rows `q`, `k` `(B, S, C)`,
    /// `row_lse = logsumexp_j L[b,i,j]` and `row_loss = row_lse - L[b,i,i]` (float32, `B*S`
    /// each), as [`similarity`](super::similarity::similarity) then
    /// [`info_nce_forward`](super::info_nce::info_nce_forward) would, without the `(B, S, S)`
    /// logits. Their mean: [`info_nce_loss`](super::info_nce::info_nce_loss).
    #[allow(clippy::too_many_arguments)]
    pub fn info_nce_fused_forward<T>(shape: value &RowShape, tau: value Tau, q: read T, k: read T, row_lse: write f32, row_loss: write f32);

    /// Writes the gradient of the loss with respect to the normalised rows of `side` into `grad`
    /// `(B, S, C)`: with `G = (softmax(L) - I) * upstream[0] / (B*S)`, `dq = G k / tau` or
    /// `dk = Gᵀ q / tau`, the logits recomputed from `q` and `k`. `upstream` is one float32 on
    /// the device, `row_lse` and `row_loss` the forward's.
    #[allow(clippy::too_many_arguments)]
    pub fn info_nce_fused_backward<T>(shape: value &RowShape, tau: value Tau, side: value Side, q: read T, k: read T, row_lse: read f32, row_loss: read f32, upstream: read f32, grad: write T);
}
