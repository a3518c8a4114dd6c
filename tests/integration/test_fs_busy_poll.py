"""`deltabox serve --fs-busy-poll-us`: a sandbox's DeltaFS server busy-polls its FUSE device during bursts of
requests (the device is then non-blocking), unless the daemon turned it off with 0."""

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from support import Daemon, binary, image_dir, new_sandbox

import deltabox

O_NONBLOCK = 0o4000
# getxattr is never answered from the kernel's cache: every call is a FUSE request.
BURST = """
import os, time
end = time.time() + 3
while time.time() < end:
    try:
        os.getxattr("/etc/hostname", "user.none")
    except OSError:
        pass
"""


def fuse_fd_flags(data_dir: Path, sandbox_id: str) -> list:
    """The flags of the /dev/fuse descriptors of the sandbox's shim (the process whose stderr is its shim.log)."""
    log = str(data_dir / "sandboxes" / sandbox_id / "shim.log")
    flags = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/fd/2") != log:
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse":
                    info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
                    flags.append(int(info.split("flags:")[1].split()[0], 8))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return flags


def polled_during_a_burst(data_dir: Path, sb: deltabox.Sandbox) -> bool:
    """Runs a burst of requests in the sandbox; whether the shim's device was seen non-blocking meanwhile."""
    assert fuse_fd_flags(data_dir, sb.id), "the sandbox's shim has no /dev/fuse descriptor"
    burst = threading.Thread(target=lambda: sb.exec(["python3", "-c", BURST], timeout=30).check())
    burst.start()
    seen = False
    while burst.is_alive():
        seen = seen or any(f & O_NONBLOCK for f in fuse_fd_flags(data_dir, sb.id))
        time.sleep(0.005)
    burst.join()
    return seen


@pytest.fixture(scope="module")
def daemon_without_polling():
    workdir = Path(tempfile.mkdtemp(prefix="deltabox-it-nopoll-"))
    d = Daemon(binary(), workdir, ["--fs-busy-poll-us", "0"])
    d.start()
    with deltabox.Client(socket=d.socket) as c:
        c.images.import_(str(image_dir() / "debian"), "debian")
    yield d
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def test_bursts_are_busy_polled_by_default(client, daemon):
    with new_sandbox(client, "debian") as sb:
        assert polled_during_a_burst(daemon.data_dir, sb)


def test_polling_turned_off(daemon_without_polling):
    with deltabox.Client(socket=daemon_without_polling.socket) as c, new_sandbox(c, "debian") as sb:
        assert not polled_during_a_burst(daemon_without_polling.data_dir, sb)
