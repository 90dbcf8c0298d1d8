//! Plans of `kernels/neighbor.cu`: difference rows and their backward scatter.

use super::{Buf, CentersBuf, LaunchPlan, feature_map, grid_stride_blocks};
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

/// The feature map and centres of `shape` as the kernels take them, with the two buffers
/// every plan of difference rows names checked against them: `map`, one of the feature map,
/// and `rows`, one of difference rows `(B, 8N, C)`.
fn checked_map(
    shape: &FeatureShape,
    centers: &CentersBuf,
    map: (&'static str, Buf),
    rows: (&'static str, Buf),
) -> Result<(ffi::ccpl_feature_map, ffi::ccpl_centers)> {
    let params = feature_map(shape, centers)?;
    check_len(map.0, shape.len(), map.1.len)?;
    check_len(rows.0, rows_len(shape, centers.len())?, rows.1.len)?;
    Ok(params)
}

/// The grid of `neighbor_diff` and its backward: a grid-stride loop over the `B*N*C`
/// (image, centre, channel) triples, each thread taking the eight neighbours of its own.
fn element_grid(shape: &FeatureShape, centers: &CentersBuf) -> (u32, u32, u32) {
    let elements = shape.batch() * centers.len() * shape.channels();
    (grid_stride_blocks(elements, ffi::CCPL_NEIGHBOR_BLOCK), 1, 1)
}

/// `neighbor_diff_{T}`: rows `(B, 8N, C)` from a feature map and `N` centres.
pub fn neighbor_diff<T: Dtype>(
    shape: &FeatureShape,
    centers: &CentersBuf,
    feat: Buf,
    rows: Buf,
) -> Result<LaunchPlan<ffi::ccpl_neighbor_diff_params>> {
    let (map_params, center_params) = checked_map(shape, centers, ("feat", feat), ("rows", rows))?;
    Ok(LaunchPlan::new(
        format!("neighbor_diff_{}", T::SUFFIX),
        element_grid(shape, centers),
        ffi::CCPL_NEIGHBOR_BLOCK,
        ffi::ccpl_neighbor_diff_params {
            feat: feat.addr,
            rows: rows.addr,
            centers: center_params,
            shape: map_params,
        },
    ))
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
    let (map_params, center_params) = checked_map(shape, centers, ("feat", feat), ("out", out))?;
    // B*8N <= B*8N*C, within usize by rows_len.
    let num_rows = shape.batch() * ffi::CCPL_NUM_NEIGHBORS as usize * centers.len();
    check_len("norms", num_rows, norms.len)?;
    Ok(LaunchPlan::new(
        format!("neighbor_diff_normalize_{}", T::SUFFIX),
        super::normalize::grid(num_rows),
        ffi::CCPL_NORMALIZE_BLOCK,
        ffi::ccpl_neighbor_diff_normalize_params {
            feat: feat.addr,
            out: out.addr,
            norms: norms.addr,
            centers: center_params,
            shape: map_params,
        },
    ))
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
    let (map_params, center_params) = checked_map(
        shape,
        centers,
        ("grad_feat", grad_feat),
        ("grad_rows", grad_rows),
    )?;
    let variant = match scatter {
        Scatter::Atomic => "atomic",
        Scatter::Deterministic => "deterministic",
    };
    Ok(LaunchPlan::new(
        format!("neighbor_diff_backward_{variant}_{}", T::SUFFIX),
        element_grid(shape, centers),
        ffi::CCPL_NEIGHBOR_BLOCK,
        ffi::ccpl_neighbor_diff_backward_params {
            grad_rows: grad_rows.addr,
            grad_feat: grad_feat.addr,
            centers: center_params,
            shape: map_params,
        },
    ))
}
