//! Checkpoint / rollback / branch correctness on real mounts.
mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

fn setxattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty()).unwrap();
}

fn populate(d: &Path) {
    std::fs::create_dir_all(d.join("etc/deep/er")).unwrap();
    std::fs::write(d.join("etc/passwd"), b"root:x:0:0\n").unwrap();
    std::fs::write(d.join("etc/deep/er/file"), vec![7u8; 300_000]).unwrap();
    std::fs::write(d.join("bin"), b"#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(d.join("bin"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::symlink("etc/passwd", d.join("pw")).unwrap();
    std::fs::hard_link(d.join("etc/passwd"), d.join("passwd.link")).unwrap();
    setxattr(&d.join("bin"), "security.capability", &[1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    setxattr(&d.join("etc"), "user.note", b"config");
}

fn mutate_everything(root: &Path) {
    std::fs::write(root.join("etc/passwd"), b"changed").unwrap();
    std::fs::remove_file(root.join("bin")).unwrap();
    std::fs::rename(root.join("etc/deep"), root.join("deep-moved")).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(root.join("deep-moved/er/file")).unwrap();
    f.set_len(1000).unwrap();
    f.write_all_at(b"xyz", 10).unwrap();
    drop(f);
    std::fs::set_permissions(root.join("etc"), std::fs::Permissions::from_mode(0o700)).unwrap();
    setxattr(&root.join("etc"), "user.note", b"other");
    setxattr(&root.join("etc"), "user.added", b"1");
    std::fs::hard_link(root.join("pw"), root.join("pw2")).unwrap();
    std::fs::remove_file(root.join("passwd.link")).unwrap();
    std::fs::create_dir(root.join("newdir")).unwrap();
    std::fs::write(root.join("newdir/new"), b"new").unwrap();
    nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    std::os::unix::fs::chown(root.join("etc/passwd"), Some(1234), Some(5678)).unwrap();
}

#[test]
fn rollback_restores_the_tree_byte_identical() {
    let Some((_fx, _base, m, root)) = mounted(populate) else {
        return;
    };
    std::fs::write(root.join("etc/added-before"), b"kept").unwrap();
    let before = snapshot(&root);
    let cp = m.checkpoint().unwrap();
    mutate_everything(&root);
    assert_ne!(snapshot(&root), before);
    let stats = m.rollback(cp).unwrap();
    assert!(stats.changed_inodes > 0);
    assert_eq!(snapshot(&root), before);
    // A second round from the rolled-back state, then back again.
    mutate_everything(&root);
    m.rollback(cp).unwrap();
    assert_eq!(snapshot(&root), before);
    m.unmount().unwrap();
}

#[test]
fn rollback_to_any_earlier_checkpoint_and_forward_again() {
    let Some((_fx, _base, m, root)) = mounted(populate) else {
        return;
    };
    let mut cps = Vec::new();
    let mut states = Vec::new();
    for i in 0..5 {
        std::fs::write(root.join(format!("f{i}")), format!("v{i}")).unwrap();
        std::fs::write(root.join("etc/passwd"), format!("gen {i}")).unwrap();
        states.push(snapshot(&root));
        cps.push(m.checkpoint().unwrap());
    }
    for i in [1usize, 4, 0, 3, 2] {
        m.rollback(cps[i]).unwrap();
        assert_eq!(snapshot(&root), states[i], "checkpoint {i}");
    }
    m.unmount().unwrap();
}

#[test]
fn open_files_and_cwd_survive_a_rollback_and_see_the_checkpoint() {
    for how in BOTH_MODES {
        open_files_and_cwd_survive_a_rollback(how);
    }
}

fn open_files_and_cwd_survive_a_rollback(how: MountFn) {
    let Some((_fx, _base, m, root)) = mounted_with(how, populate) else {
        return;
    };
    std::fs::write(root.join("data"), b"checkpointed content").unwrap();
    let mut reader = std::fs::File::open(root.join("data")).unwrap();
    let mut image_reader = std::fs::File::open(root.join("etc/passwd")).unwrap();
    // A separate process keeps its cwd (and an open fd) in a directory across the rollback.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec 3<../../data; exec sleep 30")
        .current_dir(root.join("etc/deep"))
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let cp = m.checkpoint().unwrap();
    let mut s = String::new();
    reader.read_to_string(&mut s).unwrap();
    assert_eq!(s, "checkpointed content");
    std::fs::write(root.join("data"), b"overwritten after the checkpoint, longer").unwrap();
    std::fs::write(root.join("etc/passwd"), b"modified").unwrap();
    std::fs::remove_dir_all(root.join("etc/deep/er")).unwrap();
    m.rollback(cp).unwrap();
    reader.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    reader.read_to_string(&mut s).unwrap();
    assert_eq!(s, "checkpointed content");
    let mut s = String::new();
    image_reader.read_to_string(&mut s).unwrap();
    assert_eq!(s, "root:x:0:0\n");
    let cwd = std::fs::read_dir(format!("/proc/{}/cwd", child.id())).unwrap();
    let names: Vec<_> = cwd.map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("er")]);
    let via_fd = std::fs::read(format!("/proc/{}/fd/3", child.id())).unwrap();
    assert_eq!(via_fd, b"checkpointed content");
    child.kill().unwrap();
    child.wait().unwrap();
    drop(reader);
    drop(image_reader);
    m.unmount().unwrap();
}

#[test]
fn shared_mmap_sees_the_checkpoint_after_rollback() {
    for how in BOTH_MODES {
        shared_mmap_across_checkpoint_and_rollback(how);
    }
}

fn shared_mmap_across_checkpoint_and_rollback(how: MountFn) {
    let Some((fx, _base, m, root)) = mounted_with(how, |d| std::fs::write(d.join("m"), vec![b'a'; 8192]).unwrap())
    else {
        return;
    };
    let f = std::fs::OpenOptions::new().read(true).write(true).open(root.join("m")).unwrap();
    // SAFETY: a fresh shared mapping of an open file, unmapped below before the file is closed.
    let map = unsafe {
        nix::sys::mman::mmap(
            None,
            std::num::NonZeroUsize::new(8192).unwrap(),
            nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &f,
            0,
        )
        .unwrap()
    };
    let ptr = map.as_ptr() as *mut u8;
    // SAFETY: ptr points at 8192 mapped bytes.
    unsafe { ptr.write_volatile(b'b') };
    let cp = m.checkpoint().unwrap();
    // The checkpoint itself (seen from a fresh mount) holds the page written through the mapping.
    let other = fx.mount(cp, "other");
    assert_eq!(std::fs::read(other.mountpoint().join("m")).unwrap()[0], b'b');
    other.unmount().unwrap();
    // SAFETY: as above.
    unsafe { ptr.add(4096).write_volatile(b'c') };
    m.rollback(cp).unwrap();
    // SAFETY: as above.
    let (first, second) = unsafe { (ptr.read_volatile(), ptr.add(4096).read_volatile()) };
    assert_eq!((first, second), (b'b', b'a'));
    assert_eq!(&std::fs::read(root.join("m")).unwrap()[4095..4097], b"aa");
    // SAFETY: unmapping the mapping created above.
    unsafe { nix::sys::mman::munmap(map, 8192).unwrap() };
    drop(f);
    m.unmount().unwrap();
}

fn du(path: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else {
                total += md.blocks() * 512;
            }
        }
    }
    total
}

#[test]
fn writing_into_a_large_lower_file_copies_one_chunk() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new();
    let base = fx.base(|d| {
        let f = std::fs::File::create(d.join("big")).unwrap();
        f.set_len(1 << 30).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"tail", (1 << 30) - 4).unwrap();
    });
    let m = fx.mount(base, "m");
    let root = m.mountpoint().to_owned();
    let before = du(&fx.store.path().join("layers"));
    let mut f = std::fs::OpenOptions::new().write(true).open(root.join("big")).unwrap();
    f.seek(SeekFrom::Start(512 << 20)).unwrap();
    f.write_all(b"MIDL").unwrap();
    drop(f);
    let cp = m.checkpoint().unwrap();
    let layers = fx.store.describe(cp).unwrap();
    assert_eq!(layers.len(), 2, "{layers:?}");
    assert!(layers[0].frozen && layers[1].indexed && !layers[1].images.is_empty());
    assert!(layers[0].data_bytes <= 256 * 1024 + 4096, "one chunk copied: {layers:?}");
    let f = std::fs::OpenOptions::new().append(true).open(root.join("big")).unwrap();
    (&f).write_all(b"appended").unwrap();
    drop(f);
    m.checkpoint().unwrap();
    let grown = du(&fx.store.path().join("layers")) - before;
    assert!(grown < 2 << 20, "store grew by {grown} bytes");
    let f = std::fs::File::open(root.join("big")).unwrap();
    let mut buf = [0u8; 4];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"head");
    f.read_exact_at(&mut buf, 512 << 20).unwrap();
    assert_eq!(&buf, b"MIDL");
    f.read_exact_at(&mut buf, (1 << 30) - 4).unwrap();
    assert_eq!(&buf, b"tail");
    let mut tail = [0u8; 8];
    f.read_exact_at(&mut tail, 1 << 30).unwrap();
    assert_eq!(&tail, b"appended");
    assert_eq!(f.metadata().unwrap().len(), (1 << 30) + 8);
    drop(f);
    m.unmount().unwrap();
}

#[test]
fn truncate_then_extend_reads_zeros_not_old_data() {
    let Some((_fx, _base, m, root)) = mounted(|d| std::fs::write(d.join("f"), vec![9u8; 1 << 20]).unwrap()) else {
        return;
    };
    let f = std::fs::OpenOptions::new().read(true).write(true).open(root.join("f")).unwrap();
    f.set_len(100_000).unwrap();
    f.set_len(1 << 20).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf[..100_000].iter().all(|b| *b == 9));
    assert!(buf[100_000..].iter().all(|b| *b == 0));
    drop(f);
    m.unmount().unwrap();
}

#[test]
fn branches_from_one_checkpoint_are_isolated() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new();
    let base = fx.base(populate);
    let m = fx.mount(base, "parent");
    std::fs::write(m.mountpoint().join("shared"), b"from parent").unwrap();
    let cp = m.checkpoint().unwrap();
    let a = fx.mount(cp, "a");
    let b = fx.mount(cp, "b");
    std::fs::write(a.mountpoint().join("shared"), b"a").unwrap();
    std::fs::write(b.mountpoint().join("only-b"), b"b").unwrap();
    std::fs::remove_file(m.mountpoint().join("shared")).unwrap();
    assert_eq!(std::fs::read(a.mountpoint().join("shared")).unwrap(), b"a");
    assert_eq!(std::fs::read(b.mountpoint().join("shared")).unwrap(), b"from parent");
    assert!(!a.mountpoint().join("only-b").exists());
    assert!(!m.mountpoint().join("shared").exists());
    let ino_a = std::fs::metadata(a.mountpoint().join("etc/passwd")).unwrap().ino();
    let ino_b = std::fs::metadata(b.mountpoint().join("etc/passwd")).unwrap().ino();
    assert_eq!(ino_a, ino_b);
    for mnt in [a, b, m] {
        mnt.unmount().unwrap();
    }
}

#[test]
fn image_layers_merge_with_whiteouts_opaque_dirs_and_hard_links() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new();
    let l0 = fx.layer("l0");
    let l1 = fx.layer("l1");
    std::fs::create_dir_all(l0.join("d/sub")).unwrap();
    std::fs::write(l0.join("d/sub/x"), b"x").unwrap();
    std::fs::write(l0.join("d/keep"), b"keep").unwrap();
    std::fs::create_dir_all(l0.join("o")).unwrap();
    std::fs::write(l0.join("o/hidden"), b"h").unwrap();
    std::fs::write(l0.join("gone"), b"g").unwrap();
    std::fs::write(l0.join("a"), b"linked").unwrap();
    std::fs::hard_link(l0.join("a"), l0.join("b")).unwrap();
    std::fs::create_dir_all(l1.join("d")).unwrap();
    std::fs::write(l1.join("d/new"), b"n").unwrap();
    let whiteout =
        |p: &Path| nix::sys::stat::mknod(p, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0).unwrap();
    whiteout(&l1.join("gone"));
    whiteout(&l1.join("d/sub"));
    std::fs::create_dir_all(l1.join("o")).unwrap();
    setxattr(&l1.join("o"), "trusted.overlay.opaque", b"y");
    std::fs::write(l1.join("o/visible"), b"v").unwrap();
    let base = fx.store.base_stack(&[l0.clone(), l1.clone()]).unwrap();
    assert_eq!(fx.store.base_stack(&[l0, l1]).unwrap(), base, "index reused");
    let m = fx.mount(base, "m");
    let r = m.mountpoint().to_owned();
    let names = |p: &Path| {
        let mut v: Vec<String> =
            std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&r), ["a", "b", "d", "o"]);
    assert_eq!(names(&r.join("d")), ["keep", "new"]);
    assert_eq!(names(&r.join("o")), ["visible"]);
    assert!(xattrs_of(&r.join("o")).is_empty(), "overlay xattrs are not shown");
    let (ma, mb) = (std::fs::metadata(r.join("a")).unwrap(), std::fs::metadata(r.join("b")).unwrap());
    assert_eq!((ma.ino(), ma.nlink()), (mb.ino(), 2));
    std::fs::write(r.join("a"), b"via a").unwrap();
    assert_eq!(std::fs::read(r.join("b")).unwrap(), b"via a");
    m.unmount().unwrap();
}

#[test]
fn deep_stacks_load_from_disk_in_a_new_mount() {
    let Some((fx, base, m, root)) = mounted(populate) else {
        return;
    };
    let mut last = base;
    for i in 0..100 {
        std::fs::write(root.join(format!("f{}", i % 7)), format!("gen {i}")).unwrap();
        if i % 10 == 0 {
            std::fs::create_dir(root.join(format!("d{i}"))).unwrap();
        }
        last = m.checkpoint().unwrap();
    }
    let expected = snapshot(&root);
    m.unmount().unwrap();
    // Give background index writers a moment; loading must work with or without them.
    let fresh = fx.mount(last, "fresh");
    assert_eq!(snapshot(fresh.mountpoint()), expected);
    fresh.unmount().unwrap();
}

#[test]
fn ownership_is_stored_as_the_sandbox_sees_it() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new();
    let base = fx.base(|d| std::fs::write(d.join("f"), b"x").unwrap());
    let b = 1 << 20;
    let opts = deltafs::MountOptions { uid_base: b, gid_base: b, ..Default::default() };
    let shifted = deltafs::mount(&fx.store, base, &fx.mountpoint("s"), &opts).unwrap();
    let r = shifted.mountpoint().to_owned();
    let md = std::fs::metadata(r.join("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (b, b));
    std::os::unix::fs::chown(r.join("f"), Some(b + 7), Some(b + 8)).unwrap();
    let cp = shifted.checkpoint().unwrap();
    let plain = fx.mount(cp, "plain");
    let md = std::fs::metadata(plain.mountpoint().join("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (7, 8));
    plain.unmount().unwrap();
    shifted.unmount().unwrap();
}

#[test]
fn garbage_collection_frees_unreferenced_checkpoints_only() {
    let Some((fx, _base, m, root)) = mounted(populate) else {
        return;
    };
    std::fs::write(root.join("one"), b"1").unwrap();
    let cp1 = m.checkpoint().unwrap();
    std::fs::write(root.join("two"), b"2").unwrap();
    let cp2 = m.checkpoint().unwrap();
    m.rollback(cp1).unwrap();
    std::fs::write(root.join("three"), b"3").unwrap();
    let cp3 = m.checkpoint().unwrap();
    let expected = snapshot(&root);
    m.unmount().unwrap();
    let layers = || std::fs::read_dir(fx.store.path().join("layers")).unwrap().count();
    let before = layers();
    let stats = fx.store.delete_unreferenced(&[cp3]).unwrap();
    assert!(stats.layers_deleted >= 2, "{stats:?}"); // cp2 and the writable layers left behind
    assert_eq!(layers(), before - stats.layers_deleted);
    deltafs::mount(&fx.store, cp2, &fx.mountpoint("x"), &Default::default()).unwrap_err();
    let again = fx.mount(cp3, "again");
    assert_eq!(snapshot(again.mountpoint()), expected);
    // A live mount keeps its ancestors even when no stack is kept.
    fx.store.delete_unreferenced(&[]).unwrap();
    std::fs::write(again.mountpoint().join("four"), b"4").unwrap();
    let cp4 = again.checkpoint().unwrap();
    again.unmount().unwrap();
    let last = fx.mount(cp4, "last");
    assert_eq!(std::fs::read(last.mountpoint().join("one")).unwrap(), b"1");
    last.unmount().unwrap();
}

#[test]
fn checkpoints_and_rollbacks_while_a_process_keeps_writing() {
    let Some((_fx, _base, m, root)) = mounted(|_| {}) else {
        return;
    };
    // One write(2) per line: every checkpoint must hold a whole prefix of the sequence.
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg("i=0; while true; do i=$((i+1)); echo $i >> log; echo $i > f$((i % 50)); done")
        .current_dir(&root)
        .spawn()
        .unwrap();
    let mut cps = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        cps.push(m.checkpoint().unwrap());
    }
    // Rollbacks under the running writer: it goes on writing on top of the restored state.
    for cp in cps.iter().step_by(5) {
        m.rollback(*cp).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    writer.kill().unwrap();
    writer.wait().unwrap();
    let mut last_len = 0;
    for cp in &cps {
        m.rollback(*cp).unwrap();
        let log = std::fs::read_to_string(root.join("log")).unwrap_or_default();
        let lines: Vec<u64> = log.lines().map(|l| l.parse().unwrap()).collect();
        assert!(log.is_empty() || log.ends_with('\n'), "torn line in {cp}");
        assert_eq!(lines, (1..=lines.len() as u64).collect::<Vec<_>>(), "checkpoint {cp}");
        assert!(lines.len() >= last_len, "checkpoints are taken in order");
        last_len = lines.len();
    }
    assert!(last_len > 0, "the writer ran");
    m.unmount().unwrap();
}

#[test]
fn inode_numbers_of_an_abandoned_branch_are_not_reused() {
    let Some((_fx, _base, m, root)) = mounted(|_| {}) else {
        return;
    };
    let cp = m.checkpoint().unwrap();
    std::fs::write(root.join("x"), b"abandoned").unwrap();
    let held = std::fs::File::open(root.join("x")).unwrap();
    let ino_x = held.metadata().unwrap().ino();
    m.rollback(cp).unwrap();
    std::fs::write(root.join("y"), b"new branch").unwrap();
    assert_ne!(std::fs::metadata(root.join("y")).unwrap().ino(), ino_x);
    let mut s = String::new();
    assert!((&held).read_to_string(&mut s).is_err() || s.is_empty(), "old fd must not read y: {s:?}");
    drop(held);
    m.unmount().unwrap();
}

#[test]
fn bad_rollback_targets_are_refused_without_harm() {
    let Some((fx, _base, m, root)) = mounted(|d| std::fs::write(d.join("f"), b"base").unwrap()) else {
        return;
    };
    std::fs::write(root.join("f"), b"live").unwrap();
    let other_layer = fx.layer("other");
    let other = fx.store.base_stack(&[other_layer]).unwrap();
    let err = m.rollback(other).unwrap_err();
    assert!(err.to_string().contains("does not share"), "{err}");
    let unknown: deltafs::StackId = "00000000000000000000000000000000".parse().unwrap();
    m.rollback(unknown).unwrap_err();
    "not-an-id".parse::<deltafs::StackId>().unwrap_err();
    assert_eq!(std::fs::read(root.join("f")).unwrap(), b"live");
    m.unmount().unwrap();
}

#[test]
fn a_directory_removed_while_a_process_kept_it_as_cwd_comes_back_whole() {
    let Some((_fx, _base, m, root)) = mounted(populate) else {
        return;
    };
    // A process whose cwd is the directory keeps its kernel inode alive through the rmdir, which marks
    // that inode dead: a rollback must make the kernel use a fresh one.
    let mut holder = Command::new("sleep").arg("60").current_dir(root.join("etc/deep")).spawn().unwrap();
    let cp = m.checkpoint().unwrap();
    std::fs::remove_dir_all(root.join("etc/deep")).unwrap();
    m.rollback(cp).unwrap();
    let names: Vec<String> = std::fs::read_dir(root.join("etc/deep"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["er"]);
    assert_eq!(std::fs::read(root.join("etc/deep/er/file")).unwrap().len(), 300_000);
    holder.kill().unwrap();
    holder.wait().unwrap();
}

/// Runs `op` on the file at each path (opened for reading and writing).
fn on_both(paths: [&Path; 2], op: impl Fn(&std::fs::File)) {
    for p in paths {
        op(&std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap());
    }
}

fn punch_hole(f: &std::fs::File, offset: u64, len: u64) {
    use rustix::fs::FallocateFlags;
    rustix::fs::fallocate(f, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len).unwrap();
}

#[test]
fn sparse_files_report_holes_and_allocated_blocks_as_the_store_filesystem_does() {
    // Both ways of mounting: block counts catch up with writes at getattr (no RELEASE arrives when
    // opens are not tracked) or when a release journals the file.
    for how in BOTH_MODES {
        sparse_files_as_on_the_store_filesystem(how);
    }
}

fn sparse_files_as_on_the_store_filesystem(how: MountFn) {
    const K: u64 = 256 * 1024;
    // An image file with a hole at its start, data in chunks 1 and 2 (two extents in chunk 1) and
    // a hole at its end.
    let image_pattern = |f: &std::fs::File| {
        f.set_len(3 * K + 1000).unwrap();
        f.write_all_at(&[1u8; 4096], K + 4096).unwrap();
        f.write_all_at(&[2u8; 4096], K + 65536).unwrap();
        f.write_all_at(&[3u8; 100], 2 * K + 8192).unwrap();
    };
    let Some((fx, _base, m, root)) =
        mounted_with(how, |d| image_pattern(&std::fs::File::create(d.join("img")).unwrap()))
    else {
        return;
    };
    // The same writes on a file of the filesystem the store lives on are the reference.
    let reference = fx.dir.path().join("reference");
    std::fs::create_dir(&reference).unwrap();
    image_pattern(&std::fs::File::create(reference.join("img")).unwrap());
    const NAMES: [&str; 5] = ["img", "new", "short", "small", "emptied"];
    let check = |root: &Path, expected: &[Layout; 5], when: &str| {
        for (name, expected) in NAMES.iter().zip(expected) {
            assert_eq!(&layout(&root.join(name)), expected, "{name} {when}");
        }
    };
    let current = || NAMES.map(|name| layout(&reference.join(name)));

    // A new file with holes at the start, in the middle and at the end; a short one; two small
    // ones (kept in pack slots), one with data only at its end.
    for dir in [&root, &reference] {
        let f = std::fs::File::create(dir.join("new")).unwrap();
        f.write_all_at(&[4u8; 5000], 1 << 20).unwrap();
        f.write_all_at(&[5u8; 100], 3 << 20).unwrap();
        f.set_len(5 << 20).unwrap();
        std::fs::write(dir.join("short"), [6u8; 5000]).unwrap();
        std::fs::File::create(dir.join("small")).unwrap().write_all_at(&[7u8; 100], 3000).unwrap();
        std::fs::write(dir.join("emptied"), [8u8; 2000]).unwrap();
    }
    let first = current();
    assert!(first[1].data.len() == 2 && first[1].blocks < first[1].size / 512, "{:?}", first[1]);
    check(&root, &first, "as written");
    let cp1 = m.checkpoint().unwrap();
    check(&root, &first, "after a checkpoint");

    // Writing into a hole of the image file copies its chunk up with the chunk's holes.
    on_both([&root.join("img"), &reference.join("img")], |f| f.write_all_at(b"copy-up", K + 131072).unwrap());
    check(&root, &current(), "after a copy-up");
    let layers = fx.store.describe(m.checkpoint().unwrap()).unwrap();
    assert!(layers[0].data_bytes <= 3 * 4096, "the copied-up chunk keeps its holes: {layers:?}");

    // Truncation inside an extent of the image file, then growth; a punched hole and an
    // allocation (read as a hole) in the new file, whose data lies in a checkpoint below; the
    // short file grown past its last block (whose data ends mid-block in a checkpoint below).
    on_both([&root.join("img"), &reference.join("img")], |f| {
        f.set_len(K + 66000).unwrap();
        f.set_len(3 * K).unwrap();
    });
    on_both([&root.join("new"), &reference.join("new")], |f| {
        punch_hole(f, 1 << 20, 4096);
        rustix::fs::fallocate(f, rustix::fs::FallocateFlags::empty(), 4 << 20, 8192).unwrap();
    });
    on_both([&root.join("short"), &reference.join("short")], |f| f.set_len(1 << 20).unwrap());
    // A small file of a checkpoint below written again, and one emptied and grown without data.
    on_both([&root.join("small"), &reference.join("small")], |f| f.write_all_at(b"again", 10).unwrap());
    on_both([&root.join("emptied"), &reference.join("emptied")], |f| {
        f.set_len(0).unwrap();
        f.set_len(3000).unwrap();
    });
    let last = current();
    check(&root, &last, "after truncate and fallocate");
    let cp3 = m.checkpoint().unwrap();

    let m2 = how(&fx, cp3, "m2");
    check(m2.mountpoint(), &last, "in a mount loaded from disk");
    m2.unmount().unwrap();
    m.rollback(cp1).unwrap();
    check(&root, &first, "after a rollback");
    m.rollback(cp3).unwrap();
    check(&root, &last, "after a rollback forward");
    m.unmount().unwrap();
}

/// A garbage collection running while a mount checkpoints must never take the layer that just
/// became the mount's parent: nothing is kept here except what the live mount stands on.
#[test]
fn checkpoints_survive_concurrent_garbage_collections() {
    let Some((fx, _base, m, root)) = mounted(|_| {}) else {
        return;
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let (store, stop) = (fx.store.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                store.delete_unreferenced(&[]).unwrap();
                // flock is not fair: a collector retaking its lock at once could starve the mount.
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    for i in 0..300 {
        std::fs::write(root.join(format!("f{i}")), i.to_string()).unwrap();
        m.checkpoint().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    collector.join().unwrap();
    let last = m.checkpoint().unwrap();
    m.unmount().unwrap();
    let again = fx.mount(last, "again");
    for i in 0..300 {
        assert_eq!(std::fs::read_to_string(again.mountpoint().join(format!("f{i}"))).unwrap(), i.to_string());
    }
    again.unmount().unwrap();
}

fn data_bytes_of(store: &deltafs::Store, stack: deltafs::StackId, layer: usize) -> u64 {
    store.describe(stack).unwrap()[layer].data_bytes
}

/// Deleting a checkpoint in the middle of a chain frees the bytes that only it read: whole data
/// files, chunks of partly rewritten files and pack slots of small files; what later checkpoints
/// read stays, and the deleted checkpoint can no longer be mounted or rolled back to.
#[test]
fn deleting_a_middle_checkpoint_frees_the_data_only_it_read() {
    let Some((fx, _base, m, root)) = mounted(populate) else {
        return;
    };
    std::fs::write(root.join("big"), vec![b'a'; 2 << 20]).unwrap();
    std::fs::write(root.join("small"), b"old small file").unwrap();
    std::fs::write(root.join("partial"), vec![b'b'; 1 << 20]).unwrap();
    let cp1 = m.checkpoint().unwrap();
    std::fs::write(root.join("big"), vec![b'c'; 2 << 20]).unwrap();
    std::fs::write(root.join("small"), b"new").unwrap();
    std::fs::OpenOptions::new().write(true).open(root.join("partial")).unwrap().write_all_at(b"d", 300_000).unwrap();
    let cp2 = m.checkpoint().unwrap();
    let expected = snapshot(&root);
    m.unmount().unwrap();
    let before = data_bytes_of(&fx.store, cp2, 1);
    assert!(before >= (3 << 20), "{before}");
    let stats = fx.store.delete_unreferenced(&[cp2]).unwrap();
    // big (2 MiB), partial's rewritten chunk (256 KiB) and the old small file's slot (4 KiB).
    assert!(stats.bytes_reclaimed >= (2 << 20) + (256 << 10) + 4096, "{stats:?}");
    let after = data_bytes_of(&fx.store, cp2, 1);
    assert_eq!(before - after, stats.bytes_reclaimed);
    assert!(after <= (768 << 10) + 8192, "{after}");
    let again = fx.mount(cp2, "again");
    assert_eq!(snapshot(again.mountpoint()), expected);
    match deltafs::mount(&fx.store, cp1, &fx.mountpoint("deleted"), &Default::default()) {
        Err(e) => assert!(format!("{e:?}").contains("Deleted"), "{e:?}"),
        Ok(_) => panic!("a deleted checkpoint was mounted"),
    }
    again.rollback(cp1).unwrap_err();
    // Nothing changed since: nothing more to free, and no work beyond noticing it.
    assert_eq!(fx.store.delete_unreferenced(&[cp2]).unwrap().bytes_reclaimed, 0);
    again.unmount().unwrap();
}

/// A deleted checkpoint's bytes stay while any branch below it reads them, and go with the last.
#[test]
fn a_deleted_checkpoint_keeps_what_any_branch_below_reads() {
    let Some((fx, _base, m, root)) = mounted(|_| {}) else {
        return;
    };
    std::fs::write(root.join("big"), vec![b'a'; 1 << 20]).unwrap();
    let cp1 = m.checkpoint().unwrap();
    std::fs::write(root.join("big"), vec![b'x'; 1 << 20]).unwrap();
    let rewritten = m.checkpoint().unwrap();
    m.rollback(cp1).unwrap();
    std::fs::write(root.join("other"), b"y").unwrap();
    let untouched = m.checkpoint().unwrap();
    m.unmount().unwrap();
    let stats = fx.store.delete_unreferenced(&[rewritten, untouched]).unwrap();
    assert!(stats.bytes_reclaimed < (1 << 20), "{stats:?}");
    let b = fx.mount(untouched, "untouched");
    assert_eq!(std::fs::read(b.mountpoint().join("big")).unwrap(), vec![b'a'; 1 << 20]);
    b.unmount().unwrap();
    let stats = fx.store.delete_unreferenced(&[rewritten]).unwrap();
    // `untouched` and the writable layer the mount of it left.
    assert_eq!(stats.layers_deleted, 2, "{stats:?}");
    assert!(stats.bytes_reclaimed >= (1 << 20), "{stats:?}");
    let a = fx.mount(rewritten, "rewritten");
    assert_eq!(std::fs::read(a.mountpoint().join("big")).unwrap(), vec![b'x'; 1 << 20]);
    a.unmount().unwrap();
}

/// A file unlinked while open lives on in the checkpoints taken while it is open: its bytes in a
/// deleted checkpoint's layer are still read through the descriptor.
#[test]
fn an_open_unlinked_file_keeps_its_bytes_when_its_checkpoint_is_deleted() {
    let Some((fx, _base, m, root)) = mounted(|_| {}) else {
        return;
    };
    let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("doomed"), &content).unwrap();
    let cp1 = m.checkpoint().unwrap();
    let mut open = std::fs::File::open(root.join("doomed")).unwrap();
    std::fs::remove_file(root.join("doomed")).unwrap();
    let cp2 = m.checkpoint().unwrap();
    let stats = fx.store.delete_unreferenced(&[cp2]).unwrap();
    assert!(stats.bytes_reclaimed < (1 << 20), "{stats:?}");
    assert!(data_bytes_of(&fx.store, cp2, 1) >= (1 << 20));
    // Read from the server, not from the page cache.
    rustix::fs::fadvise(&open, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let mut read = Vec::new();
    open.read_to_end(&mut read).unwrap();
    assert!(read == content, "the open file's bytes changed");
    drop(open);
    let _ = cp1;
    m.unmount().unwrap();
}
