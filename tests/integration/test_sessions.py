"""Persistent bash sessions, as coding agents use them."""

import pytest
from support import wait_until

import deltabox


@pytest.fixture
def shell(debian):
    with debian.session("main") as s:
        yield s


def test_state_persists_between_calls(shell):
    shell.run("cd /tmp && export COLOR=blue && LOCAL=unexported && greet() { echo \"hello $1\"; }").check()
    shell.run("alias ll='echo aliased'").check()
    result = shell.run("pwd; echo $COLOR $LOCAL; greet agent; bash -c 'echo child sees $COLOR'").check()
    assert result.stdout == "/tmp\nblue unexported\nhello agent\nchild sees blue\n"


def test_exit_status_and_streams(shell):
    result = shell.run("echo out; echo err >&2; false")
    assert (result.exit_code, result.stdout, result.stderr) == (1, "out\n", "err\n")
    assert shell.run("(exit 42)").exit_code == 42


def test_background_jobs_persist(shell):
    shell.run("sleep 1000 & echo started").check()
    assert "sleep 1000" in shell.run("jobs").check().stdout
    result = shell.run("kill %1; wait %1; echo status $?").check()
    assert result.stdout.strip().endswith("status 143")
    assert shell.run("jobs").check().stdout == ""


def test_commands_do_not_hold_the_session_pipes(shell):
    """A command (and a daemon it starts) gets the session's output pipes as stdout and stderr only, not the
    pipe the next commands come through: it could read them, and a daemon running as another user would hold a
    pipe it cannot open again when it is restored."""
    shell.run("sleep 1000 > /dev/null 2>&1 & echo $! > /tmp/bg.pid").check()
    fds = shell.run("ls /proc/$(cat /tmp/bg.pid)/fd | sort -n | tr '\\n' ' '").check().stdout
    assert fds.split() == ["0", "1", "2"], fds
    # The shell got them back for the next commands.
    assert shell.run("echo still here").check().stdout == "still here\n"
    shell.run("kill $(cat /tmp/bg.pid)").check()


@pytest.mark.parametrize("command", ["sleep 1000", "while true; do :; done"])
def test_timeout_interrupts_but_keeps_the_session(shell, command):
    shell.run("cd /usr && export KEEP=yes").check()
    result = shell.run(command, timeout=1)
    assert result.timed_out and not result.ok
    assert shell.run("pwd; echo $KEEP").check().stdout == "/usr\nyes\n"


def test_several_sessions_by_name(debian):
    with debian.session("one") as one, debian.session("two") as two:
        one.run("cd /etc; X=1").check()
        two.run("cd /var; X=2").check()
        assert one.run("pwd; echo $X").stdout == "/etc\n1\n"
        assert two.run("pwd; echo $X").stdout == "/var\n2\n"
        assert {"one", "two"} <= set(debian.sessions())
        with pytest.raises(deltabox.Conflict) as err:
            debian.session("one")
        assert err.value.code == "session_exists"
    assert not {"one", "two"} & set(debian.sessions())


def test_exit_ends_the_session(debian):
    session = debian.session("ending")
    with pytest.raises(deltabox.SessionEnded):
        session.run("exit")
    # The daemon forgets the ended session (once init reported the shell's exit, which may come a moment later).
    wait_until(lambda: "ending" not in debian.sessions(), 10, 0.01, "the ended session to be unlisted")
    with pytest.raises(deltabox.SessionNotFound):
        session.run("echo still there?")


def test_ended_session_answers_consistently(debian):
    for i in range(10):
        session = debian.session(f"ended-{i}")
        with pytest.raises(deltabox.SessionEnded):
            session.run("exit")
        for _ in range(2):
            with pytest.raises((deltabox.SessionEnded, deltabox.SessionNotFound)):
                session.run("true")


def test_closed_and_unknown_sessions(debian):
    session = debian.session("closing")
    session.close()
    with pytest.raises(deltabox.SessionNotFound):
        session.run("echo")
    with pytest.raises(deltabox.SessionNotFound):
        debian.session("never-created", create=False).run("echo")
    with pytest.raises(deltabox.SessionNotFound):
        debian.session("never-created", create=False).close()


def test_output_cap_in_a_session(shell):
    result = shell.run("head -c 4096 /dev/zero | tr '\\0' x", max_output_bytes=100).check()
    assert (len(result.stdout), result.stdout_truncated, result.stdout_dropped_bytes) == (100, True, 3996)
