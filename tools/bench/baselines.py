#!/usr/bin/env python3
"""PyTorch baselines of the CCP loss, forward plus backward, at the sizes of benches/configs.txt.

Written from the contract (docs/ccpl-loss.md) the way the original implementation computes the
loss: gather the centre and neighbour rows, subtract, normalise (`x / (||x|| + 1e-7)`), `bmm`,
fill the diagonal with -inf, concatenate the positive in front, divide by tau, cross-entropy
against class 0. Timed in eager mode, under torch.compile, and (B = 1 only) with Inf-CL's fused
Triton loss (`inf_cl.cal_flash_loss`).

Timing: CUDA events around each forward plus backward, after warm-up, median over repeats,
inputs rotated among several sets so that small sizes do not run out of L2. Peak memory: the
most the caching allocator held during one step, above what the inputs already held.

One JSON line per (config, dtype, implementation) goes to --out. Jobs run in priority order
(eager everywhere, then torch.compile where the targets are, then the rest) and stop starting at
--deadline (a Unix time): later jobs are recorded as 'budget', so the table says what was not
measured instead of silently missing it.

Smoke test without a GPU: `--device cpu --quick` (tiny sizes, wall-clock timing).
CCPL_BENCH_TAGS=paper (say) keeps only the configurations with those tags.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

TAU = 0.07
NORM_EPS = 1e-7
# torch.OutOfMemoryError is the newer name; torch.cuda.OutOfMemoryError the older one.
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", RuntimeError), getattr(torch.cuda, "OutOfMemoryError", RuntimeError)})
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


# ---- The loss, the way the original computes it -------------------------------------------


def neighbor_ids(height: int, width: int, centers: int, generator: torch.Generator, device) -> tuple:
    """Centre and neighbour flat indices, direction-major (row k*N + x), as the original builds
    them: a random permutation of the interior, its first N entries, each repeated for the 8
    directions with the offsets -(W+1), -W, -(W-1), -1, +1, W-1, W, W+1."""
    s_ids = torch.randperm((height - 2) * (width - 2), generator=generator)[:centers]
    c = (s_ids // (width - 2) + 1) * width + (s_ids % (width - 2) + 1)
    offsets = torch.tensor([-(width + 1), -width, -(width - 1), -1, 1, width - 1, width, width + 1])
    c_ids = c.repeat(8)
    n_ids = c_ids + offsets.repeat_interleave(centers)
    return c_ids.to(device), n_ids.to(device)


def normalize(x):
    """Normalize(2) of the original: over dim 1, the epsilon added to the norm."""
    norm = x.pow(2).sum(1, keepdim=True).pow(1.0 / 2)
    return x.div(norm + NORM_EPS)


def patch_nce(f_q, f_k, tau: float, detach_k: bool):
    """PatchNCE of the original on (B, C, S) unit columns: positive first, masked negatives."""
    batch, _, rows = f_q.shape
    if detach_k:
        f_k = f_k.detach()
    l_pos = (f_k * f_q).sum(dim=1)[:, :, None]
    l_neg = torch.bmm(f_q.transpose(1, 2), f_k)
    identity = torch.eye(rows, dtype=torch.bool, device=f_q.device)[None, :, :]
    l_neg.masked_fill_(identity, -float("inf"))
    logits = torch.cat((l_pos, l_neg), dim=2) / tau
    targets = torch.zeros(batch * rows, dtype=torch.long, device=f_q.device)
    return F.cross_entropy(logits.flatten(0, 1), targets)


def layer_loss(feat_q, feat_k, c_ids, n_ids):
    """One layer from its feature maps (B, C, H, W), identity head: NeighborSample, PatchNCE."""

    def sample(feat):
        feat_r = feat.permute(0, 2, 3, 1).flatten(1, 2)  # (B, HW, C)
        feat_d = feat_r[:, c_ids, :] - feat_r[:, n_ids, :]  # (B, S, C)
        return normalize(feat_d.permute(0, 2, 1))  # (B, C, S)

    return patch_nce(sample(feat_q), sample(feat_k), TAU, detach_k=True)


def rows_loss(rows_q, rows_k, detach_k: bool):
    """The loss from head output rows (B, S, D)."""
    return patch_nce(normalize(rows_q.permute(0, 2, 1)), normalize(rows_k.permute(0, 2, 1)), TAU, detach_k)


def infcl_rows_loss(rows_q, rows_k):
    """The same loss (B = 1) through Inf-CL's fused Triton kernels on spec-normalised rows."""
    from inf_cl import cal_flash_loss

    q = rows_q[0] / (rows_q[0].norm(dim=-1, keepdim=True) + NORM_EPS)
    k = rows_k[0] / (rows_k[0].norm(dim=-1, keepdim=True) + NORM_EPS)
    return cal_flash_loss(q, k, scale=1.0 / TAU, head_dim=q.shape[-1]).mean()


def check_against_spec() -> float:
    """The original's way of computing the loss must be the spec's function: compares the loss
    and d feat_q with spec steps 3-7 written directly (float64, CPU, a small odd size)."""
    gen = torch.Generator().manual_seed(7)
    b, c, h, w, n = 2, 5, 7, 9, 6
    feat_q = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    feat_k = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    c_ids, n_ids = neighbor_ids(h, w, n, gen, "cpu")
    ours = layer_loss(feat_q, feat_k, c_ids, n_ids)
    (grad_ours,) = torch.autograd.grad(ours, feat_q)

    def spec(fq):
        def rows(f):  # d[b, k*N + x, :] = f[b, :, p_x] - f[b, :, p_x + off_k]
            flat = f.flatten(2)  # (B, C, HW)
            return (flat[:, :, c_ids] - flat[:, :, n_ids]).transpose(1, 2)

        q, k = rows(fq), rows(feat_k)
        q = q / (q.norm(dim=2, keepdim=True) + NORM_EPS)
        k = k / (k.norm(dim=2, keepdim=True) + NORM_EPS)
        logits = q @ k.transpose(1, 2) / TAU
        return (torch.logsumexp(logits, dim=2) - torch.diagonal(logits, dim1=1, dim2=2)).mean()

    expected = spec(feat_q)
    (grad_spec,) = torch.autograd.grad(expected, feat_q)
    err = max(abs(ours.item() - expected.item()) / abs(expected.item()), ((grad_ours - grad_spec).norm() / grad_spec.norm()).item())
    if not err < 1e-12:
        raise SystemExit(f"baselines: the original-style loss differs from the spec by {err:.3g}")
    return err


# ---- Inputs --------------------------------------------------------------------------------


class Inputs:
    """Several independent input sets of one configuration, to rotate through."""

    def __init__(self, cfg: common.Config, dtype, device, l2_bytes: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.cfg = cfg
        if cfg.suite == "layer":
            shape = (cfg.batch, cfg.channels, cfg.height, cfg.width_map)
            self.c_ids, self.n_ids = neighbor_ids(cfg.height, cfg.width_map, cfg.centers, gen, device)
        else:
            shape = (cfg.batch, cfg.rows, cfg.width)
        set_bytes = 2 * math.prod(shape) * torch.finfo(dtype).bits // 8
        # Enough sets that one pass over them is at least twice the L2, at most 8 and 1 GB.
        count = max(1, min(8, math.ceil(2 * l2_bytes / set_bytes), (1 << 30) // set_bytes))
        self.q, self.k = [], []
        for _ in range(count):
            # Random normal data: never zeros, which can run faster than real data.
            self.q.append(torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(True))
            self.k.append(torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(cfg.grads == "qk"))
        self.bytes = count * set_bytes

    def __len__(self):
        return len(self.q)

    def step(self, fn, i: int):
        """One forward plus backward on set i; returns the loss tensor."""
        q, k = self.q[i % len(self.q)], self.k[i % len(self.k)]
        q.grad = None
        k.grad = None
        loss = fn(q, k)
        loss.backward()
        return loss


def make_fn(cfg: common.Config, impl: str, inputs: Inputs):
    if impl == "infcl":
        return infcl_rows_loss
    if cfg.suite == "layer":
        c_ids, n_ids = inputs.c_ids, inputs.n_ids

        def base(q, k):
            return layer_loss(q, k, c_ids, n_ids)
    else:
        detach_k = cfg.grads == "q"

        def base(q, k):
            return rows_loss(q, k, detach_k)

    if impl == "eager":
        return base
    if impl == "compile":
        return torch.compile(base, dynamic=False)
    if impl == "compile-graphs":
        compiled = torch.compile(base, dynamic=False, mode="reduce-overhead")

        def with_step(q, k):
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(q, k)

        return with_step
    raise ValueError(impl)


# ---- Timing --------------------------------------------------------------------------------


class Clock:
    """CUDA events on a GPU, the wall clock after a synchronisation elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_steps(self, run, count: int, first: int) -> list[float]:
        """Milliseconds of each of `count` calls run(first + i); launched back to back, read
        after one synchronisation."""
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
            for i, (start, end) in enumerate(events):
                start.record()
                run(first + i)
                end.record()
            torch.cuda.synchronize()
            return [start.elapsed_time(end) for start, end in events]
        out = []
        for i in range(count):
            t0 = time.perf_counter()
            run(first + i)
            out.append((time.perf_counter() - t0) * 1e3)
        return out


def measure(cfg, dtype_name, impl, device, args, l2_bytes) -> dict:
    dtype = DTYPES[dtype_name]
    clock = Clock(device)
    rec = {"suite": cfg.suite, "config": cfg.name, "dtype": dtype_name, "impl": impl}
    inputs = Inputs(cfg, dtype, device, l2_bytes, seed=args.seed)
    rec["input_sets"] = len(inputs)
    fn = make_fn(cfg, impl, inputs)
    run = lambda i: inputs.step(fn, i)  # noqa: E731

    # First call: compilation (torch.compile, Triton) and allocator growth; timed on its own.
    t0 = time.perf_counter()
    loss = run(0)
    clock.sync()
    rec["first_call_s"] = round(time.perf_counter() - t0, 3)
    rec["loss"] = float(loss.detach().float())
    if not math.isfinite(rec["loss"]):
        raise RuntimeError(f"non-finite loss {rec['loss']}")

    # Warm-up: at least 3 calls and warmup_ms, which also estimates the time of one call.
    warm = clock.time_steps(run, 3, 1)
    while sum(warm) < args.warmup_ms and len(warm) < 1000:
        warm += clock.time_steps(run, len(warm), 1)
    per_call = statistics.median(warm)
    reps = int(max(args.min_reps, min(args.max_reps, args.target_ms / max(per_call, 1e-3))))

    # Peak memory of one step, above what the inputs hold.
    if clock.cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(0)
        torch.cuda.synchronize()
        rec["peak_step_bytes"] = torch.cuda.max_memory_allocated() - base
        rec["input_bytes"] = inputs.bytes

    times = clock.time_steps(run, reps, 0)
    times.sort()
    rec.update(
        status="ok",
        reps=reps,
        median_ms=statistics.median(times),
        p10_ms=times[len(times) // 10],
        p90_ms=times[(9 * len(times)) // 10],
    )
    return rec


def jobs(configs, impls):
    """(priority, cfg, dtype, impl) in the order they run: eager everywhere first; then
    torch.compile where the targets are (the paper's layers, large and huge S); Inf-CL; then
    torch.compile on the rest; CUDA-graph compile on the paper's layers last."""
    out = []
    for cfg in configs:
        for dtype in cfg.dtypes:
            for impl in impls:
                if impl == "infcl" and not (cfg.suite == "rows" and cfg.batch == 1):
                    continue
                if impl == "compile-graphs" and not (cfg.tag == "paper" and cfg.suite == "layer"):
                    continue
                if impl == "eager":
                    prio = 0
                elif impl == "compile":
                    prio = 1 if cfg.suite == "layer" else 3
                elif impl == "infcl":
                    prio = 2
                else:
                    prio = 4
                out.append((prio, cfg, dtype, impl))
    out.sort(key=lambda j: j[0])
    return out


def quick_configs(configs):
    """Tiny stand-ins for a CPU smoke test: the same suites and options at small sizes."""
    out = []
    for cfg in configs:
        if cfg.suite == "layer":
            h = w = 12
            n = min(cfg.centers, 4)
            tiny = common.Config(
                suite="layer", name=cfg.name, tag=cfg.tag, batch=min(cfg.batch, 2), rows=8 * n, width=16,
                dtypes=cfg.dtypes, grads="q", channels=16, height=h, width_map=w, centers=n,
            )
        else:
            tiny = common.Config(
                suite="rows", name=cfg.name, tag=cfg.tag, batch=min(cfg.batch, 2), rows=min(cfg.rows, 32),
                width=min(cfg.width, 16), dtypes=cfg.dtypes, grads=cfg.grads,
            )
        out.append(tiny)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON-lines file to append one record per job to")
    ap.add_argument("--configs", default=None, help="configs.txt (default: found beside or in benches/)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--impls", default="eager,compile,infcl,compile-graphs")
    ap.add_argument("--deadline", type=float, default=0.0, help="Unix time after which no job starts")
    ap.add_argument("--warmup-ms", type=float, default=100.0)
    ap.add_argument("--target-ms", type=float, default=300.0, help="time spent on the timed repeats")
    ap.add_argument("--min-reps", type=int, default=10)
    ap.add_argument("--max-reps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=20220708)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    args = ap.parse_args()

    print(f"baselines: original-style loss vs spec formula (float64): relative error {check_against_spec():.2g}", flush=True)
    device = torch.device(args.device)
    configs = common.load_configs(args.configs)
    if args.quick:
        configs = quick_configs(configs)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
        torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default: f32 products in f32
        torch.backends.cudnn.allow_tf32 = False
        print(f"baselines: {props.name}, torch {torch.__version__}, L2 {l2_bytes >> 20} MiB", flush=True)
    else:
        l2_bytes = 0
    impls = [i for i in args.impls.split(",") if i]
    if "infcl" in impls:
        try:
            import inf_cl  # noqa: F401
        except ImportError as e:
            print(f"baselines: Inf-CL not importable ({e}); its jobs are recorded as errors", flush=True)

    for _, cfg, dtype, impl in jobs(configs, impls):
        head = {"suite": cfg.suite, "config": cfg.name, "dtype": dtype, "impl": impl}
        if args.deadline and time.time() > args.deadline:
            common.write_record(args.out, {**head, "status": "budget"})
            print(f"baselines: {cfg.name} {dtype} {impl}: not run (time budget spent)", flush=True)
            continue
        torch._dynamo.reset()
        t0 = time.perf_counter()
        try:
            rec = measure(cfg, dtype, impl, device, args, l2_bytes)
        except Exception as e:  # a failing job is recorded and the rest go on
            oom = isinstance(e, OOM_ERRORS) or "out of memory" in str(e).lower()
            rec = {**head, "status": "oom" if oom else "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
            if not oom:
                traceback.print_exc()
        rec["job_s"] = round(time.perf_counter() - t0, 2)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        common.write_record(args.out, rec)
        shown = common.fmt_time_ms(rec.get("median_ms")) if rec["status"] == "ok" else rec["status"]
        print(
            f"baselines: {cfg.name} {dtype} {impl}: {shown}"
            f" (first call {rec.get('first_call_s', '-')} s, job {rec['job_s']} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
