"""The CCP loss of one layer with the identity head: ``ccp_layer_loss`` (forward, backward,
autograd).

On CUDA up to ``S = 8N = 512`` rows per image (the paper's sizes) it is the small-S path, the
crate's whole loss for this one layer at the given centres: two launches forward (both sides'
rows, normalised; the loss and the gradient of the rows), one backward (the scatter). Above,
the crate's layer sequence: the difference rows of both maps, their normalisation, the fused
InfoNCE (the ``(B, S, S)`` logits are recomputed tile by tile, never stored) and the mean; the
backward runs the fused backward and scatters into the feature gradient. Each forward op
returns the loss and what its backward reads, so autograd keeps the crate's workspace between
the two.
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
    NEIGHBORS,
    backward_buffers,
    centers_call,
    centers_table,
    channels_last,
    check_centers,
    check_dtype,
    check_feature_size,
    check_float,
    check_pair,
    check_saved,
    check_tau,
    check_tensor,
    check_upstream,
    deterministic,
    empty_feature,
    first_order_only,
    on_device,
    raw,
    saved_like,
    target,
    upstream_of,
)
from .small_rows import SMALL_S_MAX_ROWS


def ccp_layer_loss(
    feat_q: Tensor,
    feat_k: Tensor,
    centers: Tensor,
    tau: float = DEFAULT_TAU,
    *,
    grad_k: bool = False,
) -> Tensor:
    """The CCP loss of one encoder layer with the identity head (no MLP): the difference rows
    (centre minus neighbour) of ``feat_q`` (the generated image's features) and ``feat_k``
    (the content image's) at ``centers``, normalised, contrasted within each image at
    temperature ``tau``, the mean InfoNCE over the ``B*8N`` rows.

    Differentiable in ``feat_q``; in ``feat_k`` only with ``grad_k=True`` (the original
    detaches the content side). ``feat_q`` and ``feat_k``: ``(B, C, H, W)`` of one shape,
    dtype, device and layout (contiguous or channels_last); float32, float16 or bfloat16 on
    CUDA (float64 too on the CPU). ``centers``: 1-D int64 CPU tensor of distinct interior flat
    indices ``h*W + w`` (see ``sample_centers``). Returns a 0-dim float32 tensor (float64 for
    float64 features).
    """
    feat_q, feat_k = check_tensor("feat_q", feat_q), check_tensor("feat_k", feat_k)
    centers = check_tensor("centers", centers)
    tau, grad_k = check_tau(tau), bool(grad_k)
    if feat_q.is_cuda and centers.dim() == 1 and NEIGHBORS * centers.shape[0] <= SMALL_S_MAX_ROWS:
        return _small_layer_loss(feat_q, feat_k, centers, tau, grad_k)[0]
    return _layer_loss(feat_q, feat_k, centers, tau, grad_k)[0]


def _check(feat_q: Tensor, feat_k: Tensor, centers: Tensor, tau: float) -> tuple[bool, Tensor]:
    check_float("feat_q", feat_q)
    check_float("feat_k", feat_k)
    check_pair(("feat_q", "feat_k"), feat_q, feat_k)
    last = channels_last("feat_q", feat_q)
    if channels_last("feat_k", feat_k) != last:
        raise ValueError("feat_q and feat_k must have the same layout (both channels_last or not)")
    check_tau(tau)
    return last, check_centers(centers)


def _saved_like(feat: Tensor, num_centers: int) -> tuple[Tensor, Tensor, Tensor]:
    """Empty outputs of the forward: the loss, the rows kept (the normalised difference rows
    of q and k; on the CPU also those difference rows) and the row statistics, `S = 8N`."""
    b, c, _, _ = feat.shape
    return saved_like(feat, feat.dtype, (b, NEIGHBORS * num_centers, c))


@torch.library.custom_op("ccpl::ccp_layer_loss", mutates_args=())
def _layer_loss(
    feat_q: Tensor, feat_k: Tensor, centers: Tensor, tau: float, grad_k: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    last, centers = _check(feat_q, feat_k, centers, tau)
    loss, saved_rows, stats = _saved_like(feat_q, centers.numel())
    centers_call(
        _ccpl.layer_forward,
        feat_q,
        feat_q.shape,
        last,
        centers,
        tau,
        (raw(feat_q), raw(feat_k)),
        raw(loss),
        (raw(saved_rows), raw(stats)),
    )
    return loss, saved_rows, stats


@_layer_loss.register_fake
def _(feat_q, feat_k, centers, tau, grad_k):
    _check(feat_q, feat_k, centers, tau)
    return _saved_like(feat_q, centers.shape[0])


def _feature_grads(like: Tensor, size, last: bool, dtype: torch.dtype, grad_k: bool, zeroed: bool):
    """The backward's feature gradients, q's (and k's): zeroed for the kernels, which add into
    them, or empty for a fake."""
    grads = [empty_feature(like, size, last, dtype) for _ in range(2 if grad_k else 1)]
    return [g.zero_() for g in grads] if zeroed else grads


def _check_backward(grad, saved_rows, stats, centers, size, dtype, tau) -> tuple:
    """The backward op's arguments as the forward made them, checked before any work."""
    b, c, _, _ = size = check_feature_size(size)
    centers = check_centers(centers)
    saved_rows = check_tensor("saved rows", saved_rows)
    check_dtype("the features", dtype, saved_rows.device)
    check_saved(saved_rows, stats, dtype, (b, NEIGHBORS * centers.shape[0], c))
    check_upstream(grad, saved_rows.device)
    check_tau(tau)
    return size


@torch.library.custom_op("ccpl::ccp_layer_loss_backward", mutates_args=())
def _layer_loss_backward(
    grad: Tensor,
    saved_rows: Tensor,
    stats: Tensor,
    centers: Tensor,
    size: List[int],
    channels_last: bool,
    dtype: torch.dtype,
    tau: float,
    grad_k: bool,
) -> List[Tensor]:
    size = _check_backward(grad, saved_rows, stats, centers, size, dtype, tau)
    grads = _feature_grads(saved_rows, size, channels_last, dtype, grad_k, zeroed=True)
    upstream = upstream_of(grad, dtype)
    # The backward's scratch: the gradients of the normalised rows and of the rows.
    buffers, _scratch = backward_buffers((saved_rows, stats), upstream, grads, 2)
    centers_call(
        _ccpl.layer_backward, grads[0], size, channels_last, centers, tau, deterministic(), buffers
    )
    return grads


@_layer_loss_backward.register_fake
def _(grad, saved_rows, stats, centers, size, channels_last, dtype, tau, grad_k):
    size = _check_backward(grad, saved_rows, stats, centers, size, dtype, tau)
    return _feature_grads(saved_rows, size, channels_last, dtype, grad_k, zeroed=False)


def _setup_context(ctx, inputs, output):
    feat_q, _, centers, tau, grad_k = inputs
    _, saved_rows, stats = output
    ctx.mark_non_differentiable(saved_rows, stats)
    ctx.save_for_backward(saved_rows, stats, centers)
    ctx.size = list(feat_q.shape)
    ctx.channels_last = channels_last("feat_q", feat_q)
    ctx.dtype = feat_q.dtype
    ctx.tau, ctx.grad_k = tau, grad_k


def _backward(ctx, grad, _saved_rows, _stats):
    want_q = ctx.needs_input_grad[0]
    want_k = ctx.grad_k and ctx.needs_input_grad[1]
    if not (want_q or want_k):
        return None, None, None, None, None
    grads = _layer_loss_backward(
        grad, *ctx.saved_tensors, ctx.size, ctx.channels_last, ctx.dtype, ctx.tau, want_k
    )
    grad_q, grad_k = first_order_only(
        "ccp_layer_loss", [grads[0] if want_q else None, grads[1] if want_k else None]
    )
    return grad_q, grad_k, None, None, None


_layer_loss.register_autograd(_backward, setup_context=_setup_context)


# ---- The small-S path (CUDA, S = 8N <= SMALL_S_MAX_ROWS) ----------------------------------


def _small_check(feat_q: Tensor, feat_k: Tensor, centers: Tensor, tau: float) -> tuple[bool, Tensor]:
    last, centers = _check(feat_q, feat_k, centers, tau)
    _small_shape_check(feat_q.device, centers.shape[0])
    return last, centers


def _small_shape_check(device: torch.device, num_centers: int) -> None:
    if device.type not in ("cuda", "meta"):
        raise ValueError(
            f"the small-S layer loss runs on CUDA tensors, got {device} (ccp_layer_loss picks "
            "the path: call it instead)"
        )
    if NEIGHBORS * num_centers > SMALL_S_MAX_ROWS:
        raise ValueError(
            f"{num_centers} centres: the small-S path takes at most "
            f"{SMALL_S_MAX_ROWS // NEIGHBORS}"
        )


def _small_outputs(feat: Tensor, last: bool, num_centers: int, tau: float):
    """The loss and the workspace (its counters zeroed) of the small-S forward."""
    b, c, h, w = feat.shape
    size, counters, counter_bytes = _ccpl.small_layer_layout(
        (b, c, h, w, last), num_centers, tau, feat.element_size()
    )
    workspace = feat.new_empty((size,), dtype=torch.uint8)
    workspace[counters : counters + counter_bytes].zero_()
    return feat.new_empty((), dtype=torch.float32), workspace


@torch.library.custom_op("ccpl::small_layer_loss", mutates_args=())
def _small_layer_loss(
    feat_q: Tensor, feat_k: Tensor, centers: Tensor, tau: float, grad_k: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    last, centers = _small_check(feat_q, feat_k, centers, tau)
    centers = centers.contiguous()
    b, c, h, w = feat_q.shape
    loss, workspace = _small_outputs(feat_q, last, centers.shape[0], tau)
    with on_device(feat_q):
        table = centers_table(centers, h, w, feat_q.device)
        _ccpl.small_layer_forward(
            target(feat_q),
            ((b, c, h, w, last), raw(centers), raw(table)),
            tau,
            (raw(feat_q), raw(feat_k)),
            raw(workspace),
            raw(loss),
        )
    return loss, workspace, table


@_small_layer_loss.register_fake
def _(feat_q, feat_k, centers, tau, grad_k):
    last, centers = _small_check(feat_q, feat_k, centers, tau)
    _, _, h, w = feat_q.shape
    table = feat_q.new_empty((centers.shape[0] + h * w,), dtype=torch.int32)
    return (*_small_outputs(feat_q, last, centers.shape[0], tau), table)


def _small_check_backward(grad, workspace, table, centers, size, last, dtype, tau) -> tuple:
    """The small-S backward's arguments as the forward made them, checked before any work."""
    b, c, h, w = size = check_feature_size(size)
    centers = check_centers(centers)
    workspace, table = check_tensor("workspace", workspace), check_tensor("table", table)
    device = workspace.device
    check_dtype("the features", dtype, device)
    _small_shape_check(device, centers.shape[0])
    check_tau(tau)
    itemsize = torch.empty((), dtype=dtype).element_size()
    size_bytes, _, _ = _ccpl.small_layer_layout((b, c, h, w, last), centers.shape[0], tau, itemsize)
    want = (
        ("workspace", workspace, torch.uint8, (size_bytes,)),
        ("table", table, torch.int32, (centers.shape[0] + h * w,)),
    )
    for name, t, want_dtype, want_shape in want:
        if t.device != device or t.dtype != want_dtype or tuple(t.shape) != want_shape:
            raise ValueError(
                f"{name} is {t.dtype} {tuple(t.shape)} on {t.device}; the forward keeps "
                f"{want_dtype} {want_shape} on {device}"
            )
    check_upstream(grad, device)
    return size


@torch.library.custom_op("ccpl::small_layer_loss_backward", mutates_args=())
def _small_layer_loss_backward(
    grad: Tensor,
    workspace: Tensor,
    table: Tensor,
    centers: Tensor,
    size: List[int],
    channels_last: bool,
    dtype: torch.dtype,
    tau: float,
    grad_k: bool,
) -> List[Tensor]:
    size = _small_check_backward(grad, workspace, table, centers, size, channels_last, dtype, tau)
    grads = _feature_grads(workspace, size, channels_last, dtype, grad_k, zeroed=True)
    upstream = upstream_of(grad, dtype)
    b, c, h, w = size
    with on_device(workspace):
        _ccpl.small_layer_backward(
            target(grads[0]),
            ((b, c, h, w, channels_last), raw(centers.contiguous()), raw(table)),
            tau,
            raw(workspace),
            raw(upstream),
            (raw(grads[0]), raw(grads[1]) if grad_k else None),
        )
    return grads


@_small_layer_loss_backward.register_fake
def _(grad, workspace, table, centers, size, channels_last, dtype, tau, grad_k):
    size = _small_check_backward(grad, workspace, table, centers, size, channels_last, dtype, tau)
    return _feature_grads(workspace, size, channels_last, dtype, grad_k, zeroed=False)


def _small_setup_context(ctx, inputs, output):
    feat_q, _, centers, tau, grad_k = inputs
    _, workspace, table = output
    ctx.mark_non_differentiable(workspace, table)
    ctx.save_for_backward(workspace, table, centers)
    ctx.size = list(feat_q.shape)
    ctx.channels_last = channels_last("feat_q", feat_q)
    ctx.dtype, ctx.tau, ctx.grad_k = feat_q.dtype, tau, grad_k


def _small_backward(ctx, grad, _workspace, _table):
    want_q = ctx.needs_input_grad[0]
    want_k = ctx.grad_k and ctx.needs_input_grad[1]
    if not (want_q or want_k):
        return None, None, None, None, None
    grads = _small_layer_loss_backward(
        grad, *ctx.saved_tensors, ctx.size, ctx.channels_last, ctx.dtype, ctx.tau, want_k
    )
    grad_q, grad_k = first_order_only(
        "ccp_layer_loss", [grads[0] if want_q else None, grads[1] if want_k else None]
    )
    return grad_q, grad_k, None, None, None


_small_layer_loss.register_autograd(_small_backward, setup_context=_small_setup_context)
