//! File operations on a sandbox's filesystem, done by the daemon (host root) on the sandbox's behalf.
//!
//! Every path is an absolute sandbox path. It is normalised lexically ([`path`]) and then resolved by
//! the kernel with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` from a descriptor of the
//! sandbox's root, so symlinks resolve as they would for a sandbox process and can never reach a host
//! file. Files are created, renamed and removed relative to their parent directory's descriptor,
//! never by a path that the kernel would resolve from the host's root. See `docs/files.md`.

mod archive;
mod path;

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Stat, Timestamps, Uid};
use rustix::io::Errno;
use rustix::thread::CapabilitySets;
use serde::Serialize;

pub use archive::ExtractStats;
use path::SandboxPath;

use crate::userns::IdMap;

/// Errors of the files API. Paths in them are sandbox paths, never host paths.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{path}: invalid path: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("{path}: the path climbs above the sandbox's root directory")]
    PathEscapesRoot { path: String },
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    #[error("{path}: not a directory")]
    NotADirectory { path: String },
    #[error("{path}: is a directory")]
    IsADirectory { path: String },
    #[error("{path}: not a regular file (it is a {kind})")]
    NotARegularFile { path: String, kind: FileKind },
    #[error("{path}: already exists")]
    AlreadyExists { path: String },
    #[error("{path}: directory not empty (remove it recursively)")]
    DirectoryNotEmpty { path: String },
    #[error("{path}: no space left on the sandbox's filesystem (or its quota is used up); the file was not written")]
    NoSpace { path: String },
    #[error("{path}: the filesystem is read-only")]
    ReadOnly { path: String },
    #[error(
        "{path}: on a kernel pseudo-filesystem (proc, sysfs, cgroup, ...), which the files API does not read or change"
    )]
    PseudoFilesystem { path: String },
    #[error("id {id} is outside the sandbox's id range 0..{count}")]
    IdNotMapped { id: u32, count: u32 },
    #[error("{path}: the directory tree is deeper than {MAX_TREE_DEPTH} levels")]
    TooDeep { path: String },
    #[error("mode {mode:#o} has bits beyond 0o7777")]
    InvalidMode { mode: u32 },
    #[error("archive entry {entry:?} refused: {reason}")]
    ArchiveEntry { entry: String, reason: &'static str },
    #[error("not a valid tar archive")]
    BadArchive {
        #[source]
        source: io::Error,
    },
    #[error("cannot read the input")]
    ReadInput {
        #[source]
        source: io::Error,
    },
    #[error("cannot write the output")]
    WriteOutput {
        #[source]
        source: io::Error,
    },
    #[error("cannot open the sandbox's root directory")]
    OpenRoot {
        #[source]
        source: io::Error,
    },
    #[error("{path}: {op} failed")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl FilesError {
    /// A stable machine-readable code for API responses.
    pub fn code(&self) -> &'static str {
        match self {
            FilesError::InvalidPath { .. } => "invalid_path",
            FilesError::PathEscapesRoot { .. } => "path_escapes_root",
            FilesError::NotFound { .. } => "not_found",
            FilesError::NotADirectory { .. } => "not_a_directory",
            FilesError::IsADirectory { .. } => "is_a_directory",
            FilesError::NotARegularFile { .. } => "not_a_regular_file",
            FilesError::AlreadyExists { .. } => "already_exists",
            FilesError::DirectoryNotEmpty { .. } => "directory_not_empty",
            FilesError::NoSpace { .. } => "no_space",
            FilesError::ReadOnly { .. } => "read_only",
            FilesError::PseudoFilesystem { .. } => "pseudo_filesystem",
            FilesError::IdNotMapped { .. } => "id_not_mapped",
            FilesError::InvalidMode { .. } => "invalid_mode",
            FilesError::TooDeep { .. } => "too_deep",
            FilesError::ArchiveEntry { .. } => "archive_entry_refused",
            FilesError::BadArchive { .. } => "bad_archive",
            FilesError::ReadInput { .. } => "read_input",
            FilesError::WriteOutput { .. } => "write_output",
            FilesError::OpenRoot { .. } => "sandbox_root",
            FilesError::Io { .. } => "io",
        }
    }
}

/// Deepest directory tree that a recursive operation (archive, recursive removal) walks: a sandbox can nest
/// directories far deeper than any path can name, and each level costs a stack frame of the host's walker.
pub const MAX_TREE_DEPTH: usize = 512;

/// Refuses to go one level deeper than `depth` when that passes [`MAX_TREE_DEPTH`].
fn check_depth(depth: usize, path: &SandboxPath) -> Result<(), FilesError> {
    if depth > MAX_TREE_DEPTH {
        return Err(FilesError::TooDeep { path: path.to_string() });
    }
    Ok(())
}

/// The kernel's answer `e` to operation `op` on `path`, as the error a caller can act on.
fn fs_error(op: &'static str, path: &SandboxPath, e: Errno) -> FilesError {
    let path = path.to_string();
    match e {
        Errno::NOENT => FilesError::NotFound { path },
        Errno::NOTDIR => FilesError::NotADirectory { path },
        Errno::ISDIR => FilesError::IsADirectory { path },
        Errno::EXIST => FilesError::AlreadyExists { path },
        Errno::NOTEMPTY => FilesError::DirectoryNotEmpty { path },
        Errno::NOSPC | Errno::DQUOT => FilesError::NoSpace { path },
        Errno::ROFS => FilesError::ReadOnly { path },
        Errno::LOOP => FilesError::InvalidPath {
            path,
            reason: "too many levels of symbolic links, or a symlink into /proc's magic links",
        },
        Errno::NAMETOOLONG => FilesError::InvalidPath { path, reason: "a name or the whole path is too long" },
        e => FilesError::Io { op, path, source: e.into() },
    }
}

/// As [`fs_error`], for errors that come back through `std::io`.
fn io_error(op: &'static str, path: &SandboxPath, e: io::Error) -> FilesError {
    match e.raw_os_error() {
        Some(raw) => fs_error(op, path, Errno::from_raw_os_error(raw)),
        None => FilesError::Io { op, path: path.to_string(), source: e },
    }
}

/// What kind of inode a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    Char,
    Block,
}

impl FileKind {
    fn of(st: &Stat) -> FileKind {
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => FileKind::Dir,
            FileType::Symlink => FileKind::Symlink,
            FileType::Fifo => FileKind::Fifo,
            FileType::Socket => FileKind::Socket,
            FileType::CharacterDevice => FileKind::Char,
            FileType::BlockDevice => FileKind::Block,
            FileType::RegularFile | FileType::Unknown => FileKind::File,
        }
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::File => "regular file",
            FileKind::Dir => "directory",
            FileKind::Symlink => "symbolic link",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
            FileKind::Char => "character device",
            FileKind::Block => "block device",
        })
    }
}

/// A file's metadata as the sandbox sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileStat {
    /// The normalised sandbox path.
    pub path: String,
    /// The last component of `path` (`/` for the root).
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits, including setuid, setgid and sticky.
    pub mode: u32,
    /// Owner as seen inside the sandbox; host ids outside its range show as 65534 (nobody).
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: f64,
    /// The target of a symlink, as stored.
    pub link_target: Option<String>,
}

/// How [`SandboxRoot::write`] creates a file. Ids are sandbox ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOptions {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Create missing parent directories (mode 0755, owned by the sandbox's root).
    pub create_parents: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { mode: 0o644, uid: 0, gid: 0, create_parents: true }
    }
}

/// The id the sandbox shows for host ids outside its range (the overflow id, "nobody").
const NOBODY: u32 = 65534;

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

/// `openat2` answers EAGAIN when a rename elsewhere raced with a `..` it resolved; the kernel
/// expects callers to retry.
const RESOLVE_ATTEMPTS: u32 = 16;

/// Directory descriptor flags for creating entries in and for `fstatfs`.
const PARENT_FLAGS: OFlags = OFlags::PATH.union(OFlags::DIRECTORY);

/// Filesystems that expose the kernel rather than files (`f_type` magic numbers from
/// `linux/magic.h`): reading them as host root could leak host state (e.g. `/proc/kcore`), and
/// creating or removing entries in some of them (cgroup, tracefs, configfs) changes the kernel.
const PSEUDO_FILESYSTEMS: &[u32] = &[
    0x9fa0,      // proc
    0x6265_6572, // sysfs
    0x0027_e0eb, // cgroup
    0x6367_7270, // cgroup2
    0x6462_6720, // debugfs
    0x7472_6163, // tracefs
    0x7363_6673, // securityfs
    0xcafe_4a11, // bpf
    0x6265_6570, // configfs
    0xde5e_81e4, // efivarfs
    0x6165_676c, // pstore
    0xf97c_ff8c, // selinuxfs
    0x4249_4e4d, // binfmt_misc
    0x6573_5543, // fusectl (FUSE itself, 0x65735546, is an ordinary filesystem here: DeltaFS)
];

/// Uniquifies temporary file names within this process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Owner of a new inode, as host ids.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: Uid,
    gid: Gid,
}

/// The root directory of a sandbox, opened once, plus its id mapping.
#[derive(Debug)]
pub struct SandboxRoot {
    root: OwnedFd,
    map: IdMap,
}

impl SandboxRoot {
    /// Opens `root_dir` (for a running sandbox `/proc/<init host pid>/root`, so that mounts inside
    /// the sandbox are seen as the sandbox sees them). `map` maps the sandbox's ids to host ids.
    pub fn open(root_dir: &Path, map: IdMap) -> Result<SandboxRoot, FilesError> {
        let root = rfs::open(root_dir, PARENT_FLAGS | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| FilesError::OpenRoot { source: e.into() })?;
        Ok(SandboxRoot { root, map })
    }

    /// Opens the regular file at `path` for reading (a final symlink is followed inside the sandbox).
    pub fn open_read(&self, path: &str) -> Result<(File, FileStat), FilesError> {
        let path = SandboxPath::parse(path)?;
        let fd = self.resolve(&path, OFlags::PATH).map_err(|e| fs_error("open", &path, e))?;
        let st = rfs::fstat(&fd).map_err(|e| fs_error("stat", &path, e))?;
        match FileKind::of(&st) {
            FileKind::File => {}
            FileKind::Dir => return Err(FilesError::IsADirectory { path: path.to_string() }),
            kind => return Err(FilesError::NotARegularFile { path: path.to_string(), kind }),
        }
        ensure_ordinary_fs(fd.as_fd(), &path)?;
        let file = reopen(fd.as_fd(), OFlags::RDONLY).map_err(|e| fs_error("open", &path, e))?;
        Ok((File::from(file), self.file_stat(&path, &st, None)))
    }

    /// Writes `data` to `path` as a new file: the data goes to a temporary file in the same
    /// directory, which then replaces `path` by `rename`, so a reader sees the old content or the
    /// new one, never a part. Whatever non-directory was at `path` (also a symlink: it is replaced,
    /// not followed) is replaced; on any error nothing is left behind.
    pub fn write(&self, path: &str, data: &mut dyn Read, opts: &WriteOptions) -> Result<FileStat, FilesError> {
        let path = SandboxPath::parse(path)?;
        let owner = self.owner(opts.uid, opts.gid)?;
        let mode = checked_mode(opts.mode)?;
        let (parent, name) = path.split_last().ok_or_else(|| FilesError::IsADirectory { path: path.to_string() })?;
        self.as_sandbox_root(&path, || {
            let dir =
                if opts.create_parents { self.make_dirs(&parent, self.owner(0, 0)?)? } else { self.open_dir(&parent)? };
            ensure_ordinary_fs(dir.as_fd(), &path)?;
            self.create_file(dir.as_fd(), name, &path, data, NewFile { owner, mode, mtime: None, len: None })?;
            self.stat_at(dir.as_fd(), name, &path)
        })
    }

    /// Metadata of `path`; a final symlink is not followed.
    pub fn stat(&self, path: &str) -> Result<FileStat, FilesError> {
        let path = SandboxPath::parse(path)?;
        let fd = self.resolve(&path, OFlags::PATH | OFlags::NOFOLLOW).map_err(|e| fs_error("stat", &path, e))?;
        let st = rfs::fstat(&fd).map_err(|e| fs_error("stat", &path, e))?;
        let target = match FileKind::of(&st) {
            FileKind::Symlink => Some(read_link(fd.as_fd(), OsStr::new(""), &path)?),
            _ => None,
        };
        Ok(self.file_stat(&path, &st, target))
    }

    /// The entries of the directory at `path` (a final symlink is followed), sorted by name.
    pub fn list(&self, path: &str) -> Result<Vec<FileStat>, FilesError> {
        let path = SandboxPath::parse(path)?;
        let dir = self.resolve(&path, OFlags::RDONLY | OFlags::DIRECTORY).map_err(|e| fs_error("list", &path, e))?;
        let mut entries = Vec::new();
        for name in dir_names(dir.as_fd()).map_err(|e| fs_error("list", &path, e))? {
            let child = path.child(&name);
            match self.stat_at(dir.as_fd(), &name, &child) {
                Ok(stat) => entries.push(stat),
                // Removed since the directory was read.
                Err(FilesError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(entries)
    }

    /// Creates the directory `path` with `mode`, owned by the sandbox ids `uid`/`gid`. With
    /// `parents`, missing parents are created the same way (mode 0755) and an existing directory
    /// is not an error, as with `mkdir -p`.
    pub fn mkdir(&self, path: &str, mode: u32, parents: bool, uid: u32, gid: u32) -> Result<FileStat, FilesError> {
        let path = SandboxPath::parse(path)?;
        let owner = self.owner(uid, gid)?;
        let mode = checked_mode(mode)?;
        let Some((parent, name)) = path.split_last() else {
            return match parents {
                true => self.stat("/"),
                false => Err(FilesError::AlreadyExists { path: path.to_string() }),
            };
        };
        self.as_sandbox_root(&path, || {
            let dir = if parents { self.make_dirs(&parent, owner)? } else { self.open_dir(&parent)? };
            match self.make_dir(dir.as_fd(), name, &path, owner, mode) {
                Err(FilesError::AlreadyExists { .. }) if parents => {
                    // `mkdir -p` accepts a directory or a symlink to one.
                    self.resolve(&path, PARENT_FLAGS).map_err(|e| match e {
                        Errno::NOTDIR => FilesError::AlreadyExists { path: path.to_string() },
                        e => fs_error("mkdir", &path, e),
                    })?;
                }
                other => drop(other?),
            }
            self.stat_at(dir.as_fd(), name, &path)
        })
    }

    /// Removes `path` (a symlink itself, not its target). A directory must be empty unless
    /// `recursive`; a recursive removal never follows symlinks.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), FilesError> {
        let path = SandboxPath::parse(path)?;
        let (parent, name) = path
            .split_last()
            .ok_or_else(|| FilesError::InvalidPath { path: path.to_string(), reason: "the root cannot be removed" })?;
        let dir = self.open_dir(&parent)?;
        ensure_ordinary_fs(dir.as_fd(), &path)?;
        let st = rfs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fs_error("remove", &path, e))?;
        if FileKind::of(&st) != FileKind::Dir {
            return rfs::unlinkat(&dir, name, AtFlags::empty()).map_err(|e| fs_error("remove", &path, e));
        }
        if recursive {
            let sub = open_subdir(dir.as_fd(), name).map_err(|e| fs_error("remove", &path, e))?;
            remove_contents(sub.as_fd(), &path, 1)?;
        }
        rfs::unlinkat(&dir, name, AtFlags::REMOVEDIR).map_err(|e| fs_error("remove", &path, e))
    }

    /// Extracts a tar stream (plain, gzip or zstd) into the directory `dest_dir`, which is created
    /// if missing. See [`archive`] for the rules that keep hostile archives in their place.
    pub fn extract_tar(&self, dest_dir: &str, tar: &mut dyn Read) -> Result<ExtractStats, FilesError> {
        let dest = SandboxPath::parse(dest_dir)?;
        self.as_sandbox_root(&dest, || archive::extract(self, &dest, tar))
    }

    /// Writes a tar stream of `path` to `out`: the file itself, or a directory with everything
    /// beneath it (entry names relative to it, the directory itself as `./`).
    pub fn write_tar(&self, path: &str, out: &mut dyn Write) -> Result<(), FilesError> {
        archive::write(self, SandboxPath::parse(path)?, out)
    }

    /// Runs `op` with the calling thread's filesystem ids set to the sandbox's root. A filesystem
    /// mounted inside the sandbox's user namespace (its /tmp tmpfs) refuses to create or rename an
    /// inode when the caller's fsuid or fsgid is not mapped there (EOVERFLOW), and host root's 0 is
    /// not; new inodes get their final owner by `chown` afterwards. The ids belong to the thread
    /// and are restored before this returns.
    fn as_sandbox_root<T>(
        &self,
        path: &SandboxPath,
        op: impl FnOnce() -> Result<T, FilesError>,
    ) -> Result<T, FilesError> {
        let failed = |e: Errno| FilesError::Io { op: "set filesystem ids", path: path.to_string(), source: e.into() };
        let caps = rustix::thread::capabilities(None).map_err(failed)?;
        let _restore = FsIds::set(self.owner(0, 0)?, caps).map_err(failed)?;
        op()
    }

    /// `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` of `path` from the root.
    fn resolve(&self, path: &SandboxPath, flags: OFlags) -> Result<OwnedFd, Errno> {
        let relative = path.relative();
        let mut attempt = 1;
        loop {
            match rfs::openat2(&self.root, &relative, flags | OFlags::CLOEXEC, Mode::empty(), RESOLVE) {
                Err(Errno::AGAIN) if attempt < RESOLVE_ATTEMPTS => attempt += 1,
                result => return result,
            }
        }
    }

    /// The directory at `path`, for creating or removing entries in it.
    fn open_dir(&self, path: &SandboxPath) -> Result<OwnedFd, FilesError> {
        self.resolve(path, PARENT_FLAGS).map_err(|e| fs_error("open directory", path, e))
    }

    /// The directory at `path`, creating missing directories on the way (mode 0755, `owner`).
    /// Each existing prefix is resolved from the root, so symlinks on the way resolve as they do
    /// for a sandbox process.
    fn make_dirs(&self, path: &SandboxPath, owner: Owner) -> Result<OwnedFd, FilesError> {
        match self.resolve(path, PARENT_FLAGS) {
            Err(Errno::NOENT) => {}
            other => return other.map_err(|e| fs_error("open directory", path, e)),
        }
        let Some((parent, name)) = path.split_last() else {
            return Err(fs_error("open directory", path, Errno::NOENT));
        };
        let dir = self.make_dirs(&parent, owner)?;
        match self.make_dir(dir.as_fd(), name, path, owner, Mode::from_raw_mode(0o755)) {
            Ok(made) => Ok(made),
            // Someone else made it meanwhile: use theirs, wherever it resolves to.
            Err(FilesError::AlreadyExists { .. }) => self.open_dir(path),
            Err(e) => Err(e),
        }
    }

    /// `mkdir name` in `dir`, then owner and mode on the new directory (not through a symlink
    /// someone might have put in its place meanwhile). Returns the new directory.
    fn make_dir(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &SandboxPath,
        owner: Owner,
        mode: Mode,
    ) -> Result<OwnedFd, FilesError> {
        ensure_ordinary_fs(dir, path)?;
        rfs::mkdirat(dir, name, Mode::RWXU).map_err(|e| fs_error("mkdir", path, e))?;
        let made = open_subdir(dir, name).map_err(|e| fs_error("mkdir", path, e))?;
        set_owner_and_mode(made.as_fd(), owner, mode).map_err(|e| fs_error("mkdir", path, e))?;
        Ok(made)
    }

    /// Creates `name` in `dir` with the content of `data` through a temporary file and `rename`.
    fn create_file(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &SandboxPath,
        data: &mut dyn Read,
        new: NewFile,
    ) -> Result<(), FilesError> {
        let (temp, mut file) = TempFile::create(dir, path)?;
        let written = copy_data(data, &mut file, path)?;
        if let Some(len) = new.len.filter(|len| *len != written) {
            return Err(FilesError::ReadInput {
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{path}: the input ended after {written} of {len} bytes"),
                ),
            });
        }
        set_owner_and_mode(file.as_fd(), new.owner, new.mode).map_err(|e| fs_error("chown/chmod", path, e))?;
        if let Some(times) = &new.mtime {
            rfs::futimens(&file, times).map_err(|e| fs_error("set times", path, e))?;
        }
        drop(file);
        rfs::renameat(dir, &temp.name, dir, name).map_err(|e| fs_error("rename", path, e))?;
        temp.keep();
        Ok(())
    }

    /// Metadata of `name` in `dir` (not following a symlink), reported as `path`.
    fn stat_at(&self, dir: BorrowedFd<'_>, name: &OsStr, path: &SandboxPath) -> Result<FileStat, FilesError> {
        let st = rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| fs_error("stat", path, e))?;
        let target = match FileKind::of(&st) {
            FileKind::Symlink => Some(read_link(dir, name, path)?),
            _ => None,
        };
        Ok(self.file_stat(path, &st, target))
    }

    fn file_stat(&self, path: &SandboxPath, st: &Stat, link_target: Option<String>) -> FileStat {
        FileStat {
            path: path.to_string(),
            name: path.file_name(),
            kind: FileKind::of(st),
            size: st.st_size as u64,
            mode: st.st_mode & 0o7777,
            uid: self.sandbox_id(st.st_uid),
            gid: self.sandbox_id(st.st_gid),
            mtime: st.st_mtime as f64 + st.st_mtime_nsec as f64 / 1e9,
            link_target,
        }
    }

    /// The host owner for the sandbox ids `uid` and `gid`.
    fn owner(&self, uid: u32, gid: u32) -> Result<Owner, FilesError> {
        let host = |id| self.map.to_host(id).ok_or(FilesError::IdNotMapped { id, count: self.map.count });
        Ok(Owner { uid: Uid::from_raw(host(uid)?), gid: Gid::from_raw(host(gid)?) })
    }

    /// The id the sandbox sees for the host id `host`.
    fn sandbox_id(&self, host: u32) -> u32 {
        self.map.from_host(host).unwrap_or(NOBODY)
    }
}

/// How [`SandboxRoot::create_file`] finishes the new file.
struct NewFile {
    owner: Owner,
    mode: Mode,
    mtime: Option<Timestamps>,
    /// The exact length the data must have (an archive entry's size), if known.
    len: Option<u64>,
}

/// A temporary file in a directory, removed when dropped unless [`TempFile::keep`] was called
/// (after it was renamed to its final name).
struct TempFile<'a> {
    dir: BorrowedFd<'a>,
    name: String,
    armed: bool,
}

impl<'a> TempFile<'a> {
    /// Creates the file (mode 0600) and returns it opened for writing.
    fn create(dir: BorrowedFd<'a>, path: &SandboxPath) -> Result<(TempFile<'a>, File), FilesError> {
        loop {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!(".deltabox-tmp-{}-{n}", std::process::id());
            let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            match rfs::openat(dir, &name, flags, Mode::RUSR | Mode::WUSR) {
                Ok(fd) => return Ok((TempFile { dir, name, armed: true }, File::from(fd))),
                // Left over from a crashed daemon with the same pid: take the next number.
                Err(Errno::EXIST) => continue,
                Err(e) => return Err(fs_error("create temporary file", path, e)),
            }
        }
    }

    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for TempFile<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = rfs::unlinkat(self.dir, &self.name, AtFlags::empty()) {
                tracing::warn!(name = %self.name, error = %e, "cannot remove temporary file");
            }
        }
    }
}

/// The thread's previous filesystem ids and capabilities, restored on drop.
struct FsIds {
    uid: nix::unistd::Uid,
    gid: nix::unistd::Gid,
    caps: CapabilitySets,
}

impl FsIds {
    fn set(owner: Owner, caps: CapabilitySets) -> Result<FsIds, Errno> {
        let gid = nix::unistd::setfsgid(nix::unistd::Gid::from_raw(owner.gid.as_raw()));
        let uid = nix::unistd::setfsuid(nix::unistd::Uid::from_raw(owner.uid.as_raw()));
        let restore = FsIds { uid, gid, caps };
        // Leaving fsuid 0 cleared the file capabilities (CAP_DAC_OVERRIDE, CAP_CHOWN, ...) from the
        // effective set; they are still permitted, and the daemon needs them in the sandbox's
        // directories whatever their owner.
        rustix::thread::set_capabilities(None, caps)?;
        Ok(restore)
    }
}

impl Drop for FsIds {
    fn drop(&mut self) {
        nix::unistd::setfsuid(self.uid);
        nix::unistd::setfsgid(self.gid);
        if let Err(e) = rustix::thread::set_capabilities(None, self.caps) {
            tracing::error!(error = %e, "cannot restore the thread's capabilities");
        }
    }
}

/// Copies `data` into `file`, telling read errors (the caller's input) from write errors (the
/// sandbox's filesystem, e.g. ENOSPC).
fn copy_data(data: &mut dyn Read, file: &mut File, path: &SandboxPath) -> Result<u64, FilesError> {
    let mut buf = vec![0; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match data.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(FilesError::ReadInput { source }),
        };
        file.write_all(&buf[..n]).map_err(|e| io_error("write", path, e))?;
        total += n as u64;
    }
}

/// Owner first: `chown` clears setuid and setgid bits, which `mode` may set.
fn set_owner_and_mode(fd: BorrowedFd<'_>, owner: Owner, mode: Mode) -> Result<(), Errno> {
    rfs::fchown(fd, Some(owner.uid), Some(owner.gid))?;
    rfs::fchmod(fd, mode)
}

fn checked_mode(mode: u32) -> Result<Mode, FilesError> {
    match mode & !0o7777 {
        0 => Ok(Mode::from_raw_mode(mode)),
        _ => Err(FilesError::InvalidMode { mode }),
    }
}

fn is_pseudo_filesystem(fd: BorrowedFd<'_>) -> Result<bool, Errno> {
    Ok(PSEUDO_FILESYSTEMS.contains(&(rfs::fstatfs(fd)?.f_type as u32)))
}

/// Refuses `fd` if it is on a kernel pseudo-filesystem ([`PSEUDO_FILESYSTEMS`]).
fn ensure_ordinary_fs(fd: BorrowedFd<'_>, path: &SandboxPath) -> Result<(), FilesError> {
    match is_pseudo_filesystem(fd).map_err(|e| fs_error("statfs", path, e))? {
        true => Err(FilesError::PseudoFilesystem { path: path.to_string() }),
        false => Ok(()),
    }
}

/// Opens the inode behind the `O_PATH` descriptor `fd` for I/O. Going through `/proc/self/fd`
/// (our own descriptor, in the daemon's /proc) is the kernel's way to upgrade an `O_PATH`
/// descriptor; opening the path again could race with a rename inside the sandbox.
fn reopen(fd: BorrowedFd<'_>, flags: OFlags) -> Result<OwnedFd, Errno> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rfs::open(link, flags | OFlags::NOCTTY | OFlags::CLOEXEC, Mode::empty())
}

/// The subdirectory `name` of `dir`, readable, refusing to follow a symlink.
fn open_subdir(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    rfs::openat(dir, name, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
}

/// The names in the directory `dir` (a readable descriptor), without `.` and `..`, sorted.
fn dir_names(dir: BorrowedFd<'_>) -> Result<Vec<std::ffi::OsString>, Errno> {
    use std::os::unix::ffi::OsStrExt;
    let mut names = Vec::new();
    for entry in rfs::Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(&name).to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// The target of the symlink `name` in `dir` (`""` with an `O_PATH` descriptor of the link).
fn read_link(dir: BorrowedFd<'_>, name: &OsStr, path: &SandboxPath) -> Result<String, FilesError> {
    let target = rfs::readlinkat(dir, name, Vec::new()).map_err(|e| fs_error("readlink", path, e))?;
    Ok(String::from_utf8_lossy(target.as_bytes()).into_owned())
}

/// Removes everything in the directory `dir` (at `path`, `depth` levels below where the removal started)
/// without following symlinks.
fn remove_contents(dir: BorrowedFd<'_>, path: &SandboxPath, depth: usize) -> Result<(), FilesError> {
    check_depth(depth, path)?;
    for name in dir_names(dir).map_err(|e| fs_error("list", path, e))? {
        let child = path.child(&name);
        let st = match rfs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => continue,
            other => other.map_err(|e| fs_error("stat", &child, e))?,
        };
        let flags = match FileKind::of(&st) {
            FileKind::Dir => {
                let sub = open_subdir(dir, &name).map_err(|e| fs_error("remove", &child, e))?;
                remove_contents(sub.as_fd(), &child, depth + 1)?;
                AtFlags::REMOVEDIR
            }
            _ => AtFlags::empty(),
        };
        match rfs::unlinkat(dir, &name, flags) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(e) => return Err(fs_error("remove", &child, e)),
        }
    }
    Ok(())
}
