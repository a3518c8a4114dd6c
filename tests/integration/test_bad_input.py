"""Bad input gets a clear error, and the daemon keeps serving."""

import json
import os
import uuid

import pytest
from support import new_sandbox, raw_request

import deltabox


@pytest.fixture(autouse=True)
def still_serving(client):
    yield
    assert client.health()["status"] == "ok"


def test_unknown_image(client):
    with pytest.raises(deltabox.ImageNotFound) as err:
        client.create("no-such-image")
    assert err.value.status == 404 and "no-such-image" in err.value.message
    with pytest.raises(deltabox.ImageNotFound):
        client.images.get("no-such-image")
    with pytest.raises(deltabox.ImageNotFound):
        client.images.remove("no-such-image")


@pytest.mark.parametrize("method, suffix, body", [
    ("GET", "", None),
    ("DELETE", "", None),
    ("POST", "/exec", {"cmd": ["true"]}),
    ("GET", "/sessions", None),
    ("POST", "/sessions", {"name": "x"}),
    ("POST", "/sessions/x/run", {"command": "true"}),
])
def test_unknown_sandbox_id(client, daemon, method, suffix, body):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    data = json.dumps(body).encode() if body is not None else b""
    status, answer = raw_request(daemon, method, f"/v1/sandboxes/000000000000{suffix}", data, headers)
    assert (status, answer["error"]) == (404, "sandbox_not_found")
    assert "000000000000" in answer["message"]
    with pytest.raises(deltabox.SandboxNotFound):
        client.sandbox("000000000000")


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("body, headers, code", [
    (b'{"image": "debian"', JSON, "invalid_json"),
    (b"not json at all", JSON, "invalid_json"),
    (b'{"image": "debian"}', {}, "invalid_request"),
    (b'{"image": "debian", "bogus": 1}', JSON, "invalid_request"),
    (b'{"image": 42}', JSON, "invalid_request"),
    (b"[]", JSON, "invalid_request"),
    (b'{"image": "debian", "memory": "lots"}', JSON, "invalid_request"),
    (b'{"image": "debian", "memory": 1}', JSON, "invalid_limits"),
    (b'{"image": "debian", "pids": 0}', JSON, "invalid_limits"),
    (b'{"image": "debian", "cpus": -1}', JSON, "invalid_limits"),
    (b'{"image": "debian", "network": "internet"}', JSON, "invalid_request"),
])
def test_malformed_create_requests(daemon, body, headers, code):
    status, answer = raw_request(daemon, "POST", "/v1/sandboxes", body, headers)
    assert (status, answer["error"]) == (400, code), answer
    assert answer["message"]


def test_malformed_exec_requests(daemon, debian):
    path = f"/v1/sandboxes/{debian.id}/exec"
    for body, code in [
        (b'{"cmd": "ls"}', "invalid_request"),
        (b'{"cmd": []}', "invalid_command"),
        (b'{"cmd": ["ls"], "stdin": "a", "stdin_b64": "YQ=="}', "invalid_request"),
        (b'{"cmd": ["ls"], "stdin_b64": "***"}', "invalid_request"),
        (b'{"cmd": ["ls"], "encoding": "latin1"}', "invalid_request"),
        (b'{"cmd": ["ls"}', "invalid_json"),
    ]:
        status, answer = raw_request(daemon, "POST", path, body, JSON)
        assert (status, answer["error"]) == (400, code), (body, answer)
    with pytest.raises(deltabox.BadRequest) as err:
        debian.exec(["true"], env={"A=B": "x"})
    assert err.value.code == "invalid_env"


def test_unknown_endpoint_and_method(daemon):
    assert raw_request(daemon, "GET", "/v1/nothing-here")[1]["error"] == "no_such_endpoint"
    status, answer = raw_request(daemon, "PUT", "/v1/health")
    assert (status, answer["error"]) == (405, "method_not_allowed")


def test_exec_of_a_missing_binary(debian):
    with pytest.raises(deltabox.BadRequest) as err:
        debian.exec(["/usr/bin/no-such-program", "--help"])
    assert err.value.code == "start_failed"
    assert "/usr/bin/no-such-program" in err.value.message and "No such file" in err.value.message
    # Through a shell it is an ordinary failing command.
    result = debian.exec("no-such-program")
    assert result.exit_code == 127 and "not found" in result.stderr


@pytest.mark.parametrize("option, value, code", [
    ("cwd", "/no/such/dir", "start_failed"),
    ("user", "no-such-user", "start_failed"),
])
def test_exec_with_bad_options(debian, option, value, code):
    with pytest.raises(deltabox.BadRequest) as err:
        debian.exec(["true"], **{option: value})
    assert err.value.code == code and value in err.value.message


@pytest.mark.parametrize("timeout", [0, -1])
def test_timeout_zero_or_negative(debian, timeout):
    with pytest.raises(deltabox.BadRequest) as err:
        debian.exec(["true"], timeout=timeout)
    assert err.value.code == "invalid_timeout"
    with debian.session("timeouts") as session:
        with pytest.raises(deltabox.BadRequest) as err:
            session.run("true", timeout=timeout)
        assert err.value.code == "invalid_timeout"
        assert session.run("echo usable").check().stdout == "usable\n"


def test_bad_session_names(debian):
    for name in ["", "a/b", "x" * 65, "white space"]:
        with pytest.raises(deltabox.DeltaboxError) as err:
            debian.session(name)
        assert (err.value.status, err.value.code) == (400, "bad_request"), (name, err.value)


def test_bad_image_imports(client, tmp_path):
    with pytest.raises(deltabox.BadRequest) as err:
        client.images.import_(str(tmp_path / "missing"), "x")
    assert err.value.code == "source_not_found"
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(deltabox.ImportFailed):
        client.images.import_(str(junk), "junk")
    with pytest.raises(deltabox.BadRequest) as err:
        client.images.import_(str(junk), "../evil")
    assert err.value.code == "invalid_name"
    assert "junk" not in [i.name for i in client.images.list()]


def test_file_paths_escaping_the_root(debian):
    for path in ["../../etc/passwd", "/../../etc/passwd", "/tmp/../../../etc/shadow"]:
        with pytest.raises(deltabox.PathEscapesRoot) as err:
            debian.files.read(path)
        assert err.value.status == 400
        with pytest.raises(deltabox.PathEscapesRoot):
            debian.files.write(path, b"x")


def test_symlinks_pointing_out_stay_inside(debian, tmp_path):
    secret = f"/tmp/deltabox-host-secret-{uuid.uuid4().hex}"
    with open(secret, "w") as f:
        f.write("HOST SECRET\n")
    try:
        debian.exec(["ln", "-sfn", secret, "/tmp/abs-link"]).check()
        debian.exec(["ln", "-sfn", "../../../../../../.." + secret, "/tmp/rel-link"]).check()
        for link in ["/tmp/abs-link", "/tmp/rel-link"]:
            with pytest.raises(deltabox.FileNotFound):
                debian.files.read(link)
        assert debian.files.stat("/tmp/abs-link").link_target == secret
        # A write replaces the link with a file (as rename does): the host file is untouched.
        for link in ["/tmp/abs-link", "/tmp/rel-link"]:
            debian.files.write(link, b"written inside\n")
            assert debian.files.stat(link).kind == "file"
        assert debian.exec(["cat", "/tmp/abs-link", "/tmp/rel-link"]).check().stdout == "written inside\n" * 2
        assert open(secret).read() == "HOST SECRET\n"
    finally:
        os.unlink(secret)


def test_exec_right_after_create(client):
    for _ in range(10):
        with client.create("busybox") as sb:
            assert sb.exec(["true"]).ok


def test_daemon_serves_after_all_of_it(client):
    with new_sandbox(client, "busybox") as sb:
        assert sb.exec(["echo", "alive"]).check().stdout == "alive\n"
