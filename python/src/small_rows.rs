//! The rows loss of learned heads on the small-S path (`ccpl.rows_loss` and
//! `ccpl.rows_loss_sum` on CUDA, every `S <= 512`): forward and backward, one layer or several.
//!
//! The crate's [`SmallRowsPlan`] over every layer, as [`ccpl::cuda::CcpRows`] runs one: one
//! launch forward, which leaves every layer's loss, their sum and the gradients of the `q`
//! rows (for an upstream gradient of 1) in the workspace; one launch backward that scales
//! those gradients by the upstream gradient into one buffer (the layers one after another),
//! one more for the `k` rows'. The workspace is one byte tensor the package allocates and
//! autograd keeps, carved here ([`carve`]): the launch's counters first (zeroed by the
//! package), then the plan's float32 buffers. There is no CPU half: on the CPU the package
//! runs `rows_loss`'s float64 reference per layer.

use ccpl::launch::{Buf, Launcher, small_s};
use ccpl::loss::small_s::{SmallRowsPlan, SmallRowsWorkspace};
use ccpl::{Dtype, Result, RowShape, Tau, check_len};
use pyo3::prelude::*;

use crate::carve::Carver;
use crate::op::{Op, Target, run};
use crate::{HostDtype, Raw, small_s_on_host, to_py};

/// The plan's workspace laid out in one byte buffer at `base`: the counters
/// (`int32[COUNTERS]`, zero before the forward), then the plan's float32 buffers; and the
/// bytes it spans.
pub fn carve(
    plan: &SmallRowsPlan,
    base: u64,
) -> Result<(Buf, SmallRowsWorkspace<Buf, Buf>, usize)> {
    let carver = Carver::new(base);
    let counters = carver.place(4)(&small_s::COUNTERS)?;
    let ws = plan
        .workspace()?
        .try_map(carver.place(4), carver.place(4))?;
    Ok((counters, ws, carver.bytes()))
}

/// The counters and workspace of `plan` over the caller's byte tensor, checked to span it.
fn workspace(plan: &SmallRowsPlan, workspace: Raw) -> Result<(Buf, SmallRowsWorkspace<Buf, Buf>)> {
    let (counters, ws, bytes) = carve(plan, workspace.0)?;
    check_len("small-S rows workspace (bytes)", bytes, workspace.1)?;
    Ok((counters, ws))
}

/// The forward: the sum of the layers' losses into `loss` (one float32), and in the workspace
/// the gradients of the `q` rows and what the `k` side's backward reads. One launch.
pub(crate) struct Forward {
    pub(crate) plan: SmallRowsPlan,
    /// `(q, k)` of each layer, `(B, S, C)` of `T`.
    pub(crate) rows: Vec<[Raw; 2]>,
    /// Bytes laid out by [`carve`], the counters zero.
    pub(crate) workspace: Raw,
    /// One float32.
    pub(crate) loss: Raw,
}

impl Op for Forward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        Err(small_s_on_host("rows loss"))
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let (counters, mut ws) = workspace(&self.plan, self.workspace)?;
        // The loss is the caller's tensor, not the workspace's.
        ws.loss = self.loss.buf();
        let rows: Vec<_> = self.rows.iter().map(|[q, k]| (q.buf(), k.buf())).collect();
        self.plan
            .forward_layers::<T, _>(launcher, &rows, &ws, counters)
    }
}

/// The backward: WRITES `upstream[0]` (float32) times the gradient of every layer's `q` rows
/// into `grads.0` (the layers one after another, [`SmallRowsPlan::total_len`] elements), and
/// of the `k` rows into `grads.1` when given. One launch (two with `k`).
pub(crate) struct Backward {
    pub(crate) plan: SmallRowsPlan,
    /// The forward's workspace.
    pub(crate) workspace: Raw,
    /// One float32.
    pub(crate) upstream: Raw,
    /// `(grad_q, grad_k or None)`, of `T`.
    pub(crate) grads: (Raw, Option<Raw>),
}

impl Op for Backward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        Err(small_s_on_host("rows loss"))
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let (_, ws) = workspace(&self.plan, self.workspace)?;
        let (grad_q, grad_k) = (self.grads.0.buf(), self.grads.1.map(Raw::buf));
        let upstream = Some(self.upstream.buf());
        self.plan
            .backward::<T, _>(launcher, &ws, upstream, grad_q, grad_k)
    }
}

/// Every layer's `(B, S, C)` and tau as Python passes them: `([(B, S, C), ...], tau)`.
#[derive(Debug, Clone, FromPyObject)]
pub struct LayersArgs(Vec<(usize, usize, usize)>, f64);

impl LayersArgs {
    /// The plan of the checked shapes and tau.
    pub fn plan(&self) -> Result<SmallRowsPlan> {
        let shapes = self
            .0
            .iter()
            .map(|&(b, s, c)| RowShape::new(b, s, c))
            .collect::<Result<Vec<_>>>()?;
        SmallRowsPlan::layers(&shapes, Tau::new(self.1)?)
    }
}

/// The workspace of the small-S rows loss of the layers: `(bytes, counters' bytes)`, the
/// counters first. The package allocates the bytes and zeroes the counters.
#[pyfunction]
pub(crate) fn small_rows_layout(args: LayersArgs) -> PyResult<(usize, usize)> {
    let plan = args.plan().map_err(to_py)?;
    let (counters, _, bytes) = carve(&plan, 0).map_err(to_py)?;
    Ok((bytes, counters.addr as usize + 4 * counters.len))
}

/// The forward of the small-S rows loss.
#[pyfunction]
pub(crate) fn small_rows_forward(
    py: Python<'_>,
    target: Target,
    args: LayersArgs,
    rows: Vec<[Raw; 2]>,
    workspace: Raw,
    loss: Raw,
) -> PyResult<()> {
    run(py, target, || {
        Ok(Forward {
            plan: args.plan()?,
            rows,
            workspace,
            loss,
        })
    })
}

/// The backward of the small-S rows loss: writes `grads` `(grad_q, grad_k or None)`, each
/// every layer's gradient one after another.
#[pyfunction]
pub(crate) fn small_rows_backward(
    py: Python<'_>,
    target: Target,
    args: LayersArgs,
    workspace: Raw,
    upstream: Raw,
    grads: (Raw, Option<Raw>),
) -> PyResult<()> {
    run(py, target, || {
        Ok(Backward {
            plan: args.plan()?,
            workspace,
            upstream,
            grads,
        })
    })
}
