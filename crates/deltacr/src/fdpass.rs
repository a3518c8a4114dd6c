//! Giving a stopped process one of the tracer's fds: the process makes a socket pair (injected), the
//! tracer takes one end (`pidfd_getfd`) and sends the fd over it (`SCM_RIGHTS`), the process receives it
//! (injected `recvmsg`). There is no system call to put an fd into another process directly.

use std::os::fd::{AsFd, BorrowedFd};

use crate::ptrace::{Injector, PtraceError, Scratch};
use crate::sys;

/// Errors of [`give_fd`].
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("passing an fd to process {pid}")]
    Inject {
        pid: i32,
        #[source]
        source: PtraceError,
    },
    #[error("passing an fd to process {pid}: cannot {what}")]
    Io {
        pid: i32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Offsets in the scratch area: the socket pair, the msghdr, its iovec, the byte, the control buffer.
const PAIR: usize = 0;
const MSGHDR: usize = 64;
const IOV: usize = 128;
const BYTE: usize = 144;
const CONTROL: usize = 160;
const CONTROL_LEN: usize = 24;

/// Gives the process behind `inj` a copy of `fd` (same open file description); `recv_flags` are
/// `recvmsg`'s (`MSG_CMSG_CLOEXEC` for a close-on-exec fd). Returns its fd number in the process.
pub fn give_fd(inj: &mut Injector, scratch: &Scratch, fd: BorrowedFd<'_>, recv_flags: i32) -> Result<i32, PassError> {
    let pid = inj.pid();
    let perr = |source| PassError::Inject { pid: pid.as_raw(), source };
    let io = |what| move |source| PassError::Io { pid: pid.as_raw(), what, source };
    scratch.write(PAIR, &[0u8; 8]).map_err(perr)?;
    let pair = scratch.addr + PAIR as u64;
    inj.call(libc::SYS_socketpair, &[libc::AF_UNIX as u64, (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64, 0, pair])
        .map_err(perr)?;
    let fds = scratch.read(PAIR, 8).map_err(perr)?;
    let theirs = [
        i32::from_ne_bytes(fds[0..4].try_into().expect("4 bytes")),
        i32::from_ne_bytes(fds[4..8].try_into().expect("4 bytes")),
    ];
    let result = (|| {
        let pidfd = sys::pidfd_open(pid).map_err(io("open a pidfd"))?;
        let ours = sys::pidfd_getfd(pidfd.as_fd(), theirs[0]).map_err(io("take the socket"))?;
        send_fd(ours.as_fd(), fd).map_err(io("send the fd"))?;
        // recvmsg(theirs[1], &msghdr, recv_flags) with one byte and room for one fd.
        let mut hdr = Vec::with_capacity(56);
        let iov = scratch.addr + IOV as u64;
        let control = scratch.addr + CONTROL as u64;
        for w in [0u64, 0, iov, 1, control, CONTROL_LEN as u64, 0] {
            hdr.extend_from_slice(&w.to_ne_bytes());
        }
        scratch.write(MSGHDR, &hdr).map_err(perr)?;
        let mut iovec = (scratch.addr + BYTE as u64).to_ne_bytes().to_vec();
        iovec.extend_from_slice(&1u64.to_ne_bytes());
        scratch.write(IOV, &iovec).map_err(perr)?;
        inj.call(libc::SYS_recvmsg, &[theirs[1] as u64, scratch.addr + MSGHDR as u64, recv_flags as u64])
            .map_err(perr)?;
        let cmsg = scratch.read(CONTROL, CONTROL_LEN).map_err(perr)?;
        let level = i32::from_ne_bytes(cmsg[8..12].try_into().expect("4 bytes"));
        let kind = i32::from_ne_bytes(cmsg[12..16].try_into().expect("4 bytes"));
        if level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS {
            return Err(io("receive the fd")(std::io::Error::other("no fd arrived")));
        }
        Ok(i32::from_ne_bytes(cmsg[16..20].try_into().expect("4 bytes")))
    })();
    for end in theirs {
        let closed = inj.call(libc::SYS_close, &[end as u64]).map_err(perr);
        if result.is_ok() {
            closed?;
        }
    }
    result
}

/// Sends `fd` over the unix socket `sock`, with one byte of data.
fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("control buffer too small"));
    }
    rustix::net::sendmsg(sock, &[std::io::IoSlice::new(&[0])], &mut control, SendFlags::empty())?;
    Ok(())
}
