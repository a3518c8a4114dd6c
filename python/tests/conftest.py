"""Fixtures of the SDK's unit tests: a scripted fake daemon (fake_daemon.py) and a client connected to it."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import deltabox  # noqa: E402
from fake_daemon import SANDBOX, FakeDaemon, Reply, TcpServer, UnixServer, handler_class, serve  # noqa: E402


@pytest.fixture
def fake(tmp_path):
    """A FakeDaemon on a Unix socket; ``fake.client`` is a deltabox.Client connected to it."""
    daemon = FakeDaemon()
    path = str(tmp_path / "fake.sock")
    server = UnixServer(path, handler_class(daemon))
    serve(server)
    daemon.socket_path = path
    daemon.client = deltabox.Client(socket=path)
    yield daemon
    daemon.client.close()
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_tcp():
    """A FakeDaemon on 127.0.0.1 (an ephemeral port); ``fake_tcp.url`` is its address."""
    daemon = FakeDaemon()
    server = TcpServer(("127.0.0.1", 0), handler_class(daemon))
    serve(server)
    daemon.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield daemon
    server.shutdown()
    server.server_close()


@pytest.fixture
def sandbox(fake):
    """A Sandbox handle on the fake daemon (created through the SDK)."""
    fake.route("POST", "/v1/sandboxes", Reply(201, SANDBOX))
    return fake.client.create("debian")
