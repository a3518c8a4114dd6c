//! `deltabox serve`: the HTTP API on a Unix socket (root only) and optionally on TCP with a bearer token.

pub mod engine;
pub mod error;
pub mod files;
pub mod network;
pub mod routes;
pub mod shim_client;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use axum::extract::Request;
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use engine::{DaemonConfig, Engine};
use error::ApiError;

pub struct ServeOptions {
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    pub uid_slot_dir: PathBuf,
    pub fs_busy_poll: Option<Duration>,
    pub default_disk: deltafs::Quota,
    pub default_limits: sandbox::cgroup::Limits,
    /// The template memory budget of the daemon, and of sandboxes created without their own.
    pub template_memory: u64,
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
    pub nat: network::NatOptions,
    pub allow_host_network: bool,
}

/// Pids limit of sandboxes created without one, unless `--default-pids` says otherwise.
pub const DEFAULT_PIDS: u64 = 4096;

/// The limits of sandboxes created without their own, from the `serve` flags (0 = unlimited): memory
/// defaults to half of the host's, CPUs to all of them.
pub fn default_limits(pids: u64, memory: Option<u64>, cpus: Option<f64>) -> anyhow::Result<sandbox::cgroup::Limits> {
    let memory = memory.unwrap_or_else(|| {
        let info = rustix::system::sysinfo();
        info.totalram.saturating_mul(u64::from(info.mem_unit)) / 2
    });
    let limits = sandbox::cgroup::Limits {
        memory_bytes: (memory > 0).then_some(memory),
        pids: (pids > 0).then_some(pids),
        cpus: Some(cpus.unwrap_or_else(sandbox::cgroup::host_cpus)).filter(|c| *c != 0.0),
    };
    limits.validate().context("bad default limit")?;
    Ok(limits)
}

/// The template memory budget unless `--template-memory` says otherwise: a quarter of the host's memory.
/// Templates hold the pages their processes rewrote since (and page tables), which the processes would
/// not hold otherwise; a quarter leaves the sandboxes' own memory (half of the host's by default, see
/// [`default_limits`]) and the page cache room, and holds a 100-checkpoint tree of a 264 MB process
/// many times over (docs/deltacr.md, "Template memory budget").
pub fn default_template_memory() -> u64 {
    let info = rustix::system::sysinfo();
    info.totalram.saturating_mul(u64::from(info.mem_unit)) / 4
}

pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let engine = Engine::open(DaemonConfig {
        data_dir: opts.data_dir.clone(),
        uid_slot_dir: opts.uid_slot_dir,
        fs_busy_poll: opts.fs_busy_poll,
        default_disk: opts.default_disk,
        default_limits: opts.default_limits,
        template_memory: opts.template_memory,
        nat: opts.nat,
        allow_host_network: opts.allow_host_network,
    })
    .await?;
    let app = routes::router(engine.clone());
    let unix = bind_unix(&opts.socket)?;
    tracing::info!(socket = %opts.socket.display(), data_dir = %opts.data_dir.display(), "deltabox daemon listening");
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(axum::serve(unix, app.clone()).with_graceful_shutdown(shutdown_signal()).into_future());
    if let Some(addr) = opts.listen {
        let token = opts.token.clone().context("--listen needs a token (--token or DELTABOX_TOKEN)")?;
        if token.len() < 16 {
            anyhow::bail!("the API token must be at least 16 characters");
        }
        let tcp = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))?;
        tracing::info!(%addr, "also listening on TCP (bearer token required)");
        let authed = app.layer(axum::middleware::from_fn(move |req: Request, next: Next| {
            let token = token.clone();
            async move { require_token(&token, req, next).await }
        }));
        servers.spawn(axum::serve(tcp, authed).with_graceful_shutdown(shutdown_signal()).into_future());
    }
    while let Some(result) = servers.join_next().await {
        result.context("server task")?.context("serve HTTP")?;
    }
    let _ = std::fs::remove_file(&opts.socket);
    tracing::info!("daemon stopped; sandboxes keep running and are reattached at the next start");
    Ok(())
}

fn bind_unix(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another daemon is already serving {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn require_token(token: &str, req: Request, next: Next) -> Response {
    let given = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        ApiError::new(axum::http::StatusCode::UNAUTHORIZED, "unauthorized", "missing or wrong bearer token")
            .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
