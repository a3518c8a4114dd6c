"""Real programs whose processes share memory or talk over TCP (issue 17): a multiprocessing pool mid-map; POSIX
shared memory, semaphores and a multiprocessing Value between two processes; a client streaming to a server over
a TCP connection on loopback with data queued both ways. Each: checkpoint, keep running and change state, roll
back (20 times), fork 2, and check every copy continues from the checkpoint's state."""

import json

import pytest
from support import new_sandbox, wait_until

# A pool of 4 workers mapping over a long input, in order: the parent reports how many results it has and their
# sum, which must always be the sum of the first `done` squares.
POOL = r"""
import json, multiprocessing as mp, os, time
def work(i):
    time.sleep(0.005)
    return i * i
if __name__ == "__main__":
    with mp.Pool(4) as pool:
        done = total = 0
        for r in pool.imap(work, range(10 ** 7)):
            done += 1
            total += r
            if done % 20 == 0:
                with open("/root/pool.tmp", "w") as f:
                    json.dump({"done": done, "total": total, "pid": os.getpid()}, f)
                os.replace("/root/pool.tmp", "/root/pool.json")
"""

# Two processes hand a counter back and forth: the parent writes i into a POSIX shm object (SharedMemory, kept
# open) and wakes the child with a semaphore; the child checks it, adds it to a sum in a multiprocessing Value
# (shared memory in an unlinked /dev/shm file, under a lock) and answers through a second semaphore.
PING_PONG = r"""
import json, multiprocessing as mp, os, time
from multiprocessing import shared_memory
shm = shared_memory.SharedMemory(name="pingpong", create=True, size=4096)
total = mp.Value("q", 0)
ask, answered = mp.Semaphore(0), mp.Semaphore(0)
child = os.fork()
if child == 0:
    while True:
        ask.acquire()
        with total.get_lock():
            total.value += int.from_bytes(shm.buf[:8], "little")
        answered.release()
i = 0
while True:
    i += 1
    shm.buf[:8] = i.to_bytes(8, "little")
    ask.release()
    answered.acquire()
    with open("/root/pp.tmp", "w") as f:
        json.dump({"i": i, "total": total.value, "child": child}, f)
    os.replace("/root/pp.tmp", "/root/pp.json")
    time.sleep(0.005)
"""

# A client streams numbered 1000-byte lines to a server over TCP on 127.0.0.1 while reading its answers; the server
# checks that each line follows the previous one and pauses every 50 lines, so both directions have queued data.
TCP_STREAM = r"""
import json, os, socket, threading, time
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen()
port = srv.getsockname()[1]
if os.fork() == 0:
    conn, _ = srv.accept()
    srv.close()
    f = conn.makefile("rb")
    expect = 1
    while True:
        line = f.readline()
        n = int(line.split()[0])
        conn.sendall(b"%d %d\n" % (n, n == expect and len(line) == 1000))
        expect = n + 1
        if n % 50 == 0:
            time.sleep(0.1)
srv.close()
c = socket.create_connection(("127.0.0.1", port))
def send():
    n = 0
    while True:
        n += 1
        c.sendall(b"%d " % n + b"x" * (999 - len(b"%d " % n)) + b"\n")
        time.sleep(0.001)
threading.Thread(target=send, daemon=True).start()
good = last = 0
for line in c.makefile("rb"):
    n, ok = map(int, line.split())
    good += ok and n == last + 1
    last = n
    if n % 10 == 0:
        with open("/root/tcp.tmp", "w") as f:
            json.dump({"n": n, "good": good}, f)
        os.replace("/root/tcp.tmp", "/root/tcp.json")
"""


def state(sb, path):
    try:
        return json.loads(sb.files.read_text(path))
    except Exception:
        return None


def pool_ok(s):
    return s["total"] == sum(i * i for i in range(s["done"]))


def ping_pong_ok(s):
    return s["total"] == s["i"] * (s["i"] + 1) // 2


def tcp_ok(s):
    return s["good"] == s["n"]


CASES = [
    # The program's state file, its counter and how much the counter moves per write of the file.
    pytest.param(POOL, "/root/pool.json", "done", 20, pool_ok, id="multiprocessing-pool"),
    pytest.param(PING_PONG, "/root/pp.json", "i", 1, ping_pong_ok, id="posix-shm-and-semaphores"),
    pytest.param(TCP_STREAM, "/root/tcp.json", "n", 10, tcp_ok, id="tcp-stream-on-loopback"),
]


def continues(sb, path, key, ok, after):
    """Waits until the program in `sb` has moved past `after` (a state it reported), checking each state it
    reports; returns the first one that moved, once the program went on past it."""
    def moved():
        s = state(sb, path)
        if s is None or s[key] == after[key]:
            return None
        assert ok(s), s
        return s
    resumed = wait_until(moved, timeout=30, what="the program to continue")
    wait_until(lambda: (s := state(sb, path)) and ok(s) and s[key] > resumed[key] + 40, timeout=30,
               what="the program to go on")
    return resumed


@pytest.mark.parametrize("program, path, key, step, ok", CASES)
def test_program_continues_after_rollback_and_in_forks(client, program, path, key, step, ok):
    with new_sandbox(client, "debian", memory="1G") as sb:
        sb.files.write("/root/program.py", program.encode())
        started = sb.session("main").run("cd /root && python3 program.py > /root/program.log 2>&1 & disown")
        assert started.exit_code == 0, started.stderr
        wait_until(lambda: (s := state(sb, path)) and s[key] > 40 * step, timeout=30, what="the program to start")
        ck = sb.checkpoint()
        # Read once the program runs again: the checkpoint's state or a few writes later.
        at_checkpoint = dict(state(sb, path), step=step)
        assert ok(at_checkpoint), at_checkpoint
        later = wait_until(lambda: (s := state(sb, path)) and s[key] > at_checkpoint[key] + 50 * step and s, timeout=30)
        assert ok(later), later
        for attempt in range(20):
            sb.rollback(ck)
            # The files are the checkpoint's, and the program continues from its memory at the checkpoint: near
            # the checkpoint's counter, far below where the abandoned run was, its shared state consistent.
            now = state(sb, path)
            assert ok(now) and now[key] <= at_checkpoint[key] + 10 * step, (attempt, now, at_checkpoint)
            resumed = continues(sb, path, key, ok, now)
            assert resumed[key] < later[key], (attempt, resumed, later)
        children = ck.fork(2)
        try:
            for child in children:
                # A fork's processes run from the start: it may have moved on already.
                resumed = continues(child, path, key, ok, dict(at_checkpoint, **{key: -1}))
                assert resumed[key] < later[key] + 100 * step, resumed
                continues(child, path, key, ok, resumed)
        finally:
            for child in children:
                child.delete()
        assert "Error" not in sb.files.read_text("/root/program.log")


# Reads from a server outside the sandbox and writes how the read ended.
OUTSIDE_CLIENT = r"""
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
open("/root/connected", "w").close()
try:
    outcome = "read %r" % c.recv(100)
except OSError as e:
    outcome = "error " + type(e).__name__
with open("/root/outcome", "w") as f:
    f.write(outcome)
"""


def test_a_connection_to_outside_is_listed_and_comes_back_reset(client):
    """With the host's network, a process's connection to a server outside the sandbox does not refuse the
    checkpoint: the checkpoint lists it, and after a rollback and in a fork the process finds it reset."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with new_sandbox(client, "debian", network="host") as sb:
            sb.files.write("/root/client.py", OUTSIDE_CLIENT.encode())
            sb.session("main").run(f"(python3 /root/client.py {port} > /root/client.log 2>&1 &)").check()
            conn, _ = server.accept()
            wait_until(lambda: sb.files.exists("/root/connected"), what="the connection")
            ck = sb.checkpoint()
            assert len(ck.reset_connections) == 1, ck.reset_connections
            assert f"-> 127.0.0.1:{port}" in ck.reset_connections[0] and "python3" in ck.reset_connections[0]
            assert client.checkpoint(ck.id).reset_connections == ck.reset_connections
            # The live connection is untouched: the server's answer reaches the running program.
            conn.sendall(b"live")
            assert wait_until(lambda: sb.files.exists("/root/outcome") and sb.files.read_text("/root/outcome")) \
                == "read b'live'"
            for _ in range(3):
                sb.rollback(ck)
                assert wait_until(lambda: sb.files.exists("/root/outcome") and sb.files.read_text("/root/outcome")) \
                    == "error ConnectionResetError"
            (child,) = ck.fork()
            with child:
                assert wait_until(lambda: child.files.exists("/root/outcome") and child.files.read_text("/root/outcome")) \
                    == "error ConnectionResetError"
            conn.close()
