"""``AsyncSandbox``: the same API for asyncio code.

Each call runs the thread-safe synchronous client in a worker thread
(``asyncio.to_thread``), so concurrent awaits run concurrently on the server.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

from .client import Sandbox
from .aio_session import (AsyncCheckpoint, AsyncLiveSandbox, AsyncSandboxList, Starting,
                          _sync_list)
from .models import BatchItem, ExecResult
from .session import Checkpoint

if TYPE_CHECKING:
    from .tool import AsyncSandboxTool


class AsyncSandbox:
    """Asynchronous twin of :class:`~kvmfork.Sandbox`; takes the same arguments."""

    def __init__(self, api_key: Optional[str] = None, base_url: Optional[str] = None,
                 **options: Any):
        self.sync = Sandbox(api_key, base_url, **options)

    @property
    def base_url(self) -> str:
        return self.sync.base_url

    async def run(self, code: str, language: str = "python", timeout: Optional[float] = None) -> str:
        return await asyncio.to_thread(self.sync.run, code, language, timeout)

    async def exec(self, code: str, language: str = "python",
                   timeout: Optional[float] = None) -> ExecResult:
        return await asyncio.to_thread(self.sync.exec, code, language, timeout)

    async def run_batch(self, items: Sequence[BatchItem], language: str = "python",
                        timeout: Optional[float] = None) -> List[ExecResult]:
        return await asyncio.to_thread(self.sync.run_batch, items, language, timeout)

    async def health(self) -> Dict[str, Any]:
        return await asyncio.to_thread(self.sync.health)

    async def metrics(self) -> str:
        return await asyncio.to_thread(self.sync.metrics)

    # -- live sandboxes (sessions) --------------------------------------------

    def create_sandbox(self, language: Optional[str] = None, *,
                       ttl_seconds: Optional[float] = None,
                       metadata: Optional[Mapping[str, Any]] = None,
                       from_checkpoint: "Union[None, str, Checkpoint, AsyncCheckpoint]" = None,
                       ) -> "Starting[AsyncLiveSandbox]":
        """Starts a live sandbox: ``sb = await client.create_sandbox(...)``, or
        ``async with client.create_sandbox(...) as sb:`` to delete it on exit."""
        if isinstance(from_checkpoint, AsyncCheckpoint):
            from_checkpoint = from_checkpoint.sync

        async def start() -> AsyncLiveSandbox:
            return AsyncLiveSandbox(await asyncio.to_thread(
                self.sync.create_sandbox, language, ttl_seconds=ttl_seconds, metadata=metadata,
                from_checkpoint=from_checkpoint))

        return Starting(start)

    async def create_sandboxes(self, count: int, language: Optional[str] = None, *,
                               ttl_seconds: Optional[float] = None,
                               metadata: Optional[Mapping[str, Any]] = None,
                               from_checkpoint: "Union[None, str, Checkpoint, AsyncCheckpoint]" = None,
                               allow_partial: bool = False) -> AsyncSandboxList:
        if isinstance(from_checkpoint, AsyncCheckpoint):
            from_checkpoint = from_checkpoint.sync
        return AsyncSandboxList(await asyncio.to_thread(
            self.sync.create_sandboxes, count, language, ttl_seconds=ttl_seconds,
            metadata=metadata, from_checkpoint=from_checkpoint, allow_partial=allow_partial))

    async def get_sandbox(self, sandbox_id: str) -> AsyncLiveSandbox:
        return AsyncLiveSandbox(await asyncio.to_thread(self.sync.get_sandbox, sandbox_id))

    async def list_sandboxes(self) -> List[AsyncLiveSandbox]:
        return await asyncio.to_thread(_sync_list, self.sync)

    async def delete_checkpoint(self, checkpoint: "Union[str, Checkpoint, AsyncCheckpoint]") -> None:
        if isinstance(checkpoint, AsyncCheckpoint):
            checkpoint = checkpoint.sync
        await asyncio.to_thread(self.sync.delete_checkpoint, checkpoint)

    def as_tool(self, name: str = "run_code", description: Optional[str] = None,
                languages: Sequence[str] = ("python", "node"),
                timeout: Optional[float] = None) -> "AsyncSandboxTool":
        """An :class:`~kvmfork.tool.AsyncSandboxTool` (its call is awaitable)."""
        from .tool import AsyncSandboxTool

        return AsyncSandboxTool(self.sync, name=name, description=description,
                                languages=languages, timeout=timeout)

    def tool_spec(self, format: str = "openai", **kwargs: Any) -> Dict[str, Any]:
        return self.sync.tool_spec(format, **kwargs)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
