#!/usr/bin/env bash
# The handoff benchmark in one command: builds the master, hello-worker and this benchmark in release mode,
# builds the Node binding's addon (release), installs the npm peers pinned in benchmark/node (sticky-cluster
# 0.3.5, @socket.io/sticky 2.0.1) and nginx and HAProxy (Debian's packages, when missing and this runs as
# root), then runs every setup. Extra arguments go to `sticky-cluster-bench handoff` (e.g. --seconds 10
# --concurrency 4).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
cargo build --release -p sticky-cluster -p sticky-cluster-examples -p sticky-cluster-bench
# Rows (e) and (k) via node-binding load the native addon, which a fresh checkout does not have. Built here
# every time (release, with cargo: quick when nothing changed), so that neither a missing addon nor a stale or
# debug one (benchmark/test.sh builds a debug one when missing) is measured. A failed build does not stop the
# other rows; the node-binding rows then say why they were skipped.
node "$here/../node-binding/scripts/build.js" --force ||
    echo "run-handoff: building the Node addon failed; the node-binding rows will be skipped" >&2
(cd "$here/node" && npm ci --no-audit --no-fund --loglevel=error)
# Without the proxies rows (f) and (g) read "skipped" with the reason; the other rows still run.
bash "$here/ensure-proxies.sh" || echo "run-handoff: continuing without nginx/HAProxy" >&2
exec "${CARGO_TARGET_DIR:-target}/release/sticky-cluster-bench" handoff --no-build "$@"
