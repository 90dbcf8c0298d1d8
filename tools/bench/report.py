#!/usr/bin/env python3
"""The benchmark tables, in Markdown, from what one GPU run left behind:

- the criterion results of the Rust benches (CRITERION_HOME: */new/benchmark.json and
  estimates.json; the median per iteration);
- the status lines the Rust benches print (`ccpl-bench {json}`: skipped, out of memory, device
  memory, the check against the CPU reference), read from the run's log;
- the PyTorch baselines (baselines.py's JSON lines) and the measured ceilings (roofline.py).

Anything missing shows as such ('-', 'oom', 'budget', ...), never as a number.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import fmt_bytes, fmt_time_ms  # noqa: E402

STATUS_PREFIX = "ccpl-bench "
TARGET_EAGER = 20.0  # paper configuration: at least 20x faster than eager PyTorch
TARGET_COMPILE = 5.0  # ... and 5x faster than torch.compile
TARGET_FLOOR = 2.0  # large S: within 2x of the roofline floor


def load_criterion(root: str) -> dict:
    """(group, function, value) -> median and its 95% interval, in ms per iteration."""
    out = {}
    for bench_json in glob.glob(os.path.join(root, "**", "new", "benchmark.json"), recursive=True):
        with open(bench_json) as f:
            bench = json.load(f)
        est_path = os.path.join(os.path.dirname(bench_json), "estimates.json")
        if not os.path.exists(est_path):
            continue
        with open(est_path) as f:
            median = json.load(f)["median"]
        key = (bench["group_id"], bench.get("function_id"), bench.get("value_str"))
        ci = median["confidence_interval"]
        out[key] = {
            "median_ms": median["point_estimate"] / 1e6,
            "lo_ms": ci["lower_bound"] / 1e6,
            "hi_ms": ci["upper_bound"] / 1e6,
        }
    return out


def load_statuses(log: str | None) -> dict:
    """Bench id -> the last status record the Rust benches printed for it."""
    out = {}
    if not log or not os.path.exists(log):
        return out
    with open(log, errors="replace") as f:
        for line in f:
            i = line.find(STATUS_PREFIX)
            if i < 0:
                continue
            try:
                rec = json.loads(line[i + len(STATUS_PREFIX) :])
            except json.JSONDecodeError:
                continue
            if "id" in rec:
                out.setdefault(rec["id"], {}).update(rec)
    return out


def load_baselines(path: str | None) -> dict:
    out = {}
    for rec in common.read_records(path) if path else []:
        out[(rec["config"], rec["dtype"], rec["impl"])] = rec
    return out


class Ceilings:
    def __init__(self, roof: dict, f32_rate: str):
        self.roof = roof
        self.f32_key = {"fp32": "mm_f32_tflops", "tf32": "mm_tf32_tflops"}[f32_rate]

    def matrix_tflops(self, dtype: str):
        return self.roof.get("mm_bf16_tflops" if dtype in ("bf16", "f16") else self.f32_key)

    def floor(self, cost: common.Cost, dtype: str, with_logits: bool = False):
        """(time in ms, the limiting term) of max(bytes/bandwidth, FLOPs/rate, exps/rate); None
        when a ceiling needed for a nonzero term was not measured."""
        terms = {}
        nbytes = cost.bytes_min + (cost.bytes_logits if with_logits else 0.0)
        for name, amount, rate in (
            ("bytes", nbytes, self.roof.get("copy_GBps") and self.roof["copy_GBps"] * 1e9),
            ("FLOPs", cost.flops, self.matrix_tflops(dtype) and self.matrix_tflops(dtype) * 1e12),
            ("exp", cost.exps, self.roof.get("exp_per_s")),
        ):
            if amount == 0:
                continue
            if not rate:
                return None, f"no {name} ceiling"
            terms[name] = amount / rate * 1e3
        if not terms:
            return None, "no work"
        limit = max(terms, key=terms.get)
        return terms[limit], limit


def ratio(num, den) -> str:
    if num is None or den is None or den <= 0:
        return "-"
    return f"{num / den:.3g}x"


def cell(rec: dict | None) -> tuple[str, float | None]:
    """A baseline's cell text and median (ms) from its record."""
    if rec is None:
        return "-", None
    if rec.get("status") == "ok":
        return fmt_time_ms(rec["median_ms"]), rec["median_ms"]
    return rec.get("status", "?"), None


def ours_cell(crit: dict, statuses: dict, bench_id: tuple, setup_id: str | None = None) -> tuple[str, float | None]:
    """Our median, or why there is none (from the status of the bench or of its setup)."""
    status = statuses.get("/".join(bench_id)) or statuses.get(setup_id) or {}
    res = crit.get(bench_id)
    if res is not None:
        failed = " (check FAILED)" if status.get("check_ok") is False else ""
        return fmt_time_ms(res["median_ms"]) + failed, res["median_ms"]
    if status.get("status") not in (None, "ok"):
        return status["status"], None
    return "-", None


def target_text(cfg: common.Config, ours, eager, compiled, floor_ms) -> str:
    if ours is None:
        return "not measured"
    parts = []
    if cfg.tag == "paper":
        for name, base, goal in (("eager", eager, TARGET_EAGER), ("compile", compiled, TARGET_COMPILE)):
            if base is None:
                parts.append(f"vs {name}: no baseline")
                continue
            speedup = base / ours
            verdict = "met" if speedup >= goal else f"MISSED by {goal / speedup:.2g}x"
            parts.append(f"{name} {speedup:.3g}x (>= {goal:g}x: {verdict})")
    elif cfg.tag == "large":
        if floor_ms is None:
            parts.append("no floor")
        else:
            over = ours / floor_ms
            verdict = "met" if over <= TARGET_FLOOR else f"MISSED by {over / TARGET_FLOOR:.2g}x"
            parts.append(f"{over:.3g}x the floor (<= {TARGET_FLOOR:g}x: {verdict})")
    return "; ".join(parts)


def loss_tables(configs, crit, statuses, baselines, ceil: Ceilings) -> list[str]:
    """Ours is the crate's fused path (CcpLayer, CcpRows: `loss/...`); for rows configurations
    the materialised composition of the standalone kernels (`loss_materialised/...`) stands
    beside it. Speed-ups, the floor and the targets are the fused path's."""
    main = [
        "| config | dtype | S | ours (fused) | ours, materialised | eager | compile | compile, CUDA graphs | Inf-CL"
        " | eager / ours | compile / ours | floor (limit) | % of floor | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    roof = [
        "| config | dtype | bytes (min) | + logits | GFLOP | GFLOP, fused | Gexp | Gexp, fused | floor, minimal"
        " | floor, fused's work | floor, logits in memory | ours (fused) | ours, materialised |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    memory = [
        "| config | dtype | ours (fused), device memory | ours, materialised, device memory"
        " | eager, peak of a step | compile, peak of a step | Inf-CL, peak of a step |",
        "|---|---|---|---|---|---|---|",
    ]
    for cfg in configs:
        for dtype in cfg.dtypes:
            ours_txt, ours = ours_cell(crit, statuses, ("loss", cfg.name, dtype))
            mat_txt = "-"
            if cfg.suite == "rows":
                mat_txt, _ = ours_cell(crit, statuses, ("loss_materialised", cfg.name, dtype))
            recs = {impl: baselines.get((cfg.name, dtype, impl)) for impl in ("eager", "compile", "compile-graphs", "infcl")}
            cells = {impl: cell(rec) for impl, rec in recs.items()}
            cost = common.loss_cost(cfg, dtype)
            floor_ms, limit = ceil.floor(cost, dtype)
            fused_ms, _ = ceil.floor(common.fused_cost(cost), dtype)
            design_ms, _ = ceil.floor(cost, dtype, with_logits=True)
            pct = f"{100 * floor_ms / ours:.3g}%" if floor_ms and ours else "-"
            floor_txt = f"{fmt_time_ms(floor_ms)} ({limit})" if floor_ms else limit
            main.append(
                f"| {cfg.name} | {dtype} | {cfg.rows} | {ours_txt} | {mat_txt} | {cells['eager'][0]} | {cells['compile'][0]} "
                f"| {cells['compile-graphs'][0]} | {cells['infcl'][0]} | {ratio(cells['eager'][1], ours)} "
                f"| {ratio(cells['compile'][1], ours)} | {floor_txt} | {pct} "
                f"| {target_text(cfg, ours, cells['eager'][1], cells['compile'][1], floor_ms)} |"
            )
            roof.append(
                f"| {cfg.name} | {dtype} | {fmt_bytes(cost.bytes_min)} | {fmt_bytes(cost.bytes_logits)} "
                f"| {cost.flops / 1e9:.4g} | {cost.flops_fused / 1e9:.4g} | {cost.exps / 1e9:.4g} | {cost.exps_fused / 1e9:.4g} "
                f"| {fmt_time_ms(floor_ms)} | {fmt_time_ms(fused_ms)} | {fmt_time_ms(design_ms)} | {ours_txt} | {mat_txt} |"
            )

            def device_bytes(group):
                return fmt_bytes(statuses.get(f"{group}/{cfg.name}/{dtype}", {}).get("device_bytes"))

            def peak(impl):
                rec = recs[impl]
                if rec is None:
                    return "-"
                return fmt_bytes(rec.get("peak_step_bytes")) if rec.get("status") == "ok" else rec.get("status", "?")

            mat_mem = device_bytes("loss_materialised") if cfg.suite == "rows" else "-"
            memory.append(
                f"| {cfg.name} | {dtype} | {device_bytes('loss')} | {mat_mem} | {peak('eager')} | {peak('compile')} | {peak('infcl')} |"
            )
    return ["## The loss, forward plus backward", "", *main, "", "### Floor model terms", "", *roof, "", "### Memory", "", *memory, ""]


def kernel_table(configs, crit, statuses, ceil: Ceilings) -> list[str]:
    lines = [
        "## Kernels",
        "",
        "| kernel | config | dtype | time | GB/s | TFLOP/s | Gexp/s | floor (limit) | % of floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in configs:
        for dtype in cfg.dtypes:
            for kernel in common.kernels_of(cfg):
                txt, ms = ours_cell(crit, statuses, (kernel, cfg.name, dtype), f"kernels/{cfg.name}/{dtype}")
                cost = common.kernel_cost(kernel, cfg, dtype)
                floor_ms, limit = ceil.floor(cost, dtype)

                def rate(amount, scale):
                    return f"{amount / (ms * 1e-3) / scale:.3g}" if ms and amount else "-"

                pct = f"{100 * floor_ms / ms:.3g}%" if floor_ms and ms else "-"
                floor_txt = f"{fmt_time_ms(floor_ms)} ({limit})" if floor_ms else limit
                lines.append(
                    f"| {kernel} | {cfg.name} | {dtype} | {txt} | {rate(cost.bytes_min, 1e9)} | {rate(cost.flops, 1e12)} "
                    f"| {rate(cost.exps, 1e9)} | {floor_txt} | {pct} |"
                )
    return [*lines, ""]


def checks(statuses: dict, baselines: dict) -> list[str]:
    lines = []
    # The PyTorch implementations ran on the same inputs (same seed): their losses must agree.
    for (config, dtype, impl), rec in sorted(baselines.items()):
        eager = baselines.get((config, dtype, "eager"), {})
        if impl != "eager" and "loss" in rec and "loss" in eager:
            diff = abs(rec["loss"] - eager["loss"]) / max(abs(eager["loss"]), 1e-30)
            lines.append(f"- {impl} {config} {dtype}: loss {rec['loss']:.6g}, eager {eager['loss']:.6g} (relative difference {diff:.1e})")
        if rec.get("status") == "error":
            lines.append(f"- {impl} {config} {dtype}: error: {rec.get('error', '')}")
    for bench_id, rec in sorted(statuses.items()):
        if "check" in rec:
            lines.append(f"- {bench_id}: {rec['check']}")
        if rec.get("status") not in (None, "ok"):
            lines.append(f"- {bench_id}: {rec['status']}: {rec.get('reason', '')}")
    if not lines:
        return []
    return ["## Checks, skips and errors", "", *lines, ""]


def header(roof: dict, args) -> list[str]:
    def num(key, fmt, unit):
        v = roof.get(key)
        return f"{fmt.format(v)} {unit}" if v else "not measured"

    exp = roof.get("exp_per_s")
    return [
        "# CCPL benchmarks",
        "",
        f"- GPU: {roof.get('gpu', 'unknown')} ({roof.get('sms', '?')} SMs, L2 {fmt_bytes(roof.get('l2_bytes'))},"
        f" {fmt_bytes(roof.get('memory_bytes'))}); torch {roof.get('torch', '?')}, CUDA {roof.get('cuda', '?')}",
        f"- date: {args.date or 'unknown'}; commit: {args.commit or 'unknown'}",
        f"- ceilings measured in this run: copy {num('copy_GBps', '{:.0f}', 'GB/s')} (read + write);"
        f" matrix bf16 {num('mm_bf16_tflops', '{:.0f}', 'TFLOP/s')}, f32 {num('mm_f32_tflops', '{:.1f}', 'TFLOP/s')},"
        f" tf32 {num('mm_tf32_tflops', '{:.0f}', 'TFLOP/s')}; exponentials"
        f" {f'{exp / 1e12:.3g} T/s' if exp else 'not measured'} ({roof.get('exp_kernel', '-')})",
        f"- f32 floors use the {args.f32_rate} matrix rate; bf16 floors the bf16 rate",
        "- times: medians per forward plus backward (ours: criterion, CUDA events around back-to-back"
        " iterations; PyTorch: CUDA events per step); floor: max(bytes / copy bandwidth, FLOPs / matrix"
        " rate, exponentials / exp rate), BENCHMARKS.md explains the model; ours (fused): the crate's"
        " CcpLayer / CcpRows (logits recomputed, never stored); ours, materialised: the standalone kernels"
        " with the (B, S, S) logits in memory",
        "",
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--criterion", required=True, help="CRITERION_HOME of the run")
    ap.add_argument("--baselines", help="baselines.py's JSON lines")
    ap.add_argument("--roofline", help="roofline.py's JSON")
    ap.add_argument("--log", help="the run's log (for the Rust benches' status lines)")
    ap.add_argument("--configs", default=None)
    ap.add_argument("--commit", default="")
    ap.add_argument("--date", default="")
    ap.add_argument("--f32-rate", choices=("fp32", "tf32"), default="fp32")
    ap.add_argument("--json-out", help="also write every number the tables came from here")
    ap.add_argument("--summary-out", help="also write the header and the loss table alone here")
    args = ap.parse_args()

    configs = common.load_configs(args.configs)
    roof = {}
    if args.roofline and os.path.exists(args.roofline):
        with open(args.roofline) as f:
            roof = json.load(f)
    if "gpu" not in roof and args.log and os.path.exists(args.log):
        # Without the ceilings, the GPU's name still comes from what the Rust benches printed.
        with open(args.log, errors="replace") as f:
            for line in f:
                if ": benchmarking on " in line:
                    roof["gpu"] = line.split(": benchmarking on ", 1)[1].strip()
                    break
    ceil = Ceilings(roof, args.f32_rate)
    crit = load_criterion(args.criterion)
    statuses = load_statuses(args.log)
    baselines = load_baselines(args.baselines)
    out = header(roof, args)
    loss = loss_tables(configs, crit, statuses, baselines, ceil)
    if args.summary_out:
        with open(args.summary_out, "w") as f:
            f.write("\n".join(out + loss[: loss.index("### Floor model terms")]) + "\n")
    out += loss
    out += kernel_table(configs, crit, statuses, ceil)
    out += checks(statuses, baselines)
    print("\n".join(out))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {
                    "commit": args.commit,
                    "date": args.date,
                    "roofline": roof,
                    "ours": {"/".join(k): v for k, v in sorted(crit.items())},
                    "statuses": statuses,
                    "baselines": sorted(baselines.values(), key=lambda r: (r["config"], r["dtype"], r["impl"])),
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
