//! Non-blocking reads and writes on pipes and pty masters for tokio.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub struct AsyncFile {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncFile {
    /// Takes `fd` (a pipe end or pty master) and switches it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<AsyncFile> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        // SAFETY: we own `fd` and never replace or close it while the AsyncFd holds it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) };
        Ok(AsyncFile { fd: fd.map_err(|e| e.into_parts().1)? })
    }

    /// Reads some bytes; `Ok(0)` at end of file. A pty master whose slave side is closed everywhere
    /// reports EIO, which is end of file too.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| rustix::io::read(fd, &mut *buf).map_err(io::Error::from)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads and drops whatever can be read now, without waiting; the bytes dropped.
    pub fn discard_pending(&self) -> io::Result<usize> {
        let mut buf = [0u8; 16 * 1024];
        let mut dropped = 0;
        loop {
            match rustix::io::read(self.fd.get_ref(), &mut buf) {
                Ok(0) => return Ok(dropped),
                Ok(n) => dropped += n,
                Err(rustix::io::Errno::AGAIN) => return Ok(dropped),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| rustix::io::write(fd, data).map_err(io::Error::from)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

impl AsFd for AsyncFile {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl AsRawFd for AsyncFile {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.get_ref().as_raw_fd()
    }
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}
