//! Kernel interfaces no crate wraps yet, behind safe functions.

use std::io;
use std::os::fd::AsFd;

use rustix::ioctl::{ioctl, opcode, Updater};

/// `struct procmap_query` of `linux/fs.h` (Linux 6.11+).
#[repr(C)]
#[derive(Debug, Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

const PROCMAP_QUERY: rustix::ioctl::Opcode = opcode::read_write::<ProcmapQuery>(b'f', 17);
const PROCMAP_QUERY_VMA_SHARED: u64 = 0x08;
const PROCMAP_QUERY_COVERING_OR_NEXT_VMA: u64 = 0x10;
const PROCMAP_QUERY_FILE_BACKED_VMA: u64 = 0x20;

/// The file of one shared mapping: its device and inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedFile {
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
}

/// The files a process maps shared (`MAP_SHARED`, writable or not), asked through `maps`, its open
/// `/proc/PID/maps`, with the `PROCMAP_QUERY` ioctl: one call per such mapping, where reading the
/// text of the maps formats every mapping of the process. Fails with ENOTTY before Linux 6.11 and
/// with ESRCH once the process has exited.
pub fn shared_mapped_files(maps: impl AsFd) -> io::Result<Vec<MappedFile>> {
    let mut files = Vec::new();
    let mut addr = 0;
    loop {
        let mut query = ProcmapQuery {
            size: size_of::<ProcmapQuery>() as u64,
            query_flags: PROCMAP_QUERY_COVERING_OR_NEXT_VMA | PROCMAP_QUERY_FILE_BACKED_VMA | PROCMAP_QUERY_VMA_SHARED,
            query_addr: addr,
            ..Default::default()
        };
        // SAFETY: PROCMAP_QUERY takes a `struct procmap_query`, which `ProcmapQuery` lays out
        // field for field; the name and build-id buffers are not asked for (sizes 0, addresses 0).
        let result = unsafe { ioctl(&maps, Updater::<PROCMAP_QUERY, ProcmapQuery>::new(&mut query)) };
        match result {
            Ok(()) => {}
            // No mapping at or after `addr`.
            Err(rustix::io::Errno::NOENT) => return Ok(files),
            Err(e) => return Err(e.into()),
        }
        files.push(MappedFile { dev_major: query.dev_major, dev_minor: query.dev_minor, inode: query.inode });
        addr = query.vma_end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn finds_the_files_this_process_maps_shared_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let map = |name: &str, flags: rustix::mm::MapFlags| {
            let file = std::fs::File::create_new(dir.path().join(name)).unwrap();
            file.set_len(4096).unwrap();
            let ino = file.metadata().unwrap().ino();
            // SAFETY: a fresh mapping of a file only this test uses, unmapped below.
            let addr =
                unsafe { rustix::mm::mmap(std::ptr::null_mut(), 4096, rustix::mm::ProtFlags::READ, flags, &file, 0) }
                    .unwrap();
            (ino, addr)
        };
        let (shared, shared_addr) = map("shared", rustix::mm::MapFlags::SHARED);
        let (private, private_addr) = map("private", rustix::mm::MapFlags::PRIVATE);
        let maps = std::fs::File::open("/proc/self/maps").unwrap();
        let inodes: Vec<u64> = match shared_mapped_files(&maps) {
            Ok(files) => files.iter().map(|f| f.inode).collect(),
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                testing::skip("this kernel has no PROCMAP_QUERY (Linux 6.11+)");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        for addr in [shared_addr, private_addr] {
            // SAFETY: mapped above with this length, not used after.
            unsafe { rustix::mm::munmap(addr, 4096) }.unwrap();
        }
        assert!(inodes.contains(&shared), "{inodes:?} lacks the shared mapping {shared}");
        assert!(!inodes.contains(&private), "{inodes:?} has the private mapping {private}");
    }
}
