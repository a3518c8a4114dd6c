//! The engine: checkpoint and restore of a sandbox's process tree, driven from one tracer thread.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use crate::capture::{self, CaptureError, LiveProcess, SeizedProcess};
use crate::files::{self, FdOwner, FileError};
use crate::freezer::Frozen;
use crate::image::{ImageChain, ImageId, ImageJob};
use crate::lazy::{Feed, LazyError, Pager};
use crate::mm::{LazyRestore, ProcessPages};
use crate::pidns::{PidNsError, PidSetter};
use crate::plan::{self, Creator, PlanError, Step};
use crate::procfs::{self, ProcError};
use crate::pty::{Degraded, PtyError, PtyPlan};
use crate::restore::{self, Helper, NewProcess, RestoreError};
use crate::state::{
    AddressMove, Creds, Ctty, FdState, OpenFile, ProcessEntry, ProcessKind, ProcessState, PtyNode, SigAction,
    TreeState, Vma,
};
use crate::sys;
use crate::template::{self, Detach, Stopped, Template, TemplateError};

/// Errors of checkpoint and restore.
#[derive(Debug, thiserror::Error)]
pub enum CrError {
    #[error("checkpoint failed")]
    Capture(#[from] CaptureError),
    #[error("checkpoint failed")]
    Files(#[from] FileError),
    #[error("checkpoint failed")]
    Template(#[from] TemplateError),
    #[error("restore failed")]
    Restore(#[from] RestoreError),
    #[error("pid namespace helper")]
    PidNs(#[from] PidNsError),
    #[error("memory restored on demand")]
    Lazy(#[from] LazyError),
    #[error("reading /proc")]
    Proc(#[from] ProcError),
    #[error("cannot restore")]
    Plan(#[from] PlanError),
    #[error("cannot restore")]
    Pty(#[from] PtyError),
    #[error("IPC objects")]
    Ipc(#[from] crate::ipc::IpcError),
    #[error("freezer")]
    Freezer(#[source] std::io::Error),
    #[error("waiting for killed processes")]
    Kill(#[source] std::io::Error),
    #[error("cannot make an image id")]
    ImageId(#[source] std::io::Error),
    #[error("process {pid} ({comm}): {reason}")]
    Unsupported { pid: i32, comm: String, reason: String },
    #[error("checkpoint has no template for process {pid} and restoring from an image is not possible here")]
    NoTemplate { pid: i32 },
}

impl CrError {
    /// Whether a checkpoint failed because a process holds something DeltaCR cannot capture (a TCP
    /// connection, shared memory, ...): a property of the sandbox's state, which its user can change,
    /// rather than a failure of the checkpoint itself (freezing, reading /proc, ptrace, ...).
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            CrError::Unsupported { .. }
                | CrError::Capture(CaptureError::Unsupported { .. })
                | CrError::Files(FileError::Unsupported { .. } | FileError::Mapping { .. })
                | CrError::Ipc(crate::ipc::IpcError::Unsupported(_))
                | CrError::Plan(_)
        )
    }
}

/// The sandbox DeltaCR works on: its init (host pid; never checkpointed or killed). Its freezer comes
/// to a checkpoint as a [`Frozen`].
pub struct Sandbox {
    pub init: Pid,
}

/// Timings of one checkpoint.
#[derive(Debug, Clone, Default)]
pub struct CheckpointStats {
    /// From the call (sandbox frozen) until every process runs again.
    pub stopped: Duration,
    /// The whole call, including reading what templates share.
    pub total: Duration,
    pub processes: usize,
    pub threads: usize,
    /// Time spent in each step, in order (for benchmarks and tuning).
    pub phases: Vec<(&'static str, Duration)>,
}

/// Templates by pid (in the sandbox).
type Templates = HashMap<i32, Template>;

/// A checkpoint held in memory: the tree's state plus a template per live process.
pub struct Checkpoint {
    pub tree: TreeState,
    templates: Templates,
    pub stats: CheckpointStats,
}

impl Checkpoint {
    /// The TCP connections to outside the checkpoint, which a restore gives back reset by their peer:
    /// "process PID (COMM), fd FD: TCP LOCAL -> PEER".
    pub fn reset_connections(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.tree.processes {
            let ProcessKind::Live(st) = &p.kind else {
                continue;
            };
            for fd in &st.fds {
                if let Some(what) = files::describe_reset(&self.tree.files[fd.file as usize].kind) {
                    out.push(format!("process {} ({}), fd {}: {what}", p.pid, p.comm, fd.fd));
                }
            }
        }
        out
    }

    /// Prepares writing this checkpoint's durable image (the job can run on any thread while the
    /// sandbox runs). With `parent` (the previous checkpoint of this sandbox and the id of its image),
    /// the image holds only the pages that changed since then.
    pub fn image_job(&self, parent: Option<(&Checkpoint, ImageId)>) -> Result<ImageJob, CrError> {
        self.image_job_as(ImageId::random().map_err(CrError::ImageId)?, parent)
    }

    /// [`Checkpoint::image_job`] for an image whose id was chosen beforehand.
    pub fn image_job_as(&self, id: ImageId, parent: Option<(&Checkpoint, ImageId)>) -> Result<ImageJob, CrError> {
        let mut pages = Vec::new();
        for (pid, t) in &self.templates {
            if !t.alive() {
                return Err(CrError::NoTemplate { pid: *pid });
            }
            let p = ProcessPages::open(t.pid()).map_err(|_| CrError::NoTemplate { pid: *pid })?;
            let smaps = std::fs::File::open(procfs::dir(t.pid()).join("smaps"))
                .map_err(|_| CrError::NoTemplate { pid: *pid })?;
            pages.push((*pid, p, smaps));
        }
        pages.sort_by_key(|(pid, ..)| *pid);
        let mut parent_pages = HashMap::new();
        if let Some((pc, _)) = parent {
            for (pid, t) in &pc.templates {
                if !t.alive() {
                    continue;
                }
                if let Ok(p) = ProcessPages::open(t.pid()) {
                    parent_pages.insert(*pid, p);
                }
            }
        }
        Ok(ImageJob {
            tree: self.tree.clone(),
            pages,
            parent_pages,
            parent_image: None,
            parent: parent.map(|(_, id)| id),
            id,
        })
    }

    /// Memory its templates (and their spares) hold that no other process shares: what dropping it frees.
    /// Reads a sample of each template's pages (~1 ms each, see [`crate::memuse`]): not for a
    /// checkpoint's or a restore's path.
    pub fn memory_bytes(&self) -> Result<u64, TemplateError> {
        self.templates.values().map(Template::memory_bytes).sum()
    }

    /// Pids (in the sandbox) whose template no longer exists.
    pub fn lost_templates(&self) -> Vec<i32> {
        let mut lost: Vec<i32> = self.templates.iter().filter(|(_, t)| !t.alive()).map(|(p, _)| *p).collect();
        lost.sort();
        lost
    }
}

/// A checkpoint that can be restored, whose state is not all read yet (see
/// [`Engine::checkpoint_at_thaw`]). Dropping it kills its templates.
pub struct Partial(Checkpoint);

impl Partial {
    pub fn stats(&self) -> &CheckpointStats {
        &self.0.stats
    }

    /// See [`Checkpoint::reset_connections`].
    pub fn reset_connections(&self) -> Vec<String> {
        self.0.reset_connections()
    }

    /// Reads the rest of the state from the templates (on the tracer thread; the sandbox runs).
    pub fn complete(mut self) -> Result<Checkpoint, CrError> {
        let started = Instant::now();
        let ckpt = &mut self.0;
        for entry in &mut ckpt.tree.processes {
            let (ProcessKind::Live(st), Some(t)) = (&mut entry.kind, ckpt.templates.get(&entry.pid)) else {
                continue;
            };
            let late = capture::capture_late(t, entry.pid)?;
            st.sigactions = late.sigactions;
            st.mm.brk = late.brk;
        }
        let took = started.elapsed();
        ckpt.stats.total += took;
        ckpt.stats.phases.push(("after the call: signal actions, brk", took));
        Ok(self.0)
    }
}

/// Where restored memory comes from.
enum Memory<'a> {
    Templates(&'a Templates),
    /// An image chain; with `lazy`, private anonymous memory comes back on demand.
    Image {
        chain: Arc<Mutex<ImageChain>>,
        lazy: Option<LazyParts>,
    },
}

/// What a lazy restore needs of the engine.
#[derive(Clone)]
struct LazyParts {
    pager: Rc<Pager>,
    dev: Rc<OwnedFd>,
}

/// How a restore from an image brings memory back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryRestore {
    /// Every page is copied in before the processes run.
    Copy,
    /// Private anonymous memory comes in when touched (see [`crate::lazy`]); with `background_fill`, what
    /// is not touched is filled in while the pager is idle.
    OnDemand { background_fill: bool },
}

/// How restores from images bring memory back, and what they use for it.
struct Lazy {
    mode: MemoryRestore,
    parts: Option<LazyParts>,
    /// Lazy restore is not possible here (said once, when first tried).
    unavailable: bool,
}

/// What one restore did.
#[derive(Debug, Default)]
pub struct RestoreStats {
    pub total: Duration,
    pub processes: usize,
    /// Processes that took over a spare's memory (see [`Engine::prepare_spares`]).
    pub from_spares: usize,
    /// Bytes of saved memory left to come back on demand (see [`crate::lazy`]): 0 when every page was
    /// copied in.
    pub on_demand_bytes: u64,
    /// Terminal fds replaced by /dev/null and controlling terminals not given back, because their
    /// terminal is gone and could not be made again (see [`Degraded`]). Empty when everything came
    /// back as it was.
    pub degraded: Vec<Degraded>,
    /// Masters of the ptys the restore created (by pty number) because the restored processes had
    /// their slave open and the pty did not exist in the sandbox any more. The caller serves them
    /// (e.g. as shell sessions); closing one hangs its terminal up.
    pub pty_masters: BTreeMap<u32, OwnedFd>,
}

/// Checkpoint/restore engine. Not `Send`: ptrace attachments belong to the thread that made them, so
/// create it on the shim's dedicated DeltaCR thread and keep it there.
pub struct Engine {
    /// By (init's host pid, inode of its pid namespace): a recycled init pid of another sandbox gets
    /// its own.
    sandboxes: HashMap<(Pid, u64), SandboxState>,
    /// Holders killed and not collected yet (their exits free memory).
    dying: Vec<Stopped>,
    lazy: Lazy,
    _tracer_thread: PhantomData<*const ()>,
}

/// What the engine keeps per sandbox.
struct SandboxState {
    pids: PidSetter,
    /// Ptys made by restores: node at checkpoint time -> the node of the pty made to replace it.
    pty_aliases: HashMap<PtyNode, PtyNode>,
    holders: Vec<Holder>,
}

/// A spare a restored process took its memory from, kept (stopped) while the process uses that
/// memory: when the process is killed, the memory then still has a user and the process exits at
/// once; the holder, killed right after (without waiting), frees the memory on its own time. So a
/// kill does not wait for the page tables of the process to be torn down.
struct Holder {
    task: Stopped,
    /// The restored process (host pid; its pidfd tells when it is gone).
    partner: Pid,
    partner_fd: OwnedFd,
}

impl Holder {
    /// `task` holds the memory of `host` (pid `pid` in the sandbox), which took it over.
    fn new(task: Stopped, pid: i32, host: Pid) -> Result<Holder, RestoreError> {
        let partner_fd = sys::pidfd_open(host).map_err(|source| RestoreError::FileIo {
            pid,
            fd: -1,
            what: "open a pidfd",
            source,
        })?;
        Ok(Holder { task, partner: host, partner_fd })
    }

    /// True while the partner runs with the memory the holder holds (not after it exited or exec'd).
    fn in_use(&self) -> bool {
        matches!(sys::pidfd_exited(self.partner_fd.as_fd()), Ok(false))
            && matches!(sys::same_mm(self.partner, self.task.pid()), Ok(true))
    }
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

fn own_tid() -> i32 {
    nix::unistd::gettid().as_raw()
}

impl Engine {
    pub fn new() -> Engine {
        Engine {
            sandboxes: HashMap::new(),
            dying: Vec::new(),
            lazy: Lazy { mode: MemoryRestore::OnDemand { background_fill: true }, parts: None, unavailable: false },
            _tracer_thread: PhantomData,
        }
    }

    /// How restores from images bring memory back (on demand, filled in the background, by default).
    /// Processes restored earlier keep being served as they were.
    pub fn set_memory_restore(&mut self, mode: MemoryRestore) {
        if let (MemoryRestore::OnDemand { background_fill }, Some(p)) = (mode, &self.lazy.parts) {
            p.pager.set_background_fill(background_fill);
        }
        self.lazy.mode = mode;
    }

    /// What a lazy restore uses, started on first use; `None` (said once) where the kernel lacks
    /// /dev/userfaultfd: restores then copy memory whole.
    fn lazy_parts(&mut self) -> Option<LazyParts> {
        let MemoryRestore::OnDemand { background_fill } = self.lazy.mode else { return None };
        if self.lazy.unavailable {
            return None;
        }
        if self.lazy.parts.is_none() {
            let parts = crate::lazy::open_device().map_err(|e| format!("/dev/userfaultfd: {e}")).and_then(|dev| {
                Ok(LazyParts {
                    pager: Rc::new(Pager::start(background_fill).map_err(|e| e.to_string())?),
                    dev: Rc::new(dev),
                })
            });
            match parts {
                Ok(p) => self.lazy.parts = Some(p),
                Err(why) => {
                    tracing::warn!("restores from images copy memory whole: {why}");
                    self.lazy.unavailable = true;
                    return None;
                }
            }
        }
        self.lazy.parts.clone()
    }

    /// Brings every page still to come from an image into the processes restored lazily (also their
    /// forks). A checkpoint does it (with the sandbox frozen); calling it first, while the sandbox runs,
    /// keeps that work out of the checkpoint's pause.
    pub fn fill_lazy_memory(&self) -> Result<(), CrError> {
        match &self.lazy.parts {
            Some(p) => Ok(p.pager.fill_all()?),
            None => Ok(()),
        }
    }

    fn sandbox(&mut self, init: Pid) -> Result<&mut SandboxState, PidNsError> {
        let ns = std::fs::metadata(format!("/proc/{}/ns/pid", init.as_raw()))
            .map_err(|source| PidNsError::Enter { pid: init.as_raw(), source })?;
        // The state of sandboxes that are gone (their namespace died with them) is dropped.
        self.sandboxes.retain(|(pid, ino), _| {
            std::fs::metadata(format!("/proc/{}/ns/pid", pid.as_raw())).is_ok_and(|m| m.ino() == *ino)
        });
        match self.sandboxes.entry((init, ns.ino())) {
            std::collections::hash_map::Entry::Occupied(e) => Ok(e.into_mut()),
            std::collections::hash_map::Entry::Vacant(e) => {
                let pids = PidSetter::spawn(init)?;
                Ok(e.insert(SandboxState { pids, pty_aliases: HashMap::new(), holders: Vec::new() }))
            }
        }
    }

    /// Lets go of memory the engine keeps alive for no use: holders (see [`Engine::kill_processes`])
    /// whose process exited or exec'd are killed, and exited holders are collected. Cheap (one
    /// `kcmp` per holder); the other calls do it too. Call it now and then while the tracer thread
    /// is idle, so a finished process's memory is freed soon.
    pub fn tidy(&mut self) {
        for st in self.sandboxes.values_mut() {
            let (keep, unused): (Vec<Holder>, Vec<Holder>) = st.holders.drain(..).partition(Holder::in_use);
            st.holders = keep;
            for h in unused {
                h.task.kill();
                self.dying.push(h.task);
            }
        }
        self.dying.retain(|t| !t.try_collect());
    }

    fn pid_setter(&mut self, init: Pid) -> Result<&mut PidSetter, PidNsError> {
        Ok(&mut self.sandbox(init)?.pids)
    }

    /// The sandbox's processes, parents first, without our templates and helper.
    fn sandbox_processes(&mut self, init: Pid) -> Result<Vec<Pid>, CrError> {
        let helper = self.pid_setter(init)?.helper_pid();
        let me = own_tid();
        let mut skip = std::collections::HashSet::new();
        for kid in procfs::children(init)? {
            let Ok(st) = procfs::Status::read(kid) else {
                continue;
            };
            let traced_by_us = st.get("TracerPid").ok().and_then(|t| t.parse::<i32>().ok()) == Some(me);
            let is_helper = st.innermost("NSpid").ok() == Some(helper);
            if traced_by_us || is_helper {
                skip.insert(kid);
            }
        }
        Ok(capture::list_tree(init, &skip)?)
    }

    /// Checkpoints every process below init. Call it with the sandbox frozen by `frozen` (after any
    /// filesystem checkpoint): it thaws the sandbox through `frozen` once every running process is
    /// seized, and returns once the processes run again and the checkpoint is complete. On error nothing
    /// is left seized; a sandbox still frozen then is thawed when the caller drops `frozen`.
    pub fn checkpoint(&mut self, sb: &Sandbox, frozen: &mut Frozen<'_>) -> Result<Checkpoint, CrError> {
        self.checkpoint_at_thaw(sb, frozen)?.complete()
    }

    /// [`Engine::checkpoint`] up to what decides whether the checkpoint can be restored (it is checked,
    /// the sandbox runs again): the caller can answer then, and [`Partial::complete`] the rest (signal
    /// actions and `brk`, ~65 injected calls per process) on this thread afterwards.
    pub fn checkpoint_at_thaw(&mut self, sb: &Sandbox, frozen: &mut Frozen<'_>) -> Result<Partial, CrError> {
        let start = Instant::now();
        let mut phases = Phases::new();
        self.tidy();
        // Memory still to come from an image shows as absent to everything that reads page tables.
        self.fill_lazy_memory()?;
        phases.mark("memory restored on demand");
        let last_pid = self.pid_setter(sb.init)?.last_pid()?;
        let listed = self.sandbox_processes(sb.init);
        let mut stopped_tree = StoppedTree::new(self.pid_setter(sb.init)?);
        stopped_tree.seize_all(listed, frozen, &mut phases)?;
        stopped_tree.reserve_pids(last_pid)?;
        stopped_tree.capture_live()?;
        phases.mark("registers and signals");
        let (files, tables) = stopped_tree.capture_fds()?;
        phases.mark("fds");
        let (ipc, attachments) = crate::ipc::capture(sb.init, &stopped_tree.hosts())?;
        phases.mark("IPC objects");
        let entries = stopped_tree.make_templates(sb.init, &files, tables, attachments)?;
        stopped_tree.resume_all()?;
        phases.mark("templates, resume");
        let stopped = start.elapsed();
        let (processes, templates, threads) = complete_from_templates(entries)?;
        phases.mark("state shared with templates");
        let tree = TreeState { processes, files, last_pid, ipc };
        // A checkpoint that could not be restored must not be reported as one: check the restore plan now
        // (dropping the templates on failure).
        plan::plan(&tree)?;
        let stats = CheckpointStats {
            stopped,
            total: start.elapsed(),
            processes: tree.processes.len(),
            threads,
            phases: phases.done,
        };
        Ok(Partial(Checkpoint { tree, templates, stats }))
    }

    /// Kills every process of the sandbox except init, our templates, spares and helper, and waits until
    /// init has reaped them. A process restored from a spare exits at once: its memory is freed
    /// afterwards by the spare, which kept it (see [`Engine::tidy`]). No freeze is needed: a process forked while we list and kill (its parent
    /// listed before it existed) shows up in the next listing and is killed then; killed processes
    /// cannot fork, so this ends.
    pub fn kill_processes(&mut self, sb: &Sandbox) -> Result<(), CrError> {
        let deadline = Instant::now() + KILL_TIMEOUT;
        // Pidfds of the processes killed so far: a pidfd reports POLLHUP once its process is reaped.
        let mut dying: HashMap<Pid, OwnedFd> = HashMap::new();
        loop {
            let left = self.sandbox_processes(sb.init)?;
            if left.is_empty() {
                if let Some(p) = &self.lazy.parts {
                    p.pager.forget(sb.init)?;
                }
                // The victims' memory is held by their holders: freeing it is theirs to do, later.
                let holders = std::mem::take(&mut self.sandbox(sb.init)?.holders);
                for h in holders {
                    h.task.kill();
                    self.dying.push(h.task);
                }
                self.dying.retain(|t| !t.try_collect());
                return Ok(());
            }
            for p in left {
                if let std::collections::hash_map::Entry::Vacant(e) = dying.entry(p) {
                    // Gone already (ESRCH) is fine.
                    if let Ok(fd) = sys::pidfd_open(p) {
                        let _ = rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL);
                        e.insert(fd);
                    }
                }
            }
            tracing::debug!(victims = ?dying.keys().collect::<Vec<_>>(), "killed");
            let timeout = deadline.saturating_duration_since(Instant::now()).min(KILL_POLL);
            if timeout.is_zero() {
                return Err(self.survivors(sb.init));
            }
            sys::wait_all_hung_up(dying.values(), timeout).map_err(CrError::Kill)?;
            dying.retain(|_, fd| !sys::hung_up(fd.as_fd()));
        }
    }

    /// The error for processes that survived SIGKILL, naming them.
    fn survivors(&mut self, init: Pid) -> CrError {
        let left = self.sandbox_processes(init).unwrap_or_default();
        let states: Vec<String> = left
            .iter()
            .map(|p| {
                let st = procfs::Status::read(*p);
                let get = |k| st.as_ref().ok().and_then(|s| s.get(k).ok().map(str::to_string));
                format!("{p} (state {:?}, parent {:?})", get("State"), get("PPid"))
            })
            .collect();
        CrError::Unsupported {
            pid: 0,
            comm: String::new(),
            reason: format!("processes did not go away after SIGKILL: {}", states.join(", ")),
        }
    }

    /// Recreates the checkpoint's processes in the sandbox, whose processes (except init) must be gone.
    /// Every process keeps its pid. Processes whose parent is init are copy-on-write clones of their
    /// templates; the others are forked by their restored parent and get their memory copied from
    /// their template. Nothing runs until the whole tree is in place; on error the partially restored
    /// processes are killed.
    pub fn restore(&mut self, ckpt: &Checkpoint, sb: &Sandbox) -> Result<RestoreStats, CrError> {
        self.restore_tree(&ckpt.tree, Memory::Templates(&ckpt.templates), sb)
    }

    /// Gives every template of a process whose parent is init a spare, unless it has one: a
    /// copy-on-write fork made ahead of time, so that the next [`Engine::restore`] of `ckpt` takes it
    /// over instead of copying page tables (the part of a restore that grows with memory; a spare
    /// serves one restore). Costs what it saves (one fork of each template) and the spares' page
    /// tables; the sandbox runs meanwhile. Call it when the tracer thread is idle, e.g. right after a
    /// checkpoint or a rollback of the checkpoints likely to be restored next. Returns how many spares
    /// were made.
    pub fn prepare_spares(&mut self, ckpt: &Checkpoint, sb: &Sandbox) -> Result<usize, CrError> {
        self.tidy();
        let pids = self.pid_setter(sb.init)?;
        let last = pids.last_pid()?;
        // Spares take pids from the reserved range, as templates do; the sandbox may fork meanwhile
        // (it runs), so its next pid is only kept when it did not.
        pids.set_last_pid(pids.reserved_floor())?;
        let mut made = 0;
        let res = (|| -> Result<(), CrError> {
            for p in ckpt.tree.processes.iter().filter(|p| p.ppid == 1) {
                if let Some(t) = ckpt.templates.get(&p.pid).filter(|t| t.alive()) {
                    made += usize::from(t.make_spare()?);
                }
            }
            Ok(())
        })();
        pids.set_last_pid(last)?;
        res.map(|()| made)
    }

    /// Recreates the processes of a durable image (and its parents) in a sandbox — the one it was taken
    /// in or another (fork; `moved` when its own address differs). Same guarantees as [`Engine::restore`].
    /// Private anonymous memory comes back from the images when touched (see [`crate::lazy`]), other
    /// memory is copied now.
    pub fn restore_image(
        &mut self,
        chain: ImageChain,
        sb: &Sandbox,
        moved: Option<AddressMove>,
    ) -> Result<RestoreStats, CrError> {
        let mut tree = chain.head().tree.clone();
        if let Some(moved) = moved {
            tree.move_address(moved);
        }
        let lazy = self.lazy_parts();
        self.restore_tree(&tree, Memory::Image { chain: Arc::new(Mutex::new(chain)), lazy }, sb)
    }

    fn restore_tree(&mut self, tree: &TreeState, mut mem: Memory<'_>, sb: &Sandbox) -> Result<RestoreStats, CrError> {
        let start = Instant::now();
        let mut ptys = PtyPlan::new(tree, sb.init, &self.sandbox(sb.init)?.pty_aliases)?;
        let plan = plan::plan(tree)?;
        let pids = self.pid_setter(sb.init)?;
        // The sandbox's processes are gone: its IPC namespace gets the checkpoint's objects (processes
        // attach to segments as they are made).
        crate::ipc::restore(sb.init, &tree.ipc)?;
        let mut restoring = Restoring::new(tree, plan);
        restoring.create_all(&mut mem, sb, pids, &mut ptys)?;
        restoring.lead_orphaned_groups(pids)?;
        restoring.join_groups()?;
        restoring.create_late_zombies(pids)?;
        restoring.end_group_helpers()?;
        restoring.set_foregrounds(&mut ptys)?;
        restoring.end_session_helpers()?;
        restoring.finish_all()?;
        crate::ipc::remove_again(sb.init, &tree.ipc)?;
        pids.set_last_pid(tree.last_pid)?;
        let on_demand_bytes = restoring.on_demand;
        let (processes, holders) = restoring.release_all()?;
        let degraded = ptys.degraded(tree);
        for d in &degraded {
            tracing::warn!("restore: {d}");
        }
        let (pty_masters, aliases) = ptys.into_created();
        let state = self.sandbox(sb.init)?;
        state.pty_aliases.extend(aliases);
        let from_spares = holders.len();
        state.holders.extend(holders);
        Ok(RestoreStats { total: start.elapsed(), processes, from_spares, on_demand_bytes, degraded, pty_masters })
    }
}

/// A restore under way: the tasks made so far. Dropping it kills them all (each `NewProcess`, helper
/// and holder kills its task unless it was released or ended), so an error at any step of
/// [`Engine::restore_tree`] undoes the whole restore; [`Restoring::release_all`] lets the processes run.
struct Restoring<'c> {
    tree: &'c TreeState,
    plan: plan::RestorePlan,
    // Dropped in this order: helpers first, the restored processes last.
    /// Leaders of groups whose leader has exited, while their members join.
    group_helpers: Vec<Helper>,
    /// They exit before anything runs.
    session_helpers: Vec<SessionHelper>,
    /// Spares whose memory a restored process took over.
    holders: Vec<Holder>,
    /// The restored processes, parents first.
    made: Vec<(NewProcess, &'c ProcessEntry)>,
    /// Per pid: how many of its seccomp filters the new process already has from its creator.
    inherited: HashMap<i32, usize>,
    /// Zombies that are not group leaders join their parent's group, which is final only at the end.
    late_zombies: Vec<(&'c ProcessEntry, i32)>,
    /// Bytes of saved memory left to come back on demand.
    on_demand: u64,
    /// TCP connections made by session helpers, which exit before the connections leave repair mode.
    repaired_tcp: Vec<files::RepairedTcp>,
    /// Ends of split unix socket pairs on their way to the process that holds them.
    held: files::HeldEnds,
}

/// How a new task starts: unless it is a copy-on-write clone of its template, the credentials it has
/// (its memory is then rebuilt) and the signal actions of the process it was forked from, when known.
type Start<'c> = Option<(Creds, Option<&'c [SigAction]>)>;

impl<'c> Restoring<'c> {
    fn new(tree: &'c TreeState, plan: plan::RestorePlan) -> Restoring<'c> {
        Restoring {
            tree,
            plan,
            group_helpers: Vec::new(),
            session_helpers: Vec::new(),
            holders: Vec::new(),
            made: Vec::new(),
            inherited: HashMap::new(),
            late_zombies: Vec::new(),
            on_demand: 0,
            repaired_tcp: Vec::new(),
            held: files::HeldEnds::new(),
        }
    }

    /// Creates the session helpers and processes in the plan's order (every process after its creator).
    /// Each process gets all its state but its process group, its terminal's foreground group and what
    /// [`NewProcess::finish`] loads.
    fn create_all(
        &mut self,
        mem: &mut Memory<'_>,
        sb: &Sandbox,
        pids: &mut PidSetter,
        ptys: &mut PtyPlan,
    ) -> Result<(), CrError> {
        let tree = self.tree;
        for i in 0..self.plan.steps.len() {
            match self.plan.steps[i] {
                Step::SessionHelper { sid } => {
                    let helper = SessionHelper::create(sid, tree, &self.plan, mem, sb, pids, (ptys, &mut self.held))?;
                    self.session_helpers.push(helper);
                }
                Step::Process { index } => {
                    let entry = &tree.processes[index];
                    match &entry.kind {
                        ProcessKind::Live(st) => self.create_process(entry, st, mem, sb, pids, ptys)?,
                        ProcessKind::Zombie { exit_status } if entry.pgid == entry.pid => {
                            restore_zombie(&mut self.made, pids, entry, *exit_status)?;
                        }
                        ProcessKind::Zombie { exit_status } => self.late_zombies.push((entry, *exit_status)),
                    }
                }
            }
        }
        Ok(())
    }

    /// Creates live process `entry` and gives it its memory, session, fds, terminal, threads and
    /// per-thread state.
    fn create_process(
        &mut self,
        entry: &'c ProcessEntry,
        st: &'c ProcessState,
        mem: &mut Memory<'_>,
        sb: &Sandbox,
        pids: &mut PidSetter,
        ptys: &mut PtyPlan,
    ) -> Result<(), CrError> {
        let template = match mem {
            Memory::Templates(t) => t.get(&entry.pid).filter(|t| t.alive()),
            Memory::Image { .. } => None,
        };
        if matches!(mem, Memory::Templates(_)) && template.is_none() {
            return Err(CrError::NoTemplate { pid: entry.pid });
        }
        let (host, gadget, start) = self.new_task(entry, st, template, sb, pids)?;
        let mut np = NewProcess::take(host, entry.pid, gadget)?;
        if start.is_none() {
            // The template's cwd may name a directory that was deleted (and brought back by the
            // filesystem rollback) since: enter it again by path.
            np.enter_cwd(&st.cwd)?;
        }
        if self.plan.creators[&entry.pid] == Creator::Init && template.is_none() {
            // A fork of init holds init's fds.
            np.close_all_fds()?;
        }
        if let Some((creds, parent_actions)) = start {
            let unreadable = |e: std::io::Error| CrError::Unsupported {
                pid: entry.pid,
                comm: entry.comm.clone(),
                reason: format!("cannot read its template's memory: {e}"),
            };
            match (&mut *mem, template) {
                (Memory::Templates(_), Some(t)) => {
                    // The mappings' flags (grows-down) come from the template, read now (see Partial).
                    let mut st = st.clone();
                    let smaps = procfs::smaps(t.pid()).map_err(CrError::Proc)?;
                    capture::fill_vm_flags(&mut st.vmas, &smaps).map_err(|addr| CrError::Unsupported {
                        pid: entry.pid,
                        comm: entry.comm.clone(),
                        reason: format!("its template has no mapping at {addr:#x} any more"),
                    })?;
                    np.rebuild_memory(&st, &mut ProcessPages::open(t.pid()).map_err(unreadable)?, None)?;
                }
                (Memory::Image { chain, lazy }, _) => {
                    let mut feed = Feed { chain: chain.clone(), pid: entry.pid };
                    let lazy = lazy.as_ref().map(|l| LazyRestore {
                        pager: &l.pager,
                        dev: l.dev.as_fd(),
                        feed: feed.clone(),
                        init: sb.init,
                    });
                    self.on_demand += np.rebuild_memory(st, &mut feed, lazy.as_ref())?;
                }
                (Memory::Templates(_), None) => unreachable!("checked above"),
            }
            np.restore_static(st, &creds, parent_actions)?;
        }
        self.made.push((np, entry));
        let np = &mut self.made.last_mut().expect("just pushed").0;
        if entry.sid == entry.pid {
            np.set_session_leader()?;
        }
        let create = self.plan.create.get(&entry.pid).map_or(&[][..], Vec::as_slice);
        np.restore_fds(&st.fds, create, &self.tree.files, &self.plan.fds, ptys, &mut self.held)?;
        np.map_shared_memory(&st.vmas, &self.tree.files, &self.tree.ipc, &self.plan.fds)?;
        if let Some(ctty) = &st.ctty {
            np.set_controlling_tty(ctty, &st.fds, &self.tree.files, ptys)?;
        }
        np.restore_process_misc(st)?;
        np.create_threads(st, pids)?;
        np.restore_thread_state(st)?;
        Ok(())
    }

    /// Creates the task of live process `entry` as the plan says, with its pid: the new task, the
    /// syscall instruction to inject with, and how it starts. Records the seccomp filters it inherits.
    fn new_task(
        &mut self,
        entry: &'c ProcessEntry,
        st: &ProcessState,
        template: Option<&Template>,
        sb: &Sandbox,
        pids: &mut PidSetter,
    ) -> Result<(Pid, u64, Start<'c>), CrError> {
        let in_session = (libc::CLONE_PARENT | libc::SIGCHLD) as u64;
        let creator = self.plan.creators[&entry.pid];
        let session_helper = match creator {
            Creator::InSession { creator } => self.session_helpers.iter_mut().find(|h| h.sid == creator),
            Creator::Init | Creator::Parent => None,
        };
        Ok(match (creator, template, session_helper) {
            (_, _, Some(h)) => {
                tracing::debug!(pid = entry.pid, session = h.sid, "restoring by fork from a session helper");
                // The copy-on-write member takes over the memory of the spare the helper was made
                // from, if any (see below).
                let cow = h.cow == Some(entry.pid);
                let spare = if cow { h.spare.take() } else { None };
                let flags = if spare.is_some() { in_session | libc::CLONE_VM as u64 } else { in_session };
                let host = h.np.fork_child(pids, entry.pid, flags)?;
                if let Some(task) = spare {
                    self.holders.push(Holder::new(task, entry.pid, host)?);
                }
                if cow {
                    self.inherited.insert(entry.pid, st.seccomp.len());
                    (host, h.np.gadget(), None)
                } else {
                    self.inherited.insert(entry.pid, h.filters);
                    (host, h.np.gadget(), Some((h.creds.clone(), None)))
                }
            }
            (Creator::Init, Some(t), None) => {
                // With a spare, the process shares the spare's memory (CLONE_VM: no page tables
                // copied); the spare, stopped for good, becomes its holder.
                let spare = t.take_spare();
                let (source, flags) = match &spare {
                    Some(s) => (s, libc::CLONE_VM | libc::CLONE_PARENT | libc::SIGCHLD),
                    None => (t.task(), libc::CLONE_PARENT | libc::SIGCHLD),
                };
                tracing::debug!(pid = entry.pid, source = source.pid().as_raw(), "restoring from template");
                let host = clone_stopped(pids, source, entry.pid, flags as u64)?;
                if let Some(task) = spare {
                    self.holders.push(Holder::new(task, entry.pid, host)?);
                }
                self.inherited.insert(entry.pid, st.seccomp.len());
                (host, t.gadget(), None)
            }
            (Creator::Init, None, None) => {
                tracing::debug!(pid = entry.pid, "restoring by fork from init");
                let f = restore::fork_from_init(sb.init, pids, entry.pid)?;
                self.inherited.insert(entry.pid, f.filters);
                (f.child, f.gadget, Some((f.creds, None)))
            }
            (Creator::Parent | Creator::InSession { .. }, _, None) => {
                let (creator, flags) = match creator {
                    Creator::InSession { creator } => (creator, in_session),
                    _ => (entry.ppid, st.exit_signal as u64 & 0xff),
                };
                tracing::debug!(pid = entry.pid, creator, "restoring by fork");
                let pidx =
                    self.made.iter().position(|(_, e)| e.pid == creator).expect("the plan orders creators first");
                let creator_entry: &ProcessEntry = self.made[pidx].1;
                let ProcessKind::Live(pst) = &creator_entry.kind else {
                    unreachable!("only live processes are kept in `made`")
                };
                // The creator has only the seccomp filters it was created with until it finishes.
                self.inherited.insert(entry.pid, self.inherited[&creator]);
                let p = &mut self.made[pidx].0;
                (
                    p.fork_child(pids, entry.pid, flags)?,
                    p.gadget(),
                    Some((pst.creds.clone(), Some(&pst.sigactions[..]))),
                )
            }
        })
    }

    /// Process groups whose leader has exited get a helper that leads them while their members join.
    fn lead_orphaned_groups(&mut self, pids: &mut PidSetter) -> Result<(), CrError> {
        for g in &self.plan.group_helpers {
            let creator = match self.session_helpers.iter_mut().find(|h| h.sid == g.creator) {
                Some(h) => &mut h.np,
                None => {
                    &mut self
                        .made
                        .iter_mut()
                        .find(|(_, e)| e.pid == g.creator)
                        .expect("the plan names a restored creator")
                        .0
                }
            };
            let mut helper = creator.clone_helper(pids, g.pgid)?;
            helper.lead_group()?;
            self.group_helpers.push(helper);
        }
        Ok(())
    }

    /// Puts the processes into their process groups: leaders first, then members (a group must exist
    /// before others join it).
    fn join_groups(&mut self) -> Result<(), CrError> {
        for leaders_pass in [true, false] {
            for (np, e) in &mut self.made {
                let is_leader = e.pgid == e.pid;
                if e.sid == e.pid || e.pgid == 0 || is_leader != leaders_pass {
                    continue;
                }
                np.set_process_group(e.pgid)?;
            }
        }
        Ok(())
    }

    /// Re-creates the zombies that join their parent's process group, now that it is final.
    fn create_late_zombies(&mut self, pids: &mut PidSetter) -> Result<(), CrError> {
        for (entry, exit_status) in std::mem::take(&mut self.late_zombies) {
            restore_zombie(&mut self.made, pids, entry, exit_status)?;
        }
        Ok(())
    }

    fn end_group_helpers(&mut self) -> Result<(), CrError> {
        for helper in self.group_helpers.drain(..) {
            helper.exit()?;
        }
        Ok(())
    }

    /// Terminals get their foreground process group once every group exists.
    fn set_foregrounds(&mut self, ptys: &mut PtyPlan) -> Result<(), CrError> {
        for (np, e) in &mut self.made {
            if let ProcessKind::Live(st) = &e.kind {
                if let Some(ctty) = &st.ctty {
                    np.set_foreground(ctty, &st.fds, &self.tree.files, ptys)?;
                }
            }
        }
        Ok(())
    }

    fn end_session_helpers(&mut self) -> Result<(), CrError> {
        for mut helper in self.session_helpers.drain(..) {
            self.repaired_tcp.append(&mut helper.np.repaired_tcp);
            helper.np.exit_helper()?;
        }
        Ok(())
    }

    /// Loads each process's final state (see [`NewProcess::finish`]); nothing runs yet.
    fn finish_all(&mut self) -> Result<(), CrError> {
        for (np, e) in &mut self.made {
            let ProcessKind::Live(st) = &e.kind else {
                continue;
            };
            let inherited = self.inherited.get(&e.pid).copied().unwrap_or(0);
            if st.seccomp.get(..inherited).is_none() {
                return Err(CrError::Unsupported {
                    pid: e.pid,
                    comm: e.comm.clone(),
                    reason: "it has fewer seccomp filters than the process it is restored from".into(),
                });
            }
            np.finish(st, &self.plan.fds, self.plan.zombie_parents.contains(&e.pid), inherited)?;
        }
        Ok(())
    }

    /// Lets every restored process run; returns how many there are and the holders of the memory
    /// they took over. A process not released yet when one fails is killed.
    fn release_all(mut self) -> Result<(usize, Vec<Holder>), CrError> {
        // Every end of every connection exists now: they may talk.
        for (np, _) in &mut self.made {
            self.repaired_tcp.append(&mut np.repaired_tcp);
        }
        for conn in self.repaired_tcp.drain(..) {
            conn.finish()?;
        }
        let processes = self.made.len();
        for (np, _) in self.made.drain(..) {
            np.release()?;
        }
        Ok((processes, std::mem::take(&mut self.holders)))
    }
}

/// Injects `clone(flags)` into `t` (a template's task or spare) so that the new task gets pid `want`
/// (see [`restore::create_with_pid`]).
fn clone_stopped(pids: &mut PidSetter, t: &Stopped, want: i32, flags: u64) -> Result<Pid, RestoreError> {
    restore::create_with_pid(
        pids,
        want,
        want,
        |t: &mut &Stopped| Ok(t.clone_child(flags)?),
        |_, wrong| {
            NewProcess::kill_host(wrong);
            Ok(())
        },
        &mut &*t,
    )
}

/// Re-creates a zombie: forked by its restored parent, then it exits as it did.
fn restore_zombie(
    made: &mut [(NewProcess, &ProcessEntry)],
    pids: &mut PidSetter,
    entry: &ProcessEntry,
    exit_status: i32,
) -> Result<(), CrError> {
    let p = &mut made.iter_mut().find(|(_, e)| e.pid == entry.ppid).expect("the plan orders parents first").0;
    let host = p.fork_child(pids, entry.pid, libc::SIGCHLD as u64)?;
    let mut z = NewProcess::take(host, entry.pid, p.gadget())?;
    if entry.sid == entry.pid {
        z.set_session_leader()?;
    } else if entry.pgid == entry.pid {
        z.set_process_group(entry.pid)?;
    }
    z.become_zombie(&entry.comm, exit_status)?;
    Ok(())
}

/// A helper that re-creates a session whose leader has exited (see [`plan::Creator::InSession`]): a
/// child of init with the leader's pid that calls setsid, creates the open files its processes share,
/// and forks them (with CLONE_PARENT: they are children of init, as they were); it exits before
/// anything runs.
struct SessionHelper {
    np: NewProcess,
    sid: i32,
    /// With templates, the helper shares the memory of one process's template (the largest one), so
    /// that process is a copy-on-write clone of it; the others get their memory copied.
    cow: Option<i32>,
    /// When that template had a spare, the helper shares the spare's memory instead, and the process
    /// takes it over (`CLONE_VM`, no page tables copied); the spare then becomes its holder.
    spare: Option<Stopped>,
    /// Credentials and number of seccomp filters of the processes it forks.
    creds: Creds,
    filters: usize,
}

impl SessionHelper {
    fn create(
        sid: i32,
        tree: &TreeState,
        plan: &plan::RestorePlan,
        mem: &Memory<'_>,
        sb: &Sandbox,
        pids: &mut PidSetter,
        (ptys, held): (&mut PtyPlan, &mut files::HeldEnds),
    ) -> Result<SessionHelper, CrError> {
        let members = &plan.session_helpers[&sid];
        tracing::debug!(sid, ?members, "re-creating a session whose leader has exited");
        let mut spare = None;
        let (host, gadget, cow, creds, filters) = match mem {
            Memory::Templates(templates) => {
                let (pid, st) = members
                    .iter()
                    .filter_map(|pid| match &tree.processes.iter().find(|p| p.pid == *pid)?.kind {
                        ProcessKind::Live(st) => Some((*pid, st)),
                        ProcessKind::Zombie { .. } => None,
                    })
                    .max_by_key(|(_, st)| st.vmas.iter().filter(|v| v.dumped).map(Vma::len).sum::<u64>())
                    .expect("a session helper has live members");
                let t = templates.get(&pid).filter(|t| t.alive()).ok_or(CrError::NoTemplate { pid })?;
                spare = t.take_spare();
                let source = spare.as_ref().unwrap_or(t.task());
                let host =
                    clone_stopped(pids, source, sid, (libc::CLONE_VM | libc::CLONE_PARENT | libc::SIGCHLD) as u64)?;
                (host, t.gadget(), Some(pid), st.creds.clone(), st.seccomp.len())
            }
            Memory::Image { .. } => {
                let f = restore::fork_from_init(sb.init, pids, sid)?;
                (f.child, f.gadget, None, f.creds, f.filters)
            }
        };
        let mut np = NewProcess::take(host, sid, gadget)?;
        let no_create = Vec::new();
        let res = (|| {
            np.set_session_leader()?;
            np.close_all_fds()?;
            np.restore_fds(&[], plan.create.get(&sid).unwrap_or(&no_create), &tree.files, &plan.fds, ptys, held)
        })();
        // Even after an error: the scratch memory may be in a template's address space.
        let freed = np.free_scratch();
        res?;
        freed?;
        Ok(SessionHelper { np, sid, cow, spare, creds, filters })
    }
}

/// The processes of a checkpoint while they are stopped under us: every step of [`Engine::checkpoint`]
/// that stops or changes something records it here, and dropping the tree undoes it all — the pid
/// counter is put back and every process is let go (detached, or resumed with its registers) — so an
/// error at any step leaves the sandbox running as it was. [`StoppedTree::resume_all`] does the same on
/// success and reports its errors.
struct StoppedTree<'a> {
    pids: &'a mut PidSetter,
    /// The sandbox's pid counter, to put back once templates have taken reserved pids.
    last_pid: Option<i32>,
    /// Seized, not captured yet.
    seized: Vec<SeizedProcess>,
    /// Captured, with injectors on their threads.
    live: Vec<LiveProcess>,
    /// Zombies whose parent is in the tree.
    zombies: Vec<SeizedProcess>,
}

impl<'a> StoppedTree<'a> {
    fn new(pids: &'a mut PidSetter) -> StoppedTree<'a> {
        StoppedTree { pids, last_pid: None, seized: Vec::new(), live: Vec::new(), zombies: Vec::new() }
    }

    /// Seizes every listed process, thaws the sandbox through `frozen`, and waits until every seized
    /// thread is stopped. Tasks frozen by the cgroup v1 freezer sit in the kernel and enter ptrace-stop
    /// only once thawed; the interrupt queued by the seize stops them before they run any user code.
    /// PTRACE_SEIZE of a process in job-control stop waits until the process has moved to a traced stop,
    /// which a frozen process cannot do: those are seized after the thaw (they stay stopped, so they
    /// cannot run meanwhile).
    fn seize_all(
        &mut self,
        listed: Result<Vec<Pid>, CrError>,
        frozen: &mut Frozen<'_>,
        phases: &mut Phases,
    ) -> Result<(), CrError> {
        let mut job_stopped = Vec::new();
        let seized = listed.and_then(|pids| {
            for p in pids {
                if procfs::job_control_stopped(p) {
                    job_stopped.push(p);
                    continue;
                }
                tracing::debug!(pid = p.as_raw(), "seizing");
                self.seized.push(capture::seize_process(p)?);
            }
            Ok(())
        });
        phases.mark("list+seize");
        frozen.thaw().map_err(CrError::Freezer)?;
        phases.mark("thaw");
        seized?;
        for p in job_stopped {
            tracing::debug!(pid = p.as_raw(), "seizing (job-control stopped)");
            self.seized.push(capture::seize_process(p)?);
        }
        for s in &mut self.seized {
            s.wait_stopped()?;
        }
        phases.mark("wait for stops");
        Ok(())
    }

    /// Makes templates take their pids from the reserved top of the range (see
    /// [`PidSetter::reserved_floor`]); the counter is put back to `last_pid` before anything else runs.
    fn reserve_pids(&mut self, last_pid: i32) -> Result<(), CrError> {
        self.last_pid = Some(last_pid);
        let floor = self.pids.reserved_floor();
        Ok(self.pids.set_last_pid(floor)?)
    }

    /// Captures what only the live processes have (see [`capture::capture_live`]). Zombie children of
    /// init are left out: init reaps them, they are not part of the sandbox's state.
    fn capture_live(&mut self) -> Result<(), CrError> {
        while !self.seized.is_empty() {
            let s = self.seized.remove(0);
            match s.zombie {
                Some(_) if s.ids.ppid == 1 => {}
                Some(_) => self.zombies.push(s),
                None => self.live.push(capture::capture_live(s)?),
            }
        }
        Ok(())
    }

    /// The open files of the live processes, and their fd tables (in the order of `live`).
    /// The host pids of the live processes.
    fn hosts(&self) -> Vec<Pid> {
        self.live.iter().map(|l| l.seized.pid).collect()
    }

    fn capture_fds(&self) -> Result<(Vec<OpenFile>, Vec<Vec<FdState>>), CrError> {
        let owners: Vec<FdOwner> =
            self.live.iter().map(|l| FdOwner { host: l.seized.pid, ns_pid: l.seized.ids.pid }).collect();
        Ok(files::capture(&owners)?)
    }

    /// Makes a template of each live process and puts together what was captured of every process;
    /// the state a process shares with its template is read later, from the template, while the
    /// sandbox runs (see [`complete_from_templates`]).
    fn make_templates(
        &mut self,
        init: Pid,
        files: &[OpenFile],
        tables: Vec<Vec<FdState>>,
        attachments: Vec<Vec<Vma>>,
    ) -> Result<Vec<(ProcessEntry, Option<Template>)>, CrError> {
        let init_sid = capture::ns_ids(init)?.sid;
        // Host process group -> process group in the sandbox, to translate a terminal's foreground group.
        let mut pgids = HashMap::new();
        for l in &self.live {
            pgids.insert(capture::host_pgid(l.seized.pid)?, l.seized.ids.pgid);
        }
        let mut out = Vec::new();
        for ((l, fds), sysv) in self.live.iter_mut().zip(tables).zip(attachments) {
            let ids = l.seized.ids;
            let detach = if ids.ppid == 1 && ids.sid != ids.pid && (ids.sid == init_sid || ids.sid == 0) {
                Detach::ProcessGroup
            } else {
                Detach::Session
            };
            let ctty = match capture::controlling_pty(l.seized.pid)? {
                Some((index, fg)) if ids.sid == ids.pid => {
                    let owner = FdOwner { host: l.seized.pid, ns_pid: ids.pid };
                    Some(files::controlling_tty(&owner, index, pgids.get(&fg).copied(), &fds, files)?)
                }
                _ => None,
            };
            let t = template::create(&mut l.injectors[0], l.gadget, detach)?;
            t.detach_segments(&sysv).map_err(|source| TemplateError::Create { pid: ids.pid, source })?;
            tracing::debug!(pid = ids.pid, template = t.pid().as_raw(), ?detach, "template made");
            let mut entry = live_entry(l, fds, ctty);
            // Until the template's mappings join them (complete_from_templates).
            if let ProcessKind::Live(st) = &mut entry.kind {
                st.vmas = sysv;
            }
            out.push((entry, Some(t)));
        }
        for z in &self.zombies {
            let kind = ProcessKind::Zombie { exit_status: z.zombie.unwrap_or(0) };
            let entry = ProcessEntry {
                pid: z.ids.pid,
                ppid: z.ids.ppid,
                pgid: z.ids.pgid,
                sid: z.ids.sid,
                comm: z.comm.clone(),
                kind,
            };
            out.push((entry, None));
        }
        Ok(out)
    }

    /// Puts the pid counter back and lets every process run again; the first error.
    fn resume_all(mut self) -> Result<(), CrError> {
        self.release()
    }

    fn release(&mut self) -> Result<(), CrError> {
        let mut first_err = None;
        if let Some(last_pid) = self.last_pid.take() {
            first_err = self.pids.set_last_pid(last_pid).err().map(CrError::from);
        }
        for s in self.seized.drain(..).chain(self.zombies.drain(..)) {
            s.detach();
        }
        for l in self.live.drain(..) {
            if let Err(e) = l.resume() {
                first_err.get_or_insert(e.into());
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for StoppedTree<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!(error = %e, "releasing the processes of a failed checkpoint");
        }
    }
}

/// The entry of a live process as captured while it was stopped; the state it shares with its template
/// is filled in by [`complete_from_templates`].
fn live_entry(l: &LiveProcess, fds: Vec<FdState>, ctty: Option<Ctty>) -> ProcessEntry {
    let ids = l.seized.ids;
    let st = ProcessState {
        threads: l.threads.clone(),
        shared_pending: l.shared_pending.clone(),
        fds,
        itimers: l.itimers,
        pdeath_signal: l.pdeath_signal,
        child_subreaper: l.child_subreaper,
        dumpable: l.dumpable,
        oom_score_adj: l.oom_score_adj,
        job_stopped: l.seized.job_stopped(),
        ctty,
        ..ProcessState::default()
    };
    ProcessEntry {
        pid: ids.pid,
        ppid: ids.ppid,
        pgid: ids.pgid,
        sid: ids.sid,
        comm: l.seized.comm.clone(),
        kind: ProcessKind::Live(Box::new(st)),
    }
}

/// Reads from each template what its process shares with it and decides whether it can be restored (see
/// [`capture::capture_static`]); returns
/// the processes (parents first), the templates by pid, and the number of threads.
fn complete_from_templates(
    entries: Vec<(ProcessEntry, Option<Template>)>,
) -> Result<(Vec<ProcessEntry>, Templates, usize), CrError> {
    let mut processes = Vec::with_capacity(entries.len());
    let mut templates = HashMap::new();
    let mut threads = 0;
    for (mut entry, t) in entries {
        if let (ProcessKind::Live(st), Some(t)) = (&mut entry.kind, &t) {
            let s = capture::capture_static(t, entry.pid)?;
            st.creds = s.creds;
            st.seccomp = s.seccomp;
            st.personality = s.personality;
            st.umask = s.umask;
            st.rlimits = s.rlimits;
            st.cwd = s.cwd;
            st.root = s.root;
            st.mm = s.mm;
            // The template has every mapping but the SysV attachments, read from the live process.
            let sysv = std::mem::take(&mut st.vmas);
            st.vmas = s.vmas;
            st.vmas.extend(sysv);
            st.vmas.sort_by_key(|v| v.start);
            st.exit_signal = s.exit_signal;
            threads += st.threads.len();
        }
        if let Some(t) = t {
            templates.insert(entry.pid, t);
        }
        processes.push(entry);
    }
    sort_parents_first(&mut processes);
    Ok((processes, templates, threads))
}

/// How long killed processes may take to go away.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for killed processes before looking for new ones.
const KILL_POLL: Duration = Duration::from_millis(50);

/// Records how long each step took.
struct Phases {
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn new() -> Phases {
        Phases { last: Instant::now(), done: Vec::new() }
    }
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.done.push((name, now - self.last));
        self.last = now;
    }
}

/// Orders processes so that every parent comes before its children (stable otherwise).
fn sort_parents_first(procs: &mut Vec<ProcessEntry>) {
    let mut out: Vec<ProcessEntry> = Vec::with_capacity(procs.len());
    let mut placed: std::collections::HashSet<i32> = std::collections::HashSet::new();
    let mut rest = std::mem::take(procs);
    while !rest.is_empty() {
        let before = rest.len();
        let all: std::collections::HashSet<i32> = rest.iter().map(|p| p.pid).collect();
        let (ready, wait): (Vec<_>, Vec<_>) =
            rest.into_iter().partition(|p| placed.contains(&p.ppid) || !all.contains(&p.ppid));
        for p in ready {
            placed.insert(p.pid);
            out.push(p);
        }
        rest = wait;
        if rest.len() == before {
            out.append(&mut rest);
        }
    }
    *procs = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_state_is_told_apart_from_failures() {
        let io = || std::io::Error::from_raw_os_error(libc::EBUSY);
        let unsupported = [
            CrError::Unsupported { pid: 1, comm: "sh".into(), reason: "seccomp".into() },
            CaptureError::Unsupported { pid: 2, comm: "py".into(), reason: "shared memory".into() }.into(),
            FileError::Unsupported { pid: 3, fd: 4, reason: "TCP connection".into() }.into(),
        ];
        for e in &unsupported {
            assert!(e.is_unsupported(), "{e:?}");
        }
        let failures = [
            CrError::Freezer(io()),
            CrError::NoTemplate { pid: 1 },
            FileError::Io { pid: 3, fd: 4, what: "read the TCP state", source: io() }.into(),
        ];
        for e in &failures {
            assert!(!e.is_unsupported(), "{e:?}");
        }
    }
}
