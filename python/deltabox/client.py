"""The entry point: :class:`Client` talks to one DeltaBox daemon."""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from ._http import Transport
from .errors import DeltaboxError, make_error
from .models import ImageInfo, ImportProgress, SandboxInfo
from .sandbox import Checkpoint, CheckpointRef, Sandbox, _checkpoint_id, _fork

DEFAULT_SOCKET = "/run/deltabox/deltabox.sock"


class Images:
    """The daemon's image store (``client.images``)."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    def import_(self, path: str, name: str,
                progress: Optional[Callable[[ImportProgress], None]] = None) -> ImageInfo:
        """Imports an image from ``path`` *on the daemon's host* (OCI layout directory or tar, ``docker save``
        tarball, rootfs directory or tarball) under ``name``, replacing an image of that name.

        ``progress`` is called with each :class:`~deltabox.ImportProgress` report. Raises
        :class:`~deltabox.ImportFailed` if the source cannot be imported.
        """
        with self._transport.stream("POST", "/v1/images/import", json_body={"path": path, "name": name}) as resp:
            for line in resp.iter_lines():
                event = json.loads(line)
                kind = event.get("type")
                if kind == "progress" and progress is not None:
                    progress(ImportProgress(event["stage"], event["done_bytes"], event["total_bytes"]))
                elif kind == "done":
                    return ImageInfo.from_json(event["image"])
                elif kind == "error":
                    raise make_error(str(event.get("error", "import_failed")), str(event.get("message", "")))
        raise DeltaboxError("import_incomplete", f"the daemon ended the import of {path} without a result")

    def list(self) -> List[ImageInfo]:
        """Every image, sorted by name."""
        return [ImageInfo.from_json(i) for i in self._transport.call("GET", "/v1/images")["images"]]

    def get(self, name: str) -> ImageInfo:
        """The image ``name`` (raises :class:`~deltabox.ImageNotFound`)."""
        return ImageInfo.from_json(self._transport.call("GET", f"/v1/images/{urllib.parse.quote(name, safe='')}"))

    def remove(self, name: str) -> None:
        """Deletes the image ``name``; raises :class:`~deltabox.Conflict` while a sandbox uses it."""
        self._transport.call("DELETE", f"/v1/images/{urllib.parse.quote(name, safe='')}")


class Client:
    """A connection to a DeltaBox daemon.

    Args:
        socket: the daemon's Unix socket (default: ``$DELTABOX_SOCKET``, else ``/run/deltabox/deltabox.sock``).
        url: ``http://HOST:PORT`` of a daemon serving TCP (``deltabox serve --listen``) instead of a socket.
        token: bearer token for ``url`` (default: ``$DELTABOX_TOKEN``).
        timeout: seconds to wait for the daemon on each socket operation (default: no limit, since commands
            may run long; commands have their own ``timeout``).

    Connections are kept open and reused; the client is thread-safe. Use it as a context manager (or call
    :meth:`close`) to close them.
    """

    def __init__(self, socket: Optional[str] = None, url: Optional[str] = None, token: Optional[str] = None,
                 timeout: Optional[float] = None) -> None:
        if socket is not None and url is not None:
            raise ValueError("give socket or url, not both")
        if url is None:
            socket = socket or os.environ.get("DELTABOX_SOCKET") or DEFAULT_SOCKET
        elif token is None:
            token = os.environ.get("DELTABOX_TOKEN")
        self._transport = Transport(socket_path=socket, url=url, token=token, timeout=timeout)
        #: The image store.
        self.images = Images(self._transport)

    def health(self) -> Dict[str, Any]:
        """The daemon's status and version, and what the in-memory copies of checkpoints hold in all sandboxes
        against the daemon's budget for them, e.g. ``{"status": "ok", "version": "0.1.0",
        "template_memory_bytes": 1052672, "template_memory_budget": 6318604288}``."""
        return dict(self._transport.call("GET", "/v1/health"))

    def create(self, image: str, *, memory: Union[int, str, None] = None, pids: Optional[int] = None,
               cpus: Optional[float] = None, disk: Union[int, str, None] = None, inodes: Optional[int] = None,
               template_memory: Union[int, str, None] = None, network: str = "none",
               allow_out: Optional[Sequence[str]] = None, deny_out: Optional[Sequence[str]] = None,
               env: Optional[Mapping[str, str]] = None) -> Sandbox:
        """Creates and starts a sandbox from ``image``.

        Args:
            memory: limit in bytes, or a size such as ``"512M"`` or ``"2G"``.
            pids: most processes (and threads) at once.
            cpus: CPU share, e.g. ``0.5`` or ``2``.
            disk: size of the sandbox's filesystem (what ``df /`` shows; the image's files count), in bytes or
                as ``"10G"``. Past it, writes fail with ``ENOSPC`` inside. Forks of its checkpoints get the same.
            inodes: number of files (inodes) of the sandbox's filesystem (with ``disk`` and without this, one per
                16 KiB of it, as ``mkfs.ext4`` makes).
            template_memory: most memory the in-memory copies of its checkpoints (which make rollbacks fast) may
                hold, in bytes or as ``"1G"``; past it the least recently used are dropped and a rollback to one of
                those restores it from disk. ``0`` keeps none once written to disk. Default: the daemon's
                ``--template-memory``.
            network: ``"none"`` (loopback only, the default); ``"nat"``: its own network namespace and address,
                reaching public addresses through the host's NAT (not the host, other sandboxes, link-local or
                private ranges unless ``allow_out`` lists them), names resolved by the daemon; ``"host"``: the
                host's own network, no isolation (only if the daemon runs with ``--allow-host-network``).
            allow_out: with ``"nat"``, IPv4 addresses, CIDRs or host names (``"pypi.org"``, ``"*.github.com"``:
                what they resolve to through the sandbox's DNS) the sandbox may reach even when denied or private
                (they win over ``deny_out``). Forks inherit the policy; change it with :meth:`Sandbox.set_egress`.
            deny_out: with ``"nat"``, IPv4 addresses, CIDRs or host names (not resolved for it) it may not reach
                (``"0.0.0.0/0"``: nothing but ``allow_out``).
            env: environment added to every process in the sandbox.

        The returned :class:`Sandbox` deletes the sandbox when used as a context manager.
        """
        body: Dict[str, Any] = {"image": image, "network": network}
        optional = {"memory": memory, "pids": pids, "cpus": cpus, "disk": disk, "inodes": inodes,
                    "template_memory": template_memory}
        body.update({k: v for k, v in optional.items() if v is not None})
        if allow_out or deny_out:
            body["egress"] = {"allow_out": list(allow_out or []), "deny_out": list(deny_out or [])}
        if env:
            body["env"] = dict(env)
        info = SandboxInfo.from_json(self._transport.call("POST", "/v1/sandboxes", json_body=body))
        return Sandbox(self._transport, info)

    def sandbox(self, id: str) -> Sandbox:
        """A handle on the existing sandbox ``id`` (raises :class:`~deltabox.SandboxNotFound`)."""
        sandbox = Sandbox(self._transport, SandboxInfo(id=id, image="", state="", network=""))
        sandbox.refresh()
        return sandbox

    def list(self) -> List[Sandbox]:
        """Every sandbox of the daemon, oldest first."""
        data = self._transport.call("GET", "/v1/sandboxes")
        return [Sandbox(self._transport, SandboxInfo.from_json(s)) for s in data["sandboxes"]]

    def checkpoint(self, id: str) -> Checkpoint:
        """The checkpoint ``id`` (raises :class:`~deltabox.CheckpointNotFound`), also after its sandbox is gone."""
        path = f"/v1/checkpoints/{urllib.parse.quote(_checkpoint_id(id), safe='')}"
        return Checkpoint.from_json(self._transport, self._transport.call("GET", path))

    def fork(self, checkpoint: CheckpointRef, count: int = 1) -> List[Sandbox]:
        """Starts ``count`` (1 to 64) new sandboxes whose files start as in ``checkpoint`` (a
        :class:`~deltabox.Checkpoint` or its id); see :meth:`Checkpoint.fork`."""
        return _fork(self._transport, checkpoint, count)

    def close(self) -> None:
        """Closes the kept-open connections (the client stays usable and reconnects when needed)."""
        self._transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self._transport.address!r})"
