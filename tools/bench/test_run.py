"""Tests of the benchmark runner (run.py), its report and its baselines' time limits, without a
GPU: `pytest tools/bench` (scripts/bench-dry-run runs them in CI after the dry run).

The last tests read what a dry run wrote (CCPL_BENCH_DRY_RUN_OUT: its output folder): its
plan, every phase's start and end, that each phase ran only its own selection, the report.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402

REPO_CONFIGS = os.path.join(HERE, "..", "..", "benches", "configs.txt")
DRY_CONFIGS = os.path.join(HERE, "..", "..", "benches", "configs-dry-run.txt")
BASELINE_IMPLS = ("eager", "original-identity", "original", "compile", "compile-graphs", "infcl")


@pytest.fixture(autouse=True)
def no_selection(monkeypatch):
    for var in ("CCPL_BENCH_TAGS", "CCPL_BENCH_ONLY", "CCPL_BENCH_CONFIGS"):
        monkeypatch.delenv(var, raising=False)


def configs(path=REPO_CONFIGS):
    return common.load_configs(path)


# ---- The plan ------------------------------------------------------------------------------


def test_plan_fills_the_budget_in_order():
    planned = run.plan(run.PHASES, configs(), 450)
    assert [p.phase.name for p in planned] == [p.name for p in run.PHASES]
    ends = [p.end_s for p in planned]
    assert ends == sorted(ends)
    assert ends[-1] + run.REPORT_S == pytest.approx(450)
    assert sum(p.budget_s for p in planned) + run.SETUP_S + run.REPORT_S == pytest.approx(450)


def test_plan_scales_with_the_budget():
    full = run.plan(run.PHASES, configs(), 450)
    half = run.plan(run.PHASES, configs(), 225)
    for a, b in zip(full, half):
        assert b.budget_s == pytest.approx(a.budget_s * (225 - 20) / (450 - 20))


def test_headline_first_kernels_last():
    names = [p.name for p in run.PHASES]
    order = ["ours-paper", "eager-paper", "infcl", "compile-paper", "ours-paper-rest", "ours-large", "kernels"]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)
    first = run.PHASES[0]
    assert first.kind == "ours" and set(run.HEADLINE_GROUPS) <= set(first.groups)
    assert set(common.LOSS_GROUPS["step"]) <= set(run.HEADLINE_GROUPS)


@pytest.mark.parametrize("path", [REPO_CONFIGS, DRY_CONFIGS])
def test_the_paper_step_is_timed_first(path):
    """Our side, eager and the compilations each start with the paper's training step in f32
    (configs.txt's order is the order each phase runs its selection in)."""
    cfgs = configs(path)
    steps = [f"{c.name}/{c.dtypes[0]}" for c in cfgs if c.suite == "step" and c.tag == "paper"]
    assert steps and all(pair.endswith("/f32") for pair in steps)
    for name in ("ours-paper", "eager-paper", "compile-paper"):
        phase = next(p for p in run.PHASES if p.name == name)
        assert run.selection(cfgs, phase)[: len(steps)] == steps, name
    assert run.PHASES[0].name == "ours-paper" and run.PHASES[1].name == "eager-paper"
    # The kernel benches time a step's kernels through its layers' lines.
    kernels = next(p for p in run.PHASES if p.kind == "kernels")
    assert not [pair for pair in run.selection(cfgs, kernels) if pair in steps]


def test_the_paper_step_is_its_layers():
    """Each paper step of configs.txt is the three paper layers of its num_s, as those layers'
    own lines give them."""
    cfgs = configs()
    layers = {(c.channels, c.height, c.width_map, c.batch, c.centers): c for c in cfgs if c.suite == "layer" and c.tag == "paper"}
    steps = [c for c in cfgs if c.suite == "step" and c.tag == "paper"]
    assert {s.name for s in steps} == {"paper-step-n8", "paper-step-n64"}
    for step in steps:
        assert len(step.layers) == 3
        found = [layers.get((l.channels, l.height, l.width_map, l.batch, l.centers)) for l in step.layers]
        assert all(found), step.name
        assert [f.name for f in found] == [f"paper-relu{r}_1-n{step.fields['num_s']}" for r in (2, 3, 4)]
        assert step.rows == step.layers[0].rows
        # Its cost is its layers'.
        assert common.loss_cost(step, "f32").flops == sum(common.loss_cost(f, "f32").flops for f in found)


def test_every_configuration_is_timed_once_on_our_side():
    for cfgs in (configs(), configs(DRY_CONFIGS)):
        timed = [pair for p in run.PHASES if p.kind == "ours" for pair in run.selection(cfgs, p)]
        every = [f"{c.name}/{d}" for c in cfgs for d in c.dtypes]
        assert sorted(timed) == sorted(every)


def test_every_eager_job_once_and_no_baseline_job_twice():
    cfgs = configs()
    jobs = [
        (pair, impl)
        for p in run.PHASES
        if p.kind == "baselines"
        for pair in run.selection(cfgs, p)
        for impl in p.impls
    ]
    applicable = [
        (pair, impl)
        for pair, impl in jobs
        if common.applies(next(c for c in cfgs if c.name == pair.split("/")[0]), pair.split("/")[1], impl)
    ]
    assert len(applicable) == len(set(applicable))
    eager = sorted(pair for pair, impl in jobs if impl == "eager")
    assert eager == sorted(f"{c.name}/{d}" for c in cfgs for d in c.dtypes)
    # The original's formulations at the paper's step and every layer of it, in f32.
    for c in cfgs:
        if c.tag == "paper" and c.suite in ("step", "layer"):
            assert (f"{c.name}/f32", "original") in applicable
            assert (f"{c.name}/f32", "original-identity") in applicable


def test_selection_follows_tags(monkeypatch):
    monkeypatch.setenv("CCPL_BENCH_TAGS", "large")
    planned = run.plan(run.PHASES, configs(), 450)
    assert {p.phase.name for p in planned} == {"ours-large", "baselines-large", "roofline"}
    monkeypatch.setenv("CCPL_BENCH_TAGS", "infcl")
    planned = run.plan(run.PHASES, configs(), 450)
    assert [p.phase.name for p in planned] == ["ours-infcl", "infcl", "roofline", "baselines-large"]


def test_only_selects_config_dtype_pairs(monkeypatch):
    monkeypatch.setenv("CCPL_BENCH_ONLY", "paper-relu2_1-n8/bf16,large-S8192/f32")
    got = [(c.name, c.dtypes) for c in configs()]
    assert got == [("paper-relu2_1-n8", ("bf16",)), ("large-S8192", ("f32",))]
    monkeypatch.setenv("CCPL_BENCH_ONLY", "paper-relu2_1-n8")
    with pytest.raises(ValueError, match="config/dtype"):
        configs()


# ---- Phases at their limit -----------------------------------------------------------------


def test_a_phase_is_stopped_at_its_limit():
    lines = []
    t0 = time.time()
    code, stopped = run.run_command(["sleep", "30"], dict(os.environ), 0.5, lines.append)
    assert stopped and code == -signal.SIGTERM
    assert time.time() - t0 < 5


def test_a_phase_that_ignores_sigterm_is_killed(monkeypatch):
    monkeypatch.setattr(run, "KILL_GRACE_S", 0.5)
    code, stopped = run.run_command(["bash", "-c", "trap '' TERM; sleep 30"], dict(os.environ), 0.5, lambda line: None)
    assert stopped and code == -signal.SIGKILL


def test_a_phase_output_goes_to_the_log():
    lines = []
    code, stopped = run.run_command(["bash", "-c", "echo one; echo two >&2; exit 3"], dict(os.environ), 10, lines.append)
    assert (code, stopped) == (3, False)
    assert lines == ["one", "two"]


def test_baselines_record_the_job_in_flight_and_the_rest_at_sigterm(tmp_path):
    pytest.importorskip("torch", reason="the baselines need PyTorch (scripts/bootstrap-python)")
    out = tmp_path / "b.jsonl"
    env = dict(os.environ, CCPL_BENCH_CONFIGS=DRY_CONFIGS, CCPL_BENCH_ONLY="paper-relu2_1-n8/f32,large-S8192/f32")
    # Each job is long enough (many repeats) to be in flight when the signal comes.
    cmd = [sys.executable, os.path.join(HERE, "baselines.py"), "--out", str(out), "--device", "cpu", "--impls", "eager",
           "--warmup-ms", "60000", "--min-reps", "100000", "--max-reps", "100000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out.exists() and "running" in out.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "no job started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    final = report.load_baselines(str(out))
    assert final[("paper-relu2_1-n8", "f32", "eager")]["status"] == "timeout"
    assert final[("large-S8192", "f32", "eager")]["status"] == "budget"


# ---- The report ----------------------------------------------------------------------------


def test_a_cuda_graph_run_with_skips_is_not_shown_as_cuda_graphs():
    rec = {"impl": "compile-graphs", "status": "ok", "median_ms": 0.5, "cudagraph_skips": 2}
    text, ms = report.cell(rec)
    assert ms is None and "not graphed" in text
    assert report.cell({**rec, "cudagraph_skips": 0}) == ("500.0 us", 0.5)
    # Nor is one by a backend without CUDA graphs (the dry run's aot_eager).
    text_eager, ms_eager = report.cell({**rec, "cudagraph_skips": 0, "compile_backend": "aot_eager"})
    assert ms_eager is None and "not graphed" in text_eager and "aot_eager" in text_eager
    # ... and is left out of the best torch.compile time.
    cells = {"compile": ("1 ms", 1.0), "compile-graphs": (text, ms)}
    assert report.best_compile(cells) == ("compile", 1.0)


def test_a_killed_job_shows_as_killed():
    assert report.cell({"impl": "eager", "status": "running"}) == ("killed", None)
    assert report.cell({"impl": "eager", "status": "budget"}) == ("budget", None)


def test_no_verdict_in_a_dry_run():
    step = configs()[0]
    assert step.suite == "step"
    assert report.target_text(step, 1.0, 100.0, 100.0, None, dry_run=True) == report.DRY_RUN_TARGET
    assert "unmeasured" in report.DRY_RUN_TARGET
    assert "met" in report.target_text(step, 1.0, 100.0, 100.0, None, dry_run=False)
    assert "MISSED" in report.target_text(step, 1.0, 10.0, 100.0, None, dry_run=False)


def test_the_speedup_targets_are_the_steps():
    """The speed-up targets are the whole loss's: a paper layer alone gets no verdict."""
    layer = next(c for c in configs() if c.suite == "layer" and c.tag == "paper")
    assert report.target_text(layer, 1.0, 100.0, 100.0, None, dry_run=False) == ""


# ---- What a dry run wrote ------------------------------------------------------------------

DRY_OUT = os.environ.get("CCPL_BENCH_DRY_RUN_OUT")
needs_dry_run = pytest.mark.skipif(not DRY_OUT, reason="SKIPPED: no dry run to read (CCPL_BENCH_DRY_RUN_OUT; scripts/bench-dry-run sets it)")


def dry(name):
    return os.path.join(DRY_OUT, name)


@needs_dry_run
def test_dry_run_printed_the_plan_and_every_phase():
    log = open(dry("bench.log")).read()
    assert "DRY RUN" in log
    for i, phase in enumerate(run.PHASES, 1):
        assert re.search(rf"^===\s+{i}\. {phase.name}\s+\d+ s, by \+\s*\d+ s", log, re.M), phase.name
        began = re.search(rf"^=== phase {i} {phase.name}: (start at|not run)", log, re.M)
        assert began, phase.name
        if began.group(1) == "start at":
            assert re.search(rf"^=== phase {i} {phase.name}: end at \+\d+ s after \d+ s: ", log, re.M), phase.name
    assert re.search(r"^=== report: end at \+\d+ s: ok$", log, re.M)


@needs_dry_run
def test_dry_run_phases_ran_only_their_selection():
    cfgs = configs(DRY_CONFIGS)
    log = open(dry("bench.log")).read()
    for i, phase in enumerate(run.PHASES, 1):
        if phase.kind != "ours":
            continue
        part = re.search(rf"^=== phase {i} {phase.name}: start.*?^=== phase {i} {phase.name}: end", log, re.M | re.S)
        assert part, phase.name
        ids = set(re.findall(r'ccpl-bench \{"id": "([^"]+)"', part.group(0)))
        suite = {c.name: c.suite for c in cfgs}
        expected = {
            f"{g}/{pair}" for pair in run.selection(cfgs, phase) for g in phase.groups if g in common.LOSS_GROUPS[suite[pair.split("/")[0]]]
        }
        assert ids and ids <= expected, (phase.name, ids - expected)


@needs_dry_run
def test_dry_run_reported_every_part():
    results = json.load(open(dry("results.json")))
    assert results["run"]["dry_run"] is True and results["run"]["kernel"]
    cfgs = configs(DRY_CONFIGS)
    for c in cfgs:
        for d in c.dtypes:
            for g in common.LOSS_GROUPS[c.suite]:
                assert f"{g}/{c.name}/{d}" in results["ours"], f"{g}/{c.name}/{d}"
    baselines = {(r["config"], r["dtype"], r["impl"]): r for r in results["baselines"]}
    for c in cfgs:
        for d in c.dtypes:
            assert baselines[(c.name, d, "eager")]["status"] == "ok"
    graphs = [r for r in results["baselines"] if r["impl"] == "compile-graphs"]
    assert graphs, "no CUDA-graph job was recorded"
    for r in graphs:  # on the CPU there are no CUDA graphs: never shown as CUDA graphs
        assert report.cell(r)[1] is None, r
    table = open(dry("table.md")).read()
    assert "DRY RUN" in table and report.DRY_RUN_TARGET in table
    assert "not graphed" in table or all(r["status"] != "ok" for r in graphs)
    assert {p["phase"] for p in results["phases"]} >= {p.name for p in run.PHASES}
    summary = open(dry("summary.md")).read()
    assert summary.startswith("# CCPL benchmarks") and report.STEP_TITLE in summary


@needs_dry_run
def test_dry_run_headline_is_the_paper_step():
    """The first phase timed our paper step first (every variant), the second eager's; the
    summary's table has its row, with the variants' times and labelled unmeasured."""
    log = open(dry("bench.log")).read()
    first = re.search(r"^=== phase 1 ours-paper: start.*?^=== phase 1 ours-paper: end", log, re.M | re.S).group(0)
    ids = re.findall(r'ccpl-bench \{"id": "([^"]+)"', first)
    assert ids[: len(common.LOSS_GROUPS["step"])] == [f"{g}/paper-step-n8/f32" for g in common.LOSS_GROUPS["step"]]
    second = re.search(r"^=== phase 2 eager-paper: start.*?^=== phase 2 eager-paper: end", log, re.M | re.S).group(0)
    jobs = re.findall(r"^baselines: (\S+) (\S+) (\S+): ", second, re.M)
    assert jobs[:3] == [("paper-step-n8", "f32", impl) for impl in ("eager", "original-identity", "original")]
    summary = open(dry("summary.md")).read()
    assert report.DRY_RUN_HEADLINE in summary
    row = next(line for line in summary.splitlines() if line.startswith("| paper-step-n8 | f32 |"))
    cells = row.split(" | ")
    assert all(c not in ("-", "budget") for c in cells[3:7]), row  # ours, graph, layers, eager
    assert cells[-1].rstrip(" |") == report.DRY_RUN_TARGET


def test_a_run_whose_budget_is_spent_reports_every_job_as_budget(tmp_path):
    out, pack = tmp_path / "out", tmp_path / "pack"
    pack.mkdir()
    env = dict(os.environ, CCPL_BENCH_PYTHON=sys.executable)
    res = subprocess.run(
        [sys.executable, os.path.join(HERE, "run.py"), "--dry-run", "--budget", "0",
         "--out", str(out), "--pack", str(pack)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    log = (out / "bench.log").read_text()
    for i, phase in enumerate(run.PHASES, 1):
        assert re.search(rf"^=== phase {i} {phase.name}: not run: its time is spent", log, re.M), phase.name
    records = common.read_records(str(out / "work" / "baselines.jsonl"))
    assert records and all(r["status"] == "budget" for r in records)
    assert {(r["config"], r["impl"]) for r in records} >= {("paper-relu2_1-n8", "eager"), ("paper-relu2_1-n8", "compile-graphs")}
    table = (out / "table.md").read_text()
    step = next(line for line in table.splitlines() if line.startswith("| paper-step-n8 | f32 |"))
    assert step.split(" | ")[3:7] == ["budget"] * 4  # ours, its CUDA graph, its layers, eager
    layer = next(line for line in table.splitlines() if line.startswith("| paper-relu2_1-n8 | f32 |"))
    assert layer.split(" | ")[3:5] == ["budget", "budget"]  # ours, eager
    assert "| kernels | 0 s | - | - | not run (budget) |" in table


def test_a_rerun_of_some_phases_gets_their_planned_budgets():
    res = subprocess.run([sys.executable, os.path.join(HERE, "run.py"), "--plan", "--phases", "kernels,roofline"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert re.search(r"=== plan: 2 phases in 70 s", res.stdout)
    assert re.search(r"roofline\s+25 s, by \+\s*35 s", res.stdout) and re.search(r"kernels\s+25 s, by \+\s*60 s", res.stdout)
