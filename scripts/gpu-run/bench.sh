#!/usr/bin/env bash
# The benchmark run on the GPU machine, packed by `scripts/gpu-pack bench` into .device/bench/run.sh.
# From the repository root, with python3 holding PyTorch and Triton (CCPL_BENCH_PYTHON names
# another interpreter):
#     bash .device/bench/run.sh            # the whole run, CCPL_BENCH_BUDGET_S (default 450 s)
#     bash .device/bench/run.sh --plan     # the phases, their order and budgets, nothing run
#     bash .device/bench/run.sh --phases compile-paper,kernels   # a rerun of some phases
#     bash .device/bench/run.sh --dry-run  # the same sequence on the CPU (what CI runs)
# Everything it writes goes under $OUT (or ./bench-out): bench.log, table.md, summary.md,
# results.json and work/ (the raw results). The sequence is tools/bench/run.py's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec "${CCPL_BENCH_PYTHON:-python3}" "$here/py/run.py" --pack "$here" "$@"
