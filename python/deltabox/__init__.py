"""Python SDK for DeltaBox, a sandbox runtime for AI agents.

    import deltabox

    client = deltabox.Client()                      # $DELTABOX_SOCKET or /run/deltabox/deltabox.sock
    with client.create("debian", memory="1G") as sb:
        print(sb.exec("python3 -c 'print(6 * 7)'").check().stdout)
        shell = sb.session("main")
        shell.run("cd /tmp && export X=1")
        print(shell.run("pwd; echo $X").stdout)     # /tmp, 1
        sb.files.write("/work/hello.txt", "hi\\n")
        ck = sb.checkpoint()                        # files and processes (the session's shell too)
        sb.exec("rm -rf /work")
        sb.rollback(ck)                             # /work is back, and the shell with its cwd and $X
        (branch,) = ck.fork(1)                      # a new sandbox starting from the checkpoint

The SDK uses only the standard library. See docs/api.md for the HTTP API behind it.
"""

from .client import DEFAULT_SOCKET, Client, Images
from .errors import (
    BadRequest,
    CheckpointFailed,
    CheckpointNotDurable,
    CheckpointNotFound,
    CheckpointOfAnotherSandbox,
    CheckpointUnsupported,
    CommandError,
    Conflict,
    DaemonUnavailable,
    DeltaboxError,
    FileNotFound,
    Gone,
    ImageNotFound,
    ImportFailed,
    InsufficientStorage,
    InvalidCount,
    MethodNotAllowed,
    NotFound,
    PathEscapesRoot,
    PayloadTooLarge,
    SandboxNotFound,
    ServerError,
    SessionEnded,
    SessionRolledBack,
    SessionNotFound,
    Unauthorized,
    Unprocessable,
)
from .files import Files
from .models import (
    ExecEvent,
    ExecResult,
    Exit,
    ExtractStats,
    FileStat,
    ImageInfo,
    ImportProgress,
    NetworkInfo,
    Output,
    PublishedPort,
    RollbackResult,
    SandboxInfo,
    Started,
)
from .sandbox import Checkpoint, Sandbox, Session

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SOCKET",
    "BadRequest",
    "Checkpoint",
    "CheckpointFailed",
    "CheckpointNotDurable",
    "CheckpointNotFound",
    "CheckpointOfAnotherSandbox",
    "CheckpointUnsupported",
    "Client",
    "CommandError",
    "Conflict",
    "DaemonUnavailable",
    "DeltaboxError",
    "ExecEvent",
    "ExecResult",
    "Exit",
    "ExtractStats",
    "FileNotFound",
    "FileStat",
    "Files",
    "Gone",
    "ImageInfo",
    "ImageNotFound",
    "Images",
    "ImportFailed",
    "ImportProgress",
    "InsufficientStorage",
    "InvalidCount",
    "MethodNotAllowed",
    "NetworkInfo",
    "NotFound",
    "Output",
    "PathEscapesRoot",
    "PayloadTooLarge",
    "PublishedPort",
    "RollbackResult",
    "Sandbox",
    "SandboxInfo",
    "SandboxNotFound",
    "ServerError",
    "Session",
    "SessionEnded",
    "SessionRolledBack",
    "SessionNotFound",
    "Started",
    "Unauthorized",
    "Unprocessable",
]
