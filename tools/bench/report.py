#!/usr/bin/env python3
"""The benchmark tables, in Markdown, from what one run left in its work folder (run.py):

- criterion/: the Rust benches' results (*/new/benchmark.json and estimates.json; the median
  per iteration);
- the status lines the Rust benches print (`ccpl-bench {json}`: skipped, does not fit, memory,
  the check against the CPU reference), read from the run's log;
- baselines.jsonl (the PyTorch baselines, the last record of each job), roofline.json (the
  measured ceilings), run.json (the machine) and phases.jsonl (each phase's budget and use).

Anything missing shows as such ('-', 'oom', 'budget', 'killed', ...), never as a number; a
CUDA-graph run with cudagraph skips is not shown as CUDA graphs. A dry run's tables say so at
the top and give no verdict.
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
# PyTorch implementations that compute the same function on the same inputs and centres as
# eager, so their first losses must agree (the original's draw their centres every step).
SAME_FUNCTION = ("compile", "compile-graphs", "infcl")


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


def load_baselines(path: str) -> dict:
    """(config, dtype, impl) -> the last record of that job (a rerun replaces a first run)."""
    return {(rec["config"], rec["dtype"], rec["impl"]): rec for rec in common.read_records(path)}


def load_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


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


STATUS_TEXT = {"running": "killed", "budget": "budget", "timeout": "timeout"}


def cell(rec: dict | None) -> tuple[str, float | None]:
    """A baseline's cell text and median (ms) from its record: a time only for a run that
    measured what its column says (a CUDA-graph run with skips is not one, nor one compiled by
    a backend other than inductor, which has no CUDA-graph mode)."""
    if rec is None:
        return "-", None
    if rec.get("status") != "ok":
        return STATUS_TEXT.get(rec.get("status"), rec.get("status", "?")), None
    if rec["impl"] == "compile-graphs":
        backend = rec.get("compile_backend", "inductor")
        if backend != "inductor":
            return f"not graphed (backend {backend}; {fmt_time_ms(rec['median_ms'])})", None
        if rec.get("cudagraph_skips"):
            return f"not graphed ({rec['cudagraph_skips']} cudagraph skips; {fmt_time_ms(rec['median_ms'])})", None
    return fmt_time_ms(rec["median_ms"]), rec["median_ms"]


def ours_cell(crit: dict, statuses: dict, bench_id: tuple, fallback: str | None = None) -> tuple[str, float | None]:
    """Our median, or why there is none, from the status of the bench or else of `fallback`
    (the kernel bench's setup of that configuration)."""
    status = statuses.get("/".join(bench_id)) or statuses.get(fallback) or {}
    res = crit.get(bench_id)
    if res is not None:
        failed = " (check FAILED)" if status.get("check_ok") is False else ""
        return fmt_time_ms(res["median_ms"]) + failed, res["median_ms"]
    if status.get("status") not in (None, "ok"):
        return status["status"], None
    return "-", None


def best_compile(cells: dict) -> tuple[str, float | None]:
    """The faster of torch.compile and compile with CUDA graphs (a run with skips excluded)."""
    timed = [(cells[impl][1], impl) for impl in ("compile", "compile-graphs") if cells[impl][1] is not None]
    if not timed:
        return "-", None
    ms, impl = min(timed)
    return impl, ms


DRY_RUN_TARGET = "dry run: unmeasured on a GPU, no verdict"
DRY_RUN_HEADLINE = (
    "**Unmeasured: a dry run on the CPU.** Ours is the float64 CPU reference and PyTorch ran on CPU tensors: these"
    " times and ratios say nothing about a GPU."
)


def target_text(cfg: common.Config, ours, eager, compiled, floor_ms, dry_run: bool) -> str:
    """The verdict on the targets that apply to a configuration: the speed-ups at the paper's
    training step (the whole loss), the floor at large S; none elsewhere."""
    speedup_target = cfg.tag == "paper" and cfg.suite == "step"
    if not (speedup_target or cfg.tag == "large"):
        return ""
    if dry_run:
        return DRY_RUN_TARGET
    if ours is None:
        return "not measured"
    parts = []
    if speedup_target:
        for name, base, goal in (("eager", eager, TARGET_EAGER), ("compile", compiled, TARGET_COMPILE)):
            if base is None:
                parts.append(f"vs {name}: no baseline")
                continue
            speedup = base / ours
            verdict = "met" if speedup >= goal else f"MISSED by {goal / speedup:.2g}x"
            parts.append(f"{name} {speedup:.3g}x (>= {goal:g}x: {verdict})")
    else:
        if floor_ms is None:
            parts.append("no floor")
        else:
            over = ours / floor_ms
            verdict = "met" if over <= TARGET_FLOOR else f"MISSED by {over / TARGET_FLOOR:.2g}x"
            parts.append(f"{over:.3g}x the floor (<= {TARGET_FLOOR:g}x: {verdict})")
    return "; ".join(parts)


IMPLS = ("eager", "original-identity", "original", "compile", "compile-graphs", "infcl")
STEP_TITLE = "The paper's training step, like with like: ours (zero the gradients, forward, backward) and PyTorch on the same function"
LAYER_TITLE = "Each layer and rows loss alone, like with like"
USERS_TITLE = "A training step as users pay it: the loss read back every step, centres drawn every step"
FLOOR_TITLE = "Floor model terms"
STEP_MEMORY_TITLE = "Memory of the paper's training step, besides its inputs"
MEMORY_TITLE = "Memory of a step of one layer or rows loss, besides its inputs"


def loss_tables(configs, crit, statuses, baselines, ceil: Ceilings, dry_run: bool) -> dict:
    """The loss tables by title, the headline first: the paper's training step (like with
    like), each layer alone, the step as users pay it, the floor model's terms, memory."""
    step = [
        "| step | dtype | S | ours | ours, CUDA graph | ours, a CcpLayer per layer | eager | compile | compile, CUDA graphs"
        " | eager / ours | best compile / ours | best compile / ours, CUDA graph | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    main = [
        "| config | dtype | S | ours | eager | compile | compile, CUDA graphs | Inf-CL | ours, materialised"
        " | eager / ours | best compile / ours | floor (limit) | % of floor | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    users = [
        "| config | dtype | ours, user step | original, identity head | original, its MLP heads"
        " | original identity / ours | original MLP / ours |",
        "|---|---|---|---|---|---|---|",
    ]
    roof = [
        "| config | dtype | bytes (min) | + logits | GFLOP | GFLOP, fused | Gexp | Gexp, fused | floor, minimal"
        " | floor, fused's work | floor, logits in memory | ours | ours, materialised |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    step_memory = [
        "| step | dtype | ours, measured | ours, workspace | ours CUDA graph, measured | a CcpLayer per layer, measured"
        " | a CcpLayer per layer, workspace | eager | original, identity | original, MLP | compile | compile, CUDA graphs"
        " | inputs (a PyTorch set) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    memory = [
        "| config | dtype | ours, measured | ours, workspace | ours materialised, measured | materialised, workspace"
        " | eager | original, identity | original, MLP | compile | compile, CUDA graphs | Inf-CL | inputs (a PyTorch set) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in configs:
        for dtype in cfg.dtypes:

            def ours(group):
                return ours_cell(crit, statuses, (group, cfg.name, dtype))

            def ours_bytes(group, key):
                return fmt_bytes(statuses.get(f"{group}/{cfg.name}/{dtype}", {}).get(key))

            def peak(impl):
                rec = recs[impl]
                if rec is None:
                    return "-"
                if rec.get("status") != "ok":
                    return STATUS_TEXT.get(rec.get("status"), rec.get("status", "?"))
                return fmt_bytes(rec.get("peak_step_bytes"))

            ours_txt, ours_ms = ours("loss")
            recs = {impl: baselines.get((cfg.name, dtype, impl)) for impl in IMPLS}
            cells = {impl: cell(rec) for impl, rec in recs.items()}
            best_impl, best_ms = best_compile(cells)
            best_txt = f"{ratio(best_ms, ours_ms)} ({best_impl})" if best_ms is not None else "-"
            cost = common.loss_cost(cfg, dtype)
            floor_ms, limit = ceil.floor(cost, dtype)
            fused_ms, _ = ceil.floor(common.fused_cost(cost), dtype)
            design_ms, _ = ceil.floor(cost, dtype, with_logits=True)
            target = target_text(cfg, ours_ms, cells["eager"][1], best_ms, floor_ms, dry_run)
            input_bytes = next((r["input_bytes"] / r["input_sets"] for r in recs.values() if r and r.get("input_bytes")), None)
            mat_txt = ours("loss_materialised")[0] if cfg.suite == "rows" else "-"
            if cfg.suite == "step":
                graph_txt, graph_ms = ours("loss_graph")
                best_graph = f"{ratio(best_ms, graph_ms)} ({best_impl})" if best_ms is not None else "-"
                step.append(
                    f"| {cfg.name} | {dtype} | {cfg.rows} | {ours_txt} | {graph_txt} | {ours('loss_layers')[0]} "
                    f"| {cells['eager'][0]} | {cells['compile'][0]} | {cells['compile-graphs'][0]} "
                    f"| {ratio(cells['eager'][1], ours_ms)} | {best_txt} | {best_graph} | {target} |"
                )
                step_memory.append(
                    f"| {cfg.name} | {dtype} | {ours_bytes('loss', 'device_bytes')} | {ours_bytes('loss', 'workspace_bytes')} "
                    f"| {ours_bytes('loss_graph', 'device_bytes')} | {ours_bytes('loss_layers', 'device_bytes')} "
                    f"| {ours_bytes('loss_layers', 'workspace_bytes')} | "
                    + " | ".join(peak(impl) for impl in IMPLS if impl != "infcl")
                    + f" | {fmt_bytes(input_bytes)} |"
                )
            else:
                pct = f"{100 * floor_ms / ours_ms:.3g}%" if floor_ms and ours_ms else "-"
                floor_txt = f"{fmt_time_ms(floor_ms)} ({limit})" if floor_ms else limit
                main.append(
                    f"| {cfg.name} | {dtype} | {cfg.rows} | {ours_txt} | {cells['eager'][0]} | {cells['compile'][0]} "
                    f"| {cells['compile-graphs'][0]} | {cells['infcl'][0]} | {mat_txt} | {ratio(cells['eager'][1], ours_ms)} "
                    f"| {best_txt} | {floor_txt} | {pct} | {target} |"
                )
                memory.append(
                    f"| {cfg.name} | {dtype} | {ours_bytes('loss', 'device_bytes')} | {ours_bytes('loss', 'workspace_bytes')} "
                    f"| {ours_bytes('loss_materialised', 'device_bytes') if cfg.suite == 'rows' else '-'} "
                    f"| {ours_bytes('loss_materialised', 'workspace_bytes') if cfg.suite == 'rows' else '-'} | "
                    + " | ".join(peak(impl) for impl in IMPLS)
                    + f" | {fmt_bytes(input_bytes)} |"
                )
            if cfg.suite in ("step", "layer"):
                user_txt, user = ours("loss_user_step")
                users.append(
                    f"| {cfg.name} | {dtype} | {user_txt} | {cells['original-identity'][0]} | {cells['original'][0]} "
                    f"| {ratio(cells['original-identity'][1], user)} | {ratio(cells['original'][1], user)} |"
                )
            roof.append(
                f"| {cfg.name} | {dtype} | {fmt_bytes(cost.bytes_min)} | {fmt_bytes(cost.bytes_logits)} "
                f"| {cost.flops / 1e9:.4g} | {cost.flops_fused / 1e9:.4g} | {cost.exps / 1e9:.4g} | {cost.exps_fused / 1e9:.4g} "
                f"| {fmt_time_ms(floor_ms)} | {fmt_time_ms(fused_ms)} | {fmt_time_ms(design_ms)} | {ours_txt} | {mat_txt} |"
            )
    return {
        STEP_TITLE: step,
        LAYER_TITLE: main,
        USERS_TITLE: users,
        FLOOR_TITLE: roof,
        STEP_MEMORY_TITLE: step_memory,
        MEMORY_TITLE: memory,
    }


NOTES = {
    STEP_TITLE: (
        "The headline. Ours: `loss/<step>` (CcpLoss on a stream: zero the gradients, forward with the centres drawn on"
        " the device, backward; three launches after the memsets at the paper's sizes), `loss_graph/<step>` (the same"
        " step captured once in a CUDA graph and replayed), `loss_layers/<step>` (one CcpLayer per layer, the fused"
        " path, for comparison). PyTorch: the sum of the three layers' losses, one function, identity head, centres"
        " drawn once; `best compile` is the faster of torch.compile and compile with CUDA graphs. The target verdict"
        " compares `ours` (no graph) with eager and with the best compile: at least 20x eager and 5x torch.compile."
    ),
    LAYER_TITLE: (
        "Ours: `loss/...` (CcpLayer, identity head; CcpRows for rows). PyTorch: the same loss with the centres"
        " drawn once; `best compile` is the faster of torch.compile and compile with CUDA graphs. The speed-up"
        " targets are the training step's (above); large S has the floor's."
    ),
    USERS_TITLE: (
        "Ours: `loss_user_step/...`: for a step, CcpLoss's step with the loss read back (its centres are drawn on the"
        " device: nothing to upload); for a layer, CcpLayer with the centres drawn on the host and uploaded, the loss"
        " read back. The original: its per-step index building (device randperm, host-built offsets, eye and"
        " targets copied every call, on every layer) and `loss.item()`; with the identity head (the same function as"
        " ours) and with its MLP heads, whose work ours does not do: the last ratio is what replacing the"
        " original's whole loss would gain if the heads cost nothing."
    ),
    STEP_MEMORY_TITLE: (
        "Ours, measured: the drop of free device memory over creating the loss object(s), the gradient buffers and"
        " one step, read after a synchronisation of the context (the memory pool maps whole chunks); the CUDA-graph"
        " variant's includes the graph. Workspace: counted from the objects' buffers (`CcpLoss::workspace_bytes`,"
        " the sum of `CcpLayer::workspace_bytes`). PyTorch: the caching allocator's peak during one step above what"
        " was held before it (inputs, parameters; no earlier gradient)."
    ),
    MEMORY_TITLE: (
        "Ours, measured: the drop of free device memory over creating the loss object, its gradient"
        " buffers and one step, read after a synchronisation (the memory pool maps whole chunks);"
        " workspace: counted from the object's buffers (`CcpLayer::workspace_bytes`, `CcpRows::workspace_bytes`:"
        " up to S = 512 its small-S path's; `RowsLoss::workspace_bytes` for the materialised variant). PyTorch: the"
        " caching allocator's peak during one step above what was held before it (inputs, parameters; no earlier"
        " gradient)."
    ),
}


def kernel_table(configs, crit, statuses, ceil: Ceilings) -> list[str]:
    lines = [
        "| kernel | config | dtype | time | GB/s | TFLOP/s | Gexp/s | floor (limit) | % of floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in configs:
        for dtype in cfg.dtypes:
            for kernel in common.kernels_of(cfg):
                if (kernel, cfg.name, dtype) not in crit and f"kernels/{cfg.name}/{dtype}" not in statuses:
                    continue  # not in this run's selection
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
    if len(lines) == 2:
        lines.append("| (no kernel bench ran) | | | | | | | | |")
    return lines


def phase_table(phases: list[dict]) -> list[str]:
    """Each phase's planned budget, the limit it was given (its own budget plus what earlier
    phases left), the time it used, and how it ended."""
    last = {}
    for rec in phases:
        if rec.get("phase") != "plan":
            last[rec["phase"]] = rec
    lines = ["| phase | planned | limit | used | ended |", "|---|---|---|---|---|"]
    for name, rec in last.items():
        def secs(key):
            return f"{rec[key]:.0f} s" if rec.get(key) is not None else "-"

        lines.append(f"| {name} | {secs('planned_s')} | {secs('limit_s')} | {secs('used_s')} | {rec.get('status', '?')} |")
    return lines


def checks(statuses: dict, baselines: dict) -> list[str]:
    lines = []
    for (config, dtype, impl), rec in sorted(baselines.items()):
        eager = baselines.get((config, dtype, "eager"), {})
        if impl in SAME_FUNCTION and "loss" in rec and "loss" in eager:
            diff = abs(rec["loss"] - eager["loss"]) / max(abs(eager["loss"]), 1e-30)
            lines.append(f"- {impl} {config} {dtype}: loss {rec['loss']:.6g}, eager {eager['loss']:.6g} (relative difference {diff:.1e})")
        if rec.get("cudagraph_skips"):
            lines.append(f"- {impl} {config} {dtype}: {rec['cudagraph_skips']} cudagraph skips: not a CUDA-graph run (the log says why)")
        if rec.get("cudagraph_copied_inputs"):
            lines.append(
                f"- {impl} {config} {dtype}: {rec['cudagraph_copied_inputs']} non-static inputs over its recorded graphs"
                " (each copied on every replay; the input sets are marked static)"
            )
        if rec.get("status") in ("error", "oom"):
            lines.append(f"- {impl} {config} {dtype}: {rec['status']}: {rec.get('error', '')}")
        if rec.get("status") in ("running", "timeout"):
            lines.append(f"- {impl} {config} {dtype}: stopped at its phase's time limit")
    for bench_id, rec in sorted(statuses.items()):
        if "check" in rec:
            lines.append(f"- {bench_id}: {rec['check']}")
        if rec.get("status") not in (None, "ok"):
            lines.append(f"- {bench_id}: {rec['status']}: {rec.get('reason', '')}")
    return lines


def header(roof: dict, run: dict, args) -> list[str]:
    def num(key, fmt, unit):
        v = roof.get(key)
        return f"{fmt.format(v)} {unit}" if v else "not measured"

    exp = roof.get("exp_per_s")
    lines = ["# CCPL benchmarks", ""]
    if run.get("dry_run"):
        lines += [
            "**DRY RUN on the CPU: no number below is a GPU number or says anything about speed.** Ours is the"
            " float64 CPU reference timed under the GPU benches' names, PyTorch runs on CPU tensors, the sizes"
            " are the tiny stand-ins of benches/configs-dry-run.txt. It checks the run's order, budget and report.",
            "",
        ]
    lines += [
        f"- GPU: {roof.get('gpu', 'unknown')} ({roof.get('sms', '?')} SMs, L2 {fmt_bytes(roof.get('l2_bytes'))},"
        f" {fmt_bytes(roof.get('memory_bytes'))}); nvidia-smi: {run.get('nvidia_smi', '-')}",
        f"- kernel (uname -r): {run.get('kernel', '?')}; {run.get('glibc', '')}; CPU: {run.get('cpu', '?')} ({run.get('cpus', '?')} threads);"
        f" python {run.get('python', '?')}, torch {roof.get('torch') or run.get('torch', '?')}, CUDA {roof.get('cuda', '?')}",
        f"- date: {run.get('date', 'unknown')}; commit: {run.get('commit', 'unknown')} {run.get('commit_note', '')};"
        f" budget {run.get('budget_s', '?')} s",
        f"- ceilings measured in this run: copy {num('copy_GBps', '{:.0f}', 'GB/s')} (read + write);"
        f" matrix bf16 {num('mm_bf16_tflops', '{:.0f}', 'TFLOP/s')}, f32 {num('mm_f32_tflops', '{:.1f}', 'TFLOP/s')},"
        f" tf32 {num('mm_tf32_tflops', '{:.0f}', 'TFLOP/s')}; exponentials"
        f" {f'{exp / 1e12:.3g} T/s' if exp else 'not measured'} ({roof.get('exp_kernel', '-')})",
        f"- f32 floors use the {args.f32_rate} matrix rate; bf16 floors the bf16 rate",
        "- times: medians per step (ours: criterion, CUDA events around back-to-back steps; PyTorch: CUDA"
        " events per step); floor: max(bytes / copy bandwidth, FLOPs / matrix rate, exponentials / exp rate),"
        " BENCHMARKS.md explains the model and the variants",
        "",
    ]
    return lines


def section(title: str, level: str, body: list[str]) -> list[str]:
    note = NOTES.get(title)
    return [f"{level} {title}", "", *([note, ""] if note else []), *body, ""]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="the run's work folder (run.py)")
    ap.add_argument("--log", help="the run's log (for the Rust benches' status lines)")
    ap.add_argument("--configs", default=None)
    ap.add_argument("--f32-rate", choices=("fp32", "tf32"), default="fp32")
    ap.add_argument("--table-out", required=True, help="all the tables")
    ap.add_argument("--summary-out", help="the header, the run's phases and the headline table alone")
    ap.add_argument("--json-out", help="every number the tables came from")
    args = ap.parse_args()

    # All configurations, whatever this run selected: a missing one shows as missing.
    configs = common.load_configs(args.configs, selected=False)
    roof = load_json(os.path.join(args.work, "roofline.json"))
    run = load_json(os.path.join(args.work, "run.json"))
    if "gpu" not in roof and args.log and os.path.exists(args.log):
        # Without the ceilings, the GPU's name still comes from what the Rust benches printed.
        with open(args.log, errors="replace") as f:
            for line in f:
                if ": benchmarking on " in line:
                    roof["gpu"] = line.split(": benchmarking on ", 1)[1].strip()
                    break
    ceil = Ceilings(roof, args.f32_rate)
    crit = load_criterion(os.path.join(args.work, "criterion"))
    statuses = load_statuses(args.log)
    baselines = load_baselines(os.path.join(args.work, "baselines.jsonl"))
    phases = common.read_records(os.path.join(args.work, "phases.jsonl"))

    head = header(roof, run, args) + section("The run", "##", phase_table(phases))
    tables = loss_tables(configs, crit, statuses, baselines, ceil, bool(run.get("dry_run")))
    dry_run_note = [DRY_RUN_HEADLINE, ""] if run.get("dry_run") else []
    headline = section(STEP_TITLE, "##", dry_run_note + tables[STEP_TITLE])
    loss = headline + section(LAYER_TITLE, "##", tables[LAYER_TITLE]) + section(USERS_TITLE, "##", tables[USERS_TITLE])
    detail = [line for title in (FLOOR_TITLE, STEP_MEMORY_TITLE, MEMORY_TITLE) for line in section(title, "###", tables[title])]
    rest = section("Kernels", "##", kernel_table(configs, crit, statuses, ceil))
    found = checks(statuses, baselines)
    if found:
        rest += section("Checks, skips and errors", "##", found)
    if args.summary_out:
        with open(args.summary_out, "w") as f:
            f.write("\n".join(head + headline) + "\n")
    with open(args.table_out, "w") as f:
        f.write("\n".join(head + loss + detail + rest) + "\n")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {
                    "run": run,
                    "roofline": roof,
                    "phases": phases,
                    "ours": {"/".join(k): v for k, v in sorted(crit.items())},
                    "statuses": statuses,
                    "baselines": sorted(baselines.values(), key=lambda r: (r["config"], r["dtype"], r["impl"])),
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
