//! Durable images: restore without templates (also into another pid namespace), incremental images
//! that store only changed pages, an image written whole when its parent is missing, compaction, and
//! refusal of corrupted or truncated images.

mod common;

use common::{counter_lines, python, wait_for, PidNs, COUNTER};
use deltacr::image::{ImageError, ImageStore};
use deltacr::Engine;

/// Restores from `chain` into `ns` and checks the counter continues right after `n` with the crc the
/// original run had for `n + 1`.
fn restore_and_check(
    engine: &mut Engine,
    ns: &PidNs,
    store: &ImageStore,
    id: deltacr::image::ImageId,
    out: &std::path::Path,
    n: u64,
    crc_next: u64,
) {
    let sb = ns.sandbox();
    engine.kill_processes(&sb).unwrap();
    let before = counter_lines(out).len();
    let chain = store.open_chain(id).unwrap();
    engine.restore_image(chain, &sb, None).unwrap();
    wait_for(|| (counter_lines(out).len() > before + 2).then_some(()));
    let first = counter_lines(out)[before];
    assert_eq!(first, (n + 1, crc_next), "continues from the image");
}

/// A namespace running COUNTER (its output file) and an image store.
fn counting() -> (PidNs, std::path::PathBuf, ImageStore) {
    let mut ns = PidNs::new();
    let out = ns.path("out");
    let py = python();
    ns.spawn(&[&py, "-c", COUNTER, out.to_str().unwrap()], None, false);
    wait_for(|| (counter_lines(&out).len() > 3).then_some(()));
    let store = ImageStore::new(&ns.path("images")).unwrap();
    (ns, out, store)
}

#[test]
fn images_restore_incrementally_compact_and_refuse_corruption() {
    let (ns, out, store) = counting();
    let mut engine = Engine::new();
    let sb = ns.sandbox();

    // First checkpoint: a full image.
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let n1 = counter_lines(&out).last().unwrap().0;
    let c1 = engine.checkpoint(&sb, &mut frozen).unwrap();
    let i1 = c1.image_job(None).unwrap().write(&store).unwrap();
    assert!(i1.page_bytes > 8 << 20, "the 8 MB buffer is in the first image: {i1:?}");
    assert_eq!(i1.parent_bytes, 0);
    // The mappings' flags (read by the writer from the templates' smaps) are in the image: the stack grows down.
    let tree = store.open(i1.id).unwrap().tree;
    let grows_down = tree.processes.iter().any(|p| match &p.kind {
        deltacr::state::ProcessKind::Live(st) => st.vmas.iter().any(|v| v.vm_flags.iter().any(|f| f == "gd")),
        deltacr::state::ProcessKind::Zombie { .. } => false,
    });
    assert!(grows_down, "no grows-down mapping in the image's tree");

    // Second checkpoint: only what changed.
    wait_for(|| (counter_lines(&out).last().unwrap().0 > n1 + 10).then_some(()));
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let n2 = counter_lines(&out).last().unwrap().0;
    let c2 = engine.checkpoint(&sb, &mut frozen).unwrap();
    let i2 = c2.image_job(Some((&c1, i1.id))).unwrap().write(&store).unwrap();
    assert!(i2.page_bytes < i1.page_bytes / 4, "incremental image is small: {i2:?} vs {i1:?}");
    assert!(i2.parent_bytes > 8 << 20, "unchanged pages stay in the parent: {i2:?}");
    assert_eq!(store.open_chain(i2.id).unwrap().len(), 2);
    let describe = store.open(i2.id).unwrap().describe();
    assert!(describe.contains(&format!("parent {}", i1.id)), "{describe}");

    // An image whose parent's write failed is written whole, under the id it was given.
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let c3 = engine.checkpoint(&sb, &mut frozen).unwrap();
    let job = c3.image_job(Some((&c2, i2.id))).unwrap();
    let id3 = job.id();
    let i3 = job.without_parent().write(&store).unwrap();
    assert_eq!((i3.id, i3.parent, i3.parent_bytes), (id3, None, 0));
    assert!(i3.page_bytes > 8 << 20, "the whole 8 MB buffer: {i3:?}");
    assert_eq!(store.open_chain(i3.id).unwrap().len(), 1);
    drop(c3);

    wait_for(|| (counter_lines(&out).last().unwrap().0 > n2 + 10).then_some(()));
    let after = counter_lines(&out);
    let crc_after = |n: u64| after.iter().find(|l| l.0 == n).unwrap().1;
    // Without templates: restore must come from the images.
    drop(c2);
    drop(c1);
    restore_and_check(&mut engine, &ns, &store, i2.id, &out, n2, crc_after(n2 + 1));
    restore_and_check(&mut engine, &ns, &store, i1.id, &out, n1, crc_after(n1 + 1));

    // Compaction makes the newer image stand alone: it still restores after its parent is gone.
    let compacted = store.compact(i2.id).unwrap();
    assert_eq!(compacted.parent, None);
    std::fs::remove_dir_all(store.path_of(i1.id)).unwrap();
    assert_eq!(store.open_chain(i2.id).unwrap().len(), 1);
    restore_and_check(&mut engine, &ns, &store, i2.id, &out, n2, crc_after(n2 + 1));

    // The same image forks into another pid namespace.
    engine.kill_processes(&sb).unwrap();
    let other = PidNs::new();
    let other_out_before = counter_lines(&out).len();
    let mut other_engine = Engine::new();
    let chain = store.open_chain(i2.id).unwrap();
    other_engine.restore_image(chain, &other.sandbox(), None).unwrap();
    wait_for(|| (counter_lines(&out).len() > other_out_before).then_some(()));
    assert_eq!(counter_lines(&out)[other_out_before], (n2 + 1, crc_after(n2 + 1)));
    drop(other);

    // Corruption: one flipped byte in the page data. Copying memory whole, the restore is refused and
    // nothing is left running.
    let pages = store.path_of(i2.id).join("pages.img");
    let mut data = std::fs::read(&pages).unwrap();
    data[5000] ^= 0xff;
    std::fs::write(&pages, &data).unwrap();
    engine.kill_processes(&sb).unwrap();
    engine.set_memory_restore(deltacr::MemoryRestore::Copy);
    let err = engine.restore_image(store.open_chain(i2.id).unwrap(), &sb, None).unwrap_err();
    let msg = format!("{err:?}");
    assert!(msg.contains("checksum mismatch"), "{msg}");
    // Only the pid helper stays (init reaps the killed half-restored process).
    wait_for(|| (deltacr::procfs::children(ns.init).unwrap().len() == 1).then_some(()));
    // Restoring on demand, the process is killed when the bad pages would come in (touched or filled in
    // the background): it never runs with them.
    // (A byte in the middle of the page data: the 8 MB buffer, anonymous memory.)
    engine.set_memory_restore(deltacr::MemoryRestore::OnDemand { background_fill: true });
    data[5000] ^= 0xff;
    let middle = data.len() / 2;
    data[middle] ^= 0xff;
    std::fs::write(&pages, &data).unwrap();
    let lines = counter_lines(&out).len();
    engine.restore_image(store.open_chain(i2.id).unwrap(), &sb, None).unwrap();
    wait_for(|| (deltacr::procfs::children(ns.init).unwrap().len() == 1).then_some(()));
    let wrong: Vec<_> = counter_lines(&out)[lines..].iter().filter(|l| l.1 != crc_after(l.0)).copied().collect();
    assert!(wrong.is_empty(), "the process ran with corrupted memory: {wrong:?}");
    // What is left is a sandbox without that process, which checkpoints as such.
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    assert!(engine.checkpoint(&sb, &mut frozen).unwrap().tree.processes.is_empty());

    // Truncated metadata is refused when opening.
    let meta = store.path_of(i2.id).join("meta.img");
    let m = std::fs::read(&meta).unwrap();
    std::fs::write(&meta, &m[..m.len() - 20]).unwrap();
    match store.open(i2.id) {
        Err(ImageError::Corrupt { reason, .. }) => {
            assert!(reason.contains("short") || reason.contains("end record"), "{reason}");
        }
        other => panic!("truncated image opened: {other:?}"),
    }
}

#[test]
fn every_truncation_or_flipped_byte_of_the_metadata_is_refused() {
    let (ns, _out, store) = counting();
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let id = ckpt.image_job(None).unwrap().write(&store).unwrap().id;
    let meta = store.path_of(id).join("meta.img");
    let good = std::fs::read(&meta).unwrap();
    store.open(id).unwrap().verify_pages().unwrap();
    // Every prefix (a torn write) is refused.
    for len in (0..good.len()).step_by(good.len() / 97 + 1).chain([good.len() - 1]) {
        std::fs::write(&meta, &good[..len]).unwrap();
        assert!(store.open(id).is_err(), "a metadata file cut at {len} of {} bytes was accepted", good.len());
    }
    // Any flipped bit is refused (magic, version, record headers and payloads are all covered).
    for pos in (0..good.len()).step_by(good.len() / 89 + 1) {
        let mut bad = good.clone();
        bad[pos] ^= 0x10;
        std::fs::write(&meta, &bad).unwrap();
        assert!(store.open(id).is_err(), "a flipped bit at byte {pos} was accepted");
    }
    std::fs::write(&meta, &good).unwrap();
    // Truncated page data is refused when read.
    let pages = store.path_of(id).join("pages.img");
    let len = std::fs::metadata(&pages).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&pages).unwrap().set_len(len / 2).unwrap();
    let err = store.open(id).unwrap().verify_pages().unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn opening_a_store_deletes_what_dead_writers_left() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let dead = gone.id();
    gone.wait().unwrap();
    let id = "0123456789abcdef0123456789abcdef";
    let dead_writers = [format!("{id}.{dead}.tmp"), format!("{id}.removing")];
    let live_writer = format!("{id}.{}.tmp", std::process::id());
    for name in dead_writers.iter().chain([&live_writer]) {
        std::fs::create_dir_all(root.join(name)).unwrap();
        std::fs::write(root.join(name).join("pages"), b"half written").unwrap();
    }
    ImageStore::new(&root).unwrap();
    for name in &dead_writers {
        assert!(!root.join(name).exists(), "{name} is left");
    }
    assert!(root.join(&live_writer).exists(), "the image a live process writes is kept");
}

#[test]
fn a_checkpoint_after_a_restore_from_an_image_stores_only_what_changed_since() {
    let (ns, out, store) = counting();
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let first = engine.checkpoint(&sb, &mut frozen).unwrap();
    drop(frozen);
    let i1 = first.image_job(None).unwrap().write(&store).unwrap();
    drop(first);
    engine.kill_processes(&sb).unwrap();
    engine.restore_image(store.open_chain(i1.id).unwrap(), &sb, None).unwrap();
    let n1 = counter_lines(&out).last().unwrap().0;
    wait_for(|| (counter_lines(&out).last().unwrap().0 > n1 + 10).then_some(()));

    // No parent templates: compared with the image the processes came from.
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let n2 = counter_lines(&out).last().unwrap().0;
    let second = engine.checkpoint(&sb, &mut frozen).unwrap();
    drop(frozen);
    let i2 = second.image_job(None).unwrap().against_image(store.open_chain(i1.id).unwrap()).write(&store).unwrap();
    assert_eq!(i2.parent, Some(i1.id));
    assert!(i2.page_bytes < i1.page_bytes / 4, "only what changed is stored: {i2:?} vs {i1:?}");
    assert!(i2.parent_bytes > 8 << 20, "the 8 MB buffer's unchanged pages stay in the first image: {i2:?}");
    wait_for(|| (counter_lines(&out).last().unwrap().0 > n2 + 10).then_some(()));
    let after = counter_lines(&out);
    let crc_after = |n: u64| after.iter().find(|l| l.0 == n).unwrap().1;
    drop(second);
    restore_and_check(&mut engine, &ns, &store, i2.id, &out, n2, crc_after(n2 + 1));
}
