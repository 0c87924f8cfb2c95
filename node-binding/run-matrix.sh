#!/usr/bin/env bash
# The Node binding on every JavaScript runtime users run (README.md, "Runtimes"): Node 22, 24 and 26, Bun
# and Deno, installed from the npm registry at the exact versions of test/runtimes/package.json, besides
# the machine's own Node. Every run uses the one release build of the addon: the tarballs of pack.sh
# (STICKY_CLUSTER_NATIVE_PACKED, as run-tests.sh leaves them; without it, pack.sh runs here).
#
#   - the whole suite of run-tests.sh (both implementations) on the newest LTS, Node 26, with its own
#     node and npm first on PATH (run-tests.sh itself runs it on the machine's Node);
#   - on every runtime: the socket.io smoke set (test/matrix/smoke.test.js: sticky sessions over polling
#     and websocket, revival, shutdown, workers dying with their primary, kernel routing, ESM and
#     CommonJS apps; native and JavaScript) and the examples (test/matrix/examples.test.js), each app
#     on that runtime, installed from the tarballs; the test runner is the machine's Node;
#   - tsc --strict on examples/typescript (test/matrix/typescript.test.js);
#   - the table of README.md's "Runtimes" made from these results (test/matrix/table.js), which must
#     be README's, and package.json's engines, which must admit every runtime that passed.
#
# Ends with 'N passed, N failed'. A runtime that cannot be installed is a failure, never a skip.
set -uo pipefail
cd "$(dirname "$0")"

# STICKY_CLUSTER_MATRIX_RESULTS keeps the TAP files (and table.js can read them again); else a temp dir.
if [ -n "${STICKY_CLUSTER_MATRIX_RESULTS:-}" ]; then
    results="$STICKY_CLUSTER_MATRIX_RESULTS"
    rm -rf "$results" && mkdir -p "$results"
else
    results="$(mktemp -d /tmp/sticky-matrix-results.XXXXXX)"
    trap 'rm -rf "$results"' EXIT
fi
passed=0
failed=0
status=0
fail_setup() {
    echo "run-matrix.sh: $*"
    echo "$passed passed, $((failed + 1)) failed"
    exit 1
}

bash test/runtimes/install.sh || fail_setup "the runtimes could not be installed (test/runtimes/install.sh)"
node26_bin="$(node test/runtimes/runtimes.js --bin node26)"

if [ -z "${STICKY_CLUSTER_NATIVE_PACKED:-}" ] || [ ! -d "$STICKY_CLUSTER_NATIVE_PACKED" ]; then
    STICKY_CLUSTER_NATIVE_PACKED="$results/npm-packages"
    bash pack.sh "$STICKY_CLUSTER_NATIVE_PACKED" >/dev/null || fail_setup "pack.sh failed"
fi
export STICKY_CLUSTER_NATIVE_PACKED
version="$(node -p "require('./package.json').version")"
platform_tarball="$STICKY_CLUSTER_NATIVE_PACKED/sticky-cluster-native-linux-x64-gnu-$version.tgz"
[ -f "$platform_tarball" ] || fail_setup "$platform_tarball is missing"
# The in-repository tests (the whole suite on Node 26) load the addon next to index.js: the packed one.
tar -xzOf "$platform_tarball" package/sticky-cluster-native.linux-x64-gnu.node >sticky-cluster-native.node.new &&
    mv sticky-cluster-native.node.new sticky-cluster-native.node || fail_setup "cannot put the packed addon in place"

# Test dependencies: as run-tests.sh installs them (when it has not), and the matrix's own examples.
# The examples link this folder: --ignore-scripts keeps their install from compiling the addon.
if [ ! -d test/node_modules ]; then
    (cd test && npm ci --no-audit --no-fund --loglevel=error) || fail_setup "npm ci in test/ failed"
fi
for example in ../examples/socketio-chat examples/migration examples/typescript; do
    if [ "$example" != ../examples/socketio-chat ] || [ ! -d "$example/node_modules" ]; then
        (cd "$example" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) || fail_setup "npm ci in $example failed"
    fi
done

# The test runner's flags, before the files: one file at a time (each starts clusters of several
# processes), TAP for the counts and for table.js.
test_flags=(--test --test-concurrency=1 --test-reporter=tap)

# run NAME COMMAND...: runs a node test command (given "${test_flags[@]}"), keeps its output as
# $results/NAME.tap (closed by '# exit N' for table.js) and adds its counts.
run() {
    local name=$1
    shift
    local tap="$results/$name.tap"
    local started=$SECONDS
    echo "== $name"
    "$@" >"$tap" 2>&1
    local run_status=$?
    echo "# exit $run_status" >>"$tap"
    local run_passed run_failed
    run_passed=$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$tap" | tail -1)
    run_failed=$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$tap" | tail -1)
    run_passed=${run_passed:-0}
    run_failed=${run_failed:-0}
    if [ "$run_status" -ne 0 ] && [ "$run_failed" -eq 0 ]; then run_failed=1; fi
    if [ "$run_status" -ne 0 ]; then
        status=1
        # The failures with their diagnostics, for the log.
        grep -v '^ok \|^# Subtest' "$tap" | grep -B1 -A40 '^not ok' | head -400
    fi
    passed=$((passed + run_passed))
    failed=$((failed + run_failed))
    echo "# $name: pass $run_passed, fail $run_failed ($((SECONDS - started)) s)"
}

# The whole suite on Node 26: the files and implementations of run-tests.sh's own run_suite lines.
native_files="$(sed -n 's/^run_suite 1 //p' run-tests.sh)"
js_files="$(sed -n 's/^run_suite 0 //p' run-tests.sh)"
[ -n "$native_files" ] && [ -n "$js_files" ] || fail_setup "run-tests.sh has no 'run_suite 1 ...' and 'run_suite 0 ...' lines to take the whole suite from"
node26_path="$(dirname "$node26_bin"):$PATH"
# shellcheck disable=SC2086 # the file lists are globs, as in run-tests.sh
run node26.suite.native env PATH="$node26_path" STICKY_CLUSTER_NATIVE=1 "$node26_bin" "${test_flags[@]}" $native_files
# shellcheck disable=SC2086
run node26.suite.js env PATH="$node26_path" STICKY_CLUSTER_NATIVE=0 "$node26_bin" "${test_flags[@]}" $js_files

for id in node node22 node24 node26 bun deno; do
    run "$id.smoke" env STICKY_CLUSTER_TEST_RUNTIME="$id" node "${test_flags[@]}" test/matrix/smoke.test.js
    run "$id.examples" env STICKY_CLUSTER_TEST_RUNTIME="$id" node "${test_flags[@]}" test/matrix/examples.test.js
done
run types node "${test_flags[@]}" test/matrix/typescript.test.js

echo "== README table and engines"
if node test/matrix/table.js "$results" --check README.md; then
    passed=$((passed + 1))
else
    failed=$((failed + 1))
    status=1
fi

echo "$passed passed, $failed failed"
exit "$status"
