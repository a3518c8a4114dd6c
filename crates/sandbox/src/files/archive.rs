//! Tar archives into and out of a sandbox.
//!
//! Extraction treats the archive as hostile:
//! - entry names are relative to the destination; a leading `/` is dropped and `..` is refused;
//! - parent directories resolve like every other path (`RESOLVE_IN_ROOT`), so symlinks that already
//!   exist in the sandbox (say `/lib -> usr/lib`) are followed inside the sandbox, never to the host;
//! - symlinks of the archive, and hard links to them, are created after every other entry (as GNU
//!   tar's "delayed symlinks"), and an entry whose path goes through one of them is refused: nothing
//!   is ever written through a link the archive made;
//! - regular files are written as new files (temporary file + `rename`), never opened for writing,
//!   so a symlink or hard link already in their place is replaced, not written through;
//! - hard links may only name archive paths that resolve beneath the destination;
//! - owners map into the sandbox's id range; ids beyond it become 0 (counted in
//!   [`ExtractStats::ids_out_of_range`]); modes are kept, setuid and setgid included;
//! - device nodes are skipped (counted): the daemon is host root and could otherwise create a node
//!   for a host disk inside the sandbox.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Cursor, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps};
use rustix::io::Errno;
use serde::Serialize;
use tar::{EntryType, Header};

use super::path::SandboxPath;
use super::{
    dir_names, ensure_ordinary_fs, fs_error, is_pseudo_filesystem, reopen, set_owner_and_mode, FileKind, FilesError,
    NewFile, Owner, SandboxRoot, PARENT_FLAGS,
};

/// What an extraction created.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct ExtractStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub fifos: u64,
    /// Bytes of regular file data written.
    pub bytes: u64,
    /// Character and block devices in the archive, not created.
    pub skipped_devices: u64,
    /// Owner or group ids beyond the sandbox's range, replaced by 0.
    pub ids_out_of_range: u64,
}

const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

pub(super) fn extract(root: &SandboxRoot, dest: &SandboxPath, tar: &mut dyn Read) -> Result<ExtractStats, FilesError> {
    let root_owner = root.owner(0, 0)?;
    let dest_existed = root.resolve(dest, PARENT_FLAGS).is_ok();
    let dest_dir = root.make_dirs(dest, root_owner)?;
    ensure_ordinary_fs(dest_dir.as_fd(), dest)?;
    let mut extractor = Extractor {
        root,
        dest: dest.clone(),
        dest_dir,
        dest_existed,
        root_owner,
        deferred: Vec::new(),
        pending: HashMap::new(),
        last_parent: None,
        dir_times: Vec::new(),
        stats: ExtractStats::default(),
    };
    let mut archive = tar::Archive::new(decompressed(tar)?);
    let bad = |source| FilesError::BadArchive { source };
    for entry in archive.entries().map_err(bad)? {
        extractor.entry(&mut entry.map_err(bad)?)?;
    }
    extractor.finish()
}

/// `input`, decompressed if it starts with a gzip or zstd magic number.
fn decompressed<'a>(input: &'a mut dyn Read) -> Result<Box<dyn Read + 'a>, FilesError> {
    let mut head = [0u8; 4];
    let mut len = 0;
    while len < head.len() {
        match input.read(&mut head[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(FilesError::ReadInput { source }),
        }
    }
    let head = &head[..len];
    let whole = Cursor::new(head.to_vec()).chain(input);
    Ok(if head.starts_with(GZIP_MAGIC) {
        Box::new(flate2::read::MultiGzDecoder::new(whole))
    } else if head.starts_with(ZSTD_MAGIC) {
        Box::new(zstd::stream::read::Decoder::new(whole).map_err(|source| FilesError::ReadInput { source })?)
    } else {
        Box::new(whole)
    })
}

/// Owner, mode and mtime of an entry, mapped for the host.
struct EntryMeta {
    owner: Owner,
    mode: Mode,
    times: Timestamps,
}

/// A link whose creation waits for the end of the archive.
enum Link {
    Symbolic { target: Vec<u8>, meta: EntryMeta },
    Hard { target: SandboxPath, entry: String },
}

struct Extractor<'a> {
    root: &'a SandboxRoot,
    dest: SandboxPath,
    /// The destination, for resolving hard link targets beneath it.
    dest_dir: OwnedFd,
    /// An existing destination keeps its owner, mode and mtime (extracting an archive of a
    /// directory into `/` must not make `/` that directory's owner).
    dest_existed: bool,
    root_owner: Owner,
    /// Links to create at the end, in archive order; `None` once a later entry replaced one.
    deferred: Vec<Option<(SandboxPath, Link)>>,
    /// Index in `deferred` of each path that will become a link.
    pending: HashMap<SandboxPath, usize>,
    /// The directory of the previous entry: archives list a directory's entries together, and
    /// resolving it once saves a path walk per entry.
    last_parent: Option<(SandboxPath, OwnedFd)>,
    /// Directory mtimes, applied last (every entry created in a directory changes its mtime).
    dir_times: Vec<(SandboxPath, Timestamps)>,
    stats: ExtractStats,
}

impl Extractor<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), FilesError> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |reason| FilesError::ArchiveEntry { entry: shown.clone(), reason };
        let path = self.dest.join_archive_name(&entry.path_bytes()).map_err(refuse)?;
        if !self.pending.is_empty() && path.ancestors_below(&self.dest).any(|a| self.pending.contains_key(&a)) {
            return Err(refuse("its path goes through a link that this archive creates"));
        }
        // A later entry replaces an earlier one of the same name.
        if let Some(index) = self.pending.remove(&path) {
            self.deferred[index] = None;
        }
        let meta = self.meta(entry.header())?;
        if path == self.dest {
            if kind != EntryType::Directory {
                return Err(refuse("only a directory can stand for the destination itself"));
            }
            self.stats.dirs += 1;
            if self.dest_existed {
                return Ok(());
            }
            let dir =
                self.root.resolve(&path, OFlags::RDONLY | OFlags::DIRECTORY).map_err(|e| fs_error("open", &path, e))?;
            set_owner_and_mode(dir.as_fd(), meta.owner, meta.mode).map_err(|e| fs_error("chown/chmod", &path, e))?;
            self.dir_times.push((path, meta.times));
            return Ok(());
        }
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let dir = self.parent_dir(&path)?;
                // A sparse entry's data expands beyond its stored size.
                let len = (kind != EntryType::GNUSparse).then(|| entry.size());
                let new = NewFile { owner: meta.owner, mode: meta.mode, mtime: Some(meta.times), len };
                let name = file_name(&path);
                let mut counted = Counted { inner: entry, count: 0 };
                self.root.create_file(dir.as_fd(), name, &path, &mut counted, new).map_err(|e| match e {
                    FilesError::ReadInput { source } => FilesError::BadArchive { source },
                    e => e,
                })?;
                self.stats.files += 1;
                self.stats.bytes += counted.count;
            }
            EntryType::Directory => {
                self.directory(&path, &meta)?;
                self.stats.dirs += 1;
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| refuse("a symlink without a target"))?;
                self.defer(path, Link::Symbolic { target: target.into_owned(), meta });
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| refuse("a hard link without a target"))?;
                let target = self.dest.join_archive_name(&target).map_err(refuse)?;
                if target == path || target == self.dest {
                    return Err(refuse("a hard link to itself or to the destination"));
                }
                if target.ancestors_below(&self.dest).any(|a| self.pending.contains_key(&a)) {
                    return Err(refuse("its target's path goes through a link that this archive creates"));
                }
                if self.pending.contains_key(&target) {
                    self.defer(path, Link::Hard { target, entry: shown });
                } else {
                    let dir = self.parent_dir(&path)?;
                    self.hard_link(&target, dir.as_fd(), &path, &shown)?;
                }
            }
            EntryType::Fifo => {
                self.fifo(&path, &meta)?;
                self.stats.fifos += 1;
            }
            EntryType::Char | EntryType::Block => {
                tracing::warn!(entry = shown, "skipping device node in archive");
                self.stats.skipped_devices += 1;
            }
            _ => return Err(refuse("its entry type is not supported")),
        }
        Ok(())
    }

    fn meta(&mut self, header: &Header) -> Result<EntryMeta, FilesError> {
        let field = |value: io::Result<u64>| value.map_err(|source| FilesError::BadArchive { source });
        let count = self.root.map.count;
        let mut sandbox_id = |raw: u64| match u32::try_from(raw).ok().filter(|id| *id < count) {
            Some(id) => id,
            None => {
                self.stats.ids_out_of_range += 1;
                0
            }
        };
        let uid = sandbox_id(field(header.uid())?);
        let gid = sandbox_id(field(header.gid())?);
        let mode = field(header.mode().map(u64::from))? as u32 & 0o7777;
        let mtime = Timespec { tv_sec: i64::try_from(field(header.mtime())?).unwrap_or(i64::MAX), tv_nsec: 0 };
        Ok(EntryMeta {
            owner: self.root.owner(uid, gid)?,
            mode: Mode::from_raw_mode(mode),
            times: Timestamps { last_access: mtime, last_modification: mtime },
        })
    }

    fn defer(&mut self, path: SandboxPath, link: Link) {
        self.pending.insert(path.clone(), self.deferred.len());
        self.deferred.push(Some((path, link)));
    }

    /// The parent directory of `path`, created if missing (tars need not list parents).
    fn parent_dir(&mut self, path: &SandboxPath) -> Result<OwnedFd, FilesError> {
        let (parent, _) = path.split_last().expect("entries below the destination have a parent");
        let dup = |dir: &OwnedFd| dir.try_clone().map_err(|e| super::io_error("dup", path, e));
        match &self.last_parent {
            Some((cached, dir)) if *cached == parent => return dup(dir),
            _ => {}
        }
        let dir = self.root.make_dirs(&parent, self.root_owner)?;
        ensure_ordinary_fs(dir.as_fd(), path)?;
        self.last_parent = Some((parent, dup(&dir)?));
        Ok(dir)
    }

    fn directory(&mut self, path: &SandboxPath, meta: &EntryMeta) -> Result<(), FilesError> {
        let dir = self.parent_dir(path)?;
        let name = file_name(path);
        let existing = match rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => None,
            other => Some(FileKind::of(&other.map_err(|e| fs_error("stat", path, e))?)),
        };
        match existing {
            None => {}
            Some(FileKind::Dir) => {
                let sub = super::open_subdir(dir.as_fd(), name).map_err(|e| fs_error("open", path, e))?;
                set_owner_and_mode(sub.as_fd(), meta.owner, meta.mode).map_err(|e| fs_error("chown/chmod", path, e))?;
                self.dir_times.push((path.clone(), meta.times.clone()));
                return Ok(());
            }
            // The sandbox's own symlink to a directory (a merged /usr's `/lib -> usr/lib`) stays, and
            // its target keeps its metadata.
            Some(FileKind::Symlink) if self.root.resolve(path, PARENT_FLAGS).is_ok() => return Ok(()),
            Some(_) => rfs::unlinkat(&dir, name, AtFlags::empty()).map_err(|e| fs_error("remove", path, e))?,
        }
        self.root.make_dir(dir.as_fd(), name, path, meta.owner, meta.mode)?;
        self.dir_times.push((path.clone(), meta.times.clone()));
        Ok(())
    }

    fn fifo(&mut self, path: &SandboxPath, meta: &EntryMeta) -> Result<(), FilesError> {
        let dir = self.parent_dir(path)?;
        let name = file_name(path);
        clear_slot(dir.as_fd(), name, path)?;
        rfs::mknodat(&dir, name, FileType::Fifo, Mode::RUSR | Mode::WUSR, 0)
            .map_err(|e| fs_error("mkfifo", path, e))?;
        // A non-blocking open of a fifo for reading returns at once; the descriptor pins the node we
        // made even if something replaces its name.
        let fifo = rfs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| fs_error("open", path, e))?;
        set_owner_and_mode(fifo.as_fd(), meta.owner, meta.mode).map_err(|e| fs_error("chown/chmod", path, e))?;
        rfs::futimens(&fifo, &meta.times).map_err(|e| fs_error("set times", path, e))
    }

    /// Links `path` (whose parent is `dir`) to the archive path `target`, which must resolve
    /// beneath the destination.
    fn hard_link(
        &mut self,
        target: &SandboxPath,
        dir: BorrowedFd<'_>,
        path: &SandboxPath,
        entry: &str,
    ) -> Result<(), FilesError> {
        let (target_parent, target_name) = target.split_last().expect("a hard link target is below the destination");
        let beneath = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
        let relative = target_parent.strip_prefix(&self.dest).relative();
        let target_dir = rfs::openat2(&self.dest_dir, relative, PARENT_FLAGS | OFlags::CLOEXEC, Mode::empty(), beneath)
            .map_err(|e| match e {
                Errno::XDEV => FilesError::ArchiveEntry {
                    entry: entry.to_owned(),
                    reason: "its hard link target resolves outside the destination",
                },
                e => fs_error("link", target, e),
            })?;
        let name = file_name(path);
        clear_slot(dir, name, path)?;
        // Flags 0: a hard link to a symlink links the symlink itself, never its target.
        rfs::linkat(&target_dir, target_name, dir, name, AtFlags::empty()).map_err(|e| fs_error("link", path, e))?;
        self.stats.hardlinks += 1;
        Ok(())
    }

    /// Creates the deferred links, then sets directory mtimes.
    fn finish(mut self) -> Result<ExtractStats, FilesError> {
        for (path, link) in std::mem::take(&mut self.deferred).into_iter().flatten() {
            let dir = self.parent_dir(&path)?;
            let name = file_name(&path);
            match link {
                Link::Symbolic { target, meta } => {
                    clear_slot(dir.as_fd(), name, &path)?;
                    rfs::symlinkat(OsStr::from_bytes(&target), &dir, name)
                        .map_err(|e| fs_error("symlink", &path, e))?;
                    // Neither call follows the new link.
                    rfs::chownat(&dir, name, Some(meta.owner.uid), Some(meta.owner.gid), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| fs_error("chown", &path, e))?;
                    rfs::utimensat(&dir, name, &meta.times, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| fs_error("set times", &path, e))?;
                    self.stats.symlinks += 1;
                }
                Link::Hard { target, entry } => self.hard_link(&target, dir.as_fd(), &path, &entry)?,
            }
        }
        for (path, times) in &self.dir_times {
            let set = self
                .root
                .resolve(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW)
                .and_then(|dir| rfs::futimens(&dir, times));
            if let Err(e) = set {
                // Replaced by a later entry.
                tracing::debug!(%path, error = %e, "directory mtime not restored");
            }
        }
        Ok(self.stats)
    }
}

/// Makes room for a new non-directory entry at `name` in `dir`.
fn clear_slot(dir: BorrowedFd<'_>, name: &OsStr, path: &SandboxPath) -> Result<(), FilesError> {
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(fs_error("stat", path, e)),
        Ok(st) if FileKind::of(&st) == FileKind::Dir => Err(FilesError::IsADirectory { path: path.to_string() }),
        Ok(_) => rfs::unlinkat(dir, name, AtFlags::empty()).map_err(|e| fs_error("remove", path, e)),
    }
}

fn file_name(path: &SandboxPath) -> &OsStr {
    path.split_last().map(|(_, name)| name).expect("entries below the destination have a name")
}

/// Counts the bytes read through it.
struct Counted<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// The data regions `(offset, length)` of a file of `size` bytes, from `SEEK_DATA`/`SEEK_HOLE`; a file
/// without holes is one region. A file ending in a hole gets an empty last region at `size` (how a GNU
/// sparse entry states its full size). Leaves the file's offset at 0.
fn data_regions(file: BorrowedFd<'_>, size: u64) -> Result<Vec<(u64, u64)>, Errno> {
    let mut regions = Vec::new();
    let mut at = 0;
    while at < size {
        let start = match rfs::seek(file, rfs::SeekFrom::Data(at)) {
            Ok(start) => start.min(size),
            Err(Errno::NXIO) => size,
            Err(e) => return Err(e),
        };
        if start >= size {
            break;
        }
        let end = rfs::seek(file, rfs::SeekFrom::Hole(start))?.min(size);
        regions.push((start, end - start));
        at = end;
    }
    if regions.last().is_none_or(|(start, len)| start + len < size) {
        regions.push((size, 0));
    }
    rfs::seek(file, rfs::SeekFrom::Start(0))?;
    Ok(regions)
}

/// Makes `header` a GNU sparse entry for `regions` of a file of `size` bytes (`data_len` of them data);
/// returns the extension blocks that follow the header for regions past the four it holds.
fn sparse_header(header: &mut Header, regions: &[(u64, u64)], size: u64, data_len: u64) -> Vec<u8> {
    header.set_entry_type(EntryType::GNUSparse);
    header.set_size(data_len);
    let gnu = header.as_gnu_mut().expect("archive headers are GNU headers");
    gnu.set_real_size(size);
    let (first, rest) = regions.split_at(regions.len().min(gnu.sparse.len()));
    for (slot, (offset, len)) in gnu.sparse.iter_mut().zip(first) {
        slot.set_offset(*offset);
        slot.set_length(*len);
    }
    gnu.set_is_extended(!rest.is_empty());
    let chunks: Vec<&[(u64, u64)]> = rest.chunks(tar::GnuExtSparseHeader::new().sparse.len()).collect();
    let mut blocks = Vec::with_capacity(chunks.len() * 512);
    for (i, chunk) in chunks.iter().enumerate() {
        let mut ext = tar::GnuExtSparseHeader::new();
        for (slot, (offset, len)) in ext.sparse.iter_mut().zip(*chunk) {
            slot.set_offset(*offset);
            slot.set_length(*len);
        }
        ext.set_is_extended(i + 1 < chunks.len());
        blocks.extend_from_slice(ext.as_bytes());
    }
    blocks
}

/// Reads the data regions of a file one after the other; a region the file no longer fills (it shrank
/// meanwhile) is padded with zeros, so the entry has the length its header states.
struct RegionReader {
    file: File,
    regions: std::vec::IntoIter<(u64, u64)>,
    /// Offset and bytes left of the region being read.
    current: (u64, u64),
}

impl RegionReader {
    fn new(file: File, regions: Vec<(u64, u64)>) -> RegionReader {
        RegionReader { file, regions: regions.into_iter(), current: (0, 0) }
    }
}

impl Read for RegionReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.1 == 0 {
            match self.regions.next() {
                Some(region) => self.current = region,
                None => return Ok(0),
            }
        }
        let (offset, left) = self.current;
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match std::os::unix::fs::FileExt::read_at(&self.file, &mut buf[..want], offset)? {
            0 => {
                buf[..want].fill(0);
                want
            }
            n => n,
        };
        self.current = (offset + n as u64, left - n as u64);
        Ok(n)
    }
}

pub(super) fn write(root: &SandboxRoot, path: SandboxPath, out: &mut dyn Write) -> Result<(), FilesError> {
    let fd = root.resolve(&path, OFlags::PATH).map_err(|e| fs_error("open", &path, e))?;
    let st = rfs::fstat(&fd).map_err(|e| fs_error("stat", &path, e))?;
    ensure_ordinary_fs(fd.as_fd(), &path)?;
    // Entry names are relative to the directory, or to the file's parent.
    let top = match (FileKind::of(&st), path.split_last()) {
        (FileKind::Dir, _) | (_, None) => path.clone(),
        (_, Some((parent, _))) => parent,
    };
    let mut writer = TarWriter {
        root,
        top,
        builder: tar::Builder::new(Output { out, failed: false, poisoned: false }),
        links: HashMap::new(),
    };
    match writer.add(fd, &st, &path, None, 0) {
        Ok(()) => writer.builder.into_inner().map(drop).map_err(|source| FilesError::WriteOutput { source }),
        Err(e) => {
            // Dropping the builder would end the archive properly: a reader must not take a
            // truncated stream for a whole one.
            writer.builder.get_mut().poisoned = true;
            Err(e)
        }
    }
}

/// The caller's output, remembering whether a write failed (to tell output errors from errors
/// reading the sandbox's files, which reach us through the same `tar` call).
struct Output<'a> {
    out: &'a mut dyn Write,
    failed: bool,
    /// Refuse every write from now on.
    poisoned: bool,
}

impl Write for Output<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.poisoned {
            return Err(io::Error::other("the archive was abandoned after an error"));
        }
        self.out.write(buf).inspect_err(|_| self.failed = true)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush().inspect_err(|_| self.failed = true)
    }
}

struct TarWriter<'a, 'o> {
    root: &'a SandboxRoot,
    top: SandboxPath,
    builder: tar::Builder<Output<'o>>,
    /// Archive name of the first path seen for each multiply-linked inode, by (dev, ino).
    links: HashMap<(u64, u64), std::path::PathBuf>,
}

impl TarWriter<'_, '_> {
    /// Adds the inode behind the `O_PATH` descriptor `fd` (and, for a directory, everything
    /// beneath it) as `path`, `depth` levels below the top. `parent_dev` is the device of the directory that
    /// holds it.
    fn add(
        &mut self,
        fd: OwnedFd,
        st: &Stat,
        path: &SandboxPath,
        parent_dev: Option<u64>,
        depth: usize,
    ) -> Result<(), FilesError> {
        super::check_depth(depth, path)?;
        let kind = FileKind::of(st);
        let name = path.strip_prefix(&self.top).archive_name(kind == FileKind::Dir);
        let mut header = Header::new_gnu();
        header.set_mode(st.st_mode & 0o7777);
        header.set_uid(self.root.sandbox_id(st.st_uid).into());
        header.set_gid(self.root.sandbox_id(st.st_gid).into());
        header.set_mtime(st.st_mtime.max(0) as u64);
        header.set_size(0);
        if kind != FileKind::Dir && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                header.set_entry_type(EntryType::Link);
                let first = first.clone();
                return self.append_link(&mut header, &name, first.as_os_str(), path);
            }
            self.links.insert(key, name.clone());
        }
        match kind {
            FileKind::Dir => {
                header.set_entry_type(EntryType::Directory);
                self.append(&mut header, &name, io::empty(), path)?;
                let dir = rfs::openat(&fd, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| fs_error("open", path, e))?;
                if parent_dev.is_some_and(|dev| dev != st.st_dev)
                    && is_pseudo_filesystem(dir.as_fd()).map_err(|e| fs_error("statfs", path, e))?
                {
                    tracing::debug!(%path, "not archiving the contents of a pseudo-filesystem mount");
                    return Ok(());
                }
                for child_name in dir_names(dir.as_fd()).map_err(|e| fs_error("list", path, e))? {
                    let child = path.child(&child_name);
                    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                    let child_fd = match rfs::openat(&dir, &child_name, flags, Mode::empty()) {
                        // Removed since the directory was read.
                        Err(Errno::NOENT) => continue,
                        other => other.map_err(|e| fs_error("open", &child, e))?,
                    };
                    let child_st = rfs::fstat(&child_fd).map_err(|e| fs_error("stat", &child, e))?;
                    self.add(child_fd, &child_st, &child, Some(st.st_dev), depth + 1)?;
                }
                Ok(())
            }
            FileKind::File => {
                let file = File::from(reopen(fd.as_fd(), OFlags::RDONLY).map_err(|e| fs_error("open", path, e))?);
                let size = st.st_size as u64;
                // Only a file with fewer blocks than its size can have holes (GNU tar's test): the others
                // cost no SEEK_DATA/SEEK_HOLE round trips to the filesystem.
                let regions = if (st.st_blocks as u64).saturating_mul(512) < size {
                    data_regions(file.as_fd(), size).map_err(|e| fs_error("find the data of", path, e))?
                } else {
                    vec![(0, size)]
                };
                if regions.as_slice() == [(0, size)] || size == 0 {
                    header.set_entry_type(EntryType::Regular);
                    header.set_size(size);
                    // Exactly `size` bytes even if the file changes meanwhile: a short file is padded.
                    let data = file.take(size).chain(io::repeat(0)).take(size);
                    return self.append(&mut header, &name, data, path);
                }
                // Holes stay holes: a GNU sparse entry carries the data regions only (a 100 GB file of
                // holes is a few blocks, and the receiver writes it sparse).
                let data_len = regions.iter().map(|(_, len)| len).sum();
                let extensions = sparse_header(&mut header, &regions, size, data_len);
                let data = Cursor::new(extensions).chain(RegionReader::new(file, regions));
                self.append(&mut header, &name, data, path)
            }
            FileKind::Symlink => {
                let target = rfs::readlinkat(&fd, "", Vec::new()).map_err(|e| fs_error("readlink", path, e))?;
                header.set_entry_type(EntryType::Symlink);
                self.append_link(&mut header, &name, OsStr::from_bytes(target.as_bytes()), path)
            }
            FileKind::Fifo | FileKind::Char | FileKind::Block => {
                header.set_entry_type(match kind {
                    FileKind::Fifo => EntryType::Fifo,
                    FileKind::Char => EntryType::Char,
                    _ => EntryType::Block,
                });
                let device = |source| FilesError::Io { op: "archive", path: path.to_string(), source };
                header.set_device_major(rfs::major(st.st_rdev)).map_err(device)?;
                header.set_device_minor(rfs::minor(st.st_rdev)).map_err(device)?;
                self.append(&mut header, &name, io::empty(), path)
            }
            FileKind::Socket => {
                tracing::debug!(%path, "skipping socket: tar cannot hold it");
                Ok(())
            }
        }
    }

    fn append(
        &mut self,
        header: &mut Header,
        name: &std::path::Path,
        data: impl Read,
        path: &SandboxPath,
    ) -> Result<(), FilesError> {
        let result = self.builder.append_data(header, name, data);
        result.map_err(|e| self.error(e, path))
    }

    fn append_link(
        &mut self,
        header: &mut Header,
        name: &std::path::Path,
        target: &OsStr,
        path: &SandboxPath,
    ) -> Result<(), FilesError> {
        let result = self.builder.append_link(header, name, target);
        result.map_err(|e| self.error(e, path))
    }

    /// An error of a `tar` call: the output's, or reading the sandbox's file at `path`.
    fn error(&self, e: io::Error, path: &SandboxPath) -> FilesError {
        match self.builder.get_ref().failed {
            true => FilesError::WriteOutput { source: e },
            false => super::io_error("read", path, e),
        }
    }
}
