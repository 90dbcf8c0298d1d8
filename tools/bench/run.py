#!/usr/bin/env python3
"""The benchmark run on a GPU machine, phase by phase in order of importance, within a time
budget, everything it writes under one output folder; or its dry run on the CPU.

    python3 run.py [--dry-run] [--plan] [--phases NAME,...] [--kernels all]

Packed by `scripts/gpu-pack` as bench/py/ of its payload (the bench executables in ../bin, the
Inf-CL wheel in ../wheels); bench/run.sh calls it, as the GPU run's phase `bench`. The phases
(PHASES below; `--plan` prints them with their budgets) put the headline first: our loss and
PyTorch eager at the paper's training step of the three-layer loss (then at its layers one by
one), then Inf-CL, then torch.compile and CUDA graphs at the paper's step and layers, then the
other dtypes and the rows suite, the ceilings, large and huge S, the remaining compilations, and
a limited set of kernel benches; the report last, always.

Budget (CCPL_BENCH_BUDGET_S, default 450 s, scaled over the phases): phase i must end by its
planned end, start + set-up + the budgets of phases 1..i; so a phase gets its own budget plus
whatever the phases before it left unused, and never the time planned for the phases after
it. A phase whose time has run out is not started (its jobs show as `budget`); one that
reaches its limit is sent SIGTERM (the baselines record the job in flight as `timeout`), then
killed 10 s later. Every phase's start and end is in the log.

Output (OUT, or ./bench-out): bench.log (everything, as printed), table.md, summary.md,
results.json, and work/ (criterion's results, the baselines' JSON lines, the ceilings, the run
and phase records: what the tables are made from, kept even when the report fails).

--dry-run: the same phases, order and budget on the CPU, on the tiny configurations of
configs-dry-run.txt: our side times the float64 CPU reference under the GPU benches' names,
PyTorch runs on CPU tensors, torch.compile traces without generating code (backend aot_eager),
the GPU-only parts (kernels, Inf-CL, CUDA graphs) say what they could not do. CI runs it; its
numbers say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

DEFAULT_BUDGET_S = 450
SETUP_S = 10  # header, Inf-CL install
REPORT_S = 10  # kept for the report, which runs whatever happened before
KILL_GRACE_S = 10  # after SIGTERM at a phase's limit
MIN_PHASE_S = 5  # a phase with less time left is not started

# The criterion groups of the headline phase (benches/loss/): `loss` (zero the gradients,
# forward, backward: CcpLoss for a training step, CcpLayer for one layer), a step's
# `loss_graph` (replayed from a CUDA graph) and `loss_layers` (one CcpLayer per layer), and
# `loss_user_step` (the loss read back; a layer's centres drawn and uploaded). A bench of
# another loss object at the paper's configuration joins the headline by timing under these
# names on `tag=paper` lines of a suite in HEADLINE_SUITES (or under a group added here, which
# the report then has to read).
HEADLINE_GROUPS = ("loss", "loss_graph", "loss_user_step", "loss_layers")
LOSS_GROUPS = tuple(dict.fromkeys(g for groups in common.LOSS_GROUPS.values() for g in groups))

Select = Callable[[common.Config, str], bool]


# The suites of the headline, in the order of configs.txt: the paper's training step of the
# three-layer loss first (its lines come first there), then its layers one by one.
HEADLINE_SUITES = ("step", "layer")


def paper_headline(cfg: common.Config, dtype: str) -> bool:
    """The paper's training step and its layers in the first dtype of their line (f32): the
    headline."""
    return cfg.tag == "paper" and cfg.suite in HEADLINE_SUITES and dtype == cfg.dtypes[0]


def paper_layers_first(cfg: common.Config, dtype: str) -> bool:
    """The paper's layers in f32: the kernel benches' first run (a step's kernels are its
    layers')."""
    return paper_headline(cfg, dtype) and cfg.suite == "layer"


def paper_rest(cfg: common.Config, dtype: str) -> bool:
    """The rest of the paper's sizes: the other dtypes, the rows suite."""
    return cfg.tag == "paper" and not paper_headline(cfg, dtype)


def tagged(*tags: str) -> Select:
    return lambda cfg, dtype: cfg.tag in tags


def everything(cfg: common.Config, dtype: str) -> bool:
    return True


@dataclass(frozen=True)
class Phase:
    name: str
    budget_s: float
    what: str
    kind: str  # "ours" (benches/loss/), "baselines", "roofline", "kernels" (benches/kernels.rs)
    select: Select | None = None
    groups: tuple = ()  # ours: criterion groups (CCPL_BENCH_GROUPS)
    impls: tuple = ()  # baselines: implementations (--impls)


PHASES = (
    Phase(
        "ours-paper", 30, "our loss at the paper's training step, then its layers, f32: the headline", "ours", paper_headline,
        groups=HEADLINE_GROUPS,
    ),
    Phase(
        "eager-paper", 30, "PyTorch eager at the paper's step and layers, f32; the original as its users run it", "baselines",
        paper_headline, impls=("eager", "original-identity", "original"),
    ),
    Phase("ours-infcl", 15, "our loss at Inf-CL's configurations", "ours", tagged("infcl"), groups=LOSS_GROUPS),
    Phase("infcl", 40, "Inf-CL", "baselines", tagged("infcl"), impls=("infcl",)),
    Phase(
        "compile-paper", 110, "torch.compile and compile with CUDA graphs at the paper's step and layers, f32", "baselines",
        paper_headline, impls=("compile", "compile-graphs"),
    ),
    Phase("ours-paper-rest", 30, "our loss: the paper's other dtypes and its rows suite", "ours", paper_rest, groups=LOSS_GROUPS),
    Phase(
        "eager-paper-rest", 25, "PyTorch eager: the paper's other dtypes and its rows suite", "baselines",
        paper_rest, impls=("eager", "original-identity"),
    ),
    Phase("roofline", 25, "the measured ceilings: copy, matrix products, exponentials", "roofline"),
    Phase("ours-large", 20, "our loss at large and huge S", "ours", tagged("large", "huge"), groups=LOSS_GROUPS),
    Phase(
        "baselines-large", 50, "PyTorch eager and torch.compile at large and huge S and at Inf-CL's configurations", "baselines",
        tagged("large", "huge", "infcl"), impls=("eager", "compile"),
    ),
    Phase(
        "compile-rest", 30, "torch.compile and CUDA graphs: the paper's other dtypes and its rows suite", "baselines",
        paper_rest, impls=("compile", "compile-graphs"),
    ),
    Phase("kernels", 25, "each kernel alone, the paper's layers in f32 only (--kernels all: everything)", "kernels", paper_layers_first),
)


def selection(configs, phase: Phase) -> list[str]:
    """The `config/dtype` pairs of a phase (CCPL_BENCH_ONLY); empty for one without configurations."""
    if phase.select is None:
        return []
    return [f"{c.name}/{d}" for c in configs for d in c.dtypes if phase.select(c, d)]


@dataclass
class Planned:
    phase: Phase
    budget_s: float
    end_s: float  # planned end, seconds from the start of the run
    only: list


def plan(phases, configs, total_s: float) -> list[Planned]:
    """Each phase's budget, scaled so that set-up, the phases and the report fill `total_s`,
    and its planned end; phases with configurations but none selected are left out."""
    kept = [p for p in phases if p.select is None or selection(configs, p)]
    planned_sum = sum(p.budget_s for p in kept)
    scale = max(0.0, total_s - SETUP_S - REPORT_S) / planned_sum if planned_sum else 0.0
    out, end = [], float(min(SETUP_S, total_s))
    for p in kept:
        budget = p.budget_s * scale
        end += budget
        out.append(Planned(p, budget, end, selection(configs, p)))
    return out


def print_plan(planned: list[Planned], total_s: float, log) -> None:
    log(f"=== plan: {len(planned)} phases in {total_s:.0f} s ({SETUP_S} s set-up first, {REPORT_S} s kept for the report)")
    for i, p in enumerate(planned, 1):
        what = f"{p.phase.what}"
        if p.only:
            what += f" [{len(p.only)} config/dtype: {', '.join(p.only[:4])}{', ...' if len(p.only) > 4 else ''}]"
        log(f"===   {i:2}. {p.phase.name:<18} {p.budget_s:5.0f} s, by +{p.end_s:4.0f} s: {what}")


class Log:
    """Prints and appends to bench.log, each line flushed (a killed run keeps what it said)."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            self.file.write(line + "\n")


def run_command(cmd: list, env: dict, limit_s: float, log: Log) -> tuple[int | None, bool]:
    """Runs `cmd` in its own process group, its output into the log, for at most `limit_s`:
    then SIGTERM to the group, SIGKILL KILL_GRACE_S later. (exit status, whether it was
    stopped at the limit)."""
    try:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True
        )
    except OSError as e:  # a missing executable fails its phase, not the run
        log(f"!!! cannot run {cmd[0]}: {e}")
        return None, False

    def pump():
        for line in proc.stdout:
            log(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    stopped = False
    try:
        proc.wait(timeout=max(limit_s, 0.1))
    except subprocess.TimeoutExpired:
        stopped = True
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=5)
    return proc.returncode, stopped


class Runner:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        self.work = os.path.join(self.out, "work")
        os.makedirs(self.work, exist_ok=True)
        self.log = Log(os.path.join(self.out, "bench.log"))
        self.pack = os.path.abspath(args.pack)
        self.bin = os.path.join(self.pack, "bin")
        self.python = sys.executable
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", CRITERION_HOME=os.path.join(self.work, "criterion"))
        if args.dry_run:
            self.env["CCPL_BENCH_DRY_RUN"] = "1"  # and CCPL_BENCH_CONFIGS, set by main
        else:
            self.env["CCPL_REQUIRE_GPU"] = "1"  # a bench that finds no GPU fails instead of skipping
        self.start = time.time()
        self.failures = 0

    def now(self) -> float:
        return time.time() - self.start

    def record(self, name: str, rec: dict) -> None:
        common.write_record(os.path.join(self.work, "phases.jsonl"), {"phase": name, **rec})

    # ---- set-up ----------------------------------------------------------------------------

    def header(self) -> None:
        log, info = self.log, {}
        info["dry_run"] = self.args.dry_run
        info["budget_s"] = self.args.budget
        commit_file = os.path.join(self.pack, "commit")
        commit = open(commit_file).read().split("\n") if os.path.exists(commit_file) else ["unknown"]
        info["commit"], info["commit_note"] = commit[0].strip(), " ".join(commit[1:]).strip()
        info["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start))
        info["kernel"] = platform.release()  # uname -r: launch overhead differs between driver stacks
        info["glibc"] = " ".join(platform.libc_ver())
        info["cpu"] = cpu_model()
        info["cpus"] = os.cpu_count()
        info["python"] = platform.python_version()
        log("ccpl GPU benchmarks" + (" -- DRY RUN on the CPU: no GPU number below" if self.args.dry_run else ""))
        for key in ("commit", "commit_note", "date", "kernel", "glibc", "cpu", "cpus", "python"):
            if info[key]:
                log(f"{key + ':':<8} {info[key]}")
        smi = shutil.which("nvidia-smi")
        if smi:
            query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw"
            res = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = res.stdout.strip() or res.stderr.strip()
            log(f"nvidia-smi ({query}): {info['nvidia_smi']}")
        elif not self.args.dry_run:
            log("!!! nvidia-smi not found")
        for exe in sorted(os.listdir(self.bin)) if os.path.isdir(self.bin) else []:
            res = subprocess.run(["ldd", os.path.join(self.bin, exe)], capture_output=True, text=True)
            missing = [line.strip() for line in res.stdout.splitlines() if "not found" in line]
            if missing:
                log(f"!!! {exe} cannot load: {'; '.join(missing)}")
        versions = subprocess.run(
            [self.python, "-c", "import torch; print(torch.__version__, torch.version.cuda)"], capture_output=True, text=True, timeout=120
        )
        info["torch"] = versions.stdout.strip() or f"not importable: {versions.stderr.strip()[-200:]}"
        log(f"torch:   {info['torch']}")
        with open(os.path.join(self.work, "run.json"), "w") as f:
            json.dump(info, f, indent=1)

        site = os.path.join(self.work, "site")
        wheels = sorted(os.path.join(self.pack, "wheels", w) for w in os.listdir(os.path.join(self.pack, "wheels"))) if os.path.isdir(os.path.join(self.pack, "wheels")) else []
        if wheels:
            res = subprocess.run(
                [self.python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade", "--target", site, *wheels],
                capture_output=True, text=True, timeout=120,
            )
            log(f"installed into work/site: {', '.join(os.path.basename(w) for w in wheels)}" if res.returncode == 0 else f"!!! pip install of {wheels}: {res.stderr.strip()[-300:]}")
            self.env["PYTHONPATH"] = site + (os.pathsep + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")
        else:
            log("no Inf-CL wheel in the pack: its jobs will say error")

    # ---- phases ----------------------------------------------------------------------------

    def command(self, p: Planned, deadline: float) -> list:
        phase, args = p.phase, self.args
        crit = ["--sample-size", "10", "--nresamples", "1000", "--noplot"]
        if phase.kind == "ours":
            return [os.path.join(self.bin, "loss"), "--bench", *crit, "--warm-up-time", "0.1", "--measurement-time", "0.3"]
        if phase.kind == "kernels":
            return [os.path.join(self.bin, "kernels"), "--bench", *crit, "--warm-up-time", "0.05", "--measurement-time", "0.2"]
        if phase.kind == "roofline":
            return [self.python, os.path.join(HERE, "roofline.py"), "--out", os.path.join(self.work, "roofline.json")] + (
                ["--device", "cpu"] if args.dry_run else []
            )
        cmd = [
            self.python, os.path.join(HERE, "baselines.py"), "--out", os.path.join(self.work, "baselines.jsonl"),
            "--impls", ",".join(phase.impls), "--deadline", f"{deadline:.0f}",
        ]
        if args.dry_run:  # the numbers mean nothing: as few repeats as exercise the code
            cmd += ["--device", "cpu", "--warmup-ms", "10", "--target-ms", "20", "--min-reps", "3", "--max-reps", "20",
                    "--compile-backend", "aot_eager"]
        return cmd

    def run_phase(self, i: int, p: Planned) -> None:
        log, name = self.log, p.phase.name
        deadline = self.start + p.end_s
        limit = deadline - time.time()
        rec = {"kind": p.phase.kind, "planned_s": round(p.budget_s, 1), "planned_end_s": round(p.end_s, 1), "selected": p.only}
        if limit < MIN_PHASE_S:
            log(f"=== phase {i} {name}: not run: its time is spent (+{self.now():.0f} s, planned end +{p.end_s:.0f} s)")
            self.record(name, {**rec, "status": "not run (budget)"})
            # The tables say `budget` for each of its jobs, not `-`.
            for cfg in common.load_configs():
                for dtype in cfg.dtypes:
                    if not p.phase.select or not p.phase.select(cfg, dtype):
                        continue
                    if p.phase.kind == "baselines":
                        for impl in (m for m in p.phase.impls if common.applies(cfg, dtype, m)):
                            job = {"suite": cfg.suite, "config": cfg.name, "dtype": dtype, "impl": impl, "status": "budget"}
                            common.write_record(os.path.join(self.work, "baselines.jsonl"), job)
                    if p.phase.kind == "ours":  # as the bench's own status lines say it
                        for group in (g for g in p.phase.groups if g in common.LOSS_GROUPS[cfg.suite]):
                            log(f'ccpl-bench {{"id": "{group}/{cfg.name}/{dtype}", "status": "budget"}}')
            return
        env = dict(self.env)
        if p.only:
            env["CCPL_BENCH_ONLY"] = ",".join(p.only)
        if p.phase.kind == "kernels" and self.args.kernels == "all":
            env.pop("CCPL_BENCH_ONLY", None)
        if p.phase.groups:
            env["CCPL_BENCH_GROUPS"] = ",".join(p.phase.groups)
        cmd = self.command(p, deadline)
        started = self.now()
        log(f"=== phase {i} {name}: start at +{started:.0f} s, at most {limit:.0f} s (planned {p.budget_s:.0f} s): {p.phase.what}")
        log(f"=== phase {i} {name}: {' '.join(os.path.basename(c) if c.startswith(self.pack) else c for c in cmd)}")
        code, stopped = run_command(cmd, env, limit, log)
        used = self.now() - started
        status = "stopped at its limit" if stopped else ("ok" if code == 0 else f"failed (exit {code})")
        if code != 0 and not stopped:
            self.failures += 1
        log(f"=== phase {i} {name}: end at +{self.now():.0f} s after {used:.0f} s: {status}")
        self.record(name, {**rec, "status": status, "exit": code, "limit_s": round(limit, 1), "start_s": round(started, 1), "used_s": round(used, 1)})

    def report(self) -> bool:
        self.log(f"=== report: start at +{self.now():.0f} s")
        cmd = [
            self.python, os.path.join(HERE, "report.py"), "--work", self.work, "--log", os.path.join(self.out, "bench.log"),
            "--table-out", os.path.join(self.out, "table.md"), "--summary-out", os.path.join(self.out, "summary.md"),
            "--json-out", os.path.join(self.out, "results.json"),
        ]
        code, _ = run_command(cmd, self.env, 120, self.log)
        self.log(f"=== report: end at +{self.now():.0f} s: {'ok' if code == 0 else f'FAILED (exit {code}); the data is in work/'}")
        return code == 0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.getcwd(), "bench-out"))
    ap.add_argument("--pack", default=os.path.dirname(HERE), help="the packed folder: bin/, wheels/, commit (default: the one above this script)")
    ap.add_argument(
        "--budget", type=float, default=float(os.environ.get("CCPL_BENCH_BUDGET_S", 0)) or None,
        help=f"seconds for the whole run (CCPL_BENCH_BUDGET_S; default {DEFAULT_BUDGET_S}, or with --phases their planned budgets)",
    )
    ap.add_argument("--phases", default="", help="run only these phases (comma-separated), for a rerun")
    ap.add_argument("--kernels", choices=("first", "all"), default="first", help="kernel benches: the paper's layers in f32 (first run), or all")
    ap.add_argument("--dry-run", action="store_true", help="the whole sequence on the CPU (CI)")
    ap.add_argument("--dry-run-configs", default=os.path.join(HERE, "configs-dry-run.txt"))
    ap.add_argument("--plan", action="store_true", help="print the plan and exit")
    args = ap.parse_args()
    if args.dry_run and not os.path.exists(args.dry_run_configs):  # in the repository, not a pack
        args.dry_run_configs = os.path.join(HERE, "..", "..", "benches", "configs-dry-run.txt")
    if args.dry_run:
        os.environ["CCPL_BENCH_CONFIGS"] = os.path.abspath(args.dry_run_configs)

    phases = PHASES
    if args.phases:
        names = [n for n in args.phases.split(",") if n]
        unknown = [n for n in names if n not in {p.name for p in PHASES}]
        if unknown:
            raise SystemExit(f"run.py: unknown phases {unknown}; known: {', '.join(p.name for p in PHASES)}")
        phases = tuple(p for p in PHASES if p.name in names)
    if args.budget is None:
        args.budget = sum(p.budget_s for p in phases) + SETUP_S + REPORT_S if args.phases else DEFAULT_BUDGET_S
    configs = common.load_configs()
    planned = plan(phases, configs, args.budget)
    if args.plan:
        print_plan(planned, args.budget, print)
        return 0

    runner = Runner(args)
    runner.header()
    print_plan(planned, args.budget, runner.log)
    runner.record("plan", {"budget_s": args.budget, "phases": [{"name": p.phase.name, "planned_s": round(p.budget_s, 1), "planned_end_s": round(p.end_s, 1)} for p in planned]})
    for i, p in enumerate(planned, 1):
        runner.run_phase(i, p)
    runner.log(f"=== phases done at +{runner.now():.0f} s of {args.budget:.0f} s")
    reported = runner.report()
    runner.log(f"=== total {runner.now():.0f} s")
    summary = os.path.join(runner.out, "summary.md")
    if reported and os.path.exists(summary):
        with open(summary) as f:
            print("\n" + f.read())
    return 0 if reported and runner.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
