"""Client, images, errors and the HTTP transport (against the fake daemon in conftest.py)."""

import json
import os

import pytest
from fake_daemon import SANDBOX, Reply

import deltabox
import deltabox._http


def test_health_and_keep_alive(fake):
    fake.route("GET", "/v1/health", Reply(200, {"status": "ok", "version": "0.1.0"}))
    for _ in range(5):
        assert fake.client.health() == {"status": "ok", "version": "0.1.0"}
    # Five requests, one connection: the client keeps it open.
    assert {r.connection for r in fake.requests} == {1}


def test_reconnects_after_the_daemon_closed_an_idle_connection(fake):
    fake.route("GET", "/v1/health", Reply(200, {"status": "ok"}))
    fake.route("POST", "/v1/sandboxes", Reply(201, SANDBOX))
    fake.client.health()
    fake.drop_connections()
    # Both an idempotent and a non-idempotent request go through on a new connection.
    assert fake.client.health()["status"] == "ok"
    fake.drop_connections()
    assert fake.client.create("debian").id == SANDBOX["id"]
    assert len({r.connection for r in fake.requests}) == 3


def test_a_stale_connection_is_retried_only_for_idempotent_requests(fake, monkeypatch):
    # As if the daemon closed the connection just after the client checked it: the request hits a dead socket.
    monkeypatch.setattr(deltabox._http, "_dropped", lambda conn: False)
    fake.route("GET", "/v1/health", Reply(200, {"status": "ok"}))
    fake.route("POST", "/v1/sandboxes", Reply(201, SANDBOX))
    fake.client.health()
    fake.drop_connections()
    assert fake.client.health()["status"] == "ok"
    fake.drop_connections()
    # A create may have reached the daemon before the connection broke: never sent twice.
    with pytest.raises(deltabox.DaemonUnavailable) as err:
        fake.client.create("debian")
    assert err.value.code == "connection_lost"
    assert [r.method for r in fake.requests] == ["GET", "GET"]


def test_connection_close_answers_are_not_reused(fake):
    fake.route("GET", "/v1/health", Reply(200, {"status": "ok"}, close=True))
    fake.client.health()
    fake.client.health()
    assert [r.connection for r in fake.requests] == [1, 2]


def test_missing_socket_is_daemon_unavailable(tmp_path):
    client = deltabox.Client(socket=str(tmp_path / "nothing.sock"))
    with pytest.raises(deltabox.DaemonUnavailable) as err:
        client.health()
    assert err.value.code == "daemon_unavailable"
    assert err.value.status is None
    assert "nothing.sock" in err.value.message and "deltabox serve" in err.value.message
    assert isinstance(err.value, ConnectionError)


def test_socket_from_environment(fake, monkeypatch):
    fake.route("GET", "/v1/health", Reply(200, {"status": "ok"}))
    monkeypatch.setenv("DELTABOX_SOCKET", fake.socket_path)
    assert deltabox.Client().health()["status"] == "ok"


def test_tcp_sends_bearer_token(fake_tcp, monkeypatch):
    fake_tcp.route("GET", "/v1/health", Reply(200, {"status": "ok"}))
    deltabox.Client(url=fake_tcp.url, token="s3cret-token-0123456789").health()
    assert fake_tcp.requests[-1].headers["authorization"] == "Bearer s3cret-token-0123456789"
    monkeypatch.setenv("DELTABOX_TOKEN", "from-env-0123456789")
    deltabox.Client(url=fake_tcp.url).health()
    assert fake_tcp.requests[-1].headers["authorization"] == "Bearer from-env-0123456789"


def test_bad_client_arguments():
    with pytest.raises(ValueError):
        deltabox.Client(socket="/x", url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="unsupported daemon URL"):
        deltabox.Client(url="https://example.invalid")


@pytest.mark.parametrize(
    "status, code, cls",
    [
        (404, "sandbox_not_found", deltabox.SandboxNotFound),
        (404, "image_not_found", deltabox.ImageNotFound),
        (404, "session_not_found", deltabox.SessionNotFound),
        (404, "file_not_found", deltabox.FileNotFound),
        (404, "no_such_endpoint", deltabox.NotFound),
        (400, "invalid_json", deltabox.BadRequest),
        (400, "path_escapes_root", deltabox.PathEscapesRoot),
        (401, "unauthorized", deltabox.Unauthorized),
        (405, "method_not_allowed", deltabox.MethodNotAllowed),
        (409, "image_in_use", deltabox.Conflict),
        (410, "session_ended", deltabox.SessionEnded),
        (413, "payload_too_large", deltabox.PayloadTooLarge),
        (507, "no_space", deltabox.InsufficientStorage),
        (500, "internal", deltabox.ServerError),
        (418, "teapot", deltabox.DeltaboxError),
    ],
)
def test_errors_are_typed(fake, status, code, cls):
    fake.route("GET", "/v1/sandboxes/x", Reply(status, {"error": code, "message": "it went wrong"}))
    with pytest.raises(cls) as err:
        fake.client.sandbox("x")
    assert (err.value.code, err.value.status, err.value.message) == (code, status, "it went wrong")
    assert str(err.value) == f"{code} ({status}): it went wrong"
    assert isinstance(err.value, deltabox.DeltaboxError)


def test_error_without_json_body(fake):
    fake.route("GET", "/v1/images", Reply(502, b"bad gateway\n", content_type="text/plain"))
    with pytest.raises(deltabox.ServerError) as err:
        fake.client.images.list()
    assert (err.value.code, err.value.message) == ("http_502", "bad gateway")


def test_connection_survives_an_error(fake):
    fake.route("GET", "/v1/sandboxes/x", Reply(404, {"error": "sandbox_not_found", "message": "no"}))
    fake.route("GET", "/v1/health", Reply(200, {"status": "ok"}))
    with pytest.raises(deltabox.SandboxNotFound):
        fake.client.sandbox("x")
    fake.client.health()
    assert {r.connection for r in fake.requests} == {1}


def test_create_sends_limits_and_returns_a_handle(fake):
    fake.route("POST", "/v1/sandboxes", Reply(201, dict(SANDBOX, extra_field_from_a_newer_daemon=1)))
    sb = fake.client.create("debian", memory="1G", pids=128, template_memory="256M", env={"A": "1"})
    assert fake.requests[-1].json() == {
        "image": "debian",
        "network": "none",
        "memory": "1G",
        "pids": 128,
        "template_memory": "256M",
        "env": {"A": "1"},
    }
    assert fake.requests[-1].headers["content-type"] == "application/json"
    assert sb.id == SANDBOX["id"]
    assert (sb.info.init_pid, sb.info.uid_base, sb.info.memory) == (4242, 1048576, 1 << 30)


def test_sandbox_context_manager_deletes(fake, sandbox):
    fake.route("DELETE", f"/v1/sandboxes/{sandbox.id}", Reply(200, {"id": sandbox.id, "removed": True}))
    with sandbox:
        pass
    assert (fake.requests[-1].method, fake.requests[-1].path) == ("DELETE", f"/v1/sandboxes/{sandbox.id}")


def test_sandbox_context_manager_tolerates_an_already_deleted_sandbox(fake, sandbox):
    fake.route("DELETE", f"/v1/sandboxes/{sandbox.id}", Reply(404, {"error": "sandbox_not_found", "message": ""}))
    with sandbox:
        pass


def test_list_and_lookup(fake):
    fake.route("GET", "/v1/sandboxes", Reply(200, {"sandboxes": [SANDBOX]}))
    fake.route("GET", f"/v1/sandboxes/{SANDBOX['id']}", Reply(200, SANDBOX))
    (only,) = fake.client.list()
    assert only.info == deltabox.SandboxInfo.from_json(SANDBOX)
    assert fake.client.sandbox(SANDBOX["id"]).info.image == "debian"


def test_names_are_quoted_in_paths(fake):
    fake.route("DELETE", "/v1/images/a%2Fb%20c", Reply(200, {"removed": True}))
    fake.client.images.remove("a/b c")
    assert fake.requests[-1].path == "/v1/images/a%2Fb%20c"


IMAGE = {"name": "busybox", "layers": ["sha256:aa"], "size": 123, "format": "oci_layout", "source": "/x", "created": 1}


def test_image_import_reports_progress(fake):
    events = [
        {"type": "progress", "stage": "layer 1/1", "done_bytes": 10, "total_bytes": 20},
        {"type": "progress", "stage": "layer 1/1", "done_bytes": 20, "total_bytes": 20},
        {"type": "done", "image": IMAGE},
    ]
    fake.route("POST", "/v1/images/import", Reply(chunks=[json.dumps(e).encode() + b"\n" for e in events]))
    seen = []
    image = fake.client.images.import_("/x", "busybox", progress=seen.append)
    assert image == deltabox.ImageInfo.from_json(IMAGE)
    assert [p.done_bytes for p in seen] == [10, 20]
    assert fake.requests[-1].json() == {"path": "/x", "name": "busybox"}


def test_image_import_error_event(fake):
    event = {"type": "error", "error": "import_failed", "message": "not a tar"}
    fake.route("POST", "/v1/images/import", Reply(chunks=[json.dumps(event).encode() + b"\n"]))
    with pytest.raises(deltabox.ImportFailed, match="not a tar"):
        fake.client.images.import_("/x", "busybox")


def test_image_import_without_result(fake):
    fake.route("POST", "/v1/images/import", Reply(chunks=[]))
    with pytest.raises(deltabox.DeltaboxError, match="without a result"):
        fake.client.images.import_("/x", "busybox")


def test_images_list_get_remove(fake):
    fake.route("GET", "/v1/images", Reply(200, {"images": [IMAGE]}))
    fake.route("GET", "/v1/images/busybox", Reply(200, IMAGE))
    fake.route("DELETE", "/v1/images/busybox", Reply(200, {"name": "busybox", "removed": True}))
    assert [i.name for i in fake.client.images.list()] == ["busybox"]
    assert fake.client.images.get("busybox").size == 123
    fake.client.images.remove("busybox")
    assert fake.requests[-1].method == "DELETE"


def test_client_timeout_applies_to_slow_answers(fake):
    import time

    def slow(_req):
        time.sleep(1.0)
        return Reply(200, {"status": "ok"})

    fake.route("GET", "/v1/health", slow)
    client = deltabox.Client(socket=fake.socket_path, timeout=0.2)
    with pytest.raises(deltabox.DaemonUnavailable) as err:
        client.health()
    assert err.value.code == "timeout"


def test_socket_path_must_exist_message_names_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTABOX_SOCKET", os.fspath(tmp_path / "gone.sock"))
    with pytest.raises(deltabox.DaemonUnavailable, match="DELTABOX_SOCKET"):
        deltabox.Client().images.list()
