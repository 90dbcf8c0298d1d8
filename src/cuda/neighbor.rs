//! `kernels/neighbor.cu` on the GPU: difference rows and their backward scatter.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, SyncOnDrop};

use super::Kernels;
use crate::dtype::Dtype;
use crate::error::Result;
use crate::kernels::neighbor::{self as plan, CentersBuf};
use crate::kernels::{Buf, Launcher};
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
    /// The addresses for a launch on `stream`; hold the guards until the launch is enqueued.
    pub(crate) fn buf<'a>(&'a self, stream: &'a CudaStream) -> (CentersBuf, [SyncOnDrop<'a>; 2]) {
        let (flat, flat_guard) = self.flat.device_ptr(stream);
        let (map, map_guard) = self.map.device_ptr(stream);
        let buf = CentersBuf {
            height: self.height,
            width: self.width,
            flat: Buf {
                addr: flat,
                len: self.flat.len(),
            },
            map: Buf {
                addr: map,
                len: self.map.len(),
            },
        };
        (buf, [flat_guard, map_guard])
    }
}

/// Writes the difference rows `(B, 8N, C)` of `feat` (shape `shape`) into `rows`.
///
/// Everything is validated before the launch; nothing is allocated and nothing waits.
pub fn neighbor_diff<T: Dtype>(
    kernels: &Kernels,
    stream: &CudaStream,
    shape: &FeatureShape,
    centers: &DeviceCenters,
    feat: &impl DevicePtr<T>,
    rows: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    let (feat_len, rows_len) = (feat.len(), rows.len());
    let (feat_addr, _feat_guard) = feat.device_ptr(stream);
    let (rows_addr, _rows_guard) = rows.device_ptr_mut(stream);
    let (centers, _centers_guards) = centers.buf(stream);
    let launch = plan::neighbor_diff::<T>(
        shape,
        &centers,
        Buf {
            addr: feat_addr,
            len: feat_len,
        },
        Buf {
            addr: rows_addr,
            len: rows_len,
        },
    )?;
    kernels.on(stream)?.launch(&launch)
}
