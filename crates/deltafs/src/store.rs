//! The on-disk layer store, shared by every mount (and process) using one store directory.
//!
//! ```text
//! <store>/layers/<id>/meta      parent layer, base layer, image layer paths (base only)   [snapshot]
//! <store>/layers/<id>/journal   metadata records appended as operations happen              [frames]
//! <store>/layers/<id>/frozen    exists once the layer is a checkpoint (immutable from then on)
//! <store>/layers/<id>/index     optional full tree of the stack ending at this layer        [snapshot]
//! <store>/layers/<id>/data/<ino> file bytes written in this layer, at their file offsets (sparse)
//! <store>/layers/<id>/lock      flock'ed by the mount that writes (or just created) the layer
//! <store>/layers/<id>/hollow    exists once the layer's checkpoint was deleted (kept for descendants)
//! <store>/bases/<sha256>        id of the base layer indexing a list of image layers
//! <store>/tmp/<pid>.<rand>      layers under construction, renamed into layers/ when complete
//! <store>/gc.lock               flock: exclusive during GC, shared while a layer is stacked on a stack
//! ```
//! Layers appear in `layers/` only complete (rename), a checkpoint is complete once `frozen` exists,
//! and a layer is deleted by renaming it out of `layers/` first: a SIGKILL at any moment leaves every
//! stack whose top is frozen loadable.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::image::{self, ImageError};
use crate::journal::{self, JournalError, JournalWriter};
use crate::node::{LayerId, Tree, PACK_SLOT};
use crate::reclaim::{self, Family, HOLLOW};

/// Errors of store operations.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("cannot index image layers")]
    Image(#[from] ImageError),
    #[error("no stack {0} in the store")]
    UnknownStack(StackId),
    #[error("layer {0} is not a completed checkpoint")]
    NotFrozen(StackId),
    #[error("checkpoint {0} was deleted: its layer is kept only for the checkpoints made after it")]
    Deleted(StackId),
    #[error("stack {0} does not share this mount's image base: cannot roll back to it")]
    ForeignStack(StackId),
    #[error("layer {layer} names parent {parent}, which is missing")]
    MissingParent { layer: LayerId, parent: LayerId },
    #[error("image layer path {0} is not absolute")]
    RelativeImagePath(PathBuf),
}

impl StoreError {
    /// The store's filesystem is full, or its disk quota is used up.
    pub fn is_no_space(&self) -> bool {
        let (StoreError::Io { source, .. } | StoreError::Journal(JournalError::Io { source, .. })) = self else {
            return false;
        };
        matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
    }
}

type Result<T> = std::result::Result<T, StoreError>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_owned(), source }
}

/// Names an immutable layer stack: a base (indexed image layers) or a checkpoint. Its text form (32
/// hex digits) is what the daemon stores in its catalog.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct StackId(pub(crate) LayerId);

impl std::fmt::Display for StackId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for StackId {
    type Err = InvalidStackId;
    fn from_str(s: &str) -> std::result::Result<Self, InvalidStackId> {
        LayerId::parse(s).map(StackId).ok_or_else(|| InvalidStackId(s.to_owned()))
    }
}

/// A string that is not a stack id.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a DeltaFS stack id (32 hex digits)")]
pub struct InvalidStackId(String);

/// What [`Store::delete_unreferenced`] freed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcStats {
    pub layers_deleted: usize,
    pub layers_kept: usize,
    /// Bytes freed inside layers kept only for the checkpoints made after theirs.
    pub bytes_reclaimed: u64,
}

/// One layer of a stack, as [`Store::describe`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub id: StackId,
    pub frozen: bool,
    /// A full tree index is stored with the layer.
    pub indexed: bool,
    /// Metadata records in the layer's journal.
    pub records: usize,
    /// Bytes allocated by the layer's data files.
    pub data_bytes: u64,
    /// Image layer directories (base layers only).
    pub images: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LayerMeta {
    pub parent: Option<LayerId>,
    pub base: LayerId,
    /// Image layer directories, bottom first (base layers only).
    pub images: Vec<PathBuf>,
    /// Journals to replay above the nearest index to load this layer's tree.
    pub replay_depth: u32,
}

const META_MAGIC: &[u8; 8] = b"DFSMETA1";
const INDEX_MAGIC: &[u8; 8] = b"DFSINDX1";

/// A stack loaded into memory.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub tree: Tree,
    pub meta: LayerMeta,
    pub images: Arc<Vec<PathBuf>>,
}

/// The layer store (see the module docs for the layout). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    root: Arc<PathBuf>,
    gc: Arc<parking_lot::Mutex<GcMemory>>,
}

/// What this process's garbage collections learnt that stays true, so a collection reads only what
/// is new: the parents of frozen layers (a frozen layer never changes and holds no lock while a
/// collection runs: `checkpoint` holds `gc.lock` until its next layer is locked), the layers marked
/// hollow, and what `reclaim` did.
#[derive(Debug, Default)]
struct GcMemory {
    frozen: HashMap<LayerId, Option<LayerId>>,
    hollow: HashSet<LayerId>,
    reclaim: reclaim::Memory,
}

/// A layer being written by one mount: its journal, its data directory, and the lock that tells
/// the garbage collector it is alive.
#[derive(Debug)]
pub(crate) struct WritableLayer {
    pub id: LayerId,
    pub dir: PathBuf,
    pub journal: JournalWriter,
    pub meta: LayerMeta,
    pub pack: PackSlots,
    _lock: File,
}

impl WritableLayer {
    pub fn data_path(&self, ino: u64) -> PathBuf {
        data_path(&self.dir, ino)
    }
}

/// Slots of a writable layer's pack file: freed slots are reused, so deleting and creating small
/// files does not grow the pack.
#[derive(Debug, Default)]
pub(crate) struct PackSlots {
    end: u64,
    free: Vec<u64>,
}

impl PackSlots {
    /// A slot, and whether it held an earlier file (its bytes must then be overwritten).
    pub fn alloc(&mut self) -> (u64, bool) {
        if let Some(slot) = self.free.pop() {
            return (slot, true);
        }
        let slot = self.end;
        self.end += PACK_SLOT;
        (slot, false)
    }

    pub fn free(&mut self, slot: u64) {
        self.free.push(slot);
    }
}

/// The pack file of a layer: small files' bytes in [`PACK_SLOT`]-sized slots.
pub(crate) fn pack_path(layer_dir: &Path) -> PathBuf {
    layer_dir.join("data").join("pack")
}

/// Where a layer keeps the bytes of inode `ino`: `data/<ino / 256 in hex>/<ino>`. Spreading files
/// over directories spreads them over ext4 block groups (measured: 3,000 files in one directory of
/// a busy ext4 spent most of their creation time scanning for a free inode in one group).
pub(crate) fn data_path(layer_dir: &Path, ino: u64) -> PathBuf {
    layer_dir.join("data").join(format!("{:x}", ino >> 8)).join(ino.to_string())
}

/// Opens (creating it and its directory if needed) a data file for reading and writing.
pub(crate) fn open_data_rw(path: &Path) -> io::Result<File> {
    let open = || std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path);
    match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            open()
        }
        r => r,
    }
}

/// Bytes allocated by the files below `dir`.
fn allocated_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let md = entry.metadata()?;
        total += if md.is_dir() { allocated_bytes(&entry.path())? } else { md.blocks() * 512 };
    }
    Ok(total)
}

fn try_lock(file: &File) -> io::Result<bool> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

impl Store {
    /// Opens (creating if needed) the store at `dir`, and removes half-built layers left in `tmp/`
    /// by processes that no longer exist.
    pub fn open(dir: &Path) -> Result<Store> {
        for sub in ["layers", "bases", "tmp"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let store = Store { root: Arc::new(dir.to_owned()), gc: Arc::default() };
        store.clean_tmp()?;
        Ok(store)
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn clean_tmp(&self) -> Result<()> {
        let tmp = self.root.join("tmp");
        for entry in std::fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let entry = entry.map_err(io_err(&tmp))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.split('.').next().and_then(|p| p.parse::<i32>().ok());
            let alive = pid.is_some_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok());
            if !alive {
                let p = entry.path();
                let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
            }
        }
        Ok(())
    }

    fn tmp_path(&self) -> PathBuf {
        self.root.join("tmp").join(format!("{}.{}", std::process::id(), LayerId::random()))
    }

    pub(crate) fn layer_dir(&self, id: LayerId) -> PathBuf {
        self.root.join("layers").join(id.to_string())
    }

    pub(crate) fn read_meta(&self, id: LayerId) -> Result<LayerMeta> {
        Ok(self.read_meta_and_format(id)?.1)
    }

    /// A layer's meta and the format version of the layer (which its journal is written in).
    pub(crate) fn read_meta_and_format(&self, id: LayerId) -> Result<(u32, LayerMeta)> {
        let path = self.layer_dir(id).join("meta");
        if !path.exists() {
            return Err(StoreError::UnknownStack(StackId(id)));
        }
        Ok(journal::read_snapshot(&path, META_MAGIC, "layer meta")?)
    }

    /// The base stack for a list of image layer directories (bottom first). The first call indexes
    /// the layers and stores the index; later calls (from any process) reuse it.
    pub fn base_stack(&self, image_layers: &[PathBuf]) -> Result<StackId> {
        let key_path = self.base_key_path(image_layers)?;
        if let Ok(text) = std::fs::read_to_string(&key_path) {
            if let Some(id) = LayerId::parse(text.trim()) {
                // A base indexed in an older format is indexed again (image files' block counts).
                let index = self.layer_dir(id).join("index");
                if journal::snapshot_version(&index, INDEX_MAGIC, "tree index").ok() == Some(journal::FORMAT_VERSION) {
                    return Ok(StackId(id));
                }
            }
        }
        let tree = image::index_layers(image_layers)?;
        let id = LayerId::random();
        let tmp = self.tmp_path();
        std::fs::create_dir_all(tmp.join("data")).map_err(io_err(&tmp))?;
        let meta = LayerMeta { parent: None, base: id, images: image_layers.to_vec(), replay_depth: 0 };
        journal::write_snapshot(&tmp.join("meta"), META_MAGIC, &meta, journal::Fsync::No)?;
        journal::write_snapshot(&tmp.join("index"), INDEX_MAGIC, &tree, journal::Fsync::No)?;
        File::create(tmp.join("frozen")).map_err(io_err(&tmp))?;
        let dir = self.layer_dir(id);
        std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        let key_tmp = self.tmp_path();
        std::fs::write(&key_tmp, id.to_string()).map_err(io_err(&key_tmp))?;
        std::fs::rename(&key_tmp, &key_path).map_err(io_err(&key_path))?;
        tracing::info!(stack = %id, layers = image_layers.len(), inodes = tree.nodes.len(), "indexed image layers");
        Ok(StackId(id))
    }

    /// Where the id of the base indexing `image_layers` is kept: `bases/<sha256 of the paths>`.
    fn base_key_path(&self, image_layers: &[PathBuf]) -> Result<PathBuf> {
        let mut hasher = sha2::Sha256::new();
        for layer in image_layers {
            if !layer.is_absolute() {
                return Err(StoreError::RelativeImagePath(layer.clone()));
            }
            hasher.update(layer.as_os_str().as_encoded_bytes());
            hasher.update([0u8]);
        }
        Ok(self.root.join("bases").join(hex::encode(hasher.finalize())))
    }

    /// The format and meta of a stack's top layer, if the stack can be mounted: the layer is a
    /// completed checkpoint that was not deleted.
    pub(crate) fn stack_meta(&self, stack: StackId) -> Result<(u32, LayerMeta)> {
        let dir = self.layer_dir(stack.0);
        if !dir.join("frozen").exists() {
            if dir.exists() {
                return Err(StoreError::NotFrozen(stack));
            }
            return Err(StoreError::UnknownStack(stack));
        }
        if dir.join(HOLLOW).exists() {
            return Err(StoreError::Deleted(stack));
        }
        self.read_meta_and_format(stack.0)
    }

    /// Loads a stack's tree: the nearest stored index below it plus the journals above that index.
    pub(crate) fn load(&self, stack: StackId) -> Result<Loaded> {
        let (format, meta) = self.stack_meta(stack)?;
        let tree = self.tree_of(stack.0, format, &meta)?;
        let images = Arc::new(self.read_meta(meta.base)?.images);
        Ok(Loaded { tree, meta, images })
    }

    /// The tree of frozen layer `top` (format and meta already read).
    pub(crate) fn tree_of(&self, top: LayerId, top_format: u32, top_meta: &LayerMeta) -> Result<Tree> {
        let mut replay = Vec::new();
        let mut cur = top;
        let mut tree = loop {
            let index = self.layer_dir(cur).join("index");
            if index.exists() {
                break journal::read_tree(&index, INDEX_MAGIC)?;
            }
            let (format, meta) =
                if cur == top { (top_format, top_meta.clone()) } else { self.read_meta_and_format(cur)? };
            replay.push((cur, format));
            let parent = meta.parent.ok_or(StoreError::UnknownStack(StackId(cur)))?;
            if !self.layer_dir(parent).exists() {
                return Err(StoreError::MissingParent { layer: cur, parent });
            }
            cur = parent;
        };
        for (layer, format) in replay.iter().rev() {
            self.replay(&mut tree, *layer, *format)?;
        }
        Ok(tree)
    }

    /// Applies layer `layer`'s journal (written in format `format`) to `tree`, its parent's tree.
    pub(crate) fn replay(&self, tree: &mut Tree, layer: LayerId, format: u32) -> Result<()> {
        for record in journal::read_journal(&self.layer_dir(layer).join("journal"), format)? {
            journal::apply(tree, record);
        }
        Ok(())
    }

    /// Creates a new writable layer on top of stack `parent` (already loaded: `parent_meta`).
    /// `parent_indexed`: the parent has (or is getting) a full index, so loading the new layer
    /// replays only its own journal.
    pub(crate) fn create_layer(
        &self,
        parent: LayerId,
        parent_meta: &LayerMeta,
        parent_indexed: bool,
    ) -> Result<WritableLayer> {
        let tmp = self.tmp_path();
        let meta = LayerMeta {
            parent: Some(parent),
            base: parent_meta.base,
            images: Vec::new(),
            replay_depth: if parent_indexed { 1 } else { parent_meta.replay_depth + 1 },
        };
        // What a failure (a full disk) leaves behind goes at once, not at the next collection.
        let made = (|| {
            std::fs::create_dir_all(tmp.join("data")).map_err(io_err(&tmp))?;
            let lock_path = tmp.join("lock");
            let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
            try_lock(&lock).map_err(io_err(&lock_path))?;
            journal::write_snapshot(&tmp.join("meta"), META_MAGIC, &meta, journal::Fsync::No)?;
            let id = LayerId::random();
            let dir = self.layer_dir(id);
            std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
            let journal = JournalWriter::open(&dir.join("journal")).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&dir);
            })?;
            Ok(WritableLayer { id, dir, journal, meta, pack: PackSlots::default(), _lock: lock })
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        made
    }

    /// Locks the set of layers: shared while a stack is loaded and a layer is put on top of it
    /// (so the stack cannot be collected in between), exclusive while the garbage collector runs.
    pub(crate) fn lock_layers(&self, op: rustix::fs::FlockOperation) -> Result<File> {
        let path = self.root.join("gc.lock");
        let file =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
        rustix::fs::flock(&file, op).map_err(|e| StoreError::Io { path, source: e.into() })?;
        Ok(file)
    }

    /// Marks a layer immutable: from now on it is a checkpoint that any mount can start from.
    pub(crate) fn freeze(&self, layer: &mut WritableLayer) -> Result<()> {
        layer.journal.write_out()?;
        let path = layer.dir.join("frozen");
        File::create(&path).map_err(io_err(&path))?;
        Ok(())
    }

    /// Whether a layer has a full index.
    pub(crate) fn has_index(&self, layer: LayerId) -> bool {
        self.layer_dir(layer).join("index").exists()
    }

    /// Stores the full tree of a frozen layer so loading it (and stacks above it) replays no
    /// journal below it. Used to keep deep stacks fast to load. Synced before it is renamed in:
    /// it may come after the sync that made the layer's checkpoint durable (the daemon's syncfs),
    /// and a power loss must not leave a torn index where the journals would load (a new file
    /// renamed in can be empty after a crash).
    pub(crate) fn write_index(&self, layer: LayerId, tree: &Tree) -> Result<()> {
        let path = self.layer_dir(layer).join("index");
        journal::write_snapshot(&path, INDEX_MAGIC, tree, journal::Fsync::BeforeRename)?;
        Ok(())
    }

    /// Removes a writable layer that holds nothing yet (of a checkpoint that failed after creating it).
    pub(crate) fn remove_unused(&self, layer: WritableLayer) -> Result<()> {
        let dir = layer.dir.clone();
        drop(layer);
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))
    }

    /// Deletes the file data of a writable layer that a rollback is about to discard, at once: on a
    /// full disk that data may be what fills it.
    pub(crate) fn drop_data(&self, layer: &WritableLayer) -> Result<()> {
        let data = layer.dir.join("data");
        std::fs::remove_dir_all(&data).map_err(io_err(&data))
    }

    /// Removes a writable layer that will never become a checkpoint (after a rollback). The
    /// layer leaves `layers/` at once (a rename); its files are deleted by a background thread,
    /// so the caller does not wait for a deletion that grows with the discarded change.
    pub(crate) fn discard(&self, layer: WritableLayer) -> Result<()> {
        let tmp = self.tmp_path();
        std::fs::rename(&layer.dir, &tmp).map_err(io_err(&layer.dir))?;
        drop(layer);
        std::thread::spawn(move || {
            if let Err(e) = std::fs::remove_dir_all(&tmp) {
                tracing::warn!(path = %tmp.display(), error = %e, "deleting a discarded layer");
            }
        });
        Ok(())
    }

    /// Bytes the top layer of `stack` takes on disk (its data, journal and index): what a
    /// checkpoint adds to the store, the changes since the stack below. Deleting the checkpoint
    /// frees at most this (what stacks above it still read stays).
    pub fn layer_bytes(&self, stack: StackId) -> Result<u64> {
        let dir = self.layer_dir(stack.0);
        allocated_bytes(&dir).map_err(io_err(&dir))
    }

    /// The layers of a stack, top first (for inspection and debugging).
    pub fn describe(&self, stack: StackId) -> Result<Vec<LayerInfo>> {
        let mut out = Vec::new();
        let mut cur = Some(stack.0);
        while let Some(id) = cur {
            let (format, meta) = self.read_meta_and_format(id)?;
            let dir = self.layer_dir(id);
            out.push(LayerInfo {
                id: StackId(id),
                frozen: dir.join("frozen").exists(),
                indexed: dir.join("index").exists(),
                records: journal::read_journal(&dir.join("journal"), format)?.len(),
                data_bytes: allocated_bytes(&dir.join("data")).map_err(io_err(&dir))?,
                images: meta.images,
            });
            cur = meta.parent;
        }
        Ok(out)
    }

    /// Deletes every layer that neither a stack in `keep` nor a live mount (a writable layer whose
    /// lock is held) needs. Stacks share their ancestors' data, so a checkpoint's layer stays while a
    /// kept stack or a live mount descends from it; of such a layer whose own stack is no longer
    /// kept, only the bytes the remaining stacks read stay (see `reclaim`), and the stack can no
    /// longer be mounted ([`StoreError::Deleted`]). Writable layers left by a killed mount (lock
    /// free, never frozen) are deleted.
    pub fn delete_unreferenced(&self, keep: &[StackId]) -> Result<GcStats> {
        let _gc = self.lock_layers(rustix::fs::FlockOperation::LockExclusive)?;
        let layers_dir = self.root.join("layers");
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&layers_dir).map_err(io_err(&layers_dir))? {
            let entry = entry.map_err(io_err(&layers_dir))?;
            if let Some(id) = LayerId::parse(&entry.file_name().to_string_lossy()) {
                all.push(id);
            }
        }
        let mut memory = self.gc.lock();
        let memory = &mut *memory;
        let listed: HashSet<LayerId> = all.iter().copied().collect();
        memory.frozen.retain(|id, _| listed.contains(id));
        let mut live = HashSet::new();
        let mut parents: HashMap<LayerId, Option<LayerId>> = HashMap::new();
        for id in &all {
            if let Some(parent) = memory.frozen.get(id) {
                parents.insert(*id, *parent);
                continue;
            }
            let dir = self.layer_dir(*id);
            let lock_path = dir.join("lock");
            if let Ok(f) = File::open(&lock_path) {
                if !try_lock(&f).map_err(io_err(&lock_path))? {
                    live.insert(*id);
                }
            }
            let meta = self.read_meta(*id).ok();
            parents.insert(*id, meta.as_ref().and_then(|m| m.parent));
            if let Some(meta) = meta.filter(|_| !live.contains(id) && dir.join("frozen").exists()) {
                memory.frozen.insert(*id, meta.parent);
            }
        }
        let mut reached = HashSet::new();
        for root in keep.iter().map(|s| s.0).chain(live.iter().copied()) {
            let mut cur = Some(root);
            while let Some(id) = cur {
                if !reached.insert(id) {
                    break;
                }
                cur = parents.get(&id).copied().flatten();
            }
        }
        let mut stats =
            GcStats { layers_kept: all.iter().filter(|id| reached.contains(id)).count(), ..GcStats::default() };
        // Deepest layers first: if this is interrupted, no remaining layer lacks its parent.
        let depth = |mut id: LayerId| {
            let mut d = 0usize;
            while let Some(Some(p)) = parents.get(&id) {
                d += 1;
                id = *p;
            }
            d
        };
        let mut doomed: Vec<(usize, LayerId)> =
            all.into_iter().filter(|id| !reached.contains(id)).map(|id| (depth(id), id)).collect();
        doomed.sort_unstable_by(|a, b| b.cmp(a));
        for (_, id) in doomed {
            let dir = self.layer_dir(id);
            let tmp = self.tmp_path();
            std::fs::rename(&dir, &tmp).map_err(io_err(&dir))?;
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
            stats.layers_deleted += 1;
        }
        let bases = self.root.join("bases");
        for entry in std::fs::read_dir(&bases).map_err(io_err(&bases))? {
            let entry = entry.map_err(io_err(&bases))?;
            let target = std::fs::read_to_string(entry.path()).ok();
            let live = target.and_then(|t| LayerId::parse(t.trim())).is_some_and(|id| reached.contains(&id));
            if !live {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        // The trees that can still be read: kept stacks and what live mounts stand on (a live layer
        // is never frozen here: `checkpoint` holds `gc.lock` until its next layer is locked).
        let mut views: HashSet<LayerId> = keep.iter().map(|s| s.0).collect();
        views.extend(live.iter().filter_map(|id| parents.get(id).copied().flatten()));
        let hollow: HashSet<LayerId> = reached
            .iter()
            .copied()
            .filter(|id| parents.get(id).is_some_and(Option::is_some) && !views.contains(id) && !live.contains(id))
            .collect();
        memory.hollow.retain(|id| hollow.contains(id));
        for id in &hollow {
            let path = self.layer_dir(*id).join(HOLLOW);
            if !memory.hollow.contains(id) && !path.exists() {
                File::create(&path).map_err(io_err(&path))?;
            }
            memory.hollow.insert(*id);
        }
        let family = Family::new(parents.iter().filter_map(|(id, parent)| Some((*id, (*parent)?))));
        stats.bytes_reclaimed = reclaim::reclaim(self, &mut memory.reclaim, &hollow, &views, &family)?;
        tracing::info!(
            deleted = stats.layers_deleted,
            kept = stats.layers_kept,
            reclaimed = stats.bytes_reclaimed,
            "store GC"
        );
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use imbl::OrdMap;

    use super::*;
    use crate::journal::{v1, write_old_format, FORMAT_V1};
    use crate::node::{Attr, Kind, Source, Time};

    fn v1_node(mode: u32, kind: v1::Kind) -> v1::Node {
        let t = Time::default();
        let attr = Attr { mode, uid: 0, gid: 0, nlink: 1, rdev: 0, atime: t, mtime: t, ctime: t };
        v1::Node { attr, xattrs: OrdMap::new(), kind }
    }

    fn v1_file(size: u64, base: Source) -> v1::Node {
        let content = v1::Content { size, base: Some(base), base_len: u64::MAX, chunks: OrdMap::new() };
        v1_node(libc::S_IFREG | 0o644, v1::Kind::File(content))
    }

    /// A layer as format 1 wrote it: meta, an index or a journal, frozen.
    fn write_v1_layer(store: &Store, id: LayerId, meta: &LayerMeta, index: Option<&v1::Tree>, journal: &[v1::Record]) {
        let dir = store.layer_dir(id);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        write_old_format(&dir.join("meta"), Some(META_MAGIC), FORMAT_V1, std::slice::from_ref(meta));
        if let Some(tree) = index {
            write_old_format(&dir.join("index"), Some(INDEX_MAGIC), FORMAT_V1, std::slice::from_ref(tree));
        }
        write_old_format(&dir.join("journal"), None, FORMAT_V1, journal);
        File::create(dir.join("frozen")).unwrap();
    }

    #[test]
    fn format_1_stacks_load_and_their_bases_are_indexed_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let image = dir.path().join("image");
        std::fs::create_dir(&image).unwrap();
        let f = File::create(image.join("f")).unwrap();
        f.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"data", 0).unwrap();

        // A base and a checkpoint above it, as format 1 stored them.
        let base = LayerId::random();
        let root = v1_node(
            libc::S_IFDIR | 0o755,
            v1::Kind::Dir([(std::ffi::OsString::from("f"), 2u64)].into_iter().collect()),
        );
        let file = v1_file(1 << 20, Source::Image(0, "f".into()));
        let tree = v1::Tree { nodes: [(1u64, Arc::new(root)), (2, Arc::new(file))].into_iter().collect(), next_ino: 3 };
        let meta = LayerMeta { parent: None, base, images: vec![image.clone()], replay_depth: 0 };
        write_v1_layer(&store, base, &meta, Some(&tree), &[]);
        std::fs::write(store.base_key_path(std::slice::from_ref(&image)).unwrap(), base.to_string()).unwrap();
        let top = LayerId::random();
        let meta = LayerMeta { parent: Some(base), base, images: Vec::new(), replay_depth: 1 };
        let written = v1::Record::Node { ino: 3, node: v1_file(9000, Source::Layer(top)) };
        let entry = v1::Record::Entry { dir: 1, name: "g".into(), ino: Some(3) };
        write_v1_layer(&store, top, &meta, None, &[written, entry]);

        let loaded = store.load(StackId(top)).unwrap();
        let blocks = |tree: &Tree, ino| match &tree.get(ino).unwrap().kind {
            Kind::File(c) => (c.size, c.blocks),
            other => panic!("{other:?}"),
        };
        // Format 1 did not know the blocks: those of a dense file of the size.
        assert_eq!((blocks(&loaded.tree, 2), blocks(&loaded.tree, 3)), ((1 << 20, 2048), (9000, 24)));
        assert_eq!(loaded.tree.lookup(1, "g".as_ref()), Some(3));
        // A checkpoint on top is written in the current format and loads with the layers below.
        let next = store.create_layer(top, &loaded.meta, false).unwrap();
        assert_eq!(
            journal::snapshot_version(&next.dir.join("meta"), META_MAGIC, "meta").unwrap(),
            journal::FORMAT_VERSION
        );
        let mut next = next;
        store.freeze(&mut next).unwrap();
        assert_eq!(blocks(&store.load(StackId(next.id)).unwrap().tree, 3), (9000, 24));

        // Asking for the base again indexes the image in the current format, with real counts.
        let again = store.base_stack(std::slice::from_ref(&image)).unwrap();
        assert_ne!(again, StackId(base));
        let allocated = std::fs::metadata(image.join("f")).unwrap().blocks();
        assert!(allocated < 2048);
        assert_eq!(blocks(&store.load(again).unwrap().tree, 2), (1 << 20, allocated));
        assert_eq!(store.base_stack(&[image]).unwrap(), again);
    }
}
