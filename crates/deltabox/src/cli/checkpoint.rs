//! `deltabox checkpoint`, `rollback`, `fork`, `checkpoints`.

use clap::{Args, Subcommand};
use hyper::Method;

use crate::api::*;
use crate::client::Client;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    pub command: Option<CheckpointCommand>,
    /// The sandbox to checkpoint.
    pub id: Option<String>,
    /// Checkpoint only the files (processes keep running and are not captured; a rollback restarts them).
    /// By default files and processes are checkpointed together.
    #[arg(long)]
    pub fs_only: bool,
}

#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// Delete checkpoints (their data is freed once no sandbox or checkpoint needs it).
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

pub async fn checkpoint(client: &Client, args: CheckpointArgs) -> anyhow::Result<()> {
    match (args.command, args.id) {
        (Some(CheckpointCommand::Rm { ids }), _) => {
            for id in ids {
                client.json::<serde_json::Value>(Method::DELETE, &format!("/v1/checkpoints/{id}"), None::<&()>).await?;
                println!("{id}");
            }
            Ok(())
        }
        (None, Some(id)) => {
            let req = CheckpointRequest { fs_only: args.fs_only };
            let cp: CheckpointView =
                client.json(Method::POST, &format!("/v1/sandboxes/{id}/checkpoints"), Some(&req)).await?;
            println!("{}", cp.id);
            eprintln!(
                "checkpoint {} of {} ({}) in {:.2} ms; processes {}",
                cp.id,
                cp.sandbox,
                cp.covers.join(", "),
                cp.pause_ms,
                cp.processes
            );
            for c in &cp.reset_connections {
                eprintln!("reset in a rollback or fork (its peer is outside the sandbox): {c}");
            }
            Ok(())
        }
        (None, None) => anyhow::bail!("name the sandbox to checkpoint: deltabox checkpoint ID [--fs-only]"),
    }
}

pub async fn rollback(client: &Client, id: &str, checkpoint: &str) -> anyhow::Result<()> {
    let req = RollbackRequest { checkpoint: checkpoint.into() };
    let r: RollbackView = client.json(Method::POST, &format!("/v1/sandboxes/{id}/rollback"), Some(&req)).await?;
    eprintln!(
        "rolled {} back to {} ({}) in {:.2} ms; processes {}",
        r.sandbox,
        r.checkpoint,
        r.covers.join(", "),
        r.stats.pause_ms,
        r.processes
    );
    if !r.stats.sessions_closed.is_empty() {
        eprintln!("sessions ended: {}", r.stats.sessions_closed.join(", "));
    }
    Ok(())
}

pub async fn fork(client: &Client, checkpoint: &str, count: usize) -> anyhow::Result<()> {
    let req = ForkRequest { count };
    let r: serde_json::Value =
        client.json(Method::POST, &format!("/v1/checkpoints/{checkpoint}/fork"), Some(&req)).await?;
    let sandboxes: Vec<SandboxView> = serde_json::from_value(r["sandboxes"].clone())?;
    for s in sandboxes {
        println!("{}", s.id);
    }
    Ok(())
}

pub async fn list(client: &Client, id: &str) -> anyhow::Result<()> {
    let r: serde_json::Value =
        client.json(Method::GET, &format!("/v1/sandboxes/{id}/checkpoints"), None::<&()>).await?;
    let checkpoints: Vec<CheckpointView> = serde_json::from_value(r["checkpoints"].clone())?;
    println!("{:<16} {:<16} {:<11} {:>10} {:>10} {:>10} CREATED", "ID", "PARENT", "KIND", "LATENCY", "SIZE", "MEMORY");
    for c in checkpoints {
        let parent = c.parent.unwrap_or_else(|| "-".into());
        let size = c.disk_bytes.map_or_else(|| "?".into(), super::human_bytes);
        // What its in-memory copies hold (0 B: dropped, a rollback restores it from disk); - for files only.
        let memory = c.memory_bytes.map_or_else(|| "-".into(), super::human_bytes);
        let (id, kind, latency, age) = (c.id, c.kind, c.pause_ms, super::age(c.created));
        println!("{id:<16} {parent:<16} {kind:<11} {latency:>7.2} ms {size:>10} {memory:>10} {age}");
    }
    Ok(())
}
