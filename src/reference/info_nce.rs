//! InfoNCE with the diagonal as the positive (spec steps 7-8).

use crate::error::{Result, check_len};
use crate::shape::RowShape;
use crate::tau::Tau;

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
    let shape = RowShape::new(batch, rows, 1)?;
    check_len("logits", shape.logits_len(), logits.len())?;
    let s = rows;
    let mut row_lse = Vec::with_capacity(batch * s);
    let mut row_loss = Vec::with_capacity(batch * s);
    for b in 0..batch {
        for i in 0..s {
            let row = &logits[(b * s + i) * s..][..s];
            // logsumexp with the row maximum subtracted: exp never overflows (tau = 0.01
            // gives logits near 100).
            let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|l| (l - max).exp()).sum();
            let lse = max + sum.ln();
            row_lse.push(lse);
            row_loss.push(lse - row[i]);
        }
    }
    let loss = row_loss.iter().sum::<f64>() / (batch * s) as f64;
    Ok(InfoNceForward {
        loss,
        row_lse,
        row_loss,
    })
}

/// `G = (softmax(L) - I) * upstream / (B*S)`, `dq = G k / tau`, `dk = G^T q / tau`.
///
/// `row_lse` is the forward's; `upstream` is the gradient of whatever follows with respect
/// to the loss (1 for the loss itself).
#[allow(clippy::too_many_arguments)]
pub fn info_nce_backward(
    logits: &[f64],
    row_lse: &[f64],
    q: &[f64],
    k: &[f64],
    shape: &RowShape,
    tau: Tau,
    upstream: f64,
    want_dk: bool,
) -> Result<InfoNceGrads> {
    check_len("logits", shape.logits_len(), logits.len())?;
    check_len("row_lse", shape.batch() * shape.rows(), row_lse.len())?;
    check_len("q", shape.len(), q.len())?;
    check_len("k", shape.len(), k.len())?;
    let (batch, s, c_len) = (shape.batch(), shape.rows(), shape.width());
    let scale = upstream / (batch * s) as f64;
    let mut dq = vec![0.0; shape.len()];
    let mut dk = vec![0.0; if want_dk { shape.len() } else { 0 }];
    for b in 0..batch {
        for i in 0..s {
            for j in 0..s {
                let p = (logits[(b * s + i) * s + j] - row_lse[b * s + i]).exp();
                let identity = if i == j { 1.0 } else { 0.0 };
                let g = (p - identity) * scale;
                for c in 0..c_len {
                    dq[(b * s + i) * c_len + c] += g * k[(b * s + j) * c_len + c] / tau.get();
                }
                if want_dk {
                    for c in 0..c_len {
                        dk[(b * s + j) * c_len + c] += g * q[(b * s + i) * c_len + c] / tau.get();
                    }
                }
            }
        }
    }
    Ok(InfoNceGrads {
        dq,
        dk: want_dk.then_some(dk),
    })
}
