"""Bad checkpoint, rollback and fork requests get clear errors and change nothing."""

import json

import pytest
from support import new_sandbox, raw_request

import deltabox

JSON = {"Content-Type": "application/json"}
UNKNOWN_CK = "ck-000000000000"
UNKNOWN_SB = "000000000000"


@pytest.fixture(scope="module")
def sb(client):
    with new_sandbox(client, "debian") as sandbox:
        sandbox.exec(["sh", "-c", "mkdir -p /work && echo kept > /work/v"]).check()
        yield sandbox


@pytest.fixture(scope="module")
def kept(sb):
    """A checkpoint of the shared sandbox."""
    return sb.checkpoint(fs_only=True)


@pytest.fixture(autouse=True)
def nothing_changed(client, sb, kept):
    """Every bad request leaves the daemon serving and the shared sandbox's checkpoints and files as they were."""
    before = [c.id for c in sb.checkpoints()]
    yield
    assert client.health()["status"] == "ok"
    assert [c.id for c in sb.checkpoints()] == before
    assert sb.files.read("/work/v") == b"kept\n"


def request(daemon, method, path, body=None, headers=None):
    data = body if isinstance(body, bytes) else (b"" if body is None else json.dumps(body).encode())
    return raw_request(daemon, method, path, data, JSON if headers is None and body is not None else headers)


@pytest.mark.parametrize("method, suffix, body", [
    ("GET", "", None),
    ("DELETE", "", None),
    ("POST", "/fork", {"count": 1}),
    ("POST", "/fork", None),
])
def test_unknown_checkpoint(daemon, method, suffix, body):
    status, answer = request(daemon, method, f"/v1/checkpoints/{UNKNOWN_CK}{suffix}", body)
    assert (status, answer["error"]) == (404, "checkpoint_not_found")
    assert UNKNOWN_CK in answer["message"]


def test_rollback_to_an_unknown_checkpoint(sb):
    with pytest.raises(deltabox.CheckpointNotFound) as err:
        sb.rollback(UNKNOWN_CK)
    assert err.value.status == 404 and UNKNOWN_CK in err.value.message


@pytest.mark.parametrize("method, suffix, body", [
    ("POST", "/checkpoints", {"fs_only": True}),
    ("GET", "/checkpoints", None),
    ("POST", "/rollback", {"checkpoint": UNKNOWN_CK}),
])
def test_unknown_sandbox(daemon, method, suffix, body):
    status, answer = request(daemon, method, f"/v1/sandboxes/{UNKNOWN_SB}{suffix}", body)
    assert (status, answer["error"]) == (404, "sandbox_not_found")
    assert UNKNOWN_SB in answer["message"]


def test_rollback_to_a_checkpoint_of_another_sandbox(client, sb):
    with new_sandbox(client, "busybox") as other:
        foreign = other.checkpoint(fs_only=True)
        with pytest.raises(deltabox.CheckpointOfAnotherSandbox) as err:
            sb.rollback(foreign)
    assert err.value.status == 400
    assert foreign.id in err.value.message and other.id in err.value.message and "fork" in err.value.message


@pytest.mark.parametrize("suffix, body, code", [
    ("/checkpoints", b'{"fs_only": true, "processes": true}', "invalid_request"),
    ("/checkpoints", b'{"fs_only": "yes"}', "invalid_request"),
    ("/checkpoints", b'{"fs_only": tru', "invalid_json"),
    ("/rollback", b"{}", "invalid_request"),
    ("/rollback", b'{"checkpoint": 7}', "invalid_request"),
    ("/rollback", b'{"checkpoint": "ck-1", "force": true}', "invalid_request"),
    ("/rollback", b"", "invalid_json"),
])
def test_malformed_bodies(daemon, sb, suffix, body, code):
    status, answer = request(daemon, "POST", f"/v1/sandboxes/{sb.id}{suffix}", body, JSON)
    assert (status, answer["error"]) == (400, code), answer
    assert answer["message"]


@pytest.mark.parametrize("count", [0, 65, 1000])
def test_fork_count_out_of_range(client, kept, count):
    before = {s.id for s in client.list()}
    with pytest.raises(deltabox.InvalidCount) as err:
        kept.fork(count)
    assert "between 1 and 64" in err.value.message
    assert {s.id for s in client.list()} == before


@pytest.mark.parametrize("body", [b'{"count": -1}', b'{"count": 1.5}', b'{"count": "2"}', b'{"count": 1, "x": 1}'])
def test_fork_count_of_the_wrong_type(daemon, kept, body):
    status, answer = request(daemon, "POST", f"/v1/checkpoints/{kept.id}/fork", body, JSON)
    assert (status, answer["error"]) == (400, "invalid_request"), answer


def test_rollback_to_a_deleted_checkpoint(client, sb):
    ck = sb.checkpoint(fs_only=True)
    ck.delete()
    with pytest.raises(deltabox.CheckpointNotFound):
        sb.rollback(ck)
    with pytest.raises(deltabox.CheckpointNotFound):
        ck.fork()
    with pytest.raises(deltabox.CheckpointNotFound):
        ck.delete()


def test_remove_with_a_bad_keep_checkpoints_keeps_the_sandbox(daemon, sb):
    status, answer = request(daemon, "DELETE", f"/v1/sandboxes/{sb.id}?keep_checkpoints=maybe")
    assert (status, answer["error"]) == (400, "invalid_request")
    assert "keep_checkpoints" in answer["message"]
    assert sb.refresh().id == sb.id
