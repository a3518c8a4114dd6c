//! The CLI's HTTP client: talks to the daemon over its Unix socket.

use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::api::ErrorBody;

/// Default socket of the daemon.
pub const DEFAULT_SOCKET: &str = "/run/deltabox/deltabox.sock";

/// An error the daemon answered with.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({code})")]
pub struct DaemonError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

pub struct Client {
    socket: PathBuf,
}

/// A response whose body is read incrementally.
pub struct Streaming {
    body: hyper::body::Incoming,
    pending: Vec<u8>,
}

impl Client {
    pub fn new(socket: PathBuf) -> Client {
        Client { socket }
    }

    async fn connect(&self) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let stream = UnixStream::connect(&self.socket).await.with_context(|| {
            format!(
                "cannot reach the deltabox daemon at {} (is `deltabox serve` running? set DELTABOX_SOCKET to use another socket)",
                self.socket.display()
            )
        })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
        let mut sender = self.connect().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "deltabox")
            .header("content-type", content_type)
            .body(Full::new(body))?;
        let resp = sender.send_request(req).await.context("send the request to the daemon")?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => Err(DaemonError { status, code: e.error, message: e.message }.into()),
            Err(_) => anyhow::bail!("the daemon answered {status}: {}", String::from_utf8_lossy(&body)),
        }
    }

    /// Sends `body` as JSON and decodes a JSON answer.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let resp = self.send(method, path, "application/json", bytes).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        serde_json::from_slice(&body)
            .with_context(|| format!("decode the daemon's answer: {}", String::from_utf8_lossy(&body)))
    }

    /// Sends `body` as JSON and returns the answer as a stream of bytes.
    pub async fn stream(&self, method: Method, path: &str, body: &impl Serialize) -> anyhow::Result<Streaming> {
        let resp = self.send(method, path, "application/json", Bytes::from(serde_json::to_vec(body)?)).await?;
        Ok(Streaming { body: resp.into_body(), pending: Vec::new() })
    }

    /// Sends raw bytes and decodes a JSON answer.
    pub async fn put_bytes<T: DeserializeOwned>(&self, path: &str, data: Vec<u8>) -> anyhow::Result<T> {
        let resp = self.send(Method::PUT, path, "application/octet-stream", Bytes::from(data)).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(serde_json::from_slice(&body)?)
    }

    /// GETs the answer's body, to be read as it arrives.
    pub async fn get_reader(&self, path: &str) -> anyhow::Result<impl tokio::io::AsyncRead + Send + Unpin + 'static> {
        use futures_util::TryStreamExt;
        let resp = self.send(Method::GET, path, "application/json", Bytes::new()).await?;
        let body = resp.into_body().into_data_stream().map_err(std::io::Error::other);
        Ok(tokio_util::io::StreamReader::new(body))
    }

    /// Opens the websocket at `path`.
    pub async fn websocket(&self, path: &str) -> anyhow::Result<tokio_tungstenite::WebSocketStream<UnixStream>> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .with_context(|| format!("cannot reach the deltabox daemon at {}", self.socket.display()))?;
        let url = format!("ws://deltabox{path}");
        let (ws, _) = tokio_tungstenite::client_async(url, stream).await.map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                let body = resp.body().as_deref().unwrap_or_default();
                match serde_json::from_slice::<ErrorBody>(body) {
                    Ok(e) => {
                        anyhow::Error::from(DaemonError { status: resp.status(), code: e.error, message: e.message })
                    }
                    Err(_) => anyhow::anyhow!("the daemon refused the connection: {}", resp.status()),
                }
            }
            other => anyhow::Error::from(other).context("open the websocket"),
        })?;
        Ok(ws)
    }
}

impl Streaming {
    /// The next complete line of the body, or `None` at its end.
    pub async fn next_line(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            if let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=pos).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned()));
            }
            match self.body.frame().await {
                None => {
                    if self.pending.is_empty() {
                        return Ok(None);
                    }
                    let rest = std::mem::take(&mut self.pending);
                    return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
                }
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
