"""The checkpoint commands of the `deltabox` CLI, against the suite's daemon."""

import pytest
from support import new_sandbox

import deltabox


def test_checkpoint_rollback_fork_and_rm(client, cli):
    with new_sandbox(client, "busybox") as sb:
        sb.exec(["sh", "-c", "echo one > /tmp/v; setsid sleep 1000 > /dev/null 2>&1 < /dev/null &"]).check()
        made = cli("checkpoint", sb.id, "--fs-only")
        ck = made.stdout.strip()
        assert ck.startswith("ck-") and client.checkpoint(ck).sandbox == sb.id
        # The call says what a filesystem-only checkpoint means for the processes.
        assert "kept running" in made.stderr and "not captured" in made.stderr
        sb.exec(["sh", "-c", "echo two > /tmp/v"]).check()
        second = cli("checkpoint", sb.id, "--fs-only").stdout.strip()

        listing = cli("checkpoints", sb.id).stdout.splitlines()
        assert listing[0].split()[:3] == ["ID", "PARENT", "KIND"] and "SIZE" in listing[0].split()
        assert [line.split()[:3] for line in listing[1:]] == [[ck, "-", "filesystem"], [second, ck, "filesystem"]]

        rolled = cli("rollback", sb.id, ck)
        assert "1 killed" in rolled.stderr and "not restored" in rolled.stderr
        assert sb.files.read("/tmp/v") == b"one\n"

        forks = cli("fork", second, "--count", "2").stdout.split()
        assert len(forks) == 2
        for fork in forks:
            assert client.sandbox(fork).files.read("/tmp/v") == b"two\n"
        cli("rm", *forks)

        assert cli("checkpoint", "rm", second).stdout.split() == [second]
        with pytest.raises(deltabox.CheckpointNotFound):
            client.checkpoint(second)
        cli("rm", "--keep-checkpoints", sb.id)
    # Kept: it can still be forked.
    (fork,) = cli("fork", ck).stdout.split()
    cli("rm", fork)
    cli("checkpoint", "rm", ck)


def test_cli_errors(client, cli):
    with new_sandbox(client, "busybox") as sb:
        assert "checkpoint_not_found" in cli("rollback", sb.id, "ck-000000000000", ok=False).stderr
        ck = sb.checkpoint(fs_only=True)
        assert "between 1 and 64" in cli("fork", ck.id, "--count", "65", ok=False).stderr
        with new_sandbox(client, "busybox") as other:
            assert "checkpoint_of_another_sandbox" in cli("rollback", other.id, ck.id, ok=False).stderr
        assert "sandbox_not_found" in cli("checkpoints", "000000000000", ok=False).stderr
