#!/usr/bin/env python3
"""A pre-forked CPython HTTP server that os.fork()s once per request.

The benchmark's "process floor" peer: no isolation at all, just what a process
sandbox built on fork() could at best reach. It speaks the part of kvmfork's API
the benchmark uses (POST /v1/exec, GET /v1/health) with the same JSON shapes,
so the same loadgen request works against both.

Layout: the parent opens the listening socket, imports the preloaded modules
(kvmfork's template has numpy imported too) and forks --workers event-loop
processes that share it. Each worker runs a selectors (epoll) loop over its
keep-alive connections; an exec forks a child from the worker, which runs the
code with stdout/stderr captured in memory and writes one JSON result into a
pipe the worker watches. Workers never block on a child. Each worker runs at
most --max-children execs at once and queues the rest (like kvmfork's exec
workers): a thousand simultaneous children on two cores would only thrash.

Usage: fork_server.py --listen 127.0.0.1:PORT [--workers N] [--max-children N] [--preload numpy]
"""

import argparse
import collections
import contextlib
import errno
import io
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback

MAX_HEAD = 64 * 1024
MAX_BODY = 4 * 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           411: "Length Required", 413: "Payload Too Large", 431: "Request Header Fields Too Large"}


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def parse_head(head):
    """Returns (method, path, version, headers dict with lower-case names)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400, "malformed request line")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400, "malformed header")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers


def wants_keep_alive(version, headers):
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def run_child(code, result_fd):
    """In the forked child: run `code`, write the JSON result, never return."""
    out, err = io.StringIO(), io.StringIO()
    exit_code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                exec(compile(code, "<exec>", "exec"), {"__name__": "__main__"})
            except SystemExit as e:
                if e.code is None:
                    exit_code = 0
                elif isinstance(e.code, int):
                    exit_code = e.code
                else:
                    print(e.code, file=sys.stderr)
                    exit_code = 1
            except BaseException:
                traceback.print_exc()
                exit_code = 1
        data = json.dumps({"stdout": out.getvalue(), "stderr": err.getvalue(),
                           "exit_code": exit_code}).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(result_fd, view):]
    finally:
        os._exit(0)


class Stop(Exception):
    """Raised by the SIGTERM handler: select() would otherwise resume after it."""


def raise_stop(*_):
    raise Stop()


class Exec:
    """A running child and the connection waiting for it."""

    def __init__(self, conn, pid, fd, started, fork_ms, deadline):
        self.conn, self.pid, self.fd = conn, pid, fd
        self.started, self.fork_ms, self.deadline = started, fork_ms, deadline
        self.data = bytearray()


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.running = None  # the Exec this connection waits for, True while queued
        self.close_after_write = False
        self.keep_alive = True


class Worker:
    def __init__(self, listener, max_children):
        self.listener = listener
        self.max_children = max_children
        self.waiting = collections.deque()  # (conn, code, timeout) beyond max_children
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, ("listen", None))
        self.execs = {}  # result fd -> Exec
        self.next_id = 0

    def serve(self):
        signal.signal(signal.SIGTERM, raise_stop)
        try:
            self.loop()
        except Stop:
            pass
        for e in list(self.execs.values()):
            self.kill(e)

    def loop(self):
        while True:
            timeout = None
            if self.execs:
                timeout = max(0.0, min(e.deadline for e in self.execs.values()) - time.monotonic())
            for key, mask in self.sel.select(timeout):
                kind, obj = key.data
                if kind == "listen":
                    self.accept()
                elif kind == "conn":
                    if mask & selectors.EVENT_READ:
                        self.on_readable(obj)
                    if mask & selectors.EVENT_WRITE and obj.sock.fileno() >= 0:
                        self.flush(obj)
                elif kind == "exec":
                    self.on_result(obj)
            self.expire(time.monotonic())
            self.start_waiting()

    def accept(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                    return
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(sock)
            self.sel.register(sock, selectors.EVENT_READ, ("conn", conn))

    def on_readable(self, conn):
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        conn.inbuf += data
        if conn.running is not None and len(conn.inbuf) > MAX_HEAD + MAX_BODY:
            self.close(conn)  # a client flooding while its exec runs
            return
        self.process(conn)

    def process(self, conn):
        """Handles the next buffered request unless one is already running."""
        if conn.running is not None or conn.close_after_write:
            return
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbuf) > MAX_HEAD:
                self.respond(conn, 431, {"error": "request head too large"}, close=True)
            return
        try:
            method, path, version, headers = parse_head(bytes(conn.inbuf[:end]))
            if "transfer-encoding" in headers:
                raise BadRequest(411, "chunked bodies are not supported")
            length = int(headers.get("content-length", "0"))
            if length < 0:
                raise BadRequest(400, "negative content-length")
            if length > MAX_BODY:
                raise BadRequest(413, "body too large")
        except (BadRequest, ValueError) as e:
            status = e.status if isinstance(e, BadRequest) else 400
            self.respond(conn, status, {"error": str(e)}, close=True)
            return
        if len(conn.inbuf) < end + 4 + length:
            return
        body = bytes(conn.inbuf[end + 4:end + 4 + length])
        del conn.inbuf[:end + 4 + length]
        conn.keep_alive = wants_keep_alive(version, headers)
        route = path.split("?", 1)[0]
        if route == "/v1/health":
            if method != "GET":
                self.respond(conn, 405, {"error": "use GET"})
            else:
                self.respond(conn, 200, {"status": "ok"})
        elif route == "/v1/exec":
            if method != "POST":
                self.respond(conn, 405, {"error": "use POST"})
            else:
                self.start_exec(conn, body)
        else:
            self.respond(conn, 404, {"error": "no such route"})

    def start_exec(self, conn, body):
        try:
            request = json.loads(body)
            code = request["code"]
            language = request.get("language", "python")
            timeout = float(request.get("timeout_seconds", DEFAULT_TIMEOUT_S))
            if not isinstance(code, str) or language != "python":
                raise ValueError("code must be a string and language python")
            if not 0 < timeout <= MAX_TIMEOUT_S:
                raise ValueError("timeout_seconds out of range")
        except (ValueError, KeyError, TypeError) as e:
            self.respond(conn, 400, {"error": "bad exec request: %s" % e})
            return
        conn.running = True  # reserved: the connection reads no further request meanwhile
        if len(self.execs) >= self.max_children:
            self.waiting.append((conn, code, timeout))
        else:
            self.fork(conn, code, timeout)

    def start_waiting(self):
        while self.waiting and len(self.execs) < self.max_children:
            conn, code, timeout = self.waiting.popleft()
            if conn.sock.fileno() >= 0:
                self.fork(conn, code, timeout)

    def fork(self, conn, code, timeout):
        started = time.monotonic()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            run_child(code, write_fd)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        fork_ms = (time.monotonic() - started) * 1000
        e = Exec(conn, pid, read_fd, started, fork_ms, started + timeout)
        conn.running = e
        self.execs[read_fd] = e
        self.sel.register(read_fd, selectors.EVENT_READ, ("exec", e))

    def on_result(self, e):
        if self.execs.get(e.fd) is not e:
            return  # finished earlier in this round of events (its connection closed)
        try:
            chunk = os.read(e.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        if chunk:
            e.data += chunk
            return
        self.finish(e)
        _, status = os.waitpid(e.pid, 0)
        try:
            result = json.loads(e.data)
        except ValueError:
            # The child died before writing its result (a signal, os._exit).
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            result = {"stdout": "", "stderr": "process ended without a result\n", "exit_code": code}
        self.answer_exec(e, result)

    def expire(self, now):
        for e in [e for e in self.execs.values() if e.deadline <= now]:
            self.kill(e)
            self.answer_exec(e, {"stdout": "", "stderr": "timed out\n", "exit_code": -signal.SIGKILL})

    def kill(self, e):
        self.finish(e)
        with contextlib.suppress(ProcessLookupError):
            os.kill(e.pid, signal.SIGKILL)
        os.waitpid(e.pid, 0)

    def finish(self, e):
        self.sel.unregister(e.fd)
        os.close(e.fd)
        del self.execs[e.fd]

    def answer_exec(self, e, result):
        conn = e.conn
        conn.running = None
        if conn.sock.fileno() < 0:
            return
        total_ms = (time.monotonic() - e.started) * 1000
        self.next_id += 1
        result.update({
            "id": "fork-%d-%d" % (os.getpid(), self.next_id),
            "output": result["stdout"],
            "fork_time_ms": round(e.fork_ms, 3),
            "exec_time_ms": round(total_ms - e.fork_ms, 3),
            "total_time_ms": round(total_ms, 3),
            "duration_ms": round(total_ms, 3),
        })
        self.respond(conn, 200, result)
        self.process(conn)

    def respond(self, conn, status, payload, close=False):
        body = json.dumps(payload).encode()
        close = close or not conn.keep_alive
        head = "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (
            status, REASONS.get(status, "Error"), len(body), "Connection: close\r\n" if close else "")
        conn.outbuf += head.encode() + body
        conn.close_after_write = conn.close_after_write or close
        self.flush(conn)

    def flush(self, conn):
        try:
            while conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close(conn)
            return
        if conn.outbuf:
            self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, ("conn", conn))
        elif conn.close_after_write:
            self.close(conn)
        else:
            self.sel.modify(conn.sock, selectors.EVENT_READ, ("conn", conn))

    def close(self, conn):
        if conn.sock.fileno() < 0:
            return
        if isinstance(conn.running, Exec):
            self.kill(conn.running)
        conn.running = None  # a queued exec of a closed connection is skipped
        self.sel.unregister(conn.sock)
        conn.sock.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT (loopback)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-children", type=int, default=2, help="execs running at once per worker")
    parser.add_argument("--preload", action="append", default=[], help="module to import before forking")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    for module in args.preload:
        __import__(module)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(4096)
    listener.setblocking(False)
    pids = []
    for _ in range(max(1, args.workers)):
        pid = os.fork()
        if pid == 0:
            try:
                Worker(listener, max(1, args.max_children)).serve()
            finally:
                os._exit(0)
        pids.append(pid)
    listener.close()

    def stop(*_):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("fork_server: listening on %s with %d workers (preloaded: %s)"
          % (args.listen, len(pids), ", ".join(args.preload) or "nothing"), file=sys.stderr, flush=True)
    for pid in pids:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break


if __name__ == "__main__":
    main()
