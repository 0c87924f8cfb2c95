"""Starts the real sticky-cluster binary (or a server on its own) as a child process, collects its log
lines and the master's ready lines (--ready-fd), and waits on them: the tests synchronise on what the
processes say, never on sleeps."""

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
APP_DIR = os.path.join(REPO, "examples", "python-socketio")


def binary():
    """The sticky-cluster command under test: $STICKY_CLUSTER_BIN (the pip-installed one in the wheel
    test), else the workspace's debug build."""
    return os.environ.get("STICKY_CLUSTER_BIN") or os.path.join(REPO, "target", "debug", "sticky-cluster")


def free_port():
    """A port nobody listens on now (the server's own --workers mode needs a number)."""
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::", 0))
        return probe.getsockname()[1]


class Process:
    """A child process whose stdout and stderr lines are kept; killed (with its process group) on close."""

    def __init__(self, argv, cwd=APP_DIR, env=None, pass_fds=()):
        self.argv = argv
        self.lines = []
        self.changed = threading.Condition()
        self.child = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True, pass_fds=pass_fds)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.child.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, pattern, count=1, timeout=30):
        """Waits until `count` lines match `pattern` (a regex); returns the matches. On a timeout or an
        early exit, fails with the log's tail."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = [m for m in map(regex.search, self.lines) if m]
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0 or (self.child.poll() is not None and not self.reader.is_alive()):
                    raise AssertionError("no %d lines matching %r within %ss (exit %s); log tail:\n%s" % (
                        count, pattern, timeout, self.child.poll(), "\n".join(self.lines[-25:])))
                self.changed.wait(min(left, 0.5))

    def log(self):
        with self.changed:
            return list(self.lines)

    def signal(self, number):
        self.child.send_signal(number)

    def wait_exit(self, timeout=30):
        try:
            return self.child.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self):
        if self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.child.wait()
        self.reader.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()


class Cluster(Process):
    """sticky-cluster running `server_argv` with `flags` (by default `routing: kernel`, `worker.protocol:
    none`), on a port the kernel picks (read from its `listening` line), with debug logs."""

    def __init__(self, server_argv, concurrency=2, flags=None, cwd=APP_DIR, env=None):
        if flags is None:
            flags = ["--routing", "kernel", "--protocol", "none", "--concurrency", str(concurrency)]
        # The write end goes to the master alone (pipes are not inheritable otherwise), so the reader sees
        # the end of it when the master is gone.
        ready_read, ready_write = os.pipe()
        argv = [binary(), *flags, "--ready-fd", str(ready_write), "--port", "0", "--debug",
                "--hard-shutdown-delay", "20s", "--", *server_argv]
        try:
            super().__init__(argv, cwd=cwd, env=env, pass_fds=(ready_write,))
        finally:
            os.close(ready_write)
        self.ready = []
        self.ready_ended = False
        self.ready_reader = threading.Thread(target=self._read_ready, args=(ready_read,), daemon=True)
        self.ready_reader.start()
        self.concurrency = concurrency
        try:
            self.listening = self.wait_event("listening")
        except BaseException:
            self.close()
            raise
        self.port = self.listening["port"]

    def _read_ready(self, fd):
        with open(fd, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                try:
                    parsed = json.loads(line)
                except ValueError:
                    parsed = {"unparsed": line.rstrip("\n")}
                with self.changed:
                    self.ready.append(parsed)
                    self.changed.notify_all()
        with self.changed:
            self.ready_ended = True
            self.changed.notify_all()

    def wait_event(self, event, count=1, timeout=30):
        """Waits for the `count`-th ready line of `event` (format version 1) and returns it; fails with the
        log's tail when the ready fd ends or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = [line for line in self.ready if line.get("event") == event and line.get("version") == 1]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or self.ready_ended:
                    raise AssertionError("no %d %r ready lines (%s; exit %s); ready lines %s; log tail:\n%s" % (
                        count, event, "the fd ended" if self.ready_ended else "%ss" % timeout, self.child.poll(),
                        self.ready, "\n".join(self.lines[-25:])))
                self.changed.wait(min(left, 0.5))

    def close(self):
        super().close()
        self.ready_reader.join(5)

    def started(self, index, generation=1):
        """The pid of worker `index`'s process of that generation, from the master's debug log."""
        pattern = r"worker %d started \(pid (\d+), generation %d\)" % (index, generation)
        return int(self.wait_for(pattern)[0].group(1))

    def wait_ready(self, index, pid, timeout=60):
        """Waits for the master to judge worker `index` (that pid) ready from its listener."""
        return self.wait_for(r"worker %d \(pid %d\) is accepting" % (index, pid), timeout=timeout)[0]

    def wait_all_ready(self):
        return [self.wait_ready(index, self.started(index)) for index in range(self.concurrency)]
