//! InfoNCE with the diagonal as the positive (spec steps 7-8).

use crate::error::Result;
use crate::shape::RowShape;

/// Forward results.
#[derive(Debug, Clone, PartialEq)]
pub struct InfoNceForward {
    /// `mean over b, i of (logsumexp_j L[b,i,j] - L[b,i,i])`.
    pub loss: f64,
    /// `logsumexp_j L[b,i,j]` per row, `B*S`.
    pub row_lse: Vec<f64>,
    /// `logsumexp_j L[b,i,j] - L[b,i,i]` per row, `B*S`.
    pub row_loss: Vec<f64>,
}

/// Gradients of the loss with respect to the normalised rows.
#[derive(Debug, Clone, PartialEq)]
pub struct InfoNceGrads {
    /// `dq`, `(B, S, C)`.
    pub dq: Vec<f64>,
    /// `dk`, `(B, S, C)`, when asked for.
    pub dk: Option<Vec<f64>>,
}

/// Loss and per-row logsumexp of logits `(B, S, S)`; stable for large logits.
pub fn info_nce_forward(logits: &[f64], batch: usize, rows: usize) -> Result<InfoNceForward> {
    todo!()
}

/// `G = (softmax(L) - I) * upstream / (B*S)`, `dq = G k / tau`, `dk = G^T q / tau`.
#[allow(clippy::too_many_arguments)]
pub fn info_nce_backward(
    logits: &[f64],
    row_lse: &[f64],
    q: &[f64],
    k: &[f64],
    shape: &RowShape,
    tau: f64,
    upstream: f64,
    want_dk: bool,
) -> Result<InfoNceGrads> {
    todo!()
}
