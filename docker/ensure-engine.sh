#!/usr/bin/env bash
# Makes a Docker engine reachable on this machine, idempotently: installs docker.io with apt when the
# `docker` client is missing, starts `dockerd` in the background when no engine answers, and waits for it.
# CI runs this as root on a fresh machine; on a developer machine with a running engine it does nothing.
set -euo pipefail

log=${DOCKERD_LOG:-/tmp/dockerd.log}
wait_seconds=${DOCKERD_WAIT_SECONDS:-60}

engine_answers() { timeout 10 docker info >/dev/null 2>&1; }

# The engine (dockerd) is what matters: a machine may carry a docker client without one.
if ! command -v dockerd >/dev/null 2>&1 && ! engine_answers; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ensure-engine: dockerd is not installed and installing it needs root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # docker-buildx is optional (not in Debian bookworm): its 20.10 client has BuildKit built in.
    apt-get install -y -qq docker.io >/dev/null
    apt-get install -y -qq docker-buildx >/dev/null 2>&1 || echo "ensure-engine: no docker-buildx package; DOCKER_BUILDKIT=1 with the docker.io client builds" >&2
fi

if engine_answers; then
    echo "ensure-engine: engine already running ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-engine: no engine answers and starting dockerd needs root" >&2
    exit 1
fi

if ! pgrep -x dockerd >/dev/null 2>&1; then
    # setsid: dockerd must outlive this script and the shell that called it.
    setsid dockerd >"$log" 2>&1 < /dev/null &
fi

for _ in $(seq "$wait_seconds"); do
    if engine_answers; then
        echo "ensure-engine: engine started ($(docker version --format '{{.Server.Version}}' 2>/dev/null)); log in $log"
        exit 0
    fi
    sleep 1
done
echo "ensure-engine: dockerd did not answer within ${wait_seconds}s; last lines of $log:" >&2
tail -n 20 "$log" >&2 || true
exit 1
