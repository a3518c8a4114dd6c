//! A mount with a quota: `df` shows its size, writes and creations past it fail with ENOSPC while
//! overwrites and deletions work, and a rollback brings back its checkpoint's usage.
mod common;

use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{fuse_available, Fixture};
use deltafs::{mount, Mount, MountOptions, Quota, StackId};

const MIB: u64 = 1 << 20;

fn mount_with(fx: &Fixture, stack: StackId, quota: Quota) -> Mount {
    mount(&fx.store, stack, &fx.mountpoint("m"), &MountOptions { quota, ..fx.options() }).expect("mount")
}

/// (size, used, available) bytes and (inodes, free inodes) as `df` shows them.
fn df(root: &Path) -> ((u64, u64, u64), (u64, u64)) {
    let s = rustix::fs::statvfs(root).unwrap();
    let unit = s.f_frsize;
    ((s.f_blocks * unit, (s.f_blocks - s.f_bfree) * unit, s.f_bavail * unit), (s.f_files, s.f_ffree))
}

/// Appends 4 KiB blocks to `path` until a write fails; returns the bytes written and the error.
/// Gives up after 64 MiB (past every quota here), so a broken quota does not fill the disk.
fn fill(path: &Path) -> (u64, std::io::Error) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    let block = vec![0x5au8; 4096];
    let mut written = 0;
    loop {
        assert!(written < 64 * MIB, "no ENOSPC after {written} bytes");
        match f.write_all(&block) {
            Ok(()) => written += block.len() as u64,
            Err(e) => return (written, e),
        }
    }
}

fn is_enospc(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

#[test]
fn a_byte_quota_limits_writes_and_follows_rollbacks() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new();
    let base = fx.base(|d| std::fs::write(d.join("image-file"), vec![7u8; 100 << 10]).unwrap());
    let m = mount_with(&fx, base, Quota { bytes: Some(8 * MIB), inodes: None });
    let root = m.mountpoint().to_owned();
    let ((size, used, avail), _) = df(&root);
    assert_eq!(size, 8 * MIB);
    assert!((100 << 10..200 << 10).contains(&used), "the image's 100 KiB file and its directory count: {used}");
    assert_eq!(avail, size - used);

    let (written, err) = fill(&root.join("big"));
    assert!(is_enospc(&err), "{err}");
    assert!((7 * MIB..8 * MIB).contains(&written), "{written} bytes written before ENOSPC");
    let ((_, used, avail), _) = df(&root);
    assert!(avail < 4096 && used > 8 * MIB - 4096, "df after filling: used {used}, available {avail}");
    // Bytes the file already has can be rewritten; new ones cannot be allocated.
    let big = std::fs::OpenOptions::new().write(true).open(root.join("big")).unwrap();
    big.write_all_at(&vec![1u8; MIB as usize], 0).expect("an overwrite needs no new block");
    let err = std::fs::write(root.join("small"), b"x").unwrap_err();
    assert!(is_enospc(&err), "{err}");
    // Holes take no space.
    let sparse = std::fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(1 << 30).expect("a sparse file allocates nothing");
    let err = sparse.write_all_at(b"data", 512 * MIB).unwrap_err();
    assert!(is_enospc(&err), "{err}");
    let err = rustix::fs::fallocate(&sparse, rustix::fs::FallocateFlags::empty(), 0, 4 * MIB).unwrap_err();
    assert_eq!(err, rustix::io::Errno::NOSPC);
    drop((big, sparse));

    let full = m.checkpoint().unwrap();
    std::fs::remove_file(root.join("big")).unwrap();
    // The file's blocks go when the kernel forgets its inode (as ext4's at the last close): that
    // message can come a moment after the unlink's reply.
    let rm_done = std::time::Instant::now();
    while df(&root).0 .1 > 200 << 10 && rm_done.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let ((_, freed_used, _), _) = df(&root);
    assert!(freed_used < 200 << 10, "rm gave the space back: {freed_used} used");
    std::fs::write(root.join("after"), vec![3u8; 4 * MIB as usize]).expect("room after rm");
    m.rollback(full).unwrap();
    // Written before anything asks for the usage: the write itself must see the rollback's.
    let err = std::fs::write(root.join("small"), b"x").unwrap_err();
    assert!(is_enospc(&err), "{err}");
    let ((_, used_again, _), _) = df(&root);
    assert_eq!(used_again, used, "a rollback brings back its checkpoint's usage");
    m.unmount().unwrap();
}

#[test]
fn a_rename_into_a_directory_that_must_grow_needs_room() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new();
    let base = fx.base(|d| std::fs::create_dir(d.join("dir")).unwrap());
    let m = mount_with(&fx, base, Quota { bytes: Some(4 * MIB), inodes: None });
    let root = m.mountpoint().to_owned();
    // 128 entries fill a directory's first 4 KiB block: the 129th needs a second one.
    for i in 0..128 {
        std::fs::write(root.join(format!("dir/f{i}")), b"").unwrap();
    }
    std::fs::write(root.join("moved"), b"").unwrap();
    let (_, err) = fill(&root.join("big"));
    assert!(is_enospc(&err), "{err}");
    let err = std::fs::rename(root.join("moved"), root.join("dir/moved")).unwrap_err();
    assert!(is_enospc(&err), "{err}");
    std::fs::rename(root.join("moved"), root.join("still-here")).expect("a rename within a directory");
    std::fs::rename(root.join("still-here"), root.join("dir/f0")).expect("a rename over an entry");
    m.unmount().unwrap();
}

#[test]
fn changing_a_file_of_a_checkpoint_charges_only_new_blocks() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new();
    let base = fx.base(|d| std::fs::write(d.join("log"), vec![7u8; 4 * MIB as usize]).unwrap());
    let m = mount_with(&fx, base, Quota { bytes: Some(5 * MIB), inodes: None });
    let root = m.mountpoint().to_owned();
    // The write copies a chunk up from the image; the image's copy is not charged twice.
    for round in 0..3 {
        let f = std::fs::OpenOptions::new().write(true).open(root.join("log")).unwrap();
        f.write_all_at(b"changed", 2 * MIB + 100).unwrap();
        m.checkpoint().unwrap();
        let ((_, used, _), _) = df(&root);
        assert!((4 * MIB..4 * MIB + (64 << 10)).contains(&used), "round {round}: {used} bytes used");
    }
    let (written, err) = fill(&root.join("log"));
    assert!(is_enospc(&err), "{err}");
    assert!((MIB - (64 << 10)..MIB).contains(&written), "{written} bytes appended");
    m.unmount().unwrap();
}

#[test]
fn an_inode_quota_limits_new_files_not_links() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new();
    let base = fx.base(|d| std::fs::write(d.join("a"), b"a").unwrap());
    let m = mount_with(&fx, base, Quota { bytes: None, inodes: Some(50) });
    let root = m.mountpoint().to_owned();
    assert_eq!(df(&root).1, (50, 48), "the root directory and `a` use two");
    for i in 0..48 {
        std::fs::write(root.join(format!("f{i}")), b"x").unwrap();
    }
    assert_eq!(df(&root).1, (50, 0));
    for err in [
        std::fs::write(root.join("one-more"), b"x").unwrap_err(),
        std::fs::create_dir(root.join("dir")).unwrap_err(),
        std::os::unix::fs::symlink("a", root.join("link")).unwrap_err(),
    ] {
        assert!(is_enospc(&err), "{err}");
    }
    std::fs::hard_link(root.join("a"), root.join("a2")).expect("a hard link is no new inode");
    // The removed file's inode comes back when the kernel forgets it, which can be after the
    // next request: that request must still find room.
    for i in 0..300 {
        std::fs::remove_file(root.join(format!("f{i}"))).unwrap();
        std::fs::write(root.join(format!("f{}", i + 48)), b"x").expect("room for one after rm");
    }
    std::fs::remove_file(root.join("f300")).unwrap();
    std::fs::create_dir(root.join("dir")).expect("room for a directory after rm");
    m.unmount().unwrap();
}

#[test]
fn extended_attributes_of_one_inode_are_bounded() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new();
    let base = fx.base(|d| std::fs::write(d.join("f"), b"f").unwrap());
    // No quota: the bound holds on every mount, since xattrs live in the server's memory.
    let m = fx.mount(base, "m");
    let f = m.mountpoint().join("f");
    let value = vec![b'v'; 16_000];
    for i in 0..4 {
        xattr_set(&f, &format!("user.a{i}"), &value).expect("64 KiB of xattrs fit");
    }
    let err = xattr_set(&f, "user.a4", &value).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StorageFull, "{err}");
    xattr_set(&f, "user.a0", b"short").expect("replacing a value by a shorter one");
    xattr_set(&f, "user.a4", &value).expect("room again");
    m.unmount().unwrap();
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    rustix::fs::setxattr(path, name, value, rustix::fs::XattrFlags::empty()).map_err(std::io::Error::from)
}
