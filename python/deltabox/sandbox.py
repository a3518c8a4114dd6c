"""A sandbox handle: commands, shell sessions, files."""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Union

from .errors import DeltaboxError, NotFound, make_error
from .files import Files
from .models import Command, ExecEvent, ExecResult, SandboxInfo, event_from_json

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

    def delete(self) -> None:
        """Removes the sandbox: kills every process in it and frees its files, mounts and cgroups."""
        self._transport.call("DELETE", self._path)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.delete()
        except NotFound:
            pass

    def __repr__(self) -> str:
        return f"Sandbox({self.id!r}, image={self.info.image!r})"

