"""``AsyncSandbox``: the same API for asyncio code.

Each call runs the thread-safe synchronous client in a worker thread
(``asyncio.to_thread``), so concurrent awaits run concurrently on the server.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from .client import Sandbox
from .models import BatchItem, ExecResult

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
