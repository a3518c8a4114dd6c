"""Plain data returned by the SDK."""

from __future__ import annotations

import base64
import dataclasses
import stat as stat_module
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Type, TypeVar, Union

from .errors import CommandError

T = TypeVar("T")

Command = Union[List[str], str]


def _known_fields(cls: Type[T], data: Mapping[str, Any]) -> T:
    """``cls(**data)`` keeping only the fields ``cls`` declares, so newer daemons may add fields."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class ExecResult:
    """How a command ended, with its output.

    ``stdout``/``stderr`` are text (invalid UTF-8 replaced); ``stdout_bytes``/``stderr_bytes`` are the exact bytes
    for :meth:`Sandbox.exec` (for session commands the daemon sends text only, so they are that text encoded).
    Output beyond ``max_output_bytes`` per stream is dropped and counted in ``*_dropped_bytes``.
    """

    exit_code: Optional[int]
    signal: Optional[int] = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    oom_killed: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_dropped_bytes: int = 0
    stderr_dropped_bytes: int = 0
    duration_ms: float = 0.0
    stdout_bytes: bytes = field(default=b"", repr=False)
    stderr_bytes: bytes = field(default=b"", repr=False)
    command: Optional[Command] = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Whether the command exited with code 0 (not killed, not timed out)."""
        return self.exit_code == 0 and self.signal is None and not self.timed_out

    def check(self) -> "ExecResult":
        """Returns ``self`` if :attr:`ok`, else raises :class:`~deltabox.CommandError`."""
        if not self.ok:
            raise CommandError(self)
        return self

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, base64_output: bool = False,
                  command: Optional[Command] = None) -> "ExecResult":
        result = _known_fields(cls, data)
        result.command = command
        if base64_output:
            result.stdout_bytes = base64.b64decode(result.stdout)
            result.stderr_bytes = base64.b64decode(result.stderr)
            result.stdout = result.stdout_bytes.decode("utf-8", "replace")
            result.stderr = result.stderr_bytes.decode("utf-8", "replace")
        else:
            result.stdout_bytes = result.stdout.encode()
            result.stderr_bytes = result.stderr.encode()
        return result


@dataclass
class Started:
    """Streamed exec event: the command runs as ``pid`` (in the sandbox's pid namespace)."""

    pid: int


@dataclass
class Output:
    """Streamed exec event: a piece of output on ``stream`` (``"stdout"`` or ``"stderr"``)."""

    stream: str
    data: bytes

    @property
    def text(self) -> str:
        """The piece as text (a multi-byte character split between two pieces decodes as U+FFFD)."""
        return self.data.decode("utf-8", "replace")


@dataclass
class Exit:
    """Streamed exec event, always the last: how the command ended (its output fields are empty)."""

    result: ExecResult


ExecEvent = Union[Started, Output, Exit]


@dataclass
class ImportProgress:
    """One progress report of an image import."""

    stage: str
    done_bytes: int
    total_bytes: int


@dataclass
class ImageInfo:
    """An image in the daemon's store."""

    name: str
    layers: List[str]
    size: int
    format: str
    source: str
    created: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ImageInfo":
        return _known_fields(cls, data)


@dataclass
class SandboxInfo:
    """A sandbox as the daemon reports it.

    ``uid_base`` is the host uid (and gid) that is root inside; ``init_pid`` the host pid of the sandbox's pid 1.
    ``template_memory`` is the most memory the in-memory copies of its checkpoints may hold (``None`` for a sandbox
    created before there was such a budget).
    ``network`` is ``"none"``, ``"nat"`` or ``"host"``; ``address`` the sandbox's own IPv4 address with ``"nat"``.
    ``origin`` is the checkpoint it was forked from (``None`` if created from an image); ``head`` the checkpoint
    its current files descend from (its last checkpoint or rollback target; ``None`` before the first).
    ``state`` is ``"running"``, or ``"incompatible shim"`` when its supervisor speaks another protocol version than
    the daemon (the daemon was upgraded while it ran): it keeps running but can only be listed and deleted, and
    ``incompatible_shim`` holds both versions (``shim_protocol``, ``daemon_protocol``).
    """

    id: str
    image: str
    state: str
    network: str
    address: Optional[str] = None
    memory: Optional[int] = None
    pids: Optional[int] = None
    cpus: Optional[float] = None
    disk: Optional[int] = None
    inodes: Optional[int] = None
    template_memory: Optional[int] = None
    created: int = 0
    uid_base: Optional[int] = None
    init_pid: Optional[int] = None
    origin: Optional[str] = None
    head: Optional[str] = None
    incompatible_shim: Optional[Dict[str, int]] = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SandboxInfo":
        return _known_fields(cls, data)


@dataclass
class PublishedPort:
    """A sandbox's TCP ``port`` reachable from the host at ``host_address``:``host_port``."""

    port: int
    host_address: str
    host_port: int

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PublishedPort":
        return _known_fields(cls, data)


@dataclass
class NetworkInfo:
    """A sandbox's network: ``mode`` (``"none"``, ``"nat"``, ``"host"``); with ``"nat"`` its ``address``, its
    ``gateway`` (also its DNS server) and the host's end of its link (``interface``); its egress policy
    (``allow_out``, ``deny_out``: CIDRs and host names) and its published ``ports``."""

    mode: str
    address: Optional[str] = None
    gateway: Optional[str] = None
    interface: Optional[str] = None
    allow_out: List[str] = field(default_factory=list)
    deny_out: List[str] = field(default_factory=list)
    ports: List[PublishedPort] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "NetworkInfo":
        egress = data.get("egress") or {}
        return cls(mode=data["mode"], address=data.get("address"), gateway=data.get("gateway"),
                   interface=data.get("interface"), allow_out=list(egress.get("allow_out", [])),
                   deny_out=list(egress.get("deny_out", [])),
                   ports=[PublishedPort.from_json(p) for p in data.get("ports", [])])


@dataclass
class RollbackResult:
    """What a rollback did.

    The sandbox is as at ``checkpoint``. Every process except the sandbox's init was killed (``processes_killed``);
    for a full checkpoint its processes were restored (``processes_restored``, from the durable image if
    ``from_image``) with its sessions (``sessions_restored``); sessions not in the checkpoint ended
    (``sessions_closed``). ``pause_ms`` is the pause the sandbox saw, as its supervisor measured it (from the first
    process killed until the restored ones run), ``fs_ms`` the part of it spent switching the filesystem and
    invalidating the kernel's caches for the ``changed_inodes`` that differ, ``duration_ms`` the whole call in the
    daemon (the pause included, and any wait for the checkpoint's process image to be written).
    """

    sandbox: str
    checkpoint: str
    pause_ms: float = 0.0
    duration_ms: float = 0.0
    fs_ms: float = 0.0
    covers: List[str] = field(default_factory=list)
    processes: str = ""
    processes_killed: int = 0
    processes_restored: int = 0
    from_image: bool = False
    sessions_closed: List[str] = field(default_factory=list)
    sessions_restored: List[str] = field(default_factory=list)
    changed_inodes: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "RollbackResult":
        return _known_fields(cls, data)


@dataclass
class FileStat:
    """A file's metadata as the sandbox sees it (``uid``/``gid`` are ids inside the sandbox)."""

    path: str
    name: str
    kind: str
    size: int
    mode: int
    uid: int
    gid: int
    mtime: float
    link_target: Optional[str] = None

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    @property
    def is_symlink(self) -> bool:
        return self.kind == "symlink"

    @property
    def permissions(self) -> str:
        """The mode as ``ls -l`` shows it, without the type letter (e.g. ``rwxr-xr-x``)."""
        return stat_module.filemode(self.mode)[1:]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FileStat":
        return _known_fields(cls, data)


@dataclass
class ExtractStats:
    """What a tar upload created in the sandbox."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    fifos: int = 0
    #: Bytes of regular file data written.
    bytes: int = 0
    #: Device nodes in the archive, not created (the daemon never makes device nodes).
    skipped_devices: int = 0
    #: Entries whose owner or group was outside the sandbox's id range, given to root instead.
    ids_out_of_range: int = 0

    @property
    def entries(self) -> int:
        """Entries created: files, directories, links and fifos."""
        return self.files + self.dirs + self.symlinks + self.hardlinks + self.fifos

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ExtractStats":
        return _known_fields(cls, data)


def event_from_json(data: Dict[str, Any], *, command: Optional[Command] = None) -> ExecEvent:
    """A streamed exec event (the daemon sends output base64-encoded because the SDK asks for it)."""
    kind = data.get("type")
    if kind == "started":
        return Started(pid=int(data["pid"]))
    if kind in ("stdout", "stderr"):
        return Output(stream=kind, data=base64.b64decode(data["data"]))
    if kind == "exit":
        fields = {k: v for k, v in data.items() if k != "type"}
        return Exit(ExecResult.from_json(fields, base64_output=True, command=command))
    raise ValueError(f"unknown exec event {data!r}")
