#!/usr/bin/env bash
# The GPU check, on the GPU machine (packed by scripts/gpu-check into .device/check/run.sh).
# Run from the repository root. Full log: $OUT/gpu-check.log (or ./gpu-check.log).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log=${OUT:-.}/gpu-check.log
export CCPL_REQUIRE_GPU=1 CCPL_GOLDEN_DIR=${CCPL_GOLDEN_DIR:-tests/golden}
failures=0
run() { # name, command...
    local name=$1; shift
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@"; then echo "=== $name: PASS ($((SECONDS - start)) s)"
    else echo "=== $name: FAIL (exit $?, $((SECONDS - start)) s)"; failures=$((failures + 1)); fi
}
{
    echo "ccpl GPU check"
    echo "commit: $(tr '\n' ' ' < "$here/commit")"
    echo "date:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    ldd --version | head -1
    # First: do the tensor cores add as the emulator's model says (every test's tolerance on
    # f16/bf16 rests on it)?
    run "tests hmma_hardware" "$here/bin/emulator" hmma_hardware:: --test-threads=1 --nocapture
    run "main job" "$here/ccp_loss"
    for bin in "$here"/bin/*; do
        run "tests $(basename "$bin")" "$bin" --skip hmma_hardware:: --test-threads=1
    done
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
    if [ -z "$sanitizer" ]; then
        echo "=== compute-sanitizer not found"; failures=$((failures + 1))
    else
        # Only what runs on the GPU: the `::gpu` half of the device-generic tests and every
        # test of the modules gpu_*, at the small sizes they pick under CCPL_SANITIZER=1.
        filter=(::gpu gpu_api:: gpu_loss::)
        for tool in memcheck racecheck; do
            for bin in "$here"/bin/*; do
                name=$(basename "$bin")
                "$bin" --list 2>/dev/null | grep -qE '(::gpu|^gpu_api::.*|^gpu_loss::.*): test' ||
                    continue
                CCPL_SANITIZER=1 run "$tool $name" "$sanitizer" --tool "$tool" \
                    --error-exitcode 99 "$bin" "${filter[@]}" --test-threads=1
            done
        done
    fi
    # The Python package's tests on CUDA tensors, with this machine's torch.
    site=$(mktemp -d)
    run "python package install" python3 -m pip install --quiet --no-index --no-deps \
        --target "$site" "$here"/python/wheels/*.whl
    run "python tests" env PYTHONPATH="$site" python3 -m pytest -rs -p no:cacheprovider \
        "$here/python/tests"
    echo "=== failures: $failures"
} 2>&1 | tee "$log"
exit $(grep -c '^=== .*: FAIL' "$log")
