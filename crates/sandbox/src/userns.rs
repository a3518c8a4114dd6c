//! User-namespace id ranges: every sandbox maps its ids `0..65536` to a host range no other sandbox
//! on this host uses, so sandboxes can never signal or ptrace each other's processes.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::slot::{HostSlot, SlotError};

/// Ids per sandbox.
pub const IDS_PER_SANDBOX: u32 = 65536;
/// First host id handed to sandboxes: above any id a distribution hands out to real users.
pub const FIRST_HOST_ID: u32 = 1 << 20;
/// Number of slots: keeps every host id below 2^31 (ids are signed in some interfaces).
pub const SLOTS: u32 = ((1u32 << 31) - FIRST_HOST_ID) / IDS_PER_SANDBOX;
/// Host-wide directory of slot locks, shared by every daemon on the host.
pub const DEFAULT_SLOT_DIR: &str = "/run/deltabox-uids";

#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error("cannot use uid slot directory {path}")]
    SlotDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("all {SLOTS} uid ranges are in use")]
    Exhausted,
    #[error("cannot write id map {path}")]
    WriteMap {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Ids `0..count` inside map to `host_base..host_base+count` on the host (uids and gids alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdMap {
    pub host_base: u32,
    pub count: u32,
}

impl IdMap {
    pub fn for_slot(slot: u32) -> IdMap {
        IdMap { host_base: FIRST_HOST_ID + slot * IDS_PER_SANDBOX, count: IDS_PER_SANDBOX }
    }

    /// Host id of the sandbox id `id`, if it is mapped.
    pub fn to_host(&self, id: u32) -> Option<u32> {
        (id < self.count).then(|| self.host_base + id)
    }

    /// Sandbox id of the host id `id`, if it is in the range.
    pub fn from_host(&self, id: u32) -> Option<u32> {
        id.checked_sub(self.host_base).filter(|&i| i < self.count)
    }

    fn line(&self) -> String {
        format!("0 {} {}\n", self.host_base, self.count)
    }

    /// Writes this map as uid_map and gid_map of process `pid` (which must be in a fresh user namespace).
    pub fn write_for(&self, pid: i32) -> Result<(), UsernsError> {
        for file in ["uid_map", "gid_map"] {
            let path = PathBuf::from(format!("/proc/{pid}/{file}"));
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut f| f.write_all(self.line().as_bytes()))
                .map_err(|source| UsernsError::WriteMap { path, source })?;
        }
        Ok(())
    }
}

/// An id range reserved for one sandbox, for as long as this value (or a process that inherited
/// its lock descriptor) lives.
pub struct UidSlot {
    pub slot: u32,
    pub map: IdMap,
    lock: HostSlot,
}

impl UidSlot {
    /// Reserves the first free slot, trying `preferred` first.
    pub fn reserve(dir: &Path, preferred: Option<u32>) -> Result<UidSlot, UsernsError> {
        let lock = HostSlot::reserve(dir, SLOTS, preferred).map_err(|e| match e {
            SlotError::Dir { path, source } => UsernsError::SlotDir { path, source },
            SlotError::Exhausted(_) => UsernsError::Exhausted,
        })?;
        Ok(UidSlot { slot: lock.number, map: IdMap::for_slot(lock.number), lock })
    }

    /// The descriptor that holds the reservation; a process that inherits it keeps the slot reserved.
    pub fn lock_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.lock.lock_fd()
    }
}
