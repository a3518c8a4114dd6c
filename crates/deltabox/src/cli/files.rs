//! `deltabox cp` and `deltabox files ...`.

use std::io::Read;
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
            let mut data = client.get_reader(&format!("/v1/sandboxes/{id}/files?path={}", q(&path))).await?;
            let mut out = tokio::io::stdout();
            tokio::io::copy(&mut data, &mut out).await.context("write the file to stdout")?;
            tokio::io::AsyncWriteExt::flush(&mut out).await?;
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
pub async fn cp(client: &Client, src: &str, dst: &str, limits: DownloadLimits) -> anyhow::Result<()> {
    match (remote(src), remote(dst)) {
        (None, Some((id, dst))) => upload(client, Path::new(src), id, dst).await,
        (Some((id, src)), None) => download(client, id, src, Path::new(dst), limits).await,
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

/// What a copy out of a sandbox may write on this machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct DownloadLimits {
    /// Most bytes of file data written (holes do not count).
    pub max_size: Option<u64>,
    /// Refuse symlinks that are absolute or climb out of the destination.
    pub no_outside_links: bool,
}

async fn download(client: &Client, id: &str, src: &str, dst: &Path, limits: DownloadLimits) -> anyhow::Result<()> {
    let stat = remote_stat(client, id, src).await?.with_context(|| format!("{src}: no such file or directory"))?;
    let is_dir = stat["kind"].as_str() == Some("dir");
    let name = stat["name"].as_str().filter(|n| *n != "/");
    let into_existing_dir = dst.is_dir();
    if is_dir && dst.exists() && !into_existing_dir {
        anyhow::bail!("cannot copy directory {src} onto non-directory {}", dst.display());
    }
    // A directory's archive holds its contents, a file's archive the file by name.
    let target = match (is_dir, name) {
        (true, Some(name)) if into_existing_dir => Target::Into(dst.join(name)),
        (true, _) => Target::Into(dst.to_path_buf()),
        (false, _) if into_existing_dir => Target::Into(dst.to_path_buf()),
        (false, _) => Target::File(dst.to_path_buf()),
    };
    // The archive streams into the files as it arrives (bounded memory; sparse entries stay sparse).
    let archive = tokio_util::io::SyncIoBridge::new(
        client.get_reader(&format!("/v1/sandboxes/{id}/files/tar?path={}", q(src))).await?,
    );
    tokio::task::spawn_blocking(move || unpack(archive, &target, limits)).await.context("the unpacking thread")?
}

/// Where a downloaded archive goes: into a directory, or (a single file) to a path.
enum Target {
    Into(std::path::PathBuf),
    File(std::path::PathBuf),
}

fn unpack(archive: impl Read, target: &Target, limits: DownloadLimits) -> anyhow::Result<()> {
    let mut archive = tar::Archive::new(archive);
    let mut written = 0u64;
    let mut admit = |entry: &tar::Entry<'_, _>, dest: &Path| -> anyhow::Result<()> {
        let name = entry.path()?.into_owned();
        written += entry.header().entry_size()?;
        if let Some(max) = limits.max_size.filter(|max| written > *max) {
            anyhow::bail!("{}: copying it would write more than --max-size ({max} bytes); stopped", name.display());
        }
        if limits.no_outside_links && entry.header().entry_type() == tar::EntryType::Symlink {
            let link = entry.link_name()?.unwrap_or_default().into_owned();
            if !stays_inside(&name, &link) {
                anyhow::bail!(
                    "{}: symlink to {} points outside {} (--no-outside-links)",
                    name.display(),
                    link.display(),
                    dest.display()
                );
            }
        }
        Ok(())
    };
    match target {
        Target::File(path) => {
            let mut entries = archive.entries()?;
            let mut entry = entries.next().context("the sandbox sent an empty archive")??;
            admit(&entry, path.parent().unwrap_or(Path::new(".")))?;
            entry.unpack(path).with_context(|| format!("write {}", path.display()))?;
        }
        Target::Into(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            // Directories last, deepest first (as tar's own unpack): a read-only one must not stop its contents.
            let mut directories = Vec::new();
            for entry in archive.entries()? {
                let mut entry = entry?;
                admit(&entry, dir)?;
                if entry.header().entry_type() == tar::EntryType::Directory {
                    directories.push(entry);
                } else {
                    entry.unpack_in(dir).with_context(|| format!("unpack into {}", dir.display()))?;
                }
            }
            directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
            for mut entry in directories {
                entry.unpack_in(dir).with_context(|| format!("unpack into {}", dir.display()))?;
            }
        }
    }
    Ok(())
}

/// Whether symlink `name` (relative to the destination) with target `link` resolves inside the destination,
/// lexically.
fn stays_inside(name: &Path, link: &Path) -> bool {
    use std::path::Component;
    if link.is_absolute() {
        return false;
    }
    let mut depth: i64 =
        name.parent().map_or(0, |p| p.components().filter(|c| matches!(c, Component::Normal(_))).count() as i64);
    for c in link.components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    true
}
