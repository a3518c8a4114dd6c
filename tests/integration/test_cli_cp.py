"""`deltabox cp` copies as `cp -r` does: into an existing directory under the source's name, else to the path."""

import os

from support import new_sandbox


def test_cp_into_the_sandbox(client, cli, tmp_path):
    (tmp_path / "notes.txt").write_text("notes\n")
    (tmp_path / "proj" / "src").mkdir(parents=True)
    (tmp_path / "proj" / "src" / "app.py").write_text("print(1)\n")
    with new_sandbox(client, "busybox") as sb:
        local = str(tmp_path / "notes.txt")
        cli("cp", local, f"{sb.id}:/tmp")
        cli("cp", local, f"{sb.id}:/tmp/renamed.txt")
        cli("cp", local, f"{sb.id}:/new/parents/n.txt")
        sb.files.write("/tmp/old.txt", "old content that is longer\n")
        cli("cp", local, f"{sb.id}:/tmp/old.txt")
        cli("cp", str(tmp_path / "proj"), f"{sb.id}:/tmp")
        cli("cp", str(tmp_path / "proj"), f"{sb.id}:/tmp/copy")
        for path in ["/tmp/notes.txt", "/tmp/renamed.txt", "/new/parents/n.txt", "/tmp/old.txt"]:
            assert sb.files.read_text(path) == "notes\n", path
        assert sb.files.read_text("/tmp/proj/src/app.py") == "print(1)\n"
        assert sb.files.read_text("/tmp/copy/src/app.py") == "print(1)\n"
        assert not sb.files.exists("/tmp/copy/proj")
        failed = cli("cp", str(tmp_path / "proj"), f"{sb.id}:/tmp/notes.txt", ok=False)
        assert "onto non-directory" in failed.stderr
        assert sb.files.read_text("/tmp/notes.txt") == "notes\n"


def test_cp_out_of_the_sandbox(client, cli, tmp_path):
    with new_sandbox(client, "busybox") as sb:
        sb.files.write("/work/a.txt", "a\n")
        sb.files.write("/work/dir/sub/b.txt", "b\n")
        (tmp_path / "into").mkdir()
        cli("cp", f"{sb.id}:/work/a.txt", str(tmp_path / "into"))
        cli("cp", f"{sb.id}:/work/a.txt", str(tmp_path / "renamed.txt"))
        (tmp_path / "old.txt").write_text("old content that is longer\n")
        cli("cp", f"{sb.id}:/work/a.txt", str(tmp_path / "old.txt"))
        cli("cp", f"{sb.id}:/work/dir", str(tmp_path / "into"))
        cli("cp", f"{sb.id}:/work/dir", str(tmp_path / "copy"))
        for path in ["into/a.txt", "renamed.txt", "old.txt"]:
            assert (tmp_path / path).read_text() == "a\n", path
        assert (tmp_path / "into" / "dir" / "sub" / "b.txt").read_text() == "b\n"
        assert (tmp_path / "copy" / "sub" / "b.txt").read_text() == "b\n"
        assert not os.path.exists(tmp_path / "copy" / "dir")
        failed = cli("cp", f"{sb.id}:/work/dir", str(tmp_path / "old.txt"), ok=False)
        assert "onto non-directory" in failed.stderr
        missing = cli("cp", f"{sb.id}:/work/nope", str(tmp_path / "x"), ok=False)
        assert "no such file" in missing.stderr


def test_cp_out_keeps_holes(client, cli, tmp_path):
    """A sparse file (an agent can plant 100 GB of holes under a small disk limit) travels as its data regions
    and is written sparse: it once came out dense, through the client's memory."""
    with new_sandbox(client, "debian") as sb:
        sb.exec(["sh", "-c", "mkdir /work && printf head > /work/big && truncate -s 100G /work/big "
                             "&& printf tail >> /work/big && printf plain > /work/small"]).check()
        cli("cp", f"{sb.id}:/work", str(tmp_path / "out"))
        big = tmp_path / "out" / "big"
        assert big.stat().st_size == 100 * 2**30 + 4
        assert big.stat().st_blocks * 512 < 1 << 20, "the holes were written as data"
        with open(big, "rb") as f:
            assert f.read(4) == b"head"
            f.seek(100 * 2**30)
            assert f.read() == b"tail"
        assert (tmp_path / "out" / "small").read_text() == "plain"
        # The SDK reads the same archive (Python's tarfile knows GNU sparse entries).
        local = sb.files.download("/work/big", tmp_path / "sdk")
        assert os.stat(local).st_size == 100 * 2**30 + 4


def test_cp_out_stops_at_max_size(client, cli, tmp_path):
    with new_sandbox(client, "debian") as sb:
        sb.exec(["sh", "-c", "mkdir /work && for f in a b c; do head -c 1048576 /dev/urandom > /work/$f; done"]).check()
        failed = cli("cp", "--max-size", "2500K", f"{sb.id}:/work", str(tmp_path / "out"), ok=False)
        assert "--max-size" in failed.stderr
        assert sum(f.stat().st_size for f in (tmp_path / "out").iterdir()) <= 2500 * 1024
        cli("cp", "--max-size", "4M", f"{sb.id}:/work", str(tmp_path / "all"))
        assert len(list((tmp_path / "all").iterdir())) == 3


def test_cp_out_links_pointing_out(client, cli, tmp_path):
    """A sandbox's symlink to an absolute path comes out as that link (as with `docker cp`: on this machine it
    names this machine's file); --no-outside-links refuses it."""
    with new_sandbox(client, "busybox") as sb:
        sb.exec(["sh", "-c", "mkdir /work && ln -s /etc/passwd /work/pw && ln -s sub/x /work/in"]).check()
        cli("cp", f"{sb.id}:/work", str(tmp_path / "plain"))
        assert os.readlink(tmp_path / "plain" / "pw") == "/etc/passwd"
        failed = cli("cp", "--no-outside-links", f"{sb.id}:/work", str(tmp_path / "safe"), ok=False)
        assert "points outside" in failed.stderr
        sb.exec(["rm", "/work/pw"]).check()
        cli("cp", "--no-outside-links", f"{sb.id}:/work", str(tmp_path / "safe2"))
        assert os.readlink(tmp_path / "safe2" / "in") == "sub/x"
