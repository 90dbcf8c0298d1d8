# What the GPU runners share (sourced by check.sh and candle.sh, packed beside them by
# scripts/gpu-pack): each step of the log run and timed, and the log's head.
failures=0

# Runs a command as the step `name` of the log: the command line, then PASS or FAIL with the
# exit status and the seconds it took. `run name command...`
run() {
    local name=$1
    shift
    echo "=== $name: $*"
    local start=$SECONDS
    if "$@"; then
        echo "=== $name: PASS ($((SECONDS - start)) s)"
    else
        echo "=== $name: FAIL (exit $?, $((SECONDS - start)) s)"
        failures=$((failures + 1))
    fi
}

# The log's head: its title, the commit packed (the pack's `commit` file), the date, the GPU.
log_head() {
    echo "$1"
    echo "commit: $(tr '\n' ' ' < "$here/commit")"
    echo "date:   $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
}
