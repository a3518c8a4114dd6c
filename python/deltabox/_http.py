"""HTTP/1.1 over a Unix socket or TCP with the standard library, with a small keep-alive pool.

Keeping connections open matters: a fresh connection per request would add a connect (and, for the daemon,
a new hyper connection task) to every exec round trip.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import threading
import urllib.parse
from typing import IO, Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

from .errors import DaemonUnavailable, error_from_response

Body = Union[bytes, IO[bytes], None]

# Requests that may be sent again when a kept-alive connection turns out to be closed by the daemon.
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})
# Connections kept open per client; more concurrent requests simply open more connections.
_POOL_SIZE = 8
_READ_CHUNK = 64 * 1024


class _UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection whose transport is a Unix stream socket."""

    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection was closed by the peer (readable at EOF, or broken)."""
    if conn.sock is None:
        return False
    try:
        readable, _, _ = select.select([conn.sock], [], [], 0)
    except (OSError, ValueError):
        return True
    # An idle HTTP connection has nothing to read unless the peer closed it.
    return bool(readable)


class Response:
    """A successful answer whose body has not been read yet.

    Read it with one of :meth:`json`, :meth:`read`, :meth:`iter_chunks`, :meth:`iter_lines`; the connection
    returns to the pool once the body was read to its end, and is closed otherwise (see :meth:`close`).
    """

    def __init__(self, transport: "Transport", conn: http.client.HTTPConnection, resp: http.client.HTTPResponse):
        self._transport = transport
        self._conn: Optional[http.client.HTTPConnection] = conn
        self.raw = resp
        self.status = resp.status
        self.headers = resp.headers

    def read(self) -> bytes:
        """The whole body."""
        data = self._call(self.raw.read)
        self._finish()
        return data

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.read())

    def iter_chunks(self, size: int = _READ_CHUNK) -> Iterator[bytes]:
        """The body in pieces of at most ``size`` bytes, as they arrive."""
        return self._pieces(lambda: self.raw.read1(size))

    def iter_lines(self) -> Iterator[bytes]:
        """The body line by line (for NDJSON streams), each line as soon as it is complete."""
        return (line for line in self._pieces(self.raw.readline) if line.strip())

    def _call(self, read: Callable[[], bytes]) -> bytes:
        """``read()``, turning a lost connection into :class:`DaemonUnavailable`."""
        try:
            return read()
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise self._transport.lost(e) from e

    def _pieces(self, read: Callable[[], bytes]) -> Iterator[bytes]:
        """What successive ``read()`` calls return, up to the end of the body."""
        while True:
            piece = self._call(read)
            if not piece:
                self._finish()
                return
            yield piece

    def _finish(self) -> None:
        """The body was read to its end: the connection can serve the next request."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._transport.release(conn, reusable=not self.raw.will_close)

    def close(self) -> None:
        """Abandons the body (if unread) and closes the connection; the daemon sees the client leave."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self.raw.close()
            conn.close()

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport:
    """Sends requests to one daemon; thread-safe."""

    def __init__(self, socket_path: Optional[str] = None, url: Optional[str] = None,
                 token: Optional[str] = None, timeout: Optional[float] = None) -> None:
        if (socket_path is None) == (url is None):
            raise ValueError("give exactly one of socket_path and url")
        self._socket_path = socket_path
        self._timeout = timeout
        self._headers: Dict[str, str] = {}
        if url is not None:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"unsupported daemon URL {url!r}: use http://HOST:PORT")
            self._host = parts.hostname
            self._port = parts.port or 80
            self._prefix = parts.path.rstrip("/")
            self.address = url
        else:
            self._prefix = ""
            self.address = socket_path or ""
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._idle: List[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _new_connection(self) -> http.client.HTTPConnection:
        if self._socket_path is not None:
            return _UnixHTTPConnection(self._socket_path, self._timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def _take(self) -> "tuple[http.client.HTTPConnection, bool]":
        """An idle connection (reused=True) or a new one."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if _dropped(conn):
                    conn.close()
                    continue
                return conn, True
        return self._new_connection(), False

    def release(self, conn: http.client.HTTPConnection, reusable: bool) -> None:
        with self._lock:
            if reusable and conn.sock is not None and len(self._idle) < _POOL_SIZE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        """Closes every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def lost(self, e: BaseException) -> DaemonUnavailable:
        """The error for a failed exchange with the daemon."""
        if isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
            hint = " (is `deltabox serve` running? set DELTABOX_SOCKET or pass socket=/url=)"
            return DaemonUnavailable("daemon_unavailable", f"cannot connect to the daemon at {self.address}: {e}{hint}")
        if isinstance(e, socket.timeout):
            return DaemonUnavailable("timeout", f"no answer from the daemon at {self.address} in time")
        return DaemonUnavailable("connection_lost", f"lost the connection to the daemon at {self.address}: {e!r}")

    def request(self, method: str, path: str, *, query: Optional[Mapping[str, Any]] = None,
                json_body: Any = None, body: Body = None, content_type: Optional[str] = None) -> Response:
        """Sends a request and returns its answer; raises the daemon's error for non-2xx statuses."""
        target = self._prefix + path
        if query:
            target += "?" + urllib.parse.urlencode({k: _query_value(v) for k, v in query.items() if v is not None})
        headers = dict(self._headers)
        if json_body is not None:
            body = json.dumps(json_body).encode()
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        if body is None and method in ("POST", "PUT"):
            headers["Content-Length"] = "0"
        start = None
        if body is not None and not isinstance(body, bytes):
            # A seekable file is sent with its length (else http.client would use chunked encoding) and can be
            # rewound for a second attempt.
            start = body.tell()
            headers["Content-Length"] = str(body.seek(0, 2) - start)
            body.seek(start)
        while True:
            conn, reused = self._take()
            try:
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
                break
            except (OSError, http.client.HTTPException) as e:
                # The daemon may answer (e.g. 404 for an unknown sandbox) and close before it read all of a
                # request body: its answer is still waiting in the socket.
                early = _early_response(conn) if isinstance(e, (BrokenPipeError, ConnectionResetError)) else None
                if early is not None:
                    resp = early
                    break
                conn.close()
                # A kept-alive connection the daemon closed meanwhile (e.g. it restarted) did not deliver the
                # request: a request that is safe to repeat is sent once more on a fresh connection.
                if reused and method in _IDEMPOTENT and isinstance(e, _STALE_ERRORS):
                    if start is not None:
                        body.seek(start)  # type: ignore[union-attr]
                    continue
                raise self.lost(e) from e
        answer = Response(self, conn, resp)
        if 200 <= resp.status < 300:
            return answer
        data = answer.read()
        raise error_from_response(resp.status, data)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """A request whose answer is one JSON document."""
        return self.request(method, path, **kwargs).json()

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[Response]:
        """A request whose body is read incrementally; the connection is closed if it is left early."""
        resp = self.request(method, path, **kwargs)
        try:
            yield resp
        finally:
            resp.close()


_STALE_ERRORS = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def _early_response(conn: http.client.HTTPConnection) -> Optional[http.client.HTTPResponse]:
    """The answer the peer sent before it stopped reading our request, if there is one."""
    try:
        return conn.getresponse()
    except (OSError, http.client.HTTPException):
        return None


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
