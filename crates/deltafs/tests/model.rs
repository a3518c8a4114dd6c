//! Property test: random operation sequences, including checkpoints, rollbacks, remounts of
//! earlier checkpoints (branches) and deletions of checkpoints (with a garbage collection), on a real
//! mount against an in-memory model of names, inodes (hard links), contents, allocated blocks,
//! permission bits and an xattr. At the end every checkpoint still kept is mounted and checked.
//! Mounts have a quota (never reached) whose usage is checked against the model after every step.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

use common::*;
use deltafs::{mount, DiskUsage, Mount, MountOptions, Quota, StackId};
use proptest::prelude::*;

const NAMES: [&str; 6] = ["a", "b", "c", "sub/a", "sub/b", "sub/deeper/c"];
const XATTR: &str = "user.tag";

#[derive(Debug, Clone)]
enum Op {
    Write { file: usize, offset: u64, len: usize, byte: u8 },
    Truncate { file: usize, size: u64 },
    Unlink { file: usize },
    Rename { from: usize, to: usize },
    Link { from: usize, to: usize },
    Chmod { file: usize, mode: u32 },
    Xattr { file: usize, value: Option<u8> },
    Checkpoint,
    Rollback { to: usize },
    Branch { from: usize },
    Delete { which: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..NAMES.len(), 0u64..700_000, 1usize..70_000, any::<u8>())
            .prop_map(|(file, offset, len, byte)| Op::Write { file, offset, len, byte }),
        // Small files live in pack slots.
        1 => (0..NAMES.len(), 0u64..4_000, 1usize..1_500, any::<u8>())
            .prop_map(|(file, offset, len, byte)| Op::Write { file, offset, len, byte }),
        1 => (0..NAMES.len(), 0u64..800_000).prop_map(|(file, size)| Op::Truncate { file, size }),
        1 => (0..NAMES.len(), 0u64..5_000).prop_map(|(file, size)| Op::Truncate { file, size }),
        1 => (0..NAMES.len()).prop_map(|file| Op::Unlink { file }),
        1 => (0..NAMES.len(), 0..NAMES.len()).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (0..NAMES.len(), 0..NAMES.len()).prop_map(|(from, to)| Op::Link { from, to }),
        1 => (0..NAMES.len(), 0o400u32..0o777).prop_map(|(file, mode)| Op::Chmod { file, mode }),
        1 => (0..NAMES.len(), proptest::option::of(any::<u8>())).prop_map(|(file, value)| Op::Xattr { file, value }),
        2 => Just(Op::Checkpoint),
        1 => (0usize..8).prop_map(|to| Op::Rollback { to }),
        1 => (0usize..8).prop_map(|from| Op::Branch { from }),
        1 => (0usize..8).prop_map(|which| Op::Delete { which }),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct Inode {
    data: Vec<u8>,
    /// 4 KiB blocks holding written data, as the store's filesystem (tmpfs) allocates them.
    blocks: BTreeSet<u64>,
    mode: u32,
    xattr: Option<u8>,
}

const BLOCK: u64 = 4096;

impl Inode {
    /// `st_blocks` and the data extents SEEK_DATA/SEEK_HOLE must report.
    fn allocation(&self) -> (u64, Vec<(i64, i64)>) {
        let mut extents: Vec<(i64, i64)> = Vec::new();
        for b in &self.blocks {
            let (start, end) = ((b * BLOCK) as i64, ((b + 1) * BLOCK).min(self.data.len() as u64) as i64);
            match extents.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => extents.push((start, end)),
            }
        }
        (self.blocks.len() as u64 * BLOCK / 512, extents)
    }
}

#[derive(Debug, Clone, Default)]
struct Model {
    names: BTreeMap<&'static str, usize>,
    inodes: BTreeMap<usize, Inode>,
    next: usize,
}

impl Model {
    fn inode(&mut self, name: &str) -> Option<&mut Inode> {
        let id = *self.names.get(name)?;
        self.inodes.get_mut(&id)
    }

    fn add(&mut self, name: &'static str, data: Vec<u8>) {
        self.next += 1;
        let blocks = (0..(data.len() as u64).div_ceil(BLOCK)).collect();
        self.inodes.insert(self.next, Inode { data, blocks, mode: 0o644, xattr: None });
        self.names.insert(name, self.next);
    }

    fn unlink(&mut self, name: &str) {
        if let Some(id) = self.names.remove(name) {
            if !self.names.values().any(|i| *i == id) {
                self.inodes.remove(&id);
            }
        }
    }
}

fn check(root: &Path, model: &Model) {
    let mut ino_of_model_inode = BTreeMap::new();
    for name in NAMES {
        let path = root.join(name);
        let md = std::fs::metadata(&path).ok();
        let Some(&id) = model.names.get(name) else {
            assert!(md.is_none(), "{name} should not exist");
            continue;
        };
        let md = md.unwrap_or_else(|| panic!("{name} should exist"));
        let inode = &model.inodes[&id];
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), inode.data.len(), "size of {name}");
        assert!(data == inode.data, "content of {name}");
        let layout = layout(&path);
        assert_eq!((layout.blocks, layout.data), inode.allocation(), "st_blocks and data extents of {name}");
        assert_eq!(md.permissions().mode() & 0o777, inode.mode, "mode of {name}");
        let mut buf = [0u8; 1];
        let got = rustix::fs::getxattr(&path, XATTR, &mut buf[..]).ok().map(|_| buf[0]);
        assert_eq!(got, inode.xattr, "xattr of {name}");
        let links = model.names.values().filter(|i| **i == id).count() as u64;
        assert_eq!(md.nlink(), links, "link count of {name}");
        let ino = *ino_of_model_inode.entry(id).or_insert(md.ino());
        assert_eq!(md.ino(), ino, "{name} shares the inode of its hard links");
    }
}

/// The directories of the tree (/, sub, sub/deeper): 4 KiB each.
const DIRS: u64 = 3;

/// What the quota must count for the model's tree: each inode's blocks, its xattr (`user.tag` and
/// one byte, charged as one 512-byte block) and the directories.
fn expected_usage(model: &Model) -> DiskUsage {
    let blocks: u64 = model.inodes.values().map(|i| i.allocation().0 + u64::from(i.xattr.is_some())).sum();
    DiskUsage { bytes: Some((blocks + DIRS * 8) * 512), inodes: model.inodes.len() as u64 + DIRS }
}

/// The usage the mount counts matches the model's. A removed file leaves when the kernel forgets
/// it, which can come a moment after the removal: a mismatch is given that moment.
fn check_usage(m: &Mount, model: &Model) {
    let want = expected_usage(model);
    let start = std::time::Instant::now();
    while m.usage() != want && start.elapsed() < std::time::Duration::from_secs(2) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(m.usage(), want, "usage counted by the quota");
}

fn with_quota(fx: &Fixture) -> MountOptions {
    MountOptions { quota: Quota { bytes: Some(1 << 40), inodes: Some(1 << 20) }, ..fx.options() }
}

fn run(ops: Vec<Op>) {
    // On tmpfs, whose st_blocks counts exactly the pages holding data (ext4 adds extent-tree blocks
    // when it writes back fragmented files).
    let fx = Fixture::new_in(Path::new("/dev/shm"));
    let base = fx.base(|d| {
        std::fs::create_dir_all(d.join("sub/deeper")).unwrap();
        std::fs::write(d.join("a"), vec![1u8; 300_000]).unwrap();
        std::fs::write(d.join("sub/b"), b"image file").unwrap();
        for f in ["a", "sub/b"] {
            std::fs::set_permissions(d.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    });
    let mut model = Model::default();
    model.add("a", vec![1u8; 300_000]);
    model.add("sub/b", b"image file".to_vec());
    let mut checkpoints: Vec<(StackId, Model)> = vec![(base, model.clone())];
    let mut generation = 0;
    let mut m: Mount = mount(&fx.store, base, &fx.mountpoint("g0"), &with_quota(&fx)).unwrap();
    for op in ops {
        let root = m.mountpoint().to_owned();
        let path = |i: usize| root.join(NAMES[i]);
        match op {
            Op::Write { file, offset, len, byte } => {
                let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path(file)).unwrap();
                f.set_permissions(std::fs::Permissions::from_mode(model.inode(NAMES[file]).map_or(0o644, |i| i.mode)))
                    .unwrap();
                f.write_all_at(&vec![byte; len], offset).unwrap();
                if model.inode(NAMES[file]).is_none() {
                    model.add(NAMES[file], Vec::new());
                }
                let inode = model.inode(NAMES[file]).unwrap();
                let end = offset as usize + len;
                if inode.data.len() < end {
                    inode.data.resize(end, 0);
                }
                inode.data[offset as usize..end].fill(byte);
                inode.blocks.extend(offset / BLOCK..(end as u64).div_ceil(BLOCK));
            }
            Op::Truncate { file, size } => {
                if let Some(inode) = model.inode(NAMES[file]) {
                    std::fs::OpenOptions::new().write(true).open(path(file)).unwrap().set_len(size).unwrap();
                    inode.data.resize(size as usize, 0);
                    inode.blocks.retain(|b| b * BLOCK < size);
                }
            }
            Op::Unlink { file } => {
                if model.names.contains_key(NAMES[file]) {
                    std::fs::remove_file(path(file)).unwrap();
                    model.unlink(NAMES[file]);
                }
            }
            Op::Rename { from, to } => {
                if let Some(&id) = model.names.get(NAMES[from]) {
                    std::fs::rename(path(from), path(to)).unwrap();
                    // Renaming a name onto another link of the same inode changes nothing.
                    if model.names.get(NAMES[to]) != Some(&id) {
                        model.unlink(NAMES[to]);
                        model.names.remove(NAMES[from]);
                        model.names.insert(NAMES[to], id);
                    }
                }
            }
            Op::Link { from, to } => {
                if let (Some(&id), false) = (model.names.get(NAMES[from]), model.names.contains_key(NAMES[to])) {
                    std::fs::hard_link(path(from), path(to)).unwrap();
                    model.names.insert(NAMES[to], id);
                }
            }
            Op::Chmod { file, mode } => {
                if let Some(inode) = model.inode(NAMES[file]) {
                    std::fs::set_permissions(path(file), std::fs::Permissions::from_mode(mode)).unwrap();
                    inode.mode = mode;
                }
            }
            Op::Xattr { file, value } => {
                if let Some(inode) = model.inode(NAMES[file]) {
                    match value {
                        Some(v) => {
                            rustix::fs::setxattr(path(file), XATTR, &[v], rustix::fs::XattrFlags::empty()).unwrap();
                        }
                        None => {
                            let _ = rustix::fs::removexattr(path(file), XATTR);
                        }
                    }
                    inode.xattr = value;
                }
            }
            Op::Checkpoint => checkpoints.push((m.checkpoint().unwrap(), model.clone())),
            Op::Rollback { to } => {
                let (cp, state) = checkpoints[to % checkpoints.len()].clone();
                m.rollback(cp).unwrap();
                model = state;
            }
            Op::Branch { from } => {
                let (cp, state) = checkpoints[from % checkpoints.len()].clone();
                generation += 1;
                let next = mount(&fx.store, cp, &fx.mountpoint(&format!("g{generation}")), &with_quota(&fx)).unwrap();
                m.unmount().unwrap();
                m = next;
                model = state;
            }
            Op::Delete { which } => {
                // The base stays: it stands for the image, which is never a deleted checkpoint.
                if checkpoints.len() > 1 {
                    checkpoints.remove(1 + which % (checkpoints.len() - 1));
                    let keep: Vec<StackId> = checkpoints.iter().map(|(cp, _)| *cp).collect();
                    fx.store.delete_unreferenced(&keep).unwrap();
                }
            }
        }
        check(m.mountpoint(), &model);
        check_usage(&m, &model);
    }
    m.unmount().unwrap();
    for (i, (cp, state)) in checkpoints.iter().enumerate() {
        let kept = mount(&fx.store, *cp, &fx.mountpoint(&format!("kept{i}")), &with_quota(&fx)).unwrap();
        check(kept.mountpoint(), state);
        check_usage(&kept, state);
        kept.unmount().unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        if fuse_available() {
            run(ops);
        }
    }
}
