"""Tests for the Node pre-spawned-process peer, against a live instance.
Needs Debian's nodejs (/usr/bin/node) and fails without it.
Run: python3 -m unittest discover -s bench/peers -p 'test_*.py'
"""

import http.client
import json
import os
import socket
import subprocess
import time
import unittest

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "node_fork_server.js")
NODE = "/usr/bin/node"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeForkServerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.port = free_port()
        cls.proc = subprocess.Popen(
            [NODE, SERVER, "--listen", "127.0.0.1:%d" % cls.port, "--spares", "2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", cls.port), timeout=1).close()
                break
            except OSError:
                if cls.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("node_fork_server did not start: %s" % cls.proc.stderr.read().decode())
                time.sleep(0.05)

    @classmethod
    def tearDownClass(cls):
        cls.proc.terminate()
        cls.proc.wait(timeout=10)
        cls.proc.stderr.close()

    def connect(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self.addCleanup(conn.close)
        return conn

    def post(self, body):
        conn = self.connect()
        conn.request("POST", "/v1/exec", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    def exec(self, code, **fields):
        status, result = self.post(json.dumps(dict({"code": code, "language": "node"}, **fields)))
        self.assertEqual(status, 200, result)
        return result

    def test_health(self):
        conn = self.connect()
        conn.request("GET", "/v1/health")
        response = conn.getresponse()
        self.assertEqual((response.status, json.loads(response.read())), (200, {"status": "ok"}))

    def test_output_and_kvmfork_fields(self):
        result = self.exec("process.stdout.write('a'); console.error('e'); console.log(6 * 7)")
        self.assertEqual((result["stdout"], result["stderr"], result["exit_code"]), ("a42\n", "e\n", 0))
        self.assertEqual(result["output"], result["stdout"])
        self.assertFalse(result["timed_out"])
        for field in ("id", "fork_time_ms", "exec_time_ms", "total_time_ms", "duration_ms"):
            self.assertIn(field, result)

    def test_each_run_has_its_own_process(self):
        first = self.exec("globalThis.leak = 1; console.log(process.pid)")
        second = self.exec("console.log(typeof globalThis.leak, process.pid)")
        kind, pid = second["stdout"].split()
        self.assertEqual(kind, "undefined")
        self.assertNotEqual(pid, first["stdout"].strip())

    def test_timers_and_await_settle_before_the_answer(self):
        result = self.exec("await new Promise(r => setTimeout(r, 50)); setTimeout(() => console.log('late'), 50)")
        self.assertEqual(result["stdout"], "late\n")

    def test_exit_codes_and_errors(self):
        self.assertEqual(self.exec("console.log(1); process.exit(3)")["exit_code"], 3)
        thrown = self.exec("throw new Error('boom')")
        self.assertEqual(thrown["exit_code"], 1)
        self.assertIn("Error: boom", thrown["stderr"])
        later = self.exec("setTimeout(() => { throw new Error('later') }, 5)")
        self.assertEqual(later["exit_code"], 1)
        self.assertIn("Error: later", later["stderr"])
        syntax = self.exec("this is not javascript")
        self.assertEqual(syntax["exit_code"], 1)
        self.assertIn("SyntaxError", syntax["stderr"])
        crashed = self.exec("process.kill(process.pid, 'SIGKILL')")
        self.assertEqual(crashed["exit_code"], -9)

    def test_timeout_kills_the_run(self):
        start = time.monotonic()
        result = self.exec("while (true) {}", timeout_seconds=0.5)
        self.assertTrue(result["timed_out"])
        self.assertEqual(result["exit_code"], -9)
        self.assertLess(time.monotonic() - start, 10)
        self.assertEqual(self.exec("console.log('after')")["stdout"], "after\n")

    def test_bad_requests(self):
        for body in ["nope", "[]", "null", json.dumps({"code": 1}), json.dumps({}),
                     json.dumps({"code": "1", "language": "python"}),
                     json.dumps({"code": "1", "timeout_seconds": 0}),
                     json.dumps({"code": "1", "timeout_seconds": 301}),
                     json.dumps({"code": "1", "timeout_seconds": "5"})]:
            status, result = self.post(body)
            self.assertEqual(status, 400, body)
            self.assertIn("bad exec request", result["error"])

    def test_oversized_body_is_refused_and_the_server_lives(self):
        conn = self.connect()
        conn.request("POST", "/v1/exec", json.dumps({"code": "x" * (5 * 1024 * 1024)}),
                     {"Content-Type": "application/json"})
        try:
            response = conn.getresponse()
            self.assertEqual(response.status, 413)
        except (ConnectionError, http.client.HTTPException):
            pass  # the server may close before the whole body is sent
        self.assertEqual(self.exec("console.log(1)")["stdout"], "1\n")

    def test_routes_and_methods(self):
        conn = self.connect()
        conn.request("GET", "/v1/exec")
        response = conn.getresponse()
        response.read()
        self.assertEqual(response.status, 405)
        conn.request("GET", "/nowhere")
        response = conn.getresponse()
        response.read()
        self.assertEqual(response.status, 404)


if __name__ == "__main__":
    unittest.main()
