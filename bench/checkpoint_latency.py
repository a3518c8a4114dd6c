#!/usr/bin/env python3
"""Filesystem checkpoint, rollback and fork latency through the Python SDK, against a running daemon.

    python3 bench/checkpoint_latency.py [--socket PATH] [--image debian] [--iterations 50] [--forks 20]
                                        [--sizes 10000,100000]

In one sandbox of the image, at each filesystem size — the image alone, then after adding files (10k, then up to
100k in total, each time in a frozen layer) — N times each:
  * checkpoint (fs_only) after changing 1 file / 1,000 files since the previous checkpoint;
  * rollback to a checkpoint after changing 1 file / 1,000 files since it.
Changing the files is not timed. Each row gives the API round trip (what the SDK caller waits for) and the latency
the daemon reports (`pause_ms`: freeze to thaw for a checkpoint; kill + filesystem switch for a rollback; `fs_ms`
is the filesystem part of a rollback). Then, at each size, fork of 1 and of 8 sandboxes from a checkpoint (until all
run), each removed untimed afterwards.

Baselines in the same run: the API floor (`GET /v1/health` round trip) for checkpoint and rollback rows; creating a
sandbox from the image (1, and 8 concurrent creates) for the fork rows. Prints p50/p99 in ms and each row's p50 as
a multiple of its baseline's p50.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import deltabox  # noqa: E402
from sandbox_latency import percentile  # noqa: E402  (same directory)

CHANGED = (1, 1000)
# Rewrites files /work/churn/f0 .. f{n-1} with new content (argv: n, round).
CHURN = r"""
import os, sys
n, round_ = int(sys.argv[1]), sys.argv[2]
os.makedirs("/work/churn", exist_ok=True)
for i in range(n):
    with open(f"/work/churn/f{i}", "w") as f:
        f.write(f"{round_} {i}\n")
"""
# Adds files /work/bulk/<dir>/<file> until there are argv[1] of them (100 per directory).
BULK = r"""
import os, sys
total = int(sys.argv[1])
have = sum(len(files) for _, _, files in os.walk("/work/bulk"))
for i in range(have, total):
    d = f"/work/bulk/d{i // 100:05}"
    if i % 100 == 0:
        os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i % 100:02}", "w") as f:
        f.write(f"file {i}\n")
"""


@dataclass
class Row:
    name: str
    #: Round trips as the SDK caller sees them (ms).
    round_trip: List[float] = field(default_factory=list)
    #: The daemon's pause_ms.
    daemon: List[float] = field(default_factory=list)
    #: The filesystem part (fs_ms) of a rollback.
    fs: List[float] = field(default_factory=list)
    baseline: Optional[str] = None


def timed(fn: Callable[[], object]) -> Tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1000, result


def churn(sb: deltabox.Sandbox, n: int, round_: int) -> None:
    sb.exec(["python3", "-", str(n), str(round_)], stdin=CHURN, timeout=600).check()


def file_count(sb: deltabox.Sandbox) -> int:
    out = sb.exec(["sh", "-c", "find / -xdev | wc -l"], timeout=600).check().stdout
    return int(out)


def bench_size(sb: deltabox.Sandbox, label: str, iterations: int, rows: List[Row]) -> None:
    # Files the 1,000-file changes rewrite exist before the first timed checkpoint.
    churn(sb, max(CHANGED), 0)
    sb.checkpoint(fs_only=True)
    for n in CHANGED:
        row = Row(f"{label}: checkpoint, {n} changed", baseline="api: GET /v1/health")
        for i in range(iterations):
            churn(sb, n, i + 1)
            ms, ck = timed(lambda: sb.checkpoint(fs_only=True))
            row.round_trip.append(ms)
            row.daemon.append(ck.pause_ms)  # type: ignore[attr-defined]
        rows.append(row)
    target = sb.checkpoint(fs_only=True)
    for n in CHANGED:
        row = Row(f"{label}: rollback, {n} changed", baseline="api: GET /v1/health")
        for i in range(iterations):
            churn(sb, n, iterations + i + 1)
            ms, result = timed(lambda: sb.rollback(target))
            row.round_trip.append(ms)
            row.daemon.append(result.pause_ms)  # type: ignore[attr-defined]
            row.fs.append(result.fs_ms)  # type: ignore[attr-defined]
        rows.append(row)


def bench_creates(client: deltabox.Client, image: str, iterations: int, rows: List[Row]) -> None:
    """The baselines of the fork rows: sandboxes created from the image, 1 and 8 at once (concurrent calls)."""
    for count in (1, 8):
        row = Row(f"create {count} from the image" + (" (concurrent)" if count > 1 else ""))
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            for _ in range(iterations):
                ms, made = timed(lambda: list(pool.map(lambda _: client.create(image), range(count))))
                row.round_trip.append(ms)
                for sb in made:  # type: ignore[attr-defined]
                    sb.delete()
        rows.append(row)


def bench_fork(label: str, ck: deltabox.Checkpoint, iterations: int, rows: List[Row]) -> None:
    for count in (1, 8):
        row = Row(f"{label}: fork {count}", baseline=f"create {count} from the image" + (" (concurrent)" if count > 1
                                                                                         else ""))
        for _ in range(iterations):
            ms, made = timed(lambda: ck.fork(count))
            row.round_trip.append(ms)
            for sb in made:  # type: ignore[attr-defined]
                sb.delete()
        rows.append(row)


def print_table(rows: List[Row], title: str) -> None:
    by_name = {r.name: r for r in rows}
    print(title)
    header = (f"{'measurement':42} {'n':>4} {'rt p50':>8} {'rt p99':>8} {'daemon p50':>10} {'daemon p99':>10} "
              f"{'fs p50':>7} {'fs p99':>7}  rt p50 vs baseline")
    print(header)
    print("-" * len(header))

    def cols(samples: List[float], width: int) -> str:
        if not samples:
            return f"{'-':>{width}} {'-':>{width}}"
        return f"{percentile(samples, 50):{width}.2f} {percentile(samples, 99):{width}.2f}"

    for r in rows:
        base = by_name.get(r.baseline) if r.baseline else None
        ratio = f"{percentile(r.round_trip, 50) / percentile(base.round_trip, 50):6.1f}x {base.name}" if base else ""
        print(f"{r.name:42} {len(r.round_trip):4d} {cols(r.round_trip, 8)} {cols(r.daemon, 10)} {cols(r.fs, 7)}  "
              f"{ratio}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="daemon socket (default: $DELTABOX_SOCKET or the default socket)")
    parser.add_argument("--image", default="debian", help="image with python3 (default: debian)")
    parser.add_argument("--iterations", type=int, default=50, help="checkpoints/rollbacks per row (default 50)")
    parser.add_argument("--forks", type=int, default=20, help="forks (and creates) per row (default 20)")
    parser.add_argument("--sizes", default="10000,100000",
                        help="files added to the sandbox, cumulative totals (default 10000,100000)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]

    client = deltabox.Client(socket=args.socket)
    floor = Row("api: GET /v1/health")
    for _ in range(3):
        client.health()
    for _ in range(200):
        floor.round_trip.append(timed(client.health)[0])
    rows: List[Row] = [floor]
    bench_creates(client, args.image, args.forks, rows)
    counts: Dict[str, int] = {}
    with client.create(args.image) as sb:
        stages = [("image", 0)] + [(f"+{total // 1000}k files", total) for total in sizes]
        for label, total in stages:
            if total:
                sb.exec(["python3", "-", str(total)], stdin=BULK, timeout=3600).check()
            counts[label] = file_count(sb)
            bench_size(sb, label, args.iterations, rows)
            bench_fork(label, sb.checkpoint(fs_only=True), args.forks, rows)
        depth = len(sb.checkpoints())
    sizes_text = ", ".join(f"{label}: {n} entries" for label, n in counts.items())
    print_table(rows, f"DeltaBox filesystem checkpoints (ms) via the Python SDK; image {args.image}; "
                      f"{args.iterations} checkpoints/rollbacks and {args.forks} forks per row; {os.cpu_count()} "
                      f"CPUs\nfilesystem sizes: {sizes_text}; {depth} checkpoints in the sandbox at the end\n"
                      "rt = API round trip; daemon = reported pause_ms; fs = reported fs_ms (rollback)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
