//! The per-sandbox supervisor (`deltabox shim`).
//!
//! Started detached by the daemon, it reads a [`proto::ShimConfig`] on stdin, builds the sandbox while
//! still single-threaded (private mount namespace, uid slot, rootfs, cgroup, init), answers one
//! [`proto::ShimStartup`] line on stdout, then serves the daemon on `<sandbox_dir>/shim.sock` until the
//! sandbox is destroyed or its init dies. See docs/architecture.md.

pub mod exec;
pub mod fdio;
pub mod init_link;
pub mod proto;
pub mod session;

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sandbox::cgroup::Cgroup;
use sandbox::container::{self, Container};
use sandbox::init::InitConfig;
use sandbox::ipc::{AsyncChannel, AsyncListener, Packet};
use sandbox::rootfs::Rootfs;
use sandbox::userns::{namespace_with_map, UidSlot};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use init_link::InitLink;
use proto::{ErrorKind, ProcessDefaults, Reply, Request, ShimConfig, ShimInfo, ShimStartup};
use session::Session;

/// Socket file name in the sandbox directory.
pub const SOCKET: &str = "shim.sock";

/// State shared by the shim's request handlers.
pub struct Shim {
    pub id: String,
    pub defaults: ProcessDefaults,
    pub init: InitLink,
    cgroup: Cgroup,
    info: ShimInfo,
    sessions: tokio::sync::Mutex<HashMap<String, Arc<Session>>>,
    /// Notified when the shim should exit (the sandbox is gone).
    exit: Notify,
}

impl Shim {
    /// OOM kills in the sandbox so far (0 if the counter cannot be read).
    pub fn oom_kills(&self) -> u64 {
        self.cgroup.oom_kills().unwrap_or(0)
    }

    /// The sandbox-namespace pid of host process `host_pid`, if it is in this sandbox.
    pub fn sandbox_pid(&self, host_pid: i32) -> Option<i32> {
        let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
        let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
        let ids: Vec<i32> = nspid.split_whitespace().filter_map(|p| p.parse().ok()).collect();
        // Only a process nested one namespace below us (i.e. in the sandbox's namespace) qualifies.
        (ids.len() == 2 && self.cgroup.procs().ok()?.contains(&host_pid)).then(|| ids[1])
    }

    /// Kills every process of the sandbox (init included, so the kernel ends the pid namespace) and
    /// removes its cgroup. The rootfs mount goes away with our mount namespace when the shim exits.
    fn teardown(&self) -> anyhow::Result<()> {
        self.cgroup.kill_all().context("kill the sandbox's processes")?;
        Cgroup::remove(self.cgroup.name()).context("remove the sandbox's cgroup")?;
        Ok(())
    }
}

/// A sandbox built by [`start`], before the runtime starts.
struct Built {
    container: Container,
    cgroup: Cgroup,
    slot: UidSlot,
}

/// Entry point of `deltabox shim`.
pub fn main() -> anyhow::Result<()> {
    let cfg: ShimConfig = serde_json::from_reader(std::io::stdin().lock()).context("read the shim config")?;
    let built = start(&cfg);
    let startup = match &built {
        Ok(b) => ShimStartup::Started(ShimInfo {
            shim_pid: std::process::id() as i32,
            init_pid: b.container.init_pid,
            uid_base: b.slot.map.host_base,
        }),
        Err(e) => ShimStartup::Failed { message: format!("{e:#}") },
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&startup)?)?;
    out.flush()?;
    drop(out);
    // The daemon reads our stdout up to its end: close it for good.
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    sandbox::sys::dup_to(null.as_fd(), 1, false)?;
    let Ok(built) = built else {
        std::process::exit(1);
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(serve(cfg, built))
}

/// Builds the sandbox. Runs single-threaded: it clones processes.
fn start(cfg: &ShimConfig) -> anyhow::Result<Built> {
    container::enter_private_mount_namespace().context("create the shim's mount namespace")?;
    let slot = UidSlot::reserve(&cfg.uid_slot_dir, None).context("reserve a uid range")?;
    let base = slot.map.host_base;
    let (upper, work, rootfs) =
        (cfg.sandbox_dir.join("upper"), cfg.sandbox_dir.join("work"), cfg.sandbox_dir.join("rootfs"));
    for dir in [&upper, &work, &rootfs] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // The overlay's root directory takes its owner from the upper dir: make it the sandbox's root.
    std::os::unix::fs::chown(&upper, Some(base), Some(base)).context("chown the upper dir")?;
    let cgroup = Cgroup::create(&cfg.cgroup, &cfg.limits).context("create the sandbox's cgroup")?;
    let seccomp = sandbox::seccomp::default_filter().context("compile the seccomp filter")?;
    let init_cfg = InitConfig { hostname: cfg.id.clone(), network: cfg.network, mountpoint: rootfs, seccomp };
    // Init is cloned first, while we are single-threaded; building the root filesystem may start threads.
    let started = container::start(&init_cfg, &slot.map, &[slot.lock_fd()], |pid| {
        cgroup.add_process(pid).map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    })
    .context("start the sandbox")
    .and_then(|container| {
        let userns = namespace_with_map(&slot.map).context("create the id-mapping user namespace")?;
        let mount = Rootfs::Overlay { lower: cfg.layers.clone(), upper, work }
            .create(userns.as_fd())
            .context("mount the root filesystem")?;
        container.boot(mount).context("set up the sandbox")?;
        Ok(container)
    });
    match started {
        Ok(container) => Ok(Built { container, cgroup, slot }),
        Err(e) => {
            let _ = cgroup.destroy();
            Err(e)
        }
    }
}

async fn serve(cfg: ShimConfig, built: Built) -> anyhow::Result<()> {
    let Built { container, cgroup, slot } = built;
    let socket = cfg.sandbox_dir.join(SOCKET);
    let listener = AsyncListener::bind(&socket).context("listen on the shim socket")?;
    let info =
        ShimInfo { shim_pid: std::process::id() as i32, init_pid: container.init_pid, uid_base: slot.map.host_base };
    let shim = Arc::new(Shim {
        id: cfg.id.clone(),
        defaults: cfg.defaults.clone(),
        init: InitLink::new(AsyncChannel::new(container.channel.into_inner())?),
        cgroup,
        info,
        sessions: tokio::sync::Mutex::new(HashMap::new()),
        exit: Notify::new(),
    });
    tokio::spawn({
        let shim = shim.clone();
        async move { shim.init.dispatch().await }
    });
    let init_exit = wait_readable(container.pidfd)?;
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

async fn handle(shim: &Shim, conn: AsyncChannel) {
    let request = match conn.recv::<Request>().await {
        Ok(Packet { msg, .. }) => msg,
        Err(e) => {
            tracing::warn!("bad request: {e}");
            return;
        }
    };
    let result = match request {
        Request::Info => conn.send(&Reply::Info(shim.info.clone()), &[], &[]).await,
        Request::Exec(req) => exec::serve(shim, &conn, req).await,
        Request::SessionOpen { name } => {
            let reply = open_session(shim, &name).await;
            conn.send(&reply, &[], &[]).await
        }
        Request::SessionRun { name, command, timeout_ms, max_output } => {
            let session = shim.sessions.lock().await.get(&name).cloned();
            match session {
                None => conn.send(&not_found(&name), &[], &[]).await,
                Some(session) => {
                    let timeout = timeout_ms.map(Duration::from_millis);
                    let reply = match session.run(shim, &conn, &command, timeout, max_output).await {
                        Ok(outcome) => Reply::Exited(outcome),
                        Err(e) => {
                            if !session.alive() {
                                shim.sessions.lock().await.remove(&name);
                            }
                            e.reply()
                        }
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

fn not_found(name: &str) -> Reply {
    Reply::Error { kind: ErrorKind::SessionNotFound, message: format!("no session named {name:?}") }
}

async fn open_session(shim: &Shim, name: &str) -> Reply {
    if !valid_session_name(name) {
        let message = format!("invalid session name {name:?}: use 1-64 letters, digits, '-', '_' or '.'");
        return Reply::Error { kind: ErrorKind::BadRequest, message };
    }
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
