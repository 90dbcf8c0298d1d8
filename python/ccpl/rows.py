"""The CCP loss of a learned head's rows: ``rows_loss`` (forward, backward, autograd).

Two paths, each a forward op that returns the loss and what its backward reads, so autograd
keeps exactly that between the two (not the input rows):

- on CUDA up to ``S = 512`` rows per image (``SMALL_S_MAX_ROWS``; the paper's sizes), the
  small-S kernels: one launch gives the loss and the gradient of ``q_rows`` (kept in the op's
  workspace), the backward is one launch that scales it by the upstream gradient (one more
  for ``k_rows``);
- otherwise the fused path (the normalised rows and the row statistics kept; on the CPU also
  the rows, which the float64 reference's backward reads); its backward recomputes nothing
  but the logits' tiles.
"""

# The custom ops' annotations are real types, not strings (no `from __future__ import
# annotations`), and typing's List: torch before 2.7 infers a schema from neither
# strings nor `list[int]`.
from typing import List, Tuple

import torch
from torch import Tensor

from . import _ccpl
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

SMALL_S_MAX_ROWS: int = _ccpl.SMALL_S_MAX_ROWS
"""The most rows per image (``S``) the small-S kernels take: 512, the paper's whole range."""


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
    if q_rows.is_cuda and q_rows.dim() == 3 and q_rows.shape[1] <= SMALL_S_MAX_ROWS:
        return _small_rows_loss(q_rows, k_rows, tau)[0]
    return _rows_loss(q_rows, k_rows, tau)[0]


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


# ---- The small-S path (CUDA, S <= SMALL_S_MAX_ROWS) -------------------------------------


def _check_small(q_rows: Tensor, k_rows: Tensor, tau: float) -> None:
    _check(q_rows, k_rows, tau)
    _check_small_shape(q_rows.device, tuple(q_rows.shape))


def _check_small_shape(device: torch.device, shape: tuple) -> None:
    if device.type not in ("cuda", "meta"):
        raise ValueError(
            f"the small-S rows loss runs on CUDA tensors, got {device} (rows_loss picks the "
            "path: call it instead)"
        )
    if shape[1] > SMALL_S_MAX_ROWS:
        raise ValueError(
            f"S = {shape[1]} rows per image: the small-S path takes at most {SMALL_S_MAX_ROWS}"
        )


def _small_layout(shape: tuple, tau: float) -> Tuple[int, int]:
    """The small-S workspace of rows of `shape`: its bytes, and the bytes of its counters
    (first, zero before the forward)."""
    return _ccpl.small_rows_layout((tuple(shape), tau))


@torch.library.custom_op("ccpl::small_rows_loss", mutates_args=())
def _small_rows_loss(q_rows: Tensor, k_rows: Tensor, tau: float) -> Tuple[Tensor, Tensor]:
    _check_small(q_rows, k_rows, tau)
    size, counters = _small_layout(q_rows.shape, tau)
    loss = q_rows.new_empty((), dtype=torch.float32)
    workspace = q_rows.new_empty((size,), dtype=torch.uint8)
    workspace[:counters].zero_()
    with on_device(q_rows):
        _ccpl.small_rows_forward(
            target(q_rows),
            (tuple(q_rows.shape), tau),
            (raw(q_rows), raw(k_rows)),
            raw(workspace),
            raw(loss),
        )
    return loss, workspace


@_small_rows_loss.register_fake
def _(q_rows, k_rows, tau):
    _check_small(q_rows, k_rows, tau)
    size, _ = _small_layout(q_rows.shape, tau)
    return q_rows.new_empty((), dtype=torch.float32), q_rows.new_empty((size,), dtype=torch.uint8)


def _check_small_backward(grad, workspace, shape, dtype, tau) -> tuple:
    """The small-S backward's arguments as the forward made them, checked before any work;
    the rows' shape `(B, S, C)`."""
    workspace = check_tensor("workspace", workspace)
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or any(
        isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 1 for n in shape
    ):
        raise ValueError(f"shape must be the rows' (B, S, C), three positive ints, got {shape!r}")
    shape = tuple(shape)
    check_dtype("the rows", dtype, workspace.device)
    _check_small_shape(workspace.device, shape)
    check_tau(tau)
    expected = (_small_layout(shape, tau)[0],)
    if workspace.dtype != torch.uint8 or tuple(workspace.shape) != expected:
        raise ValueError(
            f"workspace is {workspace.dtype} of shape {tuple(workspace.shape)}, the forward "
            f"keeps uint8 of shape {expected}"
        )
    check_upstream(grad, workspace.device)
    return shape


@torch.library.custom_op("ccpl::small_rows_loss_backward", mutates_args=())
def _small_rows_loss_backward(
    grad: Tensor, workspace: Tensor, shape: List[int], dtype: torch.dtype, tau: float, grad_k: bool
) -> List[Tensor]:
    shape = _check_small_backward(grad, workspace, shape, dtype, tau)
    grads = _grads_like(workspace, shape, dtype, grad_k)
    upstream = upstream_of(grad, dtype)
    with on_device(workspace):
        _ccpl.small_rows_backward(
            target(grads[0]),
            (shape, tau),
            raw(workspace),
            raw(upstream),
            (raw(grads[0]), raw(grads[1]) if grad_k else None),
        )
    return grads


@_small_rows_loss_backward.register_fake
def _(grad, workspace, shape, dtype, tau, grad_k):
    shape = _check_small_backward(grad, workspace, shape, dtype, tau)
    return _grads_like(workspace, shape, dtype, grad_k)


def _small_setup_context(ctx, inputs, output):
    q_rows, _, tau = inputs
    _, workspace = output
    ctx.mark_non_differentiable(workspace)
    # The workspace alone: the gradient of q is in it, and what k's backward reads.
    ctx.save_for_backward(workspace)
    ctx.shape, ctx.dtype, ctx.tau = list(q_rows.shape), q_rows.dtype, tau


def _small_backward(ctx, grad, _workspace):
    want_q, want_k = ctx.needs_input_grad[:2]
    if not (want_q or want_k):
        return None, None, None
    (workspace,) = ctx.saved_tensors
    grads = _small_rows_loss_backward(grad, workspace, ctx.shape, ctx.dtype, ctx.tau, want_k)
    grad_q, grad_k = first_order_only(
        "rows_loss", [grads[0] if want_q else None, grads[1] if want_k else None]
    )
    return grad_q, grad_k, None


_small_rows_loss.register_autograd(_small_backward, setup_context=_small_setup_context)
