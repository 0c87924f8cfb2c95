#!/usr/bin/env bash
# Node binding tests: builds the addon (release, as `npm install` does), installs the test dependencies
# from test/package-lock.json, runs every test/*.test.js with node's test runner (real clusters, real
# socket.io clients from many loopback addresses), and ends with 'N passed, N failed'.
set -uo pipefail
cd "$(dirname "$0")"

node scripts/build.js --force || { echo "0 passed, 1 failed"; exit 1; }
for dir in test ../examples/socketio-chat; do
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || { echo "0 passed, 1 failed"; exit 1; }
done

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
