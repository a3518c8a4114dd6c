//! The filesystem state of one mount and the POSIX operations on it, independent of FUSE.
//!
//! Locking: one `RwLock` over the state. Lookups, getattr and reads share it; every mutation takes
//! it exclusively, so a checkpoint (which takes it exclusively too) waits for in-flight requests and
//! sees no half-done operation. File I/O is addressed by inode, not by open handle: the kernel may
//! open files without telling the server (FUSE_NO_OPEN_SUPPORT).

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use imbl::OrdMap;
use nix::errno::Errno;
use parking_lot::{Mutex, RwLock};

use crate::journal::Record;
use crate::mount::{DiskUsage, Quota};
use crate::node::{
    dir_blocks, Attr, Content, Ino, Kind, LayerId, Node, Region, Source, Time, Tree, CHUNK_SIZE, PACK_SLOT,
};
use crate::store::{data_path, open_data_rw, pack_path, StackId, Store, StoreError, WritableLayer};

/// Inodes whose stored journal exceeds this many layers get a full index written at checkpoint.
const INDEX_EVERY: u32 = 32;
/// Size/time changes of written files are journaled in batches of this many files (or at release,
/// fsync, checkpoint), which also bounds what a checkpoint has to write.
const PENDING_MAX: usize = 256;
/// Open backing files kept for reuse (each READ or WRITE would otherwise open one).
const FILE_CACHE_MAX: usize = 256;
/// Directory listings in cookie order kept for reuse (a large directory is read in many requests).
const LISTINGS_MAX: usize = 64;
/// Readdir offsets 1 and 2 are `.` and `..`; entries' cookies are above.
pub(crate) const FIRST_COOKIE: u64 = 3;
const NAME_MAX: usize = 255;
/// Bytes of extended attribute names and values one inode may hold: they live in the server's
/// memory, so a sandbox must not grow them without bound (ext4 allows ~4 KiB, XFS 64 KiB values).
const XATTRS_MAX: u64 = 64 * 1024;

pub(crate) type OpResult<T> = std::result::Result<T, Errno>;

fn errno_of(e: &io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)
}

/// Reads into `buf` from `pos` until it is full or the file ends; returns the bytes read.
fn read_at_most(file: &File, buf: &mut [u8], pos: u64) -> OpResult<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], pos + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(errno_of(&e)),
        }
    }
    Ok(got)
}

/// Where the first data at or after `pos` starts (SEEK_DATA), or `None` past the last data.
fn next_data(file: &File, pos: u64) -> io::Result<Option<u64>> {
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) {
        Ok(data) => Ok(Some(data)),
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The stretches of data of `file` within `[start, end)`, clipped to it, in order, as SEEK_DATA and
/// SEEK_HOLE see them (a filesystem without holes reports everything up to its end as data), in
/// steps of `block` bytes.
///
/// SEEK_HOLE walks the data to the end of its run, and when the run goes on past `end` that walk can
/// be far longer than the range: tmpfs visits every page (measured: rewriting a 512 MiB file copied
/// up chunk by chunk spent 95% of the server's time in that walk, 6.3 s for the 512 MiB; 18% of a
/// `tar xf` into a pack whose later slots were full). So when data runs past `end` (asked once, at
/// the first extent), the blocks are probed one by one, at most one SEEK_DATA per block of the range.
struct DataExtents<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
    block: u64,
    runs_past_end: Option<bool>,
}

impl<'a> DataExtents<'a> {
    fn new(file: &'a File, start: u64, end: u64, block: u64) -> Self {
        DataExtents { file, pos: start, end, block, runs_past_end: None }
    }

    fn next_extent(&mut self) -> io::Result<Option<(u64, u64)>> {
        let Some(data) = next_data(self.file, self.pos)?.filter(|&d| d < self.end) else {
            self.pos = self.end;
            return Ok(None);
        };
        self.pos = self.hole_after(data)?;
        Ok(Some((data, self.pos)))
    }

    /// The first hole after `data` (a position holding data), or `end` if there is none before it.
    fn hole_after(&mut self, data: u64) -> io::Result<u64> {
        let runs_past_end = match self.runs_past_end {
            Some(known) => known,
            None => *self.runs_past_end.insert(next_data(self.file, self.end)? == Some(self.end)),
        };
        if !runs_past_end {
            let hole = rustix::fs::seek(self.file, rustix::fs::SeekFrom::Hole(data))?;
            return Ok(hole.min(self.end));
        }
        let mut pos = data - data % self.block + self.block;
        while pos < self.end {
            if next_data(self.file, pos)? != Some(pos) {
                return Ok(pos);
            }
            pos += self.block;
        }
        Ok(self.end)
    }
}

impl Iterator for DataExtents<'_> {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        self.next_extent().transpose()
    }
}

/// 512-byte blocks of `file` allocated to data, in blocks of `block` bytes, among the blocks that
/// start in `[start, end)`. Extents allocated but never written (fallocate) read as holes and are
/// not counted.
fn allocated_blocks(file: &File, start: u64, end: u64, block: u64) -> io::Result<u64> {
    let (first, limit) = (start.div_ceil(block), end.div_ceil(block));
    let mut counted_to = first;
    let mut blocks = 0;
    for extent in DataExtents::new(file, first.saturating_mul(block), limit.saturating_mul(block), block) {
        let (from, to) = extent?;
        let (a, b) = ((from / block).max(counted_to), to.div_ceil(block).min(limit));
        if a < b {
            blocks += b - a;
            counted_to = b;
        }
        // Once the last block counts: data ending mid-block needs no look past it.
        if counted_to >= limit {
            break;
        }
    }
    Ok(blocks * (block / 512))
}

/// `st_blocks` of an open file.
fn file_blocks(file: &File) -> OpResult<u64> {
    rustix::fs::fstat(file).map(|st| st.st_blocks as u64).map_err(|e| Errno::from_raw(e.raw_os_error()))
}

/// Translation between the ids stored (as the sandbox sees them) and the host ids the kernel uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdMap {
    pub uid_base: u32,
    pub gid_base: u32,
}

const ID_RANGE: u32 = 65536;
const OVERFLOW_ID: u32 = 65534;

impl IdMap {
    fn to_host(base: u32, id: u32) -> u32 {
        if base == 0 {
            id
        } else if id < ID_RANGE {
            base + id
        } else {
            base + OVERFLOW_ID
        }
    }
    fn from_host(base: u32, id: u32) -> u32 {
        if base == 0 {
            id
        } else if (base..base + ID_RANGE).contains(&id) {
            id - base
        } else {
            OVERFLOW_ID
        }
    }
    pub fn uid_to_host(&self, id: u32) -> u32 {
        Self::to_host(self.uid_base, id)
    }
    pub fn gid_to_host(&self, id: u32) -> u32 {
        Self::to_host(self.gid_base, id)
    }
    pub fn uid_from_host(&self, id: u32) -> u32 {
        Self::from_host(self.uid_base, id)
    }
    pub fn gid_from_host(&self, id: u32) -> u32 {
        Self::from_host(self.gid_base, id)
    }
}

/// A SETATTR: the attributes to change (in stored ids; a time of `Some(None)` means now).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Option<Time>>,
    pub mtime: Option<Option<Time>>,
    pub ctime: Option<Time>,
    /// Clear set-user-ID and (for group-executable files) set-group-ID, as the VFS does on chown
    /// and on truncation by a caller without CAP_FSETID (FUSE_HANDLE_KILLPRIV_V2 leaves it to us).
    pub kill_suidgid: bool,
}

/// The mode without set-user-ID and, when group-executable, without set-group-ID (what a write,
/// truncate or chown leaves of a privileged mode).
fn killed_suidgid(mode: u32) -> u32 {
    let mut mode = mode & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        mode &= !libc::S_ISGID;
    }
    mode
}

/// Whether `mode` has bits a write, truncate or chown would clear.
pub(crate) fn has_suidgid(mode: u32) -> bool {
    killed_suidgid(mode) != mode
}

/// Who is asking, in stored ids.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// An open file (for opens the kernel tells the server about).
#[derive(Debug, Clone, Copy)]
struct Handle {
    ino: Ino,
    /// Opened for writing: the kernel may hold dirty shared-mmap pages of the file.
    writable: bool,
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

/// A directory's entries by name.
type DirEntries = OrdMap<OsString, Ino>;

/// A directory's entries as (readdir cookie, name, inode, file type), in cookie order.
pub(crate) type Listing = Arc<Vec<(u64, OsString, Ino, u32)>>;

/// The readdir offset of entry `name`: a hash of the name, so it stays valid while the entry exists
/// whatever else changes in the directory. A listing read in several requests then neither skips
/// nor repeats an entry that stays (POSIX leaves only entries added or removed meanwhile open).
/// Two names of one directory with the same 62-bit hash (odds about n²/2⁶³) would make a listing
/// resumed between them skip the second.
fn cookie(name: &OsStr) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    name.as_bytes().hash(&mut h);
    (h.finish() >> 2) + FIRST_COOKIE
}

/// A file on the host holding bytes of DeltaFS files.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Backing {
    Image(u16, Arc<str>),
    /// The data file of an inode in a layer.
    Data(LayerId, Ino),
    /// A layer's pack file (shared by its small files).
    Pack(LayerId),
}

impl Backing {
    /// The backing file of `source` for inode `ino`, and the backing file's offset of the file's byte 0.
    fn of(source: &Source, ino: Ino) -> (Backing, u64) {
        match source {
            Source::Image(layer, rel) => (Backing::Image(*layer, rel.clone()), 0),
            Source::Layer(id) => (Backing::Data(*id, ino), 0),
            Source::Packed(id, slot) => (Backing::Pack(*id), *slot),
        }
    }
}

/// Backing file descriptors by (backing file, opened for writing).
type FileKey = (Backing, bool);

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

/// The blocks a mount's tree is charged for its byte quota ([`Node::charged_blocks`]), counted
/// once at mount and then brought up to date by comparing the tree with the one last counted: the
/// cost follows what changed, also across a rollback (which swaps the tree). Between counts, every
/// change that can add blocks reserves an upper bound of what it adds, and the tree is counted
/// again only when that bound reaches the limit: far from it a change costs no count.
#[derive(Debug)]
struct Charged {
    counted: Tree,
    blocks: u64,
    /// Blocks reserved since `counted` was counted: the tree is charged at most `blocks + since`.
    since: u64,
}

impl Charged {
    fn of(tree: &Tree) -> Self {
        Charged { counted: tree.clone(), blocks: tree.nodes.values().map(|n| n.charged_blocks()).sum(), since: 0 }
    }

    /// Blocks charged to `tree`.
    fn update(&mut self, tree: &Tree) -> u64 {
        for (_, old, new) in self.counted.changed_inodes(tree) {
            let added = new.map_or(0, |n| n.charged_blocks());
            self.blocks = (self.blocks + added).saturating_sub(old.map_or(0, |n| n.charged_blocks()));
        }
        self.counted = tree.clone();
        self.since = 0;
        self.blocks
    }

    /// Reserves `want` blocks for a change of `tree` if the limit of `max` blocks has room for them.
    fn reserve(&mut self, tree: &Tree, want: u64, max: u64) -> bool {
        let fits = |used: u64| used.saturating_add(want) <= max;
        if !fits(self.blocks.saturating_add(self.since)) && !fits(self.update(tree)) {
            return false;
        }
        self.since = self.since.saturating_add(want);
        true
    }

    /// The tree was replaced by one whose growth was not reserved: count it at the next reservation.
    fn forget_reservations(&mut self) {
        self.since = u64::MAX;
    }
}

/// The bytes a file had before a truncation emptied it, kept for a moment while it stays empty.
///
/// While a SETATTR that shrinks a file is in flight the kernel keeps the old `i_size`
/// (`FUSE_I_SIZE_UNSTABLE`). A READ it sends meanwhile that the server answers after truncating
/// comes back short; the kernel zero-fills the page and the reader gets the old length of NUL
/// bytes, a state the file never had. Once the kernel has applied the truncation to 0 it sends no
/// READ for the file (it reads nothing past `i_size`), so a READ of a file that is still empty is
/// such a racing one: it gets the old bytes, as a read just before the truncation would have. The
/// inode's cached pages are then dropped ([`Volume::set_raced_reads`]): a reader that read the old
/// size before the truncation but inserted its page after the kernel truncated the cache would
/// otherwise leave the old bytes cached past the end of the file.
#[derive(Debug)]
struct Emptied {
    bytes: Vec<u8>,
    at: std::time::Instant,
}

/// Files up to this size keep their bytes in [`Emptied`] when truncated to 0.
const EMPTIED_MAX: u64 = 64 * 1024;
/// How long, and for how many files, [`Emptied`] bytes are kept: racing READs come within
/// microseconds of the truncation.
const EMPTIED_FOR: std::time::Duration = std::time::Duration::from_secs(1);
const EMPTIED_FILES: usize = 64;
/// How long after its removal an inode the kernel held is awaited (see [`Volume::wait_for_forgets`]).
const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

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

    /// Fails with `ENOSPC` unless `blocks` more 512-byte blocks fit in the byte quota.
    fn reserve(&self, st: &mut State, blocks: u64) -> OpResult<()> {
        let (Some(limit), Some(usage)) = (self.quota.bytes, st.usage.as_mut()) else {
            return Ok(());
        };
        match blocks == 0 || usage.reserve(&st.tree, blocks, limit / 512) {
            true => Ok(()),
            false => Err(Errno::ENOSPC),
        }
    }

    /// Reserves what writing (or allocating) `[from, to)` of file `ino` can add: the store blocks
    /// it touches, less those the file already has there (looked up only when the first bound does
    /// not fit, so an overwrite on a full filesystem still works).
    fn reserve_range(&self, st: &mut State, ino: Ino, content: &Content, (from, to): (u64, u64)) -> OpResult<()> {
        if self.quota.bytes.is_none() || to <= from {
            return Ok(());
        }
        let (start, end) = (from / self.block_size * self.block_size, to.div_ceil(self.block_size) * self.block_size);
        let touched = (end - start) / 512;
        if self.reserve(st, touched).is_ok() {
            return Ok(());
        }
        let held = match content.pack_slot() {
            Some(_) if start < PACK_SLOT => content.blocks.min(touched),
            Some(_) => 0,
            None => self.allocated_in(ino, content, (start, end), |_| true)?,
        };
        self.reserve(st, touched.saturating_sub(held))
    }

    /// Fails with `ENOSPC` if the inode quota has no inode left.
    fn reserve_inode(&self, st: &State) -> OpResult<()> {
        match self.quota.inodes {
            Some(max) if st.tree.nodes.len() as u64 >= max => Err(Errno::ENOSPC),
            _ => Ok(()),
        }
    }

    /// The blocks a directory grows by when it gets one more entry.
    fn entry_growth(st: &State, dir: Ino) -> OpResult<u64> {
        let len = st.dir_entries(dir)?.len();
        Ok(dir_blocks(len + 1) - dir_blocks(len))
    }

    fn backing_path(&self, backing: &Backing) -> PathBuf {
        match backing {
            Backing::Image(layer, rel) => self.images[usize::from(*layer)].join(&**rel),
            Backing::Data(id, ino) => data_path(&self.store.layer_dir(*id), *ino),
            Backing::Pack(id) => pack_path(&self.store.layer_dir(*id)),
        }
    }

    // ---------------------------------------------------------------- attributes and lookups

    pub fn getattr(&self, ino: Ino) -> OpResult<(Ino, Node)> {
        let st = self.state.read();
        Ok((ino, self.shown(&st, ino, st.node(ino)?)?))
    }

    pub fn lookup(&self, parent: Ino, name: &OsStr) -> OpResult<Option<(Ino, Node)>> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let st = self.state.read();
        let Some(&ino) = st.dir_entries(parent)?.get(name) else {
            return Ok(None);
        };
        let Some(node) = st.tree.get(ino) else {
            return Ok(None);
        };
        Ok(Some((ino, self.shown(&st, ino, node)?)))
    }

    pub fn readlink(&self, ino: Ino) -> OpResult<Vec<u8>> {
        let st = self.state.read();
        match &st.node(ino)?.kind {
            Kind::Symlink(t) => Ok(t.clone()),
            _ => Err(Errno::EINVAL),
        }
    }

    // ---------------------------------------------------------------- namespace operations

    fn check_new_name(st: &State, parent: Ino, name: &OsStr) -> OpResult<()> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let entries = st.dir_entries(parent)?;
        if entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        Ok(())
    }

    /// Creates an inode named `name` in `parent`. `mode` includes the file type.
    pub fn create_node(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        symlink: Option<&[u8]>,
    ) -> OpResult<(Ino, Node)> {
        let mut st = self.state.write();
        st.room_to_add()?;
        Self::check_new_name(&st, parent, name)?;
        let now = Time::now();
        let parent_node = st.node(parent)?.clone();
        let mut gid = caller.gid;
        let mut mode = mode;
        if parent_node.attr.mode & libc::S_ISGID != 0 {
            gid = parent_node.attr.gid;
            if mode & libc::S_IFMT == libc::S_IFDIR {
                mode |= libc::S_ISGID;
            }
        }
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File(Content::in_layer(st.layer.id)),
            libc::S_IFDIR => Kind::Dir(OrdMap::new()),
            libc::S_IFLNK => Kind::Symlink(symlink.ok_or(Errno::EINVAL)?.to_vec()),
            libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO | libc::S_IFSOCK => Kind::Special,
            _ => return Err(Errno::EINVAL),
        };
        let is_dir = matches!(kind, Kind::Dir(_));
        let node = Node {
            attr: Attr {
                mode,
                uid: caller.uid,
                gid,
                nlink: if is_dir { 2 } else { 1 },
                rdev,
                atime: now,
                mtime: now,
                ctime: now,
            },
            xattrs: OrdMap::new(),
            kind,
        };
        self.reserve_inode(&st)?;
        let growth = Self::entry_growth(&st, parent)?;
        self.reserve(&mut st, node.charged_blocks() + growth)?;
        let ino = st.tree.alloc_ino();
        st.tree.nodes.insert(ino, Arc::new(node.clone()));
        Self::add_entry(&mut st, parent, name, ino, &node, is_dir)?;
        Ok((ino, node))
    }

    /// Enters `ino` (whose new state is `node`) as `name` in `parent`, updates the parent's times
    /// (and link count for a subdirectory) and journals the three changes.
    fn add_entry(st: &mut State, parent: Ino, name: &OsStr, ino: Ino, node: &Node, subdir: bool) -> OpResult<()> {
        let now = node.attr.ctime;
        let p = st.tree.get_mut(parent).expect("parent checked");
        if let Kind::Dir(entries) = &mut p.kind {
            entries.insert(name.to_owned(), ino);
        }
        p.attr.mtime = now;
        p.attr.ctime = now;
        if subdir {
            p.attr.nlink += 1;
        }
        let parent_rec = journal_node(parent, p);
        st.log(&[
            journal_node(ino, node),
            Record::Entry { dir: parent, name: name.to_owned(), ino: Some(ino) },
            parent_rec,
        ])
    }

    pub fn link(&self, ino: Ino, parent: Ino, name: &OsStr) -> OpResult<(Ino, Node)> {
        let mut st = self.state.write();
        st.room_to_add()?;
        Self::check_new_name(&st, parent, name)?;
        if st.node(ino)?.is_dir() {
            return Err(Errno::EPERM);
        }
        let growth = Self::entry_growth(&st, parent)?;
        self.reserve(&mut st, growth)?;
        let n = st.tree.get_mut(ino).expect("checked");
        n.attr.nlink += 1;
        n.attr.ctime = Time::now();
        let node = n.clone();
        Self::add_entry(&mut st, parent, name, ino, &node, false)?;
        Ok((ino, self.shown(&st, ino, &node)?))
    }

    /// Drops one name of `ino`; frees the inode when no name and no kernel reference is left.
    fn drop_link(&self, st: &mut State, ino: Ino, now: Time, records: &mut Vec<Record>) {
        let held = self.lookups.lock().contains_key(&ino);
        let Some(n) = st.tree.get_mut(ino) else {
            return;
        };
        n.attr.ctime = now;
        if n.is_dir() {
            n.attr.nlink = 0;
        } else {
            n.attr.nlink = n.attr.nlink.saturating_sub(1);
        }
        if n.attr.nlink == 0 && !held {
            self.free_inode(st, ino, records);
        } else {
            if n.attr.nlink == 0 {
                let mut orphaned = self.orphaned.lock();
                orphaned.retain(|_, at| at.elapsed() < ORPHAN_GRACE);
                orphaned.insert(ino, std::time::Instant::now());
            }
            records.push(journal_node(ino, n));
        }
    }

    fn free_inode(&self, st: &mut State, ino: Ino, records: &mut Vec<Record>) {
        if let Some(node) = st.tree.nodes.remove(&ino) {
            if let Kind::File(content) = &node.kind {
                self.files.lock().retain(|(b, _), _| !matches!(b, Backing::Data(_, i) if *i == ino));
                // Only this layer's copy goes: frozen layers keep theirs for their checkpoints.
                if !Self::release_slot(st, content) {
                    let _ = std::fs::remove_file(st.layer.data_path(ino));
                }
            }
        }
        st.pending.remove(&ino);
        st.layer_blocks.remove(&ino);
        records.push(Record::Remove { ino });
    }

    pub fn unlink(&self, parent: Ino, name: &OsStr, dir: bool) -> OpResult<()> {
        let mut st = self.state.write();
        let ino = *st.dir_entries(parent)?.get(name).ok_or(Errno::ENOENT)?;
        let target = st.node(ino)?;
        match (dir, target.entries()) {
            (true, None) => return Err(Errno::ENOTDIR),
            (true, Some(e)) if !e.is_empty() => return Err(Errno::ENOTEMPTY),
            (false, Some(_)) => return Err(Errno::EISDIR),
            _ => {}
        }
        let now = Time::now();
        let p = st.tree.get_mut(parent).expect("checked");
        if let Kind::Dir(entries) = &mut p.kind {
            entries.remove(name);
        }
        p.attr.mtime = now;
        p.attr.ctime = now;
        if dir {
            p.attr.nlink -= 1;
        }
        let mut records =
            vec![Record::Entry { dir: parent, name: name.to_owned(), ino: None }, journal_node(parent, p)];
        self.drop_link(&mut st, ino, now, &mut records);
        st.log(&records)
    }

    pub fn rename(&self, parent: Ino, name: &OsStr, new_parent: Ino, new_name: &OsStr, flags: u32) -> OpResult<()> {
        if new_name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let mut st = self.state.write();
        st.room_to_add()?;
        let src = *st.dir_entries(parent)?.get(name).ok_or(Errno::ENOENT)?;
        let dst = st.dir_entries(new_parent)?.get(new_name).copied();
        let src_dir = st.node(src)?.is_dir();
        if dst.is_none() && new_parent != parent {
            let growth = Self::entry_growth(&st, new_parent)?;
            self.reserve(&mut st, growth)?;
        }
        let now = Time::now();
        let mut records = Vec::new();
        let set_entry = |st: &mut State, dir: Ino, name: &OsStr, ino: Option<Ino>, records: &mut Vec<Record>| {
            let d = st.tree.get_mut(dir).expect("directory checked");
            if let Kind::Dir(entries) = &mut d.kind {
                match ino {
                    Some(i) => entries.insert(name.to_owned(), i),
                    None => entries.remove(name),
                };
            }
            d.attr.mtime = now;
            d.attr.ctime = now;
            records.push(Record::Entry { dir, name: name.to_owned(), ino });
        };
        let adjust_nlink = |st: &mut State, dir: Ino, delta: i32| {
            let d = st.tree.get_mut(dir).expect("directory checked");
            d.attr.nlink = (d.attr.nlink as i32 + delta) as u32;
        };
        if flags & libc::RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(Errno::ENOENT)?;
            let dst_dir = st.node(dst)?.is_dir();
            set_entry(&mut st, parent, name, Some(dst), &mut records);
            set_entry(&mut st, new_parent, new_name, Some(src), &mut records);
            if parent != new_parent && src_dir != dst_dir {
                let d = if src_dir { 1 } else { -1 };
                adjust_nlink(&mut st, new_parent, d);
                adjust_nlink(&mut st, parent, -d);
            }
            for ino in [src, dst] {
                st.tree.get_mut(ino).expect("exists").attr.ctime = now;
            }
        } else {
            if flags & libc::RENAME_NOREPLACE != 0 && dst.is_some() {
                return Err(Errno::EEXIST);
            }
            if flags & libc::RENAME_WHITEOUT != 0 {
                return Err(Errno::EINVAL);
            }
            if dst == Some(src) {
                return Ok(());
            }
            if let Some(dst) = dst {
                let d = st.node(dst)?;
                match (src_dir, d.entries()) {
                    (true, None) => return Err(Errno::ENOTDIR),
                    (false, Some(_)) => return Err(Errno::EISDIR),
                    (true, Some(e)) if !e.is_empty() => return Err(Errno::ENOTEMPTY),
                    _ => {}
                }
                if src_dir {
                    adjust_nlink(&mut st, new_parent, -1);
                }
                self.drop_link(&mut st, dst, now, &mut records);
            }
            set_entry(&mut st, parent, name, None, &mut records);
            set_entry(&mut st, new_parent, new_name, Some(src), &mut records);
            if src_dir && parent != new_parent {
                adjust_nlink(&mut st, parent, -1);
                adjust_nlink(&mut st, new_parent, 1);
            }
            st.tree.get_mut(src).expect("exists").attr.ctime = now;
        }
        let mut touched = vec![parent, new_parent, src];
        touched.extend(dst);
        touched.dedup();
        for ino in touched {
            if let Some(n) = st.tree.get(ino) {
                records.push(journal_node(ino, n));
            }
        }
        st.log(&records)
    }

    // ---------------------------------------------------------------- attributes

    pub fn setattr(&self, ino: Ino, change: AttrChange) -> OpResult<(Ino, Node)> {
        let mut st = self.state.write();
        if !change.size.is_some_and(|size| st.node(ino).is_ok_and(|n| size < n.size())) {
            st.room_to_add()?;
        }
        let now = Time::now();
        if let Some(size) = change.size {
            self.truncate(&mut st, ino, size)?;
        }
        // The node is journaled below, with its block count up to date.
        self.sync_blocks(&mut st, ino);
        let n = st.tree.get_mut(ino).ok_or(Errno::ENOENT)?;
        if let Some(mode) = change.mode {
            n.attr.mode = (n.attr.mode & libc::S_IFMT) | (mode & 0o7777);
        }
        if change.kill_suidgid {
            n.attr.mode = killed_suidgid(n.attr.mode);
        }
        if let Some(uid) = change.uid {
            n.attr.uid = uid;
        }
        if let Some(gid) = change.gid {
            n.attr.gid = gid;
        }
        if let Some(t) = change.atime {
            n.attr.atime = t.unwrap_or(now);
        }
        if let Some(t) = change.mtime {
            n.attr.mtime = t.unwrap_or(now);
        }
        n.attr.ctime = change.ctime.unwrap_or(now);
        let node = n.clone();
        st.pending.remove(&ino);
        st.log(&[journal_node(ino, &node)])?;
        Ok((ino, node))
    }

    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> OpResult<Vec<u8>> {
        let st = self.state.read();
        st.node(ino)?.xattrs.get(name.as_bytes()).cloned().ok_or(Errno::ENODATA)
    }

    pub fn listxattr(&self, ino: Ino) -> OpResult<Vec<u8>> {
        let st = self.state.read();
        let mut out = Vec::new();
        for name in st.node(ino)?.xattrs.keys() {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    pub fn setxattr(&self, ino: Ino, name: &OsStr, value: Option<&[u8]>, flags: i32) -> OpResult<()> {
        let mut st = self.state.write();
        if value.is_some() {
            st.room_to_add()?;
        }
        let key = name.as_bytes().to_vec();
        let old = st.node(ino)?;
        let old_bytes = old.xattr_bytes();
        let old_value = old.xattrs.get(&key).map(|v| (key.len() + v.len()) as u64);
        if let Some(v) = value {
            if flags & libc::XATTR_CREATE != 0 && old_value.is_some() {
                return Err(Errno::EEXIST);
            }
            if flags & libc::XATTR_REPLACE != 0 && old_value.is_none() {
                return Err(Errno::ENODATA);
            }
            let new_bytes = old_bytes - old_value.unwrap_or(0) + (key.len() + v.len()) as u64;
            if new_bytes > XATTRS_MAX {
                return Err(Errno::ENOSPC);
            }
            self.reserve(&mut st, new_bytes.div_ceil(512).saturating_sub(old_bytes.div_ceil(512)))?;
        }
        let n = st.tree.get_mut(ino).expect("checked");
        match value {
            Some(v) => {
                n.xattrs.insert(key, v.to_vec());
            }
            None => {
                if n.xattrs.remove(&key).is_none() {
                    return Err(Errno::ENODATA);
                }
            }
        }
        n.attr.ctime = Time::now();
        let rec = journal_node(ino, n);
        st.log(&[rec])
    }

    // ---------------------------------------------------------------- open files

    pub fn open(&self, ino: Ino, writable: bool) -> OpResult<u64> {
        if self.state.read().node(ino)?.is_dir() {
            return Err(Errno::EISDIR);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle { ino, writable });
        Ok(fh)
    }

    /// The entries of directory `dir` in cookie order, and the index of the first one after
    /// readdir offset `offset`.
    pub fn listing(&self, dir: Ino, offset: u64) -> OpResult<(Listing, usize)> {
        let st = self.state.read();
        let entries = st.dir_entries(dir)?;
        let cached = self.listings.lock().get(&dir).filter(|(e, _)| e.ptr_eq(entries)).map(|(_, l)| l.clone());
        let listing = match cached {
            Some(l) => l,
            None => {
                let type_of = |ino: &Ino| st.tree.get(*ino).map_or(0, |n| n.attr.mode & libc::S_IFMT);
                let mut v: Vec<(u64, OsString, Ino, u32)> =
                    entries.iter().map(|(name, ino)| (cookie(name), name.clone(), *ino, type_of(ino))).collect();
                v.sort_unstable_by_key(|e| e.0);
                let l = Arc::new(v);
                insert_bounded(&mut self.listings.lock(), LISTINGS_MAX, dir, (entries.clone(), l.clone()));
                l
            }
        };
        let start = listing.partition_point(|e| e.0 <= offset);
        Ok((listing, start))
    }

    /// Inodes open for writing (the only ones that can have dirty pages in the kernel).
    pub fn open_for_writing(&self) -> Vec<Ino> {
        let mut inos: Vec<Ino> = self.handles.lock().values().filter(|h| h.writable).map(|h| h.ino).collect();
        inos.sort_unstable();
        inos.dedup();
        inos
    }

    /// The FUSE generation to report for `ino`.
    pub fn generation(&self, ino: Ino) -> u64 {
        self.generations.lock().get(&ino).copied().unwrap_or(0)
    }

    /// Journals the file's size/time changes made by writes (close, fsync).
    pub fn flush(&self, ino: Ino) -> OpResult<()> {
        if !self.state.read().pending.contains(&ino) {
            return Ok(());
        }
        let mut st = self.state.write();
        self.flush_pending(&mut st, Some(ino))
    }

    pub fn release(&self, fh: u64) -> OpResult<()> {
        let handle = self.handles.lock().remove(&fh).ok_or(Errno::EBADF)?;
        self.flush(handle.ino)
    }

    /// The kernel took one more reference to `ino` (an entry reply other than `.`/`..`).
    pub fn remember(&self, ino: Ino) {
        *self.lookups.lock().entry(ino).or_insert(0) += 1;
    }

    /// The kernel dropped `count` references to `ino` (FORGET). An unlinked inode goes with the last.
    pub fn forget(&self, ino: Ino, count: u64) {
        {
            let mut lookups = self.lookups.lock();
            let Some(n) = lookups.get_mut(&ino) else {
                return;
            };
            *n = n.saturating_sub(count);
            if *n > 0 {
                return;
            }
            lookups.remove(&ino);
        }
        self.orphaned.lock().remove(&ino);
        if self.state.read().tree.get(ino).is_none_or(|n| n.attr.nlink != 0) {
            return;
        }
        let mut st = self.state.write();
        // Re-checked under the write lock: the kernel may have looked it up again meanwhile.
        let orphan = st.tree.get(ino).is_some_and(|n| n.attr.nlink == 0);
        if orphan && !self.lookups.lock().contains_key(&ino) {
            let mut records = Vec::new();
            self.free_inode(&mut st, ino, &mut records);
            if let Err(e) = st.log(&records) {
                tracing::warn!(ino, error = %e, "journaling a freed orphan");
            }
        }
    }

    /// Whether a file removed in the last moments still waits for the kernel to forget it.
    pub fn awaiting_forgets(&self) -> bool {
        self.orphaned.lock().values().any(|at| at.elapsed() < ORPHAN_GRACE)
    }

    /// Waits until the kernel has forgotten the files removed in the last moments (at most
    /// [`ORPHAN_GRACE`] after their removal; files still open stay). A removed file's blocks and
    /// inode come back at its FORGET, which the kernel can send after the remover's next request.
    pub fn wait_for_forgets(&self) {
        while self.awaiting_forgets() {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// An open backing file (from the cache, or opened and cached).
    fn backing_file(&self, backing: &Backing, writable: bool) -> io::Result<Arc<File>> {
        let key = (backing.clone(), writable);
        if let Some(f) = self.files.lock().get(&key) {
            return Ok(f.clone());
        }
        let path = self.backing_path(backing);
        let f = Arc::new(if writable { open_data_rw(&path)? } else { File::open(&path)? });
        insert_bounded(&mut self.files.lock(), FILE_CACHE_MAX, key, f.clone());
        Ok(f)
    }

    /// The open backing file of a region and the offset in it of the file's byte 0 (None: the
    /// region reads as zeros, or its file was never written).
    fn region_file(&self, ino: Ino, region: &Region) -> OpResult<Option<(Arc<File>, u64)>> {
        let Some(source) = &region.source else {
            return Ok(None);
        };
        let (backing, delta) = Backing::of(source, ino);
        match self.backing_file(&backing, false) {
            Ok(f) => Ok(Some((f, delta))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(errno_of(&e)),
        }
    }

    /// Reads `[offset, offset+buf.len())` of the file into `buf` (already clipped to the size).
    fn read_content(&self, ino: Ino, content: &Content, offset: u64, buf: &mut [u8]) -> OpResult<()> {
        for region in content.regions(offset, offset + buf.len() as u64) {
            let out = &mut buf[(region.start - offset) as usize..(region.end - offset) as usize];
            let got = match self.region_file(ino, &region)? {
                Some((f, delta)) => read_at_most(&f, out, delta + region.start)?,
                None => 0,
            };
            out[got..].fill(0);
        }
        Ok(())
    }

    /// Writes the data (not the holes) of `[from, to)` of the contents to `out` at `at + offset`.
    fn copy_data(&self, ino: Ino, content: &Content, (from, to): (u64, u64), out: &File, at: u64) -> OpResult<()> {
        for region in content.regions(from, to) {
            let Some((f, delta)) = self.region_file(ino, &region)? else {
                continue;
            };
            for extent in DataExtents::new(&f, delta + region.start, delta + region.end, self.block_size) {
                let (start, end) = extent.map_err(|e| errno_of(&e))?;
                // Bytes past the backing file's end (none inside a data extent) stay zeros.
                let mut buf = vec![0u8; (end - start) as usize];
                read_at_most(&f, &mut buf, start)?;
                out.write_all_at(&buf, at + start - delta).map_err(|e| errno_of(&e))?;
            }
        }
        Ok(())
    }

    /// `cached`: a read through the page cache (not `O_DIRECT`), which the kernel sends only below
    /// the size it knows (see [`Emptied`]).
    pub fn read(&self, ino: Ino, offset: u64, size: u32, cached: bool) -> OpResult<Vec<u8>> {
        let st = self.state.read();
        let Kind::File(content) = &st.node(ino).map_err(|_| Errno::ESTALE)?.kind else {
            return Err(Errno::EISDIR);
        };
        if offset >= content.size {
            let old = st.emptied.get(&ino).filter(|e| cached && e.at.elapsed() < EMPTIED_FOR);
            return Ok(match old {
                Some(e) if content.size == 0 && offset < e.bytes.len() as u64 => {
                    if let Some(raced) = &*self.raced_reads.lock() {
                        let _ = raced.send(ino);
                    }
                    e.bytes[offset as usize..(offset + u64::from(size)).min(e.bytes.len() as u64) as usize].to_vec()
                }
                _ => Vec::new(),
            });
        }
        let len = (content.size - offset).min(u64::from(size)) as usize;
        let mut buf = vec![0u8; len];
        self.read_content(ino, content, offset, &mut buf)?;
        Ok(buf)
    }

    /// `lseek(SEEK_DATA)` (`data`) or `lseek(SEEK_HOLE)` from `offset`, answered from the backing
    /// files as the store's filesystem answers for a file of the same data: whole blocks are data
    /// or holes; ENXIO for an offset outside the file or no data after it; the end of the file
    /// counts as a hole.
    pub fn seek(&self, ino: Ino, offset: i64, data: bool) -> OpResult<u64> {
        let st = self.state.read();
        let Kind::File(content) = &st.node(ino).map_err(|_| Errno::ESTALE)?.kind else {
            return Err(Errno::EINVAL);
        };
        let offset = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
        if offset >= content.size {
            return Err(Errno::ENXIO);
        }
        // From the start of the block holding `offset`: data before `offset` in that block makes
        // the whole block data.
        let block_start = offset - offset % self.block_size;
        for region in content.regions(block_start, content.size) {
            let extent = match self.region_file(ino, &region)? {
                Some((f, delta)) => DataExtents::new(&f, delta + region.start, delta + region.end, self.block_size)
                    .next()
                    .transpose()
                    .map_err(|e| errno_of(&e))?
                    .map(|(from, to)| (from - delta, to - delta)),
                None => None,
            };
            let found = match (data, extent) {
                (true, extent) => extent.map(|(start, _)| start),
                (false, Some((start, end))) if start == region.start => Some(end),
                (false, _) => Some(region.start),
            };
            // Data ending mid-block (at the end of a backing file or of a truncated base) fills
            // its block, as on the store's filesystem. (Regions with backing files start on block
            // boundaries, so this never moves a hole past data.)
            let found = if data { found } else { found.map(|hole| hole.next_multiple_of(self.block_size)) };
            if let Some(pos) = found.filter(|pos| *pos < region.end) {
                return Ok(pos.max(offset));
            }
        }
        if data {
            Err(Errno::ENXIO)
        } else {
            Ok(content.size)
        }
    }

    /// 512-byte blocks allocated in the backing files of `content`'s regions within `[from, to)`
    /// that `which` selects (a block counts in the region holding its first byte).
    fn allocated_in(
        &self,
        ino: Ino,
        content: &Content,
        (from, to): (u64, u64),
        which: impl Fn(&Region) -> bool,
    ) -> OpResult<u64> {
        let mut blocks = 0;
        for region in content.regions(from, to).iter().filter(|r| which(r)) {
            if let Some((f, delta)) = self.region_file(ino, region)? {
                let (start, end) = (delta + region.start, delta.saturating_add(region.end));
                blocks += allocated_blocks(&f, start, end, self.block_size).map_err(|e| errno_of(&e))?;
            }
        }
        Ok(blocks)
    }

    /// Makes chunk `chunk` of the file live in the writable layer, copying the data (not the
    /// holes) of its current bytes unless `overwritten` covers them all. Returns the blocks the
    /// chunk held in the layers below, which the file no longer uses.
    fn copy_up_chunk(
        &self,
        ino: Ino,
        layer: LayerId,
        content: &mut Content,
        chunk: u64,
        overwritten: (u64, u64),
    ) -> OpResult<u64> {
        if content.chunk_in(chunk, layer) {
            return Ok(0);
        }
        let start = chunk * CHUNK_SIZE;
        let end = start + CHUNK_SIZE;
        let released = self.allocated_in(ino, content, (start, end), |_| true)?;
        let copy_end = end.min(content.size);
        if start < copy_end && !(overwritten.0 <= start && overwritten.1 >= copy_end) {
            self.copy_data(ino, content, (start, copy_end), &*self.data_file(layer, ino)?, 0)?;
        }
        content.chunks.insert(chunk, layer);
        Ok(released)
    }

    /// Chunks touched by `len` bytes at `offset` (none for an empty range).
    fn chunks_of(offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / CHUNK_SIZE..(offset + len - 1) / CHUNK_SIZE + 1
    }

    /// The writable data file of `ino` in layer `layer`.
    fn data_file(&self, layer: LayerId, ino: Ino) -> OpResult<Arc<File>> {
        self.backing_file(&Backing::Data(layer, ino), true).map_err(|e| errno_of(&e))
    }

    /// Gives a packed file's slot back to the writable layer if the slot is the layer's (slots of
    /// frozen layers belong to their checkpoints). Returns whether the contents were packed.
    fn release_slot(st: &mut State, content: &Content) -> bool {
        match content.pack_slot() {
            Some((layer, slot)) => {
                if layer == st.layer.id {
                    st.layer.pack.free(slot);
                }
                true
            }
            None => false,
        }
    }

    /// The writable layer's pack file.
    fn pack_file(&self, st: &State) -> OpResult<Arc<File>> {
        self.backing_file(&Backing::Pack(st.layer.id), true).map_err(|e| errno_of(&e))
    }

    /// Makes `[from, to)` of a slot of the writable layer's pack read as zeros, keeping the slot's
    /// block allocated only if it still holds bytes of the file, as a truncate does on the store's
    /// filesystem (a filesystem that cannot punch holes gets zeros written).
    fn clear_slot(&self, st: &State, slot: u64, (from, to): (u64, u64)) -> OpResult<()> {
        use rustix::fs::FallocateFlags;
        if from >= to {
            return Ok(());
        }
        let pack = self.pack_file(st)?;
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&*pack, punch, slot + from, to - from) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => {
                pack.write_all_at(&vec![0u8; (to - from) as usize], slot + from).map_err(|e| errno_of(&e))
            }
            Err(e) => Err(Errno::from_raw(e.raw_os_error())),
        }
    }

    /// 512-byte blocks holding data in a slot of the writable layer's pack: packed contents' count.
    fn slot_blocks(&self, st: &State, slot: u64) -> OpResult<u64> {
        allocated_blocks(&*self.pack_file(st)?, slot, slot + PACK_SLOT, self.block_size).map_err(|e| errno_of(&e))
    }

    /// Makes packed contents live in a slot of the writable layer (copying the data of a frozen
    /// layer's slot, or of wherever a small file's bytes are) and returns the slot.
    fn own_slot(&self, st: &mut State, ino: Ino, content: &mut Content) -> OpResult<u64> {
        let layer = st.layer.id;
        if let Some((l, slot)) = content.pack_slot() {
            if l == layer {
                return Ok(slot);
            }
        }
        let (slot, reused) = st.layer.pack.alloc();
        // A reused slot must read as zeros (and hold no blocks) where the file has no data.
        if reused {
            self.clear_slot(st, slot, (0, PACK_SLOT))?;
        }
        // Whatever held the contents before (a data file, an image file, a frozen layer's slot) no
        // longer counts: the slot alone does (an empty file's slot holds nothing).
        st.layer_blocks.remove(&ino);
        let blocks = if content.size == 0 {
            0
        } else {
            self.copy_data(ino, content, (0, content.size), &*self.pack_file(st)?, slot)?;
            self.slot_blocks(st, slot)?
        };
        *content = Content::packed(layer, slot, content.size, blocks);
        Ok(slot)
    }

    /// The writable layer's data file of `ino`, about to change: its lagging block count is started
    /// (see `lag`) and packed contents are moved into it (the file outgrows its slot, or an operation
    /// needs a file of its own). The packed bytes count as the data file's growth from then on.
    fn own_data_file(&self, st: &mut State, ino: Ino, content: &mut Content) -> OpResult<Arc<File>> {
        let out = self.lag(st, ino)?;
        if content.pack_slot().is_none() {
            return Ok(out);
        }
        let layer = st.layer.id;
        self.copy_data(ino, content, (0, content.size), &out, 0)?;
        // A data file left by an earlier, larger version of the file: cut its tail.
        out.set_len(content.size).map_err(|e| errno_of(&e))?;
        Self::release_slot(st, content);
        *content = Content { size: content.size, ..Content::in_layer(layer) };
        Ok(out)
    }

    /// Whether a file of `content` that will be `size` bytes long keeps (or gets) its bytes in a
    /// pack slot: it fits, and it has no data file in the writable layer yet.
    fn packs(st: &State, content: &Content, size: u64) -> bool {
        size <= PACK_SLOT && (content.size == 0 || !content.chunk_in(0, st.layer.id))
    }

    /// Changes the contents of file `ino` under the write lock: runs `f` with the state and the
    /// contents, stores the new contents and updates ctime (and mtime), clearing set-user/group-ID
    /// if `kill_suidgid`.
    fn modify_content(
        &self,
        ino: Ino,
        (mtime, kill_suidgid): (bool, bool),
        f: impl FnOnce(&mut State, &mut Content) -> OpResult<()>,
    ) -> OpResult<()> {
        let mut st = self.state.write();
        st.room_to_add()?;
        let Kind::File(mut content) = st.node(ino).map_err(|_| Errno::ESTALE)?.kind.clone() else {
            return Err(Errno::EISDIR);
        };
        f(&mut st, &mut content)?;
        let now = Time::now();
        let n = st.tree.get_mut(ino).expect("checked");
        n.kind = Kind::File(content);
        n.attr.ctime = now;
        if mtime {
            n.attr.mtime = now;
        }
        if kill_suidgid {
            n.attr.mode = killed_suidgid(n.attr.mode);
        }
        st.pending.insert(ino);
        if st.usage.is_some() {
            // The quota's count must see the blocks this change allocated before the next one.
            self.sync_blocks(&mut st, ino);
        }
        if st.pending.len() > PENDING_MAX {
            self.flush_pending(&mut st, None)?;
        }
        Ok(())
    }

    /// Copies up the chunks `chunks` of a file that is not packed (except bytes in `overwritten`)
    /// and returns the writable layer's data file.
    fn copy_up(
        &self,
        st: &mut State,
        ino: Ino,
        content: &mut Content,
        chunks: std::ops::Range<u64>,
        overwritten: (u64, u64),
    ) -> OpResult<Arc<File>> {
        let layer = st.layer.id;
        let out = self.own_data_file(st, ino, content)?;
        let mut released = 0;
        for chunk in chunks {
            released += self.copy_up_chunk(ino, layer, content, chunk, overwritten)?;
        }
        Self::release_blocks(st, ino, content, released);
        Ok(out)
    }

    /// The writable layer's data file of `ino`, about to change. It holds only this file's bytes
    /// in this layer, so the file's block count grows with it: caught up lazily (see
    /// `layer_blocks`), from its `st_blocks` now.
    fn lag(&self, st: &mut State, ino: Ino) -> OpResult<Arc<File>> {
        let out = self.data_file(st.layer.id, ino)?;
        if let std::collections::hash_map::Entry::Vacant(lagging) = st.layer_blocks.entry(ino) {
            lagging.insert(file_blocks(&out)?);
        }
        Ok(out)
    }

    /// Takes `released` blocks (held in layers below by parts the file no longer reads from them)
    /// off the file's count: now, or when a lagging count catches up.
    fn release_blocks(st: &mut State, ino: Ino, content: &mut Content, released: u64) {
        match st.layer_blocks.get_mut(&ino) {
            Some(base) => *base += released,
            None => content.blocks = content.blocks.saturating_sub(released),
        }
    }

    pub fn write(&self, ino: Ino, offset: u64, data: &[u8], kill_suidgid: bool) -> OpResult<u32> {
        let end = offset + data.len() as u64;
        self.modify_content(ino, (true, kill_suidgid), |st, content| {
            self.reserve_range(st, ino, content, (offset, end))?;
            let size = content.size.max(end);
            if Self::packs(st, content, size) {
                let slot = self.own_slot(st, ino, content)?;
                self.pack_file(st)?.write_all_at(data, slot + offset).map_err(|e| errno_of(&e))?;
                content.size = size;
                // A slot is one block: once it holds data, writes allocate nothing more.
                if content.blocks < PACK_SLOT / 512 {
                    content.blocks = self.slot_blocks(st, slot)?;
                }
                return Ok(());
            }
            let out = self.copy_up(st, ino, content, Self::chunks_of(offset, data.len() as u64), (offset, end))?;
            out.write_all_at(data, offset).map_err(|e| errno_of(&e))?;
            content.size = size;
            Ok(())
        })?;
        Ok(data.len() as u32)
    }

    fn truncate(&self, st: &mut State, ino: Ino, size: u64) -> OpResult<()> {
        let Kind::File(mut content) = st.node(ino)?.kind.clone() else {
            return Err(Errno::EISDIR);
        };
        // Best effort: only a read racing this truncation needs them, so failing to read them fails nothing.
        let emptied = (size == 0 && content.size > 0 && content.size <= EMPTIED_MAX)
            .then(|| {
                let mut bytes = vec![0u8; content.size as usize];
                self.read_content(ino, &content, 0, &mut bytes).ok().map(|()| bytes)
            })
            .flatten();
        if content.pack_slot().is_some() && size <= PACK_SLOT {
            let slot = self.own_slot(st, ino, &mut content)?;
            // Bytes past the size read as zeros if the file grows again; an empty file has no block.
            let cleared = if size == 0 { (0, PACK_SLOT) } else { (size, content.size) };
            self.clear_slot(st, slot, cleared)?;
            content.blocks = self.slot_blocks(st, slot)?;
        } else {
            if content.pack_slot().is_some() {
                self.own_data_file(st, ino, &mut content)?;
            }
            self.truncate_unpacked(st, ino, &mut content, size)?;
        }
        content.size = size;
        let now = Time::now();
        let n = st.tree.get_mut(ino).expect("checked");
        n.kind = Kind::File(content);
        n.attr.mtime = now;
        n.attr.ctime = now;
        st.emptied.retain(|i, e| *i != ino && e.at.elapsed() < EMPTIED_FOR);
        if let Some(bytes) = emptied.filter(|_| st.emptied.len() < EMPTIED_FILES) {
            st.emptied.insert(ino, Emptied { bytes, at: std::time::Instant::now() });
        }
        Ok(())
    }

    /// Truncates contents that are not packed. The writable layer's data file is opened (and so
    /// created) only if the file has bytes there or gets its boundary chunk copied up.
    fn truncate_unpacked(&self, st: &mut State, ino: Ino, content: &mut Content, size: u64) -> OpResult<()> {
        let layer = st.layer.id;
        let in_layer = content.base == Some(Source::Layer(layer));
        let mut released = 0;
        if size < content.size && !size.is_multiple_of(CHUNK_SIZE) {
            self.lag(st, ino)?;
            released += self.copy_up_chunk(ino, layer, content, size / CHUNK_SIZE, (0, 0))?;
        }
        // Bytes past the new end in this layer's data file (even of chunks dropped below) must go:
        // a later copy-up writes only data and would leave them showing through its holes.
        let in_data_file = in_layer || content.chunks.values().any(|l| *l == layer);
        if !in_layer {
            // The base's blocks past its new end no longer count (those under chunks never did).
            let base_len = content.base_len.min(size).min(content.size);
            released += self.allocated_in(ino, content, (base_len, content.base_len), |r| r.from_base)?;
            content.base_len = base_len;
        }
        if size < content.size {
            let first_gone = size.div_ceil(CHUNK_SIZE);
            let below = |r: &Region| !r.from_base && r.source != Some(Source::Layer(layer));
            released += self.allocated_in(ino, content, (first_gone * CHUNK_SIZE, u64::MAX), below)?;
            let gone: Vec<u64> = content.chunks.range(first_gone..).map(|(c, _)| *c).collect();
            for c in gone {
                content.chunks.remove(&c);
            }
        }
        if in_data_file {
            self.lag(st, ino)?.set_len(size).map_err(|e| errno_of(&e))?;
        }
        Self::release_blocks(st, ino, content, released);
        Ok(())
    }

    pub fn fallocate(&self, ino: Ino, offset: u64, len: u64, mode: i32, kill_suidgid: bool) -> OpResult<()> {
        use rustix::fs::FallocateFlags;
        let flags = FallocateFlags::from_bits_retain(mode as u32);
        // Punching or zeroing a whole chunk needs none of its old bytes.
        let discarded = flags.intersects(FallocateFlags::PUNCH_HOLE | FallocateFlags::ZERO_RANGE);
        let overwritten = if discarded { (offset, offset.saturating_add(len)) } else { (0, 0) };
        self.modify_content(ino, (mode != 0, kill_suidgid), |st, content| {
            if !flags.contains(FallocateFlags::PUNCH_HOLE) {
                self.reserve_range(st, ino, content, (offset, offset.saturating_add(len)))?;
            }
            let out = self.copy_up(st, ino, content, Self::chunks_of(offset, len), overwritten)?;
            rustix::fs::fallocate(&*out, flags, offset, len).map_err(|e| Errno::from_raw(e.raw_os_error()))?;
            if !flags.contains(FallocateFlags::KEEP_SIZE) {
                content.size = content.size.max(offset + len);
            }
            Ok(())
        })
    }

    /// What the files use, as the quota counts it.
    pub fn usage(&self) -> DiskUsage {
        let mut guard = self.state.write();
        let st = &mut *guard;
        DiskUsage { bytes: st.usage.as_mut().map(|u| u.update(&st.tree) * 512), inodes: st.tree.nodes.len() as u64 }
    }

    /// The store's filesystem's figures, with the quota's limits in place of its size.
    pub fn statfs(&self) -> OpResult<rustix::fs::StatVfs> {
        let mut s = rustix::fs::statvfs(self.store.path()).map_err(|e| Errno::from_raw(e.raw_os_error()))?;
        if self.quota == Quota::default() {
            return Ok(s);
        }
        let used = self.usage();
        if let (Some(limit), Some(bytes)) = (self.quota.bytes, used.bytes) {
            let unit = s.f_frsize.max(1);
            let free = limit.saturating_sub(bytes) / unit;
            s.f_blocks = limit / unit;
            s.f_bfree = s.f_bfree.min(free);
            s.f_bavail = s.f_bavail.min(free);
        }
        if let Some(max) = self.quota.inodes {
            s.f_files = max;
            s.f_ffree = max.saturating_sub(used.inodes);
            s.f_favail = s.f_ffree;
        }
        Ok(s)
    }

    pub fn node_count(&self) -> u64 {
        self.state.read().tree.nodes.len() as u64
    }

    // ---------------------------------------------------------------- checkpoint and rollback

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A file on tmpfs (holes at page granularity) whose 4 KiB blocks hold data where `pattern` says
    /// so; the last block is data, so ranges ending before it have data running past their end.
    fn patterned_file(pattern: &[bool]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let file = File::create_new(dir.path().join("f")).unwrap();
        for (i, _) in pattern.iter().enumerate().filter(|(_, data)| **data) {
            file.write_all_at(&[1u8; 4096], i as u64 * 4096).unwrap();
        }
        (dir, file)
    }

    #[test]
    fn extents_and_blocks_match_a_block_by_block_look_also_where_data_runs_past_the_range() {
        const B: u64 = 4096;
        let pattern: Vec<bool> = (0..48u64).map(|i| !matches!(i % 11, 3 | 4) && i % 7 != 5 || i == 47).collect();
        let (_dir, file) = patterned_file(&pattern);
        let data = |b: u64| pattern.get(b as usize).copied().unwrap_or(false);
        let offsets: Vec<u64> = (0..=48 * B).step_by(1024).collect();
        for &start in &offsets {
            for &end in offsets.iter().filter(|&&e| e > start) {
                let expected_blocks = (start.div_ceil(B)..end.div_ceil(B)).filter(|&b| data(b)).count() as u64 * 8;
                assert_eq!(allocated_blocks(&file, start, end, B).unwrap(), expected_blocks, "[{start}, {end})");
                let mut expected = Vec::<(u64, u64)>::new();
                for b in start / B..end.div_ceil(B) {
                    let (from, to) = ((b * B).max(start), ((b + 1) * B).min(end));
                    match expected.last_mut() {
                        Some(last) if data(b) && last.1 == from => last.1 = to,
                        _ if data(b) => expected.push((from, to)),
                        _ => {}
                    }
                }
                let extents: io::Result<Vec<_>> = DataExtents::new(&file, start, end, B).collect();
                assert_eq!(extents.unwrap(), expected, "[{start}, {end})");
            }
        }
    }
}
