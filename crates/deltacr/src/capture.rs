//! Seizing a sandbox's process tree and capturing the state only the live processes have.
//!
//! What a copy-on-write fork inherits (memory, signal handlers, credentials, limits, cwd, ...) is read
//! later from the template, after the live processes run again; here, while they are stopped, we read
//! per-thread state and what fork does not copy (itimers, pending signals, the parent-death signal, ...).

use std::collections::{HashMap, HashSet};

use nix::unistd::Pid;

use crate::procfs::{self, ProcError};
use crate::ptrace::{self, Injector, PtraceError, Scratch, StopReason};
use crate::state::{AltStack, ITimer, Rseq, SigInfo, ThreadState};
use crate::sys;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("process {pid}")]
    Proc {
        pid: i32,
        #[source]
        source: ProcError,
    },
    #[error("process {pid}")]
    Ptrace {
        pid: i32,
        #[source]
        source: PtraceError,
    },
    #[error("process {pid} ({comm}): {reason}")]
    Unsupported { pid: i32, comm: String, reason: String },
}

fn proc_err(pid: Pid) -> impl FnOnce(ProcError) -> CaptureError {
    move |source| CaptureError::Proc { pid: pid.as_raw(), source }
}

fn pt_err(pid: Pid) -> impl FnOnce(PtraceError) -> CaptureError {
    move |source| CaptureError::Ptrace { pid: pid.as_raw(), source }
}

/// Every process below `init` (not `init` itself), parents before children, leaving out `skip`
/// (our templates, which are children of init too).
pub fn list_tree(init: Pid, skip: &HashSet<Pid>) -> Result<Vec<Pid>, CaptureError> {
    let mut out = Vec::new();
    let mut queue = vec![init];
    while let Some(p) = queue.pop() {
        let mut kids = match procfs::children(p) {
            Ok(k) => k,
            // A process that just exited has no task directory any more.
            Err(ProcError::Read { .. }) if p != init => continue,
            Err(e) => return Err(proc_err(p)(e)),
        };
        kids.retain(|k| !skip.contains(k));
        kids.reverse();
        for k in kids {
            out.push(k);
            queue.push(k);
        }
    }
    // Depth-first with a stack gives children after their parent but not grouped by level; that is all
    // restore needs (a parent exists before its children).
    Ok(out)
}

/// Identity of a process in its pid namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NsIds {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
}

/// Reads a process's pid, parent, process group and session as seen in its pid namespace.
pub fn ns_ids(pid: Pid) -> Result<NsIds, CaptureError> {
    let st = procfs::Status::read(pid).map_err(proc_err(pid))?;
    let ppid_host: i32 = st.get("PPid").map_err(proc_err(pid))?.parse().unwrap_or(0);
    let ppid = if ppid_host == 0 {
        0
    } else {
        procfs::Status::read(Pid::from_raw(ppid_host)).and_then(|p| p.innermost("NSpid")).map_err(proc_err(pid))?
    };
    Ok(NsIds {
        pid: st.innermost("NSpid").map_err(proc_err(pid))?,
        ppid,
        pgid: st.innermost("NSpgid").map_err(proc_err(pid))?,
        sid: st.innermost("NSsid").map_err(proc_err(pid))?,
    })
}

/// A thread we seized.
#[derive(Debug)]
pub struct SeizedThread {
    pub tid: Pid,
    pub ns_tid: i32,
    pub stop: Option<StopReason>,
}

/// A process of the tree: seized (live) or a zombie.
#[derive(Debug)]
pub struct SeizedProcess {
    pub pid: Pid,
    pub ids: NsIds,
    pub comm: String,
    /// Empty for a zombie.
    pub threads: Vec<SeizedThread>,
    /// Raw wait status, for a zombie.
    pub zombie: Option<i32>,
}

/// Seizes every thread of `pid` and queues an interrupt (the threads stop once they can run).
pub fn seize_process(pid: Pid) -> Result<SeizedProcess, CaptureError> {
    let ids = ns_ids(pid)?;
    let stat = procfs::Stat::read(pid).map_err(proc_err(pid))?;
    if stat.state() == 'Z' {
        return Ok(SeizedProcess {
            pid,
            ids,
            comm: stat.comm.clone(),
            threads: Vec::new(),
            zombie: Some(stat.field(52) as i32),
        });
    }
    let mut threads = Vec::new();
    let mut seen = HashSet::new();
    // Threads can be created until all existing ones are seized (when not frozen): repeat until stable.
    loop {
        let tids = procfs::tasks(pid).map_err(proc_err(pid))?;
        let new: Vec<Pid> = tids.into_iter().filter(|t| !seen.contains(t)).collect();
        if new.is_empty() {
            break;
        }
        for tid in new {
            seen.insert(tid);
            ptrace::seize(tid).map_err(pt_err(pid))?;
            ptrace::interrupt(tid).map_err(pt_err(pid))?;
            let ns_tid =
                procfs::Status::read_thread(pid, tid).and_then(|s| s.innermost("NSpid")).map_err(proc_err(pid))?;
            threads.push(SeizedThread { tid, ns_tid, stop: None });
        }
    }
    // Leader first.
    threads.sort_by_key(|t| (t.tid != pid, t.tid));
    if threads.first().map(|t| t.tid) != Some(pid) {
        return Err(CaptureError::Unsupported {
            pid: ids.pid,
            comm: stat.comm,
            reason: "the thread group leader has exited while other threads run".into(),
        });
    }
    Ok(SeizedProcess { pid, ids, comm: stat.comm, threads, zombie: None })
}

impl SeizedProcess {
    /// Waits until every thread reports its stop.
    pub fn wait_stopped(&mut self) -> Result<(), CaptureError> {
        for t in &mut self.threads {
            if t.stop.is_none() {
                t.stop =
                    Some(ptrace::wait_stop(t.tid, ptrace::Waiting::Block, "checkpointed").map_err(pt_err(self.pid))?);
            }
        }
        Ok(())
    }

    /// Detaches from every thread (after a failed checkpoint, or when done).
    pub fn detach(&self) {
        for t in &self.threads {
            if let Err(e) = ptrace::detach(t.tid, None) {
                tracing::warn!(tid = t.tid.as_raw(), error = %e, "detach failed");
            }
        }
    }

    pub fn job_stopped(&self) -> bool {
        self.threads.iter().any(|t| matches!(t.stop, Some(StopReason::GroupStop(_))))
    }
}

/// State read from a stopped live process, and the injectors that hold its threads.
pub struct LiveProcess {
    pub seized: SeizedProcess,
    /// One per thread, leader first.
    pub injectors: Vec<Injector>,
    pub gadget: u64,
    pub threads: Vec<ThreadState>,
    pub shared_pending: Vec<SigInfo>,
    pub itimers: [ITimer; 3],
    pub pdeath_signal: i32,
    pub child_subreaper: bool,
    pub dumpable: i32,
    pub oom_score_adj: i32,
}

const PR_GET_PDEATHSIG: u64 = 2;
const PR_GET_DUMPABLE: u64 = 3;
const PR_GET_CHILD_SUBREAPER: u64 = 37;
const PR_GET_TID_ADDRESS: u64 = 40;

fn read_timeval(b: &[u8]) -> u64 {
    let sec = u64::from_ne_bytes(b[0..8].try_into().expect("8 bytes"));
    let usec = u64::from_ne_bytes(b[8..16].try_into().expect("8 bytes"));
    sec * 1_000_000 + usec
}

/// Takes over the stopped threads of `seized` and reads their state. On error the process is released
/// (it runs on).
pub fn capture_live(seized: SeizedProcess) -> Result<LiveProcess, CaptureError> {
    let pid = seized.pid;
    let mut injectors = Vec::with_capacity(seized.threads.len());
    let res = (|| {
        let gadget = ptrace::find_syscall_gadget(pid).map_err(pt_err(pid))?;
        for t in &seized.threads {
            injectors.push(Injector::new(pid, t.tid, gadget).map_err(pt_err(pid))?);
        }
        Ok((gadget, capture_with(&seized, &mut injectors)?))
    })();
    match res {
        Ok((gadget, parts)) => Ok(LiveProcess {
            gadget,
            threads: parts.threads,
            shared_pending: parts.shared_pending,
            itimers: parts.itimers,
            pdeath_signal: parts.pdeath_signal,
            child_subreaper: parts.child_subreaper,
            dumpable: parts.dumpable,
            oom_score_adj: parts.oom_score_adj,
            seized,
            injectors,
        }),
        Err(e) => {
            for inj in injectors {
                let _ = inj.finish();
            }
            seized.detach();
            Err(e)
        }
    }
}

struct Parts {
    threads: Vec<ThreadState>,
    shared_pending: Vec<SigInfo>,
    itimers: [ITimer; 3],
    pdeath_signal: i32,
    child_subreaper: bool,
    dumpable: i32,
    oom_score_adj: i32,
}

fn capture_with(seized: &SeizedProcess, injectors: &mut [Injector]) -> Result<Parts, CaptureError> {
    let pid = seized.pid;
    let scratch = Scratch::map(&mut injectors[0], 4096).map_err(pt_err(pid))?;
    let result = capture_in_scratch(seized, injectors, &scratch);
    scratch.free(&mut injectors[0]).map_err(pt_err(pid))?;
    result
}

fn capture_in_scratch(
    seized: &SeizedProcess,
    injectors: &mut [Injector],
    scratch: &Scratch,
) -> Result<Parts, CaptureError> {
    let pid = seized.pid;
    let mut threads = Vec::with_capacity(injectors.len());
    for (t, inj) in seized.threads.iter().zip(injectors.iter_mut()) {
        let tid = t.tid;
        let (regs, _) = ptrace::restart_fixup(inj.orig_regs(), true);
        let mut pending: Vec<SigInfo> = Vec::new();
        if let Some(StopReason::Signal(info)) = &t.stop {
            pending.push(SigInfo(info.to_vec()));
        }
        pending.extend(ptrace::peek_pending(tid, false).map_err(pt_err(pid))?.into_iter().map(|s| SigInfo(s.to_vec())));
        inj.call(libc::SYS_prctl, &[PR_GET_TID_ADDRESS, scratch.addr]).map_err(pt_err(pid))?;
        let clear_child_tid = scratch.read_u64(0).map_err(pt_err(pid))?;
        inj.call(libc::SYS_sigaltstack, &[0, scratch.addr]).map_err(pt_err(pid))?;
        let ss = scratch.read(0, 24).map_err(pt_err(pid))?;
        let altstack = AltStack {
            sp: u64::from_ne_bytes(ss[0..8].try_into().expect("8 bytes")),
            flags: i32::from_ne_bytes(ss[8..12].try_into().expect("4 bytes")),
            size: u64::from_ne_bytes(ss[16..24].try_into().expect("8 bytes")),
        };
        threads.push(ThreadState {
            tid: t.ns_tid,
            regs: (&regs).into(),
            xstate: ptrace::get_xstate(tid).map_err(pt_err(pid))?,
            sigmask: inj.orig_mask(),
            pending,
            altstack,
            rseq: ptrace::get_rseq(tid).map_err(pt_err(pid))?.map(|(addr, len, sig)| Rseq { addr, len, sig }),
            robust_list: sys::get_robust_list(tid).map_err(|e| {
                pt_err(pid)(PtraceError::Request { op: "get_robust_list", tid: tid.as_raw(), source: e })
            })?,
            clear_child_tid,
            comm: procfs::thread_comm(pid, tid).map_err(proc_err(pid))?,
        });
    }
    let leader = &mut injectors[0];
    let mut itimers = [ITimer::default(); 3];
    for (which, slot) in itimers.iter_mut().enumerate() {
        leader.call(libc::SYS_getitimer, &[which as u64, scratch.addr]).map_err(pt_err(pid))?;
        let b = scratch.read(0, 32).map_err(pt_err(pid))?;
        *slot = ITimer { interval_us: read_timeval(&b[0..16]), value_us: read_timeval(&b[16..32]) };
    }
    leader.call(libc::SYS_prctl, &[PR_GET_PDEATHSIG, scratch.addr]).map_err(pt_err(pid))?;
    let pdeath_signal = i32::from_ne_bytes(scratch.read(0, 4).map_err(pt_err(pid))?.try_into().expect("4 bytes"));
    leader.call(libc::SYS_prctl, &[PR_GET_CHILD_SUBREAPER, scratch.addr]).map_err(pt_err(pid))?;
    let child_subreaper = scratch.read(0, 4).map_err(pt_err(pid))? != [0, 0, 0, 0];
    let dumpable = leader.call(libc::SYS_prctl, &[PR_GET_DUMPABLE]).map_err(pt_err(pid))? as i32;
    Ok(Parts {
        threads,
        shared_pending: ptrace::peek_pending(pid, true)
            .map_err(pt_err(pid))?
            .into_iter()
            .map(|s| SigInfo(s.to_vec()))
            .collect(),
        itimers,
        pdeath_signal,
        child_subreaper,
        dumpable,
        oom_score_adj: procfs::read_int(pid, "oom_score_adj").map_err(proc_err(pid))? as i32,
    })
}

impl LiveProcess {
    /// Gives the threads back their registers and signal masks and detaches: the process runs on.
    pub fn resume(self) -> Result<(), CaptureError> {
        let pid = self.seized.pid;
        let mut first_err = None;
        for inj in self.injectors {
            if let Err(e) = inj.finish() {
                first_err.get_or_insert(e);
            }
        }
        self.seized.detach();
        match first_err {
            Some(e) => Err(pt_err(pid)(e)),
            None => Ok(()),
        }
    }
}

/// A process's credentials and capabilities from /proc/PID/status.
pub fn read_creds(pid: Pid) -> Result<crate::state::Creds, ProcError> {
    let st = procfs::Status::read(pid)?;
    let four = |key: &str| -> Result<[u32; 4], ProcError> {
        let v = st.numbers(key)?;
        if v.len() != 4 {
            return Err(ProcError::Parse { path: procfs::dir(pid).join("status"), what: format!("{key} needs 4 ids") });
        }
        Ok([v[0] as u32, v[1] as u32, v[2] as u32, v[3] as u32])
    };
    // /proc shows ids as the reader's user namespace sees them (the host's); the checkpoint keeps them as
    // the process's own namespace sees them, so they mean the same in a sandbox with another id range.
    let (uid_map, gid_map) = (procfs::IdMap::read(pid, "uid_map")?, procfs::IdMap::read(pid, "gid_map")?);
    let inner = |map: &procfs::IdMap, ids: [u32; 4]| ids.map(|id| map.inner(id));
    Ok(crate::state::Creds {
        uids: inner(&uid_map, four("Uid")?),
        gids: inner(&gid_map, four("Gid")?),
        groups: st.numbers("Groups")?.into_iter().map(|g| gid_map.inner(g as u32)).collect(),
        cap_inheritable: st.hex("CapInh")?,
        cap_permitted: st.hex("CapPrm")?,
        cap_effective: st.hex("CapEff")?,
        cap_bounding: st.hex("CapBnd")?,
        cap_ambient: st.hex("CapAmb")?,
        no_new_privs: st.get("NoNewPrivs")? == "1",
    })
}

/// What a process shares with its template: read from the template after the live process runs again.
pub struct StaticState {
    pub creds: crate::state::Creds,
    pub seccomp: Vec<Vec<u8>>,
    pub personality: u32,
    pub umask: u32,
    pub rlimits: Vec<(u64, u64)>,
    pub cwd: String,
    pub root: String,
    pub mm: crate::state::MmState,
    pub vmas: Vec<crate::state::Vma>,
    pub exit_signal: i32,
}

/// Reads the state a template shares with its original process that decides whether the checkpoint
/// can be restored, cheaply (mappings from /proc/PID/maps: no page-table walk). What is left
/// (`brk`, the mappings' flags, signal actions) comes from [`capture_late`]. `ns_pid` names the original
/// in errors.
pub fn capture_static(t: &crate::template::Template, ns_pid: i32) -> Result<StaticState, CaptureError> {
    use crate::state::MmState;
    let pid = t.pid();
    let perr = |source| CaptureError::Ptrace { pid: ns_pid, source };
    let prerr = |source| CaptureError::Proc { pid: ns_pid, source };
    let creds = read_creds(pid).map_err(prerr)?;
    let st = procfs::Status::read(pid).map_err(prerr)?;
    let umask = u32::from_str_radix(st.get("Umask").map_err(prerr)?, 8).unwrap_or(0o022);
    let personality_path = procfs::dir(pid).join("personality");
    let personality = std::fs::read_to_string(&personality_path)
        .map_err(|source| prerr(ProcError::Read { path: personality_path.clone(), source }))
        .map(|s| u32::from_str_radix(s.trim(), 16).unwrap_or(0))?;
    let rlimits = procfs::limits(pid).map_err(prerr)?;
    let stat = procfs::Stat::read(pid).map_err(prerr)?;
    let mm = MmState {
        start_code: stat.field(26),
        end_code: stat.field(27),
        start_stack: stat.field(28),
        start_data: stat.field(45),
        end_data: stat.field(46),
        start_brk: stat.field(47),
        // Set by capture_late.
        brk: 0,
        arg_start: stat.field(48),
        arg_end: stat.field(49),
        env_start: stat.field(50),
        env_end: stat.field(51),
        auxv: procfs::auxv(pid).map_err(prerr)?,
        exe: procfs::link(pid, "exe").map_err(prerr)?,
    };
    // A restore from the image starts from an exec of the executable: one deleted (or replaced) since the
    // process started cannot be found again.
    if let Some(path) = mm.exe.strip_suffix(" (deleted)") {
        return Err(CaptureError::Unsupported {
            pid: ns_pid,
            comm: stat.comm.clone(),
            reason: format!(
                "its executable {path} was deleted or replaced since it started (e.g. rebuilt or upgraded): \
                 it could not be restored from the checkpoint's image; restart it"
            ),
        });
    }
    let vmas: Vec<crate::state::Vma> = procfs::maps(pid).map_err(prerr)?.iter().filter_map(vma_of).collect();
    // Shared memory objects are shared with the live processes by the template too, so their
    // checkpoint-time contents are not kept anywhere: refuse rather than restore them wrongly.
    if let Some(v) = vmas.iter().find(|v| v.shared && v.dumped) {
        let what = match &v.backing {
            crate::state::VmaBacking::File { path, .. } => path.clone(),
            _ => "anonymous".into(),
        };
        return Err(CaptureError::Unsupported {
            pid: ns_pid,
            comm: procfs::Stat::read(pid).map(|s| s.comm).unwrap_or_default(),
            reason: format!("shared memory mapping {what} at {:#x} cannot be checkpointed yet", v.start),
        });
    }
    Ok(StaticState {
        creds,
        seccomp: ptrace::seccomp_filters(pid).map_err(perr)?,
        personality,
        umask,
        rlimits,
        cwd: procfs::link(pid, "cwd").map_err(prerr)?,
        root: procfs::link(pid, "root").map_err(prerr)?,
        mm,
        vmas,
        exit_signal: stat.field(38) as i32,
    })
}

/// What [`capture_static`] leaves for after the checkpoint call: 65 injected system calls that decide
/// nothing about whether the checkpoint can be restored. (The mappings' flags come from smaps, which
/// walks page tables: read by whoever needs them, see [`fill_vm_flags`].)
pub struct LateState {
    pub sigactions: Vec<crate::state::SigAction>,
    pub brk: u64,
}

/// Reads the rest of a template's state (see [`LateState`]).
pub fn capture_late(t: &crate::template::Template, ns_pid: i32) -> Result<LateState, CaptureError> {
    use crate::state::SigAction;
    let perr = |source| CaptureError::Ptrace { pid: ns_pid, source };
    let (sigactions, brk) = t
        .with_injector(|inj| {
            let scratch = Scratch::map(inj, 4096)?;
            let mut acts = Vec::with_capacity(64);
            for sig in 1..=64u64 {
                if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
                    acts.push(SigAction::default());
                    continue;
                }
                inj.call(libc::SYS_rt_sigaction, &[sig, 0, scratch.addr, 8])?;
                let b = scratch.read(0, 32)?;
                let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
                acts.push(SigAction { handler: w(0), flags: w(1), restorer: w(2), mask: w(3) });
            }
            let brk = inj.call(libc::SYS_brk, &[0])? as u64;
            scratch.free(inj)?;
            Ok((acts, brk))
        })
        .map_err(perr)?;
    Ok(LateState { sigactions, brk })
}

/// Sets the kept `VmFlags` of each of `vmas` from `smaps` (the same process's, read since): an error
/// names the first mapping smaps does not have (the layout changed).
pub fn fill_vm_flags(vmas: &mut [crate::state::Vma], smaps: &[procfs::MapEntry]) -> Result<(), u64> {
    let by_start: HashMap<u64, &procfs::MapEntry> = smaps.iter().map(|m| (m.start, m)).collect();
    // A template has no SysV attachments (see Template::detach_segments).
    let attachment = |v: &&mut crate::state::Vma| matches!(&v.backing, crate::state::VmaBacking::SharedMemory { path, .. } if crate::files::is_sysv(path));
    for v in vmas.iter_mut().filter(|v| !attachment(v)) {
        v.vm_flags = kept_vm_flags(by_start.get(&v.start).ok_or(v.start)?);
    }
    Ok(())
}

fn kept_vm_flags(m: &procfs::MapEntry) -> Vec<String> {
    m.vm_flags.iter().filter(|f| KEPT_VM_FLAGS.contains(&f.as_str())).cloned().collect()
}

const KEPT_VM_FLAGS: [&str; 6] = ["gd", "dc", "wf", "lo", "hg", "nh"];

/// A mapping as DeltaCR records it (None for [vsyscall], which every process has at a fixed address).
pub fn vma_of(m: &procfs::MapEntry) -> Option<crate::state::Vma> {
    use crate::state::{Vma, VmaBacking};
    let prot = (if m.read { libc::PROT_READ } else { 0 })
        | (if m.write { libc::PROT_WRITE } else { 0 })
        | (if m.exec { libc::PROT_EXEC } else { 0 });
    let (backing, dumped) = match m.name.as_str() {
        "[vsyscall]" => return None,
        "[vdso]" | "[vvar]" | "[vvar_vclock]" => (VmaBacking::Special { name: m.name.clone() }, false),
        // A private mapping of a file deleted since (a library upgraded while it runs): the file cannot be
        // mapped again, so every page is saved, and it comes back as anonymous memory with that content.
        n if n.starts_with('/') && m.inode != 0 && !m.shared && n.ends_with(" (deleted)") => {
            (VmaBacking::DeletedFile { path: n.trim_end_matches(" (deleted)").to_string() }, true)
        }
        // A SysV segment shows its id as inode: the first one has 0.
        n if n.starts_with('/') && (m.inode != 0 || n.starts_with("/SYSV")) => {
            let (path, offset, dev, inode) =
                (n.to_string(), m.offset, libc::makedev(m.dev_major, m.dev_minor), m.inode);
            if m.shared && is_shared_memory_object(n) {
                // Its contents are kept with the object (files::shm), not per mapping.
                (VmaBacking::SharedMemory { path, offset, dev, inode }, false)
            } else {
                // Private mappings of memory objects (shmem, memfd) are saved like anonymous memory.
                (VmaBacking::File { path, offset, dev, inode }, !m.shared)
            }
        }
        _ => (VmaBacking::Anonymous, true),
    };
    Some(Vma { start: m.start, end: m.end, prot, shared: m.shared, backing, vm_flags: kept_vm_flags(m), dumped })
}

/// Whether a shared mapping named `name` in /proc/PID/maps is of a shared memory object, whose contents
/// live in the kernel rather than in a file of the sandbox: shared anonymous memory, SysV shm, a memfd,
/// a deleted file (a POSIX semaphore or shm object after it was unlinked).
pub fn is_shared_memory_object(name: &str) -> bool {
    name.starts_with("/dev/zero")
        || name.starts_with("/SYSV")
        || name.starts_with("/memfd:")
        || name.ends_with(" (deleted)")
}

/// The pty index of a process's controlling terminal and the terminal's foreground process group
/// (host pgid), from /proc/PID/stat. None when it has no pty as controlling terminal.
pub fn controlling_pty(pid: Pid) -> Result<Option<(u32, i32)>, CaptureError> {
    let stat = procfs::Stat::read(pid).map_err(proc_err(pid))?;
    let tty_nr = stat.field(7) as u32;
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    Ok(crate::files::pts_index(major, minor).map(|index| (index, stat.field(8) as i64 as i32)))
}

/// The process group of a process as the host sees it (/proc/PID/stat field 5).
pub fn host_pgid(pid: Pid) -> Result<i32, CaptureError> {
    Ok(procfs::Stat::read(pid).map_err(proc_err(pid))?.field(5) as i32)
}
