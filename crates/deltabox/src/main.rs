//! `deltabox`: the daemon, the per-sandbox shim and the command-line client in one binary.

mod api;
mod catalog;
mod cli;
mod client;
mod daemon;
mod errors;
mod ids;
mod shim;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "deltabox", version, about = "Sandboxes for AI agents with millisecond checkpoint and rollback")]
struct Cli {
    /// The daemon's socket.
    #[arg(long, global = true, env = "DELTABOX_SOCKET", default_value = client::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// Where the daemon keeps images, sandboxes and its catalog.
        #[arg(long, env = "DELTABOX_DATA_DIR", default_value = "/var/lib/deltabox")]
        data_dir: PathBuf,
        /// Also serve the API on this TCP address (needs a token).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Bearer token for the TCP listener.
        #[arg(long, env = "DELTABOX_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Host-wide directory of uid range locks (shared by all daemons on the host).
        #[arg(long, default_value = sandbox::userns::DEFAULT_SLOT_DIR)]
        uid_slot_dir: PathBuf,
        /// Busy polling of each sandbox's filesystem device during bursts of requests, in µs: requests
        /// closer than this make the sandbox's shim spin a CPU for up to this long instead of sleeping
        /// (faster file operations; the CPU is not counted to the sandbox's limit). 0 turns it off.
        #[arg(long, default_value_t = 100)]
        fs_busy_poll_us: u64,
        /// Filesystem size of sandboxes created without one (e.g. 10G; the image's files count).
        #[arg(long, value_parser = api::parse_size)]
        default_disk: Option<u64>,
        /// Number of files (inodes) of sandboxes created without such a limit.
        #[arg(long)]
        default_inodes: Option<u64>,
        /// Processes and threads a sandbox created without a pids limit may have (one fork bomb must not
        /// take the host's pids, the daemon's included). 0: unlimited.
        #[arg(long, default_value_t = daemon::DEFAULT_PIDS)]
        default_pids: u64,
        /// Memory of a sandbox created without a memory limit (e.g. 4G). Default: half of the host's
        /// memory. 0: unlimited.
        #[arg(long, value_parser = api::parse_size)]
        default_memory: Option<u64>,
        /// CPUs a sandbox created without a cpus limit may use (e.g. 1.5). Default: all of the host's.
        /// 0: unlimited.
        #[arg(long)]
        default_cpus: Option<f64>,
        /// Most memory the in-memory copies of checkpoints (templates, for fast rollbacks) may hold in all
        /// sandboxes together, e.g. 4G; also the budget of each sandbox created without its own. The least
        /// recently used are dropped first (their rollbacks then restore from disk). Default: a quarter of
        /// the host's memory.
        #[arg(long, value_parser = api::parse_size)]
        template_memory: Option<u64>,
        /// Let sandboxes use the host's own network namespace (`network: host`). Unsafe: such a sandbox
        /// reaches the host's loopback services (this daemon's TCP listener too), other sandboxes and
        /// cloud metadata addresses. Without it, only `none` and `nat` are allowed.
        #[arg(long)]
        allow_host_network: bool,
        /// IPv4 subnet the `nat` network's sandboxes get their addresses from (a /30 each). Use the same
        /// on every daemon of a host.
        #[arg(long, default_value = daemon::network::DEFAULT_SUBNET)]
        nat_subnet: ipnet::Ipv4Net,
        /// Host-wide directory of `nat` address locks (shared by all daemons on the host).
        #[arg(long, default_value = daemon::network::DEFAULT_SLOT_DIR)]
        nat_slot_dir: PathBuf,
        /// DNS server (ADDRESS or ADDRESS:PORT) that `nat` sandboxes' queries go to; repeatable. Default:
        /// the nameservers of the host's /etc/resolv.conf.
        #[arg(long = "dns", value_parser = parse_dns)]
        dns: Vec<SocketAddr>,
    },
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Create a sandbox and print its id.
    Create(cli::CreateArgs),
    /// List sandboxes.
    Ls {
        /// Only print ids.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove sandboxes (kills everything in them). Their checkpoints go too, unless another sandbox
    /// still uses them.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Keep all their checkpoints (to fork them later).
        #[arg(long)]
        keep_checkpoints: bool,
    },
    /// Checkpoint a sandbox's files and processes (`checkpoint ID [--fs-only]`), or delete checkpoints
    /// (`checkpoint rm CK...`).
    Checkpoint(cli::checkpoint::CheckpointArgs),
    /// Roll a sandbox back to one of its checkpoints.
    Rollback { id: String, checkpoint: String },
    /// Start new sandboxes from a checkpoint; prints their ids.
    Fork {
        checkpoint: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// List a sandbox's checkpoints with their parents.
    Checkpoints { id: String },
    /// Run a command in a sandbox.
    Exec(cli::ExecArgs),
    /// Open an interactive shell in a sandbox.
    Shell { id: String },
    /// Copy files between the local machine and a sandbox (`ID:/path` names the sandbox side), as `cp -r`:
    /// into DST when it is a directory, else to the path DST.
    Cp {
        src: String,
        dst: String,
        /// From a sandbox: stop with an error before a file would bring the bytes written past this size
        /// (e.g. 2G; holes do not count). Files written until then stay.
        #[arg(long, value_parser = api::parse_size)]
        max_size: Option<u64>,
        /// From a sandbox: refuse symlinks that are absolute or point outside the destination (by default
        /// they are created as they are, as `docker cp` does: such a link names a file of this machine).
        #[arg(long)]
        no_outside_links: bool,
    },
    /// Read, write and inspect files in a sandbox.
    #[command(subcommand)]
    Files(cli::files::FilesCommand),
    /// Persistent shell sessions.
    #[command(subcommand)]
    Session(SessionCommand),
    /// A sandbox's network and egress policy.
    #[command(subcommand)]
    Network(cli::network::NetworkCommand),
    /// Ports of sandboxes (nat network) published on the host.
    #[command(subcommand)]
    Port(cli::network::PortCommand),
    /// Import the test image if needed, create a sandbox, run a few commands, show what happened.
    Demo(cli::DemoArgs),
    /// Internal: supervise one sandbox (started by the daemon).
    #[command(hide = true)]
    Shim,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Import an OCI layout, a `docker save` tarball, or a rootfs directory/tarball.
    Import {
        path: String,
        #[arg(long)]
        name: String,
    },
    /// List images.
    Ls,
    /// Remove images.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum SessionCommand {
    /// Start a named bash session.
    Create { id: String, name: String },
    /// Run a command string in a session (cwd, variables, functions and jobs persist).
    Run(SessionRunArgs),
    /// List a sandbox's sessions.
    Ls { id: String },
    /// End a session.
    Rm { id: String, name: String },
}

#[derive(Args)]
struct SessionRunArgs {
    id: String,
    name: String,
    /// The command line, as typed at a bash prompt.
    command: String,
    /// Seconds after which the command is interrupted (^C); the session survives.
    #[arg(long)]
    timeout: Option<f64>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Shim => {
            init_logging();
            shim::main().map(|()| 0)
        }
        command => runtime().and_then(|rt| {
            let result = rt.block_on(run(cli.socket, command));
            // A pending read of our stdin (a blocking thread) must not hold the exit.
            rt.shutdown_background();
            result
        }),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("deltabox: {e:#}");
            std::process::exit(1);
        }
    }
}

/// `ADDRESS` (port 53) or `ADDRESS:PORT`.
fn parse_dns(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{s:?} is not an address or address:port"))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

async fn run(socket: PathBuf, command: Command) -> anyhow::Result<i32> {
    let client = client::Client::new(socket.clone());
    match command {
        Command::Serve {
            data_dir,
            listen,
            token,
            uid_slot_dir,
            fs_busy_poll_us,
            default_disk,
            default_inodes,
            default_pids,
            default_memory,
            default_cpus,
            template_memory,
            allow_host_network,
            nat_subnet,
            nat_slot_dir,
            dns,
        } => {
            init_logging();
            let fs_busy_poll = (fs_busy_poll_us > 0).then(|| Duration::from_micros(fs_busy_poll_us));
            let default_disk = deltafs::Quota { bytes: default_disk, inodes: default_inodes };
            let default_limits = daemon::default_limits(default_pids, default_memory, default_cpus)?;
            let opts = daemon::ServeOptions {
                socket,
                data_dir,
                uid_slot_dir,
                fs_busy_poll,
                default_disk,
                default_limits,
                template_memory: template_memory.unwrap_or_else(daemon::default_template_memory),
                listen,
                token,
                nat: daemon::network::NatOptions { subnet: nat_subnet.trunc(), slot_dir: nat_slot_dir, dns },
                allow_host_network,
            };
            daemon::serve(opts).await.map(|()| 0)
        }
        Command::Image(ImageCommand::Import { path, name }) => {
            cli::image_import(&client, &path, &name).await.map(|()| 0)
        }
        Command::Image(ImageCommand::Ls) => cli::image_ls(&client).await.map(|()| 0),
        Command::Image(ImageCommand::Rm { names }) => cli::image_rm(&client, &names).await.map(|()| 0),
        Command::Create(args) => cli::create(&client, args).await.map(|()| 0),
        Command::Ls { quiet } => cli::ls(&client, quiet).await.map(|()| 0),
        Command::Rm { ids, keep_checkpoints } => cli::rm(&client, &ids, keep_checkpoints).await.map(|()| 0),
        Command::Checkpoint(args) => cli::checkpoint::checkpoint(&client, args).await.map(|()| 0),
        Command::Rollback { id, checkpoint } => cli::checkpoint::rollback(&client, &id, &checkpoint).await.map(|()| 0),
        Command::Fork { checkpoint, count } => cli::checkpoint::fork(&client, &checkpoint, count).await.map(|()| 0),
        Command::Network(command) => cli::network::network(&client, command).await.map(|()| 0),
        Command::Port(command) => cli::network::port(&client, command).await.map(|()| 0),
        Command::Checkpoints { id } => cli::checkpoint::list(&client, &id).await.map(|()| 0),
        Command::Exec(args) => cli::exec(&client, args).await,
        Command::Shell { id } => cli::shell(&client, &id).await,
        Command::Session(SessionCommand::Create { id, name }) => {
            cli::session_create(&client, &id, &name).await.map(|()| 0)
        }
        Command::Session(SessionCommand::Run(a)) => {
            cli::session_run(&client, &a.id, &a.name, &a.command, a.timeout).await
        }
        Command::Session(SessionCommand::Ls { id }) => cli::session_ls(&client, &id).await.map(|()| 0),
        Command::Session(SessionCommand::Rm { id, name }) => cli::session_rm(&client, &id, &name).await.map(|()| 0),
        Command::Cp { src, dst, max_size, no_outside_links } => {
            let limits = cli::files::DownloadLimits { max_size, no_outside_links };
            cli::files::cp(&client, &src, &dst, limits).await.map(|()| 0)
        }
        Command::Files(command) => cli::files::run(&client, command).await.map(|()| 0),
        Command::Demo(args) => cli::demo(&client, args).await.map(|()| 0),
        Command::Shim => unreachable!("handled before the runtime starts"),
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("DELTABOX_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}
