//! The CCP loss of two row matrices on the GPU, for frameworks with a learned projection head
//! (spec step 4): the caller gives the head's outputs for the generated and the content
//! image, `(B, S, C')`, and gets the loss on the device and the gradient with respect to
//! those rows. Up to `S = 512` the small-S path ([`crate::loss::small_s::SmallRowsPlan`]):
//! the forward is one launch that leaves the loss and the gradient of the rows, the backward
//! scales it; above, [`crate::loss::rows`]'s fused path (normalisation, fused InfoNCE: memory
//! `O(B*S*C')`, no `(B, S, S)` logits).

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};

use super::resident::{Resident, alloc, length};
use super::{CudaLauncher, Kernels};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::launch::small_s;
use crate::launch::{Buf, Launcher};
use crate::loss::rows::{RowsPlan, RowsWorkspace};
use crate::loss::small_s::{SmallRowsPlan, SmallRowsWorkspace};
use crate::shape::RowShape;
use crate::tau::Tau;

/// The rows loss on one stream with its workspace, allocated once by [`new`](Self::new),
/// reused by every step. `T` is the storage type of the rows (`f32`, `f16` or `bf16`).
///
/// Up to `S = 512` rows per image the forward is one launch (normalisation, logits,
/// cross-entropy, and the gradient of the generated side's rows, in float) and the backward
/// one more (the gradient times the upstream gradient, rounded to `T`), plus one when the
/// content side's gradient is asked for; the workspace holds float copies of both row
/// matrices and their gradients. Above, the fused path: the normalised rows of both sides
/// and their norms, the row statistics; the `(B, S, S)` logits are never stored.
///
/// ```no_run
/// use ccpl::cuda::{self, CcpRows, Kernels};
/// use ccpl::RowShape;
/// # fn main() -> ccpl::Result<()> {
/// let ctx = cuda::context(0)?;
/// let kernels = Kernels::for_context(&ctx)?;
/// let stream = ctx.default_stream();
/// let shape = RowShape::new(8, 8192, 128)?; // B images, S rows of the head's C' outputs
/// let mut loss = CcpRows::<half::bf16>::new(kernels, stream.clone(), shape, ccpl::Tau::DEFAULT)?;
///
/// let rows_q = stream.alloc_zeros::<half::bf16>(shape.len())?; // head(generated) rows
/// let rows_k = stream.alloc_zeros::<half::bf16>(shape.len())?; // head(content) rows
/// let mut grad_q = stream.alloc_zeros::<half::bf16>(shape.len())?;
/// loss.forward(&rows_q, &rows_k)?;
/// loss.backward(None, &mut grad_q, None)?; // grad_q = dloss/drows_q (written)
/// let value = stream.clone_dtoh(loss.loss())?; // the only wait on the host
/// # let _ = value; Ok(()) }
/// ```
#[derive(Debug)]
pub struct CcpRows<T: Dtype> {
    path: Path<T>,
}

/// The small-S path (with the count of finished blocks its forward keeps), or the fused one.
#[derive(Debug)]
enum Path<T: Dtype> {
    Small {
        /// Boxed: room for every layer's shape, though this loss has one.
        plan: Box<SmallRowsPlan>,
        resident: Resident<SmallRowsWorkspace<CudaSlice<f32>, CudaSlice<f32>>>,
        counters: CudaSlice<i32>,
    },
    Fused {
        plan: RowsPlan,
        resident: Resident<RowsWorkspace<CudaSlice<T>, CudaSlice<f32>>>,
    },
}

impl<T: Dtype> CcpRows<T> {
    /// The loss of row matrices of `shape` at temperature `tau`; allocates its workspace on
    /// `stream`.
    pub fn new(
        kernels: Arc<Kernels>,
        stream: Arc<CudaStream>,
        shape: RowShape,
        tau: Tau,
    ) -> Result<Self> {
        let path = if small_s::takes(shape.rows()) {
            let plan = SmallRowsPlan::new(shape, tau)?;
            let workspace = plan
                .workspace()?
                .try_map(alloc::<f32>(&stream), alloc::<f32>(&stream))?;
            Path::Small {
                plan: Box::new(plan),
                counters: stream.alloc_zeros::<i32>(small_s::COUNTERS)?,
                resident: Resident::new(kernels, stream, workspace, |ws| &mut ws.one)?,
            }
        } else {
            let plan = RowsPlan::new(shape, tau)?;
            let workspace = RowsWorkspace::lengths(&shape)?
                .try_map(alloc::<T>(&stream), alloc::<f32>(&stream))?;
            Path::Fused {
                plan,
                resident: Resident::new(kernels, stream, workspace, |ws| &mut ws.one)?,
            }
        };
        Ok(Self { path })
    }

    /// Shape of the rows, `(B, S, C)`.
    pub fn shape(&self) -> &RowShape {
        match &self.path {
            Path::Small { plan, .. } => &plan.shapes()[0],
            Path::Fused { plan, .. } => plan.shape(),
        }
    }

    /// Temperature.
    pub fn tau(&self) -> Tau {
        match &self.path {
            Path::Small { plan, .. } => plan.tau(),
            Path::Fused { plan, .. } => plan.tau(),
        }
    }

    /// Whether the loss runs on the small-S path (`S` at most 512).
    pub fn is_small(&self) -> bool {
        matches!(self.path, Path::Small { .. })
    }

    /// The bytes of device memory [`new`](Self::new) allocates for rows of `shape`, without
    /// allocating: up to `S = 512` the small-S path's workspace (float32 copies of both row
    /// matrices and their gradients, the row statistics, one float per block of the forward
    /// launch) and its launch counters; above, the fused path's workspace (three row matrices
    /// in `T`, four `B*S` float32 statistics). What [`workspace_bytes`](Self::workspace_bytes)
    /// then counts.
    pub fn workspace_bytes_for(shape: &RowShape) -> Result<usize> {
        Ok(if small_s::takes(shape.rows()) {
            SmallRowsWorkspace::lengths(&[*shape])?.bytes::<f32>()
                + small_s::COUNTERS * size_of::<i32>()
        } else {
            RowsWorkspace::lengths(shape)?.bytes::<T>()
        })
    }

    /// The bytes of device memory this object holds, counted from its buffers: its workspace
    /// and, on the small-S path, its launch counters (the gradients are the caller's).
    pub fn workspace_bytes(&self) -> usize {
        match &self.path {
            Path::Small {
                resident, counters, ..
            } => {
                let Ok(lengths) = resident.workspace().try_map(length, length);
                lengths.bytes::<f32>() + counters.len() * size_of::<i32>()
            }
            Path::Fused { resident, .. } => {
                let Ok(lengths) = resident.workspace().try_map(length, length);
                lengths.bytes::<T>()
            }
        }
    }

    /// The forward on `rows_q` (the head's rows of the generated image) and `rows_k` (of the
    /// content image), both `(B, S, C)`; only the forward reads them (the backward works from
    /// the normalised rows it keeps), so the caller may reuse them as soon as this returns
    /// (stream order). The loss stays on the device: [`loss`](Self::loss). Nothing is
    /// allocated and nothing waits. A call that returns an error before enqueuing leaves
    /// the object as it was: the last forward's backward still runs.
    pub fn forward(
        &mut self,
        rows_q: &impl DevicePtr<T>,
        rows_k: &impl DevicePtr<T>,
    ) -> Result<()> {
        match &mut self.path {
            Path::Small {
                plan,
                resident,
                counters,
            } => {
                let (launcher, ws, forward_done) = resident.forward_parts()?;
                let (rows_q, rows_k) = (launcher.read(rows_q), launcher.read(rows_k));
                let counters = launcher.write(counters);
                let bufs = ws.map_mut(|s| launcher.write(s), |s| launcher.write(s));
                let plan = plan.forward_plan::<T>(&[(rows_q, rows_k)], &bufs, counters)?;
                *forward_done = false;
                launcher.launch(&plan)?;
                *forward_done = true;
            }
            Path::Fused { plan, resident } => {
                let (launcher, ws, forward_done) = resident.forward_parts()?;
                let (rows_q, rows_k) = (launcher.read(rows_q), launcher.read(rows_k));
                let bufs = ws.map_mut(|s| launcher.write(s), |s| launcher.write(s));
                let plans = plan.forward_plans::<T>(rows_q, rows_k, &bufs)?;
                *forward_done = false;
                plans.launch(&launcher)?;
                *forward_done = true;
            }
        }
        Ok(())
    }

    /// The loss of the last forward: one float32 on the device.
    pub fn loss(&self) -> &CudaSlice<f32> {
        match &self.path {
            Path::Small { resident, .. } => &resident.workspace().loss,
            Path::Fused { resident, .. } => &resident.workspace().loss,
        }
    }

    /// The backward of the last forward: WRITES (does not accumulate) `upstream[0]` (one
    /// float32 on the device, `1.0` when `None`) times the gradient of the loss with respect
    /// to `rows_q` into `grad_rows_q`, and with respect to `rows_k` into `grad_rows_k` when
    /// given (the original detaches the content side). A framework hands these to the head's
    /// backward. Nothing is allocated and nothing waits.
    pub fn backward<G: DevicePtrMut<T>>(
        &mut self,
        upstream: Option<&CudaView<'_, f32>>,
        grad_rows_q: &mut G,
        grad_rows_k: Option<&mut G>,
    ) -> Result<()> {
        match &mut self.path {
            Path::Small { plan, resident, .. } => {
                let (launcher, ws) = resident.backward()?;
                let bufs = ws.map_mut(|s| launcher.write(s), |s| launcher.write(s));
                let (upstream, q, k) = caller_grads(&launcher, upstream, grad_rows_q, grad_rows_k);
                plan.backward::<T, _>(&launcher, &bufs, upstream, q, k)
            }
            Path::Fused { plan, resident } => {
                let (launcher, ws) = resident.backward()?;
                let bufs = ws.map_mut(|s| launcher.write(s), |s| launcher.write(s));
                let (upstream, q, k) = caller_grads(&launcher, upstream, grad_rows_q, grad_rows_k);
                plan.backward::<T, _>(&launcher, &bufs, upstream, q, k)
            }
        }
    }
}

/// The caller's buffers of a backward as its launches take them: the upstream gradient it
/// reads and the gradients of the two sides it writes, their guards kept by `launcher`.
fn caller_grads<'a, T, G: DevicePtrMut<T>>(
    launcher: &CudaLauncher<'a>,
    upstream: Option<&'a CudaView<'_, f32>>,
    grad_rows_q: &'a mut G,
    grad_rows_k: Option<&'a mut G>,
) -> (Option<Buf>, Buf, Option<Buf>) {
    (
        upstream.map(|u| launcher.read(u)),
        launcher.write(grad_rows_q),
        grad_rows_k.map(|g| launcher.write(g)),
    )
}
