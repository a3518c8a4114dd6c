//! The in-memory inode model: persistent inode ids, directories as name → id maps, and file contents
//! described as a list of chunk sources. Everything here is a persistent (structurally shared) data
//! structure, so cloning a whole [`Tree`] for a checkpoint is O(1) and two trees that share history
//! can be compared in time proportional to what differs.

use std::ffi::OsString;
use std::fmt;
use std::sync::Arc;

use imbl::OrdMap;
use serde::{Deserialize, Serialize};

/// A persistent inode number: stable for a file across checkpoints and rollbacks, shared by hard links.
/// It is also the FUSE node id and the `st_ino` the sandbox sees.
pub type Ino = u64;

/// The root directory's inode number (the FUSE root node id).
pub const ROOT_INO: Ino = 1;

/// Copy-up granularity: writing into a file whose data lies in a frozen layer copies only the chunks
/// touched by the write.
pub const CHUNK_SIZE: u64 = 256 * 1024;

/// Files of at most this size live in a slot of their layer's pack file instead of a data file of
/// their own: creating a file on the store's filesystem costs more than all of a small file's FUSE
/// requests together (measured: ext4 inode allocation dominated a 3,000-file `tar xf`).
pub const PACK_SLOT: u64 = 4096;

/// Names a layer of the store: 128 random bits, unique across processes without coordination.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LayerId(pub [u8; 16]);

impl LayerId {
    /// A fresh random id.
    pub fn random() -> Self {
        LayerId(rand::random())
    }

    /// Parses the 32-hex-digit form produced by `Display`.
    pub fn parse(s: &str) -> Option<Self> {
        let bytes = hex::decode(s).ok()?;
        Some(LayerId(bytes.try_into().ok()?))
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LayerId({self})")
    }
}

/// Where bytes of a regular file live.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Source {
    /// A file inside an image layer directory: (index of the image layer in the base, relative path).
    Image(u16, Arc<str>),
    /// `layers/<id>/data/<ino>` of a store layer, at the same offsets as in the file.
    Layer(LayerId),
    /// The slot at this offset of `layers/<id>/data/pack`: a file of at most [`PACK_SLOT`] bytes,
    /// the rest of the slot reads as zeros.
    Packed(LayerId, u64),
}

/// A timestamp as stored: seconds and nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    pub fn now() -> Self {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Time { sec: d.as_secs() as i64, nsec: d.subsec_nanos() }
    }

    pub fn to_system(self) -> std::time::SystemTime {
        if self.sec >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::new(self.sec as u64, self.nsec)
        } else {
            std::time::UNIX_EPOCH - std::time::Duration::from_secs(self.sec.unsigned_abs())
                + std::time::Duration::from_nanos(u64::from(self.nsec))
        }
    }

    pub fn from_system(t: std::time::SystemTime) -> Self {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Time { sec: d.as_secs() as i64, nsec: d.subsec_nanos() },
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = 0;
                if d.subsec_nanos() > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - d.subsec_nanos();
                }
                Time { sec, nsec }
            }
        }
    }
}

/// Inode attributes, with ownership as the sandbox sees it (0 = the sandbox's root).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
}

/// Contents of a regular file: `size` bytes; chunk `c` comes from `chunks[c]` if present, otherwise
/// from `base` for offsets below `base_len`, otherwise it reads as zeros.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    pub size: u64,
    pub base: Option<Source>,
    pub base_len: u64,
    pub chunks: OrdMap<u64, LayerId>,
    /// 512-byte blocks allocated to the contents (`st_blocks`): kept up to date by every change,
    /// because counting them from the backing files would cost every getattr a walk of the chunks.
    pub blocks: u64,
}

/// A stretch `[start, end)` of a file's offsets whose bytes come from one place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// Where the bytes are (None: the stretch reads as zeros).
    pub source: Option<Source>,
    /// The stretch is read from the base (not from a chunk written later).
    pub from_base: bool,
}

impl Content {
    /// Contents of a file created in layer `layer`: every byte lives in that layer's data file.
    pub fn in_layer(layer: LayerId) -> Self {
        Content { size: 0, base: Some(Source::Layer(layer)), base_len: u64::MAX, chunks: OrdMap::new(), blocks: 0 }
    }

    /// Contents of `size` bytes packed in slot `slot` of layer `layer`, holding `blocks` blocks.
    pub fn packed(layer: LayerId, slot: u64, size: u64, blocks: u64) -> Self {
        Content { size, base: Some(Source::Packed(layer, slot)), base_len: u64::MAX, chunks: OrdMap::new(), blocks }
    }

    /// The (layer, slot) holding the contents, if they are packed.
    pub fn pack_slot(&self) -> Option<(LayerId, u64)> {
        match self.base {
            Some(Source::Packed(layer, slot)) => Some((layer, slot)),
            _ => None,
        }
    }

    /// Where the offsets `[from, to)` are read from, in order; neighbouring chunks of one layer
    /// form one region.
    pub fn regions(&self, from: u64, to: u64) -> Vec<Region> {
        let mut out: Vec<Region> = Vec::new();
        let mut push = |region: Region| {
            if region.start >= region.end {
                return;
            }
            match out.last_mut() {
                Some(last)
                    if last.end == region.start
                        && last.source == region.source
                        && last.from_base == region.from_base =>
                {
                    last.end = region.end;
                }
                _ => out.push(region),
            }
        };
        // Offsets not covered by a chunk: the base below `base_len`, zeros above.
        let uncovered = |start: u64, end: u64, push: &mut dyn FnMut(Region)| {
            let base_end = end.min(self.base_len).max(start);
            push(Region { start, end: base_end, source: self.base.clone(), from_base: self.base.is_some() });
            push(Region { start: base_end, end, source: None, from_base: false });
        };
        let mut pos = from;
        for (chunk, layer) in self.chunks.range(from / CHUNK_SIZE..) {
            let chunk_start = chunk * CHUNK_SIZE;
            if chunk_start >= to {
                break;
            }
            if pos < chunk_start {
                uncovered(pos, chunk_start, &mut push);
            }
            let end = (chunk_start + CHUNK_SIZE).min(to);
            push(Region { start: pos.max(chunk_start), end, source: Some(Source::Layer(*layer)), from_base: false });
            pos = end;
        }
        if pos < to {
            uncovered(pos, to, &mut push);
        }
        out
    }

    /// Whether chunk `chunk` already lives in the writable layer `layer` (so it can be written in place).
    pub fn chunk_in(&self, chunk: u64, layer: LayerId) -> bool {
        match self.chunks.get(&chunk) {
            Some(l) => *l == layer,
            None => self.base == Some(Source::Layer(layer)),
        }
    }
}

/// What kind of inode this is, with its kind-specific payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File(Content),
    Dir(OrdMap<OsString, Ino>),
    Symlink(Vec<u8>),
    /// Fifo, socket, or device node (type and rdev are in the attributes).
    Special,
}

/// One inode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub attr: Attr,
    pub xattrs: OrdMap<Vec<u8>, Vec<u8>>,
    pub kind: Kind,
}

impl Node {
    pub fn size(&self) -> u64 {
        match &self.kind {
            Kind::File(c) => c.size,
            Kind::Dir(entries) => dir_size(entries.len()),
            Kind::Symlink(target) => target.len() as u64,
            Kind::Special => 0,
        }
    }

    /// 512-byte blocks allocated (`st_blocks`): what ext4 reports for the same inode. A directory
    /// takes whole 4 KiB blocks; a symlink target shorter than 60 bytes lives in the inode.
    pub fn blocks(&self) -> u64 {
        match &self.kind {
            Kind::File(c) => c.blocks,
            Kind::Dir(entries) => dir_blocks(entries.len()),
            Kind::Symlink(target) if target.len() < 60 => 0,
            Kind::Symlink(_) => 8,
            Kind::Special => 0,
        }
    }

    /// Bytes of its extended attributes' names and values.
    pub fn xattr_bytes(&self) -> u64 {
        self.xattrs.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum()
    }

    /// 512-byte blocks charged to a mount's byte quota: its `st_blocks`, and its extended
    /// attributes by their size (ext4 keeps small ones inside the inode, larger ones in a block).
    pub fn charged_blocks(&self) -> u64 {
        self.blocks() + self.xattr_bytes().div_ceil(512)
    }

    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }

    pub fn entries(&self) -> Option<&OrdMap<OsString, Ino>> {
        match &self.kind {
            Kind::Dir(e) => Some(e),
            _ => None,
        }
    }
}

/// `st_size` of a directory of `entries` entries: whole 4 KiB blocks, ~32 bytes per entry.
fn dir_size(entries: usize) -> u64 {
    4096.max(entries as u64 * 32)
}

/// `st_blocks` of a directory of `entries` entries.
pub fn dir_blocks(entries: usize) -> u64 {
    dir_size(entries).div_ceil(4096) * 8
}

/// An inode that differs between two trees: number, old node (if any), new node (if any).
pub type Change = (Ino, Option<Arc<Node>>, Option<Arc<Node>>);

/// The whole metadata of one filesystem state: every inode, by number.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Tree {
    pub nodes: OrdMap<Ino, Arc<Node>>,
    pub next_ino: Ino,
}

impl Tree {
    pub fn get(&self, ino: Ino) -> Option<&Arc<Node>> {
        self.nodes.get(&ino)
    }

    pub fn lookup(&self, parent: Ino, name: &std::ffi::OsStr) -> Option<Ino> {
        self.nodes.get(&parent)?.entries()?.get(name).copied()
    }

    /// Mutable access to an inode, copying it out of any snapshot that shares it.
    pub fn get_mut(&mut self, ino: Ino) -> Option<&mut Node> {
        self.nodes.get_mut(&ino).map(Arc::make_mut)
    }

    pub fn alloc_ino(&mut self) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    /// Inodes that differ between `self` and `other` (present in one only, or changed). Shared
    /// subtrees of the two maps are skipped, so the cost follows the size of the difference.
    pub fn changed_inodes(&self, other: &Tree) -> Vec<Change> {
        use imbl::ordmap::DiffItem;
        self.nodes
            .diff(&other.nodes)
            .filter_map(|item| match item {
                DiffItem::Add(k, v) => Some((*k, None, Some(v.clone()))),
                DiffItem::Remove(k, v) => Some((*k, Some(v.clone()), None)),
                DiffItem::Update { old, new } => {
                    if Arc::ptr_eq(old.1, new.1) || old.1 == new.1 {
                        None
                    } else {
                        Some((*old.0, Some(old.1.clone()), Some(new.1.clone())))
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_follow_chunks_then_base_then_zeros() {
        let lower = LayerId::random();
        let upper = LayerId::random();
        let mut c = Content {
            size: 10 * CHUNK_SIZE,
            base: Some(Source::Layer(lower)),
            base_len: 5 * CHUNK_SIZE + 100,
            chunks: OrdMap::new(),
            blocks: 0,
        };
        c.chunks.insert(2, upper);
        c.chunks.insert(3, upper);
        c.chunks.insert(8, upper);
        let region = |start, end, source: Option<LayerId>, from_base| Region {
            start,
            end,
            source: source.map(Source::Layer),
            from_base,
        };
        let k = CHUNK_SIZE;
        assert_eq!(
            c.regions(100, 10 * k),
            vec![
                region(100, 2 * k, Some(lower), true),
                region(2 * k, 4 * k, Some(upper), false),
                region(4 * k, 5 * k + 100, Some(lower), true),
                region(5 * k + 100, 8 * k, None, false),
                region(8 * k, 9 * k, Some(upper), false),
                region(9 * k, 10 * k, None, false),
            ]
        );
        assert_eq!(c.regions(3 * k + 7, 3 * k + 9), vec![region(3 * k + 7, 3 * k + 9, Some(upper), false)]);
        assert_eq!(c.regions(7, 7), vec![]);
        assert!(c.chunk_in(2, upper));
        assert!(!c.chunk_in(0, upper));
    }

    #[test]
    fn time_roundtrips_through_system_time_before_epoch() {
        let t = Time { sec: -5, nsec: 250 };
        assert_eq!(Time::from_system(t.to_system()), t);
        let t = Time { sec: 7, nsec: 9 };
        assert_eq!(Time::from_system(t.to_system()), t);
    }

    /// A tree of 1000 special files, inodes 0 to 999.
    fn tree_of_specials() -> Tree {
        let node = Node {
            attr: Attr {
                mode: 0o100644,
                uid: 0,
                gid: 0,
                nlink: 1,
                rdev: 0,
                atime: Time::default(),
                mtime: Time::default(),
                ctime: Time::default(),
            },
            xattrs: OrdMap::new(),
            kind: Kind::Special,
        };
        let mut tree = Tree::default();
        for i in 0..1000 {
            tree.nodes.insert(i, Arc::new(node.clone()));
        }
        tree
    }

    /// imbl before 7.0.2 skipped the first entry after a shared leaf (imbl issue #161): every
    /// position is tried, so some change sits right behind a shared leaf.
    #[test]
    fn changed_inodes_reports_the_entry_after_shared_nodes() {
        let a = tree_of_specials();
        for changed in 0..1000 {
            let mut b = a.clone();
            b.get_mut(changed).unwrap().attr.mode = 0o100600;
            let inos: Vec<Ino> = a.changed_inodes(&b).iter().map(|d| d.0).collect();
            assert_eq!(inos, vec![changed]);
        }
    }

    #[test]
    fn changed_inodes_reports_only_differences() {
        let a = tree_of_specials();
        let mut b = a.clone();
        b.get_mut(5).unwrap().attr.mode = 0o100600;
        b.nodes.remove(&7);
        let diff = a.changed_inodes(&b);
        let inos: Vec<Ino> = diff.iter().map(|d| d.0).collect();
        assert_eq!(inos, vec![5, 7]);
    }
}
