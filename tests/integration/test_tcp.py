"""The API on TCP with a bearer token, through the SDK."""

import secrets
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from support import Daemon, binary

import deltabox


@pytest.fixture(scope="module")
def tcp_daemon():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = secrets.token_hex(16)
    workdir = Path(tempfile.mkdtemp(prefix="deltabox-it-tcp-"))
    d = Daemon(binary(), workdir, ["--listen", f"127.0.0.1:{port}", "--token", token])
    d.start()
    d.url, d.token = f"http://127.0.0.1:{port}", token
    yield d
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def test_token_is_required(tcp_daemon):
    for token in (None, "wrong-token-0123456789"):
        with pytest.raises(deltabox.Unauthorized) as err:
            deltabox.Client(url=tcp_daemon.url, token=token).images.list()
        assert err.value.code == "unauthorized"


def test_works_with_the_token(tcp_daemon):
    client = deltabox.Client(url=tcp_daemon.url, token=tcp_daemon.token)
    assert client.health()["status"] == "ok"
    assert client.images.list() == []
    with pytest.raises(deltabox.ImageNotFound):
        client.create("debian")
