"""The drop-in with heads under DistributedDataParallel: two CPU processes (gloo), each on half
the batch, give the heads the gradient one process gets on the whole batch. The loss is a mean
over images of per-image terms (each image's rows are contrasted within that image), so the
mean of the two halves' losses is the whole batch's, as DDP's averaged gradients assume."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ccpl
import original
from conftest import F64_GRAD_TOLERANCE, assert_close, centers_for, features

CHANNELS = (8, 16)
SIZES = ((4, 8, 9, 10), (4, 16, 6, 5))
WORLD = 2


def setup():
    """The heads, both sides' features (batch 4) and the centres, the same in every process."""
    torch.manual_seed(3)
    mlp = original.paper_mlp(CHANNELS).double()
    feats_q = [features(size, seed=20 + i) for i, size in enumerate(SIZES)]
    feats_k = [features(size, seed=30 + i) for i, size in enumerate(SIZES)]
    centers = [centers_for(h, w, 6, seed=40 + i) for i, (_, _, h, w) in enumerate(SIZES)]
    return mlp, feats_q, feats_k, centers


def heads_grads(module, feats_q, feats_k, centers):
    loss = module(feats_q, feats_k, 6, 0, len(SIZES), 0.07, centers=centers)
    loss.backward()
    return [p.grad.clone() for p in module.parameters()]


def worker(rank, store_path, out_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        mlp, feats_q, feats_k, centers = setup()
        module = torch.nn.parallel.DistributedDataParallel(ccpl.CCPL(mlp))
        half = slice(rank * 2, rank * 2 + 2)
        grads = heads_grads(module, [f[half] for f in feats_q], [f[half] for f in feats_k], centers)
        if rank == 0:
            torch.save(grads, out_path)
        # A process aborted at exit ("terminate called without an active exception") in 3 of
        # about 900 runs on the loaded 2-core machine, torch 2.15, its work done: a core dump
        # showed gloo's worker thread freeing DDP's last all-reduce, whose saved thread-local
        # state holds a Python object, while the main thread was in the interpreter's
        # finalisation; the thread's wait for the GIL ended it (pthread_exit) inside a C++
        # destructor, which terminates. So DDP's reducer is released, the processes meet at a
        # barrier, destroy the group, and leave without the interpreter's finalisation
        # (os._exit below), which has nothing of ccpl's to run.
        del module
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_heads_under_ddp_get_the_single_process_gradient(tmp_path):
    out = tmp_path / "grads.pt"
    # The gloo processes must not each start a thread per core on a small machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(str(tmp_path / "store"), str(out)), nprocs=WORLD, join=True)
    mlp, feats_q, feats_k, centers = setup()
    want = heads_grads(ccpl.CCPL(mlp), feats_q, feats_k, centers)
    got = torch.load(out, weights_only=True)
    assert len(got) == len(want)
    for (name, _), g, w in zip(mlp.named_parameters(), got, want):
        assert_close(f"DDP grad mlp.{name}", g, w, F64_GRAD_TOLERANCE)
