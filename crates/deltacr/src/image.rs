//! Durable checkpoint images: a versioned, checksummed on-disk form of a checkpoint (format in
//! docs/deltacr.md). An image is a directory `<store>/<id>/` with two files:
//!
//! * `meta.img`: magic `DCRIMAGE`, format version (u32 LE), then records `[kind u32][len u64][crc32 u32]
//!   [payload]` (little endian; payload is postcard-encoded): Header, Tree, PageIndex, and End last. An
//!   image without End (torn write) or with a bad CRC is refused.
//! * `pages.img`: page data. Each run of pages written here has its own CRC32 in the PageIndex.
//!
//! Incremental images store only pages that changed since the parent image; unchanged runs are marked
//! `Parent` and read from the parent image at restore (the chain is followed through the store).
//! [`ImageStore::compact`] rewrites an image without its parent so chains stay short.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::mm::{runs_of, PageSource, ProcessPages, PAGE};
use crate::state::{ProcessKind, TreeState, Vma};
use crate::sys;

const MAGIC: &[u8; 8] = b"DCRIMAGE";
/// Format version written by this code.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest version read: version 4 added kinds of state (shared memory objects and their mappings,
/// TCP connections) and the IPC objects to the tree record; a version-3 one is read without them.
pub const OLDEST_READ_VERSION: u32 = 3;
const META: &str = "meta.img";
const PAGES: &str = "pages.img";
/// Runs are split so that one CRC covers at most this many bytes (and one read).
const MAX_RUN: u64 = 1 << 20;
const PFN_MASK: u64 = (1 << 55) - 1;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("image {path} is corrupted or truncated: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "image {path} has format version {found}; this build reads versions {OLDEST_READ_VERSION} to {FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("image {id} not found in {store}")]
    Missing { id: ImageId, store: PathBuf },
    #[error("template of process {pid} is gone: cannot write its pages")]
    TemplateGone { pid: i32 },
}

/// Identifies an image (random, 128 bits, shown as hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageId(pub [u8; 16]);

impl ImageId {
    pub fn random() -> io::Result<ImageId> {
        let mut b = [0u8; 16];
        File::open("/dev/urandom")?.read_exact(&mut b)?;
        Ok(ImageId(b))
    }

    pub fn parse(hex: &str) -> Option<ImageId> {
        if hex.len() != 32 {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(ImageId(b))
    }
}

impl std::fmt::Display for ImageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageId {
    type Err = InvalidImageId;
    fn from_str(s: &str) -> Result<ImageId, InvalidImageId> {
        ImageId::parse(s).ok_or_else(|| InvalidImageId(s.to_owned()))
    }
}

/// A string that is not an image id.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a process image id (32 hex digits)")]
pub struct InvalidImageId(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
enum RecordKind {
    Header = 1,
    Tree = 2,
    PageIndex = 3,
    End = 0xffff,
}

/// First record of an image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    pub id: ImageId,
    pub parent: Option<ImageId>,
    pub created_unix_ms: u64,
    pub page_size: u32,
}

/// Where the bytes of a run of pages are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunLoc {
    /// In this image's pages.img at `offset`, with the CRC32 of the run's bytes.
    Here { offset: u64, crc: u32 },
    /// Unchanged since the parent image.
    Parent,
}

/// Consecutive saved pages of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub addr: u64,
    pub pages: u32,
    pub loc: RunLoc,
}

impl PageRun {
    fn end(&self) -> u64 {
        self.addr + self.pages as u64 * PAGE
    }
}

/// The saved pages of every live process, by pid.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PageIndex {
    pub processes: Vec<(i32, Vec<PageRun>)>,
}

/// What writing an image produced.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub id: ImageId,
    pub parent: Option<ImageId>,
    /// Bytes of page data stored in this image.
    pub page_bytes: u64,
    /// Bytes of page data left in parent images.
    pub parent_bytes: u64,
}

/// Ends the name of an image being written: `<id>.<writer's pid>.tmp`.
const TMP_SUFFIX: &str = ".tmp";
/// Ends the name of an image being deleted.
const REMOVING_SUFFIX: &str = ".removing";

/// A directory holding images, one subdirectory per image id.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io { path: path.to_path_buf(), what, source }
}

impl ImageStore {
    /// Opens (creating it if needed) the store at `root`, and deletes what writers that died (a
    /// killed shim) left: half-written images and images half deleted. Several processes share a
    /// store: images still being written by a live process are kept.
    pub fn new(root: &Path) -> Result<ImageStore, ImageError> {
        fs::create_dir_all(root).map_err(io_err(root, "create the image store"))?;
        let entries = fs::read_dir(root).map_err(io_err(root, "list the image store"))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let dead_writer = name
                .strip_suffix(TMP_SUFFIX)
                .and_then(|n| n.rsplit_once('.'))
                .and_then(|(_, pid)| pid.parse::<i32>().ok())
                .is_some_and(|pid| {
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH)
                });
            if dead_writer || name.ends_with(REMOVING_SUFFIX) {
                tracing::info!(path = %entry.path().display(), "deleting what a dead image writer left");
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        Ok(ImageStore { root: root.to_path_buf() })
    }

    pub fn path_of(&self, id: ImageId) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// Bytes image `id` takes on disk (the blocks of its files; an incremental image holds only
    /// the pages that changed since its parent).
    pub fn disk_bytes(&self, id: ImageId) -> Result<u64, ImageError> {
        use std::os::unix::fs::MetadataExt;
        let dir = self.path_of(id);
        let mut bytes = 0;
        for entry in fs::read_dir(&dir).map_err(io_err(&dir, "list the image"))? {
            let md = entry.and_then(|e| e.metadata()).map_err(io_err(&dir, "measure the image"))?;
            bytes += md.blocks() * 512;
        }
        Ok(bytes)
    }

    /// Every complete image in the store (work in progress, `*.tmp`, is not listed).
    pub fn ids(&self) -> Result<Vec<ImageId>, ImageError> {
        let entries = fs::read_dir(&self.root).map_err(io_err(&self.root, "list the image store"))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&self.root, "list the image store"))?;
            if let Some(id) = entry.file_name().to_str().and_then(ImageId::parse) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Deletes image `id` (renamed aside first, so a crash never leaves part of it under its name).
    pub fn remove(&self, id: ImageId) -> Result<(), ImageError> {
        let dir = self.path_of(id);
        let doomed = self.root.join(format!("{id}{REMOVING_SUFFIX}"));
        match fs::rename(&dir, &doomed) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::Missing { id, store: self.root.clone() })
            }
            other => other.map_err(io_err(&dir, "move the image aside"))?,
        }
        fs::remove_dir_all(&doomed).map_err(io_err(&doomed, "remove the image"))
    }

    /// Opens image `id` (checking its format and checksums of the metadata).
    pub fn open(&self, id: ImageId) -> Result<Image, ImageError> {
        let dir = self.path_of(id);
        if !dir.exists() {
            return Err(ImageError::Missing { id, store: self.root.clone() });
        }
        Image::open_dir(&dir)
    }

    /// Opens image `id` and its parents, newest first.
    pub fn open_chain(&self, id: ImageId) -> Result<ImageChain, ImageError> {
        let mut images = vec![self.open(id)?];
        while let Some(parent) = images.last().expect("not empty").header.parent {
            images.push(self.open(parent)?);
        }
        Ok(ImageChain { images, cache: HashMap::new() })
    }

    /// Rewrites image `id` so it holds all its pages itself (no parent). Its id stays the same; images
    /// whose parent it is keep working.
    pub fn compact(&self, id: ImageId) -> Result<ImageInfo, ImageError> {
        let mut chain = self.open_chain(id)?;
        let head = &chain.images[0];
        if head.header.parent.is_none() {
            return Ok(ImageInfo { id, parent: None, page_bytes: head.page_bytes(), parent_bytes: 0 });
        }
        let tree = head.tree.clone();
        let runs: Vec<(i32, Vec<PageRun>)> = head.index.processes.clone();
        let header = Header { parent: None, ..head.header.clone() };
        let tmp = self.root.join(format!("{id}.compact"));
        let _ = fs::remove_dir_all(&tmp);
        let mut w = ImageWriter::create(&tmp, header)?;
        let mut buf = Vec::new();
        let mut index = PageIndex::default();
        for (pid, pruns) in runs {
            let mut out = Vec::with_capacity(pruns.len());
            for r in pruns {
                buf.resize((r.pages as u64 * PAGE) as usize, 0);
                chain.read(pid, r.addr, &mut buf)?;
                out.push(w.add_run(r.addr, &buf)?);
            }
            index.processes.push((pid, out));
        }
        let info = w.finish(&tree, &index, 0)?;
        let dir = self.path_of(id);
        let old = self.root.join(format!("{id}.old"));
        fs::rename(&dir, &old).map_err(io_err(&dir, "move the old image aside"))?;
        fs::rename(&tmp, &dir).map_err(io_err(&tmp, "publish the compacted image"))?;
        fs::remove_dir_all(&old).map_err(io_err(&old, "remove the old image"))?;
        Ok(info)
    }
}

/// An opened image: its header, process tree and page index.
#[derive(Debug)]
pub struct Image {
    pub dir: PathBuf,
    pub header: Header,
    pub tree: TreeState,
    pub index: PageIndex,
    pages: File,
}

/// A tree record of an image of format `version`.
fn decode_tree(payload: &[u8], version: u32) -> Result<TreeState, postcard::Error> {
    if version >= 4 {
        return postcard::from_bytes(payload);
    }
    /// Version 3's tree: no IPC objects.
    #[derive(Deserialize)]
    struct TreeV3 {
        processes: Vec<crate::state::ProcessEntry>,
        files: Vec<crate::state::OpenFile>,
        last_pid: i32,
    }
    let t: TreeV3 = postcard::from_bytes(payload)?;
    Ok(TreeState { processes: t.processes, files: t.files, last_pid: t.last_pid, ipc: Default::default() })
}

fn put_record(out: &mut impl Write, kind: RecordKind, payload: &[u8]) -> io::Result<()> {
    out.write_all(&(kind as u32).to_le_bytes())?;
    out.write_all(&(payload.len() as u64).to_le_bytes())?;
    out.write_all(&crc32fast::hash(payload).to_le_bytes())?;
    out.write_all(payload)
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("serialising plain data into a Vec cannot fail")
}

impl Image {
    /// Reads and checks `dir/meta.img`.
    pub fn open_dir(dir: &Path) -> Result<Image, ImageError> {
        let meta_path = dir.join(META);
        let corrupt = |reason: String| ImageError::Corrupt { path: meta_path.clone(), reason };
        let bytes = fs::read(&meta_path).map_err(io_err(&meta_path, "read metadata"))?;
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(corrupt("not a DeltaCR image (bad magic)".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if !(OLDEST_READ_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(ImageError::Version { path: meta_path, found: version });
        }
        let mut pos = 12;
        let (mut header, mut tree, mut index, mut ended) = (None, None, None, false);
        while pos < bytes.len() {
            if bytes.len() - pos < 16 {
                return Err(corrupt(format!("truncated record header at byte {pos}")));
            }
            let kind = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes"));
            let len = u64::from_le_bytes(bytes[pos + 4..pos + 12].try_into().expect("8 bytes")) as usize;
            let crc = u32::from_le_bytes(bytes[pos + 12..pos + 16].try_into().expect("4 bytes"));
            pos += 16;
            if bytes.len() - pos < len {
                return Err(corrupt(format!("record at byte {} is cut short", pos - 16)));
            }
            let payload = &bytes[pos..pos + len];
            if crc32fast::hash(payload) != crc {
                return Err(corrupt(format!("checksum mismatch in record at byte {}", pos - 16)));
            }
            pos += len;
            let bad = |e: postcard::Error| corrupt(format!("undecodable record: {e}"));
            match kind {
                k if k == RecordKind::Header as u32 => {
                    header = Some(postcard::from_bytes::<Header>(payload).map_err(bad)?);
                }
                k if k == RecordKind::Tree as u32 => {
                    tree = Some(decode_tree(payload, version).map_err(bad)?);
                }
                k if k == RecordKind::PageIndex as u32 => {
                    index = Some(postcard::from_bytes::<PageIndex>(payload).map_err(bad)?);
                }
                k if k == RecordKind::End as u32 => {
                    ended = true;
                    if pos != bytes.len() {
                        return Err(corrupt("data after the end record".into()));
                    }
                }
                other => return Err(corrupt(format!("unknown record kind {other}"))),
            }
        }
        if !ended {
            return Err(corrupt("no end record (the image was not written completely)".into()));
        }
        let (Some(header), Some(tree), Some(index)) = (header, tree, index) else {
            return Err(corrupt("a header, tree or page index record is missing".into()));
        };
        let pages_path = dir.join(PAGES);
        let pages = File::open(&pages_path).map_err(io_err(&pages_path, "open page data"))?;
        Ok(Image { dir: dir.to_path_buf(), header, tree, index, pages })
    }

    /// Bytes of page data stored in this image.
    pub fn page_bytes(&self) -> u64 {
        self.index
            .processes
            .iter()
            .flat_map(|(_, r)| r.iter())
            .filter(|r| matches!(r.loc, RunLoc::Here { .. }))
            .map(|r| r.pages as u64 * PAGE)
            .sum()
    }

    fn runs_of(&self, pid: i32) -> &[PageRun] {
        self.index.processes.iter().find(|(p, _)| *p == pid).map_or(&[], |(_, r)| r.as_slice())
    }

    /// Reads a whole run stored here and checks its CRC.
    fn read_run(&self, run: &PageRun) -> Result<Vec<u8>, ImageError> {
        let RunLoc::Here { offset, crc } = run.loc else { unreachable!("only called for runs stored here") };
        let path = self.dir.join(PAGES);
        let mut buf = vec![0u8; (run.pages as u64 * PAGE) as usize];
        sys::pread_exact(self.pages.as_fd(), &mut buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ImageError::Corrupt {
                    path: path.clone(),
                    reason: format!("page data ends before run {:#x} (truncated)", run.addr),
                }
            } else {
                ImageError::Io { path: path.clone(), what: "read page data", source: e }
            }
        })?;
        if crc32fast::hash(&buf) != crc {
            return Err(ImageError::Corrupt { path, reason: format!("checksum mismatch in pages at {:#x}", run.addr) });
        }
        Ok(buf)
    }

    /// Reads every run stored here and checks its checksum.
    pub fn verify_pages(&self) -> Result<(), ImageError> {
        for (_, runs) in &self.index.processes {
            for r in runs.iter().filter(|r| matches!(r.loc, RunLoc::Here { .. })) {
                self.read_run(r)?;
            }
        }
        Ok(())
    }

    /// A human-readable description (for the inspection tool).
    pub fn describe(&self) -> String {
        let mut s = format!(
            "image {}\n  format version {FORMAT_VERSION}\n  parent {}\n  created {} ms after the epoch\n",
            self.header.id,
            self.header.parent.map_or("none".to_string(), |p| p.to_string()),
            self.header.created_unix_ms
        );
        s += &format!("  pages stored here: {} KiB\n", self.page_bytes() / 1024);
        s += &format!("  open files: {}\n", self.tree.files.len());
        for p in &self.tree.processes {
            let runs = self.runs_of(p.pid);
            let here: u64 = runs.iter().filter(|r| matches!(r.loc, RunLoc::Here { .. })).map(|r| r.pages as u64).sum();
            let parent: u64 = runs.iter().filter(|r| r.loc == RunLoc::Parent).map(|r| r.pages as u64).sum();
            match &p.kind {
                ProcessKind::Live(st) => {
                    s += &format!(
                        "  pid {} ppid {} pgid {} sid {} {:?}: {} threads, {} mappings, {} fds, pages {} here + {} in parent\n",
                        p.pid,
                        p.ppid,
                        p.pgid,
                        p.sid,
                        p.comm,
                        st.threads.len(),
                        st.vmas.len(),
                        st.fds.len(),
                        here,
                        parent
                    );
                }
                ProcessKind::Zombie { exit_status } => {
                    s += &format!(
                        "  pid {} ppid {} {:?}: zombie, wait status {exit_status:#x}\n",
                        p.pid, p.ppid, p.comm
                    );
                }
            }
        }
        s
    }
}

/// An image and its ancestors, newest first, read as one.
pub struct ImageChain {
    images: Vec<Image>,
    /// The last run read from each image for each process, by (level, pid, address) (runs are read whole
    /// to check their CRC; processes of a tree often map the same addresses).
    cache: HashMap<(usize, i32, u64), Vec<u8>>,
}

impl ImageChain {
    pub fn head(&self) -> &Image {
        &self.images[0]
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// The images of the chain, newest first.
    pub fn images(&self) -> &[Image] {
        &self.images
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Reads `buf.len()` bytes of process `pid`'s memory at `addr`, following `Parent` runs.
    pub fn read(&mut self, pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.read_at(0, pid, addr, buf)
    }

    fn read_at(&mut self, level: usize, pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let end = addr + buf.len() as u64;
        let mut cur = addr;
        while cur < end {
            let img = self.images.get(level).ok_or_else(|| ImageError::Corrupt {
                path: self.images[level - 1].dir.clone(),
                reason: "a run refers to the parent image but there is none".into(),
            })?;
            let run = *img.runs_of(pid).iter().find(|r| r.addr <= cur && cur < r.end()).ok_or_else(|| {
                ImageError::Corrupt {
                    path: img.dir.clone(),
                    reason: format!("no saved page at {cur:#x} for pid {pid}"),
                }
            })?;
            let piece_end = end.min(run.end());
            let out = &mut buf[(cur - addr) as usize..(piece_end - addr) as usize];
            match run.loc {
                RunLoc::Parent => self.read_at(level + 1, pid, cur, out)?,
                RunLoc::Here { .. } => {
                    let key = (level, pid, run.addr);
                    if !self.cache.contains_key(&key) {
                        let data = self.images[level].read_run(&run)?;
                        self.cache.retain(|k, _| (k.0, k.1) != (level, pid));
                        self.cache.insert(key, data);
                    }
                    let data = &self.cache[&key];
                    let off = (cur - run.addr) as usize;
                    out.copy_from_slice(&data[off..off + out.len()]);
                }
            }
            cur = piece_end;
        }
        Ok(())
    }

    /// Whether the image holds exactly `page` for process `pid` at `addr` (a page it does not hold, or
    /// whose run cannot be read, counts as not held).
    pub fn holds(&mut self, pid: i32, addr: u64, page: &[u8]) -> bool {
        if !self.head().runs_of(pid).iter().any(|r| r.addr <= addr && addr < r.end()) {
            return false;
        }
        let mut old = [0u8; PAGE as usize];
        self.read(pid, addr, &mut old).is_ok() && old[..] == *page
    }

    /// The pages of process `pid` as a [`PageSource`] for restore.
    pub fn pages_of(&mut self, pid: i32) -> ChainPages<'_> {
        ChainPages { chain: self, pid }
    }
}

/// One process's pages in an image chain.
pub struct ChainPages<'a> {
    chain: &'a mut ImageChain,
    pid: i32,
}

impl PageSource for ChainPages<'_> {
    fn runs(&mut self, vma: &Vma) -> io::Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in self.chain.head().runs_of(self.pid) {
            let (s, e) = (r.addr.max(vma.start), r.end().min(vma.end));
            if s < e {
                out.push((s, e - s));
            }
        }
        Ok(out)
    }

    fn read(&mut self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.chain.read(self.pid, addr, buf).map_err(io::Error::other)
    }
}

/// Writes one image into a temporary directory; `finish` makes it durable and publishes it.
struct ImageWriter {
    tmp: PathBuf,
    header: Header,
    pages: BufWriter<File>,
    offset: u64,
}

impl ImageWriter {
    fn create(tmp: &Path, header: Header) -> Result<ImageWriter, ImageError> {
        fs::create_dir_all(tmp).map_err(io_err(tmp, "create the image directory"))?;
        let p = tmp.join(PAGES);
        let pages = File::create(&p).map_err(io_err(&p, "create page data"))?;
        Ok(ImageWriter { tmp: tmp.to_path_buf(), header, pages: BufWriter::with_capacity(1 << 20, pages), offset: 0 })
    }

    fn add_run(&mut self, addr: u64, data: &[u8]) -> Result<PageRun, ImageError> {
        let p = self.tmp.join(PAGES);
        self.pages.write_all(data).map_err(io_err(&p, "write page data"))?;
        let run = PageRun {
            addr,
            pages: (data.len() as u64 / PAGE) as u32,
            loc: RunLoc::Here { offset: self.offset, crc: crc32fast::hash(data) },
        };
        self.offset += data.len() as u64;
        Ok(run)
    }

    fn finish(self, tree: &TreeState, index: &PageIndex, parent_bytes: u64) -> Result<ImageInfo, ImageError> {
        let p = self.tmp.join(PAGES);
        let pages = self.pages.into_inner().map_err(|e| ImageError::Io {
            path: p.clone(),
            what: "flush page data",
            source: e.into_error(),
        })?;
        pages.sync_all().map_err(io_err(&p, "sync page data"))?;
        let m = self.tmp.join(META);
        let mut meta = BufWriter::new(File::create(&m).map_err(io_err(&m, "create metadata"))?);
        let mut write = || -> io::Result<()> {
            meta.write_all(MAGIC)?;
            meta.write_all(&FORMAT_VERSION.to_le_bytes())?;
            put_record(&mut meta, RecordKind::Header, &encode(&self.header))?;
            put_record(&mut meta, RecordKind::Tree, &encode(tree))?;
            put_record(&mut meta, RecordKind::PageIndex, &encode(index))?;
            put_record(&mut meta, RecordKind::End, &[])?;
            meta.flush()?;
            meta.get_ref().sync_all()
        };
        write().map_err(io_err(&m, "write metadata"))?;
        File::open(&self.tmp).and_then(|d| d.sync_all()).map_err(io_err(&self.tmp, "sync the image directory"))?;
        Ok(ImageInfo { id: self.header.id, parent: self.header.parent, page_bytes: self.offset, parent_bytes })
    }
}

/// Everything needed to write a checkpoint's image, detached from the tracer thread: it can run on
/// any thread while the sandbox keeps running (it reads the templates' memory through
/// /proc/PID/{pagemap,mem} files opened when the job was made).
pub struct ImageJob {
    pub(crate) tree: TreeState,
    /// Per live pid: its template's pages, and its template's smaps (open, read by the writer: the
    /// mappings' flags are read off the checkpoint's path, as smaps walks page tables).
    pub(crate) pages: Vec<(i32, ProcessPages, File)>,
    /// Per pid: the parent checkpoint's template pages, to find unchanged pages.
    pub(crate) parent_pages: HashMap<i32, ProcessPages>,
    /// The image the processes were restored from, when there are no parent templates: pages whose
    /// content is the same there are not written again (see [`ImageJob::against_image`]).
    pub(crate) parent_image: Option<ImageChain>,
    pub(crate) parent: Option<ImageId>,
    /// Chosen when the job is made, so callers can record it before the image exists.
    pub(crate) id: ImageId,
}

impl ImageJob {
    /// The id the image will have.
    pub fn id(&self) -> ImageId {
        self.id
    }

    /// The same image with every page in it, for when its parent's image could not be written.
    pub fn without_parent(mut self) -> ImageJob {
        self.parent = None;
        self.parent_pages.clear();
        self.parent_image = None;
        self
    }

    /// Sets the mappings' flags in the tree from the templates' smaps.
    fn fill_vm_flags(&mut self) -> Result<(), ImageError> {
        for (pid, _, smaps) in &mut self.pages {
            let pid = *pid;
            let gone = || ImageError::TemplateGone { pid };
            let mut text = String::new();
            smaps.read_to_string(&mut text).map_err(|_| gone())?;
            let entries = crate::procfs::parse_smaps(Path::new("smaps"), &text).map_err(|_| gone())?;
            let st = self.tree.processes.iter_mut().find_map(|p| match &mut p.kind {
                ProcessKind::Live(st) if p.pid == pid => Some(st),
                _ => None,
            });
            if let Some(st) = st {
                crate::capture::fill_vm_flags(&mut st.vmas, &entries).map_err(|_| gone())?;
            }
        }
        Ok(())
    }

    /// For a checkpoint without parent templates whose processes were restored from image `chain` (a
    /// rollback or fork from an image): the image stores only the pages whose content differs from what
    /// `chain` holds for the same process and address, and `chain`'s head becomes its parent. Costs
    /// reading and comparing those pages (through the page cache) instead of writing them all.
    pub fn against_image(mut self, chain: ImageChain) -> ImageJob {
        if self.parent.is_none() {
            self.parent = Some(chain.head().header.id);
            self.parent_image = Some(chain);
        }
        self
    }

    /// Writes the image into `store` and returns its id and sizes. A failed write (a full disk...)
    /// leaves nothing behind.
    pub fn write(self, store: &ImageStore) -> Result<ImageInfo, ImageError> {
        let tmp = store.root.join(format!("{}.{}{TMP_SUFFIX}", self.id, std::process::id()));
        let written = self.write_via(store, &tmp);
        if written.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        written
    }

    /// Writes the image into directory `tmp`, then publishes it in `store` under its id.
    fn write_via(mut self, store: &ImageStore, tmp: &Path) -> Result<ImageInfo, ImageError> {
        let id = self.id;
        let header = Header {
            id,
            parent: self.parent,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            page_size: PAGE as u32,
        };
        self.fill_vm_flags()?;
        let mut w = ImageWriter::create(tmp, header)?;
        let mut index = PageIndex::default();
        let mut parent_bytes = 0;
        let mut buf = Vec::new();
        for (pid, src, _) in &self.pages {
            let Some(st) = self.tree.processes.iter().find_map(|p| match &p.kind {
                ProcessKind::Live(st) if p.pid == *pid => Some(st),
                _ => None,
            }) else {
                continue;
            };
            let parent = self.parent_pages.get(pid);
            let mut runs = Vec::new();
            for vma in st.vmas.iter().filter(|v| v.dumped) {
                let pm = src.pagemap(vma.start, vma.end).map_err(|_| ImageError::TemplateGone { pid: *pid })?;
                // A page is unchanged when the parent checkpoint's template maps the very same
                // physical page at that address (copy-on-write never lets either side write it).
                let old = parent.and_then(|pp| pp.pagemap(vma.start, vma.end).ok());
                let saved: Vec<bool> = pm.iter().map(|&e| crate::mm::page_is_saved(vma, e)).collect();
                let same: Vec<bool> = match &old {
                    Some(old) => pm
                        .iter()
                        .zip(old)
                        .zip(&saved)
                        .map(|((&n, &o), &s)| {
                            s && crate::mm::page_is_saved(vma, o) && n & PFN_MASK == o & PFN_MASK && n & PFN_MASK != 0
                        })
                        .collect(),
                    None => vec![false; pm.len()],
                };
                for (start, len) in runs_of(vma.start, saved.iter().zip(&same).map(|(&s, &u)| s && u)) {
                    for (s, l) in split(start, len) {
                        runs.push(PageRun { addr: s, pages: (l / PAGE) as u32, loc: RunLoc::Parent });
                        parent_bytes += l;
                    }
                }
                for (start, len) in runs_of(vma.start, saved.iter().zip(&same).map(|(&s, &u)| s && !u)) {
                    for (s, l) in split(start, len) {
                        buf.resize(l as usize, 0);
                        src.read_at(s, &mut buf).map_err(|_| ImageError::TemplateGone { pid: *pid })?;
                        let Some(chain) = self.parent_image.as_mut() else {
                            runs.push(w.add_run(s, &buf)?);
                            continue;
                        };
                        // Pages the parent image holds unchanged stay there; the others are written.
                        let unchanged: Vec<bool> = buf
                            .chunks_exact(PAGE as usize)
                            .enumerate()
                            .map(|(i, page)| chain.holds(*pid, s + i as u64 * PAGE, page))
                            .collect();
                        for (ps, pl) in runs_of(s, unchanged.iter().copied()) {
                            runs.push(PageRun { addr: ps, pages: (pl / PAGE) as u32, loc: RunLoc::Parent });
                            parent_bytes += pl;
                        }
                        for (ps, pl) in runs_of(s, unchanged.iter().map(|u| !u)) {
                            let off = (ps - s) as usize;
                            runs.push(w.add_run(ps, &buf[off..off + pl as usize])?);
                        }
                    }
                }
            }
            runs.sort_by_key(|r| r.addr);
            index.processes.push((*pid, runs));
        }
        let info = w.finish(&self.tree, &index, parent_bytes)?;
        let dir = store.path_of(id);
        fs::rename(tmp, &dir).map_err(io_err(tmp, "publish the image"))?;
        File::open(&store.root).and_then(|d| d.sync_all()).map_err(io_err(&store.root, "sync the store"))?;
        Ok(info)
    }
}

fn split(start: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..len.div_ceil(MAX_RUN)).map(move |i| {
        let s = start + i * MAX_RUN;
        (s, MAX_RUN.min(start + len - s))
    })
}
