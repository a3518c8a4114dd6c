#!/usr/bin/env python3
"""What the `nat` network costs: HTTP downloads from "the outside" (bench/outside.py, a network namespace on this
host) into a sandbox against the host itself, and what the mode adds to create, checkpoint, rollback and fork.

    python3 bench/network.py [--socket PATH] [--image debian] [--rounds 20] [--size 256M]

Needs root (it makes the outside namespace). Prints p50 and p99 per row and the ratio to the baseline measured in the
same run: the host's own download for throughput and latency, a `none` sandbox for the lifecycle operations.
- download: one GET of `--size` bytes per round (the server sends with sendfile; the client reads into a buffer), in
  MB/s; the host runs the same client program.
- request: a new connection and a GET of 4 KiB, 50 per round, each timed.
- create / checkpoint / rollback / fork: SDK call latency; the sandbox runs a bash session and an idle python.
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import deltabox  # noqa: E402
import outside  # noqa: E402  (same directory)
from sandbox_latency import percentile  # noqa: E402  (same directory)

# Downloads argv[1] (bytes) from the outside argv[2] times, prints one MB/s per line; then opens argv[3] connections
# each fetching the 4 KiB file and prints each one's milliseconds.
CLIENT = r"""
import http.client, sys, time
host, size, rounds, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
buf = bytearray(1 << 20)
for _ in range(rounds):
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, %d, timeout=60)
    conn.request("GET", "/big")
    resp, got = conn.getresponse(), 0
    while True:
        n = resp.readinto(buf)
        if not n:
            break
        got += n
    assert got == size, got
    conn.close()
    print("download", size / (time.perf_counter() - start) / 1e6)
for _ in range(requests):
    start = time.perf_counter()
    conn = http.client.HTTPConnection(host, %d, timeout=60)
    conn.request("GET", "/small")
    assert len(conn.getresponse().read()) == 4096
    conn.close()
    print("request", (time.perf_counter() - start) * 1000)
""" % (outside.HTTP_PORT, outside.HTTP_PORT)


def parse(text: str) -> dict:
    out: dict = {"download": [], "request": []}
    for line in text.splitlines():
        kind, value = line.split()
        out[kind].append(float(value))
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def lifecycle(client: deltabox.Client, image: str, network: str, rounds: int) -> dict:
    times: dict = {"create": [], "checkpoint": [], "rollback": [], "fork": []}
    for _ in range(max(1, rounds // 4)):
        start = time.perf_counter()
        sb = client.create(image, network=network)
        times["create"].append((time.perf_counter() - start) * 1000)
        sb.delete()
    with client.create(image, network=network) as sb:
        sb.session("main").run("(python3 -c 'import time; time.sleep(1e9)' &)").check()
        first = sb.checkpoint()
        for _ in range(rounds):
            times["checkpoint"].append(timed(sb.checkpoint))
            times["rollback"].append(timed(lambda: sb.rollback(first)))
        for _ in range(max(1, rounds // 4)):
            start = time.perf_counter()
            (child,) = first.fork()
            child.exec("true").check()
            times["fork"].append((time.perf_counter() - start) * 1000)
            child.delete()
    return times


def row(name: str, unit: str, samples: list, base: list, higher_is_better: bool = False) -> str:
    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    b50 = percentile(base, 50)
    ratio = p50 / b50 if b50 else float("nan")
    better = "higher is better" if higher_is_better else "lower is better"
    return f"{name:<28} {p50:>10.1f} {p99:>10.1f} {unit:<5} {b50:>10.1f} {ratio:>7.2f}x  ({better})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", default=deltabox.DEFAULT_SOCKET)
    parser.add_argument("--image", default="debian")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--size", default="256M", help="download size (K, M, G suffixes)")
    args = parser.parse_args()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    size = int(args.size[:-1]) * units[args.size[-1]] if args.size[-1] in units else int(args.size)
    client = deltabox.Client(socket=args.socket)
    requests = 50 * args.rounds
    files = {"small": os.urandom(4096), "big": b"\0" * size}
    with outside.outside(files):
        argv = [outside.ADDRESS, str(size), str(args.rounds), str(requests)]
        host = parse(subprocess.run([sys.executable, "-c", CLIENT, *argv], check=True, capture_output=True,
                                    text=True).stdout)
        with client.create(args.image, network="nat") as sb:
            sb.files.write("/root/client.py", CLIENT.encode())
            inside = parse(sb.exec(["python3", "/root/client.py", *argv], timeout=3600).check().stdout)
        nat = lifecycle(client, args.image, "nat", args.rounds)
        none = lifecycle(client, args.image, "none", args.rounds)
    print(f"network: {args.rounds} rounds, download {size >> 20} MiB, {requests} requests; baseline = the host's own "
          "client (download, request) or a sandbox with network none (the rest)")
    print(f"{'':<28} {'p50':>10} {'p99':>10} {'':<5} {'base p50':>10} {'ratio':>8}")
    print(row("download, nat sandbox", "MB/s", inside["download"], host["download"], True))
    print(row("request (connect+GET 4K)", "ms", inside["request"], host["request"]))
    for op in ("create", "checkpoint", "rollback", "fork"):
        print(row(f"{op}, nat", "ms", nat[op], none[op]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
