//! `GET /pns/poll`: check the client address's rate, find and check the sid
//! (a JWT, or an opaque sid registered by the webmail), check the session's
//! rate, note the poll in the session registry, and hand over to
//! [`crate::poll`].

use super::error::ApiError;
use crate::app::App;
use crate::metrics::{LimitScope, Outcome};
use crate::poll::{decode_cursor, PollRequest};
use crate::registry::sanitize_come_from;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::{Extension, Json};
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Default, Deserialize)]
struct PollQuery {
    sid: Option<String>,
    #[serde(rename = "comeFrom")]
    come_from: Option<String>,
    cursor: Option<String>,
    timeout: Option<String>,
}

pub async fn poll(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Result<Json<crate::wire::PollAnswer>, ApiError> {
    let peer = peer.map(|Extension(ConnectInfo(addr))| addr.ip());
    let result = poll_inner(&app, query, headers, peer).await;
    if result.is_err() {
        app.metrics.answered(Outcome::error);
    }
    result.map(Json)
}

async fn poll_inner(
    app: &App,
    query: Option<String>,
    headers: HeaderMap,
    peer: Option<std::net::IpAddr>,
) -> Result<crate::wire::PollAnswer, ApiError> {
    let address = crate::address::client_address(peer, &headers, &app.config.trusted_proxies);
    if let Some(ip) = address {
        app.address_limits
            .check(&crate::address::rate_key(ip), Instant::now())
            .map_err(|wait| rate_limited(app, LimitScope::address, wait))?;
    }
    let query: PollQuery = match query.as_deref() {
        Some(q) => serde_urlencoded::from_str(q)
            .map_err(|e| ApiError::BadRequest(format!("query string is malformed: {e}")))?,
        None => PollQuery::default(),
    };
    let sid = query
        .sid
        .as_deref()
        .or_else(|| bearer(&headers))
        .or_else(|| cookie(&headers, "pns_sid"))
        .ok_or(crate::session::SessionError::Missing)?;
    let now_ms = crate::clock::now_ms();
    let opaque = !sid.is_empty() && !crate::opaque::looks_like_jwt(sid);
    let session = if opaque {
        app.opaque.resolve(sid, &app.sessions, now_ms).await?
    } else {
        app.sessions.validate(sid)?
    };
    app.session_limits
        .check(&session.key, Instant::now())
        .map_err(|wait| rate_limited(app, LimitScope::session, wait))?;
    let hold = app.config.hold;
    let timeout = match query.timeout.as_deref() {
        None | Some("") => hold,
        Some(t) => {
            let secs: u64 = t.parse().map_err(|_| {
                ApiError::BadRequest(format!(
                    "timeout must be whole seconds from 0 to {}",
                    hold.as_secs()
                ))
            })?;
            Duration::from_secs(secs).min(hold)
        }
    };
    let cursor = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(decode_cursor(c)?),
    };
    let come_from = query.come_from.as_deref().and_then(sanitize_come_from);
    app.metrics.polled_from(come_from.as_deref());
    app.registry
        .polled(&session, opaque, come_from.as_deref(), address, now_ms);
    // Let go of the headers before the hold: on a connection served by
    // hyper they are slices of its 8 KiB read buffer, which the held poll
    // would otherwise keep; on our own front they are copies, small but
    // not needed either.
    drop(headers);
    let key = session.key.clone();
    let answer = crate::poll::answer(
        app,
        PollRequest {
            session,
            cursor,
            timeout,
        },
    )
    .await?;
    if answer.c > 0 {
        app.registry.delivered(&key, answer.c as u64);
    }
    Ok(answer)
}

fn rate_limited(app: &App, scope: LimitScope, wait: Duration) -> ApiError {
    app.metrics.rate_limited(scope);
    ApiError::RateLimited {
        retry_after_secs: crate::limits::retry_after_secs(wait),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}
