#!/usr/bin/env python3
"""Full checkpoint (files and processes) and rollback latency through the Python SDK, against a running daemon.

    python3 bench/process_checkpoint_latency.py [--socket PATH] [--image debian] [--iterations 20]
                                                [--rss 10,200,2000]

For each resident size, a fresh sandbox runs one python3 process holding that much memory (every page written).
Between timed calls it rewrites 0, 1 or 100 MB of it (at most all of it) (not timed; the process waits on a FIFO for each order), then:
  * checkpoint (full) — incremental: only pages changed since the previous checkpoint go to its image, which is
    written in the background after the call; the bench waits for it (untimed) before the next call;
  * rollback to the latest full checkpoint after changing 1 MB (the processes are killed and restored from the
    checkpoint's in-memory templates).
Each row gives the API round trip (what the SDK caller waits for) and the latency the daemon reports (`pause_ms`:
freeze to thaw for a checkpoint; kill + filesystem switch + restore for a rollback). Baseline in the same run and
sandbox: a filesystem-only checkpoint (`fs_only`) and its rollback. Prints p50/p99 in ms and each row's daemon p50
as a multiple of its baseline's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import deltabox  # noqa: E402
from sandbox_latency import percentile  # noqa: E402  (same directory)

CHANGED_MB = (0, 1, 100)
# Holds argv[1] MB (all pages written); for each line N read from /root/cmd, rewrites N MB and answers on /root/ack.
HOLDER = r"""
import os, sys
mb = int(sys.argv[1])
buf = bytearray(mb << 20)
for i in range(0, len(buf), 4096):
    buf[i] = 1
os.mkfifo("/root/cmd"); os.mkfifo("/root/ack")
open("/root/ready", "w").close()
stamp = 1
while True:
    with open("/root/cmd") as f:
        n = int(f.read().strip() or 0)
    stamp = stamp % 250 + 1
    for i in range(0, min(n, mb) << 20, 4096):
        buf[i] = stamp
    with open("/root/ack", "w") as f:
        f.write("ok\n")
"""


def timed(call):
    start = time.perf_counter()
    result = call()
    return (time.perf_counter() - start) * 1000, result


def settle(client: deltabox.Client, ck: deltabox.Checkpoint) -> None:
    """Waits (untimed) until the checkpoint's image is written: as between an agent's steps, the next call
    does not compete with the background writer for the CPUs."""
    deadline = time.monotonic() + 300
    while not client.checkpoint(ck.id).durable and time.monotonic() < deadline:
        time.sleep(0.01)


def dirty(sb: deltabox.Sandbox, mb: int) -> None:
    sb.exec(["sh", "-c", f"echo {mb} > /root/cmd && cat /root/ack"], timeout=120).check()


def bench_rss(client: deltabox.Client, image: str, rss: int, iterations: int) -> Dict[str, Tuple[List, List]]:
    rows: Dict[str, Tuple[List[float], List[float]]] = {}
    memory = f"{max(1, (rss * 2) // 1024 + 1)}G"
    with client.create(image, memory=memory) as sb:
        sb.exec(["sh", "-c", f"nohup python3 -c '{HOLDER}' {rss} >/dev/null 2>&1 &"]).check()
        deadline = time.monotonic() + 300
        while not sb.files.exists("/root/ready"):
            if time.monotonic() > deadline:
                raise RuntimeError("the memory holder did not start")
            time.sleep(0.1)
        sb.checkpoint()  # the first full checkpoint writes every page; the timed ones are incremental
        for mb in (mb for mb in CHANGED_MB if mb <= rss):
            rt, daemon = rows.setdefault(f"{rss} MB: checkpoint, {mb} MB changed", ([], []))
            for _ in range(iterations):
                dirty(sb, mb)
                ms, ck = timed(sb.checkpoint)
                rt.append(ms)
                daemon.append(ck.pause_ms)
                settle(client, ck)
        target = sb.checkpoint()
        settle(client, target)
        rt, daemon = rows.setdefault(f"{rss} MB: rollback, 1 MB changed", ([], []))
        for _ in range(iterations):
            dirty(sb, 1)
            ms, result = timed(lambda: sb.rollback(target))
            rt.append(ms)
            daemon.append(result.pause_ms)
        fs_target = sb.checkpoint(fs_only=True)
        rt, daemon = rows.setdefault(f"{rss} MB: fs-only checkpoint (baseline)", ([], []))
        for _ in range(iterations):
            ms, ck = timed(lambda: sb.checkpoint(fs_only=True))
            rt.append(ms)
            daemon.append(ck.pause_ms)
        rt, daemon = rows.setdefault(f"{rss} MB: fs-only rollback (baseline)", ([], []))
        for _ in range(iterations):
            ms, result = timed(lambda: sb.rollback(fs_target))
            rt.append(ms)
            daemon.append(result.pause_ms)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="daemon socket (default: $DELTABOX_SOCKET or the default socket)")
    parser.add_argument("--image", default="debian", help="image with python3 (default: debian)")
    parser.add_argument("--iterations", type=int, default=20, help="calls per row (default 20)")
    parser.add_argument("--rss", default="10,200,2000", help="resident sizes in MB (default 10,200,2000)")
    args = parser.parse_args()
    client = deltabox.Client(socket=args.socket)
    print(f"DeltaBox full checkpoints via the Python SDK (ms); image {args.image}; {args.iterations} calls per row; "
          f"{os.cpu_count()} CPUs\nrt = API round trip; daemon = reported pause_ms")
    header = f"{'measurement':44} {'rt p50':>8} {'rt p99':>8} {'daemon p50':>10} {'daemon p99':>10}  daemon p50 vs baseline"
    print(header)
    print("-" * len(header))
    for rss in (int(s) for s in args.rss.split(",") if s):
        rows = bench_rss(client, args.image, rss, args.iterations)
        base_ck = percentile(rows[f"{rss} MB: fs-only checkpoint (baseline)"][1], 50)
        base_rb = percentile(rows[f"{rss} MB: fs-only rollback (baseline)"][1], 50)
        for name, (rt, daemon) in rows.items():
            base = base_rb if "rollback" in name else base_ck
            ratio = "" if "baseline" in name else f"{percentile(daemon, 50) / base:8.1f}x"
            print(f"{name:44} {percentile(rt, 50):8.2f} {percentile(rt, 99):8.2f} {percentile(daemon, 50):10.2f} "
                  f"{percentile(daemon, 99):10.2f}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
