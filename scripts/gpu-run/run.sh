#!/usr/bin/env bash
# The whole GPU run, on a machine without cargo or network (packed by `scripts/gpu-pack` into
# .device/gpu/run; docs/gpu-run.md). From the repository root:
#     bash .device/gpu/run                      # every phase, at most 540 s in all
#     bash .device/gpu/run --phases a,b         # only these phases (a rerun: the summary's
#                                               # last line names the failed and unfinished ones)
#     bash .device/gpu/run --plan               # the phases and their budgets, nothing run
#     bash .device/gpu/run --rehearsal          # on a CPU (CI): tests may skip for want of a GPU,
#                                               # the benchmark runs dry, every budget is 4 times
#                                               # longer (the CPU does the GPU's work and more);
#                                               # everything else the same
# The phases, in order of importance, each with its budget in seconds (a phase gets its budget,
# never more than what is left of the 540): the tensor-core calibration, the main job, the GPU
# tests of the crate, candle and the Python package, compute-sanitizer's memcheck, racecheck and
# initcheck on the GPU tests at small sizes, the benchmark's headline phases.
# It writes at most 8 files under $OUT (else ./gpu-out), each under 16 MiB: summary.txt first
# (rewritten as each phase ends), then one log per group of phases and bench.tar.gz.
# Environment: CCPL_PYTHON, the Python with torch (default python3); CCPL_CUDA_LIBS, the
# directories of cuBLAS, cuRAND and the CUDA runtime for candle's binaries (default: found in
# that Python's site-packages or a toolkit).
set -uo pipefail
pack=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$pack/../.." && pwd)
out=${OUT:-$PWD/gpu-out}
python=${CCPL_PYTHON:-python3}
total_budget_s=540
log_limit_bytes=$((15 * 1024 * 1024))

# name:budget_s:log, in order.
phases=(
    calibration:25:calibration.log
    main-job:30:main-job.log
    tests-ccpl:90:tests.log
    tests-candle:45:tests.log
    tests-python:60:tests.log
    memcheck:45:sanitizer.log
    racecheck:45:sanitizer.log
    initcheck:45:sanitizer.log
    bench:150:bench.log
)
# The benchmark's phases run here: its headline first (tools/bench/run.py).
bench_phases=ours-paper,eager-paper,ours-infcl,infcl

usage="usage: bash .device/gpu/run [--rehearsal] [--plan] [--phases NAME,...]"
rehearsal=0 plan=0 only=""
while [ $# -gt 0 ]; do
    case $1 in
    --rehearsal) rehearsal=1 ;;
    --plan) plan=1 ;;
    --phases) only=${2:?$usage}; shift ;;
    *) echo "gpu run: unknown argument '$1'; $usage" >&2; exit 2 ;;
    esac
    shift
done
# A rehearsal on a CPU computes on it what the GPU would, with fewer cores.
budget_scale=1
[ "$rehearsal" = 1 ] && budget_scale=4
total_budget_s=$((total_budget_s * budget_scale))
known=" ${phases[*]%%:*} "
for name in ${only//,/ }; do
    [[ $known == *" $name "* ]] || { echo "gpu run: no phase named '$name' (phases:$known)" >&2; exit 2; }
done
selected() { [ -z "$only" ] || [[ ",$only," == *",$1,"* ]]; }

if [ "$plan" = 1 ]; then
    for p in "${phases[@]}"; do
        IFS=: read -r name budget log <<<"$p"
        selected "$name" && printf '%-14s %4d s  -> %s\n' "$name" "$budget" "$log"
    done
    exit 0
fi

mkdir -p "$out"
summary=$out/summary.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS
results=()

# The summary, rewritten whole: head, one line per phase so far, what to rerun.
write_summary() {
    local rerun=() line
    {
        echo "ccpl GPU run$([ "$rehearsal" = 1 ] && echo " (rehearsal on the CPU: tests may skip)")"
        echo "commit: $(tr '\n' ' ' <"$pack/commit")"
        echo "date:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "gpu:    $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
        echo "sanitizer: ${sanitizer:-none found}"
        echo
        printf '%-14s %-12s %6s %6s  %s\n' phase status seconds budget log
        for line in "${results[@]}"; do
            echo "$line"
            read -r name status _ <<<"$line"
            case $status in FAIL | TIMEOUT | NOT-RUN) rerun+=("$name") ;; esac
        done
        echo
        echo "elapsed: $((SECONDS - start)) s of $total_budget_s s"
        if [ ${#rerun[@]} -gt 0 ]; then
            echo "rerun: bash .device/gpu/run$([ "$rehearsal" = 1 ] && echo " --rehearsal") --phases $(
                IFS=,
                echo "${rerun[*]}"
            )"
        else
            echo "rerun: nothing"
        fi
    } >"$summary.tmp" && mv "$summary.tmp" "$summary"
}
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
write_summary

# Keeps a log under the limit on returned files: its head and tail, the middle cut.
cap_log() {
    local file=$1 size
    size=$(stat -c %s "$file" 2>/dev/null || echo 0)
    [ "$size" -gt "$log_limit_bytes" ] || return 0
    { head -c $((log_limit_bytes / 2)) "$file"; echo; echo "[... $((size - log_limit_bytes)) bytes cut ...]";
      tail -c $((log_limit_bytes / 2 - 100)) "$file"; } >"$file.cut" && mv "$file.cut" "$file"
}

# Runs `command...` with a time limit, output appended to the log: exit 0, 124 on timeout.
limited() {
    local limit=$1
    shift
    timeout --kill-after=5 "$limit" "$@"
}

# The statuses a phase's steps add up to: the worst wins.
worst() {
    local s
    for s in FAIL TIMEOUT UNAVAILABLE NOT-PACKED PASS; do
        [[ " $* " == *" $s "* ]] && { echo "$s"; return; }
    done
    echo PASS
}

# One step of a phase: `step LIMIT NAME COMMAND...`, its output in the log, its status on
# stdout's last line (PASS, FAIL, TIMEOUT).
step() {
    local limit=$1 name=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name: $*" >>"$log"
    limited "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local status=PASS
    [ $rc -eq 0 ] || status=FAIL
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=TIMEOUT
    echo "=== $name: $status (exit $rc, $((SECONDS - t0)) s)" >>"$log"
    echo "$status"
}

# Time left for a phase of budget $1: its budget, never past the total.
phase_limit() {
    local left=$((total_budget_s - (SECONDS - start)))
    [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

# The directories holding cuBLAS, cuRAND and the CUDA runtime of CUDA 13 (candle's binaries
# link them; libcuda is the driver's): in the Python's site-packages (PyTorch's CUDA wheels) or
# a toolkit.
cuda_libs() {
    local roots dirs=() lib dir
    roots=$("$python" -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null)
    for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
        # shellcheck disable=SC2086
        dir=$(find $roots /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib -name "$lib" 2>/dev/null | head -1)
        [ -n "$dir" ] || { echo "missing $lib" >&2; return 1; }
        dirs+=("$(dirname "$dir")")
    done
    printf '%s\n' "${dirs[@]}" | sort -u | paste -sd:
}

# Each phase: its steps, in $work (the unpacked payload); echoes its status.
phase_calibration() {
    step "$1" "tests hmma_hardware" "$work/bin/emulator" hmma_hardware:: --test-threads=1 --nocapture
}
phase_main-job() { step "$1" "main job" "$work/bin/ccp_loss"; }
# On the GPU: every test but the emulator's halves of the device-generic ones (CPU work that CI
# does). In a rehearsal: the ones that would use the GPU (they skip) and those reading files.
phase_tests-ccpl() {
    local filter=(--skip ::emulator)
    [ "$rehearsal" = 1 ] && filter=(::gpu gpu_api:: gpu_loss:: build:: golden:: kernel_image::)
    step "$1" "tests ccpl" "$work/bin/integration" "${filter[@]}"
}
phase_tests-candle() {
    [ -e "$work/bin/candle" ] || { echo "=== candle: not packed" >>"$log"; echo NOT-PACKED; return; }
    local libs
    if ! libs=${CCPL_CUDA_LIBS:-$(cuda_libs 2>>"$log")}; then
        echo "=== candle: the CUDA libraries were not found (set CCPL_CUDA_LIBS)" >>"$log"
        echo FAIL
        return
    fi
    local deadline=$((SECONDS + $1)) a b
    a=$(LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" step "$1" "tests candle" \
        "$work/bin/candle" cuda:: --test-threads=1 | tail -1)
    b=$(LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" step \
        "$(phase_left "$deadline")" "example train_heads" "$work/bin/train_heads" | tail -1)
    worst "$a" "$b"
}
phase_tests-python() {
    local site=$work/site deadline=$((SECONDS + $1)) a b
    [ -d "$work/python" ] || { echo "=== python: not packed" >>"$log"; echo NOT-PACKED; return; }
    a=$(step "$1" "python package install" "$python" -m pip install --quiet --no-index --no-deps \
        --disable-pip-version-check --target "$site" "$work"/python/wheels/*.whl | tail -1)
    [ "$a" = PASS ] || { echo "$a"; return; }
    b=$(PYTHONPATH="$site" step "$(phase_left "$deadline")" "python tests" "$python" -m pytest -rs \
        -p no:cacheprovider "$work/python/tests" | tail -1)
    echo "$b"
}
# Seconds left until `deadline` (at least 1).
phase_left() {
    local left=$(($1 - SECONDS))
    [ "$left" -gt 0 ] && echo "$left" || echo 1
}

# A compute-sanitizer tool over the GPU tests (the `::gpu` half of the device-generic tests,
# gpu_api::, gpu_loss::, candle's cuda::) at the small sizes CCPL_SANITIZER=1 picks. A
# sanitizer that is absent or refuses the device is UNAVAILABLE, not a kernel failure.
sanitize() {
    local tool=$1 limit=$2 deadline=$((SECONDS + $2)) statuses=() status libs
    [ -n "$sanitizer" ] || { echo "=== $tool: compute-sanitizer not found" >>"$log"; echo UNAVAILABLE; return; }
    local before
    before=$(wc -l <"$log")
    status=$(CCPL_SANITIZER=1 step "$limit" "$tool ccpl" "$sanitizer" --tool "$tool" --error-exitcode 99 \
        "$work/bin/integration" ::gpu gpu_api:: gpu_loss:: --test-threads=1 | tail -1)
    statuses+=("$status")
    if [ -e "$work/bin/candle" ] && libs=${CCPL_CUDA_LIBS:-$(cuda_libs 2>/dev/null)}; then
        status=$(CCPL_SANITIZER=1 LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
            step "$(phase_left "$deadline")" "$tool candle" "$sanitizer" --tool "$tool" \
            --error-exitcode 99 "$work/bin/candle" cuda:: --test-threads=1 | tail -1)
        statuses+=("$status")
    fi
    if tail -n +"$before" "$log" | grep -qiE 'device not supported|not supported on this (device|platform)|unable to (find|load) injection'; then
        echo "=== $tool: the sanitizer refused this device or runtime: unavailable" >>"$log"
        echo UNAVAILABLE
        return
    fi
    worst "${statuses[@]}"
}
phase_memcheck() { sanitize memcheck "$1"; }
phase_racecheck() { sanitize racecheck "$1"; }
phase_initcheck() { sanitize initcheck "$1"; }

phase_bench() {
    [ -d "$work/bench" ] || { echo "=== bench: not packed" >>"$log"; echo NOT-PACKED; return; }
    local dry=()
    [ "$rehearsal" = 1 ] && dry=(--dry-run)
    local status
    status=$(CCPL_BENCH_PYTHON=$python step "$1" "bench" bash "$work/bench/run.sh" "${dry[@]}" \
        --out "$work/bench-out" --phases "$bench_phases" --budget $(($1 - 15)) | tail -1)
    # Its tables and raw results, one file (bench.log is the log above).
    tar -czf "$out/bench.tar.gz" -C "$work" bench-out 2>>"$log" || status=FAIL
    echo "$status"
}

# Unpacks the payload (binaries, wheels, tests, the bench runner; xz with a large dictionary,
# scripts/gpu-pack): with the Python the tests need anyway (its lzma module), else with xz.
unpack() {
    "$python" -c '
import sys, tarfile
with tarfile.open(sys.argv[1], "r:xz") as payload:
    # The "tar" filter (Python >= 3.11.4 and 3.12) keeps the modes and refuses paths outside.
    kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
    payload.extractall(sys.argv[2], **kw)' "$pack/payload.tar.xz" "$work" ||
        { command -v xz >/dev/null && xz -dc "$pack/payload.tar.xz" | tar -x -C "$work"; }
}
unpack || { echo "gpu run: cannot unpack $pack/payload.tar.xz (with $python or xz)" >&2; exit 1; }
if [ "$rehearsal" = 1 ]; then
    unset CCPL_REQUIRE_GPU
else
    export CCPL_REQUIRE_GPU=1
fi
export CCPL_GOLDEN_DIR=${CCPL_GOLDEN_DIR:-$root/tests/golden}

for p in "${phases[@]}"; do
    IFS=: read -r name budget logname <<<"$p"
    selected "$name" || continue
    budget=$((budget * budget_scale))
    log=$out/$logname
    limit=$(phase_limit "$budget")
    t0=$SECONDS
    if [ "$limit" -lt 5 ]; then
        status=NOT-RUN
        echo "=== phase $name: not run, the total budget is spent" >>"$log"
    else
        echo "=== phase $name: start at +$((SECONDS - start)) s, at most $limit s" >>"$log"
        status=$("phase_$name" "$limit" | tail -1)
        echo "=== phase $name: $status at +$((SECONDS - start)) s" >>"$log"
    fi
    cap_log "$log"
    results+=("$(printf '%-14s %-12s %6d %6d  %s' "$name" "$status" $((SECONDS - t0)) "$budget" "$logname")")
    write_summary
done
cat "$summary"
grep -qE ' (FAIL|TIMEOUT|NOT-RUN) ' "$summary" && exit 1
exit 0
