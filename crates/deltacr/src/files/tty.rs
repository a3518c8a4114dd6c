//! Terminals: pty slaves (/dev/pts/N). Captured with their settings (a hung-up one, whose master was
//! closed, is noted as such); at restore reopened by path, or made again or replaced by /dev/null as
//! the restore's [`PtyPlan`] decides, then made the controlling terminal of the session leaders that
//! had them, with their foreground process group.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use super::{io_err, FdOwner, FileError};
use crate::pty::{PtyAccess, PtyPlan};
use crate::restore::{NewProcess, RestoreError};
use crate::state::{Ctty, FdState, FileKind, OpenFile, PtyNode};
use crate::sys;

/// Unix98 pty slaves (/dev/pts/N) use majors 136..=143.
const PTS_MAJOR: u32 = 136;

/// The number N of pty slave /dev/pts/N with device number `major`:`minor`; None for another device.
pub fn pts_index(major: u32, minor: u32) -> Option<u32> {
    (PTS_MAJOR..PTS_MAJOR + 8).contains(&major).then(|| (major - PTS_MAJOR) * 256 + minor)
}

/// Captures fd `fd` of `owner` on pty slave number `index` (`link`: its /proc fd link).
pub(super) fn capture(
    owner: &FdOwner,
    fd: i32,
    link: &str,
    meta: &std::fs::Metadata,
    index: u32,
) -> Result<FileKind, FileError> {
    let err_io = |what| io_err(owner, fd, what);
    let tty = sys::dup_from(owner.host, fd).map_err(err_io("duplicate the terminal"))?;
    // Closing the master removes the node, hence " (deleted)".
    let path = link.trim_end_matches(" (deleted)").to_string();
    match sys::tty_get(tty.as_fd()) {
        Ok((termios, winsize)) => Ok(FileKind::Tty { path, index, node: PtyNode::of(meta), termios, winsize }),
        // A hung-up terminal (its master was closed) answers every request with EIO.
        Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(FileKind::HungUpTty { path, index }),
        Err(e) => Err(err_io("read the terminal settings")(e)),
    }
}

/// The controlling terminal of session leader `owner`, pty number `index`, whose foreground process
/// group is `foreground` (in the sandbox; None when it is not one of the tree's). The node is that of
/// the leader's fd on it, or, when it holds none, the one its path names.
pub fn controlling_tty(
    owner: &FdOwner,
    index: u32,
    foreground: Option<i32>,
    fds: &[FdState],
    files: &[OpenFile],
) -> Result<Ctty, FileError> {
    let held = fds.iter().find_map(|f| match &files[f.file as usize].kind {
        FileKind::Tty { path, index: i, node, .. } if *i == index => Some((path.clone(), *node)),
        _ => None,
    });
    let (path, node) = match held {
        Some(held) => held,
        None => {
            let path = format!("/dev/pts/{index}");
            let meta =
                sys::stat_in_root(owner.host, &path).map_err(io_err(owner, -1, "find its controlling terminal"))?;
            (path, PtyNode::of(&meta))
        }
    };
    Ok(Ctty { index, path, node, foreground })
}

impl NewProcess {
    /// Opens a terminal file for fd `target` with its settings; /dev/null when the terminal is lost
    /// (or was hung up at checkpoint time). Returns the fd.
    pub(super) fn open_terminal(
        &mut self,
        target: i32,
        of: &OpenFile,
        ptys: &mut PtyPlan,
    ) -> Result<i32, RestoreError> {
        let FileKind::Tty { path, index, termios, winsize, .. } = &of.kind else {
            return self.open_null(target, of.flags);
        };
        match self.reach_pty(target, path, *index, of.flags, ptys)? {
            Some(tmp) => {
                let io = |what| self.io_err(target, what);
                let tty = sys::dup_from(self.host, tmp).map_err(io("reach the terminal"))?;
                sys::tty_set(tty.as_fd(), termios, *winsize).map_err(io("set the terminal's settings"))?;
                Ok(tmp)
            }
            None => self.open_null(target, of.flags),
        }
    }

    /// Opens pty slave `path` (never acquiring it as controlling terminal by accident: that is done
    /// explicitly) and checks it is pty number `index`. Returns the fd and the slave's node.
    fn open_tty(&mut self, target: i32, path: &str, index: u32, flags: i32) -> Result<(i32, PtyNode), RestoreError> {
        let wrong = |meta: &std::fs::Metadata| {
            let is_index = pts_index(libc::major(meta.rdev()), libc::minor(meta.rdev())) == Some(index);
            (!is_index).then(|| format!("{path} is not pty {index} any more"))
        };
        let (fd, meta) = self.reopen(target, path, flags | libc::O_NOCTTY, "reopen the terminal", wrong)?;
        Ok((fd, PtyNode::of(&meta)))
    }

    /// Opens the slave of pty `index` (creating the pty first when the plan says so). None when the
    /// terminal is lost (the caller uses /dev/null).
    fn reach_pty(
        &mut self,
        target: i32,
        path: &str,
        index: u32,
        flags: i32,
        ptys: &mut PtyPlan,
    ) -> Result<Option<i32>, RestoreError> {
        let master = match ptys.access(index) {
            PtyAccess::Lost => return Ok(None),
            PtyAccess::Reopen => None,
            PtyAccess::Create => match self.create_pty(target, index)? {
                Ok(master) => Some(master),
                Err(why) => {
                    ptys.cannot_create(index, why);
                    return Ok(None);
                }
            },
        };
        let (fd, node) = self.open_tty(target, path, index, flags)?;
        if let Some(master) = master {
            ptys.created(index, master, node);
        }
        Ok(Some(fd))
    }

    /// Creates pty `index` in the process's devpts: devpts gives each new pty the lowest free number,
    /// so /dev/ptmx is opened until `index` comes out (the others are closed again). Returns the new
    /// master (the tracer's; the process keeps none), or why the pty cannot be made.
    fn create_pty(&mut self, target: i32, index: u32) -> Result<Result<OwnedFd, String>, RestoreError> {
        let addr = self.scratch().write(0, b"/dev/ptmx\0").map_err(self.perr())?;
        let flags = (libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) as u64;
        let mut opened = Vec::new();
        let made = loop {
            let r = self.leader().syscall(libc::SYS_openat, &[libc::AT_FDCWD as u64, addr, flags, 0]);
            let r = r.map_err(self.perr())?.ret;
            if r < 0 {
                break Ok(Err(format!("opening /dev/ptmx: {}", std::io::Error::from_raw_os_error(-r as i32))));
            }
            opened.push(r as u64);
            let io = |what| self.io_err(target, what);
            let master = sys::dup_from(self.host, r as i32).map_err(io("reach a new pty"));
            let got = master.and_then(|m| Ok((sys::pty_index(m.as_fd()).map_err(io("read a new pty's number"))?, m)));
            match got {
                Err(e) => break Err(e),
                Ok((got, master)) if got == index => {
                    break rustix::pty::unlockpt(&master)
                        .map_err(|e| io("unlock the new pty")(e.into()))
                        .map(|()| Ok(master));
                }
                Ok((got, _)) if got > index => {
                    break Ok(Err(format!("devpts handed out pty {got}: number {index} is still in use")));
                }
                Ok(_) => {}
            }
        };
        for fd in opened {
            self.call(libc::SYS_close, &[fd])?;
        }
        made
    }

    /// Runs `f` with an fd of the process on its controlling terminal: one of its own, or a
    /// temporary one opened for the call. Does nothing when the terminal is lost.
    fn with_tty_fd(
        &mut self,
        ctty: &Ctty,
        own: &[FdState],
        files: &[OpenFile],
        ptys: &mut PtyPlan,
        f: impl FnOnce(&mut Self, i32) -> Result<(), RestoreError>,
    ) -> Result<(), RestoreError> {
        let mine = own
            .iter()
            .find(|fd| matches!(files[fd.file as usize].kind, FileKind::Tty { index, .. } if index == ctty.index));
        match mine {
            _ if ptys.access(ctty.index) == PtyAccess::Lost => Ok(()),
            Some(fd) => f(self, fd.fd),
            None => {
                let flags = libc::O_RDWR | libc::O_CLOEXEC;
                let Some(tmp) = self.reach_pty(-1, &ctty.path, ctty.index, flags, ptys)? else {
                    return Ok(());
                };
                let res = f(self, tmp);
                self.call(libc::SYS_close, &[tmp as u64])?;
                res
            }
        }
    }

    /// Makes the process's terminal its controlling terminal again (the process leads its session).
    pub fn set_controlling_tty(
        &mut self,
        ctty: &Ctty,
        own: &[FdState],
        files: &[OpenFile],
        ptys: &mut PtyPlan,
    ) -> Result<(), RestoreError> {
        self.with_tty_fd(ctty, own, files, ptys, |np, fd| {
            np.call(libc::SYS_ioctl, &[fd as u64, libc::TIOCSCTTY, 0]).map(drop)
        })
    }

    /// Gives the controlling terminal its foreground process group back.
    pub fn set_foreground(
        &mut self,
        ctty: &Ctty,
        own: &[FdState],
        files: &[OpenFile],
        ptys: &mut PtyPlan,
    ) -> Result<(), RestoreError> {
        let Some(fg) = ctty.foreground else {
            return Ok(());
        };
        let addr = self.scratch().write(0, &fg.to_ne_bytes()).map_err(self.perr())?;
        self.with_tty_fd(ctty, own, files, ptys, |np, fd| {
            np.call(libc::SYS_ioctl, &[fd as u64, libc::TIOCSPGRP, addr]).map(drop)
        })
    }
}
