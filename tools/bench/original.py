"""The original CCPL (JarrentWu1031/CCPL, net.py: ``NeighborSample``, ``Normalize``,
``PatchNCELoss``, ``CCPL.forward``) written again from the math in plain PyTorch. The one port
of it in the repository: the Python tests' float64 oracle (python/tests), the goldens' generator
(tools/make_goldens.py) and the PyTorch baselines of the benchmarks (tools/bench/baselines.py)
import it.

By default it has the contract's three fixes (docs/ccpl-loss.md, "Where ccpl departs from the
original code"):

- the normalisation's norm has the finite derivative at a zero row (``normalize``; the
  original's ``x.pow(2).sum().pow(0.5)``, ``original_normalize``, gives NaN there);
- the neighbour offsets are built from the clamped centre count ``N`` (the original builds
  them from ``num_s`` and crashes when ``num_s > (H-2)(W-2)``);
- ``tau`` is a real parameter.

The baselines time the original's own normalisation (``norm=original_normalize``) and its
host-built mask and targets (``host_built=True``), what the original's users pay.

Nothing here calls ccpl.
"""

import torch
import torch.nn.functional as F

NORM_EPS = 1e-7
"""Added to the row norm before dividing (spec step 5; CCPL_NORM_EPS in kernels/ccpl.h)."""


class RowNorm(torch.autograd.Function):
    """``||x||_2`` along dim 1, with derivative ``x / ||x||`` and 0 (not NaN) at ``x == 0``.

    This is the spec's choice (step 5): with it, ``x / (||x|| + eps)`` has the finite gradient
    ``g/(n+eps) - x (x.g) / (n (n+eps)^2)``, the second term 0 where ``n == 0``.
    """

    @staticmethod
    def forward(ctx, x):
        norm = x.pow(2).sum(1, keepdim=True).sqrt()
        ctx.save_for_backward(x, norm)
        return norm

    @staticmethod
    def backward(ctx, grad_norm):
        x, norm = ctx.saved_tensors
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        return torch.where(norm > 0, grad_norm * x / safe, torch.zeros_like(x))


def normalize(x):
    """The original's ``Normalize(2)``: ``x / (||x|| + 1e-7)`` along dim 1, with the finite
    norm."""
    return x.div(RowNorm.apply(x) + NORM_EPS)


def original_normalize(x):
    """``Normalize(2)`` as the original writes it: its gradient is NaN at a zero row."""
    norm = x.pow(2).sum(1, keepdim=True).pow(1.0 / 2)
    return x.div(norm + NORM_EPS)


def neighbor_offsets(width):
    """Flat offsets of the 8 neighbours, k = 0..7: (-1,-1), (-1,0), (-1,+1), (0,-1), (0,+1),
    (+1,-1), (+1,0), (+1,+1)."""
    return [-(width + 1), -width, -(width - 1), -1, 1, width - 1, width, width + 1]


def neighbor_ids(centers, width):
    """The original's ``c_ids``, ``n_ids``: column ``k*N + x`` pairs centre ``x`` with its
    neighbour ``k``. As the original, the offsets are a Python list built on the host and
    copied to the centres' device (built from ``N``, not ``num_s``: the second fix)."""
    offsets = neighbor_offsets(width)
    n = centers.shape[0]
    c_ids = centers.repeat(8)
    delta = torch.tensor([offsets[i // n] for i in range(8 * n)], dtype=torch.long)
    return c_ids, c_ids + delta.to(centers.device)


def gather_differences(feat, ids):
    """``feat_c - feat_n`` of ``NeighborSample`` at the pairs ``ids = (c_ids, n_ids)``:
    ``(B, 8N, C)``, centre minus neighbour."""
    c_ids, n_ids = ids
    feat_r = feat.permute(0, 2, 3, 1).flatten(1, 2)
    return feat_r[:, c_ids, :] - feat_r[:, n_ids, :]


def difference_rows(feat, centers):
    """The difference rows of ``feat`` at ``centers`` (flat interior indices)."""
    return gather_differences(feat, neighbor_ids(centers, feat.shape[3]))


def neighbor_sample(feat, ids, head=None, norm=normalize):
    """``NeighborSample``: difference rows through the head (a callable on ``(B, S, C)``, or
    none), normalised: ``(B, C', S)``."""
    feat_d = gather_differences(feat, ids)
    if head is not None:
        feat_d = head(feat_d)
    return norm(feat_d.permute(0, 2, 1))


def patch_nce_loss(f_q, f_k, tau, detach_k=True, host_built=False):
    """``PatchNCELoss`` (from CUT): the positive concatenated with the negatives whose diagonal
    is masked to -inf, divided by tau, cross-entropy with target 0, the mean over the ``B*S``
    rows. ``host_built``: the diagonal mask and the targets are built on the host and copied,
    every call, as the original does (the mask is S x S booleans)."""
    batch, _, rows = f_q.shape
    if detach_k:
        f_k = f_k.detach()
    l_pos = (f_k * f_q).sum(dim=1)[:, :, None]
    l_neg = torch.bmm(f_q.transpose(1, 2), f_k)
    if host_built:
        identity = torch.eye(rows, dtype=torch.bool)[None, :, :].to(f_q.device)
        targets = torch.zeros(batch * rows, dtype=torch.long).to(f_q.device)
    else:
        identity = torch.eye(rows, dtype=torch.bool, device=f_q.device)[None, :, :]
        targets = torch.zeros(batch * rows, dtype=torch.long, device=f_q.device)
    l_neg.masked_fill_(identity, -float("inf"))
    logits = torch.cat((l_pos, l_neg), dim=2) / tau
    return F.cross_entropy(logits.flatten(0, 1), targets)


def layer_loss_at(feat_q, feat_k, ids, tau, detach_k=True, head=None, norm=normalize, host_built=False):
    """One layer's loss from its feature maps ``(B, C, H, W)`` at the pairs ``ids``: both sides
    through ``neighbor_sample`` (the same head), then ``PatchNCELoss``."""
    f_q = neighbor_sample(feat_q, ids, head, norm)
    f_k = neighbor_sample(feat_k, ids, head, norm)
    return patch_nce_loss(f_q, f_k, tau, detach_k, host_built)


def layer_loss(feat_q, feat_k, centers, tau, detach_k=True):
    """One layer with the identity head, at ``centers``."""
    return layer_loss_at(feat_q, feat_k, neighbor_ids(centers, feat_q.shape[3]), tau, detach_k)


def rows_loss(q_rows, k_rows, tau, detach_k=True, norm=normalize):
    """The loss of a head's outputs ``(B, S, C')``: the tail of ``NeighborSample`` and
    ``PatchNCELoss``."""
    return patch_nce_loss(norm(q_rows.permute(0, 2, 1)), norm(k_rows.permute(0, 2, 1)), tau, detach_k)


def ccpl_forward(mlp, feats_q, feats_k, centers, start_layer, end_layer, tau):
    """``CCPL.forward`` with the given centres (one tensor per layer of the range): the sum of
    the layers' losses, each through its head ``mlp[3*i : 3*i+3]``."""
    loss = 0.0
    for j, i in enumerate(range(start_layer, end_layer)):
        head = torch.nn.Sequential(*(mlp[3 * i + m] for m in range(3)))
        ids = neighbor_ids(centers[j], feats_q[i].shape[3])
        loss = loss + layer_loss_at(feats_q[i], feats_k[i], ids, tau, head=head)
    return loss


def paper_mlp(channels=(64, 128, 256, 512)):
    """The original's module-level ``mlp``: ``Linear(C, C), ReLU(), Linear(C, C/4)`` per VGG
    layer (relu1_1 .. relu4_1)."""
    modules = []
    for c in channels:
        modules += [torch.nn.Linear(c, c), torch.nn.ReLU(), torch.nn.Linear(c, c // 4)]
    return torch.nn.ModuleList(modules)
