//! `deltabox demo`: the README's first command after setup.

use std::time::Instant;

use clap::Args;
use hyper::Method;

use crate::api::*;
use crate::client::Client;

#[derive(Args)]
pub struct DemoArgs {
    /// Image to use; imported from --image-dir if the daemon does not have it yet.
    #[arg(long, default_value = "debian")]
    pub image: String,
    /// Where `images/build.sh` put the test images.
    #[arg(long, env = "DELTABOX_IMAGES", default_value = "/var/cache/deltabox/images")]
    pub image_dir: String,
    /// Keep the sandbox instead of removing it at the end.
    #[arg(long)]
    pub keep: bool,
}

fn step(title: &str) {
    println!("\n\x1b[1m▸ {title}\x1b[0m");
}

async fn run(client: &Client, id: &str, cmd: &[&str]) -> anyhow::Result<ExecResult> {
    let req = serde_json::json!({ "cmd": cmd, "timeout": 60 });
    let started = Instant::now();
    let r: ExecResult = client.json(Method::POST, &format!("/v1/sandboxes/{id}/exec"), Some(&req)).await?;
    let shown = cmd
        .iter()
        .map(|a| if a.contains(' ') { format!("'{a}'") } else { a.to_string() })
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "  $ {shown}    \x1b[2m(exit {}, {:.1} ms)\x1b[0m",
        r.exit_code.unwrap_or(-1),
        started.elapsed().as_secs_f64() * 1e3
    );
    for line in r.stdout.lines().chain(r.stderr.lines()) {
        println!("    {line}");
    }
    Ok(r)
}

async fn session(client: &Client, id: &str, command: &str, timeout: f64) -> anyhow::Result<ExecResult> {
    let body = SessionRunRequest { command: command.into(), timeout: Some(timeout), max_output_bytes: None };
    let r: ExecResult =
        client.json(Method::POST, &format!("/v1/sandboxes/{id}/sessions/main/run"), Some(&body)).await?;
    let note = if r.timed_out { format!(", interrupted after {timeout} s") } else { String::new() };
    println!("  main$ {command}    \x1b[2m(exit {}, {:.1} ms{note})\x1b[0m", r.exit_code.unwrap_or(-1), r.duration_ms);
    for line in r.stdout.lines().chain(r.stderr.lines()) {
        println!("    {line}");
    }
    Ok(r)
}

pub async fn demo(client: &Client, args: DemoArgs) -> anyhow::Result<()> {
    client.json::<serde_json::Value>(Method::GET, "/v1/health", None::<&()>).await?;
    step(&format!("Image {:?}", args.image));
    let have = client.json::<ImageView>(Method::GET, &format!("/v1/images/{}", args.image), None::<&()>).await;
    match have {
        Ok(i) => println!("  already imported ({} layers, {})", i.layers.len(), super::human_bytes(i.size)),
        Err(_) => {
            let path = std::path::Path::new(&args.image_dir).join(&args.image);
            if !path.exists() {
                anyhow::bail!(
                    "image {:?} is not imported and {} does not exist: run ./setup.sh (it builds the test images)",
                    args.image,
                    path.display()
                );
            }
            super::image_import(client, &path.to_string_lossy(), &args.image).await?;
        }
    }

    step("Create a sandbox (own user, pid, mount, net namespaces; 1 GiB memory, 256 pids, 1 CPU, 4 GiB disk)");
    let started = Instant::now();
    let req = CreateRequest {
        image: args.image.clone(),
        memory: Some(1 << 30),
        pids: Some(256),
        cpus: Some(1.0),
        disk: Some(4 << 30),
        ..Default::default()
    };
    let sb: SandboxView = client.json(Method::POST, "/v1/sandboxes", Some(&req)).await?;
    let id = sb.id.clone();
    println!(
        "  sandbox {id} created in {:.0} ms (root inside = host uid {})",
        started.elapsed().as_secs_f64() * 1e3,
        sb.uid_base.unwrap_or(0)
    );

    let outcome = demo_steps(client, &id).await;
    if args.keep {
        println!("\nKept sandbox {id}: try `deltabox shell {id}`, then `deltabox rm {id}`.");
    } else {
        client.json::<serde_json::Value>(Method::DELETE, &format!("/v1/sandboxes/{id}"), None::<&()>).await?;
        step(&format!("Removed sandbox {id}"));
    }
    outcome
}

async fn demo_steps(client: &Client, id: &str) -> anyhow::Result<()> {
    step("Who and where are we?");
    run(client, id, &["id"]).await?;
    run(client, id, &["hostname"]).await?;
    run(client, id, &["sh", "-c", "ps -e -o pid,user,comm | head -5; ip -brief link 2>/dev/null || cat /proc/net/dev"])
        .await?;

    step("Real programs");
    run(client, id, &["python3", "-c", "import sys, math; print(sys.version.split()[0], math.factorial(20))"]).await?;
    run(
        client,
        id,
        &["sh", "-c", "git config --global user.email demo@deltabox && git config --global user.name demo && cd /root && git init -q repo && cd repo && echo hi > f && git add f && git commit -qm first && git log --oneline"],
    )
    .await?;

    step("Isolation");
    run(client, id, &["sh", "-c", "mount -t tmpfs x /mnt 2>&1; unshare -U true 2>&1; echo done"]).await?;

    step("A persistent shell session (what coding agents use)");
    let body = SessionCreate { name: "main".into() };
    client.json::<serde_json::Value>(Method::POST, &format!("/v1/sandboxes/{id}/sessions"), Some(&body)).await?;
    session(client, id, "cd /root/repo && export GREETING=hello && greet() { echo \"$GREETING from $(pwd)\"; }", 30.0)
        .await?;
    session(client, id, "greet; sleep 300 & jobs", 30.0).await?;
    session(client, id, "sleep 60", 1.0).await?;
    session(client, id, "greet; jobs", 30.0).await?;

    step("Checkpoint files and processes, break everything, roll back");
    let cp: CheckpointView = client
        .json(Method::POST, &format!("/v1/sandboxes/{id}/checkpoints"), Some(&CheckpointRequest { fs_only: false }))
        .await?;
    println!("  checkpoint {} ({}) in {:.2} ms: {}", cp.id, cp.covers.join(" + "), cp.pause_ms, cp.processes);
    session(client, id, "kill %1; cd /; GREETING=changed; unset -f greet; rm -rf /root/repo /usr/bin/python3*", 30.0)
        .await?;
    session(client, id, "jobs; echo $GREETING; ls /root; python3 -V", 30.0).await?;
    let rb: RollbackView = client
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/rollback"),
            Some(&RollbackRequest { checkpoint: cp.id.clone() }),
        )
        .await?;
    println!(
        "  rolled back in {:.2} ms: {} (sessions back: {})",
        rb.stats.pause_ms,
        rb.processes,
        rb.stats.sessions_restored.join(", ")
    );
    session(client, id, "greet; jobs; python3 -V; git log --oneline", 30.0).await?;

    step("Fork the checkpoint into 3 sandboxes that diverge");
    let started = Instant::now();
    let forked: serde_json::Value =
        client.json(Method::POST, &format!("/v1/checkpoints/{}/fork", cp.id), Some(&ForkRequest { count: 3 })).await?;
    let forks: Vec<SandboxView> = serde_json::from_value(forked["sandboxes"].clone())?;
    println!("  {} sandboxes in {:.0} ms", forks.len(), started.elapsed().as_secs_f64() * 1e3);
    for (i, f) in forks.iter().enumerate() {
        let script =
            format!("cd /root/repo && echo branch {i} > f && git commit -qam 'branch {i}' && git log --oneline");
        run(client, &f.id, &["sh", "-c", &script]).await?;
    }
    for f in &forks {
        client.json::<serde_json::Value>(Method::DELETE, &format!("/v1/sandboxes/{}", f.id), None::<&()>).await?;
    }
    Ok(())
}
