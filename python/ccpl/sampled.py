"""Every layer's difference rows at centres drawn on the device, what a learned head runs on:
``sampled_neighbor_diff`` (forward, backward, autograd).

On CUDA it is the crate's ``SampledRowsPlan``: one launch draws the centres of every layer
with the crate's Philox sampler and gathers both sides' difference rows, and the backward is
one launch that scatters every layer's row gradients into the feature-map gradients. Nothing
is built on the host and nothing waits for the device, so a training step with it can be
captured in a CUDA graph: the seed is drawn on the device from PyTorch's generator, and each
replay draws it anew. On the CPU, the float64 reference at the very same centres.
"""

# The custom ops' annotations are real types, not strings (no `from __future__ import
# annotations`), and typing's List: torch before 2.7 infers a schema from neither
# strings nor `list[int]`.
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _ccpl
from ._common import (
    check_dtype,
    empty_feature,
    first_order_only,
    on_device,
    raw,
    target,
)
from ._layers import (
    SEED_BYTES,
    check_num_s,
    check_seed,
    draw_seed,
    flat_sizes,
    layer_shapes,
    pick_layers,
    seeded_workspace,
    sized_shapes,
)

MAX_LAYERS: int = _ccpl.SMALL_S_MAX_LAYERS
"""The most layers one call takes."""


def sampled_neighbor_diff(
    feats_q: Sequence[Tensor],
    feats_k: Sequence[Tensor],
    num_s: int,
    layers: Sequence[int],
    *,
    seed: Optional[Tensor] = None,
) -> Tuple[List[Tensor], List[Tensor]]:
    """The difference rows (centre minus neighbour) of both sides of every encoder layer in
    ``layers`` (indices into ``feats_q`` and ``feats_k``), at centres drawn on the device: for
    each layer ``min(num_s, (H-2)(W-2))`` distinct interior positions shared by the batch and
    both sides, as ``neighbor_diff`` lays the rows out. Returns ``(rows_q, rows_k)``, one
    ``(B, 8N, C)`` tensor per layer each, in the features' dtype: what a learned head takes
    before ``rows_loss``.

    Every layer's ``8N`` must be at most 512 (``num_s <= 64``: the paper's sizes) and at most
    ``MAX_LAYERS`` layers are taken; ``neighbor_diff`` with ``sample_centers`` serves the rest.
    The centres are new at every call and reproducible under ``torch.manual_seed``: the
    sampler's ``seed`` (default: ``draw_seed`` of the features' device) gives layer ``j`` of
    ``layers`` the centres ``loss_centers(H, W, num_s, seed_value(seed), j)``, on the CPU as
    on CUDA. Differentiable in both sides. Every map: ``(B, C, H, W)``, contiguous or
    channels_last, ``feats_q[i]`` and ``feats_k[i]`` of one shape and layout, every layer of
    one dtype and device (float32, float16 or bfloat16 on CUDA; float64 too on the CPU).

    >>> q = [torch.randn(2, 8, 6, 7)]
    >>> rows_q, rows_k = sampled_neighbor_diff(q, [torch.randn(2, 8, 6, 7)], 4, [0])
    >>> rows_q[0].shape  # (B, 8N, C)
    torch.Size([2, 32, 8])
    """
    picked = pick_layers(feats_q, feats_k, layers)
    qs = [feats_q[i] for i in picked]
    ks = [feats_k[i] for i in picked]
    num_s = check_num_s(num_s)
    layer_shapes(qs, ks)
    device = qs[0].device
    seed = draw_seed(device) if seed is None else seed
    check_seed(seed, device)
    rows = _sampled(qs, ks, seed, num_s)
    return rows[: len(qs)], rows[len(qs) : 2 * len(qs)]


def takes(shapes: Sequence[Tuple[int, int, int, int]], num_s: int) -> bool:
    """Whether layers of ``(B, C, H, W)`` ``shapes`` with ``num_s`` centres asked for take
    ``sampled_neighbor_diff``: at most ``MAX_LAYERS`` of them, each of ``8N <= 512`` rows."""
    limit = _ccpl.SMALL_S_MAX_ROWS
    return 0 < len(shapes) <= MAX_LAYERS and all(
        h >= 3 and w >= 3 and 8 * min(num_s, (h - 2) * (w - 2)) <= limit for _, _, h, w in shapes
    )


def _rows_like(feats_q: List[Tensor], shapes: list, num_s: int) -> List[Tensor]:
    """Empty outputs: each layer's `(B, 8N, C)` rows of q, then of k, then the workspace."""
    counts = _ccpl.sampled_rows(shapes, num_s)
    return [f.new_empty((f.shape[0], s, f.shape[1])) for f, s in zip(feats_q * 2, counts * 2)]


def _workspace_bytes(device: torch.device, shapes: list, num_s: int) -> int:
    """The bytes of the workspace the backward reads (the seed alone on the CPU)."""
    if device.type != "cuda":
        return SEED_BYTES
    return _ccpl.sampled_layout(shapes, num_s)[0]


@torch.library.custom_op("ccpl::sampled_neighbor_diff", mutates_args=())
def _sampled(
    feats_q: List[Tensor], feats_k: List[Tensor], seed: Tensor, num_s: int
) -> List[Tensor]:
    shapes = layer_shapes(feats_q, feats_k)
    like = feats_q[0]
    check_seed(seed, like.device)
    rows = _rows_like(feats_q, shapes, num_s)
    layout = None
    if like.device.type == "cuda":
        size, counters, maps = _ccpl.sampled_layout(shapes, num_s)
        layout = (size, counters, [maps])
    workspace = seeded_workspace(like, layout, seed)
    layers = len(feats_q)
    with on_device(like):
        _ccpl.sampled_forward(
            target(like),
            shapes,
            num_s,
            [(raw(q), raw(k)) for q, k in zip(feats_q, feats_k)],
            [(raw(q), raw(k)) for q, k in zip(rows[:layers], rows[layers:])],
            raw(workspace),
        )
    return [*rows, workspace]


@_sampled.register_fake
def _(feats_q, feats_k, seed, num_s):
    shapes = layer_shapes(feats_q, feats_k)
    like = feats_q[0]
    check_seed(seed, like.device)
    size = _workspace_bytes(like.device, shapes, num_s)
    return [*_rows_like(feats_q, shapes, num_s), like.new_empty((size,), dtype=torch.uint8)]


def _check_backward(grads_q, grads_k, workspace, sizes, dtype, num_s) -> list:
    """The backward op's arguments as the forward made them, checked before any work; the
    layers' `(B, C, H, W, channels_last)`."""
    device = workspace.device
    check_dtype("the features", dtype, device)
    shapes = sized_shapes(sizes)
    counts = _ccpl.sampled_rows(shapes, num_s)
    # On CUDA the scatter reads float32 row gradients, on the CPU the features' dtype.
    rows_dtype = torch.float32 if device.type == "cuda" else dtype
    for side, grads in (("q", grads_q), ("k", grads_k)):
        if side == "k" and not grads:
            continue
        if len(grads) != len(shapes):
            raise ValueError(f"{len(grads)} row gradients of {side} for {len(shapes)} layers")
        for j, (g, (b, c, _, _, _), s) in enumerate(zip(grads, shapes, counts)):
            want = (b, s, c)
            if g.device != device or g.dtype != rows_dtype or tuple(g.shape) != want:
                raise ValueError(
                    f"row gradient {j} of {side} is {g.dtype} {tuple(g.shape)} on {g.device}; "
                    f"the backward takes {rows_dtype} {want} on {device}"
                )
            if not g.is_contiguous():
                raise ValueError(f"row gradient {j} of {side} is not contiguous")
    expected = (_workspace_bytes(device, shapes, num_s),)
    if workspace.dtype != torch.uint8 or tuple(workspace.shape) != expected:
        raise ValueError(
            f"workspace is {workspace.dtype} of shape {tuple(workspace.shape)}, the forward "
            f"keeps uint8 of shape {expected}"
        )
    return shapes


def _grads_like(workspace: Tensor, shapes: list, dtype: torch.dtype, sides: int) -> List[Tensor]:
    return [empty_feature(workspace, s[:4], s[4], dtype) for s in shapes * sides]


@torch.library.custom_op("ccpl::sampled_neighbor_diff_backward", mutates_args=())
def _sampled_backward(
    grads_q: List[Tensor],
    grads_k: List[Tensor],
    workspace: Tensor,
    sizes: List[int],
    dtype: torch.dtype,
    num_s: int,
) -> List[Tensor]:
    shapes = _check_backward(grads_q, grads_k, workspace, sizes, dtype, num_s)
    # The scatter adds into the gradients.
    grads = [g.zero_() for g in _grads_like(workspace, shapes, dtype, 2 if grads_k else 1)]
    # The scatter's factor: the row gradients carry the upstream gradient already.
    one = torch.ones(1, dtype=torch.float32, device=workspace.device)
    layers = len(shapes)
    with on_device(workspace):
        _ccpl.sampled_backward(
            target(grads[0]),
            shapes,
            num_s,
            raw(workspace),
            raw(one),
            ([raw(g) for g in grads_q], [raw(g) for g in grads_k] if grads_k else None),
            ([raw(g) for g in grads[:layers]], [raw(g) for g in grads[layers:]] if grads_k else None),
        )
    return grads


@_sampled_backward.register_fake
def _(grads_q, grads_k, workspace, sizes, dtype, num_s):
    shapes = _check_backward(grads_q, grads_k, workspace, sizes, dtype, num_s)
    return _grads_like(workspace, shapes, dtype, 2 if grads_k else 1)


def _setup_context(ctx, inputs, output):
    feats_q, feats_k, _, num_s = inputs
    workspace = output[-1]
    ctx.mark_non_differentiable(workspace)
    ctx.save_for_backward(workspace)
    ctx.layers = len(feats_q)
    ctx.sizes = flat_sizes(layer_shapes(feats_q, feats_k))
    ctx.dtype, ctx.num_s = feats_q[0].dtype, num_s
    ctx.rows_shapes = [tuple(r.shape) for r in output[:-1]]


def _row_grads(ctx, grads, like: Tensor) -> List[Tensor]:
    """The upstream gradients of one side's rows as the backward op reads them (a zero where
    autograd gives none)."""
    dtype = torch.float32 if like.device.type == "cuda" else ctx.dtype
    return [
        torch.zeros(shape, dtype=dtype, device=like.device)
        if g is None
        else g.to(dtype).contiguous()
        for g, shape in zip(grads, ctx.rows_shapes)
    ]


def _backward(ctx, grads):
    layers = ctx.layers
    want_q = any(ctx.needs_input_grad[0])
    want_k = any(ctx.needs_input_grad[1])
    if not (want_q or want_k):
        return None, None, None, None
    (workspace,) = ctx.saved_tensors
    grads_q = _row_grads(ctx, grads[:layers], workspace)
    grads_k = _row_grads(ctx, grads[layers : 2 * layers], workspace) if want_k else []
    feat_grads = _sampled_backward(grads_q, grads_k, workspace, ctx.sizes, ctx.dtype, ctx.num_s)
    grads_feat_q = feat_grads[:layers] if want_q else [None] * layers
    grads_feat_k = feat_grads[layers:] if want_k else [None] * layers
    tied = first_order_only("sampled_neighbor_diff", [*grads_feat_q, *grads_feat_k])
    return tied[:layers], tied[layers:], None, None


_sampled.register_autograd(_backward, setup_context=_setup_context)
