//! eventfd, signalfd, timerfd, epoll and a FIFO with unread data come back with their state.

mod common;

use common::{python, wait_for, wait_for_content, PidNs};
use deltacr::Engine;

const FDS: &str = r#"
import ctypes, os, select, signal, struct, sys, time
out = open(sys.argv[1], "a")
flag, fifo = sys.argv[2], sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
e = os.eventfd(0, 0)
os.eventfd_write(e, 42)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
mask = ctypes.c_uint64(1 << (signal.SIGUSR1 - 1))
sfd = libc.signalfd(-1, ctypes.byref(mask), 0)
tfd = libc.timerfd_create(1, 0)
its = (ctypes.c_long * 4)(0, 50000000, 0, 50000000)
libc.timerfd_settime(tfd, 0, its, None)
ep = select.epoll()
ep.register(e, select.EPOLLIN)
fr = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
fw = os.open(fifo, os.O_WRONLY)
os.write(fw, b"fifo-data")
time.sleep(0.2)  # the timer expires, unread: the kernel re-arms it only at the next read
out.write("ready\n")
out.flush()
while not os.path.exists(flag):
    time.sleep(0.005)
ev = ep.poll(0)
out.write("epoll %s\n" % [(fd == e and m & select.EPOLLIN != 0) for fd, m in ev])
out.write("eventfd %d\n" % os.eventfd_read(e))
out.write("fifo %s\n" % os.read(fr, 100).decode())
out.write("timer %s\n" % (struct.unpack("Q", os.read(tfd, 8))[0] > 0))
# Periodic: it fires again (a timer that had expired unread at the checkpoint must not come back disarmed).
out.write("timer again %s\n" % bool(select.select([tfd], [], [], 2)[0]))
os.kill(os.getpid(), signal.SIGUSR1)
out.write("signalfd %d\n" % struct.unpack("I", os.read(sfd, 128)[:4])[0])
out.flush()
time.sleep(100)
"#;

const EXPECTED: &str = "epoll [True]\neventfd 42\nfifo fifo-data\ntimer True\ntimer again True\nsignalfd 10\n";

#[test]
fn anonymous_inode_files_and_fifos_keep_their_state() {
    let mut ns = PidNs::new();
    let out = ns.path("out");
    let flag = ns.path("flag");
    let fifo = ns.path("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let py = python();
    let args = [&py, "-c", FDS, out.to_str().unwrap(), flag.to_str().unwrap(), fifo.to_str().unwrap()];
    ns.spawn(&args, None, false);
    wait_for_content(&out, "ready\n");

    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    std::fs::write(&flag, "").unwrap();
    wait_for_content(&out, "signalfd");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("ready\n{EXPECTED}"), "the live run");

    for _ in 0..2 {
        engine.kill_processes(&sb).unwrap();
        std::fs::remove_file(&flag).unwrap();
        std::fs::write(&out, "").unwrap();
        engine.restore(&ckpt, &sb).unwrap();
        std::fs::write(&flag, "").unwrap();
        wait_for_content(&out, "signalfd");
        wait_for(|| (std::fs::read_to_string(&out).unwrap() == EXPECTED).then_some(()));
    }
}
