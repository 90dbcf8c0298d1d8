"""ccp_layer_loss (forward, backward, autograd, torch.compile) against the original's loss of
one layer with the identity head, on the CPU path and on CUDA."""

import pytest
import torch

import ccpl
import original
from conftest import (
    F32_TOLERANCE,
    F64_GRAD_TOLERANCE,
    F64_LOSS_TOLERANCE,
    assert_close,
    centers_for,
    features,
    rounded,
    rows_model,
    sixteen_bit_tolerance,
)

# (B, C, H, W, num_s, tau, flat): odd sizes, a clamped count, the whole interior, the three
# temperatures, exactly-zero difference rows on either side (the cases of tools/make_goldens.py).
CASES = [
    (1, 2, 3, 3, 8, 0.07, ""),
    (2, 5, 7, 9, 35, 0.07, ""),
    (3, 4, 6, 5, 7, 0.01, ""),
    (2, 8, 9, 11, 13, 0.3, "q"),
    (1, 16, 5, 13, 20, 0.07, "k"),
    (2, 3, 10, 7, 1000, 0.07, "qk"),
]
# On CUDA every case above takes the small-S path (S = 8N <= 512); this one the fused path.
FUSED_CASE = (1, 6, 13, 12, 70, 0.07, "")


def case_inputs(case, dtype=torch.float64, device="cpu", channels_last=False):
    b, c, h, w, num_s, tau, flat = case
    feat_q = features((b, c, h, w), dtype, device, 1, "q" in flat, channels_last)
    feat_k = features((b, c, h, w), dtype, device, 2, "k" in flat, channels_last)
    return feat_q, feat_k, centers_for(h, w, num_s, seed=3), tau


def reference(feat_q, feat_k, centers, tau):
    """The original formulation in float64 on the CPU: the loss, its gradient in feat_q (feat_k
    detached, as the original) and in feat_k (not detached)."""
    q = feat_q.detach().double().cpu().requires_grad_()
    k = feat_k.detach().double().cpu().requires_grad_()
    c = centers
    loss = original.layer_loss(q, k, c, tau)
    (grad_q,) = torch.autograd.grad(loss, q)
    (grad_k,) = torch.autograd.grad(original.layer_loss(q, k, c, tau, detach_k=False), k)
    return loss.detach(), grad_q, grad_k


def ours(feat_q, feat_k, centers, tau):
    q = feat_q.detach().clone().requires_grad_()
    k = feat_k.detach().clone().requires_grad_()
    loss = ccpl.ccp_layer_loss(q, k, centers, tau, grad_k=True)
    loss.backward()
    return loss.detach(), q.grad, k.grad


@pytest.mark.parametrize("last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}_c{}_h{}_w{}_n{}_tau{}_{}".format(*c))
def test_layer_loss_is_the_originals_in_float64(case, last):
    inputs = case_inputs(case, channels_last=last)
    got, want = ours(*inputs), reference(*inputs)
    for what, g, w in zip(("loss", "grad_q", "grad_k"), got, want):
        tol = F64_LOSS_TOLERANCE if what == "loss" else F64_GRAD_TOLERANCE
        assert_close(what, g, w, tol)
    layout = torch.channels_last if last else torch.contiguous_format
    assert got[1].is_contiguous(memory_format=layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layer_loss_float32_and_16_bit_on_the_cpu_are_the_reference_rounded(dtype):
    inputs = case_inputs(CASES[1], dtype)
    got, want = ours(*inputs), reference(*inputs)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    # Computed in float64 from the stored values; the loss is rounded once to float32, each
    # gradient element once to the storage type (half an ulp: 2^-24, 2^-11, 2^-8 relative).
    ulp = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    assert_close("loss", got[0], want[0], 2.0**-24)
    for what, g, w in zip(("grad_q", "grad_k"), got[1:], want[1:]):
        assert_close(what, g, w, ulp)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("last", [False, True], ids=["nchw", "channels_last"])
def test_layer_loss_float32_on_cuda(cuda, last, deterministic):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for case in [*CASES, FUSED_CASE]:
            inputs = case_inputs(case, torch.float32, cuda, last)
            got, want = ours(*inputs), reference(*inputs)
            for what, g, w in zip(("loss", "grad_q", "grad_k"), got, want):
                assert_close(f"{case} {what}", g, w, F32_TOLERANCE)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_loss_16_bit_on_cuda(cuda, dtype):
    """The small-S path (the first cases) computes in float from the stored features and rounds
    each gradient once; the fused path's model is the rows loss's on the difference rows
    rounded to the storage type, scattered exactly and rounded once (the deterministic scatter
    stores each gradient once)."""
    torch.use_deterministic_algorithms(True)
    try:
        # The flat cases overflow float16 by design (README, known limit).
        for case in [*CASES[:3], FUSED_CASE]:
            feat_q, feat_k, centers, tau = case_inputs(case, dtype, cuda)
            got, want = ours(feat_q, feat_k, centers, tau), reference(feat_q, feat_k, centers, tau)
            if case != FUSED_CASE:
                model = [want[0], rounded(want[1], dtype), rounded(want[2], dtype)]
                for what, g, w, m in zip(("loss", "grad_q", "grad_k"), got, want, model):
                    assert_close(f"{dtype} {case} {what}", g, w, sixteen_bit_tolerance(m, w))
                continue
            host = [f.detach().double().cpu() for f in (feat_q, feat_k)]
            rows = [rounded(original.difference_rows(f, centers), dtype) for f in host]
            loss, grad_rows_q, grad_rows_k = rows_model(*rows, tau, dtype)
            model = [loss]
            for f, g in zip(host, (grad_rows_q, grad_rows_k)):
                x = f.requires_grad_()
                (grad,) = torch.autograd.grad(original.difference_rows(x, centers), x, g)
                model.append(rounded(grad, dtype))
            for what, g, w, m in zip(("loss", "grad_q", "grad_k"), got, want, model):
                assert_close(f"{dtype} {case} {what}", g, w, sixteen_bit_tolerance(m, w))
    finally:
        torch.use_deterministic_algorithms(False)


def test_layer_loss_detaches_the_content_side_unless_asked():
    feat_q, feat_k, centers, tau = case_inputs(CASES[1])
    q, k = feat_q.requires_grad_(), feat_k.requires_grad_()
    ccpl.ccp_layer_loss(q, k, centers, tau).backward()
    assert q.grad is not None and k.grad is None
    q.grad = None
    ccpl.ccp_layer_loss(q.detach(), k, centers, tau, grad_k=True).backward()
    assert q.grad is None and k.grad is not None


def test_layer_loss_gradcheck():
    feat_q, feat_k, centers, _ = case_inputs((2, 3, 5, 6, 5, 0.5, ""))
    q, k = feat_q.requires_grad_(), feat_k.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: ccpl.ccp_layer_loss(a, b, centers, 0.5, grad_k=True), (q, k)
    )


def test_layer_loss_opcheck(device):
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    for last in (False, True):
        for grad_k in (False, True):
            q, k, centers, tau = case_inputs(CASES[1], dtype, device, last)
            args = (q.requires_grad_(), k.requires_grad_(grad_k), centers, tau, grad_k)
            torch.library.opcheck(torch.ops.ccpl.ccp_layer_loss.default, args)
            if device.type == "cuda":
                torch.library.opcheck(torch.ops.ccpl.small_layer_loss.default, args)


def test_layer_loss_compiles_with_its_backward():
    feat_q, feat_k, centers, tau = case_inputs(CASES[3])
    q = feat_q.requires_grad_()
    compiled = torch.compile(
        lambda a, b: 2.0 * ccpl.ccp_layer_loss(a, b, centers, tau), fullgraph=True, backend="aot_eager"
    )
    loss = compiled(q, feat_k)
    loss.backward()
    want = reference(feat_q, feat_k, centers, tau)
    assert_close("compiled loss", loss, 2.0 * want[0], F64_LOSS_TOLERANCE)
    assert_close("compiled grad_q", q.grad, 2.0 * want[1], F64_GRAD_TOLERANCE)


def test_layer_loss_refuses_bad_inputs():
    q = features((2, 3, 6, 7), torch.float32)
    c = centers_for(6, 7, 4)
    last = q.contiguous(memory_format=torch.channels_last)
    cases = [
        ((q, q.tolist(), c), TypeError, "feat_k must be a torch.Tensor"),
        ((q, q, c.tolist()), TypeError, "centers must be a torch.Tensor"),
        ((q, q.double(), c), TypeError, "feat_k has torch.float64"),
        ((q.half(), q.half().int(), c), TypeError, "feat_k has dtype torch.int32"),
        ((q, q[:, :2], c), ValueError, "shape"),
        ((q, q[:1], c), ValueError, "shape"),
        ((q, last, c), ValueError, "same layout"),
        ((q[..., :6], q[..., :6], c), ValueError, "neither contiguous"),
        ((q, q, c.int()), TypeError, "int64"),
        ((q, q, torch.tensor([8, 8])), ValueError, "repeats"),
        ((q, q, torch.tensor([6])), ValueError, "outside the interior"),
        ((q, q, torch.tensor([], dtype=torch.long)), ValueError, "empty"),
        ((q, q, c, 0.0), ValueError, "tau"),
        ((q, q, c, float("nan")), ValueError, "tau"),
        ((q, q, c, None), TypeError, "tau"),
        ((q[:, :, :2].contiguous(), q[:, :, :2].contiguous(), torch.tensor([8])), ValueError, "no interior"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            ccpl.ccp_layer_loss(*args)


def test_layer_loss_on_cuda_refuses_mixed_devices(cuda):
    q = features((2, 3, 6, 7), torch.float32)
    c = centers_for(6, 7, 4)
    with pytest.raises(ValueError, match="feat_q is on cpu but feat_k is on cuda"):
        ccpl.ccp_layer_loss(q, q.to(cuda), c)
    with pytest.raises(TypeError, match="float64"):
        ccpl.ccp_layer_loss(q.double().to(cuda), q.double().to(cuda), c)
