//! The shim's checkpoint thread. ptrace belongs to the thread that attached, so every process checkpoint
//! and restore of this sandbox (DeltaCR) runs on this one thread, together with the filesystem side
//! (DeltaFS) and the freezer, in the order that makes a checkpoint consistent: freeze → filesystem →
//! processes (DeltaCR thaws once they are seized).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use deltacr::image::{ImageId, ImageStore};
use deltacr::{AddressMove, Engine, Frozen, MemoryRestore, Sandbox};
use deltafs::StackId;
use nix::unistd::Pid;
use sandbox::cgroup::Cgroup;
use tokio::sync::oneshot;

/// Errors go back to the requester typed, with their causes (so the shim can tell a process DeltaCR cannot
/// capture, `deltacr::CrError::is_unsupported`, from a failed checkpoint).
pub type JobResult<T> = anyhow::Result<T>;

use crate::errors::error_chain as chain;
use crate::shim::proto::{self, KeptTemplates};

/// A process checkpoint answered at thaw, to be completed (see [`Worker::finish_checkpoint`]).
struct Finishing {
    partial: deltacr::Partial,
    stack: StackId,
    parent: Option<StackId>,
    image: ImageId,
    done_tx: oneshot::Sender<JobResult<u64>>,
}

/// What a checkpoint captured.
pub struct Captured {
    pub stack: StackId,
    /// Freeze to thaw.
    pub stopped_ms: f64,
    pub fs_ms: f64,
    /// Process capture (part of `stopped_ms`), when processes were captured.
    pub processes: Option<ProcessCapture>,
}

pub struct ProcessCapture {
    pub count: usize,
    /// See deltacr's `Checkpoint::reset_connections`.
    pub reset_connections: Vec<String>,
    pub image: ImageId,
    /// Resolves once the durable image is written (or failed).
    pub written: oneshot::Receiver<JobResult<u64>>,
}

pub struct Restored {
    /// Processes killed (init, our templates and helpers are never killed).
    pub killed: usize,
    pub fs_ms: f64,
    /// Inodes that differed between the abandoned state and the checkpoint.
    pub changed_inodes: usize,
    pub total_ms: f64,
    /// Processes restored (0 for a filesystem-only rollback: the sandbox's processes were killed).
    pub restored: usize,
    pub from_image: bool,
    /// Ptys the restore had to make again (by number), for terminals that were gone.
    pub pty_masters: std::collections::BTreeMap<u32, std::os::fd::OwnedFd>,
}

enum Job {
    Checkpoint {
        processes: bool,
        parent: Option<StackId>,
        reply: oneshot::Sender<JobResult<Captured>>,
    },
    Rollback {
        stack: StackId,
        image: Option<ImageId>,
        /// The sandbox's address when the checkpoint was taken.
        address: Option<Ipv4Addr>,
        reply: oneshot::Sender<JobResult<Restored>>,
    },
    RestoreImage {
        image: ImageId,
        address: Option<Ipv4Addr>,
        reply: oneshot::Sender<JobResult<Restored>>,
    },
    Forget {
        stack: StackId,
    },
    DropTemplates {
        stack: StackId,
    },
    /// Ends the thread once its templates and other stopped tasks are killed and collected.
    Shutdown {
        done: std::sync::mpsc::Sender<()>,
    },
}

/// What a rollback restores processes from.
enum Source {
    Templates,
    Image(deltacr::image::ImageChain),
}

/// Handle to the checkpoint thread.
pub struct Cr {
    jobs: std::sync::mpsc::Sender<Job>,
    kept: Arc<Mutex<KeptList>>,
    /// Requests sent and not yet taken by the thread (checkpoint, rollback, restore): work that only
    /// prepares for later waits while one is there.
    waiting: Arc<AtomicUsize>,
}

/// What the checkpoint thread works on.
pub struct Parts {
    pub init: i32,
    pub cgroup: Arc<Cgroup>,
    pub fs: Arc<deltafs::Mount>,
    pub images: ImageStore,
    /// The sandbox's own address in the `nat` network: a checkpoint taken elsewhere (forked, or a
    /// rollback to the checkpoint a fork came from) has its sockets moved to it.
    pub address: Option<Ipv4Addr>,
}

/// What the checkpoint thread knows of a process checkpoint whose templates it keeps, shared with the
/// request handlers ([`Cr::kept`]); the templates themselves stay on the thread (`Worker::templates`).
struct Kept {
    image: ImageId,
    write: Arc<ImageWrite>,
    /// The checkpoint whose templates its image is compared with (an incremental image).
    parent: Option<StackId>,
    /// When it was last taken or rolled back to (`proto::monotonic_ns`).
    used_ns: u64,
    /// What its templates hold, as last measured.
    memory_bytes: Option<u64>,
    /// When to measure them (again).
    measure_at: Instant,
}

/// The kept process checkpoints by stack.
type KeptList = HashMap<StackId, Kept>;

/// Whether the templates of the checkpoint of `stack` may be dropped to free memory: its image is written
/// (until then they are its only copy), and no image being written is compared with them (without them it
/// would be written whole).
fn droppable(kept: &KeptList, stack: StackId) -> bool {
    kept.get(&stack).is_some_and(|k| k.write.succeeded())
        && !kept.values().any(|k| k.parent == Some(stack) && !k.write.ended())
}

/// How the write of a checkpoint's image ended: `None` while it runs, then whether it succeeded.
#[derive(Default)]
struct ImageWrite {
    outcome: Mutex<Option<bool>>,
    ended: Condvar,
}

impl ImageWrite {
    /// Records the outcome (the first one recorded stands).
    fn end(&self, ok: bool) {
        let mut outcome = self.outcome.lock().expect("image write lock");
        if outcome.is_none() {
            *outcome = Some(ok);
            self.ended.notify_all();
        }
    }

    fn succeeded(&self) -> bool {
        *self.outcome.lock().expect("image write lock") == Some(true)
    }

    fn ended(&self) -> bool {
        self.outcome.lock().expect("image write lock").is_some()
    }

    /// Waits until the write ended; whether it succeeded.
    fn wait(&self) -> bool {
        let outcome = self.outcome.lock().expect("image write lock");
        let outcome = self.ended.wait_while(outcome, |o| o.is_none()).expect("image write lock");
        *outcome == Some(true)
    }
}

/// Records a failed write if the writer thread ends without an outcome (a panic): images waiting
/// for it as their parent must not wait for ever.
struct EndsWrite(Arc<ImageWrite>);

impl Drop for EndsWrite {
    fn drop(&mut self) {
        self.0.end(false);
    }
}

/// How often an idle checkpoint thread lets go of memory held for processes that exited since.
const TIDY_EVERY: Duration = Duration::from_secs(5);
/// How old a measurement of what a checkpoint's templates hold may get: they hold more as the live
/// processes rewrite the pages they share.
const MEASURE_EVERY: Duration = Duration::from_secs(5);
/// Measurements take at most 1 / (1 + MEASURE_PACE) of the thread's time.
const MEASURE_PACE: u32 = 4;
/// Longest chain of incremental images a restore reads before the newest is rewritten whole.
const MAX_CHAIN: usize = 8;

/// Rewrites image `id` with all its pages when its chain of parents got long, so restores stay fast
/// (the image keeps its id; images built on it keep working).
fn compact_if_long(store: &ImageStore, id: ImageId) {
    match store.open_chain(id) {
        Ok(images) if images.len() > MAX_CHAIN => match store.compact(id) {
            Ok(info) => tracing::info!(image = %id, bytes = info.page_bytes, "compacted the image chain"),
            Err(e) => tracing::warn!(image = %id, "cannot compact the image chain: {}", chain(&e)),
        },
        _ => {}
    }
}

/// The sandbox as DeltaCR sees it.
fn sandbox(init: i32) -> Sandbox {
    Sandbox { init: Pid::from_raw(init) }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

impl Cr {
    pub fn spawn(parts: Parts) -> std::io::Result<Cr> {
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = Arc::new(Mutex::new(KeptList::new()));
        let shared = kept.clone();
        let waiting = Arc::new(AtomicUsize::new(0));
        let for_worker = waiting.clone();
        std::thread::Builder::new()
            .name("deltacr".into())
            .spawn(move || Worker::new(parts, shared, for_worker).run(rx))?;
        Ok(Cr { jobs: tx, kept, waiting })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<JobResult<T>>) -> Job) -> JobResult<T> {
        let (tx, rx) = oneshot::channel();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        if self.jobs.send(make(tx)).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(anyhow!("the checkpoint thread is gone"));
        }
        rx.await.map_err(|_| anyhow!("the checkpoint thread is gone"))?
    }

    /// Checkpoints the filesystem and, with `processes`, every process. `parent` is the stack of the
    /// checkpoint the sandbox's state descends from (for an incremental process image).
    pub async fn checkpoint(&self, processes: bool, parent: Option<StackId>) -> JobResult<Captured> {
        self.ask(|reply| Job::Checkpoint { processes, parent, reply }).await
    }

    /// Kills every process but init (and our templates), switches the filesystem to `stack`, and with
    /// `image` (a process checkpoint) restores the processes: from their templates when this thread
    /// still has them, else from the image.
    /// `address`: the sandbox's when the checkpoint was taken (see [`Parts::address`]).
    pub async fn rollback(
        &self,
        stack: StackId,
        image: Option<ImageId>,
        address: Option<Ipv4Addr>,
    ) -> JobResult<Restored> {
        self.ask(|reply| Job::Rollback { stack, image, address, reply }).await
    }

    /// Restores the processes of `image` into this (fresh) sandbox; `address` as for [`Cr::rollback`].
    pub async fn restore_image(&self, image: ImageId, address: Option<Ipv4Addr>) -> JobResult<Restored> {
        self.ask(|reply| Job::RestoreImage { image, address, reply }).await
    }

    /// Drops the templates of the checkpoint of `stack` (its image stays).
    pub fn forget(&self, stack: StackId) {
        let _ = self.jobs.send(Job::Forget { stack });
    }

    /// Drops the templates of the checkpoint of `stack` to free memory, if they are still droppable.
    pub fn drop_templates(&self, stack: StackId) {
        let _ = self.jobs.send(Job::DropTemplates { stack });
    }

    /// The process checkpoints whose templates this thread keeps, least recently used first.
    pub fn kept(&self) -> Vec<KeptTemplates> {
        let kept = self.kept.lock().expect("kept lock");
        let mut list: Vec<KeptTemplates> = kept
            .iter()
            .map(|(&stack, k)| KeptTemplates {
                stack,
                memory_bytes: k.memory_bytes,
                used_ns: k.used_ns,
                droppable: droppable(&kept, stack),
            })
            .collect();
        list.sort_by_key(|k| k.used_ns);
        list
    }

    /// Kills and collects the stopped tasks this thread traces (templates, spares) and ends it; waits
    /// for a job under way first. Must come before the sandbox is killed: a traced task that is killed
    /// stays a zombie until its tracer collects it, and the sandbox's pid namespace cannot end before.
    pub fn shutdown(&self) {
        let (done, finished) = std::sync::mpsc::channel();
        if self.jobs.send(Job::Shutdown { done }).is_ok() {
            let _ = finished.recv();
        }
    }
}

struct Worker {
    parts: Parts,
    engine: Engine,
    /// The process checkpoints whose templates are kept, by stack (what else is known of them: `kept`).
    templates: HashMap<StackId, deltacr::Checkpoint>,
    kept: Arc<Mutex<KeptList>>,
    /// When the thread last tidied or ended a job.
    tidied: Instant,
    /// Measurements wait until then (see [`MEASURE_PACE`]).
    next_measure: Instant,
    /// The image the sandbox's processes were last restored from (a rollback or fork from an image), until
    /// a rollback restores them from templates: a checkpoint without parent templates compares its pages
    /// with it rather than writing them all.
    restored_from: Option<ImageId>,
    /// See [`Cr::waiting`].
    waiting: Arc<AtomicUsize>,
}

impl Worker {
    fn new(parts: Parts, kept: Arc<Mutex<KeptList>>, waiting: Arc<AtomicUsize>) -> Worker {
        let now = Instant::now();
        Worker {
            parts,
            engine: Engine::new(),
            templates: HashMap::new(),
            kept,
            tidied: now,
            next_measure: now,
            restored_from: None,
            waiting,
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, KeptList> {
        self.kept.lock().expect("kept lock")
    }

    fn run(mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        loop {
            let job = match jobs.recv_timeout(self.idle_wait()) {
                Ok(job) => job,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    self.idle_step();
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            };
            if matches!(job, Job::Checkpoint { .. } | Job::Rollback { .. } | Job::RestoreImage { .. }) {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
            }
            match job {
                Job::Checkpoint { processes, parent, reply } => {
                    let (result, rest) = match self.checkpoint(processes, parent) {
                        Ok((captured, rest)) => (Ok(captured), rest),
                        Err(e) => (Err(e), None),
                    };
                    // Answered at thaw; what is left is done before the next job.
                    let _ = reply.send(result);
                    if let Some(rest) = rest {
                        let stack = rest.stack;
                        if self.finish_checkpoint(rest) {
                            self.prepare_spares(stack);
                        }
                    }
                }
                Job::Rollback { stack, image, address, reply } => {
                    let result = self.rollback(stack, image, address);
                    let restored = result.as_ref().is_ok_and(|r| r.restored > 0);
                    let _ = reply.send(result);
                    if restored {
                        self.used(stack);
                        self.prepare_spares(stack);
                    }
                }
                Job::RestoreImage { image, address, reply } => {
                    let started = Instant::now();
                    let restored = self.restore_from_image(image, address).map(|stats| Restored {
                        killed: 0,
                        fs_ms: 0.0,
                        changed_inodes: 0,
                        total_ms: ms(started),
                        restored: stats.processes,
                        from_image: true,
                        pty_masters: stats.pty_masters,
                    });
                    let _ = reply.send(restored);
                }
                Job::Forget { stack } => self.forget(stack),
                Job::DropTemplates { stack } => {
                    if droppable(&self.kept(), stack) {
                        self.forget(stack);
                        tracing::debug!(%stack, "dropped the templates of a checkpoint (template memory budget)");
                    }
                }
                Job::Shutdown { done } => {
                    // Dropping templates and the engine kills and collects their tasks.
                    drop(self);
                    let _ = done.send(());
                    return;
                }
            }
            self.tidied = Instant::now();
        }
    }

    /// How long to wait for a job before the next idle step.
    fn idle_wait(&self) -> Duration {
        let tidy_at = self.tidied + TIDY_EVERY;
        let measure_at = self.kept().values().map(|k| k.measure_at).min().map(|at| at.max(self.next_measure));
        measure_at.map_or(tidy_at, |m| m.min(tidy_at)).saturating_duration_since(Instant::now())
    }

    /// One step of what the thread does between jobs, so that a job waits for one step at most: measure
    /// what the templates of one checkpoint hold (~1 ms per process) when that is due, else tidy once idle
    /// for [`TIDY_EVERY`].
    fn idle_step(&mut self) {
        let now = Instant::now();
        let due = (now >= self.next_measure)
            .then(|| {
                self.kept()
                    .iter()
                    .filter(|(_, k)| k.measure_at <= now)
                    .min_by_key(|(_, k)| k.measure_at)
                    .map(|(s, _)| *s)
            })
            .flatten();
        match due {
            Some(stack) => self.measure(stack),
            None if now >= self.tidied + TIDY_EVERY => {
                self.engine.tidy();
                self.tidied = now;
            }
            None => {}
        }
    }

    /// Measures what the templates of the checkpoint of `stack` hold (off the checkpoint's and rollback's
    /// path: after their answers, between jobs).
    fn measure(&mut self, stack: StackId) {
        let started = Instant::now();
        let measured = self.templates.get(&stack).map(deltacr::Checkpoint::memory_bytes);
        let now = Instant::now();
        self.next_measure = now + (now - started) * MEASURE_PACE;
        let mut kept = self.kept();
        let Some(k) = kept.get_mut(&stack) else { return };
        k.measure_at = now + MEASURE_EVERY;
        match measured {
            Some(Ok(bytes)) => k.memory_bytes = Some(bytes),
            Some(Err(e)) => tracing::warn!(%stack, "cannot measure the templates' memory: {}", chain(&e)),
            None => {}
        }
    }

    /// Drops the templates of the checkpoint of `stack` (its image stays).
    fn forget(&mut self, stack: StackId) {
        self.templates.remove(&stack);
        self.kept().remove(&stack);
    }

    /// Checkpoints the filesystem and (with `processes`) the processes, up to the sandbox's thaw; what is
    /// left of a process checkpoint (reading the rest of its state, starting its image's write) comes back
    /// for [`Worker::finish_checkpoint`], after the answer.
    fn checkpoint(&mut self, processes: bool, parent: Option<StackId>) -> JobResult<(Captured, Option<Finishing>)> {
        if processes {
            // Memory still coming back on demand (after a rollback or fork from an image) is filled
            // while the sandbox runs, not in its pause (the checkpoint fills what is left).
            self.engine.fill_lazy_memory().context("complete memory restored on demand")?;
        }
        let started = Instant::now();
        let cgroup = self.parts.cgroup.clone();
        // Thaws the sandbox exactly once: DeltaCR's checkpoint does as soon as it can, and on any other
        // way out (the filesystem checkpoint is then simply not used), dropping it does.
        let mut frozen = Frozen::new(&*cgroup).context("freeze the sandbox")?;
        let fs_started = Instant::now();
        let stack = self.parts.fs.checkpoint().context("checkpoint the filesystem")?;
        let fs_ms = ms(fs_started);
        if !processes {
            frozen.thaw().context("thaw the sandbox")?;
            return Ok((Captured { stack, stopped_ms: ms(started), fs_ms, processes: None }, None));
        }
        let partial = self.engine.checkpoint_at_thaw(&sandbox(self.parts.init), &mut frozen)?;
        let stopped_ms = ms(started);
        tracing::debug!(phases = ?partial.stats().phases, "process checkpoint");
        let image = ImageId::random().context("choose an image id")?;
        let count = partial.stats().processes;
        let reset_connections = partial.reset_connections();
        let (done_tx, written) = oneshot::channel();
        let captured = Captured {
            stack,
            stopped_ms,
            fs_ms,
            processes: Some(ProcessCapture { count, reset_connections, image, written }),
        };
        Ok((captured, Some(Finishing { partial, stack, parent, image, done_tx })))
    }

    /// Completes a process checkpoint answered at thaw: reads the rest of its state from its templates,
    /// keeps them, and starts writing its image. Whether it succeeded (a failure is reported as the
    /// image's: the checkpoint then cannot be restored, and says so).
    fn finish_checkpoint(&mut self, rest: Finishing) -> bool {
        let Finishing { partial, stack, parent, image, done_tx } = rest;
        let mut done_tx = Some(done_tx);
        let write = Arc::new(ImageWrite::default());
        let started = (|| -> JobResult<()> {
            let ckpt = partial.complete()?;
            // The parent's templates, while kept, make the image incremental.
            let kept = self.kept();
            let parent = parent.and_then(|p| Some((p, self.templates.get(&p)?, kept.get(&p)?)));
            let mut job = ckpt.image_job_as(image, parent.map(|(_, ckpt, k)| (ckpt, k.image)))?;
            let parent_write = parent.map(|(_, _, k)| k.write.clone());
            let parent = parent.map(|(stack, ..)| stack);
            drop(kept);
            if let (None, Some(restored)) = (parent, self.restored_from) {
                match self.parts.images.open_chain(restored) {
                    Ok(chain) => job = job.against_image(chain),
                    Err(e) => tracing::warn!(image = %restored, "the image is written whole: {}", chain(&e)),
                }
            }
            let (store, ends) = (self.parts.images.clone(), EndsWrite(write.clone()));
            let done_tx = done_tx.take().expect("sent once");
            // The image is written while the sandbox runs again (from the templates, which do not change).
            std::thread::Builder::new()
                .name("deltacr-image".into())
                .spawn(move || {
                    // An image is published after its parent (a restore reads the whole chain). Back-to-back
                    // checkpoints thus stay incremental; if the parent's write failed, this one is written
                    // whole.
                    let job = match parent_write {
                        Some(parent) if !parent.wait() => job.without_parent(),
                        _ => job,
                    };
                    let result = job.write(&store).map(|info| info.page_bytes).map_err(anyhow::Error::from);
                    ends.0.end(result.is_ok());
                    let _ = done_tx.send(result);
                    compact_if_long(&store, image);
                })
                .context("start the image writer")?;
            self.templates.insert(stack, ckpt);
            let kept = Kept {
                image,
                write: write.clone(),
                parent,
                used_ns: proto::monotonic_ns(),
                memory_bytes: None,
                measure_at: Instant::now(),
            };
            self.kept().insert(stack, kept);
            Ok(())
        })();
        match started {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(%stack, "the checkpoint's processes cannot be kept: {}", chain(e.as_ref()));
                write.end(false);
                if let Some(tx) = done_tx.take() {
                    let _ = tx.send(Err(e));
                }
                false
            }
        }
    }

    /// Gives the templates of the checkpoint of `stack` — the likeliest next rollback target, just made
    /// or rolled back to — their spares, while the sandbox runs: the rollback then takes over their
    /// memory instead of copying page tables (see docs/deltacr.md, "Spares").
    fn prepare_spares(&mut self, stack: StackId) {
        let Some(ckpt) = self.templates.get(&stack) else {
            return;
        };
        if self.waiting.load(Ordering::SeqCst) > 0 {
            // A request waits (a tree search rolls back to another node right after a checkpoint): spares
            // cost it a page-table copy per process and serve only a rollback to this checkpoint.
            tracing::debug!(%stack, "no spares: a request waits");
            return;
        }
        let sb = sandbox(self.parts.init);
        match self.engine.prepare_spares(ckpt, &sb) {
            Ok(made) => tracing::debug!(%stack, made, "prepared spares"),
            Err(e) => tracing::warn!(%stack, "cannot prepare spares (rollbacks copy page tables): {}", chain(&e)),
        }
    }

    /// Marks the templates of the checkpoint of `stack` as the most recently used: a tree search comes back
    /// to the nodes it just rolled back to, so those are the last whose templates are dropped. They are
    /// measured again (the rollback used up their spares, which are made again).
    fn used(&mut self, stack: StackId) {
        if let Some(k) = self.kept().get_mut(&stack) {
            k.used_ns = proto::monotonic_ns();
            k.measure_at = Instant::now();
        }
    }

    fn rollback(&mut self, stack: StackId, image: Option<ImageId>, address: Option<Ipv4Addr>) -> JobResult<Restored> {
        let started = Instant::now();
        // A rollback's processes are the sandbox's from now on: what they did not touch yet is filled in
        // the background, so that the next checkpoint finds their memory complete.
        self.engine.set_memory_restore(MemoryRestore::OnDemand { background_fill: true });
        // Whatever the processes are restored from is made sure of before the live ones are killed: a
        // rollback that cannot restore leaves the sandbox as it was.
        let source = image.map(|image| self.restore_source(stack, image)).transpose()?;
        let before = self.parts.cgroup.procs().map_or(0, |p| p.len());
        self.engine.kill_processes(&sandbox(self.parts.init)).context("kill the sandbox's processes")?;
        let killed = before.saturating_sub(self.parts.cgroup.procs().map_or(0, |p| p.len()));
        let fs_started = Instant::now();
        let changed_inodes = self.parts.fs.rollback(stack).context("roll back the filesystem")?.changed_inodes;
        let fs_ms = ms(fs_started);
        let Some(source) = source else {
            return Ok(Restored {
                killed,
                fs_ms,
                changed_inodes,
                total_ms: ms(started),
                restored: 0,
                from_image: false,
                pty_masters: Default::default(),
            });
        };
        let sb = sandbox(self.parts.init);
        let (stats, from_image) = match source {
            Source::Templates => {
                self.restored_from = None;
                let ckpt = self.templates.get(&stack).expect("restore_source found its templates");
                (self.engine.restore(ckpt, &sb)?, false)
            }
            Source::Image(images) => {
                self.restored_from = Some(images.head().header.id);
                (self.engine.restore_image(images, &sb, self.moved(address))?, true)
            }
        };
        for d in &stats.degraded {
            tracing::warn!("restored with a degraded terminal: {d:?}");
        }
        Ok(Restored {
            killed,
            fs_ms,
            changed_inodes,
            total_ms: ms(started),
            restored: stats.processes,
            from_image,
            pty_masters: stats.pty_masters,
        })
    }

    /// Where the processes of the checkpoint of `stack` can come back from: its templates while they are all
    /// alive, else its image (waiting for a write under way). Fails when neither is there.
    fn restore_source(&self, stack: StackId, image: ImageId) -> JobResult<Source> {
        if self.templates.get(&stack).is_some_and(|c| c.lost_templates().is_empty()) {
            return Ok(Source::Templates);
        }
        // The templates are gone (killed inside the sandbox, dropped to free memory, or the checkpoint was
        // taken elsewhere).
        let write = self.kept().get(&stack).map(|k| k.write.clone());
        if write.is_some_and(|w| !w.wait()) {
            return Err(anyhow!(
                "the checkpoint's processes cannot be restored: processes it was being saved from were killed \
                 before its image was written, and writing the image failed"
            ));
        }
        let images = self.parts.images.open_chain(image).context("open the checkpoint's process image")?;
        Ok(Source::Image(images))
    }

    /// How a checkpoint's sockets move here: from the address its sandbox had to ours, when they differ.
    fn moved(&self, from: Option<Ipv4Addr>) -> Option<AddressMove> {
        let (from, to) = (from?, self.parts.address?);
        (from != to).then_some(AddressMove { from, to })
    }

    fn restore_from_image(&mut self, image: ImageId, address: Option<Ipv4Addr>) -> JobResult<deltacr::RestoreStats> {
        let images = self.parts.images.open_chain(image).context("open the image")?;
        self.restored_from = Some(image);
        // A fork's memory comes in only as its processes touch it (until its first checkpoint or rollback):
        // each fork of a fan-out holds what it touched, not a whole copy of the checkpoint's memory.
        self.engine.set_memory_restore(MemoryRestore::OnDemand { background_fill: false });
        Ok(self.engine.restore_image(images, &sandbox(self.parts.init), self.moved(address))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_image_waits_for_its_parents_outcome() {
        let parent = Arc::new(ImageWrite::default());
        let waiter = {
            let parent = parent.clone();
            std::thread::spawn(move || parent.wait())
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "returned before the parent's write ended");
        parent.end(true);
        parent.end(false);
        assert!(waiter.join().unwrap());
        assert!(parent.succeeded(), "the first outcome stands");
    }

    #[test]
    fn a_writer_that_ends_without_an_outcome_counts_as_failed() {
        let write = Arc::new(ImageWrite::default());
        let ends = EndsWrite(write.clone());
        let _ = std::thread::spawn(move || {
            let _ends = ends;
            panic!("writer died");
        })
        .join();
        assert!(!write.wait());
    }

    fn kept(parent: Option<StackId>) -> Kept {
        let (image, write) = (ImageId([0; 16]), Arc::new(ImageWrite::default()));
        Kept { image, write, parent, used_ns: 0, memory_bytes: None, measure_at: Instant::now() }
    }

    #[test]
    fn templates_are_kept_while_an_image_needs_them() {
        let (first, second) = (crate::catalog::tests::stack_of("1"), crate::catalog::tests::stack_of("2"));
        let mut list = KeptList::new();
        list.insert(first, kept(None));
        assert!(!droppable(&list, first), "its image is being written: they are its only copy");
        list[&first].write.end(true);
        assert!(droppable(&list, first));
        list.insert(second, kept(Some(first)));
        assert!(!droppable(&list, first), "the image being written on top of it is compared with them");
        list[&second].write.end(false);
        assert!(droppable(&list, first));
        assert!(!droppable(&list, second), "its image failed: they are its only copy for good");
        assert!(!droppable(&list, crate::catalog::tests::stack_of("3")), "not kept");
    }
}
