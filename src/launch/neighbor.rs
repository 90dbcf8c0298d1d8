//! Plans of `kernels/neighbor.cu`: difference rows and their backward scatter.

use super::{Buf, CentersBuf, LaunchPlan, grid_stride_blocks, i32_of};
use crate::dtype::Dtype;
use crate::error::{Error, Result, check_len};
use crate::ffi;
use crate::shape::FeatureShape;

/// Elements of the difference rows of `shape` with `n` centres: `B * 8N * C`, or an error
/// when that overflows `usize`.
pub fn rows_len(shape: &FeatureShape, n: usize) -> Result<usize> {
    [ffi::CCPL_NUM_NEIGHBORS as usize, n, shape.channels()]
        .into_iter()
        .try_fold(shape.batch(), usize::checked_mul)
        .ok_or_else(|| Error::Shape(format!("{n} centres: the difference rows overflow usize")))
}

/// `neighbor_diff_{T}`: rows `(B, 8N, C)` from a feature map and `N` centres.
pub fn neighbor_diff<T: Dtype>(
    shape: &FeatureShape,
    centers: &CentersBuf,
    feat: Buf,
    rows: Buf,
) -> Result<LaunchPlan<ffi::ccpl_neighbor_diff_params>> {
    centers.check(shape)?;
    check_len("feat", shape.len(), feat.len)?;
    check_len("rows", rows_len(shape, centers.len())?, rows.len)?;
    let block = ffi::CCPL_NEIGHBOR_BLOCK;
    Ok(LaunchPlan {
        kernel: format!("neighbor_diff_{}", T::SUFFIX),
        grid: (
            grid_stride_blocks(shape.batch() * centers.len() * shape.channels(), block),
            1,
            1,
        ),
        block: (block, 1, 1),
        shared_bytes: 0,
        shared_opt_in: false,
        params: ffi::ccpl_neighbor_diff_params {
            feat: feat.addr,
            centers: centers.flat.addr,
            rows: rows.addr,
            batch: i32_of(shape.batch())?,
            channels: i32_of(shape.channels())?,
            height: i32_of(shape.height())?,
            width: i32_of(shape.width())?,
            num_centers: i32_of(centers.len())?,
            layout: shape.layout().code(),
        },
    })
}

/// `neighbor_diff_normalize_{T}`: the difference rows `(B, 8N, C)` of a feature map,
/// normalised (`out`, in `T`) with their norms (`norms`, float32, `B*8N`), without storing
/// the difference rows: [`neighbor_diff`] then
/// [`normalize_rows`](super::normalize::normalize_rows), except that the differences are
/// formed in float, so `out` is right wherever `T` holds it (f16 differences past 65504).
pub fn neighbor_diff_normalize<T: Dtype>(
    shape: &FeatureShape,
    centers: &CentersBuf,
    feat: Buf,
    out: Buf,
    norms: Buf,
) -> Result<LaunchPlan<ffi::ccpl_neighbor_diff_normalize_params>> {
    centers.check(shape)?;
    check_len("feat", shape.len(), feat.len)?;
    check_len("out", rows_len(shape, centers.len())?, out.len)?;
    // B*8N <= B*8N*C, within usize by rows_len.
    let num_rows = shape.batch() * ffi::CCPL_NUM_NEIGHBORS as usize * centers.len();
    check_len("norms", num_rows, norms.len)?;
    Ok(LaunchPlan {
        kernel: format!("neighbor_diff_normalize_{}", T::SUFFIX),
        grid: super::normalize::grid(num_rows),
        block: (ffi::CCPL_NORMALIZE_BLOCK, 1, 1),
        shared_bytes: 0,
        shared_opt_in: false,
        params: ffi::ccpl_neighbor_diff_normalize_params {
            feat: feat.addr,
            centers: centers.flat.addr,
            out: out.addr,
            norms: norms.addr,
            batch: i32_of(shape.batch())?,
            channels: i32_of(shape.channels())?,
            height: i32_of(shape.height())?,
            width: i32_of(shape.width())?,
            num_centers: i32_of(centers.len())?,
            layout: shape.layout().code(),
        },
    })
}

/// How the backward scatter adds up overlapping windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scatter {
    /// Atomic adds: the fastest; the order of additions, and so the last bits, vary by run.
    #[default]
    Atomic,
    /// One writer per element, a fixed order: bit-identical from run to run.
    Deterministic,
}

/// `neighbor_diff_backward_{atomic,deterministic}_{T}`: adds the scatter of `grad_rows`
/// `(B, 8N, C)` into `grad_feat` (layout of `shape`): a centre gets `+g`, its neighbour `-g`.
pub fn neighbor_diff_backward<T: Dtype>(
    shape: &FeatureShape,
    centers: &CentersBuf,
    grad_rows: Buf,
    grad_feat: Buf,
    scatter: Scatter,
) -> Result<LaunchPlan<ffi::ccpl_neighbor_diff_backward_params>> {
    centers.check(shape)?;
    check_len("grad_rows", rows_len(shape, centers.len())?, grad_rows.len)?;
    check_len("grad_feat", shape.len(), grad_feat.len)?;
    let variant = match scatter {
        Scatter::Atomic => "atomic",
        Scatter::Deterministic => "deterministic",
    };
    let block = ffi::CCPL_NEIGHBOR_BLOCK;
    Ok(LaunchPlan {
        kernel: format!("neighbor_diff_backward_{variant}_{}", T::SUFFIX),
        grid: (
            grid_stride_blocks(shape.batch() * centers.len() * shape.channels(), block),
            1,
            1,
        ),
        block: (block, 1, 1),
        shared_bytes: 0,
        shared_opt_in: false,
        params: ffi::ccpl_neighbor_diff_backward_params {
            grad_rows: grad_rows.addr,
            centers: centers.flat.addr,
            center_map: centers.map.addr,
            grad_feat: grad_feat.addr,
            batch: i32_of(shape.batch())?,
            channels: i32_of(shape.channels())?,
            height: i32_of(shape.height())?,
            width: i32_of(shape.width())?,
            num_centers: i32_of(centers.len())?,
            layout: shape.layout().code(),
        },
    })
}
