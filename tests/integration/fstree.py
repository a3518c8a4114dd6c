"""Filesystem states inside a sandbox for the checkpoint tests: build a tree with every kind of file, change it in
every way, and describe it exactly (a manifest computed inside the sandbox, so it sees what the sandbox sees).

The scripts run with the sandbox's python3, fed on stdin (they leave no file behind, so they change nothing the
manifests compare).
"""

from __future__ import annotations

import json
from typing import Any, Dict

import deltabox

# A manifest of the tree below argv[1]: for every entry (the root included) its type and permission bits, owner,
# link count, inode number, size, mtime and ctime (ns), xattrs (names and values), and by type: the sha256 and
# allocated blocks of a regular file, a symlink's target, a device's rdev. argv[2] == "light" leaves out content
# hashes (for a whole root filesystem), and skips the kernel's pseudo filesystems.
MANIFEST = r"""
import hashlib, json, os, stat, sys

root, light = sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "light"
SKIP = {"/proc", "/sys", "/dev"}

def describe(path):
    st = os.lstat(path)
    e = {"mode": oct(st.st_mode), "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink, "ino": st.st_ino,
         "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    if not stat.S_ISDIR(st.st_mode):
        e["size"] = st.st_size
    xattrs = {}
    for name in sorted(os.listxattr(path, follow_symlinks=False)):
        xattrs[name] = os.getxattr(path, name, follow_symlinks=False).hex()
    if xattrs:
        e["xattrs"] = xattrs
    if stat.S_ISREG(st.st_mode):
        e["blocks"] = st.st_blocks
        if not light:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            e["sha256"] = h.hexdigest()
    elif stat.S_ISLNK(st.st_mode):
        e["target"] = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        e["rdev"] = st.st_rdev
    return e

out = {".": describe(root)}
for top, dirs, files in os.walk(root):
    if top in SKIP and light:
        dirs[:] = []
        continue
    dirs.sort()
    for name in sorted(dirs + files):
        path = os.path.join(top, name)
        if not (light and path in SKIP):
            out[os.path.relpath(path, root)] = describe(path)
json.dump(out, sys.stdout, sort_keys=True)
"""

# Builds a tree with every kind of file below argv[1] (which must not exist).
BUILD = r"""
import os, random, socket, struct, sys

root = sys.argv[1]
rng = random.Random(1234)
os.makedirs(root)
os.chdir(root)
def write(path, data, mode=0o644):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)

os.makedirs("src/pkg/deep/er")
write("src/hello.txt", b"hello world\n")
write("src/pkg/__init__.py", b"VALUE = 42\n")
write("src/pkg/deep/er/blob.bin", rng.randbytes(300_000))
write("empty", b"")
write("script.sh", b"#!/bin/sh\necho hi\n", 0o755)
write("setuid-tool", b"\x7fELF-not-really", 0o644)
os.chmod("setuid-tool", 0o4755)
write("setgid-tool", b"sg", 0o2711)
os.makedirs("shared")
os.chmod("shared", 0o1777)
os.makedirs("group-dir")
os.chmod("group-dir", 0o2775)
os.makedirs("user-home")
write("user-home/notes", b"private\n", 0o600)
os.chown("user-home/notes", 1000, 1000)
os.chown("user-home", 1000, 1001)
write("odd name with spaces \u00e9\u00e8", b"unicode\n")
write("n" * 255, b"long name\n")
os.makedirs("many")
for i in range(200):
    write(f"many/f{i:03}", f"{i}\n".encode() * (i % 7))

os.symlink("src/hello.txt", "link-rel")
os.symlink("/etc/hostname", "link-abs")
os.symlink("does/not/exist", "link-dangling")
os.symlink("src/pkg", "link-dir")
os.symlink("link-rel", "link-chain")

write("hard-a", b"shared inode\n")
os.link("hard-a", "hard-b")
os.link("hard-a", "src/hard-c")
write("hard-pair", b"two links\n")
os.link("hard-pair", "many/hard-pair")

os.setxattr("src/hello.txt", "user.comment", b"greeting")
os.setxattr("src/hello.txt", "user.binary", bytes(range(256)))
os.setxattr("src/pkg", "user.dir-attr", b"on a directory")
os.setxattr("hard-a", "user.on-hardlink", b"seen through every name")
# security.capability (cap_net_bind_service=ep, VFS_CAP_REVISION_2), as setcap would write it.
write("capable", b"cap", 0o755)
os.setxattr("capable", "security.capability", struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0))

os.mkfifo("fifo", 0o640)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind("unix.sock")
sock.close()

with open("sparse", "wb") as f:
    for offset in (0, 8 << 20, (32 << 20) - 5):
        f.seek(offset)
        f.write(b"data!")
write("big", rng.randbytes(8 << 20))

os.utime("src/hello.txt", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
os.utime("link-rel", ns=(1_400_000_000_000_000_000, 1_400_000_000_000_000_001), follow_symlinks=False)
"""

# Changes everything about the tree built by BUILD below argv[1], and some image files outside it.
MUTATE = r"""
import os, shutil, sys

root = sys.argv[1]
os.chdir(root)
def write(path, data, mode=0o644):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)

with open("src/hello.txt", "r+b") as f:
    f.write(b"HELLO")                                   # overwrite in place
with open("src/pkg/__init__.py", "ab") as f:
    f.write(b"OTHER = 1\n")                             # append
with open("big", "r+b") as f:
    f.seek(5_000_000)
    f.write(b"a few bytes in the middle")               # one chunk of a big file
    f.seek(0, 2)
    f.write(b"appended")
with open("sparse", "r+b") as f:
    f.seek(20 << 20)
    f.write(b"into a hole")
os.truncate("src/pkg/deep/er/blob.bin", 1000)           # shrink
os.truncate("empty", 1 << 20)                           # grow (sparse)
os.remove("script.sh")
os.rename("src/hello.txt", "renamed.txt")
os.rename("src/pkg", "pkg-moved")                       # a directory with content
os.rename("many/f001", "many/f002")                     # over an existing file
shutil.rmtree("many")
os.chmod("setuid-tool", 0o755)
os.chmod("shared", 0o700)
os.chown("user-home/notes", 2000, 2000)
os.chown("setgid-tool", 5, 5)
os.setxattr("renamed.txt", "user.comment", b"changed")
os.removexattr("renamed.txt", "user.binary")
os.setxattr("empty", "user.new", b"new attribute")
os.removexattr("capable", "security.capability")
os.link("hard-a", "hard-d")                             # nlink 3 -> 4
os.remove("hard-b")
os.remove("hard-pair")
os.remove("link-rel")
os.symlink("elsewhere", "link-rel")                     # same name, other target
os.remove("fifo")
os.remove("unix.sock")
os.mkfifo("new-fifo")
os.makedirs("new/dir/tree")
write("new/dir/tree/file", b"created after the checkpoint\n")
os.utime("hard-a", ns=(1, 2))
os.chmod(".", 0o700)
# Files of the image (lower layers): changed, deleted, a whole directory removed.
with open("/etc/issue", "a") as f:
    f.write("changed\n")
os.remove("/etc/debian_version")
shutil.rmtree("/usr/share/zoneinfo")
os.rename("/usr/share/doc", "/usr/share/doc-moved")
"""


def run_python(sb: deltabox.Sandbox, script: str, *args: str, timeout: float = 120) -> str:
    """Runs ``script`` with the sandbox's python3 (as root) and returns its stdout; fails the test if it fails."""
    return sb.exec(["python3", "-", *args], stdin=script, timeout=timeout).check().stdout


def manifest(sb: deltabox.Sandbox, root: str, light: bool = False) -> Dict[str, Any]:
    """The manifest of ``root`` inside the sandbox (see MANIFEST)."""
    return json.loads(run_python(sb, MANIFEST, root, *(["light"] if light else [])))


def differences(expected: Dict[str, Any], actual: Dict[str, Any], limit: int = 20) -> list:
    """What differs between two manifests, readably (at most ``limit`` items)."""
    out = [f"missing {p}" for p in sorted(set(expected) - set(actual))]
    out += [f"unexpected {p}: {actual[p]}" for p in sorted(set(actual) - set(expected))]
    for path in sorted(set(expected) & set(actual)):
        e, a = expected[path], actual[path]
        for key in sorted(set(e) | set(a)):
            if e.get(key) != a.get(key):
                out.append(f"{path}: {key} {a.get(key)!r} != {e.get(key)!r}")
    return out[:limit]
