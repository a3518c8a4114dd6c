//! The checkpoint tree's pure logic: ancestry, depth, what deleting a sandbox frees, and which process
//! images a set of checkpoints needs. No I/O: unit-tested without root.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use crate::catalog::{CheckpointRecord, SandboxRecord};

/// How many ancestors checkpoint `id` has (`parents` maps each checkpoint to its parent). A cycle (a
/// corrupt catalog) ends the count instead of looping.
pub fn depth<'a>(parents: &HashMap<&'a str, Option<&'a str>>, mut id: &'a str) -> usize {
    let mut d = 0;
    while let Some(Some(parent)) = parents.get(id) {
        id = parent;
        d += 1;
        if d > parents.len() {
            break;
        }
    }
    d
}

/// `start` and the checkpoints it descends from, nearest first; `parent` gives a checkpoint's parent.
pub fn ancestors(start: Option<&str>, parent: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let mut chain: Vec<String> = Vec::new();
    let mut next = start.map(String::from);
    while let Some(id) = next.filter(|id| !chain.contains(id)) {
        next = parent(&id);
        chain.push(id);
    }
    chain
}

/// Checkpoints taken in sandbox `id` that no other sandbox (forked from one) or checkpoint (taken on
/// top of one) depends on: what removing the sandbox frees.
pub fn unused_checkpoints_of(id: &str, checkpoints: &[CheckpointRecord], sandboxes: &[SandboxRecord]) -> Vec<String> {
    let used: HashSet<&str> = sandboxes
        .iter()
        .filter(|s| s.id != id)
        .filter_map(|s| s.origin.as_deref())
        .chain(checkpoints.iter().filter(|c| c.sandbox != id).filter_map(|c| c.parent.as_deref()))
        .collect();
    checkpoints.iter().filter(|c| c.sandbox == id && !used.contains(c.id.as_str())).map(|c| c.id.clone()).collect()
}

/// `roots` and everything reachable from them through `parent` (e.g. the process images a set of
/// checkpoints needs: each image and its incremental parents).
pub fn closure<T: Copy + Eq + Hash>(roots: impl IntoIterator<Item = T>, parent: impl Fn(T) -> Option<T>) -> HashSet<T> {
    let mut needed = HashSet::new();
    for root in roots {
        let mut next = Some(root);
        while let Some(id) = next.filter(|id| needed.insert(*id)) {
            next = parent(id);
        }
    }
    needed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tests::{checkpoint, config, stack_of};

    fn sandbox(id: &str, origin: Option<&str>) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            config: config(sandbox::image::Digest::of(b"a")),
            stack: stack_of("s"),
            origin: origin.map(String::from),
            head: origin.map(String::from),
            created: 1,
            ports: vec![],
        }
    }

    #[test]
    fn depth_counts_ancestors_and_stops_on_a_cycle() {
        let parents: HashMap<&str, Option<&str>> =
            [("a", None), ("b", Some("a")), ("c", Some("b")), ("x", Some("y")), ("y", Some("x"))].into();
        assert_eq!([depth(&parents, "a"), depth(&parents, "b"), depth(&parents, "c")], [0, 1, 2]);
        assert!(depth(&parents, "x") <= parents.len() + 1);
        assert_eq!(depth(&parents, "unknown"), 0);
    }

    #[test]
    fn ancestors_are_nearest_first_and_a_cycle_ends_them() {
        let parent = |id: &str| match id {
            "c" => Some("b".to_string()),
            "b" => Some("a".to_string()),
            "x" => Some("y".to_string()),
            "y" => Some("x".to_string()),
            _ => None,
        };
        assert_eq!(ancestors(Some("c"), parent), ["c", "b", "a"]);
        assert_eq!(ancestors(Some("x"), parent), ["x", "y"]);
        assert!(ancestors(None, parent).is_empty());
    }

    #[test]
    fn removing_a_sandbox_frees_only_checkpoints_nothing_else_uses() {
        // s1 took c1 <- c2 <- c3; s2 was forked from c2 and took c4 on top of it; s3 forked from c3
        // was removed already.
        let checkpoints = [
            checkpoint("c1", "s1", None),
            checkpoint("c2", "s1", Some("c1")),
            checkpoint("c3", "s1", Some("c2")),
            checkpoint("c4", "s2", Some("c2")),
        ];
        let sandboxes = [sandbox("s1", None), sandbox("s2", Some("c2"))];
        // c2 is s2's origin and c4's parent; c1 and c3 are s1's alone.
        assert_eq!(unused_checkpoints_of("s1", &checkpoints, &sandboxes), ["c1", "c3"]);
        // s2's own checkpoint is free once s2 goes; s1's stay s1's.
        assert_eq!(unused_checkpoints_of("s2", &checkpoints, &sandboxes), ["c4"]);
        assert!(unused_checkpoints_of("s9", &checkpoints, &sandboxes).is_empty());
    }

    #[test]
    fn closure_keeps_every_parent_of_every_root_once() {
        let parent = |id: u32| (id > 0).then(|| id - 1);
        let needed = closure([3, 1], parent);
        assert_eq!(needed, [0, 1, 2, 3].into_iter().collect());
        // A cycle terminates.
        let needed = closure([7], |id: u32| Some(if id == 7 { 8 } else { 7 }));
        assert_eq!(needed, [7, 8].into_iter().collect());
    }
}
