//! Inet sockets (TCP and UDP over IPv4 and IPv6): listening, unbound or bound sockets, finished
//! connections and connected UDP sockets are kept with their address and options; established TCP
//! connections are the `tcp` module's.

use std::os::fd::AsFd;

use super::socket::Socket;
use super::{io_err, FileError};
use crate::restore::{NewProcess, RestoreError};
use crate::state::{FileKind, OpenFile};
use crate::sys;

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
pub(super) fn show_inet(addr: &[u8]) -> String {
    match addr.len() {
        16 => format!("{}.{}.{}.{}:{}", addr[4], addr[5], addr[6], addr[7], port_of(addr)),
        28 => {
            let ip: [u8; 16] = addr[8..24].try_into().expect("16 bytes");
            format!("[{}]:{}", std::net::Ipv6Addr::from(ip), port_of(addr))
        }
        _ => format!("{addr:?}"),
    }
}

/// Captures inet socket `s` of address family `family`.
pub(super) fn capture(s: &Socket<'_>, family: i32) -> Result<FileKind, FileError> {
    let err_io = |what| io_err(s.owner, s.fd, what);
    let (sock_type, protocol, listening) = (s.sock_type, s.protocol, s.listening);
    let local = sys::socket_name(s.sock.as_fd(), false).map_err(err_io("read the socket's address"))?;
    let local = local.filter(|a| port_of(a) != 0);
    let peer = sys::socket_name(s.sock.as_fd(), true).map_err(err_io("read the peer's address"))?;
    let mut local = local;
    let mut options = Vec::new();
    for (level, name) in INET_OPTIONS {
        if level == libc::IPPROTO_TCP && sock_type != libc::SOCK_STREAM {
            continue;
        }
        options.push((level, name, s.opt(level, name)?));
    }
    if family == libc::AF_INET6 {
        options.push((libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, s.opt(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?));
    }
    // Queued datagrams would be lost by a restore: refuse rather than restore the socket without them.
    if sock_type == libc::SOCK_DGRAM {
        let queued = sys::fionread(s.sock.as_fd()).map_err(err_io("size the receive queue"))?;
        if queued > 0 {
            let at = local.as_deref().map_or("unbound".to_string(), show_inet);
            return Err(s.unsupported(format!(
                "UDP socket {at} has datagrams waiting to be read ({queued} bytes): queued datagrams cannot be \
                 checkpointed yet"
            )));
        }
    }
    if sock_type == libc::SOCK_STREAM && protocol == libc::IPPROTO_TCP && !listening {
        const TCP_CLOSE: u8 = 7;
        let state = sys::tcp_state(s.sock.as_fd()).map_err(err_io("read the TCP state"))?;
        if state != TCP_CLOSE {
            let (Some(local), Some(peer)) = (local, peer) else {
                return Err(s.unsupported(format!("TCP socket in state {state} without both addresses")));
            };
            return super::tcp::capture(s, family, state, local, peer, options);
        }
        // A finished connection keeps its local port (often a listener's): it is restored as
        // a fresh, unbound socket.
        if peer.is_none() {
            local = None;
        }
    }
    Ok(FileKind::Inet { family, sock_type, protocol, local, peer, listening, options })
}

impl NewProcess {
    /// Recreates an inet socket: options, address (SO_REUSEADDR held during bind, as the killed tree's
    /// connections may linger in TIME_WAIT), listen, and the peer of a connected UDP socket.
    pub(super) fn make_inet(&mut self, target: i32, of: &OpenFile) -> Result<i32, RestoreError> {
        const LISTEN_BACKLOG: u64 = 128;
        let FileKind::Inet { family, sock_type, protocol, local, peer, listening, options } = &of.kind else {
            unreachable!("make_inet is only called for inet sockets")
        };
        let fd = self.new_socket(*family, *sock_type, *protocol, of)?;
        for &(level, name, value) in options {
            self.set_socket_option(fd, level, name, value)?;
        }
        if let Some(addr) = local {
            let reuse = options.contains(&(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1));
            if !reuse {
                self.set_socket_option(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
            }
            self.bind_socket(target, fd, addr)?;
            if !reuse {
                self.set_socket_option(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 0)?;
            }
        }
        if *listening {
            self.call(libc::SYS_listen, &[fd, LISTEN_BACKLOG])?;
        }
        if let Some(addr) = peer {
            let a = self.scratch().write(0, addr).map_err(self.perr())?;
            self.call(libc::SYS_connect, &[fd, a, addr.len() as u64])?;
        }
        Ok(fd as i32)
    }
}
