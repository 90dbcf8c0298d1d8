//! Row normalisation (spec step 5) and its backward.

use crate::error::Result;

/// Normalised rows and the norms they were divided by (plus epsilon).
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    /// `v = d / (||d|| + eps)`, same shape as the input.
    pub rows: Vec<f64>,
    /// `||d||` per row.
    pub norms: Vec<f64>,
}

/// Normalises each row of width `width`: `v = d / (||d||_2 + 1e-7)`.
pub fn normalize_rows(rows: &[f64], width: usize) -> Result<Normalized> {
    todo!()
}

/// Backward: `g_d = g_v/(n+eps) - d (d.g_v) / (n (n+eps)^2)`, the second term 0 where `n == 0`.
pub fn normalize_rows_backward(rows: &[f64], grad_out: &[f64], width: usize) -> Result<Vec<f64>> {
    todo!()
}
