#!/usr/bin/env python3
"""Master CPU and the latency of other clients while N connections from a trusted proxy sit on a partial
PROXY header (the issue 10 scenario: slow or stalled headers must not stall routing for everyone).

    python3 slow_headers.py BINARY WORKER [N] [--no-trust] [--log-port]

BINARY is a sticky-cluster binary, WORKER the test worker (target/debug/examples/test-worker).
--no-trust leaves out trustedProxies/headerWait, for binaries from before those keys existed.
--log-port reads the port from the "listening on" log line, for binaries from before the ready fd
(otherwise the port comes from the master's `listening` line on STICKY_CLUSTER_READY_FD).
Raise `ulimit -n` above 2 N first."""
import json
import os
import re
import select
import socket
import subprocess
import sys
import tempfile
import time

args = [a for a in sys.argv[1:] if not a.startswith("--")]
binary, worker = args[0], args[1]
count = int(args[2]) if len(args) > 2 else 1000
trust = "" if "--no-trust" in sys.argv else "trustedProxies: [127.0.0.1]\nheaderWait:\n  limit: 4096\n"
config = os.path.join(tempfile.mkdtemp(), "cluster.yaml")
with open(config, "w") as f:
    f.write(f"port: 0\nconcurrency: 2\nclientAddress: proxy-protocol\n{trust}worker:\n  command: [{worker!r}]\n")
ready_read, ready_write = os.pipe()
master = subprocess.Popen([binary, "--config", config], stderr=subprocess.PIPE, text=True, pass_fds=(ready_write,),
                          env=dict(os.environ, STICKY_CLUSTER_READY_FD=str(ready_write)))
os.close(ready_write)


def ready_port():
    """The port of the master's `listening` line (format version 1), waiting at most 30 s."""
    with open(ready_read, encoding="utf-8") as ready:
        while select.select([ready], [], [], 30)[0]:
            line = ready.readline()
            if not line:
                break
            event = json.loads(line)
            if event.get("version") == 1 and event.get("event") == "listening":
                return event["port"]
    raise SystemExit(f"{binary}: no listening line on the ready fd (exit {master.poll()}); try --log-port")


def log_port():
    for line in master.stderr:
        found = re.search(r"listening on .*:(\d+) with", line)
        if found:
            return int(found.group(1))
    raise SystemExit(f"{binary}: no listening line in its log")


port = log_port() if "--log-port" in sys.argv else ready_port()


def cpu_ticks():
    fields = open(f"/proc/{master.pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def plain_request():
    """A client that is not a proxy (127.0.0.2): routed by its own address."""
    client = socket.socket()
    client.bind(("127.0.0.2", 0))
    client.connect(("127.0.0.1", port))
    client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    while client.recv(4096):
        pass
    client.close()


try:
    # Served once its worker is ready (the connection waits in the master until then).
    plain_request()
    stalled = []
    for _ in range(count):
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(b"PROXY TCP4 1.2.")
        stalled.append(connection)
    time.sleep(0.3)
    start, ticks = time.time(), cpu_ticks()
    latencies = []
    while time.time() - start < 3:
        begun = time.time()
        plain_request()
        latencies.append(time.time() - begun)
        time.sleep(0.01)
    elapsed, used = time.time() - start, cpu_ticks() - ticks
    latencies.sort()
    print(
        f"{binary}: {count} stalled headers; master CPU {100 * used / os.sysconf('SC_CLK_TCK') / elapsed:.1f}% of a "
        f"core over {elapsed:.1f} s; plain requests meanwhile: median {1000 * latencies[len(latencies) // 2]:.1f} ms, "
        f"p90 {1000 * latencies[int(len(latencies) * 0.9)]:.1f} ms ({len(latencies)} requests)"
    )
finally:
    master.kill()
    master.wait()
