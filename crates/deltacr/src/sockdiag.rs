//! Unix socket details the socket API does not give (peer identity, pending connections, queue
//! lengths), from the kernel's sock_diag netlink interface (UNIX_DIAG), asked in the sandbox's network
//! namespace (unix sockets are per network namespace).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::unistd::Pid;

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_PEER: u32 = 0x04;
const UDIAG_SHOW_ICONS: u32 = 0x08;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_ICONS: u16 = 3;
const UNIX_DIAG_RQLEN: u16 = 4;

/// What UNIX_DIAG reports for one unix socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixSockInfo {
    pub ino: u32,
    pub sock_type: u8,
    /// TCP_* state numbers: 1 connected, 7 unconnected, 10 listening.
    pub state: u8,
    /// Bound name (a path, or an abstract name starting with a NUL byte).
    pub name: Option<Vec<u8>>,
    pub peer: Option<u32>,
    /// Connections waiting in a listening socket's accept queue.
    pub pending: usize,
    /// Bytes queued to be read; for a listening socket, the number of pending connections.
    pub rqueue: u32,
    /// For a listening socket, its backlog.
    pub wqueue: u32,
}

/// Opens a NETLINK_SOCK_DIAG socket in the network namespace of `member`, from the calling thread
/// (which briefly enters that namespace).
fn diag_socket(member: Pid) -> io::Result<OwnedFd> {
    crate::sys::in_namespace(member, "net", || {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    })?
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes(b[off..off + 2].try_into().expect("2 bytes"))
}

/// All unix sockets of the network namespace of `member`, by inode.
pub fn unix_sockets(member: Pid) -> io::Result<HashMap<u32, UnixSockInfo>> {
    let sock = diag_socket(member)?;
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes()); // nlmsg_len
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.push(libc::AF_UNIX as u8); // sdiag_family
    req.push(0); // sdiag_protocol
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    req.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN).to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]); // no cookie
                                       // SAFETY: req is a complete netlink message of req.len() bytes.
    if unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the kernel writes at most buf.len() bytes.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off = 0usize;
        let n = n as usize;
        while off + 16 <= n {
            let len = u32_at(&buf, off) as usize;
            let kind = u16_at(&buf, off + 4);
            if len < 16 || off + len > n {
                return Err(io::Error::other("malformed sock_diag reply"));
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = -(u32_at(&buf, off + 16) as i32);
                    return Err(io::Error::from_raw_os_error(errno));
                }
                _ => {
                    let msg = &buf[off + 16..off + len];
                    if let Some(info) = parse_unix(msg) {
                        out.insert(info.ino, info);
                    }
                }
            }
            off += len.next_multiple_of(4);
        }
    }
}

fn parse_unix(msg: &[u8]) -> Option<UnixSockInfo> {
    if msg.len() < 16 {
        return None;
    }
    let mut info = UnixSockInfo { ino: u32_at(msg, 4), sock_type: msg[1], state: msg[2], ..Default::default() };
    let mut off = 16;
    while off + 4 <= msg.len() {
        let len = u16_at(msg, off) as usize;
        let kind = u16_at(msg, off + 2);
        if len < 4 || off + len > msg.len() {
            break;
        }
        let data = &msg[off + 4..off + len];
        match kind {
            UNIX_DIAG_NAME => info.name = Some(data.to_vec()),
            UNIX_DIAG_PEER if data.len() >= 4 => info.peer = Some(u32_at(data, 0)).filter(|&p| p != 0),
            UNIX_DIAG_ICONS => info.pending = data.len() / 4,
            UNIX_DIAG_RQLEN if data.len() >= 8 => {
                info.rqueue = u32_at(data, 0);
                info.wqueue = u32_at(data, 4);
            }
            _ => {}
        }
        off += len.next_multiple_of(4);
    }
    Some(info)
}
