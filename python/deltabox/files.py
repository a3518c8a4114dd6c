"""Files of a sandbox, read and written by the daemon (paths are sandbox paths; symlinks never leave the sandbox)."""

from __future__ import annotations

import os
import posixpath
import tarfile
import tempfile
from typing import IO, TYPE_CHECKING, Iterator, List, Optional, Union

from .errors import NotFound
from .models import ExtractStats, FileStat

if TYPE_CHECKING:
    from ._http import Transport

Data = Union[bytes, str, IO[bytes]]
Mode = Union[int, str, None]

# Uploads are built in memory up to this size, then in a temporary file.
_SPOOL_BYTES = 32 << 20


def _mode(mode: Mode) -> Optional[str]:
    """A mode as the API's octal digits: ``0o644`` or ``"644"`` → ``"644"``."""
    if mode is None:
        return None
    if isinstance(mode, int):
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"mode {mode:#o} has bits beyond 0o7777")
        return format(mode, "o")
    if not mode or any(c not in "01234567" for c in mode):
        raise ValueError(f"mode {mode!r} is not octal digits")
    return mode


class Files:
    """File operations on one sandbox (``sandbox.files``)."""

    def __init__(self, transport: "Transport", sandbox_path: str) -> None:
        self._transport = transport
        self._base = sandbox_path + "/files"

    def read(self, path: str) -> bytes:
        """The contents of the regular file ``path``."""
        return self._transport.request("GET", self._base, query={"path": path}).read()

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """The contents of ``path`` decoded as text."""
        return self.read(path).decode(encoding)

    def write(self, path: str, data: Data, *, mode: Mode = None, uid: Optional[int] = None,
              gid: Optional[int] = None) -> FileStat:
        """Writes ``data`` (bytes, text as UTF-8, or a binary file object) to ``path``, replacing it.

        Missing parent directories are created. ``mode`` (e.g. ``0o755``; daemon default 644), ``uid`` and
        ``gid`` (ids inside the sandbox; default root) set the new file's permissions and owner.
        """
        body = data.encode() if isinstance(data, str) else data
        query = {"path": path, "mode": _mode(mode), "uid": uid, "gid": gid}
        resp = self._transport.request("PUT", self._base, query=query, body=body,
                                       content_type="application/octet-stream")
        return FileStat.from_json(resp.json())

    def stat(self, path: str) -> FileStat:
        """Metadata of ``path`` (a symlink is described itself, not followed)."""
        return FileStat.from_json(self._transport.call("GET", self._base + "/stat", query={"path": path}))

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists in the sandbox."""
        try:
            self.stat(path)
        except NotFound:
            return False
        return True

    def list(self, path: str) -> List[FileStat]:
        """The entries of directory ``path``."""
        data = self._transport.call("GET", self._base + "/list", query={"path": path})
        return [FileStat.from_json(e) for e in data["entries"]]

    def mkdir(self, path: str, *, mode: Mode = None, parents: bool = True, uid: Optional[int] = None,
              gid: Optional[int] = None) -> FileStat:
        """Creates directory ``path`` (and its missing parents unless ``parents`` is false), default mode 755,
        owned by ``uid``/``gid`` (default root; missing parents get the same owner)."""
        query = {"path": path, "mode": _mode(mode), "parents": parents, "uid": uid, "gid": gid}
        return FileStat.from_json(self._transport.call("POST", self._base + "/mkdir", query=query))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Removes a file, or a directory (its contents too if ``recursive``)."""
        self._transport.call("DELETE", self._base, query={"path": path, "recursive": recursive})

    def upload_tar(self, remote_dir: str, archive: Union[bytes, IO[bytes]]) -> ExtractStats:
        """Unpacks a tar archive (plain, gzip or zstd) into ``remote_dir``, created if missing.

        Entries with ``..``, and entries through symlinks of the archive, are refused; device nodes are skipped.
        """
        resp = self._transport.request("PUT", self._base + "/tar", query={"path": remote_dir}, body=archive,
                                       content_type="application/x-tar")
        return ExtractStats.from_json(resp.json())

    def upload(self, local_path: Union[str, "os.PathLike[str]"], remote_dir: str, *, uid: int = 0,
               gid: int = 0) -> ExtractStats:
        """Copies a local file or directory tree into ``remote_dir`` (as ``remote_dir/<its name>``).

        Entries are owned by ``uid``/``gid`` inside the sandbox (default root); modes and mtimes are kept.
        """
        local = os.fspath(local_path)
        if not os.path.lexists(local):
            raise FileNotFoundError(f"{local}: no such file or directory")
        name = os.path.basename(os.path.normpath(local))

        def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid, info.gid, info.uname, info.gname = uid, gid, "", ""
            return info

        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
            with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tar:
                tar.add(local, arcname=name, filter=owned)
            spool.seek(0)
            return self.upload_tar(remote_dir, spool)  # type: ignore[arg-type]

    def download_tar(self, remote_path: str) -> Iterator[bytes]:
        """The tar archive of a remote file or directory, as chunks while it arrives.

        A directory's archive holds its contents (names relative to it); a file's holds the file by its name.
        """
        with self._transport.stream("GET", self._base + "/tar", query={"path": remote_path}) as resp:
            yield from resp.iter_chunks()

    def download(self, remote_path: str, local_dir: Union[str, "os.PathLike[str]"]) -> str:
        """Copies a remote file or directory tree into ``local_dir`` (as ``local_dir/<its name>``) and returns
        that local path. As with tarfile's "data" filter, entries that would land outside it, device nodes, and
        symlinks that are absolute or point outside it are refused (``tarfile.FilterError`` or ``ValueError``).
        """
        info = self.stat(remote_path)
        name = posixpath.basename(info.path.rstrip("/")) or "root"
        local_dir = os.fspath(local_dir)
        target = os.path.join(local_dir, name)
        dest = target if info.is_dir else local_dir
        os.makedirs(dest, exist_ok=True)
        with self._transport.stream("GET", self._base + "/tar", query={"path": remote_path}) as resp:
            with tarfile.open(fileobj=resp.raw, mode="r|*") as tar:
                _extract(tar, dest)
        return target


def _extract(tar: tarfile.TarFile, dest: str) -> None:
    """Extracts a streamed archive below ``dest`` only."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    # Pythons without extraction filters (before 3.11.4, e.g. Debian 12's 3.11.2): the same checks by hand.
    for member in tar:
        tar.extract(_checked_member(member, dest), dest)


def _checked_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """``member`` if extracting it stays inside ``dest`` (with the caller's ownership), else raises."""
    root = os.path.realpath(dest)

    def inside(path: str) -> bool:
        return os.path.commonpath([root, os.path.realpath(path)]) == root

    # Like GNU tar and the "data" filter, leading slashes are dropped: "/a" lands at dest/a.
    member.name = member.name.lstrip("/")
    if not inside(os.path.join(root, member.name)):
        raise ValueError(f"{member.name}: would be extracted outside {dest}")
    if (member.issym() or member.islnk()) and os.path.isabs(member.linkname):
        raise ValueError(f"{member.name}: link to the absolute path {member.linkname}")
    if member.isdev():
        raise ValueError(f"{member.name}: device nodes are not extracted")
    if member.issym() and not inside(os.path.join(root, os.path.dirname(member.name), member.linkname)):
        raise ValueError(f"{member.name}: symlink to {member.linkname} points outside {dest}")
    if member.islnk() and not inside(os.path.join(root, member.linkname)):
        raise ValueError(f"{member.name}: hard link to {member.linkname} points outside {dest}")
    member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
    # As the "data" filter: no setuid/setgid/sticky bits, no group/other write, files readable by the owner.
    member.mode &= 0o755
    if member.isfile():
        member.mode |= 0o600
    return member


