//! The daemon's side of the daemon–shim protocol ([`crate::shim::proto`]): one typed method per request,
//! so a reply of the wrong shape is handled once, here, and callers see a [`ShimError`].
//!
//! A shim announces its protocol version in its [`ShimInfo`]. [`ShimClient::info`] reads that version
//! before it decodes anything else, so a daemon meeting a shim of another version (an upgrade while
//! sandboxes run) learns it as [`ShimError::Incompatible`] instead of reading a decode error as "shim gone".

use std::path::PathBuf;
use std::time::Duration;

use deltacr::image::ImageId;
use deltafs::StackId;
use sandbox::ipc::{AsyncChannel, IpcError, Packet};

use crate::shim::proto::{
    CheckpointStats, ErrorKind, ExecRequest, Input, Outcome, Reply, Request, RollbackStats, ShimInfo, Stream, PROTOCOL,
};

/// How long a shim may take to answer a control request (info, destroy, a checkpoint's first answer).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request to a shim failed.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("cannot reach the supervisor of sandbox {sandbox}")]
    Unreachable {
        sandbox: String,
        #[source]
        source: IpcError,
    },
    #[error("lost the supervisor of sandbox {sandbox} during the request")]
    Lost {
        sandbox: String,
        #[source]
        source: IpcError,
    },
    #[error("the supervisor of sandbox {sandbox} did not answer within {after:?}")]
    Timeout { sandbox: String, after: Duration },
    /// The shim carried the request out and reports why it failed.
    #[error("{message}")]
    Reported { kind: ErrorKind, message: String },
    #[error("the supervisor of sandbox {sandbox} answered {answer} to {request}")]
    Unexpected { sandbox: String, request: &'static str, answer: String },
    #[error(
        "the supervisor of sandbox {sandbox} speaks protocol version {shim}, this daemon version {daemon}: \
         the sandbox keeps running; use the deltabox version that started it, or delete it"
    )]
    Incompatible { sandbox: String, shim: u32, daemon: u32 },
}

/// A connection to one sandbox's shim (each request opens its own connection).
#[derive(Debug, Clone)]
pub struct ShimClient {
    sandbox: String,
    socket: PathBuf,
}

/// What a shim says about itself, as far as a daemon of any version can read it.
#[derive(Debug, Clone)]
pub enum Announced {
    /// Speaks our protocol.
    Compatible(ShimInfo),
    /// Speaks protocol `protocol`; `info` holds what could still be read of its answer.
    Incompatible { protocol: u32, info: ShimInfo },
}

impl ShimClient {
    pub fn new(sandbox: &str, socket: PathBuf) -> ShimClient {
        ShimClient { sandbox: sandbox.to_string(), socket }
    }

    /// Asks the shim who it is. Succeeds for a shim of another protocol version too (see [`Announced`]).
    pub async fn announce(&self) -> Result<Announced, ShimError> {
        let exchange = async {
            let conn = self.open(&Request::Info).await?;
            let Packet { msg, .. } = conn.recv::<serde_json::Value>().await.map_err(|e| self.lost(e))?;
            Ok::<_, ShimError>(msg)
        };
        let msg = self.within(CONTROL_TIMEOUT, exchange).await?;
        let info = msg.get("Info").cloned().unwrap_or_default();
        // A shim from before versioning sends no version: 0.
        let protocol = info.get("protocol").and_then(serde_json::Value::as_u64).unwrap_or(0) as u32;
        if protocol == PROTOCOL {
            let info = serde_json::from_value(info).map_err(|e| self.unexpected("Info", &e))?;
            return Ok(Announced::Compatible(info));
        }
        let field = |name: &str| info.get(name).and_then(serde_json::Value::as_i64).unwrap_or(0);
        let info = ShimInfo {
            protocol,
            shim_pid: field("shim_pid") as i32,
            init_pid: field("init_pid") as i32,
            uid_base: field("uid_base") as u32,
            templates: Vec::new(),
            nat: None,
        };
        Ok(Announced::Incompatible { protocol, info })
    }

    /// The shim's info; an error unless it speaks our protocol.
    pub async fn info(&self) -> Result<ShimInfo, ShimError> {
        match self.announce().await? {
            Announced::Compatible(info) => Ok(info),
            Announced::Incompatible { protocol, .. } => Err(self.incompatible(protocol)),
        }
    }

    pub fn incompatible(&self, shim: u32) -> ShimError {
        ShimError::Incompatible { sandbox: self.sandbox.clone(), shim, daemon: PROTOCOL }
    }

    /// Checkpoints the sandbox. For a process checkpoint the image is written afterwards: the returned
    /// [`PendingImage`] resolves once it is on disk.
    pub async fn checkpoint(
        &self,
        processes: bool,
        parent: Option<StackId>,
    ) -> Result<(CheckpointStats, Option<PendingImage>), ShimError> {
        let conn = self.open(&Request::Checkpoint { processes, parent }).await?;
        let reply = self.within(CONTROL_TIMEOUT, self.reply(&conn)).await?;
        let stats = match reply {
            Reply::Checkpointed(stats) => stats,
            other => return Err(self.unexpected("Checkpoint", &other)),
        };
        let pending = stats.image.is_some().then(|| PendingImage { client: self.clone(), conn });
        Ok((stats, pending))
    }

    /// Rolls the sandbox back to `stack` (and with `image` restores that checkpoint's processes).
    /// `address`: the sandbox's in the `nat` network when the checkpoint was taken.
    pub async fn rollback(
        &self,
        stack: StackId,
        image: Option<ImageId>,
        address: Option<std::net::Ipv4Addr>,
    ) -> Result<RollbackStats, ShimError> {
        match self.single(Request::Rollback { stack, image, address }, Some(CONTROL_TIMEOUT)).await? {
            Reply::RolledBack(stats) => Ok(stats),
            other => Err(self.unexpected("Rollback", &other)),
        }
    }

    /// Drops the in-memory copies of the process checkpoint of `stack`.
    pub async fn forget(&self, stack: StackId) -> Result<(), ShimError> {
        self.done(Request::Forget { stack }, "Forget", Some(CONTROL_TIMEOUT)).await
    }

    /// Drops the templates of the process checkpoint of `stack` to free memory, if they are still droppable
    /// (ask only for a checkpoint the shim listed in its `ShimInfo::templates`).
    pub async fn drop_templates(&self, stack: StackId) -> Result<(), ShimError> {
        self.done(Request::DropTemplates { stack }, "DropTemplates", Some(CONTROL_TIMEOUT)).await
    }

    /// Kills every process of the sandbox; the shim exits afterwards.
    pub async fn destroy(&self) -> Result<(), ShimError> {
        self.done(Request::Destroy, "Destroy", Some(CONTROL_TIMEOUT)).await
    }

    pub async fn sessions(&self) -> Result<Vec<String>, ShimError> {
        match self.single(Request::SessionList, None).await? {
            Reply::Sessions(names) => Ok(names),
            other => Err(self.unexpected("SessionList", &other)),
        }
    }

    pub async fn open_session(&self, name: String) -> Result<(), ShimError> {
        // Starting the shell may take a while on a loaded host: no timeout beyond the shim's own.
        self.done(Request::SessionOpen { name }, "SessionOpen", None).await
    }

    pub async fn close_session(&self, name: String) -> Result<(), ShimError> {
        self.done(Request::SessionClose { name }, "SessionClose", None).await
    }

    /// Runs `command` in session `name`; the shim enforces the timeout.
    pub async fn run_in_session(
        &self,
        name: String,
        command: String,
        timeout_ms: Option<u64>,
        max_output: u64,
    ) -> Result<Running, ShimError> {
        let conn = self.open(&Request::SessionRun { name, command, timeout_ms, max_output }).await?;
        Ok(Running { client: self.clone(), conn })
    }

    /// Starts a command; its events come from the returned [`Running`].
    pub async fn exec(&self, request: ExecRequest) -> Result<Running, ShimError> {
        let conn = self.open(&Request::Exec(request)).await?;
        Ok(Running { client: self.clone(), conn })
    }

    async fn open(&self, request: &Request) -> Result<AsyncChannel, ShimError> {
        let unreachable = |source| ShimError::Unreachable { sandbox: self.sandbox.clone(), source };
        let conn = AsyncChannel::connect(&self.socket).map_err(unreachable)?;
        conn.send(request, &[], &[]).await.map_err(unreachable)?;
        Ok(conn)
    }

    /// The next reply; a reported error becomes [`ShimError::Reported`].
    async fn reply(&self, conn: &AsyncChannel) -> Result<Reply, ShimError> {
        match conn.recv::<Reply>().await.map_err(|e| self.lost(e))?.msg {
            Reply::Error { kind, message } => Err(ShimError::Reported { kind, message }),
            reply => Ok(reply),
        }
    }

    /// A request with one answer.
    async fn single(&self, request: Request, timeout: Option<Duration>) -> Result<Reply, ShimError> {
        let exchange = async {
            let conn = self.open(&request).await?;
            self.reply(&conn).await
        };
        match timeout {
            Some(after) => self.within(after, exchange).await,
            None => exchange.await,
        }
    }

    /// A request answered with `Done`.
    async fn done(&self, request: Request, name: &'static str, timeout: Option<Duration>) -> Result<(), ShimError> {
        match self.single(request, timeout).await? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(name, &other)),
        }
    }

    async fn within<T>(
        &self,
        after: Duration,
        f: impl std::future::Future<Output = Result<T, ShimError>>,
    ) -> Result<T, ShimError> {
        tokio::time::timeout(after, f).await.map_err(|_| ShimError::Timeout { sandbox: self.sandbox.clone(), after })?
    }

    fn lost(&self, source: IpcError) -> ShimError {
        ShimError::Lost { sandbox: self.sandbox.clone(), source }
    }

    fn unexpected(&self, request: &'static str, answer: &dyn std::fmt::Debug) -> ShimError {
        ShimError::Unexpected { sandbox: self.sandbox.clone(), request, answer: format!("{answer:?}") }
    }
}

/// A process image being written after its checkpoint was answered.
pub struct PendingImage {
    client: ShimClient,
    conn: AsyncChannel,
}

impl PendingImage {
    /// Waits until the image is on disk (fsynced by the shim); its size in bytes.
    pub async fn written(self) -> Result<u64, ShimError> {
        match self.client.reply(&self.conn).await? {
            Reply::ImageWritten { bytes } => Ok(bytes),
            other => Err(self.client.unexpected("Checkpoint (image)", &other)),
        }
    }
}

/// What a running command reports.
#[derive(Debug)]
pub enum Event {
    Started { pid: i32 },
    Output { stream: Stream, data: Vec<u8> },
    Exited(Outcome),
}

/// A command running in the sandbox (exec or a session run). Dropping it closes the connection, which
/// kills an exec's command.
pub struct Running {
    client: ShimClient,
    conn: AsyncChannel,
}

impl Running {
    /// The command's next event. An error ends the command's events.
    pub async fn next(&self) -> Result<Event, ShimError> {
        let Packet { msg, payload, .. } = self.conn.recv::<Reply>().await.map_err(|e| self.client.lost(e))?;
        match msg {
            Reply::Started { pid } => Ok(Event::Started { pid }),
            Reply::Output { stream } => Ok(Event::Output { stream, data: payload }),
            Reply::Exited(outcome) => Ok(Event::Exited(outcome)),
            Reply::Error { kind, message } => Err(ShimError::Reported { kind, message }),
            other => Err(self.client.unexpected("Exec", &other)),
        }
    }

    /// Sends stdin, a resize or a signal to the command.
    pub async fn send(&self, input: &Input, payload: &[u8]) -> Result<(), ShimError> {
        self.conn.send(input, payload, &[]).await.map_err(|e| self.client.lost(e))
    }

    /// Reads the command's events to the end: its outcome, stdout and stderr.
    pub async fn collect(&self) -> Result<(Outcome, Vec<u8>, Vec<u8>), ShimError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match self.next().await? {
                Event::Started { .. } => {}
                Event::Output { stream: Stream::Stdout, data } => stdout.extend_from_slice(&data),
                Event::Output { stream: Stream::Stderr, data } => stderr.extend_from_slice(&data),
                Event::Exited(outcome) => return Ok((outcome, stdout, stderr)),
            }
        }
    }
}
