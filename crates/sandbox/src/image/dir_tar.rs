//! A deterministic tar stream of a directory tree, so a plain rootfs directory becomes a layer with a
//! diff_id like any other: names sorted bytewise, numeric owners only, no atime/ctime, hardlinks as
//! link entries, xattrs as `SCHILY.xattr.*` PAX records. The same tree always gives the same bytes.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

/// Writes the tar of `root` into `out`. The walk stays on `root`'s filesystem (a directory that is a
/// mount point is stored empty, as `tar --one-file-system` does) and skips sockets, which tar cannot
/// hold. `out` is dropped (closed) when this returns.
pub(crate) fn write_dir_tar<W: Write>(root: &Path, out: W) -> io::Result<()> {
    let root_meta = fs::symlink_metadata(root)?;
    let mut walker = DirTar { builder: tar::Builder::new(out), root_dev: root_meta.dev(), links: HashMap::new() };
    walker.add(root, PathBuf::from("./"), &root_meta)?;
    walker.builder.into_inner().map(drop)
}

struct DirTar<W: Write> {
    builder: tar::Builder<W>,
    root_dev: u64,
    /// First archive name of every multiply-linked inode, by (dev, ino).
    links: HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> DirTar<W> {
    fn add(&mut self, path: &Path, name: PathBuf, meta: &Metadata) -> io::Result<()> {
        let file_type = meta.file_type();
        if file_type.is_socket() {
            tracing::warn!(path = %path.display(), "skipping socket: tar cannot hold it");
            return Ok(());
        }
        self.append_xattrs(path)?;
        let mut header = Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_uid(meta.uid().into());
        header.set_gid(meta.gid().into());
        header.set_mtime(meta.mtime().max(0) as u64);
        header.set_size(0);

        if !file_type.is_dir() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                header.set_entry_type(EntryType::Link);
                let first = first.clone();
                return self.builder.append_link(&mut header, name, first);
            }
            self.links.insert(key, name.clone());
        }

        if file_type.is_dir() {
            header.set_entry_type(EntryType::Directory);
            self.builder.append_data(&mut header, &name, io::empty())?;
            if meta.dev() != self.root_dev {
                return Ok(());
            }
            let mut children: Vec<OsString> =
                fs::read_dir(path)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
            children.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for child in children {
                let child_path = path.join(&child);
                let child_meta = fs::symlink_metadata(&child_path)?;
                let mut child_name = if name == Path::new("./") { PathBuf::from(&child) } else { name.join(&child) };
                if child_meta.is_dir() {
                    // A trailing slash marks directories, as GNU tar writes them.
                    let mut bytes = child_name.into_os_string().into_vec();
                    bytes.push(b'/');
                    child_name = PathBuf::from(OsString::from_vec(bytes));
                }
                self.add(&child_path, child_name, &child_meta)?;
            }
            Ok(())
        } else if file_type.is_file() {
            header.set_entry_type(EntryType::Regular);
            header.set_size(meta.len());
            let file = File::open(path)?;
            // A file that shrinks while we read it would silently desynchronise the archive.
            let mut data = ExactReader { inner: file.take(meta.len()), left: meta.len(), path };
            self.builder.append_data(&mut header, &name, &mut data)
        } else if file_type.is_symlink() {
            header.set_entry_type(EntryType::Symlink);
            let target = fs::read_link(path)?;
            self.builder.append_link(&mut header, &name, target)
        } else {
            header.set_entry_type(if file_type.is_char_device() {
                EntryType::Char
            } else if file_type.is_block_device() {
                EntryType::Block
            } else {
                EntryType::Fifo
            });
            let rdev = meta.rdev();
            header.set_device_major(rustix::fs::major(rdev))?;
            header.set_device_minor(rustix::fs::minor(rdev))?;
            self.builder.append_data(&mut header, &name, io::empty())
        }
    }

    /// Emits a PAX header with the xattrs of `path` (sorted by name), if it has any.
    fn append_xattrs(&mut self, path: &Path) -> io::Result<()> {
        let names = read_sized(|| rustix::fs::llistxattr_query(path), |buf| rustix::fs::llistxattr(path, buf))?;
        let mut names: Vec<&[u8]> = names.split(|b| *b == 0).filter(|n| !n.is_empty()).collect();
        if names.is_empty() {
            return Ok(());
        }
        names.sort();
        let mut records = Vec::with_capacity(names.len());
        for name in names {
            let value =
                read_sized(|| rustix::fs::lgetxattr_query(path, name), |buf| rustix::fs::lgetxattr(path, name, buf))?;
            let key = format!("SCHILY.xattr.{}", String::from_utf8_lossy(name));
            records.push((key, value));
        }
        self.builder.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }
}

/// The value of a list/get xattr call: ask for the size, then read into a buffer of that size.
fn read_sized(
    query: impl Fn() -> rustix::io::Result<usize>,
    read: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> io::Result<Vec<u8>> {
    let len = query()?;
    let mut buf = vec![0; len];
    if len > 0 {
        let n = read(&mut buf)?;
        buf.truncate(n);
    }
    Ok(buf)
}

/// Reads exactly `left` bytes or fails.
struct ExactReader<'p, R> {
    inner: R,
    left: u64,
    path: &'p Path,
}

impl<R: Read> Read for ExactReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while it was read", self.path.display()),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}
