"""Fixtures: the live kvmfork server (KVMFORK_URL) and a scripted local HTTP server."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Union

import pytest

from kvmfork import Sandbox

MISSING_SERVER = (
    "KVMFORK_URL is not set: these tests run against a live kvmfork server. Start one and run e.g. "
    "KVMFORK_URL=http://127.0.0.1:8080 python3 -m pytest (add KVMFORK_TEST_API_KEY=<key> when the "
    "server has KVMFORK_API_KEYS_FILE set), or use sdk/run-tests.sh."
)


@pytest.fixture(scope="session")
def live_url() -> str:
    url = os.environ.get("KVMFORK_URL")
    if not url:
        pytest.fail(MISSING_SERVER, pytrace=False)
    return url


@pytest.fixture(scope="session")
def live_key() -> Optional[str]:
    return os.environ.get("KVMFORK_TEST_API_KEY") or None


@pytest.fixture()
def sandbox(live_url: str, live_key: Optional[str]):
    with Sandbox(live_key, live_url) as sb:
        yield sb


Reply = Union[Dict[str, Any], Callable[[BaseHTTPRequestHandler], None]]


class Recorded:
    def __init__(self, method: str, path: str, headers: Dict[str, str], body: bytes):
        self.method, self.path, self.headers, self.body = method, path, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


class FakeServer:
    """Answers each request with the next scripted reply and records what it got.

    A reply is ``{"status": int, "json": obj | "body": bytes, "headers": {...}}``
    or a function taking the handler. The last reply repeats when the script
    runs out.
    """

    def __init__(self) -> None:
        self.replies: List[Reply] = []
        self.requests: List[Recorded] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with fake.lock:
                    fake.requests.append(Recorded(self.command, self.path, dict(self.headers), body))
                    index = min(len(fake.requests), len(fake.replies)) - 1
                    reply = fake.replies[index] if fake.replies else {"status": 500}
                if callable(reply):
                    reply(self)
                else:
                    send(self, reply)

            do_GET = do_POST = do_DELETE = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def script(self, *replies: Reply) -> None:
        self.replies = list(replies)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(handler: BaseHTTPRequestHandler, reply: Dict[str, Any]) -> None:
    if reply.get("status") == 204:
        handler.send_response(204)
        for name, value in reply.get("headers", {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        return
    body = reply.get("body")
    if body is None:
        body = json.dumps(reply.get("json", {})).encode()
    handler.send_response(reply.get("status", 200))
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    for name, value in reply.get("headers", {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def exec_answer(stdout: str = "", **fields: Any) -> Dict[str, Any]:
    """A well-formed /v1/exec answer body."""
    answer = {"id": "r-1", "stdout": stdout, "stderr": "", "exit_code": 0, "fork_time_ms": 0.5,
              "exec_time_ms": 2.0, "total_time_ms": 2.5, "output": stdout, "duration_ms": 2.5,
              "timed_out": False, "stdout_truncated": False, "stderr_truncated": False,
              "error": None}
    answer.update(fields)
    return answer


def sandbox_answer(sandbox_id: str = "sbx_n0_0_0_1", **fields: Any) -> Dict[str, Any]:
    """A well-formed live sandbox description."""
    answer = {"sandbox_id": sandbox_id, "language": "python", "template": "python-0123",
              "created_at": 1764620000.5, "expires_at": 1764620300.5, "fork_time_ms": 0.3,
              "execution_count": 0, "memory_bytes": 0, "metadata": None}
    answer.update(fields)
    return answer


def session_exec_answer(stdout: str = "", result: Any = None, execution_count: int = 1,
                        sandbox_id: str = "sbx_n0_0_0_1", **fields: Any) -> Dict[str, Any]:
    """A well-formed /v1/sandboxes/{id}/exec answer body."""
    answer = exec_answer(stdout, **fields)
    answer.update({"sandbox_id": sandbox_id, "execution_count": execution_count,
                   "result": None if result is None else {"text": result, "truncated": False}})
    return answer


@pytest.fixture()
def fake():
    server = FakeServer()
    yield server
    server.close()


@pytest.fixture()
def fake_client(fake: FakeServer, monkeypatch: pytest.MonkeyPatch):
    """A client of ``fake`` that records retry sleeps instead of sleeping."""
    monkeypatch.delenv("KVMFORK_API_KEY", raising=False)
    monkeypatch.delenv("ZEROBOOT_API_KEY", raising=False)
    client = Sandbox(base_url=fake.url, max_retries=3, backoff=0.5, max_backoff=30.0)
    client.slept = []  # type: ignore[attr-defined]
    client._sleep = client.slept.append  # type: ignore[attr-defined]
    yield client
    client.close()
