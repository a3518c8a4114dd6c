//! `Store::sync_stack`: what it flushes of a checkpoint's layer, and when it refuses. (A power loss
//! cannot be simulated here: these check the files it reaches and that it works beside a live mount.)
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use deltafs::{StackId, StoreError, SyncStats};

#[test]
fn syncing_a_checkpoint_flushes_every_file_of_its_layer() {
    let Some((fx, base, m, root)) = mounted(|d| std::fs::write(d.join("img"), b"image").unwrap()) else {
        return;
    };
    // Three files with data files of their own, five packed into one pack file.
    for i in 0..3 {
        std::fs::write(root.join(format!("big{i}")), vec![i as u8; 10_000]).unwrap();
    }
    for i in 0..5 {
        std::fs::write(root.join(format!("small{i}")), format!("small {i}")).unwrap();
    }
    let cp = m.checkpoint().unwrap();
    let stats = fx.store.sync_stack(cp).unwrap();
    // 3 data files, the pack, journal, meta, frozen; data/0/, data/, the layer's dir, layers/.
    assert_eq!((stats.files, stats.dirs), (7, 4), "{stats:?}");
    assert_eq!(stats.bytes, fx.store.layer_bytes(cp).unwrap());
    assert!(stats.bytes >= 30_000, "{stats:?}");

    // A checkpoint that changed nothing has its journal, meta and frozen.
    let empty = m.checkpoint().unwrap();
    let bytes = fx.store.layer_bytes(empty).unwrap();
    assert_eq!(fx.store.sync_stack(empty).unwrap(), SyncStats { files: 3, dirs: 3, bytes });

    // The base: meta, index, frozen and its key in bases/; data/, its dir, layers/, bases/.
    let synced = fx.store.sync_stack(base).unwrap();
    assert_eq!((synced.files, synced.dirs), (4, 4), "{synced:?}");
    m.unmount().unwrap();
}

#[test]
fn unknown_and_deleted_checkpoints_are_refused_by_name() {
    let Some((fx, _base, m, root)) = mounted(|_| {}) else {
        return;
    };
    let unknown: StackId = "0123456789abcdef0123456789abcdef".parse().unwrap();
    assert!(matches!(fx.store.sync_stack(unknown), Err(StoreError::UnknownStack(s)) if s == unknown));

    std::fs::write(root.join("a"), vec![1u8; 50_000]).unwrap();
    let first = m.checkpoint().unwrap();
    std::fs::write(root.join("b"), b"b").unwrap();
    let second = m.checkpoint().unwrap();
    // Deleting the first checkpoint keeps its layer, hollow, for the second.
    fx.store.delete_unreferenced(&[second]).unwrap();
    assert!(matches!(fx.store.sync_stack(first), Err(StoreError::Deleted(s)) if s == first));
    fx.store.sync_stack(second).unwrap();
    m.unmount().unwrap();
}

/// Generation `g` of the file the writer below writes it to: 6,000 bytes naming it.
fn content(g: usize) -> Vec<u8> {
    format!("{g:>11}\n").repeat(500).into_bytes()
}

/// Files the writer cycles through (so what it writes stays bounded however long it runs).
const FILES: usize = 100;

#[test]
fn checkpoints_sync_while_the_mount_keeps_writing_its_next_layer() {
    let Some((fx, _base, m, root)) = mounted(|_| {}) else {
        return;
    };
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, root) = (stop.clone(), root.clone());
        std::thread::spawn(move || {
            let mut g = 0;
            while !stop.load(Ordering::Relaxed) {
                std::fs::write(root.join(format!("f{}", g % FILES)), content(g)).unwrap();
                g += 1;
            }
            g
        })
    };
    let mut checkpoints = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(30));
        let cp = m.checkpoint().unwrap();
        // From another thread, as the daemon does, while the writer goes on.
        let store = fx.store.clone();
        let stats = std::thread::spawn(move || store.sync_stack(cp)).join().unwrap().unwrap();
        assert!(stats.files > 3, "{stats:?}");
        checkpoints.push(cp);
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    m.unmount().unwrap();

    // Each checkpoint holds whole generations of the files (one may be empty: a checkpoint between
    // its truncation and its write), newer than in the checkpoint before.
    let mut newest_before = 0;
    for (n, cp) in checkpoints.into_iter().enumerate() {
        let again = fx.mount(cp, &format!("again{n}"));
        let (mut newest, mut empty) = (0, 0);
        for f in 0..FILES {
            let Ok(got) = std::fs::read(again.mountpoint().join(format!("f{f}"))) else { continue };
            let g = String::from_utf8_lossy(&got[..got.len().min(12)]).trim().parse::<usize>().ok();
            match g {
                Some(g) if g % FILES == f && got == content(g) => newest = newest.max(g),
                None if got.is_empty() => empty += 1,
                _ => panic!("f{f} in checkpoint {n}: {} bytes, not one generation", got.len()),
            }
        }
        assert!(empty <= 1, "checkpoint {n}: {empty} empty files");
        assert!(newest >= newest_before && newest < written, "checkpoint {n}: generation {newest}");
        newest_before = newest;
        again.unmount().unwrap();
    }
}
