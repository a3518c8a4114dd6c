"""A sandbox handle: commands, shell sessions, files, checkpoints."""

from __future__ import annotations

import base64
import json
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

from .errors import DeltaboxError, NotFound, make_error
from .files import Files
from .models import (
    Command,
    ExecEvent,
    ExecResult,
    NetworkInfo,
    PublishedPort,
    RollbackResult,
    SandboxInfo,
    _known_fields,
    event_from_json,
)

if TYPE_CHECKING:
    from ._http import Transport

Stdin = Union[bytes, str, None]


def _argv(cmd: Command) -> List[str]:
    """A command as argv: a string runs through ``sh -c`` (so it may use pipes, redirections, ``&&``)."""
    if isinstance(cmd, str):
        return ["sh", "-c", cmd]
    argv = list(cmd)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("cmd must be a non-empty list of strings, or a string for sh -c")
    return argv


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


@dataclass
class Checkpoint:
    """A saved state of a sandbox: its files, and for a full checkpoint (``kind == "full"``) its processes.

    Made by :meth:`Sandbox.checkpoint`, listed by :meth:`Sandbox.checkpoints`, looked up with
    :meth:`Client.checkpoint`. A checkpoint outlives its sandbox while another sandbox uses it (was forked from it
    or built a checkpoint on top of it), or when the sandbox was deleted with ``keep_checkpoints=True``.
    """

    id: str
    #: The sandbox it was taken in.
    sandbox: str
    #: The checkpoint it was taken on top of (``None`` for the first of a line).
    parent: Optional[str] = None
    #: ``"full"`` (files and processes) or ``"filesystem"``.
    kind: str = ""
    created: int = 0
    #: The pause the sandbox saw: freeze to thaw, as its supervisor measured it.
    pause_ms: float = 0.0
    #: The checkpoint call's duration in the daemon (the pause included; not the HTTP round trip, nor writing the
    #: process image, which follows in the background).
    duration_ms: float = 0.0
    #: What it holds: ``["filesystem", "processes"]`` or ``["filesystem"]``.
    covers: List[str] = field(default_factory=list)
    #: What happened to the sandbox's processes, in words.
    processes: str = ""
    #: Processes captured (``None`` for a filesystem-only checkpoint).
    process_count: Optional[int] = None
    #: Whether it is all on disk: a full checkpoint's process image is written just after the sandbox runs again.
    durable: bool = True
    #: Why its process image could not be written (then it never will be: forks fail, and a rollback works only
    #: while the sandbox still holds the checkpoint in memory). ``None`` while it is written or once it is.
    image_failure: Optional[str] = None
    #: Bytes it adds to the daemon's disk: its files' changes since its parent and, once ``durable``, its process
    #: image (incremental too). Deleting it frees at most this. ``None`` if the daemon could not measure it.
    disk_bytes: Optional[int] = None
    #: Bytes of memory its in-memory copies (which make a rollback to it fast) hold that nothing else shares, as
    #: measured in the background (seconds old at most); ``0`` once dropped for the memory budget (a rollback then
    #: restores it from disk). ``None`` for a filesystem-only checkpoint, and until first measured (a second or so).
    memory_bytes: Optional[int] = None
    #: TCP connections to outside the sandbox its processes had (``"process 12 (python3), fd 5: TCP a -> b"``): they
    #: cannot go on after a rollback to it or in a fork of it, where the process finds each reset by its peer.
    reset_connections: List[str] = field(default_factory=list)
    _transport: Optional["Transport"] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, transport: "Transport", data: Mapping[str, Any]) -> "Checkpoint":
        checkpoint = _known_fields(cls, {k: v for k, v in data.items() if not k.startswith("_")})
        checkpoint._transport = transport
        return checkpoint

    @property
    def _path(self) -> str:
        return f"/v1/checkpoints/{_quote(self.id)}"

    def _require_transport(self) -> "Transport":
        if self._transport is None:
            raise ValueError(f"checkpoint {self.id} is not bound to a client (use Client.checkpoint(id))")
        return self._transport

    def fork(self, count: int = 1) -> List["Sandbox"]:
        """Starts ``count`` (1 to 64) new sandboxes as this checkpoint: its files, and for a full checkpoint its
        processes and sessions.

        Each gets its own id (and hostname), writable layer and processes; they share the checkpoint's data.
        All or nothing: if one cannot start, none is left. Raises :class:`~deltabox.InvalidCount` for a count
        out of range and :class:`~deltabox.CheckpointNotFound` if the checkpoint was deleted.
        """
        return _fork(self._require_transport(), self.id, count)

    def delete(self) -> None:
        """Deletes the checkpoint. Its children are relinked to its parent; its data is freed once no sandbox
        or other checkpoint needs it."""
        self._require_transport().call("DELETE", self._path)

    def refresh(self) -> "Checkpoint":
        """The checkpoint as the daemon describes it now (its ``parent`` changes when its parent is deleted)."""
        return Checkpoint.from_json(self._require_transport(), self._require_transport().call("GET", self._path))


CheckpointRef = Union[Checkpoint, str]


def _checkpoint_id(checkpoint: CheckpointRef) -> str:
    if isinstance(checkpoint, Checkpoint):
        return checkpoint.id
    if isinstance(checkpoint, str) and checkpoint:
        return checkpoint
    raise TypeError(f"expected a Checkpoint or a checkpoint id, not {checkpoint!r}")


def _fork(transport: "Transport", checkpoint: CheckpointRef, count: int) -> List["Sandbox"]:
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int, not {count!r}")
    path = f"/v1/checkpoints/{_quote(_checkpoint_id(checkpoint))}/fork"
    data = transport.call("POST", path, json_body={"count": count})
    return [Sandbox(transport, SandboxInfo.from_json(s)) for s in data["sandboxes"]]


class Session:
    """A persistent bash session: cwd, variables, functions and background jobs survive between :meth:`run` calls.

    Use as a context manager to close it at the end of the block.
    """

    def __init__(self, sandbox: "Sandbox", name: str) -> None:
        self.sandbox = sandbox
        self.name = name

    @property
    def _path(self) -> str:
        return f"{self.sandbox._path}/sessions/{_quote(self.name)}"

    def run(self, command: str, *, timeout: Optional[float] = None,
            max_output_bytes: Optional[int] = None) -> ExecResult:
        """Runs ``command`` as if typed at the session's prompt and returns its output and ``$?``.

        On ``timeout`` (seconds) the command is interrupted as by ^C: the result has ``timed_out`` set and the
        session stays usable. Raises :class:`~deltabox.SessionEnded` if the shell has exited (e.g. after ``exit``).
        """
        body: Dict[str, Any] = {"command": command}
        if timeout is not None:
            body["timeout"] = timeout
        if max_output_bytes is not None:
            body["max_output_bytes"] = max_output_bytes
        data = self.sandbox._transport.call("POST", self._path + "/run", json_body=body)
        return ExecResult.from_json(data, command=command)

    def close(self) -> None:
        """Ends the session (its shell and every job it started)."""
        self.sandbox._transport.call("DELETE", self._path)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.close()
        except DeltaboxError as e:
            # Already gone (closed, ended by `exit`, or its sandbox removed): nothing left to close.
            if e.status not in (404, 410):
                raise

    def __repr__(self) -> str:
        return f"Session({self.sandbox.id!r}, {self.name!r})"


class Sandbox:
    """A handle on one sandbox; create it with :meth:`Client.create` or look it up with :meth:`Client.sandbox`.

    Use as a context manager to delete the sandbox at the end of the block.
    """

    def __init__(self, transport: "Transport", info: SandboxInfo) -> None:
        self._transport = transport
        self.id = info.id
        #: What the daemon reported when this handle was made; :meth:`refresh` updates it.
        self.info = info
        #: The sandbox's files (read, write, list, upload, download ...).
        self.files = Files(transport, self._path)

    @property
    def _path(self) -> str:
        return f"/v1/sandboxes/{_quote(self.id)}"

    def refresh(self) -> SandboxInfo:
        """Fetches the sandbox's current description (raises :class:`~deltabox.SandboxNotFound` once removed)."""
        self.info = SandboxInfo.from_json(self._transport.call("GET", self._path))
        return self.info

    def _exec_body(self, cmd: Command, *, timeout: Optional[float], cwd: Optional[str],
                   env: Optional[Mapping[str, str]], user: Optional[str], stdin: Stdin,
                   max_output_bytes: Optional[int], stream: bool) -> Dict[str, Any]:
        body: Dict[str, Any] = {"cmd": _argv(cmd), "encoding": "base64", "stream": stream}
        optional = {"timeout": timeout, "cwd": cwd, "user": user, "max_output_bytes": max_output_bytes}
        body.update({k: v for k, v in optional.items() if v is not None})
        if env:
            body["env"] = dict(env)
        if isinstance(stdin, str):
            body["stdin"] = stdin
        elif stdin is not None:
            body["stdin_b64"] = base64.b64encode(stdin).decode()
        return body

    def exec(self, cmd: Command, *, timeout: Optional[float] = None, cwd: Optional[str] = None,
             env: Optional[Mapping[str, str]] = None, user: Optional[str] = None, stdin: Stdin = None,
             max_output_bytes: Optional[int] = None) -> ExecResult:
        """Runs a command to its end and returns its exit status and output.

        Args:
            cmd: argv list, or a string run with ``sh -c``.
            timeout: seconds; when it expires the command's whole process group is killed (``timed_out``).
            cwd, env, user: working directory, extra environment, user name or ``uid[:gid]`` inside the sandbox.
            stdin: bytes or text given on the command's stdin (else stdin is ``/dev/null``).
            max_output_bytes: bytes kept per stream (daemon default 16 MiB); the rest is dropped and counted.

        Raises :class:`~deltabox.BadRequest` (code ``start_failed``) if the program cannot be started.
        """
        body = self._exec_body(cmd, timeout=timeout, cwd=cwd, env=env, user=user, stdin=stdin,
                               max_output_bytes=max_output_bytes, stream=False)
        data = self._transport.call("POST", self._path + "/exec", json_body=body)
        return ExecResult.from_json(data, base64_output=True, command=cmd)

    def exec_stream(self, cmd: Command, *, timeout: Optional[float] = None, cwd: Optional[str] = None,
                    env: Optional[Mapping[str, str]] = None, user: Optional[str] = None, stdin: Stdin = None,
                    max_output_bytes: Optional[int] = None) -> Iterator[ExecEvent]:
        """Runs a command and yields its events as they happen: :class:`~deltabox.Started`, then
        :class:`~deltabox.Output` pieces, then one :class:`~deltabox.Exit`. Arguments as for :meth:`exec`.

        Leaving the loop early (or closing the generator) disconnects, and the daemon kills the command.
        """
        body = self._exec_body(cmd, timeout=timeout, cwd=cwd, env=env, user=user, stdin=stdin,
                               max_output_bytes=max_output_bytes, stream=True)
        with self._transport.stream("POST", self._path + "/exec", json_body=body) as resp:
            for line in resp.iter_lines():
                event = json.loads(line)
                if event.get("type") == "error":
                    raise make_error(str(event.get("error", "internal")), str(event.get("message", "")))
                yield event_from_json(event, command=cmd)

    def session(self, name: str = "main", *, create: bool = True) -> Session:
        """A persistent bash session named ``name``; started now unless ``create`` is false (then it must exist).

        Raises :class:`~deltabox.Conflict` (code ``session_exists``) if ``create`` and the name is taken.
        """
        if create:
            self._transport.call("POST", self._path + "/sessions", json_body={"name": name})
        return Session(self, name)

    def sessions(self) -> List[str]:
        """Names of the sandbox's open sessions."""
        return list(self._transport.call("GET", self._path + "/sessions")["sessions"])

    def checkpoint(self, *, fs_only: bool = False) -> Checkpoint:
        """Saves the sandbox's state as a new checkpoint on top of its current :attr:`SandboxInfo.head`.

        By default a full checkpoint: the files and every process (memory, open files, shell sessions). With
        ``fs_only`` the files only: the processes keep running and are not captured, and a rollback to it kills
        them. Either way the sandbox is frozen for the moment it takes, so it is one consistent point in time.
        A full checkpoint raises :class:`~deltabox.CheckpointUnsupported` (422) when a process holds something
        that cannot be checkpointed (a TCP connection, ...; the message names the process, fd and reason): the
        sandbox runs on and no checkpoint is recorded, a filesystem-only one still works.
        :class:`~deltabox.CheckpointFailed` (500) means the checkpoint itself failed (freezing, saving the files).
        """
        body = {"fs_only": True} if fs_only else {}
        return Checkpoint.from_json(self._transport, self._transport.call("POST", self._path + "/checkpoints",
                                                                          json_body=body))

    def checkpoints(self) -> List[Checkpoint]:
        """The checkpoints taken in this sandbox, oldest first (a parent before its children)."""
        data = self._transport.call("GET", self._path + "/checkpoints")
        return [Checkpoint.from_json(self._transport, c) for c in data["checkpoints"]]

    def rollback(self, checkpoint: CheckpointRef) -> RollbackResult:
        """Puts the sandbox back as it was at ``checkpoint`` (a :class:`Checkpoint` or its id).

        The checkpoint must be one of this sandbox's or one it descends from through a fork (else
        :class:`~deltabox.CheckpointOfAnotherSandbox`: fork it instead). Every process except the sandbox's init
        is killed; a full checkpoint's processes and sessions come back as they were, after a filesystem-only
        one nothing is restarted and every session ends. Newer checkpoints are kept, so one can roll forward to
        them again.
        """
        body = {"checkpoint": _checkpoint_id(checkpoint)}
        return RollbackResult.from_json(self._transport.call("POST", self._path + "/rollback", json_body=body))

    def network(self) -> NetworkInfo:
        """The sandbox's network mode, address, egress policy and published ports."""
        return NetworkInfo.from_json(self._transport.call("GET", self._path + "/network"))

    def set_egress(self, *, allow_out: Sequence[str] = (), deny_out: Sequence[str] = ()) -> NetworkInfo:
        """Replaces the egress policy of a ``"nat"`` sandbox (see :meth:`Client.create`); it applies at once,
        to open connections too, and to the checkpoints taken from now on (so to their forks). No arguments:
        back to the defaults."""
        body = {"allow_out": list(allow_out), "deny_out": list(deny_out)}
        return NetworkInfo.from_json(self._transport.call("PUT", self._path + "/network", json_body=body))

    def publish_port(self, port: int, *, host_port: int = 0, host_address: str = "127.0.0.1") -> PublishedPort:
        """Makes TCP ``port`` of a ``"nat"`` sandbox reachable from the host at ``host_address`` (``0.0.0.0``
        exposes it to the host's networks) and ``host_port`` (0: one the kernel chooses). The port stays
        published across checkpoints and rollbacks; forks do not inherit it. Raises
        :class:`~deltabox.Conflict` (``port_unavailable``) if the host port is taken."""
        body = {"port": port, "host_port": host_port, "host_address": host_address}
        return PublishedPort.from_json(self._transport.call("POST", self._path + "/ports", json_body=body))

    def unpublish_port(self, port: int) -> None:
        """Stops publishing ``port`` (open connections through it are closed)."""
        self._transport.call("DELETE", f"{self._path}/ports/{port}")

    def delete(self, *, keep_checkpoints: bool = False) -> None:
        """Removes the sandbox: kills every process in it and frees its files, mounts and cgroups.

        Its checkpoints are deleted too, except those another sandbox uses (was forked from, or built a
        checkpoint on top of); with ``keep_checkpoints`` all of them stay (delete them with
        :meth:`Checkpoint.delete`).
        """
        query = {"keep_checkpoints": True} if keep_checkpoints else None
        self._transport.call("DELETE", self._path, query=query)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.delete()
        except NotFound:
            pass

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r}, image={self.info.image!r})"

