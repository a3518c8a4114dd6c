//! The per-sandbox supervisor (`deltabox shim`).
//!
//! Started detached by the daemon, it reads a [`proto::ShimConfig`] on stdin, builds the sandbox while
//! still single-threaded (private mount namespace, uid slot, rootfs, cgroup, init), answers one
//! [`proto::ShimStartup`] line on stdout, then serves the daemon on `<sandbox_dir>/shim.sock` until the
//! sandbox is destroyed or its init dies. See docs/architecture.md.

pub mod cr;
pub mod exec;
pub mod fdio;
pub mod init_link;
pub mod proto;
pub mod session;

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deltacr::image::ImageId;
use deltafs::StackId;
use sandbox::cgroup::Cgroup;
use sandbox::container::{self, Container};
use sandbox::init::InitConfig;
use sandbox::ipc::{AsyncChannel, AsyncListener, Packet};
use sandbox::net::NatSlot;
use sandbox::procfs::Status;
use sandbox::spec::Network;
use sandbox::userns::UidSlot;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use cr::{Cr, JobResult};
use init_link::InitLink;
use proto::{
    CheckpointStats, DiskTooSmall, ErrorKind, NatLink, ProcessDefaults, Reply, Request, RestoreSpec, RollbackStats,
    ShimConfig, ShimInfo, ShimStartup,
};
use session::Session;

/// Resolves once a process checkpoint's image is written: its size in bytes.
type ImageWritten = tokio::sync::oneshot::Receiver<JobResult<u64>>;

/// Socket file name in the sandbox directory.
pub const SOCKET: &str = "shim.sock";

/// A shell session and the name it answers to.
type NamedSession = (String, Arc<Session>);

/// State shared by the shim's request handlers.
pub struct Shim {
    pub id: String,
    pub defaults: ProcessDefaults,
    pub init: InitLink,
    cgroup: Arc<Cgroup>,
    info: ShimInfo,
    init_pidfd: OwnedFd,
    /// The checkpoint thread (DeltaCR, DeltaFS checkpoints and rollbacks).
    cr: Cr,
    sessions: tokio::sync::Mutex<HashMap<String, Arc<Session>>>,
    /// The sessions captured by each process checkpoint kept here (by its stack).
    snapshots: tokio::sync::Mutex<HashMap<StackId, Vec<NamedSession>>>,
    /// Terminals a restore had to make again for processes that are not sessions (e.g. an interactive shell
    /// whose client is gone): kept open and drained, so their processes are not hung up.
    terminals: std::sync::Mutex<Vec<Arc<fdio::AsyncFile>>>,
    /// The DeltaFS stack the sandbox was started from.
    stack: StackId,
    /// Keeps the sandbox's uid range reserved.
    _slot: UidSlot,
    /// Its address in the `nat` network, reserved while the shim (and init, which inherited it) lives.
    _nat: Option<NatSlot>,
    /// Written by checkpoints and rollbacks (one at a time), read while a process is started in the
    /// sandbox ([`Shim::starting_process`]): init forks nothing while a restore chooses pids (see
    /// `deltacr::pidns`), so an exec or a session that arrives during a rollback starts after it. Taken
    /// before `sessions`.
    state_change: tokio::sync::RwLock<()>,
    /// Notified when the shim should exit (the sandbox is gone).
    exit: Notify,
}

impl Shim {
    /// OOM kills in the sandbox so far (0 if the counter cannot be read).
    pub fn oom_kills(&self) -> u64 {
        self.cgroup.oom_kills().unwrap_or(0)
    }

    /// To be held while init is asked to start a process (not while it runs): no checkpoint or rollback
    /// runs meanwhile.
    pub async fn starting_process(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.state_change.read().await
    }

    /// Has init start a process, holding [`Shim::starting_process`] while it does.
    pub async fn spawn_process(
        &self,
        spec: sandbox::spec::ProcessSpec,
        stdio: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<init_link::Spawned, init_link::InitError> {
        let _no_rollback = self.starting_process().await;
        self.init.spawn(spec, stdio).await
    }

    /// The sandbox-namespace pid of host process `host_pid`, if it is in this sandbox.
    pub fn sandbox_pid(&self, host_pid: i32) -> Option<i32> {
        let ids = Status::read(nix::unistd::Pid::from_raw(host_pid)).ok()?.numbers("NSpid").ok()?;
        // Only a process nested one namespace below us (i.e. in the sandbox's namespace) qualifies.
        (ids.len() == 2 && self.cgroup.procs().ok()?.contains(&host_pid)).then(|| ids[1] as i32)
    }

    /// Checkpoint (freeze, filesystem, with `processes` every process, thaw) on the checkpoint thread. The
    /// sessions are held while it runs, so the set of shells captured is the set recorded. Returns the
    /// stats and, for a process checkpoint, a receiver that resolves once the image is durable.
    async fn checkpoint(
        &self,
        processes: bool,
        parent: Option<StackId>,
    ) -> anyhow::Result<(CheckpointStats, Option<ImageWritten>)> {
        let _one_at_a_time = self.state_change.write().await;
        let sessions = self.sessions.lock().await;
        let captured = self.cr.checkpoint(processes, parent).await?;
        let live: Vec<(String, Arc<Session>)> =
            sessions.iter().filter(|(_, s)| s.alive()).map(|(n, s)| (n.clone(), s.clone())).collect();
        drop(sessions);
        let mut stats = CheckpointStats {
            stack: captured.stack,
            pause_ms: captured.stopped_ms,
            fs_ms: captured.fs_ms,
            processes: None,
            image: None,
            sessions: vec![],
            reset_connections: vec![],
        };
        let Some(capture) = captured.processes else { return Ok((stats, None)) };
        stats.processes = Some(capture.count);
        stats.reset_connections = capture.reset_connections;
        stats.image = Some(capture.image);
        stats.sessions = live.iter().map(|(name, s)| s.snapshot(name)).collect();
        // The shells' terminals and FIFOs stay open while the checkpoint may be restored here.
        self.snapshots.lock().await.insert(captured.stack, live);
        Ok((stats, Some(capture.written)))
    }

    /// Rollback on the checkpoint thread: every process but init is killed, the filesystem switches to
    /// `stack`, and with `image` the checkpoint's processes come back — its shell sessions included.
    async fn rollback(
        &self,
        stack: StackId,
        image: Option<ImageId>,
        address: Option<std::net::Ipv4Addr>,
    ) -> anyhow::Result<RollbackStats> {
        let _one_at_a_time = self.state_change.write().await;
        let mut sessions = self.sessions.lock().await;
        let mut restored = self.cr.rollback(stack, image, address).await?;
        self.keep_terminals(std::mem::take(&mut restored.pty_masters));
        let kept = match image {
            Some(_) => self.snapshots.lock().await.get(&stack).cloned().unwrap_or_default(),
            None => vec![],
        };
        let sessions_closed: Vec<String> =
            sessions.keys().filter(|name| !kept.iter().any(|(k, _)| k == *name)).cloned().collect();
        sessions.clear();
        let mut sessions_restored = Vec::new();
        for (name, session) in kept {
            session.watch(self.init.watch(session.pid()).await?);
            session.reset_channels().await.context("empty a restored session's FIFOs")?;
            sessions_restored.push(name.clone());
            sessions.insert(name, session);
        }
        Ok(RollbackStats {
            pause_ms: restored.total_ms,
            fs_ms: restored.fs_ms,
            processes_killed: restored.killed,
            processes_restored: restored.restored,
            from_image: restored.from_image,
            sessions_closed,
            sessions_restored,
            changed_inodes: restored.changed_inodes,
        })
    }

    /// Restores, in this fresh sandbox, the processes of the checkpoint it is a fork of, and serves the
    /// checkpoint's shell sessions again (init opens their FIFOs first, for the restored shells to find by
    /// path and for the shim; DeltaCR makes their ptys again).
    async fn restore_fork(&self, spec: &RestoreSpec) -> anyhow::Result<()> {
        let paths = spec.sessions.iter().flat_map(|s| session::fifo_paths(s.nonce)).collect();
        let mut fifos = self.init.open_fifos(paths).await.context("open the sessions' FIFOs")?.into_iter();
        let mut restored = self.cr.restore_image(spec.image, spec.address).await?;
        let mut sessions = self.sessions.lock().await;
        let mut adopted = Vec::new();
        for snap in &spec.sessions {
            let own = [(); 3].map(|()| fifos.next().expect("three FIFOs per session"));
            let Some(master) = restored.pty_masters.remove(&snap.pty) else {
                tracing::warn!(session = %snap.name, "the restored shell has no terminal; the session is not served");
                continue;
            };
            let session = Session::attach(snap.pid, snap.nonce, master, own)?;
            session.watch(self.init.watch(snap.pid).await?);
            sessions.insert(snap.name.clone(), session.clone());
            adopted.push((snap.name.clone(), session));
        }
        drop(sessions);
        self.keep_terminals(std::mem::take(&mut restored.pty_masters));
        tracing::info!(processes = restored.restored, ms = restored.total_ms, "restored the checkpoint's processes");
        // A rollback of this sandbox to the checkpoint it was forked from serves these sessions again.
        self.snapshots.lock().await.insert(self.stack, adopted);
        Ok(())
    }

    /// Keeps terminals a restore made again (for processes that are not sessions) open and drained.
    fn keep_terminals(&self, masters: std::collections::BTreeMap<u32, OwnedFd>) {
        for (_, master) in masters {
            match fdio::AsyncFile::new(master) {
                Ok(file) => {
                    let file = Arc::new(file);
                    session::drain(file.clone());
                    self.terminals.lock().expect("terminals lock").push(file);
                }
                Err(e) => tracing::warn!("cannot serve a restored terminal: {e}"),
            }
        }
    }

    /// Drops the in-memory copies of the process checkpoint of `stack`.
    async fn forget(&self, stack: StackId) {
        self.snapshots.lock().await.remove(&stack);
        self.cr.forget(stack);
    }

    /// Kills every process of the sandbox (init included, so the kernel ends the pid namespace) and
    /// removes its cgroup. The rootfs mount goes away with our mount namespace when the shim exits.
    fn teardown(&self) -> anyhow::Result<()> {
        self.cr.shutdown();
        self.cgroup.kill_all().context("kill the sandbox's processes")?;
        // Reap init (our child) so it does not linger as a zombie with the sandbox's uid.
        let _ = rustix::process::waitid(
            rustix::process::WaitId::PidFd(self.init_pidfd.as_fd()),
            rustix::process::WaitIdOptions::EXITED,
        );
        Cgroup::remove(self.cgroup.name()).context("remove the sandbox's cgroup")?;
        Ok(())
    }
}

/// A sandbox built by [`start`], before the runtime starts.
struct Built {
    container: Container,
    cgroup: Arc<Cgroup>,
    slot: UidSlot,
    nat: Option<NatSlot>,
    cr: Cr,
}

/// Entry point of `deltabox shim`.
pub fn main() -> anyhow::Result<()> {
    let cfg: ShimConfig = serde_json::from_reader(std::io::stdin().lock()).context("read the shim config")?;
    let socket = cfg.sandbox_dir.join(SOCKET);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let ready = start(&cfg).and_then(|built| {
        let cgroup = built.cgroup.clone();
        let ready = rt.block_on(ready_to_serve(&cfg, built, &socket));
        if ready.is_err() {
            discard(&cgroup);
        }
        ready
    });
    let startup = match &ready {
        Ok((shim, _, _)) => ShimStartup::Started(shim.info.clone()),
        Err(e) => ShimStartup::Failed {
            message: format!("{e:#}"),
            disk_too_small: e.downcast_ref::<DiskTooSmall>().is_some(),
        },
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&startup)?)?;
    out.flush()?;
    drop(out);
    // The daemon reads our stdout up to its end: close it for good.
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    sandbox::sys::dup_to(null.as_fd(), 1, false)?;
    let Ok((shim, listener, init_pidfd)) = ready else {
        std::process::exit(1);
    };
    rt.block_on(serve(shim, listener, init_pidfd, socket))
}

/// Kills whatever a failed start left in the sandbox's cgroup and removes the cgroup.
fn discard(cgroup: &Cgroup) {
    let _ = cgroup.kill_all();
    let _ = Cgroup::remove(cgroup.name());
}

/// Turns the built sandbox into a serving shim: talks to init, restores the processes of the checkpoint the
/// sandbox is a fork of (if it is one), and listens — all before we report, since the daemon's first
/// request may come right after the report.
async fn ready_to_serve(
    cfg: &ShimConfig,
    built: Built,
    socket: &std::path::Path,
) -> anyhow::Result<(Arc<Shim>, AsyncListener, OwnedFd)> {
    let Built { container, cgroup, slot, nat, cr } = built;
    let info = ShimInfo {
        protocol: proto::PROTOCOL,
        shim_pid: std::process::id() as i32,
        init_pid: container.init_pid,
        uid_base: slot.map.host_base,
        templates: Vec::new(),
        nat: nat.as_ref().map(|n| NatLink { interface: n.host.name.clone(), address: n.sandbox }),
    };
    let shim = Arc::new(Shim {
        id: cfg.id.clone(),
        defaults: cfg.defaults.clone(),
        init: InitLink::new(AsyncChannel::new(container.channel.into_inner())?),
        cgroup,
        info,
        init_pidfd: container.pidfd.try_clone()?,
        cr,
        _slot: slot,
        _nat: nat,
        sessions: tokio::sync::Mutex::new(HashMap::new()),
        snapshots: tokio::sync::Mutex::new(HashMap::new()),
        terminals: std::sync::Mutex::new(Vec::new()),
        stack: cfg.stack,
        state_change: tokio::sync::RwLock::new(()),
        exit: Notify::new(),
    });
    tokio::spawn({
        let shim = shim.clone();
        async move { shim.init.dispatch().await }
    });
    if let Some(spec) = &cfg.restore {
        shim.restore_fork(spec).await.context("restore the checkpoint's processes")?;
    }
    let listener = AsyncListener::bind(socket).context("listen on the shim socket")?;
    Ok((shim, listener, container.pidfd))
}

/// Refuses disk limits the files (of the image, or of the checkpoint forked) already exceed: the
/// sandbox could not write a byte.
fn check_disk_fits(fs: &deltafs::Mount, limits: deltafs::Quota) -> Result<(), DiskTooSmall> {
    let used = fs.usage();
    if let (Some(max), Some(bytes)) = (limits.bytes, used.bytes) {
        if bytes > max {
            return Err(DiskTooSmall(format!("the files take {bytes} bytes, more than the disk limit of {max} bytes")));
        }
    }
    match limits.inodes {
        Some(max) if used.inodes > max => {
            Err(DiskTooSmall(format!("the files use {} inodes, more than the limit of {max}", used.inodes)))
        }
        _ => Ok(()),
    }
}

/// Builds the sandbox. Runs single-threaded until init is cloned (mounting DeltaFS starts threads).
fn start(cfg: &ShimConfig) -> anyhow::Result<Built> {
    container::enter_private_mount_namespace().context("create the shim's mount namespace")?;
    let slot = UidSlot::reserve(&cfg.uid_slot_dir, None).context("reserve a uid range")?;
    let base = slot.map.host_base;
    let rootfs = cfg.sandbox_dir.join("rootfs");
    std::fs::create_dir_all(&rootfs).with_context(|| format!("create {}", rootfs.display()))?;
    let cgroup = Cgroup::create(&cfg.cgroup, &cfg.limits).context("create the sandbox's cgroup")?;
    let seccomp = sandbox::seccomp::default_filter().context("compile the seccomp filter")?;
    let nat = match (cfg.network, &cfg.nat) {
        (Network::Nat, Some(nat)) => Some(
            NatSlot::reserve(&nat.slot_dir, nat.subnet, &cfg.id).context("reserve an address in the nat network")?,
        ),
        (Network::Nat, None) => anyhow::bail!("the nat network needs its configuration"),
        _ => None,
    };
    let init_cfg = InitConfig {
        hostname: cfg.id.clone(),
        network: cfg.network,
        nat: nat.as_ref().map(|n| n.sandbox),
        mountpoint: rootfs.clone(),
        seccomp,
    };
    let slots: Vec<_> = std::iter::once(slot.lock_fd()).chain(nat.as_ref().map(NatSlot::lock_fd)).collect();
    let started = container::start(&init_cfg, &slot.map, &slots, |pid| {
        cgroup.add_process(pid).map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    })
    .context("start the sandbox")
    .and_then(|container| {
        if let Some(nat) = &nat {
            let started = std::time::Instant::now();
            sandbox::net::create_link(&nat.host, container.init_pid).context("create the sandbox's network link")?;
            tracing::debug!(ms = started.elapsed().as_secs_f64() * 1000.0, "created the network link");
        }
        let store = deltafs::Store::open(&cfg.store).context("open the DeltaFS store")?;
        let stack = cfg.stack;
        // With the sandbox's processes listed, opening a file costs no FUSE round trip.
        let processes = Some(cgroup.procs_file().context("find the sandbox cgroup's process list")?);
        let opts = deltafs::MountOptions {
            uid_base: base,
            gid_base: base,
            processes,
            busy_poll: cfg.fs_busy_poll,
            quota: cfg.disk,
            ..Default::default()
        };
        let fs = deltafs::mount(&store, stack, &rootfs, &opts).context("mount DeltaFS")?;
        check_disk_fits(&fs, cfg.disk)?;
        // Init attaches a copy of our mount in its own mount namespace.
        let detached = rustix::mount::open_tree(
            rustix::fs::CWD,
            &rootfs,
            rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )
        .context("clone the DeltaFS mount for init")?;
        let guard = container.boot(detached).context("set up the sandbox")?;
        Ok((container, fs, guard))
    });
    let cgroup = Arc::new(cgroup);
    let started = started.and_then(|(container, fs, guard)| {
        // From here on the sandbox's signals by pid wait for this thread (docs/security.md).
        let guarded = cgroup.clone();
        std::thread::Builder::new()
            .name("signal-guard".into())
            .spawn(move || sandbox::signal_guard::serve(guard, guarded))
            .context("start the signal guard")?;
        let images = deltacr::image::ImageStore::new(&cfg.images).context("open the process image store")?;
        let address = nat.as_ref().map(|n| n.sandbox.address);
        let parts = cr::Parts { init: container.init_pid, cgroup: cgroup.clone(), fs: Arc::new(fs), images, address };
        let cr = Cr::spawn(parts).context("start the checkpoint thread")?;
        Ok((container, cr))
    });
    match started {
        Ok((container, cr)) => Ok(Built { container, cgroup, slot, nat, cr }),
        Err(e) => {
            discard(&cgroup);
            Err(e)
        }
    }
}

async fn serve(shim: Arc<Shim>, listener: AsyncListener, init_pidfd: OwnedFd, socket: PathBuf) -> anyhow::Result<()> {
    let init_exit = wait_readable(init_pidfd)?;
    tokio::pin!(init_exit);
    let exit = shim.exit.notified();
    tokio::pin!(exit);
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok(conn) => {
                    let shim = shim.clone();
                    tokio::spawn(async move { handle(&shim, conn).await });
                }
                Err(e) => tracing::warn!("accept failed: {e}"),
            },
            _ = &mut init_exit => {
                tracing::error!("the sandbox's init died; tearing the sandbox down");
                let _ = std::fs::remove_file(&socket);
                return shim.teardown();
            }
            _ = &mut exit => {
                // A Destroy request already tore the sandbox down and answered.
                return Ok(());
            }
        }
    }
}

/// Resolves when `fd` (a pidfd) becomes readable, i.e. the process exited.
fn wait_readable(fd: OwnedFd) -> std::io::Result<impl std::future::Future<Output = ()>> {
    // SAFETY: we own `fd` and never replace or close it while the AsyncFd holds it.
    let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)?;
    Ok(async move {
        let _ = fd.readable().await;
    })
}

fn valid_session_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

async fn handle(shim: &Arc<Shim>, conn: AsyncChannel) {
    let request = match conn.recv::<Request>().await {
        Ok(Packet { msg, .. }) => msg,
        Err(e) => {
            tracing::warn!("bad request: {e}");
            return;
        }
    };
    let result = match request {
        Request::Info => {
            let info = ShimInfo { templates: shim.cr.kept(), ..shim.info.clone() };
            conn.send(&Reply::Info(info), &[], &[]).await
        }
        Request::Exec(req) => exec::serve(shim, &conn, req).await,
        Request::SessionOpen { name } => {
            let reply = open_session(shim, &name).await;
            conn.send(&reply, &[], &[]).await
        }
        Request::SessionRun { name, command, timeout_ms, max_output } => {
            let session = shim.sessions.lock().await.get(&name).cloned();
            match session {
                None => conn.send(&not_found(&name), &[], &[]).await,
                Some(_) if command.contains('\0') => {
                    let message = "the command contains a NUL byte".to_string();
                    conn.send(&Reply::Error { kind: ErrorKind::BadRequest, message }, &[], &[]).await
                }
                Some(session) => {
                    let timeout = timeout_ms.map(Duration::from_millis);
                    let reply = match session.run(shim, &conn, &command, timeout, max_output).await {
                        Ok(outcome) => Reply::Exited(outcome),
                        Err(e) => run_failed(shim, &name, &session, e).await,
                    };
                    conn.send(&reply, &[], &[]).await
                }
            }
        }
        Request::SessionClose { name } => {
            let session = shim.sessions.lock().await.remove(&name);
            match session {
                None => conn.send(&not_found(&name), &[], &[]).await,
                Some(session) => {
                    session.close(shim).await;
                    conn.send(&Reply::Done, &[], &[]).await
                }
            }
        }
        Request::SessionList => {
            let mut sessions = shim.sessions.lock().await;
            sessions.retain(|_, s| s.alive());
            let mut names: Vec<String> = sessions.keys().cloned().collect();
            names.sort();
            drop(sessions);
            conn.send(&Reply::Sessions(names), &[], &[]).await
        }
        Request::Checkpoint { processes, parent } => match shim.checkpoint(processes, parent).await {
            Err(e) => {
                let reply = Reply::Error { kind: checkpoint_error_kind(&e), message: format!("{e:#}") };
                conn.send(&reply, &[], &[]).await
            }
            Ok((stats, written)) => {
                let sent = conn.send(&Reply::Checkpointed(stats), &[], &[]).await;
                match written {
                    None => sent,
                    Some(written) => {
                        let reply = match written.await {
                            Ok(Ok(bytes)) => Reply::ImageWritten { bytes },
                            Ok(Err(e)) => Reply::Error {
                                kind: failure_kind(&e),
                                message: format!("writing the process image failed: {e:#}"),
                            },
                            Err(_) => Reply::Error {
                                kind: ErrorKind::CheckpointFailed,
                                message: "the image writer stopped".into(),
                            },
                        };
                        conn.send(&reply, &[], &[]).await
                    }
                }
            }
        },
        Request::Rollback { stack, image, address } => {
            let reply = match shim.rollback(stack, image, address).await {
                Ok(stats) => Reply::RolledBack(stats),
                Err(e) => Reply::Error { kind: failure_kind(&e), message: format!("{e:#}") },
            };
            conn.send(&reply, &[], &[]).await
        }
        Request::Forget { stack } => {
            shim.forget(stack).await;
            conn.send(&Reply::Done, &[], &[]).await
        }
        Request::DropTemplates { stack } => {
            shim.cr.drop_templates(stack);
            conn.send(&Reply::Done, &[], &[]).await
        }
        Request::Destroy => {
            let reply = match shim.teardown() {
                Ok(()) => Reply::Done,
                Err(e) => Reply::Error { kind: ErrorKind::Internal, message: format!("{e:#}") },
            };
            let sent = conn.send(&reply, &[], &[]).await;
            shim.exit.notify_one();
            sent
        }
    };
    if let Err(e) = result {
        tracing::debug!("client connection ended: {e}");
    }
}

/// A process holding something DeltaCR cannot capture is the sandbox's state, which its user can change
/// (or take a filesystem-only checkpoint): not a failure of the checkpoint.
fn checkpoint_error_kind(e: &anyhow::Error) -> ErrorKind {
    let unsupported =
        e.chain().any(|cause| cause.downcast_ref::<deltacr::CrError>().is_some_and(deltacr::CrError::is_unsupported));
    if unsupported {
        ErrorKind::CheckpointUnsupported
    } else {
        failure_kind(e)
    }
}

/// A failed checkpoint, rollback or image write: a full disk (which the user can free, or roll back) or
/// another failure.
fn failure_kind(e: &anyhow::Error) -> ErrorKind {
    if crate::errors::is_disk_full(e) {
        ErrorKind::NoSpace
    } else {
        ErrorKind::CheckpointFailed
    }
}

/// The reply to a session run that failed. A shell that is gone means the session ended: it is forgotten,
/// unless a rollback meanwhile put another session (or this one, restored) under its name.
async fn run_failed(shim: &Shim, name: &str, session: &Arc<Session>, e: session::SessionError) -> Reply {
    let mut sessions = shim.sessions.lock().await;
    let current = sessions.get(name).is_some_and(|s| Arc::ptr_eq(s, session));
    match e {
        _ if current && !session.alive() => {
            sessions.remove(name);
            session::SessionError::Ended.reply()
        }
        // The shell was killed by a rollback that restored it before this reply.
        session::SessionError::Ended if current => session::SessionError::RolledBack.reply(),
        _ if !current => session::SessionError::Ended.reply(),
        e => e.reply(),
    }
}

fn not_found(name: &str) -> Reply {
    Reply::Error { kind: ErrorKind::SessionNotFound, message: format!("no session named {name:?}") }
}

async fn open_session(shim: &Shim, name: &str) -> Reply {
    if !valid_session_name(name) {
        let message = format!("invalid session name {name:?}: use 1-64 letters, digits, '-', '_' or '.'");
        return Reply::Error { kind: ErrorKind::BadRequest, message };
    }
    let _no_rollback = shim.starting_process().await;
    let mut sessions = shim.sessions.lock().await;
    if sessions.get(name).is_some_and(|s| s.alive()) {
        return Reply::Error { kind: ErrorKind::SessionExists, message: format!("session {name:?} already exists") };
    }
    match Session::start(shim).await {
        Ok(session) => {
            sessions.insert(name.to_string(), session);
            Reply::Done
        }
        Err(e) => e.reply(),
    }
}
