//! `deltabox cp` and `deltabox files ...`.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use hyper::{Method, StatusCode};
use serde::Deserialize;

use crate::client::{Client, DaemonError};

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

/// `deltabox cp SRC DST`, one side `ID:/path`, as `cp -r`: into DST when it is an existing directory
/// (under SRC's name), else to the path DST (a file replaces a file; a directory's contents go into a
/// new directory DST). Missing parents of DST are created in the sandbox, not locally.
pub async fn cp(client: &Client, src: &str, dst: &str) -> anyhow::Result<()> {
    match (remote(src), remote(dst)) {
        (None, Some((id, dst))) => upload(client, Path::new(src), id, dst).await,
        (Some((id, src)), None) => download(client, id, src, Path::new(dst)).await,
        _ => anyhow::bail!("exactly one of SRC and DST must be a sandbox path, written ID:/path"),
    }
}

/// The `FileStat` of a sandbox path, None when it does not exist.
async fn remote_stat(client: &Client, id: &str, path: &str) -> anyhow::Result<Option<serde_json::Value>> {
    match client.json(Method::GET, &format!("/v1/sandboxes/{id}/files/stat?path={}", q(path)), None::<&()>).await {
        Ok(stat) => Ok(Some(stat)),
        Err(e)
            if e.downcast_ref::<DaemonError>()
                .is_some_and(|d| d.status == StatusCode::NOT_FOUND && d.code == "file_not_found") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn upload(client: &Client, local: &Path, id: &str, dst: &str) -> anyhow::Result<()> {
    let meta = std::fs::symlink_metadata(local).with_context(|| format!("read {}", local.display()))?;
    let dst_stat = remote_stat(client, id, dst).await?;
    // The directory to unpack into, and the name SRC gets there.
    let (dir, name) = match dst_stat.as_ref().map(|stat| stat["kind"].as_str()) {
        Some(Some("dir")) => (dst, local.file_name().context("the local source has no file name")?),
        Some(_) if meta.is_dir() => anyhow::bail!("cannot copy directory {} onto non-directory {dst}", local.display()),
        _ => {
            let (parent, name) =
                dst.rsplit_once('/').filter(|(_, n)| !n.is_empty()).context("the destination has no file name")?;
            (if parent.is_empty() { "/" } else { parent }, std::ffi::OsStr::new(name))
        }
    };
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    if meta.is_dir() { builder.append_dir_all(name, local) } else { builder.append_path_with_name(local, name) }
        .with_context(|| format!("read {}", local.display()))?;
    let archive = builder.into_inner()?;
    let url = format!("/v1/sandboxes/{id}/files/tar?path={}", q(dir));
    client.put_bytes::<serde_json::Value>(&url, archive).await?;
    Ok(())
}

async fn download(client: &Client, id: &str, src: &str, dst: &Path) -> anyhow::Result<()> {
    let stat = remote_stat(client, id, src).await?.with_context(|| format!("{src}: no such file or directory"))?;
    let is_dir = stat["kind"].as_str() == Some("dir");
    let name = stat["name"].as_str().filter(|n| *n != "/");
    let into_existing_dir = dst.is_dir();
    if is_dir && dst.exists() && !into_existing_dir {
        anyhow::bail!("cannot copy directory {src} onto non-directory {}", dst.display());
    }
    // A directory's archive holds its contents, a file's archive the file by name.
    let archive = client.get_bytes(&format!("/v1/sandboxes/{id}/files/tar?path={}", q(src))).await?;
    let mut archive = tar::Archive::new(&archive[..]);
    if is_dir {
        let target = match name {
            Some(name) if into_existing_dir => dst.join(name),
            _ => dst.to_path_buf(),
        };
        std::fs::create_dir_all(&target).with_context(|| format!("create {}", target.display()))?;
        return archive.unpack(&target).with_context(|| format!("unpack into {}", target.display()));
    }
    if into_existing_dir {
        return archive.unpack(dst).with_context(|| format!("unpack into {}", dst.display()));
    }
    let mut entries = archive.entries()?;
    let mut entry = entries.next().context("the sandbox sent an empty archive")??;
    entry.unpack(dst).with_context(|| format!("write {}", dst.display()))?;
    Ok(())
}
