"""HTTP/1.1 transport: a small thread-safe pool of keep-alive connections.

Standard library only (``http.client``). Each call borrows one connection, so
any number of threads (e.g. ``asyncio.to_thread`` workers) can share a client.
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from email.message import Message
from typing import Dict, List, Optional, Tuple

from .errors import KvmforkError, NetworkError

# Errors that mean a kept-alive connection was closed by the server while idle.
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                     ConnectionAbortedError)


@dataclass(frozen=True)
class Response:
    status: int
    headers: Message
    body: bytes


class Transport:
    """Sends requests to one base URL, reusing up to ``pool_size`` idle connections."""

    def __init__(self, base_url: str, headers: Dict[str, str], pool_size: int = 8):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise KvmforkError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._headers = dict(headers)
        self._pool_size = pool_size
        self._idle: List[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def request(self, method: str, path: str, body: Optional[bytes], timeout: float) -> Response:
        """Sends one request; raises :class:`NetworkError` when no response arrives.

        A reused connection that the server closed while idle is retried once
        on a fresh connection: the server never saw that request.
        """
        conn, reused = self._acquire(timeout)
        try:
            return self._send(conn, method, path, body)
        except _STALE_CONNECTION as exc:
            conn.close()
            if not reused:
                raise self._broken(exc) from exc
        except BaseException:
            conn.close()
            raise
        conn = self._connect(timeout)
        try:
            return self._send(conn, method, path, body)
        except _STALE_CONNECTION as exc:
            conn.close()
            raise self._broken(exc) from exc
        except BaseException:
            conn.close()
            raise

    def _broken(self, exc: BaseException) -> NetworkError:
        return NetworkError(f"connection to {self._host}:{self._port} broke: {exc!r}")

    def _send(self, conn: http.client.HTTPConnection, method: str, path: str,
              body: Optional[bytes]) -> Response:
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, self._prefix + path, body=body, headers=headers)
        except ConnectionRefusedError as exc:
            raise NetworkError(f"connection to {self._host}:{self._port} refused", sent=False) from exc
        except socket.gaierror as exc:
            raise NetworkError(f"cannot resolve {self._host}: {exc}", sent=False) from exc
        except socket.timeout as exc:
            raise NetworkError(f"timed out connecting to {self._host}:{self._port}", sent=False) from exc
        except OSError as exc:
            if isinstance(exc, _STALE_CONNECTION):
                raise
            raise NetworkError(f"cannot reach {self._host}:{self._port}: {exc}", sent=False) from exc
        try:
            resp = conn.getresponse()
            data = resp.read()
        except socket.timeout as exc:
            raise NetworkError(f"no response from {self._host}:{self._port} within "
                               f"{conn.timeout}s") from exc
        except _STALE_CONNECTION:
            raise
        except (OSError, http.client.HTTPException) as exc:
            raise NetworkError(f"reading the response from {self._host}:{self._port} "
                               f"failed: {exc!r}") from exc
        if resp.will_close:
            conn.close()
        else:
            self._release(conn)
        return Response(resp.status, resp.headers, data)

    def _acquire(self, timeout: float) -> Tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._closed:
                raise KvmforkError("client is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            return self._connect(timeout), False
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn, True

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._pool_size:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
