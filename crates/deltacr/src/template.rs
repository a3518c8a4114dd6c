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
//! memory is exactly X's at the checkpoint.

use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

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

/// A stopped copy-on-write fork of a process at checkpoint time. Killed when dropped. Lives on the
/// tracer thread.
#[derive(Debug)]
pub struct Template {
    pid: Pid,
    pidfd: OwnedFd,
    gadget: u64,
    trap_regs: Regs,
    _tracer_thread: PhantomData<*const ()>,
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
            let _ = nix::sys::signal::kill(tpid, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(tpid, Some(WaitPidFlag::__WALL));
            return Err(create_err(pid)(e));
        }
    };
    // Needs CAP_SYS_RESOURCE, which the tracer may lack; the template then keeps the original's value.
    if let Err(e) = procfs::write_int(tpid, "oom_score_adj", -1000) {
        tracing::debug!(template = tpid.as_raw(), error = %e, "cannot protect the template from the OOM killer");
    }
    Ok(Template { pid: tpid, pidfd, gadget, trap_regs, _tracer_thread: PhantomData })
}

impl Template {
    /// Host pid of the template.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The syscall instruction used to inject into the template (and its clones: same vdso address).
    pub fn gadget(&self) -> u64 {
        self.gadget
    }

    /// True while the template process exists.
    pub fn alive(&self) -> bool {
        matches!(sys::pidfd_exited(self.pidfd.as_fd()), Ok(false))
    }

    /// Runs `f` with an injector on the template, then puts the template back in its idle state.
    pub fn with_injector<R>(&self, f: impl FnOnce(&mut Injector) -> Result<R, PtraceError>) -> Result<R, PtraceError> {
        let mut inj = Injector::new(self.pid, self.pid, self.gadget)?;
        let res = f(&mut inj);
        inj.finish_with(&self.trap_regs, u64::MAX)?;
        res
    }

    /// Injects `clone(flags)` into the template and returns the new child's host pid, stopped and traced.
    /// The pid the child gets is chosen beforehand with the pid helper.
    pub fn clone_child(&self, flags: u64) -> Result<Pid, TemplateError> {
        let err = |source| TemplateError::Clone { template: self.pid.as_raw(), source };
        let mut inj = Injector::new(self.pid, self.pid, self.gadget).map_err(err)?;
        let child = inj.clone_task(flags, "cloning a template");
        inj.finish_with(&self.trap_regs, u64::MAX).map_err(err)?;
        child.map_err(err)
    }
}

impl Drop for Template {
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
