//! Session admin and the stats summary on the internal listener:
//! revocation, the list of a user's active sessions, opaque session
//! registration and deletion, `GET /internal/v1/stats`, and
//! `GET /internal/v1/backup`.

use super::body::read_json;
use super::error::ApiError;
use super::notify::check_user;
use crate::app::App;
use crate::metrics::{LimitScope, Outcome};
use crate::opaque::{check_sid, is_sid_hash, sid_hash, MAX_TTL_SECS};
use crate::wire::{
    DeleteAnswer, DeleteSession, LatencyStats, RegisterSession, RegisteredSession, RevokeAnswer,
    RevokeRequest, SessionInfo, SessionList, Stats,
};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    user: Option<String>,
}

/// `GET /internal/v1/sessions?user=…`: the user's active sessions on this node.
pub async fn list_sessions(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
) -> Result<Json<SessionList>, ApiError> {
    let query: ListQuery = match query.as_deref() {
        Some(q) => serde_urlencoded::from_str(q)
            .map_err(|e| ApiError::BadRequest(format!("query string is malformed: {e}")))?,
        None => ListQuery::default(),
    };
    let user = query.user.filter(|u| !u.trim().is_empty()).ok_or_else(|| {
        ApiError::BadRequest("user: give the user whose sessions to list, as ?user=".into())
    })?;
    let user = user.trim().to_owned();
    let held = app.hub.held_by_session(&user);
    let sessions = app
        .registry
        .for_user(&user, crate::clock::now_ms())
        .into_iter()
        .map(|a| SessionInfo {
            polls_held: held.get(&a.key).copied().unwrap_or(0),
            jti: a.key,
            user: a.user,
            kind: if a.opaque { "opaque" } else { "jwt" }.to_owned(),
            come_from: a.come_from,
            address: a.address.map(|ip| ip.to_string()),
            first_poll_ms: a.first_poll_ms,
            last_poll_ms: a.last_poll_ms,
            messages_delivered: a.delivered,
            expires_ms: a.expires_ms,
        })
        .collect();
    Ok(Json(SessionList { user, sessions }))
}

/// `POST /internal/v1/sessions`: register an opaque sid for a user.
pub async fn register_session(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RegisteredSession>), ApiError> {
    let req: RegisterSession = read_json(&headers, body)?;
    check_sid(&req.sid).map_err(|why| ApiError::InvalidField(format!("sid: {why}")))?;
    let user =
        check_user(&req.user).map_err(|why| ApiError::InvalidField(format!("user: {why}")))?;
    if !(1..=MAX_TTL_SECS).contains(&req.ttl_secs) {
        return Err(ApiError::InvalidField(format!(
            "ttlSecs: must be from 1 to {MAX_TTL_SECS}, not {}",
            req.ttl_secs
        )));
    }
    let (jti, stored) = app
        .register_opaque_session(&req.sid, user, req.ttl_secs)
        .await?;
    tracing::info!(user = %stored.user, jti = %&jti[..12], "opaque session registered");
    Ok((
        StatusCode::CREATED,
        Json(RegisteredSession {
            jti,
            user: stored.user,
            start_ms: stored.start_ms,
            expires_ms: stored.expires_ms,
        }),
    ))
}

/// `DELETE /internal/v1/sessions` with `{"sid": …}`: end an opaque session.
pub async fn delete_session(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DeleteAnswer>, ApiError> {
    let req: DeleteSession = read_json(&headers, body)?;
    if req.sid.is_empty() {
        return Err(ApiError::InvalidField("sid: must not be empty".into()));
    }
    let deleted = app.delete_opaque_session(&sid_hash(&req.sid)).await?;
    Ok(Json(DeleteAnswer { deleted }))
}

/// `DELETE /internal/v1/sessions/{jti}`: the same, by the sid's hash.
pub async fn delete_session_by_id(
    State(app): State<Arc<App>>,
    Path(jti): Path<String>,
) -> Result<Json<DeleteAnswer>, ApiError> {
    if !is_sid_hash(&jti) {
        return Err(ApiError::BadRequest(
            "the session id of an opaque session is the hex SHA-256 of its sid (64 lowercase hex digits)"
                .into(),
        ));
    }
    let deleted = app.delete_opaque_session(&jti).await?;
    Ok(Json(DeleteAnswer { deleted }))
}

/// `GET /internal/v1/stats`: a JSON summary of this node.
pub async fn stats(State(app): State<Arc<App>>) -> Result<Json<Stats>, ApiError> {
    let m = &app.metrics;
    let stored = app.store.message_count().await?;
    let latency = m.latency_summary();
    Ok(Json(Stats {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_secs: m.uptime().as_secs(),
        hold_secs: app.config.hold.as_secs(),
        sessions_active: app.registry.active(crate::clock::now_ms()),
        polls_held: app.hub.held(),
        messages_accepted: m.accepted_total(),
        messages_delivered: m.delivered.get(),
        messages_stored: stored,
        duplicates: m.duplicates.get(),
        store_errors: m.store_errors.get(),
        poll_answers: Outcome::ALL
            .into_iter()
            .map(|o| (o.as_str().to_owned(), m.answers(o)))
            .collect(),
        rate_limited: [
            ("session", LimitScope::session),
            ("address", LimitScope::address),
        ]
        .into_iter()
        .map(|(name, scope)| (name.to_owned(), m.rate_limited_count(scope)))
        .collect(),
        delivery_latency_ms: LatencyStats {
            p50: latency.map(|l| l.p50_ms),
            p99: latency.map(|l| l.p99_ms),
            samples: latency.map_or(0, |l| l.samples),
        },
        come_from: m.come_from_counts().into_iter().collect(),
    }))
}

/// `GET /internal/v1/backup`: the store as one SQLite file, a copy of one
/// moment, streamed (`pns backup`). A PostgreSQL store has its own tools.
pub async fn backup(State(app): State<Arc<App>>) -> Result<axum::response::Response, ApiError> {
    use axum::http::header;
    use axum::response::IntoResponse;
    let Some(file) = app.store.backup().await? else {
        return Err(ApiError::NotImplemented(
            "this node's store is PostgreSQL: back it up with PostgreSQL's own tools (pg_dump)",
        ));
    };
    let length = file
        .metadata()
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e).context("the backup's size")))?
        .len();
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(
        tokio::fs::File::from_std(file),
    ));
    Ok((
        [
            (header::CONTENT_TYPE, "application/vnd.sqlite3".to_owned()),
            (header::CONTENT_LENGTH, length.to_string()),
        ],
        body,
    )
        .into_response())
}
