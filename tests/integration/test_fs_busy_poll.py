"""`deltabox serve --fs-busy-poll-us`: a sandbox's DeltaFS server busy-polls its FUSE device during bursts of
requests (the device is then non-blocking), unless the daemon turned it off with 0."""

import concurrent.futures
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from support import Daemon, binary, image_dir, new_sandbox

import deltabox

O_NONBLOCK = 0o4000
STOP = "/tmp/burst-stop"
# getxattr is never answered from the kernel's cache: every call is a FUSE request (asked of /, which is on the
# sandbox's filesystem). The burst lasts 10 s, or until the test has seen what it looked for
# (on a busy machine the requests can be too far apart for a while).
BURST = f"""
import os, time
end = time.time() + 10
while time.time() < end and not os.path.exists("{STOP}"):
    for _ in range(1000):
        try:
            os.getxattr("/", "user.none")
        except OSError:
            pass
"""


def fuse_fdinfo(data_dir: Path, sandbox_id: str) -> list:
    """The fdinfo files of the /dev/fuse descriptors of the sandbox's shim (the process whose stderr is its
    shim.log)."""
    log = str(data_dir / "sandboxes" / sandbox_id / "shim.log")
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/fd/2") != log:
                continue
            found += [Path(f"/proc/{pid}/fdinfo/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
                      if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse"]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def polled_during_a_burst(data_dir: Path, sb: deltabox.Sandbox) -> bool:
    """Runs a burst of requests in the sandbox; whether the shim's device was seen non-blocking meanwhile."""
    fdinfo = fuse_fdinfo(data_dir, sb.id)
    assert fdinfo, "the sandbox's shim has no /dev/fuse descriptor"
    # A future hands the burst's failure (e.g. its command failing) back to the test.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        burst = pool.submit(lambda: sb.exec(["python3", "-c", BURST], timeout=30).check())
        seen = False
        # Only the known fdinfo files are read while the burst runs: scanning /proc would take the CPU from it.
        while not burst.done() and not seen:
            flags = [int(f.read_text().split("flags:")[1].split()[0], 8) for f in fdinfo]
            seen = any(f & O_NONBLOCK for f in flags)
            time.sleep(0.005)
        sb.files.write(STOP, "")
        burst.result()
    sb.files.remove(STOP)
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
