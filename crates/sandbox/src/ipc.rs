//! Message channel over a `SOCK_SEQPACKET` Unix socket, with file descriptors attached.
//!
//! A packet is `[u32 LE json length][json][raw payload]`: a typed message, optional binary data (so output
//! chunks need no base64) and up to [`MAX_FDS`] descriptors. SEQPACKET keeps packet boundaries, so fds
//! always arrive with the message they belong to.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Largest packet we send or accept. Big enough for output chunks, small enough for socket buffers.
pub const MAX_PACKET: usize = 128 * 1024;
/// Most descriptors one packet carries.
pub const MAX_FDS: usize = 8;
const HEADER: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("socket operation failed")]
    Io(#[source] std::io::Error),
    #[error("peer closed the channel")]
    Closed,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message of {0} bytes exceeds the {MAX_PACKET}-byte packet limit")]
    TooLarge(usize),
}

impl From<nix::Error> for IpcError {
    fn from(e: nix::Error) -> Self {
        IpcError::Io(e.into())
    }
}

/// A received packet: the decoded message, its binary payload and descriptors.
pub struct Packet<T> {
    pub msg: T,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

fn encode<T: Serialize>(msg: &T, payload: &[u8]) -> Result<Vec<u8>, IpcError> {
    let json = serde_json::to_vec(msg).map_err(|e| IpcError::Malformed(e.to_string()))?;
    let total = HEADER + json.len() + payload.len();
    if total > MAX_PACKET {
        return Err(IpcError::TooLarge(total));
    }
    let mut buf = Vec::with_capacity(total);
    buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
    buf.extend_from_slice(&json);
    buf.extend_from_slice(payload);
    Ok(buf)
}

fn decode<T: DeserializeOwned>(buf: &[u8], fds: Vec<OwnedFd>) -> Result<Packet<T>, IpcError> {
    if buf.len() < HEADER {
        return Err(IpcError::Malformed("short packet".into()));
    }
    let len = u32::from_le_bytes(buf[..HEADER].try_into().expect("4 bytes")) as usize;
    let json = buf.get(HEADER..HEADER + len).ok_or_else(|| IpcError::Malformed("length exceeds packet".into()))?;
    let msg = serde_json::from_slice(json).map_err(|e| IpcError::Malformed(e.to_string()))?;
    Ok(Packet { msg, payload: buf[HEADER + len..].to_vec(), fds })
}

fn send_packet(fd: RawFd, buf: &[u8], fds: &[BorrowedFd<'_>]) -> nix::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs = if raw.is_empty() { vec![] } else { vec![ControlMessage::ScmRights(&raw)] };
    sendmsg::<()>(fd, &[IoSlice::new(buf)], &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one packet into `buf`; returns its length (0 = peer closed) and the received fds.
fn recv_packet(fd: RawFd, buf: &mut [u8]) -> nix::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(list) = c {
            // SAFETY: SCM_RIGHTS gave us fresh descriptors that nothing else owns.
            fds.extend(list.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    Ok((msg.bytes, fds))
}

/// Creates a connected pair of SEQPACKET sockets (close-on-exec).
pub fn pair() -> Result<(OwnedFd, OwnedFd), IpcError> {
    Ok(socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?)
}

/// Blocking channel, for code that runs without an async runtime (our init).
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    pub fn new(fd: OwnedFd) -> Self {
        Channel { fd }
    }

    /// The socket, e.g. to turn it into an [`AsyncChannel`].
    pub fn into_inner(self) -> OwnedFd {
        self.fd
    }

    pub fn send<T: Serialize>(&self, msg: &T, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        let buf = encode(msg, payload)?;
        loop {
            match send_packet(self.fd.as_raw_fd(), &buf, fds) {
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EPIPE | nix::Error::ECONNRESET) => return Err(IpcError::Closed),
                other => return Ok(other?),
            }
        }
    }

    pub fn recv<T: DeserializeOwned>(&self) -> Result<Packet<T>, IpcError> {
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            match recv_packet(self.fd.as_raw_fd(), &mut buf) {
                // ECONNRESET: the peer closed with our packets unread. The kernel reports that (once) before
                // the packets still queued for us, so read on until the real end.
                Err(nix::Error::EINTR | nix::Error::ECONNRESET) => continue,
                Err(e) => return Err(e.into()),
                Ok((0, _)) => return Err(IpcError::Closed),
                Ok((n, fds)) => return decode(&buf[..n], fds),
            }
        }
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Non-blocking channel for tokio code (shim and daemon).
pub struct AsyncChannel {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncChannel {
    /// Wraps a SEQPACKET socket; switches it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> Result<Self, IpcError> {
        rustix::io::ioctl_fionbio(&fd, true).map_err(|e| IpcError::Io(e.into()))?;
        // SAFETY: we own `fd` and never replace or close it while the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) };
        Ok(AsyncChannel { fd: fd.map_err(|e| IpcError::Io(e.into_parts().1))? })
    }

    /// Connects to a SEQPACKET listener at `path`.
    pub fn connect(path: &Path) -> Result<Self, IpcError> {
        use nix::sys::socket::{connect, socket, UnixAddr};
        let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
        connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        Self::new(fd)
    }

    pub async fn send<T: Serialize>(&self, msg: &T, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        let buf = encode(msg, payload)?;
        loop {
            let mut guard = self.fd.writable().await.map_err(IpcError::Io)?;
            match guard.try_io(|fd| send_packet(fd.as_raw_fd(), &buf, fds).map_err(std::io::Error::from)) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) => {
                    return Err(IpcError::Closed)
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Ok(Err(e)) => return Err(IpcError::Io(e)),
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn recv<T: DeserializeOwned>(&self) -> Result<Packet<T>, IpcError> {
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            let mut guard = self.fd.readable().await.map_err(IpcError::Io)?;
            match guard.try_io(|fd| recv_packet(fd.as_raw_fd(), &mut buf).map_err(std::io::Error::from)) {
                Ok(Ok((0, _))) => return Err(IpcError::Closed),
                Ok(Ok((n, fds))) => return decode(&buf[..n], fds),
                // See Channel::recv: queued packets follow a one-time ECONNRESET.
                Ok(Err(e)) if matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EINTR)) => continue,
                Ok(Err(e)) => return Err(IpcError::Io(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Listening SEQPACKET socket for tokio code.
pub struct AsyncListener {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncListener {
    /// Binds `path` (removing a stale socket file first) with mode 0600.
    pub fn bind(path: &Path) -> Result<Self, IpcError> {
        use nix::sys::socket::{bind, listen, socket, Backlog, UnixAddr};
        let _ = std::fs::remove_file(path);
        let fd =
            socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
        bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(IpcError::Io)?;
        listen(&fd, Backlog::new(64)?)?;
        // SAFETY: we own `fd` and never replace or close it while the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) };
        Ok(AsyncListener { fd: fd.map_err(|e| IpcError::Io(e.into_parts().1))? })
    }

    pub async fn accept(&self) -> Result<AsyncChannel, IpcError> {
        loop {
            let mut guard = self.fd.readable().await.map_err(IpcError::Io)?;
            match guard.try_io(|fd| {
                nix::sys::socket::accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(std::io::Error::from)
            }) {
                // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
                Ok(Ok(raw)) => return AsyncChannel::new(unsafe { OwnedFd::from_raw_fd(raw) }),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Ok(Err(e)) => return Err(IpcError::Io(e)),
                Err(_would_block) => continue,
            }
        }
    }
}
