//! Liveness, readiness and Prometheus metrics.

use super::error::ApiError;
use crate::app::App;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::Arc;

/// `GET /healthz`: the process answers.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 503 while draining or when the store does not answer.
pub async fn readyz(State(app): State<Arc<App>>) -> Result<Json<serde_json::Value>, ApiError> {
    if app.shutdown.is_triggered() {
        return Err(ApiError::Unavailable {
            reason: "the node is draining",
        });
    }
    app.store.ping().await.map_err(|_| ApiError::Unavailable {
        reason: "the message store is unreachable",
    })?;
    Ok(Json(json!({"status": "ready"})))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let active = app.registry.active(crate::clock::now_ms());
    let mut response = app.metrics.render(&app.hub, active).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
