"""bench/real_programs.py runs to its end (2 checkpoints and 2 rollbacks of a Jupyter kernel, PostgreSQL and their
baselines) against the suite's daemon and prints its table: a regression that makes such a program fail to
checkpoint or roll back fails here, not a slowdown."""

import subprocess
import sys

from support import REPO


def test_real_programs_bench_completes(daemon):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "real_programs.py"), "--socket", daemon.socket, "--rounds", "2"],
        capture_output=True, text=True, timeout=900)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, report
    for case in ("jupyter", "postgres"):
        for what in ("checkpoint (pause)", "rollback (pause)"):
            assert any(line.startswith(case) and what in line for line in result.stdout.splitlines()), report
