#!/usr/bin/env python3
"""What the in-memory copies (templates) of a tree of checkpoints hold, against the daemon's template memory budget.

    python3 bench/template_memory.py [--socket PATH] [--image debian] [--mib 264] [--nodes 100] [--step 0.5]

A sandbox runs a python process holding `--mib` MiB of written memory that writes one byte into a random page every
20 ms. A tree search of `--nodes` full checkpoints is built: before each one, the search rolls back to a random node
of the tree half of the time (else it goes on from where it is), then lets the process run `--step` seconds. Once
the templates are measured again (docs/deltacr.md, "Template memory budget"), this prints the tree's template memory
(the daemon's total and each checkpoint's `memory_bytes`: p50, p99, max), the budget, how many checkpoints had their
templates dropped, and the rollbacks: how many came from an image, and their pause (p50 / p99 ms).
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import deltabox  # noqa: E402
from sandbox_latency import percentile  # noqa: E402  (same directory)

WRITER = """
import random, sys, time
size = int(sys.argv[1]) << 20
buf = bytearray(size)
for k in range(0, size, 4096):
    buf[k] = 1
open("/ready", "w").close()
while True:
    buf[random.randrange(0, size, 4096)] += 1
    time.sleep(0.02)
"""
MiB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="daemon socket (default: $DELTABOX_SOCKET or the default socket)")
    parser.add_argument("--image", default="debian", help="image (default: debian)")
    parser.add_argument("--mib", type=int, default=264, help="MiB the process holds (default 264)")
    parser.add_argument("--nodes", type=int, default=100, help="checkpoints in the tree (default 100)")
    parser.add_argument("--step", type=float, default=0.5, help="seconds the process runs between nodes (default 0.5)")
    args = parser.parse_args()
    rng = random.Random(1)

    client = deltabox.Client(socket=args.socket)
    with client.create(args.image) as sb:
        sb.files.write("/writer.py", WRITER.encode())
        sb.exec(["sh", "-c", f"setsid python3 /writer.py {args.mib} > /dev/null 2>&1 < /dev/null &"]).check()
        deadline = time.monotonic() + 120
        while not sb.files.exists("/ready"):
            assert time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.1)
        tree = [sb.checkpoint()]
        pauses, from_image = [], 0
        while len(tree) < args.nodes:
            if rng.random() < 0.5:
                rolled = sb.rollback(rng.choice(tree))
                pauses.append(rolled.pause_ms)
                from_image += rolled.from_image
            time.sleep(args.step)
            tree.append(sb.checkpoint())
        # Every template measured again since the last node (they are every 5 s), and the daemon told (every 1 s).
        time.sleep(8)
        held = [client.checkpoint(ck.id).memory_bytes for ck in tree]
        health = client.health()
    measured = sorted(m for m in held if m is not None)
    print(f"{args.nodes} checkpoints of a {args.mib} MiB process writing a page every 20 ms, {args.step} s apart")
    print(f"template memory: {health['template_memory_bytes'] / MiB:.1f} MiB in all; "
          f"budget {health['template_memory_budget'] / MiB:.0f} MiB")
    print(f"per checkpoint (MiB): p50 {percentile(measured, 50) / MiB:.2f}, p99 {percentile(measured, 99) / MiB:.2f}, "
          f"max {measured[-1] / MiB:.2f}; dropped: {held.count(0)}; not measured: {held.count(None)}")
    pauses.sort()
    print(f"rollbacks: {len(pauses)}, {from_image} from an image; pause p50 {percentile(pauses, 50):.1f} ms, "
          f"p99 {percentile(pauses, 99):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
