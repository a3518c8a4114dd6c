//! The quota: blocks charged to the tree, reservations before changes that add, statfs.

use nix::errno::Errno;

use super::{OpResult, State, Volume};
use crate::mount::{DiskUsage, Quota};
use crate::node::{dir_blocks, Content, Ino, Tree, PACK_SLOT};

/// The blocks a mount's tree is charged for its byte quota ([`Node::charged_blocks`]), counted
/// once at mount and then brought up to date by comparing the tree with the one last counted: the
/// cost follows what changed, also across a rollback (which swaps the tree). Between counts, every
/// change that can add blocks reserves an upper bound of what it adds, and the tree is counted
/// again only when that bound reaches the limit: far from it a change costs no count.
#[derive(Debug)]
pub(super) struct Charged {
    counted: Tree,
    blocks: u64,
    /// Blocks reserved since `counted` was counted: the tree is charged at most `blocks + since`.
    since: u64,
}

impl Charged {
    pub(super) fn of(tree: &Tree) -> Self {
        Charged { counted: tree.clone(), blocks: tree.nodes.values().map(|n| n.charged_blocks()).sum(), since: 0 }
    }

    /// Blocks charged to `tree`.
    fn update(&mut self, tree: &Tree) -> u64 {
        for (_, old, new) in self.counted.changed_inodes(tree) {
            let added = new.map_or(0, |n| n.charged_blocks());
            self.blocks = (self.blocks + added).saturating_sub(old.map_or(0, |n| n.charged_blocks()));
        }
        self.counted = tree.clone();
        self.since = 0;
        self.blocks
    }

    /// Reserves `want` blocks for a change of `tree` if the limit of `max` blocks has room for them.
    fn reserve(&mut self, tree: &Tree, want: u64, max: u64) -> bool {
        let fits = |used: u64| used.saturating_add(want) <= max;
        if !fits(self.blocks.saturating_add(self.since)) && !fits(self.update(tree)) {
            return false;
        }
        self.since = self.since.saturating_add(want);
        true
    }

    /// The tree was replaced by one whose growth was not reserved: count it at the next reservation.
    pub(super) fn forget_reservations(&mut self) {
        self.since = u64::MAX;
    }
}

impl Volume {
    /// Fails with `ENOSPC` unless `blocks` more 512-byte blocks fit in the byte quota.
    pub(super) fn reserve(&self, st: &mut State, blocks: u64) -> OpResult<()> {
        let (Some(limit), Some(usage)) = (self.quota.bytes, st.usage.as_mut()) else {
            return Ok(());
        };
        match blocks == 0 || usage.reserve(&st.tree, blocks, limit / 512) {
            true => Ok(()),
            false => Err(Errno::ENOSPC),
        }
    }

    /// Reserves what writing (or allocating) `[from, to)` of file `ino` can add: the store blocks
    /// it touches, less those the file already has there (looked up only when the first bound does
    /// not fit, so an overwrite on a full filesystem still works).
    pub(super) fn reserve_range(
        &self,
        st: &mut State,
        ino: Ino,
        content: &Content,
        (from, to): (u64, u64),
    ) -> OpResult<()> {
        if self.quota.bytes.is_none() || to <= from {
            return Ok(());
        }
        let (start, end) = (from / self.block_size * self.block_size, to.div_ceil(self.block_size) * self.block_size);
        let touched = (end - start) / 512;
        if self.reserve(st, touched).is_ok() {
            return Ok(());
        }
        let held = match content.pack_slot() {
            Some(_) if start < PACK_SLOT => content.blocks.min(touched),
            Some(_) => 0,
            None => self.allocated_in(ino, content, (start, end), |_| true)?,
        };
        self.reserve(st, touched.saturating_sub(held))
    }

    /// Fails with `ENOSPC` if the inode quota has no inode left.
    pub(super) fn reserve_inode(&self, st: &State) -> OpResult<()> {
        match self.quota.inodes {
            Some(max) if st.tree.nodes.len() as u64 >= max => Err(Errno::ENOSPC),
            _ => Ok(()),
        }
    }

    /// The blocks a directory grows by when it gets one more entry.
    pub(super) fn entry_growth(st: &State, dir: Ino) -> OpResult<u64> {
        let len = st.dir_entries(dir)?.len();
        Ok(dir_blocks(len + 1) - dir_blocks(len))
    }

    /// What the files use, as the quota counts it.
    pub fn usage(&self) -> DiskUsage {
        let mut guard = self.state.write();
        let st = &mut *guard;
        DiskUsage { bytes: st.usage.as_mut().map(|u| u.update(&st.tree) * 512), inodes: st.tree.nodes.len() as u64 }
    }

    /// The store's filesystem's figures, with the quota's limits in place of its size.
    pub fn statfs(&self) -> OpResult<rustix::fs::StatVfs> {
        let mut s = rustix::fs::statvfs(self.store.path()).map_err(|e| Errno::from_raw(e.raw_os_error()))?;
        if self.quota == Quota::default() {
            return Ok(s);
        }
        let used = self.usage();
        if let (Some(limit), Some(bytes)) = (self.quota.bytes, used.bytes) {
            let unit = s.f_frsize.max(1);
            let free = limit.saturating_sub(bytes) / unit;
            s.f_blocks = limit / unit;
            s.f_bfree = s.f_bfree.min(free);
            s.f_bavail = s.f_bavail.min(free);
        }
        if let Some(max) = self.quota.inodes {
            s.f_files = max;
            s.f_ffree = max.saturating_sub(used.inodes);
            s.f_favail = s.f_ffree;
        }
        Ok(s)
    }
}
