//! Open files of a process tree, one module per kind holding both directions (capture and restore).
//!
//! Capture: which open file descriptions exist, which fds (in which processes) share them (`kcmp`), and
//! the state of each (offset, flags, locks, and what its kind keeps). Restore
//! ([`NewProcess::restore_fds`]): every description is made once, by the lowest common ancestor of the
//! processes that hold it, at a temporary fd its children inherit; each process then puts its own fds
//! in place.

mod anon;
mod inet;
mod lock;
mod pipe;
mod regular;
mod shm;
mod socket;
mod tcp;
mod tty;
mod unix;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use nix::unistd::Pid;

pub use shm::{is_sysv, object_of, SHARED_MEMORY_LIMIT};
pub use tcp::{describe_reset, RepairedTcp};
pub use tty::{controlling_tty, pts_index};

use crate::procfs::{self, FdInfo};
use crate::pty::PtyPlan;
use crate::restore::{NewProcess, RestoreError, SCRATCH_LEN};
use crate::state::{FdState, FileKind, LockKind, OpenFile};
use crate::sys;

/// Errors of this module. Every variant names the process and the fd.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("process {pid}, fd {fd}: {reason}")]
    Unsupported { pid: i32, fd: i32, reason: String },
    #[error("process {pid}, fd {fd}: cannot {what}")]
    Io {
        pid: i32,
        fd: i32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid}, mapping at {addr:#x}: {reason}")]
    Mapping { pid: i32, addr: u64, reason: String },
    #[error("process {pid}, fd {fd}")]
    Proc {
        pid: i32,
        fd: i32,
        #[source]
        source: procfs::ProcError,
    },
}

/// A process whose fds are captured: host pid (to read /proc) and its pid in the sandbox (for errors).
#[derive(Debug, Clone, Copy)]
pub struct FdOwner {
    pub host: Pid,
    pub ns_pid: i32,
}

const O_CLOEXEC_BIT: i32 = libc::O_CLOEXEC;
fn io_err(owner: &FdOwner, fd: i32, what: &'static str) -> impl FnOnce(std::io::Error) -> FileError {
    let pid = owner.ns_pid;
    move |source| FileError::Io { pid, fd, what, source }
}

/// /dev/tty, /dev/console, /dev/ptmx.
const TTYAUX_MAJOR: u32 = 5;

struct Known {
    id: u32,
    owner: Pid,
    fd: i32,
}

/// Captures the fds of `owners` (stopped) and the shared memory objects they map. Returns the open file
/// descriptions (shared memory objects among them, held by no fd) and, per owner, its fds.
pub fn capture(owners: &[FdOwner]) -> Result<(Vec<OpenFile>, Vec<Vec<FdState>>), FileError> {
    let mut sockets = socket::Seen::default();
    let mut files: Vec<OpenFile> = Vec::new();
    let mut by_inode: HashMap<(u64, u64), Vec<Known>> = HashMap::new();
    let mut tables = Vec::with_capacity(owners.len());
    for owner in owners {
        let pid = owner.host;
        let fds = procfs::fds(pid).map_err(|source| FileError::Proc { pid: owner.ns_pid, fd: -1, source })?;
        let mut table = Vec::with_capacity(fds.len());
        let mut posix_seen = HashSet::new();
        for fd in fds {
            let err_io = |what| io_err(owner, fd, what);
            let err_proc = |source| FileError::Proc { pid: owner.ns_pid, fd, source };
            let link = procfs::link(pid, &format!("fd/{fd}")).map_err(err_proc)?;
            let meta = std::fs::metadata(format!("/proc/{}/fd/{fd}", pid.as_raw())).map_err(err_io("stat"))?;
            let info = FdInfo::read(pid, fd).map_err(err_proc)?;
            let raw_flags = info.flags().map_err(err_proc)?;
            let key = (meta.dev(), meta.ino());
            let same = by_inode.entry(key).or_default();
            let mut id = None;
            for k in same.iter() {
                if sys::kcmp_file(k.owner, k.fd, pid, fd).map_err(err_io("compare with kcmp"))? == 0 {
                    id = Some(k.id);
                    break;
                }
            }
            let id = match id {
                Some(id) => id,
                None => {
                    let id = files.len() as u32;
                    let kind = classify(owner, fd, &link, &meta, &info, &mut sockets)?;
                    let locks =
                        lock::parse(&info, owner, fd)?.into_iter().filter(|l| l.kind != LockKind::Posix).collect();
                    files.push(OpenFile {
                        id,
                        flags: raw_flags & !O_CLOEXEC_BIT,
                        pos: info.pos().map_err(err_proc)?,
                        kind,
                        locks,
                    });
                    same.push(Known { id, owner: pid, fd });
                    id
                }
            };
            // The process's POSIX locks show on each of its fds of the file: keep them once.
            let posix_locks = if posix_seen.insert(key) {
                lock::parse(&info, owner, fd)?.into_iter().filter(|l| l.kind == LockKind::Posix).collect()
            } else {
                Vec::new()
            };
            table.push(FdState { fd, cloexec: raw_flags & O_CLOEXEC_BIT != 0, file: id, posix_locks });
        }
        tables.push(table);
    }
    pipe::capture_data(owners, &tables, &mut files)?;
    pipe::mark_outside_readers(owners, &tables, &mut files)?;
    unix::check_peers(owners, &tables, &files)?;
    settle_tcp(owners, &tables, &mut files)?;
    shm::capture(owners, &tables, &mut files)?;
    Ok((files, tables))
}

/// Settles the TCP connections: one whose other end was captured too is restored (established; one in
/// another state between processes of the checkpoint is refused), one whose peer is outside the
/// checkpoint becomes a connection reset at restore.
fn settle_tcp(owners: &[FdOwner], tables: &[Vec<FdState>], files: &mut [OpenFile]) -> Result<(), FileError> {
    let ends: HashSet<(Vec<u8>, Vec<u8>)> =
        files.iter().filter_map(|f| tcp::addresses(&f.kind).map(|(l, p)| (l.to_vec(), p.to_vec()))).collect();
    for (owner, table) in owners.iter().zip(tables) {
        for fd in table {
            let of = &mut files[fd.file as usize];
            let Some((local, peer)) = tcp::addresses(&of.kind).map(|(l, p)| (l.to_vec(), p.to_vec())) else {
                continue;
            };
            let inside = ends.contains(&(peer.clone(), local.clone()));
            match &of.kind {
                FileKind::TcpConnection { family, options, .. } if !inside => {
                    let (family, options) = (*family, options.clone());
                    of.kind = FileKind::TcpReset { family, local, peer, state: 1, options, unread: Vec::new() };
                }
                FileKind::TcpReset { state, .. } if inside => {
                    return Err(FileError::Unsupported {
                        pid: owner.ns_pid,
                        fd: fd.fd,
                        reason: format!(
                            "TCP connection {} -> {} in state {state}: only established connections between \
                             processes of the sandbox can be checkpointed yet",
                            inet::show_inet(&local),
                            inet::show_inet(&peer)
                        ),
                    });
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// What the file at fd `fd` of `owner` is (`link`: its /proc fd link), with what its kind keeps.
fn classify(
    owner: &FdOwner,
    fd: i32,
    link: &str,
    meta: &std::fs::Metadata,
    info: &FdInfo,
    sockets: &mut socket::Seen,
) -> Result<FileKind, FileError> {
    let unsupported = |reason: String| FileError::Unsupported { pid: owner.ns_pid, fd, reason };
    if let Some(rest) = link.strip_prefix("socket:[") {
        let ino = rest.trim_end_matches(']').parse().map_err(|_| unsupported(format!("odd socket link {link}")))?;
        return socket::capture(owner, fd, ino, sockets);
    }
    if let Some(kind) = link.strip_prefix("anon_inode:") {
        return anon::capture(kind, info).map_err(|e| match e {
            FileError::Unsupported { reason, .. } => unsupported(reason),
            other => other,
        });
    }
    if let Some(rest) = link.strip_prefix("pipe:[") {
        let pipe = rest.trim_end_matches(']').parse().map_err(|_| unsupported(format!("odd pipe link {link}")))?;
        return pipe::capture_pipe(owner, fd, pipe);
    }
    if !link.starts_with('/') {
        return Err(unsupported(format!("{link} is not supported yet")));
    }
    let ft = meta.file_type();
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    if let Some(index) = pts_index(major, minor).filter(|_| ft.is_char_device()) {
        return tty::capture(owner, fd, link, meta, index);
    }
    if shm::is_fd_object(link) {
        let fd = sys::dup_from(owner.host, fd).map_err(io_err(owner, fd, "reach it"))?;
        return Ok(shm::capture_fd(link, meta, fd.as_fd()));
    }
    if link.ends_with(" (deleted)") {
        return Err(unsupported(format!("{link}: open files that were deleted are not supported yet")));
    }
    if ft.is_char_device() && major == TTYAUX_MAJOR {
        return Err(unsupported(format!("{link}: pty masters and /dev/tty are not supported yet")));
    }
    if ft.is_fifo() {
        return Ok(pipe::capture_fifo(link, meta));
    }
    regular::capture(owner, fd, link, meta)
}

/// Temporary fd numbers used while a tree is restored: open file description `id` lives at
/// `base + id` in every process that carries it. `pairs` gives, per pipe, the description ids of
/// its read and write ends.
#[derive(Debug, Clone, Default)]
pub struct FdPlan {
    pub base: i32,
    pub count: i32,
    pub pairs: HashMap<u64, (Option<u32>, Option<u32>)>,
    /// Connected unix socket pairs whose ends are made by different processes: the first to come makes
    /// the pair and hands the other end to the tracer, which gives it to the second (see [`HeldEnds`]).
    pub split: HashSet<u64>,
}

/// Ends of split socket pairs (see [`FdPlan::split`]) made and not yet given to their process, by pair.
pub type HeldEnds = HashMap<u64, std::os::fd::OwnedFd>;

impl FdPlan {
    pub fn temp(&self, id: u32) -> i32 {
        self.base + id as i32
    }
}

/// What a file reopened by path must be.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The file of the checkpoint: the same inode (the device may differ in another sandbox's mount of
    /// the same filesystem).
    Inode(u64),
    /// A FIFO.
    Fifo,
}

impl NewProcess {
    /// Sets up the process's fds. Every open file description of the tree has a fixed temporary fd
    /// number `plan.temp(id)` while the tree is restored: a process creates the descriptions it is the
    /// lowest common ancestor of (`create`), its children inherit them by fork (so shared descriptions
    /// stay shared), and each process then places its own fds with dup3. Everything below the
    /// temporary range that the process inherited from its parent is closed first.
    pub fn restore_fds(
        &mut self,
        own: &[FdState],
        create: &[u32],
        files: &[OpenFile],
        plan: &FdPlan,
        ptys: &mut PtyPlan,
        held: &mut HeldEnds,
    ) -> Result<(), RestoreError> {
        // Both ends of a pipe, or of a connected unix socket pair, are made at once.
        let mut made_pairs: HashSet<u64> = HashSet::new();
        // Listening sockets first: listen() fails on a port a repaired TCP connection holds already (its
        // bind forces the reuse of the address; the listener's cannot).
        let mut order = create.to_vec();
        order.sort_by_key(|&id| !matches!(files[id as usize].kind, FileKind::Inet { listening: true, .. }));
        for &id in &order {
            let of = &files[id as usize];
            let target = own.iter().find(|f| f.file == id).map_or(-1, |f| f.fd);
            let tmp = match &of.kind {
                FileKind::Path { .. } => self.open_path(target, of)?,
                FileKind::Fifo { .. } => self.open_fifo(target, of)?,
                FileKind::Pipe { pipe, .. } => {
                    if made_pairs.insert(*pipe) {
                        self.make_pipe_ends(target, *pipe, files, plan)?;
                    }
                    continue;
                }
                FileKind::Unix { peer: Some(_), .. } => {
                    let key = crate::plan::pair_key(&of.kind).expect("a connected socket has a pair key");
                    if plan.split.contains(&key) {
                        self.make_split_end(target, id, key, files, plan, held)?;
                    } else if made_pairs.insert(key) {
                        self.make_socketpair(target, key, files, plan, held, &[])?;
                    }
                    continue;
                }
                FileKind::Unix { .. } => self.make_unix(target, of)?,
                FileKind::Inet { .. } => self.make_inet(target, of)?,
                FileKind::TcpConnection { .. } => self.make_tcp_connection(target, of)?,
                FileKind::TcpReset { .. } => self.make_tcp_reset(target, of)?,
                FileKind::Tty { .. } | FileKind::HungUpTty { .. } => self.open_terminal(target, of, ptys)?,
                FileKind::EventFd { .. }
                | FileKind::SignalFd { .. }
                | FileKind::TimerFd { .. }
                | FileKind::Epoll { .. } => self.make_anon(target, of)?,
                FileKind::SharedMemory { .. } => self.make_shared_memory(target, of)?,
            };
            self.place(tmp, plan.temp(id))?;
        }
        // Locks owned by open file descriptions (flock, OFD) come with the description.
        for &id in create {
            for lock in &files[id as usize].locks {
                let target = own.iter().find(|f| f.file == id).map_or(-1, |f| f.fd);
                self.apply_lock(target, plan.temp(id), lock)?;
            }
        }
        self.call(libc::SYS_close_range, &[0, plan.base as u64 - 1, 0])?;
        for fd in own {
            let flags = if fd.cloexec { libc::O_CLOEXEC as u64 } else { 0 };
            self.call(libc::SYS_dup3, &[plan.temp(fd.file) as u64, fd.fd as u64, flags])?;
        }
        self.fill_epolls(own, create, files, plan)
    }

    /// Writes bytes into one of the process's fds from the tracer (through pidfd_getfd).
    fn write_through(&mut self, target: i32, fd: i32, data: &[u8]) -> Result<(), RestoreError> {
        let io = |what| self.io_err(target, what);
        let f = sys::dup_from(self.host, fd).map_err(io("reach the new file"))?;
        std::fs::File::from(f).write_all(data).map_err(io("write its saved state"))
    }

    /// Moves fd `from` to number `to` (closing `from`).
    fn place(&mut self, from: i32, to: i32) -> Result<(), RestoreError> {
        if from != to {
            self.call(libc::SYS_dup3, &[from as u64, to as u64, 0])?;
            self.call(libc::SYS_close, &[from as u64])?;
        }
        Ok(())
    }

    /// Opens `path` in the process (openat from its cwd) with `flags`, for its fd `target`; `what`
    /// names the step in errors.
    fn open_in(&mut self, target: i32, path: &str, flags: i32, what: &'static str) -> Result<i32, RestoreError> {
        let mut cpath = path.as_bytes().to_vec();
        cpath.push(0);
        if cpath.len() > SCRATCH_LEN {
            return Err(RestoreError::File { pid: self.ns_pid, fd: target, reason: format!("path too long: {path}") });
        }
        let addr = self.scratch().write(0, &cpath).map_err(self.perr())?;
        let fd = self.call_file(target, what, libc::SYS_openat, &[libc::AT_FDCWD as u64, addr, flags as u64, 0])?;
        Ok(fd as i32)
    }

    /// Reopens `path` in the process (never creating or truncating it) for its fd `target` and checks
    /// the opened file with `wrong` (Some: why it is not the file wanted; it is closed again).
    fn reopen(
        &mut self,
        target: i32,
        path: &str,
        flags: i32,
        what: &'static str,
        wrong: impl FnOnce(&std::fs::Metadata) -> Option<String>,
    ) -> Result<(i32, std::fs::Metadata), RestoreError> {
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
        let fd = self.open_in(target, path, flags, what)?;
        let meta = std::fs::metadata(format!("/proc/{}/fd/{fd}", self.host)).map_err(|source| {
            RestoreError::FileIo { pid: self.ns_pid, fd: target, what: "stat the reopened file", source }
        })?;
        if let Some(reason) = wrong(&meta) {
            self.call(libc::SYS_close, &[fd as u64])?;
            return Err(RestoreError::File { pid: self.ns_pid, fd: target, reason });
        }
        Ok((fd, meta))
    }

    /// Opens `path` in the process with `flags` and checks that it is what `expect` says.
    fn open_checked(&mut self, target: i32, path: &str, flags: i32, expect: Expect) -> Result<i32, RestoreError> {
        let wrong = |meta: &std::fs::Metadata| match expect {
            Expect::Inode(inode) if meta.ino() != inode => {
                Some(format!("{path} is another file than at checkpoint time (inode {} vs {inode})", meta.ino()))
            }
            Expect::Fifo if !meta.file_type().is_fifo() => Some(format!("{path} is not a FIFO any more")),
            _ => None,
        };
        Ok(self.reopen(target, path, flags, "reopen the file", wrong)?.0)
    }

    /// Opens /dev/null in place of a file that cannot be restored (a terminal that is gone, a pipe whose
    /// readers were outside), with the description's access mode and non-blocking flag.
    fn open_null(&mut self, target: i32, flags: i32) -> Result<i32, RestoreError> {
        let flags = flags & (libc::O_ACCMODE | libc::O_NONBLOCK) | libc::O_NOCTTY;
        self.open_in(target, "/dev/null", flags, "open /dev/null in its place")
    }
}
