#!/usr/bin/env bash
# Every test of the project, as CI runs it: formatting, lints, the Rust workspace (unit and end-to-end
# tests with the real binary and real worker processes), then each front end's own suite.
# Ends with one line 'N passed, N failed' summed over all suites.
set -euo pipefail
cd "$(dirname "$0")"
log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT
passed=0
failed=0

# Runs one suite, keeps its output, and adds its 'N passed, N failed' counts to the totals.
suite() {
    local name=$1
    shift
    echo "== $name"
    local started=$SECONDS
    local status=0
    "$@" 2>&1 | tee "$log_dir/$name.log" || status=$?
    local counts
    counts=$(grep -Eo '([0-9]+) passed[;,] ([0-9]+) failed' "$log_dir/$name.log" \
        | awk '{p += $1; f += $3} END {print p+0, f+0}')
    passed=$((passed + ${counts% *}))
    failed=$((failed + ${counts#* }))
    echo "== $name took $((SECONDS - started)) s"
    if [ "$status" -ne 0 ]; then
        echo "suite $name failed (exit $status)"
        failed=$((failed + 1))
    fi
}

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --all-targets

# The benchmark crate's tests run in its own suite below, with its npm peers.
suite rust cargo test --workspace --exclude sticky-cluster-bench
suite ffi-c bash ffi-c/run-tests.sh
suite node bash node-binding/run-tests.sh
# After node: the matrix reuses the tarballs (the one release build of the addon) run-tests.sh packed.
suite runtimes env STICKY_CLUSTER_NATIVE_PACKED="${CARGO_TARGET_DIR:-$PWD/target}/npm-packages" bash node-binding/run-matrix.sh
suite docker bash docker/run-tests.sh
# After docker: the wheel reuses the static binary docker/run-tests.sh built.
suite python bash python/run-tests.sh
suite benchmark bash benchmark/test.sh

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
