//! Indexing image layers: directories extracted in kernel-overlayfs lower format (whiteout = char
//! device 0/0, opaque directory = xattr `trusted.overlay.opaque=y`) are merged once, bottom first,
//! into a [`Tree`] whose regular files point at the image files themselves (nothing is copied).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imbl::OrdMap;

use crate::node::{Attr, Content, Ino, Kind, Node, Source, Time, Tree, ROOT_INO};

/// Errors while indexing image layers.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image layer entry {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("too many image layers ({0}; at most 65535)")]
    TooManyLayers(usize),
}

const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_owned(), source }
}

/// Reads the extended attributes of `path` (without following a symlink), minus overlayfs' own.
pub fn read_xattrs(path: &Path) -> io::Result<OrdMap<Vec<u8>, Vec<u8>>> {
    let mut out = OrdMap::new();
    let len = match rustix::fs::llistxattr_query(path) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    if len == 0 {
        return Ok(out);
    }
    let mut names = vec![0u8; len];
    let n = rustix::fs::llistxattr(path, &mut names[..])?;
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        let name_os = std::ffi::OsStr::from_bytes(name);
        let vlen = rustix::fs::lgetxattr_query(path, name_os)?;
        let mut value = vec![0u8; vlen];
        let got = rustix::fs::lgetxattr(path, name_os, &mut value[..])?;
        value.truncate(got);
        out.insert(name.to_vec(), value);
    }
    Ok(out)
}

fn is_opaque(path: &Path) -> bool {
    let mut buf = [0u8; 4];
    matches!(rustix::fs::lgetxattr(path, OPAQUE_XATTR, &mut buf[..]), Ok(1) if buf[0] == b'y')
}

pub fn attr_from_metadata(md: &std::fs::Metadata) -> Attr {
    Attr {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        nlink: 1,
        rdev: md.rdev(),
        atime: Time { sec: md.atime(), nsec: md.atime_nsec() as u32 },
        mtime: Time { sec: md.mtime(), nsec: md.mtime_nsec() as u32 },
        ctime: Time { sec: md.ctime(), nsec: md.ctime_nsec() as u32 },
    }
}

struct Indexer<'a> {
    tree: Tree,
    layer: u16,
    root: &'a Path,
    /// (st_dev, st_ino) of multiply-linked files of the current layer → our inode.
    links: HashMap<(u64, u64), Ino>,
}

impl Indexer<'_> {
    fn dir_entries(&mut self, dir: Ino) -> &mut OrdMap<OsString, Ino> {
        match &mut self.tree.get_mut(dir).expect("merged directory exists").kind {
            Kind::Dir(e) => e,
            _ => unreachable!("merged directory is a directory"),
        }
    }

    fn walk(&mut self, dir: Ino, rel: &Path) -> Result<(), ImageError> {
        let abs = self.root.join(rel);
        let mut names: Vec<OsString> = std::fs::read_dir(&abs)
            .map_err(io_err(&abs))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err(&abs))?;
        names.sort();
        for name in names {
            let rel_child = rel.join(&name);
            let path = self.root.join(&rel_child);
            let md = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
            let ft = md.file_type();
            if ft.is_char_device() && md.rdev() == 0 {
                self.dir_entries(dir).remove(&name);
                continue;
            }
            let xattrs = read_xattrs(&path).map_err(io_err(&path))?;
            let attr = attr_from_metadata(&md);
            if ft.is_dir() {
                let existing = self.tree.lookup(dir, &name);
                let reuse = existing
                    .filter(|ino| self.tree.get(*ino).is_some_and(|n| n.is_dir()))
                    .filter(|_| !is_opaque(&path));
                let ino = match reuse {
                    Some(ino) => {
                        let node = self.tree.get_mut(ino).expect("exists");
                        node.attr = attr;
                        node.xattrs = xattrs;
                        ino
                    }
                    None => {
                        let ino = self.tree.alloc_ino();
                        self.tree.nodes.insert(ino, Arc::new(Node { attr, xattrs, kind: Kind::Dir(OrdMap::new()) }));
                        ino
                    }
                };
                self.dir_entries(dir).insert(name, ino);
                self.walk(ino, &rel_child)?;
                continue;
            }
            let key = (md.dev(), md.ino());
            if md.nlink() > 1 {
                if let Some(&ino) = self.links.get(&key) {
                    self.dir_entries(dir).insert(name, ino);
                    continue;
                }
            }
            let kind = if ft.is_file() {
                let rel_str: Arc<str> = rel_child.to_string_lossy().into();
                Kind::File(Content {
                    size: md.len(),
                    base: Some(Source::Image(self.layer, rel_str)),
                    base_len: u64::MAX,
                    chunks: OrdMap::new(),
                    // Taken once here: a getattr must not stat the image file.
                    blocks: md.blocks(),
                })
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path).map_err(io_err(&path))?;
                Kind::Symlink(target.as_os_str().as_bytes().to_vec())
            } else {
                Kind::Special
            };
            let ino = self.tree.alloc_ino();
            self.tree.nodes.insert(ino, Arc::new(Node { attr, xattrs, kind }));
            if md.nlink() > 1 {
                self.links.insert(key, ino);
            }
            self.dir_entries(dir).insert(name, ino);
        }
        Ok(())
    }
}

/// Merges image layers (bottom first) into one tree. Only relative paths of image files are kept,
/// so the layers must stay where they are (and unchanged) while any stack uses them.
pub fn index_layers(layers: &[PathBuf]) -> Result<Tree, ImageError> {
    if layers.len() > usize::from(u16::MAX) {
        return Err(ImageError::TooManyLayers(layers.len()));
    }
    let mut tree = Tree { nodes: OrdMap::new(), next_ino: ROOT_INO + 1 };
    let root_attr = Attr {
        mode: libc::S_IFDIR | 0o755,
        uid: 0,
        gid: 0,
        nlink: 2,
        rdev: 0,
        atime: Time::now(),
        mtime: Time::now(),
        ctime: Time::now(),
    };
    tree.nodes
        .insert(ROOT_INO, Arc::new(Node { attr: root_attr, xattrs: OrdMap::new(), kind: Kind::Dir(OrdMap::new()) }));
    for (i, layer) in layers.iter().enumerate() {
        let md = std::fs::metadata(layer).map_err(io_err(layer))?;
        let xattrs = read_xattrs(layer).map_err(io_err(layer))?;
        {
            let root = tree.get_mut(ROOT_INO).expect("root exists");
            root.attr = attr_from_metadata(&md);
            root.xattrs = xattrs;
        }
        let mut indexer = Indexer { tree, layer: i as u16, root: layer, links: HashMap::new() };
        indexer.walk(ROOT_INO, Path::new(""))?;
        tree = indexer.tree;
    }
    Ok(finish(tree))
}

/// Drops inodes no longer reachable (replaced or whited out by upper layers) and computes link
/// counts: files count their names, directories 2 + their subdirectories.
fn finish(tree: Tree) -> Tree {
    let mut links: HashMap<Ino, u32> = HashMap::new();
    let mut stack = vec![ROOT_INO];
    links.insert(ROOT_INO, 1);
    while let Some(dir) = stack.pop() {
        let entries = tree.get(dir).and_then(|n| n.entries()).cloned().unwrap_or_default();
        for (_, ino) in &entries {
            let count = links.entry(*ino).or_insert(0);
            *count += 1;
            if *count == 1 && tree.get(*ino).is_some_and(|n| n.is_dir()) {
                stack.push(*ino);
            }
        }
    }
    let mut out = Tree { nodes: OrdMap::new(), next_ino: tree.next_ino };
    for (ino, node) in &tree.nodes {
        if !links.contains_key(ino) {
            continue;
        }
        let mut node = (**node).clone();
        node.attr.nlink = match &node.kind {
            Kind::Dir(entries) => {
                2 + entries.values().filter(|c| tree.get(**c).is_some_and(|n| n.is_dir())).count() as u32
            }
            _ => links[ino],
        };
        out.nodes.insert(*ino, Arc::new(node));
    }
    out
}
