"""Crash consistency: SIGKILLs of the daemon and of shims at random moments of a checkpoint (filesystem and full), of
the writing of a full checkpoint's process image, of a rollback, a fork, and the deletion of a sandbox or of a
checkpoint lose no checkpoint the API reported and leave nothing half made.

A short run of bench/crash_torture.py, which holds the operations, the kills and the checks (see its docstring; it
runs its own daemon): each operation with each kill target (the daemon, the shim, both), in a random order and at
random delays within the operation's duration (28 iterations, under a minute). test_checkpoints_durability.py
kills the daemon (and a shim) during a loop of filesystem checkpoints; this covers the other operations. Set
DELTABOX_TORTURE_SEED to replay a run's order and delays.
"""

import os
import random
import sys

from support import REPO, binary, image_dir

sys.path.insert(0, str(REPO / "bench"))

import crash_torture  # noqa: E402


def test_random_kills_lose_no_reported_checkpoint_and_leave_nothing_half_made():
    seed = int(os.environ.get("DELTABOX_TORTURE_SEED", random.randrange(2**32)))
    log = []
    # Each (operation, target) pair once in a random order (21), then 7 pairs of the next random round.
    torture = crash_torture.run(binary(), image_dir(), iterations=28, seed=seed, calibrate=1, log=log.append)
    summary = torture.summary()
    print(f"seed {seed}\n" + "\n".join(log) + "\n" + summary)
    kills = torture.stats.kills
    # Every operation was killed with every target.
    assert {(op, target) for op, target, _ in kills} == {(op, t) for op in crash_torture.OPS
                                                        for t in crash_torture.TARGETS}, summary
    assert len(torture.stats.verified) >= 5, summary
    assert not torture.violations, f"seed {seed}:\n{summary}"
