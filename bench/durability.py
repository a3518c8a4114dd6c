#!/usr/bin/env python3
"""What making checkpoints durable costs, and that the checkpoint call does not pay it.

    python3 bench/durability.py [--socket PATH] [--image debian] [--reps 10] [--sizes 0,1,16,64]

A checkpoint is answered once the sandbox runs again; the daemon then syncs the data directory's filesystem
(syncfs, shared by concurrent checkpoints) and marks it `durable` (docs/api.md, daemon/engine/durable.rs). For each
change size (MiB of fresh random data written into the sandbox before the checkpoint; 0 = one small file) this
prints, p50 and p99 over `--reps` checkpoints of each kind:
  * call: the checkpoint call as the SDK caller waits for it (ms);
  * duration: the daemon's `duration_ms` for it;
  * durable after: from the call's start until the checkpoint reads `durable` (polled every millisecond).
The change is written with `sync` off: its pages are dirty in the page cache when the checkpoint is taken, as
after an agent's step, so the sync writes them.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import deltabox  # noqa: E402
from sandbox_latency import percentile  # noqa: E402  (same directory)


def durable_after(client: deltabox.Client, checkpoint_id: str, started: float, limit: float = 120.0) -> float:
    while not client.checkpoint(checkpoint_id).durable:
        if time.perf_counter() - started > limit:
            raise RuntimeError(f"checkpoint {checkpoint_id} not durable after {limit} s")
        time.sleep(0.001)
    return (time.perf_counter() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="daemon socket (default: $DELTABOX_SOCKET or the default socket)")
    parser.add_argument("--image", default="debian", help="image (default: debian)")
    parser.add_argument("--reps", type=int, default=10, help="checkpoints per row (default 10)")
    parser.add_argument("--sizes", default="0,1,16,64", help="MiB written before each checkpoint (default 0,1,16,64)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    client = deltabox.Client(socket=args.socket)
    rows = []
    with client.create(args.image) as sb:
        # A long-running process, so full checkpoints capture something besides init.
        sb.exec(["sh", "-c", "sleep 100000 > /dev/null 2>&1 &"]).check()
        for kind in ("filesystem", "full"):
            for mib in sizes:
                call, duration, durable = [], [], []
                for rep in range(args.reps):
                    if mib:
                        sb.exec(["sh", "-c", f"head -c {mib}M /dev/urandom > /change.{rep % 2}"]).check()
                    else:
                        sb.exec(["sh", "-c", f"echo {rep} > /change.small"]).check()
                    started = time.perf_counter()
                    ck = sb.checkpoint(fs_only=kind == "filesystem")
                    call.append((time.perf_counter() - started) * 1000)
                    duration.append(ck.duration_ms)
                    durable.append(durable_after(client, ck.id, started))
                rows.append((kind, mib, call, duration, durable))

    print(f"checkpoint durability, {args.reps} checkpoints per row, image {args.image}, {os.cpu_count()} CPUs")
    print(f"{'kind':<11} {'change':>7} | {'call p50':>9} {'p99':>8} | {'duration p50':>12} {'p99':>8} |"
          f" {'durable after p50':>17} {'p99':>8}")
    for kind, mib, call, duration, durable in rows:
        change = f"{mib} MiB" if mib else "1 file"
        print(f"{kind:<11} {change:>7} | {percentile(call, 50):9.2f} {percentile(call, 99):8.2f} |"
              f" {percentile(duration, 50):12.2f} {percentile(duration, 99):8.2f} |"
              f" {percentile(durable, 50):17.2f} {percentile(durable, 99):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
