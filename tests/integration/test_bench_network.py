"""bench/network.py runs to its end (2 rounds, an 8 MiB download) against the suite's daemon and prints its table: a
regression that breaks downloads into a `nat` sandbox or its lifecycle fails here, not a slowdown."""

import subprocess
import sys

from support import REPO


def test_network_bench_completes(daemon):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "network.py"), "--socket", daemon.socket, "--rounds", "2",
         "--size", "8M"],
        capture_output=True, text=True, timeout=900)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, report
    for row in ("download, nat sandbox", "request (connect+GET 4K)", "create, nat", "checkpoint, nat", "rollback, nat",
                "fork, nat"):
        assert any(line.startswith(row) for line in result.stdout.splitlines()), report
