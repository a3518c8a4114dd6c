//! On-disk encodings: the per-layer metadata journal (append-only, one CRC-checked frame per
//! operation) and whole-file snapshots (layer meta, tree index) with a magic, a version and a CRC.
//!
//! Frame = `len: u32 LE | crc32(payload): u32 LE | payload (postcard)`. A reader stops at the first
//! frame that is short or fails its CRC: that is the torn tail of a write interrupted by a kill.
//!
//! Every snapshot carries the format version it was written in; a layer's journal is in the version
//! of the layer's meta snapshot. Format 1 (before file contents counted their allocated blocks) is
//! still read: see [`v1`].

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use crate::node::{Ino, Kind, Node, Tree};

/// Errors reading or writing journal and snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a DeltaFS {what} file (bad magic)")]
    BadMagic { path: PathBuf, what: &'static str },
    #[error("{path} is in DeltaFS format {version}; this version reads formats 1 to {FORMAT_VERSION}")]
    UnknownVersion { path: PathBuf, version: u32 },
    #[error("{path} is corrupt (checksum mismatch)")]
    Corrupt { path: PathBuf },
    #[error("cannot decode {path}")]
    Decode {
        path: PathBuf,
        #[source]
        source: postcard::Error,
    },
    #[error("cannot encode a record")]
    Encode(#[source] postcard::Error),
}

type Result<T> = std::result::Result<T, JournalError>;

/// One metadata operation, as appended to a writable layer's journal. Replaying a layer's journal
/// over its parent's tree yields the layer's tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Record {
    /// The full state of an inode. For a directory the entries are not part of the record (they
    /// travel as `Entry` records); an existing directory keeps its entries.
    Node { ino: Ino, node: Node },
    /// Directory `dir` maps `name` to `ino`, or (None) no longer has `name`.
    Entry { dir: Ino, name: OsString, ino: Option<Ino> },
    /// The inode no longer exists.
    Remove { ino: Ino },
    /// Inode numbers below this one are taken.
    NextIno(Ino),
}

/// Applies one journal record to a tree (replay).
pub fn apply(tree: &mut Tree, record: Record) {
    match record {
        Record::Node { ino, mut node } => {
            if let (Kind::Dir(new), Some(old)) = (&mut node.kind, tree.get(ino)) {
                if let Some(entries) = old.entries() {
                    *new = entries.clone();
                }
            }
            tree.nodes.insert(ino, Arc::new(node));
            tree.next_ino = tree.next_ino.max(ino + 1);
        }
        Record::Entry { dir, name, ino } => {
            if let Some(Kind::Dir(entries)) = tree.get_mut(dir).map(|n| &mut n.kind) {
                match ino {
                    Some(ino) => {
                        entries.insert(name, ino);
                    }
                    None => {
                        entries.remove(&name);
                    }
                }
            }
        }
        Record::Remove { ino } => {
            tree.nodes.remove(&ino);
        }
        Record::NextIno(next) => tree.next_ino = tree.next_ino.max(next),
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_owned(), source }
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Appends records to a layer's journal file. Records are buffered and written in batches of
/// [`JOURNAL_BATCH`] bytes: a writable layer is only ever loaded after it was frozen, and freezing
/// writes the rest ([`JournalWriter::write_out`]), so per-operation writes would buy nothing.
///
/// A batch that cannot be written (a full disk) stays buffered: the operations it records have been
/// applied, so they are written later, and a checkpoint fails until they are (see `write_out`).
#[derive(Debug)]
pub struct JournalWriter {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
    /// Length of the complete records on disk: a failed write is cut back to it.
    written: u64,
    /// The last write failed part-way and the cut did not succeed yet.
    torn: bool,
    /// Buffered bytes at which the next write is tried: one batch, or one more batch after a failed
    /// write, so that operations on a full disk do not each retry it.
    write_at: usize,
}

/// Bytes of records buffered before a write(2).
pub const JOURNAL_BATCH: usize = 256 * 1024;
/// Bytes of records kept in memory while they cannot be written (a full disk), past which changes
/// that add records are refused (see [`JournalWriter::has_room`]).
pub const JOURNAL_BACKLOG_MAX: usize = 16 << 20;

impl JournalWriter {
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io_err(path))?;
        let written = file.metadata().map_err(io_err(path))?.len();
        Ok(JournalWriter {
            file,
            path: path.to_owned(),
            buf: Vec::new(),
            written,
            torn: false,
            write_at: JOURNAL_BATCH,
        })
    }

    /// Adds records to the journal (written once a batch is full, or by `write_out`). Fails only if
    /// a record cannot be encoded; a batch that cannot be written stays buffered.
    pub fn append_all(&mut self, records: &[Record]) -> Result<()> {
        for record in records {
            let payload = postcard::to_stdvec(record).map_err(JournalError::Encode)?;
            self.buf.extend_from_slice(&frame(&payload));
        }
        if self.buf.len() >= self.write_at {
            if let Err(e) = self.write_out() {
                tracing::warn!(error = %e, buffered = self.buf.len(), "journal batch not written; kept in memory");
            }
        }
        Ok(())
    }

    /// Whether more records may be buffered: the backlog is below [`JOURNAL_BACKLOG_MAX`], or it
    /// could be written now.
    pub fn has_room(&mut self) -> bool {
        self.buf.len() < JOURNAL_BACKLOG_MAX || self.write_out().is_ok()
    }

    /// Writes buffered records with one write(2): once it returns they survive a kill of this
    /// process (a power loss once a sync of the filesystem followed). On failure the
    /// records stay buffered and the file keeps only complete records: a torn record would end the
    /// journal for every reader.
    pub fn write_out(&mut self) -> Result<()> {
        if self.torn {
            self.file.set_len(self.written).map_err(io_err(&self.path))?;
            self.torn = false;
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all(&self.buf) {
            self.write_at = self.buf.len() + JOURNAL_BATCH;
            self.torn = true;
            if self.file.set_len(self.written).is_ok() {
                self.torn = false;
            }
            return Err(io_err(&self.path)(e));
        }
        self.written += self.buf.len() as u64;
        self.buf.clear();
        self.write_at = JOURNAL_BATCH;
        Ok(())
    }
}

/// Reads every complete record of a journal written in format `version`; a missing file is an
/// empty journal.
pub fn read_journal(path: &Path, version: u32) -> Result<Vec<Record>> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut records = Vec::new();
    let mut pos = 0usize;
    while pos + 8 <= data.len() {
        let len = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(data[pos + 4..pos + 8].try_into().expect("4 bytes"));
        let Some(payload) = data.get(pos + 8..pos + 8 + len) else {
            tracing::warn!(path = %path.display(), offset = pos, "journal ends in a torn record");
            break;
        };
        if crc32fast::hash(payload) != crc {
            tracing::warn!(path = %path.display(), offset = pos, "journal record fails its CRC");
            break;
        }
        records.push(match version {
            FORMAT_V1 => decode::<v1::Record>(path, payload)?.into(),
            _ => decode(path, payload)?,
        });
        pos += 8 + len;
    }
    Ok(records)
}

/// The on-disk format this code writes: 2 = file contents carry their allocated block count.
pub const FORMAT_VERSION: u32 = 2;
/// The first format (no block counts), still read.
pub(crate) const FORMAT_V1: u32 = 1;

fn decode<T: DeserializeOwned>(path: &Path, payload: &[u8]) -> Result<T> {
    postcard::from_bytes(payload).map_err(|source| JournalError::Decode { path: path.to_owned(), source })
}

/// Whether [`write_snapshot`] fsyncs the file before renaming it into place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// The file is written into a layer that is not in `layers/` yet: whoever makes the layer
    /// durable syncs it (the daemon's syncfs).
    No,
    BeforeRename,
}

/// Writes `value` to `path` atomically (temporary file + rename) as `magic | version | frame`.
pub fn write_snapshot<T: Serialize>(path: &Path, magic: &[u8; 8], value: &T, fsync: Fsync) -> Result<()> {
    let payload = postcard::to_stdvec(value).map_err(JournalError::Encode)?;
    let mut buf = Vec::with_capacity(payload.len() + 20);
    buf.extend_from_slice(magic);
    buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    buf.extend_from_slice(&frame(&payload));
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&buf).map_err(io_err(&tmp))?;
    if fsync == Fsync::BeforeRename {
        f.sync_all().map_err(io_err(&tmp))?;
    }
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// The format version of a file written by [`write_snapshot`] with `magic` (reads its header only).
pub fn snapshot_version(path: &Path, magic: &[u8; 8], what: &'static str) -> Result<u32> {
    let mut header = [0u8; 12];
    File::open(path).and_then(|mut f| f.read_exact(&mut header)).map_err(io_err(path))?;
    header_version(&header, path, magic, what)
}

/// The format version in the 12-byte header `magic | version` of a snapshot.
fn header_version(header: &[u8; 12], path: &Path, magic: &[u8; 8], what: &'static str) -> Result<u32> {
    if &header[..8] != magic {
        return Err(JournalError::BadMagic { path: path.to_owned(), what });
    }
    Ok(u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")))
}

/// Reads a file written by [`write_snapshot`] with the same magic: its format version and its
/// checked payload.
fn read_snapshot_payload(path: &Path, magic: &[u8; 8], what: &'static str) -> Result<(u32, Vec<u8>)> {
    let mut data = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(io_err(path))?;
    let Some(header) = data.first_chunk::<12>().filter(|_| data.len() >= 20) else {
        return Err(JournalError::BadMagic { path: path.to_owned(), what });
    };
    let version = header_version(header, path, magic, what)?;
    if !(FORMAT_V1..=FORMAT_VERSION).contains(&version) {
        return Err(JournalError::UnknownVersion { path: path.to_owned(), version });
    }
    let len = u32::from_le_bytes(data[12..16].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(data[16..20].try_into().expect("4 bytes"));
    let payload = data.get(20..20 + len).ok_or_else(|| JournalError::Corrupt { path: path.to_owned() })?;
    if crc32fast::hash(payload) != crc {
        return Err(JournalError::Corrupt { path: path.to_owned() });
    }
    Ok((version, payload.to_vec()))
}

/// Reads a snapshot whose encoding is the same in every format version; returns the version too.
pub fn read_snapshot<T: DeserializeOwned>(path: &Path, magic: &[u8; 8], what: &'static str) -> Result<(u32, T)> {
    let (version, payload) = read_snapshot_payload(path, magic, what)?;
    Ok((version, decode(path, &payload)?))
}

/// Reads a tree index snapshot of any format version.
pub fn read_tree(path: &Path, magic: &[u8; 8]) -> Result<Tree> {
    let (version, payload) = read_snapshot_payload(path, magic, "tree index")?;
    Ok(match version {
        FORMAT_V1 => decode::<v1::Tree>(path, &payload)?.into(),
        _ => decode(path, &payload)?,
    })
}

/// Format 1: the same records and trees, but file contents without `blocks`. Read only; their
/// files count the blocks of a dense file of their size (what format 1 could not know better).
pub(crate) mod v1 {
    use std::ffi::OsString;
    use std::sync::Arc;

    use imbl::OrdMap;
    use serde::Deserialize;

    use crate::node::{self, Attr, Ino, LayerId, Source};

    #[derive(Debug, Clone, Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub struct Content {
        pub size: u64,
        pub base: Option<Source>,
        pub base_len: u64,
        pub chunks: OrdMap<u64, LayerId>,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub enum Kind {
        File(Content),
        Dir(OrdMap<OsString, Ino>),
        Symlink(Vec<u8>),
        Special,
    }

    #[derive(Debug, Clone, Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub struct Node {
        pub attr: Attr,
        pub xattrs: OrdMap<Vec<u8>, Vec<u8>>,
        pub kind: Kind,
    }

    /// As [`super::Record`] (same variants in the same order); only `Node` differs.
    #[derive(Debug, Clone, Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub enum Record {
        Node { ino: Ino, node: Node },
        Entry { dir: Ino, name: OsString, ino: Option<Ino> },
        Remove { ino: Ino },
        NextIno(Ino),
    }

    impl From<Record> for super::Record {
        fn from(r: Record) -> Self {
            match r {
                Record::Node { ino, node } => super::Record::Node { ino, node: node.into() },
                Record::Entry { dir, name, ino } => super::Record::Entry { dir, name, ino },
                Record::Remove { ino } => super::Record::Remove { ino },
                Record::NextIno(ino) => super::Record::NextIno(ino),
            }
        }
    }

    #[derive(Debug, Clone, Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub struct Tree {
        pub nodes: OrdMap<Ino, Arc<Node>>,
        pub next_ino: Ino,
    }

    impl From<Node> for node::Node {
        fn from(n: Node) -> Self {
            let kind = match n.kind {
                Kind::File(c) => node::Kind::File(node::Content {
                    blocks: c.size.div_ceil(4096) * 8,
                    size: c.size,
                    base: c.base,
                    base_len: c.base_len,
                    chunks: c.chunks,
                }),
                Kind::Dir(entries) => node::Kind::Dir(entries),
                Kind::Symlink(target) => node::Kind::Symlink(target),
                Kind::Special => node::Kind::Special,
            };
            node::Node { attr: n.attr, xattrs: n.xattrs, kind }
        }
    }

    impl From<Tree> for node::Tree {
        fn from(t: Tree) -> Self {
            let nodes = t
                .nodes
                .into_iter()
                .map(|(ino, n)| (ino, Arc::new(node::Node::from(Arc::unwrap_or_clone(n)))))
                .collect();
            node::Tree { nodes, next_ino: t.next_ino }
        }
    }
}

/// Writes `values` as format `version` did: a snapshot (with `magic`) or a journal, for tests of
/// reading older formats.
#[cfg(test)]
pub(crate) fn write_old_format<T: Serialize>(path: &Path, magic: Option<&[u8; 8]>, version: u32, values: &[T]) {
    let mut buf = Vec::new();
    if let Some(magic) = magic {
        buf.extend_from_slice(magic);
        buf.extend_from_slice(&version.to_le_bytes());
    }
    for value in values {
        buf.extend_from_slice(&frame(&postcard::to_stdvec(value).unwrap()));
    }
    std::fs::write(path, buf).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_tail_is_ignored_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let mut w = JournalWriter::open(&path).unwrap();
        w.append_all(&[Record::NextIno(7)]).unwrap();
        w.append_all(&[Record::Remove { ino: 3 }]).unwrap();
        w.write_out().unwrap();
        drop(w);
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 1]).unwrap();
        let records = read_journal(&path, FORMAT_VERSION).unwrap();
        assert_eq!(records.len(), 1);
        assert!(matches!(records[0], Record::NextIno(7)));
    }

    #[test]
    fn snapshot_detects_corruption_and_wrong_magic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        write_snapshot(&path, b"TESTSNAP", &vec![1u32, 2, 3], Fsync::No).unwrap();
        let v: (u32, Vec<u32>) = read_snapshot(&path, b"TESTSNAP", "test").unwrap();
        assert_eq!(v, (FORMAT_VERSION, vec![1, 2, 3]));
        assert!(matches!(read_snapshot::<Vec<u32>>(&path, b"OTHERMAG", "test"), Err(JournalError::BadMagic { .. })));
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        assert!(matches!(read_snapshot::<Vec<u32>>(&path, b"TESTSNAP", "test"), Err(JournalError::Corrupt { .. })));
    }

    #[test]
    fn format_1_journals_and_indexes_are_read_with_estimated_blocks() {
        use crate::node::{Attr, LayerId, Source, Time};
        let attr = Attr {
            mode: 0o100644,
            uid: 1,
            gid: 2,
            nlink: 1,
            rdev: 0,
            atime: Time::default(),
            mtime: Time::default(),
            ctime: Time::default(),
        };
        let layer = LayerId::random();
        let file = v1::Node {
            attr: attr.clone(),
            xattrs: imbl::OrdMap::new(),
            kind: v1::Kind::File(v1::Content {
                size: 5000,
                base: Some(Source::Layer(layer)),
                base_len: u64::MAX,
                chunks: imbl::OrdMap::new(),
            }),
        };
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        let records = [
            v1::Record::Node { ino: 5, node: file },
            v1::Record::Entry { dir: 1, name: "f".into(), ino: Some(5) },
            v1::Record::Remove { ino: 4 },
            v1::Record::NextIno(9),
        ];
        write_old_format(&journal, None, FORMAT_V1, &records);
        let read = read_journal(&journal, FORMAT_V1).unwrap();
        let Record::Node { ino: 5, node } = &read[0] else { panic!("{read:?}") };
        let Kind::File(content) = &node.kind else { panic!("{node:?}") };
        assert_eq!((content.size, content.blocks, &node.attr), (5000, 16, &attr));
        assert!(matches!(&read[1], Record::Entry { dir: 1, ino: Some(5), .. }));
        assert!(matches!(read[2], Record::Remove { ino: 4 }));
        assert!(matches!(read[3], Record::NextIno(9)));

        let symlink = v1::Node { attr, xattrs: imbl::OrdMap::new(), kind: v1::Kind::Symlink(b"target".to_vec()) };
        let tree = v1::Tree { nodes: [(3u64, Arc::new(symlink))].into_iter().collect(), next_ino: 4 };
        let index = dir.path().join("index");
        write_old_format(&index, Some(b"TESTINDX"), FORMAT_V1, &[tree]);
        assert_eq!(snapshot_version(&index, b"TESTINDX", "test").unwrap(), FORMAT_V1);
        let tree = read_tree(&index, b"TESTINDX").unwrap();
        assert_eq!((tree.next_ino, &tree.get(3).unwrap().kind), (4, &Kind::Symlink(b"target".to_vec())));
    }

    #[test]
    fn snapshots_of_a_later_format_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let mut data = b"TESTSNAP".to_vec();
        data.extend_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        data.extend_from_slice(&frame(b"x"));
        std::fs::write(&path, data).unwrap();
        let err = read_snapshot::<u8>(&path, b"TESTSNAP", "test").unwrap_err();
        assert!(matches!(err, JournalError::UnknownVersion { version, .. } if version == FORMAT_VERSION + 1));
    }
}
