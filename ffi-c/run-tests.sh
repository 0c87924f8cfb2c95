#!/usr/bin/env bash
# The C ABI's test suite, one command:  bash ffi-c/run-tests.sh
# Builds the library and the sticky-cluster binary, fails when include/sticky_cluster.h is stale,
# installs into a temporary PREFIX with install.sh, builds the C tests and examples/c-server through the
# installed pkg-config file, and runs every scenario twice: plain and under AddressSanitizer with
# LeakSanitizer (any report from any process, master or worker, is a failure).
# Real processes throughout: clusters listen on loopback, clients connect from 127.0.x.y addresses.
# Masters are waited for on their ready fd (STICKY_CLUSTER_READY_FD: the binary and the C library's masters
# both write JSON lines there), never by reading their log.
# Ends with "N passed, N failed"; exits non-zero on any failure. Needs: cargo, gcc (libasan), pkg-config.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
work="$(mktemp -d /tmp/sticky-ffi-tests.XXXXXX)"
prefix="$work/prefix"
bin="$work/bin"
mkdir -p "$bin" "$work/logs" "$work/asan"
passed=0
failed=0
started=()

cleanup() {
    # Workers die with their master (PR_SET_PDEATHSIG), so killing the masters we started is enough.
    for pid in "${started[@]}"; do
        kill -KILL "$pid" 2>/dev/null
    done
    if [ "$failed" -eq 0 ]; then rm -rf "$work"; else echo "logs kept in $work/logs"; fi
}
trap cleanup EXIT

pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() {
    echo "FAIL $1: $2"
    failed=$((failed + 1))
    if [ -n "${3:-}" ] && [ -f "$3" ]; then sed 's/^/    | /' "$3" | tail -25; fi
}
# check NAME LOG COMMAND...: one test that passes when COMMAND exits 0.
check() {
    local name="$1" log="$2"
    shift 2
    if "$@" >"$log" 2>&1; then pass "$name"; else fail "$name" "exit status $?" "$log"; fi
}
finish() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit
}

# --- build, header, install -------------------------------------------------------------------------
check "cargo build (sticky-cluster binary, sticky-cluster-ffi)" "$work/logs/build.log" \
    cargo build --manifest-path "$repo/Cargo.toml" -p sticky-cluster -p sticky-cluster-ffi
check "rust unit tests of sticky-cluster-ffi" "$work/logs/unit.log" \
    cargo test --manifest-path "$repo/Cargo.toml" -p sticky-cluster-ffi --lib
check "include/sticky_cluster.h matches a fresh cbindgen run" "$work/logs/header.log" \
    cargo run -q --manifest-path "$repo/Cargo.toml" -p sticky-cluster-ffi --example generate-header -- --check
check "install.sh into a temporary PREFIX" "$work/logs/install.log" \
    env PREFIX="$prefix" bash "$here/install.sh"
sticky_cluster="$target_dir/debug/sticky-cluster"
if [ ! -x "$sticky_cluster" ] || [ ! -f "$prefix/lib/pkgconfig/sticky_cluster.pc" ]; then
    echo "cannot go on without the binary and the installed library"
    finish
fi
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)"
if [ "$(pkg-config --modversion sticky_cluster 2>&1)" = "$version" ] &&
    [ "$(pkg-config --cflags sticky_cluster | xargs)" = "-I$prefix/include" ]; then
    pass "pkg-config finds sticky_cluster $version in the prefix"
else
    fail "pkg-config finds sticky_cluster" "$(pkg-config --modversion --cflags sticky_cluster 2>&1)"
fi

# Libs.private must be what this rustc says a static library needs (install.sh asks it the same way).
: >"$work/empty.rs"
expected_libs="$(rustc --crate-type staticlib --crate-name probe --edition 2021 --out-dir "$work" \
    --print native-static-libs "$work/empty.rs" 2>&1 | sed -n 's/^note: native-static-libs: //p')"
private_libs="$(sed -n 's/^Libs.private: //p' "$prefix/lib/pkgconfig/sticky_cluster.pc")"
if [ -n "$expected_libs" ] && [ "$private_libs" = "$expected_libs" ]; then
    pass "sticky_cluster.pc Libs.private is rustc's native-static-libs ($private_libs)"
else
    fail "sticky_cluster.pc Libs.private is rustc's native-static-libs" \
        "pc file: '$private_libs', rustc: '$expected_libs'"
fi

# --- the installed header stands alone in strict C99 and in C++ (cpp_compat's extern "C") ----------
printf '#include <sticky_cluster.h>\nint main(void) { sticky_options o; sticky_options_init(&o); return 0; }\n' \
    >"$work/header.c"
check "installed header compiles alone as C99 -pedantic and as C++11" "$work/logs/header-c.log" \
    bash -c 'gcc -std=c99 -pedantic -Wall -Wextra -Werror -fsyntax-only $0 "$1" &&
             g++ -std=c++11 -Wall -Wextra -Werror -fsyntax-only -x c++ $0 "$1"' \
    "$(pkg-config --cflags sticky_cluster | xargs)" "$work/header.c"

# --- C builds: every test with -Wall -Wextra -Werror, plain and with AddressSanitizer ----------------
read -r -a pkg_flags <<<"$(pkg-config --cflags --libs sticky_cluster)"
rpath="-Wl,-rpath,$prefix/lib"
declare -A variant_flags=(
    [plain]="-O1 -g"
    [asan]="-O1 -g -fsanitize=address -fno-omit-frame-pointer"
)
for variant in plain asan; do
    read -r -a flags <<<"${variant_flags[$variant]}"
    for test in errors blocking_worker epoll_worker sticky_client reload stop_worker; do
        check "compile tests/$test.c ($variant)" "$work/logs/cc-$test-$variant.log" \
            gcc -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror "${flags[@]}" -o "$bin/$test-$variant" \
            "$here/tests/$test.c" "${pkg_flags[@]}" -pthread "$rpath"
    done
    check "build examples/c-server with pkg-config ($variant)" "$work/logs/cc-c-server-$variant.log" \
        env CC=gcc CFLAGS="${variant_flags[$variant]} $rpath" bash "$repo/examples/c-server/build.sh" \
        "$bin/c-server-$variant"
done
check "compile tests/errors.c against libsticky_cluster.a (pkg-config --static)" \
    "$work/logs/cc-errors-static.log" \
    gcc -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -O1 -o "$bin/errors-static" "$here/tests/errors.c" \
    $(pkg-config --cflags sticky_cluster) "$prefix/lib/libsticky_cluster.a" \
    $(pkg-config --static --libs-only-l sticky_cluster | sed 's/-lsticky_cluster//')

# --- scenarios ----------------------------------------------------------------------------------------
# ready_field LINE KEY: the value of KEY in a ready line (a number, true/false, or a "string" without
# escapes, as the format's fields are), or nothing.
ready_field() {
    local pattern="\"$2\":(\"[^\"]*\"|[^,}]*)"
    [[ $1 =~ $pattern ]] && echo "${BASH_REMATCH[1]}"
}

# read_ready EVENT: reads ready lines from the master's ready fd (READY) until one of EVENT, left in LINE;
# fails at the end of the fd or after 30 s. Only version 1 lines count.
read_ready() {
    while IFS= read -r -t 30 -u "$READY" LINE; do
        [ "$(ready_field "$LINE" version)" = 1 ] && [ "$(ready_field "$LINE" event)" = "\"$1\"" ] && return 0
    done
    LINE=""
    return 1
}

# start_cluster LOG COMMAND...: starts a master with STICKY_CLUSTER_READY_FD on a pipe (fd READY here),
# its stderr in LOG, and waits for its "listening" line; sets PORT and MASTER.
start_cluster() {
    local log="$1"
    shift
    exec {READY}< <(STICKY_CLUSTER_READY_FD=3 exec "$@" 3>&1 1>&2 2>"$log")
    MASTER=$!
    started+=("$MASTER")
    PORT=""
    if ! read_ready listening; then
        exec {READY}<&-
        return 1
    fi
    PORT="$(ready_field "$LINE" port)"
    [ -n "$PORT" ]
}

# stop_cluster: SIGTERM to the master, then its exit status in STATUS (124 when it outlived 30 s), and its
# "stopped" line in STOPPED (empty when there was none).
stop_cluster() {
    kill -TERM "$MASTER"
    STOPPED=""
    if read_ready stopped; then STOPPED="$LINE"; fi
    exec {READY}<&-
    for _ in $(seq 300); do
        if ! kill -0 "$MASTER" 2>/dev/null; then
            wait "$MASTER"
            STATUS=$?
            return
        fi
        sleep 0.1
    done
    kill -KILL "$MASTER"
    wait "$MASTER"
    STATUS=124
}

# routed_total: the connections the master's "stopped" line says it handed to workers, summed.
routed_total() {
    local routed total=0 count
    [[ $STOPPED =~ \"routed\":\[([0-9,]*)\] ]] && routed="${BASH_REMATCH[1]}"
    for count in ${routed//,/ }; do total=$((total + count)); done
    echo "$total"
}

# cluster_scenario NAME VARIANT CONCURRENCY ADDRESSES ROUTED DRAIN_PATTERN COMMAND...
# Stickiness through the client, then SIGTERM: the master must exit 0, its "stopped" line must say graceful
# and ROUTED connections handed over (every request with handoff routing, 0 when the kernel routes), and
# every worker must log DRAIN_PATTERN (its STICKY_ESHUTDOWN line), with no FAIL line anywhere.
cluster_scenario() {
    local name="$1" variant="$2" concurrency="$3" addresses="$4" routed="$5" drain="$6"
    shift 6
    local log="$work/logs/$name-$variant.log"
    if ! start_cluster "$log" "$@"; then
        fail "$name ($variant): cluster starts" "no 'listening' line on the ready fd" "$log"
        kill -KILL "$MASTER" 2>/dev/null
        return
    fi
    local client_log="$work/logs/$name-client-$variant.log"
    if timeout 120 "$bin/sticky_client-$variant" "$PORT" "$concurrency" "$addresses" 2 >"$client_log" 2>&1; then
        pass "$name ($variant): $(tail -1 "$client_log")"
    else
        fail "$name ($variant): $addresses addresses x 2 stay on worker string_hash % $concurrency" \
            "client exit status $?" "$client_log"
    fi
    stop_cluster
    local drained
    drained="$(grep -c "$drain" "$log")"
    if [ "$STATUS" -eq 0 ] && [ "$drained" -eq "$concurrency" ] && ! grep -q "FAIL" "$log"; then
        pass "$name ($variant): SIGTERM -> $drained/$concurrency workers saw STICKY_ESHUTDOWN, master exit 0"
    else
        fail "$name ($variant): SIGTERM drains" "master exit $STATUS, $drained/$concurrency drain lines" "$log"
    fi
    if [ "$(ready_field "$STOPPED" graceful)" = true ] && [ "$(routed_total)" -eq "$routed" ]; then
        pass "$name ($variant): the stopped line says graceful, $routed connections routed by the master"
    else
        fail "$name ($variant): the stopped line" "expected graceful and $routed routed, got '$STOPPED'" "$log"
    fi
}

# wait_for_line FILE PATTERN: polls FILE (a process's output) for PATTERN for up to 30 s.
wait_for_line() {
    for _ in $(seq 300); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

# one_at_a_time LOG CONCURRENCY: from the reload test workers' event lines, every index was replaced (its
# generation 1 worker shut down and exited, its generation 2 worker started and became ready), each old worker
# got its shutdown only after its successor was ready (successor first), and no two successors were starting at
# the same time: the spans from a successor's start to its ready do not overlap. (An old worker may still be
# draining while the next index's successor starts: that is the design, not two replacements at once.)
one_at_a_time() {
    awk -v concurrency="$2" '
        $1 == "reload-test:" && $2 == "worker" && $4 == "gen" { at[$3 "," $5 "," $6] = $7 }
        END {
            bad = 0
            for (i = 0; i < concurrency; i++) {
                split("1,shutdown 1,exit 2,start 2,ready", events, " ")
                for (e in events) {
                    if (!((i "," events[e]) in at)) { print "index " i ": no " events[e] " event"; bad = 1 }
                }
                begin[i] = at[i ",2,start"] + 0; end[i] = at[i ",2,ready"] + 0
                if (at[i ",1,shutdown"] + 0 < end[i]) {
                    print "index " i ": the old worker was told to shut down before its successor was ready"; bad = 1
                }
            }
            for (i = 0; i < concurrency; i++) for (j = i + 1; j < concurrency; j++) {
                if (!(end[i] <= begin[j] || end[j] <= begin[i])) {
                    print "indexes " i " and " j " were replaced at the same time"; bad = 1
                }
            }
            exit bad
        }' "$1"
}

# stops_cleanly NAME VARIANT LOG: SIGTERM to the master afterwards: exit 0, a graceful stopped line, and no
# FAIL line in LOG.
stops_cleanly() {
    stop_cluster
    if [ "$STATUS" -eq 0 ] && [ "$(ready_field "$STOPPED" graceful)" = true ] && ! grep -q "FAIL" "$3"; then
        pass "$1 ($2): SIGTERM to the master afterwards -> exit 0"
    else
        fail "$1 ($2): SIGTERM to the master afterwards" "master exit $STATUS, stopped line '$STOPPED'" "$3"
    fi
}

# reload_scenario NAME VARIANT SEND_SIGHUP COMMAND...: a client connects back to back while the master gets
# SIGHUP (SEND_SIGHUP is a function that sends it, and may first try a bad configuration); the client must
# see every index answer from generation 2 with no connection lost, no two indexes may restart at once,
# and SIGTERM must still end the master with status 0.
reload_scenario() {
    local name="$1" variant="$2" send_sighup="$3" concurrency=2
    shift 3
    local log="$work/logs/$name-$variant.log" client_log="$work/logs/$name-client-$variant.log"
    if ! start_cluster "$log" "$@"; then
        fail "$name ($variant): cluster starts" "no 'listening' line on the ready fd" "$log"
        kill -KILL "$MASTER" 2>/dev/null
        return
    fi
    if [ "$name" = reload-handle ]; then
        # The embedding prints sticky_cluster_port(): the library's answer and the ready line agree.
        if wait_for_line "$log" "reload-test: the cluster listens on port $PORT\$"; then
            pass "$name ($variant): sticky_cluster_port is the listening line's port ($PORT)"
        else
            fail "$name ($variant): sticky_cluster_port is the listening line's port" "ready fd said $PORT" "$log"
        fi
    fi
    timeout 120 "$bin/reload-$variant" client "$PORT" "$concurrency" 2 >"$client_log" 2>&1 &
    local client=$!
    started+=("$client")
    if ! wait_for_line "$client_log" "^warm"; then
        fail "$name ($variant): the client reaches every worker" "no 'warm' line" "$client_log"
    elif ! "$send_sighup" "$log"; then
        fail "$name ($variant): SIGHUP" "see the master's log" "$log"
    fi
    wait "$client"
    local client_status=$?
    if [ "$client_status" -eq 0 ]; then
        pass "$name ($variant): SIGHUP, $(tail -1 "$client_log")"
    else
        fail "$name ($variant): SIGHUP restarts every worker with no connection lost" \
            "client exit status $client_status" "$client_log"
    fi
    if one_at_a_time "$log" "$concurrency" >"$work/logs/$name-order-$variant.log"; then
        pass "$name ($variant): the workers were replaced one index at a time"
    else
        fail "$name ($variant): the workers were replaced one index at a time" "overlap" \
            "$work/logs/$name-order-$variant.log"
    fi
    stops_cleanly "$name" "$variant" "$log"
}

# The embedding (tests/reload.c handle) answers SIGHUP itself: a bad reload, then the new options.
sighup_handle() {
    kill -HUP "$MASTER" && wait_for_line "$1" "ok a bad reload is refused"
}

# sticky_run_config re-reads its file: first a broken one (refused, logged, nothing changes), then the
# good one with the workers' environment changed.
reload_yaml() {
    printf 'host: 127.0.0.1\nport: 0\nconcurrency: 2\nhardShutdownDelay: 10s\nprefix: "reload-test:"\nenv:\n  RELOAD_GENERATION: %s\n' \
        "$1" >"$work/reload.yaml"
}
sighup_file() {
    printf 'backlog: 0\n' >>"$work/reload.yaml"
    kill -HUP "$MASTER" && wait_for_line "$1" "reload refused, the cluster keeps its configuration: .*reload.yaml:8: backlog: must be at least 1, got 0" &&
        reload_yaml 2 && kill -HUP "$MASTER"
}

# stop_scenario NAME VARIANT HOW: one worker serving 100 ms requests to four clients that connect back to back
# (so connections wait in its channel) stops accepting: by itself (HOW=self, sticky_worker_stop_accepting
# after 8 connections) or on a SIGTERM from outside (HOW=term). It must drain to STICKY_ECLOSED, its
# successor must serve, no client may lose a connection, and SIGTERM to the master must still end in 0.
stop_scenario() {
    local name="$1" variant="$2" how="$3"
    local log="$work/logs/$name-$variant.log" client_log="$work/logs/$name-client-$variant.log"
    local settings=()
    [ "$how" = self ] && settings=(STOP_TEST_SELF=8)
    if ! start_cluster "$log" "${no_worker_env[@]}" "${settings[@]}" "$bin/stop_worker-$variant" master \
        "$work/stop-marker-$name-$variant"; then
        fail "$name ($variant): cluster starts" "no 'listening' line on the ready fd" "$log"
        kill -KILL "$MASTER" 2>/dev/null
        return
    fi
    timeout 120 "$bin/stop_worker-$variant" client "$PORT" >"$client_log" 2>&1 &
    local client=$!
    started+=("$client")
    if ! wait_for_line "$client_log" "^warm"; then
        fail "$name ($variant): the client reaches the worker" "no 'warm' line" "$client_log"
    elif [ "$how" = term ]; then
        kill -TERM "$(sed -n 's/^warm //p' "$client_log" | head -1)"
    fi
    wait "$client"
    local client_status=$?
    if [ "$client_status" -eq 0 ] && grep -q "drained: served [0-9]*, STICKY_ECLOSED" "$log"; then
        pass "$name ($variant): the worker drained to STICKY_ECLOSED, $(tail -1 "$client_log")"
    else
        fail "$name ($variant): a worker that stops accepting loses no connection" \
            "client exit status $client_status" "$client_log"
        sed 's/^/    | /' "$log" | tail -15
    fi
    stops_cleanly "$name" "$variant" "$log"
}

# asan_clean NAME: no AddressSanitizer/LeakSanitizer report was written by any process since the last call.
asan_clean() {
    local reports=("$work"/asan/report*)
    if [ -e "${reports[0]}" ]; then
        cat "${reports[@]}" >"$work/logs/asan-$1.log"
        fail "$1 (asan): zero ASan errors and leaks" "${#reports[@]} report(s)" "$work/logs/asan-$1.log"
        rm -f "${reports[@]}"
    else
        pass "$1 (asan): zero ASan errors and leaks in every process"
    fi
}

# The detector must be live here (a silent LeakSanitizer would make the asan runs prove nothing).
printf '#include <stdlib.h>\nint main(void) { void *volatile p = malloc(7); p = 0; return 0; }\n' >"$work/leak.c"
gcc -g -fsanitize=address -o "$bin/leak" "$work/leak.c" 2>"$work/logs/leak.log"
ASAN_OPTIONS="detect_leaks=1:log_path=$work/asan/live" "$bin/leak" 2>/dev/null
if grep -qs "LeakSanitizer: detected memory leaks" "$work"/asan/live*; then
    pass "LeakSanitizer reports a planted leak in this environment"
else
    fail "LeakSanitizer reports a planted leak in this environment" "no report" "$work/logs/leak.log"
fi
rm -f "$work"/asan/live*

no_worker_env=(env -u STICKY_CLUSTER_FD -u STICKY_CLUSTER_SOCKET -u STICKY_CLUSTER_WORKER_INDEX
    -u stickycluster_worker_index -u STICKY_CLUSTER_CONCURRENCY -u STICKY_CLUSTER_LISTEN_FD)
check "error codes: missing environment, closed channel, EAGAIN, NULLs, config, EADDRINUSE (static .a)" \
    "$work/logs/errors-static.log" timeout 60 "${no_worker_env[@]}" "$bin/errors-static"

for variant in plain asan; do
    if [ "$variant" = asan ]; then
        export ASAN_OPTIONS="detect_leaks=1:log_path=$work/asan/report:abort_on_error=0"
    fi
    check "error codes: missing environment, closed channel, EAGAIN, NULLs, config, EADDRINUSE ($variant)" \
        "$work/logs/errors-$variant.log" timeout 60 "${no_worker_env[@]}" "$bin/errors-$variant"
    [ "$variant" = asan ] && asan_clean errors

    cluster_scenario sticky_run-blocking "$variant" 4 200 400 "ok STICKY_ESHUTDOWN" \
        "${no_worker_env[@]}" "$bin/blocking_worker-$variant" 0 4
    [ "$variant" = asan ] && asan_clean sticky_run-blocking

    cluster_scenario epoll-nonblocking "$variant" 2 100 200 "ok STICKY_ESHUTDOWN" \
        "${no_worker_env[@]}" "$sticky_cluster" --port 0 --concurrency 2 --hard-shutdown-delay 10s \
        -- "$bin/epoll_worker-$variant"
    [ "$variant" = asan ] && asan_clean epoll-nonblocking

    # routing: kernel: the same worker, unchanged, accepting from its own SO_REUSEPORT listener.
    cluster_scenario epoll-kernel-routing "$variant" 2 100 0 "ok STICKY_ESHUTDOWN" \
        "${no_worker_env[@]}" "$sticky_cluster" --port 0 --concurrency 2 --hard-shutdown-delay 10s \
        --routing kernel -- "$bin/epoll_worker-$variant"
    [ "$variant" = asan ] && asan_clean epoll-kernel-routing

    cluster_scenario c-server "$variant" 3 200 400 "c-server worker .*: STICKY_ESHUTDOWN, draining" \
        "${no_worker_env[@]}" "$bin/c-server-$variant" --port 0 --concurrency 3
    [ "$variant" = asan ] && asan_clean c-server

    # SIGHUP: the embedding's own handling with sticky_cluster_reload, and sticky_run_config's.
    reload_scenario reload-handle "$variant" sighup_handle "${no_worker_env[@]}" "$bin/reload-$variant" handle 2
    [ "$variant" = asan ] && asan_clean reload-handle
    reload_yaml 1
    reload_scenario reload-file "$variant" sighup_file "${no_worker_env[@]}" "$bin/reload-$variant" file \
        "$work/reload.yaml"
    [ "$variant" = asan ] && asan_clean reload-file

    # A worker that stops accepting with connections in flight: by its own call, and on SIGTERM from outside.
    stop_scenario stop-accepting "$variant" self
    [ "$variant" = asan ] && asan_clean stop-accepting
    stop_scenario sigterm-from-outside "$variant" term
    [ "$variant" = asan ] && asan_clean sigterm-from-outside
done
unset ASAN_OPTIONS

finish
