//! Removing a sandbox (and the checkpoints only it used).

use std::time::Duration;

use super::{shim_exit, tree, Engine, EngineError, EngineResult};

/// How long a sandbox's removal waits for its shim to exit after it destroyed the sandbox.
const SHIM_EXIT_WAIT: Duration = Duration::from_secs(5);

impl Engine {
    /// Removes sandbox `id`. Its checkpoints go too unless `keep_checkpoints`, or another sandbox still
    /// uses them (was forked from one, or took a checkpoint on top of one). A sandbox whose shim speaks
    /// another protocol version is killed through its cgroup (its shim then exits by itself).
    pub async fn remove(&self, id: &str, keep_checkpoints: bool) -> EngineResult<()> {
        // Unlisted first, so the shim watcher does not race us when the shim exits.
        let Some(live) = self.sandboxes.write().await.remove(id) else {
            return Err(EngineError::SandboxNotFound(id.to_string()));
        };
        self.detach_network(id).await;
        if live.compatible() {
            // The shim holds the lock of the sandbox's writable layer until it exits: the garbage
            // collection below frees the sandbox's data only after that.
            let exited = shim_exit(live.info.shim_pid);
            match self.shim(id).destroy().await {
                Ok(()) => {
                    if let Ok(exited) = exited {
                        if tokio::time::timeout(SHIM_EXIT_WAIT, exited.readable()).await.is_err() {
                            tracing::warn!(%id, "the shim did not exit after destroying the sandbox");
                        }
                    }
                }
                Err(e) => tracing::warn!(%id, "the shim could not destroy the sandbox ({e:#}); cleaning up directly"),
            }
        }
        self.force_cleanup(id);
        self.catalog().delete_sandbox(id)?;
        if !keep_checkpoints {
            let _links = self.links.write().await;
            let doomed = {
                let catalog = self.catalog();
                tree::unused_checkpoints_of(id, &catalog.checkpoints()?, &catalog.sandboxes()?)
            };
            self.catalog().delete_checkpoints(&doomed)?;
        }
        self.collect_garbage().await;
        Ok(())
    }
}
