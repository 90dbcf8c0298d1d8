"""The CCP loss of a learned head's rows: ``rows_loss`` (forward, backward, autograd).

The forward op returns the loss and what its backward reads (the normalised rows and the row
statistics; the rows themselves are its inputs), so autograd keeps exactly the crate's rows
workspace between the two and the backward recomputes nothing but the logits' tiles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ccpl
from ._common import (
    DEFAULT_TAU,
    check_float,
    check_pair,
    check_rows,
    check_tau,
    check_tensor,
    loss_dtype,
    on_device,
    raw,
    saved_dtypes,
    target,
)


def rows_loss(q_rows: Tensor, k_rows: Tensor, tau: float = DEFAULT_TAU) -> Tensor:
    """The CCP loss of two row matrices ``(B, S, C)``, a learned head's outputs for the
    generated image (``q_rows``) and the content image (``k_rows``): every row normalised
    (``x / (||x|| + 1e-7)``), logits ``q_i . k_j / tau`` within each image, the InfoNCE of each
    row with its diagonal as the positive, the mean over the ``B*S`` rows. The original's
    ``PatchNCELoss`` of ``Normalize``-d head outputs, without its NaN gradient at a zero row.

    Differentiable in both; detach ``k_rows`` for the original's behaviour. Contiguous rows,
    the same dtype (float32, float16 or bfloat16 on CUDA; float64 too on the CPU) and device.
    Returns a 0-dim float32 tensor (float64 for float64 rows).
    """
    q_rows, k_rows = check_tensor("q_rows", q_rows), check_tensor("k_rows", k_rows)
    return _rows_loss(q_rows, k_rows, check_tau(tau))[0]


def _check(q_rows: Tensor, k_rows: Tensor, tau: float) -> None:
    check_float("q_rows", q_rows)
    check_float("k_rows", k_rows)
    check_pair(("q_rows", "k_rows"), q_rows, k_rows)
    check_rows("q_rows", q_rows)
    check_rows("k_rows", k_rows)
    check_tau(tau)


def _saved_like(rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Empty outputs of the forward for `rows`: the loss, the normalised rows of both sides
    `(2, B, S, C)` and the row statistics `(4, B, S)` (norms of q, of k, logsumexp, loss)."""
    b, s, c = rows.shape
    rows_dtype, stats_dtype = saved_dtypes(rows)
    return (
        rows.new_empty((), dtype=loss_dtype(rows.dtype)),
        rows.new_empty((2, b, s, c), dtype=rows_dtype),
        rows.new_empty((4, b, s), dtype=stats_dtype),
    )


@torch.library.custom_op("ccpl::rows_loss", mutates_args=())
def _rows_loss(q_rows: Tensor, k_rows: Tensor, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    _check(q_rows, k_rows, tau)
    loss, units, stats = _saved_like(q_rows)
    with on_device(q_rows):
        _ccpl.rows_forward(
            *target(q_rows),
            tuple(q_rows.shape),
            tau,
            (raw(q_rows), raw(k_rows)),
            (raw(units), raw(stats)),
            raw(loss),
        )
    return loss, units, stats


@_rows_loss.register_fake
def _(q_rows, k_rows, tau):
    _check(q_rows, k_rows, tau)
    return _saved_like(q_rows)


@torch.library.custom_op("ccpl::rows_loss_backward", mutates_args=())
def _rows_loss_backward(
    grad: Tensor,
    q_rows: Tensor,
    k_rows: Tensor,
    units: Tensor,
    stats: Tensor,
    tau: float,
    grad_k: bool,
) -> list[Tensor]:
    grads = [torch.empty_like(q_rows) for _ in range(2 if grad_k else 1)]
    upstream = grad.to(loss_dtype(q_rows.dtype)).contiguous()
    scratch = torch.empty_like(q_rows) if q_rows.device.type == "cuda" else None
    with on_device(q_rows):
        _ccpl.rows_backward(
            *target(q_rows),
            tuple(q_rows.shape),
            tau,
            (raw(q_rows), raw(k_rows)),
            (raw(units), raw(stats)),
            raw(upstream),
            raw(scratch),
            raw(grads[0]),
            raw(grads[1]) if grad_k else None,
        )
    return grads


@_rows_loss_backward.register_fake
def _(grad, q_rows, k_rows, units, stats, tau, grad_k):
    return [torch.empty_like(q_rows) for _ in range(2 if grad_k else 1)]


def _setup_context(ctx, inputs, output):
    q_rows, k_rows, tau = inputs
    _, units, stats = output
    ctx.mark_non_differentiable(units, stats)
    ctx.save_for_backward(q_rows, k_rows, units, stats)
    ctx.tau = tau


def _backward(ctx, grad, _units, _stats):
    want_q, want_k = ctx.needs_input_grad[:2]
    if not (want_q or want_k):
        return None, None, None
    grads = _rows_loss_backward(grad, *ctx.saved_tensors, ctx.tau, want_k)
    return (grads[0] if want_q else None), (grads[1] if want_k else None), None


_rows_loss.register_autograd(_backward, setup_context=_setup_context)
