//! Pending signals come back exactly once each: process-wide and thread-directed ones, and queued
//! real-time signals with their values, in order.

mod common;

use common::{python, wait_for_content, PidNs};
use deltacr::Engine;

/// Blocks SIGUSR1, SIGUSR2 and SIGRTMIN, makes them pending (SIGUSR1 and three SIGRTMIN with values
/// 1, 2, 3 for the process, SIGUSR2 for its thread), says "ready", and once argv[2] exists collects
/// what is pending (signal and value) into argv[1].
const PENDING: &str = r#"
import ctypes, os, signal, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
sigs = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGRTMIN]
signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
os.kill(os.getpid(), signal.SIGUSR1)
signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)
for v in (1, 2, 3):
    assert libc.sigqueue(os.getpid(), signal.SIGRTMIN, ctypes.c_void_p(v)) == 0
out = open(sys.argv[1], "a")
out.write("ready\n")
out.flush()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.005)
sigset = (ctypes.c_uint64 * 16)()
libc.sigemptyset(sigset)
for s in sigs:
    libc.sigaddset(sigset, s)
info = ctypes.create_string_buffer(128)
zero = (ctypes.c_long * 2)(0, 0)
got = []
while True:
    s = libc.sigtimedwait(sigset, info, zero)
    if s < 0:
        break
    value = int.from_bytes(info.raw[24:32], "little") if s == signal.SIGRTMIN else 0
    got.append("%d:%d" % (s, value))
out.write("got %s\n" % " ".join(got))
out.flush()
time.sleep(100)
"#;

#[test]
fn pending_signals_come_back_once_each() {
    let mut ns = PidNs::new();
    let out = ns.path("out");
    let flag = ns.path("flag");
    let py = python();
    ns.spawn(&[&py, "-c", PENDING, out.to_str().unwrap(), flag.to_str().unwrap()], None, false);
    wait_for_content(&out, "ready\n");
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    std::fs::write(&flag, "").unwrap();
    let rt = libc::SIGRTMIN();
    // The thread's own pending signals are taken first, then the process's.
    let expected = format!("ready\ngot {}:0 {}:0 {rt}:1 {rt}:2 {rt}:3\n", libc::SIGUSR2, libc::SIGUSR1);
    assert_eq!(wait_for_content(&out, "got"), expected, "the live run");
    for round in 0..2 {
        engine.kill_processes(&sb).unwrap();
        std::fs::remove_file(&flag).unwrap();
        std::fs::write(&out, "").unwrap();
        engine.restore(&ckpt, &sb).unwrap();
        std::fs::write(&flag, "").unwrap();
        assert_eq!(wait_for_content(&out, "got"), &expected["ready\n".len()..], "round {round}");
    }
}
