//! Pipes and FIFOs. Their unread bytes are copied at checkpoint without being consumed (`tee`) and
//! kept on one open file of the pipe; a write end whose readers were all outside the tree is marked.
//! At restore both ends of a pipe are made together by one process (then placed at their temporary
//! fds) and refilled; a FIFO is reopened by name.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::unistd::pipe2;

use super::{io_err, Expect, FdOwner, FdPlan, FileError};
use crate::procfs::FdInfo;
use crate::restore::{NewProcess, RestoreError};
use crate::state::{FdState, FileKind, OpenFile};
use crate::sys;

/// An fd on pipe `pipe` (its inode).
pub(super) fn capture_pipe(owner: &FdOwner, fd: i32, pipe: u64) -> Result<FileKind, FileError> {
    let flags = FdInfo::read(owner.host, fd).and_then(|i| i.flags()).map_err(|source| FileError::Proc {
        pid: owner.ns_pid,
        fd,
        source,
    })?;
    let write_end = flags & libc::O_ACCMODE == libc::O_WRONLY;
    Ok(FileKind::Pipe { pipe, write_end, data: Vec::new(), readers_outside: false })
}

/// An fd on a FIFO (its unread bytes are read later, with those of pipes).
pub(super) fn capture_fifo(link: &str, meta: &std::fs::Metadata) -> FileKind {
    FileKind::Fifo { path: link.to_string(), inode: meta.ino(), data: Vec::new(), readers_outside: false }
}

/// Reads the unread bytes of every pipe and FIFO without consuming them (tee into a pipe of our own) and keeps
/// them on one of the pipe's open files, a read end when there is one.
pub(super) fn capture_data(
    owners: &[FdOwner],
    tables: &[Vec<FdState>],
    files: &mut [OpenFile],
) -> Result<(), FileError> {
    // pipe inode -> (file that keeps the data, an fd that reaches the pipe)
    let mut pipes: HashMap<u64, (usize, FdOwner, i32)> = HashMap::new();
    for (owner, table) in owners.iter().zip(tables) {
        for fds in table {
            let idx = fds.file as usize;
            let (pipe, write_end) = match files[idx].kind {
                FileKind::Pipe { pipe, write_end, .. } => (pipe, write_end),
                // A FIFO's data lives in its inode; any of its open files will do.
                FileKind::Fifo { inode, .. } => (inode, true),
                _ => continue,
            };
            let entry = pipes.entry(pipe).or_insert((idx, *owner, fds.fd));
            if !write_end {
                entry.0 = idx;
            }
        }
    }
    for (keeper, owner, fd) in pipes.into_values() {
        let bytes = peek_pipe(&owner, fd)?;
        if let FileKind::Pipe { data, .. } | FileKind::Fifo { data, .. } = &mut files[keeper].kind {
            *data = bytes;
        }
    }
    Ok(())
}

/// Marks the write ends of pipes and FIFOs whose readers are all outside the checkpointed processes
/// (see `FileKind::Pipe`): no read end of theirs is in the tree, and the kernel still counts readers.
pub(super) fn mark_outside_readers(
    owners: &[FdOwner],
    tables: &[Vec<FdState>],
    files: &mut [OpenFile],
) -> Result<(), FileError> {
    let write_only = |f: &OpenFile| f.flags & libc::O_ACCMODE == libc::O_WRONLY;
    // Pipes (by inode) and FIFOs (by inode) read inside the tree.
    let read_inside: HashSet<u64> = files
        .iter()
        .filter_map(|f| match f.kind {
            FileKind::Pipe { pipe, write_end: false, .. } => Some(pipe),
            FileKind::Fifo { inode, .. } if !write_only(f) => Some(inode),
            _ => None,
        })
        .collect();
    let mut checked = HashSet::new();
    for (owner, table) in owners.iter().zip(tables) {
        for fd in table {
            let f = &mut files[fd.file as usize];
            let key = match f.kind {
                FileKind::Pipe { pipe, write_end: true, .. } => pipe,
                FileKind::Fifo { inode, .. } if write_only(f) => inode,
                _ => continue,
            };
            if read_inside.contains(&key) || !checked.insert(fd.file) {
                continue;
            }
            let end = sys::dup_from(owner.host, fd.fd).map_err(io_err(owner, fd.fd, "duplicate the pipe"))?;
            let outside = sys::pipe_has_readers(end.as_fd()).map_err(io_err(owner, fd.fd, "poll the pipe"))?;
            if let FileKind::Pipe { readers_outside, .. } | FileKind::Fifo { readers_outside, .. } = &mut f.kind {
                *readers_outside = outside;
            }
        }
    }
    Ok(())
}

fn peek_pipe(owner: &FdOwner, fd: i32) -> Result<Vec<u8>, FileError> {
    let err_io = |what| io_err(owner, fd, what);
    let end = sys::dup_from(owner.host, fd).map_err(err_io("duplicate the pipe"))?;
    let reader: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(format!("/proc/self/fd/{}", end.as_raw_fd()))
        .map_err(err_io("open the pipe for reading"))?
        .into();
    let queued = sys::fionread(reader.as_fd()).map_err(err_io("count queued bytes"))?;
    if queued == 0 {
        return Ok(Vec::new());
    }
    let size = fcntl(reader.as_fd(), FcntlArg::F_GETPIPE_SZ).map_err(|e| err_io("read the pipe size")(e.into()))?;
    let (copy_rd, copy_wr) =
        pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(|e| err_io("make a pipe")(e.into()))?;
    fcntl(copy_wr.as_fd(), FcntlArg::F_SETPIPE_SZ(size)).map_err(|e| err_io("size a pipe")(e.into()))?;
    let copied = sys::tee(reader.as_fd(), copy_wr.as_fd(), queued).map_err(err_io("tee the pipe"))?;
    drop(copy_wr);
    let mut data = Vec::with_capacity(copied);
    File::from(copy_rd).read_to_end(&mut data).map_err(err_io("read the pipe copy"))?;
    if data.len() != queued {
        return Err(FileError::Unsupported {
            pid: owner.ns_pid,
            fd,
            reason: format!("pipe holds {queued} bytes but only {} could be copied", data.len()),
        });
    }
    Ok(data)
}

impl NewProcess {
    /// Reopens a FIFO by path with its original flags: whatever FIFO has that name now, as a FIFO is a
    /// meeting point by name (the shim makes its session FIFOs anew in another sandbox's /dev). A
    /// read-write open (which never blocks) is held meanwhile, so the real open does not wait for the
    /// other side; the saved bytes are written back when nothing is queued in the FIFO (its other
    /// users may be outside the sandbox). A write end whose readers were all outside
    /// (`readers_outside`) writes to /dev/null when no reader has the FIFO open now.
    pub(super) fn open_fifo(&mut self, target: i32, of: &OpenFile) -> Result<i32, RestoreError> {
        let FileKind::Fifo { path, data, readers_outside, .. } = &of.kind else {
            unreachable!("open_fifo is only called for FIFOs")
        };
        let both = self.open_checked(target, path, libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC, Expect::Fifo)?;
        let tmp = self.open_checked(target, path, of.flags, Expect::Fifo);
        let filled = match tmp {
            Ok(_) if !data.is_empty() => self.fill_fifo(target, both, data),
            _ => Ok(()),
        };
        self.call(libc::SYS_close, &[both as u64])?;
        filled?;
        let tmp = tmp?;
        if *readers_outside {
            let io = |what| self.io_err(target, what);
            let end = sys::dup_from(self.host, tmp).map_err(io("reach the FIFO"))?;
            if !sys::pipe_has_readers(end.as_fd()).map_err(io("poll the FIFO"))? {
                self.call(libc::SYS_close, &[tmp as u64])?;
                return self.open_null(target, of.flags);
            }
        }
        Ok(tmp)
    }

    /// Makes pipe `pipe` with both its ends at their temporary fds (an end no process holds is closed)
    /// and its unread bytes in it. A pipe whose only end is a write end with its readers outside the
    /// tree becomes /dev/null.
    pub(super) fn make_pipe_ends(
        &mut self,
        target: i32,
        pipe: u64,
        files: &[OpenFile],
        plan: &FdPlan,
    ) -> Result<(), RestoreError> {
        let ends = plan.pairs.get(&pipe).copied().unwrap_or((None, None));
        if let (None, Some(wid)) = ends {
            let end = &files[wid as usize];
            if matches!(end.kind, FileKind::Pipe { readers_outside: true, .. }) {
                let tmp = self.open_null(target, end.flags)?;
                self.place(tmp, plan.temp(wid))?;
                return Ok(());
            }
        }
        let (r, w) = self.make_pipe()?;
        let data = ends.0.map(|rid| &files[rid as usize]).and_then(|f| match &f.kind {
            FileKind::Pipe { data, .. } if !data.is_empty() => Some(data.as_slice()),
            _ => None,
        });
        if let Some(data) = data {
            self.fill_pipe(target, w, data)?;
        }
        for (end, fd) in [(ends.0, r), (ends.1, w)] {
            match end {
                Some(eid) => {
                    let settable = files[eid as usize].flags & (libc::O_NONBLOCK | libc::O_DIRECT | libc::O_ASYNC);
                    self.call(libc::SYS_fcntl, &[fd as u64, libc::F_SETFL as u64, settable as u64])?;
                    self.place(fd, plan.temp(eid))?;
                }
                None => {
                    self.call(libc::SYS_close, &[fd as u64])?;
                }
            }
        }
        Ok(())
    }

    fn make_pipe(&mut self) -> Result<(i32, i32), RestoreError> {
        let addr = self.scratch().addr;
        self.call(libc::SYS_pipe2, &[addr, 0])?;
        let b = self.scratch().read(0, 8).map_err(self.perr())?;
        let r = i32::from_ne_bytes(b[0..4].try_into().expect("4 bytes"));
        let w = i32::from_ne_bytes(b[4..8].try_into().expect("4 bytes"));
        Ok((r, w))
    }

    fn fill_fifo(&mut self, target: i32, fd: i32, data: &[u8]) -> Result<(), RestoreError> {
        let f = sys::dup_from(self.host, fd).map_err(self.io_err(target, "reach the FIFO"))?;
        let queued = sys::fionread(f.as_fd()).map_err(self.io_err(target, "count queued bytes"))?;
        if queued == 0 {
            self.fill_pipe(target, fd, data)?;
        }
        Ok(())
    }

    fn fill_pipe(&mut self, target: i32, write_end: i32, data: &[u8]) -> Result<(), RestoreError> {
        let io = |what| self.io_err(target, what);
        let w = sys::dup_from(self.host, write_end).map_err(io("reach the new pipe"))?;
        let size = fcntl(w.as_fd(), FcntlArg::F_GETPIPE_SZ).map_err(|e| io("read the pipe size")(e.into()))?;
        if (size as usize) < data.len() {
            fcntl(w.as_fd(), FcntlArg::F_SETPIPE_SZ(data.len() as i32)).map_err(|e| io("grow the pipe")(e.into()))?;
        }
        File::from(w).write_all(data).map_err(io("refill the pipe"))
    }
}
