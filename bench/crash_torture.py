#!/usr/bin/env python3
"""Crash-consistency torture: SIGKILLs the daemon and/or a sandbox's shim at random moments of a checkpoint
(filesystem-only and full), of the background writing of a full checkpoint's process image, of a rollback, a fork,
and the deletion of a sandbox or of a checkpoint; restarts the daemon and checks what is left.

    python3 bench/crash_torture.py [--iterations 200] [--seed N] [--data-dir DIR] [--binary PATH] [--images DIR]
                                   [--verbose]

Runs its own `deltabox serve` (private socket; data directory DIR, default a temporary one) and imports the `debian`
image from DIR of --images (default $DELTABOX_TEST_IMAGES or /var/cache/deltabox/images). Needs root.

Each iteration picks an operation and a kill target (the daemon, the shim of the sandbox the operation works on, or
both; for a fork: the shims it starts), starts the operation in a thread, sleeps a random delay up to 1.3 times the
operation's median duration (measured at start without kills: --calibrate runs of each) and SIGKILLs. The daemon is
restarted if it was killed. Then every check:

* every checkpoint the API reported (its call answered) exists and is usable: a fork of it shows exactly its files
  (and, for a full checkpoint, its session's shell state), and rolling its sandbox back to it (if alive) does the
  same — unless it shows `image_failure` and is a full checkpoint whose shim was killed before it was durable
  (counted apart); a checkpoint whose delete was answered is gone and stays gone;
* a checkpoint or a fork whose answer was lost in the kill may exist: then it must be as complete as one answered;
* every sandbox whose shim was not killed is listed and answers exec, with the files and session state it must
  have (either side of an interrupted rollback); one whose shim was killed is gone;
* the catalog (read-only) names nothing missing: each checkpoint's stack is a frozen DeltaFS layer, each durable
  checkpoint's process image is in the DeltaCR store, each sandbox row is a listed sandbox;
* nothing is half made or half removed: no cgroup under deltabox/<instance>/, directory in <data-dir>/sandboxes or
  `deltabox shim` process of a sandbox that is not listed; no mount, process or directory of a removed sandbox;
* the daemon never panics, and a call whose daemon or shim was killed answers within 10 s.

Prints a table of kills per operation, target and kill point (the delay as a share of the operation's median
duration), the operations' outcomes, checkpoints verified, image_failure outcomes and every violation. Exits 1 on
any violation. The integration test tests/integration/test_crash_consistency.py runs a short version.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(REPO / "tests" / "integration"))

import deltabox  # noqa: E402
from support import (  # noqa: E402
    STEP, VERIFY, Daemon, catalog_records, instance_cgroups, leftovers, shim_pid, shim_processes, wait_pid_dead,
    wait_until,
)

OPS = ("checkpoint_fs", "checkpoint_full", "image", "rollback", "fork", "delete_sandbox", "delete_checkpoint")
TARGETS = ("daemon", "shim", "both")
POINTS = ("<25%", "25-50%", "50-75%", "75-100%", ">100%")
IMAGE = "debian"
# Fills its memory with fresh random bytes (argv: MiB), then says so, so the next full checkpoint's process image
# has that much to write (images are incremental: unchanged pages cost nothing).
HOLDER = """import os, sys, time
blob = os.urandom(int(sys.argv[1]) << 20)
open(sys.argv[2], "w").close()
time.sleep(100000)
"""
HOLDER_MIB = 32
START_HOLDER = ("[ -f /root/holder.pid ] && kill $(cat /root/holder.pid) 2>/dev/null; rm -f /root/ready; "
                "setsid python3 /root/holder.py {mib} /root/ready > /dev/null 2>&1 < /dev/null & "
                "echo $! > /root/holder.pid")
MAX_BOXES = 3
MAX_CHECKPOINTS = 8
OP_TIMEOUT = 200.0  # a fork may wait 120 s for a process image
SETTLE = 20.0
FULL_CHECK_EVERY = 5
# A call whose shim or daemon was killed answers at once (the daemon sees a shim exit through its pidfd).
SLOW_ANSWER = 10.0


@dataclass(frozen=True)
class State:
    """What a sandbox (or a checkpoint) holds: what VERIFY prints for its /data (written by STEP), and $TOKEN in its
    shell session "main" (None: no such session)."""

    files: str
    session: Optional[str]

    def as_checkpointed(self, kind: str) -> "State":
        """The state a checkpoint of this kind restores: a filesystem checkpoint has no session."""
        return self if kind == "full" else State(self.files, None)


@dataclass
class Ck:
    id: str
    sandbox: str
    kind: str
    state: State
    #: Its shim was killed before the checkpoint could be seen durable: image_failure is an allowed outcome.
    may_fail: bool = False
    #: A delete of it (or of its sandbox) was asked for and not answered: it may be gone.
    may_be_gone: bool = False
    #: Its sandbox was deleted without keep_checkpoints while another sandbox used it: it may go once unused.
    owner_deleted: bool = False
    failed: Optional[str] = None  # image_failure as reported
    seen_durable: bool = False


@dataclass
class Box:
    id: str
    state: State
    origin: Optional[str]
    uid_base: int
    shim: int
    #: "alive", "dead" (its shim was killed: it must be gone) or "maybe" (an unanswered delete).
    expect: str = "alive"
    #: After an unanswered or failed rollback: the states it may be in.
    either: Tuple[State, ...] = ()


@dataclass
class Stats:
    iterations: int = 0
    kills: Dict[Tuple[str, str, str], int] = field(default_factory=lambda: collections.Counter())
    no_shim: Dict[Tuple[str, str], int] = field(default_factory=lambda: collections.Counter())
    outcomes: Dict[Tuple[str, str], int] = field(default_factory=lambda: collections.Counter())
    fork_checks: int = 0
    rollback_checks: int = 0
    verified: Set[str] = field(default_factory=set)
    image_failures: Set[str] = field(default_factory=set)
    adopted: collections.Counter = field(default_factory=collections.Counter)
    notes: List[str] = field(default_factory=list)


class Violation(Exception):
    pass


def handle(client: deltabox.Client, sandbox_id: str) -> deltabox.Sandbox:
    """A handle on a sandbox without a request (the SDK's lookup would ask the daemon)."""
    return deltabox.Sandbox(client._transport, deltabox.SandboxInfo(sandbox_id, IMAGE, "", ""))


class Torture:
    """Drives one daemon (a support.Daemon it may kill and restart) through kill iterations and checks it."""

    def __init__(self, daemon: Daemon, rng: random.Random, log: Callable[[str], None] = print,
                 verbose: bool = False) -> None:
        self.daemon = daemon
        self.rng = rng
        self.log = log
        self.verbose = verbose
        self.client = deltabox.Client(socket=daemon.socket, timeout=OP_TIMEOUT)
        self.boxes: Dict[str, Box] = {}
        self.cks: Dict[str, Ck] = {}
        self.deleted_cks: Set[str] = set()  # delete answered: must stay gone
        self.removed: Dict[str, int] = {}  # sandbox id -> uid base, of sandboxes that must have left nothing
        self.tokens = itertools.count(1)
        self.durations: Dict[str, List[float]] = collections.defaultdict(list)
        self.stats = Stats()
        self.violations: List[str] = []
        self.seen: Set[str] = set()
        self.log_offset = 0
        # What an unanswered call of this iteration may have left: (sandbox, kind, state) of a checkpoint;
        # (checkpoint, state) of a fork.
        self.maybe_checkpoint: Optional[Tuple[str, str, State, bool]] = None
        self.maybe_fork: Optional[Ck] = None
        self.touched: Set[str] = set()
        self.plan: List[Tuple[str, str]] = []

    # ---------------------------------------------------------------- model helpers

    def violation(self, message: str) -> None:
        if message in self.seen:  # the same fault seen again (e.g. at each check of the same checkpoint)
            return
        self.seen.add(message)
        text = f"iteration {self.stats.iterations}: {message}"
        self.violations.append(text)
        self.log(f"VIOLATION {text}")

    def live(self) -> List[Box]:
        return [b for b in self.boxes.values() if b.expect == "alive" and not b.either]

    def usable(self, ck: Ck) -> bool:
        return ck.id in self.cks and not ck.may_be_gone and ck.failed is None

    def new_box(self) -> Box:
        sb = self.client.create(IMAGE)
        info = sb.info
        box = Box(sb.id, State("", None), None, info.uid_base, shim_pid(info))
        self.boxes[box.id] = box
        sb.files.write("/root/holder.py", HOLDER)
        self.mutate(box)
        return box

    def mutate(self, box: Box) -> None:
        """New files (a fresh blob under a new token) and a new $TOKEN in session "main"."""
        sb = handle(self.client, box.id)
        token = f"{box.id[:6]}-{next(self.tokens)}"
        out = sb.exec(["sh", "-c", STEP.format(step=token)]).check().stdout
        if box.state.session is None:
            try:
                sb.session("main")
            except deltabox.Conflict:
                raise Violation(f"sandbox {box.id} has a session 'main' it should not have")
        sb.session("main", create=False).run(f"export TOKEN={token}").check()
        box.state = State(f"{token}\n{out}", token)

    def read_state(self, sandbox_id: str) -> State:
        sb = handle(self.client, sandbox_id)
        result = sb.exec(["sh", "-c", VERIFY])
        files = result.stdout if result.ok else f"corrupt ({result.exit_code}): {result.stdout!r} {result.stderr!r}"
        session = None
        if "main" in sb.sessions():
            session = sb.session("main", create=False).run("echo $TOKEN").stdout.strip()
        return State(files, session)

    def add_ck(self, view: deltabox.Checkpoint, state: State, may_fail: bool) -> Ck:
        ck = Ck(view.id, view.sandbox, view.kind, state.as_checkpointed(view.kind), may_fail=may_fail)
        self.cks[ck.id] = ck
        self.touched.add(ck.id)
        return ck

    def clean_checkpoint(self, box: Box, full: bool = False) -> Ck:
        view = handle(self.client, box.id).checkpoint(fs_only=not full)
        return self.add_ck(view, box.state, False)

    def box_cks(self, box: Box) -> List[Ck]:
        return [c for c in self.cks.values() if c.sandbox == box.id and self.usable(c)]

    # ---------------------------------------------------------------- killing

    def kill(self, target: str, shims: Callable[[], List[int]]) -> Tuple[bool, List[int]]:
        """SIGKILLs the daemon and/or the shims (in random order for both); returns (daemon killed, shims killed)."""
        steps = []
        if target in ("daemon", "both"):
            steps.append("daemon")
        if target in ("shim", "both"):
            steps.append("shim")
        self.rng.shuffle(steps)
        killed: List[int] = []
        for step in steps:
            if step == "daemon":
                self.daemon.proc.kill()
            else:
                for pid in shims():
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    except ProcessLookupError:
                        pass
        if "daemon" in steps:
            self.daemon.proc.wait(30)
            self.daemon.proc = None
        for pid in killed:
            wait_pid_dead(pid)
        # A full checkpoint not seen durable yet, whose shim died, may never get its image: that is reported as
        # image_failure, an allowed outcome.
        dead = {b.id for b in self.boxes.values() if b.shim in killed}
        for ck in self.cks.values():
            if ck.sandbox in dead and ck.kind == "full" and not ck.seen_durable:
                ck.may_fail = True
        return "daemon" in steps, killed

    def run_op(self, op: str, fn: Optional[Callable[[deltabox.Client], object]], target: Optional[str],
               shims: Callable[[], List[int]], window: Optional[Tuple[float, float]]) -> Tuple[str, object, list]:
        """Runs ``fn`` in a thread (its own client); with a target, SIGKILLs after a random delay. Returns
        (outcome, value, shims killed): outcome "ok", "lost" (no answer: the daemon died) or the error code."""
        result: Dict[str, object] = {}
        client = deltabox.Client(socket=self.daemon.socket, timeout=OP_TIMEOUT)

        def work() -> None:
            try:
                result["value"] = fn(client) if fn else None
            except deltabox.DaemonUnavailable as e:
                result["lost"] = e
            except deltabox.DeltaboxError as e:
                result["error"] = e
            except Exception as e:  # noqa: BLE001 - reported as a violation
                result["crash"] = e
            result["end"] = time.monotonic()

        start = time.monotonic()
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        killed: List[int] = []
        daemon_killed = False
        if target is not None:
            median, top = window
            delay = self.rng.uniform(0, top)
            time.sleep(delay)
            share = delay / median if median > 0 else 2
            point = POINTS[min(int(share * 4), 4)]
            daemon_killed, killed = self.kill(target, shims)
            self.stats.kills[(op, target, point)] += 1
            if target in ("shim", "both") and not killed:
                self.stats.no_shim[(op, target)] += 1  # not started yet (fork) or already gone (delete)
        killed_at = time.monotonic()
        thread.join(OP_TIMEOUT + 30)
        client.close()
        if thread.is_alive():
            raise Violation(f"{op}: no answer within {OP_TIMEOUT + 30:.0f} s (the daemon or shim hangs)")
        if target is not None and result["end"] - killed_at > SLOW_ANSWER:
            what = "error " + result["error"].code if "error" in result else "answer"
            self.violation(f"{op}/{target}: the {what} came {result['end'] - killed_at:.1f} s after the kill")
        if daemon_killed:
            self.daemon.start()
            self.client.close()  # its kept-open connections went with the daemon
        if "crash" in result:
            raise Violation(f"{op}: the SDK raised {result['crash']!r}")
        if "lost" in result:
            outcome = "lost"
        elif "error" in result:
            outcome = result["error"].code
        else:
            outcome = "ok"
            if target is None:
                self.durations[op].append(result["end"] - start)
        self.stats.outcomes[(op, outcome)] += 1
        if self.verbose and target is None:
            self.log(f"  calibrate {op}: {outcome} {1000 * (result.get('end', start) - start):.1f} ms")
        return outcome, result.get("value", result.get("error")), killed

    # ---------------------------------------------------------------- operations
    # Each prepares (no kill), runs the operation through run_op and records in the model what the outcome means.

    def pick_box(self) -> Box:
        live = self.live()
        if not live:
            return self.new_box()
        return self.rng.choice(live)

    def op_checkpoint(self, op: str, target, window) -> str:
        full = op == "checkpoint_full"
        box = self.pick_box()
        self.mutate(box)
        before = box.state
        self.maybe_checkpoint = (box.id, "full" if full else "filesystem", before, target in ("shim", "both"))
        outcome, value, killed = self.run_op(
            op, lambda c: handle(c, box.id).checkpoint(fs_only=not full), target, lambda: [box.shim], window)
        if killed:
            box.expect = "dead"
        if outcome == "ok":
            self.add_ck(value, before, bool(killed) and full)  # kill() ran before it was in the model
        return outcome

    def op_image(self, op: str, target, window) -> str:
        box = self.pick_box()
        self.mutate(box)
        sb = handle(self.client, box.id)
        sb.exec(["sh", "-c", START_HOLDER.format(mib=HOLDER_MIB)]).check()
        wait_until(lambda: sb.files.exists("/root/ready"), 60, 0.02, "the memory holder")
        view = sb.checkpoint()
        ck = self.add_ck(view, box.state, False)

        def durable(c: deltabox.Client) -> None:  # calibration only: how long the image takes to write
            wait_until(lambda: c.checkpoint(ck.id).durable, 120, 0.002, "the image")

        outcome, _, killed = self.run_op(op, durable if target is None else None, target, lambda: [box.shim],
                                         window)
        if killed:
            box.expect = "dead"
        return outcome

    def op_rollback(self, op: str, target, window) -> str:
        box = self.pick_box()
        choices = self.box_cks(box) + [c for c in self.cks.values() if c.id == box.origin and self.usable(c)]
        if not choices:
            choices = [self.clean_checkpoint(box, full=self.rng.random() < 0.5)]
        ck = self.rng.choice(choices)
        self.mutate(box)
        before = box.state
        self.touched.add(ck.id)
        outcome, _, killed = self.run_op(op, lambda c: handle(c, box.id).rollback(ck.id), target,
                                         lambda: [box.shim], window)
        if killed:
            box.expect = "dead"
        elif outcome == "ok":
            box.state = ck.state
        else:
            box.either = (before, ck.state)
        return outcome

    def op_fork(self, op: str, target, window) -> str:
        choices = [c for c in self.cks.values() if self.usable(c)]
        if not choices:
            choices = [self.clean_checkpoint(self.pick_box(), full=self.rng.random() < 0.5)]
        ck = self.rng.choice(choices)
        self.touched.add(ck.id)
        count = self.rng.choice((1, 2))
        before = set(shim_processes(self.daemon))
        self.maybe_fork = ck

        def new_shims() -> List[int]:
            return [pid for pid in shim_processes(self.daemon) if pid not in before]

        outcome, value, killed = self.run_op(op, lambda c: c.fork(ck.id, count), target, new_shims, window)
        if outcome == "ok":
            for sb in value:
                # Its shim may be gone already (killed): then it must be gone after the restart too.
                box = Box(sb.id, ck.state, ck.id, sb.info.uid_base, 0, expect="dead" if killed else "alive")
                if not killed:
                    box.shim = shim_pid(sb.info)
                self.boxes[box.id] = box
        return outcome

    def op_delete_sandbox(self, op: str, target, window) -> str:
        box = self.pick_box()
        keep = self.rng.random() < 0.5
        # With keep_checkpoints every checkpoint stays; without, those a live sandbox was forked from stay.
        origins = {b.origin for b in self.boxes.values() if b.id != box.id}
        outcome, _, killed = self.run_op(op, lambda c: handle(c, box.id).delete(keep_checkpoints=keep), target,
                                         lambda: [box.shim], window)
        for ck in self.cks.values():
            if ck.sandbox == box.id:
                self.touched.add(ck.id)
                if not keep:
                    ck.owner_deleted = True
                    ck.may_be_gone = ck.may_be_gone or ck.id not in origins
        if killed:
            box.expect = "dead"
        elif outcome == "ok":
            box.expect = "dead"
        else:
            box.expect = "maybe"
        return outcome

    def op_delete_checkpoint(self, op: str, target, window) -> str:
        box = self.pick_box()
        # At least two checkpoints in a line, so the one deleted may be in its middle (its children relinked, GC).
        while len(self.box_cks(box)) < 2:
            self.mutate(box)
            self.clean_checkpoint(box, full=self.rng.random() < 0.3)
        ck = self.rng.choice(self.box_cks(box))
        self.touched.update(c.id for c in self.cks.values())

        def delete(c: deltabox.Client) -> None:
            deltabox.Checkpoint(id=ck.id, sandbox=ck.sandbox, _transport=c._transport).delete()

        outcome, _, killed = self.run_op(op, delete, target, lambda: [box.shim], window)
        if killed:
            box.expect = "dead"
        if outcome == "ok":
            del self.cks[ck.id]
            self.deleted_cks.add(ck.id)
        else:
            ck.may_be_gone = True
        return outcome

    # ---------------------------------------------------------------- checks

    def settle(self) -> Dict[str, deltabox.SandboxInfo]:
        """The listed sandboxes, once those whose shim was killed are unlisted (the daemon does it on its own when
        it saw the shim die; a restarted daemon at start)."""
        deadline = time.monotonic() + SETTLE
        while True:
            listed = {s.id: s.info for s in self.client.list()}
            dead = [b.id for b in self.boxes.values() if b.expect == "dead" and b.id in listed]
            if not dead or time.monotonic() > deadline:
                return listed
            time.sleep(0.02)

    def check_sandboxes(self) -> None:
        listed = self.settle()
        for box in list(self.boxes.values()):
            if box.expect == "dead" or (box.expect == "maybe" and box.id not in listed):
                if box.id in listed:
                    self.violation(f"sandbox {box.id}: its shim was killed (or its delete answered), still listed")
                    continue
                del self.boxes[box.id]
                self.removed[box.id] = box.uid_base
            elif box.id not in listed:
                self.violation(f"sandbox {box.id} is gone though its shim was not killed")
                del self.boxes[box.id]
                self.removed[box.id] = box.uid_base
            else:
                box.expect = "alive"
        for sandbox_id in set(listed) - set(self.boxes):
            info = listed[sandbox_id]
            fork = self.maybe_fork
            if fork is not None and info.origin == fork.id:
                # A fork whose answer was lost: it must be as good as an answered one.
                self.stats.adopted["fork"] += 1
                self.boxes[sandbox_id] = Box(sandbox_id, fork.state, fork.id, info.uid_base, shim_pid(info))
            else:
                self.violation(f"sandbox {sandbox_id} (origin {info.origin}) is listed, none was made")
                handle(self.client, sandbox_id).delete()
                self.removed[sandbox_id] = info.uid_base
        for box in list(self.boxes.values()):
            try:
                handle(self.client, box.id).exec(["true"]).check()
                actual = self.read_state(box.id)
            except (deltabox.DeltaboxError, deltabox.CommandError) as e:
                self.violation(f"sandbox {box.id} is listed but does not work: {e}")
                continue
            expected = box.either or (box.state,)
            if actual not in expected:
                self.violation(f"sandbox {box.id} holds {actual}, expected {' or '.join(map(str, expected))}")
            box.state, box.either = actual, ()
            box.shim = shim_pid(listed[box.id])

    def check_leftovers(self, listed: Set[str]) -> List[str]:
        found = []
        for name, paths in instance_cgroups(self.daemon).items():
            if name not in listed:
                found.append(f"stray cgroup {paths}")
        for entry in os.scandir(self.daemon.data_dir / "sandboxes"):
            if entry.name not in listed:
                found.append(f"stray directory {entry.path}")
        for pid, sandbox_id in shim_processes(self.daemon).items():
            if sandbox_id not in listed:
                found.append(f"stray shim process {pid} of sandbox {sandbox_id}")
        live_bases = {b.uid_base for b in self.boxes.values()}
        for sandbox_id, uid_base in self.removed.items():
            for item in leftovers(self.daemon, sandbox_id, uid_base):
                if not (item.startswith("process") and uid_base in live_bases):  # its uid range was reused
                    found.append(f"{sandbox_id}: {item}")
        return found

    def check_host(self) -> None:
        listed = set(self.boxes)
        deadline = time.monotonic() + SETTLE
        # The daemon unlists a sandbox whose shim died first, and cleans up and drops its catalog row right after:
        # give it time.
        while True:
            found = self.check_leftovers(listed)
            rows = catalog_records(self.daemon, "sandboxes")
            found += [f"sandbox {i} is in the catalog, not listed" for i in sorted(set(rows) - listed)]
            found += [f"sandbox {i} is listed, not in the catalog" for i in sorted(listed - set(rows))]
            if not found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for item in found:
            self.violation(item if item.startswith("sandbox") else f"left over: {item}")
        self.removed = {}

    def check_catalog(self) -> None:
        layers = self.daemon.data_dir / "deltafs" / "layers"
        images = self.daemon.data_dir / "deltacr"
        for ck_id, record in catalog_records(self.daemon, "checkpoints").items():
            if not (layers / record["stack"] / "frozen").exists():
                self.violation(f"catalog: checkpoint {ck_id}'s stack {record['stack']} is missing or not frozen")
            if record.get("image") and record.get("durable") and not (images / record["image"]).is_dir():
                self.violation(f"catalog: durable checkpoint {ck_id}'s image {record['image']} is missing")

    def wait_durable(self, ck_id: str) -> Optional[deltabox.Checkpoint]:
        """The checkpoint's view once it is durable or failed (its image may still be written), None if gone."""
        deadline = time.monotonic() + 150
        while True:
            try:
                view = self.client.checkpoint(ck_id)
            except deltabox.CheckpointNotFound:
                return None
            if view.durable or view.image_failure is not None or time.monotonic() > deadline:
                return view
            time.sleep(0.01)

    def check_checkpoints(self) -> None:
        in_catalog = catalog_records(self.daemon, "checkpoints")
        for ck_id in sorted(self.deleted_cks & set(in_catalog)):
            self.violation(f"checkpoint {ck_id} is back after its delete was answered")
        for ck_id in self.deleted_cks:
            try:
                self.client.checkpoint(ck_id)
                self.violation(f"checkpoint {ck_id} is served after its delete was answered")
            except deltabox.CheckpointNotFound:
                pass
        for ck_id, record in in_catalog.items():
            if ck_id in self.cks or ck_id in self.deleted_cks:
                continue
            maybe = self.maybe_checkpoint
            if maybe is not None and record["sandbox"] == maybe[0] and record["kind"] == maybe[1]:
                # A checkpoint whose answer was lost: it counts as reported from now on.
                self.stats.adopted["checkpoint"] += 1
                view = self.client.checkpoint(ck_id)
                self.add_ck(view, maybe[2], maybe[3] and maybe[1] == "full")
            else:
                self.violation(f"checkpoint {ck_id} ({record['kind']}, sandbox {record['sandbox']}) is in the "
                               "catalog, none was made")
        for ck in list(self.cks.values()):
            view = self.wait_durable(ck.id)
            if view is None:
                if ck.may_be_gone:
                    del self.cks[ck.id]
                else:
                    self.violation(f"reported checkpoint {ck.id} ({ck.kind}, sandbox {ck.sandbox}) is lost")
                    del self.cks[ck.id]
                continue
            ck.may_be_gone = ck.owner_deleted  # still there: it must stay usable
            ck.seen_durable = ck.seen_durable or view.durable
            if ck.id not in in_catalog:
                self.violation(f"checkpoint {ck.id} is served but not in the catalog")
            if view.image_failure is not None:
                if ck.failed is None:
                    self.touched.add(ck.id)
                ck.failed = view.image_failure
                if ck.may_fail:
                    self.stats.image_failures.add(ck.id)
                else:
                    self.violation(f"checkpoint {ck.id}: image_failure {view.image_failure!r}, but its shim was "
                                   "not killed before it was durable")
            elif not view.durable:
                self.violation(f"checkpoint {ck.id}: not durable {150} s after it was taken")

    def fork_check(self, ck: Ck) -> None:
        try:
            forks = self.client.fork(ck.id)
        except deltabox.DeltaboxError as e:
            if ck.failed is not None and isinstance(e, deltabox.CheckpointFailed):
                return  # its image could never be written, as its view says
            self.violation(f"checkpoint {ck.id} ({ck.kind}): cannot fork: {e}")
            return
        (fork,) = forks
        try:
            if ck.failed is not None:
                self.violation(f"checkpoint {ck.id} shows image_failure {ck.failed!r}, yet forks")
            actual = self.read_state(fork.id)
            if actual != ck.state:
                self.violation(f"checkpoint {ck.id} ({ck.kind}): a fork holds {actual}, expected {ck.state}")
            self.stats.fork_checks += 1
            self.stats.verified.add(ck.id)
        except deltabox.DeltaboxError as e:
            self.violation(f"checkpoint {ck.id}: its fork {fork.id} does not work: {e}")
        finally:
            try:
                fork.delete()
            except deltabox.DeltaboxError as e:
                self.violation(f"cannot remove fork {fork.id}: {e}")
            self.removed[fork.id] = fork.info.uid_base

    def rollback_check(self, ck: Ck) -> None:
        box = self.boxes.get(ck.sandbox)
        if box is None or ck.failed is not None:
            return
        try:
            handle(self.client, box.id).rollback(ck.id)
            actual = self.read_state(box.id)
        except deltabox.DeltaboxError as e:
            self.violation(f"checkpoint {ck.id} ({ck.kind}): rollback of {box.id} failed: {e}")
            return
        if actual != ck.state:
            self.violation(f"checkpoint {ck.id} ({ck.kind}): after a rollback {box.id} holds {actual}, "
                           f"expected {ck.state}")
        box.state = actual
        self.stats.rollback_checks += 1
        self.stats.verified.add(ck.id)

    def verify(self, everything: bool = False) -> None:
        self.check_log()
        self.check_sandboxes()
        self.check_checkpoints()
        self.check_catalog()
        todo = [ck for ck in self.cks.values() if everything or ck.id in self.touched]
        others = [ck for ck in self.cks.values() if ck not in todo]
        if others:
            todo.append(self.rng.choice(others))
        for ck in todo:
            self.fork_check(ck)
        rollbacks = [ck for ck in todo if ck.sandbox in self.boxes and ck.failed is None]
        for ck in rollbacks if everything else rollbacks[:2]:
            self.rollback_check(ck)
        self.check_host()

    def check_log(self) -> None:
        try:
            with open(self.daemon.log_path, errors="replace") as f:
                f.seek(self.log_offset)
                text = f.read()
                self.log_offset = f.tell()
        except OSError:
            return
        for line in text.splitlines():
            if "panicked" in line:
                self.violation(f"daemon log: {line.strip()}")

    # ---------------------------------------------------------------- the loop

    def trim(self) -> None:
        """Keeps the world small (no kill): at most MAX_BOXES sandboxes and MAX_CHECKPOINTS checkpoints."""
        while len(self.boxes) > MAX_BOXES:
            box = self.rng.choice([b for b in self.boxes.values() if b.expect == "alive"])
            handle(self.client, box.id).delete(keep_checkpoints=True)
            del self.boxes[box.id]
            self.removed[box.id] = box.uid_base
        while len(self.cks) > MAX_CHECKPOINTS:
            ck = next(iter(self.cks.values()))  # the oldest
            self.client.checkpoint(ck.id).delete()
            del self.cks[ck.id]
            self.deleted_cks.add(ck.id)

    def step(self, op: str, target: Optional[str]) -> str:
        self.touched = set()
        self.maybe_checkpoint = None
        self.maybe_fork = None
        self.trim()
        run = {
            "checkpoint_fs": self.op_checkpoint, "checkpoint_full": self.op_checkpoint, "image": self.op_image,
            "rollback": self.op_rollback, "fork": self.op_fork, "delete_sandbox": self.op_delete_sandbox,
            "delete_checkpoint": self.op_delete_checkpoint,
        }[op]
        return run(op, target, self.window(op) if target else None)

    def window(self, op: str) -> Tuple[float, float]:
        """(median, top) of ``op``'s measured durations: kill delays are drawn from [0, top], top = 1.3 x median
        (a fifth of the kills come after a typical run ended: answered, or in what follows the answer)."""
        times = self.durations[op] or [0.05]
        return statistics.median(times), 1.3 * statistics.median(times)

    def calibrate(self, runs: int) -> None:
        for _ in range(runs):
            for op in OPS:
                self.step(op, None)
                self.verify()

    def iterate(self) -> None:
        if not self.plan:
            self.plan = [(op, target) for op in OPS for target in TARGETS]
            self.rng.shuffle(self.plan)
        op, target = self.plan.pop()
        self.stats.iterations += 1
        started = time.monotonic()
        try:
            outcome = self.step(op, target)
            # A restarted daemon collects garbage: now and then every checkpoint is forked, not only those the
            # iteration touched (and one more at random).
            self.verify(everything=self.stats.iterations % FULL_CHECK_EVERY == 0)
        except (Violation, AssertionError) as e:
            self.violation(str(e))
            self.recover()
            outcome = "violation"
        except (deltabox.DeltaboxError, deltabox.CommandError) as e:
            self.violation(f"{op}/{target}: unexpected error outside the kill: {e!r}")
            self.recover()
            outcome = "violation"
        if self.verbose:
            self.log(f"{self.stats.iterations:4} {op:18} {target:7} {outcome:24} "
                     f"{time.monotonic() - started:6.2f} s  boxes {len(self.boxes)} checkpoints {len(self.cks)}")

    def recover(self) -> None:
        """After an unexpected failure: a daemon that runs, and a model rebuilt from what is listed."""
        if self.daemon.proc is None or self.daemon.proc.poll() is not None:
            self.daemon.proc = None
            self.daemon.start()
        self.client.close()
        for box in list(self.boxes.values()):
            try:
                handle(self.client, box.id).delete(keep_checkpoints=True)
            except deltabox.DeltaboxError:
                pass
        self.boxes = {}
        for sb in self.client.list():
            sb.delete(keep_checkpoints=True)
        self.removed = {}

    def finish(self) -> None:
        """A last check of every checkpoint (fork and rollback), then everything removed."""
        self.touched = set()
        self.verify(everything=True)
        for sb in self.client.list():
            sb.delete()
        for ck_id in catalog_records(self.daemon, "checkpoints"):
            try:
                self.client.checkpoint(ck_id).delete()
            except deltabox.CheckpointNotFound:
                pass

    def summary(self) -> str:
        s = self.stats
        lines = [f"iterations: {s.iterations}", "", "kills (operation, target: count per kill point; share of "
                 "the operation's median duration at the kill)"]
        lines.append(f"  {'operation':18} {'target':7} " + " ".join(f"{p:>8}" for p in POINTS)
                     + f" {'total':>6}  no shim to kill")
        for op in OPS:
            for target in TARGETS:
                counts = [s.kills.get((op, target, p), 0) for p in POINTS]
                if sum(counts):
                    cells = " ".join(f"{c:>8}" for c in counts)
                    lines.append(f"  {op:18} {target:7} {cells} {sum(counts):>6}  {s.no_shim.get((op, target), 0)}")
        lines.append(f"  {'total kills':26} {sum(s.kills.values()):>6}")
        lines += ["", "outcomes of the killed and calibration operations (ok = answered, lost = no answer)"]
        for op in OPS:
            cells = ", ".join(f"{o} {n}" for (o2, o), n in sorted(s.outcomes.items()) if o2 == op)
            lines.append(f"  {op:18} {cells}")
        lines += [
            "",
            f"checkpoints verified:       {len(s.verified)} distinct ({s.fork_checks} fork checks, "
            f"{s.rollback_checks} rollback checks)",
            f"image_failure outcomes:     {len(s.image_failures)} (full checkpoints whose shim was killed before "
            "they were durable)",
            f"adopted unanswered results: {s.adopted['checkpoint']} checkpoints, {s.adopted['fork']} forks",
            f"violations:                 {len(self.violations)}",
        ]
        lines += [f"  - {v}" for v in self.violations]
        return "\n".join(lines)


def run(binary: Path, images: Path, iterations: int, seed: int, data_dir: Optional[Path] = None,
        calibrate: int = 3, verbose: bool = False, log: Callable[[str], None] = print) -> Torture:
    """Starts a daemon, imports the image, calibrates, runs ``iterations`` kill iterations and the final check;
    returns the Torture (its ``violations`` and ``summary()``). The daemon is stopped and its directory removed."""
    workdir = Path(tempfile.mkdtemp(prefix="deltabox-torture-"))
    daemon = Daemon(binary, workdir)
    if data_dir is not None:
        daemon.data_dir = data_dir
    daemon.start()
    torture = Torture(daemon, random.Random(seed), log, verbose)
    try:
        torture.client.images.import_(str(images / IMAGE), IMAGE)
        torture.calibrate(calibrate)
        if torture.violations:
            log("violations without any kill: the checks themselves fail")
        for op in OPS:
            median, top = torture.window(op)
            log(f"  {op:18} median {1000 * median:7.1f} ms, kills within [0, {1000 * top:.1f}] ms")
        for _ in range(iterations):
            torture.iterate()
        torture.finish()
    finally:
        if daemon.proc is None:
            daemon.start()
        daemon.stop(signal.SIGTERM)
        if data_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"daemon log: {daemon.log_path}")
    return torture


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--data-dir", type=Path, default=None, help="the daemon's data directory (default: a "
                        "temporary one, removed at the end)")
    parser.add_argument("--binary", type=Path,
                        default=Path(os.environ.get("DELTABOX_BIN", REPO / "target" / "release" / "deltabox")))
    parser.add_argument("--images", type=Path,
                        default=Path(os.environ.get("DELTABOX_TEST_IMAGES", "/var/cache/deltabox/images")))
    parser.add_argument("--calibrate", type=int, default=5, help="unkilled runs of each operation to time it")
    parser.add_argument("--verbose", action="store_true", help="a line per iteration")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    print(f"seed {seed}", flush=True)
    started = time.monotonic()
    torture = run(args.binary, args.images, args.iterations, seed, args.data_dir, args.calibrate, args.verbose,
                  log=lambda line: print(line, flush=True))
    print()
    print(torture.summary())
    print(f"\nseed {seed}, {time.monotonic() - started:.0f} s")
    return 1 if torture.violations else 0


if __name__ == "__main__":
    sys.exit(main())
