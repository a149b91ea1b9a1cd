"""Request and response types of the kvmfork API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Union

from .errors import ProtocolError

#: Languages the server accepts; ``javascript`` is an alias of ``node``.
LANGUAGES = ("python", "node", "javascript")


@dataclass(frozen=True)
class ErrorInfo:
    """Why a run ended without a normal exit (``code`` e.g. ``"guest_crashed"``)."""

    code: str
    message: str


@dataclass(frozen=True)
class ExecRequest:
    """One piece of code for :meth:`Sandbox.run_batch` (a plain ``str`` or dict works too)."""

    code: str
    language: str = "python"
    timeout: Optional[float] = None

    def to_wire(self) -> Dict[str, Any]:
        body: Dict[str, Any] = {"code": self.code, "language": self.language}
        if self.timeout is not None:
            body["timeout_seconds"] = self.timeout
        return body


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one run, as answered by ``POST /v1/exec``.

    ``exit_code`` follows ``python -c`` / ``node -e`` semantics and is -1 when
    the run timed out or failed (then ``timed_out`` or ``error`` say why).
    Times are milliseconds measured by the server.
    """

    id: str
    stdout: str
    stderr: str
    exit_code: int
    fork_time_ms: float
    exec_time_ms: float
    total_time_ms: float
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    error: Optional[ErrorInfo] = None
    #: The decoded JSON object, for fields newer than this SDK.
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def output(self) -> str:
        """Alias of ``stdout`` (the name in the Zeroboot skill card's API reference)."""
        return self.stdout

    @property
    def duration_ms(self) -> float:
        """Alias of ``total_time_ms`` (the name in the Zeroboot skill card's API reference)."""
        return self.total_time_ms

    @property
    def ok(self) -> bool:
        """True when the code ran to completion and exited with status 0."""
        return self.exit_code == 0 and not self.timed_out and self.error is None

    @classmethod
    def from_wire(cls, obj: Any) -> "ExecResult":
        if not isinstance(obj, dict):
            raise ProtocolError(f"expected an exec result object, got {type(obj).__name__}")
        try:
            error = obj.get("error")
            return cls(
                id=str(obj.get("id", "")),
                stdout=_text(obj.get("stdout", obj.get("output", ""))),
                stderr=_text(obj.get("stderr", "")),
                exit_code=int(obj["exit_code"]),
                fork_time_ms=_number(obj.get("fork_time_ms", 0.0)),
                exec_time_ms=_number(obj.get("exec_time_ms", 0.0)),
                total_time_ms=_number(obj.get("total_time_ms", obj.get("duration_ms", 0.0))),
                timed_out=bool(obj.get("timed_out", False)),
                stdout_truncated=bool(obj.get("stdout_truncated", False)),
                stderr_truncated=bool(obj.get("stderr_truncated", False)),
                error=ErrorInfo(str(error.get("code", "")), str(error.get("message", "")))
                if isinstance(error, dict) else None,
                raw=obj,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed exec result: {exc!r}") from exc


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


BatchItem = Union[str, ExecRequest, Mapping[str, Any]]
