"""Upgrades: a daemon that meets a shim of another protocol version, or a catalog of another schema.

A shim announces its protocol version. To meet a shim of another version without building an old DeltaBox, the
test stands a stand-in at the sandbox's shim socket that answers "who are you" as a shim of version 999 would,
while the real shim keeps its own socket under another name (a bound socket keeps working after a rename).
"""

import contextlib
import json
import os
import socket
import sqlite3
import struct
import threading
from pathlib import Path

import pytest
from support import private_daemon, status_field, wait_until

import deltabox

OTHER_PROTOCOL = 999


@contextlib.contextmanager
def shim_of_another_version(sock_path: Path, init_pid: int):
    """Moves the real shim's socket aside and answers at its place as a shim of protocol OTHER_PROTOCOL."""
    aside = sock_path.with_name("shim.sock.real")
    os.rename(sock_path, aside)
    shim_pid = int(status_field(init_pid, "PPid"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(sock_path))
    listener.listen(8)
    requests = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                packet = conn.recv(128 * 1024)
                (length,) = struct.unpack("<I", packet[:4])
                requests.append(json.loads(packet[4:4 + length]))
                info = {"Info": {"protocol": OTHER_PROTOCOL, "shim_pid": shim_pid, "init_pid": init_pid,
                                 "uid_base": 0, "a_field_this_daemon_does_not_know": True}}
                body = json.dumps(info).encode()
                conn.send(struct.pack("<I", len(body)) + body)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield requests
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=10)
        # A sandbox deleted meanwhile took its directory along.
        if sock_path.parent.exists():
            os.unlink(sock_path)
            os.rename(aside, sock_path)


@pytest.fixture
def own_daemon():
    with private_daemon("deltabox-upgrades-") as d:
        yield d


def alive(pid: int) -> bool:
    try:
        return not status_field(pid, "State").startswith("Z")
    except OSError:
        return False


def test_a_shim_of_another_version_keeps_its_sandbox_running_and_reported(own_daemon):
    with deltabox.Client(socket=own_daemon.socket) as c:
        kept, doomed = c.create("busybox"), c.create("busybox")
        kept.exec(["sh", "-c", "echo before > /state"]).check()
        infos = {sb.id: sb.refresh() for sb in (kept, doomed)}
    own_daemon.stop()
    with contextlib.ExitStack() as stack:
        for sb_id, info in infos.items():
            stack.enter_context(shim_of_another_version(own_daemon.sandbox_dir(sb_id) / "shim.sock", info.init_pid))
        own_daemon.start()
        with deltabox.Client(socket=own_daemon.socket) as c:
            listed = {sb.id: sb.refresh() for sb in c.list()}
            assert set(listed) == set(infos), "the daemon dropped a sandbox whose shim it cannot speak to"
            for info in listed.values():
                assert info.state == "incompatible shim"
                assert info.incompatible_shim == {"shim_protocol": OTHER_PROTOCOL, "daemon_protocol": 1}
            with pytest.raises(deltabox.Conflict) as refused:
                c.sandbox(kept.id).exec(["true"])
            assert refused.value.code == "incompatible_shim"
            assert f"version {OTHER_PROTOCOL}" in str(refused.value)
            with pytest.raises(deltabox.Conflict):
                c.sandbox(kept.id).checkpoint()
            # Its processes run on: nothing was killed for not understanding the shim.
            assert all(alive(info.init_pid) for info in infos.values())
            # Deleting one works without its shim's help, and takes its processes.
            c.sandbox(doomed.id).delete()
            wait_until(lambda: not alive(infos[doomed.id].init_pid), 10, 0.05, "the deleted sandbox's init to end")
            assert alive(infos[kept.id].init_pid)
        own_daemon.stop()
    # The shim is back: the same sandbox, untouched, is usable again.
    own_daemon.start()
    with deltabox.Client(socket=own_daemon.socket) as c:
        assert [sb.id for sb in c.list()] == [kept.id]
        info = c.sandbox(kept.id).refresh()
        assert (info.state, info.incompatible_shim, info.init_pid) == ("running", None, infos[kept.id].init_pid)
        assert c.sandbox(kept.id).exec(["cat", "/state"]).stdout == "before\n"


def test_a_catalog_of_a_newer_schema_is_refused_with_its_version(own_daemon):
    own_daemon.stop()
    db = own_daemon.data_dir / "catalog.db"
    with sqlite3.connect(db) as conn:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        conn.execute(f"PRAGMA user_version = {version + 1}")
    try:
        with pytest.raises(RuntimeError) as refused:
            own_daemon.start()
        assert f"schema version {version + 1}" in str(refused.value)
        assert "newer" in str(refused.value)
    finally:
        with sqlite3.connect(db) as conn:
            conn.execute(f"PRAGMA user_version = {version}")
        own_daemon.proc = None  # the refused daemon exited; the fixture starts a new one to clean up
