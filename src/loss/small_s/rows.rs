//! The rows loss of a learned head's layers on the small-S path: one launch forward over
//! every layer, one or two backward.

use super::workspace::{RowsIn, SmallOffsets, SmallSWorkspace};
use crate::dtype::Dtype;
use crate::error::{Error, Result, check_len};
use crate::ffi;
use crate::launch::small_s::{
    MAX_LAYERS, MAX_ROWS, RowsLayer, RowsTotals, rows_forward, rows_transposed, scale, takes,
};
use crate::launch::{Buf, LaunchPlan, Launcher, row_count};
use crate::loss::workspace;
use crate::shape::RowShape;
use crate::tau::Tau;

workspace! {
    /// The workspace of the rows loss on the small-S path ([`SmallRowsPlan`]): the path's
    /// buffers for its layers, the loss and the default upstream gradient. All float32, as
    /// [`SmallSWorkspace`].
    pub struct SmallRowsWorkspace<R, F> {
        rows {}
        stats {
            /// The loss, one value: the sum of the layers' losses.
            loss,
            /// One value, `1.0`: the upstream gradient when the caller gives none. Its owner
            /// sets it once.
            one,
        }
        parts {
            /// Copies of the rows, their gradients, the row statistics, each layer's loss
            /// (`layer_loss`).
            small: SmallSWorkspace<R, F>,
        }
    }
}

impl SmallRowsWorkspace<usize, usize> {
    /// The length in elements of every buffer for the layers of row shapes `shapes` (each `S`
    /// at most [`MAX_ROWS`]).
    pub fn lengths(shapes: &[RowShape]) -> Result<Self> {
        Ok(Self {
            loss: 1,
            one: 1,
            small: SmallSWorkspace::lengths(shapes)?,
        })
    }
}

/// The rows loss of one to [`MAX_LAYERS`] layers, each two row matrices `(B, S, C')` of its own
/// shape, on the small-S path (`S` at most [`MAX_ROWS`]): the sum of the layers' losses (each
/// the mean over its rows), as the multi-layer loss sums its layers. The forward is one launch
/// over every layer that leaves the loss, each layer's loss and the gradient of the generated
/// side's rows (upstream 1) in the workspace; the backward scales that gradient by the upstream
/// gradient into the caller's one buffer of every layer's rows (one launch), after computing
/// the content side's gradient of every layer when it is asked for (one more). Same results
/// as [`RowsPlan`](crate::loss::rows::RowsPlan) a layer, computed in float from the rows in
/// `T`: only the gradients are rounded to `T`, once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmallRowsPlan {
    /// The layers' shapes in `shapes[..len]`, the rest copies of the first: an array, as the
    /// launch's descriptors, so that the plan is `Copy`.
    shapes: [RowShape; MAX_LAYERS],
    len: usize,
    total_len: usize,
    tau: Tau,
}

impl SmallRowsPlan {
    /// The loss of one layer, row matrices of `shape`, at temperature `tau`; `S` at most
    /// [`MAX_ROWS`].
    pub fn new(shape: RowShape, tau: Tau) -> Result<Self> {
        Self::layers(&[shape], tau)
    }

    /// The loss of layers of row shapes `shapes` (1 to [`MAX_LAYERS`], each `(B, S, C')` of
    /// its own, `S` at most [`MAX_ROWS`]) at temperature `tau`.
    pub fn layers(shapes: &[RowShape], tau: Tau) -> Result<Self> {
        if shapes.is_empty() || shapes.len() > MAX_LAYERS {
            return Err(Error::Shape(format!(
                "{} layers of rows: 1 to {MAX_LAYERS} are taken",
                shapes.len()
            )));
        }
        for shape in shapes {
            row_count(shape)?;
            if !takes(shape.rows()) {
                return Err(Error::Shape(format!(
                    "S = {} rows: the small-S path takes at most {MAX_ROWS}",
                    shape.rows()
                )));
            }
        }
        // The layers' rows one after another, their sum within usize.
        let total_len = SmallSWorkspace::lengths(shapes)?.rows_q;
        let mut all = [shapes[0]; MAX_LAYERS];
        all[..shapes.len()].copy_from_slice(shapes);
        Ok(Self {
            shapes: all,
            len: shapes.len(),
            total_len,
            tau,
        })
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Never true: there is at least one layer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Each layer's shape of rows, `(B, S, C')`.
    pub fn shapes(&self) -> &[RowShape] {
        &self.shapes[..self.len]
    }
    /// The elements of every layer's rows: the length of each of the backward's gradient
    /// buffers, which hold the layers one after another in layer order.
    pub fn total_len(&self) -> usize {
        self.total_len
    }
    /// Temperature.
    pub fn tau(&self) -> Tau {
        self.tau
    }
    /// The lengths of its workspace.
    pub fn workspace(&self) -> Result<SmallRowsWorkspace<usize, usize>> {
        SmallRowsWorkspace::lengths(self.shapes())
    }

    /// The forward of a one-layer plan on the caller's `rows_q` and `rows_k`: as
    /// [`forward_layers`](Self::forward_layers) with `&[(rows_q, rows_k)]`.
    pub fn forward<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        rows_q: Buf,
        rows_k: Buf,
        ws: &SmallRowsWorkspace<Buf, Buf>,
        counters: Buf,
    ) -> Result<(), L::Error> {
        self.forward_layers::<T, L>(launcher, &[(rows_q, rows_k)], ws, counters)
    }

    /// The forward on the caller's rows, `rows[l] = (rows_q, rows_k)` of layer `l` (its shape,
    /// in `T`), copied into the workspace: one launch that writes `ws.loss` (the sum of the
    /// layers' losses), each layer's loss in `ws.small.layer_loss`, and everything the
    /// backward reads. `counters` is the launch's count of finished blocks (`int32[COUNTERS]`,
    /// zero before the first launch; its last block sets it back to zero).
    pub fn forward_layers<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        rows: &[(Buf, Buf)],
        ws: &SmallRowsWorkspace<Buf, Buf>,
        counters: Buf,
    ) -> Result<(), L::Error> {
        launcher.launch(&self.forward_plan::<T>(rows, ws, counters)?)
    }

    /// The forward's one launch, checked, not launched.
    pub(crate) fn forward_plan<T: Dtype>(
        &self,
        rows: &[(Buf, Buf)],
        ws: &SmallRowsWorkspace<Buf, Buf>,
        counters: Buf,
    ) -> Result<LaunchPlan<ffi::ccpl_small_s_rows_params>> {
        if rows.len() != self.len() {
            return Err(Error::Shape(format!(
                "{} (rows_q, rows_k) pairs for {} layers of rows",
                rows.len(),
                self.len()
            )));
        }
        let layers = self.rows_layers(ws, false, |l| RowsIn::Caller(rows[l].0, rows[l].1))?;
        let totals = RowsTotals {
            counters,
            layer_loss: ws.small.layer_loss,
            loss: ws.loss,
        };
        rows_forward::<T>(&layers, self.tau, &totals)
    }

    /// Every layer's [`RowsLayer`] on the rows `rows(l)`, gradient into the workspace's
    /// `grad_rows_q` (or `grad_rows_k` when `k_side`) at the layer's part.
    fn rows_layers(
        &self,
        ws: &SmallRowsWorkspace<Buf, Buf>,
        k_side: bool,
        rows: impl Fn(usize) -> RowsIn,
    ) -> Result<Vec<RowsLayer>> {
        let mut at = SmallOffsets::START;
        let mut layers = Vec::with_capacity(self.len());
        for (l, shape) in self.shapes().iter().enumerate() {
            layers.push(ws.small.rows_layer(shape, at, rows(l), k_side)?);
            at = at.after(shape)?;
        }
        Ok(layers)
    }

    /// The backward after [`forward_layers`](Self::forward_layers) with the same `ws`: WRITES
    /// `upstream[0]` (one float32 on the device; `ws.one` when `None`) times the gradient of
    /// the loss with respect to every layer's `rows_q` into `grad_rows_q`, and with respect to
    /// every layer's `rows_k` into `grad_rows_k` when given: each one buffer of
    /// [`total_len`](Self::total_len) elements in `T`, layer `l`'s part at the sum of the
    /// earlier layers' lengths. One launch (two with `grad_rows_k`); every plan is made before
    /// the first launch.
    pub fn backward<T: Dtype, L: Launcher>(
        &self,
        launcher: &L,
        ws: &SmallRowsWorkspace<Buf, Buf>,
        upstream: Option<Buf>,
        grad_rows_q: Buf,
        grad_rows_k: Option<Buf>,
    ) -> Result<(), L::Error> {
        let upstream = upstream.unwrap_or(ws.one);
        let count = self.total_len;
        check_len("grad_rows_q", count, grad_rows_q.len)?;
        let transposed = match grad_rows_k {
            Some(out) => {
                check_len("grad_rows_k", count, out.len)?;
                let layers = self.rows_layers(ws, true, |_| RowsIn::Copies)?;
                Some(rows_transposed::<f32>(&layers, self.tau)?)
            }
            None => None,
        };
        let scale = scale::<T>(
            count,
            upstream,
            (
                ws.small.grad_rows_q.part::<f32>("grad_rows_q", 0, count)?,
                grad_rows_q,
            ),
            grad_rows_k
                .map(|out| {
                    Ok::<_, Error>((
                        ws.small.grad_rows_k.part::<f32>("grad_rows_k", 0, count)?,
                        out,
                    ))
                })
                .transpose()?,
        )?;
        if let Some(plan) = transposed {
            launcher.launch(&plan)?;
        }
        launcher.launch(&scale)
    }
}
