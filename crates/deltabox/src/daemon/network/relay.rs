//! Published ports of a sandbox in the `nat` network: a listener on the host whose connections the daemon
//! relays to the sandbox's address, copying bytes as they are (never parsed), at most
//! [`MAX_CONNECTIONS`] at once per port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// How long connecting to the sandbox may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed receive or accept (e.g. out of descriptors), so the loop never spins.
const ERROR_PAUSE: Duration = Duration::from_millis(50);
/// TCP connections of one listener relayed at once.
const MAX_CONNECTIONS: usize = 256;

/// Relays every connection accepted on `listener` to `target` (the sandbox's address and port); runs until
/// aborted.
pub async fn serve_tcp(listener: TcpListener, target: SocketAddr) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
        tokio::spawn(async move {
            if let Ok(Ok(mut server)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let served = tokio::spawn(serve_tcp(listener, target_address));
        let mut conn = TcpStream::connect(address).await.unwrap();
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut got).await.unwrap();
        assert_eq!(got, b"from the sandbox");
        served.abort();
    }
}
