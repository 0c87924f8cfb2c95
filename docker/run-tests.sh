#!/usr/bin/env bash
# Real-Docker tests of the sticky-cluster image: build docker/Dockerfile (host-built static binary, no
# image pull), run the container as an attach-mode sidecar with 4 hello-workers on the host, route 200
# loopback client addresses, stop it gracefully, and check that a bad YAML ends it with one error line;
# then examples/python-socketio's image (uvicorn spawned by the master in the app's container) with real
# python-socketio clients, a kill -9 and docker stop (docker/python-app-test.sh); and an upgrade in place
# of a master running from a mounted binary (docker/upgrade-test.sh).
# Skips (exit 0, 'SKIP: no docker engine: ...') only when no Docker engine answers and CI is not set;
# under CI=true a missing engine is a failure. Any failure exits 1.
# Usage: bash docker/run-tests.sh        (docker/ensure-engine.sh installs and starts an engine, as root)
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
tests_total=6
passed=0
failed=0
skipped=0

pass() { echo "PASS: $1"; passed=$((passed + 1)); }
fail() {
    echo "FAIL: $1"
    shift
    local line
    for line in "$@"; do printf '    %s\n' "$line"; done
    failed=$((failed + 1))
}
summary() {
    if [ "$skipped" -gt 0 ]; then
        echo "$passed passed, $failed failed, $skipped skipped"
    else
        echo "$passed passed, $failed failed"
    fi
}
finish() {
    summary
    [ "$failed" -eq 0 ]
    exit $?
}

# ---- engine ------------------------------------------------------------------------------------
# Outside CI the suite may skip; in CI the engine is part of what is tested.
no_engine() {
    if [ "${CI:-}" = "true" ]; then
        failed=$tests_total
    else
        skipped=$tests_total
    fi
    finish
}
if ! command -v docker >/dev/null 2>&1; then
    echo "SKIP: no docker engine: the docker client is not installed (run docker/ensure-engine.sh as root)"
    no_engine
fi
if ! engine_error=$(timeout 20 docker info 2>&1 >/dev/null); then
    echo "SKIP: no docker engine: $(grep -v '^\s*$' <<<"$engine_error" | tail -n 1)"
    no_engine
fi

# ---- cleanup (also on failure or interrupt) ----------------------------------------------------
tag="sticky-cluster-test:$$"
worker_tag="sticky-cluster-test-worker:$$"
# test 5 (an upgrade in place inside the container), test 6 and its image tags (python_tag, python_app_tag)
# shellcheck source=docker/upgrade-test.sh
source "$here/upgrade-test.sh"
# shellcheck source=docker/python-app-test.sh
source "$here/python-app-test.sh"
failure_log="/tmp/sticky-cluster-docker-failure-$$.log"
tmp=$(mktemp -d /tmp/sticky-cluster-docker.XXXXXX)
chmod 755 "$tmp"   # workers running as another uid reach the socket through it
containers=()
worker_pids=()   # the `timeout` wrappers
worker_children=()   # the hello-workers themselves
cleanup() {
    local pid name
    for pid in "${worker_children[@]}" "${worker_pids[@]}" ${ready_follower:-}; do kill -KILL "$pid" 2>/dev/null; done
    for name in "${containers[@]}"; do docker rm -f "$name" >/dev/null 2>&1; done
    docker rmi -f "$python_app_tag" "$python_tag" "$tag" "$worker_tag" >/dev/null 2>&1
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- build: the static binary on the host, hello-worker, then the real Dockerfile --------------
echo "building the static sticky-cluster and hello-worker binaries ..."
if ! (cd "$repo" &&
    RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release \
        --target x86_64-unknown-linux-gnu --target-dir "$repo/target" \
        -p sticky-cluster -p sticky-cluster-examples --bin sticky-cluster --bin hello-worker); then
    fail "cargo build" "the static binaries did not build"
    finish
fi
hello_worker="$repo/target/x86_64-unknown-linux-gnu/release/hello-worker"

# BuildKit builds only the stages the selected one needs, so the Rust image of the source stage is
# never pulled. Clients from Docker 23 on need the buildx plugin for it; older clients (Debian's
# docker.io 20.10) have BuildKit built in. Pick the first client that can.
build_client=""
for candidate in $(type -ap docker | awk '!seen[$0]++'); do
    if "$candidate" buildx version >/dev/null 2>&1; then
        build_client=$candidate
        break
    fi
    major=$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
    if [ -n "$major" ] && [ "$major" -lt 23 ] 2>/dev/null; then
        build_client=$candidate
        break
    fi
done
if [ -z "$build_client" ]; then
    fail "docker build" "no docker client with BuildKit: install docker-buildx or Debian's docker.io client"
    finish
fi
echo "building the image with $build_client (BuildKit, --build-arg BINARY=host) ..."
if ! build_log=$(cd "$repo" && DOCKER_BUILDKIT=1 timeout 600 "$build_client" build --progress=plain \
    -f docker/Dockerfile --build-arg BINARY=host -t "$tag" . 2>&1); then
    fail "docker build" "$(printf '%s\n' "$build_log" | tail -n 15)"
    finish
fi
if grep -q 'binary-source' <<<"$build_log"; then
    fail "docker build" "the build ran the unused from-source stage (it would pull the Rust image)"
fi
# The demo worker image (same Dockerfile, `hello-worker` stage) for a worker in a second container.
if ! build_log=$(cd "$repo" && DOCKER_BUILDKIT=1 timeout 600 "$build_client" build --progress=plain \
    -f docker/Dockerfile --build-arg BINARY=host --target hello-worker -t "$worker_tag" . 2>&1); then
    fail "docker build --target hello-worker" "$(printf '%s\n' "$build_log" | tail -n 15)"
    finish
fi

# ---- test 1: the image itself --------------------------------------------------------------------
image_is_small_nonroot_with_a_valid_default_config() {
    local name="image_is_small_nonroot_with_a_valid_default_config"
    local user ports entrypoint size checked
    user=$(docker image inspect -f '{{.Config.User}}' "$tag")
    ports=$(docker image inspect -f '{{range $p, $_ := .Config.ExposedPorts}}{{$p}} {{end}}' "$tag")
    entrypoint=$(docker image inspect -f '{{join .Config.Entrypoint " "}}' "$tag")
    size=$(docker image inspect -f '{{.Size}}' "$tag")
    if ! checked=$(timeout 30 docker run --rm "$tag" --config /etc/sticky-cluster/sticky-cluster.yaml --check 2>&1); then
        fail "$name" "the default config does not pass --check:" "$checked"
    elif [ "$user" != "65532:65532" ]; then
        fail "$name" "image user is '$user', expected 65532:65532"
    elif [ "$ports" != "8080/tcp " ]; then
        fail "$name" "exposed ports are '$ports', expected 8080/tcp"
    elif [ "$entrypoint" != "/usr/local/bin/sticky-cluster" ]; then
        fail "$name" "entrypoint is '$entrypoint'"
    elif [ "$size" -gt $((20 * 1024 * 1024)) ]; then
        fail "$name" "image is $size bytes, more than 20 MiB"
    elif ! grep -q 'socket: "/run/sticky-cluster/workers.sock"' <<<"$checked"; then
        fail "$name" "the default config is not attach mode on /run/sticky-cluster/workers.sock:" "$checked"
    else
        pass "$name ($((size / 1024)) KiB, user $user, EXPOSE $ports)"
    fi
}

# ---- test 2: a bad YAML ends the container with one error line ---------------------------------
# Each case: file content, then a pattern the single `error:` line must match.
bad_yaml_exits_nonzero_with_one_error_line() {
    local name="bad_yaml_exits_nonzero_with_one_error_line"
    local problems=() case_index=0 container status logs lines
    local -a yamls=(
        $'port: 8080\nconcurrency: 4\nhardShutdownDelay: soon\nworkers:\n  socket: /run/sticky-cluster/workers.sock\n'
        $'port: 8080\nconcurency: 4\nworkers:\n  socket: /run/sticky-cluster/workers.sock\n'
    )
    local -a patterns=(
        '^error: /etc/sticky-cluster/sticky-cluster\.yaml:3: hardShutdownDelay: .*soon'
        '^error: /etc/sticky-cluster/sticky-cluster\.yaml:2: .*concurency'
    )
    for case_index in "${!yamls[@]}"; do
        container="sticky-cluster-bad-$$-$case_index"
        containers+=("$container")
        printf '%s' "${yamls[$case_index]}" >"$tmp/bad-$case_index.yaml"
        chmod 644 "$tmp/bad-$case_index.yaml"
        timeout 60 docker run --name "$container" \
            -v "$tmp/bad-$case_index.yaml:/etc/sticky-cluster/sticky-cluster.yaml:ro" "$tag" >/dev/null 2>&1
        status=$(docker inspect -f '{{.State.ExitCode}}' "$container" 2>/dev/null)
        logs=$(docker logs "$container" 2>&1)
        lines=$(printf '%s\n' "$logs" | grep -c .)
        if [ "$status" = "0" ] || [ -z "$status" ]; then
            problems+=("case $case_index: exit code '$status', expected non-zero")
        elif [ "$lines" -ne 1 ]; then
            problems+=("case $case_index: docker logs has $lines lines, expected one:" "$logs")
        elif ! grep -Eq "${patterns[$case_index]}" <<<"$logs"; then
            problems+=("case $case_index: '$logs' does not match '${patterns[$case_index]}'")
        fi
        if [ "$case_index" -eq 0 ]; then echo "    (exit $status) $logs"; fi
    done
    if [ ${#problems[@]} -eq 0 ]; then pass "$name"; else fail "$name" "${problems[@]}"; fi
}

# ---- tests 3 and 4: attach-mode sidecar, sticky routing, graceful docker stop --------------------
# The sidecar writes its ready lines (STICKY_CLUSTER_READY_FD=1) on the container's stdout and logs on its
# stderr: `docker logs --follow` of stdout alone is the ready fd here, read as fd $ready.

# ready_field LINE KEY: the value of KEY in a ready line (a number, true/false, or a "string" without
# escapes, as the format's fields are), or nothing.
ready_field() {
    local pattern="\"$2\":(\"[^\"]*\"|[^,}]*)"
    [[ $1 =~ $pattern ]] && echo "${BASH_REMATCH[1]}"
}

# routed_total LINE: the sum of a ready line's "routed" list (connections per worker).
routed_total() {
    local routed total=0 count
    [[ $1 =~ \"routed\":\[([0-9,]*)\] ]] && routed="${BASH_REMATCH[1]}"
    for count in ${routed//,/ }; do total=$((total + count)); done
    echo "$total"
}

# wait_attached CONTAINER COUNT: waits up to 10 s until the master in CONTAINER logged COUNT workers ready
# (its `debug: true` log); the status says whether it did.
wait_attached() {
    for _ in $(seq 100); do
        [ "$(docker logs "$1" 2>&1 | grep -c 'is ready')" -ge "$2" ] && return 0
        sleep 0.1
    done
    return 1
}

# read_ready EVENT SECONDS: reads ready lines until a version 1 line of EVENT, left in LINE; fails at the end
# of the stream or after SECONDS.
read_ready() {
    local deadline=$((SECONDS + $2))
    while [ "$SECONDS" -lt "$deadline" ] && IFS= read -r -t "$((deadline - SECONDS))" -u "$ready" LINE; do
        [ "$(ready_field "$LINE" version)" = 1 ] && [ "$(ready_field "$LINE" event)" = "\"$1\"" ] && return 0
    done
    LINE=""
    return 1
}

# run_with_ready NAME DOCKER-RUN-ARGUMENTS...: `docker run -d` of a master that writes its ready lines on
# the container's stdout (STICKY_CLUSTER_READY_FD=1), followed as fd $ready, and waits for its listening
# line, left in LINE. On failure LINE says why, with the container's last log lines, and the status is 1.
run_with_ready() {
    local container=$1
    shift
    containers+=("$container")
    if ! docker run -d --name "$container" -e STICKY_CLUSTER_READY_FD=1 "$@" >/dev/null; then
        LINE="docker run failed"
        return 1
    fi
    exec {ready}< <(exec docker logs --follow "$container" 2>/dev/null)
    ready_follower=$!
    if ! read_ready listening 30; then
        LINE="no listening line on the ready fd; container logs: $(docker logs "$container" 2>&1 | tail -n 10)"
        return 1
    fi
}

sidecar=""
worker_container=""
sidecar_port=""
ready=""
ready_follower=""
hard_delay_seconds=10
attached_workers_route_200_addresses_stickily() {
    local name="attached_workers_route_200_addresses_stickily"
    local socket_dir="$tmp/socket" index pid_args=() check_output
    sidecar="sticky-cluster-sidecar-$$"
    mkdir -p "$socket_dir"
    # The image runs as uid 65532: the bind-mounted socket directory must be writable by it.
    if [ "$(id -u)" -eq 0 ]; then
        chown 65532:65532 "$socket_dir"
        user_args=()
    else
        user_args=(--user "$(id -u):$(id -g)")
    fi
    cat >"$tmp/cluster.yaml" <<EOF
port: 0
host: "::"
concurrency: 4
debug: true
hardShutdownDelay: ${hard_delay_seconds}s
workers:
  socket: /run/sticky-cluster/workers.sock
  mode: "0660"
  allowUids: [1000]
EOF
    chmod 644 "$tmp/cluster.yaml"
    # Host networking: clients bound to 127.0.x.y reach the master with their own source address. The
    # master listens (its attach socket bound before that) or says why not; the port is the kernel's pick.
    if ! run_with_ready "$sidecar" --network host "${user_args[@]}" -v "$socket_dir:/run/sticky-cluster" \
        -v "$tmp/cluster.yaml:/etc/sticky-cluster/sticky-cluster.yaml:ro" "$tag"; then
        fail "$name" "$LINE"
        return
    fi
    sidecar_port=$(ready_field "$LINE" port)
    if [ "$(ready_field "$LINE" attach_socket)" != '"/run/sticky-cluster/workers.sock"' ] ||
        ! [ -S "$socket_dir/workers.sock" ]; then
        fail "$name" "the listening line names no attach socket, or it is missing: $LINE"
        return
    fi
    # Workers 0 and 1 run on the host as root (always allowed); worker 2 on the host as uid 1000
    # (allowed by allowUids) in the socket's group, like an app with its own user; worker 3 in a
    # second container (the Dockerfile's hello-worker stage, uid 65532 like the master) sharing the
    # sidecar's network namespace and the socket volume, so connection fds cross containers.
    for index in 0 1 2; do
        if [ "$index" -lt 2 ] || [ "$(id -u)" -ne 0 ]; then
            STICKY_CLUSTER_SOCKET="$socket_dir/workers.sock" STICKY_CLUSTER_WORKER_INDEX=$index \
                timeout 300 "$hello_worker" >"$tmp/worker-$index.log" 2>&1 &
        else
            STICKY_CLUSTER_SOCKET="$socket_dir/workers.sock" STICKY_CLUSTER_WORKER_INDEX=$index \
                timeout 300 setpriv --reuid 1000 --regid 65532 --clear-groups \
                "$hello_worker" >"$tmp/worker-$index.log" 2>&1 &
        fi
        worker_pids+=($!)
    done
    worker_container="sticky-cluster-worker-$$"
    containers+=("$worker_container")
    if ! docker run -d --name "$worker_container" --network "container:$sidecar" "${user_args[@]}" \
        -e STICKY_CLUSTER_WORKER_INDEX=3 -v "$socket_dir:/run/sticky-cluster" "$worker_tag" >/dev/null; then
        fail "$name" "docker run of the worker container failed"
        return
    fi
    # Clients start once all 4 workers said ready (the master logs it with `debug: true`), so this
    # test is about routing, not about the start-up queue (which core's own tests cover).
    if ! wait_attached "$sidecar" 4; then
        fail "$name" "not all 4 workers attached within 10 s; master log:" "$(docker logs "$sidecar" 2>&1 | tail -n 10)" \
            "worker logs:" "$(tail -n 3 "$tmp"/worker-*.log)" "$(docker logs "$worker_container" 2>&1 | tail -n 3)"
        return
    fi
    # The answers carry the worker's pid: find each host worker's process (under timeout/setpriv).
    for index in 0 1 2; do
        worker_children+=("$(worker_process_pid "${worker_pids[$index]}")")
        pid_args+=("$index=${worker_children[$index]}")
    done
    if check_output=$(timeout 120 python3 "$here/check_sticky.py" "$sidecar_port" 4 200 2 "${pid_args[@]}"); then
        pass "$name: $check_output"
    else
        # The full master log outlives the temp dir, for a look at every routed connection.
        docker logs "$sidecar" >"$failure_log" 2>&1
        fail "$name" "$check_output" "master log (without routed connections; all in $failure_log):" \
            "$(grep -v 'debug connection' "$failure_log" | tail -n 20)" \
            "worker logs:" "$(tail -n 3 "$tmp"/worker-*.log)" "$(docker logs "$worker_container" 2>&1 | tail -n 3)"
    fi
}

# `timeout` execs nothing: the hello-worker is its child (setpriv execs in place).
worker_process_pid() {
    local child
    for _ in $(seq 50); do
        child=$(pgrep -P "$1" | head -n 1)
        if [ -n "$child" ]; then
            echo "$child"
            return
        fi
        sleep 0.1
    done
    echo 0
}

docker_stop_shuts_the_cluster_down_gracefully() {
    local name="docker_stop_shuts_the_cluster_down_gracefully"
    local started elapsed_ms exit_code problems=() index pid status
    if [ -z "$sidecar" ] || [ "$(docker inspect -f '{{.State.Running}}' "$sidecar" 2>/dev/null)" != "true" ]; then
        fail "$name" "the sidecar is not running (see the previous test)"
        return
    fi
    started=$(date +%s%N)
    # A stop timeout longer than hardShutdownDelay: the master must end on its own, not by SIGKILL.
    docker stop -t $((hard_delay_seconds * 3)) "$sidecar" >/dev/null
    elapsed_ms=$((($(date +%s%N) - started) / 1000000))
    exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$sidecar")
    [ "$exit_code" = "0" ] || problems+=("container exit code $exit_code, expected 0")
    [ "$elapsed_ms" -lt $((hard_delay_seconds * 1000)) ] ||
        problems+=("docker stop took $elapsed_ms ms, hardShutdownDelay is ${hard_delay_seconds}s")
    for index in "${!worker_pids[@]}"; do
        pid=${worker_pids[$index]}
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            problems+=("worker $index still runs 10 s after the stop")
        else
            wait "$pid"
            status=$?
            [ "$status" -eq 0 ] || problems+=("worker $index exited with $status: $(tail -n 2 "$tmp/worker-$index.log")")
        fi
    done
    worker_pids=()
    worker_children=()
    if [ -n "$worker_container" ]; then
        status=$(timeout 15 docker wait "$worker_container" 2>/dev/null)
        [ "$status" = "0" ] || problems+=("worker 3 (container) exit code '$status': $(docker logs "$worker_container" 2>&1 | tail -n 2)")
    fi
    [ -e "$tmp/socket/workers.sock" ] && problems+=("the master left its socket behind")
    # The ready fd's last line: graceful, and every one of the 400 requests routed once by the master.
    if ! read_ready stopped 15; then
        problems+=("no stopped line on the ready fd")
    else
        local total
        total=$(routed_total "$LINE")
        [ "$(ready_field "$LINE" graceful)" = true ] || problems+=("the stopped line says not graceful: $LINE")
        [ "$total" -eq 400 ] || problems+=("the stopped line says $total connections routed, the client made 400: $LINE")
    fi
    exec {ready}<&-
    ready=
    if [ ${#problems[@]} -eq 0 ]; then
        pass "$name (exit 0 after $elapsed_ms ms; 3 host workers and the worker container exited 0; the stopped line: graceful, 400 routed)"
    else
        fail "$name" "${problems[@]}" "container logs:" "$(docker logs "$sidecar" 2>&1 | tail -n 10)"
    fi
}

image_is_small_nonroot_with_a_valid_default_config
bad_yaml_exits_nonzero_with_one_error_line
attached_workers_route_200_addresses_stickily
docker_stop_shuts_the_cluster_down_gracefully
mounted_binary_upgrades_in_place_inside_the_container
python_app_in_its_own_image_is_sticky_revived_and_stops_cleanly
finish
