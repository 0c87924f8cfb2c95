"""A python-socketio chat that says which worker holds each session, to run behind sticky-cluster.

Each worker keeps its sessions in its own memory, as python-socketio does without a message queue: a
long-polling client works only if every request of its session reaches the same worker. Run it under
any ASGI server that takes an inherited socket (uvicorn, gunicorn's UvicornWorker, hypercorn); the
README beside this file has the two commands.
"""

import os

import socketio

WORKER = os.environ.get("STICKY_CLUSTER_WORKER_INDEX", "?")

sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*")
app = socketio.ASGIApp(sio)


def peer_of(environ):
    """The client address as the server saw it (`::ffff:a.b.c.d` on a dual-stack listener)."""
    scope = environ.get("asgi.scope") or {}
    client = scope.get("client") or (environ.get("REMOTE_ADDR"),)
    return client[0]


@sio.event
async def connect(sid, environ):
    await sio.save_session(sid, {"peer": peer_of(environ)})
    await sio.emit("welcome", {"worker": WORKER, "pid": os.getpid()}, to=sid)


@sio.event
async def whoami(sid):
    """Which worker answers, and whom it sees: the tests and the demo page both ask."""
    session = await sio.get_session(sid)
    return {"worker": WORKER, "pid": os.getpid(), "peer": session["peer"], "sid": sid}


@sio.event
async def chat(sid, text):
    await sio.emit("chat", {"worker": WORKER, "text": str(text)[:500]})
