"""A small scripted HTTP/1.1 server on a Unix socket (or TCP) that records what the SDK sends.

It stands in for the daemon only in the SDK's own unit tests, which check the requests the SDK makes and how
it reads answers; the integration suite (tests/integration) runs the SDK against the real daemon.
"""

from __future__ import annotations

import json
import socketserver
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union


@dataclass
class Recorded:
    method: str
    path: str
    query: Dict[str, str]
    headers: Dict[str, str]
    body: bytes
    connection: int

    def json(self):
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: Union[bytes, dict, list, None] = None
    #: Sent with chunked encoding, one chunk per item, when given (for NDJSON streams).
    chunks: Optional[Iterable[bytes]] = None
    content_type: str = "application/json"
    #: Close the connection after this answer.
    close: bool = False
    #: Answer without reading the request body, then close (as a server that rejects a request early).
    early: bool = False


Handler = Callable[[Recorded], Reply]


@dataclass
class FakeDaemon:
    routes: Dict[Tuple[str, str], Handler] = field(default_factory=dict)
    requests: List[Recorded] = field(default_factory=list)
    connections: int = 0
    #: Open server-side sockets, so a test can close them as a restarted daemon would.
    open_sockets: list = field(default_factory=list)

    def route(self, method: str, path: str, handler: Union[Handler, Reply]) -> None:
        self.routes[(method, path)] = handler if callable(handler) else (lambda _req, r=handler: r)

    def drop_connections(self) -> None:
        for sock in list(self.open_sockets):
            try:
                sock.shutdown(2)
            except OSError:
                pass


def handler_class(fake: FakeDaemon):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            fake.connections += 1
            self.connection_number = fake.connections
            fake.open_sockets.append(self.connection)

        def finish(self) -> None:
            super().finish()
            fake.open_sockets.remove(self.connection)

        def log_message(self, *args) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    chunk = self.rfile.read(size)
                    self.rfile.readline()
                    if size == 0:
                        return out
                    out += chunk
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            handler = fake.routes.get((self.command, url.path))
            req = Recorded(
                method=self.command,
                path=url.path,
                query=dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True)),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=b"",
                connection=self.connection_number,
            )
            reply = handler(req) if handler else Reply(404, {"error": "no_such_endpoint", "message": "no route"})
            if not reply.early:
                req.body = self._body()
            fake.requests.append(req)
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            if reply.close or reply.early:
                self.send_header("Connection", "close")
                self.close_connection = True
            if reply.chunks is not None:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for chunk in reply.chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                return
            body = reply.body
            data = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

    return Handler


class _Quiet:
    """Connections the tests cut on purpose are no error worth printing."""

    def handle_error(self, request, client_address) -> None:
        pass


class UnixServer(_Quiet, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class TcpServer(_Quiet, socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(server) -> None:
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()


SANDBOX = {
    "id": "0123456789ab",
    "image": "debian",
    "state": "running",
    "network": "none",
    "memory": 1 << 30,
    "pids": 128,
    "cpus": None,
    "created": 1700000000,
    "uid_base": 1048576,
    "init_pid": 4242,
}
