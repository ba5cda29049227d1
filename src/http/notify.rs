//! `POST /internal/v1/notify`: one message or a batch, validated whole, then
//! handed to [`crate::ingest`]. The 202 goes out only after the commit.

use super::body::read_json;
use super::error::ApiError;
use crate::app::App;
use crate::ingest::Source;
use crate::server::{Answering, DirectRoute};
use crate::store::NewMessage;
use crate::wire::{NotifyAccepted, NotifyBody, NotifyItem, MAX_BATCH};
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::value::RawValue;
use std::net::SocketAddr;
use std::sync::Arc;

/// The path of the notify endpoint.
pub const PATH: &str = "/internal/v1/notify";

/// Limits on the fields of a message.
pub const MAX_USER_LEN: usize = 320;
pub const MAX_DEDUP_KEY_LEN: usize = 256;
pub const MAX_DATA_BYTES: usize = 64 * 1024;
pub const MAX_TYPE: i64 = 32767;

pub async fn notify(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<NotifyAccepted>), ApiError> {
    let body: NotifyBody = read_json(&headers, body)?;
    let batch = into_batch(body, app.config.retention.max_age_ms)?;
    let report = app.ingest.accept(batch, Source::Api).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(NotifyAccepted {
            accepted: report.accepted,
            duplicates: report.duplicates,
            ids: report.ids,
        }),
    ))
}

/// The notify endpoints answered without the internal router
/// ([`DirectRoute`]): `POST /internal/v1/notify` and Dovecot's `PUT` or
/// `POST` ([`super::dovecot`]), each with the same checks as the router's
/// layer ([`super::limits`]), the same handler, and the `no-store` the
/// router's layer adds. Every message a delivery agent sends passes here.
pub struct DirectNotify {
    app: Arc<App>,
}

impl DirectNotify {
    pub fn new(app: Arc<App>) -> Self {
        DirectNotify { app }
    }
}

/// The endpoint a request [`DirectNotify`] takes is for.
#[derive(Clone, Copy)]
pub(super) enum Endpoint {
    Api,
    Dovecot,
}

impl Endpoint {
    /// Who may call this endpoint: the answer to send instead, when the
    /// caller may not. The router's checks layer uses the same.
    pub(super) fn refuse(self) -> fn(&App, &HeaderMap) -> Option<Response> {
        match self {
            Endpoint::Api => super::refuse_internal,
            Endpoint::Dovecot => super::dovecot::refuse,
        }
    }

    fn of(req: &Request<Body>) -> Option<Endpoint> {
        let path = req.uri().path();
        match *req.method() {
            Method::POST if path == PATH => Some(Endpoint::Api),
            Method::POST | Method::PUT if path == super::dovecot::PATH => Some(Endpoint::Dovecot),
            _ => None,
        }
    }

    /// The answer to `req`, a request for this endpoint, but the
    /// `no-store`: what the router's checks layer and handler give.
    async fn answer(self, app: Arc<App>, req: Request<Body>) -> Response {
        let (parts, body) = req.into_parts();
        let bytes =
            match super::limits::checked_body(&app, self.refuse(), &parts.headers, body).await {
                Ok(bytes) => bytes,
                Err(refused) => return refused,
            };
        match self {
            Endpoint::Api => notify(State(app), parts.headers, Ok(bytes))
                .await
                .into_response(),
            Endpoint::Dovecot => super::dovecot::notify(State(app), parts.headers, Ok(bytes)).await,
        }
    }
}

impl DirectRoute for DirectNotify {
    fn takes(&self, req: &Request<Body>) -> bool {
        Endpoint::of(req).is_some()
    }

    fn answer(&self, req: Request<Body>, _peer: SocketAddr) -> Answering {
        let app = self.app.clone();
        Box::pin(async move {
            let mut response = match Endpoint::of(&req) {
                Some(endpoint) => endpoint.answer(app, req).await,
                // Never: `takes` lets only the two endpoints through.
                None => ApiError::NotFound.into_response(),
            };
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, super::NO_STORE);
            response
        })
    }
}

/// Turn either shape into validated messages; any bad item refuses the whole.
fn into_batch(body: NotifyBody, max_delay_ms: i64) -> Result<Vec<NewMessage>, ApiError> {
    match body.messages {
        Some(items) => {
            if body.user.is_some()
                || body.kind.is_some()
                || body.data.is_some()
                || body.dedup_key.is_some()
                || body.delay_ms.is_some()
            {
                return Err(ApiError::InvalidField(
                    "a batch has only \"messages\"; put user, type and data inside each message"
                        .into(),
                ));
            }
            if items.is_empty() {
                return Err(ApiError::InvalidField(
                    "messages: the batch is empty".into(),
                ));
            }
            if items.len() > MAX_BATCH {
                return Err(ApiError::TooLarge(format!(
                    "messages: a batch holds at most {MAX_BATCH} messages, not {}",
                    items.len()
                )));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| validate(item, &format!("messages[{i}]."), max_delay_ms))
                .collect()
        }
        None => {
            let user = body
                .user
                .ok_or_else(|| ApiError::InvalidField("user: missing".into()))?;
            let kind = body
                .kind
                .ok_or_else(|| ApiError::InvalidField("type: missing".into()))?;
            let item = NotifyItem {
                user,
                kind,
                data: body.data,
                dedup_key: body.dedup_key,
                delay_ms: body.delay_ms,
            };
            Ok(vec![validate(item, "", max_delay_ms)?])
        }
    }
}

/// Check one message; `at` prefixes field names in errors (`messages[3].`).
pub fn validate(item: NotifyItem, at: &str, max_delay_ms: i64) -> Result<NewMessage, ApiError> {
    let bad = |field: &str, why: String| ApiError::InvalidField(format!("{at}{field}: {why}"));
    let user = check_user(&item.user).map_err(|why| bad("user", why))?;
    if !(1..=MAX_TYPE).contains(&item.kind) {
        return Err(bad(
            "type",
            format!("must be from 1 to {MAX_TYPE}, not {}", item.kind),
        ));
    }
    let data = match item.data {
        None => "{}".to_owned(),
        Some(raw) => check_data(raw).map_err(|why| bad("data", why))?,
    };
    let dedup_key = match item.dedup_key {
        Some(k) if k.is_empty() => return Err(bad("dedupKey", "must not be empty".into())),
        Some(k) if k.len() > MAX_DEDUP_KEY_LEN => {
            return Err(bad(
                "dedupKey",
                format!("longer than {MAX_DEDUP_KEY_LEN} bytes"),
            ))
        }
        other => other,
    };
    let delay_ms = item.delay_ms.unwrap_or(0);
    if i64::try_from(delay_ms).map_or(true, |d| d > max_delay_ms) {
        return Err(bad(
            "delayMs",
            format!("must be at most the retention age, {max_delay_ms} ms"),
        ));
    }
    Ok(NewMessage {
        user: user.to_owned(),
        kind: item.kind,
        data,
        dedup_key,
        delay_ms,
    })
}

/// A mailbox address as PNS takes it: trimmed, not empty, at most
/// [`MAX_USER_LEN`] bytes, without spaces or control characters.
pub fn check_user(user: &str) -> Result<&str, String> {
    let user = user.trim();
    if user.is_empty() {
        return Err("must not be empty".into());
    }
    if user.len() > MAX_USER_LEN {
        return Err(format!("longer than {MAX_USER_LEN} bytes"));
    }
    if user.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain spaces or control characters".into());
    }
    Ok(user)
}

fn check_data(raw: Box<RawValue>) -> Result<String, String> {
    let text = raw.get();
    if !text.trim_start().starts_with('{') {
        return Err("must be a JSON object".into());
    }
    if text.len() > MAX_DATA_BYTES {
        return Err(format!("larger than {MAX_DATA_BYTES} bytes"));
    }
    Ok(String::from(Box::<str>::from(raw)))
}
