"""Live sandboxes (sessions) against a live kvmfork server (KVMFORK_URL;
KVMFORK_TEST_API_KEY when auth is on). These fail, never skip, when
KVMFORK_URL is unset.

Tests marked ``session_globals`` check that Python globals persist between
runs and that ``result`` holds the final expression's value: they need the
guest agent that keeps a session's namespace. The others use files in /tmp,
which persist with any agent.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from kvmfork import (AsyncSandbox, CheckpointNotFound, LiveSandbox, SandboxNotFound,
                     SessionExecResult)

pytestmark = pytest.mark.live

TTL = 120


def write(path: str, text: str) -> str:
    return f"open({path!r}, 'w').write({text!r})"


def read(path: str) -> str:
    return f"print(open({path!r}).read())"


@pytest.fixture()
def path() -> str:
    return f"/tmp/kvmfork-sdk-{uuid.uuid4().hex}"


def test_session_lifecycle_and_not_found_after_delete(sandbox, path):
    marker = uuid.uuid4().hex
    sb = sandbox.create_sandbox("python", ttl_seconds=TTL, metadata={"test": marker})
    try:
        assert isinstance(sb, LiveSandbox) and sb.sandbox_id.startswith("sbx_")
        assert sb.language == "python" and sb.metadata == {"test": marker}
        assert sb.expires_at - sb.created_at == pytest.approx(TTL, abs=1)
        assert sb.execution_count == 0
        assert sb.sandbox_id in [s.sandbox_id for s in sandbox.list_sandboxes()]

        first = sb.run_code(write(path, "kept") + "\nprint('one')")
        assert isinstance(first, SessionExecResult)
        assert (first.stdout, first.exit_code, first.execution_count) == ("one\n", 0, 1)
        assert first.sandbox_id == sb.sandbox_id and first.ok
        second = sb.run_code(read(path))
        assert (second.stdout, second.execution_count) == ("kept\n", 2)
        assert sb.execution_count == 2

        info = sandbox.get_sandbox(sb.sandbox_id).last_info
        assert info.execution_count == 2 and info.metadata == {"test": marker}
        before = sb.expires_at
        assert sb.set_timeout(TTL * 3).expires_at > before + TTL
    finally:
        sb.delete()
    assert sb.closed
    with pytest.raises(SandboxNotFound) as info:
        sb.info()
    assert (info.value.status, info.value.code, info.value.sandbox_id) == (
        404, "sandbox_not_found", sb.sandbox_id)
    with pytest.raises(SandboxNotFound):
        sb.run_code("print(1)")
    with pytest.raises(SandboxNotFound):
        sandbox.get_sandbox(sb.sandbox_id)
    assert sb.close() is False
    assert sb.sandbox_id not in [s.sandbox_id for s in sandbox.list_sandboxes()]


def test_an_exception_keeps_the_session(sandbox, path):
    with sandbox.create_sandbox(ttl_seconds=TTL) as sb:
        sb.run_code(write(path, "before"))
        failed = sb.run_code("1 / 0")
        assert failed.exit_code == 1 and "ZeroDivisionError" in failed.stderr
        assert sb.run(read(path)) == "before"


def test_fork_two_children_continue_from_the_parent(sandbox, path):
    with sandbox.create_sandbox(ttl_seconds=TTL) as parent:
        parent.run_code(write(path, "parent"))
        children = parent.fork(2)
        try:
            assert len(children) == 2 and children.errors == []
            assert children.pause_ms is not None and children.pause_ms >= 0
            ids = {c.sandbox_id for c in children}
            assert len(ids) == 2 and parent.sandbox_id not in ids
            a, b = children
            assert a.run(read(path)) == "parent" and b.run(read(path)) == "parent"
            a.run_code(write(path, "child a"))
            assert a.run(read(path)) == "child a"
            assert b.run(read(path)) == "parent", "children must not share state"
            assert parent.run(read(path)) == "parent", "a child must not change its parent"
        finally:
            for child in children:
                child.close()
        for child in children:
            with pytest.raises(SandboxNotFound):
                child.info()


def test_checkpoint_and_restore(sandbox, path):
    with sandbox.create_sandbox(ttl_seconds=TTL) as sb:
        sb.run_code(write(path, "at checkpoint"))
        with sb.checkpoint() as ckpt:
            assert ckpt.checkpoint_id.startswith("ckpt_") and ckpt.dirty_bytes > 0
            assert ckpt.pause_ms >= 0 and ckpt.sandbox_id == sb.sandbox_id
            sb.run_code(write(path, "after checkpoint"))
            assert sb.run(read(path)) == "after checkpoint"
            info = sb.restore(ckpt)
            assert info.restore_ms is not None and info.restore_ms >= 0
            assert sb.run(read(path)) == "at checkpoint"
            with sandbox.create_sandbox(from_checkpoint=ckpt, ttl_seconds=TTL) as copy:
                assert copy.sandbox_id != sb.sandbox_id
                assert copy.run(read(path)) == "at checkpoint"
        with pytest.raises(CheckpointNotFound) as info:
            sb.restore(ckpt)
        assert info.value.checkpoint_id == ckpt.checkpoint_id
        with pytest.raises(CheckpointNotFound):
            ckpt.delete()


def test_batch_from_a_sandbox_leaves_it_unchanged(sandbox, path):
    with sandbox.create_sandbox(ttl_seconds=TTL) as sb:
        sb.run_code(write(path, "base"))
        results = sb.run_batch([read(path), write(path, "candidate 1") + "\n" + read(path),
                                {"code": "import sys; sys.exit(4)"}])
        assert [r.stdout for r in results] == ["base\n", "candidate 1\n", ""]
        assert [r.exit_code for r in results] == [0, 0, 4]
        assert sb.run(read(path)) == "base"


def test_async_with_deletes_the_sandbox(live_url, live_key, path):
    async def main():
        async with AsyncSandbox(live_key, live_url) as client:
            async with client.create_sandbox(ttl_seconds=TTL) as sb:
                await sb.run_code(write(path, "async"))
                assert await sb.run(read(path)) == "async"
                (child,) = await sb.fork(1)
                async with child:
                    assert await child.run(read(path)) == "async"
            with pytest.raises(SandboxNotFound):
                await client.get_sandbox(sb.sandbox_id)
            with pytest.raises(SandboxNotFound):
                await client.get_sandbox(child.sandbox_id)

    asyncio.run(main())


def test_create_owning_its_client(live_url, live_key):
    with LiveSandbox.create(api_key=live_key, base_url=live_url, ttl_seconds=TTL) as sb:
        assert sb.run("print('own client')") == "own client"
    assert sb.client._transport._closed


def test_unknown_ids_are_not_found(sandbox):
    with pytest.raises(SandboxNotFound):
        sandbox.get_sandbox("sbx_" + uuid.uuid4().hex)
    with pytest.raises(CheckpointNotFound):
        sandbox.delete_checkpoint("ckpt_" + uuid.uuid4().hex)


# -- need the agent that keeps a session's Python namespace ----------------------------

@pytest.mark.session_globals
def test_globals_persist_and_the_final_expression_is_the_result(sandbox):
    with sandbox.create_sandbox(ttl_seconds=TTL) as sb:
        first = sb.run_code("x = 1")
        assert (first.exit_code, first.result, first.execution_count) == (0, None, 1)
        second = sb.run_code("x + 1")
        assert (second.exit_code, second.result, second.execution_count) == (0, "2", 2), second.stderr
        assert sb.run_code("import numpy as np\narr = np.arange(4)").result is None
        assert sb.run_code("int(arr.sum()) + x").result == "7"
        assert sb.run_code("'text'").result == "'text'"


@pytest.mark.session_globals
def test_fork_children_see_the_parent_globals_and_diverge(sandbox):
    with sandbox.create_sandbox(ttl_seconds=TTL) as parent:
        parent.run_code("x = 10")
        children = parent.fork(2)
        try:
            a, b = children
            a.run_code("x += 1")
            assert a.run_code("x").result == "11"
            assert b.run_code("x").result == "10"
            assert parent.run_code("x").result == "10"
        finally:
            for child in children:
                child.close()


@pytest.mark.session_globals
def test_restore_rolls_back_globals(sandbox):
    with sandbox.create_sandbox(ttl_seconds=TTL) as sb:
        sb.run_code("x = 1")
        with sb.checkpoint() as ckpt:
            sb.run_code("x = 2")
            assert sb.run_code("x").result == "2"
            sb.restore(ckpt)
            assert sb.run_code("x").result == "1"


@pytest.mark.session_globals
def test_a_timed_out_run_is_interrupted_and_the_session_stays(sandbox):
    with sandbox.create_sandbox(ttl_seconds=TTL) as sb:
        sb.run_code("x = 5")
        started = time.monotonic()
        stuck = sb.run_code("while True: pass", timeout=1)
        assert stuck.timed_out and time.monotonic() - started < 15
        assert "KeyboardInterrupt" in stuck.stderr
        assert sb.run_code("x").result == "5"
