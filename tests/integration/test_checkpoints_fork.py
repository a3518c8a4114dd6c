"""Forks of checkpoints, and what deleting sandboxes and checkpoints keeps and frees."""

import concurrent.futures
import contextlib
import dataclasses
import subprocess

import pytest
from support import new_sandbox, status_field, wait_pid_dead

import deltabox


@pytest.fixture
def sandboxes(client):
    """Makes sandboxes (``sandboxes()``) and collects forks (``sandboxes.add``); removes what is left at the end."""
    made = []

    def make(image="debian", **options):
        made.append(new_sandbox(client, image, **options))
        return made[-1]

    make.add = made.extend
    yield make
    for sb in made:
        with contextlib.suppress(deltabox.SandboxNotFound):
            sb.delete()


def sh(sb, script):
    return sb.exec(["sh", "-c", script]).check().stdout


def line_of_checkpoints(sb, *values):
    """Writes each value to /work/v and checkpoints after each: a line of checkpoints, one per value."""
    made = []
    for value in values:
        sh(sb, f"mkdir -p /work && echo {value} > /work/v")
        made.append(sb.checkpoint(fs_only=True))
    return made


def test_forks_are_isolated_from_each_other_and_from_the_source(sandboxes):
    source = sandboxes(memory="256M", pids=200, env={"BRANCH_VAR": "from-source"})
    sh(source, "mkdir -p /work && echo base > /work/state")
    ck = source.checkpoint(fs_only=True)
    forks = ck.fork(3)
    sandboxes.add(forks)
    assert len({f.id for f in forks} | {source.id}) == 4
    assert len({f.info.uid_base for f in forks} | {source.info.uid_base}) == 4
    for f in forks:
        assert (f.info.origin, f.info.head, f.info.image) == (ck.id, ck.id, "debian")
        # The checkpoint's configuration: limits and environment.
        assert (f.info.memory, f.info.pids, f.info.network) == (256 << 20, 200, "none")
        assert sh(f, "echo $BRANCH_VAR") == "from-source\n"
        # Its own hostname (the id), also in /etc/hostname.
        assert sh(f, "hostname; cat /etc/hostname") == f"{f.id}\n{f.id}\n"
        assert sh(f, "cat /work/state") == "base\n"
        sh(f, f"echo {f.id} > /work/state && touch /work/only-{f.id}")
    sh(source, "echo source-after > /work/state && touch /work/only-source && (setsid sleep 1000 &)")
    for f in forks:
        assert sh(f, "cat /work/state; ls /work") == f"{f.id}\nonly-{f.id}\nstate\n"
        assert "sleep" not in sh(f, "ps -eo args")
    assert sh(source, "cat /work/state; ls /work") == "source-after\nonly-source\nstate\n"
    assert ck.sandbox == source.id and source.refresh().head == ck.id


RANDOM_SERVER = r"""
import os, random, sys
random.seed(42)
random.random()  # some state consumed before the checkpoint
os.mkfifo("/tmp/ask"); os.mkfifo("/tmp/answer")
while True:
    with open("/tmp/ask") as ask:
        ask.read()
    with open("/tmp/answer", "w") as out:
        out.write(f"{random.random()} {os.urandom(8).hex()}")
"""


def test_forks_share_a_process_s_prng_state_not_the_kernel_s_randomness(sandboxes):
    """What docs/api.md says a fork shares: a process's own PRNG state is copied with its memory (the same
    sequence in every fork, until reseeded), while the kernel's randomness (getrandom, /dev/urandom) is fresh in
    each."""
    source = sandboxes()
    source.files.write("/root/server.py", RANDOM_SERVER)
    sh(source, "(setsid python3 /root/server.py > /dev/null 2>&1 &); while [ ! -p /tmp/answer ]; do sleep 0.01; done")
    ck = source.checkpoint()
    forks = ck.fork(2)
    sandboxes.add(forks)
    answers = [sh(f, "echo > /tmp/ask; cat /tmp/answer").split() for f in forks]
    (prng_a, urandom_a), (prng_b, urandom_b) = answers
    assert prng_a == prng_b, answers
    assert urandom_a != urandom_b, answers


def test_fork_of_a_checkpoint_of_a_forked_sandbox(client, sandboxes):
    a = sandboxes()
    sh(a, "mkdir -p /work && echo from-a > /work/a")
    c1 = a.checkpoint(fs_only=True)
    (b,) = c1.fork()
    sandboxes.add([b])
    sh(b, "echo from-b > /work/b && rm /work/a")
    c2 = b.checkpoint(fs_only=True)
    assert (c2.sandbox, c2.parent) == (b.id, c1.id)
    (c,) = client.fork(c2)
    sandboxes.add([c])
    assert (c.info.origin, sh(c, "ls /work; cat /work/b")) == (c2.id, "b\nfrom-b\n")
    # A sandbox may roll back to the checkpoints it descends from, even those taken in another sandbox ...
    c.rollback(c1)
    assert sh(c, "ls /work; cat /work/a") == "a\nfrom-a\n"
    c.rollback(c2)
    assert sh(c, "ls /work") == "b\n"
    b.rollback(c1)
    assert sh(b, "ls /work") == "a\n"
    # ... but not to a checkpoint of a branch it does not descend from.
    with pytest.raises(deltabox.CheckpointOfAnotherSandbox) as err:
        a.rollback(c2)
    assert c2.id in err.value.message and "fork" in err.value.message
    assert sh(a, "ls /work") == "a\n"


def test_deleting_the_source_keeps_the_checkpoints_forks_use(client, sandboxes):
    a = sandboxes()
    c1, c2, c3 = line_of_checkpoints(a, 1, 2, 3)
    (b,) = c2.fork()
    sandboxes.add([b])
    sh(b, "echo b > /work/v")
    a.delete()
    # c2 is b's origin: kept (its parent is gone, so it now starts the line); c1 and c3 were a's alone.
    for unused in (c1, c3):
        with pytest.raises(deltabox.CheckpointNotFound):
            client.checkpoint(unused.id)
    kept = client.checkpoint(c2.id)
    assert (kept.sandbox, kept.parent) == (a.id, None)
    # It can still be rolled back to and forked, with its content.
    b.rollback(c2)
    assert sh(b, "cat /work/v") == "2\n"
    (again,) = kept.fork()
    sandboxes.add([again])
    assert sh(again, "cat /work/v") == "2\n"
    with pytest.raises(deltabox.SandboxNotFound):
        a.checkpoints()


def test_a_checkpoint_taken_on_top_of_another_sandboxs_keeps_it(client, sandboxes):
    a = sandboxes()
    sh(a, "mkdir -p /work && echo a > /work/v")
    c1 = a.checkpoint(fs_only=True)
    (b,) = c1.fork()
    sh(b, "echo b > /work/v")
    d1 = b.checkpoint(fs_only=True)
    b.delete(keep_checkpoints=True)
    a.delete()
    # d1 outlived b (kept) and c1 outlived a (d1 is built on it): both still fork.
    assert client.checkpoint(d1.id).parent == c1.id
    for ck, content in ((c1, "a\n"), (d1, "b\n")):
        (f,) = client.fork(ck.id)
        sandboxes.add([f])
        assert sh(f, "cat /work/v") == content
    client.checkpoint(d1.id).delete()
    client.checkpoint(c1.id).delete()


def test_keep_checkpoints(client, sandboxes):
    a = sandboxes()
    c1, c2 = line_of_checkpoints(a, "one", "two")
    a.delete(keep_checkpoints=True)
    # The same checkpoint, but for `durable`, which turns true in the background.
    assert dataclasses.replace(client.checkpoint(c1.id), durable=c1.durable) == c1
    assert client.checkpoint(c2.id).parent == c1.id
    (f,) = client.checkpoint(c2.id).fork()
    sandboxes.add([f])
    assert sh(f, "cat /work/v") == "two\n"
    c2.delete()
    c1.delete()
    with pytest.raises(deltabox.CheckpointNotFound):
        client.checkpoint(c1.id)


def test_checkpoint_rm_relinks_children_and_moves_the_head(client, sandboxes):
    a = sandboxes()
    sh(a, "mkdir -p /work && echo 1 > /work/one")
    c1 = a.checkpoint(fs_only=True)
    sh(a, "echo 2 > /work/two")
    c2 = a.checkpoint(fs_only=True)
    sh(a, "echo 3 > /work/three")
    c3 = a.checkpoint(fs_only=True)
    c2.delete()
    assert [(c.id, c.parent) for c in a.checkpoints()] == [(c1.id, None), (c3.id, c1.id)]
    # c3's content still includes what was written before c2.
    sh(a, "rm -rf /work")
    a.rollback(c3)
    assert sh(a, "ls /work") == "one\nthree\ntwo\n"
    with pytest.raises(deltabox.CheckpointNotFound):
        a.rollback(c2)
    # Deleting the head moves it to the head's parent: the next checkpoint descends from there.
    c3.delete()
    assert a.refresh().head == c1.id
    assert a.checkpoint(fs_only=True).parent == c1.id
    assert sh(a, "ls /work") == "one\nthree\ntwo\n"


def test_deleting_a_forks_origin_keeps_its_ancestors_reachable(client, sandboxes):
    a = sandboxes()
    c1, c2 = line_of_checkpoints(a, 1, 2)
    (b,) = c2.fork()
    sandboxes.add([b])
    c2.delete()
    assert b.refresh().head == c1.id
    b.rollback(c1)
    assert sh(b, "cat /work/v") == "1\n"
    assert b.refresh().origin == c1.id


def rollback_unless_gone(sb, ck):
    with contextlib.suppress(deltabox.CheckpointNotFound):
        sb.rollback(ck)


def disk_usage_kib(path):
    """Allocated KiB below ``path`` on the host (du: sparse files count what they use)."""
    return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def shim_pid(sb):
    """The host pid of the sandbox's shim (the parent of its init)."""
    return int(status_field(sb.refresh().init_pid, "PPid"))


def test_removing_everything_frees_the_filesystem_data(client, daemon, sandboxes):
    store = daemon.data_dir / "deltafs"
    helper = sandboxes("busybox")
    before = disk_usage_kib(store)
    a = sandboxes()
    sh(a, "mkdir -p /work && head -c 32M /dev/urandom > /work/big")
    c1 = a.checkpoint(fs_only=True)
    sh(a, "head -c 16M /dev/urandom > /work/big2 && dd if=/dev/urandom of=/work/big bs=1M count=4 conv=notrunc "
          "status=none")
    c2 = a.checkpoint(fs_only=True)
    forks = c1.fork(2) + c2.fork(1)
    sandboxes.add(forks)
    for f in forks:
        sh(f, "head -c 8M /dev/urandom > /work/mine")
    grown = disk_usage_kib(store)
    assert grown - before >= (32 + 16 + 4 + 3 * 8) * 1024
    shims = [shim_pid(sb) for sb in [a, *forks]]
    for f in forks:
        f.delete()
    # The forks' own data may be gone; the checkpoints' data is still needed.
    assert disk_usage_kib(store) - before >= (32 + 16) * 1024
    a.delete()
    for ck in (c1, c2):
        with pytest.raises(deltabox.CheckpointNotFound):
            client.checkpoint(ck.id)
    # Each removal collects garbage, but a removed sandbox's shim may still hold its layers for a moment (see the
    # next test): once the shims are gone, one more collection (any checkpoint deletion runs one) frees it all.
    for pid in shims:
        wait_pid_dead(pid)
    helper.checkpoint(fs_only=True).delete()
    after = disk_usage_kib(store)
    assert after - before < 4 * 1024, \
        f"{after - before} KiB of {grown - before} KiB left in {store}; the daemon's log:\n{daemon.log_tail()}"


def test_deleting_an_older_checkpoint_frees_what_only_it_read(client, daemon, sandboxes):
    store = daemon.data_dir / "deltafs"
    a = sandboxes()
    sh(a, "mkdir -p /work && head -c 24M /dev/urandom > /work/log")
    c1 = a.checkpoint(fs_only=True)
    sh(a, "head -c 24M /dev/urandom > /work/log && echo small > /work/small")
    digest = sh(a, "md5sum /work/log")
    c2 = a.checkpoint(fs_only=True)
    sh(a, "rm /work/log")
    before = disk_usage_kib(store)
    # c1's layer stays (c2 is stacked on it), but nothing reads its copy of the log any more.
    c1.delete()
    freed = before - disk_usage_kib(store)
    assert freed >= 20 * 1024, f"{freed} KiB freed; the daemon's log:\n{daemon.log_tail()}"
    a.rollback(c2)
    assert sh(a, "md5sum /work/log; cat /work/small") == digest + "small\n"
    (b,) = c2.fork()
    sandboxes.add([b])
    assert sh(b, "md5sum /work/log") == digest
    with pytest.raises(deltabox.CheckpointNotFound):
        a.rollback(c1)


def test_removing_a_sandbox_frees_its_data_at_once(daemon, sandboxes):
    store = daemon.data_dir / "deltafs"
    for _ in range(3):
        before = disk_usage_kib(store)
        sb = sandboxes()
        sh(sb, "head -c 16M /dev/urandom > /tmp/big")
        forks = sb.checkpoint(fs_only=True).fork(2)
        for f in forks:
            f.delete()
        sb.delete()
        assert disk_usage_kib(store) - before < 1024


def test_deleting_a_checkpoint_during_a_rollback_to_it_leaves_no_dangling_link(client, sandboxes):
    sb = sandboxes("busybox")
    for i in range(10):
        sh(sb, f"echo {i} > /tmp/v")
        ck = sb.checkpoint(fs_only=True)
        sh(sb, "echo changed > /tmp/v")
        # Futures hand an exception of either racer back to the test.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            racers = [pool.submit(rollback_unless_gone, sb, ck), pool.submit(ck.delete)]
            for racer in racers:
                racer.result(timeout=30)
        head = sb.refresh().head
        parent = sb.checkpoint(fs_only=True).parent
        for link in (head, parent):
            if link is not None:
                client.checkpoint(link)  # raises CheckpointNotFound for a dangling link
