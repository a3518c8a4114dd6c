#!/usr/bin/env python3
"""Tree search over a live sandbox (issue #16): what checkpoint/rollback costs an agent per expansion, with
DeltaBox and with the baselines a user would otherwise pick, in the same run.

    python3 bench/tree_search.py [--socket PATH] [--image debian] [--project sympy|synthetic] [--expansions 100]
                                 [--model-latency 0,2] [--methods deltabox,fs-restart,copy-restart]
                                 [--rss-mb 200] [--memory SIZE] [--revisits N] [--seed 1] [--out FILE]

The sandbox (image `debian`, one fresh sandbox per method and model latency):
  * a git repository of ~2,000 files in /root/project: the sympy 1.13.3 sdist (its dependency mpmath 1.3.0 in
    /root/deps; both fetched once with `pip download --no-binary :all:` into /var/cache/deltabox/bench/), or with
    `--project synthetic` 2,000 generated small .py files (no download); `git init && git add -A && git commit`,
    then packed as a clone would be;
  * a python3 process that imports the project (sympy, or the synthetic package) and holds an `--rss-mb` bytearray
    (every page written), writing one page and counting one tick every 20 ms; a second thread answers on the
    FIFOs /root/holder/{cmd,ack} with its tag (the node it was told it is at) and tick counter;
  * a bash session (`main`) whose cwd and exported `NODE` are the node's.
A step: append a line to 3 of the project's .py files, add tree_search/node_N.py, tell the python process its
new tag, set the session's cwd and NODE, run `git diff --stat` (all in the session). An expansion: select a node
(a seeded MCTS with progressive widening and UCT over simulated rewards: the same tree for every method), roll
back to it (unless the sandbox is at it already), verify the state, sleep the model latency, do a step,
checkpoint: the new node. The verification (not timed) fails the run, exit status 1, if anything differs from the
node: tree_search/ holds exactly the files of the node's path, node_N.py says N, `git diff --stat` sums to the
node's, the session's cwd and NODE are the node's, the python process answers the node's tag with a tick counter
at least the node's.

Methods:
  deltabox      full checkpoints (files and processes) and rollback to them;
  fs-restart    filesystem-only checkpoints (`checkpoint(fs_only=True)`) and rollback to them, which kills every
                process and ends the session; then the python process is started again (re-imports the project,
                re-allocates its memory; told the node's tag and counter) and the session re-opened (cwd and NODE
                set again);
  copy-restart  `cp -a` of the project into /root/nodes/N as the checkpoint; restore: the python process and the
                session are ended, the project replaced by a `cp -a` of the node's copy, then both started as in
                fs-restart.
C/R time of an expansion = rollback + checkpoint (+ restart) as the SDK caller waits for them; normalized time =
wall / (wall - C/R), wall being the search's time (C/R, model latency, steps; the verification left out).
Prints per method and model latency p50/p99 of C/R, of the step, normalized time, each as a ratio to the
baselines; for deltabox also the daemon's rollback pause_ms and duration_ms split by where the processes came
from (in-memory templates or the durable image), checkpoint pause_ms and API times. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import random
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import deltabox  # noqa: E402
from sandbox_latency import percentile  # noqa: E402  (same directory)

METHODS = ("deltabox", "fs-restart", "copy-restart")
SYMPY, MPMATH = "sympy==1.13.3", "mpmath==1.3.0"
CACHE = "/var/cache/deltabox/bench"
PROJECT, DEPS, HOLDER_DIR, NODES = "/root/project", "/root/deps", "/root/holder", "/root/nodes"
TICK_S = 0.02
GIT = "git -c user.name=bench -c user.email=bench@deltabox.invalid"

# argv: module to import, MB to hold, tag, counter to start from, ready-file nonce.
HOLDER = r"""
import importlib, os, sys, threading, time
module, mb, tag, count, nonce = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
importlib.import_module(module)
buf = bytearray(mb << 20)
for i in range(0, len(buf), 4096):
    buf[i] = 1
pages = max(1, len(buf) // 4096)
state = {"tag": tag, "count": count}
D = "/root/holder"
for name in ("cmd", "ack"):
    if not os.path.exists(f"{D}/{name}"):
        os.mkfifo(f"{D}/{name}")

def control():
    while True:
        with open(f"{D}/cmd") as f:
            line = f.read().strip()
        if line.startswith("tag "):
            state["tag"] = line[4:]
        with open(f"{D}/ack", "w") as f:
            f.write(f"{state['tag']} {state['count']}\n")

threading.Thread(target=control, daemon=True).start()
with open(f"{D}/pid", "w") as f:
    f.write(f"{os.getpid()}\n")
open(f"{D}/ready.{nonce}", "w").close()
page = 0
while True:
    time.sleep(0.02)
    state["count"] += 1
    if buf:
        buf[(page % pages) * 4096] = state["count"] & 0xFF
    page += 1
"""


def ask_holder(line: str) -> str:
    """Shell commands that send ``line`` to the python process and print its answer, "TAG COUNTER" (failing
    after 30 s if it does not answer)."""
    return f"timeout 30 sh -c 'echo {line} > {HOLDER_DIR}/cmd && cat {HOLDER_DIR}/ack'"


class StateMismatch(Exception):
    """The sandbox's state after a rollback is not the node's: the run fails."""


def synthetic_project(path: str, files: int = 2000) -> None:
    """``files`` small .py files in 40 packages of a package ``synth`` (imported by the python process), a README."""
    rng = random.Random(16)
    packages = 40
    per = files // packages
    os.makedirs(os.path.join(path, "synth"))
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("Synthetic project for bench/tree_search.py.\n")
    init = []
    for p in range(packages):
        pkg = os.path.join(path, "synth", f"pkg{p:02d}")
        os.makedirs(pkg)
        with open(os.path.join(pkg, "__init__.py"), "w") as f:
            f.write(f'"""Package {p}."""\n')
        init.append(f"from .pkg{p:02d} import mod000 as _m{p:02d}\n")
        for m in range(per - 1):
            consts = ", ".join(str(rng.randrange(1000)) for _ in range(8))
            with open(os.path.join(pkg, f"mod{m:03d}.py"), "w") as f:
                f.write(f'"""Module {p}.{m}."""\n\nTABLE = [{consts}]\n\n\n'
                        f"def f{m}(x):\n    return sum(t * x for t in TABLE) % {m + 7}\n\n\n"
                        f"class C{m}:\n    def __init__(self, n):\n        self.n = n\n\n"
                        f"    def value(self):\n        return f{m}(self.n)\n")
    with open(os.path.join(path, "synth", "__init__.py"), "w") as f:
        f.writelines(init)


def sympy_sdists() -> Tuple[str, str]:
    """The pinned sympy and mpmath sdists in CACHE, fetched with pip if missing."""
    paths = [os.path.join(CACHE, spec.replace("==", "-") + ".tar.gz") for spec in (SYMPY, MPMATH)]
    if not all(os.path.exists(p) for p in paths):
        os.makedirs(CACHE, exist_ok=True)
        print(f"fetching {SYMPY} {MPMATH} into {CACHE}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SYMPY, MPMATH,
                        "-d", CACHE], check=True, stdout=subprocess.DEVNULL)
    return paths[0], paths[1]


def plan_search(expansions: int, seed: int) -> List[int]:
    """The parent of each new node, in order (node 0 is the root): MCTS selection with progressive widening (a
    node gets a new child while it has fewer than sqrt(visits)) and UCT among its children, over simulated
    rewards (a random walk of hidden quality). Depends on the seed only, so every method searches the same tree."""
    rng = random.Random(seed)
    parent: List[Optional[int]] = [None]
    children: List[List[int]] = [[]]
    visits, value, quality = [1], [0.5], [0.0]
    plan = []
    for _ in range(expansions):
        node = 0
        while len(children[node]) >= max(1, int(math.sqrt(visits[node]))):
            total = visits[node]
            node = max(children[node], key=lambda c: value[c] / visits[c] + math.sqrt(2 * math.log(total) / visits[c]))
        new = len(parent)
        parent.append(node)
        children.append([])
        children[node].append(new)
        quality.append(quality[node] + rng.gauss(0, 1))
        reward = 1 / (1 + math.exp(-quality[new])) + rng.gauss(0, 0.1)
        visits.append(1)
        value.append(reward)
        x: Optional[int] = node
        while x is not None:
            visits[x] += 1
            value[x] += reward
            x = parent[x]
        plan.append(node)
    return plan


@dataclass
class Node:
    id: int
    parent: Optional[int]
    path: List[int]  # root .. self
    edited: List[str]
    cwd: str
    count: int = 0  # the python process's tick counter when told its tag (the checkpoint follows)
    diff_stat: str = ""
    ref: object = None  # the method's handle: a Checkpoint, or a node directory


@dataclass
class Stats:
    cr: List[float] = field(default_factory=list)  # ms per expansion
    restore: List[float] = field(default_factory=list)  # ms per rollback (+ restart)
    ck: List[float] = field(default_factory=list)  # ms per checkpoint
    step: List[float] = field(default_factory=list)
    model: List[float] = field(default_factory=list)
    wall: float = 0.0  # s
    rollbacks: int = 0
    verified: int = 0
    rb_api: List[float] = field(default_factory=list)
    ck_api: List[float] = field(default_factory=list)
    restart: List[float] = field(default_factory=list)
    rb_pause: Dict[str, List[float]] = field(default_factory=lambda: {"templates": [], "image": []})
    rb_duration: Dict[str, List[float]] = field(default_factory=lambda: {"templates": [], "image": []})
    ck_pause: List[float] = field(default_factory=list)
    ck_duration: List[float] = field(default_factory=list)
    holder_rss_mb: float = 0.0
    project_files: int = 0
    # --revisits: rollbacks to random nodes of the finished tree, each verified (ms, by where it restored from)
    revisit: Dict[str, List[float]] = field(default_factory=lambda: {"templates": [], "image": []})


def timed(call: Callable[[], object]) -> Tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return (time.perf_counter() - start) * 1000, result


class Search:
    """One method's run of the planned search in a fresh sandbox."""

    def __init__(self, client: deltabox.Client, args: argparse.Namespace, method: str, latency: float,
                 plan: List[int], log: Callable[[str], None]) -> None:
        self.client, self.args, self.method, self.latency, self.plan, self.log = \
            client, args, method, latency, plan, log
        self.stats = Stats()
        self.module = "sympy" if args.project == "sympy" else "synth"
        pythonpath = f"{PROJECT}:{DEPS}/mpmath-1.3.0" if args.project == "sympy" else PROJECT
        self.sb = client.create(args.image, memory=args.memory, env={"PYTHONPATH": pythonpath})
        #: What the search is doing, for the report of a failure.
        self.doing = "setting up"
        self.session: Optional[deltabox.Session] = None
        self.nodes: List[Node] = []
        self.at: Optional[int] = None  # the node the sandbox is at

    def close(self) -> None:
        try:
            self.sb.delete()
        except deltabox.DeltaboxError as e:
            self.log(f"could not delete sandbox {self.sb.id}: {e}")

    # --- the sandbox -------------------------------------------------------------------------------------------

    def sh(self, script: str, timeout: float = 600) -> str:
        result = self.sb.exec(["bash", "-c", script], timeout=timeout)
        if not result.ok:
            raise RuntimeError(f"{script[:200]!r} failed ({result.exit_code}, signal {result.signal}): "
                               f"{result.stderr.strip()[-2000:]}")
        return result.stdout

    def run(self, command: str) -> str:
        assert self.session is not None
        result = self.session.run(command, timeout=600)
        if not result.ok:
            raise RuntimeError(f"session: {command[:200]!r} failed ({result.exit_code}): {result.stderr.strip()}")
        return result.stdout

    def setup(self) -> None:
        sb = self.sb
        sb.files.mkdir(HOLDER_DIR)
        if self.args.project == "sympy":
            sympy_tar, mpmath_tar = sympy_sdists()
            with open(sympy_tar, "rb") as f:
                sb.files.upload_tar("/root/src", f)
            with open(mpmath_tar, "rb") as f:
                sb.files.upload_tar(DEPS, f)
            # The sdists' files belong to their packager's uid: root's, as in a checkout of one's own.
            self.sh(f"mv /root/src/sympy-1.13.3 {PROJECT} && rmdir /root/src && chown -R 0:0 {PROJECT} {DEPS}")
        else:
            buf = io.BytesIO()
            with tempfile.TemporaryDirectory() as tmp:
                synthetic_project(os.path.join(tmp, "project"))
                with tarfile.open(fileobj=buf, mode="w") as tar:
                    tar.add(os.path.join(tmp, "project"), arcname=".")
            buf.seek(0)
            sb.files.upload_tar(PROJECT, buf)
        self.sh(f"cd {PROJECT} && git init -q && {GIT} add -A && {GIT} commit -qm import && git gc -q")
        self.py_files = self.sh(f"cd {PROJECT} && git ls-files '*.py'").split()
        self.stats.project_files = int(self.sh(f"cd {PROJECT} && git ls-files | wc -l"))
        sb.files.write(f"{HOLDER_DIR}/holder.py", HOLDER)
        self.sh(f"mkfifo {HOLDER_DIR}/cmd {HOLDER_DIR}/ack")
        if self.method == "copy-restart":
            sb.files.mkdir(NODES)
        self.start_holder("0", 0)
        self.session = sb.session("main")
        pid = sb.files.read_text(f"{HOLDER_DIR}/pid").strip()
        rss_kb = self.sh(f"awk '/VmRSS/ {{print $2}}' /proc/{pid}/status")
        self.stats.holder_rss_mb = int(rss_kb) / 1024
        # The root: a step from the imported project (untimed), then its checkpoint.
        root = self.new_node(0, None)
        self.step(root)
        root.ref = self.checkpoint(root)
        self.nodes.append(root)
        self.at = 0

    def start_holder(self, tag: str, count: int) -> None:
        """Starts the python process and returns once it has imported the project and written its memory."""
        nonce = uuid.uuid4().hex
        ready = f"{HOLDER_DIR}/ready.{nonce}"
        self.sh(f"nohup python3 {HOLDER_DIR}/holder.py {self.module} {self.args.rss_mb} {tag} {count} {nonce} "
                f">>{HOLDER_DIR}/log 2>&1 </dev/null & "
                f"until [ -e {ready} ]; do kill -0 $! 2>/dev/null || {{ tail -5 {HOLDER_DIR}/log >&2; exit 1; }}; "
                f"sleep 0.005; done; rm {ready}", timeout=300)

    def stop_holder(self) -> None:
        self.sh(f"p=$(cat {HOLDER_DIR}/pid); kill -9 $p; while kill -0 $p 2>/dev/null; do sleep 0.005; done")

    def new_node(self, id: int, parent: Optional[int]) -> Node:
        rng = random.Random(f"{self.args.seed}:{id}")
        edited = sorted(rng.sample(self.py_files, 3))
        path = (self.nodes[parent].path if parent is not None else []) + [id]
        return Node(id, parent, path, edited, os.path.dirname(f"{PROJECT}/{edited[0]}"))

    def step(self, node: Node) -> None:
        """The agent's action, in the session: edit 3 files, add one, tell the python process, git diff --stat."""
        edits = " && ".join(f"printf '\\n# tree search node {node.id}\\n' >> {shlex.quote(f)}" for f in node.edited)
        out = self.run(
            f"cd {PROJECT} && {edits} && mkdir -p tree_search"
            f" && echo 'NODE = {node.id}' > tree_search/node_{node.id}.py"
            f" && cd {shlex.quote(node.cwd)} && export NODE={node.id} && {ask_holder(f'tag {node.id}')}"
            " && git diff --stat | tail -n 1")
        lines = out.strip().splitlines()
        tag, count = lines[0].split()
        if tag != str(node.id):
            raise StateMismatch(f"node {node.id}: the python process answered tag {tag} when told its new tag")
        node.count = int(count)
        node.diff_stat = lines[-1].strip()

    def verify(self, node: Node) -> None:
        """Fails the run if the sandbox is not at ``node`` (see the module doc)."""
        out = self.sh(f"cd {PROJECT}; head -n 1 tree_search/node_{node.id}.py || echo; ls tree_search | tr '\\n' ' ';"
                      f" echo; {ask_holder('q')} || echo none -1; git diff --stat | tail -n 1; echo",
                      timeout=120).splitlines()
        expected_files = sorted(f"node_{i}.py" for i in node.path)
        problems = []
        if out[0] != f"NODE = {node.id}":
            problems.append(f"tree_search/node_{node.id}.py holds {out[0]!r}")
        if sorted(out[1].split()) != expected_files:
            problems.append(f"tree_search/ holds {sorted(out[1].split())}, not {expected_files}")
        tag, count = (out[2].split() + ["?", "-1"])[:2]
        if tag != str(node.id) or int(count) < node.count:
            problems.append(f"the python process is at tag {tag} counter {count}, not tag {node.id} counter >= "
                            f"{node.count}")
        if out[3].strip() != node.diff_stat:
            problems.append(f"git diff --stat: {out[3].strip()!r}, not {node.diff_stat!r}")
        session = self.run('echo "$NODE $(pwd)"').strip()
        if session != f"{node.id} {node.cwd}":
            problems.append(f"the session answers NODE and cwd {session!r}, not '{node.id} {node.cwd}'")
        if problems:
            raise StateMismatch(f"{self.method}: after the rollback to node {node.id}: " + "; ".join(problems))
        self.stats.verified += 1

    # --- the method's checkpoint and restore -------------------------------------------------------------------

    def checkpoint(self, node: Node) -> object:
        if self.method == "copy-restart":
            self.sh(f"cp -a {PROJECT} {NODES}/{node.id}")
            return f"{NODES}/{node.id}"
        ms, ck = timed(lambda: self.sb.checkpoint(fs_only=self.method == "fs-restart"))
        self.stats.ck_api.append(ms)
        self.stats.ck_pause.append(ck.pause_ms)
        self.stats.ck_duration.append(ck.duration_ms)
        return ck

    def restore(self, node: Node) -> None:
        if self.method == "deltabox":
            ms, rb = timed(lambda: self.sb.rollback(node.ref))
            self.stats.rb_api.append(ms)
            source = "image" if rb.from_image else "templates"
            self.stats.rb_pause[source].append(rb.pause_ms)
            self.stats.rb_duration[source].append(rb.duration_ms)
            if rb.processes_restored < 1 or "main" not in rb.sessions_restored:
                raise StateMismatch(f"rollback to node {node.id}: {rb}")
            return
        start = time.perf_counter()
        if self.method == "fs-restart":
            ms, rb = timed(lambda: self.sb.rollback(node.ref))
            self.stats.rb_api.append(ms)
        else:
            self.session.close()
            self.stop_holder()
            self.sh(f"rm -rf {PROJECT} && cp -a {node.ref} {PROJECT}")
        restart = time.perf_counter()
        self.start_holder(str(node.id), node.count)
        self.session = self.sb.session("main")
        self.run(f"cd {shlex.quote(node.cwd)} && export NODE={node.id}")
        now = time.perf_counter()
        self.stats.restart.append((now - restart) * 1000)
        if self.method == "copy-restart":
            self.stats.rb_api.append((restart - start) * 1000)

    # --- the search ----------------------------------------------------------------------------------------------

    def search(self) -> Stats:
        st = self.stats
        for i, parent in enumerate(self.plan):
            begin = time.perf_counter()
            cr = 0.0
            if parent != self.at:
                self.doing = f"expansion {i + 1}: restoring node {parent} (at node {self.at})"
                ms, _ = timed(lambda: self.restore(self.nodes[parent]))
                st.restore.append(ms)
                cr += ms
                st.rollbacks += 1
            verify_start = time.perf_counter()
            self.verify(self.nodes[parent])
            verify_s = time.perf_counter() - verify_start
            ms, _ = timed(lambda: time.sleep(self.latency))
            st.model.append(ms)
            node = self.new_node(len(self.nodes), parent)
            self.doing = f"expansion {i + 1}: step and checkpoint of node {node.id}"
            ms, _ = timed(lambda: self.step(node))
            st.step.append(ms)
            ms, node.ref = timed(lambda: self.checkpoint(node))
            st.ck.append(ms)
            cr += ms
            self.nodes.append(node)
            self.at = node.id
            st.cr.append(cr)
            st.wall += time.perf_counter() - begin - verify_s
            if (i + 1) % 10 == 0 or i + 1 == len(self.plan):
                self.log(f"  {self.method} latency {self.latency:g} s: {i + 1}/{len(self.plan)} expansions, "
                         f"{st.rollbacks} rollbacks, C/R p50 {percentile(st.cr, 50):.1f} ms")
        return st

    def revisit(self, count: int) -> None:
        """Rolls back ``count`` times to random nodes of the finished tree (deltabox only), each verified."""
        rng = random.Random(f"{self.args.seed}:revisits")
        for i in range(count):
            node = self.nodes[rng.randrange(len(self.nodes))]
            self.doing = f"revisit {i + 1}: rollback to node {node.id} (at node {self.at})"
            rb = self.sb.rollback(node.ref)
            self.stats.revisit["image" if rb.from_image else "templates"].append(rb.duration_ms)
            self.at = node.id
            self.verify(node)
            if (i + 1) % 100 == 0 or i + 1 == count:
                self.log(f"  revisits: {i + 1}/{count}")


def fmt_p(samples: List[float]) -> str:
    if not samples:
        return f"{'-':>8} {'-':>8}"
    return f"{percentile(samples, 50):8.1f} {percentile(samples, 99):8.1f}"


def normalized(st: Stats) -> float:
    return st.wall / (st.wall - sum(st.cr) / 1000)


def report(results: Dict[Tuple[str, float], Stats], args: argparse.Namespace, out: Callable[[str], None]) -> None:
    for latency in args.model_latency:
        rows = {m: results[(m, latency)] for m in args.methods if (m, latency) in results}
        if not rows:
            continue
        any_st = next(iter(rows.values()))
        out(f"\nmodel latency {latency:g} s: {args.expansions} expansions, {any_st.rollbacks} of them after a "
            f"rollback (the others continue from the node just made); project {any_st.project_files} files; "
            f"python process RSS {any_st.holder_rss_mb:.0f} MB")
        header = (f"{'method':13} {'C/R p50':>8} {'C/R p99':>8} {'C/R mean':>8} {'restore':>8} {'rst p99':>8} "
                  f"{'ckpt p50':>8} {'ckpt p99':>8} {'step p50':>8} {'wall s':>7} {'normalized':>10}  "
                  f"{'vs fs-restart':>17}  {'vs copy-restart':>17}")
        out(header)
        out("-" * len(header))
        for method, st in rows.items():
            ratios = []
            for base in ("fs-restart", "copy-restart"):
                b = rows.get(base)
                if b is None or base == method:
                    ratios.append(f"{'':17}")
                else:
                    ratios.append(f"{statistics.fmean(st.cr) / statistics.fmean(b.cr):7.3f}x "
                                  f"{normalized(st) / normalized(b):7.3f}x")
            out(f"{method:13} {fmt_p(st.cr)} {statistics.fmean(st.cr):8.1f} {fmt_p(st.restore)} {fmt_p(st.ck)} "
                f"{percentile(st.step, 50):8.1f} {st.wall:7.1f} {normalized(st):10.4f}  " + "  ".join(ratios).rstrip())
        d = rows.get("deltabox")
        if d is not None:
            n_img, n_tpl = len(d.rb_pause["image"]), len(d.rb_pause["templates"])
            out(f"deltabox, as the daemon reports it: {n_tpl} rollbacks restored the processes from in-memory "
                f"templates, {n_img} from the durable image (ms)")
            out(f"{'':38} {'p50':>8} {'p99':>8}")
            out(f"{'checkpoint: api':38} {fmt_p(d.ck_api)}")
            out(f"{'checkpoint: pause_ms':38} {fmt_p(d.ck_pause)}")
            out(f"{'checkpoint: duration_ms':38} {fmt_p(d.ck_duration)}")
            out(f"{'rollback: api':38} {fmt_p(d.rb_api)}")
            for source in ("templates", "image"):
                out(f"{'rollback from ' + source + ': pause_ms':38} {fmt_p(d.rb_pause[source])}")
                out(f"{'rollback from ' + source + ': duration_ms':38} {fmt_p(d.rb_duration[source])}")
        if d is not None and any(d.revisit.values()):
            out(f"deltabox, {sum(map(len, d.revisit.values()))} rollbacks to random nodes of the finished tree, each "
                f"verified (daemon duration_ms):")
            for source in ("templates", "image"):
                out(f"{'revisit from ' + source + f' ({len(d.revisit[source])})':38} {fmt_p(d.revisit[source])}")
        for base in ("fs-restart", "copy-restart"):
            b = rows.get(base)
            if b is None:
                continue
            what = "rollback api" if base == "fs-restart" else "stop + rm -rf + cp -a back"
            out(f"{base}, restore = {what} p50/p99 {percentile(b.rb_api, 50):.1f}/{percentile(b.rb_api, 99):.1f} ms"
                f" + restart (python process, session) p50/p99 {percentile(b.restart, 50):.1f}/"
                f"{percentile(b.restart, 99):.1f} ms" if b.rb_api else f"{base}: no rollback")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="daemon socket (default: $DELTABOX_SOCKET or the default socket)")
    parser.add_argument("--image", default="debian", help="image with python3, git and bash (default: debian)")
    parser.add_argument("--project", choices=("sympy", "synthetic"), default="sympy")
    parser.add_argument("--expansions", type=int, default=100)
    parser.add_argument("--model-latency", default="0,2", help="seconds per step, comma-separated (default 0,2)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    parser.add_argument("--rss-mb", type=int, default=200, help="memory the python process holds besides the "
                        "imported project (default 200)")
    parser.add_argument("--memory", help="memory limit of each sandbox, e.g. 2G (default: the daemon's default)")
    parser.add_argument("--revisits", type=int, default=0, help="after the deltabox search at the first model "
                        "latency, this many rollbacks to random nodes of the tree, each verified (default 0)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", help="also write the printed report to this file")
    args = parser.parse_args()
    args.model_latency = [float(s) for s in args.model_latency.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")

    lines: List[str] = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    client = deltabox.Client(socket=args.socket)
    version = client.health().get("version")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    plan = plan_search(args.expansions, args.seed)
    out(f"# bench/tree_search.py {' '.join(sys.argv[1:])}")
    out(f"# {datetime.date.today()}, deltabox {version} at {commit or '?'}, {os.cpu_count()} CPUs; seed {args.seed}; "
        f"project {args.project}; {args.rss_mb} MB held; sandbox memory {args.memory or 'the daemon default'}; "
        f"tree of {args.expansions + 1} nodes, {sum(1 for i, p in enumerate(plan) if p != i)} rollbacks planned")
    out("C/R = rollback (+ restart) + checkpoint per expansion, as the SDK caller waits, ms; restore = rollback "
        "(+ restart), over\nthe expansions that roll back; ckpt = checkpoint; step = the agent's action; normalized "
        "= wall / (wall - C/R);\nvs: this row's C/R mean and normalized time over the baseline's")
    results: Dict[Tuple[str, float], Stats] = {}
    failed = None
    for latency in args.model_latency:
        for method in args.methods:
            log(f"{method}, model latency {latency:g} s: setting up")
            search = Search(client, args, method, latency, plan, log)
            try:
                search.setup()
                results[(method, latency)] = search.search()
                if method == "deltabox" and latency == args.model_latency[0] and args.revisits:
                    search.revisit(args.revisits)
            except StateMismatch as e:
                failed = f"STATE VERIFICATION FAILED: {e}"
            except deltabox.DeltaboxError as e:
                failed = f"DAEMON ERROR ({method}, latency {latency:g} s, {search.doing}): {type(e).__name__}: {e}"
            except RuntimeError as e:
                failed = f"FAILED ({method}, latency {latency:g} s, {search.doing}): {e}"
            finally:
                search.close()
            if failed:
                break
        if failed:
            break
    report(results, args, out)
    if failed is None:
        verified = sum(st.verified for st in results.values())
        out(f"\nstate verified at every expansion ({verified} checks): files, git diff, python process, session")
        for latency in args.model_latency:
            st = results.get(("deltabox", latency))
            if st is not None and latency >= 2:
                out(f"deltabox normalized time at {latency:g} s model latency: {normalized(st):.4f} "
                    f"({'meets' if normalized(st) <= 1.02 else 'misses'} the issue's <= 1.02; the paper: 1.03-1.06)")
    else:
        out("\n" + failed)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
