//! Rebuilding a process's address space from a checkpoint, in a process created by its restored parent
//! (not a copy-on-write clone of its template): exec the original executable (so /proc/PID/exe is
//! right), unmap everything, move the vdso/vvar to their old addresses, map every saved mapping at its
//! address, copy the saved pages in, set the mm layout (brk, stack, arg/env, auxv) with PR_SET_MM_MAP.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use nix::unistd::Pid;

use crate::lazy::{self, Adopted, Feed, Pager, Ranges};
use crate::procfs;
use crate::ptrace::{self, Injector, PtraceError, Scratch};
use crate::state::{MmState, Vma, VmaBacking};
use crate::sys;
use crate::uffd::Uffd;
use sandbox::error_chain;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum MmError {
    #[error("process {pid}")]
    Ptrace {
        pid: i32,
        #[source]
        source: PtraceError,
    },
    #[error("process {pid}: {what}")]
    Io {
        pid: i32,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid}: {reason}")]
    Layout { pid: i32, reason: String },
}

pub const PAGE: u64 = 4096;
pub(crate) const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
pub(crate) const PM_FILE: u64 = 1 << 61;
const MAP_FIXED_NOREPLACE: u64 = 0x100000;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const SCRATCH_LEN: u64 = 1 << 20;
const COPY_CHUNK: usize = 4 << 20;

/// Where the saved pages of a process come from.
pub trait PageSource {
    /// The page-aligned runs (start, length) of `vma` that hold saved data, in address order.
    fn runs(&mut self, vma: &Vma) -> Result<Vec<(u64, u64)>, std::io::Error>;
    /// Reads `buf.len()` bytes at `addr` (inside a run).
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), std::io::Error>;
}

/// Pages read from a live process (a template): the pages present in its memory. Holds
/// /proc/PID/pagemap and /proc/PID/mem open, so a recycled pid cannot be read by mistake.
pub struct ProcessPages {
    pagemap: OwnedFd,
    mem: OwnedFd,
}

impl ProcessPages {
    pub fn open(pid: Pid) -> std::io::Result<ProcessPages> {
        let open = |name: &str| -> std::io::Result<OwnedFd> {
            Ok(std::fs::File::open(format!("/proc/{}/{name}", pid.as_raw()))?.into())
        };
        Ok(ProcessPages { pagemap: open("pagemap")?, mem: open("mem")? })
    }

    /// Reads the process's memory at `addr` (any protection).
    pub fn read_at(&self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        sys::pread_exact(self.mem.as_fd(), buf, addr)
    }

    /// pagemap entries of `[start, end)`.
    pub fn pagemap(&self, start: u64, end: u64) -> std::io::Result<Vec<u64>> {
        let n = ((end - start) / PAGE) as usize;
        let mut raw = vec![0u8; n * 8];
        sys::pread_exact(self.pagemap.as_fd(), &mut raw, (start / PAGE) * 8)?;
        Ok(raw.chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes"))).collect())
    }
}

/// Turns per-page flags into runs of consecutive selected pages.
pub fn runs_of(start: u64, selected: impl Iterator<Item = bool>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, sel) in selected.enumerate() {
        if !sel {
            continue;
        }
        let addr = start + i as u64 * PAGE;
        match runs.last_mut() {
            Some((s, l)) if *s + *l == addr => *l += PAGE,
            _ => runs.push((addr, PAGE)),
        }
    }
    runs
}

/// Whether a pagemap entry holds data we save for this mapping.
pub fn page_is_saved(vma: &Vma, entry: u64) -> bool {
    let in_memory = entry & (PM_PRESENT | PM_SWAPPED) != 0;
    match vma.backing {
        // Private file mappings: only the pages that were written (now anonymous copies).
        VmaBacking::File { .. } if !vma.shared => in_memory && entry & PM_FILE == 0,
        // Its file cannot be mapped again: every page, read through the mapping.
        VmaBacking::DeletedFile { .. } => true,
        _ => in_memory,
    }
}

impl PageSource for ProcessPages {
    fn runs(&mut self, vma: &Vma) -> std::io::Result<Vec<(u64, u64)>> {
        if !vma.dumped {
            return Ok(Vec::new());
        }
        let pm = self.pagemap(vma.start, vma.end)?;
        Ok(runs_of(vma.start, pm.iter().map(|&e| page_is_saved(vma, e))))
    }

    fn read(&mut self, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.read_at(addr, buf)
    }
}

/// How a restore may leave memory to come back on demand (see [`crate::lazy`]).
pub struct LazyRestore<'a> {
    pub pager: &'a Pager,
    /// /dev/userfaultfd, opened by us.
    pub dev: BorrowedFd<'a>,
    /// Where the pager reads the pages (the same as the restore's page source).
    pub feed: Feed,
    /// The sandbox's init (host pid).
    pub init: Pid,
}

/// Whether `vma`'s saved pages can come back on demand: private anonymous memory (userfaultfd's missing
/// mode serves only that), not mlocked (mlock wants every page at once) and not wipe-on-fork (a fork's
/// copy reads zeros there, which the pager could not tell from the parent's missing pages).
fn lazy_eligible(v: &Vma) -> bool {
    !v.shared
        && v.dumped
        && matches!(v.backing, VmaBacking::Anonymous | VmaBacking::DeletedFile { .. })
        && !v.vm_flags.iter().any(|f| f == "lo" || f == "wf")
}

/// Rebuilds the address space of the stopped single-threaded process behind `inj` (its only thread).
/// `scratch` is the injector's current scratch area; it is replaced by one that lies outside the
/// restored layout, which the caller must free later. Returns the new scratch and how many bytes of saved
/// pages were left to come on demand: with `lazy`, the pages of private anonymous memory are not copied,
/// the pager serves them from `lazy.feed` when touched.
pub fn rebuild(
    inj: &mut Injector,
    ns_pid: i32,
    scratch: Scratch,
    mm: &MmState,
    vmas: &[Vma],
    src: &mut dyn PageSource,
    lazy: Option<&LazyRestore<'_>>,
) -> Result<(Scratch, u64), MmError> {
    let pid = inj.pid();
    let perr = |source| MmError::Ptrace { pid: ns_pid, source };
    // 1. exec the original executable: a fresh mm whose exe link is right.
    exec(inj, ns_pid, &scratch, &mm.exe)?;
    inj.set_gadget(ptrace::find_syscall_gadget(pid).map_err(perr)?);
    // 2. scratch memory outside both the current and the restored layout.
    let scratch = map_scratch_outside(inj, ns_pid, vmas)?;
    // 3. unmap everything but scratch and the special mappings.
    let current = procfs::maps(pid).map_err(|e| MmError::Io {
        pid: ns_pid,
        what: "read maps".into(),
        source: std::io::Error::other(e),
    })?;
    for m in &current {
        let special = matches!(m.name.as_str(), "[vdso]" | "[vvar]" | "[vvar_vclock]" | "[vsyscall]");
        if special || m.start == scratch.addr {
            continue;
        }
        inj.call(libc::SYS_munmap, &[m.start, m.len()]).map_err(perr)?;
    }
    // 4. the vdso and vvar pages go back to their old addresses.
    move_specials(inj, ns_pid, &current, vmas, &scratch)?;
    // 5. map and fill every mapping (or register it with a uffd, for the pager to fill).
    let uffd = match lazy {
        Some(l) if vmas.iter().any(lazy_eligible) => match lazy::make_uffd(inj, &scratch, l.dev) {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!("process {ns_pid}: restoring its memory whole (no userfaultfd: {})", error_chain(&e));
                None
            }
        },
        _ => None,
    };
    let mut files: HashMap<(String, bool), u64> = HashMap::new();
    let mut pending = Ranges::default();
    let eager = [(mm.arg_start, mm.arg_end), (mm.env_start, mm.env_end)];
    let fill = uffd.as_ref().map(|uffd| LazyFill { uffd, pending: &mut pending, eager: &eager });
    let result = map_all(inj, ns_pid, &scratch, vmas, src, &mut files, fill);
    for fd in files.values() {
        let _ = inj.call(libc::SYS_close, &[*fd]);
    }
    result?;
    let on_demand = pending.bytes();
    if let (Some(uffd), Some(l)) = (uffd, lazy) {
        if !pending.is_empty() {
            let process = sys::pidfd_open(pid).map_err(|source| MmError::Io {
                pid: ns_pid,
                what: "open a pidfd".into(),
                source,
            })?;
            // Before anything touches the registered memory: its faults wait for the pager.
            l.pager
                .adopt(Adopted { uffd, feed: l.feed.clone(), lazy: pending, init: l.init, process })
                .map_err(|e| MmError::Layout { pid: ns_pid, reason: error_chain(&e) })?;
        }
    }
    // 6. the mm layout (brk, stack, arguments, environment, auxv).
    set_mm_map(inj, ns_pid, &scratch, mm)?;
    Ok((scratch, on_demand))
}

fn exec(inj: &mut Injector, ns_pid: i32, scratch: &Scratch, exe: &str) -> Result<(), MmError> {
    let perr = |source| MmError::Ptrace { pid: ns_pid, source };
    let path = exe.trim_end_matches(" (deleted)");
    let mut block = path.as_bytes().to_vec();
    block.push(0);
    let argv_off = block.len().next_multiple_of(8);
    block.resize(argv_off + 24, 0);
    let path_addr = scratch.addr;
    block[argv_off..argv_off + 8].copy_from_slice(&path_addr.to_ne_bytes());
    // argv = [path, NULL], envp = [NULL] (the NULL after argv doubles as envp).
    scratch.write(0, &block).map_err(perr)?;
    let argv = scratch.addr + argv_off as u64;
    let envp = argv + 8;
    let r = inj.syscall(libc::SYS_execve, &[path_addr, argv, envp]).map_err(perr)?;
    if r.ret < 0 {
        return Err(MmError::Io {
            pid: ns_pid,
            what: format!("exec {path}"),
            source: std::io::Error::from_raw_os_error(-r.ret as i32),
        });
    }
    Ok(())
}

/// Candidate places for scratch memory, high in the address space where programs rarely map.
const SCRATCH_CANDIDATES: [u64; 6] =
    [0x3f00_0000_0000, 0x3e00_0000_0000, 0x2f00_0000_0000, 0x1f00_0000_0000, 0x0f00_0000_0000, 0x0700_0000_0000];

fn map_scratch_outside(inj: &mut Injector, ns_pid: i32, vmas: &[Vma]) -> Result<Scratch, MmError> {
    for cand in SCRATCH_CANDIDATES {
        if vmas.iter().any(|v| v.start < cand + SCRATCH_LEN && cand < v.end) {
            continue;
        }
        let r = inj
            .syscall(
                libc::SYS_mmap,
                &[
                    cand,
                    SCRATCH_LEN,
                    (libc::PROT_READ | libc::PROT_WRITE) as u64,
                    (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64 | MAP_FIXED_NOREPLACE,
                    u64::MAX,
                    0,
                ],
            )
            .map_err(|source| MmError::Ptrace { pid: ns_pid, source })?;
        if r.ret == cand as i64 {
            return Ok(Scratch::at(inj.pid(), cand, SCRATCH_LEN as usize));
        }
    }
    Err(MmError::Layout { pid: ns_pid, reason: "no free place for scratch memory".into() })
}

fn move_specials(
    inj: &mut Injector,
    ns_pid: i32,
    current: &[procfs::MapEntry],
    vmas: &[Vma],
    scratch: &Scratch,
) -> Result<(), MmError> {
    let perr = |source| MmError::Ptrace { pid: ns_pid, source };
    let mut moves = Vec::new();
    for v in vmas {
        let VmaBacking::Special { name } = &v.backing else {
            continue;
        };
        let cur = current
            .iter()
            .find(|m| &m.name == name)
            .ok_or_else(|| MmError::Layout { pid: ns_pid, reason: format!("this kernel has no {name} mapping") })?;
        if cur.len() != v.len() {
            return Err(MmError::Layout {
                pid: ns_pid,
                reason: format!("{name} is {} bytes here but was {} (another kernel?)", cur.len(), v.len()),
            });
        }
        moves.push((cur.start, v.start, v.len(), name.clone()));
    }
    // Park every special mapping right after the scratch area first, so that no final address is
    // still occupied by another special mapping.
    let mut park = scratch.addr + scratch.len as u64;
    let mremap = |inj: &mut Injector, from: u64, to: u64, len: u64| {
        inj.call(libc::SYS_mremap, &[from, len, len, (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64, to])
            .map_err(perr)
    };
    let mut parked = Vec::new();
    for (from, to, len, name) in &moves {
        if from == to {
            continue;
        }
        mremap(inj, *from, park, *len)?;
        if name == "[vdso]" {
            inj.set_gadget(inj_gadget_offset(inj, *from, park));
        }
        parked.push((park, *to, *len, name.clone()));
        park += len;
    }
    for (from, to, len, name) in parked {
        mremap(inj, from, to, len)?;
        if name == "[vdso]" {
            inj.set_gadget(inj_gadget_offset(inj, from, to));
        }
    }
    Ok(())
}

fn inj_gadget_offset(inj: &Injector, old_base: u64, new_base: u64) -> u64 {
    inj.gadget() - old_base + new_base
}

/// Where [`map_all`] leaves memory to come on demand: the uffd to register it with, the ranges to add
/// its saved runs to, and the ranges (`[start, end)`) whose pages are filled now all the same.
struct LazyFill<'a> {
    uffd: &'a Uffd,
    pending: &'a mut Ranges,
    eager: &'a [(u64, u64)],
}

/// Maps every mapping of `vmas` and fills it from `src`, except the mappings `lazy` takes: those are
/// registered with its uffd, and their saved runs added to its ranges (but for its eager pages).
fn map_all(
    inj: &mut Injector,
    ns_pid: i32,
    scratch: &Scratch,
    vmas: &[Vma],
    src: &mut dyn PageSource,
    files: &mut HashMap<(String, bool), u64>,
    mut lazy: Option<LazyFill<'_>>,
) -> Result<(), MmError> {
    let pid = inj.pid();
    let perr = |source| MmError::Ptrace { pid: ns_pid, source };
    let mut buf = vec![0u8; COPY_CHUNK];
    for v in vmas {
        let mut flags = if v.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE } as u64 | libc::MAP_FIXED as u64;
        if v.vm_flags.iter().any(|f| f == "gd") {
            flags |= libc::MAP_GROWSDOWN as u64;
        }
        let (fd, offset) = match &v.backing {
            VmaBacking::Special { .. } => continue,
            VmaBacking::Anonymous | VmaBacking::DeletedFile { .. } => {
                flags |= libc::MAP_ANONYMOUS as u64;
                (u64::MAX, 0)
            }
            // A placeholder keeping its place in the layout: the object is mapped over it once the
            // process has its fds (NewProcess::map_shared_memory).
            VmaBacking::SharedMemory { .. } => {
                let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE) as u64;
                inj.call(libc::SYS_mmap, &[v.start, v.len(), libc::PROT_NONE as u64, flags, u64::MAX, 0])
                    .map_err(perr)?;
                continue;
            }
            VmaBacking::File { path, offset, inode, .. } => {
                let writable = v.shared && v.prot & libc::PROT_WRITE != 0;
                let fd = match files.get(&(path.clone(), writable)) {
                    Some(fd) => *fd,
                    None => {
                        let fd = open_for_mapping(inj, ns_pid, scratch, path, writable, *inode)?;
                        files.insert((path.clone(), writable), fd);
                        fd
                    }
                };
                (fd, *offset)
            }
        };
        let runs = src.runs(v).map_err(|source| MmError::Io {
            pid: ns_pid,
            what: format!("find saved pages of {:#x}-{:#x}", v.start, v.end),
            source,
        })?;
        let on_demand = lazy.is_some() && !runs.is_empty() && lazy_eligible(v);
        // What other processes read through /proc (the arguments and environment: ps, pgrep -f) is copied
        // now: such a read cannot wait for the pager, it would see nothing.
        let (now, later) = match &lazy {
            Some(l) if on_demand => split_runs(&runs, l.eager),
            _ => (runs, Vec::new()),
        };
        // Map writable while filling, then set the real protection.
        let fill_prot = if now.is_empty() { v.prot } else { v.prot | libc::PROT_READ | libc::PROT_WRITE };
        let r = inj.call(libc::SYS_mmap, &[v.start, v.len(), fill_prot as u64, flags, fd, offset]).map_err(perr)?;
        if r as u64 != v.start {
            return Err(MmError::Layout { pid: ns_pid, reason: format!("mapping {:#x} landed at {r:#x}", v.start) });
        }
        for (start, len) in now {
            let mut done = 0u64;
            while done < len {
                let n = ((len - done) as usize).min(buf.len());
                src.read(start + done, &mut buf[..n]).map_err(|source| MmError::Io {
                    pid: ns_pid,
                    what: format!("read saved pages at {:#x}", start + done),
                    source,
                })?;
                sys::process_vm_write(pid, &buf[..n], &[(start + done, n)]).map_err(|source| MmError::Io {
                    pid: ns_pid,
                    what: format!("write pages at {:#x}", start + done),
                    source,
                })?;
                done += n as u64;
            }
        }
        if let (true, Some(LazyFill { uffd, pending, .. })) = (on_demand, lazy.as_mut()) {
            uffd.register_missing(v.start, v.len()).map_err(|source| MmError::Io {
                pid: ns_pid,
                what: format!("register {:#x}-{:#x} with the userfaultfd", v.start, v.end),
                source,
            })?;
            for (start, len) in later {
                pending.insert(start, start + len);
            }
        }
        if fill_prot != v.prot {
            inj.call(libc::SYS_mprotect, &[v.start, v.len(), v.prot as u64]).map_err(perr)?;
        }
    }
    Ok(())
}

/// Runs of pages: (start, length in bytes).
type Runs = Vec<(u64, u64)>;

/// Splits saved runs `(start, len)` into the pages that meet one of the `eager` ranges and the rest.
fn split_runs(runs: &[(u64, u64)], eager: &[(u64, u64)]) -> (Runs, Runs) {
    let mut hot: Vec<(u64, u64)> =
        eager.iter().filter(|(s, e)| s < e).map(|&(s, e)| (s / PAGE * PAGE, e.next_multiple_of(PAGE))).collect();
    hot.sort_unstable();
    let (mut now, mut later) = (Vec::new(), Vec::new());
    for &(start, len) in runs {
        let end = start + len;
        let mut at = start;
        for &(s, e) in &hot {
            let (s, e) = (s.max(at), e.min(end));
            if s >= e {
                continue;
            }
            if s > at {
                later.push((at, s - at));
            }
            now.push((s, e - s));
            at = e;
        }
        if at < end {
            later.push((at, end - at));
        }
    }
    (now, later)
}

fn open_for_mapping(
    inj: &mut Injector,
    ns_pid: i32,
    scratch: &Scratch,
    path: &str,
    writable: bool,
    inode: u64,
) -> Result<u64, MmError> {
    let perr = |source| MmError::Ptrace { pid: ns_pid, source };
    let mut cpath = path.as_bytes().to_vec();
    cpath.push(0);
    let addr = scratch.write(0, &cpath).map_err(perr)?;
    let flags = if writable { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_CLOEXEC;
    let r = inj.syscall(libc::SYS_openat, &[libc::AT_FDCWD as u64, addr, flags as u64, 0]).map_err(perr)?;
    if r.ret < 0 {
        return Err(MmError::Io {
            pid: ns_pid,
            what: format!("open {path} to map it"),
            source: std::io::Error::from_raw_os_error(-r.ret as i32),
        });
    }
    let meta = std::fs::metadata(format!("/proc/{}/fd/{}", inj.pid(), r.ret)).map_err(|source| MmError::Io {
        pid: ns_pid,
        what: format!("stat {path}"),
        source,
    })?;
    // The inode alone: DeltaFS keeps inode numbers across checkpoints, but a fork mounts the checkpoint
    // anew, under another device number.
    if meta.ino() != inode {
        return Err(MmError::Layout {
            pid: ns_pid,
            reason: format!("{path} is another file than at checkpoint time (inode {} vs {inode})", meta.ino()),
        });
    }
    Ok(r.ret as u64)
}

fn set_mm_map(inj: &mut Injector, ns_pid: i32, scratch: &Scratch, mm: &MmState) -> Result<(), MmError> {
    let perr = |source| MmError::Ptrace { pid: ns_pid, source };
    let auxv_off = 128usize;
    let mut block = Vec::with_capacity(auxv_off + mm.auxv.len() * 8);
    for v in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
    ] {
        block.extend_from_slice(&v.to_ne_bytes());
    }
    block.extend_from_slice(&(scratch.addr + auxv_off as u64).to_ne_bytes());
    block.extend_from_slice(&((mm.auxv.len() * 8) as u32).to_ne_bytes());
    block.extend_from_slice(&u32::MAX.to_ne_bytes()); // exe_fd: keep (we exec'd the right file)
    let map_len = block.len();
    block.resize(auxv_off, 0);
    for w in &mm.auxv {
        block.extend_from_slice(&w.to_ne_bytes());
    }
    scratch.write(0, &block).map_err(perr)?;
    inj.call(libc::SYS_prctl, &[PR_SET_MM, PR_SET_MM_MAP, scratch.addr, map_len as u64]).map_err(perr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_at_the_pages_of_the_eager_ranges() {
        let runs = [(0x1000, 0x5000), (0x10000, 0x1000)];
        // Arguments from the middle of page 0x2000 to the middle of 0x3000, environment in 0x10000.
        let eager = [(0x2800, 0x3100), (0x3100, 0x3200), (0x10010, 0x10020), (0x9000, 0x9000)];
        let (now, later) = split_runs(&runs, &eager);
        assert_eq!(now, vec![(0x2000, 0x2000), (0x10000, 0x1000)]);
        assert_eq!(later, vec![(0x1000, 0x1000), (0x4000, 0x2000)]);
    }
}
