//! `kernels/normalize.cu` on the GPU: rows divided by their norm plus epsilon, and back.

use crate::launch::normalize as plan;
use crate::shape::RowShape;

kernel_wrappers! {
    /// Writes `out = rows / (||row|| + 1e-7)` and `norms = ||row||` (float32, one per row) for
    /// the `B*S` rows of width `C` of `shape`. A zero row gives a zero row. Right at any magnitude
    /// (the norm is taken at scale); a norm past float32's range is written as `inf`.
    pub fn normalize_rows<T>(shape: value &RowShape, rows: read T, out: write T, norms: write f32);

    /// Writes the gradient of the rows before normalisation, `grad_rows`, from the gradient of
    /// the normalised rows `grad_out`, the rows and the forward's `norms`. Finite for a zero row
    /// (`grad_out / 1e-7`), where PyTorch's normalisation gives NaN.
    pub fn normalize_rows_backward<T>(shape: value &RowShape, rows: read T, norms: read f32, grad_out: read T, grad_rows: write T);

    /// [`normalize_rows_backward`] from the forward's normalised rows (`normalized`, its `out`)
    /// instead of the rows before normalisation: `T` holds the normalised rows where it may not
    /// hold the rows (the output of
    /// [`neighbor_diff_normalize`](super::neighbor::neighbor_diff_normalize)).
    pub fn normalize_rows_backward_normalized<T>(shape: value &RowShape, normalized: read T, norms: read f32, grad_out: read T, grad_rows: write T);
}
