//! Rolling a sandbox back to one of its checkpoints (or one it was forked from).

use std::time::Instant;

use super::{tree, Engine, EngineError, EngineResult};
use crate::catalog::CheckpointRecord;
use crate::shim::proto::RollbackStats;

impl Engine {
    /// Rolls sandbox `id` back to checkpoint `checkpoint`: its files, and for a full checkpoint its
    /// processes; after a filesystem-only checkpoint the processes are killed (init stays). Returns the
    /// checkpoint, the shim's stats and the call's duration in milliseconds.
    pub async fn rollback(&self, id: &str, checkpoint: &str) -> EngineResult<(CheckpointRecord, RollbackStats, f64)> {
        let started = Instant::now();
        let live = self.live(id).await?;
        let _one_at_a_time = live.ops.lock().await;
        let _links = self.links.read().await;
        let cp = self.checkpoint_record(checkpoint)?;
        let mut record = self.sandbox_record(id)?;
        let origins =
            tree::ancestors(record.origin.as_deref(), |c| self.catalog().checkpoint(c).ok().flatten()?.parent);
        if cp.sandbox != id && !origins.contains(&cp.id) {
            let message = format!(
                "checkpoint {} belongs to sandbox {}, not to {id} or the checkpoints it was forked from; fork it instead",
                cp.id, cp.sandbox
            );
            return Err(EngineError::invalid("checkpoint_of_another_sandbox", message));
        }
        // Another sandbox's checkpoint (the one this sandbox was forked from) comes from its image.
        if cp.image.is_some() && cp.sandbox != id {
            self.wait_image_written(&cp).await?;
        }
        let stats = self.shim(id).rollback(cp.stack, cp.image, cp.address).await?;
        record.head = Some(cp.id.clone());
        self.catalog().update_sandbox(&record)?;
        self.refresh(record).await;
        Ok((cp, stats, started.elapsed().as_secs_f64() * 1000.0))
    }
}
