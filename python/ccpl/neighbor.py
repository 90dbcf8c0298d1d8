"""Centres and difference rows: ``sample_centers`` and the op ``neighbor_diff``, with its
backward, for a learned projection head between ``neighbor_diff`` and ``rows_loss``."""

# The custom ops' annotations are real types, not strings (no `from __future__ import
# annotations`), and typing's List: torch before 2.7 infers a schema from neither
# strings nor `list[int]`.
import numbers
from typing import List, Optional

import torch
from torch import Tensor

from . import _ccpl
from ._common import (
    NEIGHBORS,
    centers_call,
    channels_last,
    check_centers,
    check_feature_size,
    check_float,
    check_rows,
    check_tensor,
    deterministic,
    empty_feature,
    raw,
)


def sample_centers(
    h: int, w: int, num_s: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Draws the centres of one layer, as the original CCPL does (a ``torch.randperm`` of the
    interior positions), with the count clamped: ``N = min(num_s, (h-2)*(w-2))`` distinct
    interior positions ``1 <= y <= h-2, 1 <= x <= w-2``, uniformly without replacement.

    Returns their flat indices ``y*w + x`` in sampling order, a 1-D int64 CPU tensor: the
    ``centers`` argument of the ops. ``generator`` is a CPU ``torch.Generator`` (default: the
    global one, so ``torch.manual_seed`` makes the draw reproducible). Draw anew for every layer
    and step.

    >>> sample_centers(4, 5, 100).shape  # clamped to the (4-2)*(5-2) = 6 interior positions
    torch.Size([6])
    """
    for name, value in (("h", h), ("w", w), ("num_s", num_s)):
        if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if h < 3 or w < 3:
        raise ValueError(f"a {h}x{w} map has no interior position (h and w must be at least 3)")
    if num_s < 1:
        raise ValueError(f"num_s must be at least 1, got {num_s}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
    inner_w = w - 2
    picks = torch.randperm((h - 2) * inner_w, generator=generator)[:num_s]
    return (picks // inner_w + 1) * w + picks % inner_w + 1


def _check(feat: Tensor, centers: Tensor) -> tuple[bool, Tensor]:
    check_float("feat", feat)
    return channels_last("feat", feat), check_centers(centers)


def neighbor_diff(feat: Tensor, centers: Tensor) -> Tensor:
    """The difference rows of a feature map: ``(B, 8N, C)``, row ``k*N + x`` of image ``b``
    is ``feat[b, :, p_x] - feat[b, :, p_x + off_k]`` (centre minus neighbour ``k``, in the 3x3
    window's raster order, as the original's ``NeighborSample``). Differentiable in ``feat``,
    to any order (the op is linear).

    ``feat``: ``(B, C, H, W)``, contiguous or channels_last; float32, float16 or bfloat16 on
    CUDA (float64 too on the CPU). ``centers``: 1-D int64 CPU tensor of distinct interior flat
    indices ``h*W + w`` (see ``sample_centers``). The rows have ``feat``'s dtype.
    """
    return _neighbor_diff(check_tensor("feat", feat), check_tensor("centers", centers))


@torch.library.custom_op("ccpl::neighbor_diff", mutates_args=())
def _neighbor_diff(feat: Tensor, centers: Tensor) -> Tensor:
    last, centers = _check(feat, centers)
    b, c, _, _ = feat.shape
    rows = feat.new_empty((b, NEIGHBORS * centers.numel(), c))
    centers_call(_ccpl.neighbor_diff, feat, feat.shape, last, centers, raw(feat), raw(rows))
    return rows


@_neighbor_diff.register_fake
def _(feat, centers):
    _check(feat, centers)
    b, c, _, _ = feat.shape
    return feat.new_empty((b, NEIGHBORS * centers.shape[0], c))


def _check_backward(grad_rows: Tensor, centers: Tensor, size) -> tuple[int, int, int, int]:
    """The rows' gradient of a `size` feature map at `centers`, checked before any work."""
    size = check_feature_size(size)
    check_float("grad_rows", check_tensor("grad_rows", grad_rows))
    centers = check_centers(centers)
    b, c, _, _ = size
    want = (b, NEIGHBORS * centers.shape[0], c)
    if tuple(grad_rows.shape) != want:
        raise ValueError(
            f"grad_rows has shape {tuple(grad_rows.shape)}, the rows of a {tuple(size)} map at "
            f"{centers.shape[0]} centres are {want}"
        )
    return size


@torch.library.custom_op("ccpl::neighbor_diff_backward", mutates_args=())
def _neighbor_diff_backward(
    grad_rows: Tensor, centers: Tensor, size: List[int], channels_last: bool
) -> Tensor:
    """The gradient of the feature map of ``size`` (``(B, C, H, W)``, channels last or not)
    from the gradient of its difference rows: each row's centre gets ``+g``, its neighbour
    ``-g``, overlapping windows add up."""
    size = _check_backward(grad_rows, centers, size)
    grad_rows = grad_rows.contiguous()
    check_rows("grad_rows", grad_rows)
    # The scatter adds into the gradient.
    grad = empty_feature(grad_rows, size, channels_last, grad_rows.dtype).zero_()
    centers_call(
        _ccpl.neighbor_diff_backward,
        grad,
        size,
        channels_last,
        centers,
        raw(grad_rows),
        raw(grad),
        deterministic(),
    )
    return grad


@_neighbor_diff_backward.register_fake
def _(grad_rows, centers, size, channels_last):
    size = _check_backward(grad_rows, centers, size)
    return empty_feature(grad_rows, size, channels_last, grad_rows.dtype)


def _setup_context(ctx, inputs, output):
    feat, centers = inputs
    ctx.save_for_backward(centers)
    ctx.size = list(feat.shape)
    ctx.channels_last = channels_last("feat", feat)


def _backward(ctx, grad_rows):
    (centers,) = ctx.saved_tensors
    return _neighbor_diff_backward(grad_rows, centers, ctx.size, ctx.channels_last), None


_neighbor_diff.register_autograd(_backward, setup_context=_setup_context)


def _setup_backward_context(ctx, inputs, output):
    _, centers, _, last = inputs
    ctx.save_for_backward(centers)
    ctx.layout = torch.channels_last if last else torch.contiguous_format


def _backward_backward(ctx, grad_feat):
    # The scatter is the adjoint of the (linear) gather: its own gradient is the gather.
    (centers,) = ctx.saved_tensors
    grad_feat = grad_feat.contiguous(memory_format=ctx.layout)
    return _neighbor_diff(grad_feat, centers), None, None, None


_neighbor_diff_backward.register_autograd(
    _backward_backward, setup_context=_setup_backward_context
)
