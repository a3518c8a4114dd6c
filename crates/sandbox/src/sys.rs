//! Raw system calls that neither `rustix` nor `nix` wrap, each behind a small safe function.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Result of [`clone_process`]: which side of the clone we are on.
pub enum CloneResult {
    /// In the parent: the child's pid (in our pid namespace) and a pidfd for it.
    Parent { pid: i32, pidfd: OwnedFd },
    /// In the child.
    Child,
}

/// `clone3` with fork semantics (child continues on a copy of the caller's stack) plus the given
/// `CLONE_NEW*` flags. The child gets `SIGCHLD` as exit signal; the parent also gets a pidfd.
///
/// Only call this from a single-threaded process: the child inherits a copy of the memory of all
/// threads but runs only the calling one, so locks held by other threads would stay locked forever.
pub fn clone_process(namespace_flags: u64) -> io::Result<CloneResult> {
    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: namespace_flags | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: 0,
    };
    // SAFETY: `args` is a valid clone_args of the size we pass; with stack = 0 the child runs on a
    // copy-on-write copy of our stack exactly like fork(2), so returning in both processes is sound.
    // `pidfd` outlives the call and the kernel writes the pidfd number into it for the parent.
    let ret = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, size_of::<CloneArgs>()) };
    match ret {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(CloneResult::Child),
        pid => Ok(CloneResult::Parent {
            pid: pid as i32,
            // SAFETY: with CLONE_PIDFD the kernel stored a fresh pidfd that nobody else owns.
            pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        }),
    }
}

/// Closes every file descriptor numbered `first` or above.
pub fn close_fds_from(first: RawFd) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; callers use it right before exec or in a fresh
    // child where no Rust object still relies on the closed descriptors.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, libc::c_uint::MAX, 0) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `ioctl(SIOCSIFFLAGS)`: sets the `IFF_UP` flag of the interface `name` (e.g. `lo`).
pub fn set_interface_up(socket: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and fills ifr_flags of our valid, owned ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifru_flags is the union member SIOCGIFFLAGS just initialised.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above, SIOCSIFFLAGS only reads our valid ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Duplicates `fd` onto descriptor number `target` (closing what was there), close-on-exec when asked.
pub fn dup_to(fd: BorrowedFd<'_>, target: RawFd, cloexec: bool) -> io::Result<()> {
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    if fd.as_raw_fd() == target {
        // dup3 refuses equal numbers; only the flag needs setting.
        let cur = rustix::io::fcntl_getfd(fd)?;
        let want = if cloexec { cur | rustix::io::FdFlags::CLOEXEC } else { cur - rustix::io::FdFlags::CLOEXEC };
        return Ok(rustix::io::fcntl_setfd(fd, want)?);
    }
    // SAFETY: dup3 does not touch memory; replacing `target` is the caller's stated intent, and the
    // caller must not use any object that still believes it owns the old `target`.
    if unsafe { libc::dup3(fd.as_raw_fd(), target, flags) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, flags, program)`: installs a classic-BPF filter on the calling
/// thread; answers what the kernel answers (a listener fd with `SECCOMP_FILTER_FLAG_NEW_LISTENER`, else 0).
/// Allocates nothing (callable in a child forked from a multi-threaded process).
pub(crate) fn seccomp_set_mode_filter(program: &[seccompiler::sock_filter], flags: libc::c_uint) -> io::Result<i32> {
    let len = u16::try_from(program.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fprog = libc::sock_fprog {
        len,
        // The kernel only reads the program (copy_from_user); libc's type is `*mut` by history.
        filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    // SAFETY: `fprog` points at `len` instructions that live for the whole call;
    // `seccompiler::sock_filter` and `libc::sock_filter` are both `#[repr(C)]`
    // `{ u16 code; u8 jt; u8 jf; u32 k }`, the kernel's `struct sock_filter`.
    let rc = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, flags, &fprog as *const libc::sock_fprog)
    };
    if rc >= 0 {
        Ok(rc as i32)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `pidfd_send_signal(pidfd, signal, NULL, 0)` for any signal number (real-time ones included).
pub fn pidfd_send_raw_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: no pointer is passed (info is NULL); the kernel checks the signal number.
    let rc =
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal, std::ptr::null::<u8>(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to hand the CPU straight to the listener's waiting thread when a notification arrives, and
/// back when it is answered (`SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`, Linux 6.6): a round trip then costs a
/// context switch or two rather than two wake-ups on other CPUs.
pub fn seccomp_notif_sync_wake_up(listener: BorrowedFd<'_>) -> io::Result<()> {
    const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;
    // SAFETY: the ioctl takes its flags by value and touches no memory of ours.
    let rc = unsafe {
        libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS as _, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits for the next seccomp user notification on `listener` (`SECCOMP_IOCTL_NOTIF_RECV`).
pub fn seccomp_notif_recv(listener: BorrowedFd<'_>) -> io::Result<libc::seccomp_notif> {
    // SAFETY: an all-zero seccomp_notif is valid (plain integers), and the kernel requires it zeroed.
    let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: the ioctl writes one `seccomp_notif` into `notif`, which is that size.
    let rc = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV as _, &mut notif) };
    if rc == 0 {
        Ok(notif)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Answers notification `id`: with `Ok(value)` the system call returns `value`, with `Err(errno)` it fails
/// with it, and with `None` the kernel carries the call out itself (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`).
pub fn seccomp_notif_send(listener: BorrowedFd<'_>, id: u64, answer: Option<Result<i64, i32>>) -> io::Result<()> {
    let (val, error, flags) = match answer {
        None => (0, 0, libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32),
        Some(Ok(val)) => (val, 0, 0),
        Some(Err(errno)) => (0, -errno, 0),
    };
    let mut resp = libc::seccomp_notif_resp { id, val, error, flags };
    // SAFETY: the ioctl reads one `seccomp_notif_resp`, which `resp` is.
    let rc = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND as _, &mut resp) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
