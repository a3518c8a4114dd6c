//! File locks: flock and OFD locks belong to an open file description, POSIX locks to a process (one
//! entry per file, though fdinfo shows them on each of its fds). Captured from fdinfo; taken again
//! without blocking at restore.

use super::{FdOwner, FileError};
use crate::procfs::FdInfo;
use crate::restore::{NewProcess, RestoreError};
use crate::state::{FdState, FileLock, LockKind};

/// The locks listed in an fdinfo ("lock:\t1: POSIX  ADVISORY  WRITE 1234 fe:00:567 5 14").
pub(super) fn parse(info: &FdInfo, owner: &FdOwner, fd: i32) -> Result<Vec<FileLock>, FileError> {
    let unsupported = |reason: String| FileError::Unsupported { pid: owner.ns_pid, fd, reason };
    let mut out = Vec::new();
    for (_, v) in info.lines.iter().filter(|(k, _)| k == "lock") {
        let w: Vec<&str> = v.split_whitespace().collect();
        if w.len() < 8 {
            return Err(unsupported(format!("unreadable lock line {v:?}")));
        }
        let kind = match w[1] {
            "POSIX" => LockKind::Posix,
            "FLOCK" => LockKind::Flock,
            "OFDLCK" => LockKind::Ofd,
            other => return Err(unsupported(format!("{other} locks are not supported yet"))),
        };
        if w[2] != "ADVISORY" {
            return Err(unsupported(format!("{} locks are not supported yet", w[2])));
        }
        let write = match w[3] {
            "WRITE" => true,
            "READ" => false,
            other => return Err(unsupported(format!("lock type {other} is not supported yet"))),
        };
        let start = w[6].parse().map_err(|_| unsupported(format!("unreadable lock line {v:?}")))?;
        let end = if w[7] == "EOF" {
            None
        } else {
            Some(w[7].parse().map_err(|_| unsupported(format!("unreadable lock line {v:?}")))?)
        };
        out.push(FileLock { kind, write, start, end });
    }
    Ok(out)
}

impl NewProcess {
    /// Takes file lock `lock` through fd `fd` (non-blocking: the holders of conflicting locks were
    /// killed, so a conflict means something else holds the file).
    pub(super) fn apply_lock(&mut self, target: i32, fd: i32, lock: &FileLock) -> Result<(), RestoreError> {
        const F_OFD_SETLK: u64 = 37;
        if lock.kind == LockKind::Flock {
            let op = if lock.write { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
            self.call_file(target, "take its flock lock again", libc::SYS_flock, &[fd as u64, op as u64])?;
            return Ok(());
        }
        // struct flock: l_type, l_whence (i16 each), padding, l_start, l_len (i64), l_pid (i32), padding.
        let mut fl = Vec::with_capacity(32);
        fl.extend_from_slice(&(if lock.write { libc::F_WRLCK } else { libc::F_RDLCK } as i16).to_ne_bytes());
        fl.extend_from_slice(&(libc::SEEK_SET as i16).to_ne_bytes());
        fl.extend_from_slice(&[0u8; 4]);
        fl.extend_from_slice(&(lock.start as i64).to_ne_bytes());
        let len = lock.end.map_or(0, |e| e - lock.start + 1);
        fl.extend_from_slice(&(len as i64).to_ne_bytes());
        fl.extend_from_slice(&[0u8; 8]);
        let addr = self.scratch().write(0, &fl).map_err(self.perr())?;
        let cmd = if lock.kind == LockKind::Ofd { F_OFD_SETLK } else { libc::F_SETLK as u64 };
        self.call_file(target, "take its file lock again", libc::SYS_fcntl, &[fd as u64, cmd, addr])?;
        Ok(())
    }

    /// Takes the POSIX locks of the process's fds again. They belong to the process and go away when it
    /// closes any fd of the file, so this comes after the temporary fds are closed.
    pub(crate) fn restore_posix_locks(&mut self, fds: &[FdState]) -> Result<(), RestoreError> {
        for fd in fds {
            for lock in &fd.posix_locks {
                self.apply_lock(fd.fd, fd.fd, lock)?;
            }
        }
        Ok(())
    }
}
