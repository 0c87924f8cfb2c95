"""A socket-activated worker with nothing but the standard library, as sd_listen_fds(3) describes:
fds from 3, LISTEN_FDS, LISTEN_PID equal to its own pid. It never speaks the channel protocol.

Every answer is JSON: its index, pid, the client address it saw, and what it inherited. With
--leave-nonblocking it sets O_NONBLOCK on the listener (as asyncio servers do) and waits in select.
"""

import json
import os
import select
import socket
import sys

leave_nonblocking = "--leave-nonblocking" in sys.argv
if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
    sys.exit("not socket-activated: LISTEN_PID=%r LISTEN_FDS=%r" % (os.environ.get("LISTEN_PID"),
                                                                   os.environ.get("LISTEN_FDS")))
inherited = {
    "listen_pid": int(os.environ["LISTEN_PID"]),
    "listen_fds": os.environ["LISTEN_FDS"],
    "names": os.environ.get("LISTEN_FDNAMES"),
    "listen_fd_variable": os.environ.get("STICKY_CLUSTER_LISTEN_FD"),
    "channel": os.environ.get("STICKY_CLUSTER_FD"),
    "blocking_at_start": os.get_blocking(3),
    "argv": sys.argv[1:],
    "version": os.environ.get("TEST_VERSION"),
}
listener = socket.socket(fileno=3)
if leave_nonblocking:
    os.set_blocking(3, False)
index = int(os.environ["STICKY_CLUSTER_WORKER_INDEX"])
while True:
    if leave_nonblocking:
        select.select([listener], [], [])
        try:
            connection, peer = listener.accept()
        except BlockingIOError:
            continue
        connection.setblocking(True)
    else:
        connection, peer = listener.accept()
    with connection:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = connection.recv(4096)
            if not chunk:
                break
            head += chunk
        body = json.dumps(dict(inherited, worker=index, pid=os.getpid(), remote=peer[0], early=False)).encode()
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                           b"Connection: close\r\n\r\n%s" % (len(body), body))
