#!/usr/bin/env bash
# Node binding tests: builds the addon once, as it is published (pack.sh: cargo-zigbuild against an old
# glibc, both npm tarballs), puts that same .node in place for the in-repo tests, installs the test
# dependencies from test/package-lock.json, runs every test/*.test.js with node's test runner (real
# clusters, real socket.io clients from many loopback addresses), and ends with 'N passed, N failed'.
set -uo pipefail
cd "$(dirname "$0")"

# The tarballs stay in the cargo target dir (rewritten each run) for test/prebuilt.test.js.
export STICKY_CLUSTER_NATIVE_PACKED="${CARGO_TARGET_DIR:-$PWD/../target}/npm-packages"
rm -rf "$STICKY_CLUSTER_NATIVE_PACKED"
bash pack.sh "$STICKY_CLUSTER_NATIVE_PACKED" || { echo "0 passed, 1 failed"; exit 1; }
# The example's dependency on this folder is a link: --ignore-scripts keeps its install from compiling the
# addon a second time (plain cargo, this machine's glibc); it runs on the packed addon put in place below.
# Source builds are tested on their own (prebuilt.test.js: npm rebuild --build-from-source; binding.test.js).
(cd test && npm ci --no-audit --no-fund --loglevel=error) || { echo "0 passed, 1 failed"; exit 1; }
(cd ../examples/socketio-chat && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) ||
    { echo "0 passed, 1 failed"; exit 1; }
version="$(node -p "require('./package.json').version")"
tar -xzOf "$STICKY_CLUSTER_NATIVE_PACKED/sticky-cluster-native-linux-x64-gnu-$version.tgz" \
    package/sticky-cluster-native.linux-x64-gnu.node >sticky-cluster-native.node.new &&
    mv sticky-cluster-native.node.new sticky-cluster-native.node || { echo "0 passed, 1 failed"; exit 1; }

# The suite runs once per implementation: the native master (STICKY_CLUSTER_NATIVE=1: a missing addon
# fails) and the JavaScript fallback (=0). The JS run leaves out what does not depend on the master:
# installing (package.test.js) and the side-by-side checks (implementations.test.js start both).
reports=()
trap 'rm -f "${reports[@]}"' EXIT
status=0
passed=0
failed=0
run_suite() {
    local implementation=$1; shift
    local report
    report="$(mktemp)"
    reports+=("$report")
    # One file at a time: each test starts clusters of several Node processes; a 2-core machine is enough.
    STICKY_CLUSTER_NATIVE=$implementation node --test --test-concurrency=1 --test-reporter=tap "$@" | tee "$report"
    local run_status=${PIPESTATUS[0]}
    local run_passed run_failed
    run_passed=$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$report" | tail -1)
    run_failed=$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$report" | tail -1)
    run_passed=${run_passed:-0}
    run_failed=${run_failed:-0}
    if [ "$run_status" -ne 0 ] && [ "$run_failed" -eq 0 ]; then run_failed=1; fi
    if [ "$run_status" -ne 0 ]; then status=$run_status; fi
    # Not in the 'N passed, N failed' form: test.sh adds up every such line, and the last one has both.
    echo "# STICKY_CLUSTER_NATIVE=$implementation run: pass $run_passed, fail $run_failed"
    passed=$((passed + run_passed))
    failed=$((failed + run_failed))
}
run_suite 1 test/*.test.js
run_suite 0 test/ready.test.js test/sticky.test.js test/options.test.js test/queue.test.js test/stalled-worker.test.js test/reload.test.js test/external-sigterm.test.js test/example.test.js
echo "$passed passed, $failed failed"
exit "$status"
