"""Integration suite: one real `deltabox serve` per test session, driven through the Python SDK.

Environment:
    DELTABOX_BIN          the deltabox binary (default: <repo>/target/release/deltabox)
    DELTABOX_TEST_IMAGES  directory with the OCI layouts `busybox` and `debian` made by images/build.sh
                          (default: /var/cache/deltabox/images)

The daemon gets a temporary socket and data directory; both test images are imported once. At the end every
sandbox is removed and the daemon is stopped with SIGTERM. Needs root (namespaces, mounts, cgroups).
"""

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List

import pytest
from support import IMAGES, Daemon, binary, image_dir, new_sandbox

import deltabox


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    if os.geteuid() != 0:
        pytest.exit("the integration suite needs root (namespaces, mounts, cgroups)", returncode=2)
    binary_path, images = binary(), image_dir()
    workdir = Path(tempfile.mkdtemp(prefix="deltabox-it-"))
    # The host's network is allowed for the tests of what it gives; test_network.py checks a daemon without it.
    d = Daemon(binary_path, workdir, ["--allow-host-network"])
    d.start()
    client = deltabox.Client(socket=d.socket)
    for name in IMAGES:
        client.images.import_(str(images / name), name)
    try:
        yield d
    finally:
        if d.proc is None:
            d.start()
        leftovers: List[str] = []
        for sb in client.list():
            try:
                sb.delete()
            except deltabox.DeltaboxError as e:
                leftovers.append(f"{sb.id}: {e}")
        client.close()
        code = d.stop(signal.SIGTERM)
        shutil.rmtree(workdir, ignore_errors=True)
        assert not leftovers, f"could not remove sandboxes: {leftovers}"
        assert code == 0, f"the daemon exited with {code} on SIGTERM"


@pytest.fixture(scope="session")
def client(daemon: Daemon) -> Iterator[deltabox.Client]:
    with deltabox.Client(socket=daemon.socket) as c:
        yield c


@pytest.fixture
def cli(daemon: Daemon):
    """Runs the `deltabox` CLI against the suite's daemon; asserts it succeeds (or, with ok=False, fails)."""

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(binary()), *args, "--socket", daemon.socket], capture_output=True, text=True,
                                timeout=60)
        assert (result.returncode == 0) == ok, result.stderr
        return result

    return run


@pytest.fixture(scope="module")
def debian(client: deltabox.Client) -> Iterator[deltabox.Sandbox]:
    """A debian sandbox shared by the tests of one module (tests must not depend on each other's changes)."""
    with new_sandbox(client, "debian") as sb:
        yield sb


@pytest.fixture(scope="module")
def busybox(client: deltabox.Client) -> Iterator[deltabox.Sandbox]:
    with new_sandbox(client, "busybox") as sb:
        yield sb
