//! Difference rows (spec steps 2-3) and their backward.

use crate::dtype::Element;
use crate::error::{Result, check_len};
use crate::ffi;
use crate::sampling::Centers;
use crate::shape::FeatureShape;

/// Difference rows `(B, S, C)`, `S = 8N`, direction-major: row `k*N + x` of image `b` is
/// `f[b, :, p_x] - f[b, :, p_x + off_k]`. `feat` is in `shape`'s layout.
pub fn neighbor_diff<T: Element>(
    feat: &[T],
    shape: &FeatureShape,
    centers: &Centers,
) -> Result<Vec<f64>> {
    check_len("feat", shape.len(), feat.len())?;
    centers.check_shape(shape)?;
    let (n, c_len) = (centers.len(), shape.channels());
    let s = centers.rows();
    let mut rows = vec![0.0; shape.batch() * s * c_len];
    for b in 0..shape.batch() {
        for k in 0..ffi::CCPL_NUM_NEIGHBORS as usize {
            for x in 0..n {
                let (h, w, nh, nw) = center_and_neighbor(shape, centers, k, x);
                let r = k * n + x;
                for c in 0..c_len {
                    let center = feat[shape.offset(b, c, h, w)].to_f64();
                    let neighbor = feat[shape.offset(b, c, nh, nw)].to_f64();
                    rows[(b * s + r) * c_len + c] = center - neighbor;
                }
            }
        }
    }
    Ok(rows)
}

/// Backward of [`neighbor_diff`]: adds the scatter of `grad_rows` `(B, S, C)` into `grad_feat`
/// (in `shape`'s layout): a centre gets `+g`, its neighbour `-g`, overlaps add up.
pub fn neighbor_diff_backward(
    grad_rows: &[f64],
    shape: &FeatureShape,
    centers: &Centers,
    grad_feat: &mut [f64],
) -> Result<()> {
    centers.check_shape(shape)?;
    let (n, c_len) = (centers.len(), shape.channels());
    let s = centers.rows();
    check_len("grad_rows", shape.batch() * s * c_len, grad_rows.len())?;
    check_len("grad_feat", shape.len(), grad_feat.len())?;
    for b in 0..shape.batch() {
        for k in 0..ffi::CCPL_NUM_NEIGHBORS as usize {
            for x in 0..n {
                let (h, w, nh, nw) = center_and_neighbor(shape, centers, k, x);
                let r = k * n + x;
                for c in 0..c_len {
                    let g = grad_rows[(b * s + r) * c_len + c];
                    grad_feat[shape.offset(b, c, h, w)] += g;
                    grad_feat[shape.offset(b, c, nh, nw)] -= g;
                }
            }
        }
    }
    Ok(())
}

/// `(h, w)` of centre `x` and of its neighbour in direction `k`. Centres are interior (checked
/// when they were made), so the neighbour is on the map.
fn center_and_neighbor(
    shape: &FeatureShape,
    centers: &Centers,
    k: usize,
    x: usize,
) -> (usize, usize, usize, usize) {
    let p = centers.flat()[x] as usize;
    let (h, w) = (p / shape.width(), p % shape.width());
    let (dh, dw) = ffi::neighbor_delta(k);
    (h, w, h.wrapping_add_signed(dh), w.wrapping_add_signed(dw))
}
