//! The ptrace core: seizing and stopping threads, reading their state and injecting system calls.
//!
//! Every function here must run on the thread that seized the tracee (a ptrace rule).
//!
//! Injection: the tracee's registers are saved, `rip` is pointed at a `syscall` instruction (found in the
//! tracee's vdso), the syscall number and arguments are loaded, and the tracee is stepped with
//! PTRACE_SYSCALL to the syscall-exit stop, where the result is read. While injecting, every signal is
//! blocked with PTRACE_SETSIGMASK (so no signal-delivery stop interrupts the sequence and pending signals
//! stay pending), and `orig_rax` is -1 so the kernel applies no syscall-restart logic to our registers.
//! When the tracee was stopped inside an interrupted system call, the restart fix-up the kernel would have
//! done on the way back to user mode is done by [`restart_fixup`].

use std::io;

use nix::errno::Errno;
use nix::sys::ptrace::{self, Options};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::sys::{self, Regs, SIGINFO_SIZE};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum PtraceError {
    #[error("ptrace {op} on thread {tid} failed")]
    Request {
        op: &'static str,
        tid: i32,
        #[source]
        source: io::Error,
    },
    #[error("thread {tid} exited while it was being {doing}")]
    Exited { tid: i32, doing: &'static str },
    #[error("thread {tid}: unexpected stop {status} while {doing}")]
    UnexpectedStop { tid: i32, status: String, doing: &'static str },
    #[error("process {pid} has no vdso: no syscall instruction to inject with")]
    NoSyscallGadget { pid: i32 },
    #[error("injected syscall {nr} in thread {tid} failed")]
    Syscall {
        nr: i64,
        tid: i32,
        #[source]
        source: io::Error,
    },
}

fn req(op: &'static str, tid: Pid) -> impl FnOnce(Errno) -> PtraceError {
    move |e| PtraceError::Request { op, tid: tid.as_raw(), source: io::Error::from(e) }
}

fn req_io(op: &'static str, tid: Pid) -> impl FnOnce(io::Error) -> PtraceError {
    move |source| PtraceError::Request { op, tid: tid.as_raw(), source }
}

/// ptrace options used on every tracee.
pub fn trace_options() -> Options {
    Options::PTRACE_O_TRACESYSGOOD
        | Options::PTRACE_O_TRACEFORK
        | Options::PTRACE_O_TRACEVFORK
        | Options::PTRACE_O_TRACECLONE
        | Options::PTRACE_O_TRACEEXEC
}

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;
const SYSCALL_INSN_LEN: u64 = 2;

/// What a thread was doing when it stopped under us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartMode {
    /// Registers are exactly what user space would see next.
    None,
    /// The thread was inside a system call that the kernel would restart (`rax`/`rip` rewound).
    Restart,
    /// The thread was inside a system call that would continue via `restart_syscall` (a restart block
    /// that lives in the kernel's per-thread state, e.g. nanosleep).
    RestartBlock,
}

/// The registers user space continues with after a stop inside a system call, as the kernel's signal
/// path would leave them (`for_new_thread`: a restart block does not survive into a new thread, so
/// that case becomes -EINTR). Returns the fixed registers with `orig_rax = -1`.
pub fn restart_fixup(regs: &Regs, for_new_thread: bool) -> (Regs, RestartMode) {
    let mut r = *regs;
    let mut mode = RestartMode::None;
    if (r.orig_rax as i64) >= 0 {
        match -(r.rax as i64) {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                r.rax = r.orig_rax;
                r.rip -= SYSCALL_INSN_LEN;
                mode = RestartMode::Restart;
            }
            ERESTART_RESTARTBLOCK if for_new_thread => {
                r.rax = (-(libc::EINTR as i64)) as u64;
                mode = RestartMode::RestartBlock;
            }
            ERESTART_RESTARTBLOCK => {
                r.rax = libc::SYS_restart_syscall as u64;
                r.rip -= SYSCALL_INSN_LEN;
                mode = RestartMode::RestartBlock;
            }
            _ => {}
        }
    }
    r.orig_rax = u64::MAX;
    (r, mode)
}

/// How a thread reported its stop after PTRACE_INTERRUPT.
#[derive(Debug, Clone)]
pub enum StopReason {
    /// PTRACE_EVENT_STOP from our interrupt.
    Interrupt,
    /// PTRACE_EVENT_STOP while the process is in job-control stop (stopped by this signal).
    GroupStop(i32),
    /// A signal was being delivered: it is now dequeued and held here (raw `siginfo_t`).
    Signal(Box<[u8; SIGINFO_SIZE]>),
}

/// Seizes a thread (no stop yet).
pub fn seize(tid: Pid) -> Result<(), PtraceError> {
    ptrace::seize(tid, trace_options()).map_err(req("seize", tid))
}

/// Seizes a thread with PTRACE_O_EXITKILL: it is killed if the tracer goes away (for templates, which
/// must never run on their own).
pub fn seize_exitkill(tid: Pid) -> Result<(), PtraceError> {
    ptrace::seize(tid, trace_options() | Options::PTRACE_O_EXITKILL).map_err(req("seize", tid))
}

/// Sets PTRACE_O_EXITKILL (and our usual options) on an already traced thread.
pub fn set_exitkill(tid: Pid) -> Result<(), PtraceError> {
    ptrace::setoptions(tid, trace_options() | Options::PTRACE_O_EXITKILL).map_err(req("setoptions", tid))
}

/// Queues PTRACE_INTERRUPT (the thread stops at its next chance).
pub fn interrupt(tid: Pid) -> Result<(), PtraceError> {
    ptrace::interrupt(tid).map_err(req("interrupt", tid))
}

/// How the tracer waits for a tracee's next report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// Blocks in `waitpid`: for every tracee but a pid namespace's init.
    Block,
    /// Polls, and gives up once the tracee is exiting: for a pid namespace's init. An exiting init kills
    /// its namespace and waits, before it reports its own exit, until every process of it is reaped —
    /// our traced templates too, which only we reap: a blocking wait for init would never return.
    Poll,
}

/// `PF_EXITING` in /proc/TID/stat's flags (field 9): the task is in `do_exit`.
const PF_EXITING: u64 = 0x4;
/// The longest sleep between two polls of [`Waiting::Poll`].
const POLL_MAX: std::time::Duration = std::time::Duration::from_millis(1);

/// The next report of tracee `tid`.
fn wait_report(tid: Pid, waiting: Waiting, doing: &'static str) -> Result<WaitStatus, PtraceError> {
    if waiting == Waiting::Block {
        return waitpid(tid, Some(WaitPidFlag::__WALL)).map_err(req("waitpid", tid));
    }
    let mut pause = std::time::Duration::from_micros(10);
    loop {
        match waitpid(tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)).map_err(req("waitpid", tid))? {
            WaitStatus::StillAlive => {}
            status => return Ok(status),
        }
        // A task gone from /proc has been reaped (by its parent): it will never report to us either.
        let exiting = crate::procfs::Stat::read(tid).map_or(true, |stat| stat.field(9) & PF_EXITING != 0);
        if exiting {
            return Err(PtraceError::Exited { tid: tid.as_raw(), doing });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(POLL_MAX);
    }
}

/// Waits until a thread we interrupted (or that was just auto-attached as a new child) stops.
pub fn wait_stop(tid: Pid, waiting: Waiting, doing: &'static str) -> Result<StopReason, PtraceError> {
    loop {
        let status = wait_report(tid, waiting, doing)?;
        match status {
            WaitStatus::PtraceEvent(_, sig, ev) if ev == libc::PTRACE_EVENT_STOP => {
                return Ok(match sig {
                    Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU => {
                        StopReason::GroupStop(sig as i32)
                    }
                    _ => StopReason::Interrupt,
                });
            }
            WaitStatus::Stopped(_, _) => {
                let info = get_siginfo_raw(tid)?;
                return Ok(StopReason::Signal(Box::new(info)));
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                return Err(PtraceError::Exited { tid: tid.as_raw(), doing })
            }
            // Events that were already under way (fork/clone/exec reports): let them finish.
            WaitStatus::PtraceEvent(..) | WaitStatus::PtraceSyscall(..) => {
                ptrace::cont(tid, None).map_err(req("cont", tid))?;
            }
            other => {
                return Err(PtraceError::UnexpectedStop { tid: tid.as_raw(), status: format!("{other:?}"), doing })
            }
        }
    }
}

fn get_siginfo_raw(tid: Pid) -> Result<[u8; SIGINFO_SIZE], PtraceError> {
    let info = ptrace::getsiginfo(tid).map_err(req("getsiginfo", tid))?;
    let mut raw = [0u8; SIGINFO_SIZE];
    let n = size_of::<libc::siginfo_t>().min(SIGINFO_SIZE);
    // SAFETY: siginfo_t is plain old data of at least n bytes.
    let bytes = unsafe { std::slice::from_raw_parts((&info as *const libc::siginfo_t).cast::<u8>(), n) };
    raw[..n].copy_from_slice(bytes);
    Ok(raw)
}

pub fn getregs(tid: Pid) -> Result<Regs, PtraceError> {
    ptrace::getregs(tid).map_err(req("getregs", tid))
}

pub fn setregs(tid: Pid, regs: &Regs) -> Result<(), PtraceError> {
    ptrace::setregs(tid, *regs).map_err(req("setregs", tid))
}

pub fn get_xstate(tid: Pid) -> Result<Vec<u8>, PtraceError> {
    sys::ptrace_get_xstate(tid).map_err(req_io("getregset(xstate)", tid))
}

pub fn set_xstate(tid: Pid, xstate: &[u8]) -> Result<(), PtraceError> {
    sys::ptrace_set_xstate(tid, xstate).map_err(req_io("setregset(xstate)", tid))
}

pub fn get_sigmask(tid: Pid) -> Result<u64, PtraceError> {
    sys::ptrace_get_sigmask(tid).map_err(req_io("getsigmask", tid))
}

pub fn set_sigmask(tid: Pid, mask: u64) -> Result<(), PtraceError> {
    sys::ptrace_set_sigmask(tid, mask).map_err(req_io("setsigmask", tid))
}

pub fn peek_pending(tid: Pid, shared: bool) -> Result<Vec<[u8; SIGINFO_SIZE]>, PtraceError> {
    sys::ptrace_peek_pending(tid, shared).map_err(req_io("peeksiginfo", tid))
}

pub fn get_rseq(tid: Pid) -> Result<Option<(u64, u32, u32)>, PtraceError> {
    sys::ptrace_get_rseq(tid).map_err(req_io("get_rseq_configuration", tid))
}

pub fn seccomp_filters(tid: Pid) -> Result<Vec<Vec<u8>>, PtraceError> {
    sys::ptrace_seccomp_filters(tid).map_err(req_io("seccomp_get_filter", tid))
}

/// Detaches, leaving the thread running (or in job-control stop if its process is stopped).
pub fn detach(tid: Pid, sig: Option<Signal>) -> Result<(), PtraceError> {
    ptrace::detach(tid, sig).map_err(req("detach", tid))
}

/// Resumes a stopped tracee (still traced).
pub fn cont(tid: Pid) -> Result<(), PtraceError> {
    ptrace::cont(tid, None).map_err(req("cont", tid))
}

/// Returns the address of a `syscall` instruction (0f 05) in the process's vdso.
pub fn find_syscall_gadget(pid: Pid) -> Result<u64, PtraceError> {
    let maps = crate::procfs::maps(pid).map_err(|e| PtraceError::Request {
        op: "read maps",
        tid: pid.as_raw(),
        source: io::Error::other(e),
    })?;
    let vdso = maps.iter().find(|m| m.name == "[vdso]").ok_or(PtraceError::NoSyscallGadget { pid: pid.as_raw() })?;
    let mut buf = vec![0u8; vdso.len() as usize];
    let len = buf.len();
    sys::process_vm_read(pid, &mut buf, &[(vdso.start, len)]).map_err(req_io("read vdso", pid))?;
    buf.windows(2)
        .position(|w| w == [0x0f, 0x05])
        .map(|off| vdso.start + off as u64)
        .ok_or(PtraceError::NoSyscallGadget { pid: pid.as_raw() })
}

/// A child created by an injected fork/clone, reported between syscall entry and exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewChild {
    pub pid: Pid,
}

/// The outcome of one injected system call.
#[derive(Debug, Clone, Copy)]
pub struct SyscallResult {
    /// Raw return value (negative errno on failure).
    pub ret: i64,
    /// A task created by the call (fork/clone/vfork event), already stopped and traced by us.
    pub child: Option<NewChild>,
}

impl SyscallResult {
    /// The return value, or the errno as an error.
    pub fn ok(self, nr: i64, tid: Pid) -> Result<i64, PtraceError> {
        if (-4095..0).contains(&self.ret) {
            Err(PtraceError::Syscall { nr, tid: tid.as_raw(), source: io::Error::from_raw_os_error(-self.ret as i32) })
        } else {
            Ok(self.ret)
        }
    }
}

/// A stopped thread we can inject system calls into. Created after the thread stopped under ptrace;
/// [`Injector::finish`] puts its original registers and signal mask back.
pub struct Injector {
    pid: Pid,
    tid: Pid,
    gadget: u64,
    /// Registers the thread had when we took it over.
    orig_regs: Regs,
    orig_mask: u64,
    /// Signals that stopped the thread while we were injecting (SIGSTOP cannot be blocked).
    held_signals: Vec<i32>,
    waiting: Waiting,
}

impl Injector {
    /// Takes over a stopped thread: saves its registers and blocks all signals.
    /// `pid` is the thread group (process) of thread `tid`.
    pub fn new(pid: Pid, tid: Pid, gadget: u64) -> Result<Injector, PtraceError> {
        let orig_regs = getregs(tid)?;
        let orig_mask = get_sigmask(tid)?;
        set_sigmask(tid, u64::MAX)?;
        Ok(Injector { pid, tid, gadget, orig_regs, orig_mask, held_signals: Vec::new(), waiting: Waiting::Block })
    }

    /// Waits for the thread's reports as `waiting` says ([`Waiting::Poll`] for a pid namespace's init).
    pub fn waiting(mut self, waiting: Waiting) -> Injector {
        self.waiting = waiting;
        self
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub fn tid(&self) -> Pid {
        self.tid
    }

    /// Registers the thread had when we took it over.
    pub fn orig_regs(&self) -> &Regs {
        &self.orig_regs
    }

    /// The signal mask the thread had when we took it over.
    pub fn orig_mask(&self) -> u64 {
        self.orig_mask
    }

    /// The syscall instruction currently used.
    pub fn gadget(&self) -> u64 {
        self.gadget
    }

    /// Use another syscall instruction from now on (after the vdso moved).
    pub fn set_gadget(&mut self, gadget: u64) {
        self.gadget = gadget;
    }

    /// Runs one system call in the thread and returns its raw result.
    pub fn syscall(&mut self, nr: i64, args: &[u64]) -> Result<SyscallResult, PtraceError> {
        let tid = self.tid;
        let mut regs = self.orig_regs;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        regs.rip = self.gadget;
        let mut a = [0u64; 6];
        a[..args.len()].copy_from_slice(args);
        regs.rdi = a[0];
        regs.rsi = a[1];
        regs.rdx = a[2];
        regs.r10 = a[3];
        regs.r8 = a[4];
        regs.r9 = a[5];
        setregs(tid, &regs)?;
        ptrace::syscall(tid, None).map_err(req("syscall", tid))?;
        let mut entered = false;
        let mut child = None;
        loop {
            match wait_report(tid, self.waiting, "injected into")? {
                WaitStatus::PtraceSyscall(_) if !entered => entered = true,
                WaitStatus::PtraceSyscall(_) => {
                    let r = getregs(tid)?;
                    return Ok(SyscallResult { ret: r.rax as i64, child });
                }
                WaitStatus::PtraceEvent(_, _, ev)
                    if ev == libc::PTRACE_EVENT_FORK
                        || ev == libc::PTRACE_EVENT_VFORK
                        || ev == libc::PTRACE_EVENT_CLONE =>
                {
                    let pid = ptrace::getevent(tid).map_err(req("geteventmsg", tid))?;
                    child = Some(NewChild { pid: Pid::from_raw(pid as i32) });
                }
                // An exec replaces the image: the exit stop follows.
                WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_EXEC => {}
                // Interrupt or group-stop reports: keep going.
                WaitStatus::PtraceEvent(_, _, _) => {}
                WaitStatus::Stopped(_, sig) => {
                    // Only unblockable signals get here; hold them and re-send at the end.
                    self.held_signals.push(sig as i32);
                }
                WaitStatus::Exited(_, code) if nr == libc::SYS_exit || nr == libc::SYS_exit_group => {
                    return Ok(SyscallResult { ret: code as i64, child });
                }
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    return Err(PtraceError::Exited { tid: tid.as_raw(), doing: "injected into" })
                }
                other => {
                    return Err(PtraceError::UnexpectedStop {
                        tid: tid.as_raw(),
                        status: format!("{other:?}"),
                        doing: "injecting a syscall",
                    })
                }
            }
            ptrace::syscall(tid, None).map_err(req("syscall", tid))?;
        }
    }

    /// Injects `clone(flags)` (no new stack: the child does not run until we set its registers) and
    /// returns the new task, stopped and traced (auto-attached through our ptrace options).
    pub fn clone_task(&mut self, flags: u64, doing: &'static str) -> Result<Pid, PtraceError> {
        let res = self.syscall(libc::SYS_clone, &[flags, 0, 0, 0, 0])?;
        res.ok(libc::SYS_clone, self.tid)?;
        let child = res
            .child
            .ok_or_else(|| PtraceError::UnexpectedStop {
                tid: self.tid.as_raw(),
                status: "no clone event".into(),
                doing,
            })?
            .pid;
        wait_stop(child, Waiting::Block, doing)?;
        Ok(child)
    }

    /// Runs a system call and turns a negative result into an error.
    pub fn call(&mut self, nr: i64, args: &[u64]) -> Result<i64, PtraceError> {
        let tid = self.tid;
        self.syscall(nr, args)?.ok(nr, tid)
    }

    /// Puts back `regs` (normally the original registers, restart-fixed) and the original signal mask,
    /// and re-sends signals that arrived while we held the thread. The thread stays stopped.
    pub fn finish_with(self, regs: &Regs, mask: u64) -> Result<(), PtraceError> {
        setregs(self.tid, regs)?;
        set_sigmask(self.tid, mask)?;
        for sig in self.held_signals {
            sys::tgkill(self.pid, self.tid, sig).map_err(req_io("tgkill", self.tid))?;
        }
        Ok(())
    }

    /// Puts the original state back so the thread continues where it was.
    pub fn finish(self) -> Result<(), PtraceError> {
        let (regs, _) = restart_fixup(&self.orig_regs, false);
        let mask = self.orig_mask;
        self.finish_with(&regs, mask)
    }
}

/// Memory mapped in a tracee for the arguments of injected system calls; unmapped by [`Scratch::free`].
pub struct Scratch {
    pub addr: u64,
    pub len: usize,
    pid: Pid,
}

impl Scratch {
    /// Maps `len` bytes of private anonymous read-write memory in the injector's process.
    pub fn map(inj: &mut Injector, len: usize) -> Result<Scratch, PtraceError> {
        let addr = inj.call(
            libc::SYS_mmap,
            &[
                0,
                len as u64,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        Ok(Scratch { addr: addr as u64, len, pid: inj.pid })
    }

    /// Describes scratch memory the caller has mapped itself at `addr` in process `pid`.
    pub fn at(pid: Pid, addr: u64, len: usize) -> Scratch {
        Scratch { addr, len, pid }
    }

    /// Writes bytes at `offset` of the scratch area.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<u64, PtraceError> {
        assert!(offset + data.len() <= self.len, "scratch overflow");
        let addr = self.addr + offset as u64;
        sys::process_vm_write(self.pid, data, &[(addr, data.len())]).map_err(req_io("write scratch", self.pid))?;
        Ok(addr)
    }

    /// Reads `len` bytes at `offset` of the scratch area.
    pub fn read(&self, offset: usize, len: usize) -> Result<Vec<u8>, PtraceError> {
        assert!(offset + len <= self.len, "scratch overflow");
        let mut buf = vec![0u8; len];
        sys::process_vm_read(self.pid, &mut buf, &[(self.addr + offset as u64, len)])
            .map_err(req_io("read scratch", self.pid))?;
        Ok(buf)
    }

    /// Reads a u64 at `offset`.
    pub fn read_u64(&self, offset: usize) -> Result<u64, PtraceError> {
        let b = self.read(offset, 8)?;
        Ok(u64::from_ne_bytes(b.try_into().expect("8 bytes")))
    }

    /// Unmaps the area (through the given injector, whose process owns it).
    pub fn free(self, inj: &mut Injector) -> Result<(), PtraceError> {
        inj.call(libc::SYS_munmap, &[self.addr, self.len as u64])?;
        Ok(())
    }
}
