"""Hostile behaviour DeltaBox already withstands, kept as regression tests so that it keeps withstanding it.

The threat model: a program running as root inside a sandbox (its own user, pid, mount and network
namespaces, the seccomp filter, cgroup limits, DeltaFS as its root filesystem) is hostile; a client of the
HTTP API may be careless and send malformed or oversized requests. Each test names one protection and fails
when it breaks. What test_isolation.py, test_bad_input.py, test_files.py and test_disk_quota.py already prove
is not repeated here.
"""

import errno
import gzip
import io
import json
import os
import secrets
import signal
import socket
import tarfile
import textwrap
import threading
import uuid

import pytest
from support import cgroup_dirs, new_sandbox, raw_request, status_field, wait_until

import deltabox

JSON = {"Content-Type": "application/json"}
# Docker's default capability set, relative to the sandbox's user namespace (docs/seccomp.md).
DEFAULT_CAPS = "00000000a80425fb"


@pytest.fixture(autouse=True)
def still_serving(client):
    """Whatever a test did, the daemon answers afterwards."""
    yield
    assert client.health()["status"] == "ok"


def python_in(sb, program, **kwargs):
    """Runs a python3 program in the sandbox; returns its result (not checked)."""
    return sb.exec(["python3", "-c", textwrap.dedent(program)], **kwargs)


def host_path(prefix):
    """A path under the host's /tmp that exists neither on the host nor in a sandbox."""
    return f"/tmp/deltabox-{prefix}-{uuid.uuid4().hex}"


# --- System calls ----------------------------------------------------------------------------------------

# x86_64 numbers. Where the kernel's own checks would also say EPERM, arguments are chosen (where one can) so that
# a call the filter let through would answer something else (EFAULT, EBADF, EINVAL, a result), so the assertion
# tells the filter from the kernel.
SYSCALL_PROBE = """
    import ctypes, errno, os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    AT_FDCWD = -100
    SIGCHLD = 17
    calls = {
        "umount2": (166, b"/", 2),                                   # MNT_DETACH of the sandbox's root
        "pivot_root": (155, b"/tmp", b"/"),
        "setns": (308, -1, 0),                                       # EBADF if let through
        "kexec_file_load": (320, -1, -1, 0, None, 0),
        "delete_module": (176, b"no_such_module", 0),
        "perf_event_open": (298, None, 0, -1, -1, 0),                # EFAULT if let through
        "keyctl": (250, 0, -3, 0),                                   # KEYCTL_GET_KEYRING_ID of the session keyring
        "add_key": (248, b"user", b"deltabox", b"x", 1, -3),
        "request_key": (249, b"user", b"deltabox", None, 0),
        "open_by_handle_at": (304, AT_FDCWD, None, 0),              # EFAULT if let through
        "userfaultfd": (323, 0),
        "io_uring_setup": (425, 1, None),                            # EFAULT if let through
        "fsopen": (430, b"tmpfs", 0),
        "fspick": (433, AT_FDCWD, b"/", 0),
        "open_tree": (428, AT_FDCWD, b"/", 1),                       # OPEN_TREE_CLONE
        "move_mount": (429, -1, b"", -1, b"", 0),
        "mount_setattr": (442, -1, b"", 0, None, 0),
        "quotactl": (179, 0, None, 0, None),
        "syslog": (103, 10, None, 0),                                # SYSLOG_ACTION_SIZE_BUFFER
        "reboot": (169, 0xfee1dead, 672274793, 0, None),             # LINUX_REBOOT_CMD_CAD_OFF
        "swapon": (167, b"/no/such/swapfile", 0),
        "acct": (163, None),
        "settimeofday": (164, None, None),
        "clock_settime": (227, 0, None),                             # EFAULT if let through
        "iopl": (172, 3),
        "ioperm": (173, 0, 1024, 1),
        "kcmp": (312, 1, 1, 0, 0, 0),
        "pidfd_getfd": (438, -1, 0, 0),
        "process_madvise": (440, -1, None, 0, 0, 0),
        "fanotify_init": (300, 0, 0),
        "lookup_dcookie": (212, 0, None, 0),
        "sethostname": (170, b"evil", 4),
        "setdomainname": (171, b"evil", 4),
        "personality(ADDR_NO_RANDOMIZE)": (135, 0x0040000),
        "socket(AF_VSOCK)": (41, 40, 1, 0),
        "socket(AF_VSOCK | 1<<32)": (41, 40 | 1 << 32, 1, 0),        # the high bits the kernel ignores
        "clone(CLONE_NEWUSER)": (56, 0x10000000 | SIGCHLD, 0, 0, 0, 0),
        "clone(CLONE_NEWNS)": (56, 0x00020000 | SIGCHLD, 0, 0, 0, 0),
        "clone(CLONE_NEWNET)": (56, 0x40000000 | SIGCHLD, 0, 0, 0, 0),
        "x32 getpid": (0x40000000 | 39,),
        "clone3": (435, None, 0),
        "open_tree_attr": (467, -1, b"", 0, None, 0),                # newer than the profile; EBADF if let through
    }
    for name, (nr, *args) in calls.items():
        args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
        ctypes.set_errno(0)
        ret = libc.syscall(ctypes.c_long(nr), *args)
        if ret == 0 and name.startswith("clone"):
            os._exit(0)  # a child the filter should have prevented: leave the answer to the parent
        if ret == -1:
            print(f"{name}={errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())}")
        else:
            print(f"{name}=returned {ret}")
"""

EXPECTED_ERRNO = {
    **{name: "EPERM" for name in [
        "umount2", "pivot_root", "setns", "kexec_file_load", "delete_module", "perf_event_open", "keyctl",
        "add_key", "request_key", "open_by_handle_at", "userfaultfd", "io_uring_setup", "fsopen", "fspick",
        "open_tree", "move_mount", "mount_setattr", "quotactl", "syslog", "reboot", "swapon", "acct",
        "settimeofday", "clock_settime", "iopl", "ioperm", "kcmp", "pidfd_getfd", "process_madvise",
        "fanotify_init", "lookup_dcookie", "sethostname", "setdomainname", "personality(ADDR_NO_RANDOMIZE)",
        "socket(AF_VSOCK)", "socket(AF_VSOCK | 1<<32)", "clone(CLONE_NEWUSER)", "clone(CLONE_NEWNS)",
        "clone(CLONE_NEWNET)", "x32 getpid"]},
    # Newer than the profile: "kernel too old" for libc, which then falls back (clone3 to clone).
    "clone3": "ENOSYS",
    "open_tree_attr": "ENOSYS",
}


def test_the_seccomp_filter_refuses_what_could_reach_the_kernel_or_the_host(debian):
    """Mount-API, module, key, perf, io_uring, time, reboot, namespace-creating clone, AF_VSOCK, x32-ABI and
    newer-than-profile calls are refused by the filter itself (test_isolation.py covers mount, unshare,
    kexec_load, bpf and (f)init_module)."""
    out = python_in(debian, SYSCALL_PROBE).check().stdout
    answers = dict(line.split("=", 1) for line in out.splitlines())
    assert answers == EXPECTED_ERRNO


I386_SYSCALL = """
    import ctypes, mmap
    code = bytes([0xb8, 0x14, 0, 0, 0, 0xcd, 0x80, 0xc3])  # mov eax, 20 (i386 getpid); int 0x80; ret
    buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(code)
    getpid = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))
    print("i386 getpid answered", getpid(), flush=True)
"""


def test_an_i386_system_call_kills_the_process(debian):
    """The 32-bit entry point (`int 0x80`), with its own syscall table, is not reachable: SIGSYS."""
    result = python_in(debian, I386_SYSCALL)
    assert (result.exit_code, result.signal) == (None, signal.SIGSYS), result
    assert "answered" not in result.stdout


CONFINEMENT = "grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp|Seccomp_filters):' /proc/self/status"


def confinement(output):
    return dict(line.split(":\t") for line in output.splitlines())


ROOT_CONFINED = {"CapInh": "0" * 16, "CapPrm": DEFAULT_CAPS, "CapEff": DEFAULT_CAPS, "CapBnd": DEFAULT_CAPS,
                 "CapAmb": "0" * 16, "NoNewPrivs": "0", "Seccomp": "2", "Seccomp_filters": "3"}


def test_every_way_in_runs_with_the_filter_and_the_default_capabilities(debian):
    """exec (as root and as another user) and sessions all start processes under the three seccomp filters
    (allow-list, ENOSYS list, signal guard) and within Docker's default capability set; a non-root user has no capabilities at all."""
    assert confinement(debian.exec(["sh", "-c", CONFINEMENT]).check().stdout) == ROOT_CONFINED
    with debian.session("confinement") as shell:
        assert confinement(shell.run(CONFINEMENT).check().stdout) == ROOT_CONFINED
    as_user = confinement(debian.exec(["sh", "-c", CONFINEMENT], user="1000:1000").check().stdout)
    assert as_user == dict(ROOT_CONFINED, CapPrm="0" * 16, CapEff="0" * 16)


def test_processes_restored_by_rollback_and_fork_stay_confined(client, daemon):
    """A full checkpoint's processes come back (after a rollback, in a fork) with the filter, the capability
    bounds and the unprivileged host uid they had: restoring is done by host root, and must not hand any of
    that root to the sandbox."""
    with new_sandbox(client, "debian") as sb:
        shell = sb.session("restored")
        shell.run("sleep 1000 &").check()
        ck = sb.checkpoint()
        assert ck.kind == "full"
        assert "restored" in sb.rollback(ck).sessions_restored
        # $$ is the restored bash itself, not a new child of it.
        status = "grep -E '^(CapBnd|CapEff|Seccomp|Seccomp_filters):' /proc/$$/status /proc/$!/status"
        expected = {"CapBnd": DEFAULT_CAPS, "CapEff": DEFAULT_CAPS, "Seccomp": "2", "Seccomp_filters": "3"}

        def per_process(output):
            found = {}
            for line in output.splitlines():
                path, field, value = line.split(":", 2)
                found.setdefault(path, {})[field] = value.strip()
            return found

        after_rollback = per_process(shell.run(status).check().stdout)
        assert len(after_rollback) == 2 and all(v == expected for v in after_rollback.values()), after_rollback
        assert_all_processes_unprivileged(daemon, sb)
        (fork,) = ck.fork()
        with fork:
            in_fork = per_process(fork.session("restored", create=False).run(status).check().stdout)
            assert len(in_fork) == 2 and all(v == expected for v in in_fork.values()), in_fork
            assert_all_processes_unprivileged(daemon, fork)


def assert_all_processes_unprivileged(daemon, sb):
    """Every process in the sandbox's cgroup runs, on the host, as a uid of the sandbox's range."""
    base = sb.refresh().uid_base
    pids = []
    for top in cgroup_dirs(daemon, sb.id):
        for dirpath, _, files in os.walk(top):
            if "cgroup.procs" in files:
                pids += [int(p) for p in open(os.path.join(dirpath, "cgroup.procs")).read().split()]
    assert len(pids) >= 3, pids  # init, bash, sleep
    for pid in set(pids):
        try:
            uids = [int(u) for u in status_field(pid, "Uid").split()]
        except OSError:
            continue  # exited meanwhile
        assert all(base <= u < base + 65536 for u in uids), (pid, uids, base)


# --- Devices ---------------------------------------------------------------------------------------------

DEVICES = """
    import errno, json, os, stat
    made = {}
    for path, kind, major, minor in [("/tmp/sda", stat.S_IFBLK, 8, 0), ("/tmp/mem", stat.S_IFCHR, 1, 1),
                                     ("/dev/vda", stat.S_IFBLK, 253, 0), ("/dev/kmsg", stat.S_IFCHR, 1, 11)]:
        try:
            os.mknod(path, kind | 0o600, os.makedev(major, minor))
            made[path] = "made"
        except OSError as e:
            made[path] = errno.errorcode[e.errno]
    nodes = []
    for dirpath, dirs, files in os.walk("/dev"):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
                kind = "block" if stat.S_ISBLK(st.st_mode) else "char"
                nodes.append([os.path.join(dirpath, name), kind, os.major(st.st_rdev), os.minor(st.st_rdev)])
    opened = {}
    for path, flags in [("/dev/kmsg", os.O_WRONLY), ("/dev/mem", os.O_RDONLY), ("/dev/port", os.O_RDONLY),
                        ("/dev/sda", os.O_RDONLY)]:
        try:
            os.close(os.open(path, flags))
            opened[path] = "opened"
        except OSError as e:
            opened[path] = errno.errorcode[e.errno]
    root = [line.split() for line in open("/proc/self/mountinfo") if line.split()[4] == "/"]
    print(json.dumps({"made": made, "nodes": sorted(nodes), "opened": opened, "root_options": root[-1][5]}))
"""


def test_no_device_node_of_the_host_is_reachable(debian):
    """mknod fails even for root with CAP_MKNOD (the user namespace), /dev holds only the harmless character
    devices (null zero full random urandom tty, the private pts), and the root filesystem is nodev, so a device
    node an image brings cannot open a host device either."""
    found = json.loads(python_in(debian, DEVICES).check().stdout)
    assert found["made"] == {"/tmp/sda": "EPERM", "/tmp/mem": "EPERM", "/dev/vda": "EPERM", "/dev/kmsg": "EPERM"}
    harmless = {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)}
    assert not [n for n in found["nodes"] if n[1] == "block"], found["nodes"]
    unexpected = [n for n in found["nodes"] if (n[2], n[3]) not in harmless and n[2] != 136]  # 136: pts/N
    assert not unexpected, unexpected
    assert found["opened"] == {path: "ENOENT" for path in ["/dev/kmsg", "/dev/mem", "/dev/port", "/dev/sda"]}
    assert "nodev" in found["root_options"].split(","), found["root_options"]


# --- /proc, /sys and the sandbox's init ------------------------------------------------------------------

KERNEL_KNOBS = """
    import errno, os
    for path in ["/proc/sysrq-trigger", "/proc/sys/kernel/core_pattern", "/proc/sys/kernel/modprobe",
                 "/proc/sys/vm/drop_caches", "/proc/sys/kernel/panic", "/proc/sys/fs/file-max",
                 "/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/uevent_helper",
                 "/sys/kernel/rcu_expedited"]:
        # Writes back what the file holds (or a no-op), so nothing changes even if a protection broke.
        try:
            data = open(path, "rb").read().split(b"[")[-1].split(b"]")[0] or b"\\n"
        except OSError:
            data = b"h" if path.endswith("sysrq-trigger") else b"\\n"
        try:
            fd = os.open(path, os.O_WRONLY)  # never O_CREAT
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            print(path, "written")
        except OSError as e:
            print(path, errno.errorcode[e.errno])
"""


def test_kernel_knobs_in_proc_and_sys_are_not_writable(debian):
    """Host-wide settings under /proc/sys, /proc/sysrq-trigger and /sys cannot be changed from inside: proc's
    files belong to the host's root (unmapped here), and /sys is mounted read-only."""
    answers = dict(line.split() for line in python_in(debian, KERNEL_KNOBS).check().stdout.splitlines())
    expected = {
        "/proc/sysrq-trigger": "EACCES", "/proc/sys/kernel/core_pattern": "EACCES",
        "/proc/sys/kernel/modprobe": "EACCES", "/proc/sys/vm/drop_caches": "EACCES",
        "/proc/sys/kernel/panic": "EACCES", "/proc/sys/fs/file-max": "EACCES",
        "/sys/kernel/mm/transparent_hugepage/enabled": "EROFS", "/sys/kernel/uevent_helper": "EROFS",
        "/sys/kernel/rcu_expedited": "EROFS",
    }
    # Files this kernel was built without (no CONFIG_MAGIC_SYSRQ, no CONFIG_MODULES ...) are missing inside too.
    expected = {path: answer if os.path.exists(path) else "ENOENT" for path, answer in expected.items()}
    assert sum(answer != "ENOENT" for answer in expected.values()) >= 5, expected
    assert answers == expected


INIT_PROBE = """
    import ctypes, errno, os
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.syscall.restype = ctypes.c_long
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    buf = ctypes.create_string_buffer(4096)
    local = iovec(ctypes.cast(buf, ctypes.c_void_p), 4096)
    remote = iovec(0x400000, 4096)  # any address: the access check comes first
    for what, call in [
        ("proc", lambda: os.stat("/proc/1")),
        ("exe", lambda: open("/proc/1/exe", "rb")),
        ("ptrace", lambda: libc.ptrace(ctypes.c_long(16), ctypes.c_long(1), None, None)),  # PTRACE_ATTACH
        ("vm_read", lambda: libc.syscall(ctypes.c_long(310), ctypes.c_long(1), ctypes.byref(local),
                                         ctypes.c_long(1), ctypes.byref(remote), ctypes.c_long(1), ctypes.c_long(0))),
    ]:
        ctypes.set_errno(0)
        try:
            ret = call()
            answer = errno.errorcode.get(ctypes.get_errno(), "ok") if ret == -1 else "ok"
        except OSError as e:
            answer = errno.errorcode[e.errno]
        print(what, answer)
"""


def test_init_is_hidden_and_cannot_be_traced(debian):
    """init talks to the shim: the sandbox cannot see it in /proc, open its executable (the runc
    /proc/self/exe overwrite), ptrace it or read its memory."""
    answers = dict(line.split() for line in python_in(debian, INIT_PROBE).check().stdout.splitlines())
    assert answers == {"proc": "ENOENT", "exe": "ENOENT", "ptrace": "EPERM", "vm_read": "EPERM"}


def test_killing_init_and_everything_from_inside_leaves_the_sandbox_working(client):
    """Signals to pid 1 from inside its pid namespace are dropped by the kernel when init has no handler, and
    `kill -9 -1` kills every process but init: the sandbox keeps its init and keeps serving."""
    with new_sandbox(client, "debian") as sb:
        init_pid = sb.info.init_pid
        sb.exec(["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 < /dev/null &"]).check()
        result = sb.exec(["sh", "-c", "for s in KILL STOP SEGV USR1 ABRT QUIT; do kill -s $s 1; done; "
                                      "kill -9 -1; echo survived"])
        assert (result.exit_code, result.stdout) == (0, "survived\n"), result
        assert sb.refresh().init_pid == init_pid
        assert status_field(init_pid, "State")[0] in "SR", status_field(init_pid, "State")
        assert "sleep" not in sb.exec(["ps", "-eo", "comm"]).check().stdout
        assert sb.exec(["echo", "alive"]).check().stdout == "alive\n"
        with sb.session("after-kill") as shell:
            assert shell.run("echo $((6 * 7))").check().stdout == "42\n"


# --- Network ---------------------------------------------------------------------------------------------

NETWORK_PROBE = """
    import errno, socket
    for family, address in [(socket.AF_INET, ("10.255.255.1", 80)), (socket.AF_INET6, ("2001:db8::1", 80))]:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(family, kind)
            try:
                if kind == socket.SOCK_STREAM:
                    s.connect(address)
                else:
                    s.sendto(b"x", address)
                print(family.name, kind.name, "sent")
            except OSError as e:
                print(family.name, kind.name, errno.errorcode[e.errno])
            finally:
                s.close()
"""


def test_no_route_out_of_a_sandbox_without_network(debian):
    """With network "none" there is no route: a connection or a datagram to any non-loopback address fails at
    once with ENETUNREACH, without a packet leaving (only documentation/unused addresses are tried)."""
    lines = python_in(debian, NETWORK_PROBE, timeout=30).check().stdout.splitlines()
    assert sorted(lines) == sorted(f"{family} {kind} ENETUNREACH" for family in ("AF_INET", "AF_INET6")
                                   for kind in ("SOCK_STREAM", "SOCK_DGRAM"))


def test_abstract_unix_sockets_of_the_host_are_unreachable(debian):
    """Abstract Unix sockets belong to the network namespace (the containerd-shim CVE-2020-15257): one that
    listens on the host cannot be reached from inside."""
    name = f"deltabox-held-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind("\0" + name)
        listener.listen(1)
        program = f"""
            import errno, socket
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect("\\0{name}")
                print("connected")
            except OSError as e:
                print(errno.errorcode[e.errno])
        """
        assert python_in(debian, program).check().stdout == "ECONNREFUSED\n"


# --- Files API -------------------------------------------------------------------------------------------

def test_links_to_paths_that_exist_in_both_resolve_in_the_sandbox(debian):
    """Where the same path exists on the host and in the sandbox, symlinks (absolute, relative with many
    `..`, and as a parent directory) lead the files API to the sandbox's file; writes through a symlinked
    parent land in the sandbox and nothing appears on the host."""
    shared = host_path("both")
    with open(shared, "w") as f:
        f.write("HOST\n")
    created = host_path("created")
    try:
        debian.files.write(shared, "SANDBOX\n")
        debian.exec(["sh", "-c", f"mkdir -p /work/links && cd /work/links && ln -sfn {shared} abs && "
                                 f"ln -sfn ../../../../../../..{shared} rel && ln -sfn /tmp dir && "
                                 "ln -sfn ../../../../../../../tmp reldir"]).check()
        name = os.path.basename(shared)
        for path in ["/work/links/abs", "/work/links/rel", f"/work/links/dir/{name}", f"/work/links/reldir/{name}"]:
            assert debian.files.read(path) == b"SANDBOX\n", path
        assert name in [e.name for e in debian.files.list("/work/links/dir")]
        debian.files.write(f"/work/links/dir/{os.path.basename(created)}", b"inside\n")
        debian.files.mkdir(f"/work/links/reldir/{os.path.basename(created)}-dir")
        assert debian.exec(["cat", created]).check().stdout == "inside\n"
        assert not os.path.lexists(created) and not os.path.lexists(created + "-dir")
        assert open(shared).read() == "HOST\n"
    finally:
        os.unlink(shared)


def test_magic_links_and_kernel_files_are_refused_to_the_daemon(debian):
    """The daemon is host root: through the files API it must not read kernel memory or host process state
    via the sandbox's /proc, nor write kernel settings, nor follow /proc/<pid>/root magic links."""
    for path in ["/proc/kallsyms", "/proc/1/environ", "/proc/slabinfo", "/sys/kernel/notes",
                 "/proc/sys/kernel/core_pattern"]:
        with pytest.raises(deltabox.DeltaboxError) as err:
            debian.files.read(path)
        assert err.value.code == "pseudo_filesystem", (path, err.value)
    # Writing back the host's own value: harmless even if the refusal broke.
    host_value = open("/proc/sys/kernel/core_pattern", "rb").read()
    with pytest.raises(deltabox.DeltaboxError) as err:
        debian.files.write("/proc/sys/kernel/core_pattern", host_value)
    assert err.value.code == "pseudo_filesystem", err.value
    with pytest.raises(deltabox.DeltaboxError) as err:
        debian.files.mkdir("/sys/fs/cgroup/deltabox-evil")
    assert err.value.code == "pseudo_filesystem", err.value
    debian.exec(["sh", "-c", "mkdir -p /work && ln -sfn /proc/1/root/etc/hostname /work/magic && "
                             "ln -sfn /proc/kallsyms /work/kallsyms"]).check()
    for path, code in [("/work/magic", "invalid_path"), ("/proc/1/root/etc/hostname", "invalid_path"),
                       ("/work/kallsyms", "pseudo_filesystem")]:
        with pytest.raises(deltabox.BadRequest) as err:
            debian.files.read(path)
        assert err.value.code == code, (path, err.value)
    assert open("/proc/sys/kernel/core_pattern", "rb").read() == host_value


def test_fifos_and_devices_planted_by_the_agent_cannot_hang_or_flood_the_daemon(debian):
    """A read of a FIFO would block the daemon forever, a read of /dev/zero would never end: the files API reads
    regular files only, also behind a symlink, and a tar download stores such entries without their content."""
    debian.exec(["sh", "-c", "rm -rf /work/traps && mkdir -p /work/traps && cd /work/traps && mkfifo fifo && "
                             "ln -s /dev/zero zero && ln -s /dev/urandom random && ln -s fifo to-fifo"]).check()
    for path in ["/work/traps/fifo", "/work/traps/zero", "/work/traps/random", "/work/traps/to-fifo", "/dev/zero"]:
        with pytest.raises(deltabox.BadRequest) as err:
            debian.files.read(path)
        assert err.value.code == "not_a_regular_file", (path, err.value)
    archive = b"".join(debian.files.download_tar("/work/traps"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        kinds = {m.name.removeprefix("./"): (m.type, m.size) for m in tar.getmembers() if m.name not in (".", "./")}
    assert kinds == {"fifo": (tarfile.FIFOTYPE, 0), "zero": (tarfile.SYMTYPE, 0), "random": (tarfile.SYMTYPE, 0),
                     "to-fifo": (tarfile.SYMTYPE, 0)}


SWAPPER = """
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    if os.fork() == 0:
        os.setsid()
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        while not os.path.exists("/work/stop-race"):
            libc.renameat2(-100, b"/work/race", -100, b"/work/other", 2)  # RENAME_EXCHANGE
        os._exit(0)
"""


def test_writes_racing_a_directory_swapped_for_a_symlink_stay_inside(debian):
    """The agent atomically exchanges a directory with a symlink to a host path (renameat2 RENAME_EXCHANGE, as
    fast as it can) while the API writes into it: every write lands in the directory or fails (the symlink leads
    nowhere inside the sandbox), and none reaches the host (resolution is one openat2 in the sandbox's root, not
    a check followed by a use)."""
    target = host_path("race")
    os.mkdir(target)
    try:
        debian.exec(["sh", "-c", f"rm -rf /work/race /work/other /work/stop-race {target}; mkdir -p /work/race; "
                                 f"ln -s {target} /work/other"]).check()
        python_in(debian, SWAPPER).check()
        refused = 0
        try:
            for i in range(300):
                try:
                    debian.files.write(f"/work/race/f{i}", b"x")
                except deltabox.FileNotFound:
                    refused += 1  # the symlink was in place: its target does not exist in the sandbox
        finally:
            debian.files.write("/work/stop-race", b"")
        assert os.listdir(target) == []
        where = debian.exec(["sh", "-c", "cd /work && find . -name 'f[0-9]*' | xargs -r -n1 dirname | sort | "
                                         "uniq -c"]).check().stdout
        landed = {line.split()[1]: int(line.split()[0]) for line in where.splitlines()}
        # Whichever name the directory had when a write found it; never through the symlink.
        assert set(landed) <= {"./race", "./other"} and sum(landed.values()) + refused == 300, (landed, refused)
        assert not debian.files.exists(target)
    finally:
        os.rmdir(target)


def test_overlong_paths_are_refused_before_any_work(debian):
    """A path of 5,000 components (10 KB, past PATH_MAX) is refused as a whole by write, mkdir and a tar
    upload, instead of being walked one directory at a time."""
    deep = "/work/long/" + "/".join(["d"] * 5000)
    archive = tar_bytes(member(deep.removeprefix("/work/long/") + "/f", data=b"x"), fmt=tarfile.PAX_FORMAT)
    for attempt in [lambda: debian.files.write(deep + "/f", b"x"), lambda: debian.files.mkdir(deep),
                    lambda: debian.files.upload_tar("/work/long", archive)]:
        with pytest.raises(deltabox.BadRequest) as err:
            attempt()
        assert err.value.code == "invalid_path" and "too long" in err.value.message, err.value
    assert not debian.files.exists("/work/long/d")


def test_a_client_hanging_up_mid_upload_leaves_nothing_behind(daemon, debian):
    """An upload cut off by the client is not renamed into place, and its temporary file is removed."""
    debian.exec(["sh", "-c", "rm -rf /work/partial && mkdir -p /work/partial"]).check()
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(daemon.socket)
    try:
        head = (f"PUT /v1/sandboxes/{debian.id}/files?path=/work/partial/big HTTP/1.1\r\nHost: deltabox\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {64 << 20}\r\n\r\n").encode()
        conn.sendall(head + b"\0" * (1 << 20))
        (partial,) = wait_until(lambda: debian.files.list("/work/partial"), what="the upload's temporary file")
        assert partial.name.startswith(".deltabox-tmp-"), partial
    finally:
        conn.close()
    wait_until(lambda: not debian.files.list("/work/partial"), what="the temporary file to be removed")
    assert not debian.files.exists("/work/partial/big")


# --- Hostile tar uploads ---------------------------------------------------------------------------------

def tar_bytes(*members, fmt=tarfile.GNU_FORMAT):
    """A tar of (TarInfo, data bytes or None)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name, kind=tarfile.REGTYPE, linkname="", data=b"", **fields):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    return info, (data if kind == tarfile.REGTYPE else None)


def test_hostile_archive_entries_are_refused_and_reach_nothing(debian):
    """Entries the existing test does not try: a symlink to `/` then a file through it, a PAX header whose path
    overrides a harmless name with `..`, a hard link to an absolute path, and a header that declares 4 GiB of
    data followed by a few bytes. Each is refused; nothing appears on the host or in the sandbox."""
    escape = host_path("tar")
    name = escape.removeprefix("/")
    pax = tarfile.TarInfo("harmless")
    pax.size, pax.pax_headers = 4, {"path": f"../../../../..{escape}"}
    huge_header = member("huge")[0]
    huge_header.size = 4 << 30
    huge = huge_header.tobuf(tarfile.GNU_FORMAT) + b"tiny".ljust(512, b"\0") + b"\0" * 1024
    cases = {
        "symlink-to-root": (tar_bytes(member("link", tarfile.SYMTYPE, "/"), member(f"link/{name}", data=b"x")),
                            "archive_entry_refused"),
        "pax-path": (tar_bytes((pax, b"evil"), fmt=tarfile.PAX_FORMAT), "archive_entry_refused"),
        # The absolute target is looked up beneath the destination, where there is no etc/passwd.
        "absolute-hardlink": (tar_bytes(member("hard", tarfile.LNKTYPE, "/etc/passwd")), "file_not_found"),
        "huge-declared-size": (huge, "bad_archive"),
    }
    passwd = debian.files.read("/etc/passwd")
    answers = {}
    for case, (archive, _) in cases.items():
        debian.exec(["rm", "-rf", "/work/t"]).check()
        try:
            debian.files.upload_tar("/work/t", archive)
            answers[case] = "accepted"
        except deltabox.DeltaboxError as e:
            answers[case] = e.code
        assert not os.path.lexists(escape), case
        assert not debian.files.exists(escape), case
        assert not debian.files.exists("/work/t/huge") and not debian.files.exists("/work/t/hard"), case
        # Extraction stops at the refused entry, and the archive's symlinks would only be made at the end.
        assert debian.files.list("/work/t") == [], case
    assert answers == {case: code for case, (_, code) in cases.items()}
    assert debian.files.read("/etc/passwd") == passwd


def test_archive_names_are_taken_inside_the_destination_and_links_planted_there_are_not_followed_out(debian):
    """An absolute entry name lands under the destination (as GNU tar does), a destination that the agent made a
    symlink to /tmp resolves inside the sandbox, and a symlink the agent planted where a file goes is replaced,
    not written through: the host file it names is untouched."""
    victim = host_path("victim")
    with open(victim, "w") as f:
        f.write("HOST\n")
    absolute = host_path("absolute")
    try:
        debian.exec(["sh", "-c", "rm -rf /work/a && mkdir -p /work/a/into && ln -s /tmp /work/a/dest && "
                                 f"ln -s {victim} /work/a/into/victim"]).check()
        debian.files.upload_tar("/work/a/into", tar_bytes(member(absolute, data=b"abs\n"),
                                                          member("victim", data=b"replaced\n")))
        assert debian.files.read(f"/work/a/into{absolute}") == b"abs\n"
        assert debian.files.stat("/work/a/into/victim").kind == "file"
        assert debian.files.read("/work/a/into/victim") == b"replaced\n"
        dest_name = os.path.basename(host_path("dest"))
        debian.files.upload_tar("/work/a/dest", tar_bytes(member(f"{dest_name}/f", data=b"in /tmp\n")))
        assert debian.exec(["cat", f"/tmp/{dest_name}/f"]).check().stdout == "in /tmp\n"
        assert not os.path.lexists(absolute) and not os.path.lexists(f"/tmp/{dest_name}")
        assert open(victim).read() == "HOST\n"
    finally:
        os.unlink(victim)


def test_device_nodes_in_an_archive_are_skipped(debian):
    """The daemon is host root and could create a node for a host disk: device entries are skipped (counted),
    a FIFO is harmless and created."""
    debian.exec(["rm", "-rf", "/work/dev"]).check()
    archive = tar_bytes(member("sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o666),
                        member("mem", tarfile.CHRTYPE, devmajor=1, devminor=1, mode=0o666),
                        member("pipe", tarfile.FIFOTYPE))
    stats = debian.files.upload_tar("/work/dev", archive)
    assert (stats.skipped_devices, stats.fifos) == (2, 1)
    assert [e.name for e in debian.files.list("/work/dev")] == ["pipe"]


def test_a_decompression_bomb_stops_at_the_disk_limit(client):
    """A small gzip that expands far past the sandbox's disk fails with `no_space` and leaves no partial file;
    the sandbox keeps working."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("bomb")
        info.size = 256 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    bomb = gzip.compress(raw.getvalue(), compresslevel=9)
    assert len(bomb) < 1 << 20
    with new_sandbox(client, "busybox", disk="32M") as sb:
        with pytest.raises(deltabox.InsufficientStorage) as err:
            sb.files.upload_tar("/bombed", bomb)
        assert err.value.code == "no_space"
        assert [e.name for e in sb.files.list("/bombed")] == []
        sb.files.write("/after", b"still works")
        assert sb.exec(["cat", "/after"]).check().stdout == "still works"


# --- Bombs -----------------------------------------------------------------------------------------------

PERSISTENT_BOMB = """
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""


def test_a_detached_fork_bomb_is_cleared_by_a_rollback(client, daemon):
    """A fork bomb that escapes its command (setsid) keeps the sandbox at its pids limit: a new command is
    refused at once (no hang), other sandboxes and the files API are unaffected, and a rollback (which kills
    every process but init, without forking inside) makes the sandbox usable again."""
    with new_sandbox(client, "debian", pids=64) as sb:
        sb.files.write("/root/bomb.py", PERSISTENT_BOMB)
        ck = sb.checkpoint(fs_only=True)
        sb.exec(["sh", "-c", "setsid python3 /root/bomb.py > /dev/null 2>&1 < /dev/null &"]).check()
        (pids_dir,) = [p for p in cgroup_dirs(daemon, sb.id) if os.path.exists(os.path.join(p, "pids.max"))]
        current = lambda: int(open(os.path.join(pids_dir, "pids.current")).read())  # noqa: E731
        wait_until(lambda: current() == 64, what="the bomb to reach the pids limit")
        with pytest.raises(deltabox.BadRequest) as err:
            sb.exec(["echo", "never"], timeout=30)
        assert err.value.code == "start_failed" and "EAGAIN" in err.value.message, err.value
        sb.files.write("/root/note", b"the files API needs no process inside")
        with new_sandbox(client, "busybox") as other:
            assert other.exec(["echo", "unaffected"]).check().stdout == "unaffected\n"
        result = sb.rollback(ck)
        assert result.processes_killed == 63, result  # all but init
        assert sb.exec(["echo", "usable"]).check().stdout == "usable\n"
        assert current() < 10


def test_a_memory_bomb_spares_init_and_a_running_session(client):
    """The process that eats memory past the limit is the one OOM-killed, not init or the agent's shell: the
    session keeps its state and later commands run (test_isolation.py checks the OOM report itself)."""
    with new_sandbox(client, "debian", memory="128M") as sb:
        with sb.session("bystander") as shell:
            shell.run("KEEP=kept").check()
            hog = "b = []\nwhile True: b.append(bytearray(1 << 20))"
            result = sb.exec(["python3", "-c", hog], timeout=60)
            assert result.oom_killed and result.signal == signal.SIGKILL
            assert shell.run("echo $KEEP").check().stdout == "kept\n"
        assert sb.exec(["echo", "fine"]).check().stdout == "fine\n"


# --- Checkpoint and rollback, again and again --------------------------------------------------------------

def test_rollback_brings_back_files_and_shell_state_twenty_times(client):
    """Twenty rounds of: a random token in a file and a shell variable, a full checkpoint, both changed, a
    rollback; every round both are back exactly."""
    with new_sandbox(client, "debian") as sb:
        shell = sb.session("rounds")
        for round_ in range(20):
            token = secrets.token_hex(16)
            shell.run(f"echo {token} > /root/token; TOKEN={token}; mkdir -p /root/{token} && cd /root/{token}").check()
            ck = sb.checkpoint()
            shell.run("echo changed > /root/token; TOKEN=changed; cd /tmp").check()
            assert "rounds" in sb.rollback(ck).sessions_restored, round_
            expected = f"{token}\n{token}\n/root/{token}\n"
            assert shell.run('cat /root/token; echo "$TOKEN"; pwd').check().stdout == expected, round_
            assert sb.files.read("/root/token") == f"{token}\n".encode(), round_


# --- Malformed and oversized requests ---------------------------------------------------------------------

def exchange(daemon, head: bytes, body_chunks=(), hang_up=False) -> bytes:
    """Sends a raw request on a new connection (the body from another thread, so a daemon that answers before
    reading it all cannot block us); returns everything the daemon answered until it closed the connection."""
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(60)
    conn.connect(daemon.socket)

    def send():
        try:
            conn.sendall(head)
            for chunk in body_chunks:
                conn.sendall(chunk)
            if hang_up:
                conn.shutdown(socket.SHUT_WR)  # the body ends here, and we still read the answer
        except OSError:
            pass  # the daemon answered and closed before reading everything

    sender = threading.Thread(target=send)
    sender.start()
    answer = b""
    try:
        while True:
            piece = conn.recv(65536)
            if not piece:
                break
            answer += piece
    except OSError as e:
        assert e.errno in (errno.ECONNRESET, errno.ENOTCONN, errno.EBADF), e
    finally:
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sender.join(60)
        conn.close()
    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def post_head(path, length, extra=""):
    return (f"POST {path} HTTP/1.1\r\nHost: deltabox\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n{extra}\r\n").encode()


def test_a_100_mb_json_body_is_refused(daemon, client):
    """JSON bodies are limited to 64 MiB: a 100 MB one gets 413 instead of being buffered whole."""
    before = len(client.list())
    size = 100 << 20
    chunk = b"a" * (1 << 20)
    body = [b'{"image": "'] + [chunk] * 100 + [b'"}']
    answer = exchange(daemon, post_head("/v1/sandboxes", size + 13), body)
    assert status_of(answer) == 413 and b'"payload_too_large"' in answer, answer[:300]
    assert len(client.list()) == before


@pytest.mark.parametrize("body, code", [
    # Typed deserialisation stops at the first token of the wrong type: no recursion into the nesting.
    (b"[" * 100_000, "invalid_request"),
    (b'{"image": "debian", "env": {"A": ' + b"[" * 100_000 + b"}}", "invalid_request"),
    (b'{"image": "deb\xff\xfeian"}', "invalid_json"),
    (b'{"image": "debian\x00"}', "invalid_json"),
], ids=["nested-100k", "nested-in-a-field", "invalid-utf8", "raw-nul"])
def test_pathological_json_is_refused(daemon, client, body, code):
    """Deep nesting, invalid UTF-8 and raw control characters answer 400 instead of overflowing the daemon's
    stack or creating anything."""
    before = len(client.list())
    status, answer = raw_request(daemon, "POST", "/v1/sandboxes", body, JSON)
    assert (status, answer["error"]) == (400, code), answer
    assert len(client.list()) == before


def test_a_1_mb_header_is_refused(daemon):
    """Headers are not buffered without bound: a 1 MB header gets 431 and the connection is closed."""
    head = (b"GET /v1/health HTTP/1.1\r\nHost: deltabox\r\nX-Junk: " + b"j" * (1 << 20) + b"\r\n"
            b"Connection: close\r\n\r\n")
    answer = exchange(daemon, head)
    assert status_of(answer) == 431, answer[:300]


@pytest.mark.parametrize("head", [
    b"GET /v1/health HTTP/1.1\r\nHost: deltabox\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"GET /v1/health HTTP/1.1\r\nHost: deltabox\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/sandboxes HTTP/1.1\r\nHost: deltabox\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),
], ids=["huge-content-length", "negative-content-length", "chunked-overflow", "tls-hello"])
def test_broken_framing_is_refused(daemon, head):
    """Lengths that overflow or are negative, a chunk size past 64 bits, and a TLS handshake on the plain socket:
    400, and the connection is closed."""
    answer = exchange(daemon, head)
    assert status_of(answer) == 400, answer[:300]


@pytest.mark.parametrize("method, path, code", [
    ("GET", "/v1/sandboxes/..%2F..%2Fetc%2Fpasswd", "sandbox_not_found"),
    ("POST", "/v1/sandboxes/%2E%2E/exec", "sandbox_not_found"),
    ("GET", "/v1/checkpoints/..%2F..%2F..%2Fetc", "checkpoint_not_found"),
    ("GET", "/v1/images/..%2F..%2Fetc", "image_not_found"),
])
def test_encoded_traversal_in_urls_names_nothing(daemon, method, path, code):
    """Ids and names decoded from the URL are looked up, never used as paths of the daemon's data directory."""
    body = b'{"cmd": ["true"]}' if method == "POST" else b""
    status, answer = raw_request(daemon, method, path, body, JSON if body else {})
    assert (status, answer["error"]) == (404, code), answer


@pytest.mark.parametrize("suffix, body, code", [
    ("/exec", {"cmd": ["echo", "a\0b"]}, "start_failed"),
    ("/exec", {"cmd": ["echo"], "env": {"A": "a\0b"}}, "invalid_env"),
    ("/exec", {"cmd": ["true"], "cwd": "/tmp/\0"}, "start_failed"),
    ("/exec", {"cmd": ["true"], "user": "0:0\0"}, "start_failed"),
    ("/sessions", {"name": "a\0b"}, "bad_request"),
    ("/files?path=%2Ftmp%2F%00x", None, "invalid_path"),
], ids=["argv", "env", "cwd", "user", "session-name", "file-path"])
def test_nul_bytes_are_refused(daemon, debian, suffix, body, code):
    """A NUL byte would cut a C string short (run another program, open another file): each is a 400."""
    data = json.dumps(body).encode() if body is not None else b""
    status, answer = raw_request(daemon, "POST" if body is not None else "GET", f"/v1/sandboxes/{debian.id}{suffix}",
                                 data, JSON if body is not None else {})
    assert (status, answer["error"]) == (400, code), answer


def test_requests_cut_off_mid_body_do_not_stall_the_daemon(daemon, client):
    """Clients whose body ends early (half-closed: they still read, and get a 400) or who disappear mid-body:
    nothing is created, and the next request is served."""
    before = len(client.list())
    partial = [b'{"image": "busybox", "env": {"A": "']
    for _ in range(10):
        answer = exchange(daemon, post_head("/v1/sandboxes", 1000), partial, hang_up=True)
        assert status_of(answer) == 400 and b'"invalid_request"' in answer, answer[:300]
        with socket.socket(socket.AF_UNIX) as gone:
            gone.connect(daemon.socket)
            gone.sendall(post_head("/v1/sandboxes", 1000) + partial[0])
    assert len(client.list()) == before
    with new_sandbox(client, "busybox") as sb:
        assert sb.exec(["echo", "served"]).check().stdout == "served\n"
