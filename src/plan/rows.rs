//! The CCP loss of two row matrices `(B, S, C')`, for frameworks with a learned projection
//! head (spec step 4): the rows are the head's outputs, the gradient goes back to them.
//! Normalisation of both, the fused InfoNCE (`kernels/info_nce_fused.cu`: the `(B, S, S)`
//! logits never exist, memory is `O(B*S*C')`), the mean on the device; and the backward
//! through the InfoNCE and the normalisation. The per-layer loss
//! ([`LayerPlan`](super::layer::LayerPlan)) is this between its neighbour differences and
//! their scatter. Generic over the [`Launcher`], like every plan sequence.

use super::info_nce::{self, Side};
use super::info_nce_fused;
use super::normalize;
use super::{Buf, LaunchPlan, Launcher, inv_tau, row_count, tile_grid, workspace};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::ffi;
use crate::shape::RowShape;

workspace! {
    /// The workspace of the rows loss: the rows the forward reads, what it computes and the
    /// backward reads, and the backward's scratch. Generic over what holds a buffer: `R` for
    /// rows in the storage type `T`, `F` for float32 statistics (device slices for an owner,
    /// [`Buf`]s for the plans, and lengths from [`RowsWorkspace::lengths`]).
    pub struct RowsWorkspace {
        rows {
            /// The rows of the generated image (`q` before normalisation), `(B, S, C)`: the
            /// forward's input, read again by the backward.
            rows_q,
            /// The rows of the content image (`k` before normalisation), `(B, S, C)`.
            rows_k,
            /// Normalised `rows_q` (`q`), `(B, S, C)`.
            unit_q,
            /// Normalised `rows_k` (`k`), `(B, S, C)`.
            unit_k,
            /// Backward scratch: the gradient of the normalised rows of one side, `(B, S, C)`.
            grad_unit,
        }
        stats {
            /// Norms of `rows_q`, `B*S`.
            norms_q,
            /// Norms of `rows_k`, `B*S`.
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
        nested {}
    }
}

impl RowsWorkspace<usize, usize> {
    /// The length in elements of every buffer for rows of `shape`.
    pub fn lengths(shape: &RowShape) -> Result<Self> {
        let (elements, stats) = (shape.len(), row_count(shape)?);
        Ok(Self {
            rows_q: elements,
            rows_k: elements,
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
    tau: f64,
}

impl RowsPlan {
    /// The loss of row matrices of `shape` at temperature `tau`.
    pub fn new(shape: RowShape, tau: f64) -> Result<Self> {
        inv_tau(tau)?;
        row_count(&shape)?;
        tile_grid(shape.batch(), shape.rows(), shape.width())?;
        Ok(Self { shape, tau })
    }
    /// Shape of the rows, `(B, S, C)`.
    pub fn shape(&self) -> &RowShape {
        &self.shape
    }
    /// Temperature.
    pub fn tau(&self) -> f64 {
        self.tau
    }

    /// The forward of the rows in `ws.rows_q` and `ws.rows_k`: writes every buffer of `ws`
    /// the backward reads, and `ws.loss`. Every plan is made (and so every buffer checked)
    /// before the first launch.
    pub fn forward<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        ws: &RowsWorkspace<Buf, Buf>,
    ) -> Result<(), L::Error> {
        self.forward_plans::<T>(ws)?.launch(launcher)
    }

    /// The backward after [`forward`](Self::forward) with the same `ws` (its `rows_q` and
    /// `rows_k` unchanged): WRITES (does not accumulate) `upstream[0]` (one float32 on the
    /// device; `ws.one` when `None`) times the gradient of the loss with respect to the rows
    /// into `grad_rows_q`, and into `grad_rows_k` when given. Every plan is made before the
    /// first launch.
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
        let k = match grad_rows_k {
            Some(grad) => Some(self.side_plans::<T>(ws, upstream, Side::K, grad)?),
            None => None,
        };
        for side in std::iter::once(q).chain(k) {
            side.launch(launcher)?;
        }
        Ok(())
    }

    /// The forward's plans, checked, not launched.
    pub(crate) fn forward_plans<T: Dtype>(
        &self,
        ws: &RowsWorkspace<Buf, Buf>,
    ) -> Result<RowsForward> {
        let shape = &self.shape;
        Ok(RowsForward {
            norm_q: normalize::normalize_rows::<T>(shape, ws.rows_q, ws.unit_q, ws.norms_q)?,
            norm_k: normalize::normalize_rows::<T>(shape, ws.rows_k, ws.unit_k, ws.norms_k)?,
            info_nce: info_nce_fused::info_nce_fused_forward::<T>(
                shape,
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
        let (rows, norms) = match side {
            Side::Q => (ws.rows_q, ws.norms_q),
            Side::K => (ws.rows_k, ws.norms_k),
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
            normalize: normalize::normalize_rows_backward::<T>(
                shape,
                rows,
                norms,
                ws.grad_unit,
                grad_rows,
            )?,
        })
    }
}

/// The forward: both normalisations, the fused InfoNCE, the mean.
pub(crate) struct RowsForward {
    norm_q: LaunchPlan<ffi::ccpl_normalize_rows_params>,
    norm_k: LaunchPlan<ffi::ccpl_normalize_rows_params>,
    info_nce: LaunchPlan<ffi::ccpl_info_nce_fused_forward_params>,
    mean: LaunchPlan<ffi::ccpl_info_nce_loss_params>,
}

impl RowsForward {
    pub(crate) fn launch<L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        launcher.launch(&self.norm_q)?;
        launcher.launch(&self.norm_k)?;
        launcher.launch(&self.info_nce)?;
        launcher.launch(&self.mean)
    }
}

/// The backward of one side: into the normalised rows, through the normalisation.
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
