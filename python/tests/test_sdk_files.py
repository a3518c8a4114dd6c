"""Files calls (against the fake daemon in conftest.py) and the safety of downloads."""

import io
import os
import tarfile

import pytest
from fake_daemon import Reply

import deltabox
from deltabox import files as files_module

STAT = {
    "path": "/work/a.txt",
    "name": "a.txt",
    "kind": "file",
    "size": 3,
    "mode": 0o644,
    "uid": 0,
    "gid": 0,
    "mtime": 1700000000.5,
    "link_target": None,
}


@pytest.fixture
def base(sandbox):
    return f"/v1/sandboxes/{sandbox.id}/files"


def test_write_sends_raw_bytes_and_options(fake, sandbox, base):
    fake.route("PUT", base, Reply(201, STAT))
    st = sandbox.files.write("/work/a.txt", "hé", mode=0o755, uid=1000, gid=1000)
    req = fake.requests[-1]
    assert req.query == {"path": "/work/a.txt", "mode": "755", "uid": "1000", "gid": "1000"}
    assert req.body == "hé".encode()
    assert req.headers["content-type"] == "application/octet-stream"
    assert st == deltabox.FileStat.from_json(STAT) and st.is_file and st.permissions == "rw-r--r--"


def test_write_from_a_file_object_sends_its_length(fake, sandbox, base):
    fake.route("PUT", base, Reply(200, STAT))
    source = io.BytesIO(b"0123456789")
    source.seek(4)
    sandbox.files.write("/work/a.txt", source)
    req = fake.requests[-1]
    assert req.body == b"456789" and req.headers["content-length"] == "6"
    assert "mode" not in req.query


def test_an_early_answer_to_a_large_upload_is_read(fake, sandbox, base):
    # The daemon may refuse a request before reading its body and close the connection; the SDK must report
    # the daemon's error, not the broken pipe it gets while still sending.
    fake.route("PUT", base, Reply(404, {"error": "sandbox_not_found", "message": "gone"}, early=True))
    with pytest.raises(deltabox.SandboxNotFound, match="gone"):
        sandbox.files.write("/big", b"x" * (16 << 20))


@pytest.mark.parametrize("mode", [0o10000, -1, "9", "", "rw"])
def test_bad_modes_are_refused_before_sending(fake, sandbox, mode):
    with pytest.raises(ValueError):
        sandbox.files.write("/x", b"", mode=mode)
    assert [r.path for r in fake.requests] == ["/v1/sandboxes"]


def test_read_stat_list_mkdir_remove(fake, sandbox, base):
    fake.route("GET", base, Reply(200, b"\x00binary", content_type="application/octet-stream"))
    fake.route("GET", base + "/stat", Reply(200, STAT))
    fake.route("GET", base + "/list", Reply(200, {"entries": [STAT, dict(STAT, name="d", kind="dir")]}))
    fake.route("POST", base + "/mkdir", Reply(201, dict(STAT, kind="dir")))
    fake.route("DELETE", base, Reply(200, {"path": "/work", "removed": True}))
    assert sandbox.files.read("/work/a.txt") == b"\x00binary"
    assert fake.requests[-1].query == {"path": "/work/a.txt"}
    assert sandbox.files.stat("/work/a.txt").mtime == 1700000000.5
    assert [e.is_dir for e in sandbox.files.list("/work")] == [False, True]
    assert sandbox.files.mkdir("/work/d", mode="700", parents=False).is_dir
    assert fake.requests[-1].query == {"path": "/work/d", "mode": "700", "parents": "false"}
    sandbox.files.mkdir("/work/u", uid=1000, gid=100)
    assert fake.requests[-1].query == {"path": "/work/u", "parents": "true", "uid": "1000", "gid": "100"}
    sandbox.files.remove("/work", recursive=True)
    assert fake.requests[-1].query == {"path": "/work", "recursive": "true"}


def test_read_text_and_exists(fake, sandbox, base):
    fake.route("GET", base, Reply(200, "grüß\n".encode(), content_type="application/octet-stream"))
    assert sandbox.files.read_text("/x") == "grüß\n"
    fake.route("GET", base + "/stat", Reply(404, {"error": "file_not_found", "message": "/nope: no such file"}))
    assert sandbox.files.exists("/nope") is False
    with pytest.raises(deltabox.FileNotFound):
        sandbox.files.stat("/nope")


def test_upload_sends_a_tar_of_the_tree_owned_by_root(fake, sandbox, base, tmp_path):
    tree = tmp_path / "proj"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "run.sh").write_text("echo hi\n")
    os.chmod(tree / "sub" / "run.sh", 0o750)
    (tree / "link").symlink_to("sub/run.sh")
    stats = {"files": 1, "dirs": 2, "symlinks": 1, "hardlinks": 0, "fifos": 0, "bytes": 8, "skipped_devices": 0,
             "ids_out_of_range": 0}
    fake.route("PUT", base + "/tar", Reply(200, stats))
    uploaded = sandbox.files.upload(tree, "/work")
    assert uploaded == deltabox.ExtractStats(**stats) and uploaded.entries == 4
    req = fake.requests[-1]
    assert req.query == {"path": "/work"} and req.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(req.body)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"proj", "proj/sub", "proj/sub/run.sh", "proj/link"}
        assert all(m.uid == 0 and m.gid == 0 for m in members.values())
        assert members["proj/sub/run.sh"].mode == 0o750
        assert members["proj/link"].linkname == "sub/run.sh"
        assert tar.extractfile("proj/sub/run.sh").read() == b"echo hi\n"


def test_upload_of_a_missing_path(fake, sandbox):
    with pytest.raises(FileNotFoundError):
        sandbox.files.upload("/definitely/not/here", "/work")


def tar_bytes(entries):
    """A tar of (TarInfo, data) pairs."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in entries:
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def entry(name, kind=tarfile.REGTYPE, data=b"", linkname="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    return info, data


def test_download_directory(fake, sandbox, base, tmp_path):
    fake.route("GET", base + "/stat", Reply(200, dict(STAT, path="/work/proj", name="proj", kind="dir")))
    archive = tar_bytes([
        entry("sub", tarfile.DIRTYPE, mode=0o755),
        entry("sub/f.txt", data=b"data"),
        entry("rel", tarfile.SYMTYPE, linkname="sub/f.txt"),
    ])
    fake.route("GET", base + "/tar", Reply(200, archive, content_type="application/x-tar"))
    local = sandbox.files.download("/work/proj", tmp_path / "out")
    assert local == str(tmp_path / "out" / "proj")
    assert (tmp_path / "out" / "proj" / "sub" / "f.txt").read_bytes() == b"data"
    assert os.readlink(tmp_path / "out" / "proj" / "rel") == "sub/f.txt"


def test_download_file(fake, sandbox, base, tmp_path):
    fake.route("GET", base + "/stat", Reply(200, STAT))
    fake.route("GET", base + "/tar", Reply(200, tar_bytes([entry("a.txt", data=b"abc")])))
    assert sandbox.files.download("/work/a.txt", tmp_path) == str(tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_bytes() == b"abc"


HOSTILE = [
    entry("../escape.txt", data=b"x"),
    entry("a/../../escape.txt", data=b"x"),
    entry("up", tarfile.SYMTYPE, linkname="../../etc"),
    entry("abs", tarfile.SYMTYPE, linkname="/etc/passwd"),
    entry("hard", tarfile.LNKTYPE, linkname="../outside"),
    entry("dev", tarfile.CHRTYPE),
]


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda e: e[0].name)
def test_download_refuses_entries_that_leave_the_destination(fake, sandbox, base, tmp_path, hostile):
    fake.route("GET", base + "/stat", Reply(200, dict(STAT, path="/d", name="d", kind="dir")))
    fake.route("GET", base + "/tar", Reply(200, tar_bytes([hostile])))
    with pytest.raises((ValueError, tarfile.TarError)):
        sandbox.files.download("/d", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda e: e[0].name)
def test_fallback_checks_match_the_data_filter(tmp_path, hostile):
    # Pythons without tarfile's extraction filters use _checked_member: it must refuse the same entries.
    with pytest.raises(ValueError):
        files_module._checked_member(hostile[0], str(tmp_path))


def test_fallback_extraction_keeps_safe_entries(tmp_path, monkeypatch):
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = tar_bytes([
        entry("/top.txt", data=b"t"),
        entry("d", tarfile.DIRTYPE, mode=0o777),
        entry("d/f", data=b"abc", mode=0o4777),
        entry("d/l", tarfile.SYMTYPE, linkname="f"),
    ])
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r|*") as tar:
        files_module._extract(tar, str(tmp_path))
    assert (tmp_path / "d" / "f").read_bytes() == b"abc"
    assert (tmp_path / "top.txt").read_bytes() == b"t"
    assert os.stat(tmp_path / "d" / "f").st_mode & 0o7777 == 0o755
    assert os.stat(tmp_path / "d").st_mode & 0o7777 == 0o755
    assert os.readlink(tmp_path / "d" / "l") == "f"
