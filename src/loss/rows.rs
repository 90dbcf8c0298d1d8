//! The CCP loss of two row matrices `(B, S, C')`, for frameworks with a learned projection
//! head (spec step 4): the rows are the head's outputs, the gradient goes back to them.
//! Normalisation of both, the fused InfoNCE (`kernels/info_nce_fused.cu`: the `(B, S, S)`
//! logits never exist, memory is `O(B*S*C')`), the mean on the device; and the backward
//! through the InfoNCE and the normalisation, from the normalised rows and their norms (the
//! input rows are not kept). The per-layer loss
//! ([`LayerPlan`](super::layer::LayerPlan)) is this between its neighbour differences and
//! their scatter. Generic over the [`Launcher`], like every plan sequence.

use super::workspace;
use crate::dtype::Dtype;
use crate::error::{Result, check_len};
use crate::ffi;
use crate::launch::info_nce::{self, Side};
use crate::launch::{
    Buf, KernelParams, LaunchPlan, Launcher, info_nce_fused, normalize, row_count, tile_grid,
};
use crate::shape::RowShape;
use crate::tau::Tau;

workspace! {
    /// The workspace of the rows loss: what the forward computes and the backward reads, and
    /// the backward's scratch; the input rows stay the caller's (the forward reads them, the
    /// backward does not). Generic over what holds a buffer: `R` for rows in the storage
    /// type `T`, `F` for float32 statistics (device slices for an owner, [`Buf`]s for the
    /// plans, and lengths from [`RowsWorkspace::lengths`]).
    pub struct RowsWorkspace<R, F> {
        rows {
            /// The normalised rows of the generated image (`q`), `(B, S, C)`.
            unit_q,
            /// The normalised rows of the content image (`k`), `(B, S, C)`.
            unit_k,
            /// Backward scratch: the gradient of the normalised rows of one side, `(B, S, C)`.
            grad_unit,
        }
        stats {
            /// Norms of the rows of `q`, `B*S`.
            norms_q,
            /// Norms of the rows of `k`, `B*S`.
            norms_k,
            /// Row logsumexp of the logits, `B*S`.
            row_lse,
            /// Row losses, `B*S`.
            row_loss,
            /// The loss, one value.
            loss,
            /// One value, `1.0`: the upstream gradient when the caller gives none. Its owner
            /// sets it once.
            one,
        }
        parts {}
    }
}

impl RowsWorkspace<usize, usize> {
    /// The length in elements of every buffer for rows of `shape`.
    pub fn lengths(shape: &RowShape) -> Result<Self> {
        let (elements, stats) = (shape.len(), row_count(shape)?);
        Ok(Self {
            unit_q: elements,
            unit_k: elements,
            grad_unit: elements,
            norms_q: stats,
            norms_k: stats,
            row_lse: stats,
            row_loss: stats,
            loss: 1,
            one: 1,
        })
    }
}

/// The rows loss of one shape and temperature, validated once. Its forward and backward
/// validate every buffer, then launch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowsPlan {
    shape: RowShape,
    tau: Tau,
}

impl RowsPlan {
    /// The loss of row matrices of `shape` at temperature `tau`.
    pub fn new(shape: RowShape, tau: Tau) -> Result<Self> {
        row_count(&shape)?;
        tile_grid(shape.batch(), shape.rows(), shape.width())?;
        Ok(Self { shape, tau })
    }
    /// Shape of the rows, `(B, S, C)`.
    pub fn shape(&self) -> &RowShape {
        &self.shape
    }
    /// Temperature.
    pub fn tau(&self) -> Tau {
        self.tau
    }

    /// The forward of the rows `rows_q` and `rows_k` (`(B, S, C)` each, read by the forward
    /// only): writes every buffer of `ws` the backward reads, and `ws.loss`. Every plan is
    /// made (and so every buffer checked) before the first launch.
    pub fn forward<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        rows_q: Buf,
        rows_k: Buf,
        ws: &RowsWorkspace<Buf, Buf>,
    ) -> Result<(), L::Error> {
        self.forward_plans::<T>(rows_q, rows_k, ws)?
            .launch(launcher)
    }

    /// The backward after [`forward`](Self::forward) with the same `ws`: WRITES (does not
    /// accumulate) `upstream[0]` (one float32 on the device; `ws.one` when `None`) times the
    /// gradient of the loss with respect to the rows into `grad_rows_q`, and into
    /// `grad_rows_k` when given. Every plan is made before the first launch.
    pub fn backward<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        ws: &RowsWorkspace<Buf, Buf>,
        upstream: Option<Buf>,
        grad_rows_q: Buf,
        grad_rows_k: Option<Buf>,
    ) -> Result<(), L::Error> {
        let upstream = upstream.unwrap_or(ws.one);
        let q = self.side_plans::<T>(ws, upstream, Side::Q, grad_rows_q)?;
        let k = grad_rows_k
            .map(|grad| self.side_plans::<T>(ws, upstream, Side::K, grad))
            .transpose()?;
        for side in std::iter::once(q).chain(k) {
            side.launch(launcher)?;
        }
        Ok(())
    }

    /// The forward's plans, checked, not launched.
    pub(crate) fn forward_plans<T: Dtype>(
        &self,
        rows_q: Buf,
        rows_k: Buf,
        ws: &RowsWorkspace<Buf, Buf>,
    ) -> Result<RowsForward> {
        let shape = &self.shape;
        check_len("rows_q", shape.len(), rows_q.len)?;
        check_len("rows_k", shape.len(), rows_k.len)?;
        Ok(RowsForward {
            unit_q: normalize::normalize_rows::<T>(shape, rows_q, ws.unit_q, ws.norms_q)?,
            unit_k: normalize::normalize_rows::<T>(shape, rows_k, ws.unit_k, ws.norms_k)?,
            loss: self.loss_plans::<T>(ws)?,
        })
    }

    /// The plans from the normalised rows and norms in `ws` on: the fused InfoNCE and the
    /// mean. Checked, not launched.
    pub(crate) fn loss_plans<T: Dtype>(&self, ws: &RowsWorkspace<Buf, Buf>) -> Result<LossPlans> {
        Ok(LossPlans {
            info_nce: info_nce_fused::info_nce_fused_forward::<T>(
                &self.shape,
                self.tau,
                ws.unit_q,
                ws.unit_k,
                ws.row_lse,
                ws.row_loss,
            )?,
            mean: info_nce::info_nce_loss(ws.row_loss, ws.loss, false)?,
        })
    }

    /// The backward's plans of one side into `grad_rows`, checked, not launched.
    pub(crate) fn side_plans<T: Dtype>(
        &self,
        ws: &RowsWorkspace<Buf, Buf>,
        upstream: Buf,
        side: Side,
        grad_rows: Buf,
    ) -> Result<RowsSide> {
        let (unit, norms) = match side {
            Side::Q => (ws.unit_q, ws.norms_q),
            Side::K => (ws.unit_k, ws.norms_k),
        };
        let shape = &self.shape;
        Ok(RowsSide {
            info_nce: info_nce_fused::info_nce_fused_backward::<T>(
                shape,
                self.tau,
                side,
                ws.unit_q,
                ws.unit_k,
                ws.row_lse,
                ws.row_loss,
                upstream,
                ws.grad_unit,
            )?,
            normalize: normalize::normalize_rows_backward_normalized::<T>(
                shape,
                unit,
                norms,
                ws.grad_unit,
                grad_rows,
            )?,
        })
    }
}

/// A forward: each side's normalised rows (`P` the kernel that makes them from that side's
/// input), then the loss of the two.
pub(crate) struct ForwardPlans<P> {
    pub(crate) unit_q: LaunchPlan<P>,
    pub(crate) unit_k: LaunchPlan<P>,
    pub(crate) loss: LossPlans,
}

impl<P: KernelParams> ForwardPlans<P> {
    pub(crate) fn launch<L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        launcher.launch(&self.unit_q)?;
        launcher.launch(&self.unit_k)?;
        self.loss.launch(launcher)
    }
}

/// The forward of rows: both normalisations, then the loss.
pub(crate) type RowsForward = ForwardPlans<ffi::ccpl_normalize_rows_params>;

/// The loss of normalised rows: the fused InfoNCE, the mean.
pub(crate) struct LossPlans {
    info_nce: LaunchPlan<ffi::ccpl_info_nce_fused_forward_params>,
    mean: LaunchPlan<ffi::ccpl_info_nce_loss_params>,
}

impl LossPlans {
    pub(crate) fn launch<L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        launcher.launch(&self.info_nce)?;
        launcher.launch(&self.mean)
    }
}

/// The backward of one side: into the normalised rows, through the normalisation (from the
/// normalised rows and norms the forward kept).
pub(crate) struct RowsSide {
    info_nce: LaunchPlan<ffi::ccpl_info_nce_fused_backward_params>,
    normalize: LaunchPlan<ffi::ccpl_normalize_rows_backward_params>,
}

impl RowsSide {
    pub(crate) fn launch<L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        launcher.launch(&self.info_nce)?;
        launcher.launch(&self.normalize)
    }
}
