//! Creating a sandbox: from an image (`create`), and the start every new sandbox shares (forks too).

use std::fs::File;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deltafs::StackId;
use rand::Rng;
use sandbox::cgroup::Limits;
use sandbox::spec::Network;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{now, view, Engine, EngineError, EngineResult, Live};
use crate::api::{CreateRequest, EgressPolicy, SandboxView};
use crate::catalog::{SandboxConfig, SandboxRecord};
use crate::shim::proto::{DiskTooSmall, ProcessDefaults, RestoreSpec, ShimConfig, ShimInfo, ShimStartup, PROTOCOL};

/// How long a shim may take to build a sandbox.
const SHIM_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Smallest filesystem size accepted: below it not even a shell's history file fits.
const MIN_DISK_BYTES: u64 = 1 << 20;
/// Disk bytes per inode of a sandbox given a disk limit but no inode limit: mkfs.ext4's default ratio.
/// The bound matters beyond the disk: every file's metadata lives in the shim's memory.
const BYTES_PER_INODE: u64 = 16 * 1024;

impl Engine {
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> EngineResult<SandboxView> {
        self.check_network(req.network)?;
        if req.network != Network::Nat && req.egress != EgressPolicy::default() {
            return Err(EngineError::invalid("invalid_request", "an egress policy applies to network \"nat\" only"));
        }
        let image = self.image(&req.image)?;
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
            egress: req.egress,
            limits,
            disk,
            template_memory: Some(req.template_memory.unwrap_or_else(|| self.default_template_memory(&limits))),
            env,
            cwd: image.config.working_dir.clone().filter(|d| !d.is_empty()).unwrap_or_else(|| "/".into()),
            user: image.config.user.clone().filter(|u| !u.is_empty()),
        };
        self.start_sandbox(config, stack, None, None).await
    }

    /// A sandbox's template budget unless it asks for one: the daemon's, but at most half of the sandbox's
    /// memory limit — templates are charged to the sandbox's memory cgroup, and past its limit the kernel
    /// OOM-kills them (or the sandbox's processes) before any budget is enforced.
    fn default_template_memory(&self, limits: &Limits) -> u64 {
        let budget = self.template_memory.budget;
        limits.memory_bytes.map_or(budget, |m| budget.min(m / 2))
    }

    /// Starts a new sandbox on DeltaFS stack `stack`. The caller holds `fs_gc` for reading.
    pub(super) async fn start_sandbox(
        self: &Arc<Self>,
        config: SandboxConfig,
        stack: StackId,
        origin: Option<String>,
        restore: Option<RestoreSpec>,
    ) -> EngineResult<SandboxView> {
        self.check_network(config.network)?;
        let id = new_id();
        let dir = self.sandbox_dir(&id);
        std::fs::create_dir_all(&dir).context("create the sandbox directory")?;
        let record = SandboxRecord {
            id: id.clone(),
            config,
            stack,
            origin: origin.clone(),
            head: origin,
            created: now(),
            ports: Vec::new(),
        };
        // Recorded before the shim starts: a crash in between leaves a record that recovery cleans up.
        self.catalog().put_sandbox(&record)?;
        let started = match self.prepare_network(&record).await {
            Ok(()) => self.start_shim(&record, restore).await,
            Err(e) => Err(e.into()),
        };
        let started = match started {
            Ok(info) => match self.attach_network(&record, &info).await {
                Ok(_) => Ok(info),
                Err(e) => {
                    self.detach_network(&id).await;
                    let _ = self.shim(&id).destroy().await;
                    Err(e.into())
                }
            },
            Err(e) => Err(e),
        };
        match started {
            Ok(info) => {
                self.watch_shim(id.clone(), info.shim_pid);
                let live = Live::new(record, info);
                let v = view(&live);
                self.sandboxes.write().await.insert(id, live);
                Ok(v)
            }
            Err(e) => {
                if record.config.egress != EgressPolicy::default() {
                    self.forget_network(&id).await;
                }
                self.force_cleanup(&id);
                let _ = self.catalog().delete_sandbox(&id);
                if e.downcast_ref::<DiskTooSmall>().is_some() {
                    return Err(EngineError::invalid("invalid_limits", format!("{e:#}")));
                }
                Err(EngineError::StartFailed(format!("{e:#}")))
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
            stack: record.stack,
            images: self.data_dir.join("deltacr"),
            restore,
            network: c.network,
            nat: self.nat.as_ref().ok().filter(|_| c.network == Network::Nat).map(|n| n.config.clone()),
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
        // Watched beside the report: the sandbox's init (a clone of the shim) holds the shim's stdout too,
        // so a shim that dies before reporting ends no read.
        let report = async {
            tokio::select! {
                read = reader.read_line(&mut line) => read.map(drop).context("read the shim's report"),
                status = child.wait() => Err(anyhow::anyhow!("the shim exited ({}) before reporting", status?)),
            }
        };
        let report = tokio::time::timeout(SHIM_START_TIMEOUT, report).await;
        // The shim lives on after the daemon; reap it if it exits while we still run.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        if let Err(e) = report.context("the shim did not report in time").and_then(|r| r) {
            let log = std::fs::read_to_string(dir.join("shim.log")).unwrap_or_default();
            anyhow::bail!("{e:#}: {}", log.trim());
        }
        match serde_json::from_str::<ShimStartup>(&line) {
            Ok(ShimStartup::Started(info)) if info.protocol == PROTOCOL => Ok(info),
            // Our executable was replaced by another version since the daemon started.
            Ok(ShimStartup::Started(info)) => anyhow::bail!(
                "{} started a shim of protocol version {} (this daemon speaks {PROTOCOL}): restart the daemon",
                self.exe.display(),
                info.protocol
            ),
            Ok(ShimStartup::Failed { message, disk_too_small: true }) => Err(DiskTooSmall(message).into()),
            Ok(ShimStartup::Failed { message, .. }) => anyhow::bail!("{message}"),
            Err(_) => {
                let log = std::fs::read_to_string(dir.join("shim.log")).unwrap_or_default();
                anyhow::bail!("the shim failed to start: {}", log.trim())
            }
        }
    }
}

/// Sandbox limits: the request's, each one it does not set taken from the daemon's defaults.
fn validate_limits(req: &CreateRequest, default: &Limits) -> EngineResult<Limits> {
    let limits = Limits {
        memory_bytes: req.memory.or(default.memory_bytes),
        pids: req.pids.or(default.pids),
        cpus: req.cpus.or(default.cpus),
    };
    limits.validate().map_err(|e| EngineError::invalid("invalid_limits", e.to_string()))?;
    Ok(limits)
}

/// `KEY=VALUE` pairs of `env`; refuses names that are empty or hold `=`, and NUL bytes anywhere (the
/// process could not be started with them).
pub fn env_pairs(env: &std::collections::BTreeMap<String, String>) -> EngineResult<Vec<String>> {
    env.iter()
        .map(|(k, v)| {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                Err(EngineError::invalid("invalid_env", format!("invalid environment variable {k:?}")))
            } else {
                Ok(format!("{k}={v}"))
            }
        })
        .collect()
}

/// The request's filesystem limits, each one it does not set taken from the daemon's defaults; with a
/// disk limit but no inode limit, one inode per [`BYTES_PER_INODE`].
fn validate_disk(req: &CreateRequest, default: deltafs::Quota) -> EngineResult<deltafs::Quota> {
    let bytes = req.disk.or(default.bytes);
    let inodes = req.inodes.or(default.inodes).or(bytes.map(|b| b / BYTES_PER_INODE));
    let quota = deltafs::Quota { bytes, inodes };
    if let Some(d) = quota.bytes.filter(|d| *d < MIN_DISK_BYTES) {
        let message = format!("disk limit {d} is below the minimum of {MIN_DISK_BYTES} bytes");
        return Err(EngineError::invalid("invalid_limits", message));
    }
    if quota.inodes == Some(0) {
        return Err(EngineError::invalid("invalid_limits", "the inodes limit must be at least 1"));
    }
    Ok(quota)
}

/// A random 12-hex-digit id (also the sandbox's hostname).
pub(super) fn new_id() -> String {
    format!("{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff)
}
