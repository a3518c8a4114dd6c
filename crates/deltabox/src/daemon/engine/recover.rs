//! Recovery at daemon start: reattach to the sandboxes whose shims still run, clean up the rest.

use std::sync::Arc;
use std::time::Duration;

use sandbox::cgroup::Cgroup;

use super::{Engine, Live, IMAGE_WAIT};
use crate::catalog::{CheckpointRecord, ImageFailure};
use crate::daemon::shim_client::Announced;
use crate::shim::proto::ErrorKind;

impl Engine {
    /// Reattaches to every sandbox whose shim still runs (a shim of another protocol version too: its
    /// sandbox keeps running and is listed as such); destroys what cannot be recovered.
    pub(super) async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        let records = self.catalog().sandboxes()?;
        let mut known = std::collections::HashSet::new();
        for record in records {
            known.insert(record.id.clone());
            let info = match self.shim(&record.id).announce().await {
                Ok(Announced::Compatible(info)) => info,
                Ok(Announced::Incompatible { protocol, info }) => {
                    tracing::warn!(
                        id = %record.id,
                        shim_protocol = protocol,
                        "the sandbox's shim speaks another protocol version; leaving it running, unused"
                    );
                    info
                }
                Err(e) => {
                    tracing::warn!(id = %record.id, "sandbox's shim is gone ({e:#}); cleaning it up");
                    if record.config.egress != Default::default() {
                        self.forget_network(&record.id).await;
                    }
                    self.force_cleanup(&record.id);
                    self.catalog().delete_sandbox(&record.id)?;
                    continue;
                }
            };
            tracing::info!(id = %record.id, shim = info.shim_pid, "reattached to sandbox");
            let served = match self.prepare_network(&record).await {
                Ok(()) => self.attach_network(&record, &info).await,
                Err(e) => Err(e),
            };
            if let Err(e) = served {
                tracing::error!(id = %record.id, "cannot serve the sandbox's network again: {e:#}");
            }
            self.watch_shim(record.id.clone(), info.shim_pid);
            self.sandboxes.write().await.insert(record.id.clone(), Live::new(record, info));
        }
        // Leftovers of sandboxes the catalog never recorded (a crash during create).
        for name in Cgroup::list_children(&self.cgroup_parent()).unwrap_or_default() {
            let id = name.rsplit('/').next().unwrap_or_default().to_string();
            if !known.contains(&id) {
                tracing::warn!(%id, "removing a stray cgroup");
                self.force_cleanup(&id);
            }
        }
        for entry in std::fs::read_dir(self.data_dir.join("sandboxes"))? {
            let id = entry?.file_name().to_string_lossy().into_owned();
            if !known.contains(&id) {
                let shim = self.shim(&id);
                if shim.info().await.is_ok() {
                    let _ = shim.destroy().await;
                }
                tracing::warn!(%id, "removing a stray sandbox directory");
                self.force_cleanup(&id);
            }
        }
        self.make_pending_durable()?;
        self.collect_garbage().await;
        Ok(())
    }

    /// After a restart, every checkpoint not yet durable is made so: one whose process image is still
    /// unwritten is watched until the image shows up on disk (then it is durable once synced), until its
    /// shim is gone (it never will be: recorded as its `image_failure`) or [`IMAGE_WAIT`] has passed.
    fn make_pending_durable(self: &Arc<Self>) -> anyhow::Result<()> {
        let pending: Vec<CheckpointRecord> =
            self.catalog().checkpoints()?.into_iter().filter(|c| !c.durable && c.image_failure.is_none()).collect();
        for cp in pending {
            let engine = Arc::downgrade(self);
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + IMAGE_WAIT;
                loop {
                    let Some(engine) = engine.upgrade() else { return };
                    if cp.image.is_none() || cp.image_written {
                        return engine.sync_and_mark_durable(&cp.id).await;
                    }
                    if engine.image_on_disk(&cp) {
                        tracing::info!(checkpoint = %cp.id, "its process image was written while the daemon was away");
                        let _ = engine.catalog().mark_image_written(&cp.id);
                        return engine.sync_and_mark_durable(&cp.id).await;
                    }
                    let writer_alive = engine.sandboxes.read().await.contains_key(&cp.sandbox);
                    if !writer_alive || tokio::time::Instant::now() > deadline {
                        let reason = "the sandbox's supervisor ended before writing it".to_string();
                        if !writer_alive {
                            engine.record_image_failure(
                                &cp.id,
                                ImageFailure { kind: ErrorKind::CheckpointFailed, reason },
                            );
                        }
                        return;
                    }
                    drop(engine);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        Ok(())
    }
}
