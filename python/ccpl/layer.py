"""The CCP loss of one layer with the identity head: ``ccp_layer_loss`` (forward, backward,
autograd).

On CUDA it is the crate's layer sequence: the difference rows of both maps, their
normalisation, the fused InfoNCE (the ``(B, S, S)`` logits are recomputed tile by tile, never
stored) and the mean; the backward runs the fused backward and scatters into the feature
gradient. The forward op returns the loss and what the backward reads, so autograd keeps the
crate's layer workspace between the two.
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
    raw,
    saved_like,
    upstream_of,
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
    # The backward adds into the gradient, as the kernels' scatter does.
    grads = [
        empty_feature(saved_rows, size, channels_last, dtype).zero_()
        for _ in range(2 if grad_k else 1)
    ]
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
    return [empty_feature(saved_rows, size, channels_last, dtype) for _ in range(2 if grad_k else 1)]


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
