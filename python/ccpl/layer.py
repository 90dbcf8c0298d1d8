"""The CCP loss of one layer with the identity head: ``ccp_layer_loss`` (forward, backward,
autograd).

On CUDA it is the crate's layer sequence: the difference rows of both maps, their
normalisation, the fused InfoNCE (the ``(B, S, S)`` logits are recomputed tile by tile, never
stored) and the mean; the backward runs the fused backward and scatters into the feature
gradient. The forward op returns the loss and what the backward reads, so autograd keeps the
crate's layer workspace between the two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ccpl
from ._common import (
    DEFAULT_TAU,
    NEIGHBORS,
    centers_table,
    channels_last,
    check_centers,
    check_float,
    check_pair,
    check_tau,
    check_tensor,
    deterministic,
    loss_dtype,
    on_device,
    raw,
    saved_dtypes,
    target,
)


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
    return _layer_loss(feat_q, feat_k, centers, check_tau(tau), bool(grad_k))[0]


def _check(feat_q: Tensor, feat_k: Tensor, centers: Tensor, tau: float) -> tuple[bool, Tensor]:
    check_float("feat_q", feat_q)
    check_float("feat_k", feat_k)
    check_pair(("feat_q", "feat_k"), feat_q, feat_k)
    last = channels_last("feat_q", feat_q)
    if channels_last("feat_k", feat_k) != last:
        raise ValueError("feat_q and feat_k must have the same layout (both channels_last or not)")
    check_tau(tau)
    return last, check_centers(centers)


def _saved_like(feat: Tensor, num_centers) -> tuple[Tensor, Tensor, Tensor]:
    """Empty outputs of the forward: the loss, the rows kept for the backward and the row
    statistics `(4, B, S)` (norms of q, of k, logsumexp, loss), `S = 8N`. The rows kept are
    the normalised difference rows of q and k, `(2, B, S, C)`, on CUDA (the kernels never keep
    the difference rows themselves), and on the CPU also those difference rows, `(4, B, S, C)`
    (the float64 reference's backward reads them)."""
    b, c, _, _ = feat.shape
    s = NEIGHBORS * num_centers
    rows_dtype, stats_dtype = saved_dtypes(feat)
    kept = 2 if feat.is_cuda else 4
    return (
        feat.new_empty((), dtype=loss_dtype(feat.dtype)),
        feat.new_empty((kept, b, s, c), dtype=rows_dtype),
        feat.new_empty((4, b, s), dtype=stats_dtype),
    )


@torch.library.custom_op("ccpl::ccp_layer_loss", mutates_args=())
def _layer_loss(
    feat_q: Tensor, feat_k: Tensor, centers: Tensor, tau: float, grad_k: bool
) -> tuple[Tensor, Tensor, Tensor]:
    last, centers = _check(feat_q, feat_k, centers, tau)
    centers = centers.contiguous()
    b, c, h, w = feat_q.shape
    loss, saved_rows, stats = _saved_like(feat_q, centers.numel())
    with on_device(feat_q):
        table = centers_table(centers, h, w, feat_q.device)
        _ccpl.layer_forward(
            *target(feat_q),
            (b, c, h, w, last),
            tau,
            raw(centers),
            raw(table),
            raw(feat_q),
            raw(feat_k),
            (raw(saved_rows), raw(stats)),
            raw(loss),
        )
    return loss, saved_rows, stats


@_layer_loss.register_fake
def _(feat_q, feat_k, centers, tau, grad_k):
    _check(feat_q, feat_k, centers, tau)
    return _saved_like(feat_q, centers.shape[0])


@torch.library.custom_op("ccpl::ccp_layer_loss_backward", mutates_args=())
def _layer_loss_backward(
    grad: Tensor,
    saved_rows: Tensor,
    stats: Tensor,
    centers: Tensor,
    size: list[int],
    channels_last: bool,
    dtype: torch.dtype,
    tau: float,
    grad_k: bool,
) -> list[Tensor]:
    grads = [_zero_feature(saved_rows, size, channels_last, dtype) for _ in range(2 if grad_k else 1)]
    upstream = grad.to(loss_dtype(dtype)).contiguous()
    scratch = saved_rows.new_empty((2, *saved_rows.shape[1:])) if saved_rows.is_cuda else None
    centers = centers.contiguous()
    b, c, h, w = size
    with on_device(saved_rows):
        table = centers_table(centers, h, w, saved_rows.device)
        _ccpl.layer_backward(
            *target(grads[0]),
            (b, c, h, w, channels_last),
            tau,
            raw(centers),
            raw(table),
            (raw(saved_rows), raw(stats)),
            raw(upstream),
            raw(scratch),
            raw(grads[0]),
            raw(grads[1]) if grad_k else None,
            deterministic(),
        )
    return grads


@_layer_loss_backward.register_fake
def _(grad, saved_rows, stats, centers, size, channels_last, dtype, tau, grad_k):
    return [_empty_feature(saved_rows, size, channels_last, dtype) for _ in range(2 if grad_k else 1)]


def _empty_feature(like: Tensor, size: list[int], last: bool, dtype: torch.dtype) -> Tensor:
    layout = torch.channels_last if last else torch.contiguous_format
    return torch.empty(size, dtype=dtype, device=like.device, memory_format=layout)


def _zero_feature(like: Tensor, size: list[int], last: bool, dtype: torch.dtype) -> Tensor:
    # The backward adds into the gradient, as the kernels' scatter does.
    return _empty_feature(like, size, last, dtype).zero_()


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
    return (grads[0] if want_q else None), (grads[1] if want_k else None), None, None, None


_layer_loss.register_autograd(_backward, setup_context=_setup_context)
