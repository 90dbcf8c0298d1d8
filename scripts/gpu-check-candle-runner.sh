#!/usr/bin/env bash
# The CUDA tests of ccpl-candle on the GPU machine (packed by scripts/gpu-check-candle into
# .device/candle/run.sh). Run from the repository root. Finds the CUDA libraries candle links
# (the driver's libcuda; cuBLAS, cuRAND and the runtime from PyPI wheels such as PyTorch's, or
# a toolkit: set CCPL_CUDA_LIBS to a list of directories to skip the search), unpacks the
# binaries and runs them with CCPL_REQUIRE_GPU=1. Log: $OUT/gpu-check-candle.log.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log=${OUT:-.}/gpu-check-candle.log
export CCPL_REQUIRE_GPU=1
failures=0
run() { # name, command...
    local name=$1; shift
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@"; then echo "=== $name: PASS ($((SECONDS - start)) s)"
    else echo "=== $name: FAIL (exit $?, $((SECONDS - start)) s)"; failures=$((failures + 1)); fi
}
# A directory holding each library the binaries need besides libcuda (which the driver installs).
find_libraries() {
    local dirs=() lib dir
    for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13; do
        dir=$(find / \( -path /proc -o -path /sys -o -path '*/target/cuda-link' \) -prune \
              -o -name "$lib" -print 2>/dev/null | head -1 | xargs -r dirname)
        if [ -z "$dir" ]; then echo "missing $lib" >&2; return 1; fi
        echo "$lib: $dir" >&2
        dirs+=("$dir")
    done
    printf '%s\n' "${dirs[@]}" | sort -u | paste -sd:
}
{
    echo "ccpl-candle GPU check"
    echo "commit: $(tr '\n' ' ' < "$here/commit")"
    echo "date:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    if libs=${CCPL_CUDA_LIBS:-$(find_libraries)}; then
        export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        bin=$(mktemp -d)
        for packed in "$here"/*.gz; do
            name=$(basename "$packed" .gz)
            gzip -dc "$packed" > "$bin/$name" && chmod +x "$bin/$name"
        done
        run "tests cuda" "$bin/candle" cuda:: --test-threads=1
        run "example train_heads" "$bin/train_heads"
        rm -rf "$bin"
    else
        echo "=== libraries: FAIL (not found; set CCPL_CUDA_LIBS)"; failures=$((failures + 1))
    fi
    echo "=== failures: $failures"
} 2>&1 | tee "$log"
exit $(grep -c '^=== .*: FAIL' "$log")
