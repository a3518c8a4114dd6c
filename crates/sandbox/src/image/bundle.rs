//! Read access to the files of an image bundle (an OCI image layout or a `docker save` tree), stored
//! either as a directory or as an uncompressed tar archive, by slash-separated names relative to the
//! bundle's root.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, Mode, OFlags, ResolveFlags};

use super::ImageError;

/// The largest JSON document (index, manifest, config) we read into memory.
const MAX_JSON: u64 = 16 << 20;
/// Symlink hops followed inside an archive before giving up (old `docker save` links duplicate layers).
const MAX_LINK_HOPS: usize = 16;

pub(crate) trait Bundle {
    /// Opens the file `name`; returns a reader and the file's size.
    fn open(&self, name: &str) -> Result<(Box<dyn Read + '_>, u64), ImageError>;
    fn contains(&self, name: &str) -> bool;
    /// The bundle's path, for messages.
    fn path(&self) -> &Path;

    /// Reads the small file `name` whole.
    fn read_small(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let (mut reader, size) = self.open(name)?;
        if size > MAX_JSON {
            return Err(ImageError::BadImage {
                source_path: self.path().to_owned(),
                message: format!("{name} is {size} bytes, more than the {MAX_JSON} allowed"),
            });
        }
        let mut buf = Vec::with_capacity(size as usize);
        reader.read_to_end(&mut buf).map_err(|source| ImageError::Read { what: self.describe(name), source })?;
        Ok(buf)
    }

    fn describe(&self, name: &str) -> String {
        format!("{} in {}", name, self.path().display())
    }

    fn missing(&self, name: &str) -> ImageError {
        ImageError::BadImage { source_path: self.path().to_owned(), message: format!("{name} is missing") }
    }
}

/// A bundle stored as a directory. Names resolve beneath it (symlinks inside it are followed, never
/// out of it).
pub(crate) struct DirBundle {
    root: OwnedFd,
    path: PathBuf,
}

impl DirBundle {
    pub(crate) fn open_dir(path: &Path) -> Result<Self, ImageError> {
        let root = rfs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| ImageError::Read { what: path.display().to_string(), source: e.into() })?;
        Ok(DirBundle { root, path: path.to_owned() })
    }

    fn open_file(&self, name: &str) -> rustix::io::Result<File> {
        let fd = rfs::openat2(
            &self.root,
            name,
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )?;
        Ok(File::from(fd))
    }
}

impl Bundle for DirBundle {
    fn open(&self, name: &str) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        let file = self.open_file(name).map_err(|e| match e {
            rustix::io::Errno::NOENT => self.missing(name),
            e => ImageError::Read { what: self.describe(name), source: e.into() },
        })?;
        let size = file.metadata().map_err(|source| ImageError::Read { what: self.describe(name), source })?.len();
        Ok((Box::new(file), size))
    }

    fn contains(&self, name: &str) -> bool {
        self.open_file(name).is_ok()
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// A bundle stored as an uncompressed tar file, read in place through an index of its entries.
pub(crate) struct TarBundle {
    file: File,
    path: PathBuf,
    items: HashMap<String, TarItem>,
}

enum TarItem {
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink or hardlink, with its target resolved to an archive name.
    Link(String),
    Other,
}

impl TarBundle {
    /// Indexes the tar file `file` (a pass over its headers, skipping contents by seeking).
    pub(crate) fn index(file: File, path: &Path) -> Result<Self, ImageError> {
        let read_err = |source: io::Error| ImageError::Read { what: path.display().to_string(), source };
        let mut items = HashMap::new();
        let mut entries = 0usize;
        {
            let mut archive = tar::Archive::new(&file);
            for entry in archive.entries_with_seek().map_err(read_err)? {
                let entry = entry.map_err(read_err)?;
                entries += 1;
                // Image bundles are written by tools with ASCII names; others cannot be referenced.
                let Ok(name) = std::str::from_utf8(&entry.path_bytes()).map(normalize) else {
                    continue;
                };
                let Some(name) = name else { continue };
                let kind = entry.header().entry_type();
                let item = if kind.is_file() {
                    TarItem::File { offset: entry.raw_file_position(), size: entry.size() }
                } else if kind.is_symlink() || kind.is_hard_link() {
                    let target = entry.link_name_bytes().unwrap_or_default();
                    let target = String::from_utf8_lossy(&target);
                    // Symlink targets are relative to the link's directory, hardlink targets to the root.
                    let base = match name.rsplit_once('/') {
                        Some((dir, _)) if kind.is_symlink() && !target.starts_with('/') => dir,
                        _ => "",
                    };
                    match normalize(&format!("{base}/{target}")) {
                        Some(target) => TarItem::Link(target),
                        None => TarItem::Other,
                    }
                } else {
                    TarItem::Other
                };
                items.insert(name, item);
            }
        }
        if entries == 0 {
            return Err(ImageError::BadImage {
                source_path: path.to_owned(),
                message: "an empty tar archive (or not a tar archive at all)".to_owned(),
            });
        }
        Ok(TarBundle { file, path: path.to_owned(), items })
    }

    fn lookup(&self, name: &str) -> Option<(u64, u64)> {
        let mut name = normalize(name)?;
        for _ in 0..MAX_LINK_HOPS {
            match self.items.get(&name)? {
                TarItem::File { offset, size } => return Some((*offset, *size)),
                TarItem::Link(target) => name = target.clone(),
                TarItem::Other => return None,
            }
        }
        None
    }

    /// Gives back the archive file (for a plain rootfs tarball, which is streamed, not indexed).
    pub(crate) fn into_file(self) -> File {
        self.file
    }
}

impl Bundle for TarBundle {
    fn open(&self, name: &str) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        let (offset, size) = self.lookup(name).ok_or_else(|| self.missing(name))?;
        Ok((Box::new(SliceReader { file: &self.file, pos: offset, end: offset + size }), size))
    }

    fn contains(&self, name: &str) -> bool {
        self.lookup(name).is_some()
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads `pos..end` of a file with positional reads (the file's offset is never moved).
struct SliceReader<'f> {
    file: &'f File,
    pos: u64,
    end: u64,
}

impl Read for SliceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// The canonical form of an archive name: no leading `/` or `./`, no empty or `.` components, `..`
/// applied. `None` when `..` climbs above the root.
fn normalize(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn normalizes_archive_names() {
        assert_eq!(normalize("./blobs//sha256/x").as_deref(), Some("blobs/sha256/x"));
        assert_eq!(normalize("/a/b/../c").as_deref(), Some("a/c"));
        assert_eq!(normalize("a/../../c"), None);
    }
}
