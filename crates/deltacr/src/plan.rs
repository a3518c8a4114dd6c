//! Planning a restore before touching anything: which process creates each process (its parent, or,
//! for a child of init in a session whose leader is not its parent, a process of that session), the
//! helpers that re-create sessions and process groups whose leader has exited, which process creates
//! each open file description (the lowest common ancestor of the processes using it, so children
//! inherit it by fork), the temporary fd numbers, and the checks that refuse trees we cannot rebuild
//! exactly.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::files::FdPlan;
use crate::state::{FileKind, ProcessEntry, ProcessKind, TreeState, VmaBacking};

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
    let live: HashMap<i32, &ProcessEntry> =
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
    // Per open file description (not unit): the processes holding it.
    let mut holders: HashMap<u32, Vec<i32>> = HashMap::new();
    for p in &tree.processes {
        let ProcessKind::Live(st) = &p.kind else {
            continue;
        };
        for fd in &st.fds {
            max_fd = max_fd.max(fd.fd);
            users.entry(unit_of[&fd.file]).or_default().push(p.pid);
            holders.entry(fd.file).or_default().push(p.pid);
        }
        // A shared memory object is made by the processes that map it as if they held it open.
        // (SysV segments are the IPC namespace's, made before any process.)
        let object_mapping = |v: &&crate::state::Vma| matches!(&v.backing, VmaBacking::SharedMemory { path, .. } if !crate::files::is_sysv(path));
        for v in st.vmas.iter().filter(object_mapping) {
            let Some(id) = crate::files::object_of(v, &tree.files) else {
                return Err(PlanError {
                    pid: p.pid,
                    comm: p.comm.clone(),
                    reason: format!("the shared memory it maps at {:#x} was not saved", v.start),
                });
            };
            users.entry(id).or_default().push(p.pid);
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
        let kind = &tree.files[unit as usize].kind;
        let ends = |key: u64| {
            let (r, w) = out.fds.pairs[&key];
            [r, w].into_iter().flatten().collect::<Vec<u32>>()
        };
        // A unix socket pair whose ends are held in different subtrees of init (a client connected to a
        // server): each end is made by the processes that hold it, and the second one passed the end the
        // first one made with its socketpair (see FdPlan::split).
        if let (None, Some(key), FileKind::Unix { .. }) = (lca_of(&pids), pair_key(kind), kind) {
            let makers: Option<Vec<(u32, i32)>> =
                ends(key).into_iter().map(|end| Some((end, lca_of(holders.get(&end)?)?))).collect();
            if let Some(makers) = makers {
                for (end, lca) in makers {
                    out.create.entry(lca).or_default().push(end);
                }
                out.fds.split.insert(key);
                continue;
            }
        }
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

#[cfg(test)]
mod tests {
    //! Trees built by hand: these run without root, in milliseconds.

    use super::*;
    use crate::state::{FdState, OpenFile, ProcessState};

    /// A live process (pid, parent, process group, session) holding `fds` as (fd, open file id).
    fn live(pid: i32, ppid: i32, pgid: i32, sid: i32, fds: &[(i32, u32)]) -> ProcessEntry {
        let st = ProcessState {
            cwd: "/".into(),
            root: "/".into(),
            fds: fds.iter().map(|&(fd, file)| FdState { fd, cloexec: false, file, posix_locks: Vec::new() }).collect(),
            dumpable: 1,
            exit_signal: libc::SIGCHLD,
            ..ProcessState::default()
        };
        ProcessEntry { pid, ppid, pgid, sid, comm: format!("p{pid}"), kind: ProcessKind::Live(Box::new(st)) }
    }

    fn zombie(pid: i32, ppid: i32, pgid: i32, sid: i32) -> ProcessEntry {
        ProcessEntry { pid, ppid, pgid, sid, comm: format!("z{pid}"), kind: ProcessKind::Zombie { exit_status: 0 } }
    }

    fn file(id: u32, kind: FileKind) -> OpenFile {
        OpenFile { id, flags: libc::O_RDONLY, pos: 0, kind, locks: Vec::new() }
    }

    fn regular(id: u32) -> OpenFile {
        file(id, FileKind::Path { path: format!("/f{id}"), dev: 1, inode: 100 + u64::from(id), mode: libc::S_IFREG })
    }

    fn pipe_end(id: u32, pipe: u64, write_end: bool) -> OpenFile {
        file(id, FileKind::Pipe { pipe, write_end, data: Vec::new(), readers_outside: false })
    }

    fn tree(processes: Vec<ProcessEntry>, files: Vec<OpenFile>) -> TreeState {
        TreeState { processes, files, last_pid: 100, ipc: Default::default() }
    }

    /// The pids of the processes in the plan's steps, with a session helper as `-sid`.
    fn order(t: &TreeState, p: &RestorePlan) -> Vec<i32> {
        p.steps
            .iter()
            .map(|s| match *s {
                Step::SessionHelper { sid } => -sid,
                Step::Process { index } => t.processes[index].pid,
            })
            .collect()
    }

    /// Plans `t`, which must be refused for process `pid` with a reason that contains `why`.
    fn assert_refused(t: &TreeState, pid: i32, why: &str) {
        let e = plan(t).expect_err("the tree must be refused");
        assert_eq!(e.pid, pid, "{e}");
        assert!(e.reason.contains(why), "{e}");
    }

    #[test]
    fn parents_are_created_before_their_children() {
        let t = tree(vec![live(2, 1, 2, 2, &[]), live(3, 2, 2, 2, &[]), live(4, 3, 4, 2, &[])], vec![]);
        let p = plan(&t).unwrap();
        assert_eq!(order(&t, &p), [2, 3, 4]);
        assert_eq!(p.creators[&2], Creator::Init);
        assert_eq!(p.creators[&3], Creator::Parent);
        assert_eq!(p.creators[&4], Creator::Parent);
        assert!(p.session_helpers.is_empty() && p.group_helpers.is_empty());
    }

    #[test]
    fn a_child_of_init_in_another_session_is_created_after_that_sessions_leader() {
        // 3 is a background job whose shell (2) is its session's leader; the checkpoint listed it first.
        let t = tree(vec![live(3, 1, 3, 2, &[]), live(2, 1, 2, 2, &[])], vec![]);
        let p = plan(&t).unwrap();
        assert_eq!(order(&t, &p), [2, 3]);
        assert_eq!(p.creators[&3], Creator::InSession { creator: 2 });
        assert_eq!(p.creators[&2], Creator::Init);
    }

    #[test]
    fn a_session_whose_leader_exited_is_made_by_a_helper_before_its_members() {
        // Session 4's leader has exited; 5 leads group 4 (the session's id, led by the helper) and 6 its own.
        let t = tree(vec![live(5, 1, 4, 4, &[]), live(6, 1, 6, 4, &[])], vec![]);
        let p = plan(&t).unwrap();
        assert_eq!(order(&t, &p), [-4, 5, 6]);
        assert_eq!(p.session_helpers[&4], [5, 6]);
        assert_eq!(p.creators[&5], Creator::InSession { creator: 4 });
        assert!(p.group_helpers.is_empty(), "the session helper leads group 4: {:?}", p.group_helpers);
    }

    #[test]
    fn a_group_whose_leader_exited_gets_a_helper_from_its_session() {
        // A pipeline (group 7) of shell 2, whose first process has exited.
        let t = tree(vec![live(2, 1, 2, 2, &[]), live(8, 2, 7, 2, &[]), live(9, 2, 7, 2, &[])], vec![]);
        let p = plan(&t).unwrap();
        assert_eq!(p.group_helpers, [GroupHelper { pgid: 7, creator: 2 }]);
        assert_eq!(order(&t, &p), [2, 8, 9]);
    }

    #[test]
    fn zombies_are_created_by_their_parent_which_is_marked() {
        let t = tree(vec![live(2, 1, 2, 2, &[]), zombie(3, 2, 2, 2)], vec![]);
        let p = plan(&t).unwrap();
        assert_eq!(p.creators[&3], Creator::Parent);
        assert!(p.zombie_parents.contains(&2));
        assert_eq!(order(&t, &p), [2, 3]);
    }

    #[test]
    fn a_shared_file_is_created_by_the_lowest_common_ancestor() {
        // 2 has children 3 and 4, which share file 0; file 1 is 4's alone.
        let t = tree(
            vec![live(2, 1, 2, 2, &[]), live(3, 2, 2, 2, &[(0, 0)]), live(4, 2, 2, 2, &[(5, 0), (9, 1)])],
            vec![regular(0), regular(1)],
        );
        let p = plan(&t).unwrap();
        assert_eq!(p.create.get(&2), Some(&vec![0]));
        assert_eq!(p.create.get(&4), Some(&vec![1]));
        assert_eq!(p.create.get(&3), None);
        assert_eq!((p.fds.base, p.fds.count), (10, 2), "temporary fds start above the highest fd");
        assert_eq!(p.fds.temp(1), 11);
    }

    #[test]
    fn both_ends_of_a_pipe_are_created_together_by_their_common_ancestor() {
        // A shell (2) and a pipeline of its children: 3 writes into the pipe, 4 reads from it.
        let t = tree(
            vec![live(2, 1, 2, 2, &[]), live(3, 2, 3, 2, &[(1, 1)]), live(4, 2, 3, 2, &[(0, 0)])],
            vec![pipe_end(0, 77, false), pipe_end(1, 77, true)],
        );
        let p = plan(&t).unwrap();
        assert_eq!(p.fds.pairs[&77], (Some(0), Some(1)));
        assert_eq!(p.create.get(&2), Some(&vec![0, 1]));
        assert_eq!(p.create.len(), 1);
    }

    #[test]
    fn a_fifo_shared_by_separate_subtrees_is_opened_once_in_each() {
        let fifo = file(0, FileKind::Fifo { path: "/f".into(), inode: 5, data: Vec::new(), readers_outside: false });
        let t = tree(vec![live(2, 1, 2, 2, &[(3, 0)]), live(3, 1, 3, 3, &[(4, 0)])], vec![fifo]);
        let p = plan(&t).unwrap();
        assert_eq!(p.create.get(&2), Some(&vec![0]));
        assert_eq!(p.create.get(&3), Some(&vec![0]));
    }

    #[test]
    fn a_socket_pair_between_separate_subtrees_is_split_between_its_holders() {
        // A client (2, with a child 4 sharing its end) connected to a server (3), both children of init.
        let end = |id: u32, ino: u64, peer: u64| {
            let kind = FileKind::Unix {
                ino,
                sock_type: libc::SOCK_STREAM,
                name: None,
                listening: None,
                peer: Some(peer),
                queue: vec![],
            };
            file(id, kind)
        };
        let t = tree(
            vec![live(2, 1, 2, 2, &[(5, 0)]), live(3, 1, 3, 3, &[(6, 1)]), live(4, 2, 2, 2, &[(5, 0)])],
            vec![end(0, 10, 11), end(1, 11, 10)],
        );
        let p = plan(&t).unwrap();
        assert!(p.fds.split.contains(&10));
        assert_eq!((p.create.get(&2), p.create.get(&3)), (Some(&vec![0]), Some(&vec![1])));
        // Within one subtree the pair is made whole by the common ancestor.
        let t = tree(vec![live(2, 1, 2, 2, &[]), live(3, 2, 2, 2, &[(5, 0)]), live(4, 2, 2, 2, &[(6, 1)])], t.files);
        let p = plan(&t).unwrap();
        assert!(p.fds.split.is_empty());
        assert_eq!(p.create.get(&2), Some(&vec![0, 1]));
    }

    #[test]
    fn a_file_shared_by_separate_subtrees_is_refused() {
        let t = tree(vec![live(2, 1, 2, 2, &[(3, 0)]), live(3, 1, 3, 3, &[(4, 0)])], vec![regular(0)]);
        assert_refused(&t, 2, "shared with processes [2, 3] outside its subtree");
    }

    #[test]
    fn two_descriptions_of_one_pipe_end_are_refused() {
        let t = tree(vec![live(2, 1, 2, 2, &[(3, 0), (4, 1)])], vec![pipe_end(0, 77, false), pipe_end(1, 77, false)]);
        assert_refused(&t, 0, "several open descriptions of one end");
    }

    #[test]
    fn a_zombie_child_of_init_is_refused() {
        assert_refused(&tree(vec![zombie(3, 1, 3, 3)], vec![]), 3, "init reaps it");
    }

    #[test]
    fn a_child_of_a_zombie_is_refused() {
        let t = tree(vec![live(2, 1, 2, 2, &[]), zombie(3, 2, 2, 2), live(4, 3, 2, 2, &[])], vec![]);
        assert_refused(&t, 4, "its parent 3 is a zombie");
    }

    #[test]
    fn a_session_neither_its_parents_nor_its_own_is_refused() {
        let t = tree(vec![live(2, 1, 2, 2, &[]), live(3, 2, 3, 9, &[])], vec![]);
        assert_refused(&t, 3, "session 9 is neither its parent's nor its own");
    }

    #[test]
    fn a_zombie_in_another_process_group_is_refused() {
        let t = tree(vec![live(2, 1, 2, 2, &[]), live(5, 2, 5, 2, &[]), zombie(3, 2, 5, 2)], vec![]);
        assert_refused(&t, 3, "zombie in process group 5 of another process");
    }

    #[test]
    fn a_child_of_init_whose_session_leader_is_not_a_child_of_init_is_refused() {
        // 3 leads session 3 as a child of 2; 4, in session 3, was reparented to init.
        let t = tree(vec![live(2, 1, 2, 2, &[]), live(3, 2, 3, 3, &[]), live(4, 1, 4, 3, &[])], vec![]);
        assert_refused(&t, 4, "the leader of its session 3 is not a child of init");
    }

    #[test]
    fn a_group_without_leader_nor_child_of_init_in_its_session_is_refused() {
        // Session 3 is led by 3, a child of 2: no child of init in it can re-create group 9.
        let t = tree(vec![live(2, 1, 2, 2, &[]), live(3, 2, 3, 3, &[]), live(4, 3, 9, 3, &[])], vec![]);
        assert_refused(&t, 4, "process group 9 has no leader any more");
    }
}
