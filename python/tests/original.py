"""The original CCPL (JarrentWu1031/CCPL, net.py: ``NeighborSample``, ``Normalize``,
``PatchNCELoss``, ``CCPL.forward``) written again from the math in plain PyTorch, to run in
float64 as the tests' oracle, as ``tools/make_goldens.py`` writes it, with the contract's three
fixes (docs/ccpl-loss.md, "Where ccpl departs from the original code"):

- the normalisation's norm has the finite derivative at a zero row (the original's
  ``x.pow(2).sum().pow(0.5)`` gives NaN there);
- the neighbour offsets are built from the clamped centre count ``N`` (the original builds
  them from ``num_s`` and crashes when ``num_s > (H-2)(W-2)``);
- ``tau`` is a real parameter.

Nothing here calls ccpl.
"""

import torch
import torch.nn.functional as F

NORM_EPS = 1e-7


class RowNorm(torch.autograd.Function):
    """``||x||_2`` along dim 1, with derivative ``x / ||x||`` and 0 (not NaN) at ``x == 0``."""

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
    """The original's ``Normalize(2)``: ``x / (||x|| + 1e-7)`` along dim 1."""
    return x.div(RowNorm.apply(x) + NORM_EPS)


def neighbor_ids(centers, width):
    """The original's ``c_ids``, ``n_ids``: column ``k*N + x`` pairs centre ``x`` with its
    neighbour ``k`` (the 3x3 window without its centre, in raster order)."""
    offsets = [-(width + 1), -width, -(width - 1), -1, 1, width - 1, width, width + 1]
    n = centers.shape[0]
    c_ids = centers.repeat(8)
    delta = torch.tensor([offsets[i // n] for i in range(8 * n)], dtype=torch.long)
    return c_ids, c_ids + delta.to(centers.device)


def difference_rows(feat, centers):
    """``feat_c - feat_n`` of ``NeighborSample``: ``(B, 8N, C)``, centre minus neighbour."""
    c_ids, n_ids = neighbor_ids(centers, feat.shape[3])
    feat_r = feat.permute(0, 2, 3, 1).flatten(1, 2)
    return feat_r[:, c_ids, :] - feat_r[:, n_ids, :]


def neighbor_sample(feat, centers, head=()):
    """``NeighborSample``: difference rows through the head, normalised: ``(B, C', S)``."""
    feat_d = difference_rows(feat, centers)
    for module in head:
        feat_d = module(feat_d)
    return normalize(feat_d.permute(0, 2, 1))


def patch_nce_loss(f_q, f_k, tau, detach_k=True):
    """``PatchNCELoss``: the positive concatenated with the negatives whose diagonal is masked
    to -inf, divided by tau, cross-entropy with target 0, the mean over the ``B*S`` rows."""
    batch, _, rows = f_q.shape
    if detach_k:
        f_k = f_k.detach()
    l_pos = (f_k * f_q).sum(dim=1)[:, :, None]
    l_neg = torch.bmm(f_q.transpose(1, 2), f_k)
    identity = torch.eye(rows, dtype=torch.bool, device=f_q.device)[None, :, :]
    l_neg = l_neg.masked_fill(identity, -float("inf"))
    logits = torch.cat((l_pos, l_neg), dim=2) / tau
    targets = torch.zeros(batch * rows, dtype=torch.long, device=f_q.device)
    return F.cross_entropy(logits.flatten(0, 1), targets)


def layer_loss(feat_q, feat_k, centers, tau, detach_k=True):
    """One layer with the identity head."""
    return patch_nce_loss(
        neighbor_sample(feat_q, centers), neighbor_sample(feat_k, centers), tau, detach_k
    )


def rows_loss(q_rows, k_rows, tau, detach_k=True):
    """The loss of a head's outputs ``(B, S, C')``: the tail of ``NeighborSample`` and
    ``PatchNCELoss``."""
    return patch_nce_loss(
        normalize(q_rows.permute(0, 2, 1)), normalize(k_rows.permute(0, 2, 1)), tau, detach_k
    )


def ccpl_forward(mlp, feats_q, feats_k, centers, start_layer, end_layer, tau):
    """``CCPL.forward`` with the given centres (one tensor per layer of the range): the sum of
    the layers' losses, each through its head ``mlp[3*i : 3*i+3]``."""
    loss = 0.0
    for j, i in enumerate(range(start_layer, end_layer)):
        head = [mlp[3 * i + m] for m in range(3)]
        f_q = neighbor_sample(feats_q[i], centers[j], head)
        f_k = neighbor_sample(feats_k[i], centers[j], head)
        loss = loss + patch_nce_loss(f_q, f_k, tau)
    return loss


def paper_mlp(channels=(64, 128, 256, 512)):
    """The original's module-level ``mlp``: ``Linear(C, C), ReLU(), Linear(C, C/4)`` per VGG
    layer (relu1_1 .. relu4_1)."""
    modules = []
    for c in channels:
        modules += [torch.nn.Linear(c, c), torch.nn.ReLU(), torch.nn.Linear(c, c // 4)]
    return torch.nn.ModuleList(modules)
