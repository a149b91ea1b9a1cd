"""Client behaviour against a scripted local HTTP server: wire format, error
mapping, retry/backoff, connection reuse. No kvmfork server needed."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import threading
import time

import pytest

from conftest import exec_answer, send
from kvmfork import (APIError, AsyncSandbox, AuthError, BadRequest, ExecError, ExecRequest,
                   KvmforkError, NetworkError, ProtocolError, RateLimitError, Sandbox, SandboxError,
                   SandboxTimeout, ServerBusy, check_result)
from kvmfork.client import parse_retry_after


def error_reply(status, code, message="refused", headers=None):
    return {"status": status, "json": {"error": {"code": code, "message": message}},
            "headers": headers or {}}


# -- wire format --------------------------------------------------------------

def test_exec_sends_the_documented_request(fake, fake_client):
    fake.script({"json": exec_answer("2\n")})
    result = fake_client.exec("print(1 + 1)", "python", 5)
    sent = fake.requests[0]
    assert (sent.method, sent.path) == ("POST", "/v1/exec")
    assert sent.json() == {"code": "print(1 + 1)", "language": "python", "timeout_seconds": 5}
    assert sent.headers["Content-Type"] == "application/json"
    assert "Authorization" not in sent.headers
    assert result.stdout == "2\n" and result.output == "2\n"
    assert result.exit_code == 0 and result.ok
    assert (result.fork_time_ms, result.exec_time_ms, result.total_time_ms) == (0.5, 2.0, 2.5)
    assert result.duration_ms == 2.5


def test_timeout_is_left_to_the_server_default_when_not_given(fake, fake_client):
    fake.script({"json": exec_answer()})
    fake_client.exec("pass")
    assert fake.requests[0].json() == {"code": "pass", "language": "python"}


def test_run_returns_stdout_without_trailing_newlines(fake, fake_client):
    fake.script({"json": exec_answer("a\n\nb\n\n")})
    assert fake_client.run("x") == "a\n\nb"


def test_base_url_path_prefix_is_kept(fake, monkeypatch):
    fake.script({"json": {"status": "ok"}})
    with Sandbox(base_url=fake.url + "/kvmfork/") as client:
        client.health()
    assert fake.requests[0].path == "/kvmfork/v1/health"


@pytest.mark.parametrize("arg, kvmfork_env, zeroboot_env, expected", [
    ("from-arg", "from-kvmfork", "from-zeroboot", "from-arg"),
    (None, "from-kvmfork", "from-zeroboot", "from-kvmfork"),
    (None, None, "from-zeroboot", "from-zeroboot"),
])
def test_api_key_resolution_order(fake, monkeypatch, arg, kvmfork_env, zeroboot_env, expected):
    for name, value in (("KVMFORK_API_KEY", kvmfork_env), ("ZEROBOOT_API_KEY", zeroboot_env)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    fake.script({"json": exec_answer()})
    with Sandbox(arg, fake.url) as client:
        client.exec("pass")
    assert fake.requests[0].headers["Authorization"] == f"Bearer {expected}"


def test_pre_rename_environment_names_still_work_with_a_deprecation_warning(fake, monkeypatch):
    for name in ("KVMFORK_API_KEY", "ZEROBOOT_API_KEY", "KVMFORK_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FORKD_API_KEY", "from-legacy")
    monkeypatch.setenv("FORKD_URL", fake.url)
    fake.script({"json": exec_answer()})
    with pytest.warns(DeprecationWarning, match="KVMFORK_URL"):
        with Sandbox() as client:
            client.exec("pass")
    assert fake.requests[0].headers["Authorization"] == "Bearer from-legacy"


def test_batch_items_of_every_form_keep_their_order(fake, fake_client):
    answers = [exec_answer(str(i)) for i in range(4)]
    fake.script({"json": {"results": answers}})
    results = fake_client.run_batch([
        "a",
        {"code": "b", "language": "node", "timeout": 3},
        {"code": "c", "timeout_seconds": 4},
        ExecRequest("d", "javascript", 5),
    ], timeout=9)
    assert fake.requests[0].path == "/v1/exec/batch"
    assert fake.requests[0].json() == {"executions": [
        {"code": "a", "language": "python", "timeout_seconds": 9},
        {"code": "b", "language": "node", "timeout_seconds": 3},
        {"code": "c", "language": "python", "timeout_seconds": 4},
        {"code": "d", "language": "javascript", "timeout_seconds": 5},
    ]}
    assert [r.stdout for r in results] == ["0", "1", "2", "3"]


def test_batch_with_wrong_result_count_is_a_protocol_error(fake, fake_client):
    fake.script({"json": {"results": [exec_answer()]}})
    with pytest.raises(ProtocolError):
        fake_client.run_batch(["a", "b"])


def test_batch_item_without_code_is_refused_before_sending(fake, fake_client):
    with pytest.raises(TypeError):
        fake_client.run_batch([{"language": "python"}])
    assert fake.requests == []


def test_non_json_success_is_a_protocol_error(fake, fake_client):
    fake.script({"body": b"<html>proxy page</html>"})
    with pytest.raises(ProtocolError):
        fake_client.exec("pass")


@pytest.mark.parametrize("broken", [
    {"stdout": "x"},                                   # no exit_code
    exec_answer(fork_time_ms="fast"),                  # not a number
    exec_answer(stdout=5),                             # not a string
])
def test_malformed_result_is_a_protocol_error(fake, fake_client, broken):
    fake.script({"json": broken})
    with pytest.raises(ProtocolError):
        fake_client.exec("pass")


def test_unknown_fields_are_kept_in_raw(fake, fake_client):
    fake.script({"json": exec_answer("x", shard=3)})
    assert fake_client.exec("pass").raw["shard"] == 3


# -- error mapping ------------------------------------------------------------

@pytest.mark.parametrize("status, code, error_class", [
    (400, "unknown_language", BadRequest),
    (400, "invalid_timeout", BadRequest),
    (400, "batch_too_large", BadRequest),
    (413, "body_too_large", BadRequest),
    (431, "headers_too_large", BadRequest),
    (401, "unauthorized", AuthError),
    (404, "not_found", APIError),
    (405, "method_not_allowed", APIError),
    (408, "request_timeout", APIError),
    (500, "internal", APIError),
    (500, "template_failed", APIError),
])
def test_error_status_maps_to_its_class_and_is_not_retried(fake, fake_client, status, code,
                                                          error_class):
    fake.script(error_reply(status, code, "details here"))
    with pytest.raises(error_class) as info:
        fake_client.exec("pass")
    assert (info.value.status, info.value.code) == (status, code)
    assert "details here" in str(info.value)
    assert len(fake.requests) == 1 and fake_client.slept == []


def test_non_json_error_body_is_reported(fake, fake_client):
    fake.script({"status": 502, "body": b"Bad Gateway from proxy"})
    with pytest.raises(APIError) as info:
        fake_client.exec("pass")
    assert info.value.status == 502 and "Bad Gateway from proxy" in str(info.value)


def test_run_raises_exec_error_with_stderr_and_exit_code(fake, fake_client):
    fake.script({"json": exec_answer("partial\n", stderr="Traceback...\nValueError: boom\n",
                                     exit_code=1)})
    with pytest.raises(ExecError) as info:
        fake_client.run("raise ValueError('boom')")
    err = info.value
    assert err.exit_code == 1 and err.stdout == "partial\n"
    assert "ValueError: boom" in err.stderr and "ValueError: boom" in str(err)
    assert isinstance(err, SandboxError) and isinstance(err, KvmforkError)


def test_run_raises_sandbox_timeout_on_timed_out(fake, fake_client):
    fake.script({"json": exec_answer(exit_code=-1, timed_out=True)})
    with pytest.raises(SandboxTimeout) as info:
        fake_client.run("while True: pass", timeout=2)
    assert info.value.result.timed_out and "2s" in str(info.value)


def test_run_raises_sandbox_error_when_the_guest_failed(fake, fake_client):
    fake.script({"json": exec_answer(exit_code=-1, error={"code": "guest_crashed",
                                                          "message": "triple fault"})})
    with pytest.raises(SandboxError) as info:
        fake_client.run("pass")
    assert not isinstance(info.value, (ExecError, SandboxTimeout))
    assert info.value.code == "guest_crashed" and "triple fault" in str(info.value)


def test_check_result_passes_success_through(fake, fake_client):
    fake.script({"json": exec_answer("ok")})
    result = fake_client.exec("pass")
    assert check_result(result) is result


# -- retry and backoff ----------------------------------------------------------

def test_429_is_retried_after_the_retry_after_seconds(fake, fake_client):
    fake.script(error_reply(429, "rate_limited", headers={"Retry-After": "2"}),
                {"json": exec_answer("done")})
    assert fake_client.run("pass") == "done"
    assert fake_client.slept == [2.0]
    assert len(fake.requests) == 2


def test_template_building_503_is_retried_after_the_retry_after_seconds(fake, fake_client):
    fake.script(error_reply(503, "template_building", headers={"Retry-After": "5"}),
                error_reply(503, "template_building", headers={"Retry-After": "5"}),
                {"json": exec_answer("built")})
    assert fake_client.run("pass", language="node") == "built"
    assert fake_client.slept == [5.0, 5.0]
    assert len(fake.requests) == 3


def test_503_without_retry_after_backs_off_exponentially_then_raises(fake, fake_client):
    fake.script(error_reply(503, "overloaded"))
    with pytest.raises(ServerBusy) as info:
        fake_client.exec("pass")
    assert info.value.retry_after is None and info.value.code == "overloaded"
    assert len(fake.requests) == 1 + fake_client.max_retries
    # Equal jitter: attempt n waits between half and all of backoff * 2**n.
    for attempt, delay in enumerate(fake_client.slept):
        ceiling = 0.5 * 2 ** attempt
        assert ceiling / 2 <= delay <= ceiling


def test_backoff_is_capped_at_max_backoff(fake):
    fake.script(error_reply(503, "overloaded"))
    with Sandbox(base_url=fake.url, max_retries=6, backoff=1.0, max_backoff=3.0) as client:
        slept = []
        client._sleep = slept.append
        with pytest.raises(ServerBusy):
            client.exec("pass")
    assert len(slept) == 6 and max(slept) <= 3.0 and min(slept[2:]) >= 1.5


def test_no_retries_when_disabled(fake):
    fake.script(error_reply(429, "rate_limited", headers={"Retry-After": "7"}))
    with Sandbox(base_url=fake.url, max_retries=0) as client:
        with pytest.raises(RateLimitError) as info:
            client.exec("pass")
    assert info.value.retry_after == 7.0 and len(fake.requests) == 1


def test_retry_after_longer_than_max_backoff_is_raised_at_once(fake, fake_client):
    fake.script(error_reply(429, "rate_limited", headers={"Retry-After": "120"}))
    with pytest.raises(RateLimitError) as info:
        fake_client.exec("pass")
    assert info.value.retry_after == 120.0
    assert len(fake.requests) == 1 and fake_client.slept == []


def test_real_sleep_honours_retry_after(fake):
    fake.script(error_reply(503, "overloaded", headers={"Retry-After": "1"}),
                {"json": exec_answer("late")})
    with Sandbox(base_url=fake.url) as client:
        started = time.monotonic()
        assert client.run("pass") == "late"
        # Correctness, not speed: the client must not come back before it was told to.
        assert time.monotonic() - started >= 1.0


def test_refused_connection_is_retried_then_raised(fake_client):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Sandbox(base_url=f"http://127.0.0.1:{port}", max_retries=2, backoff=0.01) as client:
        slept = []
        client._sleep = slept.append
        with pytest.raises(NetworkError) as info:
            client.exec("pass")
    assert info.value.sent is False and len(slept) == 2


def test_read_timeout_is_a_network_error_and_not_retried(fake):
    def hang(handler):
        time.sleep(1.5)

    fake.script(hang)
    with Sandbox(base_url=fake.url, timeout=0.3) as client:
        with pytest.raises(NetworkError) as info:
            client.exec("pass")
    assert info.value.sent is True and len(fake.requests) == 1


@pytest.mark.parametrize("header, expected", [
    ("3", 3.0), ("1.5", 1.5), (" 0 ", 0.0), ("-4", 0.0), ("soon", None), (None, None),
])
def test_parse_retry_after(header, expected):
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date():
    header = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after(header) <= 31


# -- connections ----------------------------------------------------------------

def test_connection_closed_by_server_while_idle_is_reopened(fake, fake_client):
    def answer_then_drop(handler):
        # Keep-alive response, then the server drops the connection anyway
        # (idle timeout on the server or a proxy).
        send(handler, {"json": exec_answer("fresh")})
        handler.close_connection = True

    fake.script(answer_then_drop)
    assert fake_client.run("one") == "fresh"
    time.sleep(0.1)
    assert fake_client.run("two") == "fresh"
    assert len(fake.requests) == 2


def test_server_dropping_every_connection_is_a_network_error(fake, fake_client):
    def drop(handler):
        handler.close_connection = True  # no response at all

    fake.script({"json": exec_answer("pooled")}, drop)
    assert fake_client.run("one") == "pooled"  # leaves a kept-alive connection in the pool
    with pytest.raises(NetworkError) as info:
        fake_client.run("two")  # reused connection fails, the fresh one too
    assert info.value.sent is True
    assert len(fake.requests) == 3 and fake_client.slept == []


def test_one_client_serves_many_threads(fake, fake_client):
    fake.script({"json": exec_answer("same")})
    results, errors = [], []

    def worker():
        try:
            results.append(fake_client.run("pass"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == ["same"] * 16


def test_health_of_a_draining_server_is_returned_not_retried(fake, fake_client):
    fake.script({"status": 503, "json": {"status": "draining", "templates": {}, "shards": []}})
    assert fake_client.health()["status"] == "draining"
    assert len(fake.requests) == 1 and fake_client.slept == []


def test_health_503_without_a_health_body_raises(fake, fake_client):
    fake.script({"status": 503, "body": b"Service Unavailable"})
    with pytest.raises(ServerBusy):
        fake_client.health()
    assert len(fake.requests) == 1


def test_metrics_text(fake, fake_client):
    fake.script({"body": b"# TYPE kvmfork_x counter\nkvmfork_x 1\n"})
    assert fake_client.metrics() == "# TYPE kvmfork_x counter\nkvmfork_x 1\n"
    assert (fake.requests[0].method, fake.requests[0].path) == ("GET", "/v1/metrics")


def test_closed_client_refuses_calls(fake):
    client = Sandbox(base_url=fake.url)
    client.close()
    with pytest.raises(KvmforkError):
        client.health()


def test_bad_base_url_is_refused():
    with pytest.raises(KvmforkError):
        Sandbox(base_url="ftp://example")


# -- async ------------------------------------------------------------------------

def test_async_sandbox_runs_concurrently(fake, monkeypatch):
    monkeypatch.delenv("KVMFORK_API_KEY", raising=False)
    monkeypatch.delenv("ZEROBOOT_API_KEY", raising=False)
    fake.script({"json": exec_answer("x\n")})

    async def main():
        async with AsyncSandbox(base_url=fake.url) as sb:
            return await asyncio.gather(*(sb.run(f"print({i})") for i in range(10)))

    assert asyncio.run(main()) == ["x"] * 10
    assert sorted(r.json()["code"] for r in fake.requests) == sorted(
        f"print({i})" for i in range(10))


def test_async_errors_are_the_same_types(fake):
    fake.script(error_reply(400, "unknown_language"))

    async def main():
        async with AsyncSandbox(base_url=fake.url) as sb:
            await sb.exec("x", "cobol")

    with pytest.raises(BadRequest):
        asyncio.run(main())
