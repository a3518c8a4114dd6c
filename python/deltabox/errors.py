"""Exceptions raised by the SDK.

Every error the daemon reports is a JSON body ``{"error": CODE, "message": ...}`` with an HTTP status; the
SDK raises it as a :class:`DeltaboxError` subclass chosen by the code (e.g. :class:`SandboxNotFound`) or, for
codes it does not know, by the status (e.g. :class:`NotFound`), so callers can catch broadly or precisely.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Dict, Optional, Type

if TYPE_CHECKING:
    from .models import ExecResult


class DeltaboxError(Exception):
    """An error reported by the daemon (or the failure to reach it).

    Attributes:
        code: the daemon's machine-readable error code, e.g. ``"sandbox_not_found"``.
        status: the HTTP status, or ``None`` when no HTTP answer was received.
        message: the daemon's human-readable explanation.
    """

    def __init__(self, code: str, message: str, status: Optional[int] = None) -> None:
        super().__init__(f"{code}: {message}" if status is None else f"{code} ({status}): {message}")
        self.code = code
        self.status = status
        self.message = message


class DaemonUnavailable(DeltaboxError, ConnectionError):
    """The daemon could not be reached (not running, wrong socket path or URL, connection lost)."""


class BadRequest(DeltaboxError):
    """400: the request was refused as invalid."""


class Unauthorized(DeltaboxError):
    """401: missing or wrong bearer token (TCP only)."""


class NotFound(DeltaboxError):
    """404: the named object or endpoint does not exist."""


class MethodNotAllowed(DeltaboxError):
    """405: the endpoint exists but not with this method."""


class Conflict(DeltaboxError):
    """409: the request conflicts with the current state (e.g. an image still in use)."""


class Gone(DeltaboxError):
    """410: the object ended while in use (e.g. a session whose shell exited)."""


class PayloadTooLarge(DeltaboxError):
    """413: the request body is larger than the daemon accepts."""


class Unprocessable(DeltaboxError):
    """422: the request is valid but the object's current state does not allow it (changing the state can)."""


class InsufficientStorage(DeltaboxError):
    """507: the sandbox's filesystem is full."""


class ServerError(DeltaboxError):
    """5xx: the daemon failed internally."""


class SandboxNotFound(NotFound):
    """No sandbox with that id."""


class ImageNotFound(NotFound):
    """No image with that name."""


class SessionNotFound(NotFound):
    """No session with that name in the sandbox."""


class FileNotFound(NotFound):
    """No file at that path in the sandbox."""


class SessionEnded(Gone):
    """The session's shell exited (e.g. after ``exit``) or stopped answering."""


class SessionRolledBack(Conflict):
    """The sandbox was rolled back while the command ran: the command's output is lost, and the session lives on
    as it was at the checkpoint."""


class PathEscapesRoot(BadRequest):
    """A files call named a path that climbs above the sandbox's root."""


class CheckpointNotFound(NotFound):
    """No checkpoint with that id (never made, deleted, or deleted with its sandbox)."""


class CheckpointOfAnotherSandbox(BadRequest):
    """A rollback named a checkpoint of another sandbox (not one this sandbox was forked from): fork it instead."""


class InvalidCount(BadRequest):
    """A fork asked for fewer than 1 or more than 64 sandboxes."""


class CheckpointNotDurable(Conflict):
    """A fork (or a rollback to another sandbox's checkpoint) waited too long for the checkpoint's process image."""


class CheckpointFailed(ServerError):
    """The sandbox's supervisor could not take the checkpoint or do the rollback (the message says why)."""


class CheckpointUnsupported(Unprocessable):
    """Raised by :meth:`Sandbox.checkpoint` (full) when a process holds something that cannot be checkpointed
    (a TCP connection, System V shared memory, ...; the message names the process, fd and reason).

    The sandbox runs on unchanged and no checkpoint is recorded: end what the message names, or take a
    filesystem-only checkpoint (``fs_only=True``).
    """


class ImportFailed(DeltaboxError):
    """An image import was refused while it ran (bad archive, unreadable source ...)."""


class CommandError(Exception):
    """Raised by :meth:`ExecResult.check` when a command did not succeed.

    Attributes:
        result: the :class:`~deltabox.ExecResult` of the command.
    """

    def __init__(self, result: "ExecResult") -> None:
        self.result = result
        if result.timed_out:
            what = "timed out"
        elif result.oom_killed:
            what = "was killed for lack of memory"
        elif result.signal is not None:
            what = f"was killed by signal {result.signal}"
        else:
            what = f"exited with code {result.exit_code}"
        command = result.command if isinstance(result.command, str) else " ".join(result.command or [])
        stderr = result.stderr.strip()
        tail = f": {stderr[-2000:]}" if stderr else ""
        super().__init__(f"command {command!r} {what}{tail}")


_BY_CODE: Dict[str, Type[DeltaboxError]] = {
    "sandbox_not_found": SandboxNotFound,
    "image_not_found": ImageNotFound,
    "session_not_found": SessionNotFound,
    "file_not_found": FileNotFound,
    "session_ended": SessionEnded,
    "session_rolled_back": SessionRolledBack,
    "path_escapes_root": PathEscapesRoot,
    "checkpoint_not_found": CheckpointNotFound,
    "checkpoint_not_durable": CheckpointNotDurable,
    "checkpoint_of_another_sandbox": CheckpointOfAnotherSandbox,
    "invalid_count": InvalidCount,
    "checkpoint_failed": CheckpointFailed,
    "checkpoint_unsupported": CheckpointUnsupported,
    "import_failed": ImportFailed,
}

_BY_STATUS: Dict[int, Type[DeltaboxError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    410: Gone,
    413: PayloadTooLarge,
    422: Unprocessable,
    507: InsufficientStorage,
}


def make_error(code: str, message: str, status: Optional[int] = None) -> DeltaboxError:
    """The exception for error ``code``, of the most precise class known."""
    cls = _BY_CODE.get(code)
    if cls is None and status is not None:
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else DeltaboxError)
    return (cls or DeltaboxError)(code, message, status)


def error_from_response(status: int, body: bytes) -> DeltaboxError:
    """The exception for a failed HTTP answer; tolerates bodies that are not the daemon's JSON."""
    try:
        parsed = json.loads(body)
        code, message = str(parsed["error"]), str(parsed.get("message", ""))
    except (ValueError, TypeError, KeyError):
        code, message = f"http_{status}", body.decode("utf-8", "replace").strip() or f"HTTP status {status}"
    return make_error(code, message, status)
