#!/usr/bin/env bash
# The benchmark run: bench/run.sh of the payload that `scripts/gpu-pack` packs and
# .device/gpu/run unpacks and calls as its phase `bench`; scripts/bench-dry-run calls it too.
# With python3 holding PyTorch and Triton (CCPL_BENCH_PYTHON names another interpreter):
#     bash bench/run.sh            # the whole run, CCPL_BENCH_BUDGET_S (default 450 s)
#     bash bench/run.sh --plan     # the phases, their order and budgets, nothing run
#     bash bench/run.sh --phases compile-paper,kernels   # some phases only
#     bash bench/run.sh --dry-run  # the same sequence on the CPU (what CI runs)
# Everything it writes goes under $OUT (or ./bench-out): bench.log, table.md, summary.md,
# results.json and work/ (the raw results). The sequence is tools/bench/run.py's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec "${CCPL_BENCH_PYTHON:-python3}" "$here/py/run.py" --pack "$here" "$@"
