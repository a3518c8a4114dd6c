//! Capturing the fd tables of a process tree: which open file descriptions exist, which fds (in which
//! processes) share them, and the state of each (offset, flags, unread pipe data).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::unistd::{pipe2, Pid};

use crate::procfs::{self, FdInfo};
use crate::sockdiag::{self, UnixSockInfo};
use crate::state::{FdState, FileKind, FileLock, LockKind, OpenFile, PtyNode};
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

/// Unix98 pty slaves (/dev/pts/N) use majors 136..=143.
pub const PTS_MAJOR: u32 = 136;
/// /dev/tty, /dev/console, /dev/ptmx.
const TTYAUX_MAJOR: u32 = 5;
/// Character devices reopened by path: mem (1) covers /dev/null, zero, full, random, urandom.
const MEM_MAJOR: u64 = 1;

struct Known {
    id: u32,
    owner: Pid,
    fd: i32,
}

/// Captures the fds of `owners`. Returns the open file descriptions and, per owner, its fds.
pub fn capture(owners: &[FdOwner]) -> Result<(Vec<OpenFile>, Vec<Vec<FdState>>), FileError> {
    let mut unix: Option<HashMap<u32, UnixSockInfo>> = None;
    let mut files: Vec<OpenFile> = Vec::new();
    let mut by_inode: HashMap<(u64, u64), Vec<Known>> = HashMap::new();
    let mut tables = Vec::with_capacity(owners.len());
    for owner in owners {
        let pid = owner.host;
        let fds = procfs::fds(pid).map_err(|source| FileError::Proc { pid: owner.ns_pid, fd: -1, source })?;
        let mut table = Vec::with_capacity(fds.len());
        let mut posix_seen = std::collections::HashSet::new();
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
                    let kind = classify(owner, fd, &link, &meta, &info, &mut unix)?;
                    let locks =
                        parse_locks(&info, owner, fd)?.into_iter().filter(|l| l.kind != LockKind::Posix).collect();
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
                parse_locks(&info, owner, fd)?.into_iter().filter(|l| l.kind == LockKind::Posix).collect()
            } else {
                Vec::new()
            };
            table.push(FdState { fd, cloexec: raw_flags & O_CLOEXEC_BIT != 0, file: id, posix_locks });
        }
        tables.push(table);
    }
    capture_pipe_data(owners, &tables, &mut files)?;
    mark_outside_readers(owners, &tables, &mut files)?;
    check_unix_peers(owners, &tables, &files)?;
    Ok((files, tables))
}

/// The locks listed in an fdinfo ("lock:\t1: POSIX  ADVISORY  WRITE 1234 fe:00:567 5 14").
fn parse_locks(info: &FdInfo, owner: &FdOwner, fd: i32) -> Result<Vec<FileLock>, FileError> {
    let unsupported = |reason: String| FileError::Unsupported { pid: owner.ns_pid, fd, reason };
    let mut out = Vec::new();
    for (_, v) in info.lines.iter().filter(|(k, _)| k == "lock") {
        let w: Vec<&str> = v.split_whitespace().collect();
        if w.len() < 8 {
            return Err(unsupported(format!("unreadable lock line {v:?}")));
        }
        let kind = match w[1] {
            "POSIX" => LockKind::Posix,
            "FLOCK" => LockKind::Flock,
            "OFDLCK" => LockKind::Ofd,
            other => return Err(unsupported(format!("{other} locks are not supported yet"))),
        };
        if w[2] != "ADVISORY" {
            return Err(unsupported(format!("{} locks are not supported yet", w[2])));
        }
        let write = match w[3] {
            "WRITE" => true,
            "READ" => false,
            other => return Err(unsupported(format!("lock type {other} is not supported yet"))),
        };
        let start = w[6].parse().map_err(|_| unsupported(format!("unreadable lock line {v:?}")))?;
        let end = if w[7] == "EOF" {
            None
        } else {
            Some(w[7].parse().map_err(|_| unsupported(format!("unreadable lock line {v:?}")))?)
        };
        out.push(FileLock { kind, write, start, end });
    }
    Ok(out)
}

fn classify(
    owner: &FdOwner,
    fd: i32,
    link: &str,
    meta: &std::fs::Metadata,
    info: &FdInfo,
    unix: &mut Option<HashMap<u32, UnixSockInfo>>,
) -> Result<FileKind, FileError> {
    let unsupported = |reason: String| FileError::Unsupported { pid: owner.ns_pid, fd, reason };
    if let Some(rest) = link.strip_prefix("socket:[") {
        let ino = rest.trim_end_matches(']').parse().map_err(|_| unsupported(format!("odd socket link {link}")))?;
        return classify_socket(owner, fd, ino, unix);
    }
    if let Some(kind) = link.strip_prefix("anon_inode:") {
        return anon_inode(kind, info).map_err(|e| match e {
            FileError::Unsupported { reason, .. } => unsupported(reason),
            other => other,
        });
    }
    if let Some(rest) = link.strip_prefix("pipe:[") {
        let pipe = rest.trim_end_matches(']').parse().map_err(|_| unsupported(format!("odd pipe link {link}")))?;
        let flags = FdInfo::read(owner.host, fd).and_then(|i| i.flags()).map_err(|source| FileError::Proc {
            pid: owner.ns_pid,
            fd,
            source,
        })?;
        let write_end = flags & libc::O_ACCMODE == libc::O_WRONLY;
        return Ok(FileKind::Pipe { pipe, write_end, data: Vec::new(), readers_outside: false });
    }
    if !link.starts_with('/') {
        return Err(unsupported(format!("{link} is not supported yet")));
    }
    let ft = meta.file_type();
    let major = libc::major(meta.rdev());
    if ft.is_char_device() && (PTS_MAJOR..PTS_MAJOR + 8).contains(&major) {
        let err_io = |what| io_err(owner, fd, what);
        let tty = sys::dup_from(owner.host, fd).map_err(err_io("duplicate the terminal"))?;
        let index = (major - PTS_MAJOR) * 256 + libc::minor(meta.rdev());
        // Closing the master removes the node, hence " (deleted)".
        let path = link.trim_end_matches(" (deleted)").to_string();
        return match sys::tty_get(tty.as_fd()) {
            Ok((termios, winsize)) => Ok(FileKind::Tty { path, index, node: PtyNode::of(meta), termios, winsize }),
            // A hung-up terminal (its master was closed) answers every request with EIO.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(FileKind::HungUpTty { path, index }),
            Err(e) => Err(err_io("read the terminal settings")(e)),
        };
    }
    if link.ends_with(" (deleted)") {
        return Err(unsupported(format!("{link}: open files that were deleted are not supported yet")));
    }
    if ft.is_char_device() && major == TTYAUX_MAJOR {
        return Err(unsupported(format!("{link}: pty masters and /dev/tty are not supported yet")));
    }
    if ft.is_fifo() {
        return Ok(FileKind::Fifo {
            path: link.to_string(),
            inode: meta.ino(),
            data: Vec::new(),
            readers_outside: false,
        });
    }
    let ok = ft.is_file() || ft.is_dir() || (ft.is_char_device() && libc::major(meta.rdev()) as u64 == MEM_MAJOR);
    if !ok {
        return Err(unsupported(format!("{link}: this kind of file is not supported yet")));
    }
    Ok(FileKind::Path { path: link.to_string(), dev: meta.dev(), inode: meta.ino(), mode: meta.mode() })
}

/// Socket options kept for inet sockets: (level, option).
const INET_OPTIONS: [(i32, i32); 5] = [
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
];

fn port_of(addr: &[u8]) -> u16 {
    u16::from_be_bytes([addr[2], addr[3]])
}

/// Describes a sockaddr_in/in6 for error messages.
fn show_inet(addr: &[u8]) -> String {
    match addr.len() {
        16 => format!("{}.{}.{}.{}:{}", addr[4], addr[5], addr[6], addr[7], port_of(addr)),
        28 => {
            let ip: [u8; 16] = addr[8..24].try_into().expect("16 bytes");
            format!("[{}]:{}", std::net::Ipv6Addr::from(ip), port_of(addr))
        }
        _ => format!("{addr:?}"),
    }
}

fn classify_socket(
    owner: &FdOwner,
    fd: i32,
    ino: u64,
    unix: &mut Option<HashMap<u32, UnixSockInfo>>,
) -> Result<FileKind, FileError> {
    let err_io = |what| io_err(owner, fd, what);
    let unsupported = |reason: String| FileError::Unsupported { pid: owner.ns_pid, fd, reason };
    let sock = sys::dup_from(owner.host, fd).map_err(err_io("duplicate the socket"))?;
    let opt = |level, name| sys::getsockopt_int(sock.as_fd(), level, name).map_err(err_io("read a socket option"));
    let family = opt(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    let sock_type = opt(libc::SOL_SOCKET, libc::SO_TYPE)?;
    let protocol = opt(libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    let listening = opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0;
    match family {
        libc::AF_INET | libc::AF_INET6 => {
            let local = sys::socket_name(sock.as_fd(), false).map_err(err_io("read the socket's address"))?;
            let local = local.filter(|a| port_of(a) != 0);
            let peer = sys::socket_name(sock.as_fd(), true).map_err(err_io("read the peer's address"))?;
            let mut local = local;
            if sock_type == libc::SOCK_STREAM && protocol == libc::IPPROTO_TCP && !listening {
                const TCP_CLOSE: u8 = 7;
                let state = sys::tcp_state(sock.as_fd()).map_err(err_io("read the TCP state"))?;
                if state != TCP_CLOSE {
                    let from = local.as_deref().map_or("?".to_string(), show_inet);
                    let to = peer.as_deref().map_or("?".to_string(), show_inet);
                    return Err(unsupported(format!(
                        "TCP connection {from} -> {to} (state {state}): established connections cannot be checkpointed"
                    )));
                }
                // A finished connection keeps its local port (often a listener's): it is restored as
                // a fresh, unbound socket.
                if peer.is_none() {
                    local = None;
                }
            }
            let mut options = Vec::new();
            for (level, name) in INET_OPTIONS {
                if level == libc::IPPROTO_TCP && sock_type != libc::SOCK_STREAM {
                    continue;
                }
                options.push((level, name, opt(level, name)?));
            }
            if family == libc::AF_INET6 {
                options.push((libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, opt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?));
            }
            Ok(FileKind::Inet { family, sock_type, protocol, local, peer, listening, options })
        }
        libc::AF_UNIX => {
            if unix.is_none() {
                *unix = Some(sockdiag::unix_sockets(owner.host).map_err(err_io("list unix sockets (sock_diag)"))?);
            }
            let info = unix
                .as_ref()
                .and_then(|m| m.get(&(ino as u32)))
                .cloned()
                .ok_or_else(|| unsupported(format!("unix socket {ino} is not in its network namespace")))?;
            let listening = listening.then_some(info.wqueue);
            if listening.is_some() && info.pending > 0 {
                return Err(unsupported(format!(
                    "listening unix socket with {} connections waiting to be accepted",
                    info.pending
                )));
            }
            if info.peer.is_none() && listening.is_none() && info.rqueue > 0 {
                return Err(unsupported("datagrams queued on an unconnected unix socket are not supported yet".into()));
            }
            let queue = if listening.is_none() {
                peek_queue(sock.as_fd(), sock_type).map_err(|e| match e {
                    PeekError::Io(source) => {
                        FileError::Io { pid: owner.ns_pid, fd, what: "peek at queued data", source }
                    }
                    PeekError::Fds => {
                        unsupported("file descriptors in flight on a unix socket are not supported".into())
                    }
                })?
            } else {
                Vec::new()
            };
            Ok(FileKind::Unix {
                ino,
                sock_type,
                name: info.name.filter(|n| !n.is_empty()),
                listening,
                peer: info.peer.map(u64::from),
                queue,
            })
        }
        other => Err(unsupported(format!("sockets of address family {other} are not supported yet"))),
    }
}

enum PeekError {
    Io(std::io::Error),
    Fds,
}

/// The data waiting in a socket's receive queue, read with MSG_PEEK (stream: one blob; datagrams:
/// one entry per message, walked with SO_PEEK_OFF which is put back afterwards).
fn peek_queue(sock: BorrowedFd<'_>, sock_type: i32) -> Result<Vec<Vec<u8>>, PeekError> {
    let mut out = Vec::new();
    let stream = sock_type == libc::SOCK_STREAM;
    let old_off = if stream {
        None
    } else {
        let old = sys::getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF).map_err(PeekError::Io)?;
        sys::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0).map_err(PeekError::Io)?;
        Some(old)
    };
    let mut buf = vec![0u8; 1 << 20];
    let res = loop {
        match sys::recv_peek(sock, &mut buf) {
            Ok((0, _)) if stream => break Ok(()),
            Ok((n, ctrunc)) => {
                if ctrunc {
                    break Err(PeekError::Fds);
                }
                out.push(buf[..n].to_vec());
                if stream {
                    break Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break Ok(()),
            Err(e) => break Err(PeekError::Io(e)),
        }
    };
    if let Some(old) = old_off {
        sys::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_PEEK_OFF, old).map_err(PeekError::Io)?;
    }
    res.map(|_| out)
}

/// A connected unix socket is restored with its peer as one socketpair: the peer must be a socket
/// of the checkpointed processes, connected back to it.
fn check_unix_peers(owners: &[FdOwner], tables: &[Vec<FdState>], files: &[OpenFile]) -> Result<(), FileError> {
    let by_ino: HashMap<u64, &OpenFile> = files
        .iter()
        .filter_map(|f| match f.kind {
            FileKind::Unix { ino, .. } => Some((ino, f)),
            _ => None,
        })
        .collect();
    for (owner, table) in owners.iter().zip(tables) {
        for fd in table {
            let FileKind::Unix { ino, peer: Some(peer), .. } = files[fd.file as usize].kind else {
                continue;
            };
            let back = by_ino.get(&peer).and_then(|f| match f.kind {
                FileKind::Unix { peer, .. } => peer,
                _ => None,
            });
            if back != Some(ino) {
                return Err(FileError::Unsupported {
                    pid: owner.ns_pid,
                    fd: fd.fd,
                    reason: format!(
                        "unix socket connected to socket {peer}, which is not held by the checkpointed processes \
                         (or is connected elsewhere)"
                    ),
                });
            }
        }
    }
    Ok(())
}

fn anon_inode(kind: &str, info: &FdInfo) -> Result<FileKind, FileError> {
    let bad =
        |what: &str| FileError::Unsupported { pid: 0, fd: 0, reason: format!("cannot parse {kind} fdinfo: {what}") };
    let field = |key: &str| info.get(key).map_err(|_| bad(key));
    let hex = |key: &str| field(key).and_then(|v| u64::from_str_radix(v.trim(), 16).map_err(|_| bad(key)));
    let dec = |key: &str| field(key).and_then(|v| v.trim().parse::<u64>().map_err(|_| bad(key)));
    let pair = |key: &str| -> Result<(u64, u64), FileError> {
        let v = field(key)?;
        let inner = v.trim().trim_start_matches('(').trim_end_matches(')');
        let (a, b) = inner.split_once(',').ok_or_else(|| bad(key))?;
        Ok((a.trim().parse().map_err(|_| bad(key))?, b.trim().parse().map_err(|_| bad(key))?))
    };
    match kind {
        "[eventfd]" => Ok(FileKind::EventFd {
            count: hex("eventfd-count")?,
            semaphore: info.get("eventfd-semaphore").is_ok_and(|v| v.trim() == "1"),
        }),
        "[signalfd]" => Ok(FileKind::SignalFd { mask: hex("sigmask")? }),
        "[timerfd]" => Ok(FileKind::TimerFd {
            clockid: dec("clockid")? as i32,
            ticks: dec("ticks")?,
            value: pair("it_value")?,
            interval: pair("it_interval")?,
        }),
        "[eventpoll]" => {
            let mut targets = Vec::new();
            // Lines look like "tfd:        3 events:       19 data:                3  pos:0 ino:40e".
            for (_, v) in info.lines.iter().filter(|(k, _)| k == "tfd") {
                let words: Vec<&str> = v.split_whitespace().collect();
                let get = |name: &str| words.iter().position(|w| *w == name).and_then(|i| words.get(i + 1));
                let fd = words.first().and_then(|w| w.parse().ok()).ok_or_else(|| bad("tfd"))?;
                let events =
                    get("events:").and_then(|w| u32::from_str_radix(w, 16).ok()).ok_or_else(|| bad("events"))?;
                let data = get("data:").and_then(|w| u64::from_str_radix(w, 16).ok()).ok_or_else(|| bad("data"))?;
                targets.push(crate::state::EpollTarget { fd, events, data });
            }
            Ok(FileKind::Epoll { targets })
        }
        other => {
            Err(FileError::Unsupported { pid: 0, fd: 0, reason: format!("anon_inode:{other} is not supported yet") })
        }
    }
}

/// Reads the unread bytes of every pipe and FIFO without consuming them (tee into a pipe of our own) and keeps
/// them on one of the pipe's open files, a read end when there is one.
fn capture_pipe_data(owners: &[FdOwner], tables: &[Vec<FdState>], files: &mut [OpenFile]) -> Result<(), FileError> {
    // pipe inode -> (file that keeps the data, an fd that reaches the pipe)
    let mut pipes: HashMap<u64, (usize, FdOwner, i32)> = HashMap::new();
    for (owner, table) in owners.iter().zip(tables) {
        for fds in table {
            let idx = fds.file as usize;
            let (pipe, write_end) = match files[idx].kind {
                FileKind::Pipe { pipe, write_end, .. } => (pipe, write_end),
                // A FIFO's data lives in its inode; any of its open files will do.
                FileKind::Fifo { inode, .. } => (inode, true),
                _ => continue,
            };
            let entry = pipes.entry(pipe).or_insert((idx, *owner, fds.fd));
            if !write_end {
                entry.0 = idx;
            }
        }
    }
    for (keeper, owner, fd) in pipes.into_values() {
        let bytes = peek_pipe(&owner, fd)?;
        if let FileKind::Pipe { data, .. } | FileKind::Fifo { data, .. } = &mut files[keeper].kind {
            *data = bytes;
        }
    }
    Ok(())
}

/// Marks the write ends of pipes and FIFOs whose readers are all outside the checkpointed processes
/// (see `FileKind::Pipe`): no read end of theirs is in the tree, and the kernel still counts readers.
fn mark_outside_readers(owners: &[FdOwner], tables: &[Vec<FdState>], files: &mut [OpenFile]) -> Result<(), FileError> {
    let write_only = |f: &OpenFile| f.flags & libc::O_ACCMODE == libc::O_WRONLY;
    // Pipes (by inode) and FIFOs (by inode) read inside the tree.
    let read_inside: HashSet<u64> = files
        .iter()
        .filter_map(|f| match f.kind {
            FileKind::Pipe { pipe, write_end: false, .. } => Some(pipe),
            FileKind::Fifo { inode, .. } if !write_only(f) => Some(inode),
            _ => None,
        })
        .collect();
    let mut checked = HashSet::new();
    for (owner, table) in owners.iter().zip(tables) {
        for fd in table {
            let f = &mut files[fd.file as usize];
            let key = match f.kind {
                FileKind::Pipe { pipe, write_end: true, .. } => pipe,
                FileKind::Fifo { inode, .. } if write_only(f) => inode,
                _ => continue,
            };
            if read_inside.contains(&key) || !checked.insert(fd.file) {
                continue;
            }
            let end = sys::dup_from(owner.host, fd.fd).map_err(io_err(owner, fd.fd, "duplicate the pipe"))?;
            let outside = sys::pipe_has_readers(end.as_fd()).map_err(io_err(owner, fd.fd, "poll the pipe"))?;
            if let FileKind::Pipe { readers_outside, .. } | FileKind::Fifo { readers_outside, .. } = &mut f.kind {
                *readers_outside = outside;
            }
        }
    }
    Ok(())
}

fn peek_pipe(owner: &FdOwner, fd: i32) -> Result<Vec<u8>, FileError> {
    let err_io = |what| io_err(owner, fd, what);
    let end = sys::dup_from(owner.host, fd).map_err(err_io("duplicate the pipe"))?;
    let reader: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", end.as_raw_fd()))
        .map_err(err_io("open the pipe for reading"))?
        .into();
    let queued = sys::fionread(reader.as_fd()).map_err(err_io("count queued bytes"))?;
    if queued == 0 {
        return Ok(Vec::new());
    }
    let size = fcntl(reader.as_fd(), FcntlArg::F_GETPIPE_SZ).map_err(|e| err_io("read the pipe size")(e.into()))?;
    let (copy_rd, copy_wr) =
        pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(|e| err_io("make a pipe")(e.into()))?;
    fcntl(copy_wr.as_fd(), FcntlArg::F_SETPIPE_SZ(size)).map_err(|e| err_io("size a pipe")(e.into()))?;
    let copied = sys::tee(reader.as_fd(), copy_wr.as_fd(), queued).map_err(err_io("tee the pipe"))?;
    drop(copy_wr);
    let mut data = Vec::with_capacity(copied);
    File::from(copy_rd).read_to_end(&mut data).map_err(err_io("read the pipe copy"))?;
    if data.len() != queued {
        return Err(FileError::Unsupported {
            pid: owner.ns_pid,
            fd,
            reason: format!("pipe holds {queued} bytes but only {} could be copied", data.len()),
        });
    }
    Ok(data)
}
