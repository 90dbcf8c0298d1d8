//! The CCP loss of two row matrices `(B, S, C')`, for frameworks with a learned projection
//! head (spec step 4): the rows are the head's outputs, the gradient goes back to them.
//! Normalisation of both, the fused InfoNCE (`kernels/info_nce_fused.cu`: the `(B, S, S)`
//! logits never exist, memory is `O(B*S*C')`), the mean on the device; and the backward
//! through the InfoNCE and the normalisation. The per-layer loss
//! ([`LayerPlan`](super::loss::LayerPlan)) is this between its neighbour differences and
//! their scatter. Generic over the [`Launcher`], like every plan sequence.

use super::info_nce::{self, Side};
use super::info_nce_fused;
use super::normalize;
use super::{Buf, LaunchPlan, Launcher, inv_tau, row_count, tile_grid};
use crate::dtype::Dtype;
use crate::error::Result;
use crate::ffi;
use crate::shape::RowShape;

/// The workspace of the rows loss: the rows the forward reads, what it computes and the
/// backward reads, and the backward's scratch. Generic over what holds a buffer: `R` for rows
/// in the storage type `T`, `F` for float32 statistics (device slices for an owner, [`Buf`]s
/// for the plans, and lengths from [`RowsWorkspace::lengths`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RowsWorkspace<R, F> {
    /// The rows of the generated image (`q` before normalisation), `(B, S, C)`: the forward's
    /// input, read again by the backward.
    pub rows_q: R,
    /// The rows of the content image (`k` before normalisation), `(B, S, C)`.
    pub rows_k: R,
    /// Normalised `rows_q` (`q`), `(B, S, C)`.
    pub unit_q: R,
    /// Normalised `rows_k` (`k`), `(B, S, C)`.
    pub unit_k: R,
    /// Backward scratch: the gradient of the normalised rows of one side, `(B, S, C)`.
    pub grad_unit: R,
    /// Norms of `rows_q`, `B*S`.
    pub norms_q: F,
    /// Norms of `rows_k`, `B*S`.
    pub norms_k: F,
    /// Row logsumexp of the logits, `B*S`.
    pub row_lse: F,
    /// Row losses, `B*S`.
    pub row_loss: F,
    /// The loss, one value.
    pub loss: F,
    /// One value, `1.0`: the upstream gradient when the caller gives none. Its owner sets it
    /// once.
    pub one: F,
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

    /// Device bytes of a workspace of these lengths whose rows are stored in `T` (the
    /// statistics are float32): what [`crate::cuda::rows_loss::CcpRows::new`] allocates.
    pub fn bytes<T: crate::Dtype>(&self) -> usize {
        let rows = self.rows_q + self.rows_k + self.unit_q + self.unit_k + self.grad_unit;
        let stats =
            self.norms_q + self.norms_k + self.row_lse + self.row_loss + self.loss + self.one;
        rows * size_of::<T>() + stats * size_of::<f32>()
    }
}

impl<R, F> RowsWorkspace<R, F> {
    /// A workspace of something made from each buffer (say, an allocation from its length).
    pub fn try_map<R2, F2, E>(
        &self,
        mut row: impl FnMut(&R) -> Result<R2, E>,
        mut stat: impl FnMut(&F) -> Result<F2, E>,
    ) -> Result<RowsWorkspace<R2, F2>, E> {
        Ok(RowsWorkspace {
            rows_q: row(&self.rows_q)?,
            rows_k: row(&self.rows_k)?,
            unit_q: row(&self.unit_q)?,
            unit_k: row(&self.unit_k)?,
            grad_unit: row(&self.grad_unit)?,
            norms_q: stat(&self.norms_q)?,
            norms_k: stat(&self.norms_k)?,
            row_lse: stat(&self.row_lse)?,
            row_loss: stat(&self.row_loss)?,
            loss: stat(&self.loss)?,
            one: stat(&self.one)?,
        })
    }

    /// A workspace of something borrowed mutably from each buffer (say, its address and the
    /// guard that must live while a launch uses it).
    pub fn map_mut<'a, R2, F2>(
        &'a mut self,
        mut row: impl FnMut(&'a mut R) -> R2,
        mut stat: impl FnMut(&'a mut F) -> F2,
    ) -> RowsWorkspace<R2, F2> {
        RowsWorkspace {
            rows_q: row(&mut self.rows_q),
            rows_k: row(&mut self.rows_k),
            unit_q: row(&mut self.unit_q),
            unit_k: row(&mut self.unit_k),
            grad_unit: row(&mut self.grad_unit),
            norms_q: stat(&mut self.norms_q),
            norms_k: stat(&mut self.norms_k),
            row_lse: stat(&mut self.row_lse),
            row_loss: stat(&mut self.row_loss),
            loss: stat(&mut self.loss),
            one: stat(&mut self.one),
        }
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
        tile_grid(shape.batch, shape.rows, shape.width)?;
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
    ) -> Result<()> {
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
    ) -> Result<()> {
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
    pub(crate) fn launch<L: Launcher>(&self, launcher: &L) -> Result<()> {
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
    pub(crate) fn launch<L: Launcher>(&self, launcher: &L) -> Result<()> {
        launcher.launch(&self.info_nce)?;
        launcher.launch(&self.normalize)
    }
}
