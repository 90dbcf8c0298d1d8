"""rows_loss (forward, backward, autograd, torch.compile) against the original's PatchNCELoss
of normalised head outputs, on the CPU path and on CUDA."""

import math

import pytest
import torch

import ccpl
import original
from conftest import (
    F32_TOLERANCE,
    F64_GRAD_TOLERANCE,
    F64_LOSS_TOLERANCE,
    assert_close,
    features,
    rounded,
    rows_model,
    sixteen_bit_tolerance,
)


def reference(q_rows, k_rows, tau):
    """The original formulation in float64 on the CPU: loss, and gradients of both rows (k not
    detached)."""
    q = q_rows.detach().double().cpu().requires_grad_()
    k = k_rows.detach().double().cpu().requires_grad_()
    loss = original.rows_loss(q, k, tau, detach_k=False)
    grad_q, grad_k = torch.autograd.grad(loss, (q, k))
    return loss.detach(), grad_q, grad_k


def ours(q_rows, k_rows, tau):
    q = q_rows.detach().clone().requires_grad_()
    k = k_rows.detach().clone().requires_grad_()
    loss = ccpl.rows_loss(q, k, tau)
    loss.backward()
    return loss.detach(), q.grad, k.grad


# (B, S, C): odd sizes, S = 8N as a layer makes them and not.
SHAPES = [(1, 8, 3), (2, 24, 16), (3, 40, 7), (2, 13, 33)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [0.07, 0.3, 0.01])
def test_rows_loss_is_the_originals_in_float64(shape, tau):
    q, k = features(shape, seed=1), features(shape, seed=2)
    for what, got, want in zip(("loss", "grad_q", "grad_k"), ours(q, k, tau), reference(q, k, tau)):
        assert got.dtype == torch.float64
        tol = F64_LOSS_TOLERANCE if what == "loss" else F64_GRAD_TOLERANCE
        assert_close(what, got, want, tol)


def test_rows_loss_float32_on_the_cpu_is_the_reference_rounded():
    q, k = features((2, 24, 16), torch.float32, seed=3), features((2, 24, 16), torch.float32, seed=4)
    got, want = ours(q, k, 0.07), reference(q, k, 0.07)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    # Computed in float64 from the float32 values, rounded once to float32: 2^-24 at most.
    for what, g, w in zip(("loss", "grad_q", "grad_k"), got, want):
        assert_close(what, g, w, 2.0**-24)


def small_s_model(want, dtype):
    """The small-S path's rounding model: everything in float from the rows as given, only the
    gradients rounded to ``dtype``, once (the loss stays float32)."""
    loss, grad_q, grad_k = want
    return loss, rounded(grad_q, dtype), rounded(grad_k, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_loss_on_cuda(cuda, dtype):
    # On CUDA the odd shapes take the small-S path (S <= 512); the last, the fused path.
    for shape in [*SHAPES, (1, ccpl.small_rows.SMALL_S_MAX_ROWS + 9, 9)]:
        q = features(shape, dtype, cuda, seed=5)
        k = features(shape, dtype, cuda, seed=6)
        got, want = ours(q, k, 0.07), reference(q, k, 0.07)
        assert got[0].dtype == torch.float32 and got[1].dtype == dtype
        if dtype == torch.float32:
            tols = [F32_TOLERANCE] * 3
        else:
            if shape[1] <= ccpl.small_rows.SMALL_S_MAX_ROWS:
                model = small_s_model(want, dtype)
            else:
                model = rows_model(q.cpu(), k.cpu(), 0.07, dtype)
            tols = [sixteen_bit_tolerance(m, w) for m, w in zip(model, want)]
        for what, g, w, tol in zip(("loss", "grad_q", "grad_k"), got, want, tols):
            assert_close(f"{dtype} {shape} {what}", g, w, tol)


def test_rows_loss_gradient_at_a_zero_row_is_finite(device):
    """A head that sends a row to zero: the original's gradient is NaN there, ccpl's is the
    finite derivative of x / (||x|| + eps), g / eps (contract, step 5)."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    q, k = features((2, 16, 8), dtype, device, seed=7), features((2, 16, 8), dtype, device, seed=8)
    q[0, 3] = 0.0
    k[1, 5] = 0.0
    naive = q.detach().double().requires_grad_()
    unit = naive / (naive.pow(2).sum(-1, keepdim=True).pow(0.5) + 1e-7)  # the original's
    unit.sum().backward()
    assert naive.grad[0, 3].isnan().all()
    got, want = ours(q, k, 0.07), reference(q, k, 0.07)
    tol = F64_GRAD_TOLERANCE if dtype == torch.float64 else F32_TOLERANCE
    for what, g, w in zip(("loss", "grad_q", "grad_k"), got, want):
        assert torch.isfinite(g).all()
        assert_close(what, g, w, tol)


def test_rows_loss_of_all_zero_rows_is_ln_s(device):
    q = torch.zeros(2, 24, 5, device=device)
    assert math.isclose(ccpl.rows_loss(q, q.clone()).item(), math.log(24), rel_tol=1e-6)


def test_rows_loss_honours_tau():
    q, k = features((2, 16, 8), seed=9), features((2, 16, 8), seed=10)
    at_007 = ccpl.rows_loss(q, k)
    at_02 = ccpl.rows_loss(q, k, 0.2)
    assert_close("tau 0.2", at_02, original.rows_loss(q, k, 0.2), F64_LOSS_TOLERANCE)
    assert_close("tau 0.07", at_007, original.rows_loss(q, k, 0.07), F64_LOSS_TOLERANCE)
    assert abs(at_02.item() - at_007.item()) > 0.1


def test_rows_loss_gradient_only_where_asked():
    q = features((1, 16, 4), seed=11).requires_grad_()
    k = features((1, 16, 4), seed=12)
    ccpl.rows_loss(q, k).backward()
    assert q.grad is not None and k.grad is None
    with torch.no_grad():
        assert not ccpl.rows_loss(q, k).requires_grad


def test_rows_loss_gradcheck():
    q = features((2, 8, 5), seed=13).requires_grad_()
    k = features((2, 8, 5), seed=14).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ccpl.rows_loss(a, b, 0.3), (q, k))


def test_rows_loss_opcheck(device):
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    for grads in ((True, True), (True, False), (False, False)):
        q = features((2, 16, 6), dtype, device, seed=15).requires_grad_(grads[0])
        k = features((2, 16, 6), dtype, device, seed=16).requires_grad_(grads[1])
        torch.library.opcheck(torch.ops.ccpl.rows_loss.default, (q, k, 0.07))
        if device.type == "cuda":
            torch.library.opcheck(torch.ops.ccpl.small_rows_loss.default, ([q, q * 2], [k, k], 0.07))


def test_rows_loss_compiles_with_its_backward():
    q = features((2, 16, 6), seed=17).requires_grad_()
    k = features((2, 16, 6), seed=18)
    compiled = torch.compile(lambda a, b: ccpl.rows_loss(a, b, 0.1) * 5.0, fullgraph=True, backend="aot_eager")
    compiled(q, k).backward()
    _, want_q, _ = reference(q, k, 0.1)
    assert_close("compiled grad_q", q.grad, 5.0 * want_q, F64_GRAD_TOLERANCE)


def test_rows_loss_under_cpu_autocast_takes_bfloat16_rows():
    """Under autocast a head's Linear outputs bfloat16; the loss takes it as it is (float64 on
    those bfloat16 values, float32 out)."""
    head = torch.nn.Linear(12, 6)
    x, y = features((2, 16, 12), torch.float32, seed=19), features((2, 16, 12), torch.float32, seed=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k = head(x), head(y)
        assert q.dtype == torch.bfloat16
        loss = ccpl.rows_loss(q, k.detach())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(head.weight.grad).all()
    assert_close("autocast loss", loss, original.rows_loss(q.double(), k.double(), 0.07), 2.0**-24)


def test_rows_loss_refuses_bad_inputs():
    q = features((2, 16, 6), torch.float32)
    cases = [
        ((q.tolist(), q), TypeError, "q_rows must be a torch.Tensor"),
        ((q, q.to(torch.int64)), TypeError, "k_rows has dtype torch.int64"),
        ((q, q.double()), TypeError, "k_rows has torch.float64"),
        ((q, q[:, :8]), ValueError, "shape"),
        ((q[0], q[0]), ValueError, r"rows \(B, S, C\)"),
        ((q.transpose(1, 2), q.transpose(1, 2)), ValueError, "not contiguous"),
        ((q, q, 0.0), ValueError, "tau"),
        ((q, q, -0.1), ValueError, "tau"),
        ((q, q, float("nan")), ValueError, "tau"),
        ((q, q, float("inf")), ValueError, "tau"),
        ((q, q, 1e-40), ValueError, "2/tau overflows float32"),
        ((q, q, "0.07"), TypeError, "tau"),
        ((q, q, torch.tensor(0.07)), TypeError, "tau"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            ccpl.rows_loss(*args)


def test_rows_loss_on_cuda_runs_on_the_current_stream_without_a_host_wait(cuda):
    q = features((2, 64, 32), torch.float32, cuda, seed=21).requires_grad_()
    k = features((2, 64, 32), torch.float32, cuda, seed=22)
    want = reference(q, k, 0.07)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda.set_sync_debug_mode("error")  # any synchronising PyTorch call raises
        try:
            loss = ccpl.rows_loss(q, k)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)
    assert_close("loss on a side stream", loss, want[0], F32_TOLERANCE)
    assert_close("grad_q on a side stream", q.grad, want[1], F32_TOLERANCE)


def test_the_python_tau_rule_is_the_crates():
    """The ops check tau in Python (so that torch.compile traces the check); the crate's own
    check, `ccpl::Tau`, must agree on every value, the float32 boundary of 2/tau included."""
    from ccpl import _ccpl
    from ccpl._common import TAU_MIN, tau_rule_broken

    edge = TAU_MIN
    values = [0.07, 1.0, 1e300, 3e-39, 2.94e-39, 1e-40, 5e-324, 0.0, -0.0, -1.0]
    values += [float("nan"), float("inf"), float("-inf"), edge]
    values += [math.nextafter(edge, 0.0), math.nextafter(edge, 1.0)]
    for tau in values:
        rule = tau_rule_broken(tau)
        try:
            _ccpl.check_tau(tau)
            crate = None
        except ValueError as e:
            crate = str(e)
        assert (rule is None) == (crate is None), f"tau {tau!r}: python {rule!r}, crate {crate!r}"
        if rule is not None:
            assert rule in crate, f"tau {tau!r}: python {rule!r}, crate {crate!r}"


def test_rows_loss_sum_is_the_sum_of_the_layers_rows_losses(device):
    """Three layers of different shapes (on CUDA: one launch for all of them forward, one
    backward for each side asked for)."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    tol = (F64_LOSS_TOLERANCE, F64_GRAD_TOLERANCE) if dtype == torch.float64 else (F32_TOLERANCE,) * 2
    shapes = [(2, 24, 16), (3, 40, 7), (1, 8, 3)]
    qs = [features(s, dtype, device, seed=30 + i).requires_grad_() for i, s in enumerate(shapes)]
    ks = [features(s, dtype, device, seed=40 + i).requires_grad_() for i, s in enumerate(shapes)]
    loss = ccpl.rows_loss_sum(qs, ks, 0.1)
    loss.backward()
    want_loss = 0.0
    for q, k in zip(qs, ks):
        want, grad_q, grad_k = reference(q, k, 0.1)
        want_loss = want_loss + want
        assert_close("grad_q of a layer", q.grad, grad_q, tol[1])
        assert_close("grad_k of a layer", k.grad, grad_k, tol[1])
    assert_close("summed loss", loss, want_loss, tol[0])


def test_rows_loss_sum_refuses_bad_inputs():
    q = features((2, 16, 6), torch.float32)
    cases = [
        ((q, [q]), TypeError, "non-empty sequence"),
        (([], []), TypeError, "non-empty sequence"),
        (([q, q], [q]), ValueError, "2 q_rows but 1 k_rows"),
        (([q], [q.tolist()]), TypeError, r"k_rows\[0\] must be a torch.Tensor"),
        (([q], [q], 0.0), ValueError, "tau"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            ccpl.rows_loss_sum(*args)
