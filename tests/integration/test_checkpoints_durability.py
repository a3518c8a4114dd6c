"""Durability: a daemon SIGKILLed at random moments while a sandbox writes and checkpoints loses no checkpoint it
reported, and its catalog never names a filesystem stack that is missing.

These tests run their own daemon (own socket and data directory), since they kill it over and over.
"""

import contextlib
import random
import signal
import threading
import time

import pytest
from support import STEP, VERIFY, catalog_records, kill_shim, leftovers, private_daemon

import deltabox



@pytest.fixture(scope="module")
def own_daemon():
    with private_daemon("deltabox-durability-") as d:
        yield d


class Writer(threading.Thread):
    """Steps and checkpoints one sandbox in a loop; what the API confirmed is recorded, failures (the daemon is
    being killed) are retried."""

    def __init__(self, daemon, sandbox_id):
        super().__init__(daemon=True)
        self.client = deltabox.Client(socket=daemon.socket, timeout=30)
        self.sandbox_id = sandbox_id
        self.reported = {}  # checkpoint id -> (step, "sha  /data/blob")
        self.stop = threading.Event()
        self.error = None
        self.sandbox_gone = False

    def run(self):
        step, state = 0, None
        sb = deltabox.Sandbox(self.client._transport, deltabox.SandboxInfo(self.sandbox_id, "busybox", "", ""))
        try:
            while not self.stop.is_set():
                try:
                    if state is None:
                        step += 1
                        state = sb.exec(["sh", "-c", STEP.format(step=step)]).check().stdout
                    ck = sb.checkpoint(fs_only=True)
                    self.reported[ck.id] = (step, state)
                    state = None
                except deltabox.DaemonUnavailable:
                    # The step may or may not have happened: redo it (a new step number) once the daemon is back.
                    state = None
                    time.sleep(0.005)
        except deltabox.SandboxNotFound:
            self.sandbox_gone = True
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e


def kill_daemon_repeatedly(daemon, rounds, rng):
    for _ in range(rounds):
        time.sleep(rng.uniform(0.05, 0.3))
        daemon.restart_after_kill()


def catalog_checkpoints(daemon):
    """Every checkpoint id in the daemon's catalog (read directly: the API lists checkpoints per live sandbox)."""
    return set(catalog_records(daemon, "checkpoints"))


def verify_by_forking(client, checkpoint_ids, reported):
    """Forks every checkpoint, checks its self-checking state (and the recorded one if the API reported it)."""
    problems = []
    for ck in sorted(checkpoint_ids):
        try:
            (fork,) = client.fork(ck)
        except deltabox.DeltaboxError as e:
            problems.append(f"{ck}: cannot fork: {e}")
            continue
        with fork:
            result = fork.exec(["sh", "-c", VERIFY])
        if not result.ok:
            problems.append(f"{ck}: corrupt state: {result.stdout!r} {result.stderr!r}")
        elif ck in reported:
            step, state = reported[ck]
            if result.stdout != f"{step}\n{state}":
                problems.append(f"{ck}: holds {result.stdout!r}, reported after step {step} {state!r}")
    return problems


def run_writer(daemon, sandbox_id, kill):
    writer = Writer(daemon, sandbox_id)
    writer.start()
    try:
        kill()
        # A last stretch without kills: the loop goes on after the final restart (or finds its sandbox gone).
        time.sleep(0.2)
    finally:
        writer.stop.set()
        writer.join(60)
    assert writer.error is None, f"the writer failed: {writer.error!r}"
    return writer


def test_every_reported_checkpoint_survives_daemon_sigkills(own_daemon):
    rng = random.Random()
    client = deltabox.Client(socket=own_daemon.socket)
    sb = client.create("busybox")
    writer = run_writer(own_daemon, sb.id, lambda: kill_daemon_repeatedly(own_daemon, 5, rng))
    reported = writer.reported
    assert not writer.sandbox_gone and len(reported) >= 10, reported
    # The shim kept the sandbox running through the kills; the restarted daemon reattached to it.
    listed = {c.id for c in sb.checkpoints()}
    missing = sorted(set(reported) - listed)
    assert not missing, f"checkpoints the API reported are not listed after restart: {missing}"
    # Every checkpoint in the catalog, also any whose answer was lost in a kill, names a complete stack.
    in_catalog = catalog_checkpoints(own_daemon)
    assert set(reported) <= in_catalog
    assert not verify_by_forking(client, in_catalog, reported)
    # And the sandbox itself goes on: its files are those of its last step.
    last = max(reported.values())
    assert sb.exec(["sh", "-c", VERIFY]).check().stdout.startswith(f"{last[0]}")
    sb.delete()


def test_reported_checkpoints_survive_a_sigkill_of_the_daemon_and_the_shim(own_daemon):
    rng = random.Random()
    client = deltabox.Client(socket=own_daemon.socket)
    sb = client.create("busybox")
    info = sb.refresh()

    def kill_both():
        kill_daemon_repeatedly(own_daemon, 2, rng)
        time.sleep(rng.uniform(0.05, 0.3))
        own_daemon.stop(signal.SIGKILL)
        kill_shim(info)
        own_daemon.start()

    writer = run_writer(own_daemon, sb.id, kill_both)
    reported = writer.reported
    assert writer.sandbox_gone and len(reported) >= 3, reported
    # The sandbox is gone with its shim (its unsaved changes with it); its checkpoints are not.
    with pytest.raises(deltabox.SandboxNotFound):
        sb.refresh()
    assert leftovers(own_daemon, sb.id, info.uid_base) == []
    for ck in reported:
        assert client.checkpoint(ck).sandbox == sb.id
    in_catalog = catalog_checkpoints(own_daemon)
    assert set(reported) <= in_catalog
    assert not verify_by_forking(client, in_catalog, reported)
    for ck in in_catalog:
        with contextlib.suppress(deltabox.CheckpointNotFound):
            client.checkpoint(ck).delete()
