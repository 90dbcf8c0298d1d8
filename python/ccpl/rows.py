"""The CCP loss of a learned head's rows: ``rows_loss`` (forward, backward, autograd), and
``rows_loss_sum`` over several layers.

On CUDA up to ``S = 512`` rows per image (the paper's sizes) both run on the small-S kernels
(``small_rows``). Otherwise, the fused path here: a forward op that returns the loss and what
its backward reads (the normalised rows and the row statistics; on the CPU also the rows,
which the float64 reference's backward reads), so autograd keeps exactly that between the two
(not the input rows), and the backward recomputes nothing but the logits' tiles.
"""

# The custom ops' annotations are real types, not strings (no `from __future__ import
# annotations`), and typing's List: torch before 2.7 infers a schema from neither
# strings nor `list[int]`.
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from . import _ccpl, small_rows
from ._common import (
    DEFAULT_TAU,
    backward_buffers,
    check_dtype,
    check_float,
    check_pair,
    check_rows,
    check_saved,
    check_tau,
    check_tensor,
    check_upstream,
    first_order_only,
    on_device,
    raw,
    saved_like,
    target,
    upstream_of,
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
    tau = check_tau(tau)
    if small_rows.takes([q_rows]):
        return small_rows.small_rows_loss([q_rows], [k_rows], tau)
    return _rows_loss(q_rows, k_rows, tau)[0]


def rows_loss_sum(q_rows: Sequence[Tensor], k_rows: Sequence[Tensor], tau: float = DEFAULT_TAU) -> Tensor:
    """The sum over layers of ``rows_loss(q_rows[l], k_rows[l], tau)``: the learned heads'
    outputs of several encoder layers, each ``(B, S_l, C_l)``, all of one dtype and device. On
    CUDA, when every ``S_l <= 512`` and there are at most ``small_rows.MAX_LAYERS`` layers (the
    paper's configurations), one launch for all the layers forward and one backward (one more
    for the gradients of ``k_rows``); otherwise one ``rows_loss`` per layer.

    >>> q = [torch.randn(2, 16, 4), torch.randn(2, 8, 6)]
    >>> k = [torch.randn(2, 16, 4), torch.randn(2, 8, 6)]
    >>> torch.allclose(rows_loss_sum(q, k), rows_loss(q[0], k[0]) + rows_loss(q[1], k[1]))
    True
    """
    for name, rows in (("q_rows", q_rows), ("k_rows", k_rows)):
        if isinstance(rows, Tensor) or not isinstance(rows, Sequence) or not rows:
            raise TypeError(f"{name} must be a non-empty sequence of row tensors, one per layer")
    if len(q_rows) != len(k_rows):
        raise ValueError(f"{len(q_rows)} q_rows but {len(k_rows)} k_rows: one of each per layer")
    q_rows = [check_tensor(f"q_rows[{l}]", r) for l, r in enumerate(q_rows)]
    k_rows = [check_tensor(f"k_rows[{l}]", r) for l, r in enumerate(k_rows)]
    tau = check_tau(tau)
    if small_rows.takes(q_rows):
        return small_rows.small_rows_loss(q_rows, k_rows, tau)
    return sum(rows_loss(q, k, tau) for q, k in zip(q_rows, k_rows))


def _check(q_rows: Tensor, k_rows: Tensor, tau: float) -> None:
    check_float("q_rows", q_rows)
    check_float("k_rows", k_rows)
    check_pair(("q_rows", "k_rows"), q_rows, k_rows)
    check_rows("q_rows", q_rows)
    check_rows("k_rows", k_rows)
    check_tau(tau)


@torch.library.custom_op("ccpl::rows_loss", mutates_args=())
def _rows_loss(q_rows: Tensor, k_rows: Tensor, tau: float) -> Tuple[Tensor, Tensor, Tensor]:
    _check(q_rows, k_rows, tau)
    loss, saved_rows, stats = saved_like(q_rows, q_rows.dtype, q_rows.shape)
    with on_device(q_rows):
        _ccpl.rows_forward(
            target(q_rows),
            (tuple(q_rows.shape), tau),
            (raw(q_rows), raw(k_rows)),
            (raw(saved_rows), raw(stats)),
            raw(loss),
        )
    return loss, saved_rows, stats


@_rows_loss.register_fake
def _(q_rows, k_rows, tau):
    _check(q_rows, k_rows, tau)
    return saved_like(q_rows, q_rows.dtype, q_rows.shape)


def _check_backward(grad, saved_rows, stats, dtype, tau) -> Tuple[int, int, int]:
    """The backward op's arguments as the forward made them, checked before any work; the
    shape `(B, S, C)` of the rows."""
    saved_rows = check_tensor("saved rows", saved_rows)
    if saved_rows.dim() != 4:
        raise ValueError(f"saved rows must be (K, B, S, C), got shape {tuple(saved_rows.shape)}")
    shape = tuple(saved_rows.shape[1:])
    check_dtype("the rows", dtype, saved_rows.device)
    check_saved(saved_rows, stats, dtype, shape)
    check_upstream(grad, saved_rows.device)
    check_tau(tau)
    return shape


def _grads_like(saved_rows: Tensor, shape, dtype: torch.dtype, grad_k: bool) -> List[Tensor]:
    return [saved_rows.new_empty(shape, dtype=dtype) for _ in range(2 if grad_k else 1)]


@torch.library.custom_op("ccpl::rows_loss_backward", mutates_args=())
def _rows_loss_backward(
    grad: Tensor,
    saved_rows: Tensor,
    stats: Tensor,
    dtype: torch.dtype,
    tau: float,
    grad_k: bool,
) -> List[Tensor]:
    shape = _check_backward(grad, saved_rows, stats, dtype, tau)
    grads = _grads_like(saved_rows, shape, dtype, grad_k)
    upstream = upstream_of(grad, dtype)
    # The backward's scratch: the gradient of the normalised rows.
    buffers, _scratch = backward_buffers((saved_rows, stats), upstream, grads, 1)
    with on_device(saved_rows):
        _ccpl.rows_backward(target(grads[0]), (shape, tau), buffers)
    return grads


@_rows_loss_backward.register_fake
def _(grad, saved_rows, stats, dtype, tau, grad_k):
    return _grads_like(saved_rows, _check_backward(grad, saved_rows, stats, dtype, tau), dtype, grad_k)


def _setup_context(ctx, inputs, output):
    q_rows, _, tau = inputs
    _, saved_rows, stats = output
    ctx.mark_non_differentiable(saved_rows, stats)
    # Not the input rows: the backward reads only what the forward kept.
    ctx.save_for_backward(saved_rows, stats)
    ctx.dtype, ctx.tau = q_rows.dtype, tau


def _backward(ctx, grad, _saved_rows, _stats):
    want_q, want_k = ctx.needs_input_grad[:2]
    if not (want_q or want_k):
        return None, None, None
    grads = _rows_loss_backward(grad, *ctx.saved_tensors, ctx.dtype, ctx.tau, want_k)
    grad_q, grad_k = first_order_only(
        "rows_loss", [grads[0] if want_q else None, grads[1] if want_k else None]
    )
    return grad_q, grad_k, None


_rows_loss.register_autograd(_backward, setup_context=_setup_context)

