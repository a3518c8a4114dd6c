"""Helpers of the integration suite: the daemon under test, and what tests inspect on the host."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))
# Helpers shared with the benchmarks (e.g. bench/outside.py, the network tests' "outside").
sys.path.insert(1, str(REPO / "bench"))

import deltabox  # noqa: E402
from deltabox._http import _UnixHTTPConnection  # noqa: E402

IMAGES = ("busybox", "debian")
START_TIMEOUT = 30.0
# A self-checking state of a sandbox's files: a fresh random blob, its checksum, and a step's name. STEP writes one
# (and prints the checksum line), VERIFY fails if the blob does not match its checksum, else prints step and line.
STEP = "mkdir -p /data && head -c 262144 /dev/urandom > /data/blob && sha256sum /data/blob > /data/blob.sha " \
       "&& echo {step} > /data/step && cat /data/blob.sha"
VERIFY = "sha256sum -c /data/blob.sha > /dev/null && cat /data/step /data/blob.sha"


class Daemon:
    """A `deltabox serve` process on a private socket and data directory, which tests may kill and restart."""

    def __init__(self, binary: Path, workdir: Path, extra_args: Sequence[str] = ()) -> None:
        self.binary = binary
        self.workdir = workdir
        self.extra_args = list(extra_args)
        self.socket = str(workdir / "deltabox.sock")
        self.data_dir = workdir / "data"
        self.log_path = workdir / "daemon.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        self.proc = subprocess.Popen(
            [str(self.binary), "serve", "--socket", self.socket, "--data-dir", str(self.data_dir), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
        log.close()
        client = deltabox.Client(socket=self.socket, timeout=5)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            try:
                client.health()
                client.close()
                return
            except deltabox.DaemonUnavailable:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not answer within {START_TIMEOUT} s:\n{self.log_tail()}")
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Sends ``sig`` and waits for the daemon to exit; returns its exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code

    def restart_after_kill(self) -> None:
        """SIGKILL, then a new daemon on the same socket and data directory."""
        self.stop(signal.SIGKILL)
        self.start()

    def instance(self) -> str:
        """The id that names this data directory's cgroups (deltabox/<instance>/<sandbox>)."""
        return (self.data_dir / "instance").read_text().strip()

    def sandbox_dir(self, sandbox_id: str) -> Path:
        return self.data_dir / "sandboxes" / sandbox_id

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def private_daemon(prefix: str, extra_args: Sequence[str] = ()) -> Iterator[Daemon]:
    """A daemon of its own (socket, data directory, `serve` options) with the busybox image, for tests that kill or
    restart it or need other options. Afterwards its sandboxes are deleted (a daemon the test left stopped is
    started for that) and its data directory is removed."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    d = Daemon(binary(), workdir, extra_args)
    d.start()
    with deltabox.Client(socket=d.socket) as c:
        c.images.import_(str(image_dir() / "busybox"), "busybox")
    try:
        yield d
    finally:
        if d.proc is None:
            d.start()
        with deltabox.Client(socket=d.socket) as c:
            for sb in c.list():
                sb.delete()
        d.stop(signal.SIGTERM)
        shutil.rmtree(workdir, ignore_errors=True)


def binary() -> Path:
    import pytest  # here, not at the top: bench scripts import this module without pytest installed

    path = Path(os.environ.get("DELTABOX_BIN", REPO / "target" / "release" / "deltabox"))
    if not os.access(path, os.X_OK):
        pytest.exit(f"no deltabox binary at {path}: run `cargo build -p deltabox --release` or set DELTABOX_BIN",
                    returncode=2)
    return path


def image_dir() -> Path:
    import pytest

    path = Path(os.environ.get("DELTABOX_TEST_IMAGES", "/var/cache/deltabox/images"))
    missing = [name for name in IMAGES if not (path / name / "index.json").exists()]
    if missing:
        pytest.exit(f"test images {missing} missing in {path}: run `bash images/build.sh {path}` "
                    "or set DELTABOX_TEST_IMAGES", returncode=2)
    return path


def new_sandbox(client: deltabox.Client, image: str = "debian", **options) -> deltabox.Sandbox:
    """A sandbox ready for requests (use it as a context manager to remove it)."""
    return client.create(image, **options)


def raw_request(daemon: Daemon, method: str, path: str, body: bytes = b"",
                headers: Optional[dict] = None) -> tuple:
    """One request as given (no SDK validation): returns (status, parsed JSON body or raw bytes)."""
    conn = _UnixHTTPConnection(daemon.socket, 30)
    try:
        try:
            conn.request(method, path, body=body, headers=headers or {})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered before reading the body, and closed: its answer is still readable
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data


def _cgroup_mountpoints() -> Iterator[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype in ("cgroup", "cgroup2"):
                yield fields[4].replace("\\040", " ")


def cgroup_dirs(daemon: Daemon, sandbox_id: str) -> List[str]:
    """The sandbox's cgroup directories that exist, in every cgroup hierarchy of the host."""
    paths = (os.path.join(mountpoint, "deltabox", daemon.instance(), sandbox_id)
             for mountpoint in _cgroup_mountpoints())
    return [path for path in paths if os.path.isdir(path)]


def instance_cgroups(daemon: Daemon) -> Dict[str, List[str]]:
    """Every cgroup directory under the daemon's deltabox/<instance>/, in every hierarchy: {name: [paths]}."""
    found: Dict[str, List[str]] = {}
    for mountpoint in _cgroup_mountpoints():
        parent = os.path.join(mountpoint, "deltabox", daemon.instance())
        try:
            names = [entry.name for entry in os.scandir(parent) if entry.is_dir()]
        except OSError:
            continue
        for name in names:
            found.setdefault(name, []).append(os.path.join(parent, name))
    return found


def shim_processes(daemon: Daemon) -> Dict[int, str]:
    """{pid: sandbox id} of every live `deltabox shim` process of the daemon's data directory (a shim's stderr
    is its sandbox's <data-dir>/sandboxes/<id>/shim.log; the shim's command line does not name the sandbox)."""
    prefix = str(daemon.data_dir / "sandboxes") + "/"
    found = {}
    for pid, uid, cmdline in host_processes():
        argv = cmdline.split(b"\0")
        # uid 0: a sandbox's init is a clone of its shim (same command line) running as the sandbox's root.
        if uid != 0 or len(argv) < 2 or argv[1] != b"shim" or not argv[0].endswith(b"deltabox") or _zombie(pid):
            continue
        try:
            log = os.readlink(f"/proc/{pid}/fd/2")
        except OSError:
            continue
        if log.startswith(prefix):
            found[pid] = log[len(prefix):].split("/")[0]
    return found


def catalog_records(daemon: Daemon, table: str) -> Dict[str, dict]:
    """{id: record} of a table of the daemon's catalog (`sandboxes`, `checkpoints`, `images`), read directly and
    read-only (the API lists checkpoints per live sandbox only)."""
    import sqlite3

    assert table in ("sandboxes", "checkpoints", "images"), table
    key = "name" if table == "images" else "id"
    db = sqlite3.connect(f"file:{daemon.data_dir / 'catalog.db'}?mode=ro", uri=True)
    try:
        return {row[0]: json.loads(row[1]) for row in db.execute(f"SELECT {key}, record FROM {table}")}
    finally:
        db.close()


def leftovers(daemon: Daemon, sandbox_id: str, uid_base: int) -> List[str]:
    """Everything of the sandbox that still exists on the host: mounts, cgroups, processes, its directory."""
    found = []
    sandbox_dir = str(daemon.sandbox_dir(sandbox_id))
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/mountinfo") as f:
                    found += [f"mount (pid {entry.name}): {line.strip()}" for line in f if sandbox_dir in line]
            except OSError:
                continue
    found += [f"cgroup {path}" for path in cgroup_dirs(daemon, sandbox_id)]
    # Zombies are dead: a sandbox's init is a child of its shim, and once the shim is gone the host's pid 1
    # reaps it, in its own time.
    # Uid ranges are unique among the live sandboxes of every daemon on the host, so once the sandbox is gone its
    # range may go to a sandbox of another daemon (one in another instance's cgroups is none of ours).
    found += [f"process {pid} uid {uid}: {cmd!r}" for pid, uid, cmd in host_processes()
              if uid_base <= uid < uid_base + 65536 and not _zombie(pid) and not _other_instance(daemon, pid)]
    if os.path.exists(sandbox_dir):
        found.append(f"directory {sandbox_dir}")
    return found


def _other_instance(daemon: Daemon, pid: int) -> bool:
    """Whether the process is in the cgroups of another daemon's sandbox (deltabox/<other instance>/...)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            paths = [line.rstrip("\n").split(":", 2)[2] for line in f]
    except OSError:
        return False
    ours = f"/deltabox/{daemon.instance()}/"
    return any("/deltabox/" in path and ours not in path for path in paths)


def _zombie(pid: int) -> bool:
    try:
        return status_field(pid, "State").startswith("Z")
    except OSError:
        return True  # gone meanwhile


def host_processes() -> Iterator[tuple]:
    """(pid, uid, cmdline bytes) of every host process readable now."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, StopIteration):
            continue
        yield int(entry.name), uid, cmdline


def status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(name)


def shim_pid(info: "deltabox.SandboxInfo") -> int:
    """The pid of the sandbox's shim: the parent of its init (the API does not name it)."""
    shim = int(status_field(info.init_pid, "PPid"))
    assert b"shim" in open(f"/proc/{shim}/cmdline", "rb").read()
    return shim


def kill_shim(info: "deltabox.SandboxInfo") -> None:
    """SIGKILLs the sandbox's shim and waits until it died."""
    shim = shim_pid(info)
    os.kill(shim, signal.SIGKILL)
    wait_pid_dead(shim)


def wait_pid_dead(pid: int, seconds: float = 10) -> None:
    wait_until(lambda: _zombie(pid), seconds, 0.01, f"pid {pid} to die")


def wait_until(predicate, timeout: float = 20.0, step: float = 0.05, what: str = "the condition"):
    """Returns ``predicate()`` once it is true; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)
