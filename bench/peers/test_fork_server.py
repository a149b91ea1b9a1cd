"""Tests for the fork-per-request peer server, against a live instance.
Run: python3 -m unittest discover -s bench/peers -p 'test_*.py'
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import unittest

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fork_server.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ForkServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.port = free_port()
        cls.proc = subprocess.Popen(
            [sys.executable, SERVER, "--listen", "127.0.0.1:%d" % cls.port, "--workers", "2", "--max-children", "2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", cls.port), timeout=1).close()
                break
            except OSError:
                if cls.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("fork_server did not start: %s" % cls.proc.stderr.read().decode())
                time.sleep(0.05)

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(timeout=10)
        cls.proc.stderr.close()

    def connect(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        self.addCleanup(conn.close)
        return conn

    def exec(self, conn, code, timeout=None):
        body = {"code": code, "language": "python"}
        if timeout is not None:
            body["timeout_seconds"] = timeout
        conn.request("POST", "/v1/exec", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    def test_health(self):
        conn = self.connect()
        conn.request("GET", "/v1/health")
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertEqual(json.loads(response.read()), {"status": "ok"})

    def test_exec_print_has_kvmfork_fields(self):
        status, result = self.exec(self.connect(), "print(1+1)")
        self.assertEqual(status, 200)
        self.assertEqual(result["stdout"], "2\n")
        self.assertEqual(result["output"], "2\n")
        self.assertEqual(result["stderr"], "")
        self.assertEqual(result["exit_code"], 0)
        for field in ("id", "fork_time_ms", "exec_time_ms", "total_time_ms", "duration_ms"):
            self.assertIn(field, result)
        self.assertGreaterEqual(result["total_time_ms"], result["fork_time_ms"])

    def test_keep_alive_serves_many_requests_on_one_connection(self):
        conn = self.connect()
        for i in range(20):
            status, result = self.exec(conn, "print(%d * 2)" % i)
            self.assertEqual((status, result["stdout"]), (200, "%d\n" % (i * 2)))

    def test_each_request_runs_in_a_fresh_child(self):
        conn = self.connect()
        _, first = self.exec(conn, "import os; global_x = 1; print(os.getpid())")
        _, second = self.exec(conn, "import os; print(os.getpid(), 'global_x' in globals())")
        pid, leaked = second["stdout"].split()
        self.assertNotEqual(first["stdout"].strip(), pid)
        self.assertEqual(leaked, "False")

    def test_exceptions_and_exit_codes(self):
        conn = self.connect()
        _, result = self.exec(conn, "raise ValueError('boom')")
        self.assertEqual(result["exit_code"], 1)
        self.assertIn("ValueError: boom", result["stderr"])
        _, result = self.exec(conn, "def f(:\n  pass")
        self.assertEqual(result["exit_code"], 1)
        self.assertIn("SyntaxError", result["stderr"])
        _, result = self.exec(conn, "import sys; print('x'); sys.exit(3)")
        self.assertEqual((result["exit_code"], result["stdout"]), (3, "x\n"))

    def test_child_dying_without_a_result(self):
        _, result = self.exec(self.connect(), "import os; os._exit(5)")
        self.assertEqual(result["exit_code"], 5)
        self.assertIn("without a result", result["stderr"])

    def test_timeout_kills_the_child(self):
        start = time.monotonic()
        _, result = self.exec(self.connect(), "while True: pass", timeout=0.3)
        self.assertEqual(result["exit_code"], -9)
        self.assertIn("timed out", result["stderr"])
        self.assertLess(time.monotonic() - start, 10)

    def test_other_connections_progress_while_an_exec_runs(self):
        slow = self.connect()
        slow.request("POST", "/v1/exec", json.dumps({"code": "import time; time.sleep(1.5); print('late')"}))
        # Both workers may pick connections; several quick ones must finish before the slow one.
        start = time.monotonic()
        for _ in range(5):
            _, result = self.exec(self.connect(), "print('quick')")
            self.assertEqual(result["stdout"], "quick\n")
        self.assertLess(time.monotonic() - start, 1.5)
        response = slow.getresponse()
        self.assertEqual(json.loads(response.read())["stdout"], "late\n")

    def test_execs_beyond_max_children_queue_and_all_finish(self):
        conns = [self.connect() for _ in range(12)]
        for i, conn in enumerate(conns):
            conn.request("POST", "/v1/exec", json.dumps({"code": "import time; time.sleep(0.1); print(%d)" % i}))
        for i, conn in enumerate(conns):
            response = conn.getresponse()
            self.assertEqual(json.loads(response.read())["stdout"], "%d\n" % i)

    def test_a_queued_exec_of_a_closed_connection_is_dropped(self):
        blockers = [self.connect() for _ in range(4)]
        for conn in blockers:
            conn.request("POST", "/v1/exec", json.dumps({"code": "import time; time.sleep(0.5)"}))
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            body = json.dumps({"code": "open('/dev/null').close()"}).encode()
            s.sendall(b"POST /v1/exec HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        for conn in blockers:
            self.assertEqual(conn.getresponse().status, 200)
        status, result = self.exec(self.connect(), "print('still serving')")
        self.assertEqual((status, result["stdout"]), (200, "still serving\n"))

    def test_bad_requests(self):
        conn = self.connect()
        conn.request("POST", "/v1/exec", "{not json")
        response = conn.getresponse()
        self.assertEqual(response.status, 400)
        response.read()
        conn.request("POST", "/v1/exec", json.dumps({"code": "1", "language": "node"}))
        response = conn.getresponse()
        self.assertEqual(response.status, 400)
        response.read()
        conn.request("GET", "/v1/exec")
        response = conn.getresponse()
        self.assertEqual(response.status, 405)
        response.read()
        conn.request("GET", "/nowhere")
        response = conn.getresponse()
        self.assertEqual(response.status, 404)
        response.read()

    def test_connection_close_is_honoured(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        self.assertTrue(data.startswith(b"HTTP/1.1 200 OK\r\n"), data)
        self.assertIn(b"Connection: close", data)

    def test_malformed_request_line_gets_400_and_close(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"NONSENSE\r\n\r\n")
            data = s.recv(4096)
            self.assertTrue(data.startswith(b"HTTP/1.1 400"), data)
            self.assertEqual(s.recv(4096), b"")


if __name__ == "__main__":
    unittest.main()
