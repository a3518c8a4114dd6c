//! Syscall injection into real programs: the tracee keeps working afterwards.

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use deltacr::ptrace::{self, Injector, Scratch, StopReason, Waiting};
use nix::unistd::Pid;

fn wait_until_blocked(pid: Pid, nr: i64, arg0: u64) {
    // The process is blocked in syscall `nr` once its state is 'S' and /proc/PID/syscall names it
    // (with first argument `arg0`).
    for _ in 0..2000 {
        let stat = deltacr::procfs::Stat::read(pid).unwrap();
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap();
        let mut words = syscall.split(' ');
        let (n, a0) = (words.next(), words.next());
        if stat.state() == 'S' && n == Some(&nr.to_string()) && a0 == Some(&format!("{arg0:#x}")) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("process {pid} never blocked");
}

#[test]
fn injected_syscalls_run_in_the_tracee_and_an_interrupted_read_restarts() {
    let mut child = Command::new("python3")
        .args(["-c", "import sys; line = sys.stdin.readline(); print('got ' + line.strip(), flush=True)"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    wait_until_blocked(pid, libc::SYS_read, 0);

    ptrace::seize(pid).unwrap();
    ptrace::interrupt(pid).unwrap();
    let reason = ptrace::wait_stop(pid, Waiting::Block, "stopped").unwrap();
    assert!(matches!(reason, StopReason::Interrupt), "{reason:?}");
    let regs = ptrace::getregs(pid).unwrap();
    assert_eq!(regs.orig_rax as i64, libc::SYS_read, "stopped inside read");
    let (fixed, mode) = ptrace::restart_fixup(&regs, false);
    assert_eq!(mode, ptrace::RestartMode::Restart, "rax {}", regs.rax as i64);
    assert_eq!(fixed.rax as i64, libc::SYS_read);

    let gadget = ptrace::find_syscall_gadget(pid).unwrap();
    let mut inj = Injector::new(pid, pid, gadget).unwrap();
    assert_eq!(inj.call(libc::SYS_getpid, &[]).unwrap(), pid.as_raw() as i64);
    let scratch = Scratch::map(&mut inj, 4096).unwrap();
    scratch.write(0, b"hello").unwrap();
    assert_eq!(scratch.read(0, 5).unwrap(), b"hello");
    // A failing call reports its errno.
    let err = inj.call(libc::SYS_close, &[9999]).unwrap_err();
    assert!(err.to_string().contains("injected syscall"), "{err}");
    scratch.free(&mut inj).unwrap();
    inj.finish().unwrap();
    ptrace::detach(pid, None).unwrap();

    child.stdin.as_mut().unwrap().write_all(b"world\n").unwrap();
    let mut out = String::new();
    child.stdout.as_mut().unwrap().read_to_string(&mut out).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(out, "got world\n");
}

#[test]
fn an_interrupted_sleep_continues_through_restart_syscall() {
    let mut child = Command::new("sleep").arg("0.3").spawn().unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    wait_until_blocked(pid, libc::SYS_clock_nanosleep, libc::CLOCK_REALTIME as u64);
    ptrace::seize(pid).unwrap();
    ptrace::interrupt(pid).unwrap();
    ptrace::wait_stop(pid, Waiting::Block, "stopped").unwrap();
    let regs = ptrace::getregs(pid).unwrap();
    let (_, mode) = ptrace::restart_fixup(&regs, false);
    assert_eq!(mode, ptrace::RestartMode::RestartBlock, "sleep waits in clock_nanosleep");
    let gadget = ptrace::find_syscall_gadget(pid).unwrap();
    let mut inj = Injector::new(pid, pid, gadget).unwrap();
    assert_eq!(inj.call(libc::SYS_getppid, &[]).unwrap(), std::process::id() as i64);
    inj.finish().unwrap();
    ptrace::detach(pid, None).unwrap();
    assert!(child.wait().unwrap().success());
}

/// The only child of `pid`, once it has one.
fn only_child(pid: Pid) -> Pid {
    for _ in 0..2000 {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        if let Some(child) = children.split_whitespace().next() {
            return Pid::from_raw(child.parse().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!("process {pid} never started a child");
}

#[test]
fn a_wait_for_an_exiting_namespace_init_gives_up_while_its_traced_child_is_unreaped() {
    // init (sh) of a new pid namespace, with a child (sleep) we trace: when init is killed, it kills
    // the sleep and waits until it is reaped, which only we do — init reports nothing meanwhile.
    let mut unshare =
        Command::new("unshare").args(["--pid", "--fork", "sh", "-c", "sleep 1000 & wait"]).spawn().unwrap();
    let init = only_child(Pid::from_raw(unshare.id() as i32));
    let sleeper = only_child(init);
    for pid in [init, sleeper] {
        ptrace::seize(pid).unwrap();
        ptrace::interrupt(pid).unwrap();
        ptrace::wait_stop(pid, Waiting::Block, "stopped").unwrap();
    }
    nix::sys::signal::kill(init, nix::sys::signal::Signal::SIGKILL).unwrap();
    let err = ptrace::wait_stop(init, Waiting::Poll, "stopped").unwrap_err();
    assert!(matches!(err, ptrace::PtraceError::Exited { .. }), "{err}");
    // Reaping the sleep lets init finish exiting.
    let status = nix::sys::wait::waitpid(sleeper, Some(nix::sys::wait::WaitPidFlag::__WALL)).unwrap();
    assert!(matches!(status, nix::sys::wait::WaitStatus::Signaled(..)), "{status:?}");
    let status = nix::sys::wait::waitpid(init, Some(nix::sys::wait::WaitPidFlag::__WALL)).unwrap();
    assert!(matches!(status, nix::sys::wait::WaitStatus::Signaled(..)), "{status:?}");
    assert!(!unshare.wait().unwrap().success());
}
