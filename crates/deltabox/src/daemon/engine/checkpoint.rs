//! Checkpoints: taking one, waiting for its process image, listing, measuring and deleting them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{create::new_id, now, tree, Engine, EngineError, EngineResult, IMAGE_WAIT};
use crate::catalog::{CheckpointKind, CheckpointRecord};
use crate::daemon::shim_client::ShimError;
use crate::shim::proto::CheckpointStats;

impl Engine {
    /// Checkpoints sandbox `id`: its files, and with `processes` its processes too. Answered once the
    /// sandbox runs again; a process image is written afterwards, and the checkpoint is made durable in
    /// the background (`durable.rs`).
    pub async fn checkpoint(
        self: &Arc<Self>,
        id: &str,
        processes: bool,
    ) -> EngineResult<(CheckpointRecord, CheckpointStats)> {
        let started = Instant::now();
        let live = self.live(id).await?;
        let _one_at_a_time = live.ops.lock().await;
        let _links = self.links.read().await;
        let mut record = self.sandbox_record(id)?;
        // An incremental image needs the previous process checkpoint of this sandbox.
        let parent = record
            .head
            .as_deref()
            .and_then(|h| self.catalog().checkpoint(h).ok().flatten())
            .filter(|c| c.sandbox == id && c.image.is_some())
            .map(|c| c.stack);
        let (stats, pending) = self.shim(id).checkpoint(processes, parent).await?;
        let cp = CheckpointRecord {
            id: new_checkpoint_id(),
            sandbox: id.to_string(),
            parent: record.head.clone(),
            stack: stats.stack,
            kind: if processes { CheckpointKind::Full } else { CheckpointKind::Filesystem },
            image: stats.image,
            image_written: false,
            durable: false,
            image_failure: None,
            processes: stats.processes,
            sessions: stats.sessions.clone(),
            config: record.config.clone(),
            created: now(),
            pause_ms: stats.pause_ms,
            // Everything the call does but answering: the catalog write below takes ~0.1 ms.
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            reset_connections: stats.reset_connections.clone(),
            address: live.info.nat.as_ref().map(|n| n.address.address),
        };
        self.catalog().add_checkpoint(&cp)?;
        if processes {
            self.template_memory.taken(&cp);
        }
        record.head = Some(cp.id.clone());
        self.refresh(record).await;
        self.make_durable(cp.id.clone(), pending);
        Ok((cp, stats))
    }

    /// Waits until checkpoint `cp`'s process image is written (right after the checkpoint).
    pub(super) async fn wait_image_written(&self, cp: &CheckpointRecord) -> EngineResult<()> {
        let deadline = tokio::time::Instant::now() + IMAGE_WAIT;
        loop {
            let current = self.checkpoint_record(&cp.id)?;
            if current.image_written {
                return Ok(());
            }
            if self.image_on_disk(&current) {
                let _ = self.catalog().mark_image_written(&cp.id);
                return Ok(());
            }
            if let Some(failure) = current.image_failure {
                let message =
                    format!("the process image of checkpoint {} could not be written: {}", cp.id, failure.reason);
                return Err(ShimError::Reported { kind: failure.kind, message }.into());
            }
            if tokio::time::Instant::now() > deadline {
                let message = format!("the process image of checkpoint {} is not written (yet)", cp.id);
                return Err(EngineError::conflict("checkpoint_not_durable", message));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Checkpoints taken in sandbox `id`, oldest first (a parent before its children).
    pub fn checkpoints_of(&self, id: &str) -> EngineResult<Vec<CheckpointRecord>> {
        let all = self.catalog().checkpoints()?;
        let parents: HashMap<&str, Option<&str>> = all.iter().map(|c| (c.id.as_str(), c.parent.as_deref())).collect();
        let mut mine: Vec<(i64, usize, &CheckpointRecord)> =
            all.iter().filter(|c| c.sandbox == id).map(|c| (c.created, tree::depth(&parents, &c.id), c)).collect();
        mine.sort_by(|a, b| (a.0, a.1, &a.2.id).cmp(&(b.0, b.1, &b.2.id)));
        Ok(mine.into_iter().map(|(_, _, c)| c.clone()).collect())
    }

    pub async fn delete_checkpoint(&self, checkpoint: &str) -> EngineResult<()> {
        let links = self.links.write().await;
        let cp = self.checkpoint_record(checkpoint)?;
        let alive = self.sandboxes.read().await.get(&cp.sandbox).is_some_and(super::Live::compatible);
        if cp.image.is_some() && alive {
            // Frees the memory its in-memory copies hold in the sandbox.
            if let Err(e) = self.shim(&cp.sandbox).forget(cp.stack).await {
                tracing::warn!(checkpoint = %cp.id, "the sandbox could not drop the checkpoint's templates: {e:#}");
            }
        }
        self.catalog().delete_checkpoints(&[checkpoint.to_string()])?;
        for live in self.sandboxes.write().await.values_mut() {
            if [&live.record.head, &live.record.origin].iter().any(|c| c.as_deref() == Some(checkpoint)) {
                if let Ok(Some(r)) = self.catalog().sandbox(&live.record.id) {
                    live.record = r;
                }
            }
        }
        drop(links);
        self.collect_garbage().await;
        Ok(())
    }

    /// `checkpoints` with the bytes on disk each adds to the data directory: its filesystem layer (the
    /// changes since its parent) and, once written, its process image (incremental too). None where
    /// that cannot be measured (logged).
    pub fn with_disk_bytes(&self, checkpoints: Vec<CheckpointRecord>) -> Vec<(CheckpointRecord, Option<u64>)> {
        let measure = |cp: &CheckpointRecord| -> Result<u64, String> {
            let files = self.fs.layer_bytes(cp.stack).map_err(|e| e.to_string())?;
            let image = match cp.image.filter(|_| cp.image_written) {
                Some(id) => self.images.disk_bytes(id).map_err(|e| e.to_string())?,
                None => 0,
            };
            Ok(files + image)
        };
        // A few system calls per checkpoint: done in place, as a hop to the blocking pool costs more
        // (measured: it added 0.1 ms to a 0.7 ms checkpoint call).
        tokio::task::block_in_place(|| {
            let measured = checkpoints.into_iter().map(|cp| {
                let bytes = measure(&cp).inspect_err(|e| tracing::warn!(checkpoint = %cp.id, "cannot measure it: {e}"));
                (cp, bytes.ok())
            });
            measured.collect()
        })
    }
}

/// Checkpoint ids look different from sandbox ids, so the two are not mixed up.
fn new_checkpoint_id() -> String {
    format!("ck-{}", new_id())
}
