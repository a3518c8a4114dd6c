//! The captured state of a process tree: what a checkpoint knows about each process besides its memory
//! pages. Everything here is serialisable; it is the metadata part of a durable image (see `image`).
//!
//! Pids are as seen inside the sandbox's pid namespace.

use serde::{Deserialize, Serialize};

use crate::sys::Regs;

/// x86_64 general-purpose registers in `user_regs_struct` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegsState(pub [u64; 27]);

impl From<&Regs> for RegsState {
    fn from(r: &Regs) -> Self {
        RegsState([
            r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx, r.rsi, r.rdi,
            r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds, r.es, r.fs, r.gs,
        ])
    }
}

impl RegsState {
    pub fn to_regs(&self) -> Regs {
        let v = &self.0;
        Regs {
            r15: v[0],
            r14: v[1],
            r13: v[2],
            r12: v[3],
            rbp: v[4],
            rbx: v[5],
            r11: v[6],
            r10: v[7],
            r9: v[8],
            r8: v[9],
            rax: v[10],
            rcx: v[11],
            rdx: v[12],
            rsi: v[13],
            rdi: v[14],
            orig_rax: v[15],
            rip: v[16],
            cs: v[17],
            eflags: v[18],
            rsp: v[19],
            ss: v[20],
            fs_base: v[21],
            gs_base: v[22],
            ds: v[23],
            es: v[24],
            fs: v[25],
            gs: v[26],
        }
    }
}

/// `stack_t` of sigaltstack(2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

/// An rseq registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

/// A raw 128-byte `siginfo_t`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigInfo(pub Vec<u8>);

impl SigInfo {
    pub fn signo(&self) -> i32 {
        i32::from_ne_bytes(self.0[0..4].try_into().expect("siginfo has 128 bytes"))
    }
}

/// One thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadState {
    pub tid: i32,
    /// Registers as user space continues with them (syscall-restart already applied, `orig_rax` = -1).
    pub regs: RegsState,
    /// XSAVE area (FPU, SSE, AVX, ...).
    pub xstate: Vec<u8>,
    pub sigmask: u64,
    /// Signals pending for this thread only.
    pub pending: Vec<SigInfo>,
    pub altstack: AltStack,
    pub rseq: Option<Rseq>,
    /// set_robust_list head and length (0, 0 when not set).
    pub robust_list: (u64, u64),
    /// set_tid_address (clear_child_tid).
    pub clear_child_tid: u64,
    pub comm: String,
}

/// One action of sigaction(2), as the kernel's `struct sigaction` for rt_sigaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// Credentials and capabilities.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creds {
    /// real, effective, saved, filesystem
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inheritable: u64,
    pub cap_permitted: u64,
    pub cap_effective: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    pub no_new_privs: bool,
}

/// One of ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF: (interval, value) in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ITimer {
    pub interval_us: u64,
    pub value_us: u64,
}

/// The mm-level addresses set by exec (see prctl PR_SET_MM_MAP) and the current brk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmState {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    pub auxv: Vec<u64>,
    /// The executable as the process sees it.
    pub exe: String,
}

/// What backs a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaBacking {
    /// Anonymous memory (heap, stacks, anonymous mmap). Private unless `shared` on the Vma.
    Anonymous,
    /// A file mapped at `offset`; the path as the process sees it.
    File { path: String, offset: u64, dev: u64, inode: u64 },
    /// The vdso or one of the vvar pages (named as in /proc/PID/maps).
    Special { name: String },
    /// A private mapping of a file that was deleted since it was mapped (`path` is where it was): all its
    /// pages are saved, and it is restored as anonymous memory holding them.
    DeletedFile { path: String },
    /// A `MAP_SHARED` mapping of a shared memory object (see [`FileKind::SharedMemory`], found by `dev`
    /// and `inode`) at `offset`; `path` as /proc/PID/maps names it.
    SharedMemory { path: String, offset: u64, dev: u64, inode: u64 },
}

/// One mapping of the address space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// PROT_* bits.
    pub prot: i32,
    pub shared: bool,
    pub backing: VmaBacking,
    /// smaps VmFlags kept for restore: `gd` (grows down), `dc` (dontfork), `wf` (wipeonfork), `lo`
    /// (mlocked), `hg`/`nh` (hugepage advice), `dd` (dontdump).
    pub vm_flags: Vec<String>,
    /// True when the pages of this mapping are saved (anonymous memory, the privately modified pages of
    /// private file mappings, every page of a deleted file's private mapping). Shared file mappings and
    /// special mappings are not saved.
    pub dumped: bool,
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// An open file description (shared by every fd that refers to it, in one or several processes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenFile {
    /// Identifier unique within a checkpoint.
    pub id: u32,
    /// O_* status flags (access mode, O_APPEND, O_NONBLOCK, ...), without O_CLOEXEC.
    pub flags: i32,
    pub pos: u64,
    pub kind: FileKind,
    /// flock(2) and open-file-description locks held through this description.
    pub locks: Vec<FileLock>,
}

/// Which API a file lock was taken with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockKind {
    /// fcntl F_SETLK (owned by the process).
    Posix,
    /// flock(2) (owned by the open file description).
    Flock,
    /// fcntl F_OFD_SETLK (owned by the open file description).
    Ofd,
}

/// A file lock: a byte range (`end` None = to end of file), shared (read) or exclusive (write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLock {
    pub kind: LockKind,
    pub write: bool,
    pub start: u64,
    pub end: Option<u64>,
}

/// The object behind an open file description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// A regular file, directory or device node, reopened by path.
    Path { path: String, dev: u64, inode: u64, mode: u32 },
    /// A named pipe (FIFO), reopened by path. Its unread bytes (`data`) are kept on one open file of
    /// the FIFO and written back when nothing is queued in it at restore. `readers_outside`: a
    /// write-only open whose FIFO had readers, all outside the checkpointed processes; when the FIFO
    /// has no reader at restore, it writes to /dev/null instead (as a pipe end in that case does).
    Fifo { path: String, inode: u64, data: Vec<u8>, readers_outside: bool },
    /// eventfd(2) with its counter.
    EventFd { count: u64, semaphore: bool },
    /// signalfd(2) with its signal mask.
    SignalFd { mask: u64 },
    /// timerfd(2): clock, expirations not read yet, and the remaining time / interval (seconds,
    /// nanoseconds) at checkpoint time.
    TimerFd { clockid: i32, ticks: u64, value: (u64, u64), interval: (u64, u64) },
    /// epoll(7) instance: the fds it watches (fd numbers of the owning process), events and data.
    Epoll { targets: Vec<EpollTarget> },
    /// An IPv4/IPv6 socket: listening TCP, or UDP (bound and possibly connected). Addresses are raw
    /// `sockaddr_in`/`sockaddr_in6` bytes.
    Inet {
        family: i32,
        sock_type: i32,
        protocol: i32,
        local: Option<Vec<u8>>,
        peer: Option<Vec<u8>>,
        listening: bool,
        /// (level, option, value) of the integer socket options we keep.
        options: Vec<(i32, i32, i32)>,
    },
    /// A unix socket. Connected stream/seqpacket/datagram pairs (`peer` is the other end's inode)
    /// are recreated with socketpair; listening and unconnected sockets are bound to their name again.
    /// `queue` holds the bytes (stream) or messages waiting to be received.
    Unix {
        ino: u64,
        sock_type: i32,
        name: Option<Vec<u8>>,
        /// Backlog of a listening socket.
        listening: Option<u32>,
        peer: Option<u64>,
        queue: Vec<Vec<u8>>,
    },
    /// The slave side of a pseudo-terminal (`/dev/pts/N`), reopened by path (its master, e.g. held by
    /// the shim, keeps it alive), with the terminal's settings and window size.
    Tty { path: String, index: u32, node: PtyNode, termios: Vec<u8>, winsize: [u16; 4] },
    /// The slave side of a pseudo-terminal whose master had been closed before the checkpoint (a
    /// hung-up terminal: reads see end of file, writes fail). Restored as /dev/null.
    HungUpTty { path: String, index: u32 },
    /// One end of a pipe. Both ends of a pipe share `pipe`; `data` (the unread bytes) is kept once, on
    /// the read end. `readers_outside`: a write end whose pipe had readers, all outside the
    /// checkpointed processes (e.g. the shim reading a command's output); those readers are not
    /// restored, so it is restored as a write to /dev/null: writes succeed and the output is discarded
    /// (a pipe without readers would fail every write with EPIPE and SIGPIPE). A write end whose pipe
    /// had no reader at all stays such a pipe.
    Pipe { pipe: u64, write_end: bool, data: Vec<u8>, readers_outside: bool },
    /// A shared memory object mapped `MAP_SHARED` by processes of the tree or held by an fd: shared
    /// anonymous memory (`/dev/zero`), a memfd, a deleted file (a POSIX semaphore or shm object after
    /// `sem_unlink`/`shm_unlink`). Its mappings name it by `dev` and `inode`. It is restored as a memfd
    /// (`name`) of `size` bytes holding `extents` (the object's data at checkpoint time; holes read as
    /// zeros) with its `seals` (`F_GET_SEALS`), made by the lowest common ancestor of the processes that
    /// map it or hold it.
    SharedMemory { name: String, dev: u64, inode: u64, size: u64, seals: i32, extents: Vec<ShmExtent> },
    /// An established TCP connection whose peer socket is checkpointed too (both ends in the sandbox),
    /// restored with TCP repair: addresses (raw sockaddr bytes), the integer options kept for inet
    /// sockets, and the connection's state.
    TcpConnection { family: i32, local: Vec<u8>, peer: Vec<u8>, options: Vec<(i32, i32, i32)>, conn: TcpConn },
    /// A TCP connection (in TCP `state`) whose peer is outside the checkpoint: it cannot go on after a
    /// restore, so it is restored as a socket its peer has reset (the process sees ECONNRESET once, then
    /// end of file), as a VM snapshot's connections are — or, if its peer had closed it (CLOSE_WAIT), as
    /// one its peer closed after sending `unread` (the bytes not read yet). Addresses as raw sockaddr bytes.
    TcpReset { family: i32, local: Vec<u8>, peer: Vec<u8>, state: u8, options: Vec<(i32, i32, i32)>, unread: Vec<u8> },
}

/// What TCP repair reads of an established connection and writes back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConn {
    /// Sequence number after the last byte written (`TCP_QUEUE_SEQ` of the send queue).
    pub send_seq: u32,
    /// Sequence number of the next byte expected (`TCP_QUEUE_SEQ` of the receive queue).
    pub recv_seq: u32,
    /// Bytes written and not acknowledged yet, the last `unsent` of them not sent yet.
    pub send_queue: Vec<u8>,
    pub unsent: u32,
    /// Bytes received and not read yet.
    pub recv_queue: Vec<u8>,
    /// Maximum segment size (`TCP_MAXSEG`).
    pub mss: u32,
    /// `tcpi_options` of TCP_INFO (TCPI_OPT_TIMESTAMPS, _SACK, _WSCALE) and the window scales.
    pub tcp_options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    /// `TCP_TIMESTAMP`: the connection's timestamp clock.
    pub timestamp: u32,
    /// `TCP_REPAIR_WINDOW`: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
    /// `SO_SNDBUF` and `SO_RCVBUF` as read (the kernel's doubled values).
    pub sndbuf: i32,
    pub rcvbuf: i32,
}

/// Bytes of a shared memory object at `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmExtent {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Which pty a `/dev/pts/N` node is. A pty index is reused once its terminal is gone, and the node of
/// the new terminal has the same inode number (index + 3) but a new change time (devpts sets it when
/// it creates the node; only chmod/chown change it later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PtyNode {
    /// The devpts instance.
    pub dev: u64,
    pub ino: u64,
    /// ctime (seconds, nanoseconds).
    pub ctime: (i64, i64),
}

impl PtyNode {
    pub fn of(meta: &std::fs::Metadata) -> PtyNode {
        use std::os::unix::fs::MetadataExt;
        PtyNode { dev: meta.dev(), ino: meta.ino(), ctime: (meta.ctime(), meta.ctime_nsec()) }
    }
}

/// One entry of an epoll interest list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollTarget {
    pub fd: i32,
    pub events: u32,
    pub data: u64,
}

/// One fd of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdState {
    pub fd: i32,
    pub cloexec: bool,
    /// `OpenFile::id`.
    pub file: u32,
    /// POSIX (process-owned) locks the process holds on this file, recorded on one of its fds.
    pub posix_locks: Vec<FileLock>,
}

/// A live process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessState {
    /// Thread group leader first.
    pub threads: Vec<ThreadState>,
    pub shared_pending: Vec<SigInfo>,
    /// rt_sigaction for signals 1..=64 (SIGKILL and SIGSTOP entries are default).
    pub sigactions: Vec<SigAction>,
    pub creds: Creds,
    /// seccomp filters, oldest first (raw sock_filter arrays).
    pub seccomp: Vec<Vec<u8>>,
    pub personality: u32,
    pub umask: u32,
    /// (soft, hard) for RLIMIT_* 0..16.
    pub rlimits: Vec<(u64, u64)>,
    pub cwd: String,
    pub root: String,
    pub mm: MmState,
    pub vmas: Vec<Vma>,
    pub fds: Vec<FdState>,
    pub itimers: [ITimer; 3],
    pub pdeath_signal: i32,
    pub child_subreaper: bool,
    pub dumpable: i32,
    pub oom_score_adj: i32,
    /// The process was in job-control stop.
    pub job_stopped: bool,
    /// Signal sent to the parent on exit.
    pub exit_signal: i32,
    /// For a session leader: its controlling terminal.
    pub ctty: Option<Ctty>,
}

/// A session's controlling terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ctty {
    /// `/dev/pts/<index>`.
    pub index: u32,
    pub path: String,
    pub node: PtyNode,
    /// The terminal's foreground process group (in the sandbox), if any.
    pub foreground: Option<i32>,
}

/// A process of the tree: live, or a zombie its parent has not reaped yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcessKind {
    Live(Box<ProcessState>),
    /// Raw wait status the parent will collect.
    Zombie {
        exit_status: i32,
    },
}

/// A process and its place in the tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEntry {
    pub pid: i32,
    /// Parent pid; 1 (the sandbox's init) for the top of the tree.
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub comm: String,
    pub kind: ProcessKind,
}

/// Everything a checkpoint knows except memory pages: the process tree (parents before children) and
/// the open file descriptions its fds refer to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeState {
    pub processes: Vec<ProcessEntry>,
    pub files: Vec<OpenFile>,
    /// The pid namespace's last allocated pid at checkpoint time (restored last).
    pub last_pid: i32,
    /// The SysV IPC objects of the sandbox's IPC namespace.
    pub ipc: IpcState,
}

/// A fork of a sandbox with a network of its own has another address than the sandbox checkpointed: its
/// sockets bound or connected to `from` (their own address then) use `to` instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressMove {
    pub from: std::net::Ipv4Addr,
    pub to: std::net::Ipv4Addr,
}

impl TreeState {
    /// Moves every inet socket of the tree from `moved.from` to `moved.to` (see [`AddressMove`]): both ends
    /// of a connection between its processes over that address, and listeners bound to it.
    pub fn move_address(&mut self, moved: AddressMove) {
        for file in &mut self.files {
            let addresses: Vec<&mut Vec<u8>> = match &mut file.kind {
                FileKind::Inet { local, peer, .. } => local.iter_mut().chain(peer.iter_mut()).collect(),
                FileKind::TcpConnection { local, peer, .. } | FileKind::TcpReset { local, peer, .. } => {
                    vec![local, peer]
                }
                _ => continue,
            };
            for address in addresses {
                move_in_sockaddr(address, moved);
            }
        }
    }
}

/// Replaces `moved.from` by `moved.to` in a raw `sockaddr_in`, or in a `sockaddr_in6` holding it as an
/// IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack socket's view of IPv4).
fn move_in_sockaddr(address: &mut [u8], moved: AddressMove) {
    let Some(family) = address.get(..2).map(|f| i32::from(u16::from_ne_bytes([f[0], f[1]]))) else { return };
    let ip = match family {
        libc::AF_INET => address.get_mut(4..8),
        libc::AF_INET6 => match address.get_mut(8..24) {
            Some(v6) if v6[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] => v6.get_mut(12..),
            _ => None,
        },
        _ => None,
    };
    if let Some(ip) = ip.filter(|ip| **ip == moved.from.octets()) {
        ip.copy_from_slice(&moved.to.octets());
    }
}

/// The SysV IPC objects of an IPC namespace, by id. Owners are ids inside the sandbox's user namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcState {
    pub segments: Vec<ShmSegment>,
    pub semaphores: Vec<SemSet>,
    pub queues: Vec<MsgQueue>,
}

/// What every SysV IPC object has: key, id, owner and permission bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcPerm {
    pub key: i32,
    pub id: i32,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// A SysV shared memory segment: its size, whether it was removed (`IPC_RMID`: it lives until the last
/// detach), and its data (pages of zeros left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmSegment {
    pub perm: IpcPerm,
    pub size: u64,
    pub removed: bool,
    pub extents: Vec<ShmExtent>,
}

/// A SysV semaphore set and its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemSet {
    pub perm: IpcPerm,
    pub values: Vec<u16>,
}

/// A SysV message queue: its byte limit and its messages, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgQueue {
    pub perm: IpcPerm,
    pub max_bytes: u64,
    pub messages: Vec<Message>,
}

/// A message of a SysV message queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub mtype: i64,
    pub data: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sockaddr_in(ip: [u8; 4], port: u16) -> Vec<u8> {
        let mut a = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        a.extend(port.to_be_bytes());
        a.extend(ip);
        a.extend([0; 8]);
        a
    }

    fn sockaddr_in6(ip: [u8; 16], port: u16) -> Vec<u8> {
        let mut a = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        a.extend(port.to_be_bytes());
        a.extend([0; 4]);
        a.extend(ip);
        a.extend([0; 4]);
        a
    }

    #[test]
    fn a_moved_address_is_replaced_in_ipv4_and_ipv4_mapped_addresses_only() {
        let moved = AddressMove { from: [10, 89, 0, 2].into(), to: [10, 89, 0, 6].into() };
        let mapped = |ip: [u8; 4]| {
            let mut v6 = [0u8; 16];
            v6[10..12].copy_from_slice(&[0xff, 0xff]);
            v6[12..].copy_from_slice(&ip);
            v6
        };
        let cases = [
            (sockaddr_in([10, 89, 0, 2], 8000), sockaddr_in([10, 89, 0, 6], 8000)),
            (sockaddr_in([127, 0, 0, 1], 8000), sockaddr_in([127, 0, 0, 1], 8000)),
            (sockaddr_in6(mapped([10, 89, 0, 2]), 80), sockaddr_in6(mapped([10, 89, 0, 6]), 80)),
            (sockaddr_in6([0; 16], 80), sockaddr_in6([0; 16], 80)),
            (vec![2], vec![2]),
        ];
        for (before, after) in cases {
            let mut address = before.clone();
            move_in_sockaddr(&mut address, moved);
            assert_eq!(address, after, "{before:?}");
        }
    }
}
