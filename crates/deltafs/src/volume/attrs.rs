//! Attributes: ids as stored and as the host sees them, getattr/setattr and extended attributes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use nix::errno::Errno;

use super::{journal_node, OpResult, Volume};
use crate::node::{Ino, Node, Time};

/// Bytes of extended attribute names and values one inode may hold: they live in the server's
/// memory, so a sandbox must not grow them without bound (ext4 allows ~4 KiB, XFS 64 KiB values).
const XATTRS_MAX: u64 = 64 * 1024;

/// Translation between the ids stored (as the sandbox sees them) and the host ids the kernel uses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdMap {
    pub uid_base: u32,
    pub gid_base: u32,
}

const ID_RANGE: u32 = 65536;

const OVERFLOW_ID: u32 = 65534;

impl IdMap {
    fn to_host(base: u32, id: u32) -> u32 {
        if base == 0 {
            id
        } else if id < ID_RANGE {
            base + id
        } else {
            base + OVERFLOW_ID
        }
    }
    fn from_host(base: u32, id: u32) -> u32 {
        if base == 0 {
            id
        } else if (base..base + ID_RANGE).contains(&id) {
            id - base
        } else {
            OVERFLOW_ID
        }
    }
    pub fn uid_to_host(&self, id: u32) -> u32 {
        Self::to_host(self.uid_base, id)
    }
    pub fn gid_to_host(&self, id: u32) -> u32 {
        Self::to_host(self.gid_base, id)
    }
    pub fn uid_from_host(&self, id: u32) -> u32 {
        Self::from_host(self.uid_base, id)
    }
    pub fn gid_from_host(&self, id: u32) -> u32 {
        Self::from_host(self.gid_base, id)
    }
}

/// A SETATTR: the attributes to change (in stored ids; a time of `Some(None)` means now).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Option<Time>>,
    pub mtime: Option<Option<Time>>,
    pub ctime: Option<Time>,
    /// Clear set-user-ID and (for group-executable files) set-group-ID, as the VFS does on chown
    /// and on truncation by a caller without CAP_FSETID (FUSE_HANDLE_KILLPRIV_V2 leaves it to us).
    pub kill_suidgid: bool,
}

/// The mode without set-user-ID and, when group-executable, without set-group-ID (what a write,
/// truncate or chown leaves of a privileged mode).
pub(super) fn killed_suidgid(mode: u32) -> u32 {
    let mut mode = mode & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 {
        mode &= !libc::S_ISGID;
    }
    mode
}

/// Whether `mode` has bits a write, truncate or chown would clear.
pub(crate) fn has_suidgid(mode: u32) -> bool {
    killed_suidgid(mode) != mode
}

/// Who is asking, in stored ids.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    pub uid: u32,
    pub gid: u32,
}

impl Volume {
    pub fn getattr(&self, ino: Ino) -> OpResult<(Ino, Node)> {
        let st = self.state.read();
        Ok((ino, self.shown(&st, ino, st.node(ino)?)?))
    }

    pub fn setattr(&self, ino: Ino, change: AttrChange) -> OpResult<(Ino, Node)> {
        let mut st = self.state.write();
        if !change.size.is_some_and(|size| st.node(ino).is_ok_and(|n| size < n.size())) {
            st.room_to_add()?;
        }
        let now = Time::now();
        if let Some(size) = change.size {
            self.truncate(&mut st, ino, size)?;
        }
        // The node is journaled below, with its block count up to date.
        self.sync_blocks(&mut st, ino);
        let n = st.tree.get_mut(ino).ok_or(Errno::ENOENT)?;
        if let Some(mode) = change.mode {
            n.attr.mode = (n.attr.mode & libc::S_IFMT) | (mode & 0o7777);
        }
        if change.kill_suidgid {
            n.attr.mode = killed_suidgid(n.attr.mode);
        }
        if let Some(uid) = change.uid {
            n.attr.uid = uid;
        }
        if let Some(gid) = change.gid {
            n.attr.gid = gid;
        }
        if let Some(t) = change.atime {
            n.attr.atime = t.unwrap_or(now);
        }
        if let Some(t) = change.mtime {
            n.attr.mtime = t.unwrap_or(now);
        }
        n.attr.ctime = change.ctime.unwrap_or(now);
        let node = n.clone();
        st.pending.remove(&ino);
        st.log(&[journal_node(ino, &node)])?;
        Ok((ino, node))
    }

    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> OpResult<Vec<u8>> {
        let st = self.state.read();
        st.node(ino)?.xattrs.get(name.as_bytes()).cloned().ok_or(Errno::ENODATA)
    }

    pub fn listxattr(&self, ino: Ino) -> OpResult<Vec<u8>> {
        let st = self.state.read();
        let mut out = Vec::new();
        for name in st.node(ino)?.xattrs.keys() {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    pub fn setxattr(&self, ino: Ino, name: &OsStr, value: Option<&[u8]>, flags: i32) -> OpResult<()> {
        let mut st = self.state.write();
        if value.is_some() {
            st.room_to_add()?;
        }
        let key = name.as_bytes().to_vec();
        let old = st.node(ino)?;
        let old_bytes = old.xattr_bytes();
        let old_value = old.xattrs.get(&key).map(|v| (key.len() + v.len()) as u64);
        if let Some(v) = value {
            if flags & libc::XATTR_CREATE != 0 && old_value.is_some() {
                return Err(Errno::EEXIST);
            }
            if flags & libc::XATTR_REPLACE != 0 && old_value.is_none() {
                return Err(Errno::ENODATA);
            }
            let new_bytes = old_bytes - old_value.unwrap_or(0) + (key.len() + v.len()) as u64;
            if new_bytes > XATTRS_MAX {
                return Err(Errno::ENOSPC);
            }
            self.reserve(&mut st, new_bytes.div_ceil(512).saturating_sub(old_bytes.div_ceil(512)))?;
        }
        let n = st.tree.get_mut(ino).expect("checked");
        match value {
            Some(v) => {
                n.xattrs.insert(key, v.to_vec());
            }
            None => {
                if n.xattrs.remove(&key).is_none() {
                    return Err(Errno::ENODATA);
                }
            }
        }
        n.attr.ctime = Time::now();
        let rec = journal_node(ino, n);
        st.log(&[rec])
    }
}
