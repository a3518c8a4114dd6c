//! On-disk encodings: the per-layer metadata journal (append-only, one CRC-checked frame per
//! operation) and whole-file snapshots (layer meta, tree index) with a magic, a version and a CRC.
//!
//! Frame = `len: u32 LE | crc32(payload): u32 LE | payload (postcard)`. A reader stops at the first
//! frame that is short or fails its CRC: that is the torn tail of a write interrupted by a kill.

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
    #[error("{path} is not a DeltaFS {what} file (bad magic or version)")]
    BadMagic { path: PathBuf, what: &'static str },
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
#[derive(Debug)]
pub struct JournalWriter {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
}

/// Bytes of records buffered before a write(2).
pub const JOURNAL_BATCH: usize = 256 * 1024;

impl JournalWriter {
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io_err(path))?;
        Ok(JournalWriter { file, path: path.to_owned(), buf: Vec::new() })
    }

    /// Adds records to the journal (written once a batch is full, or by `write_out`).
    pub fn append_all(&mut self, records: &[Record]) -> Result<()> {
        for record in records {
            let payload = postcard::to_stdvec(record).map_err(JournalError::Encode)?;
            self.buf.extend_from_slice(&frame(&payload));
        }
        if self.buf.len() >= JOURNAL_BATCH {
            self.write_out()?;
        }
        Ok(())
    }

    /// Writes buffered records with one write(2): once it returns they survive a kill of this
    /// process (not a power loss: nothing is fsynced).
    pub fn write_out(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.buf).map_err(io_err(&self.path))?;
        self.buf.clear();
        Ok(())
    }
}

/// Reads every complete record of a journal; a missing file is an empty journal.
pub fn read_journal(path: &Path) -> Result<Vec<Record>> {
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
        let record =
            postcard::from_bytes(payload).map_err(|source| JournalError::Decode { path: path.to_owned(), source })?;
        records.push(record);
        pos += 8 + len;
    }
    Ok(records)
}

const SNAPSHOT_VERSION: u32 = 1;

/// Writes `value` to `path` atomically (temporary file + rename) as `magic | version | frame`.
pub fn write_snapshot<T: Serialize>(path: &Path, magic: &[u8; 8], value: &T) -> Result<()> {
    let payload = postcard::to_stdvec(value).map_err(JournalError::Encode)?;
    let mut buf = Vec::with_capacity(payload.len() + 20);
    buf.extend_from_slice(magic);
    buf.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    buf.extend_from_slice(&frame(&payload));
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&buf).map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Reads a file written by [`write_snapshot`] with the same magic.
pub fn read_snapshot<T: DeserializeOwned>(path: &Path, magic: &[u8; 8], what: &'static str) -> Result<T> {
    let mut data = Vec::new();
    File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(io_err(path))?;
    if data.len() < 20 || &data[..8] != magic || data[8..12] != SNAPSHOT_VERSION.to_le_bytes() {
        return Err(JournalError::BadMagic { path: path.to_owned(), what });
    }
    let len = u32::from_le_bytes(data[12..16].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(data[16..20].try_into().expect("4 bytes"));
    let payload = data.get(20..20 + len).ok_or_else(|| JournalError::Corrupt { path: path.to_owned() })?;
    if crc32fast::hash(payload) != crc {
        return Err(JournalError::Corrupt { path: path.to_owned() });
    }
    postcard::from_bytes(payload).map_err(|source| JournalError::Decode { path: path.to_owned(), source })
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
        let records = read_journal(&path).unwrap();
        assert_eq!(records.len(), 1);
        assert!(matches!(records[0], Record::NextIno(7)));
    }

    #[test]
    fn snapshot_detects_corruption_and_wrong_magic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        write_snapshot(&path, b"TESTSNAP", &vec![1u32, 2, 3]).unwrap();
        let v: Vec<u32> = read_snapshot(&path, b"TESTSNAP", "test").unwrap();
        assert_eq!(v, vec![1, 2, 3]);
        assert!(matches!(read_snapshot::<Vec<u32>>(&path, b"OTHERMAG", "test"), Err(JournalError::BadMagic { .. })));
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        assert!(matches!(read_snapshot::<Vec<u32>>(&path, b"TESTSNAP", "test"), Err(JournalError::Corrupt { .. })));
    }
}
