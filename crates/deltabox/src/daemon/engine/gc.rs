//! Garbage collection: filesystem layers, process images and image layers nothing needs any more.

use super::{tree, Engine};
use crate::catalog::CheckpointRecord;

/// How long after its checkpoint an image may still be being written, for the garbage collector.
const IMAGE_WRITE_WINDOW_S: i64 = 600;
/// Process images younger than this are kept even if unreferenced: a checkpoint may be being recorded
/// for them right now.
const YOUNG_IMAGE_MS: u64 = 60_000;

impl Engine {
    /// Frees filesystem data no checkpoint, image or live mount needs, then image layers no image,
    /// sandbox or checkpoint needs. Skipped while an import runs (its layers are not recorded yet).
    pub async fn collect_garbage(&self) {
        let Ok(_import_guard) = self.image_lock.try_lock() else { return };
        let _gc = self.fs_gc.write().await;
        let keep: Vec<deltafs::StackId> = match self.catalog().referenced_stacks() {
            Ok(stacks) => stacks,
            Err(e) => return tracing::error!("cannot read stack references: {e}"),
        };
        let store = self.fs.clone();
        match tokio::task::spawn_blocking(move || store.delete_unreferenced(&keep)).await {
            Ok(Ok(stats)) if stats.layers_deleted > 0 || stats.bytes_reclaimed > 0 => tracing::info!(
                deleted = stats.layers_deleted,
                kept = stats.layers_kept,
                reclaimed_bytes = stats.bytes_reclaimed,
                "freed filesystem layers"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("filesystem garbage collection failed: {e}"),
            Err(e) => tracing::error!("filesystem garbage collection panicked: {e}"),
        }
        self.collect_images();
        let (stored, used) = match (self.layers.layers(), self.catalog().referenced_layers()) {
            (Ok(s), Ok(u)) => (s, u),
            (Err(e), _) => return tracing::error!("cannot list layers: {e}"),
            (_, Err(e)) => return tracing::error!("cannot read layer references: {e}"),
        };
        for layer in stored.into_iter().filter(|l| !used.contains(l)) {
            match self.layers.remove_layer(&layer) {
                Ok(()) => tracing::info!(%layer, "removed unused image layer"),
                Err(e) => tracing::error!(%layer, "cannot remove unused image layer: {e}"),
            }
        }
    }

    /// Deletes process images no checkpoint needs (an image is needed by its checkpoint and by every image
    /// whose parent chain it is on), except young ones. Not while an image is being written (one not
    /// written nor failed, of a checkpoint younger than [`IMAGE_WRITE_WINDOW_S`]): its parent, which may be
    /// any older image (`ImageJob::against_image`), is known only once it is.
    fn collect_images(&self) {
        let referenced: Vec<deltacr::image::ImageId> = match self.catalog().checkpoints() {
            Ok(cps) => {
                let writing = |c: &&CheckpointRecord| {
                    c.image.is_some()
                        && !c.image_written
                        && c.image_failure.is_none()
                        && super::now() - c.created < IMAGE_WRITE_WINDOW_S
                };
                if cps.iter().any(|c| writing(&c)) {
                    return;
                }
                cps.iter().filter_map(|c| c.image).collect()
            }
            Err(e) => return tracing::error!("cannot read checkpoints: {e}"),
        };
        let needed = tree::closure(referenced, |id| self.images.open(id).ok().and_then(|image| image.header.parent));
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        for id in self.images.ids().unwrap_or_default().into_iter().filter(|id| !needed.contains(id)) {
            let young =
                self.images.open(id).is_ok_and(|i| now_ms.saturating_sub(i.header.created_unix_ms) < YOUNG_IMAGE_MS);
            if young {
                continue;
            }
            match self.images.remove(id) {
                Ok(()) => tracing::info!(image = %id, "removed unused process image"),
                Err(e) => tracing::error!(image = %id, "cannot remove unused process image: {e}"),
            }
        }
    }
}
