//! The daemon's state: catalog, layer store, live sandboxes (each run by its shim).

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
use sandbox::ipc::{AsyncChannel, Packet};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::sync::RwLock;

use super::error::{ApiError, ApiResult};
use crate::api::{CreateRequest, SandboxView};
use crate::catalog::{Catalog, CheckpointRecord, ImageFailure, ImageRecord, SandboxConfig, SandboxRecord};
use crate::shim::proto::{
    CheckpointStats, DiskTooSmall, ErrorKind, ProcessDefaults, Reply, Request, RestoreSpec, RollbackStats, ShimConfig,
    ShimInfo, ShimStartup,
};

/// How long a fork or rollback waits for a process image still being written.
const IMAGE_WAIT: Duration = Duration::from_secs(120);
/// Most sandboxes one fork call creates.
pub const MAX_FORKS: usize = 64;
/// How long a shim may take to build a sandbox.
const SHIM_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a shim may take to answer a control request (info, destroy).
const SHIM_CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub uid_slot_dir: PathBuf,
    /// DeltaFS busy polling for the sandboxes this daemon starts (`deltafs::MountOptions::busy_poll`).
    pub fs_busy_poll: Option<Duration>,
    /// Filesystem size limits of sandboxes created without their own.
    pub default_disk: deltafs::Quota,
    /// Memory, pids and CPU limits of sandboxes created without their own (`None`: unlimited).
    pub default_limits: Limits,
}

/// A running sandbox.
#[derive(Clone)]
pub struct Live {
    pub record: SandboxRecord,
    pub info: ShimInfo,
    /// Held by checkpoints and rollbacks of this sandbox, so its checkpoint chain stays linear.
    pub ops: Arc<tokio::sync::Mutex<()>>,
}

impl Live {
    fn new(record: SandboxRecord, info: ShimInfo) -> Live {
        Live { record, info, ops: Arc::new(tokio::sync::Mutex::new(())) }
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
            _lock: lock,
        });
        engine.recover().await?;
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
                engine.force_cleanup(&id);
                if let Err(e) = engine.catalog().delete_sandbox(&id) {
                    tracing::error!(%id, "cannot remove the sandbox from the catalog: {e}");
                }
            }
        });
    }

    /// Reattaches to every sandbox whose shim still runs; destroys what cannot be recovered.
    async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        let records = self.catalog().sandboxes()?;
        let mut known = std::collections::HashSet::new();
        for record in records {
            known.insert(record.id.clone());
            match self.shim_info(&record.id).await {
                Ok(info) => {
                    tracing::info!(id = %record.id, shim = info.shim_pid, "reattached to sandbox");
                    self.watch_shim(record.id.clone(), info.shim_pid);
                    self.sandboxes.write().await.insert(record.id.clone(), Live::new(record, info));
                }
                Err(e) => {
                    tracing::warn!(id = %record.id, "sandbox's shim is gone ({e:#}); cleaning it up");
                    self.force_cleanup(&record.id);
                    self.catalog().delete_sandbox(&record.id)?;
                }
            }
        }
        // Leftovers of sandboxes the catalog never recorded (a crash during create).
        for name in Cgroup::list_children(&self.cgroup_parent()).unwrap_or_default() {
            let id = name.rsplit('/').next().unwrap_or_default().to_string();
            if !known.contains(&id) {
                tracing::warn!(%id, "removing a stray cgroup");
                self.force_cleanup(&id);
            }
        }
        for entry in std::fs::read_dir(self.data_dir.join("sandboxes"))? {
            let id = entry?.file_name().to_string_lossy().into_owned();
            if !known.contains(&id) {
                if self.shim_info(&id).await.is_ok() {
                    let _ = self.shim_control(&id, Request::Destroy).await;
                }
                tracing::warn!(%id, "removing a stray sandbox directory");
                self.force_cleanup(&id);
            }
        }
        self.recheck_images()?;
        self.collect_garbage().await;
        Ok(())
    }

    /// After a restart: a process image finished while the daemon was away is durable; one whose shim is
    /// gone and left no image never will be. Images still being written are looked at again in the
    /// background until [`IMAGE_WAIT`] has passed.
    fn recheck_images(self: &Arc<Self>) -> anyhow::Result<()> {
        let pending: Vec<CheckpointRecord> = self
            .catalog()
            .checkpoints()?
            .into_iter()
            .filter(|c| c.image.is_some() && !c.durable && c.image_failure.is_none())
            .collect();
        for cp in pending {
            let engine = Arc::downgrade(self);
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + IMAGE_WAIT;
                loop {
                    let Some(engine) = engine.upgrade() else { return };
                    if engine.image_on_disk(&cp) {
                        tracing::info!(checkpoint = %cp.id, "its process image was written while the daemon was away");
                        let _ = engine.catalog().mark_durable(&cp.id);
                        return;
                    }
                    let writer_alive = engine.sandboxes.read().await.contains_key(&cp.sandbox);
                    if !writer_alive || tokio::time::Instant::now() > deadline {
                        let reason = "the sandbox's supervisor ended before writing it".to_string();
                        if !writer_alive {
                            engine.record_image_failure(
                                &cp.id,
                                ImageFailure { kind: ErrorKind::CheckpointFailed, reason },
                            );
                        }
                        return;
                    }
                    drop(engine);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        Ok(())
    }

    /// Whether checkpoint `cp`'s process image is complete on disk.
    fn image_on_disk(&self, cp: &CheckpointRecord) -> bool {
        let image = cp.image.as_deref().and_then(deltacr::image::ImageId::parse);
        image.is_some_and(|image| self.images.open(image).is_ok())
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

    /// Opens a connection to sandbox `id`'s shim and sends `request`.
    pub async fn shim_connect(&self, id: &str, request: &Request) -> anyhow::Result<AsyncChannel> {
        let conn = AsyncChannel::connect(&self.sandbox_dir(id).join(crate::shim::SOCKET))
            .with_context(|| format!("connect to the shim of sandbox {id}"))?;
        conn.send(request, &[], &[]).await.context("send a request to the shim")?;
        Ok(conn)
    }

    /// A request with a single answer, with a timeout.
    async fn shim_control(&self, id: &str, request: Request) -> anyhow::Result<Reply> {
        let exchange = async {
            let conn = self.shim_connect(id, &request).await?;
            let Packet { msg, .. } = conn.recv::<Reply>().await.context("read the shim's answer")?;
            anyhow::Ok(msg)
        };
        tokio::time::timeout(SHIM_CONTROL_TIMEOUT, exchange).await.context("the shim did not answer in time")?
    }

    async fn shim_info(&self, id: &str) -> anyhow::Result<ShimInfo> {
        match self.shim_control(id, Request::Info).await? {
            Reply::Info(info) => Ok(info),
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }

    pub async fn live(&self, id: &str) -> ApiResult<Live> {
        self.sandboxes
            .read()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found("sandbox_not_found", format!("no sandbox with id {id:?}")))
    }

    pub async fn list(&self) -> Vec<SandboxView> {
        let mut all: Vec<SandboxView> = self.sandboxes.read().await.values().map(view).collect();
        all.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        all
    }

    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> ApiResult<SandboxView> {
        let image = self
            .catalog()
            .image(&req.image)
            .map_err(anyhow::Error::from)?
            .ok_or_else(|| ApiError::not_found("image_not_found", format!("no image named {:?}", req.image)))?;
        let limits = validate_limits(&req, &self.default_limits)?;
        let disk = validate_disk(&req, self.default_disk)?;
        let mut env = image.config.env.clone();
        env.extend(env_pairs(&req.env)?);
        let _no_gc = self.fs_gc.read().await;
        let stack = self.image_base_stack(&image).await?;
        let config = SandboxConfig {
            image: image.name.clone(),
            layers: image.layers.iter().map(|l| l.diff_id).collect(),
            network: req.network,
            limits,
            disk,
            env,
            cwd: image.config.working_dir.clone().filter(|d| !d.is_empty()).unwrap_or_else(|| "/".into()),
            user: image.config.user.clone().filter(|u| !u.is_empty()),
        };
        self.start_sandbox(config, stack, None, None).await
    }

    /// The DeltaFS stack of `image`'s layers (indexed once, then recorded with the image).
    pub async fn image_base_stack(&self, image: &ImageRecord) -> ApiResult<String> {
        if let Some(stack) = &image.base_stack {
            return Ok(stack.clone());
        }
        let paths: Vec<PathBuf> = image.layers.iter().map(|l| self.layers.layer_path(&l.diff_id)).collect();
        let store = self.fs.clone();
        let stack = tokio::task::spawn_blocking(move || store.base_stack(&paths))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::internal(format!("index the image's layers: {}", crate::errors::error_chain(&e))))?
            .to_string();
        let mut updated = image.clone();
        updated.base_stack = Some(stack.clone());
        self.catalog().put_image(&updated).map_err(anyhow::Error::from)?;
        Ok(stack)
    }

    /// Starts a new sandbox on DeltaFS stack `stack`. The caller holds `fs_gc` for reading.
    async fn start_sandbox(
        self: &Arc<Self>,
        config: SandboxConfig,
        stack: String,
        origin: Option<String>,
        restore: Option<RestoreSpec>,
    ) -> ApiResult<SandboxView> {
        let id = new_id();
        let dir = self.sandbox_dir(&id);
        std::fs::create_dir_all(&dir).map_err(|e| ApiError::internal(format!("create the sandbox directory: {e}")))?;
        let record =
            SandboxRecord { id: id.clone(), config, stack, origin: origin.clone(), head: origin, created: now() };
        // Recorded before the shim starts: a crash in between leaves a record that recovery cleans up.
        self.catalog().put_sandbox(&record).map_err(anyhow::Error::from)?;
        match self.start_shim(&record, restore).await {
            Ok(info) => {
                self.watch_shim(id.clone(), info.shim_pid);
                let live = Live::new(record, info);
                let v = view(&live);
                self.sandboxes.write().await.insert(id, live);
                Ok(v)
            }
            Err(e) => {
                self.force_cleanup(&id);
                let _ = self.catalog().delete_sandbox(&id);
                if e.downcast_ref::<DiskTooSmall>().is_some() {
                    return Err(ApiError::bad_request("invalid_limits", format!("{e:#}")));
                }
                Err(ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "sandbox_start_failed",
                    format!("{e:#}"),
                ))
            }
        }
    }

    async fn start_shim(&self, record: &SandboxRecord, restore: Option<RestoreSpec>) -> anyhow::Result<ShimInfo> {
        let dir = self.sandbox_dir(&record.id);
        let c = &record.config;
        let config = ShimConfig {
            id: record.id.clone(),
            sandbox_dir: dir.clone(),
            store: self.fs.path().to_path_buf(),
            stack: record.stack.clone(),
            images: self.data_dir.join("deltacr"),
            restore,
            network: c.network,
            limits: c.limits,
            disk: c.disk,
            cgroup: self.cgroup_name(&record.id),
            uid_slot_dir: self.uid_slot_dir.clone(),
            fs_busy_poll: self.fs_busy_poll,
            defaults: ProcessDefaults { env: c.env.clone(), cwd: c.cwd.clone(), user: c.user.clone() },
        };
        let log = File::create(dir.join("shim.log")).context("create the shim log")?;
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("shim")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .kill_on_drop(false);
        // SAFETY: setsid is async-signal-safe; the shim gets its own session so signals aimed at the
        // daemon's process group (e.g. ^C on a foreground daemon) do not reach it.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("start the shim")?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(&serde_json::to_vec(&config)?).await.context("send the shim its config")?;
        drop(stdin);
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        let read = tokio::time::timeout(SHIM_START_TIMEOUT, reader.read_line(&mut line)).await;
        // The shim lives on after the daemon; reap it if it exits while we still run.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        read.context("the shim did not report in time")?.context("read the shim's report")?;
        match serde_json::from_str::<ShimStartup>(&line) {
            Ok(ShimStartup::Started(info)) => Ok(info),
            Ok(ShimStartup::Failed { message, disk_too_small: true }) => Err(DiskTooSmall(message).into()),
            Ok(ShimStartup::Failed { message, .. }) => anyhow::bail!("{message}"),
            Err(_) => {
                let log = std::fs::read_to_string(dir.join("shim.log")).unwrap_or_default();
                anyhow::bail!("the shim failed to start: {}", log.trim())
            }
        }
    }

    /// Removes sandbox `id`. Its checkpoints go too unless `keep_checkpoints`, or another sandbox still
    /// uses them (was forked from one, or took a checkpoint on top of one).
    pub async fn remove(&self, id: &str, keep_checkpoints: bool) -> ApiResult<()> {
        // Unlisted first, so the shim watcher does not race us when the shim exits.
        let Some(live) = self.sandboxes.write().await.remove(id) else {
            return Err(ApiError::not_found("sandbox_not_found", format!("no sandbox with id {id:?}")));
        };
        // The shim holds the lock of the sandbox's writable layer until it exits: the garbage collection
        // below frees the sandbox's data only after that.
        let exited = shim_exit(live.info.shim_pid);
        let destroyed = match self.shim_control(id, Request::Destroy).await {
            Ok(Reply::Done) => Ok(()),
            Ok(Reply::Error { message, .. }) => Err(anyhow::anyhow!(message)),
            Ok(other) => Err(anyhow::anyhow!("unexpected answer {other:?}")),
            Err(e) => Err(e),
        };
        match destroyed {
            Ok(()) => {
                if let Ok(exited) = exited {
                    if tokio::time::timeout(SHIM_EXIT_WAIT, exited.readable()).await.is_err() {
                        tracing::warn!(%id, "the shim did not exit after destroying the sandbox");
                    }
                }
            }
            Err(e) => tracing::warn!(%id, "the shim could not destroy the sandbox ({e:#}); cleaning up directly"),
        }
        self.force_cleanup(id);
        self.catalog().delete_sandbox(id).map_err(anyhow::Error::from)?;
        if !keep_checkpoints {
            let _links = self.links.write().await;
            let doomed = self.unused_checkpoints_of(id).map_err(anyhow::Error::from)?;
            self.catalog().delete_checkpoints(&doomed).map_err(anyhow::Error::from)?;
        }
        self.collect_garbage().await;
        Ok(())
    }

    /// Checkpoints taken in sandbox `id` that no other sandbox or checkpoint depends on.
    fn unused_checkpoints_of(&self, id: &str) -> Result<Vec<String>, crate::catalog::CatalogError> {
        let catalog = self.catalog();
        let checkpoints = catalog.checkpoints()?;
        let used: std::collections::HashSet<String> = catalog
            .sandboxes()?
            .into_iter()
            .filter(|s| s.id != id)
            .filter_map(|s| s.origin)
            .chain(checkpoints.iter().filter(|c| c.sandbox != id).filter_map(|c| c.parent.clone()))
            .collect();
        Ok(checkpoints.into_iter().filter(|c| c.sandbox == id && !used.contains(&c.id)).map(|c| c.id).collect())
    }

    /// Checkpoints sandbox `id`: its files, and with `processes` its processes too. A process checkpoint
    /// is answered once the sandbox runs again; its image is written afterwards and the checkpoint is
    /// marked durable then.
    pub async fn checkpoint(
        self: &Arc<Self>,
        id: &str,
        processes: bool,
    ) -> ApiResult<(CheckpointRecord, CheckpointStats)> {
        let live = self.live(id).await?;
        let _one_at_a_time = live.ops.lock().await;
        let _links = self.links.read().await;
        let mut record = self.sandbox_record(id)?;
        // An incremental image needs the previous process checkpoint of this sandbox.
        let parent = record
            .head
            .as_deref()
            .and_then(|h| self.catalog().checkpoint(h).ok().flatten())
            .filter(|c| c.sandbox == id && c.image.is_some())
            .map(|c| c.stack);
        let conn = self.shim_connect(id, &Request::Checkpoint { processes, parent }).await?;
        let first = tokio::time::timeout(SHIM_CONTROL_TIMEOUT, conn.recv::<Reply>())
            .await
            .map_err(|_| ApiError::internal("the sandbox did not answer the checkpoint in time"))?
            .map_err(|e| ApiError::internal(format!("lost the shim: {e}")))?;
        let stats = match first.msg {
            Reply::Checkpointed(stats) => stats,
            Reply::Error { kind, message } => return Err(ApiError::from_shim(kind, message)),
            other => return Err(ApiError::internal(format!("unexpected answer from the shim: {other:?}"))),
        };
        let cp = CheckpointRecord {
            id: new_checkpoint_id(),
            sandbox: id.to_string(),
            parent: record.head.clone(),
            stack: stats.stack.clone(),
            kind: if processes { "full" } else { "filesystem" }.into(),
            image: stats.image.clone(),
            durable: stats.image.is_none(),
            image_failure: None,
            processes: stats.processes,
            sessions: stats.sessions.clone(),
            config: record.config.clone(),
            created: now(),
            latency_ms: stats.latency_ms,
        };
        self.catalog.lock().expect("catalog lock").add_checkpoint(&cp).map_err(anyhow::Error::from)?;
        record.head = Some(cp.id.clone());
        self.refresh(record).await;
        if cp.image.is_some() {
            self.await_image(cp.id.clone(), conn);
        }
        Ok((cp, stats))
    }

    /// Waits (in the background) for the shim to report checkpoint `cp`'s image written.
    fn await_image(self: &Arc<Self>, cp: String, conn: AsyncChannel) {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            let reply = conn.recv::<Reply>().await;
            let Some(engine) = engine.upgrade() else { return };
            match reply {
                Ok(Packet { msg: Reply::ImageWritten { bytes }, .. }) => {
                    tracing::info!(checkpoint = %cp, bytes, "process image written");
                    if let Err(e) = engine.catalog().mark_durable(&cp) {
                        tracing::error!(checkpoint = %cp, "cannot record the image as written: {e}");
                    }
                }
                Ok(Packet { msg: Reply::Error { kind, message }, .. }) => {
                    tracing::error!(checkpoint = %cp, "the process image was not written: {message}");
                    engine.record_image_failure(&cp, ImageFailure { kind, reason: message });
                }
                Ok(Packet { msg, .. }) => tracing::error!(checkpoint = %cp, "unexpected answer from the shim: {msg:?}"),
                Err(e) => {
                    tracing::warn!(checkpoint = %cp, "lost the shim before the image was written: {e}");
                    // Only the shim writes the image; whether it got that far shows on disk.
                    let reason = "the sandbox's supervisor exited before writing it".to_string();
                    engine.record_image_failure(&cp, ImageFailure { kind: ErrorKind::CheckpointFailed, reason });
                }
            }
        });
    }

    /// Records that checkpoint `cp`'s process image will never be written (unless it already was).
    fn record_image_failure(&self, cp: &str, failure: ImageFailure) {
        if let Err(e) = self.catalog().mark_image_failed(cp, failure) {
            tracing::error!(checkpoint = %cp, "cannot record the image's failure: {e}");
        }
    }

    /// Waits until checkpoint `cp`'s process image is on disk (it is written right after the checkpoint).
    async fn wait_durable(&self, cp: &CheckpointRecord) -> ApiResult<()> {
        let deadline = tokio::time::Instant::now() + IMAGE_WAIT;
        loop {
            let current = self.checkpoint_record(&cp.id)?;
            if current.durable {
                return Ok(());
            }
            if self.image_on_disk(&current) {
                let _ = self.catalog().mark_durable(&cp.id);
                return Ok(());
            }
            if let Some(failure) = &current.image_failure {
                let message =
                    format!("the process image of checkpoint {} could not be written: {}", cp.id, failure.reason);
                return Err(ApiError::from_shim(failure.kind, message));
            }
            if tokio::time::Instant::now() > deadline {
                let message = format!("the process image of checkpoint {} is not written (yet)", cp.id);
                return Err(ApiError::conflict("checkpoint_not_durable", message));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Rolls sandbox `id` back to checkpoint `checkpoint`: its files, and for a full checkpoint its
    /// processes; after a filesystem-only checkpoint the processes are killed (init stays).
    pub async fn rollback(&self, id: &str, checkpoint: &str) -> ApiResult<(CheckpointRecord, RollbackStats)> {
        let live = self.live(id).await?;
        let _one_at_a_time = live.ops.lock().await;
        let _links = self.links.read().await;
        let cp = self.checkpoint_record(checkpoint)?;
        let mut record = self.sandbox_record(id)?;
        if cp.sandbox != id && !self.ancestors(record.origin.as_deref()).contains(&cp.id) {
            let message = format!(
                "checkpoint {} belongs to sandbox {}, not to {id} or the checkpoints it was forked from; fork it instead",
                cp.id, cp.sandbox
            );
            return Err(ApiError::bad_request("checkpoint_of_another_sandbox", message));
        }
        // Another sandbox's checkpoint (the one this sandbox was forked from) comes from its image.
        if cp.image.is_some() && cp.sandbox != id {
            self.wait_durable(&cp).await?;
        }
        let request = Request::Rollback { stack: cp.stack.clone(), image: cp.image.clone() };
        let stats = match self.shim_control(id, request).await? {
            Reply::RolledBack(stats) => stats,
            Reply::Error { kind, message } => return Err(ApiError::from_shim(kind, message)),
            other => return Err(ApiError::internal(format!("unexpected answer from the shim: {other:?}"))),
        };
        record.head = Some(cp.id.clone());
        self.catalog().update_sandbox(&record).map_err(anyhow::Error::from)?;
        self.refresh(record).await;
        Ok((cp, stats))
    }

    /// Starts `count` new sandboxes whose files start at checkpoint `checkpoint`.
    pub async fn fork(self: &Arc<Self>, checkpoint: &str, count: usize) -> ApiResult<Vec<SandboxView>> {
        if !(1..=MAX_FORKS).contains(&count) {
            return Err(ApiError::bad_request("invalid_count", format!("count must be between 1 and {MAX_FORKS}")));
        }
        let _links = self.links.read().await;
        let cp = self.checkpoint_record(checkpoint)?;
        if cp.image.is_some() {
            self.wait_durable(&cp).await?;
        }
        let _no_gc = self.fs_gc.read().await;
        let restore = cp.image.clone().map(|image| RestoreSpec { image, sessions: cp.sessions.clone() });
        let starts = (0..count)
            .map(|_| self.start_sandbox(cp.config.clone(), cp.stack.clone(), Some(cp.id.clone()), restore.clone()));
        let results = futures_util::future::join_all(starts).await;
        let mut created = Vec::new();
        let mut failure = None;
        for r in results {
            match r {
                Ok(v) => created.push(v),
                Err(e) => failure = Some(e),
            }
        }
        match failure {
            None => Ok(created),
            // All or nothing: a caller asking for N branches gets N or an error.
            Some(e) => {
                drop(_no_gc);
                for v in created {
                    let _ = self.remove(&v.id, true).await;
                }
                Err(e)
            }
        }
    }

    /// Checkpoints taken in sandbox `id`, oldest first (a parent before its children).
    pub fn checkpoints_of(&self, id: &str) -> ApiResult<Vec<CheckpointRecord>> {
        let all = self.catalog().checkpoints().map_err(anyhow::Error::from)?;
        let parents: HashMap<&str, Option<&str>> = all.iter().map(|c| (c.id.as_str(), c.parent.as_deref())).collect();
        let mut mine: Vec<(i64, usize, &CheckpointRecord)> =
            all.iter().filter(|c| c.sandbox == id).map(|c| (c.created, depth(&parents, &c.id), c)).collect();
        mine.sort_by(|a, b| (a.0, a.1, &a.2.id).cmp(&(b.0, b.1, &b.2.id)));
        Ok(mine.into_iter().map(|(_, _, c)| c.clone()).collect())
    }

    pub async fn delete_checkpoint(&self, checkpoint: &str) -> ApiResult<()> {
        let links = self.links.write().await;
        let cp = self.checkpoint_record(checkpoint)?;
        if cp.image.is_some() && self.sandboxes.read().await.contains_key(&cp.sandbox) {
            // Frees the memory its in-memory copies hold in the sandbox.
            if let Err(e) = self.shim_control(&cp.sandbox, Request::Forget { stack: cp.stack.clone() }).await {
                tracing::warn!(checkpoint = %cp.id, "the sandbox could not drop the checkpoint's templates: {e:#}");
            }
        }
        self.catalog().delete_checkpoints(&[checkpoint.to_string()]).map_err(anyhow::Error::from)?;
        for live in self.sandboxes.write().await.values_mut() {
            if [&live.record.head, &live.record.origin].iter().any(|c| c.as_deref() == Some(checkpoint)) {
                if let Ok(Some(r)) = self.catalog().sandbox(&live.record.id) {
                    live.record = r;
                }
            }
        }
        drop(links);
        self.collect_garbage().await;
        Ok(())
    }

    /// `checkpoints` with the bytes on disk each adds to the data directory: its filesystem layer (the
    /// changes since its parent) and, once written, its process image (incremental too). None where
    /// that cannot be measured (logged).
    pub fn with_disk_bytes(&self, checkpoints: Vec<CheckpointRecord>) -> Vec<(CheckpointRecord, Option<u64>)> {
        let measure = |cp: &CheckpointRecord| -> Result<u64, String> {
            let stack: deltafs::StackId = cp.stack.parse().map_err(|e| format!("{e}"))?;
            let files = self.fs.layer_bytes(stack).map_err(|e| e.to_string())?;
            let image = match cp.image.as_deref().filter(|_| cp.durable) {
                Some(id) => {
                    let id = deltacr::image::ImageId::parse(id).ok_or_else(|| format!("bad image id {id:?}"))?;
                    self.images.disk_bytes(id).map_err(|e| e.to_string())?
                }
                None => 0,
            };
            Ok(files + image)
        };
        // A few system calls per checkpoint: done in place, as a hop to the blocking pool costs more
        // (measured: it added 0.1 ms to a 0.7 ms checkpoint call).
        tokio::task::block_in_place(|| {
            let measured = checkpoints.into_iter().map(|cp| {
                let bytes = measure(&cp).inspect_err(|e| tracing::warn!(checkpoint = %cp.id, "cannot measure it: {e}"));
                (cp, bytes.ok())
            });
            measured.collect()
        })
    }

    pub fn checkpoint_record(&self, id: &str) -> ApiResult<CheckpointRecord> {
        self.catalog()
            .checkpoint(id)
            .map_err(anyhow::Error::from)?
            .ok_or_else(|| ApiError::not_found("checkpoint_not_found", format!("no checkpoint with id {id:?}")))
    }

    fn sandbox_record(&self, id: &str) -> ApiResult<SandboxRecord> {
        self.catalog()
            .sandbox(id)
            .map_err(anyhow::Error::from)?
            .ok_or_else(|| ApiError::not_found("sandbox_not_found", format!("no sandbox with id {id:?}")))
    }

    /// `start` and the checkpoints it descends from.
    fn ancestors(&self, start: Option<&str>) -> Vec<String> {
        let mut chain = Vec::new();
        let mut next = start.map(String::from);
        while let Some(id) = next.filter(|id| !chain.contains(id)) {
            next = self.catalog().checkpoint(&id).ok().flatten().and_then(|c| c.parent);
            chain.push(id);
        }
        chain
    }

    /// Replaces the cached record of a live sandbox.
    async fn refresh(&self, record: SandboxRecord) {
        if let Some(live) = self.sandboxes.write().await.get_mut(&record.id) {
            live.record = record;
        }
    }

    /// Frees filesystem data no checkpoint, image or live mount needs, then image layers no image,
    /// sandbox or checkpoint needs. Skipped while an import runs (its layers are not recorded yet).
    pub async fn collect_garbage(&self) {
        let Ok(_import_guard) = self.image_lock.try_lock() else { return };
        let _gc = self.fs_gc.write().await;
        let keep: Vec<deltafs::StackId> = match self.catalog().referenced_stacks() {
            Ok(stacks) => stacks.iter().filter_map(|s| s.parse().ok()).collect(),
            Err(e) => return tracing::error!("cannot read stack references: {e}"),
        };
        let store = self.fs.clone();
        match tokio::task::spawn_blocking(move || store.delete_unreferenced(&keep)).await {
            Ok(Ok(stats)) if stats.layers_deleted > 0 || stats.bytes_reclaimed > 0 => tracing::info!(
                deleted = stats.layers_deleted,
                kept = stats.layers_kept,
                reclaimed_bytes = stats.bytes_reclaimed,
                "freed filesystem layers"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("filesystem garbage collection failed: {e}"),
            Err(e) => tracing::error!("filesystem garbage collection panicked: {e}"),
        }
        self.collect_images();
        let (stored, used) = match (self.layers.layers(), self.catalog().referenced_layers()) {
            (Ok(s), Ok(u)) => (s, u),
            (Err(e), _) => return tracing::error!("cannot list layers: {e}"),
            (_, Err(e)) => return tracing::error!("cannot read layer references: {e}"),
        };
        for layer in stored.into_iter().filter(|l| !used.contains(l)) {
            match self.layers.remove_layer(&layer) {
                Ok(()) => tracing::info!(%layer, "removed unused image layer"),
                Err(e) => tracing::error!(%layer, "cannot remove unused image layer: {e}"),
            }
        }
    }

    /// Deletes process images no checkpoint needs (an image is needed by its checkpoint and by every image
    /// whose parent chain it is on). Images younger than a minute are left alone: a checkpoint may be
    /// being recorded for them right now.
    fn collect_images(&self) {
        let referenced: Vec<deltacr::image::ImageId> = match self.catalog().checkpoints() {
            Ok(cps) => {
                cps.iter().filter_map(|c| c.image.as_deref()).filter_map(deltacr::image::ImageId::parse).collect()
            }
            Err(e) => return tracing::error!("cannot read checkpoints: {e}"),
        };
        let mut needed = std::collections::HashSet::new();
        for id in referenced {
            let mut next = Some(id);
            while let Some(id) = next.filter(|id| needed.insert(*id)) {
                next = self.images.open(id).ok().and_then(|image| image.header.parent);
            }
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for id in self.images.ids().unwrap_or_default().into_iter().filter(|id| !needed.contains(id)) {
            let young = self.images.open(id).is_ok_and(|i| now_ms.saturating_sub(i.header.created_unix_ms) < 60_000);
            if young {
                continue;
            }
            match self.images.remove(id) {
                Ok(()) => tracing::info!(image = %id, "removed unused process image"),
                Err(e) => tracing::error!(image = %id, "cannot remove unused process image: {e}"),
            }
        }
    }

    /// Sandboxes that run on image `name`.
    pub async fn users_of_image(&self, name: &str) -> Vec<String> {
        self.sandboxes
            .read()
            .await
            .values()
            .filter(|l| l.record.config.image == name)
            .map(|l| l.record.id.clone())
            .collect()
    }
}

/// How many ancestors checkpoint `id` has.
fn depth<'a>(parents: &HashMap<&'a str, Option<&'a str>>, mut id: &'a str) -> usize {
    let mut d = 0;
    while let Some(Some(parent)) = parents.get(id) {
        id = parent;
        d += 1;
        if d > parents.len() {
            break;
        }
    }
    d
}

/// Sandbox limits: the request's, each one it does not set taken from the daemon's defaults.
fn validate_limits(req: &CreateRequest, default: &Limits) -> ApiResult<Limits> {
    let limits = Limits {
        memory_bytes: req.memory.or(default.memory_bytes),
        pids: req.pids.or(default.pids),
        cpus: req.cpus.or(default.cpus),
    };
    limits.validate().map_err(|e| ApiError::bad_request("invalid_limits", e.to_string()))?;
    Ok(limits)
}

/// `KEY=VALUE` pairs of `env`; refuses names that are empty or hold `=`, and NUL bytes anywhere (the
/// process could not be started with them).
pub fn env_pairs(env: &std::collections::BTreeMap<String, String>) -> ApiResult<Vec<String>> {
    env.iter()
        .map(|(k, v)| {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                Err(ApiError::bad_request("invalid_env", format!("invalid environment variable {k:?}")))
            } else {
                Ok(format!("{k}={v}"))
            }
        })
        .collect()
}

/// Smallest filesystem size accepted: below it not even a shell's history file fits.
const MIN_DISK_BYTES: u64 = 1 << 20;

/// Disk bytes per inode of a sandbox given a disk limit but no inode limit: mkfs.ext4's default ratio.
/// The bound matters beyond the disk: every file's metadata lives in the shim's memory.
const BYTES_PER_INODE: u64 = 16 * 1024;

/// The request's filesystem limits, each one it does not set taken from the daemon's defaults; with a
/// disk limit but no inode limit, one inode per [`BYTES_PER_INODE`].
fn validate_disk(req: &CreateRequest, default: deltafs::Quota) -> ApiResult<deltafs::Quota> {
    let bytes = req.disk.or(default.bytes);
    let inodes = req.inodes.or(default.inodes).or(bytes.map(|b| b / BYTES_PER_INODE));
    let quota = deltafs::Quota { bytes, inodes };
    if let Some(d) = quota.bytes.filter(|d| *d < MIN_DISK_BYTES) {
        let message = format!("disk limit {d} is below the minimum of {MIN_DISK_BYTES} bytes");
        return Err(ApiError::bad_request("invalid_limits", message));
    }
    if quota.inodes == Some(0) {
        return Err(ApiError::bad_request("invalid_limits", "the inodes limit must be at least 1"));
    }
    Ok(quota)
}

pub fn view(live: &Live) -> SandboxView {
    let r = &live.record;
    let c = &r.config;
    SandboxView {
        id: r.id.clone(),
        image: c.image.clone(),
        state: "running".into(),
        network: c.network,
        memory: c.limits.memory_bytes,
        pids: c.limits.pids,
        cpus: c.limits.cpus,
        disk: c.disk.bytes,
        inodes: c.disk.inodes,
        origin: r.origin.clone(),
        head: r.head.clone(),
        created: r.created,
        uid_base: Some(live.info.uid_base),
        init_pid: Some(live.info.init_pid),
    }
}

/// A random 12-hex-digit id (also the sandbox's hostname).
fn new_id() -> String {
    format!("{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff)
}

/// Checkpoint ids look different from sandbox ids, so the two are not mixed up.
fn new_checkpoint_id() -> String {
    format!("ck-{}", new_id())
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
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

/// How long a sandbox's removal waits for its shim to exit after it destroyed the sandbox.
const SHIM_EXIT_WAIT: Duration = Duration::from_secs(5);

/// Becomes readable when the shim `shim_pid` exits.
fn shim_exit(shim_pid: i32) -> std::io::Result<AsyncFd<std::os::fd::OwnedFd>> {
    let pid = rustix::process::Pid::from_raw(shim_pid).ok_or_else(|| std::io::Error::other("pid 0"))?;
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
    // SAFETY: we own `pidfd` and never replace or close it while the AsyncFd holds it.
    unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}
