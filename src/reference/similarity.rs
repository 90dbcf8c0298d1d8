//! Logits (spec step 6).

use crate::error::{Result, check_len};
use crate::shape::RowShape;
use crate::tau::Tau;

/// `L[b, i, j] = q[b, i, :] . k[b, j, :] / tau`, `(B, S, S)`.
pub fn similarity(q: &[f64], k: &[f64], shape: &RowShape, tau: Tau) -> Result<Vec<f64>> {
    check_len("q", shape.len(), q.len())?;
    check_len("k", shape.len(), k.len())?;
    let (batch, s, c_len) = (shape.batch(), shape.rows(), shape.width());
    let mut logits = vec![0.0; shape.logits_len()];
    for b in 0..batch {
        for i in 0..s {
            let qi = &q[(b * s + i) * c_len..][..c_len];
            for j in 0..s {
                let kj = &k[(b * s + j) * c_len..][..c_len];
                let dot: f64 = (0..c_len).map(|c| qi[c] * kj[c]).sum();
                logits[(b * s + i) * s + j] = dot / tau.get();
            }
        }
    }
    Ok(logits)
}
