//! The JSON on the wire, request and response, in one place so that it can be
//! read side by side with SPEC.md.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;

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

impl PollAnswer {
    /// The answer's JSON, in a buffer sized for it up front: serde_json's
    /// own starts at 128 bytes and grows, which took a reallocation for
    /// most answers of one message.
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.json_len_bound());
        serde_json::to_writer(&mut out, self)?;
        Ok(out)
    }

    /// At least the length of the answer's JSON: the keys, punctuation and
    /// numbers (20 characters at most, an i64's), the cursor, and each
    /// message's id and data (ids and cursors are ours, with nothing to
    /// escape; data is JSON already).
    fn json_len_bound(&self) -> usize {
        let per_message = |m: &WireMessage| 80 + m.id.len() + m.data.get().len();
        96 + self.cursor.len() + self.msg.iter().map(per_message).sum::<usize>()
    }
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

/// `POST /internal/v1/sessions`: register an opaque (non-JWT) sid.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegisterSession {
    pub sid: String,
    pub user: String,
    pub ttl_secs: u64,
}

/// `201` answer of a registration. `jti` is the hex SHA-256 of the sid: the
/// session's id in the session list, for revocation and deletion.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisteredSession {
    pub jti: String,
    pub user: String,
    /// Unix ms: where the session's news begins.
    pub start_ms: i64,
    /// Unix ms: when the sid stops being accepted.
    pub expires_ms: i64,
}

/// `DELETE /internal/v1/sessions` with the sid itself.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteSession {
    pub sid: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DeleteAnswer {
    pub deleted: bool,
}

/// `GET /internal/v1/sessions?user=…`
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionList {
    pub user: String,
    pub sessions: Vec<SessionInfo>,
}

/// One active session of a user on this node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    /// The token's `jti` (a hash of the token without one), or for an
    /// opaque session the hex SHA-256 of its sid.
    pub jti: String,
    pub user: String,
    /// `jwt` or `opaque`.
    pub kind: String,
    /// The client tag of the latest poll, cleaned.
    pub come_from: Option<String>,
    /// The client address of the latest poll.
    pub address: Option<String>,
    /// Unix ms.
    pub first_poll_ms: i64,
    /// Unix ms.
    pub last_poll_ms: i64,
    pub polls_held: usize,
    pub messages_delivered: u64,
    /// Unix ms: when the session expires.
    pub expires_ms: i64,
}

/// `GET /internal/v1/stats`: a summary of this node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub version: String,
    pub uptime_secs: u64,
    pub hold_secs: u64,
    pub sessions_active: usize,
    pub polls_held: usize,
    pub messages_accepted: u64,
    pub messages_delivered: u64,
    /// Visible and delayed messages in the store (cluster-wide on PostgreSQL).
    pub messages_stored: i64,
    pub duplicates: u64,
    pub store_errors: u64,
    /// Poll answers by outcome.
    pub poll_answers: BTreeMap<String, u64>,
    /// Polls refused with 429, by limit (`session`, `address`).
    pub rate_limited: BTreeMap<String, u64>,
    /// Over the latest deliveries (up to 4096).
    pub delivery_latency_ms: LatencyStats,
    /// Polls by client tag, as in the metrics.
    pub come_from: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LatencyStats {
    pub p50: Option<u32>,
    pub p99: Option<u32>,
    pub samples: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_fits_the_buffer_sized_for_it() {
        let message = |kind, time, data: &str| WireMessage {
            id: "01JF8Z3Q6Y4T0R9S2V5W7X1A3B".to_owned(),
            kind,
            time,
            data: RawValue::from_string(data.to_owned()).unwrap(),
        };
        let answers = [
            PollAnswer {
                c: usize::MAX,
                msg: vec![message(i64::MIN, i64::MIN, "{}")],
                cursor: format!("1.{}", i64::MAX),
                more: false,
            },
            PollAnswer {
                c: 3,
                msg: vec![
                    message(
                        70,
                        1_733_400_000_000,
                        r#"{"subject":"Hi \"you\"","n":[1,2]}"#,
                    ),
                    message(i64::MAX, i64::MAX, "null"),
                    message(-1, 0, r#""text""#),
                ],
                cursor: "1.42".to_owned(),
                more: true,
            },
            PollAnswer {
                c: 0,
                msg: Vec::new(),
                cursor: "1.0".to_owned(),
                more: false,
            },
        ];
        for answer in answers {
            let json = answer.to_json().unwrap();
            assert_eq!(json, serde_json::to_vec(&answer).unwrap());
            assert!(json.len() <= answer.json_len_bound(), "{}", json.len());
        }
    }
}
