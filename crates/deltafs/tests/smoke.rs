mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use common::*;

#[test]
fn basic_file_operations_on_a_mount() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new();
    let base = fx.base(|d| {
        std::fs::write(d.join("hello"), b"hello world").unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/a"), b"aaa").unwrap();
    });
    let m = fx.mount(base, "m");
    let root = m.mountpoint().to_owned();
    assert_eq!(std::fs::read(root.join("hello")).unwrap(), b"hello world");
    assert_eq!(std::fs::read(root.join("sub/a")).unwrap(), b"aaa");
    std::fs::write(root.join("new"), b"fresh").unwrap();
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(root.join("hello")).unwrap();
    f.seek(SeekFrom::Start(6)).unwrap();
    f.write_all(b"WORLD").unwrap();
    drop(f);
    assert_eq!(std::fs::read(root.join("hello")).unwrap(), b"hello WORLD");
    std::fs::rename(root.join("sub"), root.join("moved")).unwrap();
    assert_eq!(std::fs::read(root.join("moved/a")).unwrap(), b"aaa");
    std::fs::hard_link(root.join("new"), root.join("new2")).unwrap();
    std::os::unix::fs::symlink("new", root.join("link")).unwrap();
    let mut s = String::new();
    std::fs::File::open(root.join("link")).unwrap().read_to_string(&mut s).unwrap();
    assert_eq!(s, "fresh");
    std::fs::remove_file(root.join("new")).unwrap();
    assert_eq!(std::fs::read(root.join("new2")).unwrap(), b"fresh");
    // Read, then write through the same open file description.
    let rw = std::fs::OpenOptions::new().read(true).write(true).open(root.join("new2")).unwrap();
    let mut buf = [0u8; 5];
    rw.read_exact_at(&mut buf, 0).unwrap();
    rw.write_all_at(b"F", 0).unwrap();
    drop(rw);
    assert_eq!(std::fs::read(root.join("new2")).unwrap(), b"Fresh");
    let cp = m.checkpoint().unwrap();
    std::fs::write(root.join("hello"), b"changed").unwrap();
    std::fs::remove_dir_all(root.join("moved")).unwrap();
    m.rollback(cp).unwrap();
    assert_eq!(std::fs::read(root.join("hello")).unwrap(), b"hello WORLD");
    assert_eq!(std::fs::read(root.join("moved/a")).unwrap(), b"aaa");
    m.unmount().unwrap();
}

#[test]
fn locks_append_sparse_fifo_socket_statfs_and_direct_io() {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let Some((_fx, _base, m, root)) = mounted(|d| std::fs::write(d.join("log"), b"start\n").unwrap()) else {
        return;
    };

    // flock and fcntl locks conflict between open file descriptions, as on ext4.
    let a = std::fs::File::open(root.join("log")).unwrap();
    let b = std::fs::File::open(root.join("log")).unwrap();
    rustix::fs::flock(&a, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    assert_eq!(
        rustix::fs::flock(&b, rustix::fs::FlockOperation::NonBlockingLockExclusive),
        Err(rustix::io::Errno::WOULDBLOCK)
    );
    let status = std::process::Command::new("python3")
        .arg("-c")
        .arg("import fcntl,sys; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB)")
        .arg(root.join("log"))
        .status();
    if let Ok(st) = status {
        assert!(st.success(), "fcntl lock on a free file");
    }

    // O_APPEND writes go to the end, also after another writer extended the file.
    let mut app = std::fs::OpenOptions::new().append(true).open(root.join("log")).unwrap();
    std::fs::OpenOptions::new().write(true).open(root.join("log")).unwrap().write_all_at(b"START", 0).unwrap();
    app.write_all(b"one\n").unwrap();
    std::fs::OpenOptions::new().append(true).open(root.join("log")).unwrap().write_all(b"two\n").unwrap();
    app.write_all(b"three\n").unwrap();
    assert_eq!(std::fs::read(root.join("log")).unwrap(), b"START\none\ntwo\nthree\n");

    // Sparse files read zeros in holes and keep their size.
    let sparse = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(root.join("sparse")).unwrap();
    sparse.write_all_at(b"end", 10 << 20).unwrap();
    let mut buf = vec![1u8; 4096];
    sparse.read_exact_at(&mut buf, 5 << 20).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    assert_eq!(sparse.metadata().unwrap().len(), (10 << 20) + 3);

    // fallocate extends the size.
    rustix::fs::fallocate(&sparse, rustix::fs::FallocateFlags::empty(), 0, 20 << 20).unwrap();
    assert_eq!(sparse.metadata().unwrap().len(), 20 << 20);

    // Fifos and unix sockets are created and work (the kernel serves them).
    nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert!(std::fs::metadata(root.join("fifo")).unwrap().file_type().is_fifo());
    let listener = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    let mut client = std::os::unix::net::UnixStream::connect(root.join("sock")).unwrap();
    client.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    listener.accept().unwrap().0.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    assert!(std::fs::metadata(root.join("sock")).unwrap().file_type().is_socket());

    let st = nix::sys::statvfs::statvfs(&root).unwrap();
    assert!(st.blocks() > 0 && st.name_max() == 255);

    // O_DIRECT opens succeed and read the same bytes (served through the FUSE server).
    let direct = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(root.join("log"));
    let mut s = String::new();
    direct.unwrap().read_to_string(&mut s).unwrap();
    assert_eq!(s, "START\none\ntwo\nthree\n");
    drop((a, b, app, sparse, listener, client));
    m.unmount().unwrap();
}

#[test]
fn suid_and_sgid_are_cleared_as_on_ext4() {
    for how in BOTH_MODES {
        suid_and_sgid_clearing(how);
    }
}

fn suid_and_sgid_clearing(how: MountFn) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some((_fx, _base, m, root)) = mounted_with(how, |_| {}) else {
        return;
    };
    if std::process::Command::new("setpriv").arg("--version").output().is_err() {
        testing::skip("setpriv (util-linux) is not installed");
        return;
    }
    let as_nobody = |script: &str| {
        let st = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script])
            .current_dir(&root)
            .status()
            .unwrap();
        assert!(st.success(), "{script}");
    };
    let mode = |name: &str| std::fs::metadata(root.join(name)).unwrap().mode() & 0o7777;
    for name in ["w", "t", "o", "f", "r", "g"] {
        std::fs::write(root.join(name), b"x").unwrap();
        std::os::unix::fs::chown(root.join(name), Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(root.join(name), std::fs::Permissions::from_mode(0o6777)).unwrap();
    }
    // Set-group-ID without group execute is a locking mark, not a privilege: it stays.
    std::fs::set_permissions(root.join("g"), std::fs::Permissions::from_mode(0o6767)).unwrap();
    as_nobody("echo y >> w");
    as_nobody("truncate -s 0 t");
    as_nobody(": > o");
    as_nobody("fallocate -l 8192 f");
    as_nobody("echo y >> g");
    std::fs::OpenOptions::new().append(true).open(root.join("r")).unwrap().write_all(b"root").unwrap();
    std::fs::OpenOptions::new().write(true).truncate(true).open(root.join("r")).unwrap();
    assert_eq!(
        (mode("w"), mode("t"), mode("o"), mode("f"), mode("g"), mode("r")),
        (0o777, 0o777, 0o777, 0o777, 0o2767, 0o6777),
        "writes, truncation and allocation by an unprivileged process clear set-ID bits; root's do not"
    );
    std::os::unix::fs::chown(root.join("r"), Some(0), None).unwrap();
    assert_eq!(mode("r"), 0o777, "chown clears suid/sgid");
    m.unmount().unwrap();
}

#[test]
fn unlinked_files_live_while_open_or_mapped() {
    for how in BOTH_MODES {
        unlinked_file_lifetime(how);
    }
}

/// Polls `cond` every 10 ms until it holds; fails after `secs` seconds.
fn wait_for(what: &str, secs: u64, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Data files the store holds for inode `ino`, in any layer.
fn data_files_of(fx: &Fixture, ino: u64) -> usize {
    let layers = fx.dir.path().join("store/layers");
    let mut n = 0;
    for layer in std::fs::read_dir(layers).unwrap() {
        let data = layer.unwrap().path().join("data");
        for fan in std::fs::read_dir(data).into_iter().flatten() {
            n += usize::from(fan.unwrap().path().join(ino.to_string()).exists());
        }
    }
    n
}

fn unlinked_file_lifetime(how: MountFn) {
    use std::os::unix::fs::MetadataExt;
    let Some((fx, _base, m, root)) = mounted_with(how, |_| {}) else {
        return;
    };
    // Larger than a pack slot, so it has a data file of its own (see `small_files_are_packed_and_their_slots_reused`).
    std::fs::write(root.join("gone"), [&b"still here"[..], &[b'x'; 5000]].concat()).unwrap();
    let ino = std::fs::metadata(root.join("gone")).unwrap().ino();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(root.join("gone")).unwrap();
    std::fs::remove_file(root.join("gone")).unwrap();
    f.write_all_at(b"STILL", 0).unwrap();
    let mut buf = [0u8; 10];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"STILL here");
    // SAFETY: a fresh read-only shared mapping of the open file, unmapped below.
    let map = unsafe {
        nix::sys::mman::mmap(
            None,
            std::num::NonZeroUsize::new(10).unwrap(),
            nix::sys::mman::ProtFlags::PROT_READ,
            nix::sys::mman::MapFlags::MAP_SHARED,
            &f,
            0,
        )
        .unwrap()
    };
    drop(f);
    // The mapping alone keeps the unlinked file: its pages can still be read in from the server.
    // SAFETY: map points at 10 mapped bytes.
    let mapped = unsafe { std::slice::from_raw_parts(map.as_ptr() as *const u8, 10).to_vec() };
    assert_eq!(mapped, b"STILL here");
    assert_eq!(data_files_of(&fx, ino), 1);
    // SAFETY: unmapping the mapping created above.
    unsafe { nix::sys::mman::munmap(map, 10).unwrap() };
    // The kernel then forgets the inode (FORGET arrives asynchronously) and its data is freed.
    wait_for("the data of the unlinked file is freed", 10, || data_files_of(&fx, ino) == 0);
    m.unmount().unwrap();
}

/// Sizes of the pack files of every layer of the store.
fn pack_sizes(fx: &Fixture) -> Vec<u64> {
    let layers = fx.dir.path().join("store/layers");
    let packs = std::fs::read_dir(layers).unwrap().map(|l| l.unwrap().path().join("data/pack"));
    packs.filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).collect()
}

#[test]
fn small_files_are_packed_and_their_slots_reused() {
    use std::os::unix::fs::MetadataExt;
    let Some((fx, _base, m, root)) = mounted(|d| std::fs::write(d.join("image-small"), b"from the image").unwrap())
    else {
        return;
    };
    std::fs::write(root.join("small"), b"tiny").unwrap();
    let ino = std::fs::metadata(root.join("small")).unwrap().ino();
    assert_eq!(data_files_of(&fx, ino), 0, "a small file has no data file of its own");
    assert_eq!(std::fs::read(root.join("small")).unwrap(), b"tiny");
    // A small image file changed: packed copy, the image itself untouched.
    let f = std::fs::OpenOptions::new().write(true).open(root.join("image-small")).unwrap();
    f.write_all_at(b"FROM", 0).unwrap();
    drop(f);
    assert_eq!(std::fs::read(root.join("image-small")).unwrap(), b"FROM the image");
    assert_eq!(std::fs::read(fx.layer("base").join("image-small")).unwrap(), b"from the image");
    // Shrinking then growing reads zeros where the old bytes were.
    let f = std::fs::OpenOptions::new().write(true).open(root.join("small")).unwrap();
    f.set_len(1).unwrap();
    f.set_len(3).unwrap();
    drop(f);
    assert_eq!(std::fs::read(root.join("small")).unwrap(), b"t\0\0");
    let cp = m.checkpoint().unwrap();
    // After the checkpoint the slot is frozen: changes go to a new slot, the rollback brings the old bytes.
    std::fs::write(root.join("small"), b"rewritten").unwrap();
    assert_eq!(std::fs::read(root.join("small")).unwrap(), b"rewritten");
    // Outgrowing the slot moves the file into a data file, bytes intact.
    let mut grown = b"rewritten".to_vec();
    let mut f = std::fs::OpenOptions::new().append(true).open(root.join("small")).unwrap();
    for i in 0..100u8 {
        let piece = [b'a' + i % 26; 97];
        f.write_all(&piece).unwrap();
        grown.extend_from_slice(&piece);
    }
    drop(f);
    assert_eq!(std::fs::read(root.join("small")).unwrap(), grown);
    assert_eq!(data_files_of(&fx, ino), 1);
    m.rollback(cp).unwrap();
    assert_eq!(std::fs::read(root.join("small")).unwrap(), b"t\0\0");
    assert_eq!(std::fs::read(root.join("image-small")).unwrap(), b"FROM the image");
    // Deleted files give their slots back: creating as many again does not grow the pack, and a
    // file in a reused slot reads zeros where it was not written.
    let round = |tag: &str| {
        for i in 0..200 {
            std::fs::write(root.join(format!("f{i}")), format!("{tag} {i}").repeat(50)).unwrap();
        }
        for i in 0..200 {
            assert_eq!(std::fs::read(root.join(format!("f{i}"))).unwrap(), format!("{tag} {i}").repeat(50).as_bytes());
            std::fs::remove_file(root.join(format!("f{i}"))).unwrap();
        }
    };
    // Slots come back when the kernel forgets the deleted inodes (FORGET is asynchronous), so
    // rounds overlap a little; without reuse six rounds would make the pack six times as large.
    round("first");
    let first: u64 = pack_sizes(&fx).iter().sum();
    for tag in ["2", "3", "4", "5", "6"] {
        round(tag);
    }
    let last: u64 = pack_sizes(&fx).iter().sum();
    assert!(last < 3 * first, "the pack grew from {first} to {last} bytes over six rounds");
    let f = std::fs::File::create(root.join("sparse-small")).unwrap();
    f.write_all_at(b"end", 100).unwrap();
    drop(f);
    assert_eq!(std::fs::read(root.join("sparse-small")).unwrap(), [&[0u8; 100][..], b"end"].concat());
    m.unmount().unwrap();
}

#[test]
fn a_directory_changed_while_it_is_read_lists_every_remaining_entry_once() {
    let Some((_fx, _base, m, root)) = mounted(|d| {
        std::fs::create_dir(d.join("big")).unwrap();
        for i in 0..3000 {
            std::fs::write(d.join(format!("big/image-{i:04}")), b"").unwrap();
        }
    }) else {
        return;
    };
    let dir = root.join("big");
    for i in 0..1000 {
        std::fs::write(dir.join(format!("new-{i:04}")), b"").unwrap();
    }
    let mut seen = std::collections::HashMap::new();
    let mut changed = false;
    // Several getdents calls (of at most 32 KiB) read the 4,000 entries; between them, a third of
    // the entries go and others come.
    let mut stream = nix::dir::Dir::open(&dir, nix::fcntl::OFlag::O_RDONLY, nix::sys::stat::Mode::empty()).unwrap();
    for entry in stream.iter() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        *seen.entry(name).or_insert(0) += 1;
        if seen.len() == 100 && !changed {
            changed = true;
            for i in (0..3000).step_by(3) {
                std::fs::remove_file(dir.join(format!("image-{i:04}"))).unwrap();
            }
            for i in 0..500 {
                std::fs::write(dir.join(format!("later-{i:04}")), b"").unwrap();
            }
        }
    }
    assert!(changed);
    let remaining: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("later-"))
        .collect();
    assert_eq!(remaining.len(), 3000);
    for name in &remaining {
        assert_eq!(seen.get(name), Some(&1), "{name} listed once");
    }
    assert!(seen.values().all(|n| *n == 1), "no entry is listed twice");
    drop(stream);
    m.unmount().unwrap();
}

/// Whether one of this process's `/dev/fuse` fds reads without blocking (flags in fdinfo, octal).
fn a_fuse_device_is_nonblocking() -> bool {
    std::fs::read_dir("/proc/self/fd").unwrap().flatten().any(|fd| {
        let is_fuse = std::fs::read_link(fd.path()).is_ok_and(|p| p == std::path::Path::new("/dev/fuse"));
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.file_name().to_string_lossy()));
        let flags = info.ok().and_then(|i| {
            i.lines().find_map(|l| l.strip_prefix("flags:")).and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        });
        is_fuse && flags.is_some_and(|f| f & libc::O_NONBLOCK as u32 != 0)
    })
}

#[test]
fn a_burst_of_requests_turns_busy_polling_on_and_quiet_turns_it_off() {
    let Some((_fx, _base, m, root)) = mounted(|_| {}) else { return };
    assert!(!a_fuse_device_is_nonblocking(), "the device polls before any request");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = std::thread::spawn({
        let (stop, root) = (stop.clone(), root.clone());
        move || {
            // Distinct missing names: each is a LOOKUP round trip.
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::symlink_metadata(root.join(format!("missing-{i}"))).unwrap_err();
                i += 1;
            }
            i
        }
    });
    wait_for("a burst polls the device", 20, a_fuse_device_is_nonblocking);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(load.join().unwrap() > 0);
    wait_for("quiet makes the device block again", 20, || !a_fuse_device_is_nonblocking());
    // Requests are still answered after polling ended.
    std::fs::write(root.join("after"), b"x").unwrap();
    assert_eq!(std::fs::read(root.join("after")).unwrap(), b"x");
    m.unmount().unwrap();
}

/// A read racing a truncation sees the old bytes, nothing, or the new bytes, as on ext4 — never the
/// old length of NUL bytes (the kernel's zero-filled page while the truncation is in flight; see
/// `Emptied` in volume/contents.rs). Both ways of truncating: `O_TRUNC` (a SETATTR when opens are not sent to
/// the server) and `ftruncate`.
#[test]
fn reads_racing_a_truncation_never_see_nul_bytes() {
    use std::os::unix::fs::OpenOptionsExt;
    for how in BOTH_MODES {
        let Some((_fx, _base, m, root)) = mounted_with(how, |_| {}) else {
            return;
        };
        let path = root.join("n");
        std::fs::write(&path, b"0\n").unwrap();
        for use_ftruncate in [false, true] {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writer = {
                let (path, stop) = (path.clone(), stop.clone());
                std::thread::spawn(move || {
                    let fd = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                    let mut i = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        i += 1;
                        let line = format!("{i}\n");
                        if use_ftruncate {
                            fd.set_len(0).unwrap();
                            fd.write_all_at(line.as_bytes(), 0).unwrap();
                        } else {
                            std::fs::write(&path, line).unwrap();
                        }
                    }
                })
            };
            let (mut reads, mut bad, mut torn) = (0, Vec::new(), 0);
            let start = std::time::Instant::now();
            while start.elapsed() < std::time::Duration::from_secs(2) {
                let data = std::fs::read(&path).unwrap();
                reads += 1;
                let a_line = data.ends_with(b"\n") && data[..data.len() - 1].iter().all(u8::is_ascii_digit);
                if data.iter().any(|b| !b.is_ascii_digit() && *b != b'\n') {
                    bad.push(data);
                } else if !data.is_empty() && !a_line {
                    // A prefix of a line (seen once in ~200,000 reads under load, docs/deltafs.md "Not done").
                    torn += 1;
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            writer.join().unwrap();
            assert!(
                bad.is_empty(),
                "{} of {reads} reads saw bytes the file never held (ftruncate: {use_ftruncate}), first {:?}",
                bad.len(),
                bad.first().map(|d| String::from_utf8_lossy(d).into_owned())
            );
            if torn > 0 {
                eprintln!("{torn} of {reads} reads returned a prefix of a line (ftruncate: {use_ftruncate})");
            }
        }
        // Emptied and not racing: a read finds nothing, cached or direct.
        let fd = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        fd.set_len(0).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        let mut direct = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).unwrap();
        let mut got = Vec::new();
        direct.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"");
        drop((fd, direct));
        m.unmount().unwrap();
    }
}

#[test]
fn a_mount_unmounted_from_outside_is_no_longer_served_and_unmounts_cleanly() {
    let Some((_fx, _base, m, root)) = mounted(|d| std::fs::write(d.join("a"), b"a").unwrap()) else {
        return;
    };
    assert!(m.is_served());
    nix::mount::umount(&root).unwrap();
    wait_for("the session to end", 10, || !m.is_served());
    m.unmount().unwrap();
}
