//! What can go wrong in an engine operation, in the engine's terms. The HTTP status and code of each
//! variant are chosen in one place: `impl From<EngineError> for ApiError` in `daemon/error.rs`.

use super::super::shim_client::ShimError;
use crate::catalog::CatalogError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no sandbox with id {0:?}")]
    SandboxNotFound(String),
    #[error("no checkpoint with id {0:?}")]
    CheckpointNotFound(String),
    #[error("no image named {0:?}")]
    ImageNotFound(String),
    /// The request asks for something invalid; `code` names what (e.g. `invalid_limits`).
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    /// The request conflicts with the current state; `code` names how (e.g. `image_in_use`).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// The sandbox could not be started (the request was valid).
    #[error("{0}")]
    StartFailed(String),
    /// The sandbox's shim failed the request, could not be reached, or speaks another protocol.
    #[error(transparent)]
    Shim(#[from] ShimError),
    #[error(transparent)]
    Network(#[from] crate::daemon::network::NetworkError),
    #[error("the catalog failed")]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl EngineError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> EngineError {
        EngineError::Invalid { code, message: message.into() }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> EngineError {
        EngineError::Conflict { code, message: message.into() }
    }
}

pub type EngineResult<T> = Result<T, EngineError>;
