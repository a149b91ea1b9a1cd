"""Live sandboxes (sessions): state persists between runs, forks, checkpoints.

>>> from kvmfork import Sandbox
>>> client = Sandbox()
>>> with client.create_sandbox(ttl_seconds=300) as sb:      # deleted on exit
...     sb.run_code("x = 1")
...     sb.run_code("x + 1").result
...     a, b = sb.fork(2)                                    # children continue from x == 1
'2'

A :class:`LiveSandbox` belongs to the API key that created it. When it is
gone (deleted, TTL expired, ended by a crash) every call on it raises
:class:`~kvmfork.SandboxNotFound` (:class:`~kvmfork.SandboxExpired`,
:class:`~kvmfork.SandboxEnded`).
"""

from __future__ import annotations

import dataclasses
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import (TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple,
                    Union)

from .errors import KvmforkError, PartialFailure, ProtocolError, SandboxNotFound
from .models import BatchItem, ExecRequest, ExecResult, _number

if TYPE_CHECKING:
    from .client import Sandbox

# HTTP timeout of session operations that start or copy VMs (create, fork,
# checkpoint, restore) and of the quick ones (get, list, delete, timeout).
SESSION_OP_TIMEOUT = 120.0
SESSION_QUICK_TIMEOUT = 30.0


@dataclass(frozen=True)
class SandboxInfo:
    """The description of a live sandbox (``GET /v1/sandboxes/{id}``).

    Times are Unix seconds; ``memory_bytes`` is the guest memory it holds
    apart from its template. ``restore_ms`` is set only by
    :meth:`LiveSandbox.restore`.
    """

    sandbox_id: str
    language: str
    template: str
    created_at: float
    expires_at: float
    fork_time_ms: float
    execution_count: int
    memory_bytes: int
    metadata: Optional[Dict[str, Any]] = None
    restore_ms: Optional[float] = None
    #: The decoded JSON object, for fields newer than this SDK.
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_wire(cls, obj: Any) -> "SandboxInfo":
        if not isinstance(obj, dict):
            raise ProtocolError(f"expected a sandbox object, got {type(obj).__name__}")
        try:
            sandbox_id = obj["sandbox_id"]
            if not isinstance(sandbox_id, str) or not sandbox_id:
                raise TypeError("sandbox_id is not a string")
            metadata = obj.get("metadata")
            if metadata is not None and not isinstance(metadata, dict):
                raise TypeError("metadata is not an object")
            restore = obj.get("restore_ms")
            return cls(
                sandbox_id=sandbox_id,
                language=str(obj.get("language", "")),
                template=str(obj.get("template", "")),
                created_at=_number(obj.get("created_at", 0.0)),
                expires_at=_number(obj.get("expires_at", 0.0)),
                fork_time_ms=_number(obj.get("fork_time_ms", 0.0)),
                execution_count=int(_number(obj.get("execution_count", 0))),
                memory_bytes=int(_number(obj.get("memory_bytes", 0))),
                metadata=metadata,
                restore_ms=None if restore is None else _number(restore),
                raw=obj,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed sandbox description: {exc!r}") from exc


@dataclass(frozen=True)
class SessionExecResult(ExecResult):
    """An :class:`~kvmfork.ExecResult` from a live sandbox, plus:

    ``result``: the text (``repr``) of the code's final expression, IPython
    style, or None when the code does not end with an expression or its value
    is None; ``result_truncated`` when the server cut that text;
    ``execution_count``: runs in this sandbox so far, this one included.
    """

    sandbox_id: str = ""
    execution_count: int = 0
    result: Optional[str] = None
    result_truncated: bool = False

    @classmethod
    def from_wire(cls, obj: Any) -> "SessionExecResult":
        base = super().from_wire(obj)
        try:
            res = obj.get("result")
            if res is not None and not (isinstance(res, dict) and isinstance(res.get("text"), str)):
                raise TypeError("result is neither null nor {\"text\": ...}")
            return dataclasses.replace(
                base,
                sandbox_id=str(obj.get("sandbox_id", "")),
                execution_count=int(_number(obj.get("execution_count", 0))),
                result=res["text"] if res is not None else None,
                result_truncated=bool(res.get("truncated", False)) if res is not None else False,
            )
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed session exec result: {exc!r}") from exc


class _SharedClient:
    """Closes a client made by :meth:`LiveSandbox.create` once nothing made from
    it (the sandbox, its forks, its checkpoints) is in use any more."""

    def __init__(self, client: "Sandbox"):
        self.client = client
        self._refs = 0
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self._refs += 1

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self.client.close()


def _quote(ident: str) -> str:
    if not isinstance(ident, str) or not ident:
        raise TypeError("an id must be a non-empty string")
    return urllib.parse.quote(ident, safe="")


def _ttl_body(ttl_seconds: Optional[float]) -> Dict[str, Any]:
    return {} if ttl_seconds is None else {"ttl_seconds": ttl_seconds}


class Checkpoint:
    """A captured state of a live sandbox, held by the server until deleted.

    Restore it with :meth:`LiveSandbox.restore`, or start new sandboxes from
    it with ``client.create_sandbox(from_checkpoint=checkpoint)``. As a
    context manager it is deleted on exit.
    """

    def __init__(self, client: "Sandbox", checkpoint_id: str, dirty_bytes: int, pause_ms: float,
                 sandbox_id: str, raw: Mapping[str, Any], _shared: Optional[_SharedClient] = None):
        self.client = client
        self.checkpoint_id = checkpoint_id
        #: Memory the checkpoint holds (counted against the key's checkpoint budget).
        self.dirty_bytes = dirty_bytes
        #: How long the sandbox was paused to capture it.
        self.pause_ms = pause_ms
        #: The sandbox it was taken from.
        self.sandbox_id = sandbox_id
        self.raw = raw
        self._shared = _shared
        self._deleted = False
        if _shared is not None:
            _shared.acquire()

    @property
    def id(self) -> str:
        return self.checkpoint_id

    def delete(self) -> None:
        """``DELETE /v1/checkpoints/{id}``; raises :class:`~kvmfork.CheckpointNotFound`
        when it is already gone."""
        self.client._call("DELETE", f"/v1/checkpoints/{_quote(self.checkpoint_id)}", None,
                          self.client.timeout or SESSION_QUICK_TIMEOUT,
                          checkpoint_id=self.checkpoint_id)
        self._mark_deleted()

    def create_sandbox(self, ttl_seconds: Optional[float] = None,
                       metadata: Optional[Mapping[str, Any]] = None) -> "LiveSandbox":
        """A new live sandbox starting from this checkpoint."""
        return create_sandbox(self.client, ttl_seconds=ttl_seconds, metadata=metadata,
                              from_checkpoint=self.checkpoint_id, shared=self._shared)

    def _mark_deleted(self) -> None:
        if not self._deleted:
            self._deleted = True
            if self._shared is not None:
                self._shared.release()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._deleted:
            return
        from .errors import CheckpointNotFound

        try:
            self.delete()
        except CheckpointNotFound:
            self._mark_deleted()
        except KvmforkError:
            if exc_type is None:
                raise

    def __repr__(self) -> str:
        return (f"Checkpoint({self.checkpoint_id!r}, dirty_bytes={self.dirty_bytes}, "
                f"pause_ms={self.pause_ms})")


class SandboxList(List["LiveSandbox"]):
    """The sandboxes started by ``fork(n)`` or ``create_sandboxes(n)``, in order.

    With ``allow_partial=True`` an entry whose start failed is left out of the
    list and reported in ``errors`` as ``(index, error)``; ``pause_ms`` and
    ``source_id`` are set for a fork.
    """

    def __init__(self, items: Iterable["LiveSandbox"] = (),
                 errors: Sequence[Tuple[int, KvmforkError]] = (), source_id: Optional[str] = None,
                 pause_ms: Optional[float] = None):
        super().__init__(items)
        self.errors: List[Tuple[int, KvmforkError]] = list(errors)
        self.source_id = source_id
        self.pause_ms = pause_ms


def _started(client: "Sandbox", entries: Any, what: str, allow_partial: bool,
             shared: Optional[_SharedClient], source_id: Optional[str] = None,
             pause_ms: Optional[float] = None) -> SandboxList:
    """Sandboxes from a list of descriptions and ``{"error": ...}`` entries."""
    from .client import typed_error

    if not isinstance(entries, list):
        raise ProtocolError(f"{what} answer has no list of sandboxes")
    started: List[LiveSandbox] = []
    errors: List[Tuple[int, KvmforkError]] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and "sandbox_id" not in entry and isinstance(entry.get("error"), dict):
            code = entry["error"].get("code")
            message = entry["error"].get("message") or "no details"
            code = code if isinstance(code, str) else None
            errors.append((index, typed_error(None, code, f"{what}[{index}]"
                                              f"{f' {code}' if code else ''}: {message}")))
        else:
            started.append(LiveSandbox(client, SandboxInfo.from_wire(entry), _shared=shared))
    if errors and not allow_partial:
        for sb in started:
            try:
                sb.close()
            except KvmforkError:
                pass
        first = errors[0][1]
        raise PartialFailure(f"{len(errors)} of {len(entries)} {what} sandboxes failed to start "
                             f"(the {len(started)} started were deleted); first: {first}", errors)
    return SandboxList(started, errors, source_id, pause_ms)


def create_sandbox(client: "Sandbox", language: Optional[str] = None, *,
                   ttl_seconds: Optional[float] = None,
                   metadata: Optional[Mapping[str, Any]] = None,
                   from_checkpoint: Union[None, str, Checkpoint] = None,
                   shared: Optional[_SharedClient] = None) -> "LiveSandbox":
    body = _create_body(language, ttl_seconds, metadata, from_checkpoint)
    ckpt = body.get("from_checkpoint")
    resp = client._call("POST", "/v1/sandboxes", body, client.timeout or SESSION_OP_TIMEOUT,
                        checkpoint_id=ckpt)
    from .client import _json

    return LiveSandbox(client, SandboxInfo.from_wire(_json(resp)), _shared=shared)


def create_sandboxes(client: "Sandbox", count: int, language: Optional[str] = None, *,
                     ttl_seconds: Optional[float] = None,
                     metadata: Optional[Mapping[str, Any]] = None,
                     from_checkpoint: Union[None, str, Checkpoint] = None,
                     allow_partial: bool = False) -> SandboxList:
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError("count must be an integer >= 1")
    if count == 1:
        return SandboxList([create_sandbox(client, language, ttl_seconds=ttl_seconds,
                                           metadata=metadata, from_checkpoint=from_checkpoint)])
    body = _create_body(language, ttl_seconds, metadata, from_checkpoint)
    body["count"] = count
    resp = client._call("POST", "/v1/sandboxes", body, client.timeout or SESSION_OP_TIMEOUT,
                        checkpoint_id=body.get("from_checkpoint"))
    from .client import _json

    data = _json(resp)
    entries = data.get("sandboxes") if isinstance(data, dict) else None
    return _started(client, entries, "create", allow_partial, None)


def _create_body(language: Optional[str], ttl_seconds: Optional[float],
                 metadata: Optional[Mapping[str, Any]],
                 from_checkpoint: Union[None, str, Checkpoint]) -> Dict[str, Any]:
    body: Dict[str, Any] = {}
    if language is not None:
        body["language"] = language
    body.update(_ttl_body(ttl_seconds))
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError("metadata must be a mapping (a JSON object)")
        body["metadata"] = dict(metadata)
    if from_checkpoint is not None:
        body["from_checkpoint"] = (from_checkpoint.checkpoint_id
                                   if isinstance(from_checkpoint, Checkpoint) else from_checkpoint)
    return body


def get_sandbox(client: "Sandbox", sandbox_id: str) -> "LiveSandbox":
    return LiveSandbox(client, _get_info(client, sandbox_id))


def _get_info(client: "Sandbox", sandbox_id: str) -> SandboxInfo:
    from .client import _json

    resp = client._call("GET", f"/v1/sandboxes/{_quote(sandbox_id)}", None,
                        client.timeout or SESSION_QUICK_TIMEOUT, sandbox_id=sandbox_id)
    return SandboxInfo.from_wire(_json(resp))


def list_sandboxes(client: "Sandbox") -> List["LiveSandbox"]:
    from .client import _json

    resp = client._call("GET", "/v1/sandboxes", None, client.timeout or SESSION_QUICK_TIMEOUT)
    data = _json(resp)
    entries = data.get("sandboxes") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ProtocolError("list answer has no 'sandboxes' list")
    return [LiveSandbox(client, SandboxInfo.from_wire(e)) for e in entries]


def delete_checkpoint(client: "Sandbox", checkpoint_id: Union[str, Checkpoint]) -> None:
    if isinstance(checkpoint_id, Checkpoint):
        checkpoint_id.delete()
        return
    client._call("DELETE", f"/v1/checkpoints/{_quote(checkpoint_id)}", None,
                 client.timeout or SESSION_QUICK_TIMEOUT, checkpoint_id=checkpoint_id)


class LiveSandbox:
    """A sandbox that lives between calls: globals, imports, the heap and files
    in ``/tmp`` persist from one :meth:`run_code` to the next.

    Get one from ``client.create_sandbox(...)`` (or :meth:`LiveSandbox.create`,
    which makes its own client). As a context manager it is deleted on exit.
    The attributes (``expires_at``, ``execution_count``, ...) are the last
    values the server reported; :meth:`info` asks again.
    """

    def __init__(self, client: "Sandbox", info: SandboxInfo, *,
                 _shared: Optional[_SharedClient] = None):
        self.client = client
        self.last_info = info
        self._shared = _shared
        self._closed = False
        if _shared is not None:
            _shared.acquire()

    # -- construction -------------------------------------------------------

    @classmethod
    def create(cls, language: Optional[str] = None, *, ttl_seconds: Optional[float] = None,
               metadata: Optional[Mapping[str, Any]] = None,
               from_checkpoint: Union[None, str, Checkpoint] = None,
               client: Optional["Sandbox"] = None, api_key: Optional[str] = None,
               base_url: Optional[str] = None, **client_options: Any) -> "LiveSandbox":
        """Starts a live sandbox (E2B style). Without ``client`` a new
        :class:`~kvmfork.Sandbox` client is made from ``api_key``, ``base_url``
        and ``client_options``; it is closed when this sandbox, its forks and
        checkpoints are all closed or deleted."""
        if client is not None:
            return create_sandbox(client, language, ttl_seconds=ttl_seconds, metadata=metadata,
                                  from_checkpoint=from_checkpoint)
        from .client import Sandbox

        own = Sandbox(api_key, base_url, **client_options)
        try:
            return create_sandbox(own, language, ttl_seconds=ttl_seconds, metadata=metadata,
                                  from_checkpoint=from_checkpoint, shared=_SharedClient(own))
        except BaseException:
            own.close()
            raise

    @classmethod
    def connect(cls, sandbox_id: str, *, client: Optional["Sandbox"] = None,
                api_key: Optional[str] = None, base_url: Optional[str] = None,
                **client_options: Any) -> "LiveSandbox":
        """The existing sandbox ``sandbox_id`` (raises :class:`~kvmfork.SandboxNotFound`)."""
        if client is not None:
            return get_sandbox(client, sandbox_id)
        from .client import Sandbox

        own = Sandbox(api_key, base_url, **client_options)
        try:
            return cls(own, _get_info(own, sandbox_id), _shared=_SharedClient(own))
        except BaseException:
            own.close()
            raise

    # -- last known state ---------------------------------------------------

    @property
    def sandbox_id(self) -> str:
        return self.last_info.sandbox_id

    @property
    def id(self) -> str:
        return self.last_info.sandbox_id

    @property
    def language(self) -> str:
        return self.last_info.language

    @property
    def template(self) -> str:
        return self.last_info.template

    @property
    def metadata(self) -> Optional[Dict[str, Any]]:
        return self.last_info.metadata

    @property
    def created_at(self) -> float:
        return self.last_info.created_at

    @property
    def expires_at(self) -> float:
        return self.last_info.expires_at

    @property
    def execution_count(self) -> int:
        return self.last_info.execution_count

    @property
    def closed(self) -> bool:
        """True after :meth:`close` or :meth:`delete` succeeded here."""
        return self._closed

    # -- operations -----------------------------------------------------------

    def run_code(self, code: str, timeout: Optional[float] = None, *,
                 language: Optional[str] = None) -> SessionExecResult:
        """Runs ``code`` in this sandbox; names it defines stay for the next run.

        Returns the full result and never raises for what the code did (an
        exception is ``exit_code`` 1 with the traceback on ``stderr``; a run
        over ``timeout`` is interrupted and ``timed_out`` is set, the sandbox
        stays usable). Raises :class:`~kvmfork.SandboxNotFound` (or its
        subclasses) when the sandbox is gone.
        """
        if not isinstance(code, str):
            raise TypeError("code must be a str")
        body: Dict[str, Any] = {"code": code}
        if language is not None:
            body["language"] = language
        if timeout is not None:
            body["timeout_seconds"] = timeout
        resp = self._call("POST", "exec", body, self.client._http_timeout([timeout]))
        from .client import _json

        result = SessionExecResult.from_wire(_json(resp))
        self.last_info = dataclasses.replace(self.last_info, execution_count=result.execution_count)
        return result

    def run(self, code: str, timeout: Optional[float] = None) -> str:
        """:meth:`run_code` returning stdout without trailing newlines, raising
        :class:`~kvmfork.ExecError`, :class:`~kvmfork.SandboxTimeout` or
        :class:`~kvmfork.SandboxError` like :meth:`Sandbox.run`."""
        from .client import check_result

        return check_result(self.run_code(code, timeout), timeout).stdout.rstrip("\n")

    def run_batch(self, items: Sequence[BatchItem], timeout: Optional[float] = None) -> List[ExecResult]:
        """Runs each item in its own throwaway fork of this sandbox
        (``POST /v1/exec/batch`` with ``from_sandbox``); this sandbox is unchanged.

        Items are strings, :class:`~kvmfork.ExecRequest` objects or dicts with
        ``code`` and optional ``timeout``/``timeout_seconds``/``language``.
        Results come back in order and do not raise for what the code did.
        """
        executions = [_batch_item(item, timeout) for item in items]
        if not executions:
            return []
        body = {"from_sandbox": self.sandbox_id, "executions": executions}
        resp = self.client._call(
            "POST", "/v1/exec/batch", body,
            self.client._http_timeout([e.get("timeout_seconds") for e in executions]),
            sandbox_id=self.sandbox_id)
        from .client import _json

        data = _json(resp)
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list) or len(results) != len(executions):
            raise ProtocolError(f"batch answer has no 'results' list of {len(executions)} items")
        return [ExecResult.from_wire(r) for r in results]

    def fork(self, n: int = 1, ttl_seconds: Optional[float] = None, *,
             allow_partial: bool = False) -> SandboxList:
        """Live fork: ``n`` new sandboxes that continue from this one's exact state.

        Returns them in order (a list with ``pause_ms``, how long this
        sandbox was held). If some could not be started (e.g.
        ``too_many_sandboxes``) the others are deleted and
        :class:`~kvmfork.PartialFailure` is raised, its ``errors`` naming each
        failure; with ``allow_partial=True`` the started ones are returned and
        the failures are in the list's ``errors``.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError("n must be an integer >= 1")
        body = {"count": n, **_ttl_body(ttl_seconds)}
        resp = self._call("POST", "fork", body, self.client.timeout or SESSION_OP_TIMEOUT)
        from .client import _json

        data = _json(resp)
        if not isinstance(data, dict):
            raise ProtocolError("fork answer is not a JSON object")
        pause = data.get("pause_ms")
        return _started(self.client, data.get("forks"), "fork", allow_partial, self._shared,
                        source_id=data.get("source_id"),
                        pause_ms=_number(pause) if pause is not None else None)

    def checkpoint(self) -> Checkpoint:
        """Captures this sandbox's state (memory and machine state) on the server."""
        resp = self._call("POST", "checkpoints", None, self.client.timeout or SESSION_OP_TIMEOUT)
        from .client import _json

        data = _json(resp)
        try:
            ckpt_id = data["checkpoint_id"]
            if not isinstance(ckpt_id, str) or not ckpt_id:
                raise TypeError("checkpoint_id is not a string")
            return Checkpoint(self.client, ckpt_id, int(_number(data.get("dirty_bytes", 0))),
                              _number(data.get("pause_ms", 0.0)), self.sandbox_id, data,
                              _shared=self._shared)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed checkpoint answer: {exc!r}") from exc

    def restore(self, checkpoint: Union[str, Checkpoint]) -> SandboxInfo:
        """Rolls this sandbox back to ``checkpoint`` in place (heap, files,
        everything); returns the new description (with ``restore_ms``)."""
        ckpt_id = checkpoint.checkpoint_id if isinstance(checkpoint, Checkpoint) else checkpoint
        if not isinstance(ckpt_id, str) or not ckpt_id:
            raise TypeError("checkpoint must be a Checkpoint or a checkpoint id")
        resp = self._call("POST", "restore", {"checkpoint_id": ckpt_id},
                          self.client.timeout or SESSION_OP_TIMEOUT, checkpoint_id=ckpt_id)
        return self._update(resp)

    def set_timeout(self, seconds: float) -> SandboxInfo:
        """Sets the remaining TTL to ``seconds`` from now; returns the new description."""
        resp = self._call("POST", "timeout", {"ttl_seconds": seconds},
                          self.client.timeout or SESSION_QUICK_TIMEOUT)
        return self._update(resp)

    def info(self) -> SandboxInfo:
        """Asks the server for the current description (``execution_count``,
        ``memory_bytes``, ``expires_at``); raises :class:`~kvmfork.SandboxNotFound`
        when the sandbox is gone."""
        info = _get_info(self.client, self.sandbox_id)
        self.last_info = info
        return info

    refresh = info

    def is_running(self) -> bool:
        """True while the server still holds this sandbox."""
        try:
            self.info()
        except SandboxNotFound:
            return False
        return True

    def delete(self) -> None:
        """Stops the sandbox (``DELETE``); raises :class:`~kvmfork.SandboxNotFound`
        when it was already gone."""
        self.client._call("DELETE", f"/v1/sandboxes/{_quote(self.sandbox_id)}", None,
                          self.client.timeout or SESSION_QUICK_TIMEOUT, sandbox_id=self.sandbox_id)
        self._mark_closed()

    def close(self) -> bool:
        """Stops the sandbox if it still exists: True when this call deleted it,
        False when it was already gone (deleted, expired, ended). Idempotent."""
        if self._closed:
            return False
        try:
            self.delete()
        except SandboxNotFound:
            self._mark_closed()
            return False
        return True

    kill = close

    def __enter__(self) -> "LiveSandbox":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.close()
        except KvmforkError:
            # Do not hide the error that ended the block; the TTL stops the
            # sandbox eventually.
            if exc_type is None:
                raise

    def __repr__(self) -> str:
        return (f"LiveSandbox({self.sandbox_id!r}, language={self.language!r}, "
                f"execution_count={self.execution_count}{', closed' if self._closed else ''})")

    # -- internals ----------------------------------------------------------

    def _call(self, method: str, action: str, body: Optional[Mapping[str, Any]], timeout: float,
              checkpoint_id: Optional[str] = None) -> Any:
        return self.client._call(method, f"/v1/sandboxes/{_quote(self.sandbox_id)}/{action}", body,
                                 timeout, sandbox_id=self.sandbox_id, checkpoint_id=checkpoint_id)

    def _update(self, resp: Any) -> SandboxInfo:
        from .client import _json

        info = SandboxInfo.from_wire(_json(resp))
        self.last_info = info
        return info

    def _mark_closed(self) -> None:
        if not self._closed:
            self._closed = True
            if self._shared is not None:
                self._shared.release()


def _batch_item(item: BatchItem, timeout: Optional[float]) -> Dict[str, Any]:
    """One item of a batch from a sandbox: the language only when the item
    names one (the sandbox's own applies otherwise)."""
    if isinstance(item, ExecRequest):
        return item.to_wire()
    if isinstance(item, str):
        code, language, item_timeout = item, None, timeout
    elif isinstance(item, Mapping):
        if not isinstance(item.get("code"), str):
            raise TypeError("a batch item dict needs a 'code' string")
        code = item["code"]
        language = item.get("language")
        item_timeout = item.get("timeout", item.get("timeout_seconds", timeout))
    else:
        raise TypeError(f"a batch item must be a str, dict or ExecRequest, not {type(item).__name__}")
    body: Dict[str, Any] = {"code": code}
    if language is not None:
        body["language"] = language
    if item_timeout is not None:
        body["timeout_seconds"] = item_timeout
    return body
