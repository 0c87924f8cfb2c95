#!/usr/bin/env bash
# The benchmark crate's checks in one command: fmt and clippy of this crate, its tests (hash vectors, int31,
# load generator against a direct worker and through a real master), and a short strict handoff run of every
# setup (debug build, npm peers installed from the registry). Prints 'N passed, N failed' last.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
passed=0
failed=0
check() {
    local name="$1"
    shift
    if "$@"; then
        passed=$((passed + 1))
        echo "ok: $name"
    else
        failed=$((failed + 1))
        echo "FAILED: $name"
    fi
}

check "cargo fmt --check" cargo fmt -p sticky-cluster-bench --check
check "cargo clippy" cargo clippy -p sticky-cluster-bench --all-targets -- -D warnings

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if cargo test -p sticky-cluster-bench 2>&1 | tee "$log"; then :; fi
tests_passed=$(grep -o '[0-9]* passed' "$log" | awk '{s += $1} END {print s + 0}')
tests_failed=$(grep -o '[0-9]* failed' "$log" | awk '{s += $1} END {print s + 0}')
if ! grep -q 'test result:' "$log"; then tests_failed=$((tests_failed + 1)); fi
passed=$((passed + tests_passed))
failed=$((failed + tests_failed))

check "build master, hello-worker, bench" cargo build -p sticky-cluster -p sticky-cluster-examples -p sticky-cluster-bench
check "npm ci of the peers" bash -c "cd '$here/node' && npm ci --no-audit --no-fund --loglevel=error"
check "handoff smoke run, every setup, strict" \
    timeout 300 target/debug/sticky-cluster-bench handoff --seconds 0.5 --warmup 0.2 --no-build --strict

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
