#!/usr/bin/env python3
"""Sticky-routing check for the sticky-cluster container: real TCP clients bound to many loopback
source addresses, each asking hello-worker who served it, against the npm string-hash contract.

Usage: check_sticky.py PORT CONCURRENCY CLIENTS ROUNDS [INDEX=PID ...]
Every client address 127.0.x.y connects ROUNDS times; each answer must come from worker
string_hash("::ffff:127.0.x.y") % CONCURRENCY, name the client's real address, and (when INDEX=PID
pairs are given) come from the process started with that index (a worker in a container
reports its own namespace's pid, so give pairs only for workers on the host). Exits 1 on any mismatch.
"""

import json
import socket
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor


def string_hash(text):
    """npm string-hash: djb2 with xor, over UTF-16 units from the last to the first, wrapping u32."""
    h = 5381
    units = text.encode("utf-16-le")
    for i in range(len(units) - 2, -2, -2):
        h = ((h * 33) ^ int.from_bytes(units[i : i + 2], "little")) & 0xFFFFFFFF
    return h


def client_addresses(count):
    """127.0.1.1, 127.0.1.2, ... 100 per third octet, so the sources differ in more than one byte."""
    return [f"127.0.{1 + i // 100}.{1 + i % 100}" for i in range(count)]


def ask(port, source):
    """One HTTP request from `source`; returns the parsed JSON body of hello-worker's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0)) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: sticky-cluster\r\n\r\n")
        data = b""
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer {data[:80]!r}")
    return json.loads(body)


def main():
    port, concurrency, clients, rounds = (int(a) for a in sys.argv[1:5])
    pids = {int(k): int(v) for k, v in (pair.split("=") for pair in sys.argv[5:])}
    # The vector core's hash tests use: a wrong hash here must not silently agree with a wrong router.
    if string_hash("127.0.0.1") != 340519950:
        print("check_sticky.py: string_hash disagrees with the contract's vector")
        return 1
    jobs = [addr for _ in range(rounds) for addr in client_addresses(clients)]
    problems = []
    served = Counter()

    def check(source):
        text = f"::ffff:{source}"
        expected = string_hash(text) % concurrency
        try:
            answer = ask(port, source)
        except Exception as error:  # noqa: BLE001 - every failure is reported with its client
            return f"{source}: {error}"
        if answer.get("worker") != expected:
            return f"{source}: served by worker {answer.get('worker')}, string-hash says {expected}"
        if answer.get("remote") != text:
            return f"{source}: worker saw remote {answer.get('remote')!r}, not the real {text!r}"
        if expected in pids and answer.get("pid") != pids[expected]:
            return f"{source}: worker {expected} answered with pid {answer.get('pid')}, started pid {pids.get(expected)}"
        served[expected] += 1
        return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        for problem in pool.map(check, jobs):
            if problem:
                problems.append(problem)
    per_worker = ", ".join(f"{i}:{served[i]}" for i in range(concurrency))
    print(f"{len(jobs) - len(problems)}/{len(jobs)} requests from {clients} addresses routed as string-hash predicts "
          f"(per worker {per_worker})")
    for problem in problems[:10]:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
