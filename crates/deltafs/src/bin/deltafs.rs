//! `deltafs`: mount a DeltaFS stack in the foreground (for conformance runs, benchmarks and
//! debugging), or collect garbage in a store. The sandbox engine links the library instead.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use deltafs::{mount, MountOptions, Quota, StackId, Store};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signalfd::SignalFd;

#[derive(Parser)]
#[command(about = "DeltaFS layered filesystem tool")]
struct Cli {
    /// Store directory.
    #[arg(long)]
    store: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount image layers (bottom first) or a stack; serve until SIGINT/SIGTERM (then unmount) or until
    /// unmounted from outside.
    Mount {
        /// Image layer directory (repeatable, bottom first).
        #[arg(long = "layer")]
        layers: Vec<PathBuf>,
        /// Stack id to mount instead of image layers.
        #[arg(long)]
        stack: Option<StackId>,
        /// Threads serving FUSE requests.
        #[arg(long, default_value_t = MountOptions::default().threads)]
        threads: usize,
        /// File listing the processes that use the mount (e.g. a cgroup's cgroup.procs): opens
        /// then need no FUSE request (see `MountOptions::processes`).
        #[arg(long)]
        processes: Option<PathBuf>,
        /// Busy-poll window in microseconds (0: never poll; see `MountOptions::busy_poll`).
        #[arg(long, default_value_t = default_busy_poll_us())]
        busy_poll_us: u64,
        /// Size of the filesystem in bytes (see `Quota::bytes`).
        #[arg(long)]
        quota_bytes: Option<u64>,
        /// Number of inodes of the filesystem.
        #[arg(long)]
        quota_inodes: Option<u64>,
        mountpoint: PathBuf,
    },
    /// Delete every layer not needed by the given stacks or a live mount.
    Gc { keep: Vec<StackId> },
    /// Show the layers of a stack, top first.
    Show { stack: StackId },
}

fn default_busy_poll_us() -> u64 {
    MountOptions::default().busy_poll.map_or(0, |w| w.as_micros() as u64)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let store = Store::open(&cli.store).context("opening the store")?;
    match cli.cmd {
        Cmd::Mount { layers, stack, threads, processes, busy_poll_us, quota_bytes, quota_inodes, mountpoint } => {
            let stack = match stack {
                Some(s) => s,
                None => store.base_stack(&layers).context("indexing image layers")?,
            };
            let mut signals = nix::sys::signal::SigSet::empty();
            signals.add(nix::sys::signal::Signal::SIGINT);
            signals.add(nix::sys::signal::Signal::SIGTERM);
            // Blocked before the server threads start, so they inherit the mask and only
            // the signalfd below receives the signal.
            signals.thread_block().context("blocking signals")?;
            let busy_poll = (busy_poll_us > 0).then(|| Duration::from_micros(busy_poll_us));
            let quota = Quota { bytes: quota_bytes, inodes: quota_inodes };
            let opts = MountOptions { threads, processes, busy_poll, quota, ..MountOptions::default() };
            let m = mount(&store, stack, &mountpoint, &opts).context("mounting")?;
            println!("mounted {stack} at {}", mountpoint.display());
            let signal_fd = SignalFd::new(&signals).context("receiving signals")?;
            loop {
                let mut fds = [PollFd::new(signal_fd.as_fd(), PollFlags::POLLIN)];
                if poll(&mut fds, PollTimeout::from(100u8)).context("waiting for a signal")? > 0 {
                    let sig = signal_fd.read_signal().context("reading the signal")?.map(|s| s.ssi_signo);
                    eprintln!("signal {}: unmounting", sig.unwrap_or_default());
                    break;
                }
                if !m.is_served() {
                    eprintln!("unmounted from outside (or the connection was aborted): exiting");
                    break;
                }
            }
            m.unmount().context("unmounting")?;
        }
        Cmd::Show { stack } => {
            for layer in store.describe(stack).context("reading the stack")? {
                println!(
                    "{} frozen={} indexed={} records={} data_bytes={}{}",
                    layer.id,
                    layer.frozen,
                    layer.indexed,
                    layer.records,
                    layer.data_bytes,
                    if layer.images.is_empty() { String::new() } else { format!(" images={:?}", layer.images) }
                );
            }
        }
        Cmd::Gc { keep } => {
            let stats = store.delete_unreferenced(&keep).context("collecting garbage")?;
            println!(
                "deleted {} layers, kept {}, freed {} bytes of deleted checkpoints in kept layers",
                stats.layers_deleted, stats.layers_kept, stats.bytes_reclaimed
            );
        }
    }
    Ok(())
}
