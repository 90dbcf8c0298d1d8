"""The whole CCP loss with the identity head, every layer in one call: ``ccp_loss`` (forward,
backward, autograd).

On CUDA it is the crate's whole loss (``ccpl::cuda::CcpLoss``'s launches): the centres of
every layer drawn on the device by the crate's Philox sampler, and for the layers of
``S = 8N <= 512`` (``num_s <= 64``, the paper's sizes) three launches for all of them, forward
and backward together. The sampler's seed is drawn from PyTorch's default generator of the
features' device (on CUDA on the device: no host wait), so the centres follow
``torch.manual_seed`` and are new at every call. The forward op returns the loss and the
crate's workspace, which autograd keeps for the backward.
"""

# The custom ops' annotations are real types, not strings (no `from __future__ import
# annotations`), and typing's List: torch before 2.7 infers a schema from neither
# strings nor `list[int]`.
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from . import _ccpl
from ._common import (
    DEFAULT_TAU,
    check_dtype,
    check_tau,
    check_tensor,
    check_upstream,
    first_order_only,
    loss_dtype,
    on_device,
    raw,
    target,
    upstream_of,
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

def ccp_loss(
    feats_q: Sequence[Tensor],
    feats_k: Sequence[Tensor],
    num_s: int,
    layers: Sequence[int],
    tau: float = DEFAULT_TAU,
    *,
    grad_k: bool = False,
) -> Tensor:
    """The CCP loss with the identity head (no MLP), summed over the encoder layers
    ``layers`` (indices into ``feats_q`` and ``feats_k``, e.g. ``range(start_layer,
    end_layer)``), with centres drawn on the device: for each layer, ``min(num_s, (H-2)(W-2))``
    distinct interior positions shared by the batch and both sides, then the layer's loss as
    ``ccp_layer_loss`` computes it.

    The centres are new at every call and reproducible under ``torch.manual_seed``: the
    sampler's seed is drawn from PyTorch's default generator of the features' device
    (``draw_seed``), and layer ``j`` of ``layers`` takes the centres
    ``loss_centers(H, W, num_s, seed, j)``. The CPU path (the float64 reference) draws the
    same centres as the CUDA path from the same seed.

    Differentiable in ``feats_q``; in ``feats_k`` only with ``grad_k=True`` (the original
    detaches the content side). Every map: ``(B, C, H, W)``, contiguous or channels_last,
    ``feats_q[i]`` and ``feats_k[i]`` of one shape and layout, every layer of one dtype and
    device (float32, float16 or bfloat16 on CUDA; float64 too on the CPU). Returns a 0-dim
    float32 tensor (float64 for float64 features).
    """
    picked = pick_layers(feats_q, feats_k, layers)
    qs = [check_tensor(f"feats_q[{i}]", feats_q[i]) for i in picked]
    ks = [check_tensor(f"feats_k[{i}]", feats_k[i]) for i in picked]
    num_s, tau = check_num_s(num_s), check_tau(tau)
    layer_shapes(qs, ks)
    seed = draw_seed(qs[0].device)
    return _loss(qs, ks, seed, num_s, tau, bool(grad_k))[0]


def loss_centers(height: int, width: int, num_s: int, seed: int, layer: int) -> Tensor:
    """The centres ``ccp_loss`` takes in its ``layer``-th layer (position in ``layers``) of a
    ``height x width`` map under ``seed`` (``seed_value``): a 1-D int64 CPU tensor of flat
    indices, as ``ccp_layer_loss`` takes them."""
    flat = _ccpl.philox_centers((height, width), num_s, (seed, 0, layer))
    return torch.tensor(flat, dtype=torch.int64)


def _workspace(like: Tensor, shapes: list, num_s: int, tau: float, seed: Tensor) -> Tensor:
    """The workspace of one call: on CUDA the crate's, seeded; on the CPU the seed alone."""
    layout = None
    if like.device.type == "cuda":
        layout = _ccpl.loss_layout(shapes, num_s, tau, like.element_size())
    return seeded_workspace(like, layout, seed)


def _workspace_bytes(
    device: torch.device, dtype: torch.dtype, shapes: list, num_s: int, tau: float
) -> int:
    """The bytes of the workspace `ccp_loss` keeps for its backward (the seed alone on the CPU)."""
    if device.type != "cuda":
        return SEED_BYTES
    size, _, _ = _ccpl.loss_layout(shapes, num_s, tau, dtype.itemsize)
    return size


def _empty_workspace(like: Tensor, shapes: list, num_s: int, tau: float) -> Tensor:
    size = _workspace_bytes(like.device, like.dtype, shapes, num_s, tau)
    return like.new_empty((size,), dtype=torch.uint8)


def _pairs(feats_q: List[Tensor], feats_k: List[Tensor]) -> list:
    return [(raw(q), raw(k)) for q, k in zip(feats_q, feats_k)]


@torch.library.custom_op("ccpl::ccp_loss", mutates_args=())
def _loss(
    feats_q: List[Tensor], feats_k: List[Tensor], seed: Tensor, num_s: int, tau: float, grad_k: bool
) -> Tuple[Tensor, Tensor]:
    shapes = layer_shapes(feats_q, feats_k)
    like = feats_q[0]
    check_seed(seed, like.device)
    loss = like.new_empty((), dtype=loss_dtype(like.dtype))
    workspace = _workspace(like, shapes, num_s, tau, seed)
    with on_device(like):
        _ccpl.loss_forward(
            target(like), shapes, num_s, tau, _pairs(feats_q, feats_k), raw(workspace), raw(loss)
        )
    return loss, workspace


@_loss.register_fake
def _(feats_q, feats_k, seed, num_s, tau, grad_k):
    shapes = layer_shapes(feats_q, feats_k)
    like = feats_q[0]
    check_seed(seed, like.device)
    return like.new_empty((), dtype=loss_dtype(like.dtype)), _empty_workspace(
        like, shapes, num_s, tau
    )


def _check_backward(grad, workspace, feats_q, feats_k, sizes, dtype, num_s, tau) -> list:
    """The backward op's arguments as the forward made them, checked before any work; the
    layers' `(B, C, H, W, channels_last)`."""
    workspace = check_tensor("workspace", workspace)
    device = workspace.device
    check_dtype("the features", dtype, device)
    shapes = sized_shapes(sizes)
    if device.type != "cuda":
        # The CPU half reads the maps again: they must be the forward's, of `dtype`.
        if layer_shapes(feats_q, feats_k) != shapes:
            raise ValueError("the feature maps are not those of the forward")
        if feats_q[0].dtype != dtype or feats_q[0].device != device:
            raise TypeError(
                f"the feature maps are {feats_q[0].dtype} on {feats_q[0].device}, the "
                f"backward was asked for {dtype} on {device}"
            )
    expected = (_workspace_bytes(device, dtype, shapes, num_s, tau),)
    if workspace.dtype != torch.uint8 or tuple(workspace.shape) != expected:
        raise ValueError(
            f"workspace is {workspace.dtype} of shape {tuple(workspace.shape)}, the forward "
            f"keeps uint8 of shape {expected}"
        )
    check_upstream(grad, device)
    check_tau(tau)
    return shapes


@torch.library.custom_op("ccpl::ccp_loss_backward", mutates_args=())
def _loss_backward(
    grad: Tensor,
    workspace: Tensor,
    feats_q: List[Tensor],
    feats_k: List[Tensor],
    sizes: List[int],
    dtype: torch.dtype,
    num_s: int,
    tau: float,
    grad_k: bool,
) -> List[Tensor]:
    shapes = _check_backward(grad, workspace, feats_q, feats_k, sizes, dtype, num_s, tau)
    # The backward adds into the gradients, as the kernels' scatter does.
    grads = [_empty_grad(workspace, s, dtype).zero_() for s in shapes * (2 if grad_k else 1)]
    upstream = upstream_of(grad, dtype)
    layers = len(shapes)
    with on_device(workspace):
        _ccpl.loss_backward(
            target(grads[0]),
            shapes,
            num_s,
            tau,
            raw(workspace),
            _pairs(feats_q, feats_k),
            raw(upstream),
            ([raw(g) for g in grads[:layers]], [raw(g) for g in grads[layers:]] if grad_k else None),
        )
    return grads


def _empty_grad(like: Tensor, shape: tuple, dtype: torch.dtype) -> Tensor:
    layout = torch.channels_last if shape[4] else torch.contiguous_format
    return torch.empty(shape[:4], dtype=dtype, device=like.device, memory_format=layout)


@_loss_backward.register_fake
def _(grad, workspace, feats_q, feats_k, sizes, dtype, num_s, tau, grad_k):
    shapes = _check_backward(grad, workspace, feats_q, feats_k, sizes, dtype, num_s, tau)
    return [_empty_grad(workspace, s, dtype) for s in shapes * (2 if grad_k else 1)]


def _setup_context(ctx, inputs, output):
    feats_q, feats_k, _, num_s, tau, grad_k = inputs
    _, workspace = output
    ctx.mark_non_differentiable(workspace)
    # The CUDA backward reads the workspace alone; the CPU's recomputes from the maps.
    on_host = workspace.device.type != "cuda"
    ctx.layers = len(feats_q)
    ctx.save_for_backward(workspace, *((*feats_q, *feats_k) if on_host else ()))
    ctx.sizes = flat_sizes(layer_shapes(feats_q, feats_k))
    ctx.dtype, ctx.num_s, ctx.tau, ctx.grad_k = feats_q[0].dtype, num_s, tau, grad_k


def _backward(ctx, grad, _workspace):
    layers = ctx.layers
    want_q = any(ctx.needs_input_grad[0])
    want_k = ctx.grad_k and any(ctx.needs_input_grad[1])
    if not (want_q or want_k):
        return None, None, None, None, None, None
    workspace, *feats = ctx.saved_tensors
    grads = _loss_backward(
        grad,
        workspace,
        feats[:layers] if feats else [],
        feats[layers:] if feats else [],
        ctx.sizes,
        ctx.dtype,
        ctx.num_s,
        ctx.tau,
        want_k,
    )
    grads_q = grads[:layers] if want_q else [None] * layers
    grads_k = grads[layers:] if want_k else [None] * layers
    tied = first_order_only("ccp_loss", [*grads_q, *grads_k])
    return tied[:layers], tied[layers:], None, None, None, None


_loss.register_autograd(_backward, setup_context=_setup_context)
