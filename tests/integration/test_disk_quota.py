"""A sandbox created with a disk size (and an inode count): `df /` inside shows it, writes past it fail with
ENOSPC inside while the host's disk stays free, checkpoints and rollbacks carry the usage, and forks get the same
limits."""

import shutil
import tempfile
from pathlib import Path

import pytest
from support import Daemon, binary, image_dir, new_sandbox

import deltabox

MIB = 1 << 20


def df_root(sb: deltabox.Sandbox) -> tuple:
    """(size KiB, used KiB, available KiB) of / inside the sandbox."""
    out = sb.exec(["df", "-k", "/"]).check().stdout.splitlines()[-1].split()
    return int(out[1]), int(out[2]), int(out[3])


def test_a_disk_limit_is_the_sandboxs_filesystem_size(client):
    with new_sandbox(client, "busybox", disk="32M", inodes=20000) as sb:
        assert (sb.info.disk, sb.info.inodes) == (32 * MIB, 20000)
        assert client.sandbox(sb.id).info.disk == 32 * MIB
        size, used, _ = df_root(sb)
        assert size == 32 * 1024 and 0 < used < 16 * 1024, (size, used)

        filled = sb.exec(["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=100"], timeout=60)
        assert filled.exit_code != 0 and "No space left on device" in filled.stderr, filled.stderr
        # To the last block.
        sb.exec(["sh", "-c", "dd if=/dev/zero of=/big bs=4k count=1000 oflag=append conv=notrunc"], timeout=60)
        _, used_full, available = df_root(sb)
        assert available == 0 and used_full > 31 * 1024, (used_full, available)
        # The sandbox works on: it reads, overwrites bytes it has and removes files.
        sb.exec(["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=1 conv=notrunc"]).check()
        ck = sb.checkpoint(fs_only=True)
        sb.exec(["rm", "/big"]).check()
        sb.exec(["sh", "-c", "dd if=/dev/zero of=/after bs=1M count=8"]).check()

        # A rollback brings back the checkpoint's usage, and a fork gets the same limits and usage.
        sb.rollback(ck)
        assert df_root(sb)[1] == used_full
        again = sb.exec(["sh", "-c", "echo x > /one-more"])
        assert again.exit_code != 0 and "No space left on device" in again.stderr, again.stderr
        [fork] = ck.fork()
        with fork:
            assert (fork.info.disk, fork.info.inodes) == (32 * MIB, 20000)
            assert df_root(fork)[:2] == (32 * 1024, used_full)
            fork.exec(["rm", "/big"]).check()
            fork.exec(["sh", "-c", "dd if=/dev/zero of=/f bs=1M count=8"]).check()


def test_an_inode_limit_bounds_the_number_of_files(client):
    with new_sandbox(client, "busybox", inodes=3000) as sb:
        made = sb.exec(["sh", "-c", "mkdir /many && cd /many && i=0; while touch f$i 2>/dev/null; do i=$((i+1)); "
                                    "done; echo $i; touch g"])
        assert made.exit_code != 0 and "No space left on device" in made.stderr, made.stderr
        assert 0 < int(made.stdout) < 3000
        assert sb.exec(["sh", "-c", "df -i / | tail -1"]).check().stdout.split()[1] == "3000"
        sb.exec(["sh", "-c", "rm /many/f0 && touch /many/g"]).check()


@pytest.mark.parametrize("options,message", [
    ({"disk": "100K"}, "below the minimum"),
    ({"disk": 0}, "below the minimum"),
    ({"inodes": 0}, "at least 1"),
    # The busybox image's files take more than this.
    ({"disk": "1M"}, "more than the disk limit"),
    ({"inodes": 10}, "more than the limit of 10"),
])
def test_disk_limits_that_cannot_hold_the_image_are_refused(client, options, message):
    before = {s.id for s in client.list()}
    with pytest.raises(deltabox.BadRequest) as info:
        client.create("busybox", **options)
    assert info.value.code == "invalid_limits" and message in info.value.message, info.value.message
    assert {s.id for s in client.list()} == before


def test_the_cli_creates_a_sandbox_with_a_disk_limit(client, cli):
    sid = cli("create", "--image", "busybox", "--disk", "16M", "--inodes", "5000").stdout.strip()
    try:
        assert (client.sandbox(sid).info.disk, client.sandbox(sid).info.inodes) == (16 * MIB, 5000)
        assert df_root(client.sandbox(sid))[0] == 16 * 1024
        listed = [line for line in cli("ls").stdout.splitlines() if line.startswith(sid)]
        assert len(listed) == 1 and "16.0 MiB" in listed[0], listed
    finally:
        cli("rm", sid)
    bad = cli("create", "--image", "busybox", "--disk", "10x", ok=False)
    assert "10x" in bad.stderr, bad.stderr


def test_an_upload_past_the_disk_limit_fails_and_leaves_nothing(client):
    with new_sandbox(client, "busybox", disk="16M") as sb:
        assert sb.info.inodes == 1024, "one inode per 16 KiB of disk, as mkfs.ext4 makes"
        sb.files.write("/kept", b"kept")
        with pytest.raises(deltabox.InsufficientStorage) as info:
            sb.files.write("/too-big", b"\0" * (32 * MIB))
        assert info.value.code == "no_space", info.value
        assert not sb.files.exists("/too-big")
        assert sb.files.read("/kept") == b"kept"
        sb.files.write("/fits", b"\1" * MIB)


def test_a_daemon_gives_its_default_limits_to_sandboxes_created_without_their_own():
    workdir = Path(tempfile.mkdtemp(prefix="deltabox-it-quota-"))
    d = Daemon(binary(), workdir, ["--default-disk", "24M", "--default-inodes", "4000"])
    try:
        d.start()
        with deltabox.Client(socket=d.socket) as c:
            c.images.import_(str(image_dir() / "busybox"), "busybox")
            with new_sandbox(c, "busybox") as sb:
                assert (sb.info.disk, sb.info.inodes) == (24 * MIB, 4000)
                assert df_root(sb)[0] == 24 * 1024
                filled = sb.exec(["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=100"], timeout=60)
                assert "No space left on device" in filled.stderr, filled.stderr
            with new_sandbox(c, "busybox", disk="48M") as sb:
                assert (sb.info.disk, sb.info.inodes) == (48 * MIB, 4000)
        assert d.stop() == 0
    finally:
        if d.proc is not None:
            d.stop()
        shutil.rmtree(workdir, ignore_errors=True)
