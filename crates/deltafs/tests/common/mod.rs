//! Shared fixtures for DeltaFS integration tests: a store, a base directory, mounts.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use deltafs::{mount, Mount, MountOptions, StackId, Store};

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub store: Store,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

/// Tests with mounts run one at a time: a child another test thread forks holds every open file
/// of this process until it execs (files on a mount too), and an unmount meanwhile fails (EBUSY).
static MOUNT_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether this machine can mount FUSE (root + /dev/fuse); prints why not.
pub fn fuse_available() -> bool {
    if !nix::unistd::geteuid().is_root() {
        testing::skip("DeltaFS mount tests need root");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        testing::skip("/dev/fuse is missing");
        return false;
    }
    true
}

impl Fixture {
    pub fn new() -> Fixture {
        Fixture::with_dir(tempfile::tempdir().expect("tempdir"))
    }

    /// A fixture whose store, image layers and mount points live in a new directory under `parent`.
    pub fn new_in(parent: &Path) -> Fixture {
        Fixture::with_dir(tempfile::tempdir_in(parent).expect("tempdir"))
    }

    fn with_dir(dir: tempfile::TempDir) -> Fixture {
        let store = Store::open(&dir.path().join("store")).expect("open store");
        std::fs::write(dir.path().join("procs"), format!("{}\n", std::process::id())).expect("procs file");
        // A test that failed while holding the lock leaves nothing the next one depends on.
        let _one_at_a_time = MOUNT_TESTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Fixture { dir, store, _one_at_a_time }
    }

    /// Options as the sandbox engine mounts: the processes using the mount are listed (this test
    /// process, as a cgroup.procs file would list it), so opens need no FUSE round trip.
    pub fn options(&self) -> MountOptions {
        MountOptions { processes: Some(self.dir.path().join("procs")), ..MountOptions::default() }
    }

    /// An image layer directory under the fixture, created empty.
    pub fn layer(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("images").join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn mountpoint(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join("mnt").join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn mount(&self, stack: StackId, name: &str) -> Mount {
        mount(&self.store, stack, &self.mountpoint(name), &self.options()).expect("mount")
    }

    /// A mount without a process list: every open reaches the server, which tracks them.
    pub fn mount_tracking_opens(&self, stack: StackId, name: &str) -> Mount {
        mount(&self.store, stack, &self.mountpoint(name), &MountOptions::default()).expect("mount")
    }

    /// A base stack from one image layer filled by `fill`.
    pub fn base(&self, fill: impl FnOnce(&Path)) -> StackId {
        let layer = self.layer("base");
        fill(&layer);
        self.store.base_stack(&[layer]).expect("base stack")
    }
}

/// A fixture with a base stack filled by `fill`, mounted at `m`; None (after printing why) when
/// FUSE mounts are not possible here.
pub fn mounted(fill: impl FnOnce(&Path)) -> Option<(Fixture, StackId, Mount, PathBuf)> {
    mounted_with(Fixture::mount, fill)
}

/// How a test mounts: [`Fixture::mount`] or [`Fixture::mount_tracking_opens`].
pub type MountFn = fn(&Fixture, StackId, &str) -> Mount;

/// Both ways of mounting, for tests of behaviour that depends on how opens are seen.
pub const BOTH_MODES: [MountFn; 2] = [Fixture::mount, Fixture::mount_tracking_opens];

/// As [`mounted`], mounting with `how`.
pub fn mounted_with(how: MountFn, fill: impl FnOnce(&Path)) -> Option<(Fixture, StackId, Mount, PathBuf)> {
    if !fuse_available() {
        return None;
    }
    let fx = Fixture::new();
    let base = fx.base(fill);
    let m = how(&fx, base, "m");
    let root = m.mountpoint().to_owned();
    Some((fx, base, m, root))
}

/// Everything observable about a file, for whole-tree comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub ino: u64,
    pub size: u64,
    pub content: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub mtime: (i64, i64),
}

pub fn xattrs_of(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(path, &mut names[..]).unwrap_or(0);
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let mut v = vec![0u8; 65536];
        let os = std::ffi::OsStr::from_bytes(name);
        let got = rustix::fs::lgetxattr(path, os, &mut v[..]).unwrap();
        v.truncate(got);
        out.insert(name.to_vec(), v);
    }
    out
}

/// Walks `root` and records every entry (contents of regular files, targets of symlinks).
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let rel_child = rel.join(e.file_name());
            let path = root.join(&rel_child);
            let md = std::fs::symlink_metadata(&path).unwrap();
            let content = if md.is_file() {
                std::fs::read(&path).unwrap()
            } else if md.file_type().is_symlink() {
                std::fs::read_link(&path).unwrap().as_os_str().as_bytes().to_vec()
            } else {
                Vec::new()
            };
            if md.is_dir() {
                stack.push(rel_child.clone());
            }
            out.insert(
                rel_child,
                Entry {
                    mode: md.mode(),
                    uid: md.uid(),
                    gid: md.gid(),
                    nlink: md.nlink(),
                    ino: md.ino(),
                    size: if md.is_dir() { 0 } else { md.size() },
                    content,
                    xattrs: xattrs_of(&path),
                    mtime: if md.is_dir() { (0, 0) } else { (md.mtime(), md.mtime_nsec()) },
                },
            );
        }
    }
    out
}

/// What `du`, `cp --sparse` and `tar -S` see of a file: its size, `st_blocks`, its data extents
/// (SEEK_DATA/SEEK_HOLE), and the answers to both seeks at the edges of every extent and of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub blocks: u64,
    pub data: Vec<(i64, i64)>,
    pub seeks: Vec<Seeks>,
}

/// An offset and what SEEK_DATA and SEEK_HOLE answer from it.
pub type Seeks = (i64, nix::Result<i64>, nix::Result<i64>);

pub fn layout(path: &Path) -> Layout {
    use nix::unistd::{lseek, Whence};
    let f = std::fs::File::open(path).unwrap();
    let md = f.metadata().unwrap();
    let mut data = Vec::new();
    let mut pos = 0;
    loop {
        match lseek(&f, pos, Whence::SeekData) {
            Ok(start) => {
                let end = lseek(&f, start, Whence::SeekHole).unwrap();
                assert!(
                    start >= pos && end > start,
                    "SEEK_DATA {pos} → {start}, SEEK_HOLE → {end}: {}",
                    path.display()
                );
                data.push((start, end));
                pos = end;
            }
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA {pos} on {}: {e}", path.display()),
        }
    }
    let size = md.len() as i64;
    let mut probes = vec![-1, 0, 1, size - 1, size, size + 1, size + 4096];
    for (start, end) in &data {
        probes.extend([start - 1, *start, start + 1, end - 1, *end, end + 1]);
    }
    probes.sort_unstable();
    probes.dedup();
    let seeks =
        probes.into_iter().map(|p| (p, lseek(&f, p, Whence::SeekData), lseek(&f, p, Whence::SeekHole))).collect();
    Layout { size: md.len(), blocks: md.blocks(), data, seeks }
}
