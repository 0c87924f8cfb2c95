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
for dir in test ../examples/socketio-chat; do
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || { echo "0 passed, 1 failed"; exit 1; }
done
# After the example's install, whose install script compiles this folder in place from source.
version="$(node -p "require('./package.json').version")"
tar -xzOf "$STICKY_CLUSTER_NATIVE_PACKED/sticky-cluster-native-linux-x64-gnu-$version.tgz" \
    package/sticky-cluster-native.linux-x64-gnu.node >sticky-cluster-native.node.new &&
    mv sticky-cluster-native.node.new sticky-cluster-native.node || { echo "0 passed, 1 failed"; exit 1; }

report="$(mktemp)"
trap 'rm -f "$report"' EXIT
# One file at a time: each test starts clusters of several Node processes; a 2-core machine is enough.
node --test --test-concurrency=1 --test-reporter=tap test/*.test.js | tee "$report"
status=${PIPESTATUS[0]}

passed=$(sed -n 's/^# pass \([0-9]*\)$/\1/p' "$report" | tail -1)
failed=$(sed -n 's/^# fail \([0-9]*\)$/\1/p' "$report" | tail -1)
passed=${passed:-0}
failed=${failed:-0}
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo "$passed passed, $failed failed"
exit "$status"
