//! Images as sandboxes use them: lookup, their DeltaFS base stack, removal.

use std::path::PathBuf;

use anyhow::Context;
use deltafs::StackId;

use super::{Engine, EngineError, EngineResult};
use crate::catalog::ImageRecord;

impl Engine {
    pub fn image(&self, name: &str) -> EngineResult<ImageRecord> {
        self.catalog().image(name)?.ok_or_else(|| EngineError::ImageNotFound(name.to_string()))
    }

    /// The DeltaFS stack of `image`'s layers (indexed once, then recorded with the image).
    pub async fn image_base_stack(&self, image: &ImageRecord) -> EngineResult<StackId> {
        if let Some(stack) = image.base_stack {
            return Ok(stack);
        }
        let paths: Vec<PathBuf> = image.layers.iter().map(|l| self.layers.layer_path(&l.diff_id)).collect();
        let store = self.fs.clone();
        let stack = tokio::task::spawn_blocking(move || store.base_stack(&paths))
            .await
            .context("index the image's layers")?
            .map_err(|e| anyhow::anyhow!("index the image's layers: {}", crate::errors::error_chain(&e)))?;
        let mut updated = image.clone();
        updated.base_stack = Some(stack);
        self.catalog().put_image(&updated)?;
        Ok(stack)
    }

    /// Removes image `name` unless a sandbox runs on it; frees the layers nothing else uses.
    pub async fn remove_image(&self, name: &str) -> EngineResult<()> {
        self.image(name)?;
        let users = self.users_of_image(name).await;
        if !users.is_empty() {
            let message = format!("image {name:?} is used by sandbox(es) {}; remove them first", users.join(", "));
            return Err(EngineError::conflict("image_in_use", message));
        }
        self.catalog().delete_image(name)?;
        self.collect_garbage().await;
        Ok(())
    }

    /// Sandboxes that run on image `name`.
    async fn users_of_image(&self, name: &str) -> Vec<String> {
        self.sandboxes
            .read()
            .await
            .values()
            .filter(|l| l.record.config.image == name)
            .map(|l| l.record.id.clone())
            .collect()
    }
}
