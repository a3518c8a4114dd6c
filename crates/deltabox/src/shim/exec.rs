//! Running one command for a client: stdio relay, output caps, timeout, OOM detection.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use sandbox::ipc::{AsyncChannel, IpcError, Packet};
use sandbox::spec::{ExitStatus, ProcessSpec};
use tokio::sync::mpsc;

use super::fdio::{pipe, AsyncFile};
use super::init_link::InitError;
use super::proto::{ErrorKind, ExecRequest, Input, Outcome, Reply, Stream};
use super::Shim;

/// How long output is still collected after the command exited while something else (a background
/// child) keeps its output pipe open.
const LINGER: Duration = Duration::from_millis(20);
/// Largest output chunk per packet.
const CHUNK: usize = 64 * 1024;

/// One output stream of the command, with its cap.
pub struct Output {
    pub file: AsyncFile,
    pub stream: Stream,
    pub kept: u64,
    pub dropped: u64,
    pub eof: bool,
}

impl Output {
    pub fn new(fd: OwnedFd, stream: Stream) -> std::io::Result<Output> {
        Ok(Output { file: AsyncFile::new(fd)?, stream, kept: 0, dropped: 0, eof: false })
    }

    /// Forwards `data` to the client, keeping at most `max` bytes in total.
    pub async fn forward(&mut self, conn: &AsyncChannel, data: &[u8], max: u64) -> Result<(), IpcError> {
        let room = max.saturating_sub(self.kept).min(data.len() as u64) as usize;
        self.dropped += (data.len() - room) as u64;
        self.kept += room as u64;
        for chunk in data[..room].chunks(CHUNK) {
            conn.send(&Reply::Output { stream: self.stream }, chunk, &[]).await?;
        }
        Ok(())
    }

    /// After the command ended: relay what is left, until end of file or until the stream has been quiet
    /// for [`LINGER`]; then keep draining it in the background so a writer that outlives the command
    /// never gets SIGPIPE.
    pub async fn finish(mut self, conn: &AsyncChannel, max: u64) -> Result<(u64, u64), IpcError> {
        let mut buf = vec![0u8; CHUNK];
        while !self.eof {
            match tokio::time::timeout(LINGER, self.file.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => self.eof = true,
                Ok(Ok(n)) => self.forward(conn, &buf[..n], max).await?,
                Err(_quiet) => {
                    let file = self.file;
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; CHUNK];
                        while let Ok(n) = file.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                        }
                    });
                    return Ok((self.kept, self.dropped));
                }
            }
        }
        Ok((self.kept, self.dropped))
    }
}

/// Merges the sandbox's default environment with `extra` (later entries replace earlier ones).
pub fn merged_env(defaults: &[String], extra: &[String], hostname: &str, tty: bool) -> Vec<String> {
    let mut env: Vec<String> = Vec::new();
    let mut set = |kv: &str| {
        let key = kv.split('=').next().unwrap_or(kv);
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(kv.to_string());
    };
    set("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    set(&format!("HOSTNAME={hostname}"));
    if tty {
        set("TERM=xterm");
    }
    defaults.iter().chain(extra).for_each(|kv| set(kv));
    env
}

fn error_reply(e: &InitError) -> Reply {
    match e {
        InitError::StartFailed(message) => Reply::Error { kind: ErrorKind::StartFailed, message: message.clone() },
        InitError::Lost(_) => Reply::Error { kind: ErrorKind::Internal, message: e.to_string() },
    }
}

/// Serves one `Exec` request on `conn`.
pub async fn serve(shim: &Shim, conn: &AsyncChannel, req: ExecRequest) -> Result<(), IpcError> {
    if req.argv.is_empty() {
        let message = "the command is empty".to_string();
        return conn.send(&Reply::Error { kind: ErrorKind::BadRequest, message }, &[], &[]).await;
    }
    if req.timeout_ms == Some(0) {
        let message = "timeout must be greater than zero".to_string();
        return conn.send(&Reply::Error { kind: ErrorKind::BadRequest, message }, &[], &[]).await;
    }
    let spec = ProcessSpec {
        argv: req.argv.clone(),
        env: merged_env(&shim.defaults.env, &req.env, &shim.id, req.tty.is_some()),
        cwd: req.cwd.clone().unwrap_or_else(|| shim.defaults.cwd.clone()),
        user: req.user.clone().or_else(|| shim.defaults.user.clone()),
        tty: req.tty,
        extra_fds: vec![],
    };
    let oom_before = shim.oom_kills();
    let started = Instant::now();
    let (spawned, stdin, outputs) = match req.tty {
        Some(_) => match shim.spawn_process(spec, &[]).await {
            Ok(mut s) => {
                let master = s.pty_master.take().expect("init sends a pty master with a tty spawn");
                let out =
                    Output::new(master.try_clone().map_err(IpcError::Io)?, Stream::Stdout).map_err(IpcError::Io)?;
                (s, Some(master), vec![out])
            }
            Err(e) => return conn.send(&error_reply(&e), &[], &[]).await,
        },
        None => {
            let (out_r, out_w) = pipe().map_err(IpcError::Io)?;
            let (err_r, err_w) = pipe().map_err(IpcError::Io)?;
            let (in_r, in_w) = if req.stdin {
                let (r, w) = pipe().map_err(IpcError::Io)?;
                (r, Some(w))
            } else {
                (std::fs::File::open("/dev/null").map_err(IpcError::Io)?.into(), None)
            };
            let spawned = shim.spawn_process(spec, &[in_r.as_fd(), out_w.as_fd(), err_w.as_fd()]).await;
            drop((in_r, out_w, err_w));
            match spawned {
                Ok(s) => {
                    let outs = vec![
                        Output::new(out_r, Stream::Stdout).map_err(IpcError::Io)?,
                        Output::new(err_r, Stream::Stderr).map_err(IpcError::Io)?,
                    ];
                    (s, in_w, outs)
                }
                Err(e) => return conn.send(&error_reply(&e), &[], &[]).await,
            }
        }
    };
    conn.send(&Reply::Started { pid: spawned.pid }, &[], &[]).await?;
    let relay = Relay { shim, conn, pid: spawned.pid, max: req.max_output, tty: req.tty.is_some() };
    let (status, timed_out, outputs) = relay.run(spawned.exit, stdin, outputs, req.timeout_ms).await?;
    let mut outcome = Outcome {
        exit_code: status.code,
        signal: status.signal,
        timed_out,
        oom_killed: status.signal == Some(libc::SIGKILL) && shim.oom_kills() > oom_before,
        ..Outcome::default()
    };
    for out in outputs {
        let stream = out.stream;
        let (_, dropped) = out.finish(conn, req.max_output).await?;
        match stream {
            Stream::Stdout => outcome.stdout_dropped = dropped,
            Stream::Stderr => outcome.stderr_dropped = dropped,
        }
    }
    outcome.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    conn.send(&Reply::Exited(outcome), &[], &[]).await
}

struct Relay<'a> {
    shim: &'a Shim,
    conn: &'a AsyncChannel,
    pid: i32,
    max: u64,
    tty: bool,
}

impl Relay<'_> {
    /// Relays stdio until the process exits; kills its process group on timeout or when the client goes
    /// away. Returns its status, whether it timed out, and the outputs (to be finished by the caller).
    async fn run(
        &self,
        mut exit: tokio::sync::oneshot::Receiver<ExitStatus>,
        stdin: Option<OwnedFd>,
        mut outputs: Vec<Output>,
        timeout_ms: Option<u64>,
    ) -> Result<(ExitStatus, bool, Vec<Output>), IpcError> {
        let stdin_tx = match stdin {
            Some(fd) => Some(spawn_stdin_writer(fd, self.tty).map_err(IpcError::Io)?),
            None => None,
        };
        let mut stdin_tx = stdin_tx;
        let deadline = timeout_ms.map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
        let mut timed_out = false;
        let mut client_gone = false;
        let mut bufs = vec![vec![0u8; CHUNK]; outputs.len()];
        loop {
            let (first, rest) = outputs.split_at_mut(1);
            let (buf0, buf1) = bufs.split_at_mut(1);
            tokio::select! {
                status = &mut exit => {
                    let status = status.map_err(|_| IpcError::Closed)?;
                    return Ok((status, timed_out, outputs));
                }
                n = first[0].file.read(&mut buf0[0]), if !first[0].eof => {
                    match n {
                        Ok(0) | Err(_) => first[0].eof = true,
                        Ok(n) => first[0].forward(self.conn, &buf0[0][..n], self.max).await?,
                    }
                }
                n = async { rest[0].file.read(&mut buf1[0]).await }, if rest.first().is_some_and(|o| !o.eof) => {
                    match n {
                        Ok(0) | Err(_) => rest[0].eof = true,
                        Ok(n) => rest[0].forward(self.conn, &buf1[0][..n], self.max).await?,
                    }
                }
                input = self.conn.recv::<Input>(), if !client_gone => match input {
                    Ok(Packet { msg: Input::Stdin, payload, .. }) => {
                        if let Some(tx) = &stdin_tx {
                            let _ = tx.send(payload).await;
                        }
                    }
                    Ok(Packet { msg: Input::StdinEof, .. }) => stdin_tx = None,
                    Ok(Packet { msg: Input::Resize(size), .. }) => {
                        if let Some(out) = outputs.first() {
                            let ws = rustix::termios::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
                            let _ = rustix::termios::tcsetwinsize(out.file.as_fd(), ws);
                        }
                    }
                    Ok(Packet { msg: Input::Signal(sig), .. }) => {
                        let _ = self.shim.init.signal(self.pid, sig, true).await;
                    }
                    Err(_) => {
                        // Nobody will read the result: do not leave the command running unattended.
                        client_gone = true;
                        let _ = self.shim.init.signal(self.pid, libc::SIGKILL, true).await;
                    }
                },
                _ = sleep_until(deadline), if !timed_out => {
                    timed_out = true;
                    let _ = self.shim.init.signal(self.pid, libc::SIGKILL, true).await;
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Writes client stdin to the process from its own task, so a process that does not read its stdin
/// cannot stall the relay. Dropping the sender closes stdin (a tty gets ^D instead).
fn spawn_stdin_writer(fd: OwnedFd, tty: bool) -> std::io::Result<mpsc::Sender<Vec<u8>>> {
    let file = AsyncFile::new(fd)?;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    tokio::spawn(async move {
        while let Some(data) = rx.recv().await {
            if file.write_all(&data).await.is_err() {
                return;
            }
        }
        if tty {
            let _ = file.write_all(&[4]).await;
        }
    });
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_merging_replaces_keys_in_order() {
        let env = merged_env(&["PATH=/img".into(), "A=1".into()], &["A=2".into(), "B=3".into()], "box", false);
        assert_eq!(env, ["HOSTNAME=box", "PATH=/img", "A=2", "B=3"]);
        let env = merged_env(&[], &[], "box", true);
        assert!(env.contains(&"TERM=xterm".to_string()));
    }
}
