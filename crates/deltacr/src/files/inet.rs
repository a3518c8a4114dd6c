//! Inet sockets (TCP and UDP over IPv4 and IPv6): listening, unbound or bound sockets, finished
//! connections and connected UDP sockets are kept with their address and options; established TCP
//! connections are the `tcp` module's.

use std::collections::HashMap;
use std::os::fd::AsFd;

use super::socket::Socket;
use super::{io_err, FileError};
use crate::restore::{NewProcess, RestoreError};
use crate::state::{FileKind, OpenFile};
use crate::sys;

/// Integer socket options kept for inet sockets, (level, option), where they apply (see [`applies`]):
/// those a program sets on its sockets (reuse, keepalive and its timing, Nagle and corking, timeouts,
/// type of service, hop limits, ancillary data it asks for). A socket keeps those that differ from a fresh
/// socket's of its kind in the sandbox's network namespace, so a restore sets only what the program set.
const INET_OPTIONS: [(i32, i32); 34] = [
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::SOL_SOCKET, libc::SO_BROADCAST),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE),
    (libc::SOL_SOCKET, libc::SO_PRIORITY),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT),
    (libc::SOL_SOCKET, libc::SO_TIMESTAMP),
    (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_TCP, libc::TCP_CORK),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
    (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    (libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT),
    (libc::IPPROTO_TCP, libc::TCP_SYNCNT),
    (libc::IPPROTO_TCP, libc::TCP_LINGER2),
    (libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT),
    (libc::IPPROTO_TCP, libc::TCP_THIN_LINEAR_TIMEOUTS),
    (libc::IPPROTO_IP, libc::IP_TOS),
    (libc::IPPROTO_IP, libc::IP_TTL),
    (libc::IPPROTO_IP, libc::IP_RECVERR),
    (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER),
    (libc::IPPROTO_IP, libc::IP_FREEBIND),
    (libc::IPPROTO_IP, libc::IP_PKTINFO),
    (libc::IPPROTO_IP, libc::IP_MULTICAST_TTL),
    (libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
    (libc::IPPROTO_IPV6, libc::IPV6_TCLASS),
    (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS),
    (libc::IPPROTO_IPV6, libc::IPV6_RECVERR),
    (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER),
    (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
];

/// Whether option `name` of `level` applies to a socket of `family` and `sock_type` (the kernel refuses
/// multicast options on stream sockets, whose accepted ones read the listener's anyway).
fn applies(level: i32, name: i32, family: i32, sock_type: i32) -> bool {
    match level {
        libc::IPPROTO_IP if matches!(name, libc::IP_MULTICAST_TTL | libc::IP_MULTICAST_LOOP) => {
            family == libc::AF_INET && sock_type == libc::SOCK_DGRAM
        }
        libc::IPPROTO_TCP => sock_type == libc::SOCK_STREAM,
        libc::IPPROTO_IP => family == libc::AF_INET,
        libc::IPPROTO_IPV6 => family == libc::AF_INET6,
        _ => true,
    }
}

/// The values of [`INET_OPTIONS`] on a fresh socket of this kind in the network namespace of `member`
/// (None where the option cannot be read).
fn fresh_values(
    member: nix::unistd::Pid,
    family: i32,
    sock_type: i32,
    protocol: i32,
) -> std::io::Result<Vec<Option<i32>>> {
    use rustix::net::{AddressFamily, Protocol, SocketFlags, SocketType};
    let protocol = std::num::NonZeroU32::new(protocol as u32).map(Protocol::from_raw);
    let sock = sys::in_namespace(member, "net", || {
        let (family, sock_type) = (AddressFamily::from_raw(family as u16), SocketType::from_raw(sock_type as u32));
        rustix::net::socket_with(family, sock_type, SocketFlags::CLOEXEC, protocol)
    })??;
    Ok(INET_OPTIONS.iter().map(|&(level, name)| sys::getsockopt_int(sock.as_fd(), level, name).ok()).collect())
}

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

/// Captures inet socket `s` of address family `family`; `defaults` caches [`fresh_values`].
pub(super) fn capture(
    s: &Socket<'_>,
    family: i32,
    defaults: &mut HashMap<(i32, i32, i32), Vec<Option<i32>>>,
) -> Result<FileKind, FileError> {
    let err_io = |what| io_err(s.owner, s.fd, what);
    let (sock_type, protocol, listening) = (s.sock_type, s.protocol, s.listening);
    let local = sys::socket_name(s.sock.as_fd(), false).map_err(err_io("read the socket's address"))?;
    let local = local.filter(|a| port_of(a) != 0);
    let peer = sys::socket_name(s.sock.as_fd(), true).map_err(err_io("read the peer's address"))?;
    let mut local = local;
    let fresh = match defaults.entry((family, sock_type, protocol)) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(
            fresh_values(s.owner.host, family, sock_type, protocol)
                .map_err(err_io("make a fresh socket to compare"))?,
        ),
    };
    let mut options = Vec::new();
    for (&(level, name), fresh) in INET_OPTIONS.iter().zip(fresh.iter()) {
        if !applies(level, name, family, sock_type) {
            continue;
        }
        let value = s.opt(level, name)?;
        if Some(value) != *fresh {
            options.push((level, name, value));
        }
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
