"""sampled_neighbor_diff (every layer's difference rows at centres drawn on the device) and the
drop-in's one-call path on it: the rows are neighbor_diff's at the sampler's centres, the
gradients its backward's, on the CPU path and on CUDA; and on CUDA, the training step the path
exists for: captured in a CUDA graph, compiled with reduce-overhead, counted in launches."""

import pytest
import torch

import ccpl
import original
from conftest import F32_TOLERANCE, F64_GRAD_TOLERANCE, assert_close, features

# Odd sizes; the last layer's interior (2 x 3) clamps num_s = 9 to 6 centres.
SIZES = ((2, 5, 9, 7), (2, 6, 6, 7), (2, 4, 4, 5))
NUM_S = 9


def maps(dtype=torch.float64, device="cpu", seed=0, channels_last=False):
    return [
        features(size, dtype, device, seed + i, channels_last=channels_last)
        for i, size in enumerate(SIZES)
    ]


def sampler_centres(seed, layers):
    """The centres the sampler draws under `seed` for each layer of `layers`, as
    neighbor_diff takes them."""
    value = ccpl.seed_value(seed)
    return [
        ccpl.loss_centers(SIZES[i][2], SIZES[i][3], NUM_S, value, j) for j, i in enumerate(layers)
    ]


@pytest.mark.parametrize("channels_last", [False, True])
def test_rows_and_gradients_are_neighbor_diffs_at_the_sampler_centres(device, channels_last):
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    layers = [2, 0, 1]
    feats_q = [f.requires_grad_() for f in maps(dtype, device, 1, channels_last)]
    feats_k = [f.requires_grad_() for f in maps(dtype, device, 5, channels_last)]
    seed = ccpl.draw_seed(device)
    rows_q, rows_k = ccpl.sampled_neighbor_diff(feats_q, feats_k, NUM_S, layers, seed=seed)
    centres = sampler_centres(seed, layers)
    assert [c.numel() for c in centres] == [6, 9, 9]
    weights = [torch.randn_like(r) for r in rows_q + rows_k]
    sum(((r * w).sum() for r, w in zip(rows_q + rows_k, weights))).backward()
    got_grads = [f.grad for f in feats_q + feats_k]

    fresh = [f.detach().clone().requires_grad_() for f in feats_q + feats_k]
    fresh_q, fresh_k = fresh[: len(SIZES)], fresh[len(SIZES) :]
    want_q = [ccpl.neighbor_diff(fresh_q[i], c) for i, c in zip(layers, centres)]
    want_k = [ccpl.neighbor_diff(fresh_k[i], c) for i, c in zip(layers, centres)]
    sum(((r * w).sum() for r, w in zip(want_q + want_k, weights))).backward()
    # A difference rounded once to the dtype (float32's subtraction is correctly rounded too).
    for what, got, want in zip(("rows_q", "rows_k"), (rows_q, rows_k), (want_q, want_k)):
        for j, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == dtype and g.shape == w.shape
            assert torch.equal(g, w), f"{what}[{j}]"
    for i, (g, f) in enumerate(zip(got_grads, fresh)):
        if i % len(SIZES) in layers:
            assert_close(f"grad of map {i}", g, f.grad, F64_GRAD_TOLERANCE if dtype == torch.float64 else F32_TOLERANCE)


def test_centres_are_fresh_and_follow_manual_seed(device):
    feats = maps(torch.float32, device, 2)
    torch.manual_seed(4)
    a, _ = ccpl.sampled_neighbor_diff(feats, feats, NUM_S, [0, 1])
    b, _ = ccpl.sampled_neighbor_diff(feats, feats, NUM_S, [0, 1])
    torch.manual_seed(4)
    again, _ = ccpl.sampled_neighbor_diff(feats, feats, NUM_S, [0, 1])
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    assert not torch.equal(a[0], b[0])


def test_gradcheck():
    feats_q = [f.requires_grad_() for f in maps(seed=3)]
    feats_k = [f.requires_grad_() for f in maps(seed=7)]
    seed = ccpl.draw_seed(torch.device("cpu"))

    def rows(*fs):
        q, k = ccpl.sampled_neighbor_diff(fs[:3], fs[3:], 4, [0, 1, 2], seed=seed)
        return (*q, *k)

    assert torch.autograd.gradcheck(rows, (*feats_q, *feats_k))


def test_opcheck():
    feats_q = [f.requires_grad_() for f in maps(seed=3)]
    feats_k = maps(seed=7)
    seed = ccpl.draw_seed(torch.device("cpu"))
    torch.library.opcheck(torch.ops.ccpl.sampled_neighbor_diff.default, (feats_q, feats_k, seed, 4))


def test_a_second_derivative_is_refused_not_zero():
    feats = [f.requires_grad_() for f in maps(seed=9)]
    rows_q, _ = ccpl.sampled_neighbor_diff(feats, feats, NUM_S, [0])
    (grad,) = torch.autograd.grad(rows_q[0].pow(2).sum(), feats[0], create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad.sum().backward()


def test_refuses_what_the_path_cannot_take():
    feats = maps(torch.float32)
    big = [torch.randn(1, 3, 12, 12)]
    cases = [
        ((big, big, 65, [0]), ValueError, "at most 512"),
        ((feats, feats, 0, [0]), ValueError, "num_s"),
        ((feats, feats, NUM_S, [3]), ValueError, "layer 3"),
        ((feats, feats, NUM_S, []), ValueError, "empty"),
        ((feats, [f.double() for f in feats], NUM_S, [0]), TypeError, "dtype"),
        ((feats, feats, NUM_S, [0] * (ccpl.sampled.MAX_LAYERS + 1)), ValueError, "layers"),
        ((feats[0], feats, NUM_S, [0]), TypeError, "sequence of feature maps"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            ccpl.sampled_neighbor_diff(*args)
    with pytest.raises(ValueError, match="seed"):
        ccpl.sampled_neighbor_diff(feats, feats, NUM_S, [0], seed=torch.zeros(3, dtype=torch.int32))


def heads(dtype=torch.float64, device="cpu"):
    torch.manual_seed(11)
    return original.paper_mlp([s[1] for s in SIZES]).to(dtype).to(device)


def test_the_drop_in_draws_on_the_device_the_centres_it_would_be_given(device):
    """The drop-in's one-call path gives the loss and gradients of its layer-by-layer path on
    the centres the sampler drew (under the same generator state)."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    tol = 1e-12 if dtype == torch.float64 else F32_TOLERANCE
    module = ccpl.CCPL(heads(dtype, device))
    feats_q = [f.requires_grad_() for f in maps(dtype, device, 12)]
    feats_k = maps(dtype, device, 13)
    torch.manual_seed(21)
    seed = ccpl.draw_seed(device)
    centres = sampler_centres(seed, [0, 1, 2])
    torch.manual_seed(21)
    got = module(feats_q, feats_k, NUM_S, 0, 3)
    got.backward()
    got_grads = [p.grad.clone() for p in module.parameters()] + [f.grad.clone() for f in feats_q]
    module.zero_grad()
    for f in feats_q:
        f.grad = None
    want = module(feats_q, feats_k, NUM_S, 0, 3, centers=centres)
    want.backward()
    want_grads = [p.grad for p in module.parameters()] + [f.grad for f in feats_q]
    assert_close("loss", got, want, tol)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert_close(f"gradient {i}", g, w, tol)


# ---- CUDA: the training step the path exists for -------------------------------------------

PAPER = ((8, 128, 128, 128), (8, 256, 64, 64), (8, 512, 32, 32))
"""relu2_1, relu3_1, relu4_1 of VGG-19 at 256x256, batch 8: the paper's configuration."""


def paper_step(cuda, dtype=torch.float32):
    torch.manual_seed(0)
    mlp = original.paper_mlp([s[1] for s in PAPER]).to(cuda)
    module = ccpl.CCPL(mlp)
    feats_q = [torch.randn(s, device=cuda, dtype=dtype, requires_grad=True) for s in PAPER]
    feats_k = [torch.randn(s, device=cuda, dtype=dtype) for s in PAPER]
    return module, feats_q, feats_k


def test_a_training_step_with_heads_is_captured_in_a_cuda_graph(cuda, monkeypatch):
    """Forward, backward and the optimiser step in one CUDA graph; each replay draws new centres
    on the device, and its loss is eager's on the centres it drew."""
    module, feats_q, feats_k = paper_step(cuda)
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    drawn = []
    real_draw = ccpl.sampled.draw_seed
    monkeypatch.setattr(ccpl.sampled, "draw_seed", lambda d: drawn.append(real_draw(d)) or drawn[-1])

    def step():
        opt.zero_grad(set_to_none=False)
        loss = module(feats_q, feats_k, 8, 0, 3)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    drawn.clear()
    with torch.cuda.graph(graph):
        static_loss = step()
    (static_seed,) = drawn
    losses = []
    for _ in range(3):
        before = [p.detach().clone() for p in module.parameters()]
        graph.replay()
        torch.cuda.synchronize()
        losses.append(static_loss.item())
        seed = ccpl.seed_value(static_seed)
        centres = [ccpl.loss_centers(s[2], s[3], 8, seed, j) for j, s in enumerate(PAPER)]
        eager = ccpl.CCPL(original.paper_mlp([s[1] for s in PAPER]).to(cuda))
        with torch.no_grad():
            for p, b in zip(eager.parameters(), before):
                p.copy_(b)
        want = eager(feats_q, feats_k, 8, 0, 3, centers=centres)
        assert_close("replayed loss vs eager on its centres", torch.tensor(losses[-1]), want, F32_TOLERANCE)
    assert len(set(losses)) == 3, f"every replay draws new centres: {losses}"


def test_a_training_step_compiles_with_reduce_overhead(cuda):
    module, feats_q, feats_k = paper_step(cuda)

    @torch.compile(mode="reduce-overhead")
    def step(qs, ks):
        loss = module(qs, ks, 8, 0, 3)
        loss.backward()
        return loss

    losses = [step(feats_q, feats_k).item() for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) > 1


def test_launches_per_training_step_from_the_profiler(cuda):
    """The Rust side's count (python/src/tests/small_s.rs) for the sequence the package
    issues, seen by torch.profiler on the GPU: the kernels named small_s_*."""
    module, feats_q, feats_k = paper_step(cuda)
    module(feats_q, feats_k, 8, 0, 3).backward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        module(feats_q, feats_k, 8, 0, 3).backward()
        torch.cuda.synchronize()
    ours = [e.name for e in prof.events() if "small_s_" in e.name]
    print(f"ccpl kernels in a training step with heads at the paper configuration: {len(ours)}")
    assert len(ours) == 4, ours


def test_a_step_on_a_side_stream_never_waits_on_the_host(cuda):
    module, feats_q, feats_k = paper_step(cuda, torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda.set_sync_debug_mode("error")  # any synchronising PyTorch call raises
        try:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = module(feats_q, feats_k, 8, 0, 3)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.isfinite(loss) and all(torch.isfinite(f.grad).all() for f in feats_q)


def test_the_backward_op_checks_its_arguments():
    feats = maps(torch.float64)
    seed = ccpl.draw_seed(torch.device("cpu"))
    out = torch.ops.ccpl.sampled_neighbor_diff(feats, feats, seed, 4)
    workspace, rows = out[-1], out[:3]
    sizes = [n for f in feats for n in (*f.shape, 0)]
    good = [torch.zeros_like(r) for r in rows]
    backward = torch.ops.ccpl.sampled_neighbor_diff_backward
    cases = [
        ((good[:2], [], workspace, sizes, torch.float64, 4), ValueError, "2 row gradients of q for 3"),
        ((good, [], workspace, sizes, torch.int32, 4), TypeError, "dtype"),
        (([g.float() for g in good], [], workspace, sizes, torch.float64, 4), ValueError, "row gradient 0 of q"),
        (([g.transpose(1, 2).contiguous().transpose(1, 2) for g in good], [], workspace, sizes, torch.float64, 4),
         ValueError, "not contiguous"),
        ((good, [], workspace[:4], sizes, torch.float64, 4), ValueError, "workspace"),
        ((good, [], workspace, sizes[:7], torch.float64, 4), ValueError, "sizes"),
        ((good, good[:1], workspace, sizes, torch.float64, 4), ValueError, "row gradients of k"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            backward(*args)
    grads = backward(good, good, workspace, sizes, torch.float64, 4)
    assert len(grads) == 6 and all(g.abs().sum() == 0 for g in grads)
