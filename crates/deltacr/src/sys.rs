//! Raw system calls and ptrace requests that `nix`/`rustix` do not wrap, each behind a small safe function.
//!
//! Only x86_64 is supported: register layouts and syscall numbers below are x86_64's.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::unistd::Pid;

#[cfg(not(target_arch = "x86_64"))]
compile_error!("deltacr supports only x86_64");

/// `struct user_regs_struct` of x86_64.
pub type Regs = libc::user_regs_struct;

const PTRACE_GETREGSET: libc::c_uint = 0x4204;
const PTRACE_SETREGSET: libc::c_uint = 0x4205;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const PTRACE_LISTEN: libc::c_uint = 0x4208;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const NT_X86_XSTATE: libc::c_ulong = 0x202;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;

/// Size of a `siginfo_t` as the kernel copies it.
pub const SIGINFO_SIZE: usize = 128;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Metadata of `path` as process `pid` sees it: resolved under its root, by the kernel, with no symlink
/// followed, so a host-root caller never reaches outside the sandbox however the sandbox's processes
/// rearrange their files.
pub fn stat_in_root(pid: Pid, path: &str) -> io::Result<std::fs::Metadata> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let root = rustix::fs::open(
        format!("/proc/{}/root", pid.as_raw()),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let file = rustix::fs::openat2(&root, path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty(), resolve)?;
    std::fs::File::from(file).metadata()
}

/// The tracee's extended FPU state (`NT_X86_XSTATE`), as many bytes as the CPU's xsave area has.
pub fn ptrace_get_xstate(tid: Pid) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: the kernel writes at most iov_len bytes into buf and updates iov_len.
    check(unsafe { libc::ptrace(PTRACE_GETREGSET, tid.as_raw(), NT_X86_XSTATE, &mut iov as *mut libc::iovec) })?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// Sets the tracee's extended FPU state from bytes returned by [`ptrace_get_xstate`].
pub fn ptrace_set_xstate(tid: Pid, xstate: &[u8]) -> io::Result<()> {
    let mut copy = xstate.to_vec();
    let mut iov = libc::iovec { iov_base: copy.as_mut_ptr().cast(), iov_len: copy.len() };
    // SAFETY: the kernel reads iov_len bytes from our buffer.
    check(unsafe { libc::ptrace(PTRACE_SETREGSET, tid.as_raw(), NT_X86_XSTATE, &mut iov as *mut libc::iovec) })?;
    Ok(())
}

/// The tracee thread's blocked-signal mask.
pub fn ptrace_get_sigmask(tid: Pid) -> io::Result<u64> {
    let mut mask: u64 = 0;
    // SAFETY: addr is the size of the mask, data points to 8 writable bytes.
    check(unsafe { libc::ptrace(PTRACE_GETSIGMASK, tid.as_raw(), 8usize, &mut mask as *mut u64) })?;
    Ok(mask)
}

/// Sets the tracee thread's blocked-signal mask (SIGKILL and SIGSTOP are dropped by the kernel).
pub fn ptrace_set_sigmask(tid: Pid, mask: u64) -> io::Result<()> {
    // SAFETY: addr is the size of the mask, data points to 8 readable bytes.
    check(unsafe { libc::ptrace(PTRACE_SETSIGMASK, tid.as_raw(), 8usize, &mask as *const u64) })?;
    Ok(())
}

/// Restarts a stopped tracee in group-stop without resuming it (it stays stopped, but reports SIGCONT).
pub fn ptrace_listen(tid: Pid) -> io::Result<()> {
    // SAFETY: PTRACE_LISTEN takes no pointers.
    check(unsafe { libc::ptrace(PTRACE_LISTEN, tid.as_raw(), 0usize, 0usize) })?;
    Ok(())
}

#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// The signals pending for the thread (`shared == false`) or for the whole process (`shared == true`),
/// each as the raw 128-byte `siginfo_t`, without dequeuing them.
pub fn ptrace_peek_pending(tid: Pid, shared: bool) -> io::Result<Vec<[u8; SIGINFO_SIZE]>> {
    let mut out = Vec::new();
    loop {
        let mut batch = [[0u8; SIGINFO_SIZE]; 32];
        let args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: batch.len() as i32,
        };
        // SAFETY: the kernel writes at most `nr` siginfos into batch.
        let n = check(unsafe {
            libc::ptrace(PTRACE_PEEKSIGINFO, tid.as_raw(), &args as *const PeekSiginfoArgs, batch.as_mut_ptr())
        })? as usize;
        out.extend_from_slice(&batch[..n]);
        if n < batch.len() {
            return Ok(out);
        }
    }
}

/// A thread's rseq registration: (area address, area length, abort signature).
pub fn ptrace_get_rseq(tid: Pid) -> io::Result<Option<(u64, u32, u32)>> {
    #[repr(C)]
    #[derive(Default)]
    struct RseqConf {
        ptr: u64,
        size: u32,
        sig: u32,
        flags: u32,
        pad: u32,
    }
    let mut conf = RseqConf::default();
    // SAFETY: addr is the size of our struct, the kernel writes at most that many bytes.
    check(unsafe {
        libc::ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid.as_raw(), size_of::<RseqConf>(), &mut conf as *mut RseqConf)
    })?;
    Ok((conf.ptr != 0).then_some((conf.ptr, conf.size, conf.sig)))
}

/// The tracee's seccomp filters, oldest first, each as the raw `sock_filter` array (8 bytes per
/// instruction). Needs CAP_SYS_ADMIN in the initial namespace. Returns an empty list when the process
/// has no filter.
pub fn ptrace_seccomp_filters(tid: Pid) -> io::Result<Vec<Vec<u8>>> {
    let mut filters = Vec::new();
    for index in 0usize.. {
        // SAFETY: with a null buffer the kernel only returns the instruction count.
        let count = unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid.as_raw(), index, std::ptr::null_mut::<u8>()) };
        if count == -1 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                // ENOENT: past the last filter; EINVAL: no filter (or seccomp mode strict).
                Some(libc::ENOENT | libc::EINVAL) => Ok(filters),
                _ => Err(err),
            };
        }
        let mut prog = vec![0u8; count as usize * 8];
        // SAFETY: prog has room for `count` sock_filter instructions.
        check(unsafe { libc::ptrace(PTRACE_SECCOMP_GET_FILTER, tid.as_raw(), index, prog.as_mut_ptr()) })?;
        filters.push(prog);
    }
    unreachable!("the loop only ends by returning")
}

/// `get_robust_list(tid)`: the thread's robust futex list head and its length.
pub fn get_robust_list(tid: Pid) -> io::Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: both out-pointers point to writable locals.
    check(unsafe {
        libc::syscall(libc::SYS_get_robust_list, tid.as_raw(), &mut head as *mut u64, &mut len as *mut usize)
    })?;
    Ok((head, len as u64))
}

/// `kcmp(pid1, pid2, type, a, b)` for the types that take no pointers: orders two kernel objects
/// (0 = the same one).
fn kcmp(pid1: Pid, pid2: Pid, kind: libc::c_int, a: libc::c_ulong, b: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: kcmp takes no pointers for KCMP_FILE and KCMP_VM.
    let r = check(unsafe { libc::syscall(libc::SYS_kcmp, pid1.as_raw(), pid2.as_raw(), kind, a, b) })?;
    Ok(r as i32)
}

/// `kcmp(pid1, pid2, KCMP_FILE, fd1, fd2)`: orders two open file descriptions (0 = the same one).
pub fn kcmp_file(pid1: Pid, fd1: i32, pid2: Pid, fd2: i32) -> io::Result<i32> {
    const KCMP_FILE: libc::c_int = 0;
    kcmp(pid1, pid2, KCMP_FILE, fd1 as libc::c_ulong, fd2 as libc::c_ulong)
}

/// Whether two processes share their address space (`kcmp(KCMP_VM)`).
pub fn same_mm(pid1: Pid, pid2: Pid) -> io::Result<bool> {
    const KCMP_VM: libc::c_int = 1;
    Ok(kcmp(pid1, pid2, KCMP_VM, 0, 0)? == 0)
}

/// `tgkill(tgid, tid, sig)`.
pub fn tgkill(tgid: Pid, tid: Pid, sig: i32) -> io::Result<()> {
    // SAFETY: no pointers.
    check(unsafe { libc::syscall(libc::SYS_tgkill, tgid.as_raw(), tid.as_raw(), sig) })?;
    Ok(())
}

/// `tee(2)` of up to `len` bytes from pipe `from` into pipe `to`, without consuming `from`.
pub fn tee(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: no pointers.
    let r = unsafe { libc::tee(from.as_raw_fd(), to.as_raw_fd(), len, libc::SPLICE_F_NONBLOCK) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Whether the pipe or FIFO of write end `fd` has readers (a write end without any polls POLLERR).
pub fn pipe_has_readers(fd: BorrowedFd<'_>) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
    poll(&mut fds, PollTimeout::ZERO)?;
    Ok(!fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLERR)))
}

/// `FIONREAD`: bytes queued for reading on a pipe, socket or tty.
pub fn fionread(fd: BorrowedFd<'_>) -> io::Result<usize> {
    queued(fd, libc::FIONREAD)
}

/// A byte count an ioctl reports as an int: `FIONREAD` (= `SIOCINQ`), `SIOCOUTQ`, `SIOCOUTQNSD`.
pub fn queued(fd: BorrowedFd<'_>, request: libc::c_ulong) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: these requests write one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut n as *mut libc::c_int) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// `pidfd_open(pid, 0)`.
pub fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: no pointers.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) })?;
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `pidfd_getfd(pidfd, fd, 0)`: a duplicate of another process's fd (same open file description).
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: no pointers.
    let r = check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })?;
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// True when the process behind `pidfd` has exited (it may still be a zombie).
pub fn pidfd_exited(pidfd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut pfd = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd, zero timeout.
    let r = unsafe { libc::poll(&mut pfd, 1, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r > 0)
}

/// True when the process behind `pidfd` has been reaped (POLLHUP).
pub fn hung_up(pidfd: BorrowedFd<'_>) -> bool {
    let mut fds = [rustix::event::PollFd::new(&pidfd, rustix::event::PollFlags::empty())];
    matches!(rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())), Ok(n) if n > 0)
        && fds[0].revents().contains(rustix::event::PollFlags::HUP)
}

/// Waits until every process behind `pidfds` has been reaped (each pidfd reports POLLHUP), or
/// `timeout` passed.
pub fn wait_all_hung_up<'a>(pidfds: impl Iterator<Item = &'a OwnedFd>, timeout: std::time::Duration) -> io::Result<()> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let deadline = std::time::Instant::now() + timeout;
    let mut waiting: Vec<&OwnedFd> = pidfds.collect();
    while !waiting.is_empty() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        // No events asked for: POLLHUP (reaped) is reported anyway, POLLIN (exited, a zombie) is not.
        let mut fds: Vec<PollFd<'_>> = waiting.iter().map(|fd| PollFd::new(*fd, PollFlags::empty())).collect();
        let ts = Timespec { tv_sec: left.as_secs() as i64, tv_nsec: i64::from(left.subsec_nanos()) };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        let hung: Vec<bool> = fds.iter().map(|f| f.revents().contains(PollFlags::HUP)).collect();
        let mut i = 0;
        waiting.retain(|_| {
            i += 1;
            !hung[i - 1]
        });
    }
    Ok(())
}

fn remote_iovecs(remote: &[(u64, usize)]) -> Vec<libc::iovec> {
    remote.iter().map(|&(a, l)| libc::iovec { iov_base: a as *mut libc::c_void, iov_len: l }).collect()
}

fn byte_count(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Reads another process's memory at the given remote ranges into `local` (one `process_vm_readv`).
/// Returns how many bytes were read.
pub fn process_vm_read(pid: Pid, local: &mut [u8], remote: &[(u64, usize)]) -> io::Result<usize> {
    let liov = libc::iovec { iov_base: local.as_mut_ptr().cast(), iov_len: local.len() };
    let riov = remote_iovecs(remote);
    // SAFETY: the local iovec covers `local`; remote iovecs are only interpreted in the other process.
    byte_count(unsafe { libc::process_vm_readv(pid.as_raw(), &liov, 1, riov.as_ptr(), riov.len() as libc::c_ulong, 0) })
}

/// Writes `local` into another process's memory at the given remote ranges (one `process_vm_writev`).
pub fn process_vm_write(pid: Pid, local: &[u8], remote: &[(u64, usize)]) -> io::Result<usize> {
    let liov = libc::iovec { iov_base: local.as_ptr() as *mut libc::c_void, iov_len: local.len() };
    let riov = remote_iovecs(remote);
    // SAFETY: the local iovec covers `local` (only read); remote iovecs are interpreted in the other process.
    byte_count(unsafe {
        libc::process_vm_writev(pid.as_raw(), &liov, 1, riov.as_ptr(), riov.len() as libc::c_ulong, 0)
    })
}

/// Fills `buf` from `fd` at `offset` (several `pread`s if needed); EOF before the end is an error.
pub fn pread_exact(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = pread(fd, &mut buf[done..], offset + done as u64)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "end of file"));
        }
        done += n;
    }
    Ok(())
}

/// `pread` at an absolute offset.
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes into buf.
    byte_count(unsafe { libc::pread64(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset as i64) })
}

/// Forks the pid-namespace helper (see `pidns`). Must be called with the calling thread's
/// `pid_for_children` namespace set to the target namespace. The child runs [`pid_helper_main`]
/// (async-signal-safe: the parent may be multi-threaded) and never returns.
pub fn fork_pid_helper(req_rd: BorrowedFd<'_>, ack_wr: BorrowedFd<'_>, high: i32) -> io::Result<Pid> {
    let (req, ack) = (req_rd.as_raw_fd(), ack_wr.as_raw_fd());
    // SAFETY: the child only runs pid_helper_main, which makes raw system calls on stack buffers and
    // never returns (no allocation, no locks taken after fork).
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => pid_helper_main(req, ack, high),
        pid => Ok(Pid::from_raw(pid)),
    }
}

fn fmt_i32(mut v: i32, buf: &mut [u8; 16]) -> usize {
    let neg = v < 0;
    let mut tmp = [0u8; 16];
    let mut n = 0;
    loop {
        tmp[n] = b'0' + (v % 10).unsigned_abs() as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let mut len = 0;
    if neg {
        buf[0] = b'-';
        len = 1;
    }
    for i in (0..n).rev() {
        buf[len] = tmp[i];
        len += 1;
    }
    len
}

fn parse_i32(buf: &[u8]) -> i32 {
    let mut v: i32 = 0;
    for &b in buf {
        if b.is_ascii_digit() {
            v = v * 10 + (b - b'0') as i32;
        } else {
            break;
        }
    }
    v
}

/// Body of the helper child. It first moves itself out of the way (forks a second helper at pid
/// `high + 1` and exits, putting the namespace's last-pid counter back), then serves requests: an i32
/// `v >= 0` sets ns_last_pid to `v`, `-1` reads it; the answer is the value or -errno.
fn pid_helper_main(req: i32, ack: i32, high: i32) -> ! {
    // SAFETY: raw system calls on stack buffers only; see fork_pid_helper.
    unsafe {
        let path = b"/proc/sys/kernel/ns_last_pid\0";
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDWR);
        let errno = || *libc::__errno_location();
        let answer = |v: i32| {
            libc::write(ack, (&v as *const i32).cast(), 4);
        };
        if fd < 0 {
            answer(-errno());
            libc::_exit(1);
        }
        // Keep nothing of the tracer's process open but our three fds (a socket or FUSE device held
        // here would outlive its owner's close).
        let mut keep = [req as u32, ack as u32, fd as u32];
        keep.sort_unstable();
        let mut from = 0u32;
        for k in keep {
            if k > from {
                libc::syscall(libc::SYS_close_range, from, k - 1, 0);
            }
            from = k + 1;
        }
        libc::syscall(libc::SYS_close_range, from, u32::MAX, 0);
        let read_last = || -> i32 {
            let mut buf = [0u8; 16];
            let n = libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n <= 0 {
                -errno()
            } else {
                parse_i32(&buf[..n as usize])
            }
        };
        let write_last = |v: i32| -> i32 {
            let mut buf = [0u8; 16];
            let n = fmt_i32(v, &mut buf);
            if libc::pwrite(fd, buf.as_ptr().cast(), n, 0) < 0 {
                -errno()
            } else {
                v
            }
        };
        let own = read_last();
        let r = write_last(high);
        if r < 0 {
            answer(r);
            libc::_exit(1);
        }
        let child = libc::fork();
        if child > 0 {
            write_last(own - 1);
            answer(child);
            libc::_exit(0);
        }
        if child < 0 {
            answer(-errno());
            libc::_exit(1);
        }
        loop {
            let mut v: i32 = 0;
            if libc::read(req, (&mut v as *mut i32).cast(), 4) != 4 {
                libc::_exit(0);
            }
            answer(if v >= 0 { write_last(v) } else { read_last() });
        }
    }
}

/// `getsockopt` of an integer option.
pub fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid for the kernel to write an int.
    if unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&mut v as *mut libc::c_int).cast(), &mut len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// `getsockname` (or `getpeername` when `peer`) as raw sockaddr bytes; None when not bound/connected.
pub fn socket_name(fd: BorrowedFd<'_>, peer: bool) -> io::Result<Option<Vec<u8>>> {
    let mut storage = [0u8; size_of::<libc::sockaddr_storage>()];
    let mut len = storage.len() as libc::socklen_t;
    let ptr = storage.as_mut_ptr().cast::<libc::sockaddr>();
    // SAFETY: storage has room for any sockaddr; the kernel writes at most len bytes and updates len.
    let r = unsafe {
        if peer {
            libc::getpeername(fd.as_raw_fd(), ptr, &mut len)
        } else {
            libc::getsockname(fd.as_raw_fd(), ptr, &mut len)
        }
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOTCONN) { Ok(None) } else { Err(e) };
    }
    Ok(Some(storage[..len as usize].to_vec()))
}

/// The TCP state of a socket (`tcpi_state` of TCP_INFO: 1 established, 7 close, 10 listen, ...).
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    Ok(tcp_info_head(fd)?[0])
}

/// The first 8 bytes of a socket's `struct tcp_info`: state, ca_state, retransmits, probes, backoff,
/// options (TCPI_OPT_*), send and receive window scales (4 bits each), flags.
pub fn tcp_info_head(fd: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    let mut info = [0u8; 8];
    getsockopt_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)?;
    Ok(info)
}

/// `getsockopt` into `buf`; returns the length the kernel wrote.
pub fn getsockopt_bytes(fd: BorrowedFd<'_>, level: i32, name: i32, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most len bytes into buf and updates len.
    if unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, buf.as_mut_ptr().cast(), &mut len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len as usize)
}

/// `setsockopt` of a raw value.
pub fn setsockopt_bytes(fd: BorrowedFd<'_>, level: i32, name: i32, value: &[u8]) -> io::Result<()> {
    // SAFETY: the kernel reads value.len() bytes.
    if unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, value.as_ptr().cast(), value.len() as u32) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `bind` (or `connect` when `connect`) to a raw sockaddr.
pub fn bind_or_connect(fd: BorrowedFd<'_>, addr: &[u8], connect: bool) -> io::Result<()> {
    let ptr = addr.as_ptr().cast::<libc::sockaddr>();
    let len = addr.len() as libc::socklen_t;
    // SAFETY: the kernel reads len bytes of sockaddr from addr.
    let r = unsafe {
        if connect {
            libc::connect(fd.as_raw_fd(), ptr, len)
        } else {
            libc::bind(fd.as_raw_fd(), ptr, len)
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `send(MSG_DONTWAIT)` of all of `data` (fails with WouldBlock when the socket takes no more).
pub fn send_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        // SAFETY: the kernel reads at most data.len() bytes.
        let n = unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// `setsockopt` of an integer option.
pub fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the kernel reads one int.
    if unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (&value as *const i32).cast(), size_of::<i32>() as u32) }
        < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `recvmsg(MSG_PEEK | MSG_DONTWAIT)` into `buf` with a small control buffer. Returns the length and
/// whether control data (such as passed fds) was present.
pub fn recv_peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut cmsg = [0u8; 64];
    // SAFETY: msghdr is plain data; we set the fields recvmsg reads.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.len();
    // SAFETY: msg points at valid buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((n as usize, msg.msg_controllen > 0 || msg.msg_flags & libc::MSG_CTRUNC != 0))
}

const TCGETS2: libc::c_ulong = 0x802c_542a;
const TCSETS2: libc::c_ulong = 0x402c_542b;
/// Size of `struct termios2`.
pub const TERMIOS2_SIZE: usize = 44;

/// A terminal's `termios2` and `winsize` (raw bytes).
pub fn tty_get(fd: BorrowedFd<'_>) -> io::Result<(Vec<u8>, [u16; 4])> {
    let mut t = vec![0u8; TERMIOS2_SIZE];
    let mut ws = [0u16; 4];
    // SAFETY: TCGETS2 writes a struct termios2 (44 bytes), TIOCGWINSZ a struct winsize (8 bytes).
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), TCGETS2, t.as_mut_ptr()) < 0
            || libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, ws.as_mut_ptr()) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((t, ws))
}

/// Sets a terminal's `termios2` and `winsize` from [`tty_get`]'s bytes.
pub fn tty_set(fd: BorrowedFd<'_>, termios: &[u8], ws: [u16; 4]) -> io::Result<()> {
    if termios.len() != TERMIOS2_SIZE {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad termios2 size"));
    }
    // SAFETY: both ioctls only read the structures we pass.
    unsafe {
        if libc::ioctl(fd.as_raw_fd(), TCSETS2, termios.as_ptr()) < 0
            || libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, ws.as_ptr()) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A duplicate of another process's fd (same open file description), via a pidfd.
pub fn dup_from(pid: Pid, fd: i32) -> io::Result<OwnedFd> {
    let pidfd = pidfd_open(pid)?;
    pidfd_getfd(pidfd.as_fd(), fd)
}

/// The number N of the pty whose master is `master` (its slave is /dev/pts/N): TIOCGPTN.
pub fn pty_index(master: BorrowedFd<'_>) -> io::Result<u32> {
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n as *mut libc::c_uint) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// Runs `f` on the calling thread inside the `kind` namespace (`net`, `ipc`: those a thread of a
/// multi-threaded process may enter) of process `member`, then goes back to the thread's own; returns
/// what `f` returned (the error is entering or leaving).
pub fn in_namespace<T>(member: Pid, kind: &str, f: impl FnOnce() -> T) -> io::Result<T> {
    let flag = match kind {
        "net" => nix::sched::CloneFlags::CLONE_NEWNET,
        "ipc" => nix::sched::CloneFlags::CLONE_NEWIPC,
        other => return Err(io::Error::other(format!("cannot enter a {other} namespace from a thread"))),
    };
    let target = std::fs::File::open(format!("/proc/{}/ns/{kind}", member.as_raw()))?;
    let own = std::fs::File::open(format!("/proc/thread-self/ns/{kind}"))?;
    nix::sched::setns(target.as_fd(), flag)?;
    let result = f();
    nix::sched::setns(own.as_fd(), flag)?;
    Ok(result)
}

/// Whether process `member` is in another `kind` namespace than the calling thread.
pub fn other_namespace(member: Pid, kind: &str) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let theirs = std::fs::metadata(format!("/proc/{}/ns/{kind}", member.as_raw()))?;
    let ours = std::fs::metadata(format!("/proc/thread-self/ns/{kind}"))?;
    Ok((theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino()))
}

/// A TCP listener on loopback (127.0.0.1 or ::1 by `family`) at a port the kernel chooses, non-blocking.
pub fn loopback_listener(family: i32) -> io::Result<std::net::TcpListener> {
    let ip: std::net::IpAddr = if family == libc::AF_INET6 {
        std::net::Ipv6Addr::LOCALHOST.into()
    } else {
        std::net::Ipv4Addr::LOCALHOST.into()
    };
    let listener = std::net::TcpListener::bind((ip, 0))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Makes closing `sock` reset its connection (`SO_LINGER` on, zero seconds).
pub fn reset_on_close(sock: BorrowedFd<'_>) -> io::Result<()> {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: linger is plain data of the size given.
    let bytes =
        unsafe { std::slice::from_raw_parts((&linger as *const libc::linger).cast::<u8>(), size_of::<libc::linger>()) };
    setsockopt_bytes(sock, libc::SOL_SOCKET, libc::SO_LINGER, bytes)
}
