//! The FUSE front end: translates kernel requests into [`Volume`] operations.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use nix::errno::Errno;

use crate::busy_poll::BusyPoll;
use crate::node::{Ino, Node, Time};
use crate::volume::{has_suidgid, AttrChange, Caller, OpResult, Volume, FIRST_COOKIE};

#[derive(Clone)]
pub(crate) struct DeltaFs {
    pub volume: Arc<Volume>,
    /// Told of every request (see `vol`).
    pub busy_poll: Option<Arc<BusyPoll>>,
    pub ttl: Duration,
    /// Opens need not reach the server (the engine finds dirty shared mappings another way):
    /// OPEN and CREATE answer ENOSYS once, then the kernel opens files without a round trip
    /// (FUSE_NO_OPEN_SUPPORT) and creates them with MKNOD. Cleared in `init` if the kernel
    /// cannot do that.
    pub no_open: bool,
    /// The kernel opens directories without OPENDIR (set in `init` when it can).
    pub no_opendir: bool,
}

impl DeltaFs {
    /// The volume, for a request being served: every request but the rare ones with nothing to look
    /// up (opendir, releasedir, fsyncdir, ioctl) reaches the volume, so this is where the busy
    /// polling of the device learns of request bursts. Taken once per request; the helpers a
    /// request calls use `volume`.
    fn vol(&self) -> &Volume {
        if let Some(poll) = &self.busy_poll {
            poll.note_request();
        }
        &self.volume
    }

    /// Whether a request that failed with `r` should run once more, after pending FORGETs (see
    /// [`Self::retry`]).
    fn short_of_space<T>(&self, r: &OpResult<T>) -> bool {
        matches!(r, Err(Errno::ENOSPC)) && self.volume.awaiting_forgets()
    }

    /// Runs `f` on a helper thread once the kernel has forgotten the files removed in the last
    /// moments. A removed file gives back its blocks and inode at its FORGET, which the kernel can
    /// send just after the remover's next request (seen ~40 µs after it): without this, `rm` and
    /// then a write on a full filesystem could fail although the removal made room. The serving
    /// thread goes on meanwhile (it is the one that takes the FORGET).
    fn retry(&self, f: impl FnOnce(&DeltaFs) + Send + 'static) {
        let fs = self.clone();
        let spawned = std::thread::Builder::new().name("deltafs-retry".into()).spawn(move || {
            fs.volume.wait_for_forgets();
            f(&fs);
        });
        if let Err(e) = spawned {
            // The reply, dropped unanswered, fails the request with EIO.
            tracing::warn!(error = %e, "cannot start a thread to retry a request");
        }
    }

    /// Creates a node of `mode` (with `rdev` and a symlink's `target`) and answers with its entry
    /// (retried as [`Self::retry`] says).
    fn create_entry(
        &self,
        req: &Request,
        (parent, name): (Ino, &OsStr),
        (mode, rdev): (u32, u64),
        target: Option<&[u8]>,
        reply: ReplyEntry,
    ) {
        let caller = self.caller(req);
        let r = self.vol().create_node(caller, parent, name, mode, rdev, target);
        if self.short_of_space(&r) {
            let (name, target) = (name.to_owned(), target.map(<[u8]>::to_vec));
            return self.retry(move |fs| {
                let r = fs.volume.create_node(caller, parent, &name, mode, rdev, target.as_deref());
                fs.reply_entry(reply, r);
            });
        }
        self.reply_entry(reply, r);
    }

    fn caller(&self, req: &Request) -> Caller {
        Caller { uid: self.volume.ids.uid_from_host(req.uid()), gid: self.volume.ids.gid_from_host(req.gid()) }
    }

    /// Whether a truncation or allocation of `ino` by the caller must clear set-ID bits. With
    /// FUSE_HANDLE_KILLPRIV_V2 the kernel says so only in flags fuser does not pass on, so the
    /// caller's capability is looked up, and only when the file has such bits.
    fn kills_suidgid(&self, req: &Request, ino: Ino) -> bool {
        self.volume.getattr(ino).is_ok_and(|(_, n)| has_suidgid(n.attr.mode)) && lacks_cap_fsetid(req.pid())
    }

    fn attr(&self, ino: Ino, node: &Node) -> FileAttr {
        let a = &node.attr;
        let size = node.size();
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: node.blocks(),
            atime: a.atime.to_system(),
            mtime: a.mtime.to_system(),
            ctime: a.ctime.to_system(),
            crtime: a.ctime.to_system(),
            kind: file_type(a.mode),
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: self.volume.ids.uid_to_host(a.uid),
            gid: self.volume.ids.gid_to_host(a.gid),
            rdev: a.rdev as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    /// The directory's entries after readdir offset `offset`, as (offset, name, inode, file type):
    /// `.` and `..` (reported with the directory's own inode) at offsets 1 and 2, then the entries
    /// at their cookies. Directories are read without OPENDIR, from the live state.
    fn dir_entries(&self, dir: Ino, offset: u64) -> OpResult<impl Iterator<Item = (u64, OsString, Ino, u32)>> {
        let (listing, start) = self.vol().listing(dir, offset)?;
        let dots = [(1, "."), (2, "..")].into_iter().filter(move |(c, _)| *c > offset);
        let dots = dots.map(move |(c, name)| (c, OsString::from(name), dir, libc::S_IFDIR));
        let entries = (start..listing.len()).map(move |i| listing[i].clone());
        Ok(dots.chain(entries))
    }

    /// Opens a file just created and answers CREATE.
    fn reply_created(&self, reply: ReplyCreate, r: OpResult<(Ino, Node)>) {
        let (ino, node) = match r {
            Ok(r) => r,
            Err(e) => return reply.error(errno(e)),
        };
        match self.volume.open(ino, true) {
            Ok(fh) => {
                self.volume.remember(ino);
                reply.created(
                    &self.ttl,
                    &self.attr(ino, &node),
                    Generation(self.volume.generation(ino)),
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE,
                );
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn reply_entry(&self, reply: ReplyEntry, r: OpResult<(Ino, Node)>) {
        match r {
            Ok((ino, node)) => {
                self.volume.remember(ino);
                reply.entry(&self.ttl, &self.attr(ino, &node), Generation(self.volume.generation(ino)));
            }
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// The capability's bit number (linux/capability.h).
const CAP_FSETID: u32 = 4;

/// Whether process `pid` lacks CAP_FSETID in the initial user namespace (what the kernel's
/// `capable(CAP_FSETID)` checks), so that its truncation or allocation clears set-ID bits. A process
/// that cannot be inspected counts as lacking it: clearing is the safe side.
fn lacks_cap_fsetid(pid: u32) -> bool {
    let capable = || -> Option<bool> {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/user")).ok()?;
        // Mounting FUSE needs the initial user namespace, so this server runs in it.
        if theirs != std::fs::read_link("/proc/self/ns/user").ok()? {
            return Some(false);
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
        let eff = u64::from_str_radix(eff.trim(), 16).ok()?;
        Some(eff & (1 << CAP_FSETID) != 0)
    };
    !capable().unwrap_or(false)
}

fn errno(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e as i32)
}

fn reply_empty(reply: ReplyEmpty, r: OpResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_data(reply: ReplyData, r: OpResult<Vec<u8>>) {
    match r {
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(errno(e)),
    }
}

fn time_arg(t: Option<TimeOrNow>) -> Option<Option<Time>> {
    t.map(|t| match t {
        TimeOrNow::Now => None,
        TimeOrNow::SpecificTime(s) => Some(Time::from_system(s)),
    })
}

fn reply_xattr(reply: ReplyXattr, size: u32, r: OpResult<Vec<u8>>) {
    match r {
        Ok(data) if size == 0 => reply.size(data.len() as u32),
        Ok(data) if data.len() > size as usize => reply.error(fuser::Errno::ERANGE),
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(errno(e)),
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

impl fuser::Filesystem for DeltaFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.no_open &= config.capabilities().contains(InitFlags::FUSE_NO_OPEN_SUPPORT);
        self.no_opendir = config.capabilities().contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        let mut wanted = InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            // The server clears set-ID bits: no GETATTR before every chown, and the kernel can
            // remember per inode that no security.capability needs removing (SB_NOSEC) instead of
            // asking with a GETXATTR before every write.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        // The truncation then comes with OPEN; without OPEN it must come as SETATTR.
        if !self.no_open {
            wanted |= InitFlags::FUSE_ATOMIC_O_TRUNC;
        }
        let _ = config.add_capabilities(wanted & config.capabilities());
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.vol().lookup(parent.0, name) {
            Ok(Some(found)) => self.reply_entry(reply, Ok(found)),
            // A negative entry: the kernel caches the absence (rollback invalidates it precisely).
            Ok(None) => {
                let mut attr = self.attr(0, &empty_node());
                attr.ino = INodeNo(0);
                reply.entry(&self.ttl, &attr, Generation(0));
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.vol().forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.vol().getattr(ino.0) {
            Ok((ino, node)) => reply.attr(&self.ttl, &self.attr(ino, &node)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // A chown of a non-directory always clears set-ID bits; a truncation when the caller lacks
        // CAP_FSETID.
        let vol = self.vol();
        let chown = (uid.is_some() || gid.is_some()) && vol.getattr(ino.0).is_ok_and(|(_, n)| !n.is_dir());
        let change = AttrChange {
            mode,
            uid: uid.map(|u| vol.ids.uid_from_host(u)),
            gid: gid.map(|g| vol.ids.gid_from_host(g)),
            size,
            atime: time_arg(atime),
            mtime: time_arg(mtime),
            ctime: ctime.map(Time::from_system),
            kill_suidgid: chown || (size.is_some() && self.kills_suidgid(req, ino.0)),
        };
        let r = vol.setattr(ino.0, change);
        match r {
            Ok((ino, node)) => reply.attr(&self.ttl, &self.attr(ino, &node)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        reply_data(reply, self.vol().readlink(ino.0));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.create_entry(req, (parent.0, name), (mode, u64::from(rdev)), None, reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let mode = libc::S_IFDIR | (mode & 0o7777);
        self.create_entry(req, (parent.0, name), (mode, 0), None, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.vol().unlink(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.vol().unlink(parent.0, name, true));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let target = Some(target.as_os_str().as_bytes());
        self.create_entry(req, (parent.0, link_name), (libc::S_IFLNK | 0o777, 0), target, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.vol().rename(parent.0, name, newparent.0, newname, flags.bits()));
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let r = self.vol().link(ino.0, newparent.0, newname);
        if self.short_of_space(&r) {
            let newname = newname.to_owned();
            return self.retry(move |fs| fs.reply_entry(reply, fs.volume.link(ino.0, newparent.0, &newname)));
        }
        self.reply_entry(reply, r);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open {
            return reply.error(fuser::Errno::ENOSYS);
        }
        let vol = self.vol();
        // FUSE_ATOMIC_O_TRUNC: the truncation comes with the open instead of a separate setattr.
        if flags.0 & libc::O_TRUNC != 0 {
            let kill_suidgid = self.kills_suidgid(req, ino.0);
            let r = vol.setattr(ino.0, AttrChange { size: Some(0), kill_suidgid, ..AttrChange::default() });
            if let Err(e) = r {
                return reply.error(errno(e));
            }
        }
        let read_only = flags.0 & libc::O_ACCMODE == libc::O_RDONLY;
        let fh = match vol.open(ino.0, !read_only) {
            Ok(fh) => fh,
            Err(e) => return reply.error(errno(e)),
        };
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Direct reads are sent whatever the kernel's size: only cached ones can race a truncation.
        let cached = flags.0 & libc::O_DIRECT == 0;
        reply_data(reply, self.vol().read(ino.0, offset, size, cached));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill_suidgid = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let answer = |reply: ReplyWrite, r: OpResult<u32>| match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        };
        let r = self.vol().write(ino.0, offset, data, kill_suidgid);
        if self.short_of_space(&r) {
            let data = data.to_vec();
            return self.retry(move |fs| answer(reply, fs.volume.write(ino.0, offset, &data, kill_suidgid)));
        }
        answer(reply, r);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.vol().release(fh.0));
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply_empty(reply, self.vol().flush(ino.0));
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Listings come from the live state, so opening a directory needs no server state: once
        // this answers ENOSYS, the kernel opens directories without a request
        // (FUSE_NO_OPENDIR_SUPPORT) and caches their listings as asked here.
        if self.no_opendir {
            return reply.error(fuser::Errno::ENOSYS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.dir_entries(ino.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        for (cookie, name, child, mode) in entries {
            if reply.add(INodeNo(child), cookie, file_type(mode), &name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let entries = match self.dir_entries(ino.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        // The request was taken by `dir_entries`.
        let vol = &self.volume;
        for (cookie, name, child, _) in entries {
            let attr = match vol.getattr(child) {
                Ok((_, n)) => self.attr(child, &n),
                // Removed since the listing was taken: skip it.
                Err(_) => continue,
            };
            let (ttl, generation) = (&self.ttl, Generation(vol.generation(child)));
            if reply.add(INodeNo(child), cookie, &name, ttl, &attr, generation) {
                break;
            }
            // The kernel takes a reference to every entry but `.` and `..`.
            if cookie >= FIRST_COOKIE {
                vol.remember(child);
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    /// No ioctl applies to DeltaFS files: answer as a regular file of a local filesystem does (programs
    /// probe with TCGETS, i.e. isatty, all the time; fuser's default logs each one as a warning).
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(fuser::Errno::ENOTTY);
    }

    /// The kernel asks only for SEEK_DATA and SEEK_HOLE (it answers the other whences itself).
    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let r = match whence {
            libc::SEEK_DATA => self.vol().seek(ino.0, offset, true),
            libc::SEEK_HOLE => self.vol().seek(ino.0, offset, false),
            _ => Err(Errno::EINVAL),
        };
        match r {
            Ok(pos) => reply.offset(pos as i64),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let vol = self.vol();
        match vol.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files.max(vol.node_count()),
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.vol().setxattr(ino.0, name, Some(value), flags);
        if self.short_of_space(&r) {
            let (name, value) = (name.to_owned(), value.to_vec());
            return self.retry(move |fs| reply_empty(reply, fs.volume.setxattr(ino.0, &name, Some(&value), flags)));
        }
        reply_empty(reply, r);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.vol().getxattr(ino.0, name));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.vol().listxattr(ino.0));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.vol().setxattr(ino.0, name, None, 0));
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions); this only answers existence.
        reply_empty(reply, self.vol().getattr(ino.0).map(|_| ()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        if self.no_open {
            return reply.error(fuser::Errno::ENOSYS);
        }
        let mode = libc::S_IFREG | (mode & 0o7777);
        let caller = self.caller(req);
        let r = self.vol().create_node(caller, parent.0, name, mode, 0, None);
        if self.short_of_space(&r) {
            let name = name.to_owned();
            return self.retry(move |fs| {
                fs.reply_created(reply, fs.volume.create_node(caller, parent.0, &name, mode, 0, None));
            });
        }
        self.reply_created(reply, r);
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let kill_suidgid = self.kills_suidgid(req, ino.0);
        let r = self.vol().fallocate(ino.0, offset, length, mode, kill_suidgid);
        if self.short_of_space(&r) {
            return self
                .retry(move |fs| reply_empty(reply, fs.volume.fallocate(ino.0, offset, length, mode, kill_suidgid)));
        }
        reply_empty(reply, r);
    }
}

fn empty_node() -> Node {
    Node {
        attr: crate::node::Attr {
            mode: libc::S_IFREG,
            uid: 0,
            gid: 0,
            nlink: 0,
            rdev: 0,
            atime: Time::default(),
            mtime: Time::default(),
            ctime: Time::default(),
        },
        xattrs: imbl::OrdMap::new(),
        kind: crate::node::Kind::Special,
    }
}
