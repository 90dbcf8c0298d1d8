"""ccpl.CCPL, the drop-in module, against the original CCPL module written in the test
(original.ccpl_forward) with random MLP heads: the loss and every gradient, the heads'
parameters included; and the original's three defects, fixed."""

import copy
import math

import pytest
import torch

import ccpl
import original
from conftest import F32_TOLERANCE, F64_GRAD_TOLERANCE, F64_LOSS_TOLERANCE, assert_close
from conftest import centers_for, features, rows_model, sixteen_bit_tolerance

# A small VGG-like pyramid: four layers, channels doubling, maps halving (odd sizes).
CHANNELS = (8, 16, 24, 32)
SIZES = ((2, 8, 21, 19), (2, 16, 11, 10), (2, 24, 6, 5), (2, 32, 3, 4))


def pyramid(dtype=torch.float64, device="cpu", seed=0, **kw):
    return [features(size, dtype, device, seed + i, **kw) for i, size in enumerate(SIZES)]


def random_heads(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return original.paper_mlp(CHANNELS).to(dtype)


def run(module_forward, mlp, feats_q, feats_k):
    """Loss, the gradient of every feats_q map and of every head parameter."""
    feats_q = [f.detach().clone().requires_grad_() for f in feats_q]
    feats_k = [f.detach().clone().requires_grad_() for f in feats_k]
    loss = module_forward(mlp, feats_q, feats_k)
    loss.backward()
    assert all(f.grad is None for f in feats_k), "the content side is detached"
    return loss.detach(), [f.grad for f in feats_q], [p.grad for p in mlp.parameters()]


def compare(mlp, feats_q, feats_k, num_s, start, end, tau, tols, device="cpu", drop_in_dtype=None):
    """The drop-in with the module's own heads vs the original formulation in float64 with a
    float64 copy of them, on the same centres."""
    centers = [centers_for(f.shape[2], f.shape[3], num_s, seed=10 + i) for i, f in enumerate(feats_q[start:end])]
    reference_mlp = copy.deepcopy(mlp).double().to(device)
    want = run(
        lambda m, q, k: original.ccpl_forward(m, q, k, [c.to(device) for c in centers], start, end, tau),
        reference_mlp,
        [f.double() for f in feats_q],
        [f.double() for f in feats_k],
    )
    module = ccpl.CCPL(mlp.to(device))
    got = run(lambda m, q, k: module(q, k, num_s, start, end, tau, centers=centers), mlp, feats_q, feats_k)
    loss_tol, grad_tol = tols
    assert_close("loss", got[0], want[0], loss_tol)
    for i, (g, w) in enumerate(zip(got[1], want[1])):
        if start <= i < end:
            assert_close(f"grad feats_q[{i}]", g, w, grad_tol)
        else:
            assert g is None and w is None
    used = {id(p) for i in range(start, end) for m in mlp[3 * i : 3 * i + 3] for p in m.parameters()}
    for (name, p), g, w in zip(mlp.named_parameters(), got[2], want[2]):
        if id(p) in used:
            assert_close(f"grad mlp.{name}", g, w, grad_tol)
        else:
            assert g is None and w is None, name


@pytest.mark.parametrize("layers", [(1, 4), (0, 3), (2, 3)], ids=["art", "photo", "one"])
@pytest.mark.parametrize("tau", [0.07, 0.2])
def test_drop_in_gives_the_originals_loss_and_gradients_in_float64(layers, tau):
    compare(random_heads(1), pyramid(seed=1), pyramid(seed=5), 8, *layers, tau, (F64_LOSS_TOLERANCE, F64_GRAD_TOLERANCE))


def test_drop_in_with_float32_heads_on_the_cpu():
    """float32 features and heads: the heads' float32 products (length <= 32, error about
    sqrt(32) * 2^-24 = 3e-7 per value) and the float32 results stay well within the contract's
    float32 tolerance."""
    compare(
        random_heads(2, torch.float32), pyramid(torch.float32, seed=2), pyramid(torch.float32, seed=6),
        8, 1, 4, 0.07, (F32_TOLERANCE, F32_TOLERANCE),
    )


def test_drop_in_on_cuda_float32(cuda):
    compare(
        random_heads(3, torch.float32), pyramid(torch.float32, cuda, seed=3),
        pyramid(torch.float32, cuda, seed=7), 8, 1, 4, 0.07, (F32_TOLERANCE, F32_TOLERANCE), device=cuda,
    )


def test_drop_in_on_cuda_channels_last(cuda):
    compare(
        random_heads(4, torch.float32), pyramid(torch.float32, cuda, seed=4, channels_last=True),
        pyramid(torch.float32, cuda, seed=8, channels_last=True), 8, 0, 4, 0.1,
        (F32_TOLERANCE, F32_TOLERANCE), device=cuda,
    )


def test_drop_in_under_autocast_on_cuda(cuda):
    """Under bfloat16 autocast the heads' Linear layers output bfloat16 rows and the loss takes
    them as they are: checked against the rows loss's rounding model on those rows."""
    mlp = random_heads(5, torch.float32).to(cuda)
    feats_q, feats_k = pyramid(torch.float32, cuda, seed=9), pyramid(torch.float32, cuda, seed=13)
    centers = [centers_for(f.shape[2], f.shape[3], 8, seed=20 + i) for i, f in enumerate(feats_q)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = ccpl.CCPL(mlp)(feats_q, feats_k, 8, 3, 4, centers=centers[3:])
        rows_q = mlp[11](mlp[10](mlp[9](ccpl.neighbor_diff(feats_q[3], centers[3]))))
        rows_k = mlp[11](mlp[10](mlp[9](ccpl.neighbor_diff(feats_k[3], centers[3]))))
    assert rows_q.dtype == torch.bfloat16 and loss.dtype == torch.float32
    rows_q, rows_k = rows_q.cpu(), rows_k.cpu()
    exact = original.rows_loss(rows_q.double(), rows_k.double(), 0.07)
    model = rows_model(rows_q, rows_k, 0.07, torch.bfloat16)[0]
    assert_close("autocast loss", loss, exact, sixteen_bit_tolerance(model, exact))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in mlp[9:12].parameters())


def test_drop_in_clamps_the_centre_count():
    """The original crashes when num_s > (H-2)(W-2) (its offsets are built for num_s centres);
    the drop-in takes all (H-2)(W-2) = 2 interior positions of the 3x4 relu4_1-like map."""
    mlp = random_heads(6)
    feats_q, feats_k = pyramid(seed=11), pyramid(seed=12)
    loss = ccpl.CCPL(mlp)(feats_q, feats_k, 1000, 3, 4)
    centers = [torch.tensor([5, 6])]  # the whole interior, in the order the draw gives it
    want = original.ccpl_forward(mlp, feats_q, feats_k, centers, 3, 4, 0.07)
    assert_close("clamped", loss, want, F64_LOSS_TOLERANCE)  # the loss does not depend on order


def test_drop_in_gradient_at_a_zero_head_output_is_finite():
    """Zero biases and a flat map make every head output exactly zero: the original's
    gradients of the last Linear are NaN, the drop-in's are finite, and the loss is ln S."""
    mlp = random_heads(7)
    for m in mlp[9:12]:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.zeros_(m.bias)
    flat = [torch.full(size, 0.5, dtype=torch.float64) for size in SIZES]
    loss = ccpl.CCPL(mlp)(flat, flat, 8, 3, 4)
    assert math.isclose(loss.item(), math.log(8 * 2), rel_tol=1e-12)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in mlp[9:12].parameters())


def test_drop_in_honours_tau():
    mlp = random_heads(8)
    feats_q, feats_k = pyramid(seed=14), pyramid(seed=15)
    centers = [centers_for(f.shape[2], f.shape[3], 8, seed=i) for i, f in enumerate(feats_q[1:4])]
    module = ccpl.CCPL(mlp)
    at_007 = module(feats_q, feats_k, 8, 1, 4, centers=centers)
    at_03 = module(feats_q, feats_k, 8, 1, 4, 0.3, centers=centers)
    assert_close("tau 0.3", at_03, original.ccpl_forward(mlp, feats_q, feats_k, centers, 1, 4, 0.3), F64_LOSS_TOLERANCE)
    assert abs(at_03.item() - at_007.item()) > 0.1


def test_drop_in_has_the_originals_state_dict():
    mlp = original.paper_mlp()
    assert list(ccpl.CCPL(mlp).state_dict()) == [f"mlp.{k}" for k in mlp.state_dict()]


def test_drop_in_samples_fresh_centres_from_the_global_generator():
    mlp = random_heads(9)
    feats_q, feats_k = pyramid(seed=16), pyramid(seed=17)
    module = ccpl.CCPL(mlp)
    torch.manual_seed(3)
    a = module(feats_q, feats_k, 8, 1, 4)
    torch.manual_seed(3)
    assert torch.equal(a, module(feats_q, feats_k, 8, 1, 4))
    assert not torch.equal(a, module(feats_q, feats_k, 8, 1, 4))


def test_drop_in_refuses_bad_arguments():
    module = ccpl.CCPL(random_heads(10))
    feats = pyramid(seed=18)
    c = centers_for(11, 10, 4)
    cases = [
        (dict(start_layer=2, end_layer=2), "no layer"),
        (dict(start_layer=0, end_layer=5), "mlp holds 12 modules"),
        (dict(start_layer=1, end_layer=3, centers=[c]), "one per layer"),
        (dict(start_layer=1, end_layer=2, tau=0.0), "tau"),
        (dict(start_layer=1, end_layer=2, centers=[torch.tensor([0])]), "outside the interior"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            module(feats, feats, 8, **kwargs)
