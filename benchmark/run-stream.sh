#!/usr/bin/env bash
# The stream benchmark in one command: builds the master and this benchmark in release mode, installs nginx and
# HAProxy (Debian's packages, when missing and this runs as root), then streams through every setup. Extra
# arguments go to `sticky-cluster-bench stream` (e.g. --seconds 10 --clients 256).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
cargo build --release -p sticky-cluster -p sticky-cluster-examples -p sticky-cluster-bench
bash "$here/ensure-proxies.sh" || echo "run-stream: continuing without nginx/HAProxy" >&2
exec target/release/sticky-cluster-bench stream --no-build "$@"
