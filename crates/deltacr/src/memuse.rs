//! What a template holds in memory that nothing else shares: the memory dropping it frees.
//!
//! `Private_*` of /proc/PID/smaps_rollup counts the pages only one process maps, which misses what a
//! template shares with its spare alone (a fork of the template: every page the live process rewrote
//! since the checkpoint is mapped by exactly the two of them), and the kernel walks every page table
//! entry for it (~10 ms for 264 MiB, ~60 ms for 2 GiB here). So the pages are counted here by their
//! map count instead (/proc/kpagecount, root only), over a systematic sample of at most [`SAMPLES`]
//! pages spread over the process's private mappings: a page the template's tasks alone map is theirs.
//! The cost is bounded whatever the size (~1 ms); a process of at most [`SAMPLES`] pages of private
//! mappings is counted exactly, a larger one within ~2% of its anonymous memory (one standard deviation).

use std::fs::File;
use std::os::fd::AsFd;
#[cfg(test)]
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use nix::unistd::Pid;

use crate::mm::{PAGE, PM_FILE, PM_PRESENT};
use crate::procfs::{self, ProcError, Status};
use crate::sys;

/// Most pages looked at per process.
pub const SAMPLES: u64 = 512;
const PFN_MASK: u64 = (1 << 55) - 1;

/// Anonymous memory of process `pid` that no process but the `holders` tasks sharing its pages map (the
/// template itself, and its spare when it has one): counted in its private mappings on a sample of
/// pages, scaled to its resident anonymous memory (`RssAnon`).
pub fn exclusive_anon_bytes(pid: Pid, holders: u64) -> Result<u64, ProcError> {
    // [vsyscall] lies above the user address space, which pagemap ends with.
    let ranges: Vec<(u64, u64)> = procfs::maps(pid)?
        .into_iter()
        .filter(|m| !m.shared && m.name != "[vsyscall]")
        .map(|m| (m.start, m.end))
        .collect();
    let pagemap = Words::open(procfs::dir(pid).join("pagemap"))?;
    let counts = Words::open("/proc/kpagecount".into())?;
    let (mut sampled, mut alone) = (0u64, 0u64);
    for page in sample(&ranges, SAMPLES) {
        let entry = pagemap.read(page)?;
        // Only anonymous pages in memory: file pages stay in the page cache when the template goes.
        if entry & PM_PRESENT == 0 || entry & PM_FILE != 0 {
            continue;
        }
        let pfn = entry & PFN_MASK;
        if pfn == 0 {
            // The kernel hides page frame numbers from readers without CAP_SYS_ADMIN.
            let what = "page frame numbers are hidden (needs CAP_SYS_ADMIN)".to_string();
            return Err(ProcError::Parse { path: pagemap.path, what });
        }
        sampled += 1;
        alone += u64::from(counts.read(pfn)? <= holders);
    }
    let anon = kib_field(pid, "RssAnon")? << 10;
    Ok(scale(anon, alone, sampled))
}

/// Bytes of page tables of process `pid` (`VmPTE`): what its exit frees besides its pages.
pub fn page_table_bytes(pid: Pid) -> Result<u64, ProcError> {
    Ok(kib_field(pid, "VmPTE")? << 10)
}

/// A /proc file of 64-bit words, one per page (pagemap, kpagecount).
struct Words {
    path: PathBuf,
    file: File,
}

impl Words {
    fn open(path: PathBuf) -> Result<Words, ProcError> {
        let file = File::open(&path).map_err(|source| ProcError::Read { path: path.clone(), source })?;
        Ok(Words { path, file })
    }

    /// Word number `index`.
    fn read(&self, index: u64) -> Result<u64, ProcError> {
        let mut word = [0u8; 8];
        sys::pread_exact(self.file.as_fd(), &mut word, index * 8)
            .map_err(|source| ProcError::Read { path: self.path.clone(), source })?;
        Ok(u64::from_ne_bytes(word))
    }
}

/// A field of /proc/PID/status given in kB (such as `VmPTE: 48 kB`), in KiB.
fn kib_field(pid: Pid, key: &str) -> Result<u64, ProcError> {
    let status = Status::read(pid)?;
    let value = status.get(key)?;
    value
        .strip_suffix(" kB")
        .and_then(|kib| kib.trim().parse().ok())
        .ok_or_else(|| ProcError::Parse { path: procfs::dir(pid).join("status"), what: format!("bad {key} {value:?}") })
}

/// Page numbers (address / PAGE) spread evenly over `ranges` (page-aligned [start, end) addresses): every
/// page when they hold at most `most`, else every n-th page so that at most `most` are chosen.
fn sample(ranges: &[(u64, u64)], most: u64) -> impl Iterator<Item = u64> + '_ {
    let total: u64 = ranges.iter().map(|(s, e)| (e - s) / PAGE).sum();
    let stride = total.div_ceil(most).max(1);
    // The n-th page overall, counted across ranges, is chosen when n is a multiple of `stride`.
    let mut before = 0u64;
    ranges.iter().flat_map(move |&(start, end)| {
        let (first, pages) = (start / PAGE, (end - start) / PAGE);
        let skip = (stride - before % stride) % stride;
        before += pages;
        (skip..pages).step_by(stride as usize).map(move |i| first + i)
    })
}

/// `total` scaled by the fraction `part / of` (0 of 0 is 0).
fn scale(total: u64, part: u64, of: u64) -> u64 {
    if of == 0 {
        return 0;
    }
    (u128::from(total) * u128::from(part) / u128::from(of)) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_process_is_sampled_whole() {
        let ranges = [(0x1000, 0x4000), (0x10000, 0x12000)];
        assert_eq!(sample(&ranges, 1024).collect::<Vec<_>>(), [1, 2, 3, 0x10, 0x11]);
    }

    #[test]
    fn a_large_one_is_sampled_evenly_across_its_mappings() {
        // 3000 pages in three mappings: every third page, counted across the gaps between mappings.
        let ranges = [(0, 1000 * PAGE), (5000 * PAGE, 6001 * PAGE), (9000 * PAGE, 9999 * PAGE)];
        let chosen: Vec<u64> = sample(&ranges, 1000).collect();
        assert_eq!(chosen.len(), 1000);
        assert_eq!(&chosen[..2], [0, 3]);
        assert_eq!(chosen[333..335], [999, 5002], "page 1000 overall is the second of the second mapping");
        assert_eq!(chosen[667], 9000, "page 2001 overall is the first of the third");
        assert!(sample(&ranges, 7).count() <= 7);
        assert_eq!(sample(&[], 1024).count(), 0);
    }

    #[test]
    fn the_sample_s_fraction_scales_the_anonymous_memory() {
        assert_eq!(scale(1 << 30, 256, 1024), 1 << 28);
        assert_eq!(scale(1 << 30, 0, 0), 0);
        assert_eq!(scale(u64::MAX, 3, 3), u64::MAX);
    }

    /// A stopped fork of this process (as a template is one of its live process) holds the pages this
    /// process rewrites afterwards; with a stopped fork of its own (as a spare is one of its template), the
    /// two of them hold those pages together, and neither alone.
    #[test]
    fn a_fork_and_its_own_fork_hold_the_pages_their_parent_rewrote_since() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: page frame numbers and /proc/kpagecount need root");
            return;
        }
        const LEN: u64 = 64 << 20;
        let mut memory = std::hint::black_box(vec![1u8; LEN as usize]);
        let (template, spare) = stopped_fork_with_fork();
        let fresh = exclusive_anon_bytes(template, 2).unwrap();
        assert!(fresh < LEN / 8, "right after the fork the pages are ours too: {fresh} bytes");
        memory.iter_mut().step_by(PAGE as usize).for_each(|b| *b = 2);
        std::hint::black_box(&memory);
        let both = exclusive_anon_bytes(template, 2).unwrap();
        assert!(both.abs_diff(LEN) <= LEN / 10, "{both} bytes held by the two after we rewrote {LEN}");
        let alone = exclusive_anon_bytes(template, 1).unwrap();
        assert!(alone < LEN / 8, "the fork alone holds {alone} bytes: it shares them with its own fork");
        assert!(page_table_bytes(spare).unwrap() >= LEN / PAGE * 8, "a page table entry per page");
        for pid in [spare, template] {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = nix::sys::wait::waitpid(template, None);
    }

    /// A fork of this process that forks once more, then both stop: (fork, its fork).
    fn stopped_fork_with_fork() -> (Pid, Pid) {
        let (read, write) = nix::unistd::pipe().expect("pipe");
        // SAFETY: fork in a process that may have other threads: the children only call async-signal-safe
        // functions (fork, write, raise, _exit).
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                // SAFETY: async-signal-safe calls on valid pointers (the pid written is a local).
                unsafe {
                    let spare = libc::fork();
                    if spare == 0 {
                        libc::raise(libc::SIGSTOP);
                        libc::_exit(0);
                    }
                    libc::write(write.as_raw_fd(), (&spare as *const i32).cast(), 4);
                    libc::raise(libc::SIGSTOP);
                    libc::_exit(0)
                }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(write);
                let mut pid = [0u8; 4];
                nix::unistd::read(&read, &mut pid).expect("read the second fork's pid");
                let spare = Pid::from_raw(i32::from_ne_bytes(pid));
                nix::sys::wait::waitpid(child, Some(nix::sys::wait::WaitPidFlag::WUNTRACED)).expect("waitpid");
                while procfs::Stat::read(spare).expect("the second fork").state() != 'T' {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                (child, spare)
            }
        }
    }
}
