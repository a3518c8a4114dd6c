"""A sandbox that fills the disk of the daemon's data directory: its writes fail with ENOSPC, a checkpoint fails
with `507 no_space` and records nothing, the sandbox keeps working, and a rollback (which discards what filled the
disk) works and frees the space."""

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from support import Daemon, binary, image_dir, new_sandbox

import deltabox


@pytest.fixture(scope="module")
def small_daemon():
    workdir = Path(tempfile.mkdtemp(prefix="deltabox-it-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(workdir)], check=True)
    d = Daemon(binary(), workdir)
    try:
        d.start()
        with deltabox.Client(socket=d.socket) as c:
            c.images.import_(str(image_dir() / "busybox"), "busybox")
        yield d
        assert d.stop() == 0
    finally:
        if d.proc is not None:
            d.stop()
        subprocess.run(["umount", "-l", str(workdir)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)


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
