//! A store whose filesystem fills up: writes fail with ENOSPC, a checkpoint fails with a clear
//! error and changes nothing, and once space is freed every change made meanwhile is checkpointed.
mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use common::{fuse_available, snapshot, Entry, Fixture};
use deltafs::MountError;

/// A tmpfs of `size` at a new directory, unmounted (lazily) on drop.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn new(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().expect("tempdir");
        nix::mount::mount(
            Some("tmpfs"),
            dir.path(),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        )
        .expect("mount a tmpfs");
        SmallFs(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.0.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Writes `path` until the filesystem is full; returns the error that stopped it.
fn fill(path: &Path) -> std::io::Error {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0x5au8; 1 << 20];
    loop {
        if let Err(e) = f.write_all(&block) {
            return e;
        }
    }
}

/// Asserts two trees are equal, naming the first path that differs (the trees are large).
fn assert_same(got: &BTreeMap<PathBuf, Entry>, want: &BTreeMap<PathBuf, Entry>) {
    let differs = got.keys().chain(want.keys()).find(|p| got.get(*p) != want.get(*p));
    assert!(
        differs.is_none(),
        "{differs:?}: {:?} instead of {:?}",
        got.get(differs.unwrap()),
        want.get(differs.unwrap())
    );
}

/// Entries of a store directory (`layers`, `tmp`).
fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, Iterator::count)
}

#[test]
fn a_full_store_fails_the_checkpoint_and_loses_nothing() {
    if !fuse_available() {
        return;
    }
    let small = SmallFs::new("24m");
    let fx = Fixture::new_in(small.0.path());
    let store = fx.dir.path().join("store");
    let base = fx.base(|d| std::fs::write(d.join("f"), b"base").unwrap());
    let m = fx.mount(base, "m");
    let root = m.mountpoint().to_owned();
    std::fs::write(root.join("f"), b"before").unwrap();
    let first = m.checkpoint().unwrap();
    let at_first = snapshot(&root);
    // Two pages of the store's filesystem that the test frees later, outside DeltaFS.
    let spare = small.0.path().join("spare");
    std::fs::write(&spare, [1u8; 8192]).unwrap();

    let err = fill(&root.join("big"));
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    // Changes that need no file data still work, and are journaled later: more records than one
    // batch of the journal holds, so batches fail to be written while the store is full.
    for i in 0..3000 {
        std::fs::create_dir(root.join(format!("d{i:04}-{}", "x".repeat(100)))).unwrap();
    }
    std::fs::rename(root.join("f"), root.join("g")).unwrap();
    assert_eq!(std::fs::read(root.join("g")).unwrap(), b"before");
    let layers = entries(&store.join("layers"));

    // No room for the next layer: the checkpoint fails, says why, and leaves nothing behind.
    let err = m.checkpoint().unwrap_err();
    assert!(matches!(&err, MountError::Store(e) if e.is_no_space()), "{err:?}");
    assert!(format!("{:?}", anyhow::Error::new(err)).contains("No space left on device"));
    assert_eq!((entries(&store.join("layers")), entries(&store.join("tmp"))), (layers, 0));
    // Room for the next layer but not for the journal: the freeze fails, the layer stays writable.
    std::fs::remove_file(&spare).unwrap();
    let err = m.checkpoint().unwrap_err();
    assert!(matches!(&err, MountError::Store(e) if e.is_no_space()), "{err:?}");
    assert!(format!("{err:?}").contains("journal"), "{err:?}");
    assert_eq!((entries(&store.join("layers")), entries(&store.join("tmp"))), (layers, 0));

    // Once space is freed, a checkpoint holds every change, also those made while the store was full.
    std::fs::remove_file(root.join("big")).unwrap();
    std::fs::write(root.join("g"), b"after").unwrap();
    let live = snapshot(&root);
    let second = m.checkpoint().expect("checkpoint after freeing space");
    let again = fx.mount(second, "again");
    assert_same(&snapshot(again.mountpoint()), &live);
    again.unmount().unwrap();
    let old = fx.mount(first, "old");
    assert_same(&snapshot(old.mountpoint()), &at_first);
    old.unmount().unwrap();

    // A rollback on a full store: the change it discards is what fills the store, and goes first.
    fill(&root.join("big"));
    m.checkpoint().unwrap_err();
    m.rollback(first).expect("rollback on a full store");
    assert_same(&snapshot(&root), &at_first);
    let third = m.checkpoint().unwrap();
    let again = fx.mount(third, "third");
    assert_same(&snapshot(again.mountpoint()), &at_first);
    again.unmount().unwrap();
    m.unmount().unwrap();
}

/// While the store is full, records of changes that need no file data are kept in memory: past a
/// bound, changes that add are refused (ENOSPC), removals still work, and once space is freed from
/// inside everything made meanwhile is checkpointed.
#[test]
fn a_full_store_bounds_the_records_it_keeps_in_memory() {
    if !fuse_available() {
        return;
    }
    let small = SmallFs::new("24m");
    let fx = Fixture::new_in(small.0.path());
    let base = fx.base(|d| std::fs::write(d.join("f"), b"base").unwrap());
    let m = fx.mount(base, "m");
    let root = m.mountpoint().to_owned();
    let err = fill(&root.join("big"));
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let name = |i: usize| format!("d{i:06}-{}", "x".repeat(240));
    let mut made = 0;
    let err = loop {
        match std::fs::create_dir(root.join(name(made))) {
            Ok(()) => made += 1,
            Err(e) => break e,
        }
        assert!(made < 1_000_000, "no bound on the records kept in memory");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    // ~400 bytes of records per directory, 16 MiB kept.
    assert!((20_000..80_000).contains(&made), "{made} directories made on the full store");
    assert_eq!(std::fs::write(root.join("f"), b"more").unwrap_err().raw_os_error(), Some(libc::ENOSPC));
    std::fs::remove_dir(root.join(name(0))).expect("removals are not refused");

    std::fs::remove_file(root.join("big")).unwrap();
    std::fs::create_dir(root.join("after")).expect("room once the store has space again");
    let live = snapshot(&root);
    let cp = m.checkpoint().expect("checkpoint after freeing space");
    let again = fx.mount(cp, "again");
    assert_same(&snapshot(again.mountpoint()), &live);
    again.unmount().unwrap();
    m.unmount().unwrap();
}
