//! HTTP handlers (see docs/api.md).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::StreamExt;
use sandbox::spec::WinSize;
use serde::Serialize;
use tokio::sync::mpsc;

use super::engine::{env_pairs, now, view, Engine};
use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ApiResult};
use super::shim_client::{Event, Running, ShimError};
use crate::api::*;
use crate::catalog::{CheckpointKind, ImageRecord};
use crate::errors::error_chain;
use crate::shim::proto::{self, Input, Outcome, Stream};

const DEFAULT_MAX_OUTPUT: u64 = 16 << 20;
/// Stdin bytes per packet to the shim.
const STDIN_CHUNK: usize = 64 * 1024;

type AppState = State<Arc<Engine>>;

pub fn router(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/images", get(list_images))
        .route("/v1/images/import", post(import_image))
        .route("/v1/images/{name}", get(get_image).delete(remove_image))
        .route("/v1/sandboxes", get(list_sandboxes).post(create_sandbox))
        .route("/v1/sandboxes/{id}", get(get_sandbox).delete(remove_sandbox))
        .route("/v1/sandboxes/{id}/network", get(get_network).put(set_egress))
        .route("/v1/sandboxes/{id}/ports", get(list_ports).post(publish_port))
        .route("/v1/sandboxes/{id}/ports/{port}", axum::routing::delete(unpublish_port))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route("/v1/sandboxes/{id}/attach", get(attach))
        .route("/v1/sandboxes/{id}/checkpoints", get(list_checkpoints).post(create_checkpoint))
        .route("/v1/sandboxes/{id}/rollback", post(rollback))
        .route("/v1/checkpoints/{id}", get(get_checkpoint).delete(remove_checkpoint))
        .route("/v1/checkpoints/{id}/fork", post(fork))
        .route("/v1/sandboxes/{id}/sessions", get(list_sessions).post(create_session))
        .route("/v1/sandboxes/{id}/sessions/{name}", axum::routing::delete(close_session))
        .route("/v1/sandboxes/{id}/sessions/{name}/run", post(run_in_session))
        .merge(super::files::routes())
        .fallback(|| async { ApiError::not_found("no_such_endpoint", "no such API endpoint (see docs/api.md)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this endpoint")
        })
        // JSON bodies (exec stdin included) up to 64 MiB; file uploads stream and have no limit.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY))
        .with_state(engine)
}

/// Largest JSON request body.
const MAX_JSON_BODY: usize = 64 << 20;

async fn health(State(engine): AppState) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "template_memory_bytes": engine.template_memory.total(),
        "template_memory_budget": engine.template_memory.budget,
    }))
}

/// A response of newline-delimited JSON events fed by `rx`.
fn ndjson(rx: mpsc::Receiver<serde_json::Value>) -> Response {
    let stream = receiver_stream(rx).map(|v| Ok::<_, std::convert::Infallible>(format!("{v}\n")));
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

/// The items of `rx` as a stream.
pub fn receiver_stream<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn json_value<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("API types serialize")
}

// ---- images ----

fn image_view(r: &ImageRecord) -> ImageView {
    ImageView {
        name: r.name.clone(),
        layers: r.layers.iter().map(|l| l.diff_id.to_string()).collect(),
        size: r.size(),
        format: serde_json::to_value(r.format).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        source: r.source.clone(),
        created: r.created,
    }
}

fn validate_image_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
    if ok {
        Ok(())
    } else {
        let message = format!("invalid image name {name:?}: use letters, digits, '.', '_', '-', ':' (max 128)");
        Err(ApiError::bad_request("invalid_name", message))
    }
}

async fn list_images(State(engine): AppState) -> ApiResult<Json<serde_json::Value>> {
    let images = engine.catalog().images()?;
    Ok(Json(serde_json::json!({ "images": images.iter().map(image_view).collect::<Vec<_>>() })))
}

async fn get_image(State(engine): AppState, ApiPath(name): ApiPath<String>) -> ApiResult<Json<ImageView>> {
    Ok(Json(image_view(&engine.image(&name)?)))
}

async fn remove_image(State(engine): AppState, ApiPath(name): ApiPath<String>) -> ApiResult<Json<serde_json::Value>> {
    engine.remove_image(&name).await?;
    Ok(Json(serde_json::json!({ "name": name, "removed": true })))
}

async fn import_image(State(engine): AppState, ApiJson(req): ApiJson<ImportRequest>) -> ApiResult<Response> {
    validate_image_name(&req.name)?;
    let file_part = req.path.split_once(':').map_or(req.path.as_str(), |(p, _)| p);
    if !std::path::Path::new(&req.path).exists() && !std::path::Path::new(file_part).exists() {
        return Err(ApiError::bad_request(
            "source_not_found",
            format!("{} does not exist on the daemon's host", req.path),
        ));
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let guard = engine.image_lock.lock().await;
        let progress_tx = tx.clone();
        let path = req.path.clone();
        let store = engine.clone();
        let imported = tokio::task::spawn_blocking(move || {
            store.layers.import(std::path::Path::new(&path), &mut |p| {
                let stage = match p.stage {
                    sandbox::image::ImportStage::Decompressing => "decompressing".to_string(),
                    sandbox::image::ImportStage::Layer { index, count } => format!("layer {}/{count}", index + 1),
                };
                let event = ImportEvent::Progress { stage, done_bytes: p.done_bytes, total_bytes: p.total_bytes };
                let _ = progress_tx.try_send(json_value(&event));
            })
        })
        .await;
        let event = match imported {
            Ok(Ok(image)) => {
                let record = ImageRecord {
                    name: req.name.clone(),
                    layers: image.layers,
                    config: image.config,
                    format: image.format,
                    source: req.path.clone(),
                    created: now(),
                    base_stack: None,
                };
                let recorded = engine.catalog().put_image(&record);
                match recorded {
                    // Index the layers for DeltaFS now, so the first sandbox starts fast.
                    Ok(()) => match engine.image_base_stack(&record).await {
                        Ok(_) => ImportEvent::Done { image: image_view(&record) },
                        Err(e) => {
                            let e = ApiError::from(e);
                            ImportEvent::Error { error: e.code.into(), message: e.message }
                        }
                    },
                    Err(e) => ImportEvent::Error { error: "internal".into(), message: format!("{e:#}") },
                }
            }
            Ok(Err(e)) => ImportEvent::Error { error: "import_failed".into(), message: error_chain(&e) },
            Err(e) => ImportEvent::Error { error: "internal".into(), message: e.to_string() },
        };
        drop(guard);
        // A re-import under an existing name may leave the old layers unused.
        engine.collect_garbage().await;
        let _ = tx.send(json_value(&event)).await;
    });
    Ok(ndjson(rx))
}

// ---- sandboxes ----

async fn list_sandboxes(State(engine): AppState) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "sandboxes": engine.list().await }))
}

async fn create_sandbox(State(engine): AppState, ApiJson(req): ApiJson<CreateRequest>) -> ApiResult<Response> {
    let created = engine.create(req).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn get_sandbox(State(engine): AppState, ApiPath(id): ApiPath<String>) -> ApiResult<Json<SandboxView>> {
    Ok(Json(view(&engine.listed(&id).await?)))
}

async fn get_network(State(engine): AppState, ApiPath(id): ApiPath<String>) -> ApiResult<Json<NetworkView>> {
    Ok(Json(engine.network(&id).await?))
}

async fn set_egress(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiJson(policy): ApiJson<EgressPolicy>,
) -> ApiResult<Json<NetworkView>> {
    Ok(Json(engine.set_egress(&id, policy).await?))
}

async fn list_ports(State(engine): AppState, ApiPath(id): ApiPath<String>) -> ApiResult<Json<serde_json::Value>> {
    Ok(Json(serde_json::json!({ "ports": engine.network(&id).await?.ports })))
}

async fn publish_port(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<PublishRequest>,
) -> ApiResult<(StatusCode, Json<PublishedPort>)> {
    Ok((StatusCode::CREATED, Json(engine.publish(&id, req).await?)))
}

async fn unpublish_port(
    State(engine): AppState,
    ApiPath((id, port)): ApiPath<(String, u16)>,
) -> ApiResult<Json<serde_json::Value>> {
    engine.unpublish(&id, port).await?;
    Ok(Json(serde_json::json!({ "port": port, "removed": true })))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    #[serde(default)]
    keep_checkpoints: bool,
}

async fn remove_sandbox(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    engine.remove(&id, q.keep_checkpoints).await?;
    Ok(Json(serde_json::json!({ "id": id, "removed": true })))
}

/// A JSON body that may be absent.
fn optional_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<Option<T>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    // As for the other bodies: unparsable JSON is invalid_json, JSON of the wrong shape invalid_request.
    serde_json::from_slice(body).map(Some).map_err(|e| {
        let code = if e.classify() == serde_json::error::Category::Data { "invalid_request" } else { "invalid_json" };
        ApiError::bad_request(code, e.to_string())
    })
}

// ---- checkpoints ----

fn checkpoint_view(
    engine: &Engine,
    (c, disk_bytes): &(crate::catalog::CheckpointRecord, Option<u64>),
) -> CheckpointView {
    let full = c.kind == CheckpointKind::Full;
    let processes = match full {
        false => "not captured (filesystem-only checkpoint): they kept running".to_string(),
        true => format!("{} captured", c.processes.unwrap_or(0)),
    };
    CheckpointView {
        id: c.id.clone(),
        sandbox: c.sandbox.clone(),
        parent: c.parent.clone(),
        kind: c.kind,
        created: c.created,
        pause_ms: c.pause_ms,
        duration_ms: c.duration_ms,
        covers: c.kind.covers(),
        processes,
        process_count: c.processes,
        durable: c.durable,
        image_failure: c.image_failure.as_ref().map(|f| f.reason.clone()),
        disk_bytes: *disk_bytes,
        memory_bytes: engine.template_memory.of(c),
        reset_connections: c.reset_connections.clone(),
    }
}

async fn create_checkpoint(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let req: CheckpointRequest = optional_json(&body)?.unwrap_or_default();
    let (cp, _) = engine.checkpoint(&id, !req.fs_only).await?;
    let measured = engine.with_disk_bytes(vec![cp]);
    Ok((StatusCode::CREATED, Json(checkpoint_view(&engine, &measured[0]))).into_response())
}

async fn list_checkpoints(State(engine): AppState, ApiPath(id): ApiPath<String>) -> ApiResult<Json<serde_json::Value>> {
    engine.live(&id).await?;
    let list: Vec<CheckpointView> =
        engine.with_disk_bytes(engine.checkpoints_of(&id)?).iter().map(|c| checkpoint_view(&engine, c)).collect();
    Ok(Json(serde_json::json!({ "checkpoints": list })))
}

async fn get_checkpoint(State(engine): AppState, ApiPath(id): ApiPath<String>) -> ApiResult<Json<CheckpointView>> {
    let measured = engine.with_disk_bytes(vec![engine.checkpoint_record(&id)?]);
    Ok(Json(checkpoint_view(&engine, &measured[0])))
}

async fn remove_checkpoint(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<serde_json::Value>> {
    engine.delete_checkpoint(&id).await?;
    Ok(Json(serde_json::json!({ "id": id, "removed": true })))
}

async fn rollback(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RollbackRequest>,
) -> ApiResult<Json<RollbackView>> {
    let (cp, stats, duration_ms) = engine.rollback(&id, &req.checkpoint).await?;
    let full = cp.kind == CheckpointKind::Full;
    let processes = if full {
        format!(
            "{} killed; {} restored from the checkpoint{}",
            stats.processes_killed,
            stats.processes_restored,
            if stats.from_image { " (from its durable image)" } else { "" }
        )
    } else {
        format!("{} killed, init kept (filesystem-only checkpoint: processes are not restored)", stats.processes_killed)
    };
    Ok(Json(RollbackView { sandbox: id, checkpoint: cp.id, covers: cp.kind.covers(), processes, duration_ms, stats }))
}

async fn fork(State(engine): AppState, ApiPath(id): ApiPath<String>, body: axum::body::Bytes) -> ApiResult<Response> {
    let count = optional_json::<ForkRequest>(&body)?.map_or(1, |r| r.count);
    let sandboxes = engine.fork(&id, count).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "sandboxes": sandboxes }))).into_response())
}

// ---- exec ----

fn timeout_ms(seconds: Option<f64>) -> ApiResult<Option<u64>> {
    match seconds {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 => Ok(Some(((s * 1000.0).ceil() as u64).max(1))),
        Some(_) => Err(ApiError::bad_request("invalid_timeout", "timeout must be a positive number of seconds")),
    }
}

fn encode(data: &[u8], encoding: Encoding) -> String {
    match encoding {
        Encoding::Utf8 => String::from_utf8_lossy(data).into_owned(),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(data),
    }
}

async fn exec(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> ApiResult<Response> {
    engine.live(&id).await?;
    if req.cmd.is_empty() {
        return Err(ApiError::bad_request("invalid_command", "cmd must name a program"));
    }
    let stdin: Option<Vec<u8>> = match (&req.stdin, &req.stdin_b64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("invalid_request", "give stdin or stdin_b64, not both"))
        }
        (Some(text), None) => Some(text.clone().into_bytes()),
        (None, Some(b64)) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| ApiError::bad_request("invalid_request", format!("stdin_b64: {e}")))?,
        ),
        (None, None) => None,
    };
    let shim_req = proto::ExecRequest {
        argv: req.cmd.clone(),
        env: env_pairs(&req.env)?,
        cwd: req.cwd.clone(),
        user: req.user.clone(),
        tty: None,
        timeout_ms: timeout_ms(req.timeout)?,
        max_output: req.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT),
        stdin: stdin.is_some(),
    };
    let running = engine.shim(&id).exec(shim_req).await?;
    if let Some(data) = stdin {
        send_stdin(&running, &data).await?;
    }
    let encoding = req.encoding;
    if req.stream {
        // The first event decides between an HTTP error and a stream.
        let first = running.next().await?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut next = Some(Ok(first));
            loop {
                let event = match next.take() {
                    Some(event) => event,
                    None => tokio::select! {
                        event = running.next() => event,
                        // The client left while the command is quiet: dropping `running` kills the command.
                        _ = tx.closed() => return,
                    },
                };
                let (event, last) = match event {
                    Ok(Event::Started { pid }) => (ExecEvent::Started { pid }, false),
                    Ok(Event::Output { stream: Stream::Stdout, data }) => {
                        (ExecEvent::Stdout { data: encode(&data, encoding) }, false)
                    }
                    Ok(Event::Output { stream: Stream::Stderr, data }) => {
                        (ExecEvent::Stderr { data: encode(&data, encoding) }, false)
                    }
                    Ok(Event::Exited(o)) => (ExecEvent::Exit(result(o, String::new(), String::new())), true),
                    Err(e) => (error_event(e), true),
                };
                // Stop (and so kill the command, as the shim sees us leave) when the client is gone.
                if tx.send(json_value(&event)).await.is_err() || last {
                    return;
                }
            }
        });
        return Ok(ndjson(rx));
    }
    let (outcome, stdout, stderr) = running.collect().await?;
    Ok(Json(result(outcome, encode(&stdout, encoding), encode(&stderr, encoding))).into_response())
}

/// An error as the last event of a stream.
fn error_event(e: ShimError) -> ExecEvent {
    let e = ApiError::from(e);
    ExecEvent::Error { error: e.code.into(), message: e.message }
}

async fn send_stdin(running: &Running, data: &[u8]) -> Result<(), ShimError> {
    for chunk in data.chunks(STDIN_CHUNK) {
        running.send(&Input::Stdin, chunk).await?;
    }
    running.send(&Input::StdinEof, &[]).await
}

fn result(o: Outcome, stdout: String, stderr: String) -> ExecResult {
    ExecResult {
        exit_code: o.exit_code,
        signal: o.signal,
        timed_out: o.timed_out,
        oom_killed: o.oom_killed,
        stdout,
        stderr,
        stdout_truncated: o.stdout_dropped > 0,
        stderr_truncated: o.stderr_dropped > 0,
        stdout_dropped_bytes: o.stdout_dropped,
        stderr_dropped_bytes: o.stderr_dropped,
        duration_ms: o.duration_ms,
    }
}

// ---- interactive attach (websocket) ----

async fn attach(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    engine.live(&id).await?;
    let ws = ws.map_err(|e| {
        ApiError::bad_request("websocket_required", format!("attach is a websocket: {}", e.body_text()))
    })?;
    Ok(ws.on_upgrade(move |socket| async move {
        if let Err(e) = attach_session(engine, id, socket).await {
            tracing::debug!("attach ended: {e:#}");
        }
    }))
}

async fn ws_send(socket: &mut WebSocket, event: &ExecEvent) -> anyhow::Result<()> {
    socket.send(Message::Text(serde_json::to_string(event)?.into())).await?;
    Ok(())
}

async fn attach_session(engine: Arc<Engine>, id: String, mut socket: WebSocket) -> anyhow::Result<()> {
    let first = tokio::time::timeout(Duration::from_secs(30), socket.recv()).await;
    let req: AttachRequest = match first {
        Ok(Some(Ok(Message::Text(text)))) => match serde_json::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                let event = ExecEvent::Error { error: "invalid_request".into(), message: e.to_string() };
                return ws_send(&mut socket, &event).await;
            }
        },
        _ => anyhow::bail!("the client sent no attach request"),
    };
    let env = env_pairs(&req.env).map_err(ApiError::from);
    let shim_req = match (env, timeout_ms(req.timeout)) {
        (Ok(env), Ok(timeout_ms)) if !req.cmd.is_empty() => proto::ExecRequest {
            argv: req.cmd,
            env,
            cwd: req.cwd,
            user: req.user,
            tty: req.tty.map(|t| WinSize { rows: t.rows, cols: t.cols }),
            timeout_ms,
            max_output: u64::MAX,
            stdin: true,
        },
        (Err(e), _) | (_, Err(e)) => {
            return ws_send(&mut socket, &ExecEvent::Error { error: e.code.into(), message: e.message }).await
        }
        _ => {
            let event = ExecEvent::Error { error: "invalid_command".into(), message: "cmd must name a program".into() };
            return ws_send(&mut socket, &event).await;
        }
    };
    let running = engine.shim(&id).exec(shim_req).await?;
    loop {
        tokio::select! {
            event = running.next() => match event {
                Ok(Event::Started { pid }) => ws_send(&mut socket, &ExecEvent::Started { pid }).await?,
                Ok(Event::Output { stream, data }) => {
                    let tag = if stream == Stream::Stdout { FRAME_STDOUT } else { FRAME_STDERR };
                    let mut frame = Vec::with_capacity(data.len() + 1);
                    frame.push(tag);
                    frame.extend_from_slice(&data);
                    socket.send(Message::Binary(frame.into())).await?;
                }
                Ok(Event::Exited(o)) => {
                    ws_send(&mut socket, &ExecEvent::Exit(result(o, String::new(), String::new()))).await?;
                    let _ = socket.send(Message::Close(None)).await;
                    return Ok(());
                }
                Err(e) => {
                    ws_send(&mut socket, &error_event(e)).await?;
                    let _ = socket.send(Message::Close(None)).await;
                    return Ok(());
                }
            },
            incoming = socket.recv() => {
                // A failed send means the shim already finished the request: its reply is queued.
                let input = match incoming {
                    Some(Ok(Message::Binary(data))) if data.first() == Some(&FRAME_STDIN) => Some((Input::Stdin, data[1..].to_vec())),
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<AttachControl>(&text) {
                        Ok(AttachControl::Resize { rows, cols }) => Some((Input::Resize(WinSize { rows, cols }), vec![])),
                        Ok(AttachControl::Eof) => Some((Input::StdinEof, vec![])),
                        Ok(AttachControl::Signal { signal }) => Some((Input::Signal(signal), vec![])),
                        Err(e) => {
                            tracing::debug!("ignoring a malformed control frame: {e}");
                            None
                        }
                    },
                    Some(Ok(_)) => None,
                    // The client left: dropping the shim connection kills the command.
                    None | Some(Err(_)) => return Ok(()),
                };
                if let Some((input, payload)) = input {
                    let _ = running.send(&input, &payload).await;
                }
            }
        }
    }
}

// ---- sessions ----

async fn list_sessions(State(engine): AppState, ApiPath(id): ApiPath<String>) -> ApiResult<Json<SessionList>> {
    engine.live(&id).await?;
    Ok(Json(SessionList { sessions: engine.shim(&id).sessions().await? }))
}

async fn create_session(
    State(engine): AppState,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<SessionCreate>,
) -> ApiResult<Response> {
    engine.live(&id).await?;
    engine.shim(&id).open_session(req.name.clone()).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "name": req.name }))).into_response())
}

async fn close_session(
    State(engine): AppState,
    ApiPath((id, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    engine.live(&id).await?;
    engine.shim(&id).close_session(name.clone()).await?;
    Ok(Json(serde_json::json!({ "name": name, "closed": true })))
}

async fn run_in_session(
    State(engine): AppState,
    ApiPath((id, name)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<SessionRunRequest>,
) -> ApiResult<Json<ExecResult>> {
    engine.live(&id).await?;
    if req.command.contains('\0') {
        // The shell reads the command up to a NUL: the rest would run as the next call's command.
        return Err(ApiError::bad_request("invalid_command", "the command contains a NUL byte"));
    }
    let max_output = req.max_output_bytes.unwrap_or(DEFAULT_MAX_OUTPUT);
    let running = engine.shim(&id).run_in_session(name, req.command, timeout_ms(req.timeout)?, max_output).await?;
    let (outcome, stdout, stderr) = running.collect().await?;
    Ok(Json(result(outcome, encode(&stdout, Encoding::Utf8), encode(&stderr, Encoding::Utf8))))
}
