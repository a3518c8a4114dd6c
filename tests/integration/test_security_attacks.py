"""Attacks from inside a sandbox (and careless clients) that once worked, each kept from working again.

The threat model and the list of checks are in docs/security.md. An agent inside is root of its own user
namespace: it may do anything there, but must not reach the host, another sandbox, or break a checkpoint that
the API reported.
"""

import os
import signal
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest
from support import Daemon, binary, image_dir, new_sandbox, raw_request, status_field, wait_until

import deltabox

# Replaces every session FIFO that appears in the sandbox by a symlink to TARGET, for SECONDS: what a process
# inside can do between the FIFOs' creation and their opening by whoever opens them. With "in-fork", it starts
# only once it runs in a fork (another hostname), so the checkpoint it is taken in is not refused for the
# FIFOs it replaced.
SWAPPER = r"""
import os, sys, time
target, seconds, when = sys.argv[1], float(sys.argv[2]), sys.argv[3]
base = "/dev/.deltabox/sessions"
host = os.uname().nodename
swapped = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    if when == "in-fork" and os.uname().nodename == host:
        time.sleep(0.0001)
        continue
    try:
        dirs = os.listdir(base)
    except OSError:
        continue
    for d in dirs:
        for name in ("cmd", "out", "err"):
            tmp = f"{base}/{d}/.{name}.swap"
            try:
                os.symlink(target, tmp)
                os.rename(tmp, f"{base}/{d}/{name}")
                swapped += 1
            except OSError:
                pass
print(swapped)
"""


def shim_of(sb: deltabox.Sandbox) -> int:
    shim = int(status_field(sb.refresh().init_pid, "PPid"))
    assert b"shim" in open(f"/proc/{shim}/cmdline", "rb").read()
    return shim


def shim_files(shim: int):
    """(device, inode) of every file the shim holds open."""
    held = set()
    for fd in os.listdir(f"/proc/{shim}/fd"):
        try:
            st = os.stat(f"/proc/{shim}/fd/{fd}")
        except FileNotFoundError:
            continue
        held.add((st.st_dev, st.st_ino))
    return held


@pytest.fixture
def host_fifo():
    """A FIFO on the host that no sandbox may ever reach: (path, a read-write fd on it, its (dev, inode))."""
    with tempfile.TemporaryDirectory(prefix="deltabox-sec-") as d:
        path = Path(d) / "host-fifo"
        os.mkfifo(path, 0o600)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        st = os.fstat(fd)
        try:
            yield path, fd, (st.st_dev, st.st_ino)
        finally:
            os.close(fd)


def assert_untouched(host_fifo, shims):
    path, fd, ident = host_fifo
    with pytest.raises(BlockingIOError):
        data = os.read(fd, 4096)
        pytest.fail(f"the host FIFO received {data!r} from a sandbox")
    for shim in shims:
        assert ident not in shim_files(shim), f"shim {shim} holds the host FIFO {path} open"


def start_swapper(sb, target: str, seconds: float, when: str = "now") -> int:
    started = sb.exec(["sh", "-c", f"python3 -c '{SWAPPER}' {target} {seconds} {when} >/tmp/swapped 2>&1 & echo $!"])
    return int(started.stdout)


def test_session_fifo_swap_race_never_reaches_the_host(client, host_fifo):
    """A process renaming symlinks to a host FIFO over the session FIFOs while sessions are created once made
    the shim open host files. Now /dev/.deltabox is read-only inside (the swap fails with EROFS) and the shim
    only ever holds the FIFOs init opened: sessions work, the host FIFO is untouched."""
    with new_sandbox(client, "debian") as sb:
        start_swapper(sb, str(host_fifo[0]), 20)
        for i in range(12):
            assert sb.session(f"s{i}").run("echo ok", timeout=10).stdout == "ok\n"
        swapped = sb.exec(["sh", "-c", "sleep 21; cat /tmp/swapped"], timeout=60).stdout
        assert swapped.strip() == "0", "a process of the sandbox replaced a session FIFO"
        assert_untouched(host_fifo, [shim_of(sb)])
        refused = sb.exec(["sh", "-c", "ln -s /etc/passwd /dev/.deltabox/sessions/x"])
        assert "Read-only file system" in refused.stderr


def test_session_fifo_swap_race_during_fork_never_reaches_the_host(client, host_fifo):
    """The same swapper running in a checkpoint restored by fork (it runs again there as the FIFOs are made)."""
    with new_sandbox(client, "debian") as sb:
        sb.session("main").run("X=kept")
        start_swapper(sb, str(host_fifo[0]), 30, "in-fork")
        time.sleep(0.5)
        ckpt = sb.checkpoint()
        children = ckpt.fork(3)
        try:
            for child in children:
                assert child.session("main", create=False).run("echo $X", timeout=10).stdout == "kept\n"
            assert_untouched(host_fifo, [shim_of(sb)] + [shim_of(c) for c in children])
        finally:
            for child in children:
                child.delete()


def test_a_nul_byte_in_a_session_command_is_refused(daemon, debian):
    """The shell reads a command up to a NUL: the rest would have run as the next call."""
    s = debian.session("nul")
    status, body = raw_request(daemon, "POST", f"/v1/sandboxes/{debian.id}/sessions/nul/run",
                               b'{"command": "echo a\\u0000echo smuggled"}', {"Content-Type": "application/json"})
    assert (status, body["error"]) == (400, "invalid_command")
    assert s.run("echo next").stdout == "next\n"
    assert s.run("echo after").stdout == "after\n"


def test_forged_end_markers_do_not_end_a_command(debian):
    """A background process writing end markers (old fixed format with the session's nonce, and random tokens)
    into the session's stdout FIFO: the command still runs to its end and its real exit code is reported."""
    s = debian.session("forged")
    forger = (
        "(d=$(dirname $(readlink /proc/$$/fd/250)); n=${d##*/}; "
        "while :; do printf '\\036DBX%s:0\\036\\n' $n > $d/out; "
        "printf '\\036DBX%s:0\\036\\n' $(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n') > $d/out; "
        "sleep 0.01; done) >/dev/null 2>&1 &"
    )
    s.run(forger)
    try:
        result = s.run("sleep 1; echo done; (exit 7)", timeout=30)
        assert result.exit_code == 7
        assert "done\n" in result.stdout  # the forged markers are output like any other bytes
    finally:
        s.run("kill %1")


def test_session_output_with_separators_is_passed_through_whole(debian):
    """Output holding record separators (0x1e) once made the shim's scan quadratic: 8 MB after one separator
    come through intact."""
    s = debian.session("separators")
    result = s.run("printf '\\036'; head -c 8000000 /dev/zero | tr '\\0' a; echo", timeout=120,
                   max_output_bytes=16 << 20)
    assert result.exit_code == 0
    assert result.stdout == "\x1e" + "a" * 8000000 + "\n"


def test_rollback_during_a_session_command_keeps_the_session(client):
    """A rollback while a session command runs: the command fails with SessionRolledBack and the session lives
    on as checkpointed (it was once removed by the failing command)."""
    with new_sandbox(client, "debian") as sb:
        s = sb.session("main")
        s.run("X=before")
        ckpt = sb.checkpoint()
        s.run("X=after")
        errors = []

        def long_command():
            try:
                s.run("sleep 20", timeout=60)
                errors.append("the command was not interrupted")
            except deltabox.SessionRolledBack:
                pass
            except Exception as e:  # reported to the test thread
                errors.append(repr(e))

        t = threading.Thread(target=long_command)
        t.start()
        time.sleep(1)
        sb.rollback(ckpt)
        t.join(60)
        assert not t.is_alive()
        assert errors == []
        assert "main" in sb.sessions()
        assert s.run("echo $X").stdout == "before\n"


def test_session_channels_are_emptied_by_rollback(client):
    """Bytes written into a session's FIFOs after a checkpoint (a command waiting to be read, stale output) do
    not reach the branch rolled back to."""
    with new_sandbox(client, "debian") as sb:
        s = sb.session("main")
        s.run("true")
        ckpt = sb.checkpoint()
        sb.exec(["sh", "-c", "d=$(ls -d /dev/.deltabox/sessions/*); printf 'echo smuggled\\0' > $d/cmd; "
                             "echo stale > $d/out"])
        sb.rollback(ckpt)
        result = s.run("echo ok")
        assert result.stdout == "ok\n"


def test_kill_minus_one_after_a_checkpoint_leaves_it_whole(client):
    """`kill -9 -1` right after a full checkpoint (a common cleanup) once killed the checkpoint's in-memory
    copies before its image was written: the image failed and the checkpoint was lost. Now they cannot be
    signalled from inside; everything else is killed as asked, the image is written, and the rollback
    restores from the in-memory copies."""
    with new_sandbox(client, "debian", memory="2G") as sb:
        # Enough memory that writing the image takes longer than the kill below.
        sb.exec(["sh", "-c", "python3 -c 'import os,time; b=os.urandom(400<<20); time.sleep(1000)' "
                             ">/dev/null 2>&1 &"])
        time.sleep(2)
        ckpt = sb.checkpoint()
        killed = sb.exec(["sh", "-c", "kill -9 -1; sleep 0.5; pgrep -c python3"])
        assert killed.stdout.strip() == "0", "kill -9 -1 did not kill the sandbox's processes"
        deadline = time.monotonic() + 60
        while not ckpt.refresh().durable:
            assert ckpt.refresh().image_failure is None, ckpt.refresh().image_failure
            assert time.monotonic() < deadline, "the image was not written"
            time.sleep(0.1)
        result = sb.rollback(ckpt)
        assert not result.from_image
        # Running ones only: a stopped task of ours that shares the restored process's memory shows in ps.
        running = sb.exec(["sh", "-c", "ps -eo stat=,comm= | awk '$1 !~ /^t/ && $2 == \"python3\"' | wc -l"])
        assert running.stdout.strip() == "1"


# Every pid of the sandbox's namespace that kill(pid, 0) may signal, against those /proc shows. (EPERM, as
# for DeltaCR's pid helper, a host-root process, is not counted: it cannot be signalled.)
PID_PROBE = r"""
import os, sys
found = []
for pid in range(2, int(sys.argv[1]) + 1):
    try:
        os.kill(pid, 0)
        found.append(pid)
    except (ProcessLookupError, PermissionError):
        pass
visible = {int(p) for p in os.listdir("/proc") if p.isdigit()}
print(" ".join(str(p) for p in found if p not in visible and p != os.getpid()))
"""


def test_our_tasks_cannot_be_found_or_signalled_by_pid(client):
    """The checkpoint's in-memory copies (templates and spares) are hidden from /proc; probing every pid with
    kill(pid, 0) once found them all, signalable. Now no pid hidden from /proc can be signalled."""
    with new_sandbox(client, "debian") as sb:
        sb.exec(["sh", "-c", "sleep 1000 >/dev/null 2>&1 &"])
        sb.session("main").run("true")
        sb.checkpoint()
        sb.checkpoint()
        # DeltaCR keeps its tasks below the host's pid_max (the sandbox's own is larger on recent kernels).
        host_pid_max = Path("/proc/sys/kernel/pid_max").read_text().strip()
        hidden = sb.exec(["python3", "-c", PID_PROBE, host_pid_max], timeout=120)
        assert hidden.exit_code == 0, hidden.stderr
        assert hidden.stdout.strip() == "", f"pids hidden from /proc answer signals: {hidden.stdout}"
        # Signals to visible processes still work, through every call.
        assert sb.exec(["sh", "-c", "sleep 100 & p=$!; kill -TERM $p; wait $p; echo $?"]).stdout == "143\n"
        assert sb.exec(["python3", "-c", "import os,signal,subprocess; p=subprocess.Popen(['sleep','100']); "
                                          "signal.pidfd_send_signal(os.pidfd_open(p.pid), 9); print(p.wait())"]
                       ).stdout == "-9\n"


def test_a_rollback_that_cannot_restore_keeps_the_live_processes(client, daemon):
    """When what a checkpoint's processes come back from is gone (its in-memory copies dropped for the memory
    budget, its image deleted on disk underneath), a rollback fails and kills nothing (it once killed every
    process first)."""
    with new_sandbox(client, "debian", template_memory=0) as sb:
        sb.exec(["sh", "-c", "sleep 1000 >/dev/null 2>&1 &"])
        first = sb.checkpoint()
        # Measured, they hold something (page tables at least): 0 once dropped.
        wait_until(lambda: client.checkpoint(first.id).memory_bytes == 0, 60, 0.05, "the templates to be dropped")
        assert client.checkpoint(first.id).durable
        images = daemon.data_dir / "deltacr"
        removed = [f for f in images.rglob("*") if f.is_file()]
        assert removed, f"no process image under {images}"
        for f in removed:
            f.unlink()
        sb.exec(["sh", "-c", "sleep 1000 >/dev/null 2>&1 &"])
        with pytest.raises(deltabox.CheckpointFailed):
            sb.rollback(first)
        assert sb.exec(["pgrep", "-x", "sleep"]).exit_code == 0, "the failed rollback killed the live processes"


@pytest.mark.parametrize("env", [{"A\u0000B": "1"}, {"A": "x\u0000y"}, {"": "1"}, {"A=B": "1"}])
def test_create_refuses_bad_environment(client, env):
    with pytest.raises(deltabox.BadRequest) as e:
        client.create("busybox", env=env)
    assert e.value.code == "invalid_env"


@pytest.mark.parametrize("limits", [
    {"memory": "1e30"}, {"memory": "9999999999999999999999G"}, {"cpus": 1e308}, {"cpus": 0.000001},
    {"pids": 4294967296}, {"pids": 0},
])
def test_create_refuses_limits_it_cannot_set(client, limits):
    with pytest.raises(deltabox.BadRequest) as e:
        client.create("busybox", **limits)
    # A size that is no size is refused while the request is read.
    expected = "invalid_request" if isinstance(limits.get("memory"), str) else "invalid_limits"
    assert e.value.code == expected


def test_a_sandbox_without_limits_gets_the_defaults(client):
    """One fork bomb in a default sandbox must not take the host's pids."""
    with new_sandbox(client, "busybox") as sb:
        info = sb.refresh()
        assert info.pids == 4096
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        assert info.memory == pytest.approx(total // 2, rel=0.01)
        assert info.cpus == os.cpu_count()


def test_an_image_written_while_the_daemon_was_away_is_durable_after_its_restart(tmp_path):
    """The daemon is SIGKILLed right after a full checkpoint, before the shim reports the image written: the
    restarted daemon finds the image and marks the checkpoint durable (it stayed not durable until a fork)."""
    d = Daemon(binary(), tmp_path)
    d.start()
    try:
        with deltabox.Client(socket=d.socket) as c:
            c.images.import_(str(image_dir() / "debian"), "debian")
            sb = c.create("debian", memory="2G")
            # Enough memory that the image is still being written when the daemon is killed.
            sb.exec(["sh", "-c", "python3 -c 'import os,time; b=os.urandom(300<<20); time.sleep(1000)' "
                                 ">/dev/null 2>&1 &"])
            time.sleep(2)
            ckpt = sb.checkpoint()
            d.stop(signal.SIGKILL)
        assert not ckpt.durable
        time.sleep(5)
        d.start()
        with deltabox.Client(socket=d.socket) as c:
            deadline = time.monotonic() + 30
            while not c.checkpoint(ckpt.id).durable:
                assert time.monotonic() < deadline, "the image written meanwhile was not found"
                time.sleep(0.1)
            c.sandbox(sb.id).delete()
    finally:
        if d.proc is not None:
            d.stop(signal.SIGTERM)


def test_a_deep_directory_tree_does_not_crash_the_daemon(client, debian):
    """2,500 nested directories (deeper than any path can name) once overflowed the daemon's stack in a tar
    download or a recursive removal: both now stop at 512 levels with `too_deep`, and the daemon serves on."""
    debian.exec(["python3", "-c", "import os\nos.makedirs('/deep')\nfd=os.open('/deep',os.O_RDONLY)\n"
                 "for i in range(2500):\n os.mkdir('d',dir_fd=fd)\n n=os.open('d',os.O_RDONLY,dir_fd=fd)\n"
                 " os.close(fd); fd=n"]).check()
    with pytest.raises(deltabox.DeltaboxError) as e:
        b"".join(debian.files.download_tar("/deep"))
    # The archive streams: past its start, the daemon can only end the answer early.
    assert e.value.code in ("too_deep", "connection_lost")
    client.health()
    with pytest.raises(deltabox.BadRequest) as e:
        debian.files.remove("/deep", recursive=True)
    assert e.value.code == "too_deep"
    client.health()
    assert debian.exec(["rm", "-rf", "/deep"]).exit_code == 0


def test_a_process_running_a_deleted_executable_is_refused_at_checkpoint(client):
    """A binary rebuilt or upgraded while it runs: the checkpoint was reported whole, then could not be restored
    from its image (fork failed). Now it is refused up front, naming the process and the file."""
    with new_sandbox(client, "debian") as sb:
        sb.exec(["sh", "-c", "cp /bin/sleep /tmp/rebuilt && (/tmp/rebuilt 1000 >/dev/null 2>&1 &) && sleep 0.2 "
                             "&& rm /tmp/rebuilt"]).check()
        with pytest.raises(deltabox.CheckpointUnsupported) as e:
            sb.checkpoint()
        assert "/tmp/rebuilt" in e.value.message and "deleted" in e.value.message
        sb.exec(["pkill", "rebuilt"])
        sb.checkpoint()


# Maps a 3-page file privately, deletes it, and on each /tmp/go writes the mapping's checksum to /tmp/out.
DELETED_MAPPING = r"""
import ctypes, hashlib, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
data = os.urandom(3 * 4096 + 100)
with open("/tmp/lib.so", "wb") as f:
    f.write(data)
fd = os.open("/tmp/lib.so", os.O_RDONLY)
addr = libc.mmap(None, len(data), 1, 2, fd, 0)  # PROT_READ, MAP_PRIVATE (the mmap module keeps the fd)
os.close(fd)
os.unlink("/tmp/lib.so")
with open("/tmp/expected", "w") as f:
    f.write(hashlib.sha256(data).hexdigest())
size = len(data)
del data
while True:
    if os.path.exists("/tmp/go"):
        os.unlink("/tmp/go")
        with open("/tmp/out", "w") as f:
            f.write(hashlib.sha256(ctypes.string_at(addr, size)).hexdigest())
    time.sleep(0.01)
"""


def test_a_private_mapping_of_a_deleted_file_is_restored_from_the_image(client):
    """A library upgraded while a program runs leaves a mapping of a deleted file: its pages (also those never
    read) are kept with the image, so a fork (restored from the image) reads the same bytes."""
    with new_sandbox(client, "debian") as sb:
        sb.exec(["sh", "-c", f"python3 -c '{DELETED_MAPPING}' >/tmp/log 2>&1 &"])
        deadline = time.monotonic() + 30
        while sb.exec(["test", "-s", "/tmp/expected"]).exit_code != 0:
            assert time.monotonic() < deadline, sb.exec(["cat", "/tmp/log"]).stdout
            time.sleep(0.1)
        expected = sb.exec(["cat", "/tmp/expected"]).stdout
        ckpt = sb.checkpoint()
        [child] = ckpt.fork()
        try:
            child.exec(["touch", "/tmp/go"]).check()
            deadline = time.monotonic() + 30
            while child.exec(["test", "-s", "/tmp/out"]).exit_code != 0:
                assert time.monotonic() < deadline, child.exec(["cat", "/tmp/log"]).stdout
                time.sleep(0.1)
            assert child.exec(["cat", "/tmp/out"]).stdout == expected
        finally:
            child.delete()


def test_a_daemon_started_from_a_session_is_checkpointed(client):
    """`(setsid cmd &)` in a session (how `service x start` daemonises) leaves a process outside the shell's
    subtree holding the session's FIFOs: every full checkpoint failed with 500. Now each subtree reopens the
    FIFOs, and rollback and fork bring back both the shell and the daemon, whose output still reaches the
    session."""
    with new_sandbox(client, "debian") as sb:
        s = sb.session("main")
        s.run("X=kept; (setsid sh -c 'while :; do echo tick; sleep 0.2; done' &)")
        ckpt = sb.checkpoint()
        s.run("X=changed; pkill -f tick")
        sb.rollback(ckpt)
        out = s.run("echo $X; sleep 0.5").stdout.splitlines()
        assert "kept" in out and "tick" in out
        [child] = ckpt.fork()
        try:
            out = child.session("main", create=False).run("echo $X; sleep 0.5").stdout.splitlines()
            assert "kept" in out and "tick" in out
        finally:
            child.delete()


def test_dev_shm_is_part_of_the_checkpoint(client):
    """/dev/shm was a tmpfs outside checkpoints: what one branch of a tree search left there was seen by the
    next. It is now the sandbox's own filesystem: rolled back and forked with the files."""
    with new_sandbox(client, "debian") as sb:
        sb.exec(["sh", "-c", "echo checkpointed > /dev/shm/state"]).check()
        ckpt = sb.checkpoint()
        sb.exec(["sh", "-c", "echo branch > /dev/shm/state; echo leaked > /dev/shm/note"]).check()
        sb.rollback(ckpt)
        assert sb.exec(["cat", "/dev/shm/state"]).stdout == "checkpointed\n"
        assert sb.exec(["test", "-e", "/dev/shm/note"]).exit_code == 1
        [child] = ckpt.fork()
        try:
            assert child.exec(["cat", "/dev/shm/state"]).stdout == "checkpointed\n"
            # Any user may still create shared memory objects there.
            made = child.exec(["python3", "-c", "import multiprocessing as m; m.Lock(); print('ok')"], user="1000")
            assert made.stdout == "ok\n", made.stderr
        finally:
            child.delete()


def test_files_written_in_dev_are_rolled_back(client):
    """/dev was a tmpfs outside checkpoints: any file an agent wrote there reached every later branch. It is now
    the sandbox's own filesystem (but for /dev/.deltabox, which is read-only inside)."""
    with new_sandbox(client, "debian") as sb:
        ckpt = sb.checkpoint()
        sb.exec(["sh", "-c", "echo stash > /dev/stash"]).check()
        sb.rollback(ckpt)
        assert sb.exec(["test", "-e", "/dev/stash"]).exit_code == 1
        assert "Read-only" in sb.exec(["sh", "-c", "echo x > /dev/.deltabox/stash"]).stderr
        # The devices still work.
        assert sb.exec(["sh", "-c", "head -c 4 /dev/zero | od -An -tx1; echo ok > /dev/null; ls /dev/pts/ptmx"]
                       ).stdout.split() == ["00", "00", "00", "00", "/dev/pts/ptmx"]


def test_etc_hosts_is_part_of_the_checkpoint_and_names_each_fork(client):
    """/etc/hostname and /etc/hosts were bound from a tmpfs outside checkpoints: an edit reached every later
    branch. They are now the sandbox's own files, rewritten at start to name it: an edit is rolled back, and a
    fork keeps the checkpoint's edits under its own name."""
    with new_sandbox(client, "debian") as sb:
        sb.exec(["sh", "-c", "echo '10.1.2.3 db' >> /etc/hosts"]).check()
        ckpt = sb.checkpoint()
        sb.exec(["sh", "-c", "echo '10.9.9.9 leaked' >> /etc/hosts; echo leaked > /etc/hostname"]).check()
        sb.rollback(ckpt)
        hosts = sb.exec(["cat", "/etc/hosts"]).stdout
        assert "10.1.2.3 db" in hosts and "leaked" not in hosts
        assert sb.exec(["cat", "/etc/hostname"]).stdout == f"{sb.id}\n"
        [child] = ckpt.fork()
        try:
            hosts = child.exec(["cat", "/etc/hosts"]).stdout
            assert "10.1.2.3 db" in hosts and f"127.0.1.1\t{child.id}" in hosts and sb.id not in hosts
            assert child.exec(["sh", "-c", "hostname; cat /etc/hostname"]).stdout == f"{child.id}\n{child.id}\n"
        finally:
            child.delete()


def test_the_hosts_resolv_conf_is_read_only_with_the_hosts_network(client):
    """With the host's network, /etc/resolv.conf is the host's, bound from outside the checkpoints: read-only, so
    it cannot carry data between branches either."""
    with new_sandbox(client, "debian", network="host") as sb:
        assert sb.exec(["cat", "/etc/resolv.conf"]).stdout == Path("/etc/resolv.conf").read_text()
        assert "Read-only file system" in sb.exec(["sh", "-c", "echo x >> /etc/resolv.conf"]).stderr
