"""Asynchronous live sandboxes: :class:`AsyncLiveSandbox` wraps a
:class:`~kvmfork.LiveSandbox` and runs each call in a worker thread.

>>> async with client.create_sandbox() as sb:       # client: AsyncSandbox; deleted on exit
...     await sb.run_code("x = 1")
...     (await sb.run_code("x + 1")).result
'2'
"""

from __future__ import annotations

import asyncio
from typing import (TYPE_CHECKING, Any, Awaitable, Callable, Dict, Generator, Generic, List,
                    Mapping, Optional, Sequence, Tuple, TypeVar, Union)

from .errors import KvmforkError
from .models import BatchItem, ExecResult
from .session import Checkpoint, LiveSandbox, SandboxInfo, SandboxList, SessionExecResult

if TYPE_CHECKING:
    from .client import Sandbox

T = TypeVar("T")


class AsyncCheckpoint:
    """Asynchronous twin of :class:`~kvmfork.Checkpoint`; ``async with`` deletes it."""

    def __init__(self, sync: Checkpoint):
        self.sync = sync

    @property
    def checkpoint_id(self) -> str:
        return self.sync.checkpoint_id

    id = checkpoint_id

    @property
    def dirty_bytes(self) -> int:
        return self.sync.dirty_bytes

    @property
    def pause_ms(self) -> float:
        return self.sync.pause_ms

    @property
    def sandbox_id(self) -> str:
        return self.sync.sandbox_id

    async def delete(self) -> None:
        await asyncio.to_thread(self.sync.delete)

    async def create_sandbox(self, ttl_seconds: Optional[float] = None,
                             metadata: Optional[Mapping[str, Any]] = None) -> "AsyncLiveSandbox":
        return AsyncLiveSandbox(await asyncio.to_thread(self.sync.create_sandbox, ttl_seconds,
                                                        metadata))

    async def __aenter__(self) -> "AsyncCheckpoint":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.to_thread(self.sync.__exit__, *exc)

    def __repr__(self) -> str:
        return f"Async{self.sync!r}"


class AsyncSandboxList(List["AsyncLiveSandbox"]):
    """:class:`~kvmfork.session.SandboxList` of :class:`AsyncLiveSandbox`."""

    def __init__(self, sync: SandboxList):
        super().__init__(AsyncLiveSandbox(sb) for sb in sync)
        self.errors: List[Tuple[int, KvmforkError]] = sync.errors
        self.source_id = sync.source_id
        self.pause_ms = sync.pause_ms


class AsyncLiveSandbox:
    """Asynchronous twin of :class:`~kvmfork.LiveSandbox`; ``async with`` deletes it."""

    def __init__(self, sync: LiveSandbox):
        self.sync = sync

    @classmethod
    async def create(cls, language: Optional[str] = None, **kwargs: Any) -> "AsyncLiveSandbox":
        """Like :meth:`LiveSandbox.create` (``client=`` takes a sync
        :class:`~kvmfork.Sandbox` or an :class:`~kvmfork.AsyncSandbox`)."""
        client = kwargs.get("client")
        if client is not None and hasattr(client, "sync"):
            kwargs["client"] = client.sync
        return cls(await asyncio.to_thread(lambda: LiveSandbox.create(language, **kwargs)))

    @classmethod
    async def connect(cls, sandbox_id: str, **kwargs: Any) -> "AsyncLiveSandbox":
        client = kwargs.get("client")
        if client is not None and hasattr(client, "sync"):
            kwargs["client"] = client.sync
        return cls(await asyncio.to_thread(lambda: LiveSandbox.connect(sandbox_id, **kwargs)))

    @property
    def sandbox_id(self) -> str:
        return self.sync.sandbox_id

    id = sandbox_id

    @property
    def last_info(self) -> SandboxInfo:
        return self.sync.last_info

    @property
    def language(self) -> str:
        return self.sync.language

    @property
    def metadata(self) -> Optional[Dict[str, Any]]:
        return self.sync.metadata

    @property
    def expires_at(self) -> float:
        return self.sync.expires_at

    @property
    def execution_count(self) -> int:
        return self.sync.execution_count

    @property
    def closed(self) -> bool:
        return self.sync.closed

    async def run_code(self, code: str, timeout: Optional[float] = None, *,
                       language: Optional[str] = None) -> SessionExecResult:
        return await asyncio.to_thread(self.sync.run_code, code, timeout, language=language)

    async def run(self, code: str, timeout: Optional[float] = None) -> str:
        return await asyncio.to_thread(self.sync.run, code, timeout)

    async def run_batch(self, items: Sequence[BatchItem],
                        timeout: Optional[float] = None) -> List[ExecResult]:
        return await asyncio.to_thread(self.sync.run_batch, items, timeout)

    async def fork(self, n: int = 1, ttl_seconds: Optional[float] = None, *,
                   allow_partial: bool = False) -> AsyncSandboxList:
        return AsyncSandboxList(await asyncio.to_thread(self.sync.fork, n, ttl_seconds,
                                                        allow_partial=allow_partial))

    async def checkpoint(self) -> AsyncCheckpoint:
        return AsyncCheckpoint(await asyncio.to_thread(self.sync.checkpoint))

    async def restore(self, checkpoint: Union[str, Checkpoint, AsyncCheckpoint]) -> SandboxInfo:
        if isinstance(checkpoint, AsyncCheckpoint):
            checkpoint = checkpoint.sync
        return await asyncio.to_thread(self.sync.restore, checkpoint)

    async def set_timeout(self, seconds: float) -> SandboxInfo:
        return await asyncio.to_thread(self.sync.set_timeout, seconds)

    async def info(self) -> SandboxInfo:
        return await asyncio.to_thread(self.sync.info)

    refresh = info

    async def is_running(self) -> bool:
        return await asyncio.to_thread(self.sync.is_running)

    async def delete(self) -> None:
        await asyncio.to_thread(self.sync.delete)

    async def close(self) -> bool:
        return await asyncio.to_thread(self.sync.close)

    kill = close

    async def __aenter__(self) -> "AsyncLiveSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await asyncio.to_thread(self.sync.__exit__, *exc)

    def __repr__(self) -> str:
        return f"Async{self.sync!r}"


class Starting(Generic[T]):
    """An awaitable that is also an async context manager, so both
    ``sb = await client.create_sandbox()`` and
    ``async with client.create_sandbox() as sb:`` work."""

    def __init__(self, start: Callable[[], Awaitable[T]]):
        self._start = start
        self._value: Optional[T] = None

    def __await__(self) -> Generator[Any, None, T]:
        return self._start().__await__()

    async def __aenter__(self) -> T:
        self._value = await self._start()
        return await self._value.__aenter__()  # type: ignore[attr-defined,no-any-return]

    async def __aexit__(self, *exc: Any) -> None:
        assert self._value is not None
        await self._value.__aexit__(*exc)  # type: ignore[attr-defined]


def _sync_list(client: "Sandbox") -> List[AsyncLiveSandbox]:
    return [AsyncLiveSandbox(sb) for sb in client.list_sandboxes()]
