"""Typed errors raised by the kvmfork client.

Every error derives from :class:`KvmforkError`, so ``except KvmforkError`` catches
everything the SDK raises on purpose. HTTP-level failures carry the status and
the server's machine-readable ``code``; sandbox-level failures carry the
:class:`~kvmfork.models.ExecResult` that caused them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

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
