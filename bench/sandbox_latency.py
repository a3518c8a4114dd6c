#!/usr/bin/env python3
"""Sandbox latencies through the Python SDK, against a running daemon.

    python3 bench/sandbox_latency.py [--socket PATH] [--image debian] [--iterations 200] [--creates 30]

Measures, N times each:
  * create → first exec: `client.create(image)` then `exec(["true"])` until it succeeds, then delete (not timed);
  * exec round trip of `true` in one sandbox;
  * session command round trip of `true` in one bash session;
and, in the same run, baselines on the host: the API floor (`GET /v1/health`), spawning `true` with
subprocess, and a `true` round trip through a persistent bash over pipes. Prints p50/p99/mean/min/max in ms and
each row's p50 as a multiple of its baseline's p50.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import deltabox  # noqa: E402


def measure(fn: Callable[[], object], n: int, warmup: int = 3) -> List[float]:
    """Milliseconds per call of ``fn``, ``n`` times after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def percentile(samples: List[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


class HostBash:
    """A persistent bash on pipes: the cost of a shell round trip without any sandbox or API."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["bash", "--norc", "--noprofile"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)

    def run_true(self) -> None:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(b"true; echo $?\n")
        if self.proc.stdout.readline() != b"0\n":
            raise RuntimeError("host bash did not answer")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="daemon socket (default: $DELTABOX_SOCKET or the default socket)")
    parser.add_argument("--image", default="debian", help="image with bash (default: debian)")
    parser.add_argument("--iterations", type=int, default=200, help="exec and session round trips (default 200)")
    parser.add_argument("--creates", type=int, default=30, help="sandbox creations (default 30)")
    args = parser.parse_args()

    client = deltabox.Client(socket=args.socket)
    client.health()

    def create_to_first_exec() -> None:
        sb = client.create(args.image)
        try:
            sb.exec(["true"]).check()
        finally:
            pause = time.perf_counter()
            sb.delete()
            deletes.append((time.perf_counter() - pause) * 1000)

    deletes: List[float] = []
    results: Dict[str, List[float]] = {}
    baselines: Dict[str, Optional[str]] = {}

    results["api: GET /v1/health"] = measure(client.health, args.iterations)
    results["host: spawn `true` (subprocess)"] = measure(lambda: subprocess.run(["true"], check=True), args.iterations)
    host_bash = HostBash()
    try:
        results["host: bash round trip `true` (pipes)"] = measure(host_bash.run_true, args.iterations)
    finally:
        host_bash.close()

    results["create -> first exec `true`"] = measure(create_to_first_exec, args.creates, warmup=1)
    baselines["create -> first exec `true`"] = "host: spawn `true` (subprocess)"
    with client.create(args.image) as sb:
        results["exec round trip `true`"] = measure(lambda: sb.exec(["true"]).check(), args.iterations)
        baselines["exec round trip `true`"] = "host: spawn `true` (subprocess)"
        with sb.session("bench") as session:
            results["session round trip `true`"] = measure(lambda: session.run("true").check(), args.iterations)
            baselines["session round trip `true`"] = "host: bash round trip `true` (pipes)"
    results["delete (after create -> first exec)"] = deletes

    print(f"DeltaBox sandbox latency (ms) via the Python SDK; image {args.image}; "
          f"{args.iterations} round trips, {args.creates} creates; {os.cpu_count()} CPUs")
    header = f"{'measurement':40} {'n':>5} {'p50':>8} {'p99':>8} {'mean':>8} {'min':>8} {'max':>8}  p50 vs baseline"
    print(header)
    print("-" * len(header))
    for name, samples in results.items():
        base = baselines.get(name)
        ratio = f"{percentile(samples, 50) / percentile(results[base], 50):6.1f}x {base}" if base else ""
        print(f"{name:40} {len(samples):5d} {percentile(samples, 50):8.2f} {percentile(samples, 99):8.2f} "
              f"{statistics.fmean(samples):8.2f} {min(samples):8.2f} {max(samples):8.2f}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
