//! The difference rows of every layer at centres drawn on the device
//! (`ccpl.sampled_neighbor_diff`), what a learned head runs on: forward and backward.
//!
//! On CUDA it is the crate's [`SampledRowsPlan`]: one launch draws every layer's centres with
//! the Philox sampler, from a seed the package draws from PyTorch's generator, and gathers both
//! sides' raw difference rows; the backward is one launch that scatters every layer's row
//! gradients into the feature-map gradients. Nothing is built on the host and nothing waits:
//! a training step with it can be captured in a CUDA graph, each replay drawing new centres
//! (the package draws a new seed on the device). Its workspace (the counters, the centres and
//! their maps) is one byte tensor of PyTorch's, carved here ([`carve`]), kept by autograd
//! between the forward and the backward. On the CPU, the float64 reference at the very same
//! centres ([`Centers::philox`]); there the workspace is the seed alone.

use ccpl::launch::small_s::ScatterSide;
use ccpl::launch::{Buf, Launcher};
use ccpl::loss::small_s::{SampledRowsPlan, SampledRowsWorkspace};
use ccpl::{Centers, Dtype, Error, Result, check_len};
use pyo3::prelude::*;

use crate::carve::Carver;
use crate::loss::{STEP, host_seed};
use crate::neighbor::{Shape, diff_backward_host, diff_host};
use crate::op::{Op, Target, run};
use crate::{HostDtype, Raw, to_py};

/// The plan of `shapes`, `num_s` centres asked for in each.
fn plan(shapes: &[Shape], num_s: usize) -> Result<SampledRowsPlan> {
    let layers = shapes
        .iter()
        .map(|s| Ok((s.feature()?, num_s)))
        .collect::<Result<Vec<_>>>()?;
    SampledRowsPlan::new(&layers)
}

/// The plan's workspace laid out in one byte buffer at `base`; and the bytes it spans.
pub fn carve(plan: &SampledRowsPlan, base: u64) -> Result<(SampledRowsWorkspace<Buf>, usize)> {
    let carver = Carver::new(base);
    let ws = plan.workspace()?.try_map(carver.place(4))?;
    Ok((ws, carver.bytes()))
}

/// The workspace over the caller's byte tensor, checked to span it.
fn device_workspace(plan: &SampledRowsPlan, workspace: Raw) -> Result<SampledRowsWorkspace<Buf>> {
    let (ws, bytes) = carve(plan, workspace.0)?;
    check_len("sampled rows workspace (bytes)", bytes, workspace.1)?;
    Ok(ws)
}

/// Layer `layer`'s centres on the host: the device sampler's under `seed`, at the first step.
fn host_centers(plan: &SampledRowsPlan, seed: u64, layer: usize) -> Result<Centers> {
    let shape = plan.shape(layer);
    let index = u32::try_from(layer).map_err(|_| Error::Shape(format!("layer {layer}")))?;
    Centers::philox(
        shape.height(),
        shape.width(),
        plan.num_centers(layer),
        seed,
        STEP,
        index,
    )
}

/// `(q, k)` pairs of raw tensors as kernel buffers.
fn bufs(pairs: &[[Raw; 2]]) -> Vec<(Buf, Buf)> {
    pairs.iter().map(|[q, k]| (q.buf(), k.buf())).collect()
}

/// The forward: every layer's difference rows of both sides into `rows` (`(B, 8N, C)` of `T`).
pub(crate) struct Forward {
    pub(crate) plan: SampledRowsPlan,
    /// `(feat_q, feat_k)` of each layer.
    pub(crate) feats: Vec<[Raw; 2]>,
    /// `(rows_q, rows_k)` of each layer, written.
    pub(crate) rows: Vec<[Raw; 2]>,
    /// On CUDA the workspace, its counters holding the seed; on the CPU the seed.
    pub(crate) workspace: Raw,
}

impl Forward {
    fn check_layers(&self) -> Result<()> {
        check_len("feature maps (layers)", self.plan.len(), self.feats.len())?;
        check_len("difference rows (layers)", self.plan.len(), self.rows.len())
    }
}

impl Op for Forward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        self.check_layers()?;
        // SAFETY: host tensors of the named types (the caller's contract).
        unsafe {
            let seed = host_seed(self.workspace)?;
            for (l, (feats, rows)) in self.feats.iter().zip(&self.rows).enumerate() {
                let centers = host_centers(&self.plan, seed, l)?;
                for (feat, out) in feats.iter().zip(rows) {
                    diff_host(
                        self.plan.shape(l),
                        &centers,
                        feat.host::<T>(),
                        out.host_mut::<T>(),
                    )?;
                }
            }
        }
        Ok(())
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        self.check_layers()?;
        let ws = device_workspace(&self.plan, self.workspace)?;
        self.plan
            .gather::<T, _>(launcher, &bufs(&self.feats), &bufs(&self.rows), &ws)
    }
}

/// The backward: adds the scatter of each layer's row gradients into its feature-map
/// gradients, `q`'s and, when given, `k`'s.
pub(crate) struct Backward {
    pub(crate) plan: SampledRowsPlan,
    pub(crate) workspace: Raw,
    /// On CUDA `float32[1]` holding 1 (the scatter's factor); unread on the CPU.
    pub(crate) one: Raw,
    /// Each layer's `(B, 8N, C)` row gradients: float32 on CUDA, of `T` on the CPU.
    pub(crate) grad_rows: (Vec<Raw>, Option<Vec<Raw>>),
    /// Each layer's feature-map gradients (`T`), accumulated into.
    pub(crate) grad_feats: (Vec<Raw>, Option<Vec<Raw>>),
}

impl Backward {
    /// Each side's `(row gradients, feature gradients)` per layer, checked to hold a layer each.
    fn sides(&self) -> Result<Vec<Vec<(Raw, Raw)>>> {
        let (rows, feats) = (&self.grad_rows, &self.grad_feats);
        if rows.1.is_some() != feats.1.is_some() {
            return Err(Error::Shape(
                "the k side needs both its row gradients and its feature gradients".into(),
            ));
        }
        let pairs = [
            (Some(&rows.0), Some(&feats.0)),
            (rows.1.as_ref(), feats.1.as_ref()),
        ];
        pairs
            .into_iter()
            .filter_map(|(r, f)| r.zip(f))
            .map(|(r, f)| {
                check_len("row gradients (layers)", self.plan.len(), r.len())?;
                check_len("feature gradients (layers)", self.plan.len(), f.len())?;
                Ok(r.iter().copied().zip(f.iter().copied()).collect())
            })
            .collect()
    }
}

impl Op for Backward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        let sides = self.sides()?;
        // SAFETY: host tensors of the named types (the caller's contract).
        unsafe {
            let seed = host_seed(self.workspace)?;
            for l in 0..self.plan.len() {
                let centers = host_centers(&self.plan, seed, l)?;
                for side in &sides {
                    let (rows, feat) = side[l];
                    let shape = self.plan.shape(l);
                    diff_backward_host(shape, &centers, rows.host::<T>(), feat.host_mut::<T>())?;
                }
            }
        }
        Ok(())
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let sides: Vec<Vec<ScatterSide>> = self
            .sides()?
            .into_iter()
            .map(|side| {
                side.into_iter()
                    .map(|(rows, feat)| ScatterSide {
                        grad_rows: rows.buf(),
                        grad_feat: feat.buf(),
                    })
                    .collect()
            })
            .collect();
        let ws = device_workspace(&self.plan, self.workspace)?;
        self.plan.scatter::<T, _>(
            launcher,
            &ws,
            self.one.buf(),
            &sides[0],
            sides.get(1).map(Vec::as_slice),
        )
    }
}

/// Where a CUDA workspace's parts lie in its byte tensor: its bytes, the counters' byte offset,
/// and the centre maps' `(byte offset, entries)`.
type WorkspaceLayout = (usize, usize, (usize, usize));

/// The CUDA workspace of `sampled_neighbor_diff` for maps of `shapes`: `(bytes, counters' byte
/// offset, (maps' byte offset, entries))`. The package allocates the bytes zeroed, fills the
/// maps with -1 (no centre yet) and writes the seed into the counters' first two words.
#[pyfunction]
pub(crate) fn sampled_layout(shapes: Vec<Shape>, num_s: usize) -> PyResult<WorkspaceLayout> {
    let plan = plan(&shapes, num_s).map_err(to_py)?;
    let (ws, bytes) = carve(&plan, 0).map_err(to_py)?;
    Ok((
        bytes,
        ws.counters.addr as usize,
        (ws.maps.addr as usize, ws.maps.len),
    ))
}

/// The rows per image, `S = 8N`, each layer of `shapes` takes with `num_s` centres asked for;
/// an error when the layers cannot take the sampled path (an `S` past 512, too many layers).
#[pyfunction]
pub(crate) fn sampled_rows(shapes: Vec<Shape>, num_s: usize) -> PyResult<Vec<usize>> {
    let plan = plan(&shapes, num_s).map_err(to_py)?;
    Ok((0..plan.len()).map(|l| plan.rows_shape(l).rows()).collect())
}

/// The forward of `sampled_neighbor_diff`.
#[pyfunction]
pub(crate) fn sampled_forward(
    py: Python<'_>,
    target: Target,
    shapes: Vec<Shape>,
    num_s: usize,
    feats: Vec<[Raw; 2]>,
    rows: Vec<[Raw; 2]>,
    workspace: Raw,
) -> PyResult<()> {
    run(py, target, || {
        Ok(Forward {
            plan: plan(&shapes, num_s)?,
            feats,
            rows,
            workspace,
        })
    })
}

/// The backward of `sampled_neighbor_diff`: adds into `grad_feats` `(q's, k's or None)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub(crate) fn sampled_backward(
    py: Python<'_>,
    target: Target,
    shapes: Vec<Shape>,
    num_s: usize,
    workspace: Raw,
    one: Raw,
    grad_rows: (Vec<Raw>, Option<Vec<Raw>>),
    grad_feats: (Vec<Raw>, Option<Vec<Raw>>),
) -> PyResult<()> {
    run(py, target, || {
        Ok(Backward {
            plan: plan(&shapes, num_s)?,
            workspace,
            one,
            grad_rows,
            grad_feats,
        })
    })
}
