//! The rows loss of a learned head on the small-S path: one launch forward, one or two
//! backward.

use super::workspace::{RowsIn, SmallOffsets, SmallSWorkspace};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::ffi;
use crate::launch::small_s::{MAX_ROWS, RowsTotals, rows_forward, rows_transposed, scale, takes};
use crate::launch::{Buf, LaunchPlan, Launcher, row_count};
use crate::loss::workspace;
use crate::shape::RowShape;
use crate::tau::Tau;

workspace! {
    /// The workspace of the rows loss on the small-S path ([`SmallRowsPlan`]): the path's
    /// buffers for one layer, the loss and the default upstream gradient. All float32, as
    /// [`SmallSWorkspace`].
    pub struct SmallRowsWorkspace<R, F> {
        rows {}
        stats {
            /// The loss, one value.
            loss,
            /// One value, `1.0`: the upstream gradient when the caller gives none. Its owner
            /// sets it once.
            one,
        }
        parts {
            /// Copies of the rows, their gradients, the row statistics.
            small: SmallSWorkspace<R, F>,
        }
    }
}

impl SmallRowsWorkspace<usize, usize> {
    /// The length in elements of every buffer for rows of `shape` (`S` at most [`MAX_ROWS`]).
    pub fn lengths(shape: &RowShape) -> Result<Self> {
        Ok(Self {
            loss: 1,
            one: 1,
            small: SmallSWorkspace::lengths(&[*shape])?,
        })
    }
}

/// The rows loss of two row matrices `(B, S, C')` on the small-S path (`S` at most
/// [`MAX_ROWS`]): the forward is one launch that leaves the loss and the gradient of the
/// generated side's rows (upstream 1) in the workspace; the backward scales it by the
/// upstream gradient into the caller's buffer (one launch), after computing the content
/// side's gradient when it is asked for (one more). Same results as
/// [`RowsPlan`](crate::loss::rows::RowsPlan), computed in float from the rows in `T`: only the
/// gradients are rounded to `T`, once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmallRowsPlan {
    shape: RowShape,
    tau: Tau,
}

impl SmallRowsPlan {
    /// The loss of row matrices of `shape` at temperature `tau`; `S` at most [`MAX_ROWS`].
    pub fn new(shape: RowShape, tau: Tau) -> Result<Self> {
        row_count(&shape)?;
        if !takes(shape.rows()) {
            return Err(Error::Shape(format!(
                "S = {} rows: the small-S path takes at most {MAX_ROWS}",
                shape.rows()
            )));
        }
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
    /// The lengths of its workspace.
    pub fn workspace(&self) -> Result<SmallRowsWorkspace<usize, usize>> {
        SmallRowsWorkspace::lengths(&self.shape)
    }

    const AT: SmallOffsets = SmallOffsets { rows: 0, stats: 0 };

    /// The forward on the caller's `rows_q` and `rows_k` (`(B, S, C)` in `T`), copied into the
    /// workspace: writes `ws.loss` and everything the backward reads. `counters` is the
    /// launch's count of finished blocks (`int32[COUNTERS]`, zero before the first launch).
    pub fn forward<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        rows_q: Buf,
        rows_k: Buf,
        ws: &SmallRowsWorkspace<Buf, Buf>,
        counters: Buf,
    ) -> Result<(), L::Error> {
        launcher.launch(&self.forward_plan::<T>(rows_q, rows_k, ws, counters)?)
    }

    /// The forward's one launch, checked, not launched.
    pub(crate) fn forward_plan<T: Dtype>(
        &self,
        rows_q: Buf,
        rows_k: Buf,
        ws: &SmallRowsWorkspace<Buf, Buf>,
        counters: Buf,
    ) -> Result<LaunchPlan<ffi::ccpl_small_s_rows_params>> {
        let layer =
            ws.small
                .rows_layer(&self.shape, Self::AT, RowsIn::Caller(rows_q, rows_k), false)?;
        let totals = RowsTotals {
            counters,
            layer_loss: ws.small.layer_loss,
            loss: ws.loss,
        };
        rows_forward::<T>(&[layer], self.tau, &totals)
    }

    /// The backward after [`forward`](Self::forward) with the same `ws`: WRITES `upstream[0]`
    /// (one float32 on the device; `ws.one` when `None`) times the gradient of the loss with
    /// respect to `rows_q` into `grad_rows_q`, and with respect to `rows_k` into
    /// `grad_rows_k` when given. Every plan is made before the first launch.
    pub fn backward<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        ws: &SmallRowsWorkspace<Buf, Buf>,
        upstream: Option<Buf>,
        grad_rows_q: Buf,
        grad_rows_k: Option<Buf>,
    ) -> Result<(), L::Error> {
        let upstream = upstream.unwrap_or(ws.one);
        let count = self.shape.len();
        let transposed = match grad_rows_k {
            Some(_) => {
                let layer = ws
                    .small
                    .rows_layer(&self.shape, Self::AT, RowsIn::Copies, true)?;
                Some(rows_transposed::<f32>(&[layer], self.tau)?)
            }
            None => None,
        };
        let scale = scale::<T>(
            count,
            upstream,
            (ws.small.grad_rows_q.part::<f32>(0, count)?, grad_rows_q),
            grad_rows_k
                .map(|out| Ok::<_, Error>((ws.small.grad_rows_k.part::<f32>(0, count)?, out)))
                .transpose()?,
        )?;
        if let Some(plan) = transposed {
            launcher.launch(&plan)?;
        }
        launcher.launch(&scale)
    }
}
