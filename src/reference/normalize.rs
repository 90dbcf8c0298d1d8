//! Row normalisation (spec step 5) and its backward.

use crate::error::{Error, Result, check_len};
use crate::ffi::CCPL_NORM_EPS;

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
    check_rows(rows.len(), width)?;
    let mut out = vec![0.0; rows.len()];
    let mut norms = Vec::with_capacity(rows.len() / width);
    for (d, v) in rows.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let n = norm(d);
        for c in 0..width {
            v[c] = d[c] / (n + CCPL_NORM_EPS);
        }
        norms.push(n);
    }
    Ok(Normalized { rows: out, norms })
}

/// Backward: `g_d = g_v/(n+eps) - d (d.g_v) / (n (n+eps)^2)`, the second term 0 where `n == 0`.
///
/// `rows` are the rows before normalisation (`d`). A zero row gets `g_v/eps`: the true
/// derivative of `d / (||d|| + eps)` at `d = 0`, finite where PyTorch's is NaN.
pub fn normalize_rows_backward(rows: &[f64], grad_out: &[f64], width: usize) -> Result<Vec<f64>> {
    check_rows(rows.len(), width)?;
    check_len("grad_out", rows.len(), grad_out.len())?;
    let mut grad_rows = vec![0.0; rows.len()];
    let row_triples = rows
        .chunks_exact(width)
        .zip(grad_out.chunks_exact(width))
        .zip(grad_rows.chunks_exact_mut(width));
    for ((d, g), gd) in row_triples {
        let n = norm(d);
        let scale = n + CCPL_NORM_EPS;
        // d (d.g) / (n (n+eps)^2) written with u = d/n as u (u.g) (n/(n+eps)) / (n+eps), so
        // that no product of small numbers underflows and no square of a large one overflows.
        let u_dot_g: f64 = if n > 0.0 {
            (0..width).map(|c| d[c] / n * g[c]).sum()
        } else {
            0.0
        };
        for c in 0..width {
            let along = if n > 0.0 {
                d[c] / n * u_dot_g * (n / scale)
            } else {
                0.0
            };
            gd[c] = (g[c] - along) / scale;
        }
    }
    Ok(grad_rows)
}

/// `||row||_2`, the row scaled by its largest magnitude first so that the sum of squares
/// neither overflows (elements from about 1e154 up) nor underflows: the norm is right for
/// every row whose norm float64 holds.
fn norm(row: &[f64]) -> f64 {
    let max = row.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    if max == 0.0 || !max.is_finite() {
        return max;
    }
    max * row.iter().map(|x| (x / max).powi(2)).sum::<f64>().sqrt()
}

/// A row matrix needs a width of at least 1 and a whole, non-zero number of rows.
fn check_rows(len: usize, width: usize) -> Result<()> {
    if width == 0 {
        return Err(Error::Shape("row width must be at least 1".into()));
    }
    if len == 0 || !len.is_multiple_of(width) {
        return Err(Error::Shape(format!(
            "rows hold {len} elements, not a positive multiple of the width {width}"
        )));
    }
    Ok(())
}
