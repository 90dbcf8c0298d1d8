#!/usr/bin/env bash
# The benchmark run on the GPU machine (packed by scripts/gpu-bench into .device/bench/run.sh;
# run from the repository root). Everything in one go, within CCPL_BENCH_BUDGET_S seconds
# (default 450): the measured ceilings, our loss, the PyTorch baselines (eager, torch.compile,
# Inf-CL), our kernels, then the tables. CCPL_BENCH_TAGS=paper,large (say) keeps only those
# configurations of configs.txt, for a shorter run. Writes to $OUT (or ./bench-out):
#   bench.log     the full log
#   table.md      all the tables
#   summary.md    the loss table alone (printed last, so the end of the output shows it)
#   results.json  every number the tables came from
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$PWD/bench-out}
mkdir -p "$out"
log=$out/bench.log
budget=${CCPL_BENCH_BUDGET_S:-450}
start=$(date +%s)
deadline=$((start + budget))
left() { echo $((deadline - $(date +%s))); }
work=$(mktemp -d)
export CRITERION_HOME=$work/criterion CCPL_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
# Criterion: short warm-up and measurement (a step takes microseconds to tens of ms, so even
# 0.2 s holds thousands of the short ones), 10 samples, flat sampling (set in the benches);
# the loss, the headline numbers, gets a little longer than each of the ~250 kernel benches (materialised and fused).
crit=(--sample-size 10 --nresamples 1000 --noplot)
crit_loss=("${crit[@]}" --warm-up-time 0.1 --measurement-time 0.3)
crit_kernels=("${crit[@]}" --warm-up-time 0.05 --measurement-time 0.2)

phase() { # name, timeout in seconds, command...
    local name=$1 limit=$2; shift 2
    if [ "$limit" -le 5 ]; then echo "=== $name: not run (time budget spent)"; return; fi
    echo "=== $name (at most ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
}

{
    echo "ccpl GPU benchmarks"
    echo "commit: $(tr '\n' ' ' < "$here/commit")"
    echo "date:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
    ldd --version | head -1
    for bin in "$here"/bin/*; do
        missing=$(ldd "$bin" 2>&1 | grep 'not found')
        [ -z "$missing" ] || echo "!!! $(basename "$bin") cannot load: $missing"
    done
    python3 -c 'import torch, triton; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'

    site=$work/site
    if ls "$here"/wheels/*.whl >/dev/null 2>&1; then
        python3 -m pip install --quiet --no-index --no-deps --target "$site" "$here"/wheels/*.whl \
            && echo "installed: $(ls "$here"/wheels)"
    fi
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}

    phase roofline 90 python3 "$here/py/roofline.py" --out "$work/roofline.json"
    phase "loss (ours)" $(($(left) - 300 > 150 ? 150 : $(left) - 300)) "$here/bin/loss" --bench "${crit_loss[@]}"
    # The baselines get what is left but 120 s, which the kernel benches and the report keep.
    phase baselines $(($(left) - 120)) python3 "$here/py/baselines.py" --out "$work/baselines.jsonl" \
        --configs "$here/py/configs.txt" --deadline $((deadline - 150))
    phase "kernels (ours)" $(($(left) - 15)) "$here/bin/kernels" --bench "${crit_kernels[@]}"
    echo "=== total $(($(date +%s) - start)) s"
} 2>&1 | tee "$log"

python3 "$here/py/report.py" --criterion "$CRITERION_HOME" --baselines "$work/baselines.jsonl" \
    --roofline "$work/roofline.json" --log "$log" --configs "$here/py/configs.txt" \
    --commit "$(head -1 "$here/commit")" --date "$(date -u +%Y-%m-%d)" --json-out "$out/results.json" \
    --summary-out "$out/summary.md" > "$out/table.md" 2>>"$log"
rm -rf "$work"
echo
grep -E '^(=== |!!! |.*(SKIPPED|ERROR|CHECK FAILED|NON-FINITE))' "$log" | tail -40
echo
cat "$out/summary.md"
