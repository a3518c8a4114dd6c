#!/usr/bin/env python3
"""Cost of the signal guard (docs/security.md): signals sent inside a sandbox by pid go through the shim.

    python3 bench/signal_guard.py [--socket PATH] [--image debian] [--calls 2000] [--rounds 15]

In one sandbox with a full checkpoint taken (so DeltaCR's templates exist), a python3 process times batches of
`--calls` system calls and reports microseconds per call, p50/p99 over `--rounds` batches:
  * getppid (baseline: a system call the guard does not see);
  * kill(pid, 0) to a pid below the reserved range (the fast path: the shim answers at once);
  * kill(pid, 0) to a pid in the reserved range (the shim reads the sandbox's tasks in /proc);
  * kill(-1, 0) (carried out by the shim for every process of the sandbox).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import deltabox  # noqa: E402
from sandbox_latency import percentile  # noqa: E402  (same directory)

PROBE = r"""
import os, sys, time
calls, rounds, reserved = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def timed(fn):
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t) / calls * 1e6)
    return out
def kill(pid):
    def f():
        try:
            os.kill(pid, 0)
        except OSError:
            pass
    return f
rows = {"getppid (baseline)": timed(os.getppid), "kill(pid, 0), pid below the reserved range": timed(kill(2)),
        "kill(pid, 0), pid in the reserved range": timed(kill(reserved)), "kill(-1, 0)": timed(kill(-1))}
for name, samples in rows.items():
    print(name + "\t" + " ".join(f"{s:.3f}" for s in samples))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="daemon socket (default: $DELTABOX_SOCKET or the default socket)")
    parser.add_argument("--image", default="debian", help="image with python3 (default: debian)")
    parser.add_argument("--calls", type=int, default=2000, help="system calls per batch (default 2000)")
    parser.add_argument("--rounds", type=int, default=15, help="batches per row (default 15)")
    args = parser.parse_args()

    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    reserved = pid_max - pid_max // 16  # inside the top eighth, where DeltaCR keeps its tasks
    client = deltabox.Client(socket=args.socket)
    with client.create(args.image) as sb:
        sb.exec(["sh", "-c", "sleep 1000 >/dev/null 2>&1 &"]).check()
        sb.checkpoint()
        out = sb.exec(["python3", "-c", PROBE, str(args.calls), str(args.rounds), str(reserved)], timeout=600).check()
    rows = [(name, [float(v) for v in values.split()]) for name, values in
            (line.split("\t") for line in out.stdout.splitlines())]
    baseline = percentile(rows[0][1], 50)
    print(f"Signal guard: microseconds per call, {args.calls} calls per batch, {args.rounds} batches; "
          f"{os.cpu_count()} CPUs")
    print(f"{'call':48} {'p50':>9} {'p99':>9} {'p50 vs baseline':>16}")
    print("-" * 85)
    for name, samples in rows:
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        print(f"{name:48} {p50:9.2f} {p99:9.2f} {p50 / baseline:15.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
