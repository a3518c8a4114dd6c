//! Forking: new sandboxes that start at a checkpoint.

use std::sync::Arc;

use super::{Engine, EngineError, EngineResult, MAX_FORKS};
use crate::api::SandboxView;
use crate::shim::proto::RestoreSpec;

impl Engine {
    /// Starts `count` new sandboxes whose files (and for a full checkpoint, processes) start at
    /// checkpoint `checkpoint`. All or nothing: a caller asking for N branches gets N or an error.
    pub async fn fork(self: &Arc<Self>, checkpoint: &str, count: usize) -> EngineResult<Vec<SandboxView>> {
        if !(1..=MAX_FORKS).contains(&count) {
            return Err(EngineError::invalid("invalid_count", format!("count must be between 1 and {MAX_FORKS}")));
        }
        let _links = self.links.read().await;
        let cp = self.checkpoint_record(checkpoint)?;
        self.template_memory.forked(&cp);
        if cp.image.is_some() {
            self.wait_image_written(&cp).await?;
        }
        let no_gc = self.fs_gc.read().await;
        let restore = cp.image.map(|image| RestoreSpec { image, sessions: cp.sessions.clone(), address: cp.address });
        let starts =
            (0..count).map(|_| self.start_sandbox(cp.config.clone(), cp.stack, Some(cp.id.clone()), restore.clone()));
        let results = futures_util::future::join_all(starts).await;
        let mut created = Vec::new();
        let mut failure = None;
        for r in results {
            match r {
                Ok(v) => created.push(v),
                Err(e) => failure = Some(e),
            }
        }
        let Some(failure) = failure else { return Ok(created) };
        drop(no_gc);
        for v in created {
            let _ = self.remove(&v.id, true).await;
        }
        Err(failure)
    }
}
