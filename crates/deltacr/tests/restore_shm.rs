//! Shared memory between processes (shared anonymous memory, a memfd mapped without its fd, POSIX
//! semaphores of `multiprocessing`, unlinked) and SysV IPC objects (segments, semaphore sets, message
//! queues) come back with their checkpoint-time contents, shared again by the restored processes, from
//! templates and from an image.

mod common;

use common::{number_rows, wait_for};

/// A parent and its forked child hand a counter back and forth through shared memory, woken by two
/// semaphores: the parent writes i into shared anonymous memory and a memfd page, the child answers
/// i * 1000 + (both agree) in the shared page and adds i to a sum kept only in the memfd; the parent
/// appends "i answer sum". Each step depends on every object being shared and holding its
/// checkpoint-time value; a half-restored one stalls, answers wrong or sums wrong.
const PING_PONG: &str = r#"
import mmap, multiprocessing as mp, os, sys, time
out = open(sys.argv[1], "a")
anon = mmap.mmap(-1, 4096)
fd = os.memfd_create("pingpong")
os.ftruncate(fd, 1 << 20)
mem = mmap.mmap(fd, 1 << 20)
os.close(fd)
ask, answered = mp.Semaphore(0), mp.Semaphore(0)
get = lambda m, off: int.from_bytes(m[off:off + 8], "little")
def put(m, off, v):
    m[off:off + 8] = v.to_bytes(8, "little")
if os.fork() == 0:
    while True:
        ask.acquire()
        a, b = get(anon, 0), get(mem, 7 * 4096)
        put(anon, 8, a * 1000 + (a == b))
        put(mem, 9 * 4096, get(mem, 9 * 4096) + a)
        answered.release()
i = 0
while True:
    i += 1
    put(anon, 0, i)
    put(mem, 7 * 4096, i)
    ask.release()
    answered.acquire()
    out.write("%d %d %d\n" % (i, get(anon, 8), get(mem, 9 * 4096)))
    out.flush()
    time.sleep(0.005)
"#;

/// What PING_PONG writes at step `i`.
fn ping_pong(i: u64) -> Vec<u64> {
    vec![i, i * 1000 + 1, i * (i + 1) / 2]
}

#[test]
fn shared_memory_and_semaphores_come_back_shared_with_their_contents() {
    let mut c = common::run_and_checkpoint(PING_PONG, 5, ping_pong);
    let objects = c.ckpt.tree.files.iter().filter(|f| matches!(f.kind, deltacr::state::FileKind::SharedMemory { .. }));
    assert_eq!(objects.count(), 4, "shared anonymous memory, the memfd and two semaphores");
    // The live processes go on, changing every object.
    wait_for(|| (number_rows(&c.out).len() as u64 > c.at + 20).then_some(()));
    let (out, at) = (c.out.clone(), c.at);
    common::restores_continue(
        &mut c.engine,
        &c.ns,
        &c.ckpt,
        2,
        at,
        || number_rows(&out).len(),
        |from| common::rows_follow(&out, from, 5, ping_pong),
    );
}

/// SysV objects of every kind, changed at each step: a segment's counter, a removed segment still
/// attached (its sum), a semaphore raised each step, a message queue that keeps the last 5 numbers.
/// Each line: i, counter, sum, semaphore, oldest number taken from the queue — all functions of i.
const SYSV: &str = r#"
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
IPC_CREAT, IPC_RMID, GETVAL = 0o1000, 0, 12
seg = libc.shmget(0x1234, 8192, IPC_CREAT | 0o600)
counter = ctypes.c_uint64.from_address(libc.shmat(seg, None, 0) + 4096)
gone = libc.shmget(0, 4096, IPC_CREAT | 0o600)
total = ctypes.c_uint64.from_address(libc.shmat(gone, None, 0))
libc.shmctl(gone, IPC_RMID, None)
sem = libc.semget(0x2345, 2, IPC_CREAT | 0o600)
msq = libc.msgget(0x3456, IPC_CREAT | 0o600)
class SemBuf(ctypes.Structure):
    _fields_ = [("num", ctypes.c_ushort), ("op", ctypes.c_short), ("flg", ctypes.c_short)]
class MsgBuf(ctypes.Structure):
    _fields_ = [("mtype", ctypes.c_long), ("text", ctypes.c_char * 64)]
out = open(sys.argv[1], "a")
i = 0
while True:
    i += 1
    counter.value += i
    total.value += 2 * i
    assert libc.semop(sem, ctypes.byref(SemBuf(0, 1, 0)), 1) == 0
    assert libc.msgsnd(msq, ctypes.byref(MsgBuf(1, b"%d" % i)), 16, 0) == 0
    first = 0
    if i > 5:
        got = MsgBuf()
        assert libc.msgrcv(msq, ctypes.byref(got), 64, 0, 0) > 0
        first = int(got.text)
    out.write("%d %d %d %d %d\n" % (i, counter.value, total.value, libc.semctl(sem, 0, GETVAL), first))
    out.flush()
    time.sleep(0.005)
"#;

/// What SYSV writes at step `i`.
fn sysv(i: u64) -> Vec<u64> {
    vec![i, i * (i + 1) / 2, i * (i + 1), i, i.saturating_sub(5)]
}

#[test]
fn sysv_segments_semaphores_and_queues_come_back_with_their_contents() {
    let mut c = common::run_and_checkpoint(SYSV, 8, sysv);
    let ipc = &c.ckpt.tree.ipc;
    assert_eq!((ipc.segments.len(), ipc.semaphores.len(), ipc.queues.len()), (2, 1, 1), "{ipc:?}");
    assert_eq!(ipc.segments.iter().filter(|s| s.removed).count(), 1);
    wait_for(|| (number_rows(&c.out).len() as u64 > c.at + 20).then_some(()));
    let (out, at) = (c.out.clone(), c.at);
    common::restores_continue(
        &mut c.engine,
        &c.ns,
        &c.ckpt,
        2,
        at,
        || number_rows(&out).len(),
        |from| common::rows_follow(&out, from, 8, sysv),
    );
}
