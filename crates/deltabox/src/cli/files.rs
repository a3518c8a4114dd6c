//! `deltabox cp` and `deltabox files ...`.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use hyper::Method;
use serde::Deserialize;

use crate::client::Client;

#[derive(Subcommand)]
pub enum FilesCommand {
    /// Print a file.
    Cat { id: String, path: String },
    /// Write stdin to a file (replacing it atomically; parents are created).
    Write {
        id: String,
        path: String,
        /// Octal permission bits.
        #[arg(long, default_value = "644")]
        mode: String,
    },
    /// List a directory.
    Ls { id: String, path: String },
    /// Show a file's metadata as JSON.
    Stat { id: String, path: String },
    /// Create a directory (and its parents).
    Mkdir { id: String, path: String },
    /// Remove a file or directory.
    Rm {
        id: String,
        path: String,
        #[arg(short, long)]
        recursive: bool,
    },
}

/// Percent-encodes a query value.
fn q(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    kind: String,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    link_target: Option<String>,
}

pub async fn run(client: &Client, command: FilesCommand) -> anyhow::Result<()> {
    match command {
        FilesCommand::Cat { id, path } => {
            let data = client.get_bytes(&format!("/v1/sandboxes/{id}/files?path={}", q(&path))).await?;
            std::io::stdout().write_all(&data)?;
        }
        FilesCommand::Write { id, path, mode } => {
            let mut data = Vec::new();
            std::io::stdin().read_to_end(&mut data)?;
            let url = format!("/v1/sandboxes/{id}/files?path={}&mode={}", q(&path), q(&mode));
            client.put_bytes::<serde_json::Value>(&url, data).await?;
        }
        FilesCommand::Ls { id, path } => {
            let list: serde_json::Value = client
                .json(Method::GET, &format!("/v1/sandboxes/{id}/files/list?path={}", q(&path)), None::<&()>)
                .await?;
            let entries: Vec<Entry> = serde_json::from_value(list["entries"].clone())?;
            for e in entries {
                let target = e.link_target.map(|t| format!(" -> {t}")).unwrap_or_default();
                println!("{:<7} {:04o} {:>6} {:>6} {:>12} {}{target}", e.kind, e.mode, e.uid, e.gid, e.size, e.name);
            }
        }
        FilesCommand::Stat { id, path } => {
            let stat: serde_json::Value = client
                .json(Method::GET, &format!("/v1/sandboxes/{id}/files/stat?path={}", q(&path)), None::<&()>)
                .await?;
            println!("{}", serde_json::to_string_pretty(&stat)?);
        }
        FilesCommand::Mkdir { id, path } => {
            let url = format!("/v1/sandboxes/{id}/files/mkdir?path={}", q(&path));
            client.json::<serde_json::Value>(Method::POST, &url, None::<&()>).await?;
        }
        FilesCommand::Rm { id, path, recursive } => {
            let url = format!("/v1/sandboxes/{id}/files?path={}&recursive={recursive}", q(&path));
            client.json::<serde_json::Value>(Method::DELETE, &url, None::<&()>).await?;
        }
    }
    Ok(())
}

/// `ID:/path` → (id, path).
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    (!id.is_empty() && !id.contains('/') && path.starts_with('/')).then_some((id, path))
}

/// `deltabox cp SRC DST`: one side is `ID:/path`. A local file or directory is copied into the sandbox
/// directory DST; a sandbox path is copied into the local directory DST.
pub async fn cp(client: &Client, src: &str, dst: &str) -> anyhow::Result<()> {
    match (remote(src), remote(dst)) {
        (None, Some((id, dir))) => {
            let local = Path::new(src);
            let name = local.file_name().context("the local source has no file name")?;
            let mut builder = tar::Builder::new(Vec::new());
            builder.follow_symlinks(false);
            if local.is_dir() {
                builder.append_dir_all(name, local)
            } else {
                builder.append_path_with_name(local, name)
            }
            .with_context(|| format!("read {}", local.display()))?;
            let archive = builder.into_inner()?;
            let url = format!("/v1/sandboxes/{id}/files/tar?path={}", q(dir));
            client.put_bytes::<serde_json::Value>(&url, archive).await?;
        }
        (Some((id, path)), None) => {
            let stat: serde_json::Value = client
                .json(Method::GET, &format!("/v1/sandboxes/{id}/files/stat?path={}", q(path)), None::<&()>)
                .await?;
            // A file's archive holds it by name; a directory's holds its contents: keep its name, as `cp -r`.
            let target = match (stat["kind"].as_str(), stat["name"].as_str()) {
                (Some("dir"), Some(name)) if name != "/" => Path::new(dst).join(name),
                _ => Path::new(dst).to_path_buf(),
            };
            let archive = client.get_bytes(&format!("/v1/sandboxes/{id}/files/tar?path={}", q(path))).await?;
            std::fs::create_dir_all(&target).with_context(|| format!("create {}", target.display()))?;
            tar::Archive::new(&archive[..])
                .unpack(&target)
                .with_context(|| format!("unpack into {}", target.display()))?;
        }
        _ => anyhow::bail!("exactly one of SRC and DST must be a sandbox path, written ID:/path"),
    }
    Ok(())
}
