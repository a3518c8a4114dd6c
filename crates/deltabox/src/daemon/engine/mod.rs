//! The daemon's state: catalog, layer store, live sandboxes (each run by its shim). One file per
//! lifecycle operation: [`recover`] (at start), [`create`], [`images`], [`network`], [`remove`], [`checkpoint`]
//! (and checkpoint queries and deletion), [`durable`] (making checkpoints power-loss safe, in the
//! background), [`rollback`], [`fork`], [`gc`], [`budget`] (the template memory budget, in the
//! background); [`tree`] holds the pure checkpoint-tree logic they share.
//!
//! Errors are [`EngineError`]s; `daemon/error.rs` alone turns them into HTTP answers.

pub mod budget;
mod checkpoint;
mod create;
mod durable;
mod error;
mod fork;
mod gc;
mod images;
mod network;
mod recover;
mod remove;
mod rollback;
mod tree;

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use sandbox::cgroup::{Cgroup, Limits};
use sandbox::image::LayerStore;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::RwLock;

pub use create::env_pairs;
pub use error::{EngineError, EngineResult};

use super::network::{NatNetwork, NatOptions};
use super::shim_client::ShimClient;
use crate::api::{IncompatibleShim, SandboxView};
use crate::catalog::{Catalog, CheckpointRecord, SandboxRecord};
use crate::shim::proto::{ShimInfo, PROTOCOL};

/// How long a fork or rollback waits for a process image still being written.
const IMAGE_WAIT: Duration = Duration::from_secs(120);
/// Most sandboxes one fork call creates.
pub const MAX_FORKS: usize = 64;

pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub uid_slot_dir: PathBuf,
    /// DeltaFS busy polling for the sandboxes this daemon starts (`deltafs::MountOptions::busy_poll`).
    pub fs_busy_poll: Option<Duration>,
    /// Filesystem size limits of sandboxes created without their own.
    pub default_disk: deltafs::Quota,
    /// Memory, pids and CPU limits of sandboxes created without their own (`None`: unlimited).
    pub default_limits: Limits,
    /// Most memory the templates of all sandboxes may hold together; also the budget of a sandbox created
    /// without its own (`budget.rs`).
    pub template_memory: u64,
    /// The `nat` network mode's settings.
    pub nat: NatOptions,
    /// Whether sandboxes may use the host's own network (`--allow-host-network`).
    pub allow_host_network: bool,
}

/// A running sandbox.
#[derive(Clone)]
pub struct Live {
    pub record: SandboxRecord,
    /// What its shim announced. A shim of another protocol version (`info.protocol != PROTOCOL`) is
    /// left running but not used: its sandbox can only be listed and deleted.
    pub info: ShimInfo,
    /// Held by checkpoints and rollbacks of this sandbox, so its checkpoint chain stays linear.
    pub ops: Arc<tokio::sync::Mutex<()>>,
}

impl Live {
    fn new(record: SandboxRecord, info: ShimInfo) -> Live {
        Live { record, info, ops: Arc::new(tokio::sync::Mutex::new(())) }
    }

    fn compatible(&self) -> bool {
        self.info.protocol == PROTOCOL
    }
}

pub struct Engine {
    pub data_dir: PathBuf,
    /// Names this data dir's cgroups (`deltabox/<instance>/<id>`), so daemons never touch each other's.
    instance: String,
    catalog: Mutex<Catalog>,
    pub layers: LayerStore,
    sandboxes: RwLock<HashMap<String, Live>>,
    uid_slot_dir: PathBuf,
    fs_busy_poll: Option<Duration>,
    default_disk: deltafs::Quota,
    default_limits: Limits,
    exe: PathBuf,
    /// Held by imports and layer garbage collection, so GC never deletes a layer an import just wrote.
    pub image_lock: tokio::sync::Mutex<()>,
    /// The DeltaFS store every sandbox's filesystem lives in.
    fs: deltafs::Store,
    /// The DeltaCR store of process images.
    images: deltacr::image::ImageStore,
    /// Read-held while a sandbox is started from a stack, write-held by filesystem GC: a stack about to be
    /// mounted is not yet protected by the mount's lock.
    fs_gc: RwLock<()>,
    /// Held (read) while a checkpoint, rollback or fork links a sandbox or checkpoint to a checkpoint
    /// (parent, head, origin), and (write) while checkpoints are deleted: a link never names a deleted one.
    links: RwLock<()>,
    syncer: durable::Syncer,
    pub template_memory: budget::TemplateMemory,
    /// The `nat` network, or why this host cannot have it.
    nat: Result<Arc<NatNetwork>, String>,
    allow_host_network: bool,
    _lock: File,
}

impl Engine {
    /// Opens the data directory (refusing one another daemon uses) and recovers its sandboxes.
    pub async fn open(cfg: DaemonConfig) -> anyhow::Result<Arc<Engine>> {
        let dir = &cfg.data_dir;
        std::fs::create_dir_all(dir.join("sandboxes")).with_context(|| format!("create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let lock = lock_data_dir(dir)?;
        let instance = instance_id(dir)?;
        let catalog = Catalog::open(&dir.join("catalog.db")).context("open the catalog")?;
        let layers = LayerStore::open(&dir.join("images")).context("open the layer store")?;
        let fs = deltafs::Store::open(&dir.join("deltafs")).context("open the DeltaFS store")?;
        let images = deltacr::image::ImageStore::new(&dir.join("deltacr")).context("open the process image store")?;
        let syncer =
            durable::Syncer::new(&[dir, fs.path(), &dir.join("deltacr")]).context("open the data directory")?;
        let nat = tokio::task::spawn_blocking(move || NatNetwork::open(cfg.nat)).await?.map(Arc::new).map_err(|e| {
            tracing::warn!("{e}");
            e.to_string()
        });
        let engine = Arc::new(Engine {
            data_dir: dir.clone(),
            instance,
            catalog: Mutex::new(catalog),
            layers,
            sandboxes: RwLock::new(HashMap::new()),
            uid_slot_dir: cfg.uid_slot_dir,
            fs_busy_poll: cfg.fs_busy_poll,
            default_disk: cfg.default_disk,
            default_limits: cfg.default_limits,
            exe: std::env::current_exe().context("find our own executable")?,
            image_lock: tokio::sync::Mutex::new(()),
            fs,
            images,
            fs_gc: RwLock::new(()),
            links: RwLock::new(()),
            syncer,
            template_memory: budget::TemplateMemory::new(cfg.template_memory),
            nat,
            allow_host_network: cfg.allow_host_network,
            _lock: lock,
        });
        engine.recover().await?;
        engine.watch_template_memory();
        Ok(engine)
    }

    pub fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        self.catalog.lock().expect("catalog lock")
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("sandboxes").join(id)
    }

    fn cgroup_parent(&self) -> String {
        format!("deltabox/{}", self.instance)
    }

    fn cgroup_name(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup_parent())
    }

    /// Watches sandbox `id`'s shim: if it exits while the sandbox is still listed (it crashed, or someone
    /// killed it), the sandbox cannot be managed any more and is removed.
    fn watch_shim(self: &Arc<Self>, id: String, shim_pid: i32) {
        let watch = match shim_exit(shim_pid) {
            Ok(watch) => watch,
            Err(e) => return tracing::warn!(%id, "cannot watch the shim (pid {shim_pid}): {e}"),
        };
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            let _ = watch.readable().await;
            let Some(engine) = engine.upgrade() else { return };
            if engine.sandboxes.write().await.remove(&id).is_some() {
                tracing::error!(%id, "the sandbox's shim exited unexpectedly; removing the sandbox");
                engine.detach_network(&id).await;
                engine.force_cleanup(&id);
                if let Err(e) = engine.catalog().delete_sandbox(&id) {
                    tracing::error!(%id, "cannot remove the sandbox from the catalog: {e}");
                }
            }
        });
    }

    /// Whether checkpoint `cp`'s process image is complete on disk.
    fn image_on_disk(&self, cp: &CheckpointRecord) -> bool {
        cp.image.is_some_and(|image| self.images.open(image).is_ok())
    }

    /// Kills what is left of sandbox `id` (through its cgroup: init and every process) and removes its
    /// cgroup and directory. Mounts need no cleanup: they live only in the shim's and the sandbox's
    /// mount namespaces, which end with their processes.
    fn force_cleanup(&self, id: &str) {
        let name = self.cgroup_name(id);
        if let Ok(cg) = Cgroup::open(&name) {
            // With the shim gone, processes waiting on its FUSE server would wait forever: abort the
            // connection first (any sandbox process sees the root filesystem as `/`).
            if let Some(&pid) = cg.procs().unwrap_or_default().first() {
                if let Err(e) = deltafs::abort_stale_mount(Some(pid as u32), Path::new("/")) {
                    tracing::debug!(%id, "no FUSE connection to abort: {e}");
                }
            }
            if let Err(e) = cg.kill_all() {
                tracing::error!(%id, "cannot kill the sandbox's processes: {e}");
            }
        }
        if let Err(e) = Cgroup::remove(&name) {
            tracing::error!(%id, "cannot remove the sandbox's cgroup: {e}");
        }
        let dir = self.sandbox_dir(id);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::error!(%id, "cannot remove {}: {e}", dir.display());
            }
        }
    }

    /// The client of sandbox `id`'s shim.
    pub fn shim(&self, id: &str) -> ShimClient {
        ShimClient::new(id, self.sandbox_dir(id).join(crate::shim::SOCKET))
    }

    /// Sandbox `id`, listed whether or not its shim can be used.
    pub async fn listed(&self, id: &str) -> EngineResult<Live> {
        let live = self.sandboxes.read().await.get(id).cloned();
        live.ok_or_else(|| EngineError::SandboxNotFound(id.to_string()))
    }

    /// Sandbox `id`, if its shim can be used.
    pub async fn live(&self, id: &str) -> EngineResult<Live> {
        let live = self.listed(id).await?;
        if !live.compatible() {
            return Err(self.shim(id).incompatible(live.info.protocol).into());
        }
        Ok(live)
    }

    pub async fn list(&self) -> Vec<SandboxView> {
        let mut all: Vec<SandboxView> = self.sandboxes.read().await.values().map(view).collect();
        all.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        all
    }

    pub fn checkpoint_record(&self, id: &str) -> EngineResult<CheckpointRecord> {
        self.catalog().checkpoint(id)?.ok_or_else(|| EngineError::CheckpointNotFound(id.to_string()))
    }

    fn sandbox_record(&self, id: &str) -> EngineResult<SandboxRecord> {
        self.catalog().sandbox(id)?.ok_or_else(|| EngineError::SandboxNotFound(id.to_string()))
    }

    /// Replaces the cached record of a live sandbox.
    async fn refresh(&self, record: SandboxRecord) {
        if let Some(live) = self.sandboxes.write().await.get_mut(&record.id) {
            live.record = record;
        }
    }
}

pub fn view(live: &Live) -> SandboxView {
    let r = &live.record;
    let c = &r.config;
    SandboxView {
        id: r.id.clone(),
        image: c.image.clone(),
        state: if live.compatible() { "running" } else { "incompatible shim" }.into(),
        incompatible_shim: (!live.compatible())
            .then_some(IncompatibleShim { shim_protocol: live.info.protocol, daemon_protocol: PROTOCOL }),
        network: c.network,
        address: live.info.nat.as_ref().map(|n| n.address.address),
        memory: c.limits.memory_bytes,
        pids: c.limits.pids,
        cpus: c.limits.cpus,
        disk: c.disk.bytes,
        inodes: c.disk.inodes,
        template_memory: c.template_memory,
        origin: r.origin.clone(),
        head: r.head.clone(),
        created: r.created,
        uid_base: Some(live.info.uid_base),
        init_pid: Some(live.info.init_pid),
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Takes `<dir>/lock` exclusively; records our pid in it for the error message of the next daemon.
fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    if file.try_lock().is_err() {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        anyhow::bail!(
            "data directory {} is in use by another deltabox daemon (pid {}); use --data-dir to run a second one",
            dir.display(),
            holder.trim()
        );
    }
    file.set_len(0)?;
    write!(file, "{}", std::process::id())?;
    Ok(file)
}

/// A random id created once per data directory.
fn instance_id(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("instance");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = format!("{:08x}", rand::rng().random::<u32>());
            std::fs::write(&path, &id).with_context(|| format!("write {}", path.display()))?;
            Ok(id)
        }
    }
}

/// Becomes readable when the shim `shim_pid` exits.
fn shim_exit(shim_pid: i32) -> std::io::Result<AsyncFd<std::os::fd::OwnedFd>> {
    let pid = rustix::process::Pid::from_raw(shim_pid).ok_or_else(|| std::io::Error::other("pid 0"))?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
    // SAFETY: we own `pidfd` and never replace or close it while the AsyncFd holds it.
    unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}
