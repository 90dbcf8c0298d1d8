"""What the multi-layer ops share (``ccp_loss``, ``sampled_neighbor_diff``): the checks of
their lists of feature maps, and the device sampler's seed and workspace."""

import numbers
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from ._common import (
    channels_last,
    check_feature_size,
    check_float,
    check_like_first,
    check_pair,
    check_tensor,
)

SEED_BYTES = 8
"""The sampler's seed: two int32 words, low first (the device's counters hold it so)."""


def draw_seed(device: torch.device) -> Tensor:
    """The sampler's seed of one call of ``ccp_loss`` or ``sampled_neighbor_diff``: two int32
    words drawn from PyTorch's default generator of ``device``, on that device (on CUDA nothing
    reaches the host, and a CUDA graph that captures the draw draws anew at each replay)."""
    return torch.randint(-(2**31), 2**31, (2,), dtype=torch.int32, device=device)


def seed_value(seed: Tensor) -> int:
    """A seed drawn by ``draw_seed`` as the 64-bit integer the sampler is keyed with (a read
    on the host: for checking, not for a training step)."""
    low, high = (int(w) & 0xFFFFFFFF for w in seed.cpu())
    return low | high << 32


def pick_layers(feats_q: object, feats_k: object, layers: object) -> List[int]:
    for name, feats in (("feats_q", feats_q), ("feats_k", feats_k)):
        if isinstance(feats, Tensor) or not isinstance(feats, Sequence):
            raise TypeError(f"{name} must be a sequence of feature maps, one per encoder layer")
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be a sequence of layer indices, got {type(layers).__name__}")
    picked = list(layers)
    if not picked:
        raise ValueError("layers is empty: the loss needs at least one layer")
    available = min(len(feats_q), len(feats_k))
    for i in picked:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"layers holds {i!r}: layer indices are ints")
        if not 0 <= i < available:
            raise ValueError(
                f"layer {i} asked for, but feats_q and feats_k hold {len(feats_q)} and "
                f"{len(feats_k)} maps"
            )
    return [int(i) for i in picked]


def check_num_s(num_s: object) -> int:
    if isinstance(num_s, bool) or not isinstance(num_s, numbers.Integral):
        raise TypeError(f"num_s must be an int, got {type(num_s).__name__}")
    if num_s < 1:
        raise ValueError(f"num_s is {num_s}: at least one centre per layer is needed")
    return int(num_s)


def layer_shapes(feats_q: List[Tensor], feats_k: List[Tensor]) -> List[Tuple[int, int, int, int, bool]]:
    """Every map checked; each layer's `(B, C, H, W, channels_last)` for the Rust side."""
    shapes = []
    for j, (q, k) in enumerate(zip(feats_q, feats_k)):
        names = (f"feats_q[{j}]", f"feats_k[{j}]")
        check_float(names[0], q)
        check_float(names[1], k)
        check_pair(names, q, k)
        check_like_first((names[0], "feats_q[0]"), q, feats_q[0])
        last = channels_last(names[0], q)
        if channels_last(names[1], k) != last:
            raise ValueError(f"{names[0]} and {names[1]} must have the same layout")
        shapes.append((*q.shape, last))
    return shapes


def seeded_workspace(like: Tensor, layout: tuple, seed: Tensor) -> Tensor:
    """A multi-layer op's workspace of one call, as the device sampler needs it: on CUDA the
    bytes of ``layout`` ``(bytes, counters' byte offset, [(byte offset, entries)] of centre
    maps)`` zeroed, every centre map empty (-1) and the seed in the counters; on the CPU the
    seed alone (the host path draws the same centres from it)."""
    if like.device.type != "cuda":
        return seed.contiguous().view(torch.uint8).clone()
    size, counters, maps = layout
    workspace = torch.zeros(size, dtype=torch.uint8, device=like.device)
    for at, entries in maps:
        workspace[at : at + 4 * entries].view(torch.int32).fill_(-1)
    workspace[counters : counters + SEED_BYTES].copy_(seed.contiguous().view(torch.uint8))
    return workspace


def check_seed(seed: Tensor, device: torch.device) -> None:
    seed = check_tensor("seed", seed)
    if seed.dtype != torch.int32 or tuple(seed.shape) != (2,) or seed.device != device:
        raise ValueError(
            f"seed must be two int32 words on {device} (draw_seed), got {seed.dtype} of shape "
            f"{tuple(seed.shape)} on {seed.device}"
        )




def flat_sizes(shapes: list) -> List[int]:
    """Layers' `(B, C, H, W, channels_last)` as a backward op takes them: one list of ints."""
    return [n for s in shapes for n in (*s[:4], int(s[4]))]


def sized_shapes(sizes: object) -> list:
    """`flat_sizes`' list back as the layers' `(B, C, H, W, channels_last)`, checked."""
    if not isinstance(sizes, (list, tuple)) or len(sizes) % 5 or not sizes:
        raise ValueError(f"sizes must hold (B, C, H, W, channels_last) per layer, got {sizes!r}")
    return [
        (*check_feature_size(sizes[i : i + 4]), bool(sizes[i + 4])) for i in range(0, len(sizes), 5)
    ]
