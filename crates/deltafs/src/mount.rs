//! Mounting a stack and the engine-facing operations on a mounted DeltaFS: checkpoint, rollback,
//! unmount.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};

use crate::busy_poll::{BusyPoll, Controller};
use crate::fuse::DeltaFs;
use crate::node::Ino;
use crate::store::{StackId, Store, StoreError};
use crate::sys;
use crate::volume::{IdMap, RollbackStats, Volume};

/// Errors of mount-level operations.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot mount DeltaFS at {path}")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no FUSE mount at {0} in /proc/self/mountinfo")]
    NotMounted(PathBuf),
    #[error("cannot abort the FUSE connection of {path}")]
    Abort {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot unmount {path}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot list the shared file mappings of the processes in {path}")]
    Mappings {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How to present a stack.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Host uid of the sandbox's uid 0 (0 when there is no user namespace): stored owners are shown
    /// as `uid_base + uid`, requests from host uid `h` act as `h - uid_base`.
    pub uid_base: u32,
    /// As `uid_base`, for group ids.
    pub gid_base: u32,
    /// How long the kernel may cache entries and attributes. Every change goes through this server
    /// and rollbacks invalidate precisely, so this can be long.
    pub cache_ttl: Duration,
    /// Threads reading FUSE requests. Only the thread reading the session's own fd busy-polls, and each request
    /// also wakes a blocked thread, which takes back most of the polling's gain (measured in
    /// `docs/deltafs.md`): one thread serves best while requests are answered without waiting.
    pub threads: usize,
    /// A file listing, one per line, the ids of every process that may write to files of this mount
    /// through shared memory mappings — the sandbox cgroup's `cgroup.procs`. With it, a
    /// checkpoint finds the files whose dirty pages it must flush in these processes' memory maps,
    /// so the kernel need not tell the server about opens: opening a file then costs no FUSE round
    /// trip (`FUSE_NO_OPEN_SUPPORT`). Without it, every open and close is a request, and the files
    /// open for writing are flushed.
    pub processes: Option<PathBuf>,
    /// Busy polling of the FUSE device during request bursts (see `docs/deltafs.md`): requests
    /// less than this apart start it, this long without a request ends it. `None` never polls.
    pub busy_poll: Option<Duration>,
    /// Size limits of the filesystem, as `df` inside the mount shows them.
    pub quota: Quota,
}

/// Limits of a mount's filesystem. `statfs` shows them as its size; past them, writes, `fallocate`,
/// creations, `setxattr` and renames into a directory that must grow fail with `ENOSPC` (as ext4's
/// project quotas answer), while overwrites, deletions and other renames still work. A rollback
/// brings back the usage of its checkpoint. `None`: only the store's filesystem limits the mount.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Quota {
    /// Bytes: the files' allocated blocks (`st_blocks`, holes are free), directories, symlink
    /// targets of 60 bytes or more, and extended attributes by their size. The image's files count;
    /// the copies that frozen layers (checkpoints) keep of changed files do not.
    pub bytes: Option<u64>,
    /// Inodes (a file with several hard links is one).
    pub inodes: Option<u64>,
}

/// What a mount's files use, as its [`Quota`] counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// Bytes; counted only by a mount with a byte quota.
    pub bytes: Option<u64>,
    pub inodes: u64,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            uid_base: 0,
            gid_base: 0,
            cache_ttl: Duration::from_secs(3600),
            threads: 1,
            processes: None,
            busy_poll: Some(Duration::from_micros(100)),
            quota: Quota::default(),
        }
    }
}

/// A mounted DeltaFS. Dropping it unmounts (without the error report of [`Mount::unmount`]).
pub struct Mount {
    vol: Arc<Volume>,
    /// Stopped before the session ends.
    busy_poll: Option<Controller>,
    session: Option<fuser::BackgroundSession>,
    notifier: fuser::Notifier,
    mountpoint: PathBuf,
    /// With `MountOptions::processes`: that file, and the mount's device (as in /proc/PID/maps).
    processes: Option<(PathBuf, u64)>,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount").field("mountpoint", &self.mountpoint).finish()
    }
}

/// Mounts stack `from` at `mountpoint` with a new writable layer on top, served by threads of this
/// process. Needs root (CAP_SYS_ADMIN) in the initial user namespace.
pub fn mount(store: &Store, from: StackId, mountpoint: &Path, opts: &MountOptions) -> Result<Mount, MountError> {
    let gc_guard = store.lock_layers(rustix::fs::FlockOperation::LockShared)?;
    let loaded = store.load(from)?;
    let layer = store.create_layer(from.0, &loaded.meta, store.has_index(from.0))?;
    // From here the new layer's lock keeps `from` alive.
    drop(gc_guard);
    let vol = Arc::new(Volume::new(
        store.clone(),
        loaded.images,
        loaded.meta.base,
        IdMap { uid_base: opts.uid_base, gid_base: opts.gid_base },
        loaded.tree,
        layer,
        opts.quota,
    ));
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("deltafs".into()),
        MountOption::Subtype("deltafs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::Suid,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let busy_poll = opts.busy_poll.map(BusyPoll::new);
    let fs = DeltaFs {
        volume: vol.clone(),
        busy_poll: busy_poll.clone(),
        ttl: opts.cache_ttl,
        no_open: opts.processes.is_some(),
        no_opendir: false,
    };
    let mount_err = |source| MountError::Mount { path: mountpoint.to_owned(), source };
    let session = fuser::Session::new(fs, mountpoint, &config).map_err(mount_err)?;
    let notifier = session.notifier();
    let (raced_reads, inodes) = std::sync::mpsc::channel::<u64>();
    let raced_notifier = session.notifier();
    std::thread::Builder::new()
        .name("deltafs-raced".into())
        .spawn(move || {
            for ino in inodes {
                if let Err(e) = raced_notifier.inval_inode(fuser::INodeNo(ino), 0, 0) {
                    tracing::trace!(ino, error = %e, "inval_inode after a read that raced a truncation");
                }
            }
        })
        .map_err(mount_err)?;
    vol.set_raced_reads(raced_reads);
    // fuser serves the session's own fd with its last thread and cloned fds with the others: one
    // thread spins during bursts, the rest block.
    let busy_poll = busy_poll.map(|poll| poll.start(session.as_fd())).transpose().map_err(mount_err)?;
    let session = session.spawn().map_err(mount_err)?;
    let mut m =
        Mount { vol, session: Some(session), busy_poll, notifier, mountpoint: mountpoint.to_owned(), processes: None };
    if let Some(procs) = &opts.processes {
        // Asked once the server runs: the kernel forwards the stat of the root to it.
        let dev = std::fs::metadata(mountpoint).map_err(mount_err)?.dev();
        m.processes = Some((procs.clone(), dev));
    }
    tracing::info!(stack = %from, mountpoint = %mountpoint.display(), "DeltaFS mounted");
    Ok(m)
}

/// Inodes of the filesystem with device `dev` that processes listed in `procs` map shared: the only
/// files whose pages can be dirty in the kernel while opens are not tracked. Processes that exit
/// meanwhile are skipped (their mappings were written back as they went).
fn shared_mappings(procs: &Path, dev: u64) -> io::Result<BTreeSet<Ino>> {
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let mut inos = BTreeSet::new();
    for pid in std::fs::read_to_string(procs)?.split_whitespace() {
        let files =
            std::fs::File::open(format!("/proc/{pid}/maps")).and_then(|maps| match sys::shared_mapped_files(&maps) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => {
                    io::read_to_string(&maps).map(|text| shared_mapped_files_in_text(&text))
                }
                r => r,
            });
        let files = match files {
            Ok(files) => files,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => continue,
            Err(e) => return Err(e),
        };
        inos.extend(files.iter().filter(|f| (f.dev_major, f.dev_minor) == (major, minor)).map(|f| f.inode));
    }
    Ok(inos)
}

/// [`sys::shared_mapped_files`] for kernels without `PROCMAP_QUERY` (before 6.11), from the text of
/// `/proc/PID/maps`: `address perms offset major:minor inode [path]`, shared mappings have perms
/// "...s" (also read-only ones: mprotect can have made a writable one read-only after writing).
fn shared_mapped_files_in_text(maps: &str) -> Vec<sys::MappedFile> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let (perms, dev, inode) = (fields.nth(1)?, fields.nth(1)?, fields.next()?);
            let (major, minor) = dev.split_once(':')?;
            perms.ends_with('s').then_some(())?;
            Some(sys::MappedFile {
                dev_major: u32::from_str_radix(major, 16).ok()?,
                dev_minor: u32::from_str_radix(minor, 16).ok()?,
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

impl Mount {
    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// What the files use now, as the quota counts it.
    pub fn usage(&self) -> DiskUsage {
        self.vol.usage()
    }

    /// Pushes the kernel's dirty pages to the server, so they land in the layer being frozen (or
    /// left), not in the next one. Without writeback caching, writes are write-through and only
    /// shared writable mmaps leave dirty pages. syncfs is no use here: on this kernel it starts
    /// writeback of a FUSE mount without waiting for the server (and walks every cached inode).
    /// Invalidating an inode's pages does wait — the kernel launders dirty pages synchronously —
    /// so that is done for every file mapped shared by the mount's processes (when they are
    /// known), else for every file open for writing.
    fn flush_kernel_pages(&self) -> Result<(), MountError> {
        let inos: Vec<Ino> = match &self.processes {
            Some((procs, dev)) => shared_mappings(procs, *dev)
                .map_err(|source| MountError::Mappings { path: procs.clone(), source })?
                .into_iter()
                .collect(),
            None => self.vol.open_for_writing(),
        };
        for ino in inos {
            if let Err(e) = self.notifier.inval_inode(fuser::INodeNo(ino), 0, 0) {
                tracing::debug!(ino, error = %e, "flushing pages by invalidation");
            }
        }
        Ok(())
    }

    /// Freezes the current writable layer (a checkpoint) and pushes an empty one. O(1): copies no
    /// data. Durable against a kill of this process on return. Processes writing to the mount
    /// should be frozen around this call for a consistent point in time.
    pub fn checkpoint(&self) -> Result<StackId, MountError> {
        self.flush_kernel_pages()?;
        Ok(self.vol.checkpoint()?)
    }

    /// Switches the mount to stack `to` (any checkpoint sharing this mount's base) with a fresh
    /// writable layer, discarding changes since the last checkpoint, and invalidates the kernel's
    /// caches for exactly the inodes and names that differ. Node ids stay valid; open fds read the
    /// new stack's content.
    pub fn rollback(&self, to: StackId) -> Result<RollbackStats, MountError> {
        self.flush_kernel_pages()?;
        let (stats, inval) = self.vol.rollback(to)?;
        // Sent with the state lock released: the kernel may need to wait for requests in flight.
        for (dir, name) in &inval.entries {
            if let Err(e) = self.notifier.inval_entry(fuser::INodeNo(*dir), name) {
                tracing::trace!(dir, ?name, error = %e, "inval_entry");
            }
        }
        for ino in &inval.inodes {
            if let Err(e) = self.notifier.inval_inode(fuser::INodeNo(*ino), 0, 0) {
                tracing::trace!(ino, error = %e, "inval_inode");
            }
        }
        Ok(stats)
    }

    /// Whether the filesystem is still served: false once it was unmounted from outside (`umount`)
    /// or its connection aborted, which ends the session.
    pub fn is_served(&self) -> bool {
        self.session.as_ref().is_some_and(|s| !s.guard.is_finished())
    }

    /// Unmounts (unless that was done from outside) and waits for the server threads. The writable
    /// layer (changes since the last checkpoint) is left for the garbage collector.
    pub fn unmount(mut self) -> Result<(), MountError> {
        drop(self.busy_poll.take());
        let session = self.session.take().expect("session present until unmount");
        // An ended session has nothing mounted to unmount. (fuser 0.18 still tries when the session
        // is dropped, and fails with EINVAL: its check of the connection reads a dead one as live.)
        let joined = if session.guard.is_finished() { session.join() } else { session.umount_and_join() };
        match joined {
            // Worker threads reading a cloned device fd may see the unmount as ECONNABORTED.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
            r => r.map_err(|source| MountError::Unmount { path: self.mountpoint.clone(), source }),
        }
    }
}

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Cleans up the mount of a DeltaFS server that died (e.g. a SIGKILLed shim): aborts its FUSE
/// connection through fusectl — which also frees processes blocked on requests the dead server had
/// already read, so they can exit — and, when the mount is in this process's mount namespace
/// (`ns_pid` None), detaches it. With `ns_pid`, the mount is looked up at `mountpoint` as process
/// `ns_pid` sees it (e.g. a sandbox process: `/` after its pivot_root); that namespace's mounts go
/// away with its last process. Mounts fusectl if needed.
pub fn abort_stale_mount(ns_pid: Option<u32>, mountpoint: &Path) -> Result<(), MountError> {
    let abort_err = |source| MountError::Abort { path: mountpoint.to_owned(), source };
    let mountinfo_path = match ns_pid {
        Some(pid) => format!("/proc/{pid}/mountinfo"),
        None => "/proc/self/mountinfo".to_owned(),
    };
    let mountinfo = std::fs::read_to_string(mountinfo_path).map_err(abort_err)?;
    let target = mountpoint.to_string_lossy();
    // Fields: id parent major:minor root mountpoint options ... - fstype source superoptions
    // The last matching line is the top mount at that path.
    let minor = mountinfo
        .lines()
        .rev()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let fstype = fields.iter().skip_while(|f| **f != "-").nth(1)?;
            (fields.get(4)? == &target && fstype.starts_with("fuse"))
                .then(|| fields[2].split_once(':').map(|(_, m)| m.to_owned()))
                .flatten()
        })
        .ok_or_else(|| MountError::NotMounted(mountpoint.to_owned()))?;
    if !Path::new(FUSECTL).join(&minor).exists() {
        nix::mount::mount(Some("fusectl"), FUSECTL, Some("fusectl"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| abort_err(e.into()))?;
    }
    std::fs::write(Path::new(FUSECTL).join(&minor).join("abort"), b"1").map_err(abort_err)?;
    if ns_pid.is_some() {
        return Ok(());
    }
    nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| MountError::Unmount { path: mountpoint.to_owned(), source: e.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_of_maps_gives_the_files_mapped_shared() {
        let maps = "\
55d0c2a00000-55d0c2a02000 r--p 00000000 fe:01 1048602                    /usr/bin/cat
7f1c2e000000-7f1c2e001000 rw-s 00000000 00:3a 17                         /data/shared (deleted)
7f1c2e001000-7f1c2e002000 r--s 00001000 00:3a 18                         /data/was-writable
7f1c2e002000-7f1c2e003000 rw-p 00000000 00:3a 19                         /data/private
7f1c2e003000-7f1c2e004000 rw-s 00000000 00:01 2050                       /dev/zero (deleted)
7ffd6a1e0000-7ffd6a201000 rw-p 00000000 00:00 0                          [stack]
";
        let files = shared_mapped_files_in_text(maps);
        let on = |major, minor| files.iter().filter(move |f| (f.dev_major, f.dev_minor) == (major, minor));
        assert_eq!(on(0, 0x3a).map(|f| f.inode).collect::<Vec<_>>(), [17, 18]);
        assert_eq!(on(0, 1).map(|f| f.inode).collect::<Vec<_>>(), [2050]);
        assert_eq!(files.len(), 3);
    }
}
