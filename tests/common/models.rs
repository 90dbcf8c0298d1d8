//! The rounding models: each kernel's result as it would be if every value it stores in `T`
//! were the exact value rounded once, computed from the float64 reference.

use ccpl::launch::neighbor::Scatter;
use ccpl::{Centers, Element, FeatureShape, RowShape, Tau, ffi, reference};

use super::tolerance::rounded;

/// The backward scatter of `grad_rows` into `initial` with every value it stores rounded to
/// `T` as the kernel stores it. Deterministic: one rounding of the whole sum. Atomic: each
/// neighbour's `-g` added and rounded on its own, each centre's 8 gradients summed, rounded,
/// then added and rounded.
pub fn scatter_model<T: Element>(
    initial: &[f64],
    grad_rows: &[f64],
    shape: &FeatureShape,
    centers: &Centers,
    scatter: Scatter,
) -> Vec<f64> {
    let round = |v: f64| T::from_f64(v).to_f64();
    let mut g = initial.to_vec();
    if scatter == Scatter::Deterministic {
        reference::neighbor_diff_backward(grad_rows, shape, centers, &mut g).unwrap();
        return g.into_iter().map(round).collect();
    }
    let (n, c_len, w) = (centers.len(), shape.channels(), shape.width());
    for b in 0..shape.batch() {
        for (x, &p) in centers.flat().iter().enumerate() {
            let (h, wp) = (p as usize / w, p as usize % w);
            for c in 0..c_len {
                let mut centre = 0.0;
                for k in 0..ffi::CCPL_NUM_NEIGHBORS as usize {
                    let v = grad_rows[(b * 8 * n + k * n + x) * c_len + c];
                    centre += v;
                    let (dh, dw) = ffi::neighbor_delta(k);
                    let (nh, nw) = (h.wrapping_add_signed(dh), wp.wrapping_add_signed(dw));
                    let at = shape.index(b, c, nh, nw).unwrap();
                    g[at] = round(g[at] - v);
                }
                let at = shape.index(b, c, h, wp).unwrap();
                g[at] = round(g[at] + round(centre));
            }
        }
    }
    g
}

/// The power of two the f16 kernels scale G by before rounding it for their second product
/// (`kGScale` of `kernels/info_nce_fused.cu`); the other types need none.
pub fn g_scale<T: Element>() -> f64 {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<half::f16>() {
        32768.0
    } else {
        1.0
    }
}

/// The fused backward's `(dq, dk)` of unit rows `q`, `k` with `G = softmax(L) - I` rounded as
/// the kernels for `T` store it before their second product (times [`g_scale`]; f32 keeps G
/// in float, f64 is the exact reference), exact otherwise, not rounded at the end.
/// `logits` and `forward` are the reference's.
#[allow(clippy::too_many_arguments)]
pub fn fused_backward_model<T: Element>(
    logits: &[f64],
    forward: &reference::InfoNceForward,
    q: &[f64],
    k: &[f64],
    shape: &RowShape,
    tau: Tau,
    upstream: f64,
) -> (Vec<f64>, Vec<f64>) {
    let (s, c) = (shape.rows(), shape.width());
    let scale = upstream / (shape.batch() * s) as f64 / tau.get();
    let round_g = |g: f64| T::from_f64(g * g_scale::<T>()).to_f64() / g_scale::<T>();
    let mut dq = vec![0.0; shape.len()];
    let mut dk = vec![0.0; shape.len()];
    for b in 0..shape.batch() {
        for i in 0..s {
            let row = b * s + i;
            for j in 0..s {
                // P_ii - 1 as the kernels form it: expm1 of minus the row loss.
                let g = round_g(if i == j {
                    (-forward.row_loss[row]).exp_m1()
                } else {
                    (logits[row * s + j] - forward.row_lse[row]).exp()
                });
                for x in 0..c {
                    dq[row * c + x] += g * k[(b * s + j) * c + x] * scale;
                    dk[(b * s + j) * c + x] += g * q[row * c + x] * scale;
                }
            }
        }
    }
    (dq, dk)
}

/// The rows loss of two row matrices, and its gradients with respect to them, with every
/// value the kernels store in `T` (normalised rows, G for the tensor cores' second product,
/// the gradient of the normalised rows, the result) rounded once, computed stage by stage:
/// what the tolerance of a 16-bit type is measured on. The logits are not rounded: the fused
/// kernels never store them; nor are the norms (float32). The backward through the
/// normalisation starts, as the kernels' does, from the stored (rounded) normalised rows.
/// `rows_model::<f64>` is the exact reference.
pub struct RowsModel {
    pub loss: f64,
    pub grad_rows_q: Vec<f64>,
    pub grad_rows_k: Vec<f64>,
}

/// `rows_q` and `rows_k` are the rows the kernels normalise, exactly (their input rows, or
/// the difference rows the layer forms in float).
pub fn rows_model<T: Element>(
    rows_q: &[f64],
    rows_k: &[f64],
    rows: &RowShape,
    tau: Tau,
    upstream: f64,
) -> RowsModel {
    let c = rows.width();
    let normalized_q = reference::normalize_rows(rows_q, c).unwrap();
    let normalized_k = reference::normalize_rows(rows_k, c).unwrap();
    let unit_q = rounded::<T>(&normalized_q.rows);
    let unit_k = rounded::<T>(&normalized_k.rows);
    let logits = reference::similarity(&unit_q, &unit_k, rows, tau).unwrap();
    let forward = reference::info_nce_forward(&logits, rows.batch(), rows.rows()).unwrap();
    let (dq, dk) =
        fused_backward_model::<T>(&logits, &forward, &unit_q, &unit_k, rows, tau, upstream);
    let back = |unit: &[f64], norms: &[f64], grad_unit: &[f64]| {
        let grad_unit = rounded::<T>(grad_unit);
        rounded::<T>(&normalize_backward_from_normalized(
            unit, norms, &grad_unit, c,
        ))
    };
    RowsModel {
        loss: forward.loss,
        grad_rows_q: back(&unit_q, &normalized_q.norms, &dq),
        grad_rows_k: back(&unit_k, &normalized_k.norms, &dk),
    }
}

/// The normalisation backward of the spec, `g/(n+eps) - u (u.g) n/(n+eps)^2` with `u = d/n`,
/// taking `u` from the normalised rows `v = d/(n+eps)` as the kernels do (`u = v/||v||`): exact
/// on exact `v`, and the kernels' model on `v` rounded to their storage type.
pub fn normalize_backward_from_normalized(
    unit: &[f64],
    norms: &[f64],
    grad: &[f64],
    width: usize,
) -> Vec<f64> {
    let eps = ffi::CCPL_NORM_EPS;
    let directions = reference::normalize_rows(unit, width).unwrap();
    let mut out = vec![0.0; unit.len()];
    for (row, (&n, &v_norm)) in norms.iter().zip(&directions.norms).enumerate() {
        let range = row * width..(row + 1) * width;
        let (v, g) = (&unit[range.clone()], &grad[range.clone()]);
        let u: Vec<f64> = v
            .iter()
            .map(|x| {
                if n > 0.0 && v_norm > 0.0 {
                    x / v_norm
                } else {
                    0.0
                }
            })
            .collect();
        let along: f64 = u.iter().zip(g).map(|(u, g)| u * g).sum();
        for (o, (u, g)) in out[range].iter_mut().zip(u.iter().zip(g)) {
            *o = (g - u * along * n / (n + eps)) / (n + eps);
        }
    }
    out
}

/// A layer's loss, and its gradients with respect to the difference rows, by the rounding
/// model of [`rows_model`] on the exact difference rows (the kernels form them in float and
/// store only their normalised rows). Scatter `grad_rows_*` with [`scatter_model`] for the
/// feature maps.
pub fn layer_model<T: Element>(
    feat_q: &[f64],
    feat_k: &[f64],
    shape: &FeatureShape,
    centers: &Centers,
    tau: Tau,
    upstream: f64,
) -> RowsModel {
    let rows = RowShape::new(shape.batch(), centers.rows(), shape.channels()).unwrap();
    let rows_q = reference::neighbor_diff(feat_q, shape, centers).unwrap();
    let rows_k = reference::neighbor_diff(feat_k, shape, centers).unwrap();
    rows_model::<T>(&rows_q, &rows_k, &rows, tau, upstream)
}
