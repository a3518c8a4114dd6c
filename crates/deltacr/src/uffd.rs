//! userfaultfd, behind small safe wrappers: the uffd ioctls and messages of `<linux/userfaultfd.h>`
//! (x86_64 layout). Hand-written because the `userfaultfd` crate generates its bindings with bindgen
//! (libclang at build time) and makes uffds for the calling process only, while ours are made inside a
//! restored process and used from the tracer's (see docs/deltacr.md, "Lazy restore").

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// `_IO(0xAA, 0x00)` on /dev/userfaultfd: a new uffd for the calling process's memory.
pub const USERFAULTFD_IOC_NEW: u64 = 0xAA00;
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: u64 = 0xC018_AA3F;
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
const UFFDIO_WAKE: u64 = 0x8010_AA02;
const UFFDIO_COPY: u64 = 0xC028_AA03;
const UFFDIO_ZEROPAGE: u64 = 0xC020_AA04;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const FEATURE_THREAD_ID: u64 = 1 << 8;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;
const MSG_SIZE: usize = 32;

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct Zeropage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// What a uffd reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// A thread (`tid`, in its own pid namespace) touched a missing page at `addr`.
    Fault { addr: u64, tid: u32 },
    /// The memory was forked: `uffd` (now an fd of ours) serves the child's memory.
    Fork { uffd: i32 },
    /// `[from, from + len)` moved to `to` (mremap).
    Remap { from: u64, to: u64, len: u64 },
    /// `[start, end)` was dropped (MADV_DONTNEED, MADV_FREE, MADV_REMOVE): it reads zeros from now on.
    Remove { start: u64, end: u64 },
    /// `[start, end)` was unmapped.
    Unmap { start: u64, end: u64 },
    /// An event this code does not ask for.
    Other(u8),
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

impl Msg {
    fn parse(b: &[u8; MSG_SIZE]) -> Msg {
        // struct uffd_msg: u8 event, 7 bytes reserved, then the 24-byte union at offset 8.
        match b[0] {
            EVENT_PAGEFAULT => {
                Msg::Fault { addr: u64_at(b, 16), tid: u32::from_ne_bytes(b[24..28].try_into().expect("4 bytes")) }
            }
            EVENT_FORK => Msg::Fork { uffd: u32::from_ne_bytes(b[8..12].try_into().expect("4 bytes")) as i32 },
            EVENT_REMAP => Msg::Remap { from: u64_at(b, 8), to: u64_at(b, 16), len: u64_at(b, 24) },
            EVENT_REMOVE => Msg::Remove { start: u64_at(b, 8), end: u64_at(b, 16) },
            EVENT_UNMAP => Msg::Unmap { start: u64_at(b, 8), end: u64_at(b, 16) },
            other => Msg::Other(other),
        }
    }
}

/// Why filling pages failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillError {
    /// The memory's layout is changing (an event is waiting to be read): read events, then retry.
    Again,
    /// Some page of the range is already there; `done` bytes were filled before it.
    Exists {
        done: u64,
    },
    /// The range is no longer (wholly) registered memory of that process: unmapped, remapped.
    Gone,
    /// The process's memory is gone (it exited or exec'd).
    Dead,
    Other(i32),
}

fn fill_error(errno: i32, done: i64) -> FillError {
    match errno {
        libc::EAGAIN => FillError::Again,
        libc::EEXIST => FillError::Exists { done: done.max(0) as u64 },
        libc::ENOENT | libc::EINVAL => FillError::Gone,
        libc::ESRCH => FillError::Dead,
        e => FillError::Other(e),
    }
}

/// Runs one uffd ioctl on `arg`.
fn ioctl<T>(fd: BorrowedFd<'_>, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `req` is one of the uffd requests above, each of which reads and writes exactly the
    // `#[repr(C)]` struct `T` the caller passes for it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A userfaultfd serving one address space (not necessarily ours).
#[derive(Debug)]
pub struct Uffd(OwnedFd);

impl Uffd {
    /// Takes `fd` (a uffd) and enables `features` (the API handshake).
    pub fn new(fd: OwnedFd, features: u64) -> io::Result<Uffd> {
        let mut api = Api { api: UFFD_API, features, ioctls: 0 };
        ioctl(fd.as_fd(), UFFDIO_API, &mut api)?;
        Ok(Uffd(fd))
    }

    /// A uffd the kernel made for a fork, already set up like its parent.
    pub fn adopt(fd: OwnedFd) -> Uffd {
        Uffd(fd)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Reports missing pages of `[start, start + len)` to this uffd from now on.
    pub fn register_missing(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Register { range: Range { start, len }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        ioctl(self.fd(), UFFDIO_REGISTER, &mut r)
    }

    /// Fills the missing pages `[dst, dst + data.len())` with `data` and wakes the threads waiting there.
    pub fn copy(&self, dst: u64, data: &[u8]) -> Result<(), FillError> {
        let mut c = Copy { dst, src: data.as_ptr() as u64, len: data.len() as u64, mode: 0, copy: 0 };
        ioctl(self.fd(), UFFDIO_COPY, &mut c).map_err(|e| fill_error(e.raw_os_error().unwrap_or(0), c.copy))
    }

    /// Fills the missing pages `[start, start + len)` with zeros and wakes the threads waiting there.
    pub fn zero(&self, start: u64, len: u64) -> Result<(), FillError> {
        let mut z = Zeropage { range: Range { start, len }, mode: 0, zeropage: 0 };
        ioctl(self.fd(), UFFDIO_ZEROPAGE, &mut z).map_err(|e| fill_error(e.raw_os_error().unwrap_or(0), z.zeropage))
    }

    /// Wakes the threads waiting on `[start, start + len)` (its pages are there already).
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Range { start, len };
        ioctl(self.fd(), UFFDIO_WAKE, &mut r)
    }

    /// Reads the messages waiting (none when nothing waits: the fd is non-blocking).
    pub fn read(&self) -> io::Result<Vec<Msg>> {
        let mut buf = [0u8; MSG_SIZE * 16];
        match rustix::io::read(self.fd(), &mut buf) {
            Ok(n) => {
                Ok(buf[..n].chunks_exact(MSG_SIZE).map(|c| Msg::parse(c.try_into().expect("one message"))).collect())
            }
            Err(rustix::io::Errno::AGAIN) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_parse_as_the_kernel_lays_them_out() {
        let mut b = [0u8; MSG_SIZE];
        b[0] = EVENT_PAGEFAULT;
        b[16..24].copy_from_slice(&0x7f00_1000u64.to_ne_bytes());
        b[24..28].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(Msg::parse(&b), Msg::Fault { addr: 0x7f00_1000, tid: 42 });
        let mut b = [0u8; MSG_SIZE];
        b[0] = EVENT_REMAP;
        b[8..16].copy_from_slice(&1u64.to_ne_bytes());
        b[16..24].copy_from_slice(&2u64.to_ne_bytes());
        b[24..32].copy_from_slice(&3u64.to_ne_bytes());
        assert_eq!(Msg::parse(&b), Msg::Remap { from: 1, to: 2, len: 3 });
        let mut b = [0u8; MSG_SIZE];
        b[0] = EVENT_FORK;
        b[8..12].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(Msg::parse(&b), Msg::Fork { uffd: 7 });
    }

    /// The ioctl numbers are `_IOWR`/`_IOR` of 0xAA with these struct sizes.
    #[test]
    fn request_numbers_match_the_struct_sizes() {
        let iowr = |nr: u64, size: usize| (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr;
        let ior = |nr: u64, size: usize| (2 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr;
        assert_eq!(UFFDIO_API, iowr(0x3F, size_of::<Api>()));
        assert_eq!(UFFDIO_REGISTER, iowr(0x00, size_of::<Register>()));
        assert_eq!(UFFDIO_WAKE, ior(0x02, size_of::<Range>()));
        assert_eq!(UFFDIO_COPY, iowr(0x03, size_of::<Copy>()));
        assert_eq!(UFFDIO_ZEROPAGE, iowr(0x04, size_of::<Zeropage>()));
    }
}
