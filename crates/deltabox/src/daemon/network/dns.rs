//! The DNS relay of a sandbox in the `nat` network: its resolv.conf names its gateway, where the daemon
//! answers (UDP and TCP) by asking the host's resolvers, which the sandbox itself may not reach.
//!
//! The relay is also where host names of the sandbox's egress policy are enforced: a name in `deny_out` (and
//! not in `allow_out`) is answered REFUSED; the IPv4 addresses a name in `allow_out` resolves to are allowed
//! in the firewall before the answer reaches the sandbox. Without names in its policy, queries and answers
//! are copied as they are, never parsed.
//!
//! Bounded: a UDP query or answer is at most [`MAX_UDP`] bytes, a TCP one at most 64 KiB (its length
//! prefix), at most [`MAX_QUERIES`] queries of a sandbox are in flight and [`MAX_CONNECTIONS`] TCP
//! connections open, an upstream has [`DNS_TIMEOUT`].

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RData;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use super::firewall;
use crate::api::{EgressPolicy, HostPattern};

/// Largest DNS message relayed over UDP (EDNS0's usual buffer size).
const MAX_UDP: usize = 4096;
/// Queries of one sandbox relayed at once (UDP and TCP together); more are dropped (the resolver retries).
const MAX_QUERIES: usize = 64;
/// How long an upstream resolver may take to answer one query (over TCP: to connect, and to answer).
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP connections of one sandbox to its relay at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;
/// How long a sandbox's TCP connection to the relay may stay idle.
const TCP_IDLE: Duration = Duration::from_secs(30);
/// Pause after a failed receive or accept (e.g. out of descriptors), so the loop never spins.
const ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The host names of a sandbox's egress policy.
#[derive(Debug, Clone, Default)]
pub struct NamePolicy {
    allow: Vec<HostPattern>,
    deny: Vec<HostPattern>,
}

impl NamePolicy {
    pub fn of(policy: &EgressPolicy) -> NamePolicy {
        NamePolicy { allow: EgressPolicy::names(&policy.allow_out), deny: EgressPolicy::names(&policy.deny_out) }
    }

    fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// One sandbox's relay.
pub struct DnsRelay {
    pub upstream: Arc<Vec<SocketAddr>>,
    /// Replaced when the sandbox's policy changes.
    pub names: Arc<RwLock<NamePolicy>>,
    /// The host's end of the sandbox's link (names its firewall rules).
    pub interface: String,
    permits: Arc<Semaphore>,
    connections: Arc<Semaphore>,
}

/// How a query reaches the upstream resolver: as it came.
#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

impl DnsRelay {
    pub fn new(upstream: Arc<Vec<SocketAddr>>, names: Arc<RwLock<NamePolicy>>, interface: String) -> DnsRelay {
        let (permits, connections) = (Semaphore::new(MAX_QUERIES), Semaphore::new(MAX_CONNECTIONS));
        DnsRelay { upstream, names, interface, permits: Arc::new(permits), connections: Arc::new(connections) }
    }

    /// Serves queries arriving on `socket` (the sandbox's gateway, port 53) until aborted.
    pub async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let mut buf = vec![0u8; MAX_UDP];
        loop {
            let Ok((n, client)) = socket.recv_from(&mut buf).await else {
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else { continue };
            let query = buf[..n].to_vec();
            let (relay, socket) = (self.clone(), socket.clone());
            tokio::spawn(async move {
                if let Some(answer) = relay.answer(&query, Transport::Udp).await {
                    let _ = socket.send_to(&answer, client).await;
                }
                drop(permit);
            });
        }
    }

    /// Serves connections accepted on `listener` (the sandbox's gateway, port 53) until aborted.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            };
            let Ok(connection) = self.connections.clone().try_acquire_owned() else { continue };
            let relay = self.clone();
            tokio::spawn(async move {
                relay.serve_connection(conn).await;
                drop(connection);
            });
        }
    }

    /// Answers the length-prefixed queries of one connection in turn.
    async fn serve_connection(self: Arc<Self>, mut conn: TcpStream) {
        while let Ok(Ok(query)) = tokio::time::timeout(TCP_IDLE, read_framed(&mut conn)).await {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else { return };
            let Some(answer) = self.answer(&query, Transport::Tcp).await else { return };
            drop(permit);
            if write_framed(&mut conn, &answer).await.is_err() {
                return;
            }
        }
    }

    /// The answer to `query`, or None (the sandbox's resolver then retries or gives up).
    async fn answer(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let names = self.names.read().expect("name policy lock").clone();
        if names.is_empty() {
            return self.ask_upstream(query, transport).await;
        }
        let parsed = Message::from_vec(query).ok()?;
        let name = parsed.queries.first()?.name().to_ascii();
        if names.allow.iter().any(|p| p.matches(&name)) {
            let answer = self.ask_upstream(query, transport).await?;
            let addresses = Message::from_vec(&answer).map(|m| resolved(&m)).unwrap_or_default();
            if !addresses.is_empty() {
                let interface = self.interface.clone();
                let allowed = tokio::task::spawn_blocking(move || firewall::allow_resolved(&interface, &addresses));
                if let Err(e) = allowed.await.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                    tracing::warn!(interface = %self.interface, %name, "cannot allow what the name resolved to: {e}");
                    return None;
                }
            }
            return Some(answer);
        }
        if names.deny.iter().any(|p| p.matches(&name)) {
            let mut refused = Message::error_msg(parsed.metadata.id, parsed.metadata.op_code, ResponseCode::Refused);
            refused.queries = parsed.queries;
            return refused.to_vec().ok();
        }
        self.ask_upstream(query, transport).await
    }

    async fn ask_upstream(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        for server in self.upstream.iter() {
            let asked = match transport {
                Transport::Udp => tokio::time::timeout(DNS_TIMEOUT, ask_udp(*server, query)).await,
                Transport::Tcp => tokio::time::timeout(DNS_TIMEOUT, ask_tcp(*server, query)).await,
            };
            if let Ok(Ok(answer)) = asked {
                return Some(answer);
            }
        }
        None
    }
}

/// The IPv4 addresses in the answer section of `answer`.
fn resolved(answer: &Message) -> Vec<Ipv4Addr> {
    answer.answers.iter().filter_map(|r| if let RData::A(a) = &r.data { Some(a.0) } else { None }).collect()
}

async fn ask_udp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("an address");
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut answer = vec![0u8; MAX_UDP];
    let n = socket.recv(&mut answer).await?;
    answer.truncate(n);
    Ok(answer)
}

async fn ask_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect(server).await?;
    write_framed(&mut conn, query).await?;
    read_framed(&mut conn).await
}

/// One DNS message over TCP: a 16-bit length, then that many bytes.
async fn read_framed(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = conn.read_u16().await?;
    let mut message = vec![0u8; usize::from(len)];
    conn.read_exact(&mut message).await?;
    Ok(message)
}

async fn write_framed(conn: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| std::io::Error::other("DNS message over 64 KiB"))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    conn.write_all(&framed).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolver that answers each query with "answer:" and the query.
    async fn resolver() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, peer) = socket.recv_from(&mut buf).await.unwrap();
                socket.send_to(&[b"answer:", &buf[..n]].concat(), peer).await.unwrap();
            }
        });
        address
    }

    async fn relay(upstream: Vec<SocketAddr>, names: NamePolicy) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        let relay = Arc::new(DnsRelay::new(Arc::new(upstream), Arc::new(RwLock::new(names)), "dbx-test".into()));
        (address, tokio::spawn(relay.serve_udp(socket)))
    }

    async fn ask(relay: SocketAddr, query: &[u8]) -> Vec<u8> {
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(relay).await.unwrap();
        client.send(query).await.unwrap();
        let mut answer = [0u8; 512];
        let n = tokio::time::timeout(DNS_TIMEOUT * 2, client.recv(&mut answer)).await.unwrap().unwrap();
        answer[..n].to_vec()
    }

    #[tokio::test]
    async fn without_names_queries_go_as_they_are_to_the_first_resolver_that_answers() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (address, served) =
            relay(vec![silent.local_addr().unwrap(), resolver().await], NamePolicy::default()).await;
        assert_eq!(ask(address, b"not even DNS").await, b"answer:not even DNS");
        served.abort();
    }

    #[tokio::test]
    async fn a_denied_name_is_refused_without_asking() {
        let policy: EgressPolicy = serde_json::from_str(r#"{"deny_out":["*.example.com"]}"#).unwrap();
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (address, served) = relay(vec![silent.local_addr().unwrap()], NamePolicy::of(&policy)).await;
        let mut query = Message::query();
        query.metadata.id = 4242;
        query.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("www.Example.com.").unwrap(),
            hickory_proto::rr::RecordType::A,
        ));
        let answer = Message::from_vec(&ask(address, &query.to_vec().unwrap()).await).unwrap();
        assert_eq!((answer.metadata.id, answer.metadata.response_code), (4242, ResponseCode::Refused));
        assert_eq!(answer.queries, query.queries);
        served.abort();
    }
}
