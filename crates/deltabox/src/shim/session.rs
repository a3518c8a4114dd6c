//! Persistent bash sessions (how coding agents drive a sandbox).
//!
//! bash runs interactively on a pty (job control, ^C semantics). Commands do not travel through the pty:
//! for each call the shim types one fixed line that reads the command text from a FIFO (fd 249) up to a
//! NUL and `eval`s it at top level, with stdout and stderr redirected to two more FIFOs (fds 250 and 251)
//! and stdin from /dev/null. The FIFOs live in the sandbox's /dev tmpfs and both sides hold them open
//! read-write: a shell restored from a checkpoint reopens them by path and is connected to the shim
//! again, and neither side ever sees end of file (the shell's end is noticed through init). bash's `PROMPT_COMMAND` then prints an end marker carrying `$?` on both
//! pipes. A timeout types ^C: the foreground job — or a loop running in bash itself — is interrupted,
//! the prompt returns, and the session keeps its cwd, variables, functions and jobs.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use sandbox::ipc::{AsyncChannel, IpcError};
use sandbox::spec::{ExitStatus, FifoFd, ProcessSpec, WinSize};
use serde::{Deserialize, Serialize};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{oneshot, watch, Mutex};

use super::exec::{merged_env, Output};
use super::fdio::AsyncFile;
use super::proto::{ErrorKind, Outcome, Reply, Stream};
use super::Shim;

const CMD_FD: i32 = 249;
const OUT_FD: i32 = 250;
const ERR_FD: i32 = 251;
/// After ^C, how long the command gets to return to the prompt before its process group is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(2);
/// How long a new shell gets to print its first prompt.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot start bash: {0}")]
    Start(String),
    #[error("the session's shell ended")]
    Ended,
    #[error("the session's shell did not answer")]
    NoAnswer,
    #[error("session i/o failed")]
    Io(#[source] std::io::Error),
    #[error(transparent)]
    Client(#[from] IpcError),
}

impl SessionError {
    pub fn reply(&self) -> Reply {
        let kind = match self {
            SessionError::Start(_) => ErrorKind::StartFailed,
            SessionError::Ended | SessionError::NoAnswer => ErrorKind::SessionLost,
            SessionError::Io(_) | SessionError::Client(_) => ErrorKind::Internal,
        };
        Reply::Error { kind, message: self.to_string() }
    }
}

struct Pipes {
    cmd: AsyncFile,
    out: MarkedStream,
    err: MarkedStream,
}

/// One output pipe of the session, read up to each end marker.
struct MarkedStream {
    output: Output,
    marker: Vec<u8>,
    /// Bytes read but not yet forwarded: a possible beginning of the marker.
    held: Vec<u8>,
}

pub struct Session {
    pid: i32,
    nonce: u64,
    /// Index of its pty in the sandbox's devpts (the shell's terminal is /dev/pts/<pty>).
    pty: u32,
    master: AsyncFile,
    pipes: Mutex<Pipes>,
    /// Whether the shell runs; `generation` ignores the exit report of a shell replaced by a restore.
    alive: watch::Sender<bool>,
    generation: AtomicU64,
}

/// What a checkpoint keeps of a session: enough to serve it again once its shell is restored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSnapshot {
    pub name: String,
    pub pid: i32,
    pub nonce: u64,
    pub pty: u32,
}

fn fifo_dir(nonce: u64) -> String {
    format!("/dev/.deltabox/sessions/{nonce:016x}")
}

/// The FIFOs of the session with `nonce` (command, stdout, stderr), as paths inside the sandbox.
pub fn fifo_paths(nonce: u64) -> [String; 3] {
    ["cmd", "out", "err"].map(|name| format!("{}/{name}", fifo_dir(nonce)))
}

impl Session {
    /// Starts `bash` and waits for its first prompt.
    pub async fn start(shim: &Shim) -> Result<Arc<Session>, SessionError> {
        let nonce: u64 = rand::rng().random();
        let [cmd, out, err] = fifo_paths(nonce);
        let spec = ProcessSpec {
            argv: ["bash", "--noprofile", "--norc", "--noediting", "-i"].map(String::from).to_vec(),
            env: merged_env(&shim.defaults.env, &[], &shim.id, true),
            cwd: shim.defaults.cwd.clone(),
            user: shim.defaults.user.clone(),
            tty: Some(WinSize { rows: 50, cols: 200 }),
            extra_fds: vec![],
            fifos: vec![
                FifoFd { path: cmd, fd: CMD_FD },
                FifoFd { path: out, fd: OUT_FD },
                FifoFd { path: err, fd: ERR_FD },
            ],
        };
        let spawned = shim.init.spawn(spec, &[]).await.map_err(|e| SessionError::Start(e.to_string()))?;
        let master = spawned.pty_master.expect("init sends a pty master with a tty spawn");
        let session = Session::attach(shim, spawned.pid, nonce, master)?;
        session.watch(spawned.exit);
        // Lines starting with a space stay out of the history; the real command is added with history -s.
        let setup = format!(
            " HISTCONTROL=ignorespace; PS1=''; PS2=''; PS0=''; PROMPT_COMMAND='__dbx_rc=$?; \
             printf \"\\036DBX{nonce:016x}:%d\\036\\n\" \"$__dbx_rc\" >&{OUT_FD}; \
             printf \"\\036DBX{nonce:016x}:%d\\036\\n\" \"$__dbx_rc\" >&{ERR_FD}'\n"
        );
        session.master.write_all(setup.as_bytes()).await.map_err(SessionError::Io)?;
        let mut pipes = session.pipes.lock().await;
        let ready = tokio::time::timeout(STARTUP_TIMEOUT, session.wait_for_marker(&mut pipes, None, 0)).await;
        drop(pipes);
        match ready {
            Ok(Ok(_)) => Ok(session),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SessionError::NoAnswer),
        }
    }

    /// Serves the shell `pid` whose terminal is `master` and whose FIFOs are those of `nonce` (a new
    /// shell, or one restored from a checkpoint). Call [`Session::watch`] next.
    pub fn attach(shim: &Shim, pid: i32, nonce: u64, master: OwnedFd) -> Result<Arc<Session>, SessionError> {
        let pty = pty_index(&master).map_err(SessionError::Io)?;
        let root = format!("/proc/{}/root{}", shim.init_pid(), fifo_dir(nonce));
        let open = |name: &str| -> Result<AsyncFile, SessionError> {
            let fd: OwnedFd = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("{root}/{name}"))
                .map_err(SessionError::Io)?
                .into();
            AsyncFile::new(fd).map_err(SessionError::Io)
        };
        let marker = format!("\x1eDBX{nonce:016x}:").into_bytes();
        let stream = |file, s| MarkedStream {
            output: Output { file, stream: s, kept: 0, dropped: 0, eof: false },
            marker: marker.clone(),
            held: vec![],
        };
        let (alive, _) = watch::channel(false);
        let session = Arc::new(Session {
            pid,
            nonce,
            pty,
            master: AsyncFile::new(master.try_clone().map_err(SessionError::Io)?).map_err(SessionError::Io)?,
            pipes: Mutex::new(Pipes {
                cmd: open("cmd")?,
                out: stream(open("out")?, Stream::Stdout),
                err: stream(open("err")?, Stream::Stderr),
            }),
            alive,
            generation: AtomicU64::new(0),
        });
        drain(Arc::new(AsyncFile::new(master).map_err(SessionError::Io)?));
        Ok(session)
    }

    /// Follows the shell's life through `exit` (from init), replacing any earlier watch.
    pub fn watch(self: &Arc<Self>, exit: oneshot::Receiver<ExitStatus>) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.alive.send_replace(true);
        let session = Arc::downgrade(self);
        tokio::spawn(async move {
            let _ = exit.await;
            if let Some(s) = session.upgrade() {
                if s.generation.load(Ordering::SeqCst) == generation {
                    s.alive.send_replace(false);
                }
            }
        });
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn snapshot(&self, name: &str) -> SessionSnapshot {
        SessionSnapshot { name: name.to_string(), pid: self.pid, nonce: self.nonce, pty: self.pty }
    }

    /// Whether the shell is still alive.
    pub fn alive(&self) -> bool {
        *self.alive.borrow()
    }

    /// Whether the shell exits within `wait` (i/o on a dying shell fails before its exit is reported).
    async fn exits_within(&self, wait: Duration) -> bool {
        let mut alive = self.alive.subscribe();
        let ended = tokio::time::timeout(wait, alive.wait_for(|a| !a)).await.is_ok();
        ended
    }

    /// Runs `command`, streaming its output to `conn`; returns the outcome. An i/o failure because the
    /// shell exited is reported as the end of the session.
    pub async fn run(
        &self,
        shim: &Shim,
        conn: &AsyncChannel,
        command: &str,
        timeout: Option<Duration>,
        max_output: u64,
    ) -> Result<Outcome, SessionError> {
        match self.run_command(shim, conn, command, timeout, max_output).await {
            Err(SessionError::Io(_)) if self.exits_within(Duration::from_millis(500)).await => Err(SessionError::Ended),
            other => other,
        }
    }

    async fn run_command(
        &self,
        shim: &Shim,
        conn: &AsyncChannel,
        command: &str,
        timeout: Option<Duration>,
        max_output: u64,
    ) -> Result<Outcome, SessionError> {
        let mut pipes = self.pipes.lock().await;
        if !self.alive() {
            return Err(SessionError::Ended);
        }
        let started = Instant::now();
        let oom_before = shim.oom_kills();
        pipes.out.output.kept = 0;
        pipes.out.output.dropped = 0;
        pipes.err.output.kept = 0;
        pipes.err.output.dropped = 0;
        let line = format!(
            " IFS= read -r -d '' __dbx_cmd <&{CMD_FD}; history -s \"$__dbx_cmd\"; \
             eval \"$__dbx_cmd\" </dev/null >&{OUT_FD} 2>&{ERR_FD}\n"
        );
        self.master.write_all(line.as_bytes()).await.map_err(SessionError::Io)?;
        let mut text = command.as_bytes().to_vec();
        text.push(0);
        pipes.cmd.write_all(&text).await.map_err(SessionError::Io)?;

        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut timed_out = false;
        let code = loop {
            let waited = match deadline {
                Some(d) => tokio::time::timeout_at(d, self.wait_for_marker(&mut pipes, Some(conn), max_output)).await,
                None => Ok(self.wait_for_marker(&mut pipes, Some(conn), max_output).await),
            };
            match waited {
                Ok(result) => break result?,
                Err(_elapsed) if !timed_out => {
                    timed_out = true;
                    self.master.write_all(&[3]).await.map_err(SessionError::Io)?;
                    match tokio::time::timeout(
                        INTERRUPT_GRACE,
                        self.wait_for_marker(&mut pipes, Some(conn), max_output),
                    )
                    .await
                    {
                        Ok(result) => break result?,
                        // ^C was ignored: kill the foreground job; bash returns to its prompt.
                        Err(_) => self.kill_foreground_job(shim).await,
                    }
                }
                Err(_elapsed) => {
                    let result =
                        tokio::time::timeout(INTERRUPT_GRACE, self.wait_for_marker(&mut pipes, Some(conn), max_output));
                    match result.await {
                        Ok(result) => break result?,
                        Err(_) => return Err(SessionError::NoAnswer),
                    }
                }
            }
        };
        Ok(Outcome {
            exit_code: Some(code),
            signal: None,
            timed_out,
            oom_killed: shim.oom_kills() > oom_before,
            stdout_dropped: pipes.out.output.dropped,
            stderr_dropped: pipes.err.output.dropped,
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
        })
    }

    async fn kill_foreground_job(&self, shim: &Shim) {
        // TIOCGPGRP answers in the caller's pid namespace, so ask for the foreground group through
        // the shell's view instead: its process group is the session's; any other is the job's.
        if let Ok(pgid) = rustix::termios::tcgetpgrp(self.master.as_fd()) {
            let host_pgid = pgid.as_raw_nonzero().get();
            if let Some(job) = shim.sandbox_pid(host_pgid) {
                if job != self.pid {
                    let _ = shim.init.signal(job, libc::SIGKILL, true).await;
                }
            }
        }
    }

    /// Ends the shell (SIGHUP, as when a terminal closes, then SIGKILL).
    pub async fn close(&self, shim: &Shim) {
        let _ = shim.init.signal(self.pid, libc::SIGHUP, true).await;
        if !self.exits_within(Duration::from_secs(1)).await {
            let _ = shim.init.signal(self.pid, libc::SIGKILL, true).await;
        }
    }

    /// Reads both streams up to their end markers; returns the exit code the marker carries. Fails with
    /// `Ended` when the shell exits first (the FIFOs never report end of file).
    async fn wait_for_marker(
        &self,
        pipes: &mut Pipes,
        conn: Option<&AsyncChannel>,
        max: u64,
    ) -> Result<i32, SessionError> {
        let mut alive = self.alive.subscribe();
        tokio::select! {
            result = pipes.wait_for_marker(conn, max) => result,
            _ = alive.wait_for(|a| !a) => Err(SessionError::Ended),
        }
    }
}

impl Pipes {
    /// Reads both streams up to their end markers; returns the exit code the marker carries.
    async fn wait_for_marker(&mut self, conn: Option<&AsyncChannel>, max: u64) -> Result<i32, SessionError> {
        let (out, err) = (&mut self.out, &mut self.err);
        let (a, b) = tokio::join!(out.read_to_marker(conn, max), err.read_to_marker(conn, max));
        let code = a?;
        b?;
        Ok(code)
    }
}

impl MarkedStream {
    async fn read_to_marker(&mut self, conn: Option<&AsyncChannel>, max: u64) -> Result<i32, SessionError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some((data_end, code, rest)) = find_marker(&self.held, &self.marker) {
                let data: Vec<u8> = self.held[..data_end].to_vec();
                self.held = rest;
                if let Some(conn) = conn {
                    self.output.forward(conn, &data, max).await?;
                }
                return Ok(code);
            }
            // Forward everything that cannot be the start of a marker.
            let keep_from = self.held.iter().rposition(|&b| b == 0x1e).unwrap_or(self.held.len());
            if keep_from > 0 {
                let data: Vec<u8> = self.held.drain(..keep_from).collect();
                if let Some(conn) = conn {
                    self.output.forward(conn, &data, max).await?;
                }
            }
            let n = self.output.file.read(&mut buf).await.map_err(SessionError::Io)?;
            if n == 0 {
                return Err(SessionError::Ended);
            }
            self.held.extend_from_slice(&buf[..n]);
        }
    }
}

/// Finds `marker` + digits + `\x1e\n` in `held`: (where the data before it ends, the code, what follows).
fn find_marker(held: &[u8], marker: &[u8]) -> Option<(usize, i32, Vec<u8>)> {
    let start = held.windows(marker.len()).position(|w| w == marker)?;
    let after = &held[start + marker.len()..];
    let end = after.iter().position(|&b| b == 0x1e)?;
    if after.get(end + 1) != Some(&b'\n') {
        return None;
    }
    let code = std::str::from_utf8(&after[..end]).ok()?.parse().ok()?;
    Some((start, code, after[end + 2..].to_vec()))
}

/// The index of the pty whose master is `master`.
fn pty_index(master: &OwnedFd) -> std::io::Result<u32> {
    let name = rustix::pty::ptsname(master, Vec::new())?;
    let name = name.to_string_lossy();
    name.rsplit('/')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("odd pty name {name}")))
}

/// Reads and discards what `master` gets: a terminal nobody reads blocks its writers once its buffer is
/// full (a shell's prompts and job notices are not part of any command's output).
pub fn drain(master: Arc<AsyncFile>) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n) = master.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_is_found_with_its_code_and_what_follows() {
        let m = b"\x1eDBXab:";
        let held = b"hello\n\x1eDBXab:130\x1e\nnext".to_vec();
        assert_eq!(find_marker(&held, m), Some((6, 130, b"next".to_vec())));
        assert_eq!(find_marker(b"\x1eDBXab:13", m), None);
        assert_eq!(find_marker(b"no marker", m), None);
    }
}
