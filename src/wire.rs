//! The JSON on the wire, request and response, in one place so that it can be
//! read side by side with SPEC.md.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Messages one poll answer carries at most.
pub const MAX_MESSAGES_PER_ANSWER: usize = 100;
/// Messages one notify batch carries at most.
pub const MAX_BATCH: usize = 1000;
/// The message type of new mail.
pub const TYPE_NEW_MAIL: i64 = 70;

/// `200` answer of `GET /pns/poll`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PollAnswer {
    pub c: usize,
    pub msg: Vec<WireMessage>,
    pub cursor: String,
    pub more: bool,
}

/// One message in a poll answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireMessage {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: i64,
    /// Unix ms when it was accepted.
    pub time: i64,
    pub data: Box<RawValue>,
}

/// Body of every error answer, on both listeners.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub c: usize,
    pub msg: [(); 0],
    #[serde(rename = "errorCode")]
    pub error_code: &'a str,
    pub error: &'a str,
}

/// `POST /internal/v1/notify`: one message, or `{"messages": [...]}`.
///
/// All fields are optional at this level so that one parse serves both shapes
/// and the error can name exactly what is missing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NotifyBody {
    pub messages: Option<Vec<NotifyItem>>,
    pub user: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<i64>,
    pub data: Option<Box<RawValue>>,
    pub dedup_key: Option<String>,
    pub delay_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NotifyItem {
    pub user: String,
    #[serde(rename = "type")]
    pub kind: i64,
    pub data: Option<Box<RawValue>>,
    pub dedup_key: Option<String>,
    pub delay_ms: Option<u64>,
}

/// `PUT`/`POST /preliminary/http-notify/v1/notify`: what Dovecot's
/// `push_notification` OX driver sends (`from` and `subject` still RFC 2047
/// encoded). Keys this does not know are ignored: other Dovecot versions
/// may add some.
#[derive(Debug, Deserialize)]
pub struct DovecotEvent {
    pub user: Option<String>,
    /// `messageNew` for a delivery.
    pub event: Option<String>,
    pub folder: Option<String>,
    #[serde(rename = "imap-uidvalidity")]
    pub uidvalidity: Option<u64>,
    #[serde(rename = "imap-uid")]
    pub uid: Option<u64>,
    pub from: Option<String>,
    pub subject: Option<String>,
    pub snippet: Option<String>,
    pub unseen: Option<u64>,
}

/// `202` answer of a notify.
#[derive(Debug, Serialize, Deserialize)]
pub struct NotifyAccepted {
    pub accepted: usize,
    pub duplicates: usize,
    /// One id per message sent, in order; a duplicate's is the stored one's.
    pub ids: Vec<String>,
}

/// `POST /internal/v1/sessions/revoke`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub jti: Option<String>,
    pub user: Option<String>,
    /// With `jti`: when its token expires (unix seconds), so the revocation
    /// can be forgotten then. Without it, kept for the retention age.
    pub exp: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RevokeAnswer {
    pub revoked: bool,
}
