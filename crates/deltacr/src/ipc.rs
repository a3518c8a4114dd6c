//! SysV IPC objects (shared memory segments, semaphore sets, message queues) of the sandbox's IPC
//! namespace. They belong to no process, so they are read from the namespace (the tracer's thread enters
//! it) while the tree is stopped, and at restore the namespace is emptied and they are made again with
//! their ids (`/proc/sys/kernel/*_next_id`), keys, owners, modes and contents. A process's attachments
//! of segments are made by [`crate::files`] (`shmat` at their addresses); segments that had been removed
//! are removed again once attached ([`remove_again`]).

use std::io;

use nix::unistd::Pid;

use crate::files::is_sysv;
use crate::procfs::IdMap;
use crate::state::{IpcPerm, IpcState, Message, MsgQueue, SemSet, ShmExtent, ShmSegment, Vma};
use crate::sys;

/// The most bytes of segments and messages a checkpoint copies (held by the tracer).
pub const IPC_LIMIT: u64 = 1 << 30;
/// `SHM_DEST` in a segment's mode: removed, alive until its last detach.
const SHM_DEST: u32 = 0o1000;
const PAGE: usize = 4096;
/// How long a restore waits for removed segments to be detached by the processes it killed.
const SEGMENT_GONE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("SysV IPC: cannot {what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("SysV IPC: {0}")]
    Unsupported(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> IpcError {
    let what = what.into();
    move |source| IpcError::Io { what, source }
}

/// -1 → the last OS error.
fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The ids of the objects listed in /proc/sysvipc/`kind` (of the calling thread's IPC namespace).
fn ids(kind: &str) -> io::Result<Vec<i32>> {
    let text = std::fs::read_to_string(format!("/proc/sysvipc/{kind}"))?;
    Ok(text.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)?.parse().ok()).collect())
}

fn perm_of(p: &libc::ipc_perm, id: i32, uids: &IdMap, gids: &IdMap) -> IpcPerm {
    IpcPerm { key: p.__key, id, uid: uids.inner(p.uid), gid: gids.inner(p.gid), mode: u32::from(p.mode) }
}

/// Captures the SysV IPC objects of the IPC namespace of `init`'s sandbox and, per process of `members`
/// (host pids), its attachments of segments (read from its maps: templates do not keep them, see
/// [`crate::template::Template::detach_segments`]). A sandbox sharing our IPC namespace has no objects of
/// its own: a process attached to a segment there is refused.
pub fn capture(init: Pid, members: &[Pid]) -> Result<(IpcState, Vec<Vec<Vma>>), IpcError> {
    let mut attachments = Vec::with_capacity(members.len());
    for &pid in members {
        let maps =
            crate::procfs::maps(pid).map_err(|e| io_err(format!("read process {pid}'s maps"))(io::Error::other(e)))?;
        let sysv: Vec<Vma> = maps.iter().filter(|m| is_sysv(&m.name)).filter_map(crate::capture::vma_of).collect();
        attachments.push(sysv);
    }
    if !sys::other_namespace(init, "ipc").map_err(io_err("compare IPC namespaces"))? {
        if let Some(pid) = members.iter().zip(&attachments).find(|(_, a)| !a.is_empty()).map(|(p, _)| p) {
            return Err(IpcError::Unsupported(format!(
                "process {pid} is attached to a SysV shared memory segment of an IPC namespace the sandbox shares \
                 with the host: it cannot be checkpointed"
            )));
        }
        return Ok((IpcState::default(), attachments));
    }
    let uids = IdMap::read(init, "uid_map").map_err(|e| io_err("read the uid map")(io::Error::other(e)))?;
    let gids = IdMap::read(init, "gid_map").map_err(|e| io_err("read the gid map")(io::Error::other(e)))?;
    let state = sys::in_namespace(init, "ipc", || capture_inside(&uids, &gids))
        .map_err(io_err("enter the sandbox's IPC namespace"))??;
    Ok((state, attachments))
}

fn capture_inside(uids: &IdMap, gids: &IdMap) -> Result<IpcState, IpcError> {
    let mut budget = IPC_LIMIT;
    let mut take = |bytes: usize| -> Result<(), IpcError> {
        budget = budget
            .checked_sub(bytes as u64)
            .ok_or_else(|| IpcError::Unsupported(format!("segments and messages hold more than {IPC_LIMIT} bytes")))?;
        Ok(())
    };
    let mut state = IpcState::default();
    for id in ids("shm").map_err(io_err("list segments"))? {
        // SAFETY: shmid_ds is plain data the kernel fills.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: ds is a valid shmid_ds for IPC_STAT to write.
        check(unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) }).map_err(io_err(format!("stat segment {id}")))?;
        let size = ds.shm_segsz;
        take(size)?;
        state.segments.push(ShmSegment {
            perm: perm_of(&ds.shm_perm, id, uids, gids),
            size: size as u64,
            removed: u32::from(ds.shm_perm.mode) & SHM_DEST != 0,
            extents: read_segment(id, size)?,
        });
    }
    for id in ids("sem").map_err(io_err("list semaphore sets"))? {
        // SAFETY: semid_ds is plain data the kernel fills.
        let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: IPC_STAT writes a semid_ds through the pointer (the union semun argument).
        check(unsafe { libc::semctl(id, 0, libc::IPC_STAT, &mut ds as *mut libc::semid_ds) })
            .map_err(io_err(format!("stat semaphore set {id}")))?;
        let mut values = vec![0u16; ds.sem_nsems as usize];
        // SAFETY: GETALL writes sem_nsems shorts into values.
        check(unsafe { libc::semctl(id, 0, libc::GETALL, values.as_mut_ptr()) })
            .map_err(io_err(format!("read semaphore set {id}")))?;
        state.semaphores.push(SemSet { perm: perm_of(&ds.sem_perm, id, uids, gids), values });
    }
    for id in ids("msg").map_err(io_err("list message queues"))? {
        // SAFETY: msqid_ds is plain data the kernel fills.
        let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: ds is a valid msqid_ds for IPC_STAT to write.
        check(unsafe { libc::msgctl(id, libc::IPC_STAT, &mut ds) })
            .map_err(io_err(format!("stat message queue {id}")))?;
        // A message is at most the queue's byte limit.
        let text_max = ds.msg_qbytes as usize;
        take(text_max)?;
        let mut buf = vec![0u8; size_of::<libc::c_long>() + text_max];
        let mut messages = Vec::with_capacity(ds.msg_qnum as usize);
        for index in 0..ds.msg_qnum as libc::c_long {
            // SAFETY: buf holds a long (the type) and text_max bytes of text; MSG_COPY copies the message
            // at `index` without taking it.
            let n = unsafe {
                libc::msgrcv(id, buf.as_mut_ptr().cast(), text_max, index, libc::IPC_NOWAIT | libc::MSG_COPY)
            };
            let n = usize::try_from(n)
                .map_err(|_| io_err(format!("read message queue {id}"))(io::Error::last_os_error()))?;
            take(n)?;
            let mtype = libc::c_long::from_ne_bytes(buf[..8].try_into().expect("8 bytes"));
            messages.push(Message { mtype, data: buf[8..8 + n].to_vec() });
        }
        state.queues.push(MsgQueue {
            perm: perm_of(&ds.msg_perm, id, uids, gids),
            max_bytes: text_max as u64,
            messages,
        });
    }
    Ok(state)
}

/// The data of segment `id` (`size` bytes), read through a read-only attachment; pages of zeros are left out.
fn read_segment(id: i32, size: usize) -> Result<Vec<ShmExtent>, IpcError> {
    // SAFETY: a fresh attachment chosen by the kernel, detached below.
    let at = unsafe { libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY) };
    if at as isize == -1 {
        return Err(io_err(format!("attach segment {id}"))(io::Error::last_os_error()));
    }
    // SAFETY: the attachment maps at least `size` readable bytes until shmdt.
    let data = unsafe { std::slice::from_raw_parts(at.cast::<u8>(), size) };
    let mut extents: Vec<ShmExtent> = Vec::new();
    for (k, page) in data.chunks(PAGE).enumerate() {
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        let offset = (k * PAGE) as u64;
        match extents.last_mut() {
            Some(e) if e.offset + e.data.len() as u64 == offset => e.data.extend_from_slice(page),
            _ => extents.push(ShmExtent { offset, data: page.to_vec() }),
        }
    }
    // SAFETY: `at` is our attachment; `data` is not used after.
    unsafe { libc::shmdt(at) };
    Ok(extents)
}

/// Writes the id the next object of `kind` (`shm`, `sem`, `msg`) gets in the calling thread's IPC namespace.
fn set_next_id(kind: &str, id: i32) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/kernel/{kind}_next_id"), id.to_string())
}

/// The owner of an object as the host sees it (IPC_SET takes the caller's view).
fn owner_ids(perm: &IpcPerm, uids: &IdMap, gids: &IdMap) -> (u32, u32) {
    (uids.outer(perm.uid), gids.outer(perm.gid))
}

/// Empties the IPC namespace of `init`'s sandbox and makes `ipc`'s objects in it again.
pub fn restore(init: Pid, ipc: &IpcState) -> Result<(), IpcError> {
    if !sys::other_namespace(init, "ipc").map_err(io_err("compare IPC namespaces"))? {
        if ipc != &IpcState::default() {
            return Err(IpcError::Unsupported(
                "the sandbox shares our IPC namespace: its objects cannot be restored".into(),
            ));
        }
        return Ok(());
    }
    let uids = IdMap::read(init, "uid_map").map_err(|e| io_err("read the uid map")(io::Error::other(e)))?;
    let gids = IdMap::read(init, "gid_map").map_err(|e| io_err("read the gid map")(io::Error::other(e)))?;
    sys::in_namespace(init, "ipc", || restore_inside(ipc, &uids, &gids))
        .map_err(io_err("enter the sandbox's IPC namespace"))?
}

fn restore_inside(ipc: &IpcState, uids: &IdMap, gids: &IdMap) -> Result<(), IpcError> {
    // What the namespace holds now (made or changed since the checkpoint) goes first.
    for id in ids("shm").map_err(io_err("list segments"))? {
        // SAFETY: IPC_RMID takes no buffer.
        check(unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) })
            .map_err(io_err(format!("remove segment {id}")))?;
    }
    for id in ids("sem").map_err(io_err("list semaphore sets"))? {
        // SAFETY: IPC_RMID takes no argument.
        check(unsafe { libc::semctl(id, 0, libc::IPC_RMID) }).map_err(io_err(format!("remove semaphore set {id}")))?;
    }
    for id in ids("msg").map_err(io_err("list message queues"))? {
        // SAFETY: IPC_RMID takes no buffer.
        check(unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) })
            .map_err(io_err(format!("remove message queue {id}")))?;
    }
    // A removed segment lives until its last detach: processes killed just before (or the holders of
    // their memory) may still be tearing their memory down. Its id is free only then.
    let wanted: Vec<i32> = ipc.segments.iter().map(|s| s.perm.id).collect();
    let deadline = std::time::Instant::now() + SEGMENT_GONE_WAIT;
    while ids("shm").map_err(io_err("list segments"))?.iter().any(|id| wanted.contains(id)) {
        if std::time::Instant::now() > deadline {
            return Err(IpcError::Unsupported(format!(
                "a removed segment with an id of the checkpoint's ({wanted:?}) is still attached after {SEGMENT_GONE_WAIT:?}"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let made = |kind: &str, want: i32, got: io::Result<libc::c_int>| -> Result<(), IpcError> {
        let got = got.map_err(io_err(format!("make {kind} {want} again")))?;
        if got != want {
            return Err(IpcError::Unsupported(format!("{kind} {want} was made again as {got}")));
        }
        Ok(())
    };
    for seg in &ipc.segments {
        let p = &seg.perm;
        set_next_id("shm", p.id).map_err(io_err("choose a segment's id"))?;
        let flags = libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
        // SAFETY: plain shmget.
        made("segment", p.id, check(unsafe { libc::shmget(p.key, seg.size as usize, flags) }))?;
        // SAFETY: shmid_ds is plain data; IPC_STAT fills it before IPC_SET reads it.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        (ds.shm_perm.uid, ds.shm_perm.gid) = owner_ids(p, uids, gids);
        ds.shm_perm.mode = (p.mode & 0o777) as u16;
        // SAFETY: ds is a valid shmid_ds.
        check(unsafe { libc::shmctl(p.id, libc::IPC_SET, &mut ds) })
            .map_err(io_err(format!("set segment {}'s owner", p.id)))?;
        if !seg.extents.is_empty() {
            // SAFETY: a fresh attachment, detached below.
            let at = unsafe { libc::shmat(p.id, std::ptr::null(), 0) };
            if at as isize == -1 {
                return Err(io_err(format!("attach segment {}", p.id))(io::Error::last_os_error()));
            }
            for e in &seg.extents {
                // SAFETY: the extent lies within the segment (it was read from a segment of this size).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        e.data.as_ptr(),
                        at.cast::<u8>().add(e.offset as usize),
                        e.data.len(),
                    );
                };
            }
            // SAFETY: our attachment.
            unsafe { libc::shmdt(at) };
        }
    }
    for set in &ipc.semaphores {
        let p = &set.perm;
        set_next_id("sem", p.id).map_err(io_err("choose a semaphore set's id"))?;
        let flags = libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
        // SAFETY: plain semget.
        made("semaphore set", p.id, check(unsafe { libc::semget(p.key, set.values.len() as i32, flags) }))?;
        // SAFETY: SETALL reads nsems shorts.
        check(unsafe { libc::semctl(p.id, 0, libc::SETALL, set.values.as_ptr()) })
            .map_err(io_err(format!("set semaphore set {}'s values", p.id)))?;
        // SAFETY: semid_ds is plain data IPC_SET reads the owner and mode from.
        let mut ds: libc::semid_ds = unsafe { std::mem::zeroed() };
        (ds.sem_perm.uid, ds.sem_perm.gid) = owner_ids(p, uids, gids);
        ds.sem_perm.mode = (p.mode & 0o777) as u16;
        // SAFETY: IPC_SET reads a semid_ds through the pointer.
        check(unsafe { libc::semctl(p.id, 0, libc::IPC_SET, &mut ds as *mut libc::semid_ds) })
            .map_err(io_err(format!("set semaphore set {}'s owner", p.id)))?;
    }
    for q in &ipc.queues {
        let p = &q.perm;
        set_next_id("msg", p.id).map_err(io_err("choose a message queue's id"))?;
        let flags = libc::IPC_CREAT | libc::IPC_EXCL | (p.mode & 0o777) as i32;
        // SAFETY: plain msgget.
        made("message queue", p.id, check(unsafe { libc::msgget(p.key, flags) }))?;
        // SAFETY: msqid_ds is plain data IPC_SET reads the owner, mode and byte limit from.
        let mut ds: libc::msqid_ds = unsafe { std::mem::zeroed() };
        (ds.msg_perm.uid, ds.msg_perm.gid) = owner_ids(p, uids, gids);
        ds.msg_perm.mode = (p.mode & 0o777) as u16;
        ds.msg_qbytes = q.max_bytes as libc::msglen_t;
        // SAFETY: ds is a valid msqid_ds.
        check(unsafe { libc::msgctl(p.id, libc::IPC_SET, &mut ds) })
            .map_err(io_err(format!("set message queue {}'s owner", p.id)))?;
        for m in &q.messages {
            let mut buf = Vec::with_capacity(8 + m.data.len());
            buf.extend_from_slice(&m.mtype.to_ne_bytes());
            buf.extend_from_slice(&m.data);
            // SAFETY: buf holds the type and the text.
            check(unsafe { libc::msgsnd(p.id, buf.as_ptr().cast(), m.data.len(), libc::IPC_NOWAIT) })
                .map_err(io_err(format!("queue a message on {}", p.id)))?;
        }
    }
    Ok(())
}

/// Removes again the segments of `ipc` that had been removed at checkpoint time, once the restored
/// processes are attached (a removed segment without attachments is gone).
pub fn remove_again(init: Pid, ipc: &IpcState) -> Result<(), IpcError> {
    if !ipc.segments.iter().any(|s| s.removed) {
        return Ok(());
    }
    sys::in_namespace(init, "ipc", || -> Result<(), IpcError> {
        for seg in ipc.segments.iter().filter(|s| s.removed) {
            // SAFETY: IPC_RMID takes no buffer.
            check(unsafe { libc::shmctl(seg.perm.id, libc::IPC_RMID, std::ptr::null_mut()) })
                .map_err(io_err(format!("remove segment {} again", seg.perm.id)))?;
        }
        Ok(())
    })
    .map_err(io_err("enter the sandbox's IPC namespace"))?
}
