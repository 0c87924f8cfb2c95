"""Real python-socketio clients, each from its own loopback address, each HTTP request on a new TCP
connection (so every long-polling request is routed again, as behind a browser's connection churn).

A session connects, asks `whoami` several times (one long-polling round trip each, or websocket
frames after the upgrade) and disconnects; its outcome says which worker answered each time.
"""

import asyncio
import ipaddress
import json
import logging
import os

import aiohttp
import socketio

# A crowd whose sessions break on purpose (the server's own --workers) would print every failure.
for name in ("engineio.client", "socketio.client"):
    logging.getLogger(name).setLevel(logging.CRITICAL)

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "..", "..", "..", "shared", "testdata", "string-hash-vectors.json")


def string_hash(text):
    """npm string-hash: 5381, then for each UTF-16 unit from the last to the first h = (h * 33) ^ unit."""
    units = text.encode("utf-16-le")
    value = 5381
    for i in range(len(units) - 2, -1, -2):
        unit = units[i] | (units[i + 1] << 8)
        value = ((value * 33) ^ unit) & 0xFFFFFFFF
    return value


def check_string_hash_against_the_contract():
    """The shared vectors: the same hash the master's BPF program and the npm module compute."""
    with open(VECTORS) as file:
        vectors = json.load(file)["vectors"]
    for vector in vectors:
        assert string_hash(vector["text"]) == vector["hash"], vector
    return len(vectors)


def client_address(i):
    """The i-th distinct loopback client address, 127.2.x.y (the Rust tests use 127.1.x.y)."""
    return "127.2.%d.%d" % (i // 250, i % 250 + 1)


def peer_text(address):
    """How a dual-stack (`::`) listener, and so the routing hash, sees an IPv4 client."""
    return "::ffff:" + address


def expected_index(address, concurrency):
    return string_hash(peer_text(address)) % concurrency


class Outcome:
    """One session: its address, the answers it got, or why it failed."""

    def __init__(self, address):
        self.address = address
        self.answers = []
        self.error = None

    @property
    def ok(self):
        return self.error is None

    def workers(self):
        return {answer["worker"] for answer in self.answers}

    def pids(self):
        return {answer["pid"] for answer in self.answers}

    def __repr__(self):
        return "Outcome(%s, %s, %r)" % (self.address, self.answers[:1], self.error)


async def one_session(address, port, transports, rounds, pause, call_timeout, on_answer):
    outcome = Outcome(address)
    connector = aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)
    http = aiohttp.ClientSession(connector=connector)
    client = socketio.AsyncClient(http_session=http, reconnection=False, request_timeout=call_timeout)
    try:
        await client.connect(
            "http://127.0.0.1:%d" % port, transports=transports, wait_timeout=call_timeout, retry=False
        )
        for _ in range(rounds):
            outcome.answers.append(await client.call("whoami", timeout=call_timeout))
            if on_answer:
                on_answer()
            if pause:
                await asyncio.sleep(pause)
        if "websocket" in transports and client.transport() != "websocket":
            raise AssertionError("the session never upgraded to websocket")
    except Exception as error:  # every failure is the outcome under test, not a crash of the crowd
        outcome.error = "%s: %s" % (type(error).__name__, error)
    finally:
        try:
            await leave(client)
        finally:
            await http.close()
    return outcome


async def leave(client):
    """`disconnect()` without waiting for the pending long-poll GET, which the server holds until its
    next ping (25 s): the server gets the disconnect and the close packets all the same."""
    if client.connected:
        for namespace in client.namespaces:
            await client._send_packet(client.packet_class(socketio.packet.DISCONNECT, namespace=namespace))
    await client.eio.disconnect(abort=True)


async def crowd(addresses, port, transports=("polling",), rounds=3, parallel=40, pause=0.0, call_timeout=10,
                on_answer=None):
    """Runs one session per address, `parallel` at once; returns their outcomes in order. `on_answer`
    is called (on the crowd's thread) after every answer."""
    gate = asyncio.Semaphore(parallel)

    async def gated(address):
        async with gate:
            session = one_session(address, port, list(transports), rounds, pause, call_timeout, on_answer)
            # A broken handshake can hang on a long-poll the server holds until its next ping (25 s).
            limit = (call_timeout + pause) * (rounds + 2)
            try:
                return await asyncio.wait_for(session, limit)
            except asyncio.TimeoutError:
                outcome = Outcome(address)
                outcome.error = "TimeoutError: the session took more than %.0fs" % limit
                return outcome

    return await asyncio.gather(*(gated(address) for address in addresses))


def run_crowd(addresses, port, **options):
    async def quietly():
        # A session left without waiting for its pending long-poll leaves that task to fail unread.
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
        return await crowd(addresses, port, **options)

    return asyncio.run(quietly())


def sticky_problems(outcomes, concurrency):
    """What is wrong with a crowd's outcomes for a sticky cluster: failed sessions, a session answered
    by two workers, an answer from another index than string_hash(text) % N, a peer seen otherwise."""
    problems = []
    for outcome in outcomes:
        if not outcome.ok:
            problems.append("%s failed: %s" % (outcome.address, outcome.error))
            continue
        expected = str(expected_index(outcome.address, concurrency))
        if outcome.workers() != {expected} or len(outcome.pids()) != 1:
            problems.append("%s answered by %s (pids %s), expected worker %s"
                            % (outcome.address, outcome.workers(), outcome.pids(), expected))
        peers = {answer["peer"] for answer in outcome.answers}
        if peers != {peer_text(outcome.address)}:
            problems.append("%s seen as %s" % (outcome.address, peers))
    return problems


