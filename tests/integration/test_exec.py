"""Exec: exit status, signals, output streams and caps, stdin, timeouts, options, streaming."""

import hashlib

import pytest

import deltabox


def test_exit_code(debian):
    result = debian.exec("exit 7")
    assert (result.exit_code, result.signal, result.ok, result.timed_out) == (7, None, False, False)
    with pytest.raises(deltabox.CommandError, match="exited with code 7"):
        result.check()
    assert debian.exec(["true"]).ok


def test_killed_by_a_signal(debian):
    result = debian.exec(["sh", "-c", "kill -TERM $$; sleep 5"])
    assert (result.exit_code, result.signal, result.timed_out) == (None, 15, False)


def test_stdout_and_stderr_are_separate(debian):
    result = debian.exec("echo out; echo err >&2; echo out2")
    assert (result.stdout, result.stderr) == ("out\nout2\n", "err\n")


def test_binary_output_is_exact(debian):
    result = debian.exec(["python3", "-c", "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4)"]).check()
    assert result.stdout_bytes == bytes(range(256)) * 4


def test_output_cap_is_reported(debian):
    result = debian.exec("head -c 5000 /dev/zero | tr '\\0' o; head -c 300 /dev/zero | tr '\\0' e >&2",
                         max_output_bytes=1000).check()
    assert (len(result.stdout), result.stdout_truncated, result.stdout_dropped_bytes) == (1000, True, 4000)
    assert (len(result.stderr), result.stderr_truncated, result.stderr_dropped_bytes) == (300, False, 0)


def test_stdin(debian):
    data = bytes(range(256)) * 1000
    result = debian.exec(["sha256sum"], stdin=data).check()
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert debian.exec(["wc", "-l"], stdin="a\nb\nc\n").check().stdout.strip() == "3"
    # Without stdin the command reads end-of-file at once.
    assert debian.exec(["cat"], timeout=10).check().stdout == ""


def test_timeout_kills_the_whole_process_group(debian):
    script = "sh -c 'sleep 1000 & echo $! > /tmp/grandchild; wait' & echo $! > /tmp/child; wait"
    result = debian.exec(["sh", "-c", script], timeout=1)
    assert result.timed_out and result.signal == 9 and not result.ok
    with pytest.raises(deltabox.CommandError, match="timed out"):
        result.check()
    alive = debian.exec("for f in /tmp/child /tmp/grandchild; do [ -d /proc/$(cat $f) ] && echo $f; done; true")
    assert alive.check().stdout == ""


def test_cwd_env_user(debian):
    result = debian.exec("pwd; echo $GREETING; id -u; id -g", cwd="/usr/lib", env={"GREETING": "hi there"},
                         user="nobody").check()
    assert result.stdout.split("\n") == ["/usr/lib", "hi there", "65534", "65534", ""]
    assert debian.exec(["id", "-u"], user="1234:1234").check().stdout == "1234\n"


def test_duration_is_measured(debian):
    assert debian.exec(["sleep", "0.2"]).check().duration_ms >= 200


def test_streaming_delivers_output_while_the_command_runs(debian):
    # The command waits for a file that the test creates only after it received the first output line: the
    # line must have been delivered while the command was still running.
    debian.exec(["rm", "-f", "/tmp/go"]).check()
    script = "echo ready; while [ ! -e /tmp/go ]; do sleep 0.01; done; echo done >&2; exit 3"
    events = debian.exec_stream(["sh", "-c", script], timeout=60)
    started = next(events)
    assert isinstance(started, deltabox.Started) and started.pid > 1
    first = next(events)
    assert first == deltabox.Output("stdout", b"ready\n")
    debian.exec(["touch", "/tmp/go"]).check()
    rest = list(events)
    assert rest[:-1] == [deltabox.Output("stderr", b"done\n")]
    assert isinstance(rest[-1], deltabox.Exit) and rest[-1].result.exit_code == 3


def wait_gone(sb, pidfile):
    """Whether the process whose pid is in ``pidfile`` ends within 5 s."""
    check = f"p=$(cat {pidfile}); for i in $(seq 500); do [ -d /proc/$p ] || exit 0; sleep 0.01; done; exit 1"
    return sb.exec(["sh", "-c", check]).exit_code == 0


def test_disconnecting_kills_the_command(daemon, debian):
    impatient = deltabox.Client(socket=daemon.socket, timeout=0.5)
    with pytest.raises(deltabox.DaemonUnavailable):
        impatient.sandbox(debian.id).exec(["sh", "-c", "echo $$ > /tmp/exec-pid; sleep 1000"])
    impatient.close()
    assert wait_gone(debian, "/tmp/exec-pid")


def test_leaving_a_stream_kills_a_talking_command(debian):
    events = debian.exec_stream(["sh", "-c", "echo $$ > /tmp/talk-pid; while true; do echo tick; sleep 0.05; done"])
    assert isinstance(next(events), deltabox.Started)
    assert next(events) == deltabox.Output("stdout", b"tick\n")
    events.close()
    assert wait_gone(debian, "/tmp/talk-pid")


def test_leaving_a_stream_kills_a_silent_command(debian):
    events = debian.exec_stream(["sh", "-c", "echo $$ > /tmp/silent-pid; echo go; sleep 1000"])
    assert isinstance(next(events), deltabox.Started)
    assert next(events) == deltabox.Output("stdout", b"go\n")
    events.close()
    try:
        assert wait_gone(debian, "/tmp/silent-pid")
    finally:
        debian.exec(["sh", "-c", "kill -9 $(cat /tmp/silent-pid)"])


def test_streamed_timeout(debian):
    events = list(debian.exec_stream(["sleep", "100"], timeout=0.5))
    assert isinstance(events[-1], deltabox.Exit) and events[-1].result.timed_out
