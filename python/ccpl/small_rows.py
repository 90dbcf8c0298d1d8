"""The rows loss of learned heads on the small-S kernels (CUDA, every ``S <= 512``): one
layer's (``rows_loss``) or several layers' summed (``rows_loss_sum``), forward, backward and
autograd.

One launch gives every layer's loss and the gradient of its ``q_rows`` (kept in the op's
workspace, for an upstream gradient of 1); the backward is one launch that scales those
gradients by the upstream gradient, all layers at once (one more for ``k_rows``' gradients).
The workspace, one byte tensor, is the crate's ``SmallRowsWorkspace`` with the launch's
counters first; autograd keeps it between the two, and nothing else.
"""

# The custom ops' annotations are real types, not strings (no `from __future__ import
# annotations`), and typing's List: torch before 2.7 infers a schema from neither
# strings nor `list[int]`.
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from . import _ccpl
from ._common import (
    check_dtype,
    check_float,
    check_like_first,
    check_pair,
    check_rows,
    check_tau,
    check_tensor,
    check_upstream,
    first_order_only,
    on_device,
    raw,
    target,
    upstream_of,
)

SMALL_S_MAX_ROWS: int = _ccpl.SMALL_S_MAX_ROWS
"""The most rows per image (``S``) the small-S kernels take: 512, the paper's whole range."""

MAX_LAYERS: int = _ccpl.SMALL_S_MAX_LAYERS
"""The most layers one launch takes."""


def takes(q_rows: Sequence[Tensor]) -> bool:
    """Whether rows like ``q_rows`` (one tensor per layer) run here: CUDA, at most
    ``MAX_LAYERS`` layers, each ``(B, S, C)`` with ``S <= SMALL_S_MAX_ROWS``."""
    return (
        0 < len(q_rows) <= MAX_LAYERS
        and all(isinstance(r, Tensor) and r.is_cuda and r.dim() == 3 for r in q_rows)
        and all(r.shape[1] <= SMALL_S_MAX_ROWS for r in q_rows)
    )


def small_rows_loss(q_rows: List[Tensor], k_rows: List[Tensor], tau: float) -> Tensor:
    """The sum of the layers' rows losses (``takes(q_rows)`` must hold; ``rows_loss`` and
    ``rows_loss_sum`` pick the path)."""
    return _small_rows_loss(q_rows, k_rows, tau)[0]


def _check(q_rows: List[Tensor], k_rows: List[Tensor], tau: float) -> List[Tuple[int, int, int]]:
    """Every layer's pair checked; their `(B, S, C)`."""
    if len(q_rows) != len(k_rows) or not q_rows:
        raise ValueError(f"{len(q_rows)} q_rows but {len(k_rows)} k_rows: one of each per layer")
    if len(q_rows) > MAX_LAYERS:
        raise ValueError(f"{len(q_rows)} layers: the small-S rows loss takes 1 to {MAX_LAYERS}")
    shapes = []
    for l, (q, k) in enumerate(zip(q_rows, k_rows)):
        names = (f"q_rows[{l}]", f"k_rows[{l}]")
        check_float(names[0], q)
        check_float(names[1], k)
        check_pair(names, q, k)
        check_rows(names[0], q)
        check_rows(names[1], k)
        check_like_first((names[0], "q_rows[0]"), q, q_rows[0])
        shapes.append(tuple(q.shape))
    _check_small(q_rows[0].device, shapes)
    check_tau(tau)
    return shapes


def _check_small(device: torch.device, shapes: List[Tuple[int, int, int]]) -> None:
    if device.type not in ("cuda", "meta"):
        raise ValueError(
            f"the small-S rows loss runs on CUDA tensors, got {device} (rows_loss and "
            "rows_loss_sum pick the path: call them instead)"
        )
    for l, shape in enumerate(shapes):
        if shape[1] > SMALL_S_MAX_ROWS:
            raise ValueError(
                f"layer {l}: S = {shape[1]} rows per image, the small-S path takes at most "
                f"{SMALL_S_MAX_ROWS}"
            )


def _layout(shapes: List[Tuple[int, int, int]], tau: float) -> Tuple[int, int]:
    """The workspace of rows of `shapes`: its bytes, and the bytes of its counters (first,
    zero before the forward)."""
    return _ccpl.small_rows_layout([tuple(s) for s in shapes], tau)


@torch.library.custom_op("ccpl::small_rows_loss", mutates_args=())
def _small_rows_loss(
    q_rows: List[Tensor], k_rows: List[Tensor], tau: float
) -> Tuple[Tensor, Tensor]:
    shapes = _check(q_rows, k_rows, tau)
    like = q_rows[0]
    size, counters = _layout(shapes, tau)
    loss = like.new_empty((), dtype=torch.float32)
    workspace = like.new_empty((size,), dtype=torch.uint8)
    workspace[:counters].zero_()
    with on_device(like):
        _ccpl.small_rows_forward(
            target(like),
            (shapes, tau),
            [(raw(q), raw(k)) for q, k in zip(q_rows, k_rows)],
            raw(workspace),
            raw(loss),
        )
    return loss, workspace


@_small_rows_loss.register_fake
def _(q_rows, k_rows, tau):
    shapes = _check(q_rows, k_rows, tau)
    like = q_rows[0]
    size, _ = _layout(shapes, tau)
    return like.new_empty((), dtype=torch.float32), like.new_empty((size,), dtype=torch.uint8)


def _shapes_of(sizes: object) -> List[Tuple[int, int, int]]:
    """The layers' `(B, S, C)` from the backward op's flat list of sizes."""
    if not isinstance(sizes, (list, tuple)) or len(sizes) % 3 or not sizes or any(
        isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 1 for n in sizes
    ):
        raise ValueError(f"sizes must hold each layer's (B, S, C), positive ints, got {sizes!r}")
    return [tuple(sizes[i : i + 3]) for i in range(0, len(sizes), 3)]


def _check_backward(grad, workspace, sizes, dtype, tau) -> List[Tuple[int, int, int]]:
    """The backward op's arguments as the forward made them, checked before any work; the
    layers' `(B, S, C)`."""
    workspace = check_tensor("workspace", workspace)
    shapes = _shapes_of(sizes)
    check_dtype("the rows", dtype, workspace.device)
    _check_small(workspace.device, shapes)
    check_tau(tau)
    expected = (_layout(shapes, tau)[0],)
    if workspace.dtype != torch.uint8 or tuple(workspace.shape) != expected:
        raise ValueError(
            f"workspace is {workspace.dtype} of shape {tuple(workspace.shape)}, the forward "
            f"keeps uint8 of shape {expected}"
        )
    check_upstream(grad, workspace.device)
    return shapes


def _flat_grads(workspace: Tensor, shapes, dtype: torch.dtype, grad_k: bool) -> List[Tensor]:
    """The gradients of every layer's rows, the layers one after another: q's (and k's)."""
    total = sum(b * s * c for b, s, c in shapes)
    return [workspace.new_empty((total,), dtype=dtype) for _ in range(2 if grad_k else 1)]


@torch.library.custom_op("ccpl::small_rows_loss_backward", mutates_args=())
def _small_rows_loss_backward(
    grad: Tensor, workspace: Tensor, sizes: List[int], dtype: torch.dtype, tau: float, grad_k: bool
) -> List[Tensor]:
    shapes = _check_backward(grad, workspace, sizes, dtype, tau)
    grads = _flat_grads(workspace, shapes, dtype, grad_k)
    upstream = upstream_of(grad, dtype)
    with on_device(workspace):
        _ccpl.small_rows_backward(
            target(grads[0]),
            (shapes, tau),
            raw(workspace),
            raw(upstream),
            (raw(grads[0]), raw(grads[1]) if grad_k else None),
        )
    return grads


@_small_rows_loss_backward.register_fake
def _(grad, workspace, sizes, dtype, tau, grad_k):
    return _flat_grads(workspace, _check_backward(grad, workspace, sizes, dtype, tau), dtype, grad_k)


def _setup_context(ctx, inputs, output):
    q_rows, _, tau = inputs
    _, workspace = output
    ctx.mark_non_differentiable(workspace)
    # The workspace alone: the gradients of q are in it, and what k's backward reads.
    ctx.save_for_backward(workspace)
    ctx.shapes = [tuple(q.shape) for q in q_rows]
    ctx.dtype, ctx.tau = q_rows[0].dtype, tau


def _per_layer(flat: Tensor, shapes) -> List[Tensor]:
    sizes = [b * s * c for b, s, c in shapes]
    return [g.view(shape) for g, shape in zip(flat.split(sizes), shapes)]


def _backward(ctx, grad, _workspace):
    layers = len(ctx.shapes)
    want_q, want_k = any(ctx.needs_input_grad[0]), any(ctx.needs_input_grad[1])
    if not (want_q or want_k):
        return None, None, None
    (workspace,) = ctx.saved_tensors
    sizes = [n for shape in ctx.shapes for n in shape]
    flat = _small_rows_loss_backward(grad, workspace, sizes, ctx.dtype, ctx.tau, want_k)
    grads_q = _per_layer(flat[0], ctx.shapes) if want_q else [None] * layers
    grads_k = _per_layer(flat[1], ctx.shapes) if want_k else [None] * layers
    tied = first_order_only("rows_loss", [*grads_q, *grads_k])
    return tied[:layers], tied[layers:], None


_small_rows_loss.register_autograd(_backward, setup_context=_setup_context)
