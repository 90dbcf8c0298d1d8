"""ccpl.rows_loss is CUT's PatchNCE loss (Park et al., ECCV 2020): against that loss written
here from its definition, with its per-image negatives and with negatives from the whole
minibatch (rows_loss on the batch reshaped to one image)."""

import pytest
import torch

import ccpl
from conftest import F64_GRAD_TOLERANCE, F64_LOSS_TOLERANCE, assert_close, features


def normalize(x):
    """CUT's ``Normalize(2)`` of a patch sampler's output: ``x / (||x|| + 1e-7)``."""
    return x / (x.norm(dim=-1, keepdim=True) + 1e-7)


def patch_nce(feat_q, feat_k, batch_size, nce_t, all_negatives_from_minibatch):
    """CUT's PatchNCELoss, averaged as its model does (``loss.mean()``): ``feat_q`` and
    ``feat_k`` are ``(B*S, C)`` normalised patch features (S patches per image, image-major);
    each patch's positive is its own ``k``; its negatives are the other ``k`` patches of its
    image (or of the whole minibatch), its own masked with ``-10``; cross-entropy at
    temperature ``nce_t`` with the positive as class 0; ``feat_k`` detached."""
    num_patches, dim = feat_q.shape
    feat_k = feat_k.detach()
    l_pos = (feat_q * feat_k).sum(dim=1, keepdim=True)
    groups = 1 if all_negatives_from_minibatch else batch_size
    q, k = feat_q.view(groups, -1, dim), feat_k.view(groups, -1, dim)
    npatches = q.shape[1]
    l_neg = q @ k.transpose(2, 1)
    l_neg = l_neg.masked_fill(torch.eye(npatches, dtype=torch.bool)[None], -10.0)
    out = torch.cat((l_pos, l_neg.reshape(-1, npatches)), dim=1) / nce_t
    target = torch.zeros(num_patches, dtype=torch.long)
    return torch.nn.functional.cross_entropy(out, target, reduction="none").mean()


@pytest.mark.parametrize("all_negatives", [False, True], ids=["per-image", "minibatch"])
@pytest.mark.parametrize("shape", [(1, 64, 16), (4, 32, 8), (3, 17, 5)])
def test_rows_loss_is_cuts_patch_nce(shape, all_negatives):
    b, s, c = shape
    q_rows = features(shape, seed=11).requires_grad_()
    k_rows = features(shape, seed=12)
    want = patch_nce(
        normalize(q_rows).reshape(b * s, c), normalize(k_rows).reshape(b * s, c), b, 0.07, all_negatives
    )
    (want_grad,) = torch.autograd.grad(want, q_rows)
    # Negatives from the whole minibatch: the batch is one image of B*S rows.
    as_images = (1, b * s, c) if all_negatives else shape
    got = ccpl.rows_loss(q_rows.reshape(as_images), k_rows.reshape(as_images).detach(), 0.07)
    (got_grad,) = torch.autograd.grad(got, q_rows)
    # CUT masks its own negative with -10 rather than dropping it: exp(-10/0.07) = 1e-62 of
    # the sum, far below float64's rounding.
    assert_close("PatchNCE loss", got, want, F64_LOSS_TOLERANCE)
    assert_close("PatchNCE grad of the q patches", got_grad, want_grad, F64_GRAD_TOLERANCE)
