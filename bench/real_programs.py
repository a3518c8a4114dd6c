#!/usr/bin/env python3
"""Checkpoint and rollback latency of real programs with sockets and IPC, next to a plain program of the same memory.

    python3 bench/real_programs.py [--socket PATH] [--image debian] [--rounds 20] [--cases jupyter,postgres]

Each case runs in its own sandbox and, next to it, a baseline sandbox: a bash session and a python process holding
as much memory as the case's sandbox holds (its memory cgroup's usage, read on the host; run as root). Cases:
- jupyter: Debian's ipykernel and a jupyter_client connected to it (ZeroMQ over loopback TCP: 5 listeners, their
  connections, threads, eventfds, epoll);
- postgres: PostgreSQL 15 (7 processes, anonymous and SysV shared memory, POSIX semaphores) with a client in an open
  transaction over TCP and one over its unix socket.
For each sandbox: `--rounds` full checkpoints (each after 50 ms of running) and as many rollbacks to the first one,
as the SDK sees them (call latency) and as the daemon reports them (pause). Prints p50 and p99 per case and the
ratio to the baseline measured in the same run.
"""

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import deltabox  # noqa: E402
from sandbox_latency import percentile  # noqa: E402  (same directory)

# Starts the case's programs from the sandbox's session; waits until they are up.
CASES = {
    "jupyter": (
        "cd /root && python3 -c \"from jupyter_client.connect import write_connection_file as w; "
        "w('/root/kernel.json', ip='127.0.0.1')\" && "
        "(python3 -m ipykernel_launcher -f /root/kernel.json > kernel.log 2>&1 &) && "
        "(python3 -c \"from jupyter_client import BlockingKernelClient as K; import time; "
        "k = K(connection_file='/root/kernel.json'); k.load_connection_file(); k.start_channels(); "
        "k.wait_for_ready(timeout=120); k.execute_interactive('x = 42', timeout=60); open('/root/up', 'w'); "
        "time.sleep(1e9)\" > client.log 2>&1 &)"
    ),
    "postgres": (
        "pg_ctlcluster 15 main start && runuser -u postgres -- psql -qc \"ALTER USER postgres PASSWORD 'secret'\" && "
        "(runuser -u postgres -- python3 -c \"import psycopg2, time; "
        "t = psycopg2.connect(host='127.0.0.1', dbname='postgres', user='postgres', password='secret'); "
        "u = psycopg2.connect(host='/var/run/postgresql', dbname='postgres', user='postgres'); "
        "t.cursor().execute('CREATE TABLE t (k int)'); t.cursor().execute('INSERT INTO t VALUES (1)'); "
        "u.cursor().execute('SELECT 1'); open('/tmp/up', 'w'); time.sleep(1e9)\" > /tmp/client.log 2>&1 &)"
    ),
}
UP = {"jupyter": "/root/up", "postgres": "/tmp/up"}
HOLDER = """
import sys, time
buf = bytearray(int(sys.argv[1]))
for k in range(0, len(buf), 4096):
    buf[k] = 1
open("/root/up", "w").close()
time.sleep(1e9)
"""


def wait_file(sb, path, what):
    deadline = time.monotonic() + 180
    while not sb.files.exists(path):
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.1)


def memory_of(sb) -> int:
    """Bytes the sandbox's memory cgroup holds (cgroup2's memory.current or v1's usage), read on the host."""
    paths = [p for name in ("memory.current", "memory.usage_in_bytes")
             for p in glob.glob(f"/sys/fs/cgroup/**/{sb.id}/{name}", recursive=True)]
    assert paths, f"no memory cgroup found for sandbox {sb.id} (run on the daemon's host, as root)"
    return int(open(paths[0]).read())


def measure(sb, rounds):
    """Checkpoints and rollbacks of `sb`: (checkpoint call ms, checkpoint pause ms, rollback call ms, pause ms)."""
    first = sb.checkpoint()
    ck_call, ck_pause, rb_call, rb_pause = [], [], [], []
    for _ in range(rounds):
        time.sleep(0.05)
        start = time.perf_counter()
        ck = sb.checkpoint()
        ck_call.append((time.perf_counter() - start) * 1000)
        ck_pause.append(ck.pause_ms)
    from_image = 0
    for _ in range(rounds):
        time.sleep(0.05)
        start = time.perf_counter()
        rb = sb.rollback(first)
        rb_call.append((time.perf_counter() - start) * 1000)
        rb_pause.append(rb.pause_ms)
        from_image += rb.from_image
    return (ck_call, ck_pause, rb_call, rb_pause), from_image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="daemon socket (default: $DELTABOX_SOCKET or the default socket)")
    parser.add_argument("--image", default="debian", help="image with ipykernel and postgresql (default: debian)")
    parser.add_argument("--rounds", type=int, default=20, help="checkpoints and rollbacks per sandbox (default 20)")
    parser.add_argument("--cases", default="jupyter,postgres", help="comma-separated cases (default: both)")
    args = parser.parse_args()
    client = deltabox.Client(socket=args.socket)
    rows = []
    for case in args.cases.split(","):
        with client.create(args.image, memory="2G") as sb:
            r = sb.session("main").run(CASES[case], timeout=180)
            assert r.exit_code == 0, (r.stdout, r.stderr)
            wait_file(sb, UP[case], case)
            time.sleep(1)
            mib = memory_of(sb) / (1 << 20)
            measured, from_image = measure(sb, args.rounds)
        with client.create(args.image, memory="2G") as base:
            base.files.write("/root/holder.py", HOLDER.encode())
            base.session("main").run(f"(python3 /root/holder.py {int(mib * (1 << 20))} > /dev/null 2>&1 &)").check()
            wait_file(base, "/root/up", "the baseline")
            baseline, base_from_image = measure(base, args.rounds)
        rows.append((case, mib, measured, baseline, from_image, base_from_image))

    print(f"{'case':<10} {'MiB':>5}  {'what':<20} {'p50 ms':>8} {'p99 ms':>8}  {'baseline p50':>12} {'p99':>8}  {'ratio p50':>9}")
    names = ["checkpoint (call)", "checkpoint (pause)", "rollback (call)", "rollback (pause)"]
    for case, mib, measured, baseline, from_image, base_from_image in rows:
        print(f"{case}: {from_image} of {args.rounds} rollbacks from an image (baseline: {base_from_image})")
    for case, mib, measured, baseline, _, _ in rows:
        for name, m, b in zip(names, measured, baseline):
            p50, p99, b50, b99 = percentile(m, 50), percentile(m, 99), percentile(b, 50), percentile(b, 99)
            print(f"{case:<10} {mib:>5.0f}  {name:<20} {p50:>8.1f} {p99:>8.1f}  {b50:>12.1f} {b99:>8.1f}  {p50 / b50:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
