//! `deltabox`: the daemon, the per-sandbox shim and the command-line client in one binary.

mod shim;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "deltabox", version, about = "Sandboxes for AI agents with millisecond checkpoint and rollback")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Internal: supervise one sandbox (started by the daemon).
    #[command(hide = true)]
    Shim,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Shim => {
            init_logging();
            shim::main()
        }
    };
    if let Err(e) = result {
        eprintln!("deltabox: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("DELTABOX_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}
