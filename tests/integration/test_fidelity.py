"""Process checkpoint fidelity (issue 4), zdtm-style: real programs in a sandbox, checkpoint, change their
state, roll back, and check that they continue exactly from the checkpoint — several times, older after
newer, and in forks."""

import json
import subprocess
import time

import pytest
from support import new_sandbox, wait_until

import deltabox

PY_COUNTERS = r"""
import hashlib, json, os, threading, time
blob = [bytes([i % 251]) * 1_000_000 for i in range(200)]      # ~200 MB of objects
digest = hashlib.sha256(b"".join(blob[:20])).hexdigest()
counts = [0, 0, 0, 0]
def count(i):
    while True:
        counts[i] += 1
        time.sleep(0.01)
for i in range(4):
    threading.Thread(target=count, args=(i,), daemon=True).start()
while True:
    with open("/root/counters.tmp", "w") as f:
        json.dump({"counts": counts, "digest": digest, "pid": os.getpid(),
                   "threads": threading.active_count()}, f)
    os.replace("/root/counters.tmp", "/root/counters.json")
    time.sleep(0.05)
"""


def run(session, command, timeout=60):
    r = session.run(command, timeout=timeout)
    assert r.exit_code == 0, (command, r.stdout, r.stderr)
    return r.stdout


@pytest.fixture()
def sandbox(client):
    with new_sandbox(client, "debian", memory="2G") as sb:
        yield sb


def test_interactive_bash_session_comes_back_with_its_state(client, sandbox):
    sh = sandbox.session("main")
    run(sh, "cd /root && mkdir -p work && cd work")
    run(sh, "export EXPORTED=one; UNEXPORTED=two; greet() { echo \"hi $1\"; }; alias ll='echo aliased'")
    run(sh, "echo marker-in-history >/dev/null")
    run(sh, "sleep 1000 & echo $! > /root/job.pid")
    ck = sandbox.checkpoint()
    assert ck.kind == "full"
    for attempt in range(3):
        # Change everything the checkpoint captured.
        run(sh, "cd /; EXPORTED=changed; unset UNEXPORTED; unset -f greet; unalias ll; kill %1; wait; true")
        result = sandbox.rollback(ck)
        assert "main" in result.sessions_restored, attempt
        out = run(sh, "pwd; echo $EXPORTED $UNEXPORTED; greet you; ll; "
                      "env | grep -c '^EXPORTED=one$'; env | grep -c '^UNEXPORTED=' || true")
        assert out.split("\n")[:6] == ["/root/work", "one two", "hi you", "aliased", "1", "0"], out
        assert "marker-in-history" in run(sh, "history | tail -20")
        jobs = run(sh, "jobs")
        assert "Running" in jobs and "sleep 1000" in jobs, jobs
    # The background job can still be waited for: end it and collect its status.
    out = run(sh, "kill %1; wait %1; echo status=$?")
    assert "status=143" in out


def counters(sb):
    try:
        return json.loads(sb.files.read_text("/root/counters.json"))
    except Exception:
        return None


def test_python_process_with_200mb_and_four_counting_threads(client, sandbox):
    sandbox.files.write("/root/counters.py", PY_COUNTERS.encode())
    sh = sandbox.session("main")
    run(sh, "python3 /root/counters.py & disown")
    first = wait_until(lambda: (c := counters(sandbox)) and min(c["counts"]) > 20 and c)
    ck = sandbox.checkpoint()
    at_checkpoint = wait_until(lambda: counters(sandbox))
    time.sleep(1.0)
    later = counters(sandbox)
    assert min(later["counts"]) > max(at_checkpoint["counts"])
    for _ in range(3):
        rb = sandbox.rollback(ck)
        assert rb.processes_restored >= 2
        # The files are the checkpoint's; the process continues from its memory at the checkpoint: its next
        # counts are just above the checkpoint's, far below what the abandoned run had reached.
        resumed = wait_until(lambda: (c := counters(sandbox)) and c["counts"] != at_checkpoint["counts"] and c)
        assert resumed["pid"] == first["pid"] and resumed["digest"] == first["digest"]
        assert resumed["threads"] == 5
        for i in range(4):
            assert at_checkpoint["counts"][i] - 10 <= resumed["counts"][i] < later["counts"][i], (resumed, later)
        time.sleep(0.5)
        assert min(counters(sandbox)["counts"]) > min(resumed["counts"])


def fetch(sb, port):
    code = ("import urllib.request,sys; "
            f"print(urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=5).status)")
    return sb.exec(["python3", "-c", code], timeout=30)


def test_http_server_answers_after_restore(client, sandbox):
    sh = sandbox.session("main")
    run(sh, "cd /root && python3 -m http.server 8123 >/root/http.log 2>&1 &")
    wait_until(lambda: fetch(sandbox, 8123).exit_code == 0)
    ck = sandbox.checkpoint()
    run(sh, "kill %1; wait; true")
    assert fetch(sandbox, 8123).exit_code != 0
    for _ in range(2):
        sandbox.rollback(ck)
        r = fetch(sandbox, 8123)
        assert r.exit_code == 0 and r.stdout.strip() == "200", (r.stdout, r.stderr)


SQLITE_TXN = r"""
import sqlite3, sys, time
db = sqlite3.connect("/root/db.sqlite", isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
db.execute("BEGIN IMMEDIATE")
db.execute("INSERT INTO t VALUES (1)")
open("/root/txn-open", "w").write("yes")
while not __import__("os").path.exists("/root/commit-now"):
    time.sleep(0.05)
db.execute("INSERT INTO t VALUES (2)")
db.execute("COMMIT")
open("/root/txn-done", "w").write("yes")
time.sleep(1000)
"""


def test_sqlite_wal_in_the_middle_of_a_transaction(client, sandbox):
    sandbox.files.write("/root/txn.py", SQLITE_TXN.encode())
    sh = sandbox.session("main")
    run(sh, "python3 /root/txn.py & disown")
    wait_until(lambda: sandbox.files.exists("/root/txn-open"))
    ck = sandbox.checkpoint()
    # Let the transaction finish in the abandoned timeline, then go back to the open transaction.
    sandbox.files.write("/root/commit-now", b"1")
    wait_until(lambda: sandbox.files.exists("/root/txn-done"))
    sandbox.rollback(ck)
    assert not sandbox.files.exists("/root/txn-done")
    # The transaction is still open after the restore: another writer is refused.
    probe = ("import sqlite3; db = sqlite3.connect('/root/db.sqlite', timeout=0.2); "
             "db.execute('INSERT INTO t VALUES (9)'); db.commit()")
    locked = sandbox.exec(["python3", "-c", probe], timeout=30)
    assert locked.exit_code != 0 and "locked" in locked.stderr, locked.stderr
    sandbox.files.write("/root/commit-now", b"1")
    wait_until(lambda: sandbox.files.exists("/root/txn-done"))
    rows = sandbox.exec(["python3", "-c", "import sqlite3; print(sqlite3.connect('/root/db.sqlite')"
                                          ".execute('SELECT v FROM t ORDER BY v').fetchall())"]).stdout
    assert rows.strip() == "[(1,), (2,)]"


MMAP_SHARED = r"""
import mmap, os, time
fd = os.open("/root/shared.bin", os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 4096)
m = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
m[:5] = b"first"
open("/root/mapped", "w").write("1")
while True:
    if os.path.exists("/root/dump-now"):
        open("/root/seen.txt", "wb").write(bytes(m[:6]))
        os.unlink("/root/dump-now")
    if os.path.exists("/root/write-now"):
        m[:6] = b"second"
        os.unlink("/root/write-now")
    time.sleep(0.02)
"""


def test_shared_file_mapping(client, sandbox):
    sandbox.files.write("/root/mm.py", MMAP_SHARED.encode())
    sh = sandbox.session("main")
    run(sh, "python3 /root/mm.py & disown")
    wait_until(lambda: sandbox.files.exists("/root/mapped"))
    ck = sandbox.checkpoint()
    sandbox.files.write("/root/write-now", b"1")
    wait_until(lambda: sandbox.files.read("/root/shared.bin")[:6] == b"second")
    sandbox.rollback(ck)
    assert sandbox.files.read("/root/shared.bin")[:5] == b"first"
    sandbox.files.write("/root/dump-now", b"1")
    wait_until(lambda: sandbox.files.exists("/root/seen.txt"))
    assert sandbox.files.read("/root/seen.txt")[:5] == b"first"


def test_pipeline_with_full_pipes_finishes_after_restore(client, sandbox):
    sh = sandbox.session("main")
    # `yes` fills the pipe; `head` reads slowly through `pv`-like throttling (a shell loop).
    run(sh, "(yes | head -c 200000000 | (sleep 1; cat > /root/out.bin; echo done > /root/out.done)) &")
    ck = sandbox.checkpoint()
    wait_until(lambda: sandbox.files.exists("/root/out.done"), timeout=60)
    sandbox.rollback(ck)
    assert not sandbox.files.exists("/root/out.done")
    wait_until(lambda: sandbox.files.exists("/root/out.done"), timeout=60)
    assert sandbox.files.stat("/root/out.bin").size == 200_000_000


def test_zombie_child_and_a_process_tree_with_pipes(client, sandbox):
    sh = sandbox.session("main")
    tree = r"""
import os, subprocess, sys, time
zombie = os.fork()
if zombie == 0:
    os._exit(7)
time.sleep(0.2)                                    # the child is a zombie now: we never wait for it
reader = subprocess.Popen(["python3", "-c", "import sys\nfor line in sys.stdin: open('/root/last', 'w').write(line)"],
                          stdin=subprocess.PIPE, text=True)
n = 0
while True:
    reader.stdin.write(f"{n}\n"); reader.stdin.flush()
    open("/root/tree.json", "w").write(f'{{"n": {n}, "zombie": {zombie}, "reader": {reader.pid}}}')
    n += 1
    time.sleep(0.05)
"""
    sandbox.files.write("/root/tree.py", tree.encode())
    run(sh, "bash -c 'python3 /root/tree.py' & disown")
    first = wait_until(lambda: (t := tree_state(sandbox)) and t["n"] > 5 and t)
    ck = sandbox.checkpoint()
    time.sleep(0.5)
    sandbox.rollback(ck)
    ps = sandbox.exec(["ps", "-eo", "pid,ppid,stat,comm"]).stdout
    assert f"{first['zombie']} " in ps and " Z" in ps, ps                 # the zombie is still there
    before = tree_state(sandbox)["n"]
    wait_until(lambda: tree_state(sandbox)["n"] > before + 3)            # the tree keeps working through its pipe
    assert int(sandbox.files.read_text("/root/last").strip()) >= before


def tree_state(sb):
    try:
        return json.loads(sb.files.read_text("/root/tree.json"))
    except Exception:
        return None


def test_older_checkpoint_after_newer_and_forks(client, sandbox):
    sh = sandbox.session("main")
    run(sh, "N=1")
    ck1 = sandbox.checkpoint()
    run(sh, "N=2")
    ck2 = sandbox.checkpoint()
    run(sh, "N=3")
    sandbox.rollback(ck2)
    assert run(sh, "echo $N").strip() == "2"
    sandbox.rollback(ck1)
    assert run(sh, "echo $N").strip() == "1"
    sandbox.rollback(ck2)
    assert run(sh, "echo $N").strip() == "2"
    forks = client.fork(ck1, count=2)
    try:
        for i, fork in enumerate(forks):
            fsh = fork.session("main", create=False)
            assert run(fsh, "echo $N").strip() == "1"
            run(fsh, f"N=fork{i}")
        assert [run(f.session("main", create=False), "echo $N").strip() for f in forks] == ["fork0", "fork1"]
        assert run(sh, "echo $N").strip() == "2"
    finally:
        for fork in forks:
            fork.delete()


@pytest.mark.parametrize("output", ["redirected", "exec_pipe"])
def test_background_program_started_by_exec_survives_rollback(client, sandbox, output):
    # `exec` runs each command as a session leader; its background children outlive it in a session and
    # process group whose leader is gone. With "exec_pipe" the program keeps writing to the exec's output
    # pipe, whose reader (the supervisor) is not part of the checkpoint: restored, its writes must still
    # succeed (sh dies of SIGPIPE otherwise).
    loop = "i=0; while :; do i=$((i+1)); echo $i; echo $i > /root/n; sleep 0.05; done"
    command = f"nohup sh -c '{loop}' >/dev/null 2>&1 &" if output == "redirected" else f"sh -c '{loop}' &"
    sandbox.exec(["sh", "-c", command]).check()
    wait_until(lambda: sandbox.files.exists("/root/n"))
    ck = sandbox.checkpoint()

    def counter():
        # The loop's `echo $i > /root/n` truncates before it writes: a read in between finds it empty.
        return int(wait_until(lambda: sandbox.files.read_text("/root/n").strip()))

    n_at = counter()

    # The loop counts ~20 a second: 40 counts leave a slow machine 2 s between the rollback and the read.
    for _ in range(2):
        wait_until(lambda: counter() > n_at + 40)
        sandbox.rollback(ck)
        # Back at the checkpoint's count, and counting on.
        assert counter() < n_at + 40
        wait_until(lambda: counter() > n_at + 45)


def test_unsupported_resources_fail_the_checkpoint_with_the_reason(client, sandbox):
    sh = sandbox.session("main")
    first = sandbox.checkpoint()
    run(sh, "python3 -c \"import socket,time\ns=socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\n"
            "open('/root/opened', 'w'); time.sleep(1000)\" &")
    wait_until(lambda: sandbox.files.exists("/root/opened"), what="the netlink socket")
    # The sandbox's state, which its user can change: a client error (422), not a server error.
    with pytest.raises(deltabox.CheckpointUnsupported) as info:
        sandbox.checkpoint()
    err = info.value
    assert (err.status, err.code) == (422, "checkpoint_unsupported") and not isinstance(err, deltabox.ServerError)
    assert "address family 16" in err.message and "fd" in err.message, err.message
    # Nothing was recorded: the failed checkpoint is not listed and the sandbox's head did not move.
    assert [c.id for c in sandbox.checkpoints()] == [first.id]
    assert sandbox.refresh().head == first.id
    # The sandbox keeps running, its program too, and it can still take a filesystem checkpoint.
    assert "running" in run(sh, "kill -0 %1 && echo running")
    files_only = sandbox.checkpoint(fs_only=True)
    assert (files_only.kind, files_only.parent) == ("filesystem", first.id)
    assert [c.id for c in sandbox.checkpoints()] == [first.id, files_only.id]


PY_HOLDER = r"""
import hashlib, os, signal, time
blob = bytearray(os.urandom(128 << 20))
def report(*_):
    with open("/root/digest.tmp", "w") as f:
        f.write(hashlib.sha256(blob).hexdigest())
    os.replace("/root/digest.tmp", "/root/digest")
signal.signal(signal.SIGUSR1, report)
report()
while True:
    time.sleep(1)
"""


def disk_usage_kib(path):
    return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def test_back_to_back_checkpoints_write_incremental_images(client, daemon, sandbox):
    """Checkpoints taken while the previous image is still being written stay incremental (each image is
    published after its parent), and a fork restored from the newest image has the whole memory."""
    sandbox.files.write("/root/holder.py", PY_HOLDER.encode())
    run(sandbox.session("main"), "python3 /root/holder.py & disown")
    digest = wait_until(lambda: sandbox.files.read_text("/root/digest") if sandbox.files.exists("/root/digest")
                        else None)
    images = daemon.data_dir / "deltacr"
    before = disk_usage_kib(images)
    checkpoints = [sandbox.checkpoint() for _ in range(3)]
    wait_until(lambda: all(client.checkpoint(c.id).durable for c in checkpoints), timeout=120)
    grown = disk_usage_kib(images) - before
    # One image with the 128 MiB, two with what changed since (the interpreter's own churn).
    assert 128 * 1024 <= grown < (128 + 2 * 16) * 1024, f"{grown} KiB of images for 3 checkpoints"
    sandbox.files.remove("/root/digest")
    (fork,) = checkpoints[-1].fork()
    try:
        signal_holder = ("n=0; for p in /proc/[0-9]*; do if grep -qs 'holder[.]py' $p/cmdline; then "
                         "kill -USR1 ${p#/proc/} && n=$((n+1)); fi; done; [ $n = 1 ]")
        run(fork.session("probe"), signal_holder)
        assert wait_until(lambda: fork.files.read_text("/root/digest") if fork.files.exists("/root/digest")
                          else None) == digest
    finally:
        fork.delete()
