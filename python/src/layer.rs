//! The CCP loss of one layer with the identity head (`ccpl.ccp_layer_loss`): forward and
//! backward.
//!
//! The forward keeps two tensors for the backward: `saved_rows` and `stats` `(4, B, S)`, as in
//! [`crate::rows`]. On CUDA, `saved_rows` is `(2, B, S, C)` = `[unit_q, unit_k]` (the
//! normalised difference rows: the crate's layer sequence, [`LayerPlan`], never keeps the
//! difference rows themselves, and no `(B, S, S)` logits); with the backward's scratch
//! `(2, B, S, C)` = `[grad_unit, grad_rows]` they are the crate's layer workspace
//! ([`LayerWorkspace`]). On the CPU, the float64 reference keeps everything in float64 and
//! `saved_rows` is `(4, B, S, C)` = `[rows_q, rows_k, unit_q, unit_k]`.
//!
//! On CUDA up to `S = 8N = 512` (the paper's sizes) the op is the small-S path instead: the
//! crate's whole loss ([`LossPlan`]) for this one layer at the caller's centres
//! ([`Draw::Given`]), two launches forward (the rows of both sides, normalised; the loss and
//! the gradient of the rows) and one backward (the scatter). Its workspace is one byte tensor
//! carved as `ccp_loss`'s ([`loss::carve`]), its counters zeroed by the package; the centres
//! are their device table, which the op returns beside the workspace for the backward.

use ccpl::launch::CentersBuf;
use ccpl::launch::neighbor::Scatter;
use ccpl::launch::{Buf, Launcher};
use ccpl::loss::layer::{LayerPlan, LayerWorkspace};
use ccpl::loss::multi_layer::{CenterBuffers, Draw, LossPlan, LossWorkspace};
use ccpl::{
    Centers, Dtype, Element, Error, FeatureShape, Result, RowShape, Tau, check_len, reference,
};
use pyo3::prelude::*;

use crate::neighbor::{Map, MapArgs, Shape, diff_backward_host, scatter};
use crate::op::{Op, Target, run};
use crate::rows::{self, ABSENT};
use crate::{
    BackwardBufs, HostDtype, HostGrads, Raw, loss, small_s_on_host, split, store_loss, to_py,
};

/// The rows shape of a layer: `(B, 8N, C)`.
fn row_shape(shape: &FeatureShape, num_centers: usize) -> Result<RowShape> {
    RowShape::new(
        shape.batch(),
        num_centers * ccpl::ffi::CCPL_NUM_NEIGHBORS as usize,
        shape.channels(),
    )
}

/// The layer workspace over the op's tensors: `saved_rows` `(2, B, S, C)` of `T` (the
/// normalised difference rows of q and k: the device path keeps no difference rows), `stats`
/// `(4, B, S)` of float32, the `loss` ([`ABSENT`] in the backward), the backward's `scratch`
/// `(2, B, S, C)` and `upstream` (both [`ABSENT`] in the forward).
fn workspace<T: Dtype>(
    rows: &RowShape,
    saved_rows: Buf,
    stats: Buf,
    loss: Buf,
    scratch: Option<Buf>,
    upstream: Buf,
) -> Result<LayerWorkspace<Buf, Buf>> {
    let [grad_unit, grad_rows] = match scratch {
        Some(scratch) => split::<T, 2>("backward scratch", scratch, rows.len())?,
        None => [ABSENT; 2],
    };
    Ok(LayerWorkspace {
        rows: rows::workspace::<T>(rows, saved_rows, stats, loss, grad_unit, upstream)?,
        grad_rows,
    })
}

/// The forward on a device: the loss into `loss` (one float32), `saved_rows` and `stats` for
/// the backward. Six launches.
#[allow(clippy::too_many_arguments)]
pub fn forward_device<T: Dtype, L: Launcher>(
    launcher: &L,
    shape: FeatureShape,
    centers: &CentersBuf,
    tau: Tau,
    feat_q: Buf,
    feat_k: Buf,
    saved: [Buf; 2],
    loss: Buf,
) -> Result<(), L::Error> {
    let plan = LayerPlan::new(shape, centers.len(), tau)?;
    let [saved_rows, stats] = saved;
    let ws = workspace::<T>(plan.rows(), saved_rows, stats, loss, None, ABSENT)?;
    plan.forward::<T, _>(launcher, centers, feat_q, feat_k, &ws)
}

/// The backward on a device: ADDS `upstream[0]` (float32) times the gradient of the loss with
/// respect to `feat_q` to `grad_q`, and to `feat_k` to `grad_k` when given. `scratch` holds
/// `2*B*S*C` elements. Three launches per side.
#[allow(clippy::too_many_arguments)]
pub fn backward_device<T: Dtype, L: Launcher>(
    launcher: &L,
    shape: FeatureShape,
    centers: &CentersBuf,
    tau: Tau,
    saved: [Buf; 2],
    upstream: Buf,
    scratch: Buf,
    grad_q: Buf,
    grad_k: Option<Buf>,
    scatter: Scatter,
) -> Result<(), L::Error> {
    let plan = LayerPlan::new(shape, centers.len(), tau)?;
    let [saved_rows, stats] = saved;
    let ws = workspace::<T>(
        plan.rows(),
        saved_rows,
        stats,
        ABSENT,
        Some(scratch),
        upstream,
    )?;
    plan.backward::<T, _>(
        launcher,
        centers,
        &ws,
        Some(upstream),
        grad_q,
        grad_k,
        scatter,
    )
}

/// The forward on the host, in float64: fills `saved_rows` and `stats` (float64) and returns
/// the loss.
pub fn forward_host<T: Element>(
    shape: &FeatureShape,
    centers: &Centers,
    tau: Tau,
    feat_q: &[T],
    feat_k: &[T],
    saved_rows: &mut [f64],
    stats: &mut [f64],
) -> Result<f64> {
    let rows = row_shape(shape, centers.len())?;
    let diff = [
        reference::neighbor_diff(feat_q, shape, centers)?,
        reference::neighbor_diff(feat_k, shape, centers)?,
    ];
    rows::forward_host(&rows, tau, diff, saved_rows, stats)
}

/// The backward on the host, in float64 from what [`forward_host`] kept: ADDS `upstream` times
/// the gradient with respect to `feat_q` to `grad_q`, and to `feat_k` to `grad_k` when given.
pub fn backward_host<T: Element>(
    shape: &FeatureShape,
    centers: &Centers,
    tau: Tau,
    saved: [&[f64]; 2],
    upstream: f64,
    (grad_q, grad_k): HostGrads<'_, T>,
) -> Result<()> {
    let rows = row_shape(shape, centers.len())?;
    let n = rows.len();
    let mut grad_rows_q = vec![0.0; n];
    let mut grad_rows_k = grad_k.as_ref().map(|_| vec![0.0; n]);
    let grad_rows = (&mut grad_rows_q[..], grad_rows_k.as_deref_mut());
    rows::backward_host::<f64>(&rows, tau, saved, upstream, grad_rows)?;
    diff_backward_host(shape, centers, &grad_rows_q, grad_q)?;
    if let (Some(grad_k), Some(grad_rows_k)) = (grad_k, grad_rows_k) {
        diff_backward_host(shape, centers, &grad_rows_k, grad_k)?;
    }
    Ok(())
}

/// The forward of `ccp_layer_loss`: the loss of the feature maps, and what the backward reads.
struct Forward {
    map: Map,
    tau: Tau,
    /// `[feat_q, feat_k]`.
    feat: [Raw; 2],
    loss: Raw,
    saved: [Raw; 2],
}

impl Op for Forward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        let (shape, tau, [saved_rows, stats]) = (&self.map.shape, self.tau, self.saved);
        // SAFETY: features of T, saved float64, the loss of T's loss type (the caller's
        // contract).
        unsafe {
            let centers = self.map.host_centers()?;
            let [feat_q, feat_k] = self.feat.map(|f| f.host::<T>());
            let (saved_rows, stats) = (saved_rows.host_mut(), stats.host_mut());
            let value = forward_host::<T>(shape, &centers, tau, feat_q, feat_k, saved_rows, stats)?;
            store_loss::<T>(self.loss, value)
        }
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let ([feat_q, feat_k], saved) = (self.feat.map(Raw::buf), self.saved.map(Raw::buf));
        let (centers, loss) = (self.map.device_centers()?, self.loss.buf());
        let (shape, tau) = (self.map.shape, self.tau);
        forward_device::<T, _>(launcher, shape, &centers, tau, feat_q, feat_k, saved, loss)
    }
}

/// The backward of `ccp_layer_loss`: adds into `grad_q` (and `grad_k` when given).
struct Backward {
    map: Map,
    tau: Tau,
    scatter: Scatter,
    bufs: BackwardBufs,
}

impl Op for Backward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        // SAFETY: host tensors of the named types (the caller's contract).
        unsafe {
            let centers = self.map.host_centers()?;
            let b = self.bufs.host::<T>()?;
            backward_host::<T>(
                &self.map.shape,
                &centers,
                self.tau,
                b.saved,
                b.upstream,
                b.grads,
            )
        }
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let (centers, b) = (self.map.device_centers()?, self.bufs.device()?);
        let (shape, tau, scatter) = (self.map.shape, self.tau, self.scatter);
        let (saved, upstream, scratch) = (b.saved, b.upstream, b.scratch);
        backward_device::<T, _>(
            launcher, shape, &centers, tau, saved, upstream, scratch, b.grad_q, b.grad_k, scatter,
        )
    }
}

/// The forward of `ccp_layer_loss`.
#[pyfunction]
pub(crate) fn layer_forward(
    py: Python<'_>,
    target: Target,
    map: MapArgs,
    tau: f64,
    feat: [Raw; 2],
    loss: Raw,
    saved: [Raw; 2],
) -> PyResult<()> {
    run(py, target, || {
        let (map, tau) = (map.checked()?, Tau::new(tau)?);
        Ok(Forward {
            map,
            tau,
            feat,
            loss,
            saved,
        })
    })
}

/// The backward of `ccp_layer_loss`: adds into `grad_q` (and `grad_k` when given);
/// `deterministic` picks the scatter.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_backward(
    py: Python<'_>,
    target: Target,
    map: MapArgs,
    tau: f64,
    deterministic: bool,
    bufs: BackwardBufs,
) -> PyResult<()> {
    run(py, target, || {
        let (map, tau, scatter) = (map.checked()?, Tau::new(tau)?, scatter(deterministic));
        Ok(Backward {
            map,
            tau,
            scatter,
            bufs,
        })
    })
}

/// The small-S path's plan of the map at its centres: the whole loss of this one layer.
fn small_plan(map: &Map, tau: Tau) -> Result<LossPlan> {
    let plan = LossPlan::new(&[(map.shape, map.num_centers())], tau)?;
    if !plan.is_small(0) {
        return Err(Error::Shape(format!(
            "{} centres: the small-S layer loss takes at most {}",
            map.num_centers(),
            ccpl::launch::small_s::MAX_ROWS / ccpl::ffi::CCPL_NUM_NEIGHBORS as usize
        )));
    }
    Ok(plan)
}

/// The small-S workspace over the caller's byte tensor, checked to span it, with the map's
/// device table in place of its centre buffers.
fn small_workspace<T: Dtype>(
    plan: &LossPlan,
    map: &Map,
    workspace: Raw,
) -> Result<LossWorkspace<Buf, Buf, Buf>> {
    let (mut ws, bytes) = loss::carve(plan, size_of::<T>(), workspace.0)?;
    check_len("small-S layer workspace (bytes)", bytes, workspace.1)?;
    let centers = map.device_centers()?;
    ws.centers = vec![CenterBuffers {
        flat: centers.flat,
        map: centers.map,
    }];
    Ok(ws)
}

/// The forward of `ccp_layer_loss` on the small-S path: the loss into `loss` (one float32),
/// and in the workspace what the backward reads. Two launches.
pub(crate) struct SmallForward {
    pub(crate) map: Map,
    pub(crate) tau: Tau,
    /// `[feat_q, feat_k]`.
    pub(crate) feat: [Raw; 2],
    /// Bytes laid out by [`loss::carve`], the counters zero.
    pub(crate) workspace: Raw,
    pub(crate) loss: Raw,
}

impl Op for SmallForward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        Err(small_s_on_host("layer loss"))
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let plan = small_plan(&self.map, self.tau)?;
        let mut ws = small_workspace::<T>(&plan, &self.map, self.workspace)?;
        // The loss is the caller's tensor, not the workspace's.
        ws.loss = self.loss.buf();
        let [q, k] = self.feat.map(Raw::buf);
        plan.forward::<T, _>(launcher, &[(q, k)], &ws, Draw::Given)
    }
}

/// The backward of `ccp_layer_loss` on the small-S path: ADDS `upstream[0]` (float32) times
/// the gradient with respect to `feat_q` to `grad_q`, and to `feat_k` to `grad_k` when given.
/// One launch, deterministic.
pub(crate) struct SmallBackward {
    pub(crate) map: Map,
    pub(crate) tau: Tau,
    /// The forward's workspace.
    pub(crate) workspace: Raw,
    pub(crate) upstream: Raw,
    /// `(grad_q, grad_k or None)`, of `T`.
    pub(crate) grads: (Raw, Option<Raw>),
}

impl Op for SmallBackward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        Err(small_s_on_host("layer loss"))
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let plan = small_plan(&self.map, self.tau)?;
        let ws = small_workspace::<T>(&plan, &self.map, self.workspace)?;
        let grad_q = [self.grads.0.buf()];
        let grad_k = self.grads.1.map(|g| [g.buf()]);
        let upstream = Some(self.upstream.buf());
        plan.backward::<T, _>(
            launcher,
            &ws,
            upstream,
            &grad_q,
            grad_k.as_ref().map(|g| &g[..]),
        )
    }
}

/// The small-S workspace of `ccp_layer_loss` for a `(B, C, H, W, channels_last)` map with
/// `num_centers` centres, elements of `row_bytes`: `(bytes, counters' byte offset, counters'
/// bytes)`. The package allocates the bytes and zeroes the counters.
#[pyfunction]
pub(crate) fn small_layer_layout(
    shape: Shape,
    num_centers: usize,
    tau: f64,
    row_bytes: usize,
) -> PyResult<(usize, usize, usize)> {
    let layout = || -> Result<_> {
        let plan = LossPlan::new(&[(shape.feature()?, num_centers)], Tau::new(tau)?)?;
        let (ws, bytes) = loss::carve(&plan, row_bytes, 0)?;
        Ok((bytes, ws.counters.addr as usize, 4 * ws.counters.len))
    };
    layout().map_err(to_py)
}

/// The forward of `ccp_layer_loss` on the small-S path.
#[pyfunction]
pub(crate) fn small_layer_forward(
    py: Python<'_>,
    target: Target,
    map: MapArgs,
    tau: f64,
    feat: [Raw; 2],
    workspace: Raw,
    loss: Raw,
) -> PyResult<()> {
    run(py, target, || {
        Ok(SmallForward {
            map: map.checked()?,
            tau: Tau::new(tau)?,
            feat,
            workspace,
            loss,
        })
    })
}

/// The backward of `ccp_layer_loss` on the small-S path: adds into `grads` `(grad_q, grad_k
/// or None)`.
#[pyfunction]
pub(crate) fn small_layer_backward(
    py: Python<'_>,
    target: Target,
    map: MapArgs,
    tau: f64,
    workspace: Raw,
    upstream: Raw,
    grads: (Raw, Option<Raw>),
) -> PyResult<()> {
    run(py, target, || {
        Ok(SmallBackward {
            map: map.checked()?,
            tau: Tau::new(tau)?,
            workspace,
            upstream,
            grads,
        })
    })
}
