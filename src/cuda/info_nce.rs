//! `kernels/info_nce.cu` on the GPU: cross-entropy of each row of the logits with its
//! diagonal as the target, its mean, and the gradient into the normalised rows.

use crate::launch::info_nce as plan;
pub use crate::launch::info_nce::Side;
use crate::shape::RowShape;
use crate::tau::Tau;

kernel_wrappers! {
    /// Writes, per row of the logits `(B, S, S)`, `row_lse = logsumexp_j L[b,i,j]` and
    /// `row_loss = row_lse - L[b,i,i]` (float32, `B*S` each). Stable at any temperature. The
    /// width of `shape` is not used.
    pub fn info_nce_forward(shape: value &RowShape, logits: read f32, row_lse: write f32, row_loss: write f32);

    /// Writes `loss[0] = mean(row_loss)`, or adds it with `accumulate` (to sum several layers on
    /// the device). Deterministic: the same bits on every run.
    pub fn info_nce_loss(row_loss: read f32, loss: write f32, accumulate: value bool);

    /// Writes the gradient of the loss with respect to the normalised rows of `side` into `grad`
    /// `(B, S, C)`: with `G = (softmax(L) - I) * upstream[0] / (B*S)`, `dq = G k / tau` (`other`
    /// is `k`) or `dk = Gᵀ q / tau` (`other` is `q`). `upstream` is one float32 on the device,
    /// `row_lse` and `row_loss` the forward's.
    #[allow(clippy::too_many_arguments)]
    pub fn info_nce_backward<T>(shape: value &RowShape, tau: value Tau, side: value Side, logits: read f32, row_lse: read f32, row_loss: read f32, other: read T, upstream: read f32, grad: write T);
}
