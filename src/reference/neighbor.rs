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
    let mut rows = vec![0.0; shape.batch() * centers.rows() * shape.channels()];
    for_each_difference(shape, centers, |element, center, neighbor| {
        rows[element] = feat[center].to_f64() - feat[neighbor].to_f64();
    });
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
    let rows_len = shape.batch() * centers.rows() * shape.channels();
    check_len("grad_rows", rows_len, grad_rows.len())?;
    check_len("grad_feat", shape.len(), grad_feat.len())?;
    for_each_difference(shape, centers, |element, center, neighbor| {
        grad_feat[center] += grad_rows[element];
        grad_feat[neighbor] -= grad_rows[element];
    });
    Ok(())
}

/// Calls `f(element, center, neighbor)` for every element of the difference rows
/// `(B, 8N, C)`, in order: `element` its index, `center` and `neighbor` the indices in the feature map (in
/// `shape`'s layout) of the two values it is the difference of. Centres are interior (checked
/// when they were made), so every neighbour is on the map.
fn for_each_difference(
    shape: &FeatureShape,
    centers: &Centers,
    mut f: impl FnMut(usize, usize, usize),
) {
    let channels = shape.channels();
    let mut element = 0;
    for b in 0..shape.batch() {
        for k in 0..ffi::CCPL_NUM_NEIGHBORS as usize {
            let (dh, dw) = ffi::neighbor_delta(k);
            for &p in centers.flat() {
                let (h, w) = (p as usize / shape.width(), p as usize % shape.width());
                let (nh, nw) = (h.wrapping_add_signed(dh), w.wrapping_add_signed(dw));
                for c in 0..channels {
                    f(
                        element,
                        shape.offset(b, c, h, w),
                        shape.offset(b, c, nh, nw),
                    );
                    element += 1;
                }
            }
        }
    }
}
