"""Every op as a CUDA user runs it beyond the plain case: on a side stream without a host
wait, on a second GPU while another is current (the current device left as it was), and
compiled by inductor. GPU only: each case SKIPS without one (fails with CCPL_REQUIRE_GPU=1);
the second-GPU cases also skip on a machine with one GPU."""

import pytest
import torch

import ccpl
import original
from conftest import F32_TOLERANCE, assert_close, centers_for, features

SIZES = ((2, 8, 11, 9), (2, 16, 7, 6))


def inputs(device, seed=0):
    """Both sides' maps (feats_q tracked), centres for each layer, heads."""
    feats_q = [features(s, torch.float32, device, seed + i).requires_grad_() for i, s in enumerate(SIZES)]
    feats_k = [features(s, torch.float32, device, seed + 10 + i) for i, s in enumerate(SIZES)]
    centers = [centers_for(h, w, 6, seed=seed + 20 + i) for i, (_, _, h, w) in enumerate(SIZES)]
    torch.manual_seed(seed)
    mlp = original.paper_mlp([s[1] for s in SIZES]).to(device)
    return feats_q, feats_k, centers, mlp


def head_rows(mlp, rows):
    return mlp[2](mlp[1](mlp[0](rows)))


# Each op's loss from `inputs`; the centres drawn on the device follow torch.manual_seed.
OPS = {
    "neighbor_diff": lambda q, k, c, m: ccpl.neighbor_diff(q[0], c[0]).square().mean(),
    "rows_loss": lambda q, k, c, m: ccpl.rows_loss(
        head_rows(m, ccpl.neighbor_diff(q[0], c[0])), head_rows(m, ccpl.neighbor_diff(k[0], c[0]))
    ),
    "ccp_layer_loss": lambda q, k, c, m: ccpl.ccp_layer_loss(q[1], k[1], c[1]),
    "ccp_loss": lambda q, k, c, m: ccpl.ccp_loss(q, k, 6, [0, 1]),
    "sampled_neighbor_diff": lambda q, k, c, m: sum(
        r.square().mean() for r in ccpl.sampled_neighbor_diff(q, k, 6, [0, 1])[0]
    ),
    "CCPL": lambda q, k, c, m: ccpl.CCPL(m)(q, k, 6, 0, 1),
}


def run(op, device, seed=3):
    feats_q, feats_k, centers, mlp = inputs(device)
    torch.manual_seed(seed)
    loss = OPS[op](feats_q, feats_k, centers, mlp)
    loss.backward()
    return loss.detach(), [f.grad for f in feats_q if f.grad is not None]


@pytest.mark.parametrize("op", OPS)
def test_every_op_runs_on_a_side_stream_without_a_host_wait(cuda, op):
    want = run(op, cuda)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        feats_q, feats_k, centers, mlp = inputs(cuda)
        torch.manual_seed(3)
        torch.cuda.set_sync_debug_mode("error")  # any synchronising PyTorch call raises
        try:
            loss = OPS[op](feats_q, feats_k, centers, mlp)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    assert_close(f"{op} loss on a side stream", loss, want[0], F32_TOLERANCE)
    for g, w in zip([f.grad for f in feats_q if f.grad is not None], want[1]):
        assert_close(f"{op} gradient on a side stream", g, w, F32_TOLERANCE)


@pytest.mark.parametrize("op", OPS)
def test_every_op_runs_on_a_second_gpu_and_leaves_the_current_device(cuda, op):
    if torch.cuda.device_count() < 2:
        pytest.skip("SKIPPED: one GPU here; this case needs cuda:1")
    torch.cuda.set_device(0)
    want = run(op, torch.device("cuda:0"))
    got = run(op, torch.device("cuda:1"))
    assert torch.cuda.current_device() == 0, "the op changed the current device"
    assert_close(f"{op} loss on cuda:1", got[0].cpu(), want[0].cpu(), F32_TOLERANCE)
    for g, w in zip(got[1], want[1]):
        assert g.device == torch.device("cuda:1")
        assert_close(f"{op} gradient on cuda:1", g.cpu(), w.cpu(), F32_TOLERANCE)


@pytest.mark.parametrize("op", OPS)
def test_every_op_compiles_with_inductor_on_cuda(cuda, op, monkeypatch):
    # Inductor's own random numbers differ from eager's; the seed's draw must be eager's for
    # the centres to be the same.
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)
    want = run(op, cuda)
    feats_q, feats_k, centers, mlp = inputs(cuda)
    compiled = torch.compile(OPS[op], backend="inductor")
    torch.manual_seed(3)
    loss = compiled(feats_q, feats_k, centers, mlp)
    loss.backward()
    assert_close(f"{op} loss under inductor", loss, want[0], F32_TOLERANCE)
    for g, w in zip([f.grad for f in feats_q if f.grad is not None], want[1]):
        assert_close(f"{op} gradient under inductor", g, w, F32_TOLERANCE)
