//! API errors: every failure is a JSON body `{"error": CODE, "message": ...}` with a fitting status.
//! The engine's, the shim's and the files API's errors become HTTP answers here and nowhere else.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use sandbox::files::FilesError;

use super::engine::EngineError;
use super::shim_client::ShimError;
use crate::api::ErrorBody;
use crate::catalog::CatalogError;
use crate::shim::proto::ErrorKind;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, code, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody { error: self.code.to_string(), message: self.message.clone() }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let message = crate::errors::error_chain(&e);
        match e {
            EngineError::SandboxNotFound(_) => ApiError::not_found("sandbox_not_found", message),
            EngineError::CheckpointNotFound(_) => ApiError::not_found("checkpoint_not_found", message),
            EngineError::ImageNotFound(_) => ApiError::not_found("image_not_found", message),
            EngineError::Invalid { code, .. } => ApiError::bad_request(code, message),
            EngineError::Conflict { code, .. } => ApiError::conflict(code, message),
            EngineError::StartFailed(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "sandbox_start_failed", message)
            }
            EngineError::Network(e) => {
                use crate::daemon::network::NetworkError as N;
                let status = match e {
                    N::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "network_unavailable"),
                    N::Firewall(_) => (StatusCode::INTERNAL_SERVER_ERROR, "firewall_failed"),
                    N::Listen { .. } => (StatusCode::CONFLICT, "port_unavailable"),
                    N::AlreadyPublished(_) => (StatusCode::CONFLICT, "port_published"),
                    N::NotPublished(_) => (StatusCode::NOT_FOUND, "port_not_published"),
                    N::TooManyPorts => (StatusCode::BAD_REQUEST, "too_many_ports"),
                    N::NotNat => (StatusCode::BAD_REQUEST, "not_nat_network"),
                };
                ApiError::new(status.0, status.1, message)
            }
            EngineError::Shim(e) => e.into(),
            EngineError::Catalog(e) => e.into(),
            EngineError::Internal(e) => e.into(),
        }
    }
}

impl From<ShimError> for ApiError {
    fn from(e: ShimError) -> Self {
        let (status, code) = match &e {
            ShimError::Reported { kind, .. } => match kind {
                ErrorKind::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
                ErrorKind::StartFailed => (StatusCode::BAD_REQUEST, "start_failed"),
                ErrorKind::SessionNotFound => (StatusCode::NOT_FOUND, "session_not_found"),
                ErrorKind::SessionExists => (StatusCode::CONFLICT, "session_exists"),
                ErrorKind::SessionLost => (StatusCode::GONE, "session_ended"),
                ErrorKind::SessionRolledBack => (StatusCode::CONFLICT, "session_rolled_back"),
                ErrorKind::CheckpointFailed => (StatusCode::INTERNAL_SERVER_ERROR, "checkpoint_failed"),
                ErrorKind::CheckpointUnsupported => (StatusCode::UNPROCESSABLE_ENTITY, "checkpoint_unsupported"),
                ErrorKind::NoSpace => (StatusCode::INSUFFICIENT_STORAGE, "no_space"),
                ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
            ShimError::Incompatible { .. } => (StatusCode::CONFLICT, "incompatible_shim"),
            ShimError::Unreachable { .. } | ShimError::Lost { .. } | ShimError::Timeout { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "shim_unavailable")
            }
            ShimError::Unexpected { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!("{}", crate::errors::error_chain(&e));
        }
        ApiError::new(status, code, crate::errors::error_chain(&e))
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        anyhow::Error::from(e).into()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        if crate::errors::is_disk_full(&e) {
            tracing::warn!("the data directory's disk is full: {e:#}");
            return ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "no_space", format!("{e:#}"));
        }
        tracing::error!("internal error: {e:#}");
        ApiError::internal(format!("{e:#}"))
    }
}

impl From<FilesError> for ApiError {
    fn from(e: FilesError) -> Self {
        let status = match &e {
            FilesError::NotFound { .. } => StatusCode::NOT_FOUND,
            FilesError::AlreadyExists { .. } | FilesError::DirectoryNotEmpty { .. } | FilesError::ReadOnly { .. } => {
                StatusCode::CONFLICT
            }
            FilesError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
            FilesError::OpenRoot { .. } | FilesError::Io { .. } | FilesError::WriteOutput { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => StatusCode::BAD_REQUEST,
        };
        let code = match &e {
            FilesError::NotFound { .. } => "file_not_found",
            other => other.code(),
        };
        ApiError::new(status, code, crate::errors::error_chain(&e))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// `Json<T>` whose rejections are API errors.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => {
                Err(ApiError::bad_request("invalid_request", "send the body as JSON (Content-Type: application/json)"))
            }
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ApiError::bad_request("invalid_json", e.body_text())),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                e.status(),
                "payload_too_large",
                format!("{} (JSON bodies are limited to 64 MiB; upload files with the files API)", e.body_text()),
            )),
            Err(e) => Err(ApiError::bad_request("invalid_request", e.body_text())),
        }
    }
}

/// `Query<T>` whose rejections are API errors.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| ApiError::bad_request("invalid_request", e.body_text()))
    }
}

/// `Path<T>` whose rejections are API errors.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e: PathRejection| ApiError::bad_request("invalid_request", e.body_text()))
    }
}
