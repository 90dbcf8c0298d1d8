//! Plans of `kernels/neighbor.cu`: difference rows and their backward scatter.

use super::{Buf, LaunchPlan, grid_stride_blocks, i32_of};
use crate::dtype::Dtype;
use crate::error::{Error, Result, check_len};
use crate::ffi;
use crate::shape::FeatureShape;

/// Centres as the kernels see them: the flat indices (`int32[N]`) and the inverse map
/// (`int32[H*W]`, the centre index at each position or -1), wherever they live.
#[derive(Debug, Clone, Copy)]
pub struct CentersBuf {
    /// Height of the map the centres were drawn for.
    pub height: usize,
    /// Width of that map.
    pub width: usize,
    /// `int32[N]`.
    pub flat: Buf,
    /// `int32[H*W]`.
    pub map: Buf,
}

impl CentersBuf {
    /// Number of centres `N`.
    pub fn len(&self) -> usize {
        self.flat.len
    }
    /// Never true for centres made from a [`crate::Centers`].
    pub fn is_empty(&self) -> bool {
        self.flat.len == 0
    }
    fn check(&self, shape: &FeatureShape) -> Result<()> {
        if (self.height, self.width) != (shape.height(), shape.width()) {
            return Err(Error::Shape(format!(
                "centres were drawn for a {}x{} map, the feature map is {}x{}",
                self.height,
                self.width,
                shape.height(),
                shape.width()
            )));
        }
        if self.flat.len == 0 {
            return Err(Error::NoCenters);
        }
        check_len("center map", self.height * self.width, self.map.len)
    }
}

/// Elements of the difference rows of `shape` with `n` centres: `B * 8N * C`.
pub fn rows_len(shape: &FeatureShape, n: usize) -> usize {
    shape.batch() * ffi::CCPL_NUM_NEIGHBORS as usize * n * shape.channels()
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
    check_len("rows", rows_len(shape, centers.len()), rows.len)?;
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
        params: ffi::ccpl_neighbor_diff_params {
            feat: feat.addr,
            centers: centers.flat.addr,
            rows: rows.addr,
            batch: i32_of(shape.batch()),
            channels: i32_of(shape.channels()),
            height: i32_of(shape.height()),
            width: i32_of(shape.width()),
            num_centers: i32_of(centers.len()),
            layout: shape.layout().code(),
        },
    })
}
