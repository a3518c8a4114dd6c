"""The files API: every call, ownership as the sandbox sees it, upload/download round trips."""

import hashlib
import io
import os
import tarfile

import pytest

import deltabox


@pytest.fixture
def files(debian):
    debian.exec(["rm", "-rf", "/work"]).check()
    return debian.files


def inside(debian, command):
    return debian.exec(["sh", "-c", command]).check().stdout


def test_write_read_stat(debian, files):
    data = bytes(range(256)) * 100
    st = files.write("/work/deep/data.bin", data, mode=0o640)
    assert (st.path, st.name, st.kind, st.size, st.mode, st.uid, st.gid) == (
        "/work/deep/data.bin", "data.bin", "file", len(data), 0o640, 0, 0)
    assert files.read("/work/deep/data.bin") == data
    assert files.stat("/work/deep/data.bin") == st
    # Programs inside see the same file, owned by root, with the mode asked for.
    assert inside(debian, "stat -c '%s %a %u %g' /work/deep/data.bin") == f"{len(data)} 640 0 0\n"
    assert inside(debian, "stat -c '%a %u' /work/deep") == "755 0\n"
    files.write("/work/deep/data.bin", "replaced\n")
    assert files.read_text("/work/deep/data.bin") == "replaced\n"
    assert files.stat("/work/deep/data.bin").mode == 0o644


def test_large_file_round_trip(debian, files):
    data = os.urandom(24 << 20)
    assert files.write("/work/large.bin", data).size == len(data)
    assert files.read("/work/large.bin") == data
    assert inside(debian, "sha256sum /work/large.bin").split()[0] == hashlib.sha256(data).hexdigest()


def test_reading_a_file_the_sandbox_keeps_rewriting(debian, files):
    """Each read answers bytes the file held, whole; it never breaks the connection when the file shrinks or grows
    while it is read (the answer's length was taken from fstat before), and a read racing the truncation of `>`
    never sees the old length as NUL bytes (docs/deltafs.md, "Reading while another process truncates")."""
    # Both files exist before the loop starts, so every read below must find them.
    inside(debian, "rm -f /tmp/stop; mkdir -p /work && echo 0 > /work/n && : > /work/z && (i=0; while [ ! -e /tmp/stop ] && [ $i -lt 100000 ]; do "
                   "i=$((i+1)); echo $i > /work/n; head -c $((i % 3000)) /dev/zero > /work/z; done) "
                   ">/dev/null 2>&1 &")
    try:
        for _ in range(300):
            n = files.read_text("/work/n")
            assert n == "" or (n.endswith("\n") and n[:-1].isdigit()), repr(n)
            z = files.read("/work/z")
            assert z == bytes(len(z)), "bytes of /work/z that were never written"
    finally:
        inside(debian, "touch /tmp/stop")


def test_files_written_inside_are_readable(debian, files):
    inside(debian, "mkdir -p /work && printf 'from inside' > /work/in.txt && ln -s in.txt /work/link")
    assert files.read_text("/work/in.txt") == "from inside"
    assert files.read_text("/work/link") == "from inside"
    link = files.stat("/work/link")
    assert (link.kind, link.link_target) == ("symlink", "in.txt")
    # The sandbox's own mounts (/tmp is a tmpfs inside) are seen as the sandbox sees them.
    inside(debian, "echo tmpfs > /tmp/on-tmpfs")
    assert files.read_text("/tmp/on-tmpfs") == "tmpfs\n"


def test_ownership_as_the_sandbox_sees_it(debian, files):
    st = files.write("/work/user.txt", b"x", uid=1000, gid=1000)
    assert (st.uid, st.gid) == (1000, 1000)
    assert inside(debian, "stat -c '%u %g' /work/user.txt") == "1000 1000\n"
    # The sandbox user may change its own file.
    assert debian.exec(["sh", "-c", "echo more >> /work/user.txt"], user="1000:1000").ok
    inside(debian, "touch /work/by-nobody && chown 65534:65534 /work/by-nobody")
    assert (files.stat("/work/by-nobody").uid, files.stat("/work/by-nobody").gid) == (65534, 65534)
    assert (files.stat("/etc/passwd").uid, files.stat("/etc/passwd").gid) == (0, 0)


def test_list_mkdir_remove(files):
    files.mkdir("/work/a/b/c", mode=0o700)
    assert files.stat("/work/a/b/c").mode == 0o700
    files.write("/work/a/f1", b"1")
    files.write("/work/a/f2", b"22")
    entries = {e.name: e for e in files.list("/work/a")}
    assert set(entries) == {"b", "f1", "f2"}
    assert entries["b"].is_dir and entries["f2"].size == 2
    with pytest.raises(deltabox.DeltaboxError):
        files.mkdir("/work/x/y", parents=False)
    with pytest.raises(deltabox.DeltaboxError) as err:
        files.remove("/work/a")
    assert err.value.status == 400 or err.value.status == 409
    assert files.exists("/work/a/f1")
    files.remove("/work/a/f1")
    assert not files.exists("/work/a/f1")
    files.remove("/work/a", recursive=True)
    assert not files.exists("/work/a")


def test_errors(files):
    with pytest.raises(deltabox.FileNotFound):
        files.read("/work/missing")
    with pytest.raises(deltabox.FileNotFound):
        files.list("/work/missing")
    with pytest.raises(deltabox.FileNotFound):
        files.remove("/work/missing")
    files.mkdir("/work/dir")
    with pytest.raises(deltabox.BadRequest) as err:
        files.read("/work/dir")
    assert err.value.code == "is_a_directory"
    with pytest.raises(deltabox.BadRequest):
        files.write("/work/dir", b"x")
    assert files.stat("/work/dir").is_dir


def test_upload_and_download_round_trip(debian, files, tmp_path):
    tree = tmp_path / "project"
    (tree / "src" / "pkg").mkdir(parents=True)
    (tree / "src" / "pkg" / "mod.py").write_text("VALUE = 42\n")
    (tree / "run.sh").write_text("#!/bin/sh\necho run\n")
    os.chmod(tree / "run.sh", 0o755)
    (tree / "blob").write_bytes(os.urandom(300_000))
    (tree / "latest").symlink_to("src/pkg/mod.py")
    (tree / "empty").mkdir()
    stats = files.upload(tree, "/work")
    assert (stats.files, stats.dirs, stats.symlinks, stats.entries) == (3, 4, 1, 8)
    assert stats.bytes == 300_000 + len("VALUE = 42\n") + len("#!/bin/sh\necho run\n")
    assert inside(debian, "cd /work/project && ./run.sh && python3 -c 'import sys; sys.path.insert(0, \"src\");"
                          " import pkg.mod; print(pkg.mod.VALUE)' && stat -c '%u %a' run.sh blob") == \
        "run\n42\n0 755\n0 644\n"
    out = files.download("/work/project", tmp_path / "back")
    assert out == str(tmp_path / "back" / "project")
    for rel in ["src/pkg/mod.py", "run.sh", "blob"]:
        assert (tmp_path / "back" / "project" / rel).read_bytes() == (tree / rel).read_bytes()
    assert os.stat(tmp_path / "back" / "project" / "run.sh").st_mode & 0o777 == 0o755
    assert os.readlink(tmp_path / "back" / "project" / "latest") == "src/pkg/mod.py"
    assert (tmp_path / "back" / "project" / "empty").is_dir()


def test_single_file_upload_and_download(files, tmp_path):
    local = tmp_path / "notes.txt"
    local.write_text("notes\n")
    assert files.upload(local, "/work/docs").files == 1
    assert files.read_text("/work/docs/notes.txt") == "notes\n"
    assert files.download("/work/docs/notes.txt", tmp_path / "dl") == str(tmp_path / "dl" / "notes.txt")
    assert (tmp_path / "dl" / "notes.txt").read_text() == "notes\n"


def test_gzip_tar_upload_and_tar_download(files):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("z/hello.txt")
        info.size, info.mode, info.uid, info.gid = 6, 0o600, 1000, 1000
        tar.addfile(info, io.BytesIO(b"hello\n"))
    assert files.upload_tar("/work/gz", buf.getvalue()).files == 1
    st = files.stat("/work/gz/z/hello.txt")
    assert (st.mode, st.uid, st.gid, st.size) == (0o600, 1000, 1000, 6)
    archive = b"".join(files.download_tar("/work/gz"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = {m.name.rstrip("/").removeprefix("./"): m for m in tar.getmembers()}
        assert tar.extractfile(names["z/hello.txt"]).read() == b"hello\n"
        assert (names["z/hello.txt"].uid, names["z/hello.txt"].mode) == (1000, 0o600)


def tar_of(*entries):
    """A tar of (name, type, linkname) entries, regular files empty."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, linkname in entries:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, linkname
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


@pytest.mark.parametrize("entries", [
    [("../escape", tarfile.REGTYPE, "")],
    [("a/../../escape", tarfile.REGTYPE, "")],
    [("evil", tarfile.SYMTYPE, "/etc"), ("evil/passwd", tarfile.REGTYPE, "")],
    [("up", tarfile.SYMTYPE, "../../.."), ("up/etc/passwd", tarfile.REGTYPE, "")],
    [("hard", tarfile.LNKTYPE, "../../etc/passwd")],
], ids=["dotdot", "inner-dotdot", "through-own-symlink", "through-relative-symlink", "hardlink-out"])
def test_hostile_archives_are_refused(debian, files, entries):
    passwd = files.read("/etc/passwd")
    with pytest.raises(deltabox.BadRequest) as err:
        files.upload_tar("/work/t", tar_of(*entries))
    assert err.value.code == "archive_entry_refused", err.value
    assert files.read("/etc/passwd") == passwd
    assert not files.exists("/work/escape") and not files.exists("/escape")


def test_not_a_tar_is_refused(files):
    with pytest.raises(deltabox.BadRequest) as err:
        files.upload_tar("/work/t", b"this is not a tar archive" * 100)
    assert err.value.code == "bad_archive"
