"""Typed errors raised by the kvmfork client.

Every error derives from :class:`KvmforkError`, so ``except KvmforkError`` catches
everything the SDK raises on purpose. HTTP-level failures carry the status and
the server's machine-readable ``code``; sandbox-level failures carry the
:class:`~kvmfork.models.ExecResult` that caused them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

if TYPE_CHECKING:
    from .models import ExecResult


class KvmforkError(Exception):
    """Base class of every error raised by the SDK.

    ``status`` is the HTTP status when the server answered with an error,
    ``code`` the server's error code (e.g. ``"unknown_language"``).
    """

    def __init__(self, message: str, *, status: Optional[int] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class NetworkError(KvmforkError):
    """The server could not be reached, or the connection broke or timed out.

    ``sent`` is False when the request certainly never reached the server
    (connection refused, DNS failure), which makes it safe to retry.
    """

    def __init__(self, message: str, *, sent: bool = True):
        super().__init__(message)
        self.sent = sent


class ProtocolError(KvmforkError):
    """The server answered something that is not the kvmfork API (bad JSON, wrong shape)."""


class APIError(KvmforkError):
    """An HTTP error status without a more specific class (404, 405, 500, ...)."""


class BadRequest(APIError):
    """400 (or 413): the request was refused as invalid; retrying will not help."""


class AuthError(APIError):
    """401: the API key is missing or not accepted."""


class RateLimitError(APIError):
    """429: this key exceeded its rate limit; ``retry_after`` is in seconds (or None)."""

    def __init__(self, message: str, *, status: Optional[int] = None, code: Optional[str] = None,
                 retry_after: Optional[float] = None):
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class ServerBusy(APIError):
    """503: the server is overloaded or draining; ``retry_after`` is in seconds (or None)."""

    def __init__(self, message: str, *, status: Optional[int] = None, code: Optional[str] = None,
                 retry_after: Optional[float] = None):
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class SandboxError(KvmforkError):
    """The sandbox did not finish normally (guest crash, memory limit, ...).

    Raised by :meth:`Sandbox.run`; :meth:`Sandbox.exec` returns the result instead.
    """

    def __init__(self, message: str, result: "ExecResult"):
        code = result.error.code if result.error else None
        super().__init__(message, code=code)
        self.result = result


class SandboxTimeout(SandboxError):
    """The code ran longer than its ``timeout`` and the sandbox was stopped."""


class ExecError(SandboxError):
    """The code exited with a non-zero status; ``stderr`` holds e.g. the traceback."""

    def __init__(self, message: str, result: "ExecResult"):
        super().__init__(message, result)
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exit_code = result.exit_code


class QuotaExceeded(RateLimitError):
    """429 for a limit that waiting does not clear: ``too_many_sandboxes`` (this key
    holds its maximum of live sandboxes), ``server_sandbox_limit`` (the server is
    full) or ``checkpoint_budget_exceeded`` (this key's checkpoints would exceed
    its memory budget).

    Not retried unless the server sends ``Retry-After``: delete sandboxes or
    checkpoints first. Still a :class:`RateLimitError`, so code that catches
    every 429 keeps working.
    """


class SandboxNotFound(APIError):
    """404: the live sandbox is gone, or never existed for this API key.

    ``sandbox_id`` names it (when the SDK knows it) and ``reason`` says why:
    ``"not_found"`` (unknown, deleted, or another key's), ``"expired"``
    (:class:`SandboxExpired`: its TTL ran out) or ``"ended"``
    (:class:`SandboxEnded`: a run crashed it or could not be interrupted;
    ``message`` says which). Everything the sandbox held is lost.
    """

    reason = "not_found"

    def __init__(self, message: str, *, status: Optional[int] = None, code: Optional[str] = None,
                 sandbox_id: Optional[str] = None):
        super().__init__(message, status=status, code=code)
        self.sandbox_id = sandbox_id


class SandboxExpired(SandboxNotFound):
    """404 ``sandbox_expired``: the sandbox reached its ``expires_at`` and was stopped.
    Extend TTLs with ``set_timeout()`` before they run out."""

    reason = "expired"


class SandboxEnded(SandboxNotFound):
    """404 ``sandbox_ended``: the server stopped the sandbox because a run crashed
    it, hit its memory limit or could not be interrupted after a timeout."""

    reason = "ended"


class CheckpointNotFound(APIError):
    """404 ``checkpoint_not_found``: unknown, deleted, or another key's checkpoint."""

    def __init__(self, message: str, *, status: Optional[int] = None, code: Optional[str] = None,
                 checkpoint_id: Optional[str] = None):
        super().__init__(message, status=status, code=code)
        self.checkpoint_id = checkpoint_id


class PartialFailure(KvmforkError):
    """Some of the sandboxes asked for by ``fork(n)`` or ``create_sandboxes(n)``
    could not be started.

    ``errors`` holds ``(index, error)`` pairs, each error typed as if it had
    been the answer to a single request (e.g. :class:`QuotaExceeded` for
    ``too_many_sandboxes``). The sandboxes that did start were deleted before
    this was raised (pass ``allow_partial=True`` to keep them instead);
    ``status`` and ``code`` are those of the first failure.
    """

    def __init__(self, message: str, errors: "List[Tuple[int, KvmforkError]]"):
        first = errors[0][1] if errors else None
        super().__init__(message, status=first.status if first else None,
                         code=first.code if first else None)
        self.errors = errors
