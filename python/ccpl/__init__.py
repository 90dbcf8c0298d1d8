"""ccpl: the Contrastive Coherence Preserving loss (CCPL, Wu et al., ECCV 2022) for PyTorch, on
handwritten CUDA kernels (CUDA tensors) and a float64 reference (CPU tensors).

- ``CCPL(mlp)``: a drop-in for the original's module (same constructor, forward and state
  dict), with its three defects fixed;
- ``ccp_loss``: the whole loss with the identity head, every layer in one call, the centres
  drawn on the device;
- ``ccp_layer_loss``: one layer's loss with the identity head;
- ``sampled_neighbor_diff`` (every layer's difference rows at centres drawn on the device) or
  ``neighbor_diff`` (at given centres), then your head, then ``rows_loss``: the loss with a
  learned head;
- ``sample_centers``: the centres of one layer.

The ops are ``torch.library`` custom ops (``torch.ops.ccpl.*``): autograd, ``torch.compile``
and ``torch.library.opcheck`` work with them. On CUDA they run on the current stream of the
tensors' device and never wait on the host.
"""

import torch

from ._ccpl import kernels_built
from ._ccpl import version as _version
from ._common import DEFAULT_TAU, warn_without_kernels
from .layer import ccp_layer_loss
from ._layers import draw_seed, seed_value
from .loss import ccp_loss, loss_centers
from .module import CCPL
from .neighbor import neighbor_diff, sample_centers
from .rows import rows_loss, rows_loss_sum
from .sampled import sampled_neighbor_diff

__version__ = _version()

warn_without_kernels(torch.cuda.is_available(), kernels_built())

__all__ = [
    "CCPL",
    "DEFAULT_TAU",
    "ccp_layer_loss",
    "ccp_loss",
    "draw_seed",
    "kernels_built",
    "loss_centers",
    "neighbor_diff",
    "rows_loss",
    "rows_loss_sum",
    "sample_centers",
    "sampled_neighbor_diff",
    "seed_value",
]
