"""Cleanup: nothing of a removed sandbox remains; daemon crashes keep or clean up sandboxes."""

import signal
import time

import pytest
from support import kill_shim, leftovers, new_sandbox, wait_until

import deltabox


def busy_sandbox(client):
    """A sandbox with a session, a background job and an exec'd daemon-like process, so there is much to clean."""
    sb = new_sandbox(client, "debian", memory="256M", pids=100)
    sb.session("work").run("cd /tmp; export KEPT=yes; sleep 1000 &").check()
    sb.exec(["sh", "-c", "setsid sleep 1000 > /dev/null 2>&1 < /dev/null &"]).check()
    return sb


def test_remove_leaves_nothing(client, daemon):
    sb = busy_sandbox(client)
    info = sb.refresh()
    before = leftovers(daemon, sb.id, info.uid_base)
    # The checks see what a live sandbox has: mounts, its cgroups, its processes, its directory.
    for kind in ("mount", "cgroup", "process", "directory"):
        assert any(item.split()[0] == kind for item in before), (kind, before)
    sb.delete()
    assert leftovers(daemon, sb.id, info.uid_base) == []
    with pytest.raises(deltabox.SandboxNotFound):
        sb.refresh()
    assert sb.id not in [s.id for s in client.list()]


def test_daemon_sigkill_and_restart_reattaches(client, daemon):
    sb = busy_sandbox(client)
    info = sb.refresh()
    daemon.restart_after_kill()
    assert sb.id in [s.id for s in client.list()]
    again = sb.refresh()
    assert (again.init_pid, again.uid_base) == (info.init_pid, info.uid_base)
    assert sb.exec(["echo", "still here"]).check().stdout == "still here\n"
    session = sb.session("work", create=False)
    assert session.run("pwd; echo $KEPT; jobs | wc -l").check().stdout == "/tmp\nyes\n1\n"
    sb.delete()
    assert leftovers(daemon, sb.id, info.uid_base) == []


def test_daemon_and_shim_sigkill_then_restart_removes_the_sandbox(client, daemon):
    sb = busy_sandbox(client)
    info = sb.refresh()
    daemon.stop(signal.SIGKILL)
    kill_shim(info)
    daemon.start()
    with pytest.raises(deltabox.SandboxNotFound):
        sb.refresh()
    assert leftovers(daemon, sb.id, info.uid_base) == []


def test_shim_sigkill_while_the_daemon_runs_removes_the_sandbox(client, daemon):
    sb = busy_sandbox(client)
    info = sb.refresh()
    kill_shim(info)
    deadline = time.monotonic() + 10
    while sb.id in [s.id for s in client.list()]:
        assert time.monotonic() < deadline, "the daemon still lists a sandbox whose shim is gone"
        time.sleep(0.01)
    # The daemon unlists the sandbox first and cleans up right after.
    while leftovers(daemon, sb.id, info.uid_base):
        assert time.monotonic() < deadline, leftovers(daemon, sb.id, info.uid_base)
        time.sleep(0.05)
    assert client.health()["status"] == "ok"


HOLDER = r"""
import os, time
blob = os.urandom(400 << 20)
open("/root/ready", "w").close()
time.sleep(1000)
"""


def test_a_checkpoint_whose_shim_died_before_writing_its_image_fails_forks_at_once(client):
    sb = new_sandbox(client, "debian")
    sb.files.write("/root/holder.py", HOLDER)
    sb.exec(["sh", "-c", "setsid python3 /root/holder.py > /dev/null 2>&1 < /dev/null &"]).check()
    wait_until(lambda: sb.files.exists("/root/ready"), 60)
    ck = sb.checkpoint()
    # 400 MiB of process memory take longer to write than this kill takes to arrive.
    kill_shim(sb.info)
    started = time.monotonic()
    try:
        (fork,) = ck.fork()
        fork.delete()  # the image was written after all: nothing to check
    except deltabox.CheckpointFailed as e:
        assert "exited before writing" in e.message, e.message
    # The reason comes at once, not after the wait for an image still being written (120 s).
    assert time.monotonic() - started < 30
    ck.delete()
