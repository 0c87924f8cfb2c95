"""Benchmark row: the same python-socketio app (examples/python-socketio/app.py) under
`uvicorn --workers N` directly, and as N uvicorn processes behind sticky-cluster's kernel routing
(`--routing kernel --protocol none`, the README's one-liner).

Two loads per setup, from distinct loopback addresses, run one after the other in the same process:
- requests: engine.io handshakes (`GET /socket.io/?EIO=4&transport=polling`, one new TCP connection
  each, no session needed), `--clients` at once for `--seconds`: requests/s and latency percentiles, i.e.
  what the routing costs when stickiness does not matter;
- sessions: `--sessions` socket.io sessions over long-polling (handshake, connect, 4 calls, each request on
  a new TCP connection): how many complete, and sessions/s, i.e. what stickiness is for.

The load generator is Python (aiohttp) on the same 2-core machine as the servers, so absolute numbers say
as much about it as about them: compare the two setups of one run.

Usage: python3 benchmark/python-socketio/bench.py [--workers 2] [--seconds 5] [--clients 64] [--sessions 300]
"""

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(REPO, "python", "tests"))

import aiohttp  # noqa: E402

import crowd  # noqa: E402
from cluster import APP_DIR, Cluster, Process, binary  # noqa: E402


async def handshakes(port, clients, seconds):
    latencies = []
    failures = 0
    deadline = time.monotonic() + seconds
    url = "http://127.0.0.1:%d/socket.io/?EIO=4&transport=polling" % port

    async def client(i):
        nonlocal failures
        connector = aiohttp.TCPConnector(local_addr=(crowd.client_address(5000 + i), 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            while time.monotonic() < deadline:
                begun = time.perf_counter()
                try:
                    async with http.get(url) as response:
                        await response.read()
                        if response.status != 200:
                            failures += 1
                            continue
                except aiohttp.ClientError:
                    failures += 1
                    continue
                latencies.append(time.perf_counter() - begun)

    begun = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    took = time.monotonic() - begun
    latencies.sort()
    quantile = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0
    return {"rps": len(latencies) / took, "p50": quantile(0.5), "p99": quantile(0.99), "failures": failures}


def sessions(port, count):
    begun = time.monotonic()
    outcomes = crowd.run_crowd([crowd.client_address(i) for i in range(count)], port, rounds=4, parallel=64,
                               call_timeout=3)
    took = time.monotonic() - begun
    ok = sum(1 for outcome in outcomes if outcome.ok)
    return {"ok": ok, "count": count, "per_second": ok / took}


def measure(port, options):
    asyncio.run(handshakes(port, 8, 1))  # warm up: imports, first connections
    load = asyncio.run(handshakes(port, options.clients, options.seconds))
    return load, sessions(port, options.sessions)


def free_port():
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::", 0))
        return probe.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--sessions", type=int, default=300)
    options = parser.parse_args()
    rows = []
    port = free_port()
    direct = ["uvicorn", "app:app", "--host", "::", "--port", str(port), "--workers", str(options.workers),
              "--no-access-log", "--backlog", "1024"]
    with Process(direct, cwd=APP_DIR) as server:
        server.wait_for(r"Application startup complete", count=options.workers, timeout=60)
        # A worker that printed its start may still be loading the app: one handshake per worker first.
        asyncio.run(handshakes(port, options.workers * 4, 1))
        rows.append(("uvicorn --workers %d (direct)" % options.workers, *measure(port, options)))
    activated = ["uvicorn", "app:app", "--fd", "{listen_fd}", "--backlog", "{backlog}", "--no-access-log"]
    with Cluster(activated, options.workers, cwd=APP_DIR) as cluster:
        cluster.wait_all_ready()
        rows.append(("sticky-cluster kernel routing, %d x uvicorn --fd" % options.workers,
                     *measure(cluster.port, options)))
    print("binary: %s; %d clients for %.0fs; %d sessions" % (binary(), options.clients, options.seconds,
                                                             options.sessions))
    print("| setup | handshakes/s | p50 ms | p99 ms | failed requests | sessions completed | sessions/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, load, done in rows:
        print("| %s | %.0f | %.1f | %.1f | %d | %d of %d | %.0f |" % (
            name, load["rps"], load["p50"], load["p99"], load["failures"], done["ok"], done["count"],
            done["per_second"]))
    ratio = rows[1][1]["rps"] / rows[0][1]["rps"] if rows[0][1]["rps"] else float("nan")
    print("handshakes/s, kernel routing / direct: %.2f" % ratio)


if __name__ == "__main__":
    main()
