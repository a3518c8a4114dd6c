//! Making checkpoints durable: on disk, so they survive a power loss and not only a crash of the daemon.
//!
//! A checkpoint is reported `durable` once its catalog record, its files and (for a full checkpoint) its
//! process image have reached the disk. Its files are the DeltaFS layers of its stack: its own layer and
//! every layer below, layers of deleted checkpoints kept for it included. Rather than fsync each file and
//! directory of each of those (and track which were), one `syncfs(2)` of each filesystem holding the data
//! directory writes back everything written before it started: every layer, the process image (the shim
//! fsyncs that one itself too) and the catalog's log. Requests that arrive while a sync runs share the
//! next one, so a burst of checkpoints costs about two syncs.
//!
//! All of it runs after the checkpoint was answered: the sandbox's pause and the call's duration do not
//! include it (measured: `bench/durability.py`, table in `docs/architecture.md`). Marking a checkpoint
//! durable is itself a catalog commit that a power loss may undo; then the daemon syncs and marks it
//! again at its next start, which loses nothing.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::Engine;
use crate::catalog::ImageFailure;
use crate::daemon::shim_client::{PendingImage, ShimError};
use crate::shim::proto::ErrorKind;

/// Syncs the filesystems of the data directory, one `syncfs` at a time, shared by concurrent callers.
pub struct Syncer {
    /// One descriptor on each distinct filesystem the data lives on.
    filesystems: Arc<Vec<OwnedFd>>,
    /// Tickets handed out: a caller takes one after its writes are done.
    requested: AtomicU64,
    /// Every ticket up to this one is covered by a completed sync.
    synced: AtomicU64,
    running: tokio::sync::Mutex<()>,
}

impl Syncer {
    /// A syncer for the filesystems holding `dirs`.
    pub fn new(dirs: &[&Path]) -> std::io::Result<Syncer> {
        let mut devices = Vec::new();
        let mut filesystems = Vec::new();
        for dir in dirs {
            let fd = rustix::fs::open(*dir, rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY, 0.into())?;
            let dev = rustix::fs::fstat(&fd)?.st_dev;
            if !devices.contains(&dev) {
                devices.push(dev);
                filesystems.push(fd);
            }
        }
        Ok(Syncer {
            filesystems: Arc::new(filesystems),
            requested: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            running: tokio::sync::Mutex::new(()),
        })
    }

    /// Returns once everything written before the call is on disk.
    pub async fn sync(&self) -> std::io::Result<()> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _one_at_a_time = self.running.lock().await;
        if self.synced.load(Ordering::SeqCst) >= ticket {
            return Ok(());
        }
        // Every ticket taken so far was taken after its writes: the sync starting now covers them all.
        let covers = self.requested.load(Ordering::SeqCst);
        let filesystems = self.filesystems.clone();
        tokio::task::spawn_blocking(move || filesystems.iter().try_for_each(rustix::fs::syncfs))
            .await
            .map_err(std::io::Error::other)??;
        self.synced.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }
}

impl Engine {
    /// In the background: waits for checkpoint `cp`'s process image (if `pending`), then syncs and
    /// marks it durable.
    pub(super) fn make_durable(self: &Arc<Self>, cp: String, pending: Option<PendingImage>) {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            if let Some(pending) = pending {
                let written = pending.written().await;
                let Some(engine) = engine.upgrade() else { return };
                if !engine.record_image(&cp, written) {
                    return;
                }
            }
            let Some(engine) = engine.upgrade() else { return };
            engine.sync_and_mark_durable(&cp).await;
        });
    }

    /// Records how writing checkpoint `cp`'s process image ended; whether it was written.
    fn record_image(&self, cp: &str, written: Result<u64, ShimError>) -> bool {
        let failure = match written {
            Ok(bytes) => {
                tracing::info!(checkpoint = %cp, bytes, "process image written");
                None
            }
            Err(ShimError::Reported { kind, message }) => {
                tracing::error!(checkpoint = %cp, "the process image was not written: {message}");
                Some(ImageFailure { kind, reason: message })
            }
            // Only the shim writes the image, and it is gone: whether it got that far shows on disk (an
            // image appears there complete or not at all).
            Err(e) if self.checkpoint_record(cp).is_ok_and(|r| self.image_on_disk(&r)) => {
                tracing::info!(checkpoint = %cp, "the shim was lost ({e}) after it wrote the process image");
                None
            }
            Err(e) => {
                tracing::warn!(checkpoint = %cp, "lost the shim before the image was written: {e}");
                let reason = "the sandbox's supervisor exited before writing it".to_string();
                Some(ImageFailure { kind: ErrorKind::CheckpointFailed, reason })
            }
        };
        if let Some(failure) = failure {
            self.record_image_failure(cp, failure);
            return false;
        }
        match self.catalog().mark_image_written(cp) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(checkpoint = %cp, "cannot record the image as written: {e}");
                false
            }
        }
    }

    /// Records that checkpoint `cp`'s process image will never be written (unless it already was).
    pub(super) fn record_image_failure(&self, cp: &str, failure: ImageFailure) {
        if let Err(e) = self.catalog().mark_image_failed(cp, failure) {
            tracing::error!(checkpoint = %cp, "cannot record the image's failure: {e}");
        }
    }

    /// Syncs the data directory's filesystems and marks checkpoint `cp` durable.
    pub(super) async fn sync_and_mark_durable(&self, cp: &str) {
        if let Err(e) = self.syncer.sync().await {
            // Not durable, and said so; the next start of the daemon tries again.
            return tracing::error!(checkpoint = %cp, "cannot sync the data directory to disk: {e}");
        }
        if let Err(e) = self.catalog().mark_durable(cp) {
            tracing::error!(checkpoint = %cp, "cannot record the checkpoint as durable: {e}");
        }
    }
}
