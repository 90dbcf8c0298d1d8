"""ccp_loss (the whole loss with the identity head, every layer in one call, the centres drawn
by the crate's Philox sampler): against ccp_layer_loss on the very same centres, its
reproducibility under torch.manual_seed and fresh centres at every call, gradcheck, opcheck,
torch.compile and its refusals, on the CPU path and on CUDA."""

import pytest
import torch

import ccpl
from conftest import F32_TOLERANCE, F64_GRAD_TOLERANCE, F64_LOSS_TOLERANCE, assert_close, features

# (B, C, H, W) of each encoder layer: odd sizes, a layer whose interior is smaller than num_s
# (clamped), and one that takes the fused path (S = 8 * 70 > 512) beside the small-S ones.
LAYERS = [(2, 4, 7, 9), (2, 6, 12, 12), (2, 3, 4, 5), (2, 5, 11, 11)]


def maps(device, dtype, channels_last=False):
    def side(seed):
        return [
            features(s, dtype, device, seed + i, channels_last=channels_last)
            for i, s in enumerate(LAYERS)
        ]

    return side(10), side(20)


def tolerances(device):
    if device.type == "cpu":
        return torch.float64, F64_LOSS_TOLERANCE, F64_GRAD_TOLERANCE
    return torch.float32, F32_TOLERANCE, F32_TOLERANCE


def leaves(feats):
    return [f.detach().clone().requires_grad_() for f in feats]


@pytest.mark.parametrize("num_s", [8, 70], ids=["small_s", "with_a_fused_layer"])
@pytest.mark.parametrize("last", [False, True], ids=["nchw", "channels_last"])
def test_loss_is_the_layer_losses_on_the_sampler_centres(device, num_s, last):
    dtype, loss_tol, grad_tol = tolerances(device)
    feats_q, feats_k = maps(device, dtype, last)
    layers = [3, 0, 1, 2]
    torch.manual_seed(5)
    seed = ccpl.seed_value(ccpl.draw_seed(device))
    q, k = leaves(feats_q), leaves(feats_k)
    torch.manual_seed(5)
    loss = ccpl.ccp_loss(q, k, num_s, layers, 0.1, grad_k=True)
    loss.backward()

    want_q, want_k = leaves(feats_q), leaves(feats_k)
    want = 0.0
    for j, i in enumerate(layers):
        _, _, h, w = LAYERS[i]
        centers = ccpl.loss_centers(h, w, num_s, seed, j)
        want = want + ccpl.ccp_layer_loss(want_q[i], want_k[i], centers, 0.1, grad_k=True)
    want.backward()

    assert loss.dtype == want.dtype
    assert_close("ccp_loss vs the layer losses", loss, want, loss_tol)
    for i in layers:
        assert_close(f"grad of feats_q[{i}]", q[i].grad, want_q[i].grad, grad_tol)
        assert_close(f"grad of feats_k[{i}]", k[i].grad, want_k[i].grad, grad_tol)
        assert q[i].grad.is_contiguous(memory_format=torch.channels_last) == last or not last


def test_centres_follow_manual_seed_and_are_new_at_every_call(device):
    dtype, _, _ = tolerances(device)
    feats_q, feats_k = maps(device, dtype)
    torch.manual_seed(11)
    first = [ccpl.ccp_loss(feats_q, feats_k, 8, range(4)) for _ in range(3)]
    torch.manual_seed(11)
    again = [ccpl.ccp_loss(feats_q, feats_k, 8, range(4)) for _ in range(3)]
    assert [x.item() for x in first] == [x.item() for x in again]
    assert len({x.item() for x in first}) == 3


def test_centres_are_distinct_interior_positions():
    for layer in range(3):
        centers = ccpl.loss_centers(9, 7, 30, 123, layer)
        assert centers.dtype == torch.int64 and centers.numel() == 30
        assert len(set(centers.tolist())) == 30
        h, w = centers // 7, centers % 7
        assert bool(((h >= 1) & (h <= 7) & (w >= 1) & (w <= 5)).all())
    assert ccpl.loss_centers(9, 7, 1000, 1, 0).numel() == 35


def test_feats_k_gets_no_gradient_unless_asked():
    feats_q, feats_k = maps(torch.device("cpu"), torch.float64)
    q, k = leaves(feats_q), leaves(feats_k)
    ccpl.ccp_loss(q, k, 8, [0, 1]).backward()
    assert q[0].grad is not None and q[2].grad is None
    assert k[0].grad is None


def test_gradcheck_on_the_cpu():
    shapes = [(1, 3, 5, 6), (2, 2, 4, 4)]
    q = [features(s, torch.float64, "cpu", 30 + i).requires_grad_() for i, s in enumerate(shapes)]
    k = [features(s, torch.float64, "cpu", 40 + i).requires_grad_() for i, s in enumerate(shapes)]

    def loss(q0, q1, k0, k1):
        torch.manual_seed(2)  # the same centres at every evaluation
        return ccpl.ccp_loss([q0, q1], [k0, k1], 3, [0, 1], 0.2, grad_k=True)

    assert torch.autograd.gradcheck(loss, (*q, *k))


def test_opcheck(device):
    dtype, _, _ = tolerances(device)
    feats_q, feats_k = maps(device, dtype)
    seed = ccpl.draw_seed(device)
    for grad_k in (False, True):
        feats_k_args = leaves(feats_k[:2]) if grad_k else feats_k[:2]
        args = (leaves(feats_q[:2]), feats_k_args, seed, 8, 0.07, grad_k)
        torch.library.opcheck(torch.ops.ccpl.ccp_loss.default, args)


def test_compiles_with_its_backward():
    feats_q, feats_k = maps(torch.device("cpu"), torch.float64)
    q = leaves(feats_q)
    compiled = torch.compile(
        lambda a, b: 2.0 * ccpl.ccp_loss(a, b, 8, [0, 1, 2, 3]),
        fullgraph=True,
        backend="aot_eager",
    )
    torch.manual_seed(4)
    got = compiled(q, feats_k)
    got.backward()
    want_q = leaves(feats_q)
    torch.manual_seed(4)
    want = 2.0 * ccpl.ccp_loss(want_q, feats_k, 8, [0, 1, 2, 3])
    want.backward()
    assert_close("compiled loss", got, want, F64_LOSS_TOLERANCE)
    for g, w in zip(q, want_q):
        assert_close("compiled gradient", g.grad, w.grad, F64_GRAD_TOLERANCE)


def test_a_second_derivative_is_refused_not_zero():
    feats_q, feats_k = maps(torch.device("cpu"), torch.float64)
    q = leaves(feats_q[:1])
    (grad,) = torch.autograd.grad(ccpl.ccp_loss(q, feats_k[:1], 4, [0]), q[0], create_graph=True)
    with pytest.raises(RuntimeError, match="ccpl.ccp_loss has no second derivative"):
        (grad.pow(2).sum() + q[0].sum()).backward()


def bad_calls():
    q, k = maps(torch.device("cpu"), torch.float64)
    mismatched = [k[1], *k[1:]]
    strided = [f.transpose(2, 3) for f in q]
    many = [q[0]] * 9
    return [
        ((q[0], k, 8, [0]), TypeError, "feats_q must be a sequence"),
        ((q, k, 8, 0), TypeError, "layers must be a sequence"),
        ((q, k, 8, []), ValueError, "layers is empty"),
        ((q, k, 8, [4]), ValueError, "layer 4 asked for"),
        ((q, k, 8, [True]), TypeError, "layer indices are ints"),
        ((q, k, 0, [0]), ValueError, "num_s is 0"),
        ((q, k, 2.5, [0]), TypeError, "num_s must be an int"),
        ((q, k, 8, [0], -1.0), ValueError, "bad tau"),
        (([q[0], q[1].float()], [k[0], k[1].float()], 8, [0, 1]), ValueError, "one dtype and device"),
        ((q, mismatched, 8, [0]), ValueError, "feats_q\\[0\\] has shape"),
        ((strided, strided, 8, [0]), ValueError, "neither contiguous"),
        (([q[0].int()], k, 8, [0]), TypeError, "feats_q\\[0\\] has dtype"),
        ((many, many, 8, range(9)), ValueError, "at most 8"),
    ]


@pytest.mark.parametrize("call, error, message", bad_calls())
def test_bad_input_is_refused_by_name(call, error, message):
    with pytest.raises(error, match=message):
        ccpl.ccp_loss(*call)


def test_a_direct_backward_call_with_other_maps_is_refused():
    feats_q, feats_k = maps(torch.device("cpu"), torch.float64)
    seed = ccpl.draw_seed("cpu")
    _, workspace = torch.ops.ccpl.ccp_loss(feats_q[:1], feats_k[:1], seed, 8, 0.07, False)
    sizes = [*LAYERS[0], 0]
    backward = torch.ops.ccpl.ccp_loss_backward
    grad = torch.ones((), dtype=torch.float64)
    as_float = [feats_q[0].float()], [feats_k[0].float()]
    rest = (sizes, torch.float64, 8, 0.07, False)
    with pytest.raises(TypeError, match="the backward was asked for torch.float64"):
        backward(grad, workspace, *as_float, *rest)
    with pytest.raises(ValueError, match="not those of the forward"):
        backward(grad, workspace, feats_q[1:2], feats_k[1:2], *rest)
    with pytest.raises(ValueError, match="workspace is"):
        backward(grad, workspace[:4], feats_q[:1], feats_k[:1], *rest)
    (grad_q,) = backward(grad, workspace, feats_q[:1], feats_k[:1], *rest)
    assert grad_q.shape == feats_q[0].shape
