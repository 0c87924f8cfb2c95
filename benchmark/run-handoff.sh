#!/usr/bin/env bash
# The handoff benchmark in one command: builds the master, hello-worker and this benchmark in release mode,
# installs the npm peers pinned in benchmark/node (sticky-cluster 0.3.5, @socket.io/sticky 2.0.1) and nginx and
# HAProxy (Debian's packages, when missing and this runs as root), then runs every setup. Extra arguments go to `sticky-cluster-bench handoff` (e.g. --seconds 10 --concurrency 4).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
cargo build --release -p sticky-cluster -p sticky-cluster-examples -p sticky-cluster-bench
(cd "$here/node" && npm ci --no-audit --no-fund --loglevel=error)
# Without the proxies rows (f) and (g) read "skipped" with the reason; the other rows still run.
bash "$here/ensure-proxies.sh" || echo "run-handoff: continuing without nginx/HAProxy" >&2
exec target/release/sticky-cluster-bench handoff --no-build "$@"
