//! The default seccomp filter and capability set, applied the way init applies them: in a child
//! forked from this multi-threaded test process, which must not allocate from then on (a global
//! allocator below kills the child if it does). Each probe also runs without the filter, so a
//! test fails if a refusal did not come from the filter.

#![cfg(target_arch = "x86_64")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use sandbox::{caps, seccomp};

/// Set in forked children: any allocation there is a bug.
static FORBID_ALLOC: AtomicBool = AtomicBool::new(false);
/// Exit code of a child that allocated.
const EXIT_ALLOCATED: i32 = 101;

struct ForkSafetyCheck;

impl ForkSafetyCheck {
    fn check(&self) {
        if FORBID_ALLOC.load(Ordering::Relaxed) {
            // SAFETY: _exit is async-signal-safe and ends the forked child at once.
            unsafe { libc::_exit(EXIT_ALLOCATED) };
        }
    }
}

// SAFETY: delegates to the system allocator, only adding a check before each call.
unsafe impl GlobalAlloc for ForkSafetyCheck {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.check();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.check();
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.check();
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: ForkSafetyCheck = ForkSafetyCheck;

/// How a forked child ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exited(i32),
    Signaled(i32),
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: pipe2 just returned these descriptors; nobody else owns them.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn read_all(fd: OwnedFd) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::from(fd).read_to_end(&mut out).unwrap();
    out
}

fn wait(pid: libc::pid_t) -> End {
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out pointer.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFEXITED(status) {
        End::Exited(libc::WEXITSTATUS(status))
    } else {
        End::Signaled(libc::WTERMSIG(status))
    }
}

/// Runs `child` in a forked child, which fills `N` result slots; returns them and how the child
/// ended. The child must only make plain syscalls.
fn in_child<const N: usize>(child: impl FnOnce(&mut [i64; N])) -> ([i64; N], End) {
    let (read_end, write_end) = pipe();
    // SAFETY: the child only runs `child` (plain syscalls, checked not to allocate), writes to a
    // pipe and calls _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        FORBID_ALLOC.store(true, Ordering::Relaxed);
        let mut results = [0i64; N];
        child(&mut results);
        // SAFETY: writes the results array from our stack to the pipe, then exits.
        unsafe {
            libc::write(write_end.as_raw_fd(), results.as_ptr().cast(), size_of_val(&results));
            libc::_exit(0);
        }
    }
    drop(write_end);
    let bytes = read_all(read_end);
    let end = wait(pid);
    let mut results = [0i64; N];
    for (slot, chunk) in results.iter_mut().zip(bytes.chunks_exact(8)) {
        *slot = i64::from_ne_bytes(chunk.try_into().unwrap());
    }
    (results, end)
}

/// A raw syscall: its result, or `-errno`.
fn raw(nr: i64, args: [u64; 6]) -> i64 {
    // SAFETY: the probes pass invalid fds, NULL pointers or harmless values; the kernel
    // validates them and no memory of ours is written.
    let rc = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
    if rc == -1 {
        // SAFETY: errno is thread-local and was just set by the failed syscall.
        -i64::from(unsafe { *libc::__errno_location() })
    } else {
        rc
    }
}

fn install_or_exit(filter: &seccomp::SeccompFilter) {
    if filter.install().is_err() {
        // SAFETY: ends the forked child.
        unsafe { libc::_exit(90) };
    }
}

fn restrict_or_exit() {
    if caps::restrict_to_default().is_err() {
        // SAFETY: ends the forked child.
        unsafe { libc::_exit(91) };
    }
}

const EPERM: i64 = -(libc::EPERM as i64);
const ENOSYS: i64 = -(libc::ENOSYS as i64);

/// Syscalls the filter must refuse, with arguments that are harmless for root without it.
const PROBES: [(&str, i64, [u64; 6]); 39] = [
    ("mount", libc::SYS_mount, [0; 6]),
    ("umount2", libc::SYS_umount2, [0; 6]),
    ("pivot_root", libc::SYS_pivot_root, [0; 6]),
    ("unshare", libc::SYS_unshare, [libc::CLONE_NEWNS as u64, 0, 0, 0, 0, 0]),
    ("setns", libc::SYS_setns, [u64::MAX, 0, 0, 0, 0, 0]),
    ("kexec_load", libc::SYS_kexec_load, [0; 6]),
    ("kexec_file_load", libc::SYS_kexec_file_load, [u64::MAX, u64::MAX, 0, 0, 0, 0]),
    ("bpf", libc::SYS_bpf, [u64::MAX, 0, 0, 0, 0, 0]),
    ("init_module", libc::SYS_init_module, [0; 6]),
    ("finit_module", libc::SYS_finit_module, [u64::MAX, 0, 0, 0, 0, 0]),
    ("delete_module", libc::SYS_delete_module, [0; 6]),
    ("perf_event_open", libc::SYS_perf_event_open, [0, 0, u64::MAX, u64::MAX, 0, 0]),
    ("keyctl", libc::SYS_keyctl, [u64::MAX, 0, 0, 0, 0, 0]),
    ("add_key", libc::SYS_add_key, [0; 6]),
    ("request_key", libc::SYS_request_key, [0; 6]),
    ("userfaultfd", libc::SYS_userfaultfd, [libc::O_CLOEXEC as u64, 0, 0, 0, 0, 0]),
    ("io_uring_setup", libc::SYS_io_uring_setup, [0; 6]),
    ("io_uring_enter", libc::SYS_io_uring_enter, [u64::MAX, 0, 0, 0, 0, 0]),
    ("io_uring_register", libc::SYS_io_uring_register, [u64::MAX, 0, 0, 0, 0, 0]),
    ("open_by_handle_at", libc::SYS_open_by_handle_at, [u64::MAX, 0, 0, 0, 0, 0]),
    ("fsopen", libc::SYS_fsopen, [0; 6]),
    ("fsconfig", libc::SYS_fsconfig, [u64::MAX, 0, 0, 0, 0, 0]),
    ("fsmount", libc::SYS_fsmount, [u64::MAX, 0, 0, 0, 0, 0]),
    ("fspick", libc::SYS_fspick, [u64::MAX, 0, 0, 0, 0, 0]),
    ("move_mount", libc::SYS_move_mount, [u64::MAX, 0, u64::MAX, 0, 0, 0]),
    ("open_tree", libc::SYS_open_tree, [u64::MAX, 0, 0, 0, 0, 0]),
    ("mount_setattr", libc::SYS_mount_setattr, [u64::MAX, 0, 0, 0, 0, 0]),
    ("reboot", libc::SYS_reboot, [0; 6]),
    ("swapon", libc::SYS_swapon, [0; 6]),
    ("syslog", libc::SYS_syslog, [u64::MAX, 0, 0, 0, 0, 0]),
    ("clock_settime", libc::SYS_clock_settime, [0; 6]),
    ("iopl", libc::SYS_iopl, [0; 6]),
    ("sethostname", libc::SYS_sethostname, [0, 1000, 0, 0, 0, 0]),
    ("setdomainname", libc::SYS_setdomainname, [0, 1000, 0, 0, 0, 0]),
    ("kcmp", libc::SYS_kcmp, [0, 0, u64::MAX, 0, 0, 0]),
    ("pidfd_getfd", libc::SYS_pidfd_getfd, [u64::MAX, u64::MAX, 0, 0, 0, 0]),
    ("process_madvise", libc::SYS_process_madvise, [u64::MAX, 0, 0, 0, 0, 0]),
    ("fanotify_init", libc::SYS_fanotify_init, [u64::MAX, 0, 0, 0, 0, 0]),
    ("set_mempolicy", libc::SYS_set_mempolicy, [0; 6]),
];

fn run_probes(filter: Option<&seccomp::SeccompFilter>) -> [i64; PROBES.len()] {
    let (results, end) = in_child(|results: &mut [i64; PROBES.len()]| {
        if let Some(filter) = filter {
            install_or_exit(filter);
        }
        for (slot, (_, nr, args)) in results.iter_mut().zip(PROBES) {
            *slot = raw(nr, args);
        }
    });
    assert_eq!(end, End::Exited(0));
    results
}

#[test]
fn dangerous_syscalls_fail_with_eperm() {
    let filter = seccomp::default_filter().unwrap();
    let unfiltered = run_probes(None);
    let filtered = run_probes(Some(&filter));
    for (i, (name, _, _)) in PROBES.iter().enumerate() {
        assert_ne!(unfiltered[i], EPERM, "{name} is refused even without the filter");
        assert_eq!(filtered[i], EPERM, "{name} under the filter returned {}", filtered[i]);
    }
}

/// `clone(flags | SIGCHLD)` like fork: 0 for a child that exits at once, else the result.
fn clone_probe(flags: u64) -> i64 {
    let rc = raw(libc::SYS_clone, [flags | libc::SIGCHLD as u64, 0, 0, 0, 0, 0]);
    if rc == 0 {
        // SAFETY: we are the new child: leave at once.
        unsafe { libc::_exit(0) };
    }
    if rc > 0 {
        let mut status = 0;
        // SAFETY: reaps the child just created.
        unsafe { libc::waitpid(rc as libc::pid_t, &mut status, 0) };
        return 0;
    }
    rc
}

#[test]
fn clone_with_namespace_flags_is_refused_and_fork_works() {
    let filter = seccomp::default_filter().unwrap();
    let namespaces = [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWCGROUP,
    ];
    let probe = |filter: Option<&seccomp::SeccompFilter>| {
        let (results, end) = in_child(|results: &mut [i64; 8]| {
            if let Some(filter) = filter {
                install_or_exit(filter);
            }
            results[0] = clone_probe(0);
            for (slot, flag) in results[1..].iter_mut().zip(namespaces) {
                *slot = clone_probe(flag as u64);
            }
        });
        assert_eq!(end, End::Exited(0));
        results
    };
    assert_eq!(probe(None), [0; 8], "root can clone into new namespaces without the filter");
    assert_eq!(probe(Some(&filter)), [0, EPERM, EPERM, EPERM, EPERM, EPERM, EPERM, EPERM]);
}

#[test]
fn clone3_and_syscalls_newer_than_the_profile_report_enosys() {
    let filter = seccomp::default_filter().unwrap();
    let (results, end) = in_child(|results: &mut [i64; 4]| {
        // clone3 with a NULL argument: EFAULT or EINVAL from the kernel, ENOSYS from the filter.
        results[0] = raw(libc::SYS_clone3, [0; 6]);
        install_or_exit(&filter);
        results[1] = raw(libc::SYS_clone3, [0; 6]);
        // 467 (open_tree_attr on Linux 6.15+) is newer than the reviewed profile; 511 is free.
        results[2] = raw(467, [u64::MAX, 0, 0, 0, 0, 0]);
        results[3] = raw(511, [0; 6]);
    });
    assert_eq!(end, End::Exited(0));
    assert_ne!(results[0], ENOSYS, "this kernel has clone3");
    assert_eq!(results[1..], [ENOSYS, ENOSYS, ENOSYS]);
}

#[test]
fn personality_is_restricted_to_dockers_values() {
    let filter = seccomp::default_filter().unwrap();
    const ADDR_NO_RANDOMIZE: u64 = 0x0040000;
    const READ_IMPLIES_EXEC: u64 = 0x0400000;
    let (results, end) = in_child(|results: &mut [i64; 5]| {
        install_or_exit(&filter);
        results[0] = raw(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0]);
        results[1] = raw(libc::SYS_personality, [0x20000, 0, 0, 0, 0, 0]);
        results[2] = raw(libc::SYS_personality, [0, 0, 0, 0, 0, 0]);
        results[3] = raw(libc::SYS_personality, [ADDR_NO_RANDOMIZE, 0, 0, 0, 0, 0]);
        results[4] = raw(libc::SYS_personality, [READ_IMPLIES_EXEC, 0, 0, 0, 0, 0]);
    });
    assert_eq!(end, End::Exited(0));
    assert!(results[..3].iter().all(|&r| r >= 0), "{results:?}");
    assert_eq!(results[3..], [EPERM, EPERM]);
}

#[test]
fn vsock_sockets_are_refused() {
    let filter = seccomp::default_filter().unwrap();
    let vsock = libc::AF_VSOCK as u64;
    let stream = libc::SOCK_STREAM as u64;
    let (results, end) = in_child(|results: &mut [i64; 4]| {
        results[0] = raw(libc::SYS_socket, [vsock, stream, 0, 0, 0, 0]);
        install_or_exit(&filter);
        results[1] = raw(libc::SYS_socket, [vsock, stream, 0, 0, 0, 0]);
        // The kernel reads the family as a 32-bit int: junk in the high half must not help.
        results[2] = raw(libc::SYS_socket, [vsock | 1 << 32, stream, 0, 0, 0, 0]);
        results[3] = raw(libc::SYS_socket, [libc::AF_UNIX as u64, stream, 0, 0, 0, 0]);
    });
    assert_eq!(end, End::Exited(0));
    assert_ne!(results[0], EPERM);
    assert_eq!(results[1..3], [EPERM, EPERM]);
    assert!(results[3] >= 0, "AF_UNIX socket: {}", results[3]);
}

#[test]
fn ptrace_works_under_the_filter() {
    let filter = seccomp::default_filter().unwrap();
    let (results, end) = in_child(|results: &mut [i64; 3]| {
        install_or_exit(&filter);
        // SAFETY: plain fork in a single-threaded child; the grandchild only makes syscalls.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: asks to be traced, stops, and exits once continued.
            unsafe {
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                libc::raise(libc::SIGSTOP);
                libc::_exit(7);
            }
        }
        let mut status = 0;
        // SAFETY: waits for and continues our own traced child.
        unsafe {
            libc::waitpid(pid, &mut status, 0);
            results[0] = i64::from(libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGSTOP);
            results[1] = raw(libc::SYS_ptrace, [libc::PTRACE_CONT as u64, pid as u64, 0, 0, 0, 0]);
            libc::waitpid(pid, &mut status, 0);
        }
        results[2] = i64::from(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7);
    });
    assert_eq!(end, End::Exited(0));
    assert_eq!(results, [1, 0, 1]);
}

#[test]
fn i386_syscalls_kill_the_process() {
    let filter = seccomp::default_filter().unwrap();
    let i386_getpid = |filter: Option<&seccomp::SeccompFilter>| {
        in_child(|results: &mut [i64; 1]| {
            if let Some(filter) = filter {
                install_or_exit(filter);
            }
            let ret: i64;
            // SAFETY: `int 0x80` enters the kernel's i386 ABI; eax = 20 is the i386 getpid,
            // which takes no arguments and touches no memory.
            unsafe { std::arch::asm!("int 0x80", inlateout("rax") 20i64 => ret, options(nostack)) };
            results[0] = ret;
        })
    };
    let (results, end) = i386_getpid(None);
    if end != End::Exited(0) {
        testing::skip(format!("this kernel has no i386 emulation (int 0x80 ended the child: {end:?})"));
        return;
    }
    assert!(results[0] > 0, "this kernel runs i386 syscalls: {}", results[0]);
    assert_eq!(i386_getpid(Some(&filter)).1, End::Signaled(libc::SIGSYS));
}

#[test]
fn x32_syscall_numbers_are_refused() {
    const X32_SYSCALL_BIT: i64 = 0x4000_0000;
    let filter = seccomp::default_filter().unwrap();
    let (results, end) = in_child(|results: &mut [i64; 2]| {
        results[0] = raw(X32_SYSCALL_BIT | libc::SYS_getpid, [0; 6]);
        install_or_exit(&filter);
        results[1] = raw(X32_SYSCALL_BIT | libc::SYS_getpid, [0; 6]);
    });
    assert_eq!(end, End::Exited(0));
    assert_ne!(results[0], EPERM);
    assert_eq!(results[1], EPERM);
}

fn no_new_privs() -> i64 {
    raw(libc::SYS_prctl, [libc::PR_GET_NO_NEW_PRIVS as u64, 0, 0, 0, 0, 0])
}

#[test]
fn no_new_privs_is_set_only_without_cap_sys_admin() {
    let filter = seccomp::default_filter().unwrap();
    let (results, end) = in_child(|results: &mut [i64; 2]| {
        install_or_exit(&filter);
        results[0] = no_new_privs();
    });
    assert_eq!((results[0], end), (0, End::Exited(0)), "root keeps setuid semantics");

    let (results, end) = in_child(|results: &mut [i64; 2]| {
        restrict_or_exit();
        results[0] = no_new_privs();
        install_or_exit(&filter);
        results[1] = no_new_privs();
    });
    assert_eq!(end, End::Exited(0));
    assert_eq!(results, [0, 1]);
}

/// Reads `/proc/self/status` of the child into `buf` with plain syscalls; returns its length.
fn read_status(buf: &mut [u8]) -> usize {
    // SAFETY: opens a NUL-terminated path, reads into `buf` within its length, closes.
    unsafe {
        let fd = libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        let mut len = 0;
        loop {
            let n = libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len);
            if n <= 0 {
                break;
            }
            len += n as usize;
        }
        libc::close(fd);
        len
    }
}

fn status_caps(status: &str) -> Vec<(String, u64)> {
    status
        .lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(":\t")?;
            key.starts_with("Cap").then(|| (key.to_owned(), u64::from_str_radix(value.trim(), 16).unwrap()))
        })
        .collect()
}

const DOCKER_CAPS: u64 = 0xa804_25fb;

fn expected_caps(inheritable: u64) -> Vec<(String, u64)> {
    [("CapInh", inheritable), ("CapPrm", DOCKER_CAPS), ("CapEff", DOCKER_CAPS), ("CapBnd", DOCKER_CAPS), ("CapAmb", 0)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// Runs `setup` in a child and returns the child's capability lines afterwards.
fn caps_after(setup: impl FnOnce()) -> Vec<(String, u64)> {
    let (results, end) = in_child(|results: &mut [i64; 512]| {
        setup();
        // SAFETY: views the results array as bytes; it is plain data on our stack.
        let buf = unsafe { std::slice::from_raw_parts_mut(results.as_mut_ptr().cast::<u8>(), 512 * 8) };
        read_status(buf);
    });
    assert_eq!(end, End::Exited(0));
    // SAFETY: views the returned array as bytes.
    let bytes = unsafe { std::slice::from_raw_parts(results.as_ptr().cast::<u8>(), 512 * 8) };
    let text = String::from_utf8_lossy(bytes);
    status_caps(text.trim_end_matches('\0'))
}

#[test]
fn restrict_to_default_leaves_dockers_capabilities() {
    let before = caps_after(|| {});
    assert_ne!(before, expected_caps(0), "the test runs with more than Docker's set");
    assert_eq!(caps_after(restrict_or_exit), expected_caps(0));
}

#[test]
fn restrict_to_default_clears_ambient_and_inheritable() {
    const CAP_NET_ADMIN: u64 = 12;
    let raise_ambient = || {
        use rustix::thread::CapabilitySet;
        // NET_ADMIN must be inheritable to be raised in the ambient set.
        let net_admin = CapabilitySet::from_bits_retain(1 << CAP_NET_ADMIN);
        let raised = rustix::thread::capabilities(None)
            .and_then(|mut sets| {
                sets.inheritable |= net_admin;
                rustix::thread::set_capabilities(None, sets)
            })
            .and_then(|()| rustix::thread::configure_capability_in_ambient_set(net_admin, true));
        if raised.is_err() {
            // SAFETY: ends the forked child.
            unsafe { libc::_exit(92) };
        }
    };
    let raised = caps_after(raise_ambient);
    assert!(raised.contains(&("CapAmb".to_owned(), 1 << CAP_NET_ADMIN)), "{raised:?}");
    assert_eq!(
        caps_after(|| {
            raise_ambient();
            restrict_or_exit();
        }),
        expected_caps(0)
    );
}

#[test]
fn dropped_capabilities_are_enforced_in_a_user_namespace() {
    // As in a sandbox: root of a user namespace that owns a new mount namespace may mount a
    // tmpfs there (CAP_SYS_ADMIN) until the capabilities are restricted.
    let mount_tmpfs =
        || raw(libc::SYS_mount, [c"none".as_ptr() as u64, c"/tmp".as_ptr() as u64, c"tmpfs".as_ptr() as u64, 0, 0, 0]);
    let (results, end) = in_child(|results: &mut [i64; 3]| {
        let flags = (libc::CLONE_NEWUSER | libc::CLONE_NEWNS) as u64;
        results[0] = raw(libc::SYS_unshare, [flags, 0, 0, 0, 0, 0]);
        results[1] = mount_tmpfs();
    });
    assert_eq!(end, End::Exited(0));
    assert_eq!(results[..2], [0, 0], "the user namespace's root can mount");

    let filter = seccomp::default_filter().unwrap();
    let (results, end) = in_child(|results: &mut [i64; 3]| {
        let flags = (libc::CLONE_NEWUSER | libc::CLONE_NEWNS) as u64;
        results[0] = raw(libc::SYS_unshare, [flags, 0, 0, 0, 0, 0]);
        // Installed with CAP_SYS_ADMIN of the user namespace: no_new_privs stays off.
        install_or_exit(&filter);
        restrict_or_exit();
        results[1] = mount_tmpfs();
        results[2] = no_new_privs();
    });
    assert_eq!(end, End::Exited(0));
    assert_eq!(results, [0, EPERM, 0]);
}

/// Forks, applies the sandbox's seccomp filter and capabilities, and execs `argv` with stdout
/// and stderr captured, as init does. Returns how it ended and its output.
fn run_confined(argv: &[&str]) -> (End, String) {
    let filter = seccomp::default_filter().unwrap();
    let args: Vec<CString> = argv.iter().map(|a| CString::new(*a).unwrap()).collect();
    let mut arg_ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    arg_ptrs.push(std::ptr::null());
    let (read_end, write_end) = pipe();
    // SAFETY: the child only makes plain syscalls (checked not to allocate) before execv.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        FORBID_ALLOC.store(true, Ordering::Relaxed);
        install_or_exit(&filter);
        restrict_or_exit();
        // SAFETY: redirects stdout/stderr to the pipe and execs with NUL-terminated arguments
        // prepared before the fork.
        unsafe {
            libc::dup2(write_end.as_raw_fd(), 1);
            libc::dup2(write_end.as_raw_fd(), 2);
            libc::execv(arg_ptrs[0], arg_ptrs.as_ptr());
            libc::_exit(127);
        }
    }
    drop(write_end);
    let output = String::from_utf8_lossy(&read_all(read_end)).into_owned();
    (wait(pid), output)
}

#[test]
fn real_programs_run_confined() {
    let script = r#"
        set -u
        python3 -c 'import threading; t = threading.Thread(target=print, args=("thread ok",)); t.start(); t.join()'
        echo "pipeline $(seq 1 1000 | sort -n -r | head -n 1)"
        grep -E '^Cap(Eff|Bnd)' /proc/self/status
        unshare --mount true 2>/dev/null && echo "unshare allowed" || echo "unshare refused"
        mkdir -p /tmp/deltabox-seccomp-test
        mount -t tmpfs none /tmp/deltabox-seccomp-test 2>/dev/null && echo "mount allowed" || echo "mount refused"
        setarch -R true 2>/dev/null && echo "setarch -R allowed" || echo "setarch -R refused"
    "#;
    let (end, output) = run_confined(&["/bin/sh", "-c", script]);
    assert_eq!(end, End::Exited(0), "{output}");
    let expected = "thread ok\n\
        pipeline 1000\n\
        CapEff:\t00000000a80425fb\n\
        CapBnd:\t00000000a80425fb\n\
        unshare refused\n\
        mount refused\n\
        setarch -R refused\n";
    assert_eq!(output, expected);
}
