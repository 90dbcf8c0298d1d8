//! The loss of one layer with the identity head, as a sequence of launch plans over buffers.
//! Generic over the [`Launcher`], so the GPU ([`crate::cuda::layer`]) and the CPU emulator run
//! the very same launch code.
//!
//! The layer is the rows loss ([`super::rows`]) between the neighbour differences and
//! their scatter. Forward: the normalised difference rows of `feat_q` and `feat_k`, formed and
//! normalised in float before anything is stored in `T` (`neighbor_diff_normalize`: f16
//! features whose differences pass 65504 stay right), then the rows loss's fused InfoNCE and
//! mean. Backward: per side, the rows loss's backward into the difference rows (from the
//! normalised rows and norms), scattered into `grad_feat_q` (and `grad_feat_k` on request).
//! Memory is `O(B*S*C)`: neither the `(B, S, S)` logits nor the difference rows are stored.

use super::rows::{ForwardPlans, RowsPlan, RowsSide, RowsWorkspace};
use super::workspace;
use crate::dtype::Dtype;
use crate::error::{Error, Result, check_len};
use crate::ffi;
use crate::launch::info_nce::Side;
use crate::launch::neighbor::{self, Scatter};
use crate::launch::{Buf, CentersBuf, LaunchPlan, Launcher};
use crate::shape::{FeatureShape, RowShape};
use crate::tau::Tau;

workspace! {
    /// The workspace of one layer's loss: the rows loss's (its normalised rows and norms are
    /// those of the difference rows), and the backward's scratch between the rows loss and
    /// the scatter. Generic over what holds a buffer, as [`RowsWorkspace`].
    pub struct LayerWorkspace<R, F> {
        rows {
            /// Backward scratch: the gradient of the difference rows of one side, `(B, S, C)`.
            grad_rows,
        }
        stats {}
        parts {
            /// The rows loss's workspace; `rows.unit_q` and `rows.unit_k` hold the normalised
            /// difference rows of `feat_q` and `feat_k`, `(B, S, C)`.
            rows: RowsWorkspace<R, F>,
        }
    }
}

impl LayerWorkspace<usize, usize> {
    /// The length in elements of every buffer, for a layer of `shape` with `num_centers`.
    pub fn lengths(shape: &FeatureShape, num_centers: usize) -> Result<Self> {
        let rows = row_shape(shape, num_centers)?;
        Ok(Self {
            rows: RowsWorkspace::lengths(&rows)?,
            grad_rows: rows.len(),
        })
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
    rows: RowsPlan,
    num_centers: usize,
}

impl LayerPlan {
    /// A layer of feature maps of `shape` with `num_centers` centres and temperature `tau`.
    pub fn new(shape: FeatureShape, num_centers: usize, tau: Tau) -> Result<Self> {
        if num_centers > shape.interior() {
            return Err(Error::Shape(format!(
                "{num_centers} centres, but a {}x{} map has only {} interior positions",
                shape.height(),
                shape.width(),
                shape.interior()
            )));
        }
        let rows = RowsPlan::new(row_shape(&shape, num_centers)?, tau)?;
        Ok(Self {
            shape,
            rows,
            num_centers,
        })
    }
    /// Shape of the feature maps.
    pub fn shape(&self) -> &FeatureShape {
        &self.shape
    }
    /// Shape of the difference rows, `(B, 8N, C)`.
    pub fn rows(&self) -> &RowShape {
        self.rows.shape()
    }
    /// Number of centres `N`.
    pub fn num_centers(&self) -> usize {
        self.num_centers
    }
    /// Temperature.
    pub fn tau(&self) -> Tau {
        self.rows.tau()
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
    ) -> Result<(), L::Error> {
        self.forward_plans::<T>(centers, feat_q, feat_k, ws)?
            .launch(launcher)
    }

    /// The forward's plans, checked, not launched.
    pub(crate) fn forward_plans<T: Dtype>(
        &self,
        centers: &CentersBuf,
        feat_q: Buf,
        feat_k: Buf,
        ws: &LayerWorkspace<Buf, Buf>,
    ) -> Result<LayerForward> {
        self.check_centers(centers)?;
        let (shape, rows) = (&self.shape, &ws.rows);
        check_len("feat_q", shape.len(), feat_q.len)?;
        check_len("feat_k", shape.len(), feat_k.len)?;
        let unit = |feat, unit, norms| {
            neighbor::neighbor_diff_normalize::<T>(shape, centers, feat, unit, norms)
        };
        Ok(LayerForward {
            unit_q: unit(feat_q, rows.unit_q, rows.norms_q)?,
            unit_k: unit(feat_k, rows.unit_k, rows.norms_k)?,
            loss: self.rows.loss_plans::<T>(rows)?,
        })
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
    ) -> Result<(), L::Error> {
        let upstream = upstream.unwrap_or(ws.rows.one);
        let grads = (grad_feat_q, grad_feat_k);
        self.backward_plans::<T>(centers, ws, upstream, grads, scatter)?
            .launch(launcher)
    }

    /// The backward's plans, checked, not launched: `grads` are the feature maps' gradients,
    /// the content side's when asked for.
    pub(crate) fn backward_plans<T: Dtype>(
        &self,
        centers: &CentersBuf,
        ws: &LayerWorkspace<Buf, Buf>,
        upstream: Buf,
        (grad_feat_q, grad_feat_k): (Buf, Option<Buf>),
        scatter: Scatter,
    ) -> Result<LayerBackward> {
        self.check_centers(centers)?;
        let q = self.side_plans::<T>(centers, ws, upstream, Side::Q, grad_feat_q, scatter)?;
        let k = grad_feat_k
            .map(|grad| self.side_plans::<T>(centers, ws, upstream, Side::K, grad, scatter))
            .transpose()?;
        Ok(LayerBackward { q, k })
    }

    /// One side's plans: the rows loss's backward into `ws.grad_rows`, then its scatter.
    fn side_plans<T: Dtype>(
        &self,
        centers: &CentersBuf,
        ws: &LayerWorkspace<Buf, Buf>,
        upstream: Buf,
        side: Side,
        grad_feat: Buf,
        scatter: Scatter,
    ) -> Result<SidePlans> {
        Ok(SidePlans {
            rows: self
                .rows
                .side_plans::<T>(&ws.rows, upstream, side, ws.grad_rows)?,
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

/// The forward of a layer: both sides' normalised difference rows, then the loss.
pub(crate) type LayerForward = ForwardPlans<ffi::ccpl_neighbor_diff_normalize_params>;

/// The backward's launches: each side's.
pub(crate) struct LayerBackward {
    q: SidePlans,
    k: Option<SidePlans>,
}

impl LayerBackward {
    pub(crate) fn launch<L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        for side in std::iter::once(&self.q).chain(&self.k) {
            side.rows.launch(launcher)?;
            launcher.launch(&side.scatter)?;
        }
        Ok(())
    }
}

/// The backward of one side: the rows loss's, then the scatter into the feature map.
struct SidePlans {
    rows: RowsSide,
    scatter: LaunchPlan<ffi::ccpl_neighbor_diff_backward_params>,
}
