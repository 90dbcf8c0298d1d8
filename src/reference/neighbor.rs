//! Difference rows (spec steps 2-3) and their backward.

use crate::dtype::Element;
use crate::error::Result;
use crate::sampling::Centers;
use crate::shape::FeatureShape;

/// Difference rows `(B, S, C)`, `S = 8N`, direction-major: row `k*N + x` of image `b` is
/// `f[b, :, p_x] - f[b, :, p_x + off_k]`. `feat` is in `shape`'s layout.
pub fn neighbor_diff<T: Element>(
    feat: &[T],
    shape: &FeatureShape,
    centers: &Centers,
) -> Result<Vec<f64>> {
    todo!()
}

/// Backward of [`neighbor_diff`]: adds the scatter of `grad_rows` `(B, S, C)` into `grad_feat`
/// (in `shape`'s layout): a centre gets `+g`, its neighbour `-g`, overlaps add up.
pub fn neighbor_diff_backward(
    grad_rows: &[f64],
    shape: &FeatureShape,
    centers: &Centers,
    grad_feat: &mut [f64],
) -> Result<()> {
    todo!()
}
