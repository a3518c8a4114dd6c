//! The filesystem state of one mount and the POSIX operations on it, independent of FUSE.
//!
//! One `RwLock` holds the state. Lookups, getattr and reads share it; every mutation takes it
//! exclusively, so a checkpoint (which takes it exclusively too) waits for in-flight requests and
//! sees no half-done operation. File I/O is addressed by inode, not by open handle: the kernel may
//! open files without telling the server (FUSE_NO_OPEN_SUPPORT).
//!
//! Lock order: a lock is taken only while holding locks above it in this list, never one below it
//! or beside it (the leaves are never held two at once).
//! 1. The store's `gc.lock` (a flock, shared): checkpoint and rollback, while they put a new layer
//!    on a stack, so that a collection cannot delete the stack in between.
//! 2. `state` (`RwLock<State>`): the tree, the writable layer and its journal, the files whose
//!    journaling or block count lags, the checkpoints' trees, the quota's count.
//! 3. Leaves, with or without `state`, held briefly (rollback holds `generations` over its diff):
//!    - `lookups`: the kernel's references per inode (taken under `state` to decide whether an
//!      unlinked inode lives on);
//!    - `orphaned`: inodes removed while the kernel held them;
//!    - `files`: cached descriptors of backing files;
//!    - `listings`: directory listings in cookie order;
//!    - `generations`: FUSE generations of replaced inodes;
//!    - `raced_reads`: where inodes whose cached pages must be dropped are sent;
//!    - `handles`: open file handles (never held with another lock).
//!
//! Kernel cache invalidations, which can wait for requests in flight, are sent with none of these
//! held (`Mount`, and the `deltafs-raced` thread for [`Volume::set_raced_reads`]).
//!
//! The operations are split by concern: [`namespace`], [`attrs`], [`handles`], [`contents`] (with
//! [`copy_up`] into the writable layer and the [`backing`] files and their [`extents`]), [`quota`],
//! and [`checkpoint`] and rollback.

mod attrs;
mod backing;
mod checkpoint;
mod contents;
mod copy_up;
mod extents;
mod handles;
mod namespace;
mod quota;

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use imbl::OrdMap;
use nix::errno::Errno;
use parking_lot::{Mutex, RwLock};

use crate::journal::Record;
use crate::mount::Quota;
use crate::node::{Ino, Kind, LayerId, Node, Tree};
use crate::store::{Store, WritableLayer};

use backing::FileKey;
use contents::Emptied;
use extents::file_blocks;
use handles::Handle;
use namespace::DirEntries;
use quota::Charged;

pub(crate) use attrs::{has_suidgid, AttrChange, Caller, IdMap};
pub use checkpoint::RollbackStats;
pub(crate) use namespace::{Listing, FIRST_COOKIE};

pub(crate) type OpResult<T> = Result<T, Errno>;

fn errno_of(e: &io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

/// Inserts into a cache of at most `max` entries, evicting an arbitrary one when it is full.
fn insert_bounded<K: Eq + std::hash::Hash + Clone, V>(cache: &mut HashMap<K, V>, max: usize, key: K, value: V) {
    if cache.len() >= max {
        if let Some(victim) = cache.keys().next().cloned() {
            cache.remove(&victim);
        }
    }
    cache.insert(key, value);
}

#[derive(Debug)]
struct State {
    tree: Tree,
    layer: WritableLayer,
    /// Trees of checkpoints made or loaded by this mount (shared structure: memory follows change).
    snapshots: HashMap<LayerId, Tree>,
    /// Files changed by writes (size, times, cleared set-ID bits) whose new state is not yet journaled.
    pending: BTreeSet<Ino>,
    /// Files whose block count lags behind writes to their data file in the writable layer:
    /// `st_blocks` of that data file when the count was last brought up to date, plus the blocks
    /// released below since (chunks copied up). The count catches up when it is shown or
    /// journaled, so a stream of writes costs no `fstat` each. Keys are a subset of `pending`.
    layer_blocks: HashMap<Ino, u64>,
    /// Small files just emptied by a truncation, with the bytes they had (see [`Emptied`]).
    emptied: HashMap<Ino, Emptied>,
    /// With a byte quota: the blocks charged to the tree.
    usage: Option<Charged>,
}

#[derive(Debug)]
pub(crate) struct Volume {
    store: Store,
    images: Arc<Vec<PathBuf>>,
    base: LayerId,
    pub ids: IdMap,
    state: RwLock<State>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// The kernel's references (lookup counts) per inode, until FORGET: an unlinked file lives
    /// while the kernel holds it (open files and mappings hold their inode).
    lookups: Mutex<HashMap<Ino, u64>>,
    files: Mutex<HashMap<FileKey, Arc<File>>>,
    /// Inodes removed while the kernel held them, with when (see [`Volume::wait_for_forgets`]).
    orphaned: Mutex<HashMap<Ino, std::time::Instant>>,
    /// Inodes whose page cache must be dropped after a READ that raced a truncation (see [`Emptied`]).
    raced_reads: Mutex<Option<std::sync::mpsc::Sender<Ino>>>,
    /// FUSE generation of inodes whose kernel inode had to be replaced (0 for all others), see rollback.
    generations: Mutex<HashMap<Ino, u64>>,
    /// Listings by directory, with the entry map they were made from (valid while it is unchanged).
    listings: Mutex<HashMap<Ino, (DirEntries, Listing)>>,
    next_fh: AtomicU64,
    /// Block size of the store's filesystem: the granularity of the holes it reports and of the
    /// blocks counted (also for image files elsewhere: what the store would allocate for them).
    block_size: u64,
    quota: Quota,
}

/// Journal form of a node: directories travel without their entries (those are `Entry` records).
fn journal_node(ino: Ino, node: &Node) -> Record {
    let mut node = node.clone();
    if let Kind::Dir(entries) = &mut node.kind {
        *entries = OrdMap::new();
    }
    Record::Node { ino, node }
}

impl State {
    fn log(&mut self, records: &[Record]) -> OpResult<()> {
        self.layer.journal.append_all(records).map_err(|e| {
            tracing::error!(error = %e, "journal append failed");
            Errno::EIO
        })
    }

    fn node(&self, ino: Ino) -> OpResult<&Arc<Node>> {
        self.tree.get(ino).ok_or(Errno::ENOENT)
    }

    /// Fails with `ENOSPC` while the journal cannot be written (a full disk) and the records kept in
    /// memory meanwhile reach their bound. Checked by changes that add to the filesystem; those that
    /// remove (unlink, rmdir, removexattr, a shrinking truncation) are never refused: they are how
    /// space is freed from inside, and they are bounded by what exists.
    fn room_to_add(&mut self) -> OpResult<()> {
        match self.layer.journal.has_room() {
            true => Ok(()),
            false => Err(Errno::ENOSPC),
        }
    }

    fn dir_entries(&self, ino: Ino) -> OpResult<&OrdMap<OsString, Ino>> {
        self.node(ino)?.entries().ok_or(Errno::ENOTDIR)
    }
}

impl Volume {
    pub fn new(
        store: Store,
        images: Arc<Vec<PathBuf>>,
        base: LayerId,
        ids: IdMap,
        mut tree: Tree,
        layer: WritableLayer,
        quota: Quota,
    ) -> Self {
        // Files unlinked while open at checkpoint time are unreachable here: drop them.
        let orphans: Vec<Ino> = tree.nodes.iter().filter(|(_, n)| n.attr.nlink == 0).map(|(i, _)| *i).collect();
        for ino in orphans {
            tree.nodes.remove(&ino);
        }
        let block_size = rustix::fs::statvfs(store.path()).map_or(4096, |s| s.f_bsize.max(512));
        let usage = quota.bytes.map(|_| Charged::of(&tree));
        Volume {
            block_size,
            quota,
            store,
            images,
            base,
            ids,
            state: RwLock::new(State {
                tree,
                layer,
                snapshots: HashMap::new(),
                pending: BTreeSet::new(),
                layer_blocks: HashMap::new(),
                emptied: HashMap::new(),
                usage,
            }),
            generations: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            lookups: Mutex::new(HashMap::new()),
            orphaned: Mutex::new(HashMap::new()),
            files: Mutex::new(HashMap::new()),
            raced_reads: Mutex::new(None),
            listings: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }

    /// Where to send inodes whose cached pages a thread outside the FUSE session must invalidate
    /// (the serving thread itself must not wait for pages that requests it has yet to answer lock).
    pub fn set_raced_reads(&self, inodes: std::sync::mpsc::Sender<Ino>) {
        *self.raced_reads.lock() = Some(inodes);
    }

    /// Journals the state of files changed by writes (`only` one, or all).
    fn flush_pending(&self, st: &mut State, only: Option<Ino>) -> OpResult<()> {
        let inos: Vec<Ino> = match only {
            Some(ino) => st.pending.take(&ino).into_iter().collect(),
            None => std::mem::take(&mut st.pending).into_iter().collect(),
        };
        for ino in &inos {
            self.sync_blocks(st, *ino);
        }
        debug_assert!(only.is_some() || st.layer_blocks.is_empty(), "block counts lag only for pending files");
        let records: Vec<Record> =
            inos.iter().filter_map(|ino| st.tree.get(*ino).map(|n| journal_node(*ino, n))).collect();
        if records.is_empty() {
            return Ok(());
        }
        st.log(&records)
    }

    /// `blocks`, the stored count of file `ino`, caught up with its writes in the writable layer.
    fn current_blocks(&self, st: &State, ino: Ino, blocks: u64) -> OpResult<u64> {
        let Some(base) = st.layer_blocks.get(&ino) else {
            return Ok(blocks);
        };
        let data = self.data_file(st.layer.id, ino)?;
        Ok((blocks + file_blocks(&data)?).saturating_sub(*base))
    }

    /// Brings the stored block count of `ino` up to date with its writes. A count that cannot be
    /// brought up to date stays as it is: that must not keep the file's state from being journaled.
    fn sync_blocks(&self, st: &mut State, ino: Ino) {
        let Some(Kind::File(content)) = st.tree.get(ino).map(|n| &n.kind) else {
            st.layer_blocks.remove(&ino);
            return;
        };
        if !st.layer_blocks.contains_key(&ino) {
            return;
        }
        match self.current_blocks(st, ino, content.blocks) {
            Ok(blocks) => {
                if let Some(Kind::File(content)) = st.tree.get_mut(ino).map(|n| &mut n.kind) {
                    content.blocks = blocks;
                }
            }
            Err(e) => tracing::warn!(ino, error = %e, "cannot stat a data file: the file's st_blocks lags its writes"),
        }
        st.layer_blocks.remove(&ino);
    }

    /// Node `ino` as the kernel is shown it (block count caught up with writes).
    fn shown(&self, st: &State, ino: Ino, node: &Node) -> OpResult<Node> {
        let mut node = node.clone();
        if let Kind::File(content) = &mut node.kind {
            content.blocks = self.current_blocks(st, ino, content.blocks)?;
        }
        Ok(node)
    }

    pub fn node_count(&self) -> u64 {
        self.state.read().tree.nodes.len() as u64
    }
}
