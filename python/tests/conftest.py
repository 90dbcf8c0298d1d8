"""What the tests share: the devices a test runs on, the comparison and its tolerances, data.

A test that takes the ``device`` fixture runs on the CPU (the float64 reference path) and on
CUDA (the kernels). Without a usable GPU the CUDA case says loudly that it SKIPPED (``pytest
-rs`` lists why), and fails instead when ``CCPL_REQUIRE_GPU=1``.
"""

import os
import sys

import pytest
import torch

import ccpl

# The one PyTorch port of the original CCPL, shared with the goldens' generator and the
# benchmarks' baselines.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools", "bench"))
import original  # noqa: E402

F64_LOSS_TOLERANCE = 1e-12
"""Loss of the CPU path on float64 inputs vs the original formulation in float64: two float64
evaluations of one formula in different orders. tools/make_goldens.py measured 4e-16."""

F64_GRAD_TOLERANCE = 1e-9
"""Their gradients: make_goldens measured 4e-15, and up to 1e-11 where rows are zero on both
sides over a dense patch of centres (a position sums ``+-g/eps`` terms, ``eps = 1e-7``, that
cancel to ~1e-8 of their size, so float64's rounding of them shows)."""

F32_TOLERANCE = 1e-5
"""The contract's tolerance for float32 results (relative norm error), as the Rust tests."""


def gpu_unavailable():
    """Why the CUDA tests cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not ccpl.kernels_built():
        return "ccpl was built without its CUDA kernels (no nvcc at build time)"
    return None


def require_gpu():
    why = gpu_unavailable()
    if why is None:
        return
    if os.environ.get("CCPL_REQUIRE_GPU") == "1":
        pytest.fail(f"CCPL_REQUIRE_GPU=1 but {why}")
    pytest.skip(f"SKIPPED GPU test: {why}")


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda":
        require_gpu()
    return torch.device(request.param)


@pytest.fixture
def cuda():
    require_gpu()
    return torch.device("cuda")


def rel_err(got, want):
    """``||got - want|| / ||want||`` in float64; infinite when anything is not finite (NaN never
    agrees) or the shapes differ."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape or not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return float("inf")
    norm = want.norm().item()
    diff = (got - want).norm().item()
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / norm


def assert_close(what, got, want, tol):
    err = rel_err(got, want)
    print(f"measured {what}: rel err {err:.3e} (tolerance {tol:.3e})")
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.3e}"


def features(shape, dtype=torch.float64, device="cpu", seed=0, flat=False, channels_last=False):
    """Random features, values exact in ``dtype``; ``flat`` makes the top-left quarter of
    every map constant across all channels, so every difference row there is exactly zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if flat:
        x[:, :, : shape[2] // 2 + 1, : shape[3] // 2 + 1] = 0.5
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device)


def centers_for(h, w, num_s, seed=0):
    return ccpl.sample_centers(h, w, num_s, torch.Generator().manual_seed(seed))


def rounded(x, dtype):
    return x.to(dtype).double()


def rows_model(q_rows, k_rows, tau, dtype):
    """The rows loss and its gradients with respect to the rows, in float64 with every value
    the kernels store in ``dtype`` rounded once (the normalised rows, the softmax-minus-identity
    G the tensor cores multiply, scaled by 2^15 in float16, the gradient of the normalised rows,
    the result): what a 16-bit tolerance is measured on (the Rust tests' ``rows_model``).
    ``q_rows``, ``k_rows``: float64 values exact in ``dtype``."""
    q_rows = q_rows.detach().double().requires_grad_()
    k_rows = k_rows.detach().double().requires_grad_()
    unit_q, unit_k = (original.normalize(r.transpose(1, 2)).transpose(1, 2) for r in (q_rows, k_rows))
    uq, uk = rounded(unit_q.detach(), dtype), rounded(unit_k.detach(), dtype)
    batch, s, _ = uq.shape
    logits = uq @ uk.transpose(1, 2) / tau
    lse = logits.logsumexp(2)
    row_loss = lse - logits.diagonal(dim1=1, dim2=2)
    loss = row_loss.mean()
    g = (logits - lse[..., None]).exp()
    g.diagonal(dim1=1, dim2=2).copy_(torch.expm1(-row_loss))
    g_scale = 32768.0 if dtype == torch.float16 else 1.0
    g = rounded(g * g_scale, dtype) / g_scale
    scale = 1.0 / (batch * s * tau)
    dq, dk = g @ uk * scale, g.transpose(1, 2) @ uq * scale
    grad_q, grad_k = torch.autograd.grad(
        (unit_q, unit_k), (q_rows, k_rows), (rounded(dq, dtype), rounded(dk, dtype))
    )
    return loss, rounded(grad_q, dtype), rounded(grad_k, dtype)


def sixteen_bit_tolerance(model, exact):
    """The Rust tests' rule: twice the rounding model's measured error (the kernels' float
    arithmetic can tip a rounding to the other neighbour, and their rounding errors are as many
    as the model's but not the same ones), plus the float32 tolerance for the arithmetic."""
    return 2.0 * rel_err(model, exact) + F32_TOLERANCE
