//! The signal guard: the supervisor's own tasks inside a sandbox cannot be signalled from inside.
//!
//! DeltaCR keeps stopped tasks in the sandbox's pid namespace (checkpoint templates, their spares and
//! holders): copies of the sandbox's processes, with the same user and the sandbox's user namespace, so a
//! process inside that holds CAP_KILL there (root, as in Docker) may signal them, and `kill -9 -1` — a
//! common cleanup command — would kill them with the checkpoint they hold. The kernel has no switch for
//! that, so every system call that signals a process chosen by pid is handed to the supervisor by a
//! seccomp user-notification filter ([`crate::seccomp::SeccompFilter::install_with_signal_guard`]), and
//! [`serve`] decides: a call aimed at one of our tasks fails with `ESRCH` (as if it did not exist: they are
//! hidden from the sandbox's /proc too); `kill(-1, sig)` is carried out here for every process it would
//! reach except ours; anything else is carried out by the kernel as asked.
//!
//! "Our tasks" are the sandbox's processes traced by a thread of the process calling [`serve`] (the
//! shim's checkpoint thread traces every task DeltaCR keeps). A process may always signal itself. Our
//! tasks take pids in the top eighth of the namespace's pid range ([`reserved_floor`]), so a call aimed
//! below it goes on at once; only calls aimed there (and `kill(-1)`) make the guard read /proc.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::unistd::Pid;

use crate::cgroup::Cgroup;
use crate::procfs::Status;
use crate::sys;

/// `CAP_KILL`'s bit in the capability sets of /proc/<pid>/status.
const CAP_KILL: u32 = 5;
/// Largest signal number (`_NSIG - 1`).
const MAX_SIGNAL: i64 = 64;

/// Where the pids that the supervisor's long-lived tasks take in a sandbox's pid namespace start, for a
/// `pid_max`: the top eighth of the range (DeltaCR's pid setter puts them there).
pub fn reserved_floor(pid_max: i32) -> i32 {
    pid_max - pid_max / 8
}

/// The host's `kernel.pid_max`.
pub fn pid_max() -> io::Result<i32> {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")?.trim().parse().map_err(io::Error::other)
}

/// Serves `listener` for the sandbox whose processes are in `cgroup`, until the listener fails (the
/// sandbox is gone). Blocks: run it on a thread of its own.
pub fn serve(listener: OwnedFd, cgroup: Arc<Cgroup>) {
    let floor = pid_max().map_or(0, reserved_floor);
    if let Err(e) = sys::seccomp_notif_sync_wake_up(listener.as_fd()) {
        tracing::debug!("signal guard: no synchronous wake-ups ({e}); signals by pid cost two wake-ups");
    }
    loop {
        let notif = match sys::seccomp_notif_recv(listener.as_fd()) {
            Ok(notif) => notif,
            // The caller was interrupted (or died) before we read its call.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::ENOENT)) => continue,
            Err(e) => {
                tracing::debug!("the signal guard stops: {e}");
                return;
            }
        };
        let answer = answer(&notif, &cgroup, floor).unwrap_or_else(|e| {
            tracing::warn!(
                caller = notif.pid,
                "signal guard: cannot tell where a signal goes ({e}); letting it through"
            );
            None
        });
        // ENOENT: the caller died meanwhile; nothing to answer.
        let _ = sys::seccomp_notif_send(listener.as_fd(), notif.id, answer);
    }
}

/// What a task of the sandbox is, read from the host's /proc.
struct Task {
    /// Host pid (of a thread-group leader: cgroup.procs lists those).
    host: i32,
    /// Its pid in the sandbox.
    pid: i32,
    ours: bool,
    uid: Ids,
}

/// Real and saved user ids.
#[derive(Clone, Copy)]
struct Ids {
    real: u32,
    effective: u32,
    saved: u32,
}

fn status(host_pid: i32) -> io::Result<Status> {
    Ok(Status::read(Pid::from_raw(host_pid))?)
}

fn ids(status: &Status) -> Option<Ids> {
    let uid = status.numbers("Uid").ok()?;
    let id = |i: usize| uid.get(i).and_then(|&n| u32::try_from(n).ok());
    Some(Ids { real: id(0)?, effective: id(1)?, saved: id(2)? })
}

/// Whether the task with `status` is traced by a thread of this process.
fn traced_by_us(status: &Status) -> bool {
    match status.innermost("TracerPid") {
        Ok(0) | Err(_) => false,
        Ok(tracer) => std::path::Path::new(&format!("/proc/self/task/{tracer}")).exists(),
    }
}

/// The sandbox's processes (tasks that exited while we looked are left out).
fn tasks(cgroup: &Cgroup) -> io::Result<Vec<Task>> {
    let procs = cgroup.procs().map_err(io::Error::other)?;
    Ok(procs
        .into_iter()
        .filter_map(|host| {
            let st = status(host).ok()?;
            Some(Task { host, pid: st.innermost("NSpid").ok()?, ours: traced_by_us(&st), uid: ids(&st)? })
        })
        .collect())
}

/// The answer to one guarded call (`None`: let the kernel carry it out). `floor`: see [`reserved_floor`].
fn answer(notif: &libc::seccomp_notif, cgroup: &Cgroup, floor: i32) -> io::Result<Option<Result<i64, i32>>> {
    let args = notif.data.args;
    let nr = i64::from(notif.data.nr);
    // Pids are ints: the kernel reads the low 32 bits.
    let pid_arg = |i: usize| args[i] as u32 as i32;
    // The caller's status and its thread group's pid in the sandbox, read only when needed.
    let caller = || -> io::Result<(Status, i32)> {
        let st = status(notif.pid as i32)?;
        let tgid = st.innermost("NStgid")?;
        Ok((st, tgid))
    };
    let targets: Vec<i32> = match nr {
        libc::SYS_kill if pid_arg(0) == -1 => {
            let (st, tgid) = caller()?;
            return kill_all(&st, tgid, args[1] as u32 as i32, cgroup);
        }
        // kill(0) is the caller's own process group, which never holds our tasks (each has its own group).
        libc::SYS_kill => vec![pid_arg(0).saturating_abs()],
        libc::SYS_tgkill | libc::SYS_rt_tgsigqueueinfo => vec![pid_arg(0), pid_arg(1)],
        _ => vec![pid_arg(0)],
    };
    if targets.iter().all(|&p| p < floor) {
        return Ok(None);
    }
    let (_, caller_tgid) = caller()?;
    let targets: Vec<i32> = targets.into_iter().filter(|&p| p > 0 && p != caller_tgid).collect();
    if targets.is_empty() {
        return Ok(None);
    }
    // Our tasks lead their own process groups, so a group id that is one of their pids names them too.
    let ours = tasks(cgroup)?.into_iter().any(|t| t.ours && targets.contains(&t.pid));
    Ok(ours.then_some(Err(libc::ESRCH)))
}

/// `kill(-1, signal)`: every process of the sandbox but init, the caller and our tasks, that the caller may
/// signal (the kernel's rule: a matching real or effective uid, or CAP_KILL). Answers as the kernel does:
/// 0 when there was any process to try, else ESRCH.
fn kill_all(caller: &Status, caller_tgid: i32, signal: i32, cgroup: &Cgroup) -> io::Result<Option<Result<i64, i32>>> {
    if !(0..=MAX_SIGNAL).contains(&i64::from(signal)) {
        return Ok(Some(Err(libc::EINVAL)));
    }
    let me = ids(caller).ok_or_else(|| io::Error::other("no Uid"))?;
    let cap_kill = caller.hex("CapEff").is_ok_and(|caps| caps & (1 << CAP_KILL) != 0);
    let mut tried = 0;
    for t in tasks(cgroup)? {
        if t.pid == 1 || t.pid == caller_tgid || t.ours {
            continue;
        }
        tried += 1;
        let may = cap_kill || [me.real, me.effective].iter().any(|u| *u == t.uid.real || *u == t.uid.saved);
        if may && signal != 0 {
            // Gone meanwhile: as if the kernel had not found it.
            if let Ok(fd) = rustix::process::pidfd_open(
                rustix::process::Pid::from_raw(t.host).expect("a positive pid"),
                rustix::process::PidfdFlags::empty(),
            ) {
                let _ = sys::pidfd_send_raw_signal(fd.as_fd(), signal);
            }
        }
    }
    Ok(Some(if tried > 0 { Ok(0) } else { Err(libc::ESRCH) }))
}
