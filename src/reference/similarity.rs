//! Logits (spec step 6).

use crate::error::Result;
use crate::shape::RowShape;

/// `L[b, i, j] = q[b, i, :] . k[b, j, :] / tau`, `(B, S, S)`.
pub fn similarity(q: &[f64], k: &[f64], shape: &RowShape, tau: f64) -> Result<Vec<f64>> {
    todo!()
}
