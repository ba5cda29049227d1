//! The one error type of both HTTP surfaces. Each variant's status, its
//! `errorCode` and any `Retry-After` are decided here and nowhere else.
//! Store and internal errors are logged with context and never shown to
//! clients.

use crate::session::SessionError;
use crate::store::StoreError;
use crate::wire::ErrorBody;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// How long clients are told to wait when the node cannot serve them.
pub const UNAVAILABLE_RETRY_SECS: u64 = 120;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `BAD_REQUEST`: malformed query, JSON or cursor.
    #[error("{0}")]
    BadRequest(String),
    /// 401 `SESSION_INVALID`: missing, malformed, forged, expired or revoked sid.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// 401 `UNAUTHORIZED`: missing or wrong internal API credentials.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 404 `NOT_FOUND`.
    #[error("no such endpoint")]
    NotFound,
    /// 408 `REQUEST_TIMEOUT`: the request body did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// 413 `PAYLOAD_TOO_LARGE`.
    #[error("{0}")]
    TooLarge(String),
    /// 414 `URI_TOO_LONG`.
    #[error("{0}")]
    UriTooLong(String),
    /// 415 `UNSUPPORTED_MEDIA_TYPE`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422 `INVALID_FIELD`: well-formed JSON with a field that is wrong.
    #[error("{0}")]
    InvalidField(String),
    /// 501 `NOT_IMPLEMENTED`: what this node's configuration does not offer.
    #[error("{0}")]
    NotImplemented(&'static str),
    /// 429 `RATE_LIMITED`, with `Retry-After`.
    #[error("too many requests")]
    RateLimited { retry_after_secs: u64 },
    /// 503 `UNAVAILABLE`, with `Retry-After`: store unreachable or node draining.
    #[error("{reason}")]
    Unavailable { reason: &'static str },
    /// 500 `INTERNAL`: logged, never detailed to the client.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "store unavailable");
            ApiError::Unavailable {
                reason: "the message store is unreachable; retry later",
            }
        } else {
            ApiError::Internal(anyhow::Error::new(e))
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Session(_) | ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidField(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "BAD_REQUEST",
            ApiError::Session(_) => "SESSION_INVALID",
            ApiError::Unauthorized(_) => "UNAUTHORIZED",
            ApiError::NotFound => "NOT_FOUND",
            ApiError::RequestTimeout(_) => "REQUEST_TIMEOUT",
            ApiError::TooLarge(_) => "PAYLOAD_TOO_LARGE",
            ApiError::UriTooLong(_) => "URI_TOO_LONG",
            ApiError::UnsupportedMediaType(_) => "UNSUPPORTED_MEDIA_TYPE",
            ApiError::InvalidField(_) => "INVALID_FIELD",
            ApiError::NotImplemented(_) => "NOT_IMPLEMENTED",
            ApiError::RateLimited { .. } => "RATE_LIMITED",
            ApiError::Unavailable { .. } => "UNAVAILABLE",
            ApiError::Internal(_) => "INTERNAL",
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            ApiError::Unavailable { .. } => Some(UNAVAILABLE_RETRY_SECS),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = match &self {
            ApiError::Internal(e) => {
                tracing::error!(error = ?e, "internal error");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let body = ErrorBody {
            c: 0,
            msg: [],
            error_code: self.code(),
            error: &message,
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (self.status(), json).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after() {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
