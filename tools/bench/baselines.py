#!/usr/bin/env python3
"""PyTorch baselines of the CCP loss, forward plus backward, at the sizes of benches/configs.txt.

Written from the contract (docs/ccpl-loss.md) and from what the original implementation does
(its behaviour, not its code; original.py, the port the tests and the goldens share): gather the centre and neighbour rows, subtract, (project with its
MLP head), normalise (`x / (||x|| + 1e-7)`), `bmm`, fill the diagonal with -inf, concatenate the
positive in front, divide by tau, cross-entropy against class 0. A `step` configuration (the
paper's training step) is the sum of its layers' losses, one function forward and backward,
each layer with its own centres (and head). The implementations (`--impls`):

- `eager`: identity head, centres drawn once outside the timed step: the same function and the
  same work as our headline step (BENCHMARKS.md, "Like with like").
- `original-identity`: a step as the original's users run it, with the identity head: the
  centres drawn on the device every step (`randperm`), the neighbour offsets built as a Python
  list on the host and copied, the diagonal mask (`eye`) and the targets built on the host and
  copied, every call; the loss read on the host after the step (the original's training loop
  logs `loss.item()` every iteration). Beside our step that samples, uploads and reads back.
- `original`: the same with the original's MLP head (`Linear(C, C)`, `ReLU`, `Linear(C, C/4)`)
  on every layer, whose parameters get their gradients too (cleared each step, as
  `optimizer.zero_grad()` does): what a user of the original pays. Step and layer
  configurations, f32 (the original trains in f32).
- `compile`, `compile-graphs`: `eager` under `torch.compile`, and with
  `mode="reduce-overhead"` (CUDA graphs; every input set's addresses marked static, so a
  replay copies no input; a graph is recorded per set). The number of cudagraph skips is
  recorded: a run with skips is not a CUDA-graph run, and the report says so. With
  `--compile-backend aot_eager` (the dry run's), both trace the step with dynamo and
  AOTAutograd as on the GPU but generate no code: inductor's CPU code generation is C++, not
  the Triton a GPU run compiles, and it took most of the dry run's time in CI (98 of 125 s).
- `infcl` (B = 1 rows): Inf-CL's fused Triton loss (`inf_cl.cal_flash_loss`).

Timing: CUDA events around each step, after warm-up, median over repeats, inputs rotated among
several sets. Peak memory: the most the caching allocator held during one step above what the
inputs (and a head's parameters) held, measured after a synchronisation with no gradient of an
earlier step alive, so the step's fresh gradients count.

One JSON line per (config, dtype, implementation) goes to --out: a `running` line when a job
starts, its result when it ends (the report reads the last). Jobs run in the order of --impls,
then configurations, and none starts after --deadline (a Unix time): those are recorded as
`budget`. SIGTERM (the runner's phase limit) records the job in flight as `timeout` and the rest
as `budget`. CCPL_BENCH_TAGS and CCPL_BENCH_ONLY select configurations as for the Rust benches.

Without a GPU: `--device cpu` (wall-clock timing; the runner's dry run, on the tiny
configurations of benches/configs-dry-run.txt).
"""

from __future__ import annotations

import argparse
import functools
import math
import operator
import os
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import original  # noqa: E402
from original import NORM_EPS  # noqa: E402

TAU = 0.07
# torch.OutOfMemoryError is the newer name; torch.cuda.OutOfMemoryError the older one.
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", RuntimeError), getattr(torch.cuda, "OutOfMemoryError", RuntimeError)})
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
IMPLS = ("eager", "original-identity", "original", "compile", "compile-graphs", "infcl")


# ---- The loss, the way the original computes it (original.py) ---------------------------


def center_ids(draw, width: int):
    """Flat indices of the centres whose interior indices (row-major over the (H-2)(W-2)
    interior) are `draw`."""
    return (draw // (width - 2) + 1) * width + draw % (width - 2) + 1


def neighbor_ids(height: int, width: int, centers: int, generator: torch.Generator, device) -> tuple:
    """Centre and neighbour flat indices, neighbour-major (row k*N + x), drawn once (outside
    any timed step): a random permutation of the interior, its first N entries."""
    draw = torch.randperm((height - 2) * (width - 2), generator=generator)[:centers]
    c_ids, n_ids = original.neighbor_ids(center_ids(draw, width), width)
    return c_ids.to(device), n_ids.to(device)


def neighbor_ids_per_step(height: int, width: int, centers: int, device) -> tuple:
    """The same indices the way the original builds them on every call: the permutation drawn
    on the device, the offsets a Python list built on the host and copied to the device."""
    draw = torch.randperm((height - 2) * (width - 2), device=device)[:centers]
    return original.neighbor_ids(center_ids(draw, width), width)


def layer_loss(feat_q, feat_k, c_ids, n_ids, head=None, host_built: bool = False):
    """One layer from its feature maps (B, C, H, W): NeighborSample (difference rows, the head
    when there is one, the original's normalisation), then PatchNCE with the content side
    detached."""
    return original.layer_loss_at(
        feat_q, feat_k, (c_ids, n_ids), TAU, head=head, norm=original.original_normalize, host_built=host_built
    )


def original_head(channels: int, dtype, device, seed: int):
    """The original's projection head of one layer: Linear(C, C), ReLU, Linear(C, C/4), with
    PyTorch's default initialisation (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Sequential(
            torch.nn.Linear(channels, channels), torch.nn.ReLU(), torch.nn.Linear(channels, channels // 4)
        )
    return head.to(device=device, dtype=dtype)


def total(losses):
    """The sum of the layers' losses (a single layer's loss is itself, with no extra add)."""
    return functools.reduce(operator.add, losses)


def rows_loss(rows_q, rows_k, detach_k: bool):
    """The loss from head output rows (B, S, D), with the original's normalisation."""
    return original.rows_loss(rows_q, rows_k, TAU, detach_k, norm=original.original_normalize)


def infcl_rows_loss(rows_q, rows_k):
    """The same loss (B = 1) through Inf-CL's fused Triton kernels on spec-normalised rows."""
    from inf_cl import cal_flash_loss

    q = rows_q[0] / (rows_q[0].norm(dim=-1, keepdim=True) + NORM_EPS)
    k = rows_k[0] / (rows_k[0].norm(dim=-1, keepdim=True) + NORM_EPS)
    return cal_flash_loss(q, k, scale=1.0 / TAU, head_dim=q.shape[-1]).mean()


def check_against_spec() -> float:
    """The original's way of computing the loss must be the spec's function: compares the loss
    and d feat_q with spec steps 3-7 written directly (float64, CPU, a small odd size), for
    indices drawn once and for the original's per-step construction of the same draw."""
    gen = torch.Generator().manual_seed(7)
    b, c, h, w, n = 2, 5, 7, 9, 6
    feat_q = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    feat_k = torch.randn(b, c, h, w, generator=gen, dtype=torch.float64)
    c_ids, n_ids = neighbor_ids(h, w, n, gen, "cpu")

    def spec(fq, c_ids, n_ids):
        def rows(f):  # d[b, k*N + x, :] = f[b, :, p_x] - f[b, :, p_x + off_k]
            flat = f.flatten(2)  # (B, C, HW)
            return (flat[:, :, c_ids] - flat[:, :, n_ids]).transpose(1, 2)

        q, k = rows(fq), rows(feat_k)
        q = q / (q.norm(dim=2, keepdim=True) + NORM_EPS)
        k = k / (k.norm(dim=2, keepdim=True) + NORM_EPS)
        logits = q @ k.transpose(1, 2) / TAU
        return (torch.logsumexp(logits, dim=2) - torch.diagonal(logits, dim1=1, dim2=2)).mean()

    def err(ours, expected):
        (grad_ours,) = torch.autograd.grad(ours, feat_q)
        (grad_spec,) = torch.autograd.grad(expected, feat_q)
        return max(abs(ours.item() - expected.item()) / abs(expected.item()), ((grad_ours - grad_spec).norm() / grad_spec.norm()).item())

    worst = err(layer_loss(feat_q, feat_k, c_ids, n_ids), spec(feat_q, c_ids, n_ids))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        step_c, step_n = neighbor_ids_per_step(h, w, n, "cpu")
    # The per-step construction must give the same pairs as the once-drawn one for its draw.
    if not torch.equal(step_n - step_c, n_ids - c_ids):
        raise SystemExit("baselines: the per-step neighbour offsets differ from the once-drawn ones")
    worst = max(worst, err(layer_loss(feat_q, feat_k, step_c, step_n, host_built=True), spec(feat_q, step_c, step_n)))
    if not worst < 1e-12:
        raise SystemExit(f"baselines: the original-style loss differs from the spec by {worst:.3g}")
    return worst


# ---- Inputs and steps ----------------------------------------------------------------------


class Inputs:
    """Several independent input sets of one configuration, to rotate through. A set holds a
    tuple of tensors on each side: every layer's feature map for a step, the one layer's for a
    layer, the rows for rows."""

    def __init__(self, cfg: common.Config, dtype, device, l2_bytes: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.cfg = cfg
        self.maps = maps_of(cfg)
        if self.maps:
            shapes = [(m.batch, m.channels, m.height, m.width_map) for m in self.maps]
            # Each layer's centre and neighbour indices, drawn once.
            self.ids = [neighbor_ids(m.height, m.width_map, m.centers, gen, device) for m in self.maps]
        else:
            shapes = [(cfg.batch, cfg.rows, cfg.width)]
            self.ids = []
        set_bytes = 2 * sum(math.prod(shape) for shape in shapes) * torch.finfo(dtype).bits // 8
        # Enough sets that one pass over them is at least twice the L2, at most 8 and 1 GB.
        # Small configurations still fit the L2 with 8 sets (BENCHMARKS.md, "Timing").
        count = max(1, min(8, math.ceil(2 * l2_bytes / set_bytes), (1 << 30) // set_bytes))
        self.q, self.k = [], []
        for _ in range(count):
            # Random normal data: never zeros, which can run faster than real data.
            self.q.append(tuple(torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_(True) for s in shapes))
            self.k.append(
                tuple(torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_(cfg.grads == "qk") for s in shapes)
            )
        self.bytes = count * set_bytes

    def __len__(self):
        return len(self.q)

    def pair(self, i: int):
        return self.q[i % len(self.q)], self.k[i % len(self.k)]

    def tensors(self) -> list:
        """Every input tensor of every set, and the index tensors."""
        return [t for side in self.q + self.k for t in side] + [t for ids in self.ids for t in ids]

    def clear_grads(self):
        for side in self.q + self.k:
            for t in side:
                t.grad = None


def maps_of(cfg: common.Config) -> tuple:
    """The layers whose feature maps a configuration starts from: a step's, a layer itself;
    none for rows."""
    if cfg.suite == "step":
        return cfg.layers
    return (cfg,) if cfg.suite == "layer" else ()


@dataclass
class Impl:
    """What one step of an implementation runs: `loss(qs, ks)` on a set's tuples, then its
    backward."""

    loss: Callable
    # Trained parameters: their gradients are cleared each step, as optimizer.zero_grad() does.
    params: list = field(default_factory=list)
    # The step reads the loss on the host, as a training loop that logs it does.
    read_back: bool = False


def make_impl(cfg: common.Config, impl: str, inputs: Inputs, dtype, device, seed: int, backend: str) -> Impl:
    if impl == "infcl":
        return Impl(lambda qs, ks: infcl_rows_loss(qs[0], ks[0]))
    maps = inputs.maps
    if impl in ("original", "original-identity"):
        heads = [original_head(m.channels, dtype, device, seed + i) if impl == "original" else None for i, m in enumerate(maps)]

        def original_step(qs, ks):
            losses = []
            for m, q, k, head in zip(maps, qs, ks, heads):
                c_ids, n_ids = neighbor_ids_per_step(m.height, m.width_map, m.centers, device)
                losses.append(layer_loss(q, k, c_ids, n_ids, head=head, host_built=True))
            return total(losses)

        params = [p for head in heads if head is not None for p in head.parameters()]
        return Impl(original_step, params=params, read_back=True)
    if maps:

        def base(qs, ks):
            return total(layer_loss(q, k, c_ids, n_ids) for q, k, (c_ids, n_ids) in zip(qs, ks, inputs.ids))
    else:
        detach_k = cfg.grads == "q"

        def base(qs, ks):
            return rows_loss(qs[0], ks[0], detach_k)

    if impl == "eager":
        return Impl(base)
    if impl == "compile":
        return Impl(torch.compile(base, dynamic=False, backend=backend))
    if impl == "compile-graphs":
        # Static addresses: a replay reads each set where it lies (one recorded graph per set)
        # instead of copying q and k into the graph's own buffers first.
        for t in inputs.tensors():
            torch._dynamo.mark_static_address(t)
        # A mode is inductor's: another backend compiles without it (no CUDA graphs).
        graphs = {"mode": "reduce-overhead"} if backend == "inductor" else {"backend": backend}
        compiled = torch.compile(base, dynamic=False, **graphs)

        def with_step(qs, ks):
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(qs, ks)

        return Impl(with_step)
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


def cudagraph_counters() -> dict:
    """Inductor's counts of CUDA-graph skips and of non-static inputs at recording (copied into
    the graph on each replay), summed over the process."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {"skips": inductor["cudagraph_skips"], "copied": inductor["cudagraph_recorded_non_static_inputs"]}


def measure(cfg, dtype_name, impl_name, device, args, l2_bytes) -> dict:
    dtype = DTYPES[dtype_name]
    clock = Clock(device)
    rec = {"suite": cfg.suite, "config": cfg.name, "dtype": dtype_name, "impl": impl_name}
    inputs = Inputs(cfg, dtype, device, l2_bytes, seed=args.seed)
    rec["input_sets"] = len(inputs)
    impl = make_impl(cfg, impl_name, inputs, dtype, device, args.seed, args.compile_backend)
    graphs_before = cudagraph_counters()

    def run(i):
        qs, ks = inputs.pair(i)
        for t in (*qs, *ks, *impl.params):
            t.grad = None
        loss = impl.loss(qs, ks)
        loss.backward()
        if impl.read_back:
            loss.item()
        return loss

    # First call: compilation (torch.compile, Triton) and allocator growth; timed on its own.
    t0 = time.perf_counter()
    loss = run(0)
    clock.sync()
    rec["first_call_s"] = round(time.perf_counter() - t0, 3)
    rec["loss"] = float(loss.detach().float())
    if not math.isfinite(rec["loss"]):
        raise RuntimeError(f"non-finite loss {rec['loss']}")

    # Warm-up: every set at least twice (CUDA graphs record one graph per set) and warmup_ms,
    # which also estimates the time of one call.
    warm = clock.time_steps(run, max(3, 2 * len(inputs) + 1), 1)
    while sum(warm) < args.warmup_ms and len(warm) < 1000:
        warm += clock.time_steps(run, len(warm), 1)
    per_call = statistics.median(warm)
    reps = int(max(args.min_reps, min(args.max_reps, args.target_ms / max(per_call, 1e-3))))

    # Peak memory of one step above what the inputs (and parameters) hold, no gradient of an
    # earlier step alive: the step's own gradients count, as ours are counted.
    inputs.clear_grads()
    for p in impl.params:
        p.grad = None
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
    if impl_name.startswith("compile"):
        rec["compile_backend"] = args.compile_backend
        graphs_after = cudagraph_counters()
        rec["cudagraph_skips"] = graphs_after["skips"] - graphs_before["skips"]
        rec["cudagraph_copied_inputs"] = graphs_after["copied"] - graphs_before["copied"]
    return rec


def jobs(configs, impls) -> list[tuple]:
    """(cfg, dtype, impl) in the order they run: by configuration in file order (the order of
    importance), then dtype, then implementation as listed (a compilation with CUDA graphs
    right after the plain one of the same configuration finds its kernels in the caches)."""
    return [(cfg, dtype, impl) for cfg in configs for dtype in cfg.dtypes for impl in impls if common.applies(cfg, dtype, impl)]


class PhaseEnd(BaseException):
    """SIGTERM: the runner's time limit for this phase has come."""


def _on_term(signum, frame):
    raise PhaseEnd()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON-lines file to append the records to")
    ap.add_argument("--configs", default=None, help="configs.txt (default: CCPL_BENCH_CONFIGS, else found beside or in benches/)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--deadline", type=float, default=0.0, help="Unix time after which no job starts")
    ap.add_argument("--warmup-ms", type=float, default=100.0)
    ap.add_argument("--target-ms", type=float, default=300.0, help="time spent on the timed repeats")
    ap.add_argument("--min-reps", type=int, default=10)
    ap.add_argument("--max-reps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=20220708)
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (the dry run's: aot_eager)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _on_term)

    print(f"baselines: original-style loss vs spec formula (float64): relative error {check_against_spec():.2g}", flush=True)
    device = torch.device(args.device)
    configs = common.load_configs(args.configs)
    impls = [i for i in args.impls.split(",") if i]
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"baselines: unknown implementation {impl} (known: {', '.join(IMPLS)})")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
        torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default: f32 products in f32
        torch.backends.cudnn.allow_tf32 = False
        print(f"baselines: {props.name}, torch {torch.__version__}, L2 {l2_bytes >> 20} MiB", flush=True)
    else:
        l2_bytes = 0
        print(f"baselines: {device}, torch {torch.__version__} (wall-clock timing)", flush=True)
    if "infcl" in impls:
        try:
            import inf_cl  # noqa: F401
        except ImportError as e:
            print(f"baselines: Inf-CL not importable ({e}); its jobs are recorded as errors", flush=True)

    todo = jobs(configs, impls)
    for n, (cfg, dtype, impl) in enumerate(todo):
        head = {"suite": cfg.suite, "config": cfg.name, "dtype": dtype, "impl": impl}
        started = False
        try:
            if args.deadline and time.time() > args.deadline:
                raise PhaseEnd()
            common.write_record(args.out, {**head, "status": "running"})
            started = True
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
        except PhaseEnd:
            # The job in flight (if it started) ran out of time; the rest never start.
            for i, (c, d, m) in enumerate(todo[n:]):
                status = "timeout" if i == 0 and started else "budget"
                common.write_record(args.out, {"suite": c.suite, "config": c.name, "dtype": d, "impl": m, "status": status})
                print(f"baselines: {c.name} {d} {m}: {'killed at the time limit' if status == 'timeout' else 'not run (time budget spent)'}", flush=True)
            return
        if device.type == "cuda":
            torch.cuda.empty_cache()
        common.write_record(args.out, rec)
        shown = common.fmt_time_ms(rec.get("median_ms")) if rec["status"] == "ok" else rec["status"]
        extra = f", cudagraph skips {rec['cudagraph_skips']}" if rec.get("cudagraph_skips") else ""
        print(
            f"baselines: {cfg.name} {dtype} {impl}: {shown}"
            f" (first call {rec.get('first_call_s', '-')} s, job {rec['job_s']} s{extra})",
            flush=True,
        )


if __name__ == "__main__":
    main()
