//! Pseudo-terminals at restore. A pty slave is reopened by path when its terminal still exists (its
//! master lives outside the tree, e.g. in the shim). When the terminal is gone (restoring into another
//! sandbox, or its master was closed), a pty with the same number is created in the sandbox by the
//! first restored process that needs it and its master is handed to the caller. When that is
//! impossible, or the number now belongs to another terminal, the fds on it become /dev/null and the
//! process loses that controlling terminal: the restore goes on and reports what it replaced, so a
//! checkpoint stays restorable after the client of an interactive shell left.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::OwnedFd;

use nix::unistd::Pid;

use crate::state::{FileKind, ProcessKind, PtyNode, TreeState};

/// Why an fd on a pty (or a controlling terminal) was not restored as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyLoss {
    /// The terminal's master had been closed before the checkpoint (the terminal was hung up).
    HungUp,
    /// The pty number now belongs to another terminal.
    Taken,
    /// The terminal no longer exists and a pty with its number could not be made (why).
    CannotCreate(String),
}

impl std::fmt::Display for PtyLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PtyLoss::HungUp => write!(f, "its master had been closed before the checkpoint"),
            PtyLoss::Taken => write!(f, "its number now belongs to another terminal"),
            PtyLoss::CannotCreate(why) => {
                write!(f, "the terminal no longer exists and a pty with its number cannot be made: {why}")
            }
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

/// What the restore does with a pty that is not reopened as it is.
#[derive(Debug)]
enum Fate {
    /// Make a new pty with the same number (the first process that needs it does) to stand for the
    /// one with this node.
    Create(PtyNode),
    /// Replace it by /dev/null.
    Lost(PtyLoss),
}

/// How the ptys of a tree come back, and the masters of those the restore created.
#[derive(Debug, Default)]
pub struct PtyPlan {
    /// Ptys not listed are reopened by path.
    fates: HashMap<u32, Fate>,
    masters: BTreeMap<u32, OwnedFd>,
    /// (node at checkpoint time, node of the pty made for it).
    aliases: Vec<(PtyNode, PtyNode)>,
}

/// How a restored process gets to a pty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtyAccess {
    /// Open its slave by path.
    Reopen,
    /// Create the pty, then open its slave.
    Create,
    /// Use /dev/null instead.
    Lost,
}

impl PtyPlan {
    /// Looks up each terminal the tree uses (through fds or as a controlling terminal) in the sandbox
    /// whose init is `init` (host pid): it is reopened when `/dev/pts/N` is the very node of the
    /// checkpoint (or the node an earlier restore made for it, as given by `aliases`), created when
    /// there is none, and lost when another terminal has the number.
    pub fn new(tree: &TreeState, init: Pid, aliases: &HashMap<PtyNode, PtyNode>) -> Result<PtyPlan, PtyError> {
        let mut plan = PtyPlan::default();
        let mut seen = std::collections::HashSet::new();
        for (index, path, node) in used_ptys(tree) {
            if !seen.insert(index) {
                continue;
            }
            let fate = match crate::sys::stat_in_root(init, path) {
                Ok(meta) if PtyNode::of(&meta) == node || aliases.get(&node) == Some(&PtyNode::of(&meta)) => continue,
                Ok(_) => Fate::Lost(PtyLoss::Taken),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Fate::Create(node),
                Err(source) => return Err(PtyError { path: path.to_string(), source }),
            };
            plan.fates.insert(index, fate);
        }
        Ok(plan)
    }

    /// How pty `index` is reached now.
    pub fn access(&self, index: u32) -> PtyAccess {
        match self.fates.get(&index) {
            None => PtyAccess::Reopen,
            Some(Fate::Create(_)) => PtyAccess::Create,
            Some(Fate::Lost(_)) => PtyAccess::Lost,
        }
    }

    /// Pty `index` was created (its slave's node is `node`): it is reopened from now on, and the
    /// caller gets its master.
    pub fn created(&mut self, index: u32, master: OwnedFd, node: PtyNode) {
        if let Some(Fate::Create(old)) = self.fates.remove(&index) {
            self.aliases.push((old, node));
        }
        self.masters.insert(index, master);
    }

    /// Pty `index` could not be created (why): it is replaced by /dev/null.
    pub fn cannot_create(&mut self, index: u32, why: String) {
        self.fates.insert(index, Fate::Lost(PtyLoss::CannotCreate(why)));
    }

    /// The masters of the ptys created, by number, and which node each stands for.
    pub fn into_created(self) -> (BTreeMap<u32, OwnedFd>, Vec<(PtyNode, PtyNode)>) {
        (self.masters, self.aliases)
    }

    fn lost(&self, index: u32) -> Option<&PtyLoss> {
        match self.fates.get(&index) {
            Some(Fate::Lost(loss)) => Some(loss),
            _ => None,
        }
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
