#!/usr/bin/env bash
# Installs the proxies the handoff and stream benchmarks compare against (rows (f) nginx ip_hash and (g) HAProxy
# balance source) from Debian's packages when they are missing. Only the binaries are used: the benchmark writes
# its own configuration into a temporary directory and never starts the packaged services.
# Exit status 1 when a proxy is still missing afterwards (the caller decides whether that fails the run).
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
command -v nginx >/dev/null || missing+=(nginx)
command -v haproxy >/dev/null || missing+=(haproxy)
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "ensure-proxies: ${missing[*]} missing and cannot be installed here (needs root and apt-get)" >&2
    exit 1
fi
echo "ensure-proxies: installing ${missing[*]} with apt-get" >&2
# policy-rc.d 101: the packages' post-install scripts must not start (and keep running) the packaged services.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
fi
status=0
{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } >&2 || status=$?
if [ "$made_policy" -eq 1 ]; then rm -f "$policy"; fi
if [ "$status" -ne 0 ]; then
    echo "ensure-proxies: apt-get install ${missing[*]} failed (exit $status)" >&2
    exit 1
fi
for program in nginx haproxy; do
    if ! command -v "$program" >/dev/null; then
        echo "ensure-proxies: $program still missing after apt-get install" >&2
        exit 1
    fi
done
