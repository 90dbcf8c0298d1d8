"""Autograd hygiene of every op: second derivatives (taken, or refused with a clear error,
never a silent zero), the backward ops' own checks on a direct call, and what a forward keeps
for its backward."""

import warnings

import pytest
import torch

import ccpl
from conftest import centers_for, features

SHAPE = (2, 3, 6, 7)


def layer_inputs():
    feat_q = features(SHAPE, seed=1).requires_grad_()
    return feat_q, features(SHAPE, seed=2), centers_for(6, 7, 5)


def rows_inputs():
    return features((2, 16, 5), seed=3).requires_grad_(), features((2, 16, 5), seed=4)


@pytest.mark.parametrize(
    "op, loss_and_input",
    [
        ("ccp_layer_loss", lambda: (lambda q, k, c: (ccpl.ccp_layer_loss(q, k, c), q))(*layer_inputs())),
        ("rows_loss", lambda: (lambda q, k: (ccpl.rows_loss(q, k), q))(*rows_inputs())),
    ],
)
def test_a_second_derivative_of_a_loss_is_refused_not_zero(op, loss_and_input):
    loss, x = loss_and_input()
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    # A gradient penalty: its part through the loss has no formula here; it must not vanish.
    penalty = grad.pow(2).sum() + x.sum()
    with pytest.raises(RuntimeError, match=f"ccpl.{op} has no second derivative"):
        penalty.backward()


def test_a_first_derivative_under_create_graph_is_still_exact():
    feat_q, feat_k, centers = layer_inputs()
    (plain,) = torch.autograd.grad(ccpl.ccp_layer_loss(feat_q, feat_k, centers), feat_q)
    (graphed,) = torch.autograd.grad(
        ccpl.ccp_layer_loss(feat_q, feat_k, centers), feat_q, create_graph=True
    )
    assert torch.equal(plain, graphed.detach())


@pytest.mark.parametrize("last", [False, True])
def test_neighbor_diff_has_every_derivative(last):
    feat = features(SHAPE, seed=5, channels_last=last).requires_grad_()
    centers = centers_for(6, 7, 4)
    op = lambda f: ccpl.neighbor_diff(f, centers)  # noqa: E731
    assert torch.autograd.gradgradcheck(op, (feat,))
    # The scatter's own gradient is the gather: d/dg <scatter(g), v> = neighbor_diff(v).
    grad_rows = features((2, 32, 3), seed=6).requires_grad_()
    scattered = torch.ops.ccpl.neighbor_diff_backward(grad_rows, centers, list(SHAPE), last)
    probe = features(SHAPE, seed=7)
    (got,) = torch.autograd.grad((scattered * probe).sum(), grad_rows)
    assert torch.equal(got, ccpl.neighbor_diff(probe, centers))


def saved_layer():
    feat_q, feat_k, centers = layer_inputs()
    _, saved_rows, stats = torch.ops.ccpl.ccp_layer_loss(feat_q, feat_k, centers, 0.07, False)
    return saved_rows, stats, centers


def saved_rows_loss():
    q, k = rows_inputs()
    _, saved_rows, stats = torch.ops.ccpl.rows_loss(q, k, 0.07)
    return saved_rows, stats


ONE = torch.ones((), dtype=torch.float64)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s, t, c: (ONE, s.float(), t, c, list(SHAPE), False, torch.float64), TypeError, "saved rows has dtype"),
        (lambda s, t, c: (ONE, s, t[:, :1], c, list(SHAPE), False, torch.float64), ValueError, "saved statistics has shape"),
        (lambda s, t, c: (ONE, s, t, c, [2, 4, 6, 7], False, torch.float64), ValueError, "saved rows has shape"),
        (lambda s, t, c: (ONE, s, t, c[:-1], list(SHAPE), False, torch.float64), ValueError, "saved rows has shape"),
        (lambda s, t, c: (ONE, s, t, c, [2, 3, 6], False, torch.float64), ValueError, "size must be"),
        (lambda s, t, c: (ONE, s, t, c, list(SHAPE), False, torch.int32), TypeError, "dtype torch.int32"),
        (lambda s, t, c: (torch.ones(2), s, t, c, list(SHAPE), False, torch.float64), ValueError, "one value"),
        (lambda s, t, c: (ONE, s.transpose(2, 3), t, c, list(SHAPE), False, torch.float64), ValueError, "shape"),
    ],
)
def test_the_layer_loss_backward_op_checks_its_arguments(call, error, match):
    saved_rows, stats, centers = saved_layer()
    with pytest.raises(error, match=match):
        torch.ops.ccpl.ccp_layer_loss_backward(*call(saved_rows, stats, centers), 0.07, False)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s, t: (ONE, s.float(), t, torch.float64), TypeError, "saved rows has dtype"),
        (lambda s, t: (ONE, s, t.float(), torch.float64), TypeError, "saved statistics has dtype"),
        (lambda s, t: (ONE, s[:2], t, torch.float64), ValueError, "saved rows has shape"),
        (lambda s, t: (ONE, s, t[..., 1:], torch.float64), ValueError, "saved statistics has shape"),
        (lambda s, t: (ONE, s[0], t, torch.float64), ValueError, r"\(K, B, S, C\)"),
        (lambda s, t: (ONE, s, t, torch.int64), TypeError, "dtype torch.int64"),
        (lambda s, t: (ONE[None, None], s, t, torch.float64), ValueError, None),
        (lambda s, t: (ONE, s.transpose(2, 3).contiguous().transpose(2, 3), t, torch.float64), ValueError, "not contiguous"),
    ],
)
def test_the_rows_loss_backward_op_checks_its_arguments(call, error, match):
    saved_rows, stats = saved_rows_loss()
    args = call(saved_rows, stats)
    if match is None:
        # A (1, 1) upstream gradient is one value: accepted.
        torch.ops.ccpl.rows_loss_backward(*args, 0.07, False)
        return
    with pytest.raises(error, match=match):
        torch.ops.ccpl.rows_loss_backward(*args, 0.07, False)


@pytest.mark.parametrize(
    "grad_rows, size, error, match",
    [
        (torch.zeros(2, 32, 3, dtype=torch.int64), SHAPE, TypeError, "grad_rows has dtype"),
        (torch.zeros(2, 31, 3), SHAPE, ValueError, "grad_rows has shape"),
        (torch.zeros(2, 32, 4), SHAPE, ValueError, "grad_rows has shape"),
        (torch.zeros(2, 32, 3), (2, 3, 6), ValueError, "size must be"),
        (torch.zeros(2, 32, 3), (2, 3, 0, 7), ValueError, "size must be"),
    ],
)
def test_the_neighbor_diff_backward_op_checks_its_arguments(grad_rows, size, error, match):
    with pytest.raises(error, match=match):
        torch.ops.ccpl.neighbor_diff_backward(grad_rows, centers_for(6, 7, 4), list(size), False)


def saved_by(loss_of):
    """The tensors autograd keeps for the backward of `loss_of()`."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss_of()
    return saved


def test_rows_loss_keeps_only_what_its_backward_reads():
    q, k = rows_inputs()
    k.requires_grad_()
    saved = saved_by(lambda: ccpl.rows_loss(q, k))
    assert len(saved) == 2, [tuple(t.shape) for t in saved]
    for t in saved:
        assert t.untyped_storage().data_ptr() not in (
            q.untyped_storage().data_ptr(),
            k.untyped_storage().data_ptr(),
        ), "an input row matrix is kept alive by the graph"


def test_import_warns_when_cuda_is_there_but_the_kernels_are_not():
    with pytest.warns(RuntimeWarning, match="without its CUDA kernels"):
        ccpl._common.warn_without_kernels(cuda_available=True, built=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cuda_available, built in [(False, False), (True, True), (False, True)]:
            ccpl._common.warn_without_kernels(cuda_available, built)
