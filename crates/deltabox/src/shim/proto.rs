//! The daemon ↔ shim protocol. One connection per request over the shim's SEQPACKET socket: the daemon
//! sends a [`Request`], may then send [`Input`] packets (stdin, resize, signals), and receives [`Reply`]
//! packets until the request is finished; binary data travels as packet payload.

use std::path::PathBuf;
use std::time::Duration;

use deltacr::image::ImageId;
use deltafs::StackId;

pub use super::session::SessionSnapshot;
use sandbox::cgroup::Limits;
use sandbox::spec::{NatAddress, Network, WinSize};
use serde::{Deserialize, Serialize};

/// The protocol's version, announced by every shim in its [`ShimInfo`]. Raise it with any change to the
/// messages below that a shim or daemon of the previous version would misread.
pub const PROTOCOL: u32 = 1;

/// Everything a shim needs to start a sandbox; the daemon writes it as JSON to the shim's stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimConfig {
    pub id: String,
    /// `<data-dir>/sandboxes/<id>`: upper/, work/, rootfs/, shim.sock live here.
    pub sandbox_dir: PathBuf,
    /// The DeltaFS store directory.
    pub store: PathBuf,
    /// The DeltaFS stack to mount (an image's base stack or a checkpoint's).
    #[serde(with = "crate::ids::text")]
    pub stack: StackId,
    /// The DeltaCR image store directory.
    pub images: PathBuf,
    /// Processes to restore once the sandbox is up (a fork of a process checkpoint).
    pub restore: Option<RestoreSpec>,
    pub network: Network,
    /// Where the `nat` network's addresses come from (with [`Network::Nat`] only).
    #[serde(default)]
    pub nat: Option<NatConfig>,
    pub limits: Limits,
    /// Size limits of the sandbox's filesystem.
    pub disk: deltafs::Quota,
    /// cgroup name (relative to each hierarchy's root).
    pub cgroup: String,
    /// Directory of host-wide uid slot locks.
    pub uid_slot_dir: PathBuf,
    /// DeltaFS busy polling (`deltafs::MountOptions::busy_poll`).
    pub fs_busy_poll: Option<Duration>,
    /// Defaults for processes: the image's environment, working directory and user.
    pub defaults: ProcessDefaults,
}

/// The daemon's `nat` network: the subnet sandboxes take their /30 links from, and the host-wide directory
/// of their reservations (`sandbox::net::NatSlot`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NatConfig {
    pub subnet: ipnet::Ipv4Net,
    pub slot_dir: PathBuf,
}

/// A sandbox's link in the `nat` network, as its shim made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NatLink {
    /// The host's end of the link.
    pub interface: String,
    #[serde(flatten)]
    pub address: NatAddress,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreSpec {
    /// The DeltaCR image of the checkpoint.
    #[serde(with = "crate::ids::text")]
    pub image: ImageId,
    /// Its shell sessions, served again once their shells are restored.
    pub sessions: Vec<SessionSnapshot>,
    /// The address the checkpoint's sandbox had in the `nat` network (its sockets' own address).
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcessDefaults {
    pub env: Vec<String>,
    pub cwd: String,
    pub user: Option<String>,
}

/// The sandbox's files already take more than its disk limits allow.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DiskTooSmall(pub String);

/// The shim's first line on stdout: the sandbox is running, or why not.
#[derive(Debug, Serialize, Deserialize)]
pub enum ShimStartup {
    Started(ShimInfo),
    Failed {
        message: String,
        /// The failure is a [`DiskTooSmall`] (the request's fault, not the host's).
        #[serde(default)]
        disk_too_small: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimInfo {
    /// [`PROTOCOL`] of the shim. Read first, before anything else of the answer (see
    /// `daemon::shim_client`); 0 for shims from before versioning.
    #[serde(default)]
    pub protocol: u32,
    pub shim_pid: i32,
    /// Init's pid in the host's pid namespace.
    pub init_pid: i32,
    /// Host uid/gid that is root inside.
    pub uid_base: u32,
    /// The process checkpoints whose templates the shim keeps in memory, as of this answer (none in the
    /// startup line; none from a shim older than this field, which the daemon then never asks to drop any).
    #[serde(default)]
    pub templates: Vec<KeptTemplates>,
    /// Its link in the `nat` network (none in the other modes).
    #[serde(default)]
    pub nat: Option<NatLink>,
}

/// A process checkpoint whose templates (stopped copy-on-write copies of its processes, for fast
/// rollbacks) a shim keeps in memory: what the daemon's template memory budget weighs (see
/// docs/deltacr.md, "Template memory budget").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptTemplates {
    #[serde(with = "crate::ids::text")]
    pub stack: StackId,
    /// What its templates hold that nothing else shares (`deltacr::Checkpoint::memory_bytes`), as last
    /// measured (a few seconds old at most); None until first measured, just after the checkpoint.
    pub memory_bytes: Option<u64>,
    /// When it was last taken or rolled back to, in [`monotonic_ns`].
    pub used_ns: u64,
    /// Whether [`Request::DropTemplates`] may drop them: its image is written (else they are its only
    /// copy) and no image being written is compared with them.
    pub droppable: bool,
}

/// The host's CLOCK_MONOTONIC in nanoseconds: the clock of [`KeptTemplates::used_ns`], which the daemon
/// compares across shims and with its own uses (an `Instant` cannot leave its process).
pub fn monotonic_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// What a connection asks for (its first packet).
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Info,
    Exec(ExecRequest),
    SessionOpen {
        name: String,
    },
    SessionRun {
        name: String,
        command: String,
        timeout_ms: Option<u64>,
        max_output: u64,
    },
    SessionClose {
        name: String,
    },
    SessionList,
    /// Checkpoint: freeze, filesystem checkpoint, with `processes` a process checkpoint, thaw. `parent`
    /// is the stack of the checkpoint the sandbox descends from (for an incremental image). Answers
    /// `Checkpointed`, then — for a process checkpoint — `ImageWritten` once the image is durable.
    Checkpoint {
        processes: bool,
        #[serde(with = "crate::ids::opt_text")]
        parent: Option<StackId>,
    },
    /// Rollback: kill every process but init, switch the filesystem to `stack`, and with `image` restore
    /// the processes of that process checkpoint.
    Rollback {
        #[serde(with = "crate::ids::text")]
        stack: StackId,
        #[serde(with = "crate::ids::opt_text")]
        image: Option<ImageId>,
        /// The address the checkpoint's sandbox had in the `nat` network (its sockets' own address).
        #[serde(default)]
        address: Option<std::net::Ipv4Addr>,
    },
    /// Drop the in-memory copies (templates) of the process checkpoint of `stack`.
    Forget {
        #[serde(with = "crate::ids::text")]
        stack: StackId,
    },
    /// Drop the templates of the process checkpoint of `stack` to free memory, if they are still
    /// [`KeptTemplates::droppable`]; its image and sessions stay (a rollback restores it from the image).
    /// Answers `Done`. Only asked of a shim that listed the checkpoint in [`ShimInfo::templates`], which
    /// a shim older than this request never does: no new protocol version.
    DropTemplates {
        #[serde(with = "crate::ids::text")]
        stack: StackId,
    },
    /// Kill init and everything else, remove the cgroup, exit.
    Destroy,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// `KEY=VALUE` pairs added to (or replacing in) the sandbox's default environment.
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// Run on a pseudo-terminal of this size.
    pub tty: Option<WinSize>,
    pub timeout_ms: Option<u64>,
    /// Bytes kept per output stream; the rest is counted and dropped.
    pub max_output: u64,
    /// Whether the client will send stdin (else stdin is /dev/null).
    pub stdin: bool,
}

/// Packets a client may send while its exec runs.
#[derive(Debug, Serialize, Deserialize)]
pub enum Input {
    /// Payload = bytes for stdin.
    Stdin,
    StdinEof,
    Resize(WinSize),
    Signal(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Packets from the shim.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Info(ShimInfo),
    Started {
        pid: i32,
    },
    /// Payload = output bytes.
    Output {
        stream: Stream,
    },
    Exited(Outcome),
    Sessions(Vec<String>),
    Checkpointed(CheckpointStats),
    /// The process image of the checkpoint just answered is durable.
    ImageWritten {
        bytes: u64,
    },
    RolledBack(RollbackStats),
    Done,
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// How a command ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub oom_killed: bool,
    /// Output bytes dropped because `max_output` was reached.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    pub duration_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointStats {
    /// The frozen filesystem stack.
    #[serde(with = "crate::ids::text")]
    pub stack: StackId,
    /// The pause the sandbox saw: freeze to thaw.
    pub pause_ms: f64,
    /// Of which: the filesystem checkpoint itself.
    pub fs_ms: f64,
    /// Processes captured (None: a filesystem-only checkpoint).
    pub processes: Option<usize>,
    /// The process image being written.
    #[serde(with = "crate::ids::opt_text")]
    pub image: Option<ImageId>,
    /// Shell sessions whose shells were captured.
    pub sessions: Vec<SessionSnapshot>,
    /// Connections to outside the sandbox, which a restore gives back reset (see deltacr's
    /// `Checkpoint::reset_connections`).
    #[serde(default)]
    pub reset_connections: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackStats {
    /// The pause the sandbox saw: from the first process killed to the restored ones running again
    /// (or, for a filesystem-only checkpoint, to the filesystem switched).
    pub pause_ms: f64,
    /// Of which: the filesystem switch and cache invalidation.
    pub fs_ms: f64,
    /// Processes killed (init is never killed).
    pub processes_killed: usize,
    /// Processes restored from the checkpoint (0 for a filesystem-only checkpoint).
    pub processes_restored: usize,
    /// Whether they came from the durable image (their in-memory copies were gone).
    pub from_image: bool,
    /// Shell sessions that ended (not part of the checkpoint).
    pub sessions_closed: Vec<String>,
    /// Shell sessions restored with their state.
    pub sessions_restored: Vec<String>,
    /// Inodes whose content, attributes or existence differed.
    pub changed_inodes: usize,
}

/// Error classes the daemon maps to HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is invalid.
    BadRequest,
    /// The program could not be started (missing binary, bad cwd, unknown user...).
    StartFailed,
    SessionNotFound,
    SessionExists,
    /// The session's shell died or stopped answering.
    SessionLost,
    /// A rollback restored the session while the command ran (the session lives on, as checkpointed).
    SessionRolledBack,
    /// A checkpoint or rollback failed; the sandbox is unchanged and running.
    CheckpointFailed,
    /// A process holds something that cannot be checkpointed (a TCP connection, ...); the sandbox is
    /// unchanged and running.
    CheckpointUnsupported,
    /// The disk of the filesystem store is full: a checkpoint failed (the sandbox is unchanged), or a
    /// rollback failed even after deleting the changes it discards.
    NoSpace,
    Internal,
}
