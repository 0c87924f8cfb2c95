# Sourced by docker/run-tests.sh: upgrading the master in place inside a running container, the way
# docker/README.md says: the master runs from a binary on a mounted volume, the new release is renamed
# over it on the host, and `docker kill -s USR2` re-executes it, under steady new connections from
# rotating addresses (docker/upgrade_load.py) and with two attached hello-workers on the host.
# Uses run-tests.sh's pass/fail, run_with_ready/read_ready/ready_field/routed_total, wait_attached,
# worker_process_pid, $tag, $tmp, $hello_worker, $containers, $worker_pids and $worker_children.

mounted_binary_upgrades_in_place_inside_the_container() {
    local name="mounted_binary_upgrades_in_place_inside_the_container"
    local bin_dir="$tmp/upgrade-bin" socket_dir="$tmp/upgrade-socket" stop_file="$tmp/upgrade-stop"
    local container="sticky-cluster-upgrade-$$" index port old_build new_build master_pid load_pid load_status
    local load_output after_output exit_code served routed problems=() user_args=() pids=() pid_args=()
    mkdir -p "$bin_dir" "$socket_dir"
    cp "$repo/target/x86_64-unknown-linux-gnu/release/sticky-cluster" "$bin_dir/sticky-cluster"
    chmod 755 "$bin_dir" "$bin_dir/sticky-cluster"
    if [ "$(id -u)" -eq 0 ]; then
        chown 65532:65532 "$socket_dir"
    else
        user_args=(--user "$(id -u):$(id -g)")
    fi
    printf 'port: 0\nconcurrency: 2\ndebug: true\nhardShutdownDelay: 10s\nworkers:\n  socket: /run/sticky-cluster/workers.sock\n' \
        >"$tmp/upgrade.yaml"
    chmod 644 "$tmp/upgrade.yaml"
    if ! run_with_ready "$container" --network host "${user_args[@]}" -v "$socket_dir:/run/sticky-cluster" \
        -v "$bin_dir:/opt/sticky-cluster:ro" -v "$tmp/upgrade.yaml:/etc/sticky-cluster/sticky-cluster.yaml:ro" \
        --entrypoint /opt/sticky-cluster/sticky-cluster "$tag" --config /etc/sticky-cluster/sticky-cluster.yaml; then
        fail "$name" "$LINE"
        return
    fi
    port=$(ready_field "$LINE" port)
    old_build=$(ready_field "$LINE" build)
    for index in 0 1; do
        STICKY_CLUSTER_SOCKET="$socket_dir/workers.sock" STICKY_CLUSTER_WORKER_INDEX=$index \
            timeout 300 "$hello_worker" >"$tmp/upgrade-worker-$index.log" 2>&1 &
        worker_pids+=($!)
        pids+=("$(worker_process_pid "$!")")
        pid_args+=("$index=${pids[$index]}")
        worker_children+=("${pids[$index]}")
    done
    if ! wait_attached "$container" 2; then
        fail "$name" "the 2 workers did not attach within 10 s:" "$(docker logs "$container" 2>&1 | tail -n 10)"
        return
    fi
    master_pid=$(docker inspect -f '{{.State.Pid}}' "$container")
    rm -f "$stop_file"
    python3 "$here/upgrade_load.py" "$port" 2 "$stop_file" >"$tmp/upgrade-load.out" 2>&1 &
    load_pid=$!
    sleep 1
    # The new release, renamed over the old file on the host (one byte longer: another build id).
    cp "$bin_dir/sticky-cluster" "$bin_dir/.next" && printf '\0' >>"$bin_dir/.next" && chmod 755 "$bin_dir/.next" &&
        mv "$bin_dir/.next" "$bin_dir/sticky-cluster"
    docker kill -s USR2 "$container" >/dev/null
    if ! read_ready upgraded 30; then
        problems+=("no upgraded line within 30 s")
    else
        new_build=$(ready_field "$LINE" build)
        [ "$new_build" != "$old_build" ] || problems+=("the upgraded line names the old build $old_build")
    fi
    sleep 1
    touch "$stop_file"
    wait "$load_pid"
    load_status=$?
    load_output=$(cat "$tmp/upgrade-load.out")
    [ "$load_status" -eq 0 ] || problems+=("new connections during the upgrade: $load_output")
    [ "$(docker inspect -f '{{.State.Pid}}' "$container")" = "$master_pid" ] ||
        problems+=("the master's pid changed: it was $master_pid")
    for index in 0 1; do
        kill -0 "${pids[$index]}" 2>/dev/null || problems+=("worker $index (pid ${pids[$index]}) is gone")
    done
    after_output=$(timeout 60 python3 "$here/check_sticky.py" "$port" 2 100 1 "${pid_args[@]}") ||
        problems+=("after the upgrade: $after_output")
    docker stop -t 30 "$container" >/dev/null
    exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$container")
    [ "$exit_code" = 0 ] || problems+=("container exit code $exit_code after docker stop, expected 0")
    served=$(sed -n 's/^served \([0-9]*\) .*/\1/p' <<<"$load_output")
    if ! read_ready stopped 15; then
        problems+=("no stopped line on the ready fd")
    else
        routed=$(routed_total "$LINE")
        [ "$(ready_field "$LINE" graceful)" = true ] || problems+=("the stopped line says not graceful: $LINE")
        # The counters went on across the exec: every request of the load and of the check, routed once.
        [ "$routed" = $((${served:-0} + 100)) ] ||
            problems+=("the stopped line says $routed routed; the clients were served ${served:-?} + 100: $LINE")
    fi
    exec {ready}<&-
    ready=
    for index in 0 1; do
        wait "${worker_pids[$index]}" || problems+=("worker $index exited with $?: $(tail -n 2 "$tmp/upgrade-worker-$index.log")")
    done
    worker_pids=()
    worker_children=()
    if [ ${#problems[@]} -eq 0 ]; then
        pass "$name (SIGUSR2 to the container: build ${old_build//\"/} -> ${new_build//\"/}, master pid $master_pid and both workers kept; during it $load_output ms; after it $after_output; docker stop: exit 0, $routed routed in all)"
    else
        fail "$name" "${problems[@]}" "container logs:" "$(docker logs "$container" 2>&1 | grep -v 'debug connection' | tail -n 12)"
    fi
}
