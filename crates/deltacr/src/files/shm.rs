//! Shared memory objects mapped `MAP_SHARED` without an fd (shared anonymous memory, memfds, POSIX
//! semaphores and shm objects after they were unlinked). A template maps the very object the live
//! processes go on writing, so its checkpoint-time contents are copied while the tree is stopped; a
//! restore makes a memfd with them (like an open file description: by the lowest common ancestor of
//! the processes mapping it, at its temporary fd) and maps it over each mapping's place.

use std::collections::HashSet;
use std::os::unix::fs::{FileExt, MetadataExt};

use nix::unistd::{lseek, Whence};

use super::{FdOwner, FdPlan, FileError};
use crate::capture::is_shared_memory_object;
use crate::procfs;
use crate::restore::{NewProcess, RestoreError};
use crate::state::{FdState, FileKind, IpcState, OpenFile, ShmExtent, Vma, VmaBacking};
use crate::sys;

/// The most bytes of shared memory objects a checkpoint copies: they are held by the tracer, outside
/// the sandbox's memory limit, so a sandbox must not make us hold unbounded amounts.
pub const SHARED_MEMORY_LIMIT: u64 = 1 << 30;

/// What an fd holding a shared memory object (a memfd, an unlinked POSIX shm object) keeps; its data is
/// read with the others by [`capture`].
pub(super) fn capture_fd(link: &str, meta: &std::fs::Metadata, fd: std::os::fd::BorrowedFd<'_>) -> FileKind {
    // A memfd made without MFD_ALLOW_SEALING has F_SEAL_SEAL.
    let seals = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GET_SEALS).unwrap_or(libc::F_SEAL_SEAL);
    FileKind::SharedMemory {
        name: memfd_name(link),
        dev: meta.dev(),
        inode: meta.ino(),
        size: meta.size(),
        seals,
        extents: Vec::new(),
    }
}

/// Whether the file an fd links to (`link`) is a shared memory object [`capture_fd`] keeps.
pub(super) fn is_fd_object(link: &str) -> bool {
    link.starts_with("/memfd:") || (link.starts_with("/dev/shm/") && link.ends_with(" (deleted)"))
}

/// Reads the data of the shared memory objects the fds of `owners` (stopped) hold, and adds those they
/// only map to `files`, with their data: at most [`SHARED_MEMORY_LIMIT`] bytes in all.
pub(super) fn capture(owners: &[FdOwner], tables: &[Vec<FdState>], files: &mut Vec<OpenFile>) -> Result<(), FileError> {
    let mut budget = SHARED_MEMORY_LIMIT;
    let mut read = |path: &str, size: u64, fail: &dyn Fn(String) -> FileError| -> Result<Vec<ShmExtent>, FileError> {
        // The object itself (not a path it had, which may name another file now, or nothing).
        let object = std::fs::File::open(path).map_err(|e| fail(format!("cannot open it: {e}")))?;
        let extents = read_extents(&object, size, budget).map_err(|e| fail(format!("cannot read it: {e}")))?;
        budget -= extents.iter().map(|e| e.data.len() as u64).sum::<u64>();
        Ok(extents)
    };
    let mut seen = HashSet::new();
    for (owner, table) in owners.iter().zip(tables) {
        for fd in table {
            let FileKind::SharedMemory { dev, inode, size, name, .. } = &files[fd.file as usize].kind else {
                continue;
            };
            if !seen.insert((*dev, *inode)) {
                continue;
            }
            let fail = |reason: String| FileError::Unsupported {
                pid: owner.ns_pid,
                fd: fd.fd,
                reason: format!("{name}: {reason}"),
            };
            let data = read(&format!("/proc/{}/fd/{}", owner.host, fd.fd), *size, &fail)?;
            if let FileKind::SharedMemory { extents, .. } = &mut files[fd.file as usize].kind {
                *extents = data;
            }
        }
    }
    for owner in owners {
        let maps = procfs::maps(owner.host).map_err(|source| FileError::Proc { pid: owner.ns_pid, fd: -1, source })?;
        for m in maps.iter().filter(|m| m.shared && m.name.starts_with('/') && is_shared_memory_object(&m.name)) {
            let dev = libc::makedev(m.dev_major, m.dev_minor);
            if !seen.insert((dev, m.inode)) {
                continue;
            }
            // SysV segments are the IPC namespace's (crate::ipc).
            if is_sysv(&m.name) {
                continue;
            }
            let fail = |reason: String| FileError::Mapping {
                pid: owner.ns_pid,
                addr: m.start,
                reason: format!("{}: {reason}", m.name),
            };
            let path = format!("/proc/{}/map_files/{:x}-{:x}", owner.host, m.start, m.end);
            let size = std::fs::metadata(&path).map_err(|e| fail(format!("cannot stat it: {e}")))?.size();
            let extents = read(&path, size, &fail)?;
            files.push(OpenFile {
                id: files.len() as u32,
                flags: libc::O_RDWR,
                pos: 0,
                kind: FileKind::SharedMemory {
                    name: memfd_name(&m.name),
                    dev,
                    inode: m.inode,
                    size,
                    seals: libc::F_SEAL_SEAL,
                    extents,
                },
                locks: Vec::new(),
            });
        }
    }
    Ok(())
}

/// The data of `object` (`size` bytes): its data extents where the filesystem tells holes apart
/// (tmpfs: holes of a big sparse object are neither read nor held), else all of it. Fails past `budget`
/// bytes.
fn read_extents(object: &std::fs::File, size: u64, budget: u64) -> std::io::Result<Vec<ShmExtent>> {
    let mut extents = Vec::new();
    let mut held = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let (start, end) = match lseek(object, pos as i64, Whence::SeekData) {
            Ok(start) => {
                let end = lseek(object, start, Whence::SeekHole).map_err(std::io::Error::from)?;
                (start as u64, (end as u64).min(size))
            }
            // No data after pos.
            Err(nix::errno::Errno::ENXIO) => break,
            // The filesystem does not tell holes apart: the rest is data.
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::EOPNOTSUPP) => (pos, size),
            Err(e) => return Err(e.into()),
        };
        held += end - start;
        if held > budget {
            return Err(std::io::Error::other(format!(
                "shared memory objects hold more than {SHARED_MEMORY_LIMIT} bytes (the most a checkpoint copies)"
            )));
        }
        let mut data = vec![0u8; (end - start) as usize];
        object.read_exact_at(&mut data, start)?;
        extents.push(ShmExtent { offset: start, data });
        pos = end;
    }
    Ok(extents)
}

/// The name its memfd gets at restore: what /proc/PID/maps named the object by (a memfd's own name, or
/// the file name the semaphore or shm object had).
fn memfd_name(mapped: &str) -> String {
    let name = mapped.trim_end_matches(" (deleted)");
    let name = name.strip_prefix("/memfd:").unwrap_or_else(|| name.rsplit('/').next().unwrap_or(name));
    // memfd_create allows 249 bytes.
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

/// Whether a mapping of this path (as /proc/PID/maps names it) is of a SysV shared memory segment.
pub fn is_sysv(path: &str) -> bool {
    path.starts_with("/SYSV")
}

/// The id of the shared memory object a mapping maps (none for a SysV segment).
pub fn object_of(vma: &Vma, files: &[OpenFile]) -> Option<u32> {
    let VmaBacking::SharedMemory { dev, inode, ref path, .. } = vma.backing else {
        return None;
    };
    if is_sysv(path) {
        return None;
    }
    files
        .iter()
        .find(|f| matches!(f.kind, FileKind::SharedMemory { dev: d, inode: i, .. } if (d, i) == (dev, inode)))
        .map(|f| f.id)
}

impl NewProcess {
    /// Makes shared memory object `of` again (for fd `target`, -1 when only mapped): a memfd (not
    /// close-on-exec: the children a restore forks and rebuilds by exec inherit it) of its size, holding
    /// its data, with its offset, status flags and seals. Returns the fd.
    pub(super) fn make_shared_memory(&mut self, target: i32, of: &OpenFile) -> Result<i32, RestoreError> {
        let FileKind::SharedMemory { name, size, seals, extents, .. } = &of.kind else {
            unreachable!("make_shared_memory of a {:?}", of.kind);
        };
        let mut cname = name.as_bytes().to_vec();
        cname.push(0);
        let addr = self.scratch().write(0, &cname).map_err(self.perr())?;
        // Exactly F_SEAL_SEAL: made without MFD_ALLOW_SEALING (or not a memfd); else sealed (or not) since.
        let sealable = *seals != libc::F_SEAL_SEAL;
        let mfd_flags = if sealable { libc::MFD_ALLOW_SEALING } else { 0 };
        let fd = self.call_file(target, "make a memfd", libc::SYS_memfd_create, &[addr, mfd_flags as u64])?;
        self.call_file(target, "size the memfd", libc::SYS_ftruncate, &[fd as u64, *size])?;
        let memfd = sys::dup_from(self.host, fd as i32).map_err(self.io_err(target, "reach the memfd"))?;
        let memfd = std::fs::File::from(memfd);
        for e in extents {
            memfd.write_all_at(&e.data, e.offset).map_err(self.io_err(target, "fill the memfd"))?;
        }
        let fd = fd as u64;
        self.call_file(target, "set the memfd's offset", libc::SYS_lseek, &[fd, of.pos, libc::SEEK_SET as u64])?;
        self.call_file(target, "set the memfd's flags", libc::SYS_fcntl, &[fd, libc::F_SETFL as u64, of.flags as u64])?;
        if sealable && *seals != 0 {
            self.call_file(target, "seal the memfd", libc::SYS_fcntl, &[fd, libc::F_ADD_SEALS as u64, *seals as u64])?;
        }
        Ok(fd as i32)
    }

    /// Maps each shared memory object of `vmas` at its place, from the object's temporary fd, and
    /// attaches each SysV segment of `ipc` (made again already) at its place — over what held the place:
    /// a placeholder, or a template's mapping of the live object.
    pub fn map_shared_memory(
        &mut self,
        vmas: &[Vma],
        files: &[OpenFile],
        ipc: &IpcState,
        plan: &FdPlan,
    ) -> Result<(), RestoreError> {
        let mut attached: Vec<(u64, u64)> = Vec::new();
        for v in vmas {
            let VmaBacking::SharedMemory { offset, ref path, inode, .. } = v.backing else {
                continue;
            };
            if is_sysv(path) {
                let base = v.start - offset;
                if !attached.iter().any(|&(b, _)| b == base) {
                    // Its mappings' protections, all of them: an attachment allows no more than it was made with.
                    let prot = vmas
                        .iter()
                        .filter(|w| matches!(&w.backing, VmaBacking::SharedMemory { path, offset, .. } if is_sysv(path) && w.start - offset == base))
                        .fold(0, |p, w| p | w.prot);
                    let size = self.attach_segment(inode as i32, base, prot, ipc)?;
                    attached.push((base, size));
                }
                // An attachment maps the whole segment with one protection: each mapping gets its own.
                self.call(libc::SYS_mprotect, &[v.start, v.len(), v.prot as u64])?;
                continue;
            }
            let Some(id) = object_of(v, files) else {
                return Err(RestoreError::File {
                    pid: self.ns_pid,
                    fd: -1,
                    reason: format!("{path} at {:#x}: its shared memory object was not saved", v.start),
                });
            };
            let flags = (libc::MAP_SHARED | libc::MAP_FIXED) as u64;
            let args = [v.start, v.len(), v.prot as u64, flags, plan.temp(id) as u64, offset];
            let at = self.call_file(-1, "map shared memory", libc::SYS_mmap, &args)?;
            if at as u64 != v.start {
                return Err(RestoreError::File {
                    pid: self.ns_pid,
                    fd: -1,
                    reason: format!("shared memory {path} mapped at {at:#x}, not {:#x}", v.start),
                });
            }
        }
        // Parts of an attachment the process had unmapped go again.
        for (base, size) in attached {
            let mut at = base;
            let mut holes = Vec::new();
            for v in vmas.iter().filter(|v| v.start >= base && v.end <= base + size) {
                if v.start > at {
                    holes.push((at, v.start - at));
                }
                at = at.max(v.end);
            }
            if at < base + size {
                holes.push((at, base + size - at));
            }
            for (start, len) in holes {
                self.call(libc::SYS_munmap, &[start, len])?;
            }
        }
        Ok(())
    }

    /// Attaches SysV segment `shmid` at `base` (over what is there) allowing protection `prot`; returns the
    /// attachment's length.
    fn attach_segment(&mut self, shmid: i32, base: u64, prot: i32, ipc: &IpcState) -> Result<u64, RestoreError> {
        let Some(seg) = ipc.segments.iter().find(|s| s.perm.id == shmid) else {
            return Err(RestoreError::File {
                pid: self.ns_pid,
                fd: -1,
                reason: format!("SysV segment {shmid} mapped at {base:#x} was not saved"),
            });
        };
        // Asking for more than the process may have (write, exec) fails on the segment's permissions.
        let mut flags = libc::SHM_REMAP;
        if prot & libc::PROT_WRITE == 0 {
            flags |= libc::SHM_RDONLY;
        }
        if prot & libc::PROT_EXEC != 0 {
            flags |= libc::SHM_EXEC;
        }
        let flags = flags as u64;
        let at = self.call_file(-1, "attach a SysV segment", libc::SYS_shmat, &[shmid as u64, base, flags])?;
        if at as u64 != base {
            return Err(RestoreError::File {
                pid: self.ns_pid,
                fd: -1,
                reason: format!("SysV segment {shmid} attached at {at:#x}, not {base:#x}"),
            });
        }
        Ok(seg.size.next_multiple_of(4096))
    }
}
