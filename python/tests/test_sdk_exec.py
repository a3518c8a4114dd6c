"""Exec, streamed exec and sessions (against the fake daemon in conftest.py)."""

import base64
import json

import pytest
from fake_daemon import Reply

import deltabox


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def exit_json(**fields):
    result = {
        "exit_code": 0,
        "signal": None,
        "timed_out": False,
        "oom_killed": False,
        "stdout": "",
        "stderr": "",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "stdout_dropped_bytes": 0,
        "stderr_dropped_bytes": 0,
        "duration_ms": 1.5,
    }
    result.update(fields)
    return result


@pytest.fixture
def exec_path(sandbox):
    return f"/v1/sandboxes/{sandbox.id}/exec"


def test_exec_sends_argv_and_decodes_output(fake, sandbox, exec_path):
    raw = b"caf\xc3\xa9 \xff\n"
    fake.route("POST", exec_path, Reply(200, exit_json(exit_code=3, stdout=b64(raw), stderr=b64(b"err"))))
    result = sandbox.exec(["ls", "-l"], timeout=2.5, cwd="/tmp", env={"K": "V"}, user="1000", max_output_bytes=10)
    assert fake.requests[-1].json() == {
        "cmd": ["ls", "-l"],
        "encoding": "base64",
        "stream": False,
        "timeout": 2.5,
        "cwd": "/tmp",
        "env": {"K": "V"},
        "user": "1000",
        "max_output_bytes": 10,
    }
    assert result.exit_code == 3 and not result.ok
    assert result.stdout_bytes == raw
    assert result.stdout == "café \ufffd\n"
    assert result.stderr == "err"
    assert result.duration_ms == 1.5


def test_string_command_runs_through_sh(fake, sandbox, exec_path):
    fake.route("POST", exec_path, Reply(200, exit_json()))
    sandbox.exec("echo a | wc -c")
    assert fake.requests[-1].json()["cmd"] == ["sh", "-c", "echo a | wc -c"]


def test_empty_command_is_refused_before_sending(fake, sandbox):
    with pytest.raises(ValueError):
        sandbox.exec([])
    with pytest.raises(ValueError):
        sandbox.exec(["ls", 3])
    assert [r.path for r in fake.requests] == ["/v1/sandboxes"]


def test_stdin_text_and_bytes(fake, sandbox, exec_path):
    fake.route("POST", exec_path, Reply(200, exit_json()))
    sandbox.exec(["cat"], stdin="text")
    assert fake.requests[-1].json()["stdin"] == "text"
    sandbox.exec(["cat"], stdin=b"\x00\x01")
    body = fake.requests[-1].json()
    assert "stdin" not in body and base64.b64decode(body["stdin_b64"]) == b"\x00\x01"


def test_check_raises_with_the_reason(fake, sandbox, exec_path):
    fake.route("POST", exec_path, Reply(200, exit_json(exit_code=2, stderr=b64(b"no such file\n"))))
    with pytest.raises(deltabox.CommandError, match=r"'false' exited with code 2: no such file") as err:
        sandbox.exec("false").check()
    assert err.value.result.exit_code == 2
    fake.route("POST", exec_path, Reply(200, exit_json(exit_code=None, signal=9, timed_out=True)))
    with pytest.raises(deltabox.CommandError, match="timed out"):
        sandbox.exec(["sleep", "9"]).check()
    fake.route("POST", exec_path, Reply(200, exit_json(exit_code=None, signal=9, oom_killed=True)))
    with pytest.raises(deltabox.CommandError, match="lack of memory"):
        sandbox.exec(["big"]).check()
    fake.route("POST", exec_path, Reply(200, exit_json(exit_code=None, signal=15)))
    with pytest.raises(deltabox.CommandError, match="signal 15"):
        sandbox.exec(["x"]).check()
    fake.route("POST", exec_path, Reply(200, exit_json(stdout=b64(b"fine"))))
    assert sandbox.exec(["true"]).check().stdout == "fine"


def test_start_failure_is_bad_request(fake, sandbox, exec_path):
    fake.route("POST", exec_path, Reply(400, {"error": "start_failed", "message": "nope: No such file"}))
    with pytest.raises(deltabox.BadRequest) as err:
        sandbox.exec(["nope"])
    assert err.value.code == "start_failed"


def ndjson(*events):
    return [json.dumps(e).encode() + b"\n" for e in events]


def test_exec_stream_yields_events(fake, sandbox, exec_path):
    chunks = ndjson(
        {"type": "started", "pid": 7},
        {"type": "stdout", "data": b64(b"one\n")},
        {"type": "stderr", "data": b64(b"warn\n")},
        dict(exit_json(exit_code=0), type="exit"),
    )
    # Split a line across two chunks: events are made of whole lines.
    chunks[1:2] = [chunks[1][:5], chunks[1][5:]]
    fake.route("POST", exec_path, Reply(chunks=chunks, content_type="application/x-ndjson"))
    events = list(sandbox.exec_stream(["sh", "-c", "echo one; echo warn >&2"]))
    assert fake.requests[-1].json()["stream"] is True
    assert events[0] == deltabox.Started(pid=7)
    assert events[1] == deltabox.Output("stdout", b"one\n") and events[1].text == "one\n"
    assert events[2] == deltabox.Output("stderr", b"warn\n")
    assert isinstance(events[3], deltabox.Exit) and events[3].result.ok


def test_exec_stream_error_event_raises(fake, sandbox, exec_path):
    chunks = ndjson({"type": "started", "pid": 7}, {"type": "error", "error": "internal", "message": "lost the shim"})
    fake.route("POST", exec_path, Reply(chunks=chunks))
    stream = sandbox.exec_stream(["x"])
    assert next(stream) == deltabox.Started(7)
    with pytest.raises(deltabox.DeltaboxError, match="lost the shim") as err:
        next(stream)
    assert err.value.code == "internal"


def test_leaving_a_stream_early_closes_its_connection(fake, sandbox, exec_path):
    output = [{"type": "stdout", "data": b64(b"y\n")}] * 50
    fake.route("POST", exec_path, Reply(chunks=ndjson({"type": "started", "pid": 7}, *output)))
    fake.route("GET", "/v1/health", Reply(200, {"status": "ok"}))
    stream = sandbox.exec_stream(["yes"])
    next(stream)
    stream.close()
    fake.client.health()
    # The abandoned stream's connection is not reused: the health check needed a new one.
    assert fake.requests[-1].connection != fake.requests[-2].connection


def test_session_create_run_close(fake, sandbox):
    base = f"/v1/sandboxes/{sandbox.id}/sessions"
    fake.route("POST", base, Reply(201, {"name": "main"}))
    fake.route("POST", base + "/main/run", Reply(200, exit_json(stdout="/tmp\n")))
    fake.route("DELETE", base + "/main", Reply(200, {"name": "main", "closed": True}))
    fake.route("GET", base, Reply(200, {"sessions": ["main"]}))
    with sandbox.session("main") as sess:
        assert fake.requests[-1].json() == {"name": "main"}
        result = sess.run("pwd", timeout=3, max_output_bytes=100)
        assert fake.requests[-1].json() == {"command": "pwd", "timeout": 3, "max_output_bytes": 100}
        assert result.stdout == "/tmp\n" and result.stdout_bytes == b"/tmp\n"
        assert sandbox.sessions() == ["main"]
    assert (fake.requests[-1].method, fake.requests[-1].path) == ("DELETE", base + "/main")


def test_session_handle_without_create(fake, sandbox):
    sess = sandbox.session("other", create=False)
    assert sess.name == "other"
    assert [r.path for r in fake.requests] == ["/v1/sandboxes"]


def test_session_exit_after_the_shell_ended(fake, sandbox):
    base = f"/v1/sandboxes/{sandbox.id}/sessions"
    fake.route("POST", base, Reply(201, {"name": "s"}))
    fake.route("POST", base + "/s/run", Reply(410, {"error": "session_ended", "message": "the session's shell ended"}))
    fake.route("DELETE", base + "/s", Reply(404, {"error": "session_not_found", "message": "no session"}))
    with sandbox.session("s") as sess:
        with pytest.raises(deltabox.SessionEnded):
            sess.run("exit")


def test_session_close_reports_real_failures(fake, sandbox):
    base = f"/v1/sandboxes/{sandbox.id}/sessions"
    fake.route("POST", base, Reply(201, {"name": "s"}))
    fake.route("DELETE", base + "/s", Reply(500, {"error": "internal", "message": "boom"}))
    with pytest.raises(deltabox.ServerError):
        with sandbox.session("s"):
            pass
