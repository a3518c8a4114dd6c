//! Persistent bash sessions (how coding agents drive a sandbox).
//!
//! bash runs interactively on a pty (job control, ^C semantics). Commands do not travel through the pty:
//! for each call the shim types one line that sets the call's token, reads the command text from a FIFO
//! (fd 249) up to a NUL and `eval`s it at top level, with stdout and stderr redirected to two more FIFOs
//! (fds 250 and 251; the command does not get 249-251 themselves) and stdin from /dev/null. The FIFOs live in the sandbox's /dev/.deltabox (read-only
//! for the sandbox's processes) and both sides hold them open read-write: a shell restored from a
//! checkpoint reopens them by path and is connected to the shim again, and neither side ever sees end of
//! file (the shell's end is noticed through init).
//! The shim never opens them by path itself: init opens them inside the sandbox and passes the
//! descriptors (a process of the sandbox could have put a symlink to a host file there).
//! bash's `PROMPT_COMMAND` then prints an end marker carrying the token and `$?` on both pipes. The token
//! is new for each call and travels only on the terminal, which the shim alone holds the master of: a
//! process of the sandbox that writes a marker into the FIFOs does not know it (docs/security.md says
//! what can still learn it). A timeout types ^C: the foreground job — or a loop running in bash itself —
//! is interrupted, the prompt returns, and the session keeps its cwd, variables, functions and jobs.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use sandbox::ipc::{AsyncChannel, IpcError};
use sandbox::spec::{ExitStatus, ProcessSpec, WinSize};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd};
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
    #[error("the sandbox was rolled back while the command ran: the session is as it was at the checkpoint")]
    RolledBack,
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
            SessionError::RolledBack => ErrorKind::SessionRolledBack,
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
    /// Bytes read but not yet forwarded: a possible beginning of the marker (a few dozen bytes), or
    /// what followed the last marker (at most one read).
    held: Vec<u8>,
}

pub struct Session {
    pid: i32,
    nonce: u64,
    /// Index of its pty in the sandbox's devpts (the shell's terminal is /dev/pts/<pty>).
    pty: u32,
    master: AsyncFile,
    pipes: Mutex<Pipes>,
    /// Whether the shell runs.
    alive: watch::Sender<bool>,
    /// Bumped each time a shell (new or restored) is watched: the exit report of a shell replaced by a
    /// restore is ignored, and a command running when the sandbox is rolled back ends.
    generation: watch::Sender<u64>,
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
    format!("{}/sessions/{nonce:016x}", sandbox::init::CHANNELS)
}

/// The FIFOs of the session with `nonce` (command, stdout, stderr), as paths inside the sandbox.
pub fn fifo_paths(nonce: u64) -> [String; 3] {
    ["cmd", "out", "err"].map(|name| format!("{}/{name}", fifo_dir(nonce)))
}

impl Session {
    /// Starts `bash` and waits for its first prompt. The caller holds [`Shim::starting_process`].
    pub async fn start(shim: &Shim) -> Result<Arc<Session>, SessionError> {
        let nonce: u64 = rand::rng().random();
        let fifos =
            shim.init.open_fifos(fifo_paths(nonce).to_vec()).await.map_err(|e| SessionError::Start(e.to_string()))?;
        let fifos: [OwnedFd; 3] = fifos.try_into().map_err(|_| SessionError::Start("init sent no FIFOs".into()))?;
        // The shell gets init's descriptions (blocking); the shim reads and writes its own.
        let own: Vec<OwnedFd> = fifos.iter().map(reopen).collect::<Result<_, _>>().map_err(SessionError::Io)?;
        let own: [OwnedFd; 3] = own.try_into().expect("three FIFOs");
        let spec = ProcessSpec {
            argv: ["bash", "--noprofile", "--norc", "--noediting", "-i"].map(String::from).to_vec(),
            env: merged_env(&shim.defaults.env, &[], &shim.id, true),
            cwd: shim.defaults.cwd.clone(),
            user: shim.defaults.user.clone(),
            tty: Some(WinSize { rows: 50, cols: 200 }),
            extra_fds: vec![CMD_FD, OUT_FD, ERR_FD],
        };
        let borrowed = fifos.each_ref().map(|f| f.as_fd());
        let spawned = shim.init.spawn(spec, &borrowed).await.map_err(|e| SessionError::Start(e.to_string()))?;
        drop(fifos);
        let master = spawned.pty_master.expect("init sends a pty master with a tty spawn");
        let session = Session::attach(spawned.pid, nonce, master, own)?;
        session.watch(spawned.exit);
        // Lines starting with a space stay out of the history; the real command is added with history -s.
        let token = new_token();
        let setup = format!(
            " __dbx_tok={token}; HISTCONTROL=ignorespace; PS1=''; PS2=''; PS0=''; PROMPT_COMMAND='__dbx_rc=$?; \
             printf \"\\036DBX%s:%d\\036\\n\" \"$__dbx_tok\" \"$__dbx_rc\" >&{OUT_FD}; \
             printf \"\\036DBX%s:%d\\036\\n\" \"$__dbx_tok\" \"$__dbx_rc\" >&{ERR_FD}'\n"
        );
        session.master.write_all(setup.as_bytes()).await.map_err(SessionError::Io)?;
        let mut pipes = session.pipes.lock().await;
        let generation = *session.generation.borrow();
        let marker = marker(&token);
        let wait = session.wait_for_marker(&mut pipes, None, 0, &marker, generation);
        let ready = tokio::time::timeout(STARTUP_TIMEOUT, wait).await;
        drop(pipes);
        match ready {
            Ok(Ok(_)) => Ok(session),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SessionError::NoAnswer),
        }
    }

    /// Serves the shell `pid` whose terminal is `master` and whose FIFOs (command, stdout, stderr) are
    /// `fifos`, descriptions of the shim's own (a new shell, or one restored from a checkpoint). Call
    /// [`Session::watch`] next.
    pub fn attach(pid: i32, nonce: u64, master: OwnedFd, fifos: [OwnedFd; 3]) -> Result<Arc<Session>, SessionError> {
        let pty = pty_index(&master).map_err(SessionError::Io)?;
        let [cmd, out, err] = fifos.map(|fd| AsyncFile::new(fd).map_err(SessionError::Io));
        let stream = |file, s| MarkedStream {
            output: Output { file, stream: s, kept: 0, dropped: 0, eof: false },
            held: vec![],
        };
        let (alive, _) = watch::channel(false);
        let (generation, _) = watch::channel(0);
        let session = Arc::new(Session {
            pid,
            nonce,
            pty,
            master: AsyncFile::new(master.try_clone().map_err(SessionError::Io)?).map_err(SessionError::Io)?,
            pipes: Mutex::new(Pipes {
                cmd: cmd?,
                out: stream(out?, Stream::Stdout),
                err: stream(err?, Stream::Stderr),
            }),
            alive,
            generation,
        });
        drain(Arc::new(AsyncFile::new(master).map_err(SessionError::Io)?));
        Ok(session)
    }

    /// Follows the shell's life through `exit` (from init), replacing any earlier watch.
    pub fn watch(self: &Arc<Self>, exit: oneshot::Receiver<ExitStatus>) {
        let mut generation = 0;
        self.generation.send_modify(|g| {
            *g += 1;
            generation = *g;
        });
        self.alive.send_replace(true);
        let session = Arc::downgrade(self);
        tokio::spawn(async move {
            let _ = exit.await;
            if let Some(s) = session.upgrade() {
                if *s.generation.borrow() == generation {
                    s.alive.send_replace(false);
                }
            }
        });
    }

    /// After a rollback restored this session's shell (call [`Session::watch`] first, which ends a command
    /// still waiting): empties its FIFOs, which outlive rollbacks in /dev, so no command text or output
    /// of the abandoned branch reaches the restored shell or the next caller.
    pub async fn reset_channels(&self) -> std::io::Result<()> {
        let mut pipes = self.pipes.lock().await;
        let Pipes { cmd, out, err } = &mut *pipes;
        cmd.discard_pending()?;
        for stream in [out, err] {
            stream.output.file.discard_pending()?;
            stream.held.clear();
        }
        Ok(())
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
        let generation = *self.generation.borrow();
        match self.run_command(shim, conn, command, timeout, max_output, generation).await {
            Err(SessionError::Io(_)) if self.exits_within(Duration::from_millis(500)).await => Err(SessionError::Ended),
            Err(_) if *self.generation.borrow() != generation => Err(SessionError::RolledBack),
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
        generation: u64,
    ) -> Result<Outcome, SessionError> {
        let mut pipes = self.pipes.lock().await;
        if !self.alive() {
            return Err(SessionError::Ended);
        }
        if *self.generation.borrow() != generation {
            return Err(SessionError::RolledBack);
        }
        let started = Instant::now();
        let oom_before = shim.oom_kills();
        pipes.out.output.kept = 0;
        pipes.out.output.dropped = 0;
        pipes.err.output.kept = 0;
        pipes.err.output.dropped = 0;
        let token = new_token();
        let marker = marker(&token);
        // The command gets the output FIFOs as stdout and stderr only: what it starts (a daemon) does not
        // hold the command FIFO, from which it could read the next commands, nor extra output fds.
        let line = format!(
            " __dbx_tok={token}; IFS= read -r -d '' __dbx_cmd <&{CMD_FD}; history -s \"$__dbx_cmd\"; \
             eval \"$__dbx_cmd\" </dev/null >&{OUT_FD} 2>&{ERR_FD} {CMD_FD}<&- {OUT_FD}>&- {ERR_FD}>&-\n"
        );
        self.master.write_all(line.as_bytes()).await.map_err(SessionError::Io)?;
        let mut text = command.as_bytes().to_vec();
        text.push(0);
        pipes.cmd.write_all(&text).await.map_err(SessionError::Io)?;

        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut timed_out = false;
        let code = loop {
            let wait = self.wait_for_marker(&mut pipes, Some(conn), max_output, &marker, generation);
            let waited = match deadline {
                Some(d) => tokio::time::timeout_at(d, wait).await,
                None => Ok(wait.await),
            };
            match waited {
                Ok(result) => break result?,
                Err(_elapsed) if !timed_out => {
                    timed_out = true;
                    self.master.write_all(&[3]).await.map_err(SessionError::Io)?;
                    let wait = self.wait_for_marker(&mut pipes, Some(conn), max_output, &marker, generation);
                    match tokio::time::timeout(INTERRUPT_GRACE, wait).await {
                        Ok(result) => break result?,
                        // ^C was ignored: kill the foreground job; bash returns to its prompt.
                        Err(_) => self.kill_foreground_job(shim).await,
                    }
                }
                Err(_elapsed) => {
                    let wait = self.wait_for_marker(&mut pipes, Some(conn), max_output, &marker, generation);
                    match tokio::time::timeout(INTERRUPT_GRACE, wait).await {
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

    /// Reads both streams up to their end markers (`marker`: the call's); returns the exit code the marker
    /// carries. Fails with `Ended` when the shell exits first (the FIFOs never report end of file), and with
    /// `RolledBack` when a rollback replaced the shell of `generation`.
    async fn wait_for_marker(
        &self,
        pipes: &mut Pipes,
        conn: Option<&AsyncChannel>,
        max: u64,
        marker: &[u8],
        generation: u64,
    ) -> Result<i32, SessionError> {
        let mut alive = self.alive.subscribe();
        let mut replaced = self.generation.subscribe();
        tokio::select! {
            result = pipes.wait_for_marker(conn, max, marker) => result,
            _ = alive.wait_for(|a| !a) => Err(SessionError::Ended),
            _ = replaced.wait_for(|g| *g != generation) => Err(SessionError::RolledBack),
        }
    }
}

impl Pipes {
    /// Reads both streams up to their end markers; returns the exit code the marker carries.
    async fn wait_for_marker(
        &mut self,
        conn: Option<&AsyncChannel>,
        max: u64,
        marker: &[u8],
    ) -> Result<i32, SessionError> {
        let (out, err) = (&mut self.out, &mut self.err);
        let (a, b) = tokio::join!(out.read_to_marker(conn, max, marker), err.read_to_marker(conn, max, marker));
        let code = a?;
        b?;
        Ok(code)
    }
}

impl MarkedStream {
    /// Forwards what it reads up to `marker` (at most `max` bytes kept in all); each byte is looked at a
    /// bounded number of times and only a possible beginning of the marker is held back.
    async fn read_to_marker(
        &mut self,
        conn: Option<&AsyncChannel>,
        max: u64,
        marker: &[u8],
    ) -> Result<i32, SessionError> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (forward_to, found) = match scan_for_marker(&self.held, marker) {
                Scan::Found { start, code, end } => (start, Some((code, end))),
                Scan::NotYet { keep_from } => (keep_from, None),
            };
            if let Some(conn) = conn {
                self.output.forward(conn, &self.held[..forward_to], max).await?;
            }
            if let Some((code, end)) = found {
                self.held.drain(..end);
                return Ok(code);
            }
            self.held.drain(..forward_to);
            let n = self.output.file.read(&mut buf).await.map_err(SessionError::Io)?;
            if n == 0 {
                return Err(SessionError::Ended);
            }
            self.held.extend_from_slice(&buf[..n]);
        }
    }
}

/// A new per-call token: 128 random bits, hex.
fn new_token() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// The beginning of the end marker of the call with `token`; the exit code, `\x1e` and a newline follow.
fn marker(token: &str) -> Vec<u8> {
    format!("\x1eDBX{token}:").into_bytes()
}

/// Longest exit code text `$?` can print (0-255, but be lenient: a sign and ten digits).
const MAX_CODE_LEN: usize = 11;

#[derive(Debug, PartialEq)]
enum Scan {
    /// The data before `start` is output; the marker carries `code` and ends at `end`.
    Found { start: usize, code: i32, end: usize },
    /// No marker yet: everything before `keep_from` is output; the rest may begin a marker.
    NotYet { keep_from: usize },
}

/// Looks for `marker` + code + `\x1e\n` in `held`. Only positions of `\x1e` bytes are tried, each with at
/// most `marker.len() + MAX_CODE_LEN + 2` bytes compared, so the work is linear in `held`.
fn scan_for_marker(held: &[u8], marker: &[u8]) -> Scan {
    let separators = held.iter().enumerate().filter(|(_, b)| **b == 0x1e).map(|(i, _)| i);
    for start in separators {
        let rest = &held[start..];
        if rest.len() <= marker.len() {
            if marker.starts_with(rest) {
                return Scan::NotYet { keep_from: start };
            }
            continue;
        }
        if !rest.starts_with(marker) {
            continue;
        }
        let after = &rest[marker.len()..];
        let digits = after.iter().take(MAX_CODE_LEN + 1).take_while(|b| b.is_ascii_digit() || **b == b'-').count();
        if digits > MAX_CODE_LEN {
            continue;
        }
        match (after.get(digits), after.get(digits + 1)) {
            (None, _) | (Some(0x1e), None) => return Scan::NotYet { keep_from: start },
            (Some(0x1e), Some(b'\n')) => {
                let code = std::str::from_utf8(&after[..digits]).ok().and_then(|c| c.parse().ok());
                if let Some(code) = code {
                    return Scan::Found { start, code, end: start + marker.len() + digits + 2 };
                }
            }
            _ => {}
        }
    }
    Scan::NotYet { keep_from: held.len() }
}

/// A description of the shim's own of the FIFO `fd` is open on (reopened through /proc/self, which
/// names the shim's own descriptor: nothing of the sandbox is resolved).
fn reopen(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    let own = std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(own.into())
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
    fn marker_is_found_with_its_code_and_where_it_ends() {
        let m = b"\x1eDBXab:";
        let held = b"hello\n\x1eDBXab:130\x1e\nnext";
        assert_eq!(scan_for_marker(held, m), Scan::Found { start: 6, code: 130, end: 18 });
        assert_eq!(&held[18..], b"next");
        assert_eq!(scan_for_marker(b"no marker", m), Scan::NotYet { keep_from: 9 });
    }

    #[test]
    fn only_a_possible_beginning_of_the_marker_is_held_back() {
        let m = b"\x1eDBXab:";
        assert_eq!(scan_for_marker(b"out\x1eDBXab:13", m), Scan::NotYet { keep_from: 3 });
        assert_eq!(scan_for_marker(b"out\x1eDB", m), Scan::NotYet { keep_from: 3 });
        assert_eq!(scan_for_marker(b"out\x1eDBXab:13\x1e", m), Scan::NotYet { keep_from: 3 });
        // A record separator that cannot start the marker is output.
        let other = b"a\x1ex\x1eDBXzz:0\x1e\nb";
        assert_eq!(scan_for_marker(other, m), Scan::NotYet { keep_from: other.len() });
    }

    #[test]
    fn a_marker_with_another_token_is_output() {
        let ours = marker("11111111111111111111111111111111");
        let forged = b"\x1eDBX22222222222222222222222222222222:0\x1e\n";
        assert_eq!(scan_for_marker(forged, &ours), Scan::NotYet { keep_from: forged.len() });
        let mut both = forged.to_vec();
        both.extend_from_slice(&ours);
        both.extend_from_slice(b"7\x1e\n");
        assert_eq!(scan_for_marker(&both, &ours), Scan::Found { start: forged.len(), code: 7, end: both.len() });
    }

    #[test]
    fn a_long_run_of_digits_is_not_a_marker() {
        let m = b"\x1eDBXab:";
        let held = b"\x1eDBXab:123456789012345\x1e\n";
        assert_eq!(scan_for_marker(held, m), Scan::NotYet { keep_from: held.len() });
    }

    #[test]
    fn output_full_of_separators_is_forwarded_but_the_last() {
        let held = vec![0x1eu8; 1 << 20];
        let m = marker("11111111111111111111111111111111");
        assert_eq!(scan_for_marker(&held, &m), Scan::NotYet { keep_from: held.len() - 1 });
    }
}
