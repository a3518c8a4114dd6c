//! Putting a checkpointed process's state into a freshly created process (stopped under us): session
//! and process group, fds, threads, per-thread state, signals, timers, and finally the registers.
//!
//! Nothing runs until [`NewProcess::release`]: a tree is released only once every process is complete.

use nix::unistd::Pid;

use crate::files::FdPlan;
use crate::mm::{self, PageSource};
use crate::pidns::{PidNsError, PidSetter};
use crate::procfs::{self, ProcError};
use crate::ptrace::{self, Injector, PtraceError, Scratch, Waiting};
use crate::state::{Creds, ProcessState, SigAction, SigInfo, ThreadState};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("restoring from a template")]
    Template(#[from] crate::template::TemplateError),
    #[error("restoring process {pid}")]
    Ptrace {
        pid: i32,
        #[source]
        source: PtraceError,
    },
    #[error("restoring process {pid}")]
    Proc {
        pid: i32,
        #[source]
        source: ProcError,
    },
    #[error("restoring process {pid}: choosing pid {want}")]
    PidNs {
        pid: i32,
        want: i32,
        #[source]
        source: PidNsError,
    },
    #[error("restoring fds")]
    Pass(#[from] crate::fdpass::PassError),
    #[error("restoring process {pid}: got pid {got} instead of {want} (is it still in use?)")]
    WrongPid { pid: i32, want: i32, got: i32 },
    #[error("restoring the memory of process {pid}")]
    Memory {
        pid: i32,
        #[source]
        source: mm::MmError,
    },
    #[error("restoring process {pid}, fd {fd}: {reason}")]
    File { pid: i32, fd: i32, reason: String },
    #[error("restoring process {pid}, fd {fd}: cannot {what}")]
    FileIo {
        pid: i32,
        fd: i32,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) const SCRATCH_LEN: usize = 64 * 1024;
const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;
const PR_SET_PDEATHSIG: u64 = 1;
const PR_SET_DUMPABLE: u64 = 4;
const PR_SET_CHILD_SUBREAPER: u64 = 36;

/// How often a pid that is not free yet is retried (see [`create_with_pid`]).
const PID_ATTEMPTS: u32 = 2000;
const PID_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_micros(50);

/// Creates a task (with `make`) that must get pid `want` in the sandbox. The kernel releases a reaped
/// task's pid only after its parent's wait returned (after dropping tasklist_lock), so the pids of a tree
/// we just killed can stay taken for a moment: a task that got another pid is discarded and we retry.
pub fn create_with_pid<C>(
    pids: &mut PidSetter,
    want: i32,
    owner: i32,
    mut make: impl FnMut(&mut C) -> Result<Pid, RestoreError>,
    mut discard: impl FnMut(&mut C, Pid) -> Result<(), RestoreError>,
    ctx: &mut C,
) -> Result<Pid, RestoreError> {
    let mut got = 0;
    for _ in 0..PID_ATTEMPTS {
        pids.set_next(want).map_err(|source| RestoreError::PidNs { pid: owner, want, source })?;
        let task = make(ctx)?;
        got = ns_pid_of(task).map_err(|source| RestoreError::Proc { pid: owner, source })?;
        if got == want {
            return Ok(task);
        }
        discard(ctx, task)?;
        std::thread::sleep(PID_RETRY_PAUSE);
    }
    Err(RestoreError::WrongPid { pid: owner, want, got })
}

/// Reads the pid of a host task inside its own pid namespace.
pub fn ns_pid_of(host: Pid) -> Result<i32, ProcError> {
    procfs::Status::read(host)?.innermost("NSpid")
}

/// A process being restored, stopped, with an injector on each of its threads (leader first).
pub struct NewProcess {
    pub host: Pid,
    pub ns_pid: i32,
    gadget: u64,
    threads: Vec<(Injector, i32)>,
    /// Threads whose final state is loaded (after `finish`).
    threads_done: Vec<Pid>,
    scratch: Option<Scratch>,
    /// Put back into job-control stop when released.
    job_stopped: bool,
    /// Set once the process runs on its own (or became a zombie); until then dropping kills it.
    released: bool,
    /// Its TCP connections, in repair mode until the whole tree is restored.
    pub(crate) repaired_tcp: Vec<crate::files::RepairedTcp>,
}

impl NewProcess {
    /// Takes over a just-created process (stopped, traced) that must have pid `want` in its namespace.
    pub fn take(host: Pid, want: i32, gadget: u64) -> Result<NewProcess, RestoreError> {
        let inj = Injector::new(host, host, gadget).map_err(|source| RestoreError::Ptrace { pid: want, source })?;
        let mut np = NewProcess {
            host,
            ns_pid: want,
            gadget,
            threads: vec![(inj, want)],
            threads_done: Vec::new(),
            scratch: None,
            job_stopped: false,
            repaired_tcp: Vec::new(),
            released: false,
        };
        let scratch = Scratch::map(np.leader(), SCRATCH_LEN).map_err(np.perr())?;
        np.scratch = Some(scratch);
        Ok(np)
    }

    /// The syscall instruction used to inject into this process (and its forks: same vdso address).
    pub fn gadget(&self) -> u64 {
        self.gadget
    }

    pub(crate) fn leader(&mut self) -> &mut Injector {
        &mut self.threads[0].0
    }

    pub(crate) fn perr(&self) -> impl FnOnce(PtraceError) -> RestoreError {
        let pid = self.ns_pid;
        move |source| RestoreError::Ptrace { pid, source }
    }

    pub(crate) fn scratch(&self) -> &Scratch {
        self.scratch.as_ref().expect("scratch is mapped until release")
    }

    /// Gives the process a copy of the tracer's `fd`; returns its number there.
    pub(crate) fn give_fd(&mut self, fd: std::os::fd::BorrowedFd<'_>) -> Result<i32, RestoreError> {
        let scratch = self.scratch.as_ref().expect("scratch is mapped until release");
        Ok(crate::fdpass::give_fd(&mut self.threads[0].0, scratch, fd, 0)?)
    }

    pub(crate) fn call(&mut self, nr: i64, args: &[u64]) -> Result<i64, RestoreError> {
        let e = self.perr();
        self.leader().call(nr, args).map_err(e)
    }

    /// Error for an I/O step on fd `target` of this process.
    pub(crate) fn io_err(&self, target: i32, what: &'static str) -> impl FnOnce(std::io::Error) -> RestoreError {
        let pid = self.ns_pid;
        move |source| RestoreError::FileIo { pid, fd: target, what, source }
    }

    /// Injects a syscall whose failure is reported as `what` on fd `target`.
    pub(crate) fn call_file(
        &mut self,
        target: i32,
        what: &'static str,
        nr: i64,
        args: &[u64],
    ) -> Result<i64, RestoreError> {
        let r = self.leader().syscall(nr, args).map_err(self.perr())?.ret;
        if r < 0 {
            return Err(self.io_err(target, what)(std::io::Error::from_raw_os_error(-r as i32)));
        }
        Ok(r)
    }

    /// Makes the process the leader of a new session (when it led one at checkpoint time).
    pub fn set_session_leader(&mut self) -> Result<(), RestoreError> {
        self.call(libc::SYS_setsid, &[]).map(drop)
    }

    /// Moves the process into process group `pgid` (its own when `pgid` is its pid).
    pub fn set_process_group(&mut self, pgid: i32) -> Result<(), RestoreError> {
        let target = if pgid == self.ns_pid { 0 } else { pgid as u64 };
        self.call(libc::SYS_setpgid, &[0, target]).map(drop)
    }
    /// Process-wide state that fork does not carry over, plus what our templates changed.
    pub fn restore_process_misc(&mut self, st: &ProcessState) -> Result<(), RestoreError> {
        let dumpable = if st.dumpable == 1 { 1 } else { 0 };
        self.call(libc::SYS_prctl, &[PR_SET_DUMPABLE, dumpable])?;
        procfs::write_int(self.host, "oom_score_adj", st.oom_score_adj as i64)
            .map_err(|source| RestoreError::Proc { pid: self.ns_pid, source })?;
        for (which, t) in st.itimers.iter().enumerate() {
            if t.value_us == 0 {
                continue;
            }
            let mut b = Vec::with_capacity(32);
            for us in [t.interval_us, t.value_us] {
                b.extend_from_slice(&(us / 1_000_000).to_ne_bytes());
                b.extend_from_slice(&(us % 1_000_000).to_ne_bytes());
            }
            let addr = self.scratch().write(0, &b).map_err(self.perr())?;
            self.call(libc::SYS_setitimer, &[which as u64, addr, 0])?;
        }
        if st.pdeath_signal != 0 {
            self.call(libc::SYS_prctl, &[PR_SET_PDEATHSIG, st.pdeath_signal as u64])?;
        }
        if st.child_subreaper {
            self.call(libc::SYS_prctl, &[PR_SET_CHILD_SUBREAPER, 1])?;
        }
        Ok(())
    }

    /// Creates the process's other threads with their tids (chosen through `pids`).
    pub fn create_threads(&mut self, st: &ProcessState, pids: &mut PidSetter) -> Result<(), RestoreError> {
        for t in st.threads.iter().skip(1) {
            let tid = create_with_pid(
                pids,
                t.tid,
                self.ns_pid,
                |np: &mut Self| np.clone_thread(),
                |np: &mut Self, wrong| np.discard_thread(wrong),
                self,
            )?;
            let inj = Injector::new(self.host, tid, self.gadget).map_err(self.perr())?;
            self.threads.push((inj, t.tid));
        }
        Ok(())
    }

    fn clone_thread(&mut self) -> Result<Pid, RestoreError> {
        let e = self.perr();
        self.leader().clone_task(CLONE_THREAD_FLAGS, "creating a thread").map_err(e)
    }

    /// Ends a thread created with the wrong tid (exit ends just the calling thread).
    fn discard_thread(&mut self, tid: Pid) -> Result<(), RestoreError> {
        let mut inj = Injector::new(self.host, tid, self.gadget).map_err(self.perr())?;
        inj.syscall(libc::SYS_exit, &[0]).map_err(self.perr())?;
        Ok(())
    }

    /// Per-thread kernel state: rseq, robust list, tid address, alternate stack, pending signals, name.
    pub fn restore_thread_state(&mut self, st: &ProcessState) -> Result<(), RestoreError> {
        let scratch = self.scratch.take().expect("scratch is mapped until release");
        let res = self.restore_thread_state_with(st, &scratch);
        self.scratch = Some(scratch);
        res
    }

    fn restore_thread_state_with(&mut self, st: &ProcessState, scratch: &Scratch) -> Result<(), RestoreError> {
        let pid = self.ns_pid;
        let perr = |source| RestoreError::Ptrace { pid, source };
        for ((inj, _), t) in self.threads.iter_mut().zip(&st.threads) {
            if let Some(r) = t.rseq {
                inj.call(libc::SYS_rseq, &[r.addr, r.len as u64, 0, r.sig as u64]).map_err(perr)?;
            }
            if t.robust_list.0 != 0 {
                inj.call(libc::SYS_set_robust_list, &[t.robust_list.0, t.robust_list.1]).map_err(perr)?;
            }
            inj.call(libc::SYS_set_tid_address, &[t.clear_child_tid]).map_err(perr)?;
            let mut ss = Vec::with_capacity(24);
            ss.extend_from_slice(&t.altstack.sp.to_ne_bytes());
            ss.extend_from_slice(&(t.altstack.flags & !libc::SS_ONSTACK).to_ne_bytes());
            ss.extend_from_slice(&0u32.to_ne_bytes());
            ss.extend_from_slice(&t.altstack.size.to_ne_bytes());
            let addr = scratch.write(0, &ss).map_err(perr)?;
            inj.call(libc::SYS_sigaltstack, &[addr, 0]).map_err(perr)?;
            requeue_thread_signals(inj, scratch, pid, t, &t.pending).map_err(perr)?;
            // Only a thread can rename itself (writing another task's comm file is EINVAL).
            let mut name = t.comm.as_bytes().to_vec();
            name.truncate(15);
            name.push(0);
            let addr = scratch.write(0, &name).map_err(perr)?;
            inj.call(libc::SYS_prctl, &[libc::PR_SET_NAME as u64, addr]).map_err(perr)?;
        }
        Ok(())
    }

    /// Last steps before the process may run: drop the SIGCHLDs our re-created zombie children sent,
    /// re-queue the process's pending signals, close the temporary fds, install the seccomp filters the
    /// process added over those it inherited (`inherited_filters`; last, as they may forbid what we
    /// inject), unmap our scratch memory, and load registers, FPU state and signal masks. The process
    /// stays stopped until [`NewProcess::release`].
    pub fn finish(
        &mut self,
        st: &ProcessState,
        plan: &FdPlan,
        made_zombies: bool,
        inherited_filters: usize,
    ) -> Result<(), RestoreError> {
        if made_zombies {
            self.drop_pending_sigchld()?;
        }
        for info in &st.shared_pending {
            let addr = self.scratch().write(0, &info.0).map_err(self.perr())?;
            self.call(libc::SYS_rt_sigqueueinfo, &[self.ns_pid as u64, info.signo() as u64, addr])?;
        }
        if plan.count > 0 {
            let last = (plan.base + plan.count - 1) as u64;
            self.call(libc::SYS_close_range, &[plan.base as u64, last, 0])?;
        }
        // POSIX locks belong to the process and go away when it closes any fd of the file (such as
        // the temporary ones just closed): take them last.
        self.restore_posix_locks(&st.fds)?;
        for filter in st.seccomp.iter().skip(inherited_filters) {
            self.install_seccomp(filter)?;
        }
        if let Some(scratch) = self.scratch.take() {
            let e = self.perr();
            scratch.free(self.leader()).map_err(e)?;
        }
        let pid = self.ns_pid;
        let perr = |source| RestoreError::Ptrace { pid, source };
        for ((inj, _), t) in self.threads.iter().zip(&st.threads) {
            ptrace::set_xstate(inj.tid(), &t.xstate).map_err(perr)?;
        }
        for ((inj, _), t) in std::mem::take(&mut self.threads).into_iter().zip(&st.threads) {
            let tid = inj.tid();
            inj.finish_with(&t.regs.to_regs(), t.sigmask).map_err(perr)?;
            self.threads_done.push(tid);
        }
        self.job_stopped = st.job_stopped;
        Ok(())
    }

    fn drop_pending_sigchld(&mut self) -> Result<(), RestoreError> {
        let mut block = Vec::with_capacity(24);
        block.extend_from_slice(&(1u64 << (libc::SIGCHLD - 1)).to_ne_bytes());
        block.extend_from_slice(&[0u8; 16]); // timespec {0, 0}: poll
        let set = self.scratch().write(0, &block).map_err(self.perr())?;
        loop {
            let r = self.leader().syscall(libc::SYS_rt_sigtimedwait, &[set, 0, set + 8, 8]).map_err(self.perr())?;
            if r.ret < 0 {
                return Ok(());
            }
        }
    }

    fn install_seccomp(&mut self, filter: &[u8]) -> Result<(), RestoreError> {
        const SECCOMP_SET_MODE_FILTER: u64 = 1;
        let prog_off = filter.len().next_multiple_of(8);
        let mut block = filter.to_vec();
        block.resize(prog_off, 0);
        let insns = (filter.len() / 8) as u16;
        block.extend_from_slice(&insns.to_ne_bytes());
        block.extend_from_slice(&[0u8; 6]);
        block.extend_from_slice(&self.scratch().addr.to_ne_bytes());
        let base = self.scratch().write(0, &block).map_err(self.perr())?;
        self.call(libc::SYS_seccomp, &[SECCOMP_SET_MODE_FILTER, 0, base + prog_off as u64]).map(drop)
    }

    /// Creates a child of this (stopped) process by an injected `clone(flags)` (a fork: the exit signal,
    /// maybe CLONE_PARENT); the child has pid `want` (chosen with the pid helper) and is returned
    /// stopped and traced.
    pub fn fork_child(&mut self, pids: &mut PidSetter, want: i32, flags: u64) -> Result<Pid, RestoreError> {
        self.clone_with_pid(pids, want, flags, "forking a child")
    }

    /// Injects `clone(flags)` so that the new task gets pid `want` (see [`create_with_pid`]).
    fn clone_with_pid(
        &mut self,
        pids: &mut PidSetter,
        want: i32,
        flags: u64,
        what: &'static str,
    ) -> Result<Pid, RestoreError> {
        create_with_pid(
            pids,
            want,
            want,
            |np: &mut Self| {
                let e = np.perr();
                np.leader().clone_task(flags, what).map_err(e)
            },
            |_, wrong| {
                Self::kill_host(wrong);
                Ok(())
            },
            self,
        )
    }

    /// Creates a helper task with pid `want`: a child of this process's parent (init) in this process's
    /// session and process group, sharing this process's memory (nothing is copied; the helper runs
    /// nothing but injected syscalls that touch no memory).
    pub fn clone_helper(&mut self, pids: &mut PidSetter, want: i32) -> Result<Helper, RestoreError> {
        let flags = (libc::CLONE_VM | libc::CLONE_PARENT) as u64;
        let host = self.clone_with_pid(pids, want, flags, "creating a helper")?;
        match Injector::new(host, host, self.gadget) {
            Ok(inj) => Ok(Helper { inj: Some(inj), host, ns_pid: want }),
            Err(source) => {
                Self::kill_host(host);
                Err(RestoreError::Ptrace { pid: want, source })
            }
        }
    }

    /// Closes every fd (a helper or a fork of init holds nothing of its own).
    pub fn close_all_fds(&mut self) -> Result<(), RestoreError> {
        self.call(libc::SYS_close_range, &[0, u32::MAX as u64, 0]).map(drop)
    }

    /// Unmaps our scratch memory now: a helper that shares another process's memory must not leave it
    /// there, nor hand it down to the processes it forks.
    pub fn free_scratch(&mut self) -> Result<(), RestoreError> {
        if let Some(scratch) = self.scratch.take() {
            let e = self.perr();
            scratch.free(self.leader()).map_err(e)?;
        }
        Ok(())
    }

    /// Ends a helper made with [`NewProcess::take`] (e.g. one that re-created a session): it exits, and
    /// its parent (init) reaps it.
    pub fn exit_helper(mut self) -> Result<(), RestoreError> {
        let e = self.perr();
        self.leader().syscall(libc::SYS_exit, &[0]).map_err(e)?;
        self.released = true;
        Ok(())
    }

    /// Replaces the address space (a copy of the parent's) with the checkpointed one.
    pub fn rebuild_memory(
        &mut self,
        st: &ProcessState,
        src: &mut dyn PageSource,
        lazy: Option<&mm::LazyRestore<'_>>,
    ) -> Result<u64, RestoreError> {
        let scratch = self.scratch.take().expect("scratch is mapped until finish");
        let pid = self.ns_pid;
        let (new, on_demand) = mm::rebuild(&mut self.threads[0].0, pid, scratch, &st.mm, &st.vmas, src, lazy)
            .map_err(|source| RestoreError::Memory { pid, source })?;
        self.gadget = self.threads[0].0.gadget();
        self.scratch = Some(new);
        Ok(on_demand)
    }

    /// Changes the process's working directory to `cwd` (a path inside the sandbox).
    pub fn enter_cwd(&mut self, cwd: &str) -> Result<(), RestoreError> {
        let mut path = cwd.as_bytes().to_vec();
        path.push(0);
        let addr = self.scratch().write(0, &path).map_err(self.perr())?;
        self.call(libc::SYS_chdir, &[addr])?;
        Ok(())
    }

    /// What a fork from the parent plus exec did not give the process: signal handlers, umask, cwd,
    /// personality, limits, and (when they differ from the parent's) credentials.
    /// `parent_actions`, when known, are the signal actions of the process it was forked from: exec
    /// left each of them ignored if it was, else default, with no flags, mask or restorer, and only
    /// the actions that differ from that are set (most programs change few).
    pub fn restore_static(
        &mut self,
        st: &ProcessState,
        parent_creds: &Creds,
        parent_actions: Option<&[SigAction]>,
    ) -> Result<(), RestoreError> {
        for (i, a) in st.sigactions.iter().enumerate() {
            let sig = i as u64 + 1;
            if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
                continue;
            }
            let after_exec = parent_actions.map(|p| {
                let ignored = p.get(i).is_some_and(|pa| pa.handler == libc::SIG_IGN as u64);
                SigAction {
                    handler: if ignored { libc::SIG_IGN } else { libc::SIG_DFL } as u64,
                    ..SigAction::default()
                }
            });
            if after_exec.as_ref() == Some(a) {
                continue;
            }
            let mut b = Vec::with_capacity(32);
            for w in [a.handler, a.flags, a.restorer, a.mask] {
                b.extend_from_slice(&w.to_ne_bytes());
            }
            let addr = self.scratch().write(0, &b).map_err(self.perr())?;
            self.call(libc::SYS_rt_sigaction, &[sig, addr, 0, 8])?;
        }
        self.call(libc::SYS_umask, &[st.umask as u64])?;
        // Only when it differs: a Docker-like seccomp filter allows few personality values.
        // personality(0xffffffff) queries without changing.
        let current = self.call(libc::SYS_personality, &[0xffff_ffff])? as u32;
        if current != st.personality {
            self.call(libc::SYS_personality, &[st.personality as u64])?;
        }
        self.enter_cwd(&st.cwd)?;
        let current = procfs::limits(self.host).map_err(|source| RestoreError::Proc { pid: self.ns_pid, source })?;
        for (res, &(cur, max)) in st.rlimits.iter().enumerate() {
            // Only limits that differ: raising a hard limit needs CAP_SYS_RESOURCE.
            let now = current.get(res).copied().unwrap_or((0, 0));
            if now == (cur, max) {
                continue;
            }
            let mut b = Vec::with_capacity(16);
            b.extend_from_slice(&cur.to_ne_bytes());
            b.extend_from_slice(&max.to_ne_bytes());
            let addr = self.scratch().write(0, &b).map_err(self.perr())?;
            self.call(libc::SYS_prlimit64, &[0, res as u64, addr, 0])?;
        }
        if &st.creds != parent_creds {
            self.restore_creds(&st.creds, parent_creds)?;
        }
        Ok(())
    }

    /// Changes credentials and capabilities to `c` (which the parent's allow: a process can only drop).
    fn restore_creds(&mut self, c: &Creds, from: &Creds) -> Result<(), RestoreError> {
        const PR_SET_KEEPCAPS: u64 = 8;
        const PR_CAPBSET_DROP: u64 = 24;
        const PR_CAP_AMBIENT: u64 = 47;
        const PR_CAP_AMBIENT_RAISE: u64 = 2;
        const PR_CAP_AMBIENT_CLEAR_ALL: u64 = 4;
        const PR_SET_NO_NEW_PRIVS: u64 = 38;
        const LAST_CAP: u64 = 40;
        for cap in 0..=LAST_CAP {
            if c.cap_bounding & (1 << cap) == 0 && from.cap_bounding & (1 << cap) != 0 {
                self.call(libc::SYS_prctl, &[PR_CAPBSET_DROP, cap])?;
            }
        }
        // setgroups only when the list changed: it is refused in user namespaces with
        // setgroups=deny.
        if c.groups != from.groups {
            let mut groups = Vec::with_capacity(c.groups.len() * 4);
            for g in &c.groups {
                groups.extend_from_slice(&g.to_ne_bytes());
            }
            let addr = if groups.is_empty() { 0 } else { self.scratch().write(0, &groups).map_err(self.perr())? };
            self.call(libc::SYS_setgroups, &[c.groups.len() as u64, addr])?;
        }
        self.call(libc::SYS_setresgid, &[c.gids[0] as u64, c.gids[1] as u64, c.gids[2] as u64])?;
        self.call(libc::SYS_setfsgid, &[c.gids[3] as u64])?;
        self.call(libc::SYS_prctl, &[PR_SET_KEEPCAPS, 1])?;
        self.call(libc::SYS_setresuid, &[c.uids[0] as u64, c.uids[1] as u64, c.uids[2] as u64])?;
        self.call(libc::SYS_setfsuid, &[c.uids[3] as u64])?;
        self.call(libc::SYS_prctl, &[PR_SET_KEEPCAPS, 0])?;
        // capset(v3): header {version, pid}, then two {effective, permitted, inheritable} u32 triples.
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(&0x2008_0522u32.to_ne_bytes());
        b.extend_from_slice(&0i32.to_ne_bytes());
        for half in [0, 32] {
            for set in [c.cap_effective, c.cap_permitted, c.cap_inheritable] {
                b.extend_from_slice(&((set >> half) as u32).to_ne_bytes());
            }
        }
        let addr = self.scratch().write(0, &b).map_err(self.perr())?;
        self.call(libc::SYS_capset, &[addr, addr + 8])?;
        self.call(libc::SYS_prctl, &[PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0])?;
        for cap in 0..=LAST_CAP {
            if c.cap_ambient & (1 << cap) != 0 {
                self.call(libc::SYS_prctl, &[PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0])?;
            }
        }
        if c.no_new_privs {
            self.call(libc::SYS_prctl, &[PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0])?;
        }
        Ok(())
    }

    /// Turns this new process into the zombie it was: it exits with `exit_status` (a raw wait status)
    /// and stays unreaped because its parent is still stopped.
    pub fn become_zombie(mut self, comm: &str, exit_status: i32) -> Result<(), RestoreError> {
        let mut name = comm.as_bytes().to_vec();
        name.truncate(15);
        name.push(0);
        let addr = self.scratch().write(0, &name).map_err(self.perr())?;
        self.call(libc::SYS_prctl, &[libc::PR_SET_NAME as u64, addr])?;
        let termsig = exit_status & 0x7f;
        if termsig == 0 {
            self.call(libc::SYS_exit_group, &[((exit_status >> 8) & 0xff) as u64])?;
            self.released = true;
            return Ok(());
        }
        // Killed by a signal: default action, no core file, then let the signal through on detach.
        self.call(libc::SYS_rt_sigaction, &[termsig as u64, 0, 0, 8]).map(drop).or_else(|_| {
            let addr = self.scratch().write(0, &[0u8; 32]).map_err(self.perr())?;
            self.call(libc::SYS_rt_sigaction, &[termsig as u64, addr, 0, 8]).map(drop)
        })?;
        let zero = self.scratch().write(0, &[0u8; 16]).map_err(self.perr())?;
        self.call(libc::SYS_prlimit64, &[0, libc::RLIMIT_CORE as u64, zero, 0])?;
        let (inj, _) = self.threads.remove(0);
        let tid = inj.tid();
        let pid = self.ns_pid;
        let regs = *inj.orig_regs();
        inj.finish_with(&regs, 0).map_err(|source| RestoreError::Ptrace { pid, source })?;
        let sig = nix::sys::signal::Signal::try_from(termsig).map_err(|e| RestoreError::Ptrace {
            pid,
            source: PtraceError::Request { op: "signal number", tid: tid.as_raw(), source: e.into() },
        })?;
        ptrace::detach(tid, Some(sig)).map_err(|source| RestoreError::Ptrace { pid, source })?;
        self.released = true;
        Ok(())
    }

    /// Lets the process run.
    pub fn release(mut self) -> Result<(), RestoreError> {
        // A process that was in job-control stop is stopped again (its parent sees the stop again).
        let sig = self.job_stopped.then_some(nix::sys::signal::Signal::SIGSTOP);
        for (i, tid) in self.threads_done.iter().enumerate() {
            ptrace::detach(*tid, if i == 0 { sig } else { None })
                .map_err(|source| RestoreError::Ptrace { pid: self.ns_pid, source })?;
        }
        self.released = true;
        Ok(())
    }

    /// Kills a traced process we created and collects its exit.
    pub fn kill_host(host: Pid) {
        let _ = nix::sys::signal::kill(host, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(host, Some(nix::sys::wait::WaitPidFlag::__WALL));
    }

    /// Kills the half-restored process and collects the exit of each of its (traced) threads.
    fn kill(&mut self) {
        use nix::sys::wait::{waitpid, WaitPidFlag};
        let _ = nix::sys::signal::kill(self.host, nix::sys::signal::Signal::SIGKILL);
        let tids: Vec<Pid> =
            self.threads.iter().map(|(inj, _)| inj.tid()).chain(self.threads_done.iter().copied()).collect();
        for tid in tids.iter().filter(|t| **t != self.host) {
            let _ = waitpid(*tid, Some(WaitPidFlag::__WALL));
        }
        let _ = waitpid(self.host, Some(WaitPidFlag::__WALL));
    }
}

impl Drop for NewProcess {
    fn drop(&mut self) {
        if !self.released {
            self.kill();
        }
    }
}

/// A helper task that holds a pid for a moment during a restore: it re-creates a process group whose
/// leader has exited, so that the restored members can join it, and exits before anything runs (its
/// parent, init, reaps it). Killed if dropped before [`Helper::exit`].
pub struct Helper {
    inj: Option<Injector>,
    host: Pid,
    ns_pid: i32,
}

impl Helper {
    fn injector(&mut self) -> &mut Injector {
        self.inj.as_mut().expect("a helper has its injector until it exits")
    }

    /// Makes the helper the leader of a new process group with its pid.
    pub fn lead_group(&mut self) -> Result<(), RestoreError> {
        let pid = self.ns_pid;
        self.injector().call(libc::SYS_setpgid, &[0, 0]).map_err(|source| RestoreError::Ptrace { pid, source })?;
        Ok(())
    }

    pub fn exit(mut self) -> Result<(), RestoreError> {
        let pid = self.ns_pid;
        self.injector().syscall(libc::SYS_exit, &[0]).map_err(|source| RestoreError::Ptrace { pid, source })?;
        self.inj = None;
        Ok(())
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if self.inj.is_some() {
            NewProcess::kill_host(self.host);
        }
    }
}

fn requeue_thread_signals(
    inj: &mut Injector,
    scratch: &Scratch,
    tgid: i32,
    t: &ThreadState,
    pending: &[SigInfo],
) -> Result<(), PtraceError> {
    for info in pending {
        let addr = scratch.write(0, &info.0)?;
        inj.call(libc::SYS_rt_tgsigqueueinfo, &[tgid as u64, t.tid as u64, info.signo() as u64, addr])?;
    }
    Ok(())
}

/// A process forked from the sandbox's init to be turned into a restored process.
pub struct InitFork {
    pub child: Pid,
    /// Syscall instruction in the child (its vdso is init's).
    pub gadget: u64,
    /// init's credentials (the child starts with them).
    pub creds: Creds,
    /// How many seccomp filters init has (the child inherits them).
    pub filters: usize,
}

/// Forks a child of the sandbox's init (host pid `init`) with pid `want`, by briefly taking over
/// init's main thread. Used for processes whose parent is init when no template exists.
pub fn fork_from_init(init: Pid, pids: &mut PidSetter, want: i32) -> Result<InitFork, RestoreError> {
    let perr = |source| RestoreError::Ptrace { pid: want, source };
    ptrace::seize(init).map_err(perr)?;
    let res = (|| {
        ptrace::interrupt(init).map_err(perr)?;
        ptrace::wait_stop(init, Waiting::Poll, "forking from init").map_err(perr)?;
        let gadget = ptrace::find_syscall_gadget(init).map_err(perr)?;
        let creds = crate::capture::read_creds(init).map_err(|source| RestoreError::Proc { pid: want, source })?;
        let filters = ptrace::seccomp_filters(init).map_err(perr)?.len();
        let mut inj = Injector::new(init, init, gadget).map_err(perr)?.waiting(Waiting::Poll);
        let child = create_with_pid(
            pids,
            want,
            want,
            |inj: &mut Injector| inj.clone_task(libc::SIGCHLD as u64, "forking from init").map_err(perr),
            |_, wrong| {
                NewProcess::kill_host(wrong);
                Ok(())
            },
            &mut inj,
        );
        inj.finish().map_err(perr)?;
        Ok(InitFork { child: child?, gadget, creds, filters })
    })();
    ptrace::detach(init, None).map_err(perr)?;
    res
}
