"""``ccpl.CCPL``: a drop-in for the original's ``CCPL`` module (JarrentWu1031/CCPL, net.py)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import sampled
from ._common import DEFAULT_TAU, check_tau
from .neighbor import neighbor_diff, sample_centers
from .rows import rows_loss_sum

HEAD_MODULES = 3
"""Modules of one layer's projection head in ``mlp``: ``Linear(C, C), ReLU(), Linear(C, C/4)``."""


class CCPL(nn.Module):
    """The Contrastive Coherence Preserving loss over several encoder layers, with the original
    module's constructor, forward and state dict, on ccpl's kernels.

    ``mlp`` is the original's ``nn.ModuleList`` of three modules per encoder layer
    (``Linear(C, C), ReLU(), Linear(C, C // 4)``): layer ``i``'s head is ``mlp[3*i : 3*i+3]``.

    For each layer ``i`` in ``range(start_layer, end_layer)``: centres are drawn
    (``min(num_s, (H-2)(W-2))`` distinct interior positions, shared by the batch and by both
    sides), the difference rows (centre minus neighbour) of ``feats_q[i]`` (generated image)
    and ``feats_k[i]`` (content image) go through the layer's head, and the rows loss
    (normalisation, InfoNCE at ``tau``, mean) is summed over the layers.

    At the paper's sizes (every layer's ``8N <= 512``, at most ``sampled.MAX_LAYERS`` layers)
    the centres are drawn on the device and every layer's rows of both sides gathered in one
    call (``sampled_neighbor_diff``), and on CUDA every layer's loss is one launch of the
    small-S kernels (``rows_loss_sum``): per training step, one launch gathers, one gives every
    layer's loss and the gradient of its head's rows, one scales those gradients, one scatters
    every layer's into the features, nothing built on the host and nothing waiting for it, so
    that a whole training step can be captured in a CUDA graph (each replay drawing new
    centres). Otherwise, and with ``centers`` given, the centres come from ``sample_centers``
    (or the caller) and the rows from ``neighbor_diff``, layer by layer. The content
    side is detached after its head, as in the original: the heads get their gradients through
    the generated side. The original's three defects are fixed: the centre count is clamped
    (the original crashes when ``num_s > (H-2)(W-2)``), the gradient at a zero row is finite
    (the original's is NaN), and ``tau`` is used (the original's ``Net`` never passes it on).

    >>> mlp = nn.ModuleList([nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)])
    >>> feats = [torch.randn(2, 8, 6, 6)]
    >>> loss = CCPL(mlp)(feats, [torch.randn(2, 8, 6, 6)], num_s=4, start_layer=0, end_layer=1)
    >>> loss.shape
    torch.Size([])
    """

    def __init__(self, mlp: nn.ModuleList):
        super().__init__()
        self.mlp = mlp

    def forward(
        self,
        feats_q: Sequence[Tensor],
        feats_k: Sequence[Tensor],
        num_s: int,
        start_layer: int,
        end_layer: int,
        tau: float = DEFAULT_TAU,
        centers: Optional[Sequence[Tensor]] = None,
    ) -> Tensor:
        """The loss summed over layers ``start_layer .. end_layer - 1`` of ``feats_q`` and
        ``feats_k`` (sequences of ``(B, C, H, W)`` feature maps indexed by layer).

        ``centers``: optional, one 1-D int64 CPU tensor of flat interior indices ``h*W + w``
        per layer of the range, in sampling order, in place of a fresh draw (to compare with
        the original on the same sampling); ``num_s`` is then unused.
        """
        layers = range(start_layer, end_layer)
        if len(layers) == 0:
            raise ValueError(
                f"no layer in range({start_layer}, {end_layer}): the loss needs at least one"
            )
        if len(self.mlp) < HEAD_MODULES * end_layer:
            raise ValueError(
                f"mlp holds {len(self.mlp)} modules, the heads of {len(self.mlp) // HEAD_MODULES}"
                f" layers (three modules each); layer {end_layer - 1} was asked for"
            )
        if centers is not None and len(centers) != len(layers):
            raise ValueError(
                f"centers holds {len(centers)} tensors, one per layer of "
                f"range({start_layer}, {end_layer}) is needed"
            )
        tau = check_tau(tau)
        if centers is None and _takes_sampled(feats_q, layers, num_s):
            diffs_q, diffs_k = sampled.sampled_neighbor_diff(feats_q, feats_k, num_s, layers)
        else:
            diffs_q, diffs_k = [], []
            for j, i in enumerate(layers):
                feat_q, feat_k = feats_q[i], feats_k[i]
                if centers is None:
                    layer_centers = sample_centers(feat_q.shape[2], feat_q.shape[3], num_s)
                else:
                    layer_centers = centers[j]
                diffs_q.append(neighbor_diff(feat_q, layer_centers))
                diffs_k.append(neighbor_diff(feat_k, layer_centers))
        rows_q = [self._head(i, diff) for i, diff in zip(layers, diffs_q)]
        # The original detaches the content side after its head: no graph is needed there.
        with torch.no_grad():
            rows_k = [self._head(i, diff) for i, diff in zip(layers, diffs_k)]
        return rows_loss_sum(rows_q, rows_k, tau)

    def _head(self, layer: int, rows: Tensor) -> Tensor:
        for module in self.mlp[HEAD_MODULES * layer : HEAD_MODULES * (layer + 1)]:
            rows = module(rows)
        return rows


def _takes_sampled(feats_q: Sequence[Tensor], layers: range, num_s: int) -> bool:
    """Whether the layers take the one-call sampled path: feature maps, each of ``8N <= 512``
    rows, at most ``sampled.MAX_LAYERS`` of them (anything else, the layer-by-layer path,
    whose checks name what is wrong)."""
    maps = [feats_q[i] for i in layers]
    if not all(isinstance(f, Tensor) and f.dim() == 4 for f in maps):
        return False
    return sampled.takes([tuple(f.shape) for f in maps], num_s)
