"""Zeroboot's published client shape against a live kvmfork server.

A Zeroboot user's code does ``Sandbox(key, base_url).run(code)`` and reads
``.stdout`` / ``.exit_code`` off the result. ``ZerobootShapedSandbox`` below
is a minimal client of that shape, written here from the wire format (not
Zeroboot's code), so these tests show such clients work against kvmfork
unchanged, on ``/v1/exec`` as well as Zeroboot's unversioned ``/exec`` and
``/health``. These fail, never skip, when KVMFORK_URL is unset.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Any, Dict, Optional

import pytest

pytestmark = pytest.mark.live

# What Zeroboot's server answers for an exec (kvmfork adds more fields).
ZEROBOOT_EXEC_FIELDS = ("id", "stdout", "stderr", "exit_code", "fork_time_ms", "exec_time_ms",
                        "total_time_ms")


@dataclass
class Result:
    id: str
    stdout: str
    stderr: str
    exit_code: int
    fork_time_ms: float
    exec_time_ms: float
    total_time_ms: float


class ZerobootShapedSandbox:
    def __init__(self, api_key: Optional[str], base_url: str, exec_path: str = "/v1/exec"):
        self.api_key, self.base_url, self.exec_path = api_key, base_url.rstrip("/"), exec_path

    def _request(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200, resp.status
            return json.loads(resp.read())

    def run(self, code: str, language: str = "python", timeout: int = 30) -> Result:
        answer = self._request("POST", self.exec_path,
                               {"code": code, "language": language, "timeout_seconds": timeout})
        missing = [f for f in ZEROBOOT_EXEC_FIELDS if f not in answer]
        assert not missing, f"exec answer lacks Zeroboot fields {missing}: {answer}"
        return Result(**{f: answer[f] for f in ZEROBOOT_EXEC_FIELDS})

    def health(self, path: str = "/v1/health") -> Dict[str, Any]:
        return self._request("GET", path)


@pytest.mark.parametrize("exec_path", ["/v1/exec", "/exec"])
def test_run_returns_a_result_with_stdout(live_url, live_key, exec_path):
    sb = ZerobootShapedSandbox(live_key, live_url, exec_path)
    result = sb.run("print(1 + 1)")
    assert (result.stdout, result.stderr, result.exit_code) == ("2\n", "", 0)
    assert len(result.id) == 36
    assert result.total_time_ms >= result.exec_time_ms >= 0 and result.fork_time_ms >= 0


@pytest.mark.parametrize("exec_path", ["/v1/exec", "/exec"])
def test_nonzero_exit_and_traceback_come_back_as_data(live_url, live_key, exec_path):
    sb = ZerobootShapedSandbox(live_key, live_url, exec_path)
    result = sb.run("import sys; print('x'); sys.exit(3)")
    assert (result.stdout, result.exit_code) == ("x\n", 3)
    result = sb.run("1/0")
    assert result.exit_code == 1 and "ZeroDivisionError" in result.stderr


def test_node_runs_with_the_language_field(live_url, live_key):
    result = ZerobootShapedSandbox(live_key, live_url, "/exec").run("console.log(6 * 7)", "node", 10)
    assert (result.stdout, result.exit_code) == ("42\n", 0)


@pytest.mark.parametrize("path", ["/v1/health", "/health"])
def test_health_templates_are_keyed_by_language(live_url, live_key, path):
    health = ZerobootShapedSandbox(live_key, live_url).health(path)
    assert health["status"] == "ok"
    templates = health["templates"]
    assert isinstance(templates, dict), templates
    assert templates["python"]["ready"] is True
    for language, template in templates.items():
        assert template["language"] == language and template["state"] in ("ready", "building", "failed")
