//! The CCP loss of a learned head's rows (`ccpl.rows_loss`): forward and backward.
//!
//! What the forward keeps for the backward is two tensors the package allocates with PyTorch
//! and autograd saves: `saved`, the normalised rows `(2, B, S, C)` = `[unit_q, unit_k]`, and
//! `stats`, `(4, B, S)` = `[norms_q, norms_k, row_lse, row_loss]`: the part of the crate's rows
//! workspace ([`RowsWorkspace`]) its backward reads, in the rows' dtype and float32, as the
//! kernels keep them (the rows themselves are not kept). On the CPU both are float64, and
//! `saved` is `(4, B, S, C)` = `[q, k, unit_q, unit_k]`, since the float64 reference's backward
//! reads the rows too: the CPU path is the reference from end to end. The backward's scratch (the gradient of
//! the normalised rows, `(B, S, C)`) is allocated by the package for the backward only.
//!
//! On CUDA up to `S = 512` rows per image (the paper's sizes) the package runs the small-S
//! path instead ([`crate::small_rows`]).

use ccpl::launch::{Buf, Launcher};
use ccpl::loss::rows::{RowsPlan, RowsWorkspace};
use ccpl::reference::{
    info_nce_backward, info_nce_forward, normalize_rows, normalize_rows_backward, similarity,
};
use ccpl::{Dtype, Element, Result, RowShape, Tau, check_len};
use pyo3::prelude::*;

use crate::op::{Op, Target, run};
use crate::{BackwardBufs, HostDtype, HostGrads, Raw, split, split_host, store, store_loss, widen};

/// A buffer a sequence of plans does not touch: a plan that did would refuse its length.
pub const ABSENT: Buf = Buf { addr: 0, len: 0 };

/// The rows workspace over the op's tensors: the saved `units` `(2, B, S, C)` of `T` and
/// `stats` `(4, B, S)` of float32, the `loss` (the forward's output, [`ABSENT`] in the
/// backward), the backward's scratch `grad_unit` and its `upstream` gradient (both [`ABSENT`]
/// in the forward).
pub fn workspace<T: Dtype>(
    shape: &RowShape,
    units: Buf,
    stats: Buf,
    loss: Buf,
    grad_unit: Buf,
    upstream: Buf,
) -> Result<RowsWorkspace<Buf, Buf>> {
    let [unit_q, unit_k] = split::<T, 2>("saved normalised rows", units, shape.len())?;
    let [norms_q, norms_k, row_lse, row_loss] =
        split::<f32, 4>("saved row statistics", stats, shape.count())?;
    Ok(RowsWorkspace {
        unit_q,
        unit_k,
        grad_unit,
        norms_q,
        norms_k,
        row_lse,
        row_loss,
        loss,
        // The upstream gradient is always the caller's (autograd's), never the default 1.
        one: upstream,
    })
}

/// The forward on a device: the loss into `loss` (one float32), the `saved` `[units, stats]`
/// for the backward. Four launches.
pub fn forward_device<T: Dtype, L: Launcher>(
    launcher: &L,
    shape: RowShape,
    tau: Tau,
    rows: [Buf; 2],
    saved: [Buf; 2],
    loss: Buf,
) -> Result<(), L::Error> {
    let plan = RowsPlan::new(shape, tau)?;
    let ([q, k], [units, stats]) = (rows, saved);
    let ws = workspace::<T>(&shape, units, stats, loss, ABSENT, ABSENT)?;
    plan.forward::<T, _>(launcher, q, k, &ws)
}

/// The backward on a device, from the forward's `saved` (the normalised rows and their
/// norms; the rows themselves are not read again): WRITES
/// `upstream[0]` (float32) times the gradient of the loss with respect to `q` into `grad_q`,
/// and to `k` into `grad_k` when given. `grad_unit` is scratch of `B*S*C` elements. Two
/// launches per side.
#[allow(clippy::too_many_arguments)]
pub fn backward_device<T: Dtype, L: Launcher>(
    launcher: &L,
    shape: RowShape,
    tau: Tau,
    saved: [Buf; 2],
    upstream: Buf,
    grad_unit: Buf,
    grad_q: Buf,
    grad_k: Option<Buf>,
) -> Result<(), L::Error> {
    let plan = RowsPlan::new(shape, tau)?;
    let [units, stats] = saved;
    let ws = workspace::<T>(&shape, units, stats, ABSENT, grad_unit, upstream)?;
    plan.backward::<T, _>(launcher, &ws, Some(upstream), grad_q, grad_k)
}

/// The forward on the host, in float64, of the rows `[q, k]`: fills `saved` (`[q, k, unit_q,
/// unit_k]`, the rows and their normalisation, float64) and `stats` (float64), and returns the
/// loss.
pub fn forward_host(
    shape: &RowShape,
    tau: Tau,
    rows: [Vec<f64>; 2],
    saved: &mut [f64],
    stats: &mut [f64],
) -> Result<f64> {
    let (n, bs) = (shape.len(), shape.count());
    check_len("q_rows", n, rows[0].len())?;
    check_len("k_rows", n, rows[1].len())?;
    check_len("saved rows", 4 * n, saved.len())?;
    check_len("saved row statistics", 4 * bs, stats.len())?;
    let [q, k] = rows;
    let unit_q = normalize_rows(&q, shape.width())?;
    let unit_k = normalize_rows(&k, shape.width())?;
    let logits = similarity(&unit_q.rows, &unit_k.rows, shape, tau)?;
    let forward = info_nce_forward(&logits, shape.batch(), shape.rows())?;
    for (slot, values) in saved
        .chunks_exact_mut(n)
        .zip([q, k, unit_q.rows, unit_k.rows])
    {
        slot.copy_from_slice(&values);
    }
    let kept = [
        &unit_q.norms,
        &unit_k.norms,
        &forward.row_lse,
        &forward.row_loss,
    ];
    for (slot, values) in stats.chunks_exact_mut(bs).zip(kept) {
        slot.copy_from_slice(values);
    }
    Ok(forward.loss)
}

/// The backward on the host, in float64 from what [`forward_host`] kept: writes `upstream`
/// times the gradient with respect to `q` into `grad_q`, and to `k` into `grad_k` when given.
pub fn backward_host<T: Element>(
    shape: &RowShape,
    tau: Tau,
    [saved, stats]: [&[f64]; 2],
    upstream: f64,
    (grad_q, grad_k): HostGrads<'_, T>,
) -> Result<()> {
    let [q, k, unit_q, unit_k] = split_host::<f64, 4>("saved rows", saved, shape.len())?;
    let [_, _, row_lse, _] = split_host::<f64, 4>("saved row statistics", stats, shape.count())?;
    let logits = similarity(unit_q, unit_k, shape, tau)?;
    let grads = info_nce_backward(
        &logits,
        row_lse,
        unit_q,
        unit_k,
        shape,
        tau,
        upstream,
        grad_k.is_some(),
    )?;
    store(
        grad_q,
        &normalize_rows_backward(q, &grads.dq, shape.width())?,
    )?;
    if let (Some(grad_k), Some(dk)) = (grad_k, grads.dk) {
        store(grad_k, &normalize_rows_backward(k, &dk, shape.width())?)?;
    }
    Ok(())
}

/// The forward of `rows_loss`: the loss of `rows` `[q, k]`, and what the backward reads.
struct Forward {
    rows: [Raw; 2],
    shape: RowShape,
    tau: Tau,
    saved: [Raw; 2],
    loss: Raw,
}

impl Op for Forward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        let ([q, k], [saved, stats]) = (self.rows, self.saved);
        // SAFETY: rows of T, saved float64, the loss of T's loss type (the caller's contract).
        unsafe {
            let rows = [widen(q.host::<T>()), widen(k.host::<T>())];
            let (saved, stats) = (saved.host_mut(), stats.host_mut());
            let value = forward_host(&self.shape, self.tau, rows, saved, stats)?;
            store_loss::<T>(self.loss, value)
        }
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let (rows, saved) = (self.rows.map(Raw::buf), self.saved.map(Raw::buf));
        forward_device::<T, _>(launcher, self.shape, self.tau, rows, saved, self.loss.buf())
    }
}

/// The backward of `rows_loss`: the gradient of `q` (and of `k` when `grad_k` is given).
struct Backward {
    shape: RowShape,
    tau: Tau,
    bufs: BackwardBufs,
}

impl Op for Backward {
    unsafe fn cpu<T: HostDtype>(&self) -> Result<()> {
        // SAFETY: host tensors of the named types (the caller's contract).
        unsafe {
            let b = self.bufs.host::<T>()?;
            backward_host::<T>(&self.shape, self.tau, b.saved, b.upstream, b.grads)
        }
    }

    fn cuda<T: Dtype, L: Launcher>(&self, launcher: &L) -> Result<(), L::Error> {
        let b = self.bufs.device()?;
        let (shape, tau) = (self.shape, self.tau);
        backward_device::<T, _>(
            launcher, shape, tau, b.saved, b.upstream, b.scratch, b.grad_q, b.grad_k,
        )
    }
}

/// `(B, S, C)` rows and tau as Python passes them: `((B, S, C), tau)`.
#[derive(Debug, Clone, Copy, FromPyObject)]
pub struct RowsArgs((usize, usize, usize), f64);

impl RowsArgs {
    /// The checked shape and tau.
    pub fn checked(self) -> Result<(RowShape, Tau)> {
        let RowsArgs((b, s, c), tau) = self;
        Ok((RowShape::new(b, s, c)?, Tau::new(tau)?))
    }
}

/// The forward of `rows_loss` on `(B, S, C)` rows `[q, k]`.
#[pyfunction]
pub(crate) fn rows_forward(
    py: Python<'_>,
    target: Target,
    args: RowsArgs,
    rows: [Raw; 2],
    saved: [Raw; 2],
    loss: Raw,
) -> PyResult<()> {
    run(py, target, || {
        let (shape, tau) = args.checked()?;
        Ok(Forward {
            rows,
            shape,
            tau,
            saved,
            loss,
        })
    })
}

/// The backward of `rows_loss`: the gradient of `q` (and of `k` when `grad_k` is given).
#[pyfunction]
pub(crate) fn rows_backward(
    py: Python<'_>,
    target: Target,
    args: RowsArgs,
    bufs: BackwardBufs,
) -> PyResult<()> {
    run(py, target, || {
        let (shape, tau) = args.checked()?;
        Ok(Backward { shape, tau, bufs })
    })
}
