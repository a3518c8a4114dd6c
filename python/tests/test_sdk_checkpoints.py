"""Checkpoints, rollback and fork in the SDK (against the fake daemon in conftest.py)."""

import dataclasses

import pytest
from fake_daemon import SANDBOX, Reply

import deltabox

SB = f"/v1/sandboxes/{SANDBOX['id']}"
CHECKPOINT = {
    "id": "ck-00000000abcd",
    "sandbox": SANDBOX["id"],
    "parent": "ck-000000001234",
    "kind": "filesystem",
    "created": 1700000100,
    "pause_ms": 0.81,
    "covers": ["filesystem"],
    "processes": "not captured (filesystem-only checkpoint): they kept running",
    "process_count": None,
    "durable": True,
}
ROLLBACK = {
    "sandbox": SANDBOX["id"],
    "checkpoint": CHECKPOINT["id"],
    "pause_ms": 3.5,
    "fs_ms": 1.25,
    "covers": ["filesystem"],
    "processes": "2 killed; 2 restored from the checkpoint",
    "processes_killed": 2,
    "processes_restored": 2,
    "from_image": False,
    "sessions_closed": ["main"],
    "sessions_restored": ["work"],
    "changed_inodes": 7,
}
FORKED = [dict(SANDBOX, id=f"00000000000{i}", origin=CHECKPOINT["id"], head=CHECKPOINT["id"]) for i in (1, 2)]


def test_fs_only_checkpoint(fake, sandbox):
    fake.route("POST", f"{SB}/checkpoints", Reply(201, dict(CHECKPOINT, field_of_a_newer_daemon=True)))
    ck = sandbox.checkpoint(fs_only=True)
    assert fake.requests[-1].json() == {"fs_only": True}
    assert isinstance(ck, deltabox.Checkpoint)
    assert (ck.id, ck.sandbox, ck.parent, ck.kind) == (CHECKPOINT["id"], SANDBOX["id"], CHECKPOINT["parent"],
                                                       "filesystem")
    assert (ck.pause_ms, ck.covers, ck.created) == (0.81, ["filesystem"], 1700000100)
    assert "kept running" in ck.processes
    # The handle is plain data for comparisons and printing: the connection is not part of it.
    assert "transport" not in repr(ck)
    assert ck == dataclasses.replace(ck, _transport=None)


def test_full_checkpoint_by_default(fake, sandbox):
    full = dict(CHECKPOINT, kind="full", covers=["filesystem", "processes"], process_count=3, durable=False,
                processes="3 captured", memory_bytes=1 << 20)
    fake.route("POST", f"{SB}/checkpoints", Reply(201, full))
    ck = sandbox.checkpoint()
    # Without fs_only the SDK asks for the daemon's default: files and processes.
    assert fake.requests[-1].json() == {}
    assert (ck.kind, ck.covers, ck.process_count, ck.durable) == ("full", ["filesystem", "processes"], 3, False)
    assert ck.memory_bytes == 1 << 20


def test_checkpoint_fields_of_an_older_daemon_have_defaults(fake, sandbox):
    old = {k: v for k, v in CHECKPOINT.items() if k not in ("process_count", "durable")}
    fake.route("POST", f"{SB}/checkpoints", Reply(201, old))
    ck = sandbox.checkpoint(fs_only=True)
    assert (ck.process_count, ck.durable, ck.memory_bytes) == (None, True, None)


def test_list_checkpoints(fake, sandbox):
    older = dict(CHECKPOINT, id="ck-000000001234", parent=None)
    fake.route("GET", f"{SB}/checkpoints", Reply(200, {"checkpoints": [older, CHECKPOINT]}))
    listed = sandbox.checkpoints()
    assert [c.id for c in listed] == ["ck-000000001234", CHECKPOINT["id"]]
    assert [c.parent for c in listed] == [None, "ck-000000001234"]


def test_a_fork_waiting_too_long_for_the_process_image(fake):
    error = {"error": "checkpoint_not_durable", "message": "the process image of checkpoint ck-1 is not written (yet)"}
    fake.route("POST", "/v1/checkpoints/ck-1/fork", Reply(409, error))
    with pytest.raises(deltabox.CheckpointNotDurable) as err:
        fake.client.fork("ck-1")
    assert isinstance(err.value, deltabox.Conflict)


@pytest.mark.parametrize("as_object", [True, False])
def test_rollback_takes_a_checkpoint_or_its_id(fake, sandbox, as_object):
    fake.route("GET", f"/v1/checkpoints/{CHECKPOINT['id']}", Reply(200, CHECKPOINT))
    fake.route("POST", f"{SB}/rollback", Reply(200, ROLLBACK))
    target = fake.client.checkpoint(CHECKPOINT["id"]) if as_object else CHECKPOINT["id"]
    result = sandbox.rollback(target)
    assert fake.requests[-1].json() == {"checkpoint": CHECKPOINT["id"]}
    assert fake.requests[-1].headers["content-type"] == "application/json"
    assert isinstance(result, deltabox.RollbackResult)
    assert (result.checkpoint, result.processes_killed, result.sessions_closed) == (CHECKPOINT["id"], 2, ["main"])
    assert (result.pause_ms, result.fs_ms, result.changed_inodes) == (3.5, 1.25, 7)
    assert (result.processes_restored, result.from_image, result.sessions_restored) == (2, False, ["work"])


def test_rollback_to_a_checkpoint_of_another_sandbox(fake, sandbox):
    error = {"error": "checkpoint_of_another_sandbox", "message": "fork it instead"}
    fake.route("POST", f"{SB}/rollback", Reply(400, error))
    with pytest.raises(deltabox.CheckpointOfAnotherSandbox, match="fork it instead"):
        sandbox.rollback("ck-0000000000ff")


@pytest.mark.parametrize("bad", ["", None, 42, SANDBOX])
def test_rollback_refuses_what_is_not_a_checkpoint(fake, sandbox, bad):
    with pytest.raises(TypeError):
        sandbox.rollback(bad)
    assert fake.requests[-1].method == "POST" and fake.requests[-1].path == "/v1/sandboxes"  # nothing sent


def test_fork_from_the_client_and_from_the_checkpoint(fake, sandbox):
    fake.route("POST", f"{SB}/checkpoints", Reply(201, CHECKPOINT))
    fake.route("POST", f"/v1/checkpoints/{CHECKPOINT['id']}/fork", Reply(201, {"sandboxes": FORKED}))
    ck = sandbox.checkpoint(fs_only=True)
    forks = ck.fork(2)
    assert fake.requests[-1].json() == {"count": 2}
    assert [f.id for f in forks] == ["000000000001", "000000000002"]
    assert all(isinstance(f, deltabox.Sandbox) for f in forks)
    assert {(f.info.origin, f.info.head) for f in forks} == {(CHECKPOINT["id"], CHECKPOINT["id"])}
    assert [f.id for f in fake.client.fork(CHECKPOINT["id"], count=2)] == ["000000000001", "000000000002"]
    fake.client.fork(ck)
    assert fake.requests[-1].json() == {"count": 1}
    # A fork is a full sandbox handle on the same daemon.
    fake.route("POST", "/v1/sandboxes/000000000001/exec", Reply(200, {"exit_code": 0, "stdout": "", "stderr": ""}))
    assert forks[0].exec(["true"]).ok


@pytest.mark.parametrize("bad", [True, 1.5, "2"])
def test_fork_count_must_be_an_int(fake, sandbox, bad):
    with pytest.raises(TypeError):
        fake.client.fork("ck-00000000abcd", count=bad)


def test_fork_count_out_of_range_is_a_typed_error(fake):
    error = {"error": "invalid_count", "message": "count must be between 1 and 64"}
    fake.route("POST", "/v1/checkpoints/ck-1/fork", Reply(400, error))
    with pytest.raises(deltabox.InvalidCount, match="between 1 and 64"):
        fake.client.fork("ck-1", count=65)
    assert fake.requests[-1].json() == {"count": 65}


def test_checkpoint_lookup_refresh_and_delete(fake):
    path = f"/v1/checkpoints/{CHECKPOINT['id']}"
    fake.route("GET", path, Reply(200, CHECKPOINT))
    fake.route("DELETE", path, Reply(200, {"id": CHECKPOINT["id"], "removed": True}))
    ck = fake.client.checkpoint(CHECKPOINT["id"])
    assert ck.parent == CHECKPOINT["parent"]
    fake.route("GET", path, Reply(200, dict(CHECKPOINT, parent=None)))
    assert ck.refresh().parent is None
    ck.delete()
    assert (fake.requests[-1].method, fake.requests[-1].path) == ("DELETE", path)


def test_unknown_checkpoint(fake):
    fake.route("GET", "/v1/checkpoints/ck-nope", Reply(404, {"error": "checkpoint_not_found", "message": "no"}))
    with pytest.raises(deltabox.CheckpointNotFound) as err:
        fake.client.checkpoint("ck-nope")
    assert isinstance(err.value, deltabox.NotFound) and err.value.status == 404


def test_checkpoint_ids_are_quoted(fake):
    fake.route("GET", "/v1/checkpoints/a%2F..%2Fb", Reply(200, CHECKPOINT))
    fake.client.checkpoint("a/../b")
    assert fake.requests[-1].path == "/v1/checkpoints/a%2F..%2Fb"


def test_checkpoint_failed_is_a_server_error(fake, sandbox):
    error = {"error": "checkpoint_failed", "message": "freeze the sandbox: EBUSY"}
    fake.route("POST", f"{SB}/checkpoints", Reply(500, error))
    with pytest.raises(deltabox.CheckpointFailed) as err:
        sandbox.checkpoint(fs_only=True)
    assert isinstance(err.value, deltabox.ServerError) and "EBUSY" in err.value.message


def test_checkpoint_unsupported_is_a_client_error(fake, sandbox):
    error = {"error": "checkpoint_unsupported",
             "message": "checkpoint failed: process 7, fd 3: TCP connection 127.0.0.1:8124 -> 127.0.0.1:40000"}
    fake.route("POST", f"{SB}/checkpoints", Reply(422, error))
    with pytest.raises(deltabox.CheckpointUnsupported) as err:
        sandbox.checkpoint()
    assert isinstance(err.value, deltabox.Unprocessable) and not isinstance(err.value, deltabox.ServerError)
    assert (err.value.status, err.value.code) == (422, "checkpoint_unsupported") and "fd 3" in err.value.message


def test_unknown_422_codes_are_unprocessable(fake, sandbox):
    fake.route("POST", f"{SB}/checkpoints", Reply(422, {"error": "something_new", "message": "not now"}))
    with pytest.raises(deltabox.Unprocessable) as err:
        sandbox.checkpoint()
    assert type(err.value) is deltabox.Unprocessable


def test_a_checkpoint_made_by_hand_is_not_bound(fake):
    ck = deltabox.Checkpoint(id="ck-1", sandbox="x")
    with pytest.raises(ValueError, match="not bound"):
        ck.fork()


@pytest.mark.parametrize("keep, query", [(False, {}), (True, {"keep_checkpoints": "true"})])
def test_delete_keeps_checkpoints_on_request(fake, sandbox, keep, query):
    fake.route("DELETE", SB, Reply(200, {"id": SANDBOX["id"], "removed": True}))
    sandbox.delete(keep_checkpoints=keep)
    assert (fake.requests[-1].method, fake.requests[-1].query) == ("DELETE", query)


def test_sandbox_info_has_origin_and_head(fake):
    fake.route("GET", f"{SB}", Reply(200, dict(SANDBOX, origin="ck-1", head="ck-2")))
    info = fake.client.sandbox(SANDBOX["id"]).info
    assert (info.origin, info.head) == ("ck-1", "ck-2")
    # Daemons from before checkpoints do not send the fields.
    old = deltabox.SandboxInfo.from_json(SANDBOX)
    assert (old.origin, old.head) == (None, None)
