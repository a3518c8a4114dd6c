"""bench/tree_search.py runs to its end with every state verification passing: a short search (6 expansions, no
model latency, 20 MB held, the synthetic project: no download) with each method, then 20 rollbacks to random nodes
of the finished tree (`--revisits`), against the suite's daemon.

The bench exits 1 when a rollback leaves a state other than the node's (files, git diff, the python process's tag
and counter, the session's cwd and variable) or the daemon answers an error; this catches such a regression of
rollback under a tree search's access pattern (back to older nodes, forward again), not a slowdown.
"""

import subprocess
import sys

from support import REPO


def test_tree_search_bench_completes_with_every_state_verified(daemon):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "tree_search.py"), "--socket", daemon.socket, "--project", "synthetic",
         "--expansions", "6", "--model-latency", "0", "--rss-mb", "20", "--revisits", "20", "--seed", "1"],
        capture_output=True, text=True, timeout=900)
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, report
    assert "state verified at every expansion" in result.stdout, report
    for method in ("deltabox", "fs-restart", "copy-restart"):
        assert f"\n{method} " in result.stdout, report
    assert "deltabox, 20 rollbacks to random nodes of the finished tree" in result.stdout, report
