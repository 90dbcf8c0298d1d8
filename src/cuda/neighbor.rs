//! `kernels/neighbor.cu` on the GPU: difference rows and their backward scatter.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::CudaLauncher;
use crate::error::{Error, Result, check_len};
use crate::launch::CentersBuf;
pub use crate::launch::neighbor::Scatter;
use crate::launch::neighbor::{self as plan};
use crate::sampling::Centers;
use crate::shape::FeatureShape;

/// Centres on the device: the flat indices and the inverse map the deterministic backward
/// scatter reads. Upload once per layer and step; every kernel of the layer reads them.
#[derive(Debug)]
pub struct DeviceCenters {
    height: usize,
    width: usize,
    flat: CudaSlice<i32>,
    map: CudaSlice<i32>,
}

impl DeviceCenters {
    /// Copies `centers` (and their inverse map, `H*W` integers) to the device on `stream`.
    pub fn upload(stream: &Arc<CudaStream>, centers: &Centers) -> Result<Self> {
        Ok(Self {
            height: centers.height(),
            width: centers.width(),
            flat: stream.clone_htod(centers.flat())?,
            map: stream.clone_htod(&centers.center_map())?,
        })
    }
    /// Number of centres `N`.
    pub fn len(&self) -> usize {
        self.flat.len()
    }
    /// Never true: there is at least one centre.
    pub fn is_empty(&self) -> bool {
        self.flat.len() == 0
    }
    /// Difference rows per image, `S = 8N`.
    pub fn rows(&self) -> usize {
        crate::ffi::CCPL_NUM_NEIGHBORS as usize * self.len()
    }
    /// Bytes on the device: the centres and their map.
    pub(crate) fn bytes(&self) -> usize {
        (self.flat.len() + self.map.len()) * size_of::<i32>()
    }
    /// Room for `n` centres of a `height x width` map, filled by [`copy_from`](Self::copy_from).
    pub(crate) fn alloc(
        stream: &Arc<CudaStream>,
        height: usize,
        width: usize,
        n: usize,
    ) -> Result<Self> {
        Ok(Self {
            height,
            width,
            flat: stream.alloc_zeros(n)?,
            map: stream.alloc_zeros(height * width)?,
        })
    }
    /// `Err` unless `other` is for the same map and count as these centres.
    pub(crate) fn check_same_map(&self, other: &DeviceCenters) -> Result<()> {
        other.check_map(self.height, self.width, self.len())
    }
    /// `Err` unless these are `n` centres of a `height x width` map.
    pub(crate) fn check_map(&self, height: usize, width: usize, n: usize) -> Result<()> {
        if (self.height, self.width, self.len()) == (height, width, n) {
            return Ok(());
        }
        Err(Error::Shape(format!(
            "{} centres of a {}x{} map were given where {n} of a {height}x{width} map are expected",
            self.len(),
            self.height,
            self.width,
        )))
    }
    /// Copies `other` into these centres on `stream`; both must be for the same map and count.
    pub(crate) fn copy_from(
        &mut self,
        stream: &Arc<CudaStream>,
        other: &DeviceCenters,
    ) -> Result<()> {
        self.check_same_map(other)?;
        other.copy_into(stream, &mut self.flat, &mut self.map)
    }
    /// Copies these centres into `flat` (`int32[N]`) and `map` (`int32[H*W]`) on `stream`.
    pub(crate) fn copy_into(
        &self,
        stream: &Arc<CudaStream>,
        flat: &mut CudaSlice<i32>,
        map: &mut CudaSlice<i32>,
    ) -> Result<()> {
        check_len("centres", self.flat.len(), flat.len())?;
        check_len("center map", self.map.len(), map.len())?;
        stream.memcpy_dtod(&self.flat, flat)?;
        stream.memcpy_dtod(&self.map, map)?;
        Ok(())
    }
    /// The addresses for the launches of `launcher`, which holds their guards.
    pub(crate) fn buf<'a>(&'a self, launcher: &CudaLauncher<'a>) -> CentersBuf {
        CentersBuf {
            height: self.height,
            width: self.width,
            flat: launcher.read(&self.flat),
            map: launcher.read(&self.map),
        }
    }
}

kernel_wrappers! {
    /// Writes the difference rows `(B, 8N, C)` of `feat` (shape `shape`) into `rows`.
    pub fn neighbor_diff<T>(shape: value &FeatureShape, centers: centers, feat: read T, rows: write T);

    /// Writes the difference rows of `feat` (shape `shape`) normalised, `out = d / (||d|| + 1e-7)`
    /// `(B, 8N, C)`, and their norms `||d||` (float32, `B*8N`), without storing the difference
    /// rows: [`neighbor_diff`] then [`normalize_rows`](super::normalize::normalize_rows), except
    /// that the differences are formed in float, so `out` is right wherever `T` holds it (f16
    /// differences past 65504). Back through it with
    /// [`normalize_rows_backward_normalized`](super::normalize::normalize_rows_backward_normalized)
    /// then [`neighbor_diff_backward`].
    pub fn neighbor_diff_normalize<T>(shape: value &FeatureShape, centers: centers, feat: read T, out: write T, norms: write f32);

    /// Adds the backward scatter of `grad_rows` `(B, 8N, C)` into `grad_feat` (shape `shape`):
    /// a centre gets `+g`, its neighbour `-g`. [`Scatter::Deterministic`] gives the same bits on
    /// every run; [`Scatter::Atomic`] is faster and may differ in the last bits.
    pub fn neighbor_diff_backward<T>(shape: value &FeatureShape, centers: centers, grad_rows: read T, grad_feat: write T, scatter: value Scatter);
}
