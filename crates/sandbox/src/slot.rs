//! Host-wide reservations shared by every daemon on the host (uid ranges, network addresses): slot `n` of
//! a kind is reserved while an `flock` on `<dir>/<n>.lock` is held — by the reserving process or by one that
//! inherited the descriptor, so a sandbox's init keeps its slots for as long as the sandbox lives.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("cannot use slot directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("all {0} slots are in use")]
    Exhausted(u32),
}

/// One reserved slot.
pub struct HostSlot {
    pub number: u32,
    lock: File,
}

impl HostSlot {
    /// Reserves the first free slot of `0..count` in `dir`, trying `preferred` first.
    pub fn reserve(dir: &Path, count: u32, preferred: Option<u32>) -> Result<HostSlot, SlotError> {
        std::fs::create_dir_all(dir).map_err(|source| SlotError::Dir { path: dir.into(), source })?;
        for number in preferred.into_iter().chain(0..count).filter(|s| *s < count) {
            let path = dir.join(format!("{number}.lock"));
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|source| SlotError::Dir { path: path.clone(), source })?;
            if lock.try_lock().is_ok() {
                return Ok(HostSlot { number, lock });
            }
        }
        Err(SlotError::Exhausted(count))
    }

    /// The descriptor that holds the reservation; a process that inherits it keeps the slot reserved.
    pub fn lock_fd(&self) -> BorrowedFd<'_> {
        self.lock.as_fd()
    }
}
