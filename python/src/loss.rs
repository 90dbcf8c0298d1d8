//! The whole CCP loss with the identity head, every layer in one call (`ccpl.ccp_loss`):
//! forward and backward.
//!
//! On CUDA it is the crate's [`LossPlan`], the launches of [`ccpl::cuda::CcpLoss`]: the centres
//! drawn on the device by the Philox sampler from a seed the package draws from PyTorch's
//! generator, and for the layers of `S = 8N` up to 512 three launches for all of them (the
//! centres and the rows; the loss and the gradient of the rows; the scatter). Its workspace
//! is one byte tensor of PyTorch's, carved here (by `carve`), kept by autograd between the
//! forward and the backward. On the CPU, the float64 reference on the very same centres
//! ([`Centers::philox`]); there the workspace is the seed alone, and the backward reads the
//! feature maps again.

use ccpl::launch::{Buf, Launcher};
use ccpl::loss::multi_layer::{Draw, LossPlan, LossWorkspace};
use ccpl::reference::{self, LayerInput};
use ccpl::{Centers, Dtype, Error, FeatureShape, Result, Tau, check_len};
use pyo3::prelude::*;

use crate::carve::Carver;
use crate::neighbor::Shape;
use crate::op::{Op, Target, run};
use crate::{HostDtype, Raw, accumulate, host_scalar, store_loss, to_py};

/// The step the sampler draws at: every call draws from a new seed, at its first step.
pub(crate) const STEP: u64 = 0;

/// The plan of `shapes`, `num_s` centres asked for in each, at `tau`.
fn plan(shapes: &[Shape], num_s: usize, tau: f64) -> Result<LossPlan> {
    let layers = shapes
        .iter()
        .map(|s| Ok((s.feature()?, num_s)))
        .collect::<Result<Vec<_>>>()?;
    LossPlan::new(&layers, Tau::new(tau)?)
}

/// The plan's workspace laid out in one byte buffer at `base`, rows of `row_bytes` each (the
/// storage type's size); and the bytes it spans.
pub fn carve(
    plan: &LossPlan,
    row_bytes: usize,
    base: u64,
) -> Result<(LossWorkspace<Buf, Buf, Buf>, usize)> {
    let carver = Carver::new(base);
    let ws =
        plan.workspace()?
            .try_map(carver.place(row_bytes), carver.place(4), carver.place(4))?;
    Ok((ws, carver.bytes()))
}

/// The workspace over the caller's byte tensor, checked to hold it.
fn device_workspace<T: Dtype>(
    plan: &LossPlan,
    workspace: Raw,
) -> Result<LossWorkspace<Buf, Buf, Buf>> {
    let (ws, bytes) = carve(plan, size_of::<T>(), workspace.0)?;
    check_len("workspace (bytes)", bytes, workspace.1)?;
    Ok(ws)
}

/// The seed a CPU workspace holds: two int32 words, low first, as the device's counters.
///
/// # Safety
///
/// `workspace` is a live contiguous host tensor of bytes.
pub(crate) unsafe fn host_seed(workspace: Raw) -> Result<u64> {
    // SAFETY: the caller's contract.
    let bytes = unsafe { workspace.host::<u8>() };
    check_len("seed (bytes)", 8, bytes.len())?;
    Ok(u64::from_le_bytes(
        bytes.try_into().expect("checked: 8 bytes"),
    ))
}

/// Every layer's input on the host, its centres the device sampler's under `seed`.
///
/// # Safety
///
/// Every feature map is a live contiguous host tensor of `T` of its layer's shape.
unsafe fn host_layers<'a, T: HostDtype>(
    plan: &LossPlan,
    seed: u64,
    feats: &[[Raw; 2]],
) -> Result<Vec<LayerInput<'a, T>>> {
    check_len("feature maps (layers)", plan.len(), feats.len())?;
    (0..plan.len())
        .zip(feats)
        .map(|(l, &[q, k])| {
            let shape: FeatureShape = *plan.shape(l);
            let centers = Centers::philox(
                shape.height(),
                shape.width(),
                plan.num_centers(l),
                seed,
                STEP,
                l as u32,
            )?;
            // SAFETY: the caller's contract.
            let (feat_q, feat_k) = unsafe { (q.host::<T>(), k.host::<T>()) };
            Ok(LayerInput {
                feat_q,
                feat_k,
                shape,
                centers,
            })
        })
        .collect()
}

/// The forward of `ccp_loss`: the loss into `loss`; on CUDA the workspace for the backward.
pub(crate) struct Forward {
    pub(crate) plan: LossPlan,
    /// `(feat_q, feat_k)` of each layer.
    pub(crate) feats: Vec<[Raw; 2]>,
    /// On CUDA the workspace, its counters holding the seed; on the CPU the seed.
    pub(crate) workspace: Raw,
    pub(crate) loss: Raw,
}

impl Op for Forward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        // SAFETY: host tensors of the named types (the caller's contract).
        unsafe {
            let layers = host_layers::<T>(&self.plan, host_seed(self.workspace)?, &self.feats)?;
            let (value, _) = reference::ccp_loss(&layers, self.plan.tau(), false)?;
            store_loss::<T>(self.loss, value)
        }
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let mut ws = device_workspace::<T>(&self.plan, self.workspace)?;
        // The loss is the caller's tensor, not the workspace's.
        ws.loss = self.loss.buf();
        let feats: Vec<_> = self.feats.iter().map(|[q, k]| (q.buf(), k.buf())).collect();
        self.plan
            .forward::<T, _>(launcher, &feats, &ws, Draw::Sample)
    }
}

/// The backward of `ccp_loss`: adds the upstream gradient times the loss's gradient into each
/// layer's `grads_q` (and `grads_k` when given).
pub(crate) struct Backward {
    pub(crate) plan: LossPlan,
    pub(crate) workspace: Raw,
    /// The feature maps again, which only the CPU half reads.
    pub(crate) feats: Vec<[Raw; 2]>,
    pub(crate) upstream: Raw,
    pub(crate) grads_q: Vec<Raw>,
    pub(crate) grads_k: Option<Vec<Raw>>,
}

impl Op for Backward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        // SAFETY: host tensors of the named types (the caller's contract).
        unsafe {
            let upstream = host_scalar::<T::Loss>(self.upstream)?;
            let layers = host_layers::<T>(&self.plan, host_seed(self.workspace)?, &self.feats)?;
            let (_, per_layer) =
                reference::ccp_loss(&layers, self.plan.tau(), self.grads_k.is_some())?;
            check_len(
                "gradients of feat_q (layers)",
                per_layer.len(),
                self.grads_q.len(),
            )?;
            for (l, layer) in per_layer.iter().enumerate() {
                let scaled = |g: &[f64]| g.iter().map(|x| upstream * x).collect::<Vec<_>>();
                accumulate(self.grads_q[l].host_mut::<T>(), &scaled(&layer.grad_feat_q))?;
                if let (Some(grads_k), Some(g)) = (&self.grads_k, &layer.grad_feat_k) {
                    let grad = grads_k.get(l).ok_or_else(|| {
                        Error::Shape("fewer gradients of feat_k than layers".into())
                    })?;
                    accumulate(grad.host_mut::<T>(), &scaled(g))?;
                }
            }
            Ok(())
        }
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let ws = device_workspace::<T>(&self.plan, self.workspace)?;
        let grads_q: Vec<_> = self.grads_q.iter().map(|g| g.buf()).collect();
        let grads_k: Option<Vec<_>> = self
            .grads_k
            .as_ref()
            .map(|k| k.iter().map(|g| g.buf()).collect());
        let upstream = Some(self.upstream.buf());
        self.plan
            .backward::<T, _>(launcher, &ws, upstream, &grads_q, grads_k.as_deref())
    }
}

/// Where a CUDA workspace's parts lie in its byte tensor: its bytes, the counters' byte offset,
/// and each layer's centre map as `(byte offset, entries)`.
type WorkspaceLayout = (usize, usize, Vec<(usize, usize)>);

/// The CUDA workspace of `ccp_loss` for maps of `shapes` whose elements take `row_bytes`:
/// `(bytes, counters' byte offset, [(byte offset, entries)] of each layer's centre map)`. The
/// package allocates the bytes zeroed, fills the maps with -1 (no centre yet) and writes the
/// seed into the counters' first two words.
#[pyfunction]
pub(crate) fn loss_layout(
    shapes: Vec<Shape>,
    num_s: usize,
    tau: f64,
    row_bytes: usize,
) -> PyResult<WorkspaceLayout> {
    let plan = plan(&shapes, num_s, tau).map_err(to_py)?;
    let (ws, bytes) = carve(&plan, row_bytes, 0).map_err(to_py)?;
    let maps = ws
        .centers
        .iter()
        .map(|c| (c.map.addr as usize, c.map.len))
        .collect();
    Ok((bytes, ws.counters.addr as usize, maps))
}

/// The centres the device sampler draws for a layer of a map of `(height, width)` under
/// `draw = (seed, step, layer)` (flat indices): what `ccp_loss` reads on both paths.
#[pyfunction]
pub(crate) fn philox_centers(
    map: (usize, usize),
    num_s: usize,
    draw: (u64, u64, u32),
) -> PyResult<Vec<i32>> {
    let (seed, step, layer) = draw;
    let centers = Centers::philox(map.0, map.1, num_s, seed, step, layer).map_err(to_py)?;
    Ok(centers.flat().to_vec())
}

/// The forward of `ccp_loss`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub(crate) fn loss_forward(
    py: Python<'_>,
    target: Target,
    shapes: Vec<Shape>,
    num_s: usize,
    tau: f64,
    feats: Vec<[Raw; 2]>,
    workspace: Raw,
    loss: Raw,
) -> PyResult<()> {
    run(py, target, || {
        Ok(Forward {
            plan: plan(&shapes, num_s, tau)?,
            feats,
            workspace,
            loss,
        })
    })
}

/// The backward of `ccp_loss`: adds into `grads_q` (and `grads_k` when given).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub(crate) fn loss_backward(
    py: Python<'_>,
    target: Target,
    shapes: Vec<Shape>,
    num_s: usize,
    tau: f64,
    workspace: Raw,
    feats: Vec<[Raw; 2]>,
    upstream: Raw,
    grads: (Vec<Raw>, Option<Vec<Raw>>),
) -> PyResult<()> {
    run(py, target, || {
        Ok(Backward {
            plan: plan(&shapes, num_s, tau)?,
            workspace,
            feats,
            upstream,
            grads_q: grads.0,
            grads_k: grads.1,
        })
    })
}
