"""The synchronous kvmfork client."""

from __future__ import annotations

import email.utils
import json
import os
import random
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from . import __version__
from .errors import (APIError, AuthError, BadRequest, CheckpointNotFound, ExecError, KvmforkError,
                     NetworkError, ProtocolError, QuotaExceeded, RateLimitError, SandboxEnded,
                     SandboxError, SandboxExpired, SandboxNotFound, SandboxTimeout, ServerBusy)
from .models import BatchItem, ExecRequest, ExecResult
from .transport import Response, Transport

if TYPE_CHECKING:
    from .session import Checkpoint, LiveSandbox, SandboxList
    from .tool import SandboxTool

DEFAULT_BASE_URL = "http://127.0.0.1:8080"
#: The server's own default for ``timeout_seconds``.
SERVER_DEFAULT_EXEC_TIMEOUT = 30.0
# Added to the sandbox time limit to get the HTTP timeout: queueing and forking
# happen before the guest's clock starts.
_HTTP_TIMEOUT_MARGIN = 30.0
_HEALTH_TIMEOUT = 10.0


def _setting(name: str) -> Optional[str]:
    """``KVMFORK_<name>``, else the pre-rename ``FORKD_<name>`` (deprecated, warned)."""
    value = os.environ.get("KVMFORK_" + name)
    if value:
        return value
    legacy = os.environ.get("FORKD_" + name)
    if legacy:
        warnings.warn(f"FORKD_{name} is deprecated and will stop working in the next release; "
                      f"set KVMFORK_{name} instead", DeprecationWarning, stacklevel=3)
    return legacy or None


def resolve_api_key(api_key: Optional[str]) -> Optional[str]:
    """The key from the argument, else ``KVMFORK_API_KEY``, else ``ZEROBOOT_API_KEY``
    (else the deprecated ``FORKD_API_KEY``)."""
    return (api_key or os.environ.get("KVMFORK_API_KEY") or os.environ.get("ZEROBOOT_API_KEY")
            or _setting("API_KEY"))


class Sandbox:
    """Runs code in throwaway kvmfork sandboxes.

    ``timeout`` is the HTTP timeout in seconds for each call; by default it is
    the run's own time limit plus a margin, so a slow run is never cut off by
    the client first. 429 and 503 answers (and refused connections) are
    retried up to ``max_retries`` times, waiting what ``Retry-After`` says or
    an exponential backoff from ``backoff`` seconds, capped at ``max_backoff``.
    A ``Retry-After`` longer than ``max_backoff`` is not waited for: the error
    is raised at once so the caller can decide.

    Safe to share between threads.
    """

    def __init__(self, api_key: Optional[str] = None, base_url: Optional[str] = None, *,
                 timeout: Optional[float] = None, max_retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 30.0, pool_size: int = 8):
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0")
        self.api_key = resolve_api_key(api_key)
        self.base_url = (base_url or _setting("URL") or DEFAULT_BASE_URL).rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        headers = {"User-Agent": f"kvmfork-python/{__version__}", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._transport = Transport(self.base_url, headers, pool_size)
        # Replaceable in tests to observe retry delays without waiting.
        self._sleep: Callable[[float], None] = time.sleep

    # -- public API ---------------------------------------------------------

    def run(self, code: str, language: str = "python", timeout: Optional[float] = None) -> str:
        """Runs ``code`` and returns its stdout without trailing newlines.

        Raises :class:`ExecError` (with ``stderr`` and ``exit_code``) on a
        non-zero exit, :class:`SandboxTimeout` when the time limit fired and
        :class:`SandboxError` when the sandbox itself failed.
        """
        return check_result(self.exec(code, language, timeout), timeout).stdout.rstrip("\n")

    def exec(self, code: str, language: str = "python", timeout: Optional[float] = None) -> ExecResult:
        """Runs ``code`` and returns the full :class:`ExecResult`; never raises for what the code did."""
        body = ExecRequest(code, language, timeout).to_wire()
        resp = self._call("POST", "/v1/exec", body, self._http_timeout([timeout]))
        return ExecResult.from_wire(_json(resp))

    def run_batch(self, items: Sequence[BatchItem], language: str = "python",
                  timeout: Optional[float] = None) -> List[ExecResult]:
        """Runs several snippets, each in its own sandbox; results come back in order.

        Items are strings (using ``language``/``timeout``), :class:`ExecRequest`
        objects, or dicts with ``code`` and optional ``language`` and
        ``timeout`` (or ``timeout_seconds``). Failed items do not raise: check
        each result's ``ok`` (or pass it to :func:`check_result`).
        """
        requests = [to_request(item, language, timeout) for item in items]
        body = {"executions": [r.to_wire() for r in requests]}
        resp = self._call("POST", "/v1/exec/batch", body,
                          self._http_timeout([r.timeout for r in requests]))
        data = _json(resp)
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list) or len(results) != len(requests):
            raise ProtocolError(f"batch answer has no 'results' list of {len(requests)} items")
        return [ExecResult.from_wire(r) for r in results]

    def health(self) -> Dict[str, Any]:
        """``GET /v1/health``: ``{"status": "ok", "languages": [...], "templates": {...}, ...}``.

        ``templates`` maps each language the server serves to its template's
        state, e.g. ``{"python": {"ready": True, "state": "ready", ...},
        "node": {"ready": False, "state": "building", ...}}``; a failed build
        has ``"state": "failed"`` and an ``"error"`` text.

        Not retried: a draining server answers 503 with ``"status": "draining"``,
        which is returned like any other state.
        """
        resp = self._transport.request("GET", "/v1/health", None, self.timeout or _HEALTH_TIMEOUT)
        if resp.status != 200 and not (resp.status == 503 and _is_health_body(resp.body)):
            raise error_from_response(resp)
        data = _json(resp)
        if not isinstance(data, dict):
            raise ProtocolError("health answer is not a JSON object")
        return data

    def metrics(self) -> str:
        """``GET /v1/metrics``: Prometheus text exposition."""
        resp = self._call("GET", "/v1/metrics", None, self.timeout or _HEALTH_TIMEOUT)
        return resp.body.decode("utf-8", "replace")

    # -- live sandboxes (sessions) --------------------------------------------

    def create_sandbox(self, language: Optional[str] = None, *,
                       ttl_seconds: Optional[float] = None,
                       metadata: Optional[Mapping[str, Any]] = None,
                       from_checkpoint: "Union[None, str, Checkpoint]" = None) -> "LiveSandbox":
        """Starts a live sandbox whose state persists between runs
        (``POST /v1/sandboxes``). ``language`` defaults to the server's
        (python), ``ttl_seconds`` to 300; ``from_checkpoint`` starts it from a
        :class:`~kvmfork.Checkpoint` (or its id) instead of the template.
        Use it as a context manager to delete it on exit."""
        from .session import create_sandbox

        return create_sandbox(self, language, ttl_seconds=ttl_seconds, metadata=metadata,
                              from_checkpoint=from_checkpoint)

    def create_sandboxes(self, count: int, language: Optional[str] = None, *,
                         ttl_seconds: Optional[float] = None,
                         metadata: Optional[Mapping[str, Any]] = None,
                         from_checkpoint: "Union[None, str, Checkpoint]" = None,
                         allow_partial: bool = False) -> "SandboxList":
        """Starts ``count`` live sandboxes in one request. When some cannot be
        started, the others are deleted and :class:`~kvmfork.PartialFailure`
        is raised (``allow_partial=True``: returned, failures in ``.errors``)."""
        from .session import create_sandboxes

        return create_sandboxes(self, count, language, ttl_seconds=ttl_seconds,
                                metadata=metadata, from_checkpoint=from_checkpoint,
                                allow_partial=allow_partial)

    def get_sandbox(self, sandbox_id: str) -> "LiveSandbox":
        """The live sandbox ``sandbox_id`` of this key; raises
        :class:`~kvmfork.SandboxNotFound` (``SandboxExpired``, ``SandboxEnded``)."""
        from .session import get_sandbox

        return get_sandbox(self, sandbox_id)

    def list_sandboxes(self) -> "List[LiveSandbox]":
        """This key's live sandboxes, oldest first (``GET /v1/sandboxes``)."""
        from .session import list_sandboxes

        return list_sandboxes(self)

    def delete_checkpoint(self, checkpoint: "Union[str, Checkpoint]") -> None:
        """Drops a checkpoint; raises :class:`~kvmfork.CheckpointNotFound` when it is gone."""
        from .session import delete_checkpoint

        delete_checkpoint(self, checkpoint)

    def as_tool(self, name: str = "run_code", description: Optional[str] = None,
                languages: Sequence[str] = ("python", "node"),
                timeout: Optional[float] = None) -> "SandboxTool":
        """A :class:`~kvmfork.tool.SandboxTool` that lets an LLM call this sandbox."""
        from .tool import SandboxTool

        return SandboxTool(self, name=name, description=description, languages=languages,
                           timeout=timeout)

    def tool_spec(self, format: str = "openai", **kwargs: Any) -> Dict[str, Any]:
        """JSON-schema function description of :meth:`as_tool` for an LLM API."""
        return self.as_tool(**kwargs).spec(format)

    def close(self) -> None:
        """Closes idle connections; the client cannot be used afterwards."""
        self._transport.close()

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sandbox(base_url={self.base_url!r}, api_key={'set' if self.api_key else 'unset'})"

    # -- internals ----------------------------------------------------------

    def _http_timeout(self, exec_timeouts: Sequence[Optional[float]]) -> float:
        if self.timeout is not None:
            return self.timeout
        # A batch may run its items one after another on a busy server.
        limit = sum(t if t is not None and t > 0 else SERVER_DEFAULT_EXEC_TIMEOUT
                    for t in exec_timeouts)
        return limit + _HTTP_TIMEOUT_MARGIN

    def _call(self, method: str, path: str, payload: Optional[Mapping[str, Any]],
              timeout: float, *, sandbox_id: Optional[str] = None,
              checkpoint_id: Optional[str] = None) -> Response:
        body = json.dumps(payload).encode("utf-8") if payload is not None else None
        attempt = 0
        while True:
            try:
                resp = self._transport.request(method, path, body, timeout)
            except NetworkError as exc:
                if exc.sent or attempt >= self.max_retries:
                    raise
                delay = self._backoff_delay(attempt)
            else:
                if 200 <= resp.status < 300:
                    return resp
                error = error_from_response(resp, sandbox_id=sandbox_id,
                                            checkpoint_id=checkpoint_id)
                if not isinstance(error, (RateLimitError, ServerBusy)) or attempt >= self.max_retries:
                    raise error
                # A quota (too many live sandboxes, checkpoint budget) is not
                # freed by waiting: only retry when the server says when.
                if isinstance(error, QuotaExceeded) and error.retry_after is None:
                    raise error
                if error.retry_after is not None:
                    if error.retry_after > self.max_backoff:
                        raise error
                    delay = error.retry_after
                else:
                    delay = self._backoff_delay(attempt)
            self._sleep(delay)
            attempt += 1

    def _backoff_delay(self, attempt: int) -> float:
        ceiling = min(self.max_backoff, self.backoff * (2.0 ** attempt))
        # Half fixed, half random: keeps growth but spreads clients that were
        # refused at the same moment.
        return ceiling / 2 + random.uniform(0, ceiling / 2)


def check_result(result: ExecResult, timeout: Optional[float] = None) -> ExecResult:
    """Returns ``result`` if the code exited 0, else raises the matching error."""
    if result.timed_out:
        limit = timeout if timeout is not None else SERVER_DEFAULT_EXEC_TIMEOUT
        raise SandboxTimeout(f"code did not finish within its {limit:g}s time limit", result)
    if result.error is not None:
        raise SandboxError(f"sandbox failed ({result.error.code}): {result.error.message}", result)
    if result.exit_code != 0:
        raise ExecError(f"code exited with status {result.exit_code}"
                        f"{_last_line(result.stderr)}", result)
    return result


def to_request(item: BatchItem, language: str, timeout: Optional[float]) -> ExecRequest:
    """Normalises one :meth:`Sandbox.run_batch` item."""
    if isinstance(item, ExecRequest):
        return item
    if isinstance(item, str):
        return ExecRequest(item, language, timeout)
    if isinstance(item, Mapping):
        if not isinstance(item.get("code"), str):
            raise TypeError("a batch item dict needs a 'code' string")
        item_timeout = item.get("timeout", item.get("timeout_seconds", timeout))
        return ExecRequest(item["code"], item.get("language", language), item_timeout)
    raise TypeError(f"a batch item must be a str, dict or ExecRequest, not {type(item).__name__}")


def error_from_response(resp: Response, *, sandbox_id: Optional[str] = None,
                        checkpoint_id: Optional[str] = None) -> KvmforkError:
    """Maps an HTTP error answer to its typed exception (``sandbox_id`` and
    ``checkpoint_id`` name what the request was about, for the 404 errors)."""
    code, message = None, None
    try:
        data = json.loads(resp.body)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            code, message = err.get("code"), err.get("message")
        elif isinstance(err, str):
            message = err
    except ValueError:
        pass
    if message is None:
        message = resp.body.decode("utf-8", "replace").strip()[:500] or "no details"
    text = f"HTTP {resp.status}{f' {code}' if code else ''}: {message}"
    return typed_error(resp.status, code, text,
                       retry_after=parse_retry_after(resp.headers.get("Retry-After")),
                       sandbox_id=sandbox_id, checkpoint_id=checkpoint_id)


#: 429 codes for quotas that waiting does not clear (see :class:`QuotaExceeded`).
QUOTA_CODES = frozenset({"too_many_sandboxes", "server_sandbox_limit",
                         "checkpoint_budget_exceeded"})

# The status of each session error code, for the per-item errors inside a
# 201 answer (fork or create of several sandboxes), which carry none.
_SESSION_CODE_STATUS = {
    "too_many_sandboxes": 429, "server_sandbox_limit": 429, "checkpoint_budget_exceeded": 429,
    "sandbox_not_found": 404, "sandbox_expired": 404, "sandbox_ended": 404,
    "checkpoint_not_found": 404, "sandbox_busy": 503, "queue_full": 503,
    "invalid_ttl": 400, "invalid_count": 400, "language_mismatch": 400,
    "checkpoint_mismatch": 400, "no_template": 400, "fork_failed": 500,
    "checkpoint_failed": 500, "internal": 500,
}


def typed_error(status: Optional[int], code: Optional[str], text: str, *,
                retry_after: Optional[float] = None, sandbox_id: Optional[str] = None,
                checkpoint_id: Optional[str] = None) -> KvmforkError:
    """The exception for an error ``code`` (and HTTP ``status``, inferred from
    the code when None)."""
    if status is None and code is not None:
        status = _SESSION_CODE_STATUS.get(code)
    if status in (400, 411, 413, 417, 422, 431):
        return BadRequest(text, status=status, code=code)
    if status in (401, 403):
        return AuthError(text, status=status, code=code)
    if status == 404:
        if code == "sandbox_expired":
            return SandboxExpired(text, status=status, code=code, sandbox_id=sandbox_id)
        if code == "sandbox_ended":
            return SandboxEnded(text, status=status, code=code, sandbox_id=sandbox_id)
        if code == "sandbox_not_found":
            return SandboxNotFound(text, status=status, code=code, sandbox_id=sandbox_id)
        if code == "checkpoint_not_found":
            return CheckpointNotFound(text, status=status, code=code, checkpoint_id=checkpoint_id)
    if status == 429:
        cls = QuotaExceeded if code in QUOTA_CODES else RateLimitError
        return cls(text, status=status, code=code, retry_after=retry_after)
    if status == 503:
        return ServerBusy(text, status=status, code=code, retry_after=retry_after)
    return APIError(text, status=status, code=code)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _json(resp: Response) -> Any:
    try:
        return json.loads(resp.body)
    except ValueError as exc:
        raise ProtocolError(f"HTTP {resp.status} answer is not JSON: {resp.body[:200]!r}") from exc


def _is_health_body(body: bytes) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and isinstance(data.get("status"), str)


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return f": {lines[-1].strip()}" if lines else ""
