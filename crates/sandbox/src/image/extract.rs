//! Extraction of one layer tar into a directory in kernel-overlayfs lower-layer format.
//!
//! The tar is hostile until proven otherwise: every entry is created relative to a directory file
//! descriptor that was opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | ...)`, so no entry
//! name (absolute, with `..`, or through a symlink the same tar created) and no hardlink target can
//! reach outside the layer directory. The `tar` crate only parses headers here; we never call its
//! `unpack`, which follows symlinks of the destination.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps};
use rustix::io::Errno;
use tar::EntryType;

use super::ImageError;

/// Opening flags for every directory we resolve: no symlink, no magic link, no mount crossing, and
/// nothing above the layer root.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);
/// For a single name relative to a verified directory.
const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);
/// For openat2 with [`RESOLVE`], which refuses symlinks in every component with ELOOP (O_NOFOLLOW
/// would turn a symlink in the last one into ENOTDIR, hiding that the entry was unsafe).
const RESOLVE_DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC);

/// `.wh.NAME` hides NAME; `.wh..wh..opq` marks its directory opaque; other `.wh..wh.` names are aufs
/// bookkeeping and skipped.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".opq";
const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Extracts the tar stream `tar` into the existing empty directory `dest`. Directories that a later
/// entry replaces are moved into `trash` (an empty directory on the same filesystem, which the caller
/// removes). Returns after the tar's end-of-archive marker; the caller drains the rest of the stream.
pub(crate) fn extract_layer<R: Read>(tar: R, dest: &Path, trash: &Path) -> Result<(), ImageError> {
    let open = |path: &Path| {
        rfs::open(path, DIR_FLAGS, Mode::empty())
            .map_err(|e| ImageError::Io { what: format!("opening {}", path.display()), source: e.into() })
    };
    let mut extractor = Extractor {
        root: open(dest)?,
        trash: open(trash)?,
        trashed: 0,
        dir_times: Vec::new(),
        buf: vec![0; 256 * 1024],
    };
    let mut archive = tar::Archive::new(tar);
    let entries = archive.entries().map_err(ImageError::tar)?;
    for entry in entries {
        let mut entry = entry.map_err(ImageError::tar)?;
        extractor.entry(&mut entry)?;
    }
    extractor.restore_dir_times();
    Ok(())
}

/// What a tar header says about an entry's inode.
struct Meta {
    uid: u32,
    gid: u32,
    mode: Mode,
    mtime: Timespec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Meta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>, shown: &str) -> Result<Meta, ImageError> {
        let header = entry.header();
        let bad = |source: io::Error| ImageError::Extract { entry: shown.to_owned(), source };
        let id = |value: u64| u32::try_from(value).map_err(|_| bad(io::Error::other("uid/gid does not fit 32 bits")));
        // The tar crate already applied PAX uid/gid overrides to the header.
        let uid = id(header.uid().map_err(bad)?)?;
        let gid = id(header.gid().map_err(bad)?)?;
        let mode = Mode::from_bits_truncate(header.mode().map_err(bad)? & 0o7777);
        let mut mtime =
            Timespec { tv_sec: i64::try_from(header.mtime().map_err(bad)?).unwrap_or(i64::MAX), tv_nsec: 0 };
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(bad)? {
            for ext in pax {
                let ext = ext.map_err(bad)?;
                let key = ext.key_bytes();
                if key == b"mtime" {
                    if let Some(t) = parse_pax_time(ext.value_bytes()) {
                        mtime = t;
                    }
                } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    // An image must not forge overlayfs' own metadata (redirects, origins, metacopy)
                    // in a lower layer; opaque directories come only from `.wh..wh..opq`.
                    if name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.") {
                        tracing::debug!(entry = shown, "dropping overlay xattr from layer");
                        continue;
                    }
                    let name = CString::new(name).map_err(|e| bad(io::Error::other(e)))?;
                    xattrs.push((name, ext.value_bytes().to_vec()));
                }
            }
        }
        Ok(Meta { uid, gid, mode, mtime, xattrs })
    }

    fn times(&self) -> Timestamps {
        Timestamps { last_access: self.mtime, last_modification: self.mtime }
    }
}

/// A PAX time: decimal seconds with an optional fraction ("1700000000.5"). Negative times are
/// ignored (the header's value is kept).
fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let value = std::str::from_utf8(value).ok()?;
    let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
    let tv_sec = secs.parse::<i64>().ok().filter(|s| *s >= 0)?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let tv_nsec = if digits.is_empty() { 0 } else { digits.parse::<i64>().ok()? * 10i64.pow(9 - digits.len() as u32) };
    Some(Timespec { tv_sec, tv_nsec })
}

/// Splits an entry name into its components: leading `/`, empty and `.` components are dropped (an
/// absolute name lands inside the layer, as with docker and GNU tar); `..` is refused.
fn components(raw: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    let parts: Vec<&[u8]> = raw.split(|b| *b == b'/').filter(|c| !c.is_empty() && *c != b".").collect();
    if parts.iter().any(|c| *c == b"..") {
        return Err("its path contains `..`");
    }
    Ok(parts)
}

struct Extractor {
    root: OwnedFd,
    trash: OwnedFd,
    trashed: u64,
    /// Directory mtimes, applied after all entries (creating a child changes its parent's mtime).
    dir_times: Vec<(Vec<u8>, Timespec)>,
    buf: Vec<u8>,
}

impl Extractor {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let unsafe_entry = |reason: &'static str| ImageError::UnsafeEntry { entry: shown.clone(), reason };
        let io_err = |e: Errno| entry_error(&shown, e);

        let comps = components(&raw).map_err(unsafe_entry)?;
        let meta = Meta::read(entry, &shown)?;
        let Some((name, parent)) = comps.split_last() else {
            if kind != EntryType::Directory {
                return Err(unsafe_entry("the layer root can only be a directory"));
            }
            set_meta(self.root.as_fd(), &meta).map_err(io_err)?;
            self.dir_times.push((Vec::new(), meta.mtime));
            return Ok(());
        };
        let dir = self.open_dir(parent, true).map_err(io_err)?;

        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(&dir, hidden).map_err(|e| match e {
                WhiteoutError::Name => unsafe_entry("it whites out an invalid name"),
                WhiteoutError::Sys(e) => io_err(e),
            });
        }
        let name = OsStr::from_bytes(name);
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.clear_slot(&dir, name, false).map_err(io_err)?;
                let fd = rfs::openat(
                    &dir,
                    name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io_err)?;
                let mut file = File::from(fd);
                copy(entry, &mut file, &mut self.buf)
                    .map_err(|source| ImageError::Extract { entry: shown.clone(), source })?;
                set_meta(file.as_fd(), &meta).map_err(io_err)?;
                rfs::futimens(&file, &meta.times()).map_err(io_err)
            }
            EntryType::Directory => {
                if !self.clear_slot(&dir, name, true).map_err(io_err)? {
                    rfs::mkdirat(&dir, name, Mode::from_raw_mode(0o700)).map_err(io_err)?;
                }
                let fd = rfs::openat(&dir, name, DIR_FLAGS, Mode::empty()).map_err(io_err)?;
                set_meta(fd.as_fd(), &meta).map_err(io_err)?;
                self.dir_times.push((comps.join(&b'/'), meta.mtime));
                Ok(())
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| unsafe_entry("a symlink without a target"))?;
                self.clear_slot(&dir, name, false).map_err(io_err)?;
                rfs::symlinkat(OsStr::from_bytes(&target), &dir, name).map_err(io_err)?;
                set_meta_at(&dir, name, &meta, false).map_err(io_err)
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| unsafe_entry("a hardlink without a target"))?;
                let target = components(&target).map_err(unsafe_entry)?;
                let Some((target_name, target_parent)) = target.split_last() else {
                    return Err(unsafe_entry("a hardlink to the layer root"));
                };
                let target_dir = self.open_dir(target_parent, false).map_err(io_err)?;
                self.clear_slot(&dir, name, false).map_err(io_err)?;
                // Flags 0: a hardlink to a symlink links the symlink itself, never its target.
                rfs::linkat(&target_dir, OsStr::from_bytes(target_name), &dir, name, AtFlags::empty()).map_err(io_err)
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let header = entry.header();
                let number = |n: io::Result<Option<u32>>| {
                    n.map(Option::unwrap_or_default)
                        .map_err(|source| ImageError::Extract { entry: shown.clone(), source })
                };
                let dev = rfs::makedev(number(header.device_major())?, number(header.device_minor())?);
                let file_type = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                self.clear_slot(&dir, name, false).map_err(io_err)?;
                rfs::mknodat(&dir, name, file_type, Mode::empty(), dev).map_err(io_err)?;
                set_meta_at(&dir, name, &meta, true).map_err(io_err)
            }
            other => Err(ImageError::UnsupportedEntry { entry: shown, kind: format!("{other:?}") }),
        }
    }

    /// `.wh.NAME` becomes a char device 0/0 named NAME; `.wh..wh..opq` marks `dir` opaque.
    fn whiteout(&mut self, dir: &OwnedFd, hidden: &[u8]) -> Result<(), WhiteoutError> {
        if let Some(meta) = hidden.strip_prefix(WHITEOUT_PREFIX) {
            if meta == OPAQUE {
                rfs::fsetxattr(dir, OVERLAY_OPAQUE_XATTR, b"y", rfs::XattrFlags::empty())?;
            }
            return Ok(());
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(WhiteoutError::Name);
        }
        let hidden = OsStr::from_bytes(hidden);
        self.clear_slot(dir, hidden, false)?;
        rfs::mknodat(dir, hidden, FileType::CharacterDevice, Mode::empty(), rfs::makedev(0, 0))?;
        Ok(())
    }

    /// Opens the directory at `comps` beneath the root; with `create`, missing directories are made
    /// (tars need not list parents), mode 0755 and owned by root as docker does.
    fn open_dir(&self, comps: &[&[u8]], create: bool) -> Result<OwnedFd, Errno> {
        let mut fd = rfs::openat(&self.root, ".", DIR_FLAGS, Mode::empty())?;
        if comps.is_empty() {
            return Ok(fd);
        }
        match rfs::openat2(&fd, comps.join(&b'/'), RESOLVE_DIR_FLAGS, Mode::empty(), RESOLVE) {
            Err(Errno::NOENT) if create => {}
            other => return other,
        }
        for comp in comps {
            let comp = OsStr::from_bytes(comp);
            fd = match rfs::openat2(&fd, comp, RESOLVE_DIR_FLAGS, Mode::empty(), RESOLVE) {
                Err(Errno::NOENT) => {
                    match rfs::mkdirat(&fd, comp, Mode::from_raw_mode(0o700)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e),
                    }
                    let new = rfs::openat2(&fd, comp, RESOLVE_DIR_FLAGS, Mode::empty(), RESOLVE)?;
                    rfs::fchmod(&new, Mode::from_raw_mode(0o755))?;
                    new
                }
                other => other?,
            };
        }
        Ok(fd)
    }

    /// Makes room for a new entry `name` in `dir`, as a later tar entry replaces an earlier one.
    /// Returns true when `name` is a directory and `keep_dir` asked to keep it (dir over dir merges).
    fn clear_slot(&mut self, dir: &OwnedFd, name: &OsStr, keep_dir: bool) -> Result<bool, Errno> {
        let stat = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => return Ok(false),
            other => other?,
        };
        if FileType::from_raw_mode(stat.st_mode) != FileType::Directory {
            rfs::unlinkat(dir, name, AtFlags::empty())?;
            return Ok(false);
        }
        if keep_dir {
            return Ok(true);
        }
        self.trashed += 1;
        rfs::renameat(dir, name, &self.trash, self.trashed.to_string())?;
        Ok(false)
    }

    /// Sets the recorded directory mtimes. A directory replaced by a later entry is skipped.
    fn restore_dir_times(&self) {
        for (path, mtime) in &self.dir_times {
            let comps: Vec<&[u8]> = path.split(|b| *b == b'/').filter(|c| !c.is_empty()).collect();
            let times = Timestamps { last_access: *mtime, last_modification: *mtime };
            if let Err(e) = self.open_dir(&comps, false).and_then(|fd| rfs::futimens(&fd, &times)) {
                tracing::debug!(path = %String::from_utf8_lossy(path), error = %e, "directory mtime not restored");
            }
        }
    }
}

enum WhiteoutError {
    Name,
    Sys(Errno),
}

impl From<Errno> for WhiteoutError {
    fn from(e: Errno) -> Self {
        WhiteoutError::Sys(e)
    }
}

fn entry_error(shown: &str, e: Errno) -> ImageError {
    match e {
        // RESOLVE_NO_SYMLINKS / RESOLVE_BENEATH refusals.
        Errno::LOOP | Errno::XDEV => ImageError::UnsafeEntry {
            entry: shown.to_owned(),
            reason: "its path goes through a symlink or leaves the layer",
        },
        _ => ImageError::Extract { entry: shown.to_owned(), source: e.into() },
    }
}

/// Owner, then mode (chown clears setuid/setgid), then xattrs (chown and writes clear
/// security.capability).
fn set_meta(fd: BorrowedFd<'_>, meta: &Meta) -> Result<(), Errno> {
    rfs::fchown(fd, Some(rfs::Uid::from_raw(meta.uid)), Some(rfs::Gid::from_raw(meta.gid)))?;
    rfs::fchmod(fd, meta.mode)?;
    for (name, value) in &meta.xattrs {
        rfs::fsetxattr(fd, name.as_c_str(), value, rfs::XattrFlags::empty())?;
    }
    Ok(())
}

/// Metadata of a symlink or device node `name` in `dir`, which cannot be opened for writing.
fn set_meta_at(dir: &OwnedFd, name: &OsStr, meta: &Meta, chmod: bool) -> Result<(), Errno> {
    rfs::chownat(
        dir,
        name,
        Some(rfs::Uid::from_raw(meta.uid)),
        Some(rfs::Gid::from_raw(meta.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if chmod {
        // Not a symlink (we just made the node), so following is moot.
        rfs::chmodat(dir, name, meta.mode, AtFlags::empty())?;
    }
    if !meta.xattrs.is_empty() {
        // No l*xattr call takes a directory fd; the fd's magic link pins the verified parent and the
        // last component is not followed.
        let mut path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        path.push(name);
        for (xname, value) in &meta.xattrs {
            rfs::lsetxattr(&path, xname.as_c_str(), value, rfs::XattrFlags::empty())?;
        }
    }
    rfs::utimensat(dir, name, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
}

fn copy(from: &mut impl Read, to: &mut File, buf: &mut [u8]) -> io::Result<()> {
    loop {
        match from.read(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_strip_root_and_dots_and_refuse_dotdot() {
        assert_eq!(components(b"/etc//./passwd").unwrap(), vec![&b"etc"[..], b"passwd"]);
        assert!(components(b"./").unwrap().is_empty());
        components(b"a/../../x").unwrap_err();
        components(b"..").unwrap_err();
    }

    #[test]
    fn pax_times() {
        assert_eq!(parse_pax_time(b"1700000000.25"), Some(Timespec { tv_sec: 1_700_000_000, tv_nsec: 250_000_000 }));
        assert_eq!(parse_pax_time(b"12"), Some(Timespec { tv_sec: 12, tv_nsec: 0 }));
        assert_eq!(parse_pax_time(b"-5.1"), None);
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
