//! Open files and the kernel's references to inodes (lookups until FORGET, orphans).

use std::sync::atomic::Ordering;

use nix::errno::Errno;

use super::{OpResult, Volume};
use crate::node::Ino;

/// An open file (for opens the kernel tells the server about).
#[derive(Debug, Clone, Copy)]
pub(super) struct Handle {
    ino: Ino,
    /// Opened for writing: the kernel may hold dirty shared-mmap pages of the file.
    writable: bool,
}

/// How long after its removal an inode the kernel held is awaited (see [`Volume::wait_for_forgets`]).
pub(super) const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

impl Volume {
    pub fn open(&self, ino: Ino, writable: bool) -> OpResult<u64> {
        if self.state.read().node(ino)?.is_dir() {
            return Err(Errno::EISDIR);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle { ino, writable });
        Ok(fh)
    }

    /// Inodes open for writing (the only ones that can have dirty pages in the kernel).
    pub fn open_for_writing(&self) -> Vec<Ino> {
        let mut inos: Vec<Ino> = self.handles.lock().values().filter(|h| h.writable).map(|h| h.ino).collect();
        inos.sort_unstable();
        inos.dedup();
        inos
    }

    /// The FUSE generation to report for `ino`.
    pub fn generation(&self, ino: Ino) -> u64 {
        self.generations.lock().get(&ino).copied().unwrap_or(0)
    }

    /// Journals the file's size/time changes made by writes (close, fsync).
    pub fn flush(&self, ino: Ino) -> OpResult<()> {
        if !self.state.read().pending.contains(&ino) {
            return Ok(());
        }
        let mut st = self.state.write();
        self.flush_pending(&mut st, Some(ino))
    }

    pub fn release(&self, fh: u64) -> OpResult<()> {
        let handle = self.handles.lock().remove(&fh).ok_or(Errno::EBADF)?;
        self.flush(handle.ino)
    }

    /// The kernel took one more reference to `ino` (an entry reply other than `.`/`..`).
    pub fn remember(&self, ino: Ino) {
        *self.lookups.lock().entry(ino).or_insert(0) += 1;
    }

    /// The kernel dropped `count` references to `ino` (FORGET). An unlinked inode goes with the last.
    pub fn forget(&self, ino: Ino, count: u64) {
        {
            let mut lookups = self.lookups.lock();
            let Some(n) = lookups.get_mut(&ino) else {
                return;
            };
            *n = n.saturating_sub(count);
            if *n > 0 {
                return;
            }
            lookups.remove(&ino);
        }
        self.orphaned.lock().remove(&ino);
        if self.state.read().tree.get(ino).is_none_or(|n| n.attr.nlink != 0) {
            return;
        }
        let mut st = self.state.write();
        // Re-checked under the write lock: the kernel may have looked it up again meanwhile.
        let orphan = st.tree.get(ino).is_some_and(|n| n.attr.nlink == 0);
        if orphan && !self.lookups.lock().contains_key(&ino) {
            let mut records = Vec::new();
            self.free_inode(&mut st, ino, &mut records);
            if let Err(e) = st.log(&records) {
                tracing::warn!(ino, error = %e, "journaling a freed orphan");
            }
        }
    }

    /// Whether a file removed in the last moments still waits for the kernel to forget it.
    pub fn awaiting_forgets(&self) -> bool {
        self.orphaned.lock().values().any(|at| at.elapsed() < ORPHAN_GRACE)
    }

    /// Waits until the kernel has forgotten the files removed in the last moments (at most
    /// [`ORPHAN_GRACE`] after their removal; files still open stay). A removed file's blocks and
    /// inode come back at its FORGET, which the kernel can send after the remover's next request.
    pub fn wait_for_forgets(&self) {
        while self.awaiting_forgets() {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
}
