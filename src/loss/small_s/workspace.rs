//! The buffers of the small-S path, every layer's one after another, and the parts of them
//! each launch of [`crate::launch::small_s`] reads and writes.

use crate::error::{Error, Result};
use crate::launch::small_s::{GatherRows, RowsLayer};
use crate::launch::{Buf, row_count};
use crate::loss::workspace;
use crate::shape::RowShape;

workspace! {
    /// The buffers of the small-S path, every layer's one after another (a layer's part at
    /// the offsets its plan computes). All float32: `R` holds the row matrices, `F` the
    /// statistics; an owner allocates both as float32 (`bytes::<f32>()` is their size).
    pub struct SmallSWorkspace<R, F> {
        rows {
            /// The rows of the generated side, `(B, S, C)` a layer: the difference rows
            /// normalised (layers) or a copy of the caller's rows (the rows loss).
            rows_q,
            /// The rows of the content side.
            rows_k,
            /// The gradient of the loss (upstream 1) with respect to `rows_q`.
            grad_rows_q,
            /// The gradient with respect to `rows_k`, when asked for.
            grad_rows_k,
        }
        stats {
            /// Row logsumexp of the logits, `B*S` a layer.
            row_lse,
            /// Row losses, `B*S` a layer.
            row_loss,
            /// The norms of the difference rows of the generated side, `B*S` a layer (the
            /// rows loss, whose rows are raw, leaves them unused).
            norms_q,
            /// The norms of the content side's difference rows.
            norms_k,
            /// Each layer's loss.
            layer_loss,
        }
        parts {}
    }
}

impl SmallSWorkspace<usize, usize> {
    /// The lengths for the layers of row shapes `shapes`, each `S` at most
    /// [`MAX_ROWS`](crate::launch::small_s::MAX_ROWS).
    pub fn lengths(shapes: &[RowShape]) -> Result<Self> {
        let mut ws = Self {
            rows_q: 0,
            rows_k: 0,
            grad_rows_q: 0,
            grad_rows_k: 0,
            row_lse: 0,
            row_loss: 0,
            norms_q: 0,
            norms_k: 0,
            layer_loss: shapes.len(),
        };
        let end = shapes
            .iter()
            .try_fold(SmallOffsets::START, |at, s| at.after(s))?;
        (ws.rows_q, ws.row_lse) = (end.rows, end.stats);
        (ws.rows_k, ws.grad_rows_q, ws.grad_rows_k) = (ws.rows_q, ws.rows_q, ws.rows_q);
        (ws.row_loss, ws.norms_q, ws.norms_k) = (ws.row_lse, ws.row_lse, ws.row_lse);
        Ok(ws)
    }
}

/// Where one layer's part of a [`SmallSWorkspace`] starts: its offsets in the row matrices
/// and in the row statistics, in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SmallOffsets {
    pub(crate) rows: usize,
    pub(crate) stats: usize,
}

impl SmallOffsets {
    /// The first layer's.
    pub(crate) const START: Self = Self { rows: 0, stats: 0 };

    /// Where the layer after one of `shape` at `self` starts; an error past `usize` (layers
    /// of about 2^62 elements each reach it).
    pub(crate) fn after(self, shape: &RowShape) -> Result<Self> {
        let past = |what: &str| {
            Error::Shape(format!(
                "the small-S layers' {what} add up past usize ({shape:?} after {self:?})"
            ))
        };
        Ok(Self {
            rows: (self.rows.checked_add(shape.len())).ok_or_else(|| past("rows"))?,
            stats: (self.stats.checked_add(row_count(shape)?))
                .ok_or_else(|| past("row statistics"))?,
        })
    }
}

/// The rows a launch of [`SmallSWorkspace::rows_layer`] reads.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RowsIn {
    /// The gather's normalised rows in the workspace, with their norms (a layer's loss).
    Gathered,
    /// The caller's raw rows `(rows_q, rows_k)`, copied into the workspace by the forward
    /// (the rows loss).
    Caller(Buf, Buf),
    /// Those copies (the rows loss's transposed launch).
    Copies,
}

impl SmallSWorkspace<Buf, Buf> {
    /// The [`RowsLayer`] of layer `shape` at `at` on the rows `rows`, gradient into
    /// `grad_rows_q` (or `grad_rows_k` when `k_side`).
    pub(crate) fn rows_layer(
        &self,
        shape: &RowShape,
        at: SmallOffsets,
        rows: RowsIn,
        k_side: bool,
    ) -> Result<RowsLayer> {
        let (len, stats) = (shape.len(), row_count(shape)?);
        let own = self.rows_parts(at, len)?;
        let (grad, grad_name) = if k_side {
            (&self.grad_rows_k, "grad_rows_k")
        } else {
            (&self.grad_rows_q, "grad_rows_q")
        };
        let ((rows_q, rows_k), norms, copies) = match rows {
            RowsIn::Gathered => (own, Some(self.norms_parts(at, stats)?), None),
            RowsIn::Caller(q, k) => ((q, k), None, Some(own)),
            RowsIn::Copies => (own, None, None),
        };
        Ok(RowsLayer {
            shape: *shape,
            rows_q,
            rows_k,
            norms,
            grad_rows: grad.part::<f32>(grad_name, at.rows, len)?,
            row_lse: self.row_lse.part::<f32>("row_lse", at.stats, stats)?,
            row_loss: self.row_loss.part::<f32>("row_loss", at.stats, stats)?,
            copies,
        })
    }

    /// The normalised rows and norms of layer `shape` at `at`, for the gather to write.
    pub(crate) fn gather_rows(
        &self,
        shape: &RowShape,
        at: SmallOffsets,
        feat_q: Buf,
        feat_k: Buf,
    ) -> Result<GatherRows> {
        let (len, stats) = (shape.len(), row_count(shape)?);
        let (rows_q, rows_k) = self.rows_parts(at, len)?;
        Ok(GatherRows {
            feat_q,
            feat_k,
            rows_q,
            rows_k,
            norms: Some(self.norms_parts(at, stats)?),
        })
    }

    /// Layer `at`'s part of both sides' rows, `len` floats each.
    fn rows_parts(&self, at: SmallOffsets, len: usize) -> Result<(Buf, Buf)> {
        Ok((
            self.rows_q.part::<f32>("rows_q", at.rows, len)?,
            self.rows_k.part::<f32>("rows_k", at.rows, len)?,
        ))
    }

    /// Layer `at`'s part of both sides' norms, `stats` floats each.
    fn norms_parts(&self, at: SmallOffsets, stats: usize) -> Result<(Buf, Buf)> {
        Ok((
            self.norms_q.part::<f32>("norms_q", at.stats, stats)?,
            self.norms_k.part::<f32>("norms_k", at.stats, stats)?,
        ))
    }
}
