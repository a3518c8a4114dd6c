//! Starting a sandbox: clone init into fresh namespaces, map its ids, place it, let it set up.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::init::InitConfig;
use crate::ipc::{Channel, IpcError, Packet};
use crate::spec::{FromInit, Network, ToInit};
use crate::sys::{clone_process, close_fds_from, dup_to, CloneResult};
use crate::userns::{IdMap, UsernsError};

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("cannot create the control channel")]
    Channel(#[source] IpcError),
    #[error("cannot clone the sandbox init")]
    Clone(#[source] std::io::Error),
    #[error("cannot map the sandbox's user ids")]
    IdMap(#[source] UsernsError),
    #[error("cannot place the sandbox init")]
    Place(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("sandbox init stopped before it was ready")]
    InitLost(#[source] IpcError),
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    #[error("sandbox init sent an unexpected message: {0}")]
    Protocol(String),
}

/// Moves the calling process into a new mount namespace where no mount propagates back to the host, so
/// mounts made for a sandbox disappear with the processes that use them. Single-threaded callers only.
pub fn enter_private_mount_namespace() -> Result<(), std::io::Error> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    Ok(())
}

/// A running sandbox init, seen from the shim.
pub struct Container {
    /// Init's pid in the shim's (the host's) pid namespace.
    pub init_pid: i32,
    pub pidfd: OwnedFd,
    /// Control channel to init (blocking; wrap its fd for async use).
    pub channel: Channel,
}

/// Starts init. `inherit` are descriptors init keeps for its lifetime (e.g. the uid slot lock, so the id
/// range stays reserved while any sandbox process could still use it). `place` runs after the id maps
/// are written and before init does anything; it receives init's host pid (e.g. to add it to a cgroup).
///
/// Must be called while the calling process is single-threaded.
pub fn start(
    cfg: &InitConfig,
    rootfs: OwnedFd,
    idmap: &IdMap,
    inherit: &[BorrowedFd<'_>],
    place: impl FnOnce(i32) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<Container, ContainerError> {
    let (ours, theirs) = crate::ipc::pair().map_err(ContainerError::Channel)?;
    let mut flags =
        libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if cfg.network == Network::None {
        flags |= libc::CLONE_NEWNET;
    }
    match clone_process(flags as u64).map_err(ContainerError::Clone)? {
        CloneResult::Child => {
            drop(ours);
            let mine = [theirs.as_fd(), rootfs.as_fd()];
            let mut kept = keep_only(&mine, inherit).into_iter();
            let mut next = || kept.next().expect("kept descriptor");
            let (channel, mount) = (Channel::new(next()), next());
            std::mem::forget((theirs, rootfs));
            crate::init::run(cfg, mount, channel)
        }
        CloneResult::Parent { pid, pidfd } => {
            drop((theirs, rootfs));
            let container = Container { init_pid: pid, pidfd, channel: Channel::new(ours) };
            match prepare(&container, idmap, place) {
                Ok(()) => Ok(container),
                Err(e) => {
                    let _ = rustix::process::pidfd_send_signal(&container.pidfd, rustix::process::Signal::KILL);
                    let _ = rustix::process::waitid(
                        rustix::process::WaitId::PidFd(container.pidfd.as_fd()),
                        rustix::process::WaitIdOptions::EXITED,
                    );
                    Err(e)
                }
            }
        }
    }
}

fn prepare(
    c: &Container,
    idmap: &IdMap,
    place: impl FnOnce(i32) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<(), ContainerError> {
    idmap.write_for(c.init_pid).map_err(ContainerError::IdMap)?;
    place(c.init_pid).map_err(ContainerError::Place)?;
    c.channel.send(&ToInit::Go, &[], &[]).map_err(ContainerError::InitLost)?;
    match c.channel.recv::<FromInit>().map_err(ContainerError::InitLost)? {
        Packet { msg: FromInit::Ready, .. } => Ok(()),
        Packet { msg: FromInit::SetupFailed { message }, .. } => Err(ContainerError::Setup(message)),
        Packet { msg, .. } => Err(ContainerError::Protocol(format!("{msg:?}"))),
    }
}

/// In the freshly cloned child: renumber `mine` then `inherit` to 3, 4, ... and close every other
/// descriptor inherited from the shim. Returns `mine` at their new numbers; `inherit` stay open for good.
/// Standard streams stay (init logs to stderr).
fn keep_only(mine: &[BorrowedFd<'_>], inherit: &[BorrowedFd<'_>]) -> Vec<OwnedFd> {
    const FIRST: i32 = 3;
    // Copy everything above the target range first, so placing one never clobbers another.
    let high: Vec<OwnedFd> = mine
        .iter()
        .chain(inherit)
        .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, 1000).expect("dup a descriptor in the new init"))
        .collect();
    for (i, fd) in high.iter().enumerate() {
        dup_to(fd.as_fd(), FIRST + i as i32, true).expect("place a descriptor in the new init");
    }
    let count = high.len() as i32;
    // The copies are above the range that close_fds_from closes; the originals are closed there too or
    // were replaced by dup_to, so no descriptor object may close them again.
    std::mem::forget(high);
    close_fds_from(FIRST + count).expect("close inherited descriptors");
    // SAFETY: descriptors FIRST.. now hold our copies of `mine`, and nothing else owns them.
    (0..mine.len() as i32).map(|i| unsafe { OwnedFd::from_raw_fd(FIRST + i) }).collect()
}
