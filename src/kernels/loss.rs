//! The loss of one layer with the identity head, as a sequence of launch plans over buffers.
//! Generic over the [`Launcher`], so the GPU ([`crate::cuda::loss`]) and the CPU emulator run
//! the very same launch code.
//!
//! Forward: difference rows of `feat_q` and `feat_k`, their normalisation, the logits, the
//! row logsumexp and losses, their mean. Backward: the gradient of the normalised rows, back
//! through the normalisation, scattered into `grad_feat_q` (and `grad_feat_k` on request).

use super::info_nce::{self, Side};
use super::neighbor::{self, CentersBuf, Scatter};
use super::normalize;
use super::similarity;
use super::{Buf, Launcher, inv_tau};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::ffi;
use crate::shape::{FeatureShape, RowShape};

/// The workspace of one layer's loss: what the forward computes and the backward reads, and
/// the backward's scratch. Generic over what holds a buffer: `R` for rows in the storage type
/// `T`, `F` for float32 statistics (device slices for an owner, [`Buf`]s for the plans, and
/// lengths from [`LayerWorkspace::lengths`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWorkspace<R, F> {
    /// Difference rows of `feat_q`, `(B, S, C)`.
    pub rows_q: R,
    /// Difference rows of `feat_k`, `(B, S, C)`.
    pub rows_k: R,
    /// Normalised rows of `feat_q` (`q`), `(B, S, C)`.
    pub unit_q: R,
    /// Normalised rows of `feat_k` (`k`), `(B, S, C)`.
    pub unit_k: R,
    /// Backward scratch: the gradient of the normalised rows of one side, `(B, S, C)`.
    pub grad_unit: R,
    /// Backward scratch: the gradient of the difference rows of one side, `(B, S, C)`.
    pub grad_rows: R,
    /// Norms of the rows of `feat_q`, `B*S`.
    pub norms_q: F,
    /// Norms of the rows of `feat_k`, `B*S`.
    pub norms_k: F,
    /// Logits `(B, S, S)`.
    pub logits: F,
    /// Row logsumexp, `B*S`.
    pub row_lse: F,
    /// Row losses, `B*S`.
    pub row_loss: F,
    /// The loss, one value.
    pub loss: F,
    /// One value, `1.0`: the upstream gradient when the caller gives none. Its owner sets it
    /// once.
    pub one: F,
}

impl LayerWorkspace<usize, usize> {
    /// The length in elements of every buffer, for a layer of `shape` with `num_centers`.
    pub fn lengths(shape: &FeatureShape, num_centers: usize) -> Result<Self> {
        let rows = row_shape(shape, num_centers)?;
        let (elements, stats) = (rows.len(), rows.batch * rows.rows);
        Ok(Self {
            rows_q: elements,
            rows_k: elements,
            unit_q: elements,
            unit_k: elements,
            grad_unit: elements,
            grad_rows: elements,
            norms_q: stats,
            norms_k: stats,
            logits: rows.logits_len(),
            row_lse: stats,
            row_loss: stats,
            loss: 1,
            one: 1,
        })
    }
}

impl<R, F> LayerWorkspace<R, F> {
    /// A workspace of something made from each buffer (say, an allocation from its length).
    pub fn try_map<R2, F2, E>(
        &self,
        mut row: impl FnMut(&R) -> Result<R2, E>,
        mut stat: impl FnMut(&F) -> Result<F2, E>,
    ) -> Result<LayerWorkspace<R2, F2>, E> {
        Ok(LayerWorkspace {
            rows_q: row(&self.rows_q)?,
            rows_k: row(&self.rows_k)?,
            unit_q: row(&self.unit_q)?,
            unit_k: row(&self.unit_k)?,
            grad_unit: row(&self.grad_unit)?,
            grad_rows: row(&self.grad_rows)?,
            norms_q: stat(&self.norms_q)?,
            norms_k: stat(&self.norms_k)?,
            logits: stat(&self.logits)?,
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
    ) -> LayerWorkspace<R2, F2> {
        LayerWorkspace {
            rows_q: row(&mut self.rows_q),
            rows_k: row(&mut self.rows_k),
            unit_q: row(&mut self.unit_q),
            unit_k: row(&mut self.unit_k),
            grad_unit: row(&mut self.grad_unit),
            grad_rows: row(&mut self.grad_rows),
            norms_q: stat(&mut self.norms_q),
            norms_k: stat(&mut self.norms_k),
            logits: stat(&mut self.logits),
            row_lse: stat(&mut self.row_lse),
            row_loss: stat(&mut self.row_loss),
            loss: stat(&mut self.loss),
            one: stat(&mut self.one),
        }
    }
}

/// The row matrices of a layer: `(B, 8N, C)`.
fn row_shape(shape: &FeatureShape, num_centers: usize) -> Result<RowShape> {
    if num_centers == 0 {
        return Err(Error::NoCenters);
    }
    let rows = num_centers
        .checked_mul(ffi::CCPL_NUM_NEIGHBORS as usize)
        .ok_or_else(|| Error::Shape(format!("{num_centers} centres overflow the row count")))?;
    RowShape::new(shape.batch(), rows, shape.channels())
}

/// One layer's loss: the shape of its feature maps, its number of centres and temperature,
/// validated once. Its forward and backward validate every buffer, then launch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerPlan {
    shape: FeatureShape,
    rows: RowShape,
    num_centers: usize,
    tau: f64,
}

impl LayerPlan {
    /// A layer of feature maps of `shape` with `num_centers` centres and temperature `tau`.
    pub fn new(shape: FeatureShape, num_centers: usize, tau: f64) -> Result<Self> {
        inv_tau(tau)?;
        if num_centers > shape.interior() {
            return Err(Error::Shape(format!(
                "{num_centers} centres, but a {}x{} map has only {} interior positions",
                shape.height(),
                shape.width(),
                shape.interior()
            )));
        }
        let rows = row_shape(&shape, num_centers)?;
        Ok(Self {
            shape,
            rows,
            num_centers,
            tau,
        })
    }
    /// Shape of the feature maps.
    pub fn shape(&self) -> &FeatureShape {
        &self.shape
    }
    /// Shape of the difference rows, `(B, 8N, C)`.
    pub fn rows(&self) -> &RowShape {
        &self.rows
    }
    /// Number of centres `N`.
    pub fn num_centers(&self) -> usize {
        self.num_centers
    }
    /// Temperature.
    pub fn tau(&self) -> f64 {
        self.tau
    }

    fn check_centers(&self, centers: &CentersBuf) -> Result<()> {
        if centers.len() == self.num_centers {
            Ok(())
        } else {
            Err(Error::Shape(format!(
                "the layer was made for {} centres, {} were given",
                self.num_centers,
                centers.len()
            )))
        }
    }

    /// The forward: writes every buffer of `ws` the backward reads, and `ws.loss`. Every plan
    /// is made (and so every buffer checked) before the first launch.
    pub fn forward<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        centers: &CentersBuf,
        feat_q: Buf,
        feat_k: Buf,
        ws: &LayerWorkspace<Buf, Buf>,
    ) -> Result<()> {
        self.check_centers(centers)?;
        let (shape, rows) = (&self.shape, &self.rows);
        let diff_q = neighbor::neighbor_diff::<T>(shape, centers, feat_q, ws.rows_q)?;
        let diff_k = neighbor::neighbor_diff::<T>(shape, centers, feat_k, ws.rows_k)?;
        let norm_q = normalize::normalize_rows::<T>(rows, ws.rows_q, ws.unit_q, ws.norms_q)?;
        let norm_k = normalize::normalize_rows::<T>(rows, ws.rows_k, ws.unit_k, ws.norms_k)?;
        let logits = similarity::similarity::<T>(rows, self.tau, ws.unit_q, ws.unit_k, ws.logits)?;
        let rows_ce = info_nce::info_nce_forward(rows, ws.logits, ws.row_lse, ws.row_loss)?;
        let mean = info_nce::info_nce_loss(ws.row_loss, ws.loss, false)?;
        launcher.launch(&diff_q)?;
        launcher.launch(&diff_k)?;
        launcher.launch(&norm_q)?;
        launcher.launch(&norm_k)?;
        launcher.launch(&logits)?;
        launcher.launch(&rows_ce)?;
        launcher.launch(&mean)
    }

    /// The backward after [`forward`](Self::forward) with the same `centers` and `ws`: adds
    /// `upstream[0]` (one float32 on the device; `ws.one` when `None`) times the gradient of
    /// the loss to `grad_feat_q`, and to `grad_feat_k` when given. Every plan is made before
    /// the first launch.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        centers: &CentersBuf,
        ws: &LayerWorkspace<Buf, Buf>,
        upstream: Option<Buf>,
        grad_feat_q: Buf,
        grad_feat_k: Option<Buf>,
        scatter: Scatter,
    ) -> Result<()> {
        self.check_centers(centers)?;
        let upstream = upstream.unwrap_or(ws.one);
        let q = self.side_plans::<T>(centers, ws, upstream, Side::Q, grad_feat_q, scatter)?;
        let k = match grad_feat_k {
            Some(grad) => {
                Some(self.side_plans::<T>(centers, ws, upstream, Side::K, grad, scatter)?)
            }
            None => None,
        };
        for side in std::iter::once(q).chain(k) {
            launcher.launch(&side.info_nce)?;
            launcher.launch(&side.normalize)?;
            launcher.launch(&side.scatter)?;
        }
        Ok(())
    }

    fn side_plans<T: Dtype>(
        &self,
        centers: &CentersBuf,
        ws: &LayerWorkspace<Buf, Buf>,
        upstream: Buf,
        side: Side,
        grad_feat: Buf,
        scatter: Scatter,
    ) -> Result<SidePlans> {
        let (rows, norms, other) = match side {
            Side::Q => (ws.rows_q, ws.norms_q, ws.unit_k),
            Side::K => (ws.rows_k, ws.norms_k, ws.unit_q),
        };
        let shape = &self.rows;
        Ok(SidePlans {
            info_nce: info_nce::info_nce_backward::<T>(
                shape,
                self.tau,
                side,
                ws.logits,
                ws.row_lse,
                ws.row_loss,
                other,
                upstream,
                ws.grad_unit,
            )?,
            normalize: normalize::normalize_rows_backward::<T>(
                shape,
                rows,
                norms,
                ws.grad_unit,
                ws.grad_rows,
            )?,
            scatter: neighbor::neighbor_diff_backward::<T>(
                &self.shape,
                centers,
                ws.grad_rows,
                grad_feat,
                scatter,
            )?,
        })
    }
}

/// The backward of one side: into the normalised rows, through the normalisation, into the
/// feature map.
struct SidePlans {
    info_nce: super::LaunchPlan<ffi::ccpl_info_nce_backward_params>,
    normalize: super::LaunchPlan<ffi::ccpl_normalize_rows_backward_params>,
    scatter: super::LaunchPlan<ffi::ccpl_neighbor_diff_backward_params>,
}
