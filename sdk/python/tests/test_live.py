"""The SDK against a live kvmfork server (KVMFORK_URL; KVMFORK_TEST_API_KEY when auth is on).

These fail, never skip, when KVMFORK_URL is unset.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from kvmfork import (AsyncSandbox, AuthError, BadRequest, ExecError, NetworkError, Sandbox,
                   SandboxTimeout)

pytestmark = pytest.mark.live


def test_print_one_plus_one(sandbox):
    assert sandbox.run("print(1 + 1)") == "2"


def test_numpy_mean(sandbox):
    assert sandbox.run("import numpy as np; print(np.mean([1, 2, 3, 4]))") == "2.5"


def test_numpy_computes_in_the_guest(sandbox):
    code = "import numpy as np\na = np.arange(12).reshape(3, 4)\nprint(int((a @ a.T).trace()))"
    assert sandbox.run(code) == str(sum(i * i for i in range(12)))


def test_ten_concurrent_runs_via_to_thread(sandbox):
    async def main():
        return await asyncio.gather(
            *(asyncio.to_thread(sandbox.run, f"print({i} * {i})") for i in range(10)))

    assert asyncio.run(main()) == [str(i * i) for i in range(10)]


def test_ten_concurrent_runs_with_async_sandbox(live_url, live_key):
    async def main():
        async with AsyncSandbox(live_key, live_url) as sb:
            return await asyncio.gather(*(sb.exec(f"print({i})") for i in range(10)))

    results = asyncio.run(main())
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(10)]
    assert len({r.id for r in results}) == 10, "every run must be its own sandbox"


def test_exception_raises_exec_error_with_traceback(sandbox):
    with pytest.raises(ExecError) as info:
        sandbox.run("def f():\n    raise ValueError('boom')\nf()")
    err = info.value
    assert err.exit_code == 1
    assert "Traceback (most recent call last)" in err.stderr
    assert "ValueError: boom" in err.stderr
    assert "ValueError: boom" in str(err)


def test_sys_exit_3(sandbox):
    result = sandbox.exec("import sys; print('before'); sys.exit(3)")
    assert result.exit_code == 3 and not result.ok
    assert result.stdout == "before\n"
    with pytest.raises(ExecError) as info:
        sandbox.run("import sys; sys.exit(3)")
    assert info.value.exit_code == 3


def test_timeout(sandbox):
    with pytest.raises(SandboxTimeout) as info:
        sandbox.run("while True: pass", timeout=2)
    result = info.value.result
    assert result.timed_out and result.exit_code == -1


def test_stdout_and_stderr_are_separate(sandbox):
    result = sandbox.exec("import sys; print('out'); print('err', file=sys.stderr)")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)


def test_unicode_round_trip(sandbox):
    text = "héllo wörld ✓ 日本 🚀"
    assert sandbox.run(f"print({text!r})") == text


# The fields docs/API.md and docs/openapi.yaml promise in every exec result.
DOCUMENTED_RESULT_FIELDS = {
    "id", "stdout", "stderr", "exit_code", "fork_time_ms", "exec_time_ms", "total_time_ms",
    "output", "duration_ms", "timed_out", "stdout_truncated", "stderr_truncated", "error",
}


def test_result_fields(sandbox):
    result = sandbox.exec("print('x')")
    assert DOCUMENTED_RESULT_FIELDS <= set(result.raw), DOCUMENTED_RESULT_FIELDS - set(result.raw)
    assert result.id
    assert result.raw["output"] == result.stdout
    assert result.raw["duration_ms"] == pytest.approx(result.total_time_ms)
    assert result.fork_time_ms >= 0 and result.exec_time_ms >= 0
    assert result.total_time_ms >= result.exec_time_ms
    assert (result.timed_out, result.stdout_truncated, result.stderr_truncated) == (False,) * 3
    assert result.error is None


def test_every_run_starts_from_the_clean_template(sandbox):
    path = f"/tmp/kvmfork-sdk-{uuid.uuid4().hex}"
    dirty = (
        "import builtins\n"
        "builtins.kvmfork_sdk_marker = 'left behind'\n"
        "try:\n"
        f"    open({path!r}, 'w').write('left behind')\n"
        "except OSError:\n"
        "    pass\n"
        "print('dirtied')"
    )
    assert sandbox.run(dirty) == "dirtied"
    check = f"import builtins, os; print(hasattr(builtins, 'kvmfork_sdk_marker'), os.path.exists({path!r}))"
    assert sandbox.run(check) == "False False"


def test_batch_keeps_order(sandbox):
    codes = [f"print({i})" for i in range(6)]
    codes[3] = "import sys; sys.exit(7)"
    results = sandbox.run_batch(codes)
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "", "4\n", "5\n"]
    assert [r.exit_code for r in results] == [0, 0, 0, 7, 0, 0]


def test_batch_per_item_timeouts(sandbox):
    results = sandbox.run_batch([{"code": "while True: pass", "timeout": 1}, "print('after')"])
    assert results[0].timed_out and results[1].stdout == "after\n"


def test_bad_language_is_a_bad_request(sandbox):
    with pytest.raises(BadRequest) as info:
        sandbox.run("print(1)", language="cobol")
    assert (info.value.status, info.value.code) == (400, "unknown_language")


def test_bad_timeout_is_a_bad_request(sandbox):
    with pytest.raises(BadRequest) as info:
        sandbox.exec("print(1)", timeout=0)
    assert (info.value.status, info.value.code) == (400, "invalid_timeout")


def test_bad_item_fails_the_whole_batch(sandbox):
    with pytest.raises(BadRequest):
        sandbox.run_batch(["print(1)", {"code": "print(2)", "language": "cobol"}])


def test_health(sandbox):
    health = sandbox.health()
    assert health["status"] == "ok"
    templates = health["templates"]
    assert isinstance(templates, dict) and templates, templates
    assert templates["python"]["ready"] is True and templates["python"]["state"] == "ready"
    assert all(t["state"] in ("ready", "building", "failed") for t in templates.values())
    assert isinstance(health["shards"], list) and health["shards"]
    assert "python" in health["languages"]


def test_metrics_are_prometheus_text(sandbox):
    sandbox.run("print(1)")
    text = sandbox.metrics()
    assert "# TYPE " in text
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert samples and all(len(line.split()) >= 2 for line in samples)


def test_llm_tool_round_trip(sandbox):
    tool = sandbox.as_tool()
    assert tool.spec("openai")["function"]["name"] == "run_code"
    assert tool('{"code": "print(6 * 7)"}') == "42\n"
    answer = tool({"code": "1 / 0"})
    assert "exited with status 1" in answer and "ZeroDivisionError" in answer


def test_authentication(live_url, live_key):
    if live_key:
        # Auth is on: a wrong key is refused, the right one accepted.
        with Sandbox("not-a-valid-key-" + uuid.uuid4().hex, live_url, max_retries=0) as wrong:
            with pytest.raises(AuthError) as info:
                wrong.run("print(1)")
        assert (info.value.status, info.value.code) == (401, "unauthorized")
        with Sandbox(live_key, live_url) as right:
            assert right.run("print(1)") == "1"
    else:
        # Auth is off: any key, or none, is accepted.
        with Sandbox("any-key", live_url) as anyone:
            assert anyone.run("print(1)") == "1"


def test_unreachable_server_is_a_network_error(live_url):
    with Sandbox(base_url="http://127.0.0.1:9", max_retries=0) as nowhere:
        with pytest.raises(NetworkError):
            nowhere.health()
