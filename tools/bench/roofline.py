#!/usr/bin/env python3
"""Measures the three ceilings the floor model divides by, on the GPU the benches ran on:

- copy bandwidth: a large device-to-device copy, bytes read plus bytes written;
- matrix rate: large square products through PyTorch (bf16; f32 with TF32 off, PyTorch's
  default; f32 with TF32 on), random data;
- special-function rate: exponentials per second, a Triton kernel whose every thread runs
  chains of `ex2.approx.f32` (the MUFU instruction an `expf`/`__expf` becomes) in registers.

Each is the median of timed repeats after warm-up, CUDA events. Writes one JSON object to --out
and prints it. A ceiling that cannot be measured is null, and the report says so. `--device
cpu` (the benchmark run's dry run): copy and products on the CPU at small sizes, wall clock, no
exponential ceiling.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch


DEVICE = "cuda"


def median_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    if DEVICE != "cuda":  # the dry run: the wall clock
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def copy_bandwidth(nbytes: int) -> dict:
    src = torch.randn(nbytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup=3, reps=20)
    moved = 2 * src.numel() * 4
    return {"copy_bytes": moved, "copy_ms": ms, "copy_GBps": moved / ms / 1e6}


def matmul_rate(n: int, dtype, tf32: bool) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(n, n, device=DEVICE).to(dtype)
        b = torch.randn(n, n, device=DEVICE).to(dtype)
        ms = median_ms(lambda: torch.mm(a, b), warmup=3, reps=10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    return {"n": n, "ms": ms, "tflops": 2 * n**3 / ms / 1e9}


try:
    import triton
    import triton.language as tl
except ImportError:  # the report then has no exponential ceiling
    triton = None

if triton is not None:

    @triton.jit
    def exp_chains(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr, ASM: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        for _ in range(ITERS):
            # x <- 2^(-x) keeps x in [0.5, 1]: no overflow, no denormals; BLOCK / threads
            # independent chains per thread keep the special-function units busy.
            if ASM:
                x = tl.inline_asm_elementwise("ex2.approx.f32 $0, $1;", "=r,r", [-x], dtype=tl.float32, is_pure=True, pack=1)
            else:
                x = tl.exp2(-x)
        tl.store(out_ptr + offs, x)


def exp_rate() -> dict:
    if DEVICE != "cuda":
        print("roofline: no exponential ceiling without a GPU")
        return {}
    if triton is None:
        raise RuntimeError("triton is not installed")
    props = torch.cuda.get_device_properties(0)
    block, iters = 2048, 512
    n = props.multi_processor_count * 32 * block
    x = torch.rand(n, device="cuda") * 0.5 + 0.5
    out = torch.empty_like(x)
    result = {}
    for asm in (True, False):
        try:
            run = lambda: exp_chains[(n // block,)](x, out, ITERS=iters, BLOCK=block, ASM=asm, num_warps=8)  # noqa: E731
            ms = median_ms(run, warmup=2, reps=10)
            if not torch.isfinite(out).all():
                raise RuntimeError("non-finite output")
            result = {"exp_kernel": "inline ex2.approx.f32" if asm else "tl.exp2", "exp_count": n * iters, "exp_ms": ms, "exp_per_s": n * iters / ms * 1e3}
            break
        except Exception:
            traceback.print_exc()
    return result


def main():
    global DEVICE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="cpu: the benchmark run's dry run (small sizes, no exponential ceiling)")
    args = ap.parse_args()
    DEVICE = args.device
    if DEVICE == "cuda":
        if not torch.cuda.is_available():
            sys.exit("roofline: no CUDA device")
        props = torch.cuda.get_device_properties(0)
        res = {
            "gpu": props.name,
            "sms": props.multi_processor_count,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "memory_bytes": props.total_memory,
        }
        copy_bytes, n = 2 << 30, 8192
    else:
        res = {"gpu": f"none (dry run on the CPU: {DEVICE})"}
        copy_bytes, n = 64 << 20, 512
    res.update(torch=torch.__version__, cuda=torch.version.cuda)
    steps = [
        ("copy", lambda: copy_bandwidth(copy_bytes)),
        ("mm_bf16", lambda: matmul_rate(n, torch.bfloat16, tf32=False)),
        ("mm_f32", lambda: matmul_rate(n, torch.float32, tf32=False)),
        ("mm_tf32", lambda: matmul_rate(n, torch.float32, tf32=True)),
        ("exp", exp_rate),
    ]
    for name, step in steps:
        try:
            out = step()
        except Exception:
            traceback.print_exc()
            out = {}
        if name == "copy" or name == "exp":
            res.update(out)
        else:
            res[f"{name}_tflops"] = out.get("tflops")
            res[f"{name}_detail"] = out
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    res.setdefault("copy_GBps", None)
    res.setdefault("exp_per_s", None)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("roofline: " + json.dumps({k: v for k, v in res.items() if not k.endswith("_detail")}), flush=True)


if __name__ == "__main__":
    main()
