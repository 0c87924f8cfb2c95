#!/usr/bin/env bash
# Every test of the project, as CI runs it: formatting, lints, the Rust workspace (unit and end-to-end
# tests with the real binary and real worker processes), then each front end's own suite.
set -euo pipefail
cd "$(dirname "$0")"

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== Rust workspace"
cargo build --workspace --all-targets
cargo test --workspace
