//! The shim's checkpoint thread. ptrace belongs to the thread that attached, so every process checkpoint
//! and restore of this sandbox (DeltaCR) runs on this one thread, together with the filesystem side
//! (DeltaFS) and the freezer, in the order that makes a checkpoint consistent: freeze → filesystem →
//! processes (DeltaCR thaws once they are seized).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use anyhow::{anyhow, Context};
use deltacr::image::{ImageId, ImageStore};
use deltacr::{Engine, Frozen, Sandbox};
use deltafs::StackId;
use nix::unistd::Pid;
use sandbox::cgroup::Cgroup;
use tokio::sync::oneshot;

/// Errors go back to the requester typed, with their causes (so the shim can tell a process DeltaCR cannot
/// capture, `deltacr::CrError::is_unsupported`, from a failed checkpoint).
pub type JobResult<T> = anyhow::Result<T>;

use crate::errors::error_chain as chain;

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
        reply: oneshot::Sender<JobResult<Restored>>,
    },
    RestoreImage {
        image: ImageId,
        reply: oneshot::Sender<JobResult<Restored>>,
    },
    Forget {
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
}

/// What the checkpoint thread works on.
pub struct Parts {
    pub init: i32,
    pub cgroup: Arc<Cgroup>,
    pub fs: Arc<deltafs::Mount>,
    pub images: ImageStore,
}

/// A process checkpoint kept in memory (its templates) with its image.
struct Kept {
    ckpt: deltacr::Checkpoint,
    image: ImageId,
    write: Arc<ImageWrite>,
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

/// Process checkpoints of a sandbox whose templates stay in memory (the least recently taken or rolled back
/// to others restore from their images).
const MAX_TEMPLATES: usize = 8;
/// How often an idle checkpoint thread lets go of memory held for processes that exited since.
const TIDY_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
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
        std::thread::Builder::new().name("deltacr".into()).spawn(move || Worker::new(parts).run(rx))?;
        Ok(Cr { jobs: tx })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<JobResult<T>>) -> Job) -> JobResult<T> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(make(tx)).map_err(|_| anyhow!("the checkpoint thread is gone"))?;
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
    pub async fn rollback(&self, stack: StackId, image: Option<ImageId>) -> JobResult<Restored> {
        self.ask(|reply| Job::Rollback { stack, image, reply }).await
    }

    /// Restores the processes of `image` into this (fresh) sandbox.
    pub async fn restore_image(&self, image: ImageId) -> JobResult<Restored> {
        self.ask(|reply| Job::RestoreImage { image, reply }).await
    }

    /// Drops the templates of the checkpoint of `stack` (its image stays).
    pub fn forget(&self, stack: StackId) {
        let _ = self.jobs.send(Job::Forget { stack });
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
    kept: HashMap<StackId, Kept>,
    /// Stacks of `kept`, least recently taken or rolled back to first.
    order: std::collections::VecDeque<StackId>,
}

impl Worker {
    fn new(parts: Parts) -> Worker {
        Worker { parts, engine: Engine::new(), kept: HashMap::new(), order: Default::default() }
    }

    fn run(mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        loop {
            let job = match jobs.recv_timeout(TIDY_EVERY) {
                Ok(job) => job,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    self.engine.tidy();
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            };
            match job {
                Job::Checkpoint { processes, parent, reply } => {
                    let result = self.checkpoint(processes, parent);
                    let spares_for = result.as_ref().ok().filter(|c| c.processes.is_some()).map(|c| c.stack);
                    let _ = reply.send(result);
                    if let Some(stack) = spares_for {
                        self.prepare_spares(stack);
                    }
                }
                Job::Rollback { stack, image, reply } => {
                    let result = self.rollback(stack, image);
                    let restored = result.as_ref().is_ok_and(|r| r.restored > 0);
                    let _ = reply.send(result);
                    if restored {
                        self.used(stack);
                        self.prepare_spares(stack);
                    }
                }
                Job::RestoreImage { image, reply } => {
                    let started = Instant::now();
                    let restored = self.restore_from_image(image).map(|stats| Restored {
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
                Job::Forget { stack } => {
                    self.kept.remove(&stack);
                    self.order.retain(|s| *s != stack);
                }
                Job::Shutdown { done } => {
                    // Dropping templates and the engine kills and collects their tasks.
                    drop(self);
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    fn checkpoint(&mut self, processes: bool, parent: Option<StackId>) -> JobResult<Captured> {
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
            return Ok(Captured { stack, stopped_ms: ms(started), fs_ms, processes: None });
        }
        let ckpt = self.engine.checkpoint(&sandbox(self.parts.init), &mut frozen)?;
        let stopped_ms = ms(started);
        let parent = parent.as_ref().and_then(|p| self.kept.get(p));
        let job = ckpt.image_job(parent.map(|k| (&k.ckpt, k.image)))?;
        let parent_write = parent.map(|k| k.write.clone());
        let image = job.id();
        let count = ckpt.tree.processes.len();
        let write = Arc::new(ImageWrite::default());
        let (done_tx, done_rx) = oneshot::channel();
        let (store, ends) = (self.parts.images.clone(), EndsWrite(write.clone()));
        // The image is written while the sandbox runs again (from the templates, which do not change).
        std::thread::Builder::new()
            .name("deltacr-image".into())
            .spawn(move || {
                // An image is published after its parent (a restore reads the whole chain). Back-to-back
                // checkpoints thus stay incremental; if the parent's write failed, this one is written whole.
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
        self.kept.insert(stack, Kept { ckpt, image, write });
        self.order.push_back(stack);
        self.limit_templates();
        Ok(Captured { stack, stopped_ms, fs_ms, processes: Some(ProcessCapture { count, image, written: done_rx }) })
    }

    /// Gives the templates of the checkpoint of `stack` — the likeliest next rollback target, just made
    /// or rolled back to — their spares, while the sandbox runs: the rollback then takes over their
    /// memory instead of copying page tables (see docs/deltacr.md, "Spares").
    fn prepare_spares(&mut self, stack: StackId) {
        let Some(kept) = self.kept.get(&stack) else {
            return;
        };
        let sb = sandbox(self.parts.init);
        match self.engine.prepare_spares(&kept.ckpt, &sb) {
            Ok(made) => tracing::debug!(%stack, made, "prepared spares"),
            Err(e) => tracing::warn!(%stack, "cannot prepare spares (rollbacks copy page tables): {}", chain(&e)),
        }
    }

    /// Marks the templates of the checkpoint of `stack` as the most recently used: a tree search comes back
    /// to the nodes it just rolled back to, so those are the last whose templates are dropped.
    fn used(&mut self, stack: StackId) {
        if let Some(at) = self.order.iter().position(|s| *s == stack) {
            self.order.remove(at);
            self.order.push_back(stack);
        }
    }

    /// Templates hold the pages their processes changed since: keep them for the most recently taken or
    /// rolled back to checkpoints only (the others are restored from their image). One whose image is not
    /// written yet is kept.
    fn limit_templates(&mut self) {
        while self.order.len() > MAX_TEMPLATES {
            let oldest = *self.order.front().expect("not empty");
            if !self.kept.get(&oldest).is_some_and(|k| k.write.succeeded()) {
                break;
            }
            self.order.pop_front();
            self.kept.remove(&oldest);
            tracing::debug!(stack = %oldest, "dropped the templates of the least recently used checkpoint");
        }
    }

    fn rollback(&mut self, stack: StackId, image: Option<ImageId>) -> JobResult<Restored> {
        let started = Instant::now();
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
                let kept = self.kept.get(&stack).expect("restore_source found its templates");
                (self.engine.restore(&kept.ckpt, &sb)?, false)
            }
            Source::Image(images) => (self.engine.restore_image(images, &sb)?, true),
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
        let kept = self.kept.get(&stack);
        if kept.is_some_and(|k| k.ckpt.lost_templates().is_empty()) {
            return Ok(Source::Templates);
        }
        // The templates are gone (killed inside the sandbox, or the checkpoint was taken elsewhere).
        if kept.is_some_and(|k| !k.write.wait()) {
            return Err(anyhow!(
                "the checkpoint's processes cannot be restored: processes it was being saved from were killed \
                 before its image was written, and writing the image failed"
            ));
        }
        let images = self.parts.images.open_chain(image).context("open the checkpoint's process image")?;
        Ok(Source::Image(images))
    }

    fn restore_from_image(&mut self, image: ImageId) -> JobResult<deltacr::RestoreStats> {
        let images = self.parts.images.open_chain(image).context("open the image")?;
        Ok(self.engine.restore_image(images, &sandbox(self.parts.init))?)
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
        std::thread::sleep(std::time::Duration::from_millis(20));
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
}
