//! Unix sockets: a connected socket comes back with its peer as one socketpair (the peer must be in
//! the tree), with the data queued at each end; a listening or unconnected one is bound again to its
//! name. Their peers and queues are read with sock_diag and MSG_PEEK.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};

use super::socket::Socket;
use super::{io_err, FdOwner, FdPlan, FileError, HeldEnds};
use crate::restore::{NewProcess, RestoreError};
use crate::sockdiag::{self, UnixSockInfo};
use crate::state::{FdState, FileKind, OpenFile};
use crate::sys;

/// Captures unix socket `s` (inode `ino`); `unix` caches what sock_diag says of the sandbox's unix
/// sockets.
pub(super) fn capture(
    s: &Socket<'_>,
    ino: u64,
    unix: &mut Option<HashMap<u32, UnixSockInfo>>,
) -> Result<FileKind, FileError> {
    let (owner, fd, sock_type) = (s.owner, s.fd, s.sock_type);
    let err_io = |what| io_err(owner, fd, what);
    if unix.is_none() {
        *unix = Some(sockdiag::unix_sockets(owner.host).map_err(err_io("list unix sockets (sock_diag)"))?);
    }
    let info = unix
        .as_ref()
        .and_then(|m| m.get(&(ino as u32)))
        .cloned()
        .ok_or_else(|| s.unsupported(format!("unix socket {ino} is not in its network namespace")))?;
    let listening = s.listening.then_some(info.wqueue);
    if listening.is_some() && info.pending > 0 {
        return Err(
            s.unsupported(format!("listening unix socket with {} connections waiting to be accepted", info.pending))
        );
    }
    let unconnected = info.peer.is_none() && listening.is_none();
    if unconnected && info.rqueue > 0 {
        return Err(s.unsupported("datagrams queued on an unconnected unix socket are not supported yet".into()));
    }
    // An unconnected socket has nothing queued (and a stream one cannot even be peeked at: ENOTCONN).
    let queue = if listening.is_none() && !unconnected {
        peek_queue(s.sock.as_fd(), sock_type).map_err(|e| match e {
            PeekError::Io(source) => FileError::Io { pid: owner.ns_pid, fd, what: "peek at queued data", source },
            PeekError::Fds => s.unsupported("file descriptors in flight on a unix socket are not supported".into()),
            PeekError::Unsupported(what) => s.unsupported(what.into()),
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

enum PeekError {
    Io(std::io::Error),
    Fds,
    Unsupported(&'static str),
}

/// Most messages read from one datagram or seqpacket queue (the kernel's default `max_dgram_qlen` is 512):
/// every loop over what the kernel answers ends, whatever a process queued.
const MAX_QUEUED_MESSAGES: usize = 65536;

/// The data waiting in a socket's receive queue, read with MSG_PEEK (stream: one blob; datagrams:
/// one entry per message, walked with SO_PEEK_OFF which is put back afterwards). An empty message cannot
/// be walked past (the peek offset does not move) and looks like the end of a seqpacket stream its peer
/// shut down: both are refused, as is a queue of more than [`MAX_QUEUED_MESSAGES`].
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
            Ok((0, _)) => break Err(PeekError::Unsupported(
                "an empty message, or the end of the stream after its peer shut it down, is queued on this unix socket",
            )),
            Ok(_) if out.len() >= MAX_QUEUED_MESSAGES => {
                break Err(PeekError::Unsupported("more than 65536 messages are queued on this unix socket"))
            }
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
pub(super) fn check_peers(owners: &[FdOwner], tables: &[Vec<FdState>], files: &[OpenFile]) -> Result<(), FileError> {
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

impl NewProcess {
    /// Recreates a connected unix socket pair with socketpair(2); each end's queued data is sent
    /// again from the other end. Of a split pair (see [`FdPlan::split`]), only the ends in `mine` stay
    /// here: the other one goes to the tracer (`held`).
    pub(super) fn make_socketpair(
        &mut self,
        target: i32,
        key: u64,
        files: &[OpenFile],
        plan: &FdPlan,
        held: &mut HeldEnds,
        mine: &[u32],
    ) -> Result<(), RestoreError> {
        let (a_id, b_id) = plan.pairs[&key];
        let sock_type = [a_id, b_id]
            .into_iter()
            .flatten()
            .find_map(|id| match files[id as usize].kind {
                FileKind::Unix { sock_type, .. } => Some(sock_type),
                _ => None,
            })
            .expect("a pair has a unix end");
        let addr = self.scratch().addr;
        self.call(libc::SYS_socketpair, &[libc::AF_UNIX as u64, sock_type as u64, 0, addr])?;
        let b = self.scratch().read(0, 8).map_err(self.perr())?;
        let fds = [
            i32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")),
            i32::from_ne_bytes(b[4..8].try_into().expect("4 bytes")),
        ];
        for (end, (id, fd)) in [a_id, b_id].into_iter().zip(fds).enumerate() {
            let Some(id) = id else {
                self.call(libc::SYS_close, &[fd as u64])?;
                continue;
            };
            if let FileKind::Unix { queue, .. } = &files[id as usize].kind {
                // Bytes waiting at this end were sent by the other one.
                for msg in queue {
                    self.write_through(target, fds[1 - end], msg)?;
                }
            }
            let settable = files[id as usize].flags & (libc::O_NONBLOCK | libc::O_ASYNC);
            self.call(libc::SYS_fcntl, &[fd as u64, libc::F_SETFL as u64, settable as u64])?;
        }
        for (id, fd) in [a_id, b_id].into_iter().zip(fds) {
            let Some(id) = id else {
                continue;
            };
            // An end of a split pair held by no process of ours: it goes to the tracer for the process
            // that holds it.
            if plan.split.contains(&key) && !mine.contains(&id) {
                let end = sys::dup_from(self.host, fd).map_err(self.io_err(target, "take the other end"))?;
                held.insert(key, end);
                self.call(libc::SYS_close, &[fd as u64])?;
            } else {
                self.place(fd, plan.temp(id))?;
            }
        }
        Ok(())
    }

    /// Puts this process's end of split pair `key` (`id`) in place: the end another process made and
    /// handed to the tracer, or a new pair (whose other end is handed to the tracer).
    pub(super) fn make_split_end(
        &mut self,
        target: i32,
        id: u32,
        key: u64,
        files: &[OpenFile],
        plan: &FdPlan,
        held: &mut HeldEnds,
    ) -> Result<(), RestoreError> {
        match held.remove(&key) {
            Some(end) => {
                let fd = self.give_fd(end.as_fd())?;
                self.place(fd, plan.temp(id))
            }
            None => self.make_socketpair(target, key, files, plan, held, &[id]),
        }
    }

    /// Recreates a listening or unconnected unix socket under its old name (a stale socket file at
    /// the path is removed first, as bind needs the name free).
    pub(super) fn make_unix(&mut self, target: i32, of: &OpenFile) -> Result<i32, RestoreError> {
        let FileKind::Unix { sock_type, name, listening, .. } = &of.kind else {
            unreachable!("make_unix is only called for unix sockets")
        };
        let fd = self.new_socket(libc::AF_UNIX, *sock_type, 0, of)?;
        if let Some(name) = name {
            if name.first() != Some(&0) {
                let mut path: Vec<u8> = name.iter().copied().take_while(|&c| c != 0).collect();
                path.push(0);
                let p = self.scratch().write(0, &path).map_err(self.perr())?;
                // ENOENT is fine: the name may be free already.
                self.leader().syscall(libc::SYS_unlinkat, &[libc::AT_FDCWD as u64, p, 0]).map_err(self.perr())?;
            }
            let mut sa = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
            sa.extend_from_slice(name);
            self.bind_socket(target, fd, &sa)?;
        }
        if let Some(backlog) = listening {
            self.call(libc::SYS_listen, &[fd, *backlog as u64])?;
        }
        Ok(fd as i32)
    }
}
