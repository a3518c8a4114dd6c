//! The shim's side of the init protocol: many tasks send requests, one task receives init's messages and
//! routes them to whoever waits for them.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use sandbox::ipc::{AsyncChannel, IpcError, Packet};
use sandbox::spec::{ExitStatus, FromInit, ProcessSpec, ToInit};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("lost the connection to the sandbox's init")]
    Lost(#[source] IpcError),
    #[error("{0}")]
    StartFailed(String),
}

/// A process init started for us.
pub struct Spawned {
    /// Pid inside the sandbox.
    pub pid: i32,
    pub pty_master: Option<OwnedFd>,
    pub exit: oneshot::Receiver<ExitStatus>,
}

type SpawnReply = Result<(i32, Option<OwnedFd>), String>;

#[derive(Default)]
struct Waiters {
    spawns: HashMap<u64, (oneshot::Sender<SpawnReply>, oneshot::Sender<ExitStatus>)>,
    exits: HashMap<i32, oneshot::Sender<ExitStatus>>,
    fifos: Option<oneshot::Sender<Result<Vec<OwnedFd>, String>>>,
}

pub struct InitLink {
    chan: AsyncChannel,
    waiters: Mutex<Waiters>,
    next_id: AtomicU64,
}

impl InitLink {
    pub fn new(chan: AsyncChannel) -> InitLink {
        InitLink { chan, waiters: Mutex::new(Waiters::default()), next_id: AtomicU64::new(1) }
    }

    /// Starts a process. Without a tty, `stdio` are the stdin, stdout and stderr descriptors.
    pub async fn spawn(&self, spec: ProcessSpec, stdio: &[BorrowedFd<'_>]) -> Result<Spawned, InitError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (spawn_tx, spawn_rx) = oneshot::channel();
        let (exit_tx, exit_rx) = oneshot::channel();
        self.waiters.lock().expect("waiters lock").spawns.insert(id, (spawn_tx, exit_tx));
        if let Err(e) = self.chan.send(&ToInit::Spawn { id, spec }, &[], stdio).await {
            self.waiters.lock().expect("waiters lock").spawns.remove(&id);
            return Err(InitError::Lost(e));
        }
        match spawn_rx.await {
            Ok(Ok((pid, pty_master))) => Ok(Spawned { pid, pty_master, exit: exit_rx }),
            Ok(Err(message)) => Err(InitError::StartFailed(message)),
            Err(_) => Err(InitError::Lost(IpcError::Closed)),
        }
    }

    /// Sends `signal` to `pid` (to its process group when `group`). Pids are the sandbox's.
    pub async fn signal(&self, pid: i32, signal: i32, group: bool) -> Result<(), InitError> {
        self.chan.send(&ToInit::Signal { pid, signal, group }, &[], &[]).await.map_err(InitError::Lost)
    }

    /// Has init open FIFOs inside the sandbox (creating them and their directories if missing); one
    /// read-write descriptor per path, in order. One call at a time.
    pub async fn open_fifos(&self, paths: Vec<String>) -> Result<Vec<OwnedFd>, InitError> {
        let count = paths.len();
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().expect("waiters lock").fifos = Some(tx);
        self.chan.send(&ToInit::OpenFifos { paths }, &[], &[]).await.map_err(InitError::Lost)?;
        match rx.await {
            Ok(Ok(fds)) if fds.len() == count => Ok(fds),
            Ok(Ok(fds)) => Err(InitError::StartFailed(format!("init sent {} FIFOs for {count} paths", fds.len()))),
            Ok(Err(message)) => Err(InitError::StartFailed(message)),
            Err(_) => Err(InitError::Lost(IpcError::Closed)),
        }
    }

    /// Asks init to report the end of `pid` (a process it did not start, e.g. a restored one).
    pub async fn watch(&self, pid: i32) -> Result<oneshot::Receiver<ExitStatus>, InitError> {
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().expect("waiters lock").exits.insert(pid, tx);
        self.chan.send(&ToInit::Watch { pid }, &[], &[]).await.map_err(InitError::Lost)?;
        Ok(rx)
    }

    /// Receives init's messages until the channel closes. Run this in exactly one task.
    pub async fn dispatch(&self) {
        loop {
            let msg = match self.chan.recv::<FromInit>().await {
                Ok(Packet { msg, fds, .. }) => (msg, fds),
                Err(e) => {
                    tracing::warn!("init channel closed: {e}");
                    // Dropping the waiters wakes every task still waiting with an error.
                    *self.waiters.lock().expect("waiters lock") = Waiters::default();
                    return;
                }
            };
            let mut w = self.waiters.lock().expect("waiters lock");
            match msg {
                (FromInit::Spawned { id, pid }, fds) => {
                    if let Some((spawn_tx, exit_tx)) = w.spawns.remove(&id) {
                        w.exits.insert(pid, exit_tx);
                        let _ = spawn_tx.send(Ok((pid, fds.into_iter().next())));
                    }
                }
                (FromInit::SpawnFailed { id, message }, _) => {
                    if let Some((spawn_tx, _)) = w.spawns.remove(&id) {
                        let _ = spawn_tx.send(Err(message));
                    }
                }
                (FromInit::Exited { pid, status }, _) => {
                    if let Some(tx) = w.exits.remove(&pid) {
                        let _ = tx.send(status);
                    }
                }
                (FromInit::FifosOpened { error }, fds) => {
                    if let Some(tx) = w.fifos.take() {
                        let _ = tx.send(error.map_or(Ok(fds), Err));
                    }
                }
                (other, _) => tracing::warn!("unexpected message from init: {other:?}"),
            }
        }
    }
}
