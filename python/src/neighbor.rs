//! Difference rows and their backward scatter (`ccpl.neighbor_diff`), and the centres as the
//! kernels read them.
//!
//! The centres reach the kernels as one int32 table of `N + H*W` entries, built on the host
//! from the caller's int64 centres (and checked there: interior, distinct) and copied to the
//! device by PyTorch without a wait (pinned memory, `non_blocking=True`): the `N` flat indices
//! in sampling order, then for each of the `H*W` positions the index of the centre there or
//! -1 (the inverse map of the deterministic scatter).

use ccpl::launch::CentersBuf;
use ccpl::launch::neighbor::{self as plan, Scatter};
use ccpl::launch::{Buf, Launcher};
use ccpl::{Centers, Dtype, Element, FeatureShape, Layout, Result, check_len, reference};
use pyo3::prelude::*;

use crate::op::{Op, Target, run};
use crate::{HostDtype, Raw, accumulate, cuda_only, store, to_py, widen};

/// A feature map's shape as Python passes it: `(B, C, H, W, channels_last)`.
#[derive(Debug, Clone, Copy, FromPyObject)]
pub struct Shape(
    pub(crate) usize,
    pub(crate) usize,
    pub(crate) usize,
    pub(crate) usize,
    pub(crate) bool,
);

impl Shape {
    /// The validated shape; channels last is the NHWC layout.
    pub fn feature(self) -> Result<FeatureShape> {
        let Shape(b, c, h, w, channels_last) = self;
        let layout = if channels_last {
            Layout::Nhwc
        } else {
            Layout::Nchw
        };
        FeatureShape::new(b, c, h, w, layout)
    }
}

/// The caller's centres (int64 on the host), checked for a `height x width` map.
///
/// # Safety
///
/// `centers` is a live contiguous int64 host tensor.
pub unsafe fn host_centers(height: usize, width: usize, centers: Raw) -> Result<Centers> {
    // SAFETY: the caller's contract.
    Centers::from_flat(height, width, unsafe { centers.host::<i64>() })
}

/// Writes the kernels' table of `centers` (the flat indices, then the inverse map) into
/// `table`, which must hold `N + H*W` entries.
pub fn fill_table(centers: &Centers, table: &mut [i32]) -> Result<()> {
    let n = centers.len();
    check_len(
        "centre table",
        n + centers.height() * centers.width(),
        table.len(),
    )?;
    let (flat, map) = table.split_at_mut(n);
    flat.copy_from_slice(centers.flat());
    map.copy_from_slice(&centers.center_map());
    Ok(())
}

/// The table of [`fill_table`] for `n` centres of a `height x width` map, wherever it lives,
/// as the plans take it.
pub fn table_buf(height: usize, width: usize, n: usize, table: Buf) -> Result<CentersBuf> {
    check_len("centre table", n + height * width, table.len)?;
    Ok(CentersBuf {
        height,
        width,
        flat: Buf {
            addr: table.addr,
            len: n,
        },
        map: Buf {
            addr: table.addr + (n * size_of::<i32>()) as u64,
            len: height * width,
        },
    })
}

/// The rows `(B, 8N, C)` of `feat` on a device: one launch.
pub fn diff_device<T: Dtype, L: Launcher>(
    launcher: &L,
    shape: &FeatureShape,
    centers: &CentersBuf,
    feat: Buf,
    rows: Buf,
) -> Result<(), L::Error> {
    launcher.launch(&plan::neighbor_diff::<T>(shape, centers, feat, rows)?)
}

/// Adds the scatter of `grad_rows` into `grad_feat` on a device: one launch.
pub fn diff_backward_device<T: Dtype, L: Launcher>(
    launcher: &L,
    shape: &FeatureShape,
    centers: &CentersBuf,
    grad_rows: Buf,
    grad_feat: Buf,
    scatter: Scatter,
) -> Result<(), L::Error> {
    launcher.launch(&plan::neighbor_diff_backward::<T>(
        shape, centers, grad_rows, grad_feat, scatter,
    )?)
}

/// The rows of `feat` on the host, from the float64 reference, rounded to `T`.
pub fn diff_host<T: Element>(
    shape: &FeatureShape,
    centers: &Centers,
    feat: &[T],
    rows: &mut [T],
) -> Result<()> {
    store(rows, &reference::neighbor_diff(feat, shape, centers)?)
}

/// Adds the scatter of `grad_rows` into `grad_feat` on the host (float64, then rounded).
pub fn diff_backward_host<G: Element, T: Element>(
    shape: &FeatureShape,
    centers: &Centers,
    grad_rows: &[G],
    grad_feat: &mut [T],
) -> Result<()> {
    let mut grad = vec![0.0; shape.len()];
    reference::neighbor_diff_backward(&widen(grad_rows), shape, centers, &mut grad)?;
    accumulate(grad_feat, &grad)
}

/// Checks `centers` (int64, host) for a `height x width` map and writes their table into
/// `table` (int32, host, `N + H*W`), for the device ops.
#[pyfunction]
pub(crate) fn center_table(
    py: Python<'_>,
    height: usize,
    width: usize,
    centers: Raw,
    table: Raw,
) -> PyResult<()> {
    py.detach(|| {
        // SAFETY: both are live contiguous host tensors of the named types (int64, int32).
        let centers = unsafe { host_centers(height, width, centers) }?;
        fill_table(&centers, unsafe { table.host_mut::<i32>() })
    })
    .map_err(to_py)
}

/// A feature map and its centres as Python passes them (the package's `centers_call`):
/// `((B, C, H, W, channels_last), centers, table)`, the centres int64 on the host and, for a
/// CUDA op, their device `table` (int32, [`fill_table`]'s layout).
#[derive(Debug, Clone, Copy, FromPyObject)]
pub struct MapArgs(pub(crate) Shape, pub(crate) Raw, pub(crate) Option<Raw>);

impl MapArgs {
    /// The map with its shape checked (the centres are checked where they are read).
    pub fn checked(self) -> Result<Map> {
        let MapArgs(shape, centers, table) = self;
        Ok(Map {
            shape: shape.feature()?,
            centers,
            table,
        })
    }
}

/// A feature map's checked shape and its centres' tensors.
#[derive(Debug, Clone, Copy)]
pub struct Map {
    /// The map's shape and layout.
    pub shape: FeatureShape,
    /// The caller's flat indices.
    centers: Raw,
    /// Their table on the device, which only a CUDA op takes.
    table: Option<Raw>,
}

impl Map {
    /// The centres checked for the map, from the host tensor.
    ///
    /// # Safety
    ///
    /// The centres are a live contiguous int64 host tensor.
    pub unsafe fn host_centers(&self) -> Result<Centers> {
        // SAFETY: the caller's contract.
        unsafe { host_centers(self.shape.height(), self.shape.width(), self.centers) }
    }

    /// The number of centres.
    pub fn num_centers(&self) -> usize {
        self.centers.1
    }

    /// The device table as the plans take it, for the map.
    pub fn device_centers(&self) -> Result<CentersBuf> {
        let table = cuda_only(self.table, "the centres' device table")?.buf();
        table_buf(
            self.shape.height(),
            self.shape.width(),
            self.centers.1,
            table,
        )
    }
}

/// `rows = neighbor_diff(feat)`.
struct Diff {
    map: Map,
    feat: Raw,
    rows: Raw,
}

impl Op for Diff {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        // SAFETY: host tensors of T (the caller's contract).
        unsafe {
            let centers = self.map.host_centers()?;
            diff_host::<T>(
                &self.map.shape,
                &centers,
                self.feat.host(),
                self.rows.host_mut(),
            )
        }
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let centers = self.map.device_centers()?;
        let (feat, rows) = (self.feat.buf(), self.rows.buf());
        diff_device::<T, _>(launcher, &self.map.shape, &centers, feat, rows)
    }
}

/// `grad_feat += neighbor_diff_backward(grad_rows)`.
struct DiffBackward {
    map: Map,
    grad_rows: Raw,
    grad_feat: Raw,
    scatter: Scatter,
}

impl Op for DiffBackward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        // SAFETY: host tensors of T (the caller's contract).
        unsafe {
            let centers = self.map.host_centers()?;
            let (grad_rows, grad_feat) = (self.grad_rows.host(), self.grad_feat.host_mut());
            diff_backward_host::<T, T>(&self.map.shape, &centers, grad_rows, grad_feat)
        }
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let centers = self.map.device_centers()?;
        let (rows, feat) = (self.grad_rows.buf(), self.grad_feat.buf());
        let (shape, scatter) = (&self.map.shape, self.scatter);
        diff_backward_device::<T, _>(launcher, shape, &centers, rows, feat, scatter)
    }
}

/// `rows = neighbor_diff(feat)` of a map at its centres.
#[pyfunction]
pub(crate) fn neighbor_diff(
    py: Python<'_>,
    target: Target,
    map: MapArgs,
    feat: Raw,
    rows: Raw,
) -> PyResult<()> {
    run(py, target, || {
        let map = map.checked()?;
        Ok(Diff { map, feat, rows })
    })
}

/// `grad_feat += neighbor_diff_backward(grad_rows)`; `deterministic` picks the scatter.
#[pyfunction]
pub(crate) fn neighbor_diff_backward(
    py: Python<'_>,
    target: Target,
    map: MapArgs,
    grad_rows: Raw,
    grad_feat: Raw,
    deterministic: bool,
) -> PyResult<()> {
    run(py, target, || {
        let (map, scatter) = (map.checked()?, scatter(deterministic));
        Ok(DiffBackward {
            map,
            grad_rows,
            grad_feat,
            scatter,
        })
    })
}

/// PyTorch's `torch.are_deterministic_algorithms_enabled()` as the crate's scatter.
pub fn scatter(deterministic: bool) -> Scatter {
    if deterministic {
        Scatter::Deterministic
    } else {
        Scatter::Atomic
    }
}
