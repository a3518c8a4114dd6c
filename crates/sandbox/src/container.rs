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

/// Clones init into new namespaces, writes its id maps and calls `place` with its host pid (e.g. to
/// add it to a cgroup). Init then waits for [`Container::boot`]. `inherit` are descriptors init keeps for
/// its lifetime (e.g. the uid slot lock, so the id range stays reserved while any sandbox process could
/// still use it).
///
/// Must be called while the calling process is single-threaded.
pub fn start(
    cfg: &InitConfig,
    idmap: &IdMap,
    inherit: &[BorrowedFd<'_>],
    place: impl FnOnce(i32) -> Result<(), Box<dyn std::error::Error + Send + Sync>>,
) -> Result<Container, ContainerError> {
    let (ours, theirs) = crate::ipc::pair().map_err(ContainerError::Channel)?;
    let mut flags =
        libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if cfg.network != Network::Host {
        flags |= libc::CLONE_NEWNET;
    }
    match clone_process(flags as u64).map_err(ContainerError::Clone)? {
        CloneResult::Child => {
            drop(ours);
            let channel = keep_only(&[theirs.as_fd()], inherit).pop().expect("kept the channel");
            std::mem::forget(theirs);
            crate::init::run(cfg, Channel::new(channel))
        }
        CloneResult::Parent { pid, pidfd } => {
            drop(theirs);
            let container = Container { init_pid: pid, pidfd, channel: Channel::new(ours) };
            let prepared = idmap
                .write_for(container.init_pid)
                .map_err(ContainerError::IdMap)
                .and_then(|()| place(container.init_pid).map_err(ContainerError::Place));
            match prepared {
                Ok(()) => Ok(container),
                Err(e) => {
                    container.kill();
                    Err(e)
                }
            }
        }
    }
}

impl Container {
    /// Gives init its root filesystem (a detached mount) and waits until the sandbox is set up.
    /// On failure init is killed. Returns the signal guard's listener, to be served
    /// ([`crate::signal_guard::serve`]) from now on.
    pub fn boot(&self, rootfs: OwnedFd) -> Result<OwnedFd, ContainerError> {
        let booted =
            self.channel.send(&ToInit::Go, &[], &[rootfs.as_fd()]).map_err(ContainerError::InitLost).and_then(|()| {
                match self.channel.recv::<FromInit>().map_err(ContainerError::InitLost)? {
                    Packet { msg: FromInit::Ready, fds, .. } if fds.len() == 1 => {
                        Ok(fds.into_iter().next().expect("one fd"))
                    }
                    Packet { msg: FromInit::SetupFailed { message }, .. } => Err(ContainerError::Setup(message)),
                    Packet { msg, .. } => Err(ContainerError::Protocol(format!("{msg:?}"))),
                }
            });
        if booted.is_err() {
            self.kill();
        }
        booted
    }

    /// SIGKILLs init (the kernel then kills the whole pid namespace) and reaps it.
    pub fn kill(&self) {
        let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
        let _ = rustix::process::waitid(
            rustix::process::WaitId::PidFd(self.pidfd.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        );
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
