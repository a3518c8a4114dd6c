//! Pseudo-terminals at restore. A pty slave is reopened by path when its terminal still exists (its
//! master lives outside the tree, e.g. in the shim). When the terminal is gone, or its number now
//! belongs to another terminal, the fds on it become /dev/null and the process loses that controlling
//! terminal: the restore goes on and reports what it replaced, so a checkpoint stays restorable after
//! the client of an interactive shell left.

use std::collections::{HashMap, HashSet};
use std::io;

use nix::unistd::Pid;

use crate::state::{FileKind, ProcessKind, PtyNode, TreeState};

/// Why an fd on a pty (or a controlling terminal) was not restored as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyLoss {
    /// The terminal's master had been closed before the checkpoint (the terminal was hung up).
    HungUp,
    /// The terminal no longer exists in the sandbox (its master was closed after the checkpoint).
    Gone,
    /// The pty number now belongs to another terminal.
    Taken,
}

impl std::fmt::Display for PtyLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PtyLoss::HungUp => write!(f, "its master had been closed before the checkpoint"),
            PtyLoss::Gone => write!(f, "the terminal no longer exists"),
            PtyLoss::Taken => write!(f, "its number now belongs to another terminal"),
        }
    }
}

/// An fd of a restored process that now refers to /dev/null instead of a terminal, or (`fd` None) a
/// controlling terminal the process did not get back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Degraded {
    /// The process (pid in the sandbox).
    pub pid: i32,
    pub fd: Option<i32>,
    /// The terminal (`/dev/pts/N` as the process saw it).
    pub path: String,
    pub reason: PtyLoss,
}

impl std::fmt::Display for Degraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.fd {
            Some(fd) => {
                write!(f, "process {}, fd {fd}: {} replaced by /dev/null: {}", self.pid, self.path, self.reason)
            }
            None => write!(f, "process {}: lost its controlling terminal {}: {}", self.pid, self.path, self.reason),
        }
    }
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
#[error("cannot look at terminal {path} in the sandbox")]
pub struct PtyError {
    pub path: String,
    #[source]
    pub source: io::Error,
}

/// Which ptys of a tree can be restored as they were.
#[derive(Debug, Default)]
pub struct PtyPlan {
    lost: HashMap<u32, PtyLoss>,
}

impl PtyPlan {
    /// Looks up each terminal the tree uses (through fds or as a controlling terminal) in the sandbox
    /// whose init is `init` (host pid): it must be the very node of the checkpoint.
    pub fn new(tree: &TreeState, init: Pid) -> Result<PtyPlan, PtyError> {
        let mut plan = PtyPlan::default();
        let mut seen = HashSet::new();
        for (index, path, node) in used_ptys(tree) {
            if !seen.insert(index) {
                continue;
            }
            let loss = match std::fs::metadata(format!("/proc/{}/root{path}", init.as_raw())) {
                Ok(meta) if PtyNode::of(&meta) == node => continue,
                Ok(_) => PtyLoss::Taken,
                Err(e) if e.kind() == io::ErrorKind::NotFound => PtyLoss::Gone,
                Err(source) => return Err(PtyError { path: path.to_string(), source }),
            };
            plan.lost.insert(index, loss);
        }
        Ok(plan)
    }

    /// Why pty `index` cannot be restored, if it cannot.
    pub fn lost(&self, index: u32) -> Option<&PtyLoss> {
        self.lost.get(&index)
    }

    /// Why an open file of this kind is replaced by /dev/null, if it is.
    pub fn replaced(&self, kind: &FileKind) -> Option<PtyLoss> {
        match kind {
            FileKind::HungUpTty { .. } => Some(PtyLoss::HungUp),
            FileKind::Tty { index, .. } => self.lost(*index).cloned(),
            _ => None,
        }
    }

    /// Every fd and controlling terminal of `tree` the restore replaces.
    pub fn degraded(&self, tree: &TreeState) -> Vec<Degraded> {
        let mut out = Vec::new();
        for p in &tree.processes {
            let ProcessKind::Live(st) = &p.kind else {
                continue;
            };
            for fd in &st.fds {
                let kind = &tree.files[fd.file as usize].kind;
                if let (Some(reason), FileKind::Tty { path, .. } | FileKind::HungUpTty { path, .. }) =
                    (self.replaced(kind), kind)
                {
                    out.push(Degraded { pid: p.pid, fd: Some(fd.fd), path: path.clone(), reason });
                }
            }
            if let Some(ctty) = &st.ctty {
                if let Some(loss) = self.lost(ctty.index) {
                    out.push(Degraded { pid: p.pid, fd: None, path: ctty.path.clone(), reason: loss.clone() });
                }
            }
        }
        out
    }
}

/// (index, path, node) of every live terminal the tree refers to, with repeats.
fn used_ptys(tree: &TreeState) -> impl Iterator<Item = (u32, &str, PtyNode)> {
    let from_files = tree.files.iter().filter_map(|f| match &f.kind {
        FileKind::Tty { path, index, node, .. } => Some((*index, path.as_str(), *node)),
        _ => None,
    });
    let from_ctty = tree.processes.iter().filter_map(|p| match &p.kind {
        ProcessKind::Live(st) => st.ctty.as_ref().map(|c| (c.index, c.path.as_str(), c.node)),
        ProcessKind::Zombie { .. } => None,
    });
    from_files.chain(from_ctty)
}
