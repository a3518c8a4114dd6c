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
