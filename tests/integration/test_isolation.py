"""Isolation: processes, users, network, resource limits, privileged system calls."""

import json
import os
import subprocess
import textwrap
import uuid

import pytest
from support import cgroup_dirs, host_processes, new_sandbox, status_field

import deltabox


def test_host_processes_are_invisible(debian):
    marker = f"3600.{uuid.uuid4().int % 10**9}"
    host = subprocess.Popen(["sleep", marker])
    try:
        program = textwrap.dedent("""
            import json, os
            seen = {}
            for pid in filter(str.isdigit, os.listdir('/proc')):
                try:
                    seen[pid] = open(f'/proc/{pid}/cmdline', 'rb').read().decode(errors='replace')
                except OSError:
                    pass
            print(json.dumps(seen))
        """)
        seen = json.loads(debian.exec(["python3", "-c", program]).check().stdout)
        assert not [cmd for cmd in seen.values() if marker in cmd]
        # Only the command itself is there: init is hidden, and nothing of the host is.
        assert len(seen) == 1, seen
    finally:
        host.kill()
        host.wait()


def test_root_inside_is_not_root_outside(debian):
    assert debian.exec(["id", "-u"]).check().stdout == "0\n"
    info = debian.refresh()
    assert info.uid_base and info.uid_base > 0 and info.init_pid
    assert status_field(info.init_pid, "Uid").split() == [str(info.uid_base)] * 4
    assert status_field(info.init_pid, "Gid").split() == [str(info.uid_base)] * 4
    # A command of the sandbox, found on the host by a unique argument.
    marker = f"1000.{uuid.uuid4().int % 10**9}"
    session = debian.session("isolation-uid")
    try:
        # `&` returns before the child has exec'd sleep: wait inside until its command line is sleep's.
        session.run(f"sleep {marker} & until grep -aq {marker} /proc/$!/cmdline; do :; done").check()
        (found,) = [(pid, uid) for pid, uid, cmd in host_processes() if cmd == f"sleep\0{marker}\0".encode()]
        assert found[1] == info.uid_base != 0
    finally:
        session.close()


def test_only_loopback_with_network_none(debian):
    assert debian.info.network == "none"
    assert debian.exec(["ls", "/sys/class/net"]).check().stdout == "lo\n"
    interfaces = [line.split(":")[0].strip() for line in debian.exec(["cat", "/proc/net/dev"]).stdout.splitlines()[2:]]
    assert interfaces == ["lo"]


def test_fork_bomb_is_stopped_by_the_pids_limit(client, daemon):
    limit = 48
    with new_sandbox(client, "debian", pids=limit) as sb:
        counter = textwrap.dedent("""
            import errno, os, time
            children = []
            while True:
                try:
                    pid = os.fork()
                except OSError as e:
                    print(len(children), errno.errorcode[e.errno])
                    break
                if pid == 0:
                    time.sleep(60)
                    os._exit(0)
                children.append(pid)
            for pid in children:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        """)
        forked, error = sb.exec(["python3", "-c", counter], timeout=60).check().stdout.split()
        assert error == "EAGAIN" and 0 < int(forked) < limit
        # The classic bomb: bash retries forks forever, so it runs into the timeout and its group is killed.
        bomb = sb.exec(["bash", "-c", ":(){ :|:& };: ; sleep 3"], timeout=3)
        assert "fork" in bomb.stderr and "Resource temporarily unavailable" in bomb.stderr
        (pids_dir,) = [p for p in cgroup_dirs(daemon, sb.id) if os.path.exists(os.path.join(p, "pids.max"))]
        assert int(open(os.path.join(pids_dir, "pids.max")).read()) == limit
        assert int(open(os.path.join(pids_dir, "pids.current")).read()) <= limit
        # The host still forks, and the daemon still serves.
        assert subprocess.run(["true"]).returncode == 0
        assert client.health()["status"] == "ok"


def test_memory_limit_gets_the_command_oom_killed(client):
    with new_sandbox(client, "debian", memory="64M") as sb:
        hog = "b = bytearray(256 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"
        result = sb.exec(["python3", "-c", hog], timeout=60)
        assert result.oom_killed and result.signal == 9 and result.exit_code is None
        assert "survived" not in result.stdout
        with pytest.raises(deltabox.CommandError, match="lack of memory"):
            result.check()
        # The sandbox survives its command's OOM kill.
        assert sb.exec(["echo", "fine"]).check().stdout == "fine\n"
        assert not sb.exec(["true"]).oom_killed


RAW_SYSCALLS = textwrap.dedent("""
    import ctypes, errno
    libc = ctypes.CDLL(None, use_errno=True)
    calls = {  # x86_64 numbers
        "mount": (165, b"none", b"/mnt", b"tmpfs", 0, None),
        "unshare": (272, 0x10000000),           # CLONE_NEWUSER
        "kexec_load": (246, 0, 0, None, 0),
        "bpf": (321, 0, None, 0),
        "init_module": (175, None, 0, b""),
        "finit_module": (313, 0, b"", 0),
    }
    for name, (nr, *args) in calls.items():
        ctypes.set_errno(0)
        ret = libc.syscall(nr, *args)
        print(name, ret, errno.errorcode.get(ctypes.get_errno(), "0"))
""")


def test_privileged_system_calls_fail(debian):
    results = {}
    for line in debian.exec(["python3", "-c", RAW_SYSCALLS]).check().stdout.splitlines():
        name, ret, err = line.split()
        results[name] = (int(ret), err)
    assert results == {name: (-1, "EPERM") for name in
                       ("mount", "unshare", "kexec_load", "bpf", "init_module", "finit_module")}


@pytest.mark.parametrize("command", [
    "mount -t tmpfs none /mnt",
    "mount --bind /tmp /mnt",
    "unshare --user true",
    "unshare --mount true",
    "unshare --net true",
])
def test_privileged_commands_fail(debian, command):
    result = debian.exec(["sh", "-c", command])
    assert result.exit_code not in (0, None), result
    assert "ermission denied" in result.stderr or "not permitted" in result.stderr
