"""A sandbox that fills the disk of the daemon's data directory: its writes fail with ENOSPC, a checkpoint fails
with `507 no_space` and records nothing, the sandbox keeps working, and a rollback (which discards what filled the
disk) works and frees the space."""

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from support import Daemon, binary, image_dir, new_sandbox, wait_until

import deltabox


def daemon_on_tmpfs(size: str, image: str):
    """A daemon whose data directory is a tmpfs of `size`, with `image` imported."""
    workdir = Path(tempfile.mkdtemp(prefix="deltabox-it-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(workdir)], check=True)
    d = Daemon(binary(), workdir)
    try:
        d.start()
        with deltabox.Client(socket=d.socket) as c:
            c.images.import_(str(image_dir() / image), image)
        yield d
        assert d.stop() == 0
    finally:
        if d.proc is not None:
            d.stop()
        subprocess.run(["umount", "-l", str(workdir)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def small_daemon():
    yield from daemon_on_tmpfs("96m", "busybox")


@pytest.fixture(scope="module")
def debian_daemon():
    yield from daemon_on_tmpfs("1100m", "debian")


def test_a_full_disk_fails_the_checkpoint_clearly_and_a_rollback_frees_it(small_daemon):
    with deltabox.Client(socket=small_daemon.socket) as c, new_sandbox(c, "busybox") as sb:
        sb.files.write("/keep", b"kept")
        ck = sb.checkpoint(fs_only=True)
        filled = sb.exec(["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=200"], timeout=60)
        assert filled.exit_code != 0 and "No space left on device" in filled.stderr, filled.stderr
        for fs_only in (False, True):
            with pytest.raises(deltabox.InsufficientStorage) as info:
                sb.checkpoint(fs_only=fs_only)
            assert (info.value.status, info.value.code) == (507, "no_space")
            assert "No space left on device" in info.value.message, info.value.message
        # Nothing was recorded, and the sandbox works on: commands, its files, changes that need no space.
        assert [x.id for x in sb.checkpoints()] == [ck.id] and sb.refresh().head == ck.id
        assert sb.exec(["cat", "/keep"]).check().stdout == "kept"
        sb.exec(["mkdir", "/made-while-full"]).check()
        # Other requests that need the disk say so too.
        with pytest.raises(deltabox.InsufficientStorage) as info:
            c.create(image="busybox").delete()
        assert info.value.code == "no_space", info.value.message
        assert [x.id for x in c.list()] == [sb.id]
        # The rollback discards what filled the disk.
        sb.rollback(ck)
        assert not sb.files.exists("/big") and not sb.files.exists("/made-while-full")
        assert sb.files.read("/keep") == b"kept"
        sb.files.write("/after", b"space again")
        later = sb.checkpoint(fs_only=True)
        (fork,) = later.fork(1)
        with fork:
            assert fork.files.read("/after") == b"space again"


def test_a_checkpoint_after_freeing_space_holds_every_change(small_daemon):
    with deltabox.Client(socket=small_daemon.socket) as c, new_sandbox(c, "busybox") as sb:
        sb.exec(["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=200"], timeout=60)
        sb.exec(["sh", "-c", "mkdir /d && for i in $(seq 500); do mkdir /d/$i; done"]).check()
        with pytest.raises(deltabox.InsufficientStorage):
            sb.checkpoint(fs_only=True)
        sb.exec(["rm", "/big"]).check()
        ck = sb.checkpoint(fs_only=True)
        (fork,) = ck.fork(1)
        with fork:
            assert fork.exec(["sh", "-c", "ls /d | wc -l"]).check().stdout.strip() == "500"
            assert not fork.files.exists("/big")


HOLDER = r"""
import os, time
blob = os.urandom(150 << 20)
open("/root/ready", "w").close()
time.sleep(1000)
"""


def test_a_process_image_that_does_not_fit_fails_forks_at_once_with_the_reason(debian_daemon):
    with deltabox.Client(socket=debian_daemon.socket) as c, new_sandbox(c, "debian", memory="1G") as sb:
        sb.files.write("/root/holder.py", HOLDER)
        sb.exec(["sh", "-c", "setsid python3 /root/holder.py > /dev/null 2>&1 < /dev/null &"]).check()
        wait_until(lambda: sb.files.exists("/root/ready"))
        # Leave 40 MiB: room for the filesystem checkpoint, not for 150 MiB of process memory.
        st = os.statvfs(debian_daemon.workdir)
        spare_mib = st.f_bavail * st.f_frsize // (1 << 20) - 40
        sb.exec(["dd", "if=/dev/zero", "of=/root/fill", "bs=1M", f"count={spare_mib}"], timeout=60).check()
        ck = sb.checkpoint()
        assert ck.kind == "full"
        started = time.monotonic()
        with pytest.raises(deltabox.InsufficientStorage) as info:
            ck.fork(1)
        # The reason, at once: not after the wait for an image still being written (minutes).
        assert time.monotonic() - started < 30
        assert "could not be written" in info.value.message and "No space left" in info.value.message, \
            info.value.message
        assert [x.id for x in c.list()] == [sb.id]
        # The reason is in the catalog: after a restart of the daemon, a fork fails at once too.
        assert debian_daemon.stop() == 0
        debian_daemon.start()
        started = time.monotonic()
        with pytest.raises(deltabox.InsufficientStorage) as info:
            ck.fork(1)
        assert time.monotonic() - started < 30 and "No space left" in info.value.message, info.value.message
        # The sandbox itself still rolls back to it: its processes come from the copies kept in memory.
        sb.exec(["pkill", "-f", "holder.py"])
        assert sb.rollback(ck).processes_restored >= 1
        assert "holder.py" in sb.exec(["ps", "-eo", "args"]).check().stdout
