#!/usr/bin/env bash
# The Python suite: uvicorn, gunicorn and hypercorn as unmodified sticky workers (python/tests/run.py), then
# `pip install sticky-cluster` from the wheel of the static binary in a fresh venv without Rust, and the
# uvicorn test again through the command pip installed.
# Needs the PyPI packages .ci/run installs (uvicorn, gunicorn, hypercorn, python-socketio, aiohttp); without
# them it skips, except under CI=true, where a missing one is a failure. Ends with 'N passed, N failed'.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
python=${PYTHON:-python3}

missing=$("$python" -c '
import importlib.util
print(" ".join(m for m in ("uvicorn", "gunicorn", "hypercorn", "socketio", "engineio", "aiohttp", "wsproto")
               if importlib.util.find_spec(m) is None))')
if [ -n "$missing" ]; then
    if [ "${CI:-}" = "true" ]; then
        echo "FAIL: python modules missing: $missing (.ci/run installs them)"
        echo "0 passed, 1 failed"
        exit 1
    fi
    echo "SKIP: python modules missing: $missing (pip install the versions .ci/run names)"
    echo "0 passed, 0 failed, 1 skipped"
    exit 0
fi

passed=0
failed=0
count() {
    local line
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' <<<"$1" | tail -n 1)
    passed=$((passed + ${line%% *}))
    line=${line#*, }
    failed=$((failed + ${line%% *}))
}

# ---- the servers, against the workspace's debug binary ----------------------------------------------
if [ ! -x "$repo/target/debug/sticky-cluster" ]; then
    (cd "$repo" && cargo build --quiet -p sticky-cluster) || { echo "0 passed, 1 failed"; exit 1; }
fi
output=$("$python" "$here/tests/run.py" 2>&1)
status=$?
# Its own summary line is summed here, not by test.sh.
printf '%s\n' "$output" | grep -Ev '^[0-9]+ passed, [0-9]+ failed$'
count "$output"
if [ "$status" -ne 0 ] && ! grep -q '^FAIL' <<<"$output"; then
    printf '%s\n' "$output" | tail -n 20
    failed=$((failed + 1))
fi

# ---- pip install sticky-cluster: the wheel of the static binary, a fresh venv, no Rust --------------
wheel_test() {
    local name="pip_installs_the_static_binary_without_rust_and_uvicorn_runs_under_it"
    local tmp binary wheel venv version clean_path
    tmp=$(mktemp -d /tmp/sticky-cluster-wheel.XXXXXX)
    # The same build as docker/run-tests.sh (same flags, packages and binaries), so CI compiles it once.
    if ! (cd "$repo" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release \
        --target x86_64-unknown-linux-gnu --target-dir "$repo/target" \
        -p sticky-cluster -p sticky-cluster-examples --bin sticky-cluster --bin hello-worker); then
        echo "FAIL: $name: the static binary did not build"
        failed=$((failed + 1)); rm -rf "$tmp"; return
    fi
    binary="$repo/target/x86_64-unknown-linux-gnu/release/sticky-cluster"
    if ! wheel=$("$python" "$here/build_wheel.py" "$binary" "$tmp/dist"); then
        echo "FAIL: $name: build_wheel.py refused the binary"
        failed=$((failed + 1)); rm -rf "$tmp"; return
    fi
    venv="$tmp/venv"
    # No cargo, rustc or rustup on PATH for the install and the run: a Python user has none.
    clean_path=$(tr ':' '\n' <<<"$PATH" | grep -Ev '(\.cargo|rustup)' | paste -sd: -)
    if ! "$python" -m venv "$venv" ||
        ! env -u CARGO_HOME -u RUSTUP_HOME PATH="$venv/bin:$clean_path" \
            "$venv/bin/python" -m pip install --quiet --no-index --disable-pip-version-check "$wheel"; then
        echo "FAIL: $name: pip could not install $(basename "$wheel")"
        failed=$((failed + 1)); rm -rf "$tmp"; return
    fi
    version=$(env PATH="$venv/bin:$clean_path" sticky-cluster --version 2>&1)
    local via_module
    via_module=$("$venv/bin/python" -m sticky_cluster --version 2>&1)
    if [ "$version" != "sticky-cluster $(grep -m1 '^version' "$repo/Cargo.toml" | cut -d'"' -f2)" ] ||
        [ "$via_module" != "$version" ]; then
        echo "FAIL: $name: 'sticky-cluster --version' said '$version', 'python -m sticky_cluster' '$via_module'"
        failed=$((failed + 1)); rm -rf "$tmp"; return
    fi
    # The uvicorn test (system python's uvicorn, the venv's command).
    local output
    output=$(env PATH="$clean_path" STICKY_CLUSTER_BIN="$venv/bin/sticky-cluster" \
        "$python" "$here/tests/run.py" uvicorn_sessions 2>&1)
    if grep -q '^1 passed, 0 failed' <<<"$output"; then
        echo "PASS: $name ($(basename "$wheel"); $version)"
        passed=$((passed + 1))
    else
        echo "FAIL: $name: the uvicorn test through the installed command:"
        printf '%s\n' "$output" | grep -Ev '^[0-9]+ passed, [0-9]+ failed$' | tail -n 20 | sed 's/^/    /'
        failed=$((failed + 1))
    fi
    rm -rf "$tmp"
}
wheel_test

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
