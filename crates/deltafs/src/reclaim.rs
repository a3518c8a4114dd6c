//! Frees the data of deleted checkpoints whose layers stay in the store for their descendants.
//!
//! A checkpoint's layer stays while a kept stack or a live mount descends from it: their trees are
//! replayed through its journal and may read its bytes. Once its own checkpoint is deleted the layer
//! is *hollow*: only the bytes some remaining tree points at are needed. The rest of its data files
//! and pack slots is punched out, and data files nothing points at are deleted.
//!
//! The trees that count (*views*) are the kept stacks and the stacks live mounts stand on. Nothing
//! can point at more of a hollow layer later: a hollow layer is never mounted again, and every new
//! stack grows from a live mount, whose tree comes from a view. So what the views read of a hollow
//! layer only shrinks, and only when a view below it goes away: a collection looks again only at
//! the hollow layers above a vanished view (and at new ones), and touches the files of those whose
//! read bytes changed since this process last reclaimed them.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use rustix::fs::FallocateFlags;

use crate::node::{Ino, Kind, LayerId, Node, Source, Tree, PACK_SLOT};
use crate::store::{io_err, pack_path, Store, StoreError};

/// Marks a hollow layer (its checkpoint was deleted): it can no longer be mounted or rolled back to.
pub(crate) const HOLLOW: &str = "hollow";

type Result<T> = std::result::Result<T, StoreError>;

/// What this process's earlier collections did, so that a collection redoes only what a vanished
/// view can have changed. Empty in a new process: its first collection looks at every hollow layer.
#[derive(Debug, Default)]
pub(crate) struct Memory {
    /// The views of the last completed collection.
    views: Option<HashSet<LayerId>>,
    /// Hollow layers reclaimed, with a fingerprint of what the views read of each then.
    reclaimed: HashMap<LayerId, u64>,
}

/// The parent links of the store's layers (also of those just deleted).
pub(crate) struct Family {
    parents: HashMap<LayerId, LayerId>,
    children: HashMap<LayerId, Vec<LayerId>>,
}

impl Family {
    pub fn new(parents: impl IntoIterator<Item = (LayerId, LayerId)>) -> Self {
        let parents: HashMap<LayerId, LayerId> = parents.into_iter().collect();
        let mut children: HashMap<LayerId, Vec<LayerId>> = HashMap::new();
        for (child, parent) in &parents {
            children.entry(*parent).or_default().push(*child);
        }
        Family { parents, children }
    }

    /// The layers `layer` is stacked on, nearest first.
    fn ancestors(&self, layer: LayerId) -> impl Iterator<Item = LayerId> + '_ {
        std::iter::successors(self.parents.get(&layer).copied(), |l| self.parents.get(l).copied())
    }

    /// `from` and every layer stacked (directly or not) on it.
    fn subtree(&self, from: LayerId) -> Vec<LayerId> {
        let mut out = vec![from];
        let mut i = 0;
        while let Some(id) = out.get(i).copied() {
            out.extend(self.children.get(&id).into_iter().flatten());
            i += 1;
        }
        out
    }

    /// The layers from `top` down to `bottom` (which descends from `top`), top first.
    fn path(&self, top: LayerId, bottom: LayerId) -> Vec<LayerId> {
        let mut path: Vec<LayerId> =
            std::iter::once(bottom).chain(self.ancestors(bottom).take_while(|l| *l != top)).collect();
        path.push(top);
        path.reverse();
        path
    }
}

/// What the views read of one hollow layer.
#[derive(Default)]
struct LayerRefs {
    /// Offset ranges of the data file of each inode.
    ranges: HashMap<Ino, Vec<(u64, u64)>>,
    /// Offsets of pack slots.
    slots: Vec<u64>,
}

impl LayerRefs {
    /// Sorts and merges the ranges and slots; returns a fingerprint of the result.
    fn settle(&mut self) -> u64 {
        for ranges in self.ranges.values_mut() {
            ranges.sort_unstable();
            ranges.dedup_by(|next, prev| {
                let overlaps = next.0 <= prev.1;
                if overlaps {
                    prev.1 = prev.1.max(next.1);
                }
                overlaps
            });
        }
        let mut hasher = DefaultHasher::new();
        let mut inos: Vec<Ino> = self.ranges.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            (ino, &self.ranges[&ino]).hash(&mut hasher);
        }
        self.slots.sort_unstable();
        self.slots.dedup();
        self.slots.hash(&mut hasher);
        hasher.finish()
    }
}

/// What the views read of the hollow layers looked at.
#[derive(Default)]
struct Refs(HashMap<LayerId, LayerRefs>);

impl Refs {
    fn note_node(&mut self, ino: Ino, node: &Node, layers: &HashSet<LayerId>) {
        let Kind::File(content) = &node.kind else { return };
        for region in content.regions(0, content.size) {
            match region.source {
                Some(Source::Layer(layer)) if layers.contains(&layer) => {
                    self.0.entry(layer).or_default().ranges.entry(ino).or_default().push((region.start, region.end));
                }
                Some(Source::Packed(layer, slot)) if layers.contains(&layer) => {
                    self.0.entry(layer).or_default().slots.push(slot);
                }
                _ => {}
            }
        }
    }

    /// Notes what `tree` reads of `layers`; `scanned` is a tree already noted that shares most of
    /// `tree`'s structure (only the inodes that differ from it are looked at).
    fn note_tree(&mut self, tree: &Tree, scanned: Option<&Tree>, layers: &HashSet<LayerId>) {
        match scanned {
            None => tree.nodes.iter().for_each(|(ino, node)| self.note_node(*ino, node, layers)),
            Some(old) => {
                for (ino, _, new) in old.changed_inodes(tree) {
                    if let Some(node) = new {
                        self.note_node(ino, &node, layers);
                    }
                }
            }
        }
    }
}

/// Frees what no view reads of the hollow layers' data; returns the bytes freed.
pub(crate) fn reclaim(
    store: &Store,
    memory: &mut Memory,
    hollow: &HashSet<LayerId>,
    views: &HashSet<LayerId>,
    family: &Family,
) -> Result<u64> {
    memory.reclaimed.retain(|layer, _| hollow.contains(layer));
    let mut look: HashSet<LayerId> = match memory.views.take() {
        None => hollow.clone(),
        Some(last) => {
            let mut look: HashSet<LayerId> =
                hollow.iter().copied().filter(|l| !memory.reclaimed.contains_key(l)).collect();
            for gone in last.difference(views) {
                look.extend(family.ancestors(*gone).filter(|l| hollow.contains(l)));
            }
            look
        }
    };
    let (mut refs, covered) = scan_views(store, &look, views, family)?;
    let mut freed = 0;
    for layer in look.drain().filter(|l| covered.contains(l)) {
        let mut read = refs.0.remove(&layer).unwrap_or_default();
        let fingerprint = read.settle();
        if memory.reclaimed.get(&layer) == Some(&fingerprint) {
            continue;
        }
        freed += reclaim_layer(store, layer, &read)?;
        memory.reclaimed.insert(layer, fingerprint);
    }
    memory.views = Some(views.clone());
    Ok(freed)
}

/// Notes what every view below the layers of `look` reads of them, and returns which layers of
/// `look` that covers (a layer with no view below would not be, though every kept layer has one).
/// The views below one topmost layer of `look` are reached from the deepest layer they all descend
/// from: its tree is loaded once, and each layer below it is its parent's tree plus its own journal,
/// so the trees share structure and each view costs only what differs from the one scanned before it.
fn scan_views(
    store: &Store,
    look: &HashSet<LayerId>,
    views: &HashSet<LayerId>,
    family: &Family,
) -> Result<(Refs, HashSet<LayerId>)> {
    let (mut refs, mut covered) = (Refs::default(), HashSet::new());
    for &top in look {
        if family.ancestors(top).any(|l| look.contains(&l)) {
            continue;
        }
        let subtree = family.subtree(top);
        let below: Vec<LayerId> = subtree.iter().copied().filter(|l| views.contains(l)).collect();
        let paths: Vec<Vec<LayerId>> = below.iter().map(|v| family.path(top, *v)).collect();
        let Some(first) = paths.first() else { continue };
        covered.extend(subtree.into_iter().filter(|l| look.contains(l)));
        let common = (0..first.len()).take_while(|i| paths.iter().all(|p| p.get(*i) == first.get(*i))).count();
        let start = first[common - 1];
        let needed: HashSet<LayerId> = paths.iter().flat_map(|p| p[common - 1..].iter().copied()).collect();
        let (format, meta) = store.read_meta_and_format(start)?;
        let mut pending = vec![(start, store.tree_of(start, format, &meta)?)];
        let mut scanned: Option<Tree> = None;
        while let Some((layer, tree)) = pending.pop() {
            if views.contains(&layer) {
                refs.note_tree(&tree, scanned.as_ref(), look);
                scanned = Some(tree.clone());
            }
            for child in family.children.get(&layer).into_iter().flatten().filter(|c| needed.contains(c)) {
                let mut child_tree = tree.clone();
                let (format, _) = store.read_meta_and_format(*child)?;
                store.replay(&mut child_tree, *child, format)?;
                pending.push((*child, child_tree));
            }
        }
    }
    Ok((refs, covered))
}

/// Deletes or punches out the data of `layer` that the views do not read; returns the bytes freed.
fn reclaim_layer(store: &Store, layer: LayerId, read: &LayerRefs) -> Result<u64> {
    let dir = store.layer_dir(layer);
    let data = dir.join("data");
    let entries = match std::fs::read_dir(&data) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        r => r.map_err(io_err(&data))?,
    };
    let mut freed = 0;
    for entry in entries {
        let entry = entry.map_err(io_err(&data))?;
        let path = entry.path();
        if path == pack_path(&dir) {
            let mut kept: Vec<(u64, u64)> = read.slots.iter().map(|slot| (*slot, slot + PACK_SLOT)).collect();
            freed += keep_only(&path, &mut kept).map_err(io_err(&path))?;
            continue;
        }
        if !entry.file_type().map_err(io_err(&path))?.is_dir() {
            continue;
        }
        let files = std::fs::read_dir(&path).map_err(io_err(&path))?;
        for file in files {
            let file = file.map_err(io_err(&path))?.path();
            let Some(ino) = file.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<Ino>().ok()) else {
                continue;
            };
            let mut kept = read.ranges.get(&ino).cloned().unwrap_or_default();
            freed += keep_only(&file, &mut kept).map_err(io_err(&file))?;
        }
        // Empty once every file in it went; a directory still in use stays.
        let _ = std::fs::remove_dir(&path);
    }
    Ok(freed)
}

/// Keeps only the byte ranges `kept` of the file at `path`: deletes the file when nothing is kept,
/// else punches holes between the ranges. Returns the bytes freed.
fn keep_only(path: &Path, kept: &mut [(u64, u64)]) -> io::Result<u64> {
    let before = std::fs::metadata(path)?;
    if kept.is_empty() {
        std::fs::remove_file(path)?;
        return Ok(before.blocks() * 512);
    }
    kept.sort_unstable();
    let file = File::options().write(true).open(path)?;
    let punch = |from: u64, to: u64| -> io::Result<()> {
        if to > from {
            match rustix::fs::fallocate(&file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, from, to - from)
            {
                // A store filesystem without hole punching (DeltaFS supports those) keeps the bytes.
                Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    };
    let mut pos = 0;
    for &(start, end) in kept.iter() {
        punch(pos, start.min(before.len()))?;
        pos = pos.max(end);
    }
    punch(pos, before.len())?;
    let after = file.metadata()?;
    Ok((before.blocks() * 512).saturating_sub(after.blocks() * 512))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settle_merges_ranges_and_fingerprints_the_result() {
        let mut a = LayerRefs::default();
        a.ranges.insert(5, vec![(100, 200), (0, 50), (50, 80), (150, 300)]);
        a.slots = vec![8192, 0, 8192];
        let fingerprint = a.settle();
        assert_eq!(a.ranges[&5], vec![(0, 80), (100, 300)]);
        assert_eq!(a.slots, vec![0, 8192]);
        let mut b = LayerRefs::default();
        b.ranges.insert(5, vec![(0, 80), (100, 300)]);
        b.slots = vec![0, 8192];
        assert_eq!(b.settle(), fingerprint);
        b.slots.pop();
        assert_ne!(b.settle(), fingerprint);
    }

    #[test]
    fn keep_only_punches_between_kept_ranges_and_deletes_what_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        std::fs::write(&path, vec![0xabu8; 1 << 20]).unwrap();
        let blocks = || std::fs::metadata(&path).unwrap().blocks() * 512;
        let before = blocks();
        let mut kept = vec![(512 << 10, (512 << 10) + 100), (0, 4096)];
        let freed = keep_only(&path, &mut kept).unwrap();
        assert_eq!(freed, before - blocks());
        assert!(blocks() <= 3 * 4096, "{} bytes still allocated", blocks());
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 1 << 20);
        let expect = |i: usize| if i < 4096 || (512 << 10..(512 << 10) + 100).contains(&i) { 0xab } else { 0 };
        assert!(data.iter().enumerate().all(|(i, b)| *b == expect(i)), "kept bytes changed or punched bytes remain");
        let before = blocks();
        assert_eq!(keep_only(&path, &mut []).unwrap(), before);
        assert!(!path.exists());
    }
}
