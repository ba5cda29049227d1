//! Session admin and the stats summary on the internal listener.

use super::body::read_json;
use super::error::ApiError;
use crate::app::App;
use crate::metrics::Outcome;
use crate::wire::{RevokeAnswer, RevokeRequest};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::json;
use std::sync::Arc;

/// `POST /internal/v1/sessions/revoke` with `{"jti"}` or `{"user"}`.
pub async fn revoke(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RevokeAnswer>, ApiError> {
    let req: RevokeRequest = read_json(&headers, body)?;
    match (
        req.jti.filter(|j| !j.is_empty()),
        req.user.filter(|u| !u.is_empty()),
    ) {
        (Some(jti), None) => {
            let now = crate::clock::now_ms();
            let expires_ms = match req.exp {
                Some(exp) => exp.saturating_mul(1000),
                None => now.saturating_add(app.config.retention.max_age_ms),
            };
            app.revoke_session(&jti, expires_ms).await?;
        }
        (None, Some(user)) => app.revoke_user(&user).await?,
        _ => {
            return Err(ApiError::InvalidField(
                "give exactly one of jti or user".into(),
            ))
        }
    }
    Ok(Json(RevokeAnswer { revoked: true }))
}

/// `GET /internal/v1/stats`: a JSON summary of this node.
pub async fn stats(State(app): State<Arc<App>>) -> Result<Json<serde_json::Value>, ApiError> {
    let m = &app.metrics;
    let stored = app.store.message_count().await?;
    Ok(Json(json!({
        "pollsHeld": app.hub.held(),
        "messagesAccepted": m.accepted_total(),
        "messagesDelivered": m.delivered.get(),
        "messagesStored": stored,
        "duplicates": m.duplicates.get(),
        "storeErrors": m.store_errors.get(),
        "pollAnswers": {
            "message": m.answers(Outcome::message),
            "timeout": m.answers(Outcome::timeout),
            "superseded": m.answers(Outcome::superseded),
            "shutdown": m.answers(Outcome::shutdown),
            "error": m.answers(Outcome::error),
        },
    })))
}
