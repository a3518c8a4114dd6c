//! Established TCP connections whose both ends are checkpointed, with TCP repair (`TCP_REPAIR`, as
//! CRIU's libsoccr): at checkpoint the tracer puts the live socket in repair mode for a moment and
//! reads its sequence numbers, queues, options and window; at restore the process makes a socket, the
//! tracer repairs it into that connection (bind and connect send nothing in repair mode) and keeps it in
//! repair mode until every process of the tree is restored: only then do the connections leave repair
//! mode and send what was not sent yet, so no segment reaches a peer that does not exist yet. Repair
//! needs CAP_NET_ADMIN over the socket's network namespace: the tracer has it, the sandbox does not.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::socket::Socket;
use super::FileError;
use crate::restore::{NewProcess, RestoreError};
use crate::state::{FileKind, OpenFile, TcpConn};
use crate::sys;

const TCP_ESTABLISHED: u8 = 1;
/// The peer has closed its side; this one has not yet.
const TCP_CLOSE_WAIT: u8 = 8;
/// `TCP_REPAIR` values: on, off (with a window probe), off without it.
const REPAIR_ON: i32 = 1;
const REPAIR_OFF: i32 = 0;
const REPAIR_OFF_NO_WP: i32 = -1;
/// `TCP_REPAIR_QUEUE` values.
const NO_QUEUE: i32 = 0;
const RECV_QUEUE: i32 = 1;
const SEND_QUEUE: i32 = 2;
/// `tcpi_options` bits and the TCP option codes of `TCP_REPAIR_OPTIONS`.
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
/// `SIOCOUTQ` (= TIOCOUTQ): bytes in the send queue.
const SIOCOUTQ: libc::c_ulong = 0x5411;

fn set(sock: BorrowedFd<'_>, name: i32, value: i32) -> std::io::Result<()> {
    sys::setsockopt_int(sock, libc::IPPROTO_TCP, name, value)
}

/// Puts a live socket in repair mode and takes it out again (without a window probe) when dropped,
/// with its SO_REUSEADDR back (leaving repair mode clears it).
struct Repairing<'a> {
    sock: BorrowedFd<'a>,
    reuse: bool,
}

impl<'a> Repairing<'a> {
    fn new(sock: BorrowedFd<'a>, reuse: bool) -> std::io::Result<Repairing<'a>> {
        set(sock, libc::TCP_REPAIR, REPAIR_ON)?;
        Ok(Repairing { sock, reuse })
    }
}

impl Drop for Repairing<'_> {
    fn drop(&mut self) {
        let _ = set(self.sock, libc::TCP_REPAIR_QUEUE, NO_QUEUE);
        let _ = set(self.sock, libc::TCP_REPAIR, REPAIR_OFF_NO_WP);
        if self.reuse {
            let _ = sys::setsockopt_int(self.sock, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        }
    }
}

/// The sequence number and bytes of one queue of a socket in repair mode (`len` bytes are queued).
fn read_queue(sock: BorrowedFd<'_>, queue: i32, len: usize) -> std::io::Result<(u32, Vec<u8>)> {
    set(sock, libc::TCP_REPAIR_QUEUE, queue)?;
    let seq = sys::getsockopt_int(sock, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)? as u32;
    let mut data = vec![0u8; len];
    if len > 0 {
        let (n, _) = sys::recv_peek(sock, &mut data)?;
        if n != len {
            return Err(std::io::Error::other(format!("read {n} of the {len} queued bytes")));
        }
    }
    Ok((seq, data))
}

/// Captures established connection `s` (state `state`, addresses `local` and `peer`, kept `options`).
pub(super) fn capture(
    s: &Socket<'_>,
    family: i32,
    state: u8,
    local: Vec<u8>,
    peer: Vec<u8>,
    options: Vec<(i32, i32, i32)>,
) -> Result<FileKind, FileError> {
    // Kept only if its peer is outside (see files::settle_tcp): then it is reset at restore, or, closed by
    // its peer already, closed again after what it has not read.
    if state != TCP_ESTABLISHED {
        let mut unread = Vec::new();
        if state == TCP_CLOSE_WAIT {
            let err = |what| super::io_err(s.owner, s.fd, what);
            unread = vec![0u8; sys::fionread(s.sock.as_fd()).map_err(err("size the unread data"))?];
            let (n, _) = sys::recv_peek(s.sock.as_fd(), &mut unread).map_err(err("read the unread data"))?;
            unread.truncate(n);
        }
        return Ok(FileKind::TcpReset { family, local, peer, state, options, unread });
    }
    let sock = s.sock.as_fd();
    let fail = |what: &str, e: std::io::Error| {
        s.unsupported(format!(
            "TCP connection {} -> {}: cannot {what} (TCP repair): {e}",
            super::inet::show_inet(&local),
            super::inet::show_inet(&peer)
        ))
    };
    let reuse = options.contains(&(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1));
    let conn = (|| -> Result<TcpConn, (&str, std::io::Error)> {
        let repairing = Repairing::new(sock, reuse).map_err(|e| ("enter repair mode", e))?;
        let info = sys::tcp_info_head(sock).map_err(|e| ("read TCP_INFO", e))?;
        let outq = sys::queued(sock, SIOCOUTQ).map_err(|e| ("size the send queue", e))?;
        let unsent = sys::queued(sock, libc::SIOCOUTQNSD).map_err(|e| ("size the unsent data", e))?;
        let inq = sys::fionread(sock).map_err(|e| ("size the receive queue", e))?;
        let (send_seq, send_queue) = read_queue(sock, SEND_QUEUE, outq).map_err(|e| ("read the send queue", e))?;
        let (recv_seq, recv_queue) = read_queue(sock, RECV_QUEUE, inq).map_err(|e| ("read the receive queue", e))?;
        let int = |level, name| sys::getsockopt_int(sock, level, name);
        let mut window = [0u8; 20];
        sys::getsockopt_bytes(sock, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, &mut window)
            .map_err(|e| ("read the window", e))?;
        let conn = TcpConn {
            send_seq,
            recv_seq,
            send_queue,
            unsent: unsent as u32,
            recv_queue,
            mss: int(libc::IPPROTO_TCP, libc::TCP_MAXSEG).map_err(|e| ("read the MSS", e))? as u32,
            tcp_options: info[5],
            snd_wscale: info[6] & 0xf,
            rcv_wscale: info[6] >> 4,
            timestamp: int(libc::IPPROTO_TCP, libc::TCP_TIMESTAMP).map_err(|e| ("read the timestamp", e))? as u32,
            window: std::array::from_fn(|i| u32::from_ne_bytes(window[i * 4..i * 4 + 4].try_into().expect("4 bytes"))),
            sndbuf: int(libc::SOL_SOCKET, libc::SO_SNDBUF).map_err(|e| ("read SO_SNDBUF", e))?,
            rcvbuf: int(libc::SOL_SOCKET, libc::SO_RCVBUF).map_err(|e| ("read SO_RCVBUF", e))?,
        };
        drop(repairing);
        Ok(conn)
    })()
    .map_err(|(what, e)| fail(what, e))?;
    Ok(FileKind::TcpConnection { family, local, peer, options, conn })
}

/// A TCP connection's `(local, peer)` addresses.
pub(super) fn addresses(kind: &FileKind) -> Option<(&[u8], &[u8])> {
    match kind {
        FileKind::TcpConnection { local, peer, .. } | FileKind::TcpReset { local, peer, .. } => Some((local, peer)),
        _ => None,
    }
}

/// Describes a connection reset at restore, for the checkpoint's report.
pub fn describe_reset(kind: &FileKind) -> Option<String> {
    match kind {
        FileKind::TcpReset { local, peer, state, .. } => {
            let how = if *state == TCP_CLOSE_WAIT { " (closed by its peer)" } else { "" };
            Some(format!("TCP {} -> {}{how}", super::inet::show_inet(local), super::inet::show_inet(peer)))
        }
        _ => None,
    }
}

/// A restored connection still in repair mode: what leaving it needs.
pub struct RepairedTcp {
    sock: OwnedFd,
    reuse: bool,
    unsent: Vec<u8>,
    /// Process and fd, for errors.
    pid: i32,
    fd: i32,
}

impl RepairedTcp {
    /// Leaves repair mode (a window probe tells the peer our window) and sends what had not been sent.
    pub fn finish(self) -> Result<(), RestoreError> {
        let io = |what| {
            let (pid, fd) = (self.pid, self.fd);
            move |source| RestoreError::FileIo { pid, fd, what, source }
        };
        let sock = self.sock.as_fd();
        set(sock, libc::TCP_REPAIR, REPAIR_OFF).map_err(io("leave TCP repair mode"))?;
        if self.reuse {
            sys::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).map_err(io("set SO_REUSEADDR"))?;
        }
        sys::send_all(sock, &self.unsent).map_err(io("send the data not sent yet"))
    }
}

impl NewProcess {
    /// Makes a socket whose connection its peer has reset: connected to a listener the tracer makes on
    /// loopback in the sandbox's network namespace, whose accepted end is closed with a zero linger (a
    /// reset). The process's next read or write fails with ECONNRESET, and poll reports an error. One its
    /// peer had closed (CLOSE_WAIT) gets its unread bytes from the accepted end, which is then closed.
    pub(super) fn make_tcp_reset(&mut self, target: i32, of: &OpenFile) -> Result<i32, RestoreError> {
        let FileKind::TcpReset { family, options, state, unread, .. } = &of.kind else {
            unreachable!("make_tcp_reset of a {:?}", of.kind);
        };
        let pid = self.ns_pid;
        let step = move |what| move |source| RestoreError::FileIo { pid, fd: target, what, source };
        let listener = sys::in_namespace(self.host, "net", || sys::loopback_listener(*family))
            .and_then(|listener| listener)
            .map_err(step("listen on loopback"))?;
        let addr = sys::socket_name(listener.as_fd(), false)
            .map_err(step("read the listener's address"))?
            .ok_or_else(|| step("read the listener's address")(std::io::Error::other("unbound")))?;
        // Blocking until connected (loopback answers at once), then the description's own flags.
        let fd =
            self.call(libc::SYS_socket, &[*family as u64, libc::SOCK_STREAM as u64, libc::IPPROTO_TCP as u64])? as u64;
        for &(level, name, value) in options {
            self.set_socket_option(fd, level, name, value)?;
        }
        let a = self.scratch().write(0, &addr).map_err(self.perr())?;
        self.call_file(target, "connect to the loopback listener", libc::SYS_connect, &[fd, a, addr.len() as u64])?;
        let (accepted, _) = listener.accept().map_err(step("accept the connection"))?;
        if *state == TCP_CLOSE_WAIT {
            // Closed by its peer: the bytes it had not read, then end of file (a write then fails, as
            // on any connection whose peer is gone).
            if !unread.is_empty() {
                let mine = sys::dup_from(self.host, fd as i32).map_err(step("reach the new socket"))?;
                let room = i32::try_from(unread.len()).unwrap_or(i32::MAX);
                sys::setsockopt_int(mine.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, room)
                    .map_err(step("size the receive buffer"))?;
                sys::setsockopt_int(accepted.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, room)
                    .map_err(step("size the send buffer"))?;
                accepted.set_nonblocking(false).map_err(step("write the unread data"))?;
                std::io::Write::write_all(&mut &accepted, unread).map_err(step("write the unread data"))?;
            }
        } else {
            sys::reset_on_close(accepted.as_fd()).map_err(step("set a zero linger"))?;
        }
        drop(accepted);
        let settable = of.flags & (libc::O_NONBLOCK | libc::O_ASYNC);
        self.call(libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, settable as u64])?;
        Ok(fd as i32)
    }

    /// Makes connection `of` again: a socket made by the process, repaired by the tracer into the
    /// connection (left in repair mode: see [`RepairedTcp`]).
    pub(super) fn make_tcp_connection(&mut self, target: i32, of: &OpenFile) -> Result<i32, RestoreError> {
        let FileKind::TcpConnection { family, local, peer, options, conn } = &of.kind else {
            unreachable!("make_tcp_connection of a {:?}", of.kind);
        };
        let fd = self.new_socket(*family, libc::SOCK_STREAM, libc::IPPROTO_TCP, of)?;
        let sock = sys::dup_from(self.host, fd as i32).map_err(self.io_err(target, "reach the new socket"))?;
        let s = sock.as_fd();
        let step = |what| self.io_err(target, what);
        // Before repair mode: SO_REUSEADDR would undo the forced address reuse it gives (the address is
        // often a listener's, restored too).
        for &(level, name, value) in options {
            sys::setsockopt_int(s, level, name, value).map_err(step("set a socket option"))?;
        }
        set(s, libc::TCP_REPAIR, REPAIR_ON).map_err(step("enter TCP repair mode"))?;
        if !conn.send_queue.is_empty() || !conn.recv_queue.is_empty() {
            // The queues must fit as they did (the kernel doubles what is set).
            sys::setsockopt_int(s, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, conn.sndbuf / 2)
                .map_err(step("size the send buffer"))?;
            sys::setsockopt_int(s, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, conn.rcvbuf / 2)
                .map_err(step("size the receive buffer"))?;
        }
        set(s, libc::TCP_REPAIR_QUEUE, RECV_QUEUE).map_err(step("select the receive queue"))?;
        let recv_start = conn.recv_seq.wrapping_sub(conn.recv_queue.len() as u32);
        set(s, libc::TCP_QUEUE_SEQ, recv_start as i32).map_err(step("set the receive sequence"))?;
        set(s, libc::TCP_REPAIR_QUEUE, SEND_QUEUE).map_err(step("select the send queue"))?;
        let send_start = conn.send_seq.wrapping_sub(conn.send_queue.len() as u32);
        set(s, libc::TCP_QUEUE_SEQ, send_start as i32).map_err(step("set the send sequence"))?;
        sys::bind_or_connect(s, local, false).map_err(step("bind the connection's address again"))?;
        sys::bind_or_connect(s, peer, true).map_err(step("connect to the peer again (TCP repair)"))?;
        let mut opts: Vec<[u32; 2]> = vec![[TCPOPT_MAXSEG, conn.mss]];
        if conn.tcp_options & TCPI_OPT_WSCALE != 0 {
            opts.push([TCPOPT_WINDOW, u32::from(conn.snd_wscale) | (u32::from(conn.rcv_wscale) << 16)]);
        }
        if conn.tcp_options & TCPI_OPT_SACK != 0 {
            opts.push([TCPOPT_SACK_PERM, 0]);
        }
        if conn.tcp_options & TCPI_OPT_TIMESTAMPS != 0 {
            opts.push([TCPOPT_TIMESTAMP, 0]);
        }
        let raw: Vec<u8> = opts.iter().flatten().flat_map(|v| v.to_ne_bytes()).collect();
        sys::setsockopt_bytes(s, libc::IPPROTO_TCP, libc::TCP_REPAIR_OPTIONS, &raw)
            .map_err(step("set the TCP options"))?;
        set(s, libc::TCP_TIMESTAMP, conn.timestamp as i32).map_err(step("set the timestamp"))?;
        // In repair mode, what is sent to a queue lands there as received, or as sent and not acknowledged.
        set(s, libc::TCP_REPAIR_QUEUE, RECV_QUEUE).map_err(step("select the receive queue"))?;
        sys::send_all(s, &conn.recv_queue).map_err(step("queue the received data"))?;
        let sent = conn.send_queue.len() - conn.unsent as usize;
        set(s, libc::TCP_REPAIR_QUEUE, SEND_QUEUE).map_err(step("select the send queue"))?;
        sys::send_all(s, &conn.send_queue[..sent]).map_err(step("queue the unacknowledged data"))?;
        set(s, libc::TCP_REPAIR_QUEUE, NO_QUEUE).map_err(step("select no queue"))?;
        // After the received data: the window must not start past the next byte expected.
        let window: Vec<u8> = conn.window.iter().flat_map(|v| v.to_ne_bytes()).collect();
        sys::setsockopt_bytes(s, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, &window)
            .map_err(step("set the window"))?;
        self.repaired_tcp.push(RepairedTcp {
            sock,
            reuse: options.contains(&(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)),
            unsent: conn.send_queue[sent..].to_vec(),
            pid: self.ns_pid,
            fd: target,
        });
        Ok(fd as i32)
    }
}
