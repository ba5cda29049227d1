//! `PUT`/`POST /preliminary/http-notify/v1/notify`: Dovecot's
//! `push_notification` OX driver, one request per delivered recipient.
//!
//! HTTP Basic auth against `PNS_DOVECOT_USER`/`PNS_DOVECOT_PASSWORD`
//! (without them configured every request is refused with 401 and a message
//! saying so). `messageNew` becomes a type 70 message, its `from` and
//! `subject` decoded from RFC 2047; the dedup key is built from the folder,
//! UIDVALIDITY and UID, so the driver's retries store once. Other events are
//! answered 204 and dropped. The answer goes out once the message is
//! durable, which is what Dovecot waits for.
//!
//! The internal listener answers these requests without its router
//! ([`super::DirectNotify`], with the same checks); the route stays in the
//! router, which answers other methods.

use super::body::read_json;
use super::error::ApiError;
use super::notify::validate;
use crate::app::App;
use crate::ingest::mime::{decode_header_value, decode_modified_utf7, display_address};
use crate::ingest::Source;
use crate::wire::{DovecotEvent, NotifyAccepted, NotifyItem, TYPE_NEW_MAIL};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The path the driver's `url` names.
pub const PATH: &str = "/preliminary/http-notify/v1/notify";
/// The event the driver sends for a delivered message.
pub const EVENT_MESSAGE_NEW: &str = "messageNew";
/// Longest dedup key the store is given; longer ones are hashed.
const MAX_DEDUP_KEY_LEN: usize = super::notify::MAX_DEDUP_KEY_LEN;

/// Lets a request through only with the configured Basic credentials, the
/// 401 otherwise; runs before the body is read.
pub fn refuse(app: &App, headers: &HeaderMap) -> Option<Response> {
    let e = check_credentials(app, headers).err()?;
    let mut response = e.into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"pns\", charset=\"UTF-8\""),
    );
    Some(response)
}

pub async fn notify(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match accept(&app, &headers, body).await {
        Ok(Some(accepted)) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

fn check_credentials(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    static UNCONFIGURED_LOGGED: AtomicBool = AtomicBool::new(false);
    let Some(expected) = &app.config.dovecot else {
        if !UNCONFIGURED_LOGGED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "a Dovecot push notification was refused: PNS_DOVECOT_USER and \
                 PNS_DOVECOT_PASSWORD are not set"
            );
        }
        return Err(ApiError::Unauthorized(
            "the Dovecot endpoint is off: set PNS_DOVECOT_USER and PNS_DOVECOT_PASSWORD \
             and put them in push_notification_driver's url",
        ));
    };
    let (user, password) = basic_credentials(headers).ok_or(ApiError::Unauthorized(
        "the Dovecot endpoint needs HTTP Basic auth (user:password in the driver's url)",
    ))?;
    // Both compared, always, so timing tells nothing about which was wrong.
    let user_ok = super::constant_time_eq(user.as_bytes(), expected.user.as_bytes());
    let password_ok = super::constant_time_eq(password.as_bytes(), expected.password.as_bytes());
    if !(user_ok & password_ok) {
        return Err(ApiError::Unauthorized(
            "the Dovecot endpoint's user or password is wrong",
        ));
    }
    Ok(())
}

/// `Authorization: Basic base64(user:password)`.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Store a `messageNew`; `None` for an event that is not notified.
async fn accept(
    app: &App,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Option<NotifyAccepted>, ApiError> {
    let event: DovecotEvent = read_json(headers, body)?;
    let Some(name) = event.event.as_deref() else {
        return Err(ApiError::InvalidField("event: missing".into()));
    };
    if !name.eq_ignore_ascii_case(EVENT_MESSAGE_NEW) {
        tracing::debug!(event = name, "Dovecot event ignored");
        return Ok(None);
    }
    let user = event
        .user
        .clone()
        .ok_or_else(|| ApiError::InvalidField("user: missing".into()))?;
    let folder = event
        .folder
        .as_deref()
        .map(decode_modified_utf7)
        .unwrap_or_else(|| "INBOX".to_owned());
    let mut data = serde_json::Map::new();
    data.insert("folder".into(), folder.as_str().into());
    if let Some(uid) = event.uid {
        data.insert("uid".into(), uid.into());
    }
    if let Some(uidvalidity) = event.uidvalidity {
        data.insert("uidValidity".into(), uidvalidity.into());
    }
    if let Some(from) = event.from.as_deref().and_then(display_address) {
        data.insert("from".into(), from.into());
    }
    if let Some(subject) = event.subject.as_deref() {
        data.insert("subject".into(), decode_header_value(subject).into());
    }
    if let Some(snippet) = event.snippet.as_deref() {
        let snippet =
            crate::ingest::mime::make_snippet(snippet, crate::ingest::mime::SNIPPET_CHARS);
        data.insert("snippet".into(), snippet.into());
    }
    if let Some(unseen) = event.unseen {
        data.insert("unseen".into(), unseen.into());
    }
    let data = serde_json::value::to_raw_value(&data)
        .map_err(|e| ApiError::Internal(anyhow::Error::new(e)))?;
    let item = NotifyItem {
        user,
        kind: TYPE_NEW_MAIL,
        data: Some(data),
        dedup_key: Some(dedup_key(&folder, &event)),
        delay_ms: None,
    };
    let message = validate(item, "", app.config.retention.max_age_ms)?;
    let report = app.ingest.accept(vec![message], Source::Dovecot).await?;
    Ok(Some(NotifyAccepted {
        accepted: report.accepted,
        duplicates: report.duplicates,
        ids: report.ids,
    }))
}

/// One key per delivered message: folder, UIDVALIDITY and UID identify it in
/// IMAP. Without a UID (not sent by Dovecot, but possible from others) the
/// whole event is the key, so at least an identical retry is recognised.
fn dedup_key(folder: &str, event: &DovecotEvent) -> String {
    let key = match (event.uidvalidity, event.uid) {
        (Some(validity), Some(uid)) => format!("dovecot:{validity}:{uid}:{folder}"),
        _ => format!(
            "dovecot:{folder}:{}:{}:{}",
            event.from.as_deref().unwrap_or(""),
            event.subject.as_deref().unwrap_or(""),
            event.snippet.as_deref().unwrap_or("")
        ),
    };
    if key.len() <= MAX_DEDUP_KEY_LEN {
        return key;
    }
    use sha2::{Digest, Sha256};
    let hex: String = Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("dovecot:sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> DovecotEvent {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_key_is_folder_uidvalidity_and_uid() {
        let e = event(r#"{"event":"messageNew","imap-uidvalidity":7,"imap-uid":2}"#);
        assert_eq!(dedup_key("INBOX", &e), "dovecot:7:2:INBOX");
        let long = "x".repeat(400);
        let k = dedup_key(&long, &e);
        assert!(k.starts_with("dovecot:sha256:") && k.len() <= MAX_DEDUP_KEY_LEN);
        let no_uid = event(r#"{"event":"messageNew","subject":"a"}"#);
        assert_eq!(dedup_key("INBOX", &no_uid), dedup_key("INBOX", &no_uid));
    }

    #[test]
    fn basic_credentials_are_read_from_the_header() {
        let mut h = HeaderMap::new();
        // "dove:pw:with:colons"
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic ZG92ZTpwdzp3aXRoOmNvbG9ucw=="),
        );
        assert_eq!(
            basic_credentials(&h),
            Some(("dove".into(), "pw:with:colons".into()))
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(basic_credentials(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(basic_credentials(&h), None);
    }
}
