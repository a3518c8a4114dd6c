//! Files reopened by path: regular files, directories and the memory character devices (/dev/null,
//! zero, full, random, urandom). At restore the path must name the same inode again (the filesystem
//! was rolled back with the processes); regular files and directories get their offset back.

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use super::{Expect, FdOwner, FileError};
use crate::restore::{NewProcess, RestoreError};
use crate::state::{FileKind, OpenFile};

/// Character devices reopened by path: mem (1) covers /dev/null, zero, full, random, urandom.
const MEM_MAJOR: u32 = 1;

/// Captures fd `fd` of `owner` on `link` (an absolute path); refuses files that cannot be reopened.
pub(super) fn capture(owner: &FdOwner, fd: i32, link: &str, meta: &std::fs::Metadata) -> Result<FileKind, FileError> {
    let ft = meta.file_type();
    let ok = ft.is_file() || ft.is_dir() || (ft.is_char_device() && libc::major(meta.rdev()) == MEM_MAJOR);
    if !ok {
        return Err(FileError::Unsupported {
            pid: owner.ns_pid,
            fd,
            reason: format!("{link}: this kind of file is not supported yet"),
        });
    }
    Ok(FileKind::Path { path: link.to_string(), dev: meta.dev(), inode: meta.ino(), mode: meta.mode() })
}

impl NewProcess {
    /// Reopens a file by path for fd `target`, at its offset.
    pub(super) fn open_path(&mut self, target: i32, of: &OpenFile) -> Result<i32, RestoreError> {
        let FileKind::Path { path, inode, mode, .. } = &of.kind else {
            unreachable!("open_path is only called for files reopened by path")
        };
        let tmp = self.open_checked(target, path, of.flags, Expect::Inode(*inode))?;
        let kind = mode & libc::S_IFMT;
        if kind == libc::S_IFREG || kind == libc::S_IFDIR {
            self.call(libc::SYS_lseek, &[tmp as u64, of.pos, libc::SEEK_SET as u64])?;
        }
        Ok(tmp)
    }
}
