//! The CPU reference: every stage of the loss and its backward in `f64`, written to read like
//! the contract (`docs/ccpl-loss.md`, [`crate::contract`]). It is the oracle the kernels are tested against.
//!
//! One module per kernel family, named like its `kernels/*.cu` twin, plus the end-to-end loss.

pub mod info_nce;
pub mod loss;
pub mod neighbor;
pub mod normalize;
pub mod similarity;

pub use info_nce::{InfoNceForward, InfoNceGrads, info_nce_backward, info_nce_forward};
pub use loss::{LayerInput, LayerLoss, RowsLoss, ccp_layer_loss, ccp_loss, rows_loss};
pub use neighbor::{neighbor_diff, neighbor_diff_backward};
pub use normalize::{Normalized, normalize_rows, normalize_rows_backward};
pub use similarity::similarity;

/// `||a - b|| / ||b||`: how this crate measures agreement with the reference. Infinity when
/// the lengths differ or anything is not finite (NaN never agrees); 0 only for `a == b == 0`
/// when `b` is all zeros.
pub fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.iter().chain(b).any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let norm = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    match (norm == 0.0, diff == 0.0) {
        (false, _) => diff / norm,
        (true, true) => 0.0,
        (true, false) => f64::INFINITY,
    }
}
