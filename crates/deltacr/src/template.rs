//! Templates: stopped copy-on-write forks of checkpointed processes.
//!
//! A template is made by injecting into the live process X a `clone(CLONE_VM)` (a helper I that shares
//! X's memory, so no page tables are copied twice), and in I: close every fd, fork the template T, exit.
//! X reaps I (injected wait4; I's exit signal is 0 so X never sees a SIGCHLD for it). T is then a child of
//! the sandbox's init, holds no fds (so it keeps no pipe, socket or file alive in the live sandbox), no
//! longer belongs to X's process group (nor to X's session when X leads it, so X's pid can be reused), is
//! not dumpable (hidden from the sandbox's /proc with hidepid, and not ptrace-able from inside), has
//! oom_score_adj -1000, and stays in ptrace-stop under our tracer with PTRACE_O_EXITKILL; its registers
//! point at `exit_group(0)` so it can never run X's code on its own.
//!
//! Restoring X from T is one injected `clone(CLONE_PARENT)` in T: a copy-on-write child of init whose
//! memory is exactly X's at the checkpoint. That clone copies T's page tables; a *spare* (a fork of T
//! made ahead of time, see [`Template::make_spare`]) moves this cost out of the restore.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::memuse;
use crate::procfs;
use crate::ptrace::{self, Injector, PtraceError};
use crate::sys::{self, Regs};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("making a template of process {pid}")]
    Create {
        pid: i32,
        #[source]
        source: PtraceError,
    },
    #[error("cloning template {template}")]
    Clone {
        template: i32,
        #[source]
        source: PtraceError,
    },
    #[error("template {template} of process {pid} is gone (killed?)")]
    Gone { template: i32, pid: i32 },
    #[error("reading process {pid}")]
    Proc {
        pid: i32,
        #[source]
        source: procfs::ProcError,
    },
}

/// How a template leaves the live process's session and process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detach {
    /// Own process group, same session (the session is init's and never needs re-creating).
    ProcessGroup,
    /// Own session (the original's session id must be free for restore).
    Session,
}

/// A task of ours in the sandbox that stays in ptrace-stop under the tracer thread and can never run
/// its own code (its registers point at `exit_group(0)`; PTRACE_O_EXITKILL). Killed when dropped.
#[derive(Debug)]
pub struct Stopped {
    pid: Pid,
    pidfd: OwnedFd,
    gadget: u64,
    trap_regs: Regs,
    _tracer_thread: PhantomData<*const ()>,
}

/// A stopped copy-on-write fork of a process at checkpoint time, and possibly its spare: a
/// copy-on-write fork of the template made ahead of time, whose memory a restore takes over without
/// copying page tables (see [`Template::make_spare`]). Killed when dropped. Lives on the tracer thread.
#[derive(Debug)]
pub struct Template {
    task: Stopped,
    spare: RefCell<Option<Stopped>>,
}

const CLONE_VM: u64 = libc::CLONE_VM as u64;
const SIGCHLD: u64 = libc::SIGCHLD as u64;
const PR_SET_DUMPABLE: u64 = 4;

fn create_err(pid: Pid) -> impl FnOnce(PtraceError) -> TemplateError {
    move |source| TemplateError::Create { pid: pid.as_raw(), source }
}

/// Makes a template of the process whose (stopped, injectable) leader thread is `leader`. The process
/// must have no scratch memory mapped.
pub fn create(leader: &mut Injector, gadget: u64, detach: Detach) -> Result<Template, TemplateError> {
    let pid = leader.pid();
    let helper = leader.clone_task(CLONE_VM, "making a template").map_err(create_err(pid))?;
    let helper_ns = procfs::Status::read(helper)
        .and_then(|s| s.innermost("NSpid"))
        .map_err(|source| TemplateError::Proc { pid: pid.as_raw(), source })?;
    let mut h = Injector::new(helper, helper, gadget).map_err(create_err(pid))?;
    h.call(libc::SYS_close_range, &[0, u32::MAX as u64, 0]).map_err(create_err(pid))?;
    let tpid = h.clone_task(SIGCHLD, "forking the template").map_err(create_err(pid))?;
    // From here on a failure must not leave a stopped orphan behind.
    let finish = (|| {
        h.syscall(libc::SYS_exit, &[0])?;
        leader.call(libc::SYS_wait4, &[helper_ns as u64, 0, libc::__WALL as u64, 0])?;
        let mut t = Injector::new(tpid, tpid, gadget)?;
        match detach {
            Detach::ProcessGroup => t.call(libc::SYS_setpgid, &[0, 0]),
            Detach::Session => t.call(libc::SYS_setsid, &[]),
        }?;
        t.call(libc::SYS_prctl, &[PR_SET_DUMPABLE, 0])?;
        let mut trap_regs = *t.orig_regs();
        trap_regs.rip = gadget;
        trap_regs.rax = libc::SYS_exit_group as u64;
        trap_regs.orig_rax = u64::MAX;
        trap_regs.rdi = 0;
        t.finish_with(&trap_regs, u64::MAX)?;
        ptrace::set_exitkill(tpid)?;
        let pidfd = sys::pidfd_open(tpid).map_err(|source| PtraceError::Request {
            op: "pidfd_open",
            tid: tpid.as_raw(),
            source,
        })?;
        Ok((trap_regs, pidfd))
    })();
    let (trap_regs, pidfd) = match finish {
        Ok(v) => v,
        Err(e) => {
            kill_and_collect(tpid);
            return Err(create_err(pid)(e));
        }
    };
    // Needs CAP_SYS_RESOURCE, which the tracer may lack; the template then keeps the original's value.
    if let Err(e) = procfs::write_int(tpid, "oom_score_adj", -1000) {
        tracing::debug!(template = tpid.as_raw(), error = %e, "cannot protect the template from the OOM killer");
    }
    let task = Stopped { pid: tpid, pidfd, gadget, trap_regs, _tracer_thread: PhantomData };
    Ok(Template { task, spare: RefCell::new(None) })
}

/// Kills a traced task of ours that is not set up yet and collects its exit.
fn kill_and_collect(pid: Pid) {
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = waitpid(pid, Some(WaitPidFlag::__WALL));
}

impl Stopped {
    /// Host pid of the task.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The syscall instruction used to inject into the task (and its clones: same vdso address).
    pub fn gadget(&self) -> u64 {
        self.gadget
    }

    /// True while the task exists.
    pub fn alive(&self) -> bool {
        matches!(sys::pidfd_exited(self.pidfd.as_fd()), Ok(false))
    }

    /// Sends SIGKILL without waiting: the task exits on its own (collect it with
    /// [`Stopped::try_collect`]; dropping it waits).
    pub fn kill(&self) {
        let _ = rustix::process::pidfd_send_signal(self.pidfd.as_fd(), rustix::process::Signal::KILL);
    }

    /// Collects the task's exit if it has exited (then init can reap it). True once it is collected.
    pub fn try_collect(&self) -> bool {
        !matches!(waitpid(self.pid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)), Ok(WaitStatus::StillAlive))
    }

    /// `read(pid)` of the task, or 0 once the task is gone (until we collect it, an exited task keeps its
    /// pid as a zombie without memory, so its /proc files cannot be another process's).
    fn read_or_zero(&self, read: impl FnOnce(Pid) -> Result<u64, procfs::ProcError>) -> Result<u64, TemplateError> {
        match read(self.pid) {
            Err(_) if !self.alive() => Ok(0),
            read => read.map_err(|source| TemplateError::Proc { pid: self.pid.as_raw(), source }),
        }
    }

    /// Injects `clone(flags)` into the task and returns the new child's host pid, stopped and traced.
    /// The pid the child gets is chosen beforehand with the pid helper.
    pub fn clone_child(&self, flags: u64) -> Result<Pid, TemplateError> {
        let err = |source| TemplateError::Clone { template: self.pid.as_raw(), source };
        let mut inj = Injector::new(self.pid, self.pid, self.gadget).map_err(err)?;
        let child = inj.clone_task(flags, "cloning a template");
        inj.finish_with(&self.trap_regs, u64::MAX).map_err(err)?;
        child.map_err(err)
    }
}

impl Template {
    /// The template's stopped task.
    pub fn task(&self) -> &Stopped {
        &self.task
    }

    /// Host pid of the template.
    pub fn pid(&self) -> Pid {
        self.task.pid
    }

    /// The syscall instruction used to inject into the template (and its clones: same vdso address).
    pub fn gadget(&self) -> u64 {
        self.task.gadget
    }

    /// True while the template process exists.
    pub fn alive(&self) -> bool {
        self.task.alive()
    }

    /// Runs `f` with an injector on the template, then puts the template back in its idle state.
    pub fn with_injector<R>(&self, f: impl FnOnce(&mut Injector) -> Result<R, PtraceError>) -> Result<R, PtraceError> {
        let t = &self.task;
        let mut inj = Injector::new(t.pid, t.pid, t.gadget)?;
        let res = f(&mut inj);
        inj.finish_with(&t.trap_regs, u64::MAX)?;
        res
    }

    /// Detaches the template from the SysV segments its process is attached to (`attachments`: that
    /// process's mappings of segments). A template attached to a segment would keep it, and its id, alive
    /// after the sandbox removed it, and a restore makes the checkpoint's segments again with their ids.
    pub fn detach_segments(&self, attachments: &[crate::state::Vma]) -> Result<(), PtraceError> {
        if attachments.is_empty() {
            return Ok(());
        }
        self.with_injector(|inj| {
            for v in attachments {
                if let crate::state::VmaBacking::SharedMemory { offset: 0, .. } = v.backing {
                    inj.call(libc::SYS_shmdt, &[v.start])?;
                }
            }
            Ok(())
        })
    }

    /// Makes the template's spare unless it has one: a copy-on-write fork of the template (a child of
    /// init, stopped like the template). Forking copies the page tables, the part of a restore whose
    /// cost grows with memory; a restore that finds a spare creates the process with `clone(CLONE_VM)`
    /// from it instead, so the process takes over the spare's memory as it is. Returns whether a spare
    /// was made.
    pub fn make_spare(&self) -> Result<bool, TemplateError> {
        if self.spare.borrow().as_ref().is_some_and(Stopped::alive) {
            return Ok(false);
        }
        let t = &self.task;
        let pid = self.task.clone_child((libc::CLONE_PARENT | libc::SIGCHLD) as u64)?;
        let setup = (|| {
            ptrace::setregs(pid, &t.trap_regs)?;
            ptrace::set_sigmask(pid, u64::MAX)?;
            ptrace::set_exitkill(pid)?;
            sys::pidfd_open(pid).map_err(|source| PtraceError::Request { op: "pidfd_open", tid: pid.as_raw(), source })
        })();
        match setup {
            Ok(pidfd) => {
                let spare =
                    Stopped { pid, pidfd, gadget: t.gadget, trap_regs: t.trap_regs, _tracer_thread: PhantomData };
                self.spare.replace(Some(spare));
                Ok(true)
            }
            Err(source) => {
                kill_and_collect(pid);
                Err(TemplateError::Clone { template: t.pid.as_raw(), source })
            }
        }
    }

    /// Memory the template and its spare hold that no other process shares — what killing them frees:
    /// the anonymous pages only they map (see [`memuse`]) and their page tables. 0 once they are gone.
    pub fn memory_bytes(&self) -> Result<u64, TemplateError> {
        let spare = self.spare.borrow();
        let spare = spare.as_ref().filter(|s| s.alive());
        let holders = 1 + u64::from(spare.is_some());
        let mut bytes = self.task.read_or_zero(|pid| memuse::exclusive_anon_bytes(pid, holders))?;
        for task in std::iter::once(&self.task).chain(spare) {
            bytes += task.read_or_zero(memuse::page_table_bytes)?;
        }
        Ok(bytes)
    }

    /// Takes the template's spare, if it has a live one.
    pub fn take_spare(&self) -> Option<Stopped> {
        self.spare.take().filter(Stopped::alive)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SIGKILL through the pidfd cannot hit a recycled pid; then collect the exit as its tracer so
        // init can reap it.
        let flags = if rustix::process::pidfd_send_signal(self.pidfd.as_fd(), rustix::process::Signal::KILL).is_ok() {
            WaitPidFlag::__WALL
        } else {
            WaitPidFlag::__WALL | WaitPidFlag::WNOHANG
        };
        let _ = waitpid(self.pid, Some(flags));
    }
}
