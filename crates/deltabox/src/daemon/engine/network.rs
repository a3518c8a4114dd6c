//! A sandbox's network: which modes this daemon allows, serving a `nat` sandbox's link while it runs
//! (`daemon::network`), its egress policy and its published ports.

use sandbox::spec::Network;

use super::{Engine, EngineError, EngineResult};
use crate::api::{EgressPolicy, NetworkView, PublishRequest, PublishedPort};
use crate::catalog::SandboxRecord;
use crate::daemon::network::{NatNetwork, NetworkError};
use crate::shim::proto::ShimInfo;

impl Engine {
    /// Refuses a mode this daemon cannot give a new sandbox (created or forked).
    pub(super) fn check_network(&self, network: Network) -> EngineResult<()> {
        match network {
            Network::Host if !self.allow_host_network => Err(EngineError::invalid(
                "network_not_allowed",
                "the host's network gives a sandbox no network isolation at all; this daemon refuses it \
                 (start it with --allow-host-network to allow it, or use network \"nat\")",
            )),
            Network::Nat => self.nat().map(drop),
            _ => Ok(()),
        }
    }

    fn nat(&self) -> EngineResult<&NatNetwork> {
        self.nat.as_deref().map_err(|e| NetworkError::Unavailable(e.clone()).into())
    }

    /// Puts the egress policy of a `nat` sandbox about to start in place (nothing for other modes or the
    /// default policy).
    pub(super) async fn prepare_network(&self, record: &SandboxRecord) -> EngineResult<()> {
        if record.config.network == Network::Nat {
            self.nat()?.prepare(&record.id, &record.config.egress).await?;
        }
        Ok(())
    }

    /// Serves the `nat` link of a sandbox just started or found running (nothing for other modes).
    pub(super) async fn attach_network(&self, record: &SandboxRecord, info: &ShimInfo) -> EngineResult<()> {
        let Some(link) = &info.nat else { return Ok(()) };
        let started = std::time::Instant::now();
        let kept = self.nat()?.attach(&record.id, link, &record.config.egress, &record.ports).await?;
        tracing::debug!(id = %record.id, ms = started.elapsed().as_secs_f64() * 1000.0, "serving its network");
        if kept != record.ports {
            let mut record = record.clone();
            record.ports = kept;
            self.catalog().update_sandbox(&record)?;
            self.refresh(record).await;
        }
        Ok(())
    }

    /// Stops serving sandbox `id`'s link, if it has one; before its shim is destroyed (see
    /// [`NatNetwork::detach`]).
    pub(super) async fn detach_network(&self, id: &str) {
        if let Ok(nat) = self.nat.as_deref() {
            nat.detach(id).await;
        }
    }

    /// Removes the rules sandbox `id` (gone while the daemon was away, or whose start failed) may have left.
    pub(super) async fn forget_network(&self, id: &str) {
        if let Ok(nat) = self.nat.as_deref() {
            nat.forget(id).await;
        }
    }

    pub async fn network(&self, id: &str) -> EngineResult<NetworkView> {
        let live = self.listed(id).await?;
        let link = live.info.nat.as_ref();
        Ok(NetworkView {
            mode: live.record.config.network,
            address: link.map(|l| l.address.address),
            gateway: link.map(|l| l.address.gateway),
            interface: link.map(|l| l.interface.clone()),
            egress: live.record.config.egress.clone(),
            ports: live.record.ports.clone(),
        })
    }

    /// Replaces sandbox `id`'s egress policy, at once (open connections included) and for its later
    /// checkpoints (so their forks).
    pub async fn set_egress(&self, id: &str, policy: EgressPolicy) -> EngineResult<NetworkView> {
        let live = self.live(id).await?;
        if live.info.nat.is_none() {
            return Err(NetworkError::NotNat.into());
        }
        let _one_at_a_time = live.ops.lock().await;
        self.nat()?.set_policy(id, &policy).await?;
        let mut record = self.sandbox_record(id)?;
        record.config.egress = policy;
        self.catalog().update_sandbox(&record)?;
        self.refresh(record).await;
        self.network(id).await
    }

    pub async fn publish(&self, id: &str, req: PublishRequest) -> EngineResult<PublishedPort> {
        let live = self.live(id).await?;
        let _one_at_a_time = live.ops.lock().await;
        let published = self.nat()?.publish(id, &req).await?;
        let mut record = self.sandbox_record(id)?;
        record.ports.push(published.clone());
        if let Err(e) = self.catalog().update_sandbox(&record) {
            let _ = self.nat()?.unpublish(id, req.port);
            return Err(e.into());
        }
        self.refresh(record).await;
        Ok(published)
    }

    pub async fn unpublish(&self, id: &str, port: u16) -> EngineResult<()> {
        let live = self.live(id).await?;
        let _one_at_a_time = live.ops.lock().await;
        self.nat()?.unpublish(id, port)?;
        let mut record = self.sandbox_record(id)?;
        record.ports.retain(|p| p.port != port);
        self.catalog().update_sandbox(&record)?;
        self.refresh(record).await;
        Ok(())
    }
}
