//! Plans of `kernels/normalize.cu`: rows divided by their norm plus epsilon, and back.

use super::{Buf, LaunchPlan, WARP, check_row_matrices, grid_stride_blocks, i32_of, row_count};
use crate::dtype::Dtype;
use crate::error::{Result, check_len};
use crate::ffi;
use crate::shape::RowShape;

/// Blocks of `CCPL_NORMALIZE_BLOCK` threads, one warp per row, a grid-stride loop over rows
/// (here and in `neighbor_diff_normalize`, which normalises its rows the same way).
pub(crate) fn grid(num_rows: usize) -> (u32, u32, u32) {
    (
        grid_stride_blocks(num_rows.saturating_mul(WARP), ffi::CCPL_NORMALIZE_BLOCK),
        1,
        1,
    )
}

/// `normalize_rows_{T}`: `out = rows / (||row|| + eps)` and `norms = ||row||` for the `B*S`
/// rows of width `C` of `shape`.
pub fn normalize_rows<T: Dtype>(
    shape: &RowShape,
    rows: Buf,
    out: Buf,
    norms: Buf,
) -> Result<LaunchPlan<ffi::ccpl_normalize_rows_params>> {
    check_row_matrices(shape, &[("rows", rows), ("out", out)])?;
    let num_rows = row_count(shape)?;
    check_len("norms", num_rows, norms.len)?;
    Ok(LaunchPlan::new(
        format!("normalize_rows_{}", T::SUFFIX),
        grid(num_rows),
        ffi::CCPL_NORMALIZE_BLOCK,
        ffi::ccpl_normalize_rows_params {
            rows: rows.addr,
            out: out.addr,
            norms: norms.addr,
            num_rows: i32_of(num_rows)?,
            width: i32_of(shape.width())?,
        },
    ))
}

/// `normalize_rows_backward_{T}`: the gradient of the rows before normalisation from the
/// gradient of the normalised rows (`grad_out`), the rows and the forward's norms.
pub fn normalize_rows_backward<T: Dtype>(
    shape: &RowShape,
    rows: Buf,
    norms: Buf,
    grad_out: Buf,
    grad_rows: Buf,
) -> Result<LaunchPlan<ffi::ccpl_normalize_rows_backward_params>> {
    backward::<T>(shape, ("rows", rows, false), norms, grad_out, grad_rows)
}

/// The same gradient from the forward's normalised rows (`out` of
/// [`normalize_rows`], or of [`neighbor_diff_normalize`](super::neighbor::neighbor_diff_normalize))
/// instead of the rows before normalisation: what the losses use, as `T` holds the
/// normalised rows where it may not hold the rows (f16 differences past 65504).
pub fn normalize_rows_backward_normalized<T: Dtype>(
    shape: &RowShape,
    normalized: Buf,
    norms: Buf,
    grad_out: Buf,
    grad_rows: Buf,
) -> Result<LaunchPlan<ffi::ccpl_normalize_rows_backward_params>> {
    backward::<T>(
        shape,
        ("normalized", normalized, true),
        norms,
        grad_out,
        grad_rows,
    )
}

/// The backward from `saved`, the rows or (`.2`) the normalised rows, named `.0`.
fn backward<T: Dtype>(
    shape: &RowShape,
    saved: (&'static str, Buf, bool),
    norms: Buf,
    grad_out: Buf,
    grad_rows: Buf,
) -> Result<LaunchPlan<ffi::ccpl_normalize_rows_backward_params>> {
    let (what, rows, normalized) = saved;
    let num_rows = row_count(shape)?;
    check_len(what, shape.len(), rows.len)?;
    check_len("norms", num_rows, norms.len)?;
    check_row_matrices(shape, &[("grad_out", grad_out), ("grad_rows", grad_rows)])?;
    Ok(LaunchPlan::new(
        format!("normalize_rows_backward_{}", T::SUFFIX),
        grid(num_rows),
        ffi::CCPL_NORMALIZE_BLOCK,
        ffi::ccpl_normalize_rows_backward_params {
            rows: rows.addr,
            norms: norms.addr,
            grad_out: grad_out.addr,
            grad_rows: grad_rows.addr,
            num_rows: i32_of(num_rows)?,
            width: i32_of(shape.width())?,
            normalized: normalized.into(),
        },
    ))
}
