"""sample_centers and neighbor_diff (forward, backward, autograd) against the original's
NeighborSample, on the CPU path and on CUDA."""

import pytest
import torch

import ccpl
import original
from conftest import F32_TOLERANCE, F64_GRAD_TOLERANCE, assert_close, centers_for, features

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_sample_centers_draws_distinct_interior_positions_like_the_original():
    h, w = 9, 7
    c = ccpl.sample_centers(h, w, 12, torch.Generator().manual_seed(3))
    assert c.dtype == torch.int64 and c.device.type == "cpu" and c.shape == (12,)
    assert len(set(c.tolist())) == 12
    rows, cols = c // w, c % w
    assert ((rows >= 1) & (rows <= h - 2) & (cols >= 1) & (cols <= w - 2)).all()
    # The original's draw: a randperm of the interior, its first num_s, mapped to h*W + w.
    s = torch.randperm((h - 2) * (w - 2), generator=torch.Generator().manual_seed(3))[:12]
    assert torch.equal(c, (s // (w - 2) + 1) * w + s % (w - 2) + 1)


def test_sample_centers_clamps_the_count_to_the_interior():
    c = ccpl.sample_centers(4, 5, 100)
    assert sorted(c.tolist()) == [6, 7, 8, 11, 12, 13]
    assert ccpl.sample_centers(3, 3, 8).tolist() == [4]


def test_sample_centers_is_reproducible_with_a_generator_or_the_global_seed():
    a = ccpl.sample_centers(32, 32, 8, torch.Generator().manual_seed(1))
    b = ccpl.sample_centers(32, 32, 8, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    torch.manual_seed(5)
    a = ccpl.sample_centers(32, 32, 8)
    torch.manual_seed(5)
    assert torch.equal(a, ccpl.sample_centers(32, 32, 8))


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((2, 9, 4), ValueError, "no interior"),
        ((9, 2, 4), ValueError, "no interior"),
        ((9, 9, 0), ValueError, "num_s"),
        ((9.0, 9, 4), TypeError, "h must be an int"),
        ((9, 9, True), TypeError, "num_s must be an int"),
    ],
)
def test_sample_centers_refuses_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        ccpl.sample_centers(*args)


@pytest.mark.parametrize("last", [False, True], ids=["nchw", "channels_last"])
def test_neighbor_diff_is_the_originals_difference_rows(device, last):
    dtypes = DTYPES + ([torch.float64] if device.type == "cpu" else [])
    for dtype in dtypes:
        feat = features((2, 5, 7, 9), dtype, device, seed=1, channels_last=last)
        c = centers_for(7, 9, 11, seed=2)
        # Exact: the CPU path rounds the float64 difference once; the kernels subtract in
        # float32 and round that to the storage type (the same for float32 and float64).
        wide = torch.float64 if device.type == "cpu" else torch.float32
        want = original.difference_rows(feat.to(wide), c.to(device)).to(dtype)
        assert torch.equal(ccpl.neighbor_diff(feat, c), want), dtype


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("last", [False, True], ids=["nchw", "channels_last"])
def test_neighbor_diff_backward_is_the_originals_scatter(device, last, deterministic):
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    feat = features((3, 4, 8, 6), dtype, device, seed=3, channels_last=last).requires_grad_()
    c = centers_for(8, 6, 24, seed=4)  # the whole interior: windows overlap everywhere
    g = features((3, 8 * 24, 4), dtype, device, seed=5)
    ref = feat.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(original.difference_rows(ref, c.to(device)), ref, g.double())
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        (got,) = torch.autograd.grad(ccpl.neighbor_diff(feat, c), feat, g)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert got.is_contiguous(memory_format=torch.channels_last if last else torch.contiguous_format)
    # float64: sums of the same terms in another order; float32: the contract's tolerance.
    tol = F64_GRAD_TOLERANCE if dtype == torch.float64 else F32_TOLERANCE
    assert_close("neighbor_diff backward", got, want, tol)


def test_neighbor_diff_gradcheck():
    feat = features((2, 3, 5, 6), seed=6).requires_grad_()
    c = centers_for(5, 6, 5, seed=7)
    assert torch.autograd.gradcheck(lambda f: ccpl.neighbor_diff(f, c), (feat,))


def test_neighbor_diff_opcheck(device):
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    c = centers_for(6, 7, 9, seed=8)
    for last in (False, True):
        feat = features((2, 3, 6, 7), dtype, device, seed=9, channels_last=last)
        torch.library.opcheck(torch.ops.ccpl.neighbor_diff.default, (feat.requires_grad_(), c))
    grad_rows = features((2, 72, 3), dtype, device, seed=10)
    torch.library.opcheck(
        torch.ops.ccpl.neighbor_diff_backward.default, (grad_rows, c, [2, 3, 6, 7], False)
    )


def test_neighbor_diff_refuses_bad_inputs():
    feat = features((2, 3, 6, 7), torch.float32)
    c = centers_for(6, 7, 4)
    cases = [
        ((feat.tolist(), c), TypeError, "must be a torch.Tensor"),
        ((feat.to(torch.int32), c), TypeError, "dtype torch.int32"),
        ((feat[0], c), ValueError, r"\(B, C, H, W\)"),
        ((feat.transpose(2, 3), c), ValueError, "neither contiguous"),
        ((feat[:, :, :, ::2], c), ValueError, "neither contiguous"),
        ((feat, c.float()), TypeError, "int64"),
        ((feat, c[None]), ValueError, "1-D"),
        ((feat, c[:0]), ValueError, "empty"),
        ((feat, torch.tensor([0])), ValueError, "outside the interior"),
        ((feat, torch.tensor([8, 2 * 7 + 6])), ValueError, "outside the interior"),
        ((feat, torch.tensor([8, 9, 8])), ValueError, "repeats"),
        ((feat, torch.tensor([100])), ValueError, "outside the interior"),
        ((feat, torch.tensor([-1])), ValueError, "outside the interior"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            ccpl.neighbor_diff(*args)


def test_neighbor_diff_on_cuda_refuses_float64_and_cuda_centres(cuda):
    feat = features((2, 3, 6, 7), torch.float32, cuda)
    c = centers_for(6, 7, 4)
    with pytest.raises(TypeError, match="float64"):
        ccpl.neighbor_diff(feat.double(), c)
    with pytest.raises(ValueError, match="CPU tensor"):
        ccpl.neighbor_diff(feat, c.to(cuda))
    with pytest.raises(ValueError, match="outside the interior"):
        ccpl.neighbor_diff(feat, torch.tensor([0]))
