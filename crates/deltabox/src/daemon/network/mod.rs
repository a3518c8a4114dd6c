//! The `nat` network mode (docs/network.md): each sandbox has its own network namespace and address, and
//! reaches the outside through the host's NAT, under an egress policy. The shim makes the sandbox's link
//! (`sandbox::net`); the daemon, here, keeps the host's rules ([`firewall`]) and relays DNS and published
//! ports ([`relay`]) for every sandbox of the mode while it runs.

mod dns;
mod firewall;
mod relay;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use ipnet::Ipv4Net;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::AbortHandle;

pub use firewall::FirewallError;

use crate::api::{EgressPolicy, PublishRequest, PublishedPort};
use crate::shim::proto::{NatConfig, NatLink};

/// The subnet sandboxes take their links from unless `deltabox serve --nat-subnet` says otherwise.
pub const DEFAULT_SUBNET: &str = "10.89.0.0/16";
/// Host-wide directory of the links' reservations, shared by every daemon on the host.
pub const DEFAULT_SLOT_DIR: &str = "/run/deltabox-nat";
/// Most entries of an egress policy's allow or deny list.
pub const MAX_POLICY_ENTRIES: usize = 256;
/// Most ports one sandbox may publish.
pub const MAX_PUBLISHED: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("the nat network is not available on this host: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error("cannot listen on {address} for the sandbox: {source}")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the sandbox already publishes port {0}")]
    AlreadyPublished(u16),
    #[error("the sandbox does not publish port {0}")]
    NotPublished(u16),
    #[error("a sandbox publishes at most {MAX_PUBLISHED} ports")]
    TooManyPorts,
    #[error("the sandbox is not in the nat network")]
    NotNat,
}

pub struct NatOptions {
    pub subnet: Ipv4Net,
    pub slot_dir: PathBuf,
    /// DNS servers the sandboxes' queries go to; empty: those of the host's /etc/resolv.conf.
    pub dns: Vec<SocketAddr>,
}

/// The daemon's part of the `nat` network.
pub struct NatNetwork {
    pub config: NatConfig,
    upstream: Arc<Vec<SocketAddr>>,
    attached: Mutex<HashMap<String, Attached>>,
}

/// What runs for one sandbox.
struct Attached {
    link: NatLink,
    /// The host names of its policy, as its DNS relay enforces them.
    names: Arc<RwLock<dns::NamePolicy>>,
    /// Whether it has rules of its own (a policy other than the default).
    own_rules: bool,
    relays: Vec<AbortHandle>,
    ports: HashMap<u16, (PublishedPort, AbortHandle)>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.relays.iter().chain(self.ports.values().map(|(_, h)| h)).for_each(AbortHandle::abort);
    }
}

impl NatNetwork {
    /// Turns on IPv4 forwarding and installs the firewall rules. Blocking (runs `nft`).
    pub fn open(opts: NatOptions) -> Result<NatNetwork, NetworkError> {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| NetworkError::Unavailable(format!("cannot turn on IPv4 forwarding: {e}")))?;
        firewall::install(opts.subnet, &opts.slot_dir)?;
        let upstream = if opts.dns.is_empty() { host_resolvers() } else { opts.dns };
        if upstream.is_empty() {
            tracing::warn!("no DNS server in /etc/resolv.conf and none given (--dns): sandboxes cannot resolve names");
        }
        Ok(NatNetwork {
            config: NatConfig { subnet: opts.subnet, slot_dir: opts.slot_dir },
            upstream: Arc::new(upstream),
            attached: Mutex::new(HashMap::new()),
        })
    }

    /// Puts sandbox `id`'s egress policy in place, before its link exists (so its processes, a fork's
    /// restored ones too, never run under the defaults when it has a policy of its own). Nothing for the
    /// default policy.
    pub async fn prepare(&self, id: &str, policy: &EgressPolicy) -> Result<(), NetworkError> {
        if *policy != EgressPolicy::default() {
            set_rules(&sandbox::net::host_interface(id), policy).await?;
        }
        Ok(())
    }

    /// Starts serving sandbox `id` on `link` (its policy [`NatNetwork::prepare`]d): its DNS relay, and its
    /// published `ports` (a restarted daemon's; one that can no longer listen is dropped with a warning).
    pub async fn attach(
        &self,
        id: &str,
        link: &NatLink,
        policy: &EgressPolicy,
        ports: &[PublishedPort],
    ) -> Result<Vec<PublishedPort>, NetworkError> {
        let own_rules = *policy != EgressPolicy::default();
        let dns = SocketAddr::new(IpAddr::V4(link.address.gateway), 53);
        let udp = UdpSocket::bind(dns).await.map_err(|source| NetworkError::Listen { address: dns, source })?;
        let tcp = TcpListener::bind(dns).await.map_err(|source| NetworkError::Listen { address: dns, source })?;
        let names = Arc::new(RwLock::new(dns::NamePolicy::of(policy)));
        let relay = Arc::new(dns::DnsRelay::new(self.upstream.clone(), names.clone(), link.interface.clone()));
        let relays = vec![
            tokio::spawn(relay.clone().serve_udp(udp)).abort_handle(),
            tokio::spawn(relay.serve_tcp(tcp)).abort_handle(),
        ];
        let attached = Attached { link: link.clone(), names, own_rules, relays, ports: HashMap::new() };
        self.attached.lock().expect("network lock").insert(id.to_string(), attached);
        let mut kept = Vec::new();
        for p in ports {
            let req = PublishRequest { port: p.port, host_address: p.host_address, host_port: p.host_port };
            match self.publish(id, &req).await {
                Ok(p) => kept.push(p),
                Err(e) => tracing::warn!(%id, port = p.port, "cannot publish the port again: {e}"),
            }
        }
        Ok(kept)
    }

    /// Replaces the egress policy of sandbox `id`; applies to its open connections too.
    pub async fn set_policy(&self, id: &str, policy: &EgressPolicy) -> Result<(), NetworkError> {
        let (link, names) = {
            let attached = self.attached.lock().expect("network lock");
            let a = attached.get(id).ok_or(NetworkError::NotNat)?;
            (a.link.clone(), a.names.clone())
        };
        set_rules(&link.interface, policy).await?;
        *names.write().expect("name policy lock") = dns::NamePolicy::of(policy);
        if let Some(a) = self.attached.lock().expect("network lock").get_mut(id) {
            a.own_rules = *policy != EgressPolicy::default();
        }
        Ok(())
    }

    /// Stops serving sandbox `id` and removes its rules.
    pub async fn detach(&self, id: &str) {
        let Some(attached) = self.attached.lock().expect("network lock").remove(id) else { return };
        if attached.own_rules {
            remove_rules(attached.link.interface.clone()).await;
        }
    }

    /// Removes the rules sandbox `id` may have: one that is gone (its daemon stopped before it could), or
    /// one whose start failed.
    pub async fn forget(&self, id: &str) {
        remove_rules(sandbox::net::host_interface(id)).await;
    }

    /// Listens on the host for connections to sandbox `id`'s port `req.port`.
    pub async fn publish(&self, id: &str, req: &PublishRequest) -> Result<PublishedPort, NetworkError> {
        let target = {
            let attached = self.attached.lock().expect("network lock");
            let a = attached.get(id).ok_or(NetworkError::NotNat)?;
            if a.ports.contains_key(&req.port) {
                return Err(NetworkError::AlreadyPublished(req.port));
            }
            if a.ports.len() >= MAX_PUBLISHED {
                return Err(NetworkError::TooManyPorts);
            }
            SocketAddr::new(IpAddr::V4(a.link.address.address), req.port)
        };
        let address = SocketAddr::new(req.host_address, req.host_port);
        let listener = TcpListener::bind(address).await.map_err(|source| NetworkError::Listen { address, source })?;
        let bound = listener.local_addr().map_err(|source| NetworkError::Listen { address, source })?;
        let published = PublishedPort { port: req.port, host_address: bound.ip(), host_port: bound.port() };
        let mut attached = self.attached.lock().expect("network lock");
        let a = attached.get_mut(id).ok_or(NetworkError::NotNat)?;
        if a.ports.contains_key(&req.port) {
            return Err(NetworkError::AlreadyPublished(req.port));
        }
        let relay = tokio::spawn(relay::serve_tcp(listener, target)).abort_handle();
        a.ports.insert(req.port, (published.clone(), relay));
        Ok(published)
    }

    pub fn unpublish(&self, id: &str, port: u16) -> Result<(), NetworkError> {
        let mut attached = self.attached.lock().expect("network lock");
        let a = attached.get_mut(id).ok_or(NetworkError::NotNat)?;
        let (_, relay) = a.ports.remove(&port).ok_or(NetworkError::NotPublished(port))?;
        relay.abort();
        Ok(())
    }
}

/// Gives the sandbox on link `interface` the rules of `policy` (`nft` runs off the async threads).
async fn set_rules(interface: &str, policy: &EgressPolicy) -> Result<(), NetworkError> {
    let (interface, policy) = (interface.to_string(), policy.clone());
    tokio::task::spawn_blocking(move || firewall::set_policy(&interface, &policy))
        .await
        .map_err(|e| NetworkError::Unavailable(format!("the firewall task failed: {e}")))??;
    Ok(())
}

async fn remove_rules(interface: String) {
    let removed = tokio::task::spawn_blocking(move || {
        firewall::remove(&interface).map_err(|e| format!("cannot remove the rules of {interface}: {e}"))
    });
    match removed.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("{e}"),
        Err(e) => tracing::warn!("the firewall task failed: {e}"),
    }
}

/// The `nameserver` lines of the host's /etc/resolv.conf (read bounded; at most three, as glibc uses).
fn host_resolvers() -> Vec<SocketAddr> {
    let text = std::fs::File::open("/etc/resolv.conf")
        .and_then(|f| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::Read::take(f, 64 << 10), &mut s).map(|_| s)
        })
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .take(3)
        .collect()
}
