"""One round of real python-socketio clients against examples/python-socketio's image, run inside the
container's network namespace (`nsenter --net`), so each client has its own loopback address there.

Waits until the metrics page says every worker is ready, then runs SESSIONS long-polling sessions and
SESSIONS // 2 upgraded to websocket, each from its own address, and checks that each one was answered
by one worker, the one `string_hash(text) % N` names. Prints one line: `ok <summary>` and
`pids <index>=<pid> ...` (the worker processes as the container numbers them), or the problems, exit 1.

Usage: python3 docker/check_python_app.py PORT METRICS_PORT CONCURRENCY SESSIONS FIRST_ADDRESS
"""

import collections
import os
import re
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "tests"))
import crowd  # noqa: E402  (the Python suite's socket.io client crowd)


def ready_workers(metrics_port):
    """How many workers the master's metrics page says are ready (accepting on their listener)."""
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port, timeout=2) as response:
            page = response.read().decode()
    except OSError:
        return 0
    return sum(int(value) for value in re.findall(r'^sticky_cluster_worker_ready\{[^}]*\} (\d+)', page, re.M))


def main():
    port, metrics_port, concurrency, sessions, first = (int(arg) for arg in sys.argv[1:6])
    deadline = time.monotonic() + 60
    while ready_workers(metrics_port) < concurrency:
        if time.monotonic() > deadline:
            print("not every worker ready within 60 s (metrics: %d of %d)" % (ready_workers(metrics_port),
                                                                             concurrency))
            return 1
        time.sleep(0.2)
    addresses = [crowd.client_address(i) for i in range(first, first + sessions)]
    polling = crowd.run_crowd(addresses, port, transports=("polling",), rounds=3)
    upgraded = crowd.run_crowd([crowd.client_address(i) for i in range(first + sessions, first + sessions * 3 // 2)],
                               port, transports=("polling", "websocket"), rounds=3)
    problems = crowd.sticky_problems(polling + upgraded, concurrency)
    if problems:
        print("%d of %d sessions wrong: %s" % (len(problems), len(polling) + len(upgraded), "; ".join(problems[:5])))
        return 1
    pids = collections.defaultdict(set)
    for outcome in polling + upgraded:
        pids[outcome.answers[0]["worker"]] |= outcome.pids()
    if len(pids) != concurrency or any(len(found) != 1 for found in pids.values()):
        print("workers and their processes: %s, expected %d workers of one process each" % (dict(pids), concurrency))
        return 1
    print("ok %d long-polling and %d websocket sessions, each on string_hash %% %d (per worker %s)" % (
        len(polling), len(upgraded), concurrency,
        dict(collections.Counter(outcome.answers[0]["worker"] for outcome in polling + upgraded))))
    print("pids " + " ".join("%s=%d" % (index, next(iter(found))) for index, found in sorted(pids.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
