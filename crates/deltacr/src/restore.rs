//! Putting a checkpointed process's state into a freshly created process (stopped under us): session
//! and process group, fds, threads, per-thread state, signals, timers, and finally the registers.
//!
//! Nothing runs until [`NewProcess::release`]: a tree is released only once every process is complete.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use nix::fcntl::{fcntl, FcntlArg};
use nix::unistd::Pid;

use crate::pidns::{PidNsError, PidSetter};
use crate::procfs::{self, ProcError};
use crate::ptrace::{self, Injector, PtraceError, Scratch};
use crate::state::{FileKind, OpenFile, ProcessState, SigInfo, ThreadState};
use crate::sys;

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
    #[error("restoring process {pid}: got pid {got} instead of {want} (is it still in use?)")]
    WrongPid { pid: i32, want: i32, got: i32 },
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

const SCRATCH_LEN: usize = 64 * 1024;
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
        pids.set_next(want).map_err(|source| RestoreError::PidNs {
            pid: owner,
            want,
            source,
        })?;
        let task = make(ctx)?;
        got = ns_pid_of(task).map_err(|source| RestoreError::Proc { pid: owner, source })?;
        if got == want {
            return Ok(task);
        }
        discard(ctx, task)?;
        std::thread::sleep(PID_RETRY_PAUSE);
    }
    Err(RestoreError::WrongPid {
        pid: owner,
        want,
        got,
    })
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
}

impl NewProcess {
    /// Takes over a just-created process (stopped, traced) that must have pid `want` in its namespace.
    pub fn take(host: Pid, want: i32, gadget: u64) -> Result<NewProcess, RestoreError> {
        let inj = Injector::new(host, host, gadget)
            .map_err(|source| RestoreError::Ptrace { pid: want, source })?;
        let mut np = NewProcess {
            host,
            ns_pid: want,
            gadget,
            threads: vec![(inj, want)],
            threads_done: Vec::new(),
            scratch: None,
        };
        let scratch = Scratch::map(np.leader(), SCRATCH_LEN).map_err(np.perr())?;
        np.scratch = Some(scratch);
        Ok(np)
    }

    fn leader(&mut self) -> &mut Injector {
        &mut self.threads[0].0
    }

    fn perr(&self) -> impl FnOnce(PtraceError) -> RestoreError {
        let pid = self.ns_pid;
        move |source| RestoreError::Ptrace { pid, source }
    }

    fn scratch(&self) -> &Scratch {
        self.scratch
            .as_ref()
            .expect("scratch is mapped until release")
    }

    fn call(&mut self, nr: i64, args: &[u64]) -> Result<i64, RestoreError> {
        let e = self.perr();
        self.leader().call(nr, args).map_err(e)
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

    /// Opens every fd of the process (the process starts with none).
    pub fn restore_fds(
        &mut self,
        st: &ProcessState,
        files: &[OpenFile],
    ) -> Result<(), RestoreError> {
        let base = st
            .fds
            .iter()
            .map(|f| f.fd)
            .max()
            .map_or(0, |m| m + 1)
            .max(3) as u64;
        let mut temps: HashMap<u32, i32> = HashMap::new();
        let mut pipes: HashMap<u64, (i32, i32)> = HashMap::new();
        for fd in &st.fds {
            if temps.contains_key(&fd.file) {
                continue;
            }
            let of = &files[fd.file as usize];
            let tmp = match &of.kind {
                FileKind::Path {
                    path,
                    dev,
                    inode,
                    mode,
                } => self.open_path(fd.fd, of, path, (*dev, *inode, *mode), base)?,
                FileKind::Pipe {
                    pipe,
                    write_end,
                    data,
                } => {
                    let ends = match pipes.get(pipe) {
                        Some(&ends) => ends,
                        None => {
                            let ends = self.make_pipe(base)?;
                            pipes.insert(*pipe, ends);
                            ends
                        }
                    };
                    if !data.is_empty() {
                        self.fill_pipe(fd.fd, ends.1, data)?;
                    }
                    let tmp = if *write_end { ends.1 } else { ends.0 };
                    let settable = of.flags & (libc::O_NONBLOCK | libc::O_DIRECT | libc::O_ASYNC);
                    self.call(
                        libc::SYS_fcntl,
                        &[tmp as u64, libc::F_SETFL as u64, settable as u64],
                    )?;
                    tmp
                }
            };
            temps.insert(fd.file, tmp);
        }
        for fd in &st.fds {
            let tmp = temps[&fd.file];
            let flags = if fd.cloexec {
                libc::O_CLOEXEC as u64
            } else {
                0
            };
            self.call(libc::SYS_dup3, &[tmp as u64, fd.fd as u64, flags])?;
        }
        let mut all: Vec<i32> = temps
            .values()
            .copied()
            .chain(pipes.values().flat_map(|&(r, w)| [r, w]))
            .collect();
        all.sort();
        all.dedup();
        for tmp in all {
            self.call(libc::SYS_close, &[tmp as u64])?;
        }
        Ok(())
    }

    fn move_high(&mut self, fd: i64, base: u64) -> Result<i32, RestoreError> {
        let high = self.call(libc::SYS_fcntl, &[fd as u64, libc::F_DUPFD as u64, base])?;
        self.call(libc::SYS_close, &[fd as u64])?;
        Ok(high as i32)
    }

    fn open_path(
        &mut self,
        target: i32,
        of: &OpenFile,
        path: &str,
        (dev, inode, mode): (u64, u64, u32),
        base: u64,
    ) -> Result<i32, RestoreError> {
        let mut cpath = path.as_bytes().to_vec();
        cpath.push(0);
        if cpath.len() > SCRATCH_LEN {
            return Err(RestoreError::File {
                pid: self.ns_pid,
                fd: target,
                reason: format!("path too long: {path}"),
            });
        }
        let addr = self.scratch().write(0, &cpath).map_err(self.perr())?;
        let flags = of.flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
        let raw = self.leader().syscall(
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, addr, flags as u64, 0],
        );
        let raw = raw.map_err(self.perr())?.ret;
        if raw < 0 {
            return Err(RestoreError::FileIo {
                pid: self.ns_pid,
                fd: target,
                what: "reopen the file",
                source: std::io::Error::from_raw_os_error(-raw as i32),
            });
        }
        let tmp = self.move_high(raw, base)?;
        let meta =
            std::fs::metadata(format!("/proc/{}/fd/{tmp}", self.host)).map_err(|source| {
                RestoreError::FileIo {
                    pid: self.ns_pid,
                    fd: target,
                    what: "stat the reopened file",
                    source,
                }
            })?;
        if (meta.dev(), meta.ino()) != (dev, inode) {
            return Err(RestoreError::File {
                pid: self.ns_pid,
                fd: target,
                reason: format!(
                    "{path} is another file than at checkpoint time (inode {} vs {inode})",
                    meta.ino()
                ),
            });
        }
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFREG || kind == libc::S_IFDIR {
            self.call(
                libc::SYS_lseek,
                &[tmp as u64, of.pos, libc::SEEK_SET as u64],
            )?;
        }
        Ok(tmp)
    }

    fn make_pipe(&mut self, base: u64) -> Result<(i32, i32), RestoreError> {
        let addr = self.scratch().addr;
        self.call(libc::SYS_pipe2, &[addr, 0])?;
        let b = self.scratch().read(0, 8).map_err(self.perr())?;
        let r = i32::from_ne_bytes(b[0..4].try_into().expect("4 bytes"));
        let w = i32::from_ne_bytes(b[4..8].try_into().expect("4 bytes"));
        Ok((
            self.move_high(r as i64, base)?,
            self.move_high(w as i64, base)?,
        ))
    }

    fn fill_pipe(&mut self, target: i32, write_end: i32, data: &[u8]) -> Result<(), RestoreError> {
        let io = |what| {
            let pid = self.ns_pid;
            move |source| RestoreError::FileIo {
                pid,
                fd: target,
                what,
                source,
            }
        };
        let pidfd = sys::pidfd_open(self.host).map_err(io("open a pidfd"))?;
        let w = sys::pidfd_getfd(pidfd.as_fd(), write_end).map_err(io("reach the new pipe"))?;
        let size = fcntl(w.as_fd(), FcntlArg::F_GETPIPE_SZ)
            .map_err(|e| io("read the pipe size")(e.into()))?;
        if (size as usize) < data.len() {
            fcntl(w.as_fd(), FcntlArg::F_SETPIPE_SZ(data.len() as i32))
                .map_err(|e| io("grow the pipe")(e.into()))?;
        }
        std::fs::File::from(w)
            .write_all(data)
            .map_err(io("refill the pipe"))
    }

    /// Process-wide state that fork does not carry over, plus what our templates changed.
    pub fn restore_process_misc(&mut self, st: &ProcessState) -> Result<(), RestoreError> {
        let dumpable = if st.dumpable == 1 { 1 } else { 0 };
        self.call(libc::SYS_prctl, &[PR_SET_DUMPABLE, dumpable])?;
        procfs::write_int(self.host, "oom_score_adj", st.oom_score_adj as i64).map_err(
            |source| RestoreError::Proc {
                pid: self.ns_pid,
                source,
            },
        )?;
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
            self.call(
                libc::SYS_prctl,
                &[PR_SET_PDEATHSIG, st.pdeath_signal as u64],
            )?;
        }
        if st.child_subreaper {
            self.call(libc::SYS_prctl, &[PR_SET_CHILD_SUBREAPER, 1])?;
        }
        for info in &st.shared_pending {
            let addr = self.scratch().write(0, &info.0).map_err(self.perr())?;
            self.call(
                libc::SYS_rt_sigqueueinfo,
                &[self.ns_pid as u64, info.signo() as u64, addr],
            )?;
        }
        Ok(())
    }

    /// Creates the process's other threads with their tids (chosen through `pids`).
    pub fn create_threads(
        &mut self,
        st: &ProcessState,
        pids: &mut PidSetter,
    ) -> Result<(), RestoreError> {
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
        let res = self
            .leader()
            .syscall(libc::SYS_clone, &[CLONE_THREAD_FLAGS, 0, 0, 0, 0])
            .map_err(self.perr())?;
        res.ok(libc::SYS_clone, self.host).map_err(self.perr())?;
        let tid = res
            .child
            .ok_or_else(|| {
                self.perr()(PtraceError::UnexpectedStop {
                    tid: self.host.as_raw(),
                    status: "no clone event".into(),
                    doing: "creating a thread",
                })
            })?
            .pid;
        ptrace::wait_stop(tid, "restored").map_err(self.perr())?;
        Ok(tid)
    }

    /// Ends a thread created with the wrong tid (exit ends just the calling thread).
    fn discard_thread(&mut self, tid: Pid) -> Result<(), RestoreError> {
        let mut inj = Injector::new(self.host, tid, self.gadget).map_err(self.perr())?;
        inj.syscall(libc::SYS_exit, &[0]).map_err(self.perr())?;
        Ok(())
    }

    /// Per-thread kernel state: rseq, robust list, tid address, alternate stack, pending signals, name.
    pub fn restore_thread_state(&mut self, st: &ProcessState) -> Result<(), RestoreError> {
        let scratch = self
            .scratch
            .take()
            .expect("scratch is mapped until release");
        let res = self.restore_thread_state_with(st, &scratch);
        self.scratch = Some(scratch);
        res
    }

    fn restore_thread_state_with(
        &mut self,
        st: &ProcessState,
        scratch: &Scratch,
    ) -> Result<(), RestoreError> {
        let pid = self.ns_pid;
        let perr = |source| RestoreError::Ptrace { pid, source };
        for ((inj, _), t) in self.threads.iter_mut().zip(&st.threads) {
            if let Some(r) = t.rseq {
                inj.call(libc::SYS_rseq, &[r.addr, r.len as u64, 0, r.sig as u64])
                    .map_err(perr)?;
            }
            if t.robust_list.0 != 0 {
                inj.call(
                    libc::SYS_set_robust_list,
                    &[t.robust_list.0, t.robust_list.1],
                )
                .map_err(perr)?;
            }
            inj.call(libc::SYS_set_tid_address, &[t.clear_child_tid])
                .map_err(perr)?;
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
            inj.call(libc::SYS_prctl, &[libc::PR_SET_NAME as u64, addr])
                .map_err(perr)?;
        }
        Ok(())
    }

    /// Unmaps our scratch memory, loads the final registers, FPU state and signal masks. The process
    /// stays stopped until [`NewProcess::release`].
    pub fn finish(&mut self, st: &ProcessState) -> Result<(), RestoreError> {
        if let Some(scratch) = self.scratch.take() {
            let e = self.perr();
            scratch.free(self.leader()).map_err(e)?;
        }
        let pid = self.ns_pid;
        let perr = |source| RestoreError::Ptrace { pid, source };
        for ((inj, _), t) in self.threads.iter().zip(&st.threads) {
            ptrace::set_xstate(inj.tid(), &t.xstate).map_err(perr)?;
        }
        for ((inj, _), t) in std::mem::take(&mut self.threads)
            .into_iter()
            .zip(&st.threads)
        {
            let tid = inj.tid();
            inj.finish_with(&t.regs.to_regs(), t.sigmask)
                .map_err(perr)?;
            self.threads_done.push(tid);
        }
        Ok(())
    }

    /// Lets the process run.
    pub fn release(self) -> Result<(), RestoreError> {
        for tid in &self.threads_done {
            ptrace::detach(*tid, None).map_err(|source| RestoreError::Ptrace {
                pid: self.ns_pid,
                source,
            })?;
        }
        Ok(())
    }

    /// Kills a traced process we created and collects its exit.
    pub fn kill_host(host: Pid) {
        let _ = nix::sys::signal::kill(host, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(host, Some(nix::sys::wait::WaitPidFlag::__WALL));
    }

    /// Kills the half-restored process.
    pub fn kill(&mut self) {
        Self::kill_host(self.host);
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
        inj.call(
            libc::SYS_rt_tgsigqueueinfo,
            &[tgid as u64, t.tid as u64, info.signo() as u64, addr],
        )?;
    }
    Ok(())
}
