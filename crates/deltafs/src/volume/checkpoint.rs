//! Checkpoint (freeze the writable layer) and rollback (switch to another stack).

use std::ffi::OsString;
use std::io;

use super::Volume;
use crate::journal::Record;
use crate::node::Ino;
use crate::store::{StackId, StoreError};

/// Inodes whose stored journal exceeds this many layers get a full index written at checkpoint.
const INDEX_EVERY: u32 = 32;

/// What a rollback changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RollbackStats {
    /// Inodes whose content, attributes or existence differ between the two stacks.
    pub changed_inodes: usize,
    /// Directory entries invalidated in the kernel's dentry cache.
    pub changed_entries: usize,
}

/// Kernel cache invalidations a rollback must send once the state lock is released.
#[derive(Debug, Default)]
pub(crate) struct Invalidations {
    pub inodes: Vec<Ino>,
    pub entries: Vec<(Ino, OsString)>,
}

impl Volume {
    /// Freezes the writable layer and pushes an empty one. Cost: a few small file operations,
    /// independent of the size of the filesystem and of the change.
    pub fn checkpoint(&self) -> Result<StackId, StoreError> {
        // From the freeze until the next layer holds its lock, only the old layer's lock (dropped
        // below) protects the new checkpoint: a collector must not list the layers in between.
        let gc_guard = self.store.lock_layers(rustix::fs::FlockOperation::LockShared)?;
        let mut st = self.state.write();
        self.flush_pending(&mut st, None)
            .map_err(|e| StoreError::Io { path: st.layer.dir.join("journal"), source: io::Error::from(e) })?;
        let frozen = st.layer.id;
        let write_index = st.layer.meta.replay_depth >= INDEX_EVERY;
        let next = self.store.create_layer(frozen, &st.layer.meta, write_index)?;
        // A freeze that fails (the journal cannot be written: a full disk) leaves the layer writable.
        if let Err(e) = self.store.freeze(&mut st.layer) {
            if let Err(d) = self.store.remove_unused(next) {
                tracing::warn!(error = %d, "removing the next layer of a failed checkpoint");
            }
            return Err(e);
        }
        let tree = st.tree.clone();
        st.snapshots.insert(frozen, tree.clone());
        st.layer = next;
        drop(st);
        drop(gc_guard);
        if write_index {
            let store = self.store.clone();
            std::thread::spawn(move || {
                if let Err(e) = store.write_index(frozen, &tree) {
                    tracing::warn!(layer = %frozen, error = %e, "writing a stack index failed");
                }
            });
        }
        Ok(StackId(frozen))
    }

    /// Switches to stack `to` (with a fresh writable layer) and returns what the kernel must forget.
    pub fn rollback(&self, to: StackId) -> Result<(RollbackStats, Invalidations), StoreError> {
        let gc_guard = self.store.lock_layers(rustix::fs::FlockOperation::LockShared)?;
        let mut st = self.state.write();
        let (target, meta) = match st.snapshots.get(&to.0) {
            Some(tree) => match self.store.stack_meta(to) {
                Ok((_, meta)) => (tree.clone(), meta),
                Err(e) => {
                    // Deleted by the garbage collector: forget the in-memory tree too.
                    st.snapshots.remove(&to.0);
                    return Err(e);
                }
            },
            None => {
                let loaded = self.store.load(to)?;
                if loaded.meta.base != self.base {
                    return Err(StoreError::ForeignStack(to));
                }
                st.snapshots.insert(to.0, loaded.tree.clone());
                (loaded.tree, loaded.meta)
            }
        };
        let indexed = self.store.has_index(to.0);
        let next = match self.store.create_layer(to.0, &meta, indexed) {
            Err(e) if e.is_no_space() => {
                // What fills the store may be the very change this rollback discards: it goes first.
                // If the next layer still does not fit, the rollback fails and that change is lost.
                tracing::warn!(error = %e, "store full: deleting the discarded layer's data before rolling back");
                self.files.lock().clear();
                self.store.drop_data(&st.layer)?;
                self.store.create_layer(to.0, &meta, indexed)?
            }
            made => made?,
        };
        drop(gc_guard);
        let mut inval = Invalidations::default();
        let diff = st.tree.changed_inodes(&target);
        let mut generations = self.generations.lock();
        for (ino, old, new) in &diff {
            inval.inodes.push(*ino);
            // A directory removed since the checkpoint may live on in the kernel as a dead inode (rmdir
            // marks an inode still in use — say, a template process's cwd — dead, and a dead directory
            // lists as empty for good). A new generation makes the kernel drop it and take a fresh one
            // for the same node id when it looks the directory up again. The removed directory may
            // still be a node (an orphan, nlink 0, while the kernel holds it).
            let was_removed = old.as_ref().is_none_or(|n| n.attr.nlink == 0);
            if was_removed && new.as_ref().is_some_and(|n| n.is_dir()) {
                *generations.entry(*ino).or_insert(0) += 1;
            }
            if let (Some(old), Some(new)) = (old, new) {
                if let (Some(a), Some(b)) = (old.entries(), new.entries()) {
                    for item in a.diff(b) {
                        let name = match item {
                            imbl::ordmap::DiffItem::Add(k, _) | imbl::ordmap::DiffItem::Remove(k, _) => k,
                            imbl::ordmap::DiffItem::Update { old, .. } => old.0,
                        };
                        inval.entries.push((*ino, name.clone()));
                    }
                }
            }
        }
        drop(generations);
        // Inode numbers handed out in the abandoned branch are not reused by this mount: the
        // kernel may still hold such a node id (in an fd opened after the checkpoint), and a
        // different file behind the same id would be read through it.
        let next_ino = st.tree.next_ino.max(target.next_ino);
        st.tree = target;
        if let Some(usage) = st.usage.as_mut() {
            usage.forget_reservations();
        }
        st.tree.next_ino = next_ino;
        st.pending.clear();
        st.layer_blocks.clear();
        st.emptied.clear();
        let old = std::mem::replace(&mut st.layer, next);
        st.log(&[Record::NextIno(next_ino)])
            .map_err(|e| StoreError::Io { path: st.layer.dir.join("journal"), source: io::Error::from(e) })?;
        drop(st);
        // Descriptors of the discarded layer's files (and of layers no longer in the stack) go.
        self.files.lock().clear();
        self.store.discard(old)?;
        let stats = RollbackStats { changed_inodes: inval.inodes.len(), changed_entries: inval.entries.len() };
        Ok((stats, inval))
    }
}
