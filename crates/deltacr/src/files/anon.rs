//! Anonymous-inode files: eventfd, signalfd, timerfd and epoll. Their state is read from fdinfo and
//! made again with the same syscalls; an epoll instance gets its interest list back once the process's
//! fds are in place.

use super::{FdPlan, FileError};
use crate::procfs::FdInfo;
use crate::restore::{NewProcess, RestoreError};
use crate::state::{EpollTarget, FdState, FileKind, OpenFile};

/// The state of an `anon_inode:KIND` file (from its fdinfo). Errors name no process: the caller adds it.
pub(super) fn capture(kind: &str, info: &FdInfo) -> Result<FileKind, FileError> {
    let bad =
        |what: &str| FileError::Unsupported { pid: 0, fd: 0, reason: format!("cannot parse {kind} fdinfo: {what}") };
    let field = |key: &str| info.get(key).map_err(|_| bad(key));
    let hex = |key: &str| field(key).and_then(|v| u64::from_str_radix(v.trim(), 16).map_err(|_| bad(key)));
    let dec = |key: &str| field(key).and_then(|v| v.trim().parse::<u64>().map_err(|_| bad(key)));
    let pair = |key: &str| -> Result<(u64, u64), FileError> {
        let v = field(key)?;
        let inner = v.trim().trim_start_matches('(').trim_end_matches(')');
        let (a, b) = inner.split_once(',').ok_or_else(|| bad(key))?;
        Ok((a.trim().parse().map_err(|_| bad(key))?, b.trim().parse().map_err(|_| bad(key))?))
    };
    match kind {
        "[eventfd]" => Ok(FileKind::EventFd {
            count: hex("eventfd-count")?,
            semaphore: info.get("eventfd-semaphore").is_ok_and(|v| v.trim() == "1"),
        }),
        "[signalfd]" => Ok(FileKind::SignalFd { mask: hex("sigmask")? }),
        "[timerfd]" => Ok(FileKind::TimerFd {
            clockid: dec("clockid")? as i32,
            ticks: dec("ticks")?,
            value: pair("it_value")?,
            interval: pair("it_interval")?,
        }),
        "[eventpoll]" => {
            let mut targets = Vec::new();
            // Lines look like "tfd:        3 events:       19 data:                3  pos:0 ino:40e".
            for (_, v) in info.lines.iter().filter(|(k, _)| k == "tfd") {
                let words: Vec<&str> = v.split_whitespace().collect();
                let get = |name: &str| words.iter().position(|w| *w == name).and_then(|i| words.get(i + 1));
                let fd = words.first().and_then(|w| w.parse().ok()).ok_or_else(|| bad("tfd"))?;
                let events =
                    get("events:").and_then(|w| u32::from_str_radix(w, 16).ok()).ok_or_else(|| bad("events"))?;
                let data = get("data:").and_then(|w| u64::from_str_radix(w, 16).ok()).ok_or_else(|| bad("data"))?;
                targets.push(EpollTarget { fd, events, data });
            }
            Ok(FileKind::Epoll { targets })
        }
        other => {
            Err(FileError::Unsupported { pid: 0, fd: 0, reason: format!("anon_inode:{other} is not supported yet") })
        }
    }
}

impl NewProcess {
    /// Creates an eventfd, signalfd, timerfd or epoll instance with the saved state; returns its fd.
    pub(super) fn make_anon(&mut self, target: i32, of: &OpenFile) -> Result<i32, RestoreError> {
        let nonblock = of.flags & libc::O_NONBLOCK;
        let fd = match &of.kind {
            FileKind::EventFd { count, semaphore } => {
                let flags = nonblock | if *semaphore { libc::EFD_SEMAPHORE } else { 0 };
                let fd = self.call(libc::SYS_eventfd2, &[0, flags as u64])? as i32;
                if *count > 0 {
                    self.write_through(target, fd, &count.to_ne_bytes())?;
                }
                fd
            }
            FileKind::SignalFd { mask } => {
                let addr = self.scratch().write(0, &mask.to_ne_bytes()).map_err(self.perr())?;
                self.call(libc::SYS_signalfd4, &[u64::MAX, addr, 8, nonblock as u64])? as i32
            }
            FileKind::TimerFd { clockid, ticks, value, interval } => {
                const TFD_IOC_SET_TICKS: u64 = 0x4008_5400;
                let fd = self.call(libc::SYS_timerfd_create, &[*clockid as u64, nonblock as u64])? as i32;
                // A periodic timer that expired unread shows no time left: the kernel moves it on only at
                // the next read. Its next expiry comes an interval after the restore.
                let value = if *value == (0, 0) { interval } else { value };
                if *value != (0, 0) {
                    let mut its = Vec::with_capacity(32);
                    for v in [interval.0, interval.1, value.0, value.1] {
                        its.extend_from_slice(&v.to_ne_bytes());
                    }
                    let addr = self.scratch().write(0, &its).map_err(self.perr())?;
                    self.call(libc::SYS_timerfd_settime, &[fd as u64, 0, addr, 0])?;
                }
                if *ticks > 0 {
                    let addr = self.scratch().write(0, &ticks.to_ne_bytes()).map_err(self.perr())?;
                    self.call(libc::SYS_ioctl, &[fd as u64, TFD_IOC_SET_TICKS, addr])?;
                }
                fd
            }
            FileKind::Epoll { .. } => self.call(libc::SYS_epoll_create1, &[0])? as i32,
            _ => unreachable!("make_anon is only called for anonymous-inode files"),
        };
        Ok(fd)
    }

    /// Fills the interest lists of the epoll instances this process created: they name its fd numbers,
    /// so this runs once every fd is in place.
    pub(super) fn fill_epolls(
        &mut self,
        own: &[FdState],
        create: &[u32],
        files: &[OpenFile],
        plan: &FdPlan,
    ) -> Result<(), RestoreError> {
        for &id in create {
            if let FileKind::Epoll { targets } = &files[id as usize].kind {
                let Some(owner_fd) = own.iter().find(|f| f.file == id) else {
                    return Err(RestoreError::File {
                        pid: self.ns_pid,
                        fd: -1,
                        reason: "an epoll instance shared by processes that do not hold it themselves".into(),
                    });
                };
                for t in targets {
                    let mut ev = Vec::with_capacity(12);
                    ev.extend_from_slice(&t.events.to_ne_bytes());
                    ev.extend_from_slice(&t.data.to_ne_bytes());
                    let addr = self.scratch().write(0, &ev).map_err(self.perr())?;
                    self.call_file(
                        owner_fd.fd,
                        "add a watched fd to the epoll instance",
                        libc::SYS_epoll_ctl,
                        &[plan.temp(id) as u64, libc::EPOLL_CTL_ADD as u64, t.fd as u64, addr],
                    )?;
                }
            }
        }
        Ok(())
    }
}
