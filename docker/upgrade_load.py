#!/usr/bin/env python3
"""New connections during an upgrade in place: 4 threads of clients from rotating loopback addresses,
each request on a new TCP connection, until the file STOP exists. Every answer must come from the
worker string_hash("::ffff:a.b.c.d") % CONCURRENCY names (check_sticky.py's check).

Usage: upgrade_load.py PORT CONCURRENCY STOP
Prints `served N failed N wrong N longest MS` and exits 1 if anything failed or was misrouted.
"""

import os
import sys
import threading
import time

from check_sticky import ask, client_addresses, string_hash


def main():
    port, concurrency, stop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    addresses = client_addresses(400)
    lock = threading.Lock()
    totals = {"served": 0, "failed": 0, "wrong": 0, "longest": 0.0}
    problems = []

    def run(offset):
        turn = offset
        while not os.path.exists(stop):
            source = addresses[turn % len(addresses)]
            turn += 4
            begun = time.monotonic()
            try:
                answer = ask(port, source)
                outcome = "served" if answer.get("worker") == string_hash(f"::ffff:{source}") % concurrency else "wrong"
                problem = None if outcome == "served" else f"{source}: worker {answer.get('worker')}"
            except Exception as error:  # noqa: BLE001 - every failure is counted with its client
                outcome, problem = "failed", f"{source}: {error}"
            took = (time.monotonic() - begun) * 1000
            with lock:
                totals[outcome] += 1
                totals["longest"] = max(totals["longest"], took)
                if problem and len(problems) < 10:
                    problems.append(problem)

    threads = [threading.Thread(target=run, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("served %(served)d failed %(failed)d wrong %(wrong)d longest %(longest).0f" % totals)
    for problem in problems:
        print("  " + problem)
    return 1 if totals["failed"] or totals["wrong"] or not totals["served"] else 0


if __name__ == "__main__":
    sys.exit(main())
