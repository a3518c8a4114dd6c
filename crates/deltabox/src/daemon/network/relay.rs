//! What the daemon relays for a sandbox in the `nat` network: DNS (the sandbox's resolv.conf names its
//! gateway; the daemon answers there by asking the host's resolvers, which the sandbox itself may not
//! reach), and published ports (a listener on the host that connects to the sandbox's address).
//! Everything read from the sandbox is bounded: one datagram of at most [`MAX_DNS`] bytes per query, at
//! most [`MAX_QUERIES`] queries in flight per sandbox, and bytes copied as they are, never parsed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Largest DNS message relayed over UDP (EDNS0's usual buffer size).
const MAX_DNS: usize = 4096;
/// DNS queries of one sandbox relayed at once; more are dropped (the resolver retries).
const MAX_QUERIES: usize = 64;
/// How long an upstream resolver may take to answer one query.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to the sandbox (or an upstream resolver over TCP) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed receive or accept (e.g. out of descriptors), so the loop never spins.
const ERROR_PAUSE: Duration = Duration::from_millis(50);
/// TCP connections of one listener relayed at once.
const MAX_CONNECTIONS: usize = 256;

/// Answers DNS queries arriving on `socket` (the sandbox's gateway, port 53) by asking `upstream` in
/// turn; runs until aborted.
pub async fn serve_dns_udp(socket: UdpSocket, upstream: Arc<Vec<SocketAddr>>) {
    let socket = Arc::new(socket);
    let permits = Arc::new(Semaphore::new(MAX_QUERIES));
    let mut buf = vec![0u8; MAX_DNS];
    loop {
        let Ok((n, client)) = socket.recv_from(&mut buf).await else {
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
        let query = buf[..n].to_vec();
        let (socket, upstream) = (socket.clone(), upstream.clone());
        tokio::spawn(async move {
            if let Some(answer) = ask_upstream(&query, &upstream).await {
                let _ = socket.send_to(&answer, client).await;
            }
            drop(permit);
        });
    }
}

async fn ask_upstream(query: &[u8], upstream: &[SocketAddr]) -> Option<Vec<u8>> {
    for server in upstream {
        let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("an address");
        let Ok(socket) = UdpSocket::bind(bind).await else { continue };
        if socket.connect(server).await.is_err() || socket.send(query).await.is_err() {
            continue;
        }
        let mut answer = vec![0u8; MAX_DNS];
        if let Ok(Ok(n)) = tokio::time::timeout(DNS_TIMEOUT, socket.recv(&mut answer)).await {
            answer.truncate(n);
            return Some(answer);
        }
    }
    None
}

/// Relays every connection accepted on `listener` to `targets` (tried in order until one connects);
/// runs until aborted.
pub async fn serve_tcp(listener: TcpListener, targets: Arc<Vec<SocketAddr>>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
        let targets = targets.clone();
        tokio::spawn(async move {
            for target in targets.iter() {
                if let Ok(Ok(mut server)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    break;
                }
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolver that answers each query with "answer:" and the query, after `delay`.
    async fn resolver(delay: Duration) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, peer) = socket.recv_from(&mut buf).await.unwrap();
                tokio::time::sleep(delay).await;
                socket.send_to(&[b"answer:", &buf[..n]].concat(), peer).await.unwrap();
            }
        });
        address
    }

    #[tokio::test]
    async fn dns_queries_are_relayed_to_the_first_resolver_that_answers() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let upstream = vec![silent.local_addr().unwrap(), resolver(Duration::ZERO).await];
        let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay_address = relay.local_addr().unwrap();
        let served = tokio::spawn(serve_dns_udp(relay, Arc::new(upstream)));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(relay_address).await.unwrap();
        client.send(b"q1").await.unwrap();
        let mut answer = [0u8; 64];
        let n = tokio::time::timeout(DNS_TIMEOUT * 2, client.recv(&mut answer)).await.unwrap().unwrap();
        assert_eq!(&answer[..n], b"answer:q1");
        served.abort();
    }

    #[tokio::test]
    async fn published_connections_reach_the_target() {
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_address = target.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = target.accept().await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut conn, b"from the sandbox").await.unwrap();
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let served = tokio::spawn(serve_tcp(listener, Arc::new(vec![target_address])));
        let mut conn = TcpStream::connect(address).await.unwrap();
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut got).await.unwrap();
        assert_eq!(got, b"from the sandbox");
        served.abort();
    }
}
