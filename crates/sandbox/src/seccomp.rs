//! The sandbox's default seccomp profile: an allow-list at least as strict as Docker's default
//! profile for a container with Docker's default capabilities (see `docs/seccomp.md` for every
//! difference and its reason).
//!
//! The profile is compiled once, up front, into two classic-BPF programs; [`SeccompFilter::install`]
//! is then two plain `seccomp(2)` calls that allocate nothing, so init can call it in a freshly
//! forked child just before `execve`.
//!
//! Two programs because a seccompiler filter has a single "match" and a single "mismatch" action:
//! - the allow-list: listed syscalls (some only with allowed arguments) are allowed, everything
//!   else fails with `EPERM`;
//! - the ENOSYS list: `clone3` and syscall numbers newer than this profile fail with `ENOSYS`, so
//!   libc falls back to older calls (`clone3` → `clone`, whose flags the allow-list can inspect).
//!
//! The kernel runs every installed filter and keeps the most severe action; between two `ERRNO`
//! results it keeps the one of the most recently installed filter, so the ENOSYS list is installed
//! second and its `ENOSYS` wins over the allow-list's `EPERM`.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::sys;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile is only written for x86_64.
    #[error("the seccomp profile is only available on x86_64, not on {0}")]
    UnsupportedArch(&'static str),
    /// seccompiler refused the rules (a bug in the profile).
    #[error("cannot compile the seccomp profile")]
    Compile(#[source] seccompiler::BackendError),
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("cannot set no_new_privs before installing the seccomp filter")]
    NoNewPrivs(#[source] io::Error),
    /// `seccomp(SECCOMP_SET_MODE_FILTER)` failed.
    #[error("cannot install the seccomp filter")]
    Install(#[source] io::Error),
}

/// The compiled default profile, ready to be installed (see the module documentation).
#[derive(Debug, Clone)]
pub struct SeccompFilter {
    allow_list: BpfProgram,
    enosys_list: BpfProgram,
    signal_guard: BpfProgram,
}

impl SeccompFilter {
    /// Installs the profile on the calling thread (and so on everything it later forks or execs).
    ///
    /// Allocates nothing: safe to call in a child forked from a multi-threaded process. Installing
    /// a filter needs `CAP_SYS_ADMIN` in the caller's user namespace or `no_new_privs`; the caller
    /// normally has the former (it is root in the sandbox's user namespace, and must install the
    /// filter *before* [`crate::caps::restrict_to_default`] drops `CAP_SYS_ADMIN`). Without it,
    /// `no_new_privs` is set first, which also stops setuid binaries from gaining privileges.
    pub fn install(&self) -> Result<(), SeccompError> {
        install_program(&self.allow_list, 0)?;
        install_program(&self.enosys_list, 0).map(drop)
    }

    /// [`SeccompFilter::install`], then a third filter that hands every system call that signals a
    /// process chosen by pid (`kill`, `tkill`, `tgkill`, `rt_sigqueueinfo`, `rt_tgsigqueueinfo`, and
    /// `pidfd_open`) to a supervisor: returns its listener, for [`crate::signal_guard::serve`]. Until it
    /// is served those calls wait; once it is closed they fail with `ENOSYS`.
    pub fn install_with_signal_guard(&self) -> Result<OwnedFd, SeccompError> {
        self.install()?;
        let fd = install_program(&self.signal_guard, libc::SECCOMP_FILTER_FLAG_NEW_LISTENER as libc::c_uint)?;
        // SAFETY: with NEW_LISTENER the kernel answered a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

fn install_program(program: &[seccompiler::sock_filter], flags: libc::c_uint) -> Result<i32, SeccompError> {
    match sys::seccomp_set_mode_filter(program, flags) {
        Err(err) if err.raw_os_error() == Some(libc::EACCES) => {
            rustix::thread::set_no_new_privs(true).map_err(|errno| SeccompError::NoNewPrivs(errno.into()))?;
            sys::seccomp_set_mode_filter(program, flags).map_err(SeccompError::Install)
        }
        result => result.map_err(SeccompError::Install),
    }
}

/// System calls that signal (or open a pidfd of) a process named by its pid: the ones the signal guard
/// sees. `pidfd_send_signal` needs a pidfd, which for another process comes from `pidfd_open` or from
/// opening its /proc directory (hidden for our tasks).
pub const GUARDED_SIGNAL_CALLS: [i64; 6] = [
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_tgkill,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_pidfd_open,
];

/// The signal guard's program, written out because seccompiler has no `SECCOMP_RET_USER_NOTIF` action:
/// for x86_64 calls in [`GUARDED_SIGNAL_CALLS`] notify the listener, allow everything else (the other
/// two filters decide about it, and an `ERRNO` of theirs wins over a notification).
fn signal_guard_program() -> BpfProgram {
    const RET_USER_NOTIF: u32 = 0x7fc0_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    // EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE (linux/audit.h).
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u32, k: u32| seccompiler::sock_filter { code: code as u16, jt: 0, jf: 0, k };
    let jeq = |k: u32, jt: u8, jf: u8| seccompiler::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let load = |offset: u32| stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset);
    let calls = GUARDED_SIGNAL_CALLS.len() as u8;
    // seccomp_data: nr at offset 0, arch at offset 4.
    let mut program = vec![load(4), jeq(AUDIT_ARCH_X86_64, 0, calls + 1), load(0)];
    for (i, nr) in GUARDED_SIGNAL_CALLS.iter().enumerate() {
        // On a match jump over the remaining comparisons and the ALLOW to the notification.
        program.push(jeq(*nr as u32, calls - i as u8, 0));
    }
    program.push(stmt(libc::BPF_RET | libc::BPF_K, RET_ALLOW));
    program.push(stmt(libc::BPF_RET | libc::BPF_K, RET_USER_NOTIF));
    program
}

/// Compiles the default profile. Call once (e.g. in the shim) and keep the result.
pub fn default_filter() -> Result<SeccompFilter, SeccompError> {
    #[cfg(target_arch = "x86_64")]
    {
        x86_64::profile().and_then(compile).map_err(SeccompError::Compile)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err(SeccompError::UnsupportedArch(std::env::consts::ARCH))
    }
}

/// What the filter does with one syscall number.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// Always allowed.
    Allow,
    /// Allowed when at least one rule (an AND of argument conditions) matches, else `EPERM`.
    AllowIf(Vec<SeccompRule>),
    /// Fails with `ENOSYS`.
    Enosys,
}

/// A profile for one architecture: syscall number → verdict; unlisted numbers get `EPERM`.
#[derive(Debug)]
struct Profile {
    arch: seccompiler::TargetArch,
    syscalls: BTreeMap<i64, Verdict>,
}

fn compile(profile: Profile) -> Result<SeccompFilter, seccompiler::BackendError> {
    let mut allow = BTreeMap::new();
    let mut enosys = BTreeMap::new();
    for (nr, verdict) in profile.syscalls {
        match verdict {
            Verdict::Allow => allow.insert(nr, Vec::new()),
            Verdict::AllowIf(rules) => allow.insert(nr, rules),
            Verdict::Enosys => enosys.insert(nr, Vec::new()),
        };
    }
    let allow_list = seccompiler::SeccompFilter::new(
        allow,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        profile.arch,
    )?;
    let enosys_list = seccompiler::SeccompFilter::new(
        enosys,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        profile.arch,
    )?;
    Ok(SeccompFilter {
        allow_list: allow_list.try_into()?,
        enosys_list: enosys_list.try_into()?,
        signal_guard: signal_guard_program(),
    })
}

/// One argument condition; `Dword` compares the low 32 bits only, which is what the kernel reads
/// for `int`/`unsigned int` arguments (a 64-bit compare could be fooled by junk in the high half).
fn arg(
    index: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(index, len, op, value)?])
}

#[cfg(target_arch = "x86_64")]
mod x86_64 {
    //! The x86_64 profile. Numbers come from `libc`; the few syscalls newer than the `libc` crate
    //! are numbered here from the kernel's `arch/x86/entry/syscalls/syscall_64.tbl`.

    use std::collections::BTreeMap;

    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, TargetArch};

    use super::{arg, Profile, Verdict};

    const SYS_IO_PGETEVENTS: i64 = 333;
    const SYS_URETPROBE: i64 = 335;
    const SYS_CACHESTAT: i64 = 451;
    const SYS_MAP_SHADOW_STACK: i64 = 453;
    const SYS_FUTEX_WAKE: i64 = 454;
    const SYS_FUTEX_WAIT: i64 = 455;
    const SYS_FUTEX_REQUEUE: i64 = 456;
    const SYS_STATMOUNT: i64 = 457;
    const SYS_LISTMOUNT: i64 = 458;
    const SYS_SETXATTRAT: i64 = 463;
    const SYS_GETXATTRAT: i64 = 464;
    const SYS_LISTXATTRAT: i64 = 465;
    const SYS_REMOVEXATTRAT: i64 = 466;

    /// The newest syscall this profile was reviewed against (`removexattrat`, Linux 6.13, as in
    /// Docker's profile). Anything above it, up to the end of the native x86_64 table, is answered
    /// with `ENOSYS` as runc does for Docker's profile: "this kernel does not have it", so libc
    /// falls back instead of failing on `EPERM`.
    pub(super) const NEWEST_REVIEWED: i64 = SYS_REMOVEXATTRAT;
    /// x86_64 numbers from 512 on are the legacy x32 range; native syscalls stay below it.
    pub(super) const NATIVE_TABLE_END: i64 = 512;

    /// `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
    /// | CLONE_NEWNET` (0x7E020000): `clone` with any of them is refused.
    pub(super) const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET) as u64;

    /// The `personality(2)` values Docker allows: `PER_LINUX`, `PER_LINUX32`, `UNAME26`,
    /// `PER_LINUX32 | UNAME26`, and `0xffffffff` (query only).
    pub(super) const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

    /// `AF_VSOCK`: Docker refuses these sockets (they reach the hypervisor or host side).
    const AF_VSOCK: u64 = libc::AF_VSOCK as u64;

    /// Syscalls allowed with any arguments. Docker's default allow-list for x86_64 (names that
    /// exist only on other ABIs left out), plus what Docker allows for its default capabilities:
    /// `ptrace`, `process_vm_readv/writev` (kernel >= 4.8), `arch_prctl`, `modify_ldt`, and
    /// `chroot` (`CAP_SYS_CHROOT`).
    const ALLOWED: &[i64] = &[
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_access,
        libc::SYS_adjtimex,
        libc::SYS_alarm,
        libc::SYS_arch_prctl,
        libc::SYS_bind,
        libc::SYS_brk,
        SYS_CACHESTAT,
        libc::SYS_capget,
        libc::SYS_capset,
        libc::SYS_chdir,
        libc::SYS_chmod,
        libc::SYS_chown,
        libc::SYS_chroot,
        libc::SYS_clock_adjtime,
        libc::SYS_clock_getres,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_close,
        libc::SYS_close_range,
        libc::SYS_connect,
        libc::SYS_copy_file_range,
        libc::SYS_creat,
        libc::SYS_dup,
        libc::SYS_dup2,
        libc::SYS_dup3,
        libc::SYS_epoll_create,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_ctl_old,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_wait_old,
        libc::SYS_eventfd,
        libc::SYS_eventfd2,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_fadvise64,
        libc::SYS_fallocate,
        libc::SYS_fanotify_mark,
        libc::SYS_fchdir,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchmodat2,
        libc::SYS_fchown,
        libc::SYS_fchownat,
        libc::SYS_fcntl,
        libc::SYS_fdatasync,
        libc::SYS_fgetxattr,
        libc::SYS_flistxattr,
        libc::SYS_flock,
        libc::SYS_fork,
        libc::SYS_fremovexattr,
        libc::SYS_fsetxattr,
        libc::SYS_fstat,
        libc::SYS_fstatfs,
        libc::SYS_fsync,
        libc::SYS_ftruncate,
        libc::SYS_futex,
        SYS_FUTEX_REQUEUE,
        SYS_FUTEX_WAIT,
        libc::SYS_futex_waitv,
        SYS_FUTEX_WAKE,
        libc::SYS_futimesat,
        libc::SYS_get_robust_list,
        libc::SYS_get_thread_area,
        libc::SYS_getcpu,
        libc::SYS_getcwd,
        libc::SYS_getdents,
        libc::SYS_getdents64,
        libc::SYS_getegid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getgroups,
        libc::SYS_getitimer,
        libc::SYS_getpeername,
        libc::SYS_getpgid,
        libc::SYS_getpgrp,
        libc::SYS_getpid,
        libc::SYS_getppid,
        libc::SYS_getpriority,
        libc::SYS_getrandom,
        libc::SYS_getresgid,
        libc::SYS_getresuid,
        libc::SYS_getrlimit,
        libc::SYS_getrusage,
        libc::SYS_getsid,
        libc::SYS_getsockname,
        libc::SYS_getsockopt,
        libc::SYS_gettid,
        libc::SYS_gettimeofday,
        libc::SYS_getuid,
        libc::SYS_getxattr,
        SYS_GETXATTRAT,
        libc::SYS_inotify_add_watch,
        libc::SYS_inotify_init,
        libc::SYS_inotify_init1,
        libc::SYS_inotify_rm_watch,
        libc::SYS_io_cancel,
        libc::SYS_io_destroy,
        libc::SYS_io_getevents,
        SYS_IO_PGETEVENTS,
        libc::SYS_io_setup,
        libc::SYS_io_submit,
        libc::SYS_ioctl,
        libc::SYS_ioprio_get,
        libc::SYS_ioprio_set,
        libc::SYS_kill,
        libc::SYS_landlock_add_rule,
        libc::SYS_landlock_create_ruleset,
        libc::SYS_landlock_restrict_self,
        libc::SYS_lchown,
        libc::SYS_lgetxattr,
        libc::SYS_link,
        libc::SYS_linkat,
        libc::SYS_listen,
        SYS_LISTMOUNT,
        libc::SYS_listxattr,
        SYS_LISTXATTRAT,
        libc::SYS_llistxattr,
        libc::SYS_lremovexattr,
        libc::SYS_lseek,
        libc::SYS_lsetxattr,
        libc::SYS_lstat,
        libc::SYS_madvise,
        SYS_MAP_SHADOW_STACK,
        libc::SYS_membarrier,
        libc::SYS_memfd_create,
        libc::SYS_memfd_secret,
        libc::SYS_mincore,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_mknod,
        libc::SYS_mknodat,
        libc::SYS_mlock,
        libc::SYS_mlock2,
        libc::SYS_mlockall,
        libc::SYS_mmap,
        libc::SYS_modify_ldt,
        libc::SYS_mprotect,
        libc::SYS_mq_getsetattr,
        libc::SYS_mq_notify,
        libc::SYS_mq_open,
        libc::SYS_mq_timedreceive,
        libc::SYS_mq_timedsend,
        libc::SYS_mq_unlink,
        libc::SYS_mremap,
        libc::SYS_mseal,
        libc::SYS_msgctl,
        libc::SYS_msgget,
        libc::SYS_msgrcv,
        libc::SYS_msgsnd,
        libc::SYS_msync,
        libc::SYS_munlock,
        libc::SYS_munlockall,
        libc::SYS_munmap,
        libc::SYS_name_to_handle_at,
        libc::SYS_nanosleep,
        libc::SYS_newfstatat,
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_pause,
        libc::SYS_pidfd_open,
        libc::SYS_pidfd_send_signal,
        libc::SYS_pipe,
        libc::SYS_pipe2,
        libc::SYS_pkey_alloc,
        libc::SYS_pkey_free,
        libc::SYS_pkey_mprotect,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_prctl,
        libc::SYS_pread64,
        libc::SYS_preadv,
        libc::SYS_preadv2,
        libc::SYS_prlimit64,
        libc::SYS_process_mrelease,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pselect6,
        libc::SYS_ptrace,
        libc::SYS_pwrite64,
        libc::SYS_pwritev,
        libc::SYS_pwritev2,
        libc::SYS_read,
        libc::SYS_readahead,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_readv,
        libc::SYS_recvfrom,
        libc::SYS_recvmmsg,
        libc::SYS_recvmsg,
        libc::SYS_remap_file_pages,
        libc::SYS_removexattr,
        SYS_REMOVEXATTRAT,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_restart_syscall,
        libc::SYS_rmdir,
        libc::SYS_rseq,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigpending,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigsuspend,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_rt_tgsigqueueinfo,
        libc::SYS_sched_get_priority_max,
        libc::SYS_sched_get_priority_min,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_getattr,
        libc::SYS_sched_getparam,
        libc::SYS_sched_getscheduler,
        libc::SYS_sched_rr_get_interval,
        libc::SYS_sched_setaffinity,
        libc::SYS_sched_setattr,
        libc::SYS_sched_setparam,
        libc::SYS_sched_setscheduler,
        libc::SYS_sched_yield,
        libc::SYS_seccomp,
        libc::SYS_select,
        libc::SYS_semctl,
        libc::SYS_semget,
        libc::SYS_semop,
        libc::SYS_semtimedop,
        libc::SYS_sendfile,
        libc::SYS_sendmmsg,
        libc::SYS_sendmsg,
        libc::SYS_sendto,
        libc::SYS_set_robust_list,
        libc::SYS_set_thread_area,
        libc::SYS_set_tid_address,
        libc::SYS_setfsgid,
        libc::SYS_setfsuid,
        libc::SYS_setgid,
        libc::SYS_setgroups,
        libc::SYS_setitimer,
        libc::SYS_setpgid,
        libc::SYS_setpriority,
        libc::SYS_setregid,
        libc::SYS_setresgid,
        libc::SYS_setresuid,
        libc::SYS_setreuid,
        libc::SYS_setrlimit,
        libc::SYS_setsid,
        libc::SYS_setsockopt,
        libc::SYS_setuid,
        libc::SYS_setxattr,
        SYS_SETXATTRAT,
        libc::SYS_shmat,
        libc::SYS_shmctl,
        libc::SYS_shmdt,
        libc::SYS_shmget,
        libc::SYS_shutdown,
        libc::SYS_sigaltstack,
        libc::SYS_signalfd,
        libc::SYS_signalfd4,
        libc::SYS_socketpair,
        libc::SYS_splice,
        libc::SYS_stat,
        libc::SYS_statfs,
        SYS_STATMOUNT,
        libc::SYS_statx,
        libc::SYS_symlink,
        libc::SYS_symlinkat,
        libc::SYS_sync,
        libc::SYS_sync_file_range,
        libc::SYS_syncfs,
        libc::SYS_sysinfo,
        libc::SYS_tee,
        libc::SYS_tgkill,
        libc::SYS_time,
        libc::SYS_timer_create,
        libc::SYS_timer_delete,
        libc::SYS_timer_getoverrun,
        libc::SYS_timer_gettime,
        libc::SYS_timer_settime,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_gettime,
        libc::SYS_timerfd_settime,
        libc::SYS_times,
        libc::SYS_tkill,
        libc::SYS_truncate,
        libc::SYS_umask,
        libc::SYS_uname,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        SYS_URETPROBE,
        libc::SYS_utime,
        libc::SYS_utimensat,
        libc::SYS_utimes,
        libc::SYS_vfork,
        libc::SYS_vmsplice,
        libc::SYS_wait4,
        libc::SYS_waitid,
        libc::SYS_write,
        libc::SYS_writev,
    ];

    pub(super) fn profile() -> Result<Profile, seccompiler::BackendError> {
        let mut syscalls: BTreeMap<i64, Verdict> = ALLOWED.iter().map(|&nr| (nr, Verdict::Allow)).collect();

        let no_namespace_flags = arg(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS), 0);
        let personalities = PERSONALITIES.iter().map(|&p| arg(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, p));
        let not_vsock = arg(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, AF_VSOCK);
        syscalls.insert(libc::SYS_clone, Verdict::AllowIf(vec![no_namespace_flags?]));
        syscalls.insert(libc::SYS_personality, Verdict::AllowIf(personalities.collect::<Result<_, _>>()?));
        syscalls.insert(libc::SYS_socket, Verdict::AllowIf(vec![not_vsock?]));

        syscalls.insert(libc::SYS_clone3, Verdict::Enosys);
        for nr in NEWEST_REVIEWED + 1..NATIVE_TABLE_END {
            syscalls.insert(nr, Verdict::Enosys);
        }
        Ok(Profile { arch: TargetArch::x86_64, syscalls })
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn profile_compiles_within_bpf_limits() {
        let filter = default_filter().unwrap();
        // BPF_MAXINSNS: the kernel refuses longer programs.
        assert!(filter.allow_list.len() < 4096, "{}", filter.allow_list.len());
        assert!(filter.enosys_list.len() < 4096, "{}", filter.enosys_list.len());
    }

    #[test]
    fn dangerous_syscalls_are_not_allowed() {
        let profile = x86_64::profile().unwrap();
        for nr in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_kexec_load,
            libc::SYS_kexec_file_load,
            libc::SYS_bpf,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_perf_event_open,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_request_key,
            libc::SYS_userfaultfd,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_open_by_handle_at,
            libc::SYS_fsopen,
            libc::SYS_fsconfig,
            libc::SYS_fsmount,
            libc::SYS_fspick,
            libc::SYS_move_mount,
            libc::SYS_open_tree,
            libc::SYS_mount_setattr,
            libc::SYS_reboot,
            libc::SYS_swapon,
            libc::SYS_swapoff,
            libc::SYS_syslog,
            libc::SYS_acct,
            libc::SYS_settimeofday,
            libc::SYS_clock_settime,
            libc::SYS_iopl,
            libc::SYS_ioperm,
            libc::SYS_kcmp,
            libc::SYS_pidfd_getfd,
            libc::SYS_process_madvise,
            libc::SYS_sethostname,
            libc::SYS_setdomainname,
            libc::SYS_quotactl,
            libc::SYS_lookup_dcookie,
            libc::SYS_fanotify_init,
            libc::SYS_vhangup,
            libc::SYS_mbind,
            libc::SYS_set_mempolicy,
            libc::SYS_get_mempolicy,
            libc::SYS_migrate_pages,
            libc::SYS_move_pages,
            libc::SYS_uselib,
            libc::SYS_ustat,
            libc::SYS_sysfs,
            libc::SYS_nfsservctl,
        ] {
            assert!(
                !matches!(profile.syscalls.get(&nr), Some(Verdict::Allow | Verdict::AllowIf(_))),
                "syscall {nr} must not be allowed"
            );
        }
    }

    #[test]
    fn clone_mask_is_dockers() {
        assert_eq!(x86_64::CLONE_NAMESPACE_FLAGS, 0x7E02_0000);
    }
}
