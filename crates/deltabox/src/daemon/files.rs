//! File endpoints: the daemon works on the sandbox's root as `/proc/<init>/root` through
//! `sandbox::files`, which resolves every path inside the sandbox (see docs/files.md).

use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{StreamExt, TryStreamExt};
use sandbox::files::{FilesError, SandboxRoot, WriteOptions};
use sandbox::userns::{IdMap, IDS_PER_SANDBOX};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::engine::Engine;
use super::error::{ApiError, ApiPath, ApiQuery, ApiResult};

type AppState = State<Arc<Engine>>;

pub fn routes() -> Router<Arc<Engine>> {
    Router::new()
        .route("/v1/sandboxes/{id}/files", get(read).put(write).delete(remove))
        .route("/v1/sandboxes/{id}/files/stat", get(stat))
        .route("/v1/sandboxes/{id}/files/list", get(list))
        .route("/v1/sandboxes/{id}/files/mkdir", post(mkdir))
        .route("/v1/sandboxes/{id}/files/tar", get(download_tar).put(upload_tar))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathQuery {
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteQuery {
    path: String,
    /// Octal permission bits, e.g. "644".
    mode: Option<String>,
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    path: String,
    #[serde(default)]
    recursive: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MkdirQuery {
    path: String,
    mode: Option<String>,
    #[serde(default = "yes")]
    parents: bool,
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
}

fn yes() -> bool {
    true
}

fn octal(mode: Option<&str>, default: u32) -> ApiResult<u32> {
    match mode {
        None => Ok(default),
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .map_err(|_| ApiError::bad_request("invalid_mode", format!("mode {m:?} is not an octal number"))),
    }
}

/// Opens the root of running sandbox `id`.
async fn root(engine: &Engine, id: &str) -> ApiResult<SandboxRoot> {
    let live = engine.live(id).await?;
    let map = IdMap { host_base: live.info.uid_base, count: IDS_PER_SANDBOX };
    SandboxRoot::open(std::path::Path::new(&format!("/proc/{}/root", live.info.init_pid)), map).map_err(ApiError::from)
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, FilesError> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(e.to_string()))?.map_err(ApiError::from)
}

/// The request body as a blocking reader (to be used inside `spawn_blocking`).
fn body_reader(body: Body) -> SyncIoBridge<impl tokio::io::AsyncRead + Unpin> {
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    SyncIoBridge::new(StreamReader::new(stream))
}

/// Files up to this size are read whole before the answer starts, so the answer's length is that of
/// the bytes read even when the sandbox rewrites the file meanwhile. A larger file streams without a
/// length (chunked) and ends where reading ends: a length taken from `fstat` broke the connection when
/// the file shrank while it was sent.
const READ_WHOLE: u64 = 1 << 20;

async fn read(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> ApiResult<Response> {
    let root = root(&engine, &id).await?;
    let (file, head) = blocking(move || {
        let (mut file, _) = root.open_read(&q.path)?;
        let mut head = Vec::new();
        (&mut file).take(READ_WHOLE + 1).read_to_end(&mut head).map_err(|source| FilesError::Io {
            op: "read",
            path: q.path,
            source,
        })?;
        Ok((file, head))
    })
    .await?;
    let response = Response::builder().header(header::CONTENT_TYPE, "application/octet-stream");
    let response = if head.len() as u64 <= READ_WHOLE {
        response.header(header::CONTENT_LENGTH, head.len()).body(Body::from(head))
    } else {
        let rest = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
        let head = futures_util::stream::once(async { Ok::<_, std::io::Error>(axum::body::Bytes::from(head)) });
        response.body(Body::from_stream(head.chain(rest)))
    };
    Ok(response.expect("valid response"))
}

async fn write(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<WriteQuery>,
    body: Body,
) -> ApiResult<Response> {
    let root = root(&engine, &id).await?;
    let opts = WriteOptions { mode: octal(q.mode.as_deref(), 0o644)?, uid: q.uid, gid: q.gid, create_parents: true };
    let mut reader = body_reader(body);
    let stat = blocking(move || root.write(&q.path, &mut reader, &opts)).await?;
    Ok((StatusCode::CREATED, Json(stat)).into_response())
}

async fn remove(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let root = root(&engine, &id).await?;
    let path = q.path.clone();
    blocking(move || root.remove(&q.path, q.recursive)).await?;
    Ok(Json(serde_json::json!({ "path": path, "removed": true })))
}

async fn stat(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> ApiResult<Response> {
    let root = root(&engine, &id).await?;
    Ok(Json(blocking(move || root.stat(&q.path)).await?).into_response())
}

async fn list(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> ApiResult<Response> {
    let root = root(&engine, &id).await?;
    let entries = blocking(move || root.list(&q.path)).await?;
    Ok(Json(serde_json::json!({ "entries": entries })).into_response())
}

async fn mkdir(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<MkdirQuery>,
) -> ApiResult<Response> {
    let root = root(&engine, &id).await?;
    let mode = octal(q.mode.as_deref(), 0o755)?;
    let stat = blocking(move || root.mkdir(&q.path, mode, q.parents, q.uid, q.gid)).await?;
    Ok((StatusCode::CREATED, Json(stat)).into_response())
}

async fn upload_tar(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
    body: Body,
) -> ApiResult<Response> {
    let root = root(&engine, &id).await?;
    let mut reader = body_reader(body);
    let stats = blocking(move || root.extract_tar(&q.path, &mut reader)).await?;
    Ok(Json(stats).into_response())
}

/// A blocking writer that hands its bytes to an async response body.
struct ChannelWriter(mpsc::Sender<Result<Vec<u8>, std::io::Error>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.blocking_send(Ok(buf.to_vec())).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn download_tar(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> ApiResult<Response> {
    let root = Arc::new(root(&engine, &id).await?);
    // Errors about the path itself are answered with a status before the stream starts.
    let (check, path) = (root.clone(), q.path.clone());
    blocking(move || check.stat(&path)).await?;
    let (tx, rx) = mpsc::channel(16);
    tokio::task::spawn_blocking(move || {
        let mut out = std::io::BufWriter::with_capacity(256 * 1024, ChannelWriter(tx.clone()));
        let result = root
            .write_tar(&q.path, &mut out)
            .and_then(|()| std::io::Write::flush(&mut out).map_err(|source| FilesError::WriteOutput { source }));
        if let Err(e) = result {
            // Cut the stream short so the client sees a broken archive rather than a silently partial one.
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-tar")
        .body(Body::from_stream(super::routes::receiver_stream(rx)))
        .expect("valid response"))
}
