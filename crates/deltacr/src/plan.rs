//! Planning a restore before touching anything: which process creates each process (its parent, or,
//! for a child of init in a session whose leader is not its parent, a process of that session), the
//! helpers that re-create sessions and process groups whose leader has exited, which process creates
//! each open file description (the lowest common ancestor of the processes using it, so children
//! inherit it by fork), the temporary fd numbers, and the checks that refuse trees we cannot rebuild
//! exactly.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::files::FdPlan;
use crate::state::{FileKind, ProcessEntry, ProcessKind, TreeState};

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
    /// How each process (by pid) is created.
    pub creators: HashMap<i32, Creator>,
    /// Sessions whose leader has exited (by session id), with the processes their helper creates.
    pub session_helpers: BTreeMap<i32, Vec<i32>>,
    /// Process groups whose leader has exited.
    pub group_helpers: Vec<GroupHelper>,
    /// What to create, in order: every process after its creator.
    pub steps: Vec<Step>,
}

/// How a process is created at restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creator {
    /// A child of init in its own session or in init's: a clone of its template, or a fork from init.
    Init,
    /// Forked by its parent.
    Parent,
    /// A child of init in a session it does not lead (e.g. a background job whose shell has exited):
    /// forked with CLONE_PARENT by `creator`, a child of init in that session — the session's leader,
    /// or the helper that re-creates the session when its leader has exited (then `creator` is the
    /// session id). A clone inherits its creator's session, and no process can move into another
    /// session afterwards.
    InSession { creator: i32 },
}

/// One step of a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Create the helper that re-creates session `sid`, whose leader has exited.
    SessionHelper { sid: i32 },
    /// Create `tree.processes[index]`.
    Process { index: usize },
}

/// A process group whose leader has exited: at restore, a helper with the leader's pid, created by
/// `creator` (a child of init in the group's session) with CLONE_PARENT, makes itself the group's
/// leader until the members have joined, then exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupHelper {
    pub pgid: i32,
    pub creator: i32,
}

/// Sessions and process groups of init itself (ids 0 and 1: init leads them, or they were made
/// outside the sandbox's pid namespace). Init is never restored, so they always exist.
fn is_init_id(id: i32) -> bool {
    id <= 1
}

/// Plans the restore of `tree` (processes ordered parents first; pid 1 is the sandbox's init).
pub fn plan(tree: &TreeState) -> Result<RestorePlan, PlanError> {
    let mut out = RestorePlan::default();
    plan_processes(tree, &mut out)?;
    // Parents in the restore: a process's creator (session helpers are children of init).
    let parent: HashMap<i32, i32> = tree
        .processes
        .iter()
        .map(|p| match out.creators[&p.pid] {
            Creator::InSession { creator } => (p.pid, creator),
            Creator::Init | Creator::Parent => (p.pid, p.ppid),
        })
        .chain(out.session_helpers.keys().map(|&sid| (sid, 1)))
        .collect();
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
        let lca_of = |pids: &[i32]| -> Option<i32> {
            let mut common: Option<Vec<i32>> = None;
            for pid in pids {
                let chain = ancestors(*pid);
                common = Some(match common {
                    None => chain,
                    Some(c) => c.into_iter().filter(|a| chain.contains(a)).collect(),
                });
            }
            common.and_then(|c| c.into_iter().find(|a| live.contains_key(a) || out.session_helpers.contains_key(a)))
        };
        let creators = match lca_of(&pids) {
            Some(lca) => vec![lca],
            // A FIFO is a meeting point by name: processes in separate subtrees of init (e.g. a daemon
            // started with `setsid cmd &` from a shell session, which keeps the session's FIFOs) each
            // reopen it, one description per subtree.
            None if matches!(tree.files[unit as usize].kind, FileKind::Fifo { .. }) => {
                let mut subtrees: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
                for &pid in &pids {
                    let top = ancestors(pid)
                        .into_iter()
                        .rev()
                        .find(|a| live.contains_key(a) || out.session_helpers.contains_key(a));
                    subtrees.entry(top.unwrap_or(pid)).or_default().push(pid);
                }
                subtrees.values().map(|members| lca_of(members)).collect::<Option<Vec<i32>>>().unwrap_or_default()
            }
            None => vec![],
        };
        if creators.is_empty() {
            let p = live[&pids[0]];
            return Err(PlanError {
                pid: p.pid,
                comm: p.comm.clone(),
                reason: format!(
                    "an open file is shared with processes {pids:?} outside its subtree (not supported yet)"
                ),
            });
        }
        for lca in creators {
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
    }
    out.fds.base = max_fd + 1;
    out.fds.count = tree.files.len() as i32;
    Ok(out)
}

/// Decides how each process is created, which sessions and process groups need a helper, and the
/// order of creation; refuses what cannot be rebuilt exactly.
fn plan_processes(tree: &TreeState, out: &mut RestorePlan) -> Result<(), PlanError> {
    let by_pid: HashMap<i32, &ProcessEntry> = tree.processes.iter().map(|p| (p.pid, p)).collect();
    let is_live = |p: &ProcessEntry| matches!(p.kind, ProcessKind::Live(_));
    let child_of_init = |p: &ProcessEntry| !by_pid.contains_key(&p.ppid);
    for p in &tree.processes {
        let err = |reason: String| PlanError { pid: p.pid, comm: p.comm.clone(), reason };
        let parent = by_pid.get(&p.ppid).copied();
        let creator = match (is_live(p), parent) {
            (_, Some(pe)) if is_live(pe) => {
                if p.sid != pe.sid && p.sid != p.pid {
                    return Err(err(format!("session {} is neither its parent's nor its own", p.sid)));
                }
                if !is_live(p) {
                    if p.pgid != pe.pgid && p.pgid != p.pid {
                        return Err(err(format!("zombie in process group {} of another process", p.pgid)));
                    }
                    out.zombie_parents.insert(pe.pid);
                }
                Creator::Parent
            }
            (false, _) => return Err(err("a zombie whose parent is init is not restored (init reaps it)".into())),
            (true, Some(pe)) => return Err(err(format!("its parent {} is a zombie", pe.pid))),
            (true, None) if p.sid == p.pid || is_init_id(p.sid) => Creator::Init,
            (true, None) => match by_pid.get(&p.sid) {
                None => {
                    out.session_helpers.entry(p.sid).or_default().push(p.pid);
                    Creator::InSession { creator: p.sid }
                }
                Some(leader) if is_live(leader) && child_of_init(leader) => Creator::InSession { creator: leader.pid },
                Some(leader) => {
                    let what = if is_live(leader) { "not a child of init" } else { "a zombie" };
                    return Err(err(format!(
                        "the leader of its session {} is {what}, and it is not that leader's child (not supported yet)",
                        p.sid
                    )));
                }
            },
        };
        out.creators.insert(p.pid, creator);
    }
    // Groups whose leader has exited; a session helper leads the group with its own id.
    let mut dead_groups: BTreeMap<i32, &ProcessEntry> = BTreeMap::new();
    for p in &tree.processes {
        let exists = is_init_id(p.pgid)
            || by_pid.contains_key(&p.pgid)
            || (p.pgid == p.sid && out.session_helpers.contains_key(&p.sid));
        if !exists {
            dead_groups.entry(p.pgid).or_insert(p);
        }
    }
    for (pgid, member) in dead_groups {
        let creator = if out.session_helpers.contains_key(&member.sid) {
            Some(member.sid)
        } else {
            tree.processes.iter().find(|q| q.sid == member.sid && is_live(q) && child_of_init(q)).map(|q| q.pid)
        };
        let Some(creator) = creator else {
            return Err(PlanError {
                pid: member.pid,
                comm: member.comm.clone(),
                reason: format!(
                    "process group {pgid} has no leader any more and no process of its session {} is a child \
                     of init (not supported yet)",
                    member.sid
                ),
            });
        };
        out.group_helpers.push(GroupHelper { pgid, creator });
    }
    // Creation order: the checkpoint's order (parents first), each process after its creator, and
    // each session helper just before the first process it creates.
    let mut placed: HashSet<i32> = HashSet::new();
    let mut pending: Vec<usize> = (0..tree.processes.len()).collect();
    while !pending.is_empty() {
        let before = pending.len();
        pending.retain(|&index| {
            let p = &tree.processes[index];
            let ready = match out.creators[&p.pid] {
                Creator::Init => true,
                Creator::Parent => placed.contains(&p.ppid),
                Creator::InSession { creator } if out.session_helpers.contains_key(&creator) => {
                    if placed.insert(creator) {
                        out.steps.push(Step::SessionHelper { sid: creator });
                    }
                    true
                }
                Creator::InSession { creator } => placed.contains(&creator),
            };
            if ready {
                placed.insert(p.pid);
                out.steps.push(Step::Process { index });
            }
            !ready
        });
        if pending.len() == before {
            let p = &tree.processes[pending[0]];
            return Err(PlanError {
                pid: p.pid,
                comm: p.comm.clone(),
                reason: "the processes that must create it are not in the checkpoint".into(),
            });
        }
    }
    Ok(())
}

/// The key of the pipe or socket pair an open file belongs to.
pub fn pair_key(kind: &FileKind) -> Option<u64> {
    match *kind {
        FileKind::Pipe { pipe, .. } => Some(pipe),
        FileKind::Unix { ino, peer: Some(peer), .. } => Some(ino.min(peer)),
        _ => None,
    }
}
