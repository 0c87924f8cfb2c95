# Sourced by docker/run-tests.sh: an unmodified Python server in the app's own image. The image is
# examples/python-socketio/Dockerfile as a user builds it, on a Python image made from this machine's
# Python (docker/python_base.py; no registry is reachable here) and the sticky-cluster image the suite
# built. The container has no network but its own loopback: the real python-socketio clients run in its
# network namespace (nsenter), each from its own address, so the kernel routes them as it would real ones.
# Uses run-tests.sh's pass/fail, run_with_ready/read_ready/ready_field, $tag, $build_client, $tmp and $containers.

python_tag="sticky-cluster-test-python:$$"
python_app_tag="sticky-cluster-test-python-app:$$"

# container_pid_on_host CONTAINER PID: the host's pid of the container's process PID (NSpid's last field).
container_pid_on_host() {
    local host nspid
    for host in $(docker top "$1" -eo pid | tail -n +2); do
        nspid=$(awk '/^NSpid:/ { print $NF }' "/proc/$host/status" 2>/dev/null)
        if [ "$nspid" = "$2" ]; then
            echo "$host"
            return
        fi
    done
}

# pid_of ROUND INDEX: worker INDEX's pid on a check round's `pids 0=12 1=13` line.
pid_of() {
    sed -n "s/^pids .*\b$2=\([0-9]*\).*/\1/p" <<<"$1"
}

python_app_in_its_own_image_is_sticky_revived_and_stops_cleanly() {
    local name="python_app_in_its_own_image_is_sticky_revived_and_stops_cleanly"
    local app_dir="$repo/examples/python-socketio" missing output prefix_bin container pid first second
    local victim host_victim exit_code problems=()
    missing=$(python3 -c '
import importlib.util
print(" ".join(m for m in ("socketio", "engineio", "aiohttp", "uvicorn", "wsproto") if importlib.util.find_spec(m) is None))')
    if [ -n "$missing" ]; then
        if [ "${CI:-}" = "true" ]; then
            fail "$name" "python modules missing: $missing (.ci/run installs them)"
        else
            echo "SKIP: $name: python modules missing: $missing (pip install -r $app_dir/requirements.txt)"
            skipped=$((skipped + 1))
        fi
        return
    fi
    if ! output=$(python3 "$here/python_base.py" "$app_dir/requirements.txt" "$tmp/python-base.tar" 2>&1); then
        fail "$name" "the Python base image's files: $output"
        return
    fi
    prefix_bin=$(tail -n 1 <<<"$output")
    if ! output=$(docker import --change "ENV PATH=$prefix_bin:/usr/local/bin:/usr/bin:/bin" \
        "$tmp/python-base.tar" "$python_tag" 2>&1); then
        fail "$name" "docker import of the Python base: $output"
        return
    fi
    rm -f "$tmp/python-base.tar"
    # --network none: pip finds every requirement installed, as in a base image with them, and must not
    # try to fetch anything.
    if ! output=$(DOCKER_BUILDKIT=1 timeout 600 "$build_client" build --progress=plain --network none \
        --build-arg PYTHON_IMAGE="$python_tag" --build-arg STICKY_CLUSTER_IMAGE="$tag" \
        -t "$python_app_tag" "$app_dir" 2>&1); then
        fail "$name" "docker build of examples/python-socketio/Dockerfile:" "$(tail -n 15 <<<"$output")"
        return
    fi
    container="sticky-cluster-python-$$"
    if ! run_with_ready "$container" --network none "$python_app_tag"; then
        fail "$name" "$LINE"
        return
    fi
    [ "$(ready_field "$LINE" routing)" = '"kernel"' ] && [ "$(ready_field "$LINE" port)" = 8080 ] ||
        problems+=("the listening line is not port 8080 with kernel routing: $LINE")
    pid=$(docker inspect -f '{{.State.Pid}}' "$container")
    if ! first=$(timeout 240 nsenter --target "$pid" --net python3 "$here/check_python_app.py" 8080 9090 2 100 0 2>&1); then
        fail "$name" "before the kill: $first" "container logs:" "$(docker logs "$container" 2>&1 | grep -v ' HTTP/1.1" ' | tail -n 10)"
        return
    fi
    # kill -9 of worker 0's uvicorn, from the host: the master revives it under index 0.
    victim=$(pid_of "$first" 0)
    host_victim=$(container_pid_on_host "$container" "$victim")
    if [ -z "$host_victim" ]; then
        fail "$name" "worker 0 (pid $victim in the container) not found among its processes: $first"
        return
    fi
    kill -KILL "$host_victim"
    if ! second=$(timeout 240 nsenter --target "$pid" --net python3 "$here/check_python_app.py" 8080 9090 2 100 200 2>&1); then
        fail "$name" "after the kill -9 of worker 0: $second" "container logs:" \
            "$(docker logs "$container" 2>&1 | grep -v ' HTTP/1.1" ' | tail -n 10)"
        return
    fi
    [ "$(pid_of "$second" 0)" != "$victim" ] || problems+=("index 0 still answered by the killed pid $victim: $second")
    [ "$(pid_of "$second" 1)" = "$(pid_of "$first" 1)" ] || problems+=("worker 1 changed: $first / $second")
    # docker stop: SIGTERM to the master, which stops both uvicorns and exits 0.
    docker stop -t 30 "$container" >/dev/null
    exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$container")
    [ "$exit_code" = 0 ] || problems+=("container exit code $exit_code after docker stop, expected 0")
    if ! read_ready stopped 15; then
        problems+=("no stopped line on the ready fd")
    elif [ "$(ready_field "$LINE" graceful)" != true ]; then
        problems+=("the stopped line says not graceful: $LINE")
    fi
    exec {ready}<&-
    ready=
    if [ ${#problems[@]} -eq 0 ]; then
        pass "$name (uvicorn on a Python image, no network: $(sed -n 's/^ok //p' <<<"$first"); kill -9 of worker 0 (pid $victim), revived as pid $(pid_of "$second" 0): $(sed -n 's/^ok //p' <<<"$second"); docker stop: exit 0, graceful)"
    else
        fail "$name" "${problems[@]}" "container logs:" "$(docker logs "$container" 2>&1 | grep -v ' HTTP/1.1" ' | tail -n 10)"
    fi
}
