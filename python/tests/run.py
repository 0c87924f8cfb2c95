"""Unmodified Python servers (uvicorn --fd, gunicorn through LISTEN_FDS, hypercorn fd://) as sticky
workers of the real sticky-cluster binary, driven by real python-socketio clients from distinct loopback
addresses; and the same app under each server's own --workers N, which must break sessions.

Usage: python3 python/tests/run.py [name-filter ...]       Ends with 'N passed, N failed'.
"""

import collections
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import crowd  # noqa: E402
from cluster import APP_DIR, REPO, Cluster, Process, free_port  # noqa: E402

SESSIONS = 220
CONCURRENCY = 2
README = os.path.join(REPO, "README.md")
# The app runs from a copy: gunicorn's control sockets (`gunicorn-{index}.ctl`) are made beside it.
APP_COPY = tempfile.mkdtemp(prefix="sticky-cluster-python-app-")
shutil.copy(os.path.join(APP_DIR, "app.py"), APP_COPY)


def readme_one_liners():
    """The README's socket-activation lines, as written there: {server: (master flags, server argv)}."""
    with open(README) as file:
        text = file.read()
    section = text.split("## Any server: socket activation", 1)[1].split("\n## ", 1)[0]
    lines = {}
    for line in section.splitlines():
        if line.startswith("    sticky-cluster "):
            words = shlex.split(line)
            split = words.index("--")
            lines[words[split + 1]] = (words[1:split], words[split + 1:])
    return lines


ONE_LINERS = readme_one_liners()

# Each server: the same app under the server's own workers on `port`, with the line each of its workers
# prints when it serves.
SERVERS = {
    "uvicorn": {
        "own_workers": lambda port: ["uvicorn", "app:app", "--host", "::", "--port", str(port),
                                     "--workers", str(CONCURRENCY)],
        "serving": r"Application startup complete",
    },
    "gunicorn": {
        "own_workers": lambda port: ["gunicorn", "--worker-class", "uvicorn.workers.UvicornWorker",
                                     "--workers", str(CONCURRENCY), "--bind", "[::]:%d" % port,
                                     "--no-control-socket", "app:app"],
        "serving": r"Application startup complete",
    },
    "hypercorn": {
        "own_workers": lambda port: ["hypercorn", "--workers", str(CONCURRENCY), "--bind",
                                     "[::]:%d" % port, "app:app"],
        "serving": r"Running on",
    },
}


def activated(name):
    """A cluster running the README's line for `name`, on a port of the kernel's choice, with debug logs."""
    flags, server = ONE_LINERS[name]
    assert "--concurrency" in flags and flags[flags.index("--concurrency") + 1] == str(CONCURRENCY), flags
    return Cluster(server, CONCURRENCY, flags=flags, cwd=APP_COPY)


figures = []


def addresses(count, start=0):
    return [crowd.client_address(i) for i in range(start, start + count)]


def assert_sticky(outcomes, what):
    problems = crowd.sticky_problems(outcomes, CONCURRENCY)
    assert not problems, "%s: %d of %d sessions wrong:\n  %s" % (
        what, len(problems), len(outcomes), "\n  ".join(problems[:10]))
    served = collections.Counter(outcome.answers[0]["worker"] for outcome in outcomes)
    assert len(served) == CONCURRENCY, "%s: only workers %s served" % (what, dict(served))
    return served


def sessions_are_sticky_over_polling_and_websocket(name):
    with activated(name) as cluster:
        cluster.wait_all_ready()
        polling = crowd.run_crowd(addresses(SESSIONS), cluster.port, transports=("polling",), rounds=4)
        served = assert_sticky(polling, "long-polling")
        upgraded = crowd.run_crowd(addresses(SESSIONS, 300), cluster.port,
                                   transports=("polling", "websocket"), rounds=4)
        assert_sticky(upgraded, "websocket upgrade")
        figures.append("%s: %d long-polling sessions (per worker %s) and %d upgraded to websocket, every "
                       "one on string_hash %% %d" % (name, len(polling), dict(served), len(upgraded),
                                                     CONCURRENCY))


def kill_9_under_load_is_revived_on_its_index(name):
    with activated(name) as cluster:
        cluster.wait_all_ready()
        victim = cluster.started(0)
        before = crowd.run_crowd(addresses(60, 600), cluster.port)
        old_pids = {outcome.answers[0]["pid"] for outcome in before if outcome.ok}
        assert_sticky(before, "before the kill")
        # Load: sessions that span the kill (several round trips apart), 40 at a time.
        started = threading.Event()
        result = {}

        def load():
            result["outcomes"] = crowd.run_crowd(addresses(SESSIONS, 700), cluster.port, rounds=6, pause=0.05,
                                                 on_answer=started.set)

        loader = threading.Thread(target=load)
        loader.start()
        assert started.wait(30), "the load never got an answer"
        os.kill(victim, signal.SIGKILL)
        cluster.wait_for(r"worker 0 \(pid %d\) exited .*signal 9" % victim)
        successor = cluster.started(0, generation=2)
        cluster.wait_ready(0, successor)
        loader.join(120)
        assert not loader.is_alive(), "the load did not finish"
        during = result["outcomes"]
        on_other = [o for o in during if crowd.expected_index(o.address, CONCURRENCY) != 0]
        problems = crowd.sticky_problems(on_other, CONCURRENCY)
        assert not problems, "worker 1's sessions suffered from worker 0's death: %s" % problems[:5]
        lost = [o for o in during if not o.ok]
        mixed = [o for o in during if o.ok and len(o.pids()) != 1]
        assert not mixed, "sessions answered by two processes: %s" % mixed[:5]
        # Its clients are served after: by the new process, on index 0.
        after = crowd.run_crowd(addresses(60, 600), cluster.port)
        assert_sticky(after, "after the revival")
        stale = [o for o in after if crowd.expected_index(o.address, CONCURRENCY) == 0 and o.pids() & old_pids]
        assert not stale, "index 0 still answered by its killed generation: %s" % stale[:3]
        figures.append("%s: kill -9 of worker 0 (pid %d) under %d sessions: revived as pid %d; %d sessions "
                       "of index 0 died with it, worker 1 lost none; all %d sessions after were served"
                       % (name, victim, len(during), successor, len(lost), len(after)))


def sigterm_ends_the_cluster_with_exit_0(name):
    with activated(name) as cluster:
        cluster.wait_all_ready()
        assert_sticky(crowd.run_crowd(addresses(40, 1000), cluster.port), "before SIGTERM")
        begun = time.monotonic()
        cluster.signal(signal.SIGTERM)
        status = cluster.wait_exit(30)
        assert status == 0, "exit status %s after SIGTERM; log tail:\n%s" % (status, "\n".join(cluster.log()[-15:]))
        stopped = cluster.wait_event("stopped")
        assert stopped["graceful"] is True, stopped
        # Kernel routing: the listeners' program put every connection on its worker, the master none.
        assert cluster.listening["routing"] == "kernel" and stopped["routed"] == [0] * CONCURRENCY, stopped
        figures.append("%s: SIGTERM -> exit 0 in %.1fs" % (name, time.monotonic() - begun))


def own_workers_break_sessions(name):
    """The discriminating run: the same app and clients under the server's own --workers N."""
    server = SERVERS[name]
    port = free_port()
    with Process(server["own_workers"](port), cwd=APP_COPY) as process:
        process.wait_for(server["serving"], count=CONCURRENCY, timeout=60)
        # All at once with short timeouts: a broken session fails fast instead of waiting its turn.
        outcomes = crowd.run_crowd(addresses(SESSIONS), port, rounds=2, parallel=SESSIONS, call_timeout=2)
        failed = [o for o in outcomes if not o.ok]
        assert len(failed) >= len(outcomes) // 10, (
            "%s --workers %d served %d of %d sessions: the test would not tell a sticky cluster from a "
            "plain one" % (name, CONCURRENCY, len(outcomes) - len(failed), len(outcomes)))
        figures.append("%s --workers %d on its own: %d of %d long-polling sessions failed (%s)" % (
            name, CONCURRENCY, len(failed), len(outcomes),
            collections.Counter(o.error.split(":")[0] for o in failed).most_common(2)))


def string_hash_matches_the_contract_vectors():
    count = crowd.check_string_hash_against_the_contract()
    assert count >= 30, "only %d vectors" % count


TESTS = [("string_hash_matches_the_contract_vectors", string_hash_matches_the_contract_vectors)]
for server_name in SERVERS:
    for test in (sessions_are_sticky_over_polling_and_websocket, kill_9_under_load_is_revived_on_its_index,
                 sigterm_ends_the_cluster_with_exit_0, own_workers_break_sessions):
        TESTS.append(("%s_%s" % (server_name, test.__name__), lambda test=test, name=server_name: test(name)))


def main(filters):
    passed = failed = 0
    missing = set(SERVERS) - set(ONE_LINERS)
    assert not missing, "README.md has no socket-activation line for %s" % missing
    for name, test in TESTS:
        if filters and not any(f in name for f in filters):
            continue
        begun = time.monotonic()
        try:
            test()
        except Exception:
            failed += 1
            print("FAIL: %s (%.1fs)\n%s" % (name, time.monotonic() - begun, traceback.format_exc()), flush=True)
        else:
            passed += 1
            print("PASS: %s (%.1fs)" % (name, time.monotonic() - begun), flush=True)
    for line in figures:
        print("figures: " + line)
    print("%d passed, %d failed" % (passed, failed))
    shutil.rmtree(APP_COPY, ignore_errors=True)
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
