//! The client subcommands.

pub mod checkpoint;
mod demo;
pub mod files;
pub mod network;
mod terminal;

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::Context;
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;

use crate::api::*;
use crate::client::Client;

pub use demo::{demo, DemoArgs};

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long)]
    pub image: String,
    /// Memory limit, e.g. 512M or 2G.
    #[arg(long)]
    pub memory: Option<String>,
    /// Maximum number of processes and threads.
    #[arg(long)]
    pub pids: Option<u64>,
    /// CPU limit as a number of CPUs, e.g. 1 or 0.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Size of the sandbox's filesystem (the image's files count), e.g. 10G.
    #[arg(long)]
    pub disk: Option<String>,
    /// Number of files (inodes) of the sandbox's filesystem.
    #[arg(long)]
    pub inodes: Option<u64>,
    /// Most memory the in-memory copies of its checkpoints may hold, e.g. 1G (the least recently used are
    /// dropped; their rollbacks then restore from disk). Default: the daemon's --template-memory.
    #[arg(long)]
    pub template_memory: Option<String>,
    /// none (loopback only), nat (its own address, the outside through NAT) or host (the host's own
    /// network; only if the daemon allows it).
    #[arg(long, default_value = "none")]
    pub network: String,
    /// With --network nat: an address, CIDR or host name (`pypi.org`, `*.github.com`) the sandbox may
    /// reach even if denied or private (repeatable).
    #[arg(long)]
    pub allow_out: Vec<String>,
    /// With --network nat: an address, CIDR or host name the sandbox may not reach (repeatable; 0.0.0.0/0
    /// denies everything --allow-out does not allow).
    #[arg(long)]
    pub deny_out: Vec<String>,
    /// Environment for every process, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
}

#[derive(Args)]
pub struct ExecArgs {
    pub id: String,
    /// Kill the command's process group after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Working directory inside the sandbox.
    #[arg(long)]
    pub cwd: Option<String>,
    /// KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    /// user, uid, user:group or uid:gid.
    #[arg(long, short = 'u')]
    pub user: Option<String>,
    /// Allocate a pseudo-terminal.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Keep stdin open even when it is a terminal.
    #[arg(long, short = 'i')]
    pub interactive: bool,
    #[arg(last = true, required = true)]
    pub cmd: Vec<String>,
}

fn env_map(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--env {p:?}: expected KEY=VALUE"))
        })
        .collect()
}

pub async fn image_import(client: &Client, path: &str, name: &str) -> anyhow::Result<()> {
    let path = match std::path::Path::new(path).canonicalize() {
        Ok(p) => p.to_string_lossy().into_owned(),
        // Maybe PATH:REF, or the daemon's host sees something we do not: let it decide.
        Err(_) => path.to_string(),
    };
    let mut stream =
        client.stream(Method::POST, "/v1/images/import", &ImportRequest { path, name: name.into() }).await?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    while let Some(line) = stream.next_line().await? {
        match serde_json::from_str::<ImportEvent>(&line).with_context(|| format!("bad event {line:?}"))? {
            ImportEvent::Progress { stage, done_bytes, total_bytes } => {
                bar.set_length(total_bytes);
                bar.set_position(done_bytes);
                bar.set_message(stage);
            }
            ImportEvent::Done { image } => {
                bar.finish_and_clear();
                println!("{}", image.name);
                eprintln!("imported {} ({} layers, {})", image.name, image.layers.len(), human_bytes(image.size));
                return Ok(());
            }
            ImportEvent::Error { error, message } => {
                bar.abandon();
                anyhow::bail!("{message} ({error})");
            }
        }
    }
    anyhow::bail!("the daemon ended the import without a result")
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn age(created: i64) -> String {
    let secs = (crate::daemon::engine::now() - created).max(0);
    match secs {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}

pub async fn image_ls(client: &Client) -> anyhow::Result<()> {
    let list: serde_json::Value = client.json(Method::GET, "/v1/images", None::<&()>).await?;
    let images: Vec<ImageView> = serde_json::from_value(list["images"].clone())?;
    println!("{:<24} {:>7} {:>10} {:<13} CREATED", "NAME", "LAYERS", "SIZE", "FORMAT");
    for i in images {
        println!(
            "{:<24} {:>7} {:>10} {:<13} {}",
            i.name,
            i.layers.len(),
            human_bytes(i.size),
            i.format,
            age(i.created)
        );
    }
    Ok(())
}

pub async fn image_rm(client: &Client, names: &[String]) -> anyhow::Result<()> {
    for name in names {
        client.json::<serde_json::Value>(Method::DELETE, &format!("/v1/images/{name}"), None::<&()>).await?;
        println!("{name}");
    }
    Ok(())
}

pub async fn create(client: &Client, args: CreateArgs) -> anyhow::Result<()> {
    let network = match args.network.as_str() {
        "none" => sandbox::spec::Network::None,
        "nat" => sandbox::spec::Network::Nat,
        "host" => sandbox::spec::Network::Host,
        other => anyhow::bail!("--network {other:?}: use none, nat or host"),
    };
    let egress = network::egress_policy(&args.allow_out, &args.deny_out)?;
    let memory = args.memory.as_deref().map(parse_size).transpose().map_err(anyhow::Error::msg)?;
    let disk = args.disk.as_deref().map(parse_size).transpose().map_err(anyhow::Error::msg)?;
    let template_memory = args.template_memory.as_deref().map(parse_size).transpose().map_err(anyhow::Error::msg)?;
    let req = CreateRequest {
        image: args.image,
        memory,
        pids: args.pids,
        cpus: args.cpus,
        disk,
        inodes: args.inodes,
        template_memory,
        network,
        egress,
        env: env_map(&args.env)?,
    };
    let created: SandboxView = client.json(Method::POST, "/v1/sandboxes", Some(&req)).await?;
    println!("{}", created.id);
    Ok(())
}

pub async fn ls(client: &Client, quiet: bool) -> anyhow::Result<()> {
    let list: serde_json::Value = client.json(Method::GET, "/v1/sandboxes", None::<&()>).await?;
    let sandboxes: Vec<SandboxView> = serde_json::from_value(list["sandboxes"].clone())?;
    if quiet {
        sandboxes.iter().for_each(|s| println!("{}", s.id));
        return Ok(());
    }
    println!(
        "{:<14} {:<20} {:<9} {:<8} {:>9} {:>6} {:>5} {:>9} CREATED",
        "ID", "IMAGE", "STATE", "NETWORK", "MEMORY", "PIDS", "CPUS", "DISK"
    );
    for s in sandboxes {
        let dash = || "-".to_string();
        println!(
            "{:<14} {:<20} {:<9} {:<8} {:>9} {:>6} {:>5} {:>9} {}",
            s.id,
            s.image,
            s.state,
            format!("{:?}", s.network).to_lowercase(),
            s.memory.map_or_else(dash, human_bytes),
            s.pids.map_or_else(dash, |p| p.to_string()),
            s.cpus.map_or_else(dash, |c| c.to_string()),
            s.disk.map_or_else(dash, human_bytes),
            age(s.created)
        );
    }
    Ok(())
}

pub async fn rm(client: &Client, ids: &[String], keep_checkpoints: bool) -> anyhow::Result<()> {
    let mut failed = 0;
    for id in ids {
        let url = format!("/v1/sandboxes/{id}?keep_checkpoints={keep_checkpoints}");
        match client.json::<serde_json::Value>(Method::DELETE, &url, None::<&()>).await {
            Ok(_) => println!("{id}"),
            Err(e) => {
                eprintln!("deltabox: {id}: {e:#}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} sandbox(es) could not be removed");
    }
    Ok(())
}

/// Runs a command over the attach websocket, relaying stdio; returns its exit code.
pub async fn exec(client: &Client, args: ExecArgs) -> anyhow::Result<i32> {
    let tty = args.tty.then(terminal::size);
    let req = AttachRequest {
        cmd: args.cmd,
        env: env_map(&args.env)?,
        cwd: args.cwd,
        user: args.user,
        tty,
        timeout: args.timeout,
    };
    let stdin_is_terminal = std::io::IsTerminal::is_terminal(&std::io::stdin());
    attach(client, &args.id, req, args.interactive || !stdin_is_terminal).await
}

pub async fn shell(client: &Client, id: &str) -> anyhow::Result<i32> {
    let cmd = ["sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi"];
    let req = AttachRequest {
        cmd: cmd.map(String::from).to_vec(),
        env: BTreeMap::new(),
        cwd: None,
        user: None,
        tty: Some(terminal::size()),
        timeout: None,
    };
    attach(client, id, req, true).await
}

async fn attach(client: &Client, id: &str, req: AttachRequest, forward_stdin: bool) -> anyhow::Result<i32> {
    let timeout = req.timeout;
    let raw = match req.tty {
        Some(_) if std::io::IsTerminal::is_terminal(&std::io::stdin()) => Some(terminal::RawMode::enable()?),
        _ => None,
    };
    let ws = client.websocket(&format!("/v1/sandboxes/{id}/attach")).await?;
    let (mut sink, mut source) = ws.split();
    sink.send(Message::Text(serde_json::to_string(&req)?.into())).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(16);
    if forward_stdin {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx
                            .send(Message::Text(serde_json::to_string(&AttachControl::Eof).expect("json").into()))
                            .await;
                        return;
                    }
                    Ok(n) => {
                        let mut frame = vec![FRAME_STDIN];
                        frame.extend_from_slice(&buf[..n]);
                        if tx.send(Message::Binary(frame.into())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    } else {
        tx.send(Message::Text(serde_json::to_string(&AttachControl::Eof)?.into())).await?;
    }
    if raw.is_some() {
        terminal::forward_resizes(tx.clone());
    }
    drop(tx);
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let result = loop {
        tokio::select! {
            Some(msg) = rx.recv() => { let _ = sink.send(msg).await; }
            incoming = source.next() => match incoming {
                Some(Ok(Message::Binary(data))) => match data.first() {
                    Some(&FRAME_STDOUT) => { stdout.write_all(&data[1..])?; stdout.flush()?; }
                    Some(&FRAME_STDERR) => { stderr.write_all(&data[1..])?; stderr.flush()?; }
                    _ => {}
                },
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ExecEvent>(&text)? {
                    ExecEvent::Exit(r) => break Ok(r),
                    ExecEvent::Error { error, message } if error == "start_failed" => break Err(StartFailed(message).into()),
                    ExecEvent::Error { error, message } => break Err(anyhow::anyhow!("{message} ({error})")),
                    _ => {}
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => break Err(anyhow::Error::from(e).context("connection to the daemon lost")),
                None => break Err(anyhow::anyhow!("the daemon closed the connection before the command ended")),
            }
        }
    };
    drop(raw);
    match result {
        Ok(r) => Ok(report_exit(&r, timeout)),
        // Like a shell: the command could not be run.
        Err(e) if e.downcast_ref::<StartFailed>().is_some() => {
            eprintln!("deltabox: {e}");
            Ok(127)
        }
        Err(e) => Err(e),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct StartFailed(String);

/// Prints notes about how a command ended; returns the exit code to use (shell conventions).
fn report_exit(r: &ExecResult, timeout: Option<f64>) -> i32 {
    if r.timed_out {
        eprintln!("deltabox: timed out after {}s; the command's process group was killed", timeout.unwrap_or_default());
        return 124;
    }
    if r.oom_killed {
        eprintln!("deltabox: the command was killed by the out-of-memory killer (sandbox memory limit)");
    }
    for (name, dropped) in [("stdout", r.stdout_dropped_bytes), ("stderr", r.stderr_dropped_bytes)] {
        if dropped > 0 {
            eprintln!("deltabox: {name} was truncated: {dropped} bytes dropped");
        }
    }
    match (r.exit_code, r.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 1,
    }
}

pub async fn session_create(client: &Client, id: &str, name: &str) -> anyhow::Result<()> {
    let body = SessionCreate { name: name.into() };
    client.json::<serde_json::Value>(Method::POST, &format!("/v1/sandboxes/{id}/sessions"), Some(&body)).await?;
    println!("{name}");
    Ok(())
}

pub async fn session_run(
    client: &Client,
    id: &str,
    name: &str,
    command: &str,
    timeout: Option<f64>,
) -> anyhow::Result<i32> {
    let body = SessionRunRequest { command: command.into(), timeout, max_output_bytes: None };
    let r: ExecResult =
        client.json(Method::POST, &format!("/v1/sandboxes/{id}/sessions/{name}/run"), Some(&body)).await?;
    print!("{}", r.stdout);
    eprint!("{}", r.stderr);
    std::io::stdout().flush()?;
    if r.timed_out {
        eprintln!("deltabox: interrupted after {}s (the session is still alive)", timeout.unwrap_or_default());
        return Ok(124);
    }
    Ok(report_exit(&r, timeout))
}

pub async fn session_ls(client: &Client, id: &str) -> anyhow::Result<()> {
    let list: SessionList = client.json(Method::GET, &format!("/v1/sandboxes/{id}/sessions"), None::<&()>).await?;
    list.sessions.iter().for_each(|s| println!("{s}"));
    Ok(())
}

pub async fn session_rm(client: &Client, id: &str, name: &str) -> anyhow::Result<()> {
    client
        .json::<serde_json::Value>(Method::DELETE, &format!("/v1/sandboxes/{id}/sessions/{name}"), None::<&()>)
        .await?;
    println!("{name}");
    Ok(())
}
