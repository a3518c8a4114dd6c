//! What inet and unix sockets have in common: at checkpoint, a copy of the socket in the tracer and its
//! family, type, protocol and listening state; at restore, socket(2) and bind(2).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use super::{inet, io_err, unix, FdOwner, FileError};
use crate::restore::{NewProcess, RestoreError};
use crate::sockdiag::UnixSockInfo;
use crate::state::{FileKind, OpenFile};
use crate::sys;

/// A socket of a checkpointed process, duplicated into the tracer.
pub(super) struct Socket<'a> {
    pub owner: &'a FdOwner,
    pub fd: i32,
    pub sock: OwnedFd,
    pub sock_type: i32,
    pub protocol: i32,
    pub listening: bool,
}

impl Socket<'_> {
    /// Reads an int socket option.
    pub fn opt(&self, level: i32, name: i32) -> Result<i32, FileError> {
        sys::getsockopt_int(self.sock.as_fd(), level, name).map_err(io_err(self.owner, self.fd, "read a socket option"))
    }

    pub fn unsupported(&self, reason: String) -> FileError {
        FileError::Unsupported { pid: self.owner.ns_pid, fd: self.fd, reason }
    }
}

/// What one capture learns of the sandbox's sockets once and uses for all of them.
#[derive(Default)]
pub(super) struct Seen {
    /// The sandbox's unix sockets (read with sock_diag when the first one is met).
    pub unix: Option<HashMap<u32, UnixSockInfo>>,
    /// The option values of a fresh socket, by (family, type, protocol), in the sandbox's network namespace
    /// (see `inet::INET_OPTIONS`).
    pub defaults: HashMap<(i32, i32, i32), Vec<Option<i32>>>,
}

/// Captures socket inode `ino` at fd `fd` of `owner`.
pub(super) fn capture(owner: &FdOwner, fd: i32, ino: u64, seen: &mut Seen) -> Result<FileKind, FileError> {
    let sock = sys::dup_from(owner.host, fd).map_err(io_err(owner, fd, "duplicate the socket"))?;
    let mut s = Socket { owner, fd, sock, sock_type: 0, protocol: 0, listening: false };
    let family = s.opt(libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    s.sock_type = s.opt(libc::SOL_SOCKET, libc::SO_TYPE)?;
    s.protocol = s.opt(libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    s.listening = s.opt(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0;
    match family {
        libc::AF_INET | libc::AF_INET6 => inet::capture(&s, family, &mut seen.defaults),
        libc::AF_UNIX => unix::capture(&s, ino, &mut seen.unix),
        other => Err(s.unsupported(format!("sockets of address family {other} are not supported yet"))),
    }
}

impl NewProcess {
    /// Injects socket(2) with the description's non-blocking flag.
    pub(super) fn new_socket(
        &mut self,
        family: i32,
        sock_type: i32,
        protocol: i32,
        of: &OpenFile,
    ) -> Result<u64, RestoreError> {
        let ty = sock_type | (of.flags & libc::O_NONBLOCK);
        Ok(self.call(libc::SYS_socket, &[family as u64, ty as u64, protocol as u64])? as u64)
    }

    /// Sets an integer option of socket `fd` (injected setsockopt).
    pub(super) fn set_socket_option(&mut self, fd: u64, level: i32, name: i32, value: i32) -> Result<(), RestoreError> {
        let addr = self.scratch().write(0, &value.to_ne_bytes()).map_err(self.perr())?;
        self.call(libc::SYS_setsockopt, &[fd, level as u64, name as u64, addr, 4]).map(drop)
    }

    /// Binds socket `fd` to raw sockaddr `addr`.
    pub(super) fn bind_socket(&mut self, target: i32, fd: u64, addr: &[u8]) -> Result<(), RestoreError> {
        let a = self.scratch().write(0, addr).map_err(self.perr())?;
        self.call_file(target, "bind the socket to its address again", libc::SYS_bind, &[fd, a, addr.len() as u64])
            .map(drop)
    }
}
