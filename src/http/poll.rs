//! `GET /pns/poll`: find the sid, parse the query, hand over to [`crate::poll`].

use super::error::ApiError;
use crate::app::App;
use crate::metrics::Outcome;
use crate::poll::{decode_cursor, PollRequest};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::Json;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

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
) -> Result<Json<crate::wire::PollAnswer>, ApiError> {
    let answer = answer(&app, query, &headers).await;
    // Every refusal counts, a 401 before any hold included: that is how an
    // operator sees clients that keep polling with a dead session.
    if answer.is_err() {
        app.metrics.answered(Outcome::error);
    }
    answer.map(Json)
}

async fn answer(
    app: &App,
    query: Option<String>,
    headers: &HeaderMap,
) -> Result<crate::wire::PollAnswer, ApiError> {
    let query: PollQuery = match query.as_deref() {
        Some(q) => serde_urlencoded::from_str(q)
            .map_err(|e| ApiError::BadRequest(format!("query string is malformed: {e}")))?,
        None => PollQuery::default(),
    };
    let sid = query
        .sid
        .as_deref()
        .or_else(|| bearer(headers))
        .or_else(|| cookie(headers, "pns_sid"))
        .ok_or(crate::session::SessionError::Missing)?;
    let session = app.sessions.validate(sid)?;
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
    let _ = query.come_from;
    crate::poll::answer(
        app,
        PollRequest {
            session,
            cursor,
            timeout,
        },
    )
    .await
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
