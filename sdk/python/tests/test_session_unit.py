"""Live sandbox (session) API against a scripted local HTTP server: wire
format of every route, error mapping, retry policy, context managers."""

from __future__ import annotations

import asyncio

import pytest

from conftest import exec_answer, sandbox_answer, session_exec_answer
from kvmfork import (AsyncCheckpoint, AsyncLiveSandbox, AsyncSandbox, BadRequest, Checkpoint,
                     CheckpointNotFound, ExecError, LiveSandbox, NetworkError, PartialFailure,
                     ProtocolError, QuotaExceeded, RateLimitError, SandboxEnded, SandboxExpired,
                     SandboxNotFound, SandboxTimeout, ServerBusy)

SBX = "sbx_n0_0_0_1"
CKPT = "ckpt_n0_0_0_9"


def error_reply(status, code, message="refused", headers=None):
    return {"status": status, "json": {"error": {"code": code, "message": message}},
            "headers": headers or {}}


DELETED = {"status": 204}


def started(fake, fake_client, **fields):
    fake.script({"status": 201, "json": sandbox_answer(SBX, **fields)})
    sb = fake_client.create_sandbox()
    fake.requests.clear()
    return sb


# -- create, get, list ----------------------------------------------------------

def test_create_sandbox_sends_the_documented_request(fake, fake_client):
    fake.script({"status": 201, "json": sandbox_answer(SBX, metadata={"task": "t1"})})
    sb = fake_client.create_sandbox("python", ttl_seconds=60, metadata={"task": "t1"})
    sent = fake.requests[0]
    assert (sent.method, sent.path) == ("POST", "/v1/sandboxes")
    assert sent.json() == {"language": "python", "ttl_seconds": 60, "metadata": {"task": "t1"}}
    assert isinstance(sb, LiveSandbox)
    assert (sb.sandbox_id, sb.id, sb.language, sb.template) == (SBX, SBX, "python", "python-0123")
    assert sb.metadata == {"task": "t1"} and sb.expires_at == 1764620300.5
    assert sb.execution_count == 0 and not sb.closed
    assert sb.last_info.fork_time_ms == 0.3


def test_create_sandbox_defaults_are_left_to_the_server(fake, fake_client):
    fake.script({"status": 201, "json": sandbox_answer(SBX)})
    fake_client.create_sandbox()
    assert fake.requests[0].json() == {}


def test_create_from_a_checkpoint_object_or_id(fake, fake_client):
    fake.script({"status": 201, "json": sandbox_answer(SBX)})
    ckpt = Checkpoint(fake_client, CKPT, 4096, 1.0, "sbx_other", {})
    fake_client.create_sandbox(from_checkpoint=ckpt, ttl_seconds=30)
    fake_client.create_sandbox(from_checkpoint=CKPT)
    ckpt.create_sandbox(ttl_seconds=5)
    assert [r.json() for r in fake.requests] == [
        {"from_checkpoint": CKPT, "ttl_seconds": 30}, {"from_checkpoint": CKPT},
        {"from_checkpoint": CKPT, "ttl_seconds": 5}]


def test_create_from_a_missing_checkpoint(fake, fake_client):
    fake.script(error_reply(404, "checkpoint_not_found", "no checkpoint ckpt_x"))
    with pytest.raises(CheckpointNotFound) as info:
        fake_client.create_sandbox(from_checkpoint=CKPT)
    assert info.value.checkpoint_id == CKPT and info.value.status == 404


def test_create_sandboxes_returns_each(fake, fake_client):
    fake.script({"status": 201, "json": {"sandboxes": [sandbox_answer("sbx_a"),
                                                        sandbox_answer("sbx_b")]}})
    group = fake_client.create_sandboxes(2, "python", ttl_seconds=10)
    assert fake.requests[0].json() == {"language": "python", "ttl_seconds": 10, "count": 2}
    assert [sb.sandbox_id for sb in group] == ["sbx_a", "sbx_b"] and group.errors == []


def test_create_sandboxes_partial_failure_deletes_the_started_ones(fake, fake_client):
    fake.script({"status": 201, "json": {"sandboxes": [
        sandbox_answer("sbx_a"),
        {"error": {"code": "too_many_sandboxes", "message": "key holds 100"}}]}}, DELETED)
    with pytest.raises(PartialFailure) as info:
        fake_client.create_sandboxes(2)
    (index, error), = info.value.errors
    assert index == 1 and isinstance(error, QuotaExceeded) and error.status == 429
    assert "key holds 100" in str(error)
    assert info.value.code == "too_many_sandboxes"
    assert [(r.method, r.path) for r in fake.requests[1:]] == [("DELETE", "/v1/sandboxes/sbx_a")]


def test_create_sandboxes_validates_count(fake, fake_client):
    with pytest.raises(ValueError):
        fake_client.create_sandboxes(0)
    assert fake.requests == []


def test_get_sandbox(fake, fake_client):
    fake.script({"json": sandbox_answer(SBX, execution_count=4, memory_bytes=8192)})
    sb = fake_client.get_sandbox(SBX)
    assert (fake.requests[0].method, fake.requests[0].path) == ("GET", f"/v1/sandboxes/{SBX}")
    assert sb.execution_count == 4 and sb.last_info.memory_bytes == 8192


def test_ids_are_quoted_in_paths(fake, fake_client):
    fake.script(error_reply(404, "sandbox_not_found"))
    with pytest.raises(SandboxNotFound):
        fake_client.get_sandbox("a/../b?c")
    assert fake.requests[0].path == "/v1/sandboxes/a%2F..%2Fb%3Fc"


def test_list_sandboxes(fake, fake_client):
    fake.script({"json": {"sandboxes": [sandbox_answer("sbx_a"), sandbox_answer("sbx_b")]}})
    listed = fake_client.list_sandboxes()
    assert (fake.requests[0].method, fake.requests[0].path) == ("GET", "/v1/sandboxes")
    assert [sb.sandbox_id for sb in listed] == ["sbx_a", "sbx_b"]


def test_list_without_a_list_is_a_protocol_error(fake, fake_client):
    fake.script({"json": {"sandboxes": None}})
    with pytest.raises(ProtocolError):
        fake_client.list_sandboxes()


@pytest.mark.parametrize("broken", [
    {"language": "python"},                                 # no sandbox_id
    sandbox_answer(SBX, expires_at="later"),                # not a number
    sandbox_answer(SBX, metadata=[1]),                      # not an object
])
def test_malformed_description_is_a_protocol_error(fake, fake_client, broken):
    fake.script({"status": 201, "json": broken})
    with pytest.raises(ProtocolError):
        fake_client.create_sandbox()


# -- run_code -----------------------------------------------------------------

def test_run_code_sends_code_and_reads_result_and_count(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"json": session_exec_answer("", result="2", execution_count=2)})
    result = sb.run_code("x + 1")
    sent = fake.requests[0]
    assert (sent.method, sent.path) == ("POST", f"/v1/sandboxes/{SBX}/exec")
    assert sent.json() == {"code": "x + 1"}
    assert result.result == "2" and not result.result_truncated
    assert (result.execution_count, result.sandbox_id, result.exit_code) == (2, SBX, 0)
    assert result.ok and sb.execution_count == 2


def test_run_code_timeout_and_language_are_sent(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"json": session_exec_answer()})
    sb.run_code("pass", 3.5, language="python")
    assert fake.requests[0].json() == {"code": "pass", "language": "python", "timeout_seconds": 3.5}


def test_run_code_null_and_truncated_results(fake, fake_client):
    sb = started(fake, fake_client)
    answer = session_exec_answer()
    fake.script({"json": answer})
    assert sb.run_code("x = 1").result is None
    answer["result"] = {"text": "'aaaa", "truncated": True}
    fake.script({"json": answer})
    result = sb.run_code("'a' * 10**7")
    assert result.result == "'aaaa" and result.result_truncated


def test_run_code_with_a_malformed_result_is_a_protocol_error(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"json": session_exec_answer(result=None) | {"result": "2"}})
    with pytest.raises(ProtocolError):
        sb.run_code("1 + 1")


def test_run_raises_like_the_stateless_run(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"json": session_exec_answer(stderr="ZeroDivisionError: division by zero\n",
                                             exit_code=1)})
    with pytest.raises(ExecError) as info:
        sb.run("1/0")
    assert "ZeroDivisionError" in str(info.value)
    fake.script({"json": session_exec_answer(exit_code=-1, timed_out=True,
                                             error={"code": "timeout", "message": "stopped"})})
    with pytest.raises(SandboxTimeout):
        sb.run("while True: pass", 1)
    fake.script({"json": session_exec_answer("hi\n\n")})
    assert sb.run("print('hi')") == "hi"


# -- fork ---------------------------------------------------------------------

def test_fork_returns_children_in_order(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"status": 201, "json": {"source_id": SBX, "pause_ms": 0.9, "forks": [
        sandbox_answer("sbx_c1"), sandbox_answer("sbx_c2")]}})
    children = sb.fork(2, ttl_seconds=60)
    assert (fake.requests[0].method, fake.requests[0].path) == ("POST", f"/v1/sandboxes/{SBX}/fork")
    assert fake.requests[0].json() == {"count": 2, "ttl_seconds": 60}
    a, b = children
    assert (a.sandbox_id, b.sandbox_id) == ("sbx_c1", "sbx_c2")
    assert children.pause_ms == 0.9 and children.source_id == SBX and children.errors == []
    assert a.client is fake_client


def test_fork_default_is_one_child(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"status": 201, "json": {"source_id": SBX, "pause_ms": 0.5,
                                         "forks": [sandbox_answer("sbx_c1")]}})
    (child,) = sb.fork()
    assert fake.requests[0].json() == {"count": 1} and child.sandbox_id == "sbx_c1"


def test_fork_partial_failure_deletes_the_started_children_and_names_each_failure(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"status": 201, "json": {"source_id": SBX, "pause_ms": 1.0, "forks": [
        sandbox_answer("sbx_c1"),
        {"error": {"code": "too_many_sandboxes", "message": "this key holds 100 sandboxes"}},
        {"error": {"code": "server_sandbox_limit", "message": "server full"}}]}}, DELETED)
    with pytest.raises(PartialFailure) as info:
        sb.fork(3)
    errors = info.value.errors
    assert [i for i, _ in errors] == [1, 2]
    assert all(isinstance(e, QuotaExceeded) and isinstance(e, RateLimitError) for _, e in errors)
    assert [e.code for _, e in errors] == ["too_many_sandboxes", "server_sandbox_limit"]
    assert "2 of 3" in str(info.value) and info.value.status == 429
    assert [(r.method, r.path) for r in fake.requests[1:]] == [("DELETE", "/v1/sandboxes/sbx_c1")]


def test_fork_allow_partial_keeps_the_started_children(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"status": 201, "json": {"source_id": SBX, "pause_ms": 1.0, "forks": [
        {"error": {"code": "fork_failed", "message": "no memory"}}, sandbox_answer("sbx_c2")]}})
    children = sb.fork(2, allow_partial=True)
    assert [c.sandbox_id for c in children] == ["sbx_c2"]
    (index, error), = children.errors
    assert index == 0 and error.code == "fork_failed" and error.status == 500
    assert len(fake.requests) == 1


def test_fork_validates_n(fake, fake_client):
    sb = started(fake, fake_client)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            sb.fork(bad)
    assert fake.requests == []


# -- checkpoints ----------------------------------------------------------------

def test_checkpoint_restore_and_delete(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"status": 201, "json": {"checkpoint_id": CKPT, "dirty_bytes": 1 << 20,
                                         "pause_ms": 2.5}})
    ckpt = sb.checkpoint()
    assert (fake.requests[0].method, fake.requests[0].path) == (
        "POST", f"/v1/sandboxes/{SBX}/checkpoints")
    assert (ckpt.checkpoint_id, ckpt.id, ckpt.dirty_bytes, ckpt.pause_ms, ckpt.sandbox_id) == (
        CKPT, CKPT, 1 << 20, 2.5, SBX)
    fake.script({"json": sandbox_answer(SBX, execution_count=1, restore_ms=3.25)})
    info = sb.restore(ckpt)
    assert fake.requests[1].path == f"/v1/sandboxes/{SBX}/restore"
    assert fake.requests[1].json() == {"checkpoint_id": CKPT}
    assert info.restore_ms == 3.25 and sb.execution_count == 1
    sb.restore(CKPT)
    assert fake.requests[2].json() == {"checkpoint_id": CKPT}
    fake.script(DELETED)
    ckpt.delete()
    assert (fake.requests[3].method, fake.requests[3].path) == ("DELETE", f"/v1/checkpoints/{CKPT}")


def test_restore_from_a_missing_checkpoint(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script(error_reply(404, "checkpoint_not_found", "no checkpoint"))
    with pytest.raises(CheckpointNotFound) as info:
        sb.restore(CKPT)
    assert info.value.checkpoint_id == CKPT
    assert not isinstance(info.value, SandboxNotFound)


def test_checkpoint_context_manager_deletes_it_and_tolerates_it_being_gone(fake, fake_client):
    ckpt = Checkpoint(fake_client, CKPT, 0, 0.0, SBX, {})
    fake.script(DELETED)
    with ckpt as c:
        assert c is ckpt
    assert [(r.method, r.path) for r in fake.requests] == [("DELETE", f"/v1/checkpoints/{CKPT}")]
    fake.requests.clear()
    with Checkpoint(fake_client, CKPT, 0, 0.0, SBX, {}):
        fake.script(error_reply(404, "checkpoint_not_found"))
    assert len(fake.requests) == 1


def test_delete_checkpoint_by_id(fake, fake_client):
    fake.script(error_reply(404, "checkpoint_not_found"))
    with pytest.raises(CheckpointNotFound):
        fake_client.delete_checkpoint(CKPT)
    assert (fake.requests[0].method, fake.requests[0].path) == ("DELETE", f"/v1/checkpoints/{CKPT}")


def test_checkpoint_budget_is_a_quota_and_not_retried(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script(error_reply(429, "checkpoint_budget_exceeded", "over 1 GiB"))
    with pytest.raises(QuotaExceeded) as info:
        sb.checkpoint()
    assert info.value.code == "checkpoint_budget_exceeded" and info.value.retry_after is None
    assert len(fake.requests) == 1 and fake_client.slept == []


# -- timeout, info, delete --------------------------------------------------------

def test_set_timeout_and_info(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"json": sandbox_answer(SBX, expires_at=1764629999.0)})
    info = sb.set_timeout(900)
    assert (fake.requests[0].method, fake.requests[0].path) == ("POST", f"/v1/sandboxes/{SBX}/timeout")
    assert fake.requests[0].json() == {"ttl_seconds": 900}
    assert info.expires_at == 1764629999.0 == sb.expires_at
    fake.script({"json": sandbox_answer(SBX, execution_count=7, memory_bytes=123)})
    assert sb.info().execution_count == 7 and sb.execution_count == 7
    assert (fake.requests[1].method, fake.requests[1].path) == ("GET", f"/v1/sandboxes/{SBX}")
    assert sb.is_running()
    fake.script(error_reply(404, "sandbox_expired"))
    assert not sb.is_running()


def test_delete_then_close_is_a_no_op(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script(DELETED)
    sb.delete()
    assert (fake.requests[0].method, fake.requests[0].path) == ("DELETE", f"/v1/sandboxes/{SBX}")
    assert sb.closed and sb.close() is False and len(fake.requests) == 1


def test_delete_of_a_gone_sandbox_raises_but_close_returns_false(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script(error_reply(404, "sandbox_not_found"))
    with pytest.raises(SandboxNotFound):
        sb.delete()
    assert not sb.closed
    assert sb.close() is False and sb.closed
    other = started(fake, fake_client)
    fake.script(DELETED)
    assert other.close() is True


def test_context_manager_deletes_on_exit(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"json": session_exec_answer("1\n")}, DELETED)
    with sb as inside:
        assert inside is sb
        inside.run_code("print(1)")
    assert [(r.method, r.path) for r in fake.requests] == [
        ("POST", f"/v1/sandboxes/{SBX}/exec"), ("DELETE", f"/v1/sandboxes/{SBX}")]
    assert sb.closed


def test_context_manager_does_not_hide_the_block_error(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"status": 500, "json": {"error": {"code": "internal", "message": "x"}}})
    with pytest.raises(ZeroDivisionError):
        with sb:
            1 / 0
    assert [(r.method, r.path) for r in fake.requests] == [("DELETE", f"/v1/sandboxes/{SBX}")]


def test_context_manager_reports_a_failed_delete_when_the_block_succeeded(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"status": 500, "json": {"error": {"code": "internal", "message": "x"}}})
    with pytest.raises(Exception) as info:
        with sb:
            pass
    assert getattr(info.value, "status", None) == 500


def test_context_manager_on_an_expired_sandbox_is_quiet(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script(error_reply(404, "sandbox_expired"))
    with sb:
        pass
    assert sb.closed


# -- error mapping and retries -----------------------------------------------------

@pytest.mark.parametrize("code, cls, reason", [
    ("sandbox_not_found", SandboxNotFound, "not_found"),
    ("sandbox_expired", SandboxExpired, "expired"),
    ("sandbox_ended", SandboxEnded, "ended"),
])
def test_gone_sandbox_errors(fake, fake_client, code, cls, reason):
    sb = started(fake, fake_client)
    fake.script(error_reply(404, code, "the sandbox is gone: details"))
    for call in (lambda: sb.run_code("x"), sb.fork, sb.checkpoint, lambda: sb.set_timeout(5),
                 sb.info, lambda: sb.run_batch(["x"])):
        with pytest.raises(cls) as info:
            call()
        err = info.value
        assert isinstance(err, SandboxNotFound) and type(err) is cls
        assert (err.status, err.code, err.reason, err.sandbox_id) == (404, code, reason, SBX)
        assert "details" in str(err)
    assert fake_client.slept == []


def test_plain_404_is_not_a_sandbox_error(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script(error_reply(404, "not_found", "no such path"))
    with pytest.raises(Exception) as info:
        sb.run_code("x")
    assert not isinstance(info.value, SandboxNotFound) and info.value.status == 404


@pytest.mark.parametrize("code", ["too_many_sandboxes", "server_sandbox_limit"])
def test_session_quotas_are_raised_at_once(fake, fake_client, code):
    fake.script(error_reply(429, code))
    with pytest.raises(QuotaExceeded) as info:
        fake_client.create_sandbox()
    assert isinstance(info.value, RateLimitError) and info.value.code == code
    assert len(fake.requests) == 1 and fake_client.slept == []


def test_a_quota_with_retry_after_is_retried(fake, fake_client):
    fake.script(error_reply(429, "too_many_sandboxes", headers={"Retry-After": "2"}),
                {"status": 201, "json": sandbox_answer(SBX)})
    assert fake_client.create_sandbox().sandbox_id == SBX
    assert fake_client.slept == [2.0] and len(fake.requests) == 2


def test_rate_limit_and_busy_sandbox_are_retried(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script(error_reply(429, "rate_limited", headers={"Retry-After": "1"}),
                error_reply(503, "sandbox_busy", headers={"Retry-After": "1"}),
                {"json": session_exec_answer("ok\n")})
    assert sb.run("print('ok')") == "ok"
    assert fake_client.slept == [1.0, 1.0] and len(fake.requests) == 3


def test_busy_sandbox_after_retries_is_server_busy(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script(error_reply(503, "sandbox_busy", headers={"Retry-After": "1"}))
    with pytest.raises(ServerBusy) as info:
        sb.run_code("x")
    assert info.value.code == "sandbox_busy" and len(fake.requests) == 4


@pytest.mark.parametrize("code", ["invalid_ttl", "language_mismatch", "invalid_metadata"])
def test_session_bad_requests(fake, fake_client, code):
    fake.script(error_reply(400, code))
    with pytest.raises(BadRequest) as info:
        fake_client.create_sandbox(ttl_seconds=0)
    assert info.value.code == code


# -- batch from a sandbox -----------------------------------------------------------

def test_run_batch_from_a_sandbox(fake, fake_client):
    sb = started(fake, fake_client)
    fake.script({"json": {"results": [exec_answer("0\n"), exec_answer("1\n")]}})
    results = sb.run_batch(["print(x)", {"code": "print(y)", "timeout": 2, "language": "python"}],
                           timeout=5)
    sent = fake.requests[0]
    assert (sent.method, sent.path) == ("POST", "/v1/exec/batch")
    assert sent.json() == {"from_sandbox": SBX, "executions": [
        {"code": "print(x)", "timeout_seconds": 5},
        {"code": "print(y)", "language": "python", "timeout_seconds": 2}]}
    assert [r.stdout for r in results] == ["0\n", "1\n"]


def test_run_batch_from_a_sandbox_checks_the_answer(fake, fake_client):
    sb = started(fake, fake_client)
    assert sb.run_batch([]) == [] and fake.requests == []
    fake.script({"json": {"results": [exec_answer()]}})
    with pytest.raises(ProtocolError):
        sb.run_batch(["a", "b"])
    with pytest.raises(TypeError):
        sb.run_batch([{"language": "python"}])


# -- a sandbox that owns its client ----------------------------------------------------

def test_create_without_a_client_owns_one_until_everything_made_from_it_is_closed(fake, monkeypatch):
    monkeypatch.delenv("KVMFORK_API_KEY", raising=False)
    monkeypatch.delenv("ZEROBOOT_API_KEY", raising=False)
    fake.script({"status": 201, "json": sandbox_answer(SBX)})
    sb = LiveSandbox.create("python", base_url=fake.url, api_key="k-own", ttl_seconds=30)
    assert fake.requests[0].headers["Authorization"] == "Bearer k-own"
    assert fake.requests[0].json() == {"language": "python", "ttl_seconds": 30}
    fake.script({"status": 201, "json": {"source_id": SBX, "pause_ms": 1.0,
                                         "forks": [sandbox_answer("sbx_c1")]}})
    (child,) = sb.fork()
    fake.script(DELETED)
    sb.close()
    assert not sb.client._transport._closed, "the child still uses the client"
    child.close()
    assert sb.client._transport._closed
    fake.script({"json": sandbox_answer(SBX)})
    connected = LiveSandbox.connect(SBX, base_url=fake.url)
    assert connected.sandbox_id == SBX and fake.requests[-1].method == "GET"
    fake.script(error_reply(404, "sandbox_expired"))
    assert connected.close() is False and connected.client._transport._closed


def test_create_without_a_client_closes_it_when_creation_fails(fake):
    fake.script(error_reply(429, "too_many_sandboxes"))
    with pytest.raises(QuotaExceeded):
        LiveSandbox.create(base_url=fake.url, max_retries=0)


def test_unreachable_server(fake):
    with pytest.raises(NetworkError):
        LiveSandbox.create(base_url="http://127.0.0.1:9", max_retries=0)


# -- async ----------------------------------------------------------------------------

def test_async_live_sandbox_round_trip(fake, monkeypatch):
    monkeypatch.delenv("KVMFORK_API_KEY", raising=False)
    monkeypatch.delenv("ZEROBOOT_API_KEY", raising=False)
    fake.script(
        {"status": 201, "json": sandbox_answer(SBX)},
        {"json": session_exec_answer(result="2", execution_count=1)},
        {"status": 201, "json": {"source_id": SBX, "pause_ms": 1.0,
                                 "forks": [sandbox_answer("sbx_c1"), sandbox_answer("sbx_c2")]}},
        {"status": 201, "json": {"checkpoint_id": CKPT, "dirty_bytes": 10, "pause_ms": 1.0}},
        {"json": sandbox_answer(SBX, restore_ms=1.5)},
        DELETED, DELETED,
    )

    async def main():
        async with AsyncSandbox(base_url=fake.url) as client:
            async with client.create_sandbox(ttl_seconds=60) as sb:
                assert isinstance(sb, AsyncLiveSandbox) and sb.sandbox_id == SBX
                assert (await sb.run_code("1 + 1")).result == "2"
                children = await sb.fork(2)
                assert [c.sandbox_id for c in children] == ["sbx_c1", "sbx_c2"]
                assert all(isinstance(c, AsyncLiveSandbox) for c in children)
                assert children.pause_ms == 1.0
                async with await sb.checkpoint() as ckpt:
                    assert isinstance(ckpt, AsyncCheckpoint) and ckpt.checkpoint_id == CKPT
                    assert (await sb.restore(ckpt)).restore_ms == 1.5
            assert sb.closed

    asyncio.run(main())
    assert [(r.method, r.path) for r in fake.requests] == [
        ("POST", "/v1/sandboxes"), ("POST", f"/v1/sandboxes/{SBX}/exec"),
        ("POST", f"/v1/sandboxes/{SBX}/fork"), ("POST", f"/v1/sandboxes/{SBX}/checkpoints"),
        ("POST", f"/v1/sandboxes/{SBX}/restore"), ("DELETE", f"/v1/checkpoints/{CKPT}"),
        ("DELETE", f"/v1/sandboxes/{SBX}")]


def test_async_awaited_create_list_get_and_errors(fake, monkeypatch):
    monkeypatch.delenv("KVMFORK_API_KEY", raising=False)
    fake.script({"status": 201, "json": sandbox_answer(SBX)},
                {"json": {"sandboxes": [sandbox_answer(SBX)]}},
                error_reply(404, "sandbox_ended", "crashed"))

    async def main():
        async with AsyncSandbox(base_url=fake.url) as client:
            sb = await client.create_sandbox()
            assert sb.sandbox_id == SBX
            assert [s.sandbox_id for s in await client.list_sandboxes()] == [SBX]
            await client.get_sandbox(SBX)

    with pytest.raises(SandboxEnded):
        asyncio.run(main())


def test_async_create_classmethod(fake, monkeypatch):
    monkeypatch.delenv("KVMFORK_API_KEY", raising=False)
    fake.script({"status": 201, "json": sandbox_answer(SBX)}, DELETED)

    async def main():
        async with await AsyncLiveSandbox.create(base_url=fake.url, ttl_seconds=9) as sb:
            assert sb.sandbox_id == SBX

    asyncio.run(main())
    assert fake.requests[0].json() == {"ttl_seconds": 9}
    assert fake.requests[1].method == "DELETE"


def test_create_sandboxes_of_one_reads_the_single_answer(fake, fake_client):
    fake.script({"status": 201, "json": sandbox_answer(SBX)})
    group = fake_client.create_sandboxes(1, ttl_seconds=10)
    assert fake.requests[0].json() == {"ttl_seconds": 10}
    assert [sb.sandbox_id for sb in group] == [SBX] and group.errors == []


def test_async_fork_partial_failure(fake, monkeypatch):
    monkeypatch.delenv("KVMFORK_API_KEY", raising=False)
    fake.script({"status": 201, "json": sandbox_answer(SBX)},
                {"status": 201, "json": {"source_id": SBX, "pause_ms": 1.0, "forks": [
                    sandbox_answer("sbx_c1"),
                    {"error": {"code": "too_many_sandboxes", "message": "full"}}]}})

    async def main():
        async with AsyncSandbox(base_url=fake.url) as client:
            sb = await client.create_sandbox()
            kept = await sb.fork(2, allow_partial=True)
            assert [c.sandbox_id for c in kept] == ["sbx_c1"]
            assert isinstance(kept[0], AsyncLiveSandbox)
            assert [(i, type(e)) for i, e in kept.errors] == [(1, QuotaExceeded)]
            fake.requests.clear()
            fake.script({"status": 201, "json": {"source_id": SBX, "pause_ms": 1.0, "forks": [
                sandbox_answer("sbx_c2"), {"error": {"code": "too_many_sandboxes", "message": "full"}}]}},
                DELETED)
            with pytest.raises(PartialFailure):
                await sb.fork(2)

    asyncio.run(main())
    assert (fake.requests[-1].method, fake.requests[-1].path) == ("DELETE", "/v1/sandboxes/sbx_c2")
