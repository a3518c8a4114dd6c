//! `deltabox network` (a sandbox's network and egress policy) and `deltabox port` (published ports).

use clap::Subcommand;
use hyper::Method;

use crate::api::*;
use crate::client::Client;

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// Show a sandbox's network: mode, address, egress policy, published ports.
    Show { id: String },
    /// Replace the egress policy of a sandbox in the nat network (applies at once, to open connections
    /// too). With no flags, back to the defaults.
    Set {
        id: String,
        /// An address, CIDR or host name (`pypi.org`, `*.github.com`) the sandbox may reach even if denied
        /// or private (repeatable).
        #[arg(long)]
        allow_out: Vec<String>,
        /// An address, CIDR or host name the sandbox may not reach (repeatable; 0.0.0.0/0 denies everything
        /// --allow-out does not allow).
        #[arg(long)]
        deny_out: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum PortCommand {
    /// Make a sandbox's TCP port reachable from the host; prints HOST_ADDRESS:HOST_PORT.
    Publish {
        id: String,
        port: u16,
        /// Host port (default: one the kernel chooses).
        #[arg(long, default_value_t = 0)]
        host_port: u16,
        /// Host address to listen on (0.0.0.0 exposes the port to the host's networks).
        #[arg(long, default_value = "127.0.0.1")]
        host_address: std::net::IpAddr,
    },
    /// List a sandbox's published ports.
    Ls { id: String },
    /// Stop publishing a port.
    Rm { id: String, port: u16 },
}

/// The policy of `--allow-out`/`--deny-out` flags, checked as the daemon checks a request's.
pub fn egress_policy(allow_out: &[String], deny_out: &[String]) -> anyhow::Result<EgressPolicy> {
    Ok(serde_json::from_value(serde_json::json!({ "allow_out": allow_out, "deny_out": deny_out }))?)
}

pub async fn network(client: &Client, command: NetworkCommand) -> anyhow::Result<()> {
    let view: NetworkView = match command {
        NetworkCommand::Show { id } => {
            client.json(Method::GET, &format!("/v1/sandboxes/{id}/network"), None::<&()>).await?
        }
        NetworkCommand::Set { id, allow_out, deny_out } => {
            let policy = egress_policy(&allow_out, &deny_out)?;
            client.json(Method::PUT, &format!("/v1/sandboxes/{id}/network"), Some(&policy)).await?
        }
    };
    println!("mode:      {}", serde_json::to_value(view.mode)?.as_str().unwrap_or_default());
    if let (Some(address), Some(gateway), Some(interface)) = (view.address, view.gateway, &view.interface) {
        println!("address:   {address} (gateway and DNS {gateway}; host link {interface})");
    }
    let list = |list: &[Destination]| list.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    println!("allow out: {}", list(&view.egress.allow_out));
    println!("deny out:  {}", list(&view.egress.deny_out));
    for p in &view.ports {
        println!("port:      {} -> {}:{}", p.port, p.host_address, p.host_port);
    }
    Ok(())
}

pub async fn port(client: &Client, command: PortCommand) -> anyhow::Result<()> {
    match command {
        PortCommand::Publish { id, port, host_port, host_address } => {
            let req = PublishRequest { port, host_address, host_port };
            let p: PublishedPort = client.json(Method::POST, &format!("/v1/sandboxes/{id}/ports"), Some(&req)).await?;
            println!("{}", std::net::SocketAddr::new(p.host_address, p.host_port));
        }
        PortCommand::Ls { id } => {
            let view: NetworkView =
                client.json(Method::GET, &format!("/v1/sandboxes/{id}/network"), None::<&()>).await?;
            println!("{:<8} HOST", "PORT");
            for p in view.ports {
                println!("{:<8} {}", p.port, std::net::SocketAddr::new(p.host_address, p.host_port));
            }
        }
        PortCommand::Rm { id, port } => {
            client
                .json::<serde_json::Value>(Method::DELETE, &format!("/v1/sandboxes/{id}/ports/{port}"), None::<&()>)
                .await?;
        }
    }
    Ok(())
}
