//! Planning a restore before touching anything: which process creates each open file description
//! (the lowest common ancestor of the processes using it, so children inherit it by fork), the
//! temporary fd numbers, and the checks that refuse trees we cannot rebuild exactly.

use std::collections::{HashMap, HashSet};

use crate::restore::FdPlan;
use crate::state::{FileKind, ProcessKind, TreeState};

/// Why a tree cannot be restored as it was.
#[derive(Debug, thiserror::Error)]
#[error("process {pid} ({comm}): {reason}")]
pub struct PlanError {
    pub pid: i32,
    pub comm: String,
    pub reason: String,
}

/// What the restore of a tree needs to know up front.
#[derive(Debug, Default)]
pub struct RestorePlan {
    pub fds: FdPlan,
    /// Per pid: the open file descriptions this process creates.
    pub create: HashMap<i32, Vec<u32>>,
    /// Pids of processes that get zombie children back.
    pub zombie_parents: HashSet<i32>,
}

/// Plans the restore of `tree` (processes ordered parents first; pid 1 is the sandbox's init).
pub fn plan(tree: &TreeState) -> Result<RestorePlan, PlanError> {
    let parent: HashMap<i32, i32> = tree.processes.iter().map(|p| (p.pid, p.ppid)).collect();
    let live: HashMap<i32, &crate::state::ProcessEntry> =
        tree.processes.iter().filter(|p| matches!(p.kind, ProcessKind::Live(_))).map(|p| (p.pid, p)).collect();
    let ancestors = |pid: i32| -> Vec<i32> {
        let mut chain = vec![pid];
        let mut cur = pid;
        while let Some(&pp) = parent.get(&cur) {
            chain.push(pp);
            cur = pp;
        }
        chain
    };
    let mut out = RestorePlan::default();
    let mut max_fd = 2;
    // Users of each description; both ends of a pipe are planned as one unit (the first end's id).
    let mut unit_of: HashMap<u32, u32> = HashMap::new();
    // Pipes (read end, write end) and connected unix socket pairs (lower inode, higher inode) are
    // created as one unit.
    for f in &tree.files {
        let (key, second) = match f.kind {
            FileKind::Pipe { pipe, write_end, .. } => (pipe, write_end),
            FileKind::Unix { ino, peer: Some(peer), .. } => (ino.min(peer), ino > peer),
            _ => continue,
        };
        let ends = out.fds.pairs.entry(key).or_default();
        let slot = if second { &mut ends.1 } else { &mut ends.0 };
        if slot.is_some() {
            return Err(PlanError {
                pid: 0,
                comm: String::new(),
                reason: format!("pipe or socket {key} has several open descriptions of one end (not supported yet)"),
            });
        }
        *slot = Some(f.id);
    }
    for f in &tree.files {
        let unit = match pair_key(&f.kind) {
            Some(key) => {
                let (a, b) = out.fds.pairs[&key];
                a.or(b).expect("a pair has an end")
            }
            None => f.id,
        };
        unit_of.insert(f.id, unit);
    }
    let mut users: HashMap<u32, Vec<i32>> = HashMap::new();
    for p in tree.processes.iter() {
        let ProcessKind::Live(st) = &p.kind else {
            continue;
        };
        for fd in &st.fds {
            max_fd = max_fd.max(fd.fd);
            users.entry(unit_of[&fd.file]).or_default().push(p.pid);
        }
    }
    for (unit, pids) in users {
        let mut common: Option<Vec<i32>> = None;
        for pid in &pids {
            let chain = ancestors(*pid);
            common = Some(match common {
                None => chain,
                Some(c) => c.into_iter().filter(|a| chain.contains(a)).collect(),
            });
        }
        let lca = common.and_then(|c| c.into_iter().find(|a| live.contains_key(a)));
        let Some(lca) = lca else {
            let p = live[&pids[0]];
            return Err(PlanError {
                pid: p.pid,
                comm: p.comm.clone(),
                reason: format!(
                    "an open file is shared with processes {pids:?} outside its subtree (not supported yet)"
                ),
            });
        };
        let create = out.create.entry(lca).or_default();
        create.push(unit);
        // The other end of a pipe or socket pair is created with it.
        if let Some(key) = pair_key(&tree.files[unit as usize].kind) {
            let (r, w) = out.fds.pairs[&key];
            for end in [r, w].into_iter().flatten() {
                if end != unit {
                    create.push(end);
                }
            }
        }
    }
    out.fds.base = max_fd + 1;
    out.fds.count = tree.files.len() as i32;
    for p in &tree.processes {
        let err = |reason: String| PlanError { pid: p.pid, comm: p.comm.clone(), reason };
        let parent_entry = tree.processes.iter().find(|q| q.pid == p.ppid);
        match &p.kind {
            ProcessKind::Zombie { .. } => {
                let Some(pe) = parent_entry.filter(|pe| matches!(pe.kind, ProcessKind::Live(_))) else {
                    return Err(err("a zombie whose parent is init is not restored (init reaps it)".into()));
                };
                if p.pgid != pe.pgid && p.pgid != p.pid {
                    return Err(err(format!("zombie in process group {} of another process", p.pgid)));
                }
                out.zombie_parents.insert(pe.pid);
            }
            ProcessKind::Live(_) => {
                if let Some(pe) = parent_entry {
                    if p.sid != pe.sid && p.sid != p.pid {
                        return Err(err(format!("session {} is neither its parent's nor its own", p.sid)));
                    }
                }
                if p.pgid != 0 && p.pgid != p.pid && !live.contains_key(&p.pgid) {
                    return Err(err(format!("process group {} has no leader any more (not supported yet)", p.pgid)));
                }
            }
        }
    }
    Ok(out)
}

/// The key of the pipe or socket pair an open file belongs to.
pub fn pair_key(kind: &FileKind) -> Option<u64> {
    match *kind {
        FileKind::Pipe { pipe, .. } => Some(pipe),
        FileKind::Unix { ino, peer: Some(peer), .. } => Some(ino.min(peer)),
        _ => None,
    }
}
