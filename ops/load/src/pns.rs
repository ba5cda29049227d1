//! The PNS client: session tokens minted here (HS256 with the server's
//! secret, claims sub/exp/iat/jti as `pns token` makes them), long polls that
//! carry the cursor of the previous answer, and the internal API for notifies
//! and the count of held polls.

use crate::conn::Conn;
use crate::Payload;
use anyhow::Context;
use bytes::Bytes;
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long the server holds a poll in a benchmark (its cap).
pub const HOLD_SECS: u64 = 110;
/// A poll gives up this long after its hold should have ended.
const POLL_LIMIT: Duration = Duration::from_secs(HOLD_SECS + 20);
/// A notify or stats call gives up after this.
const CALL_LIMIT: Duration = Duration::from_secs(60);
/// The message type the load messages carry.
const LOAD_TYPE: i64 = 1;

/// The mailbox address of load user `u`.
pub fn user(u: u32) -> String {
    format!("u{u}@load.test")
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: i64,
    iat: i64,
    jti: String,
}

/// A session token for `user`, valid for `ttl_secs`.
pub fn mint(secret: &[u8], user: &str, ttl_secs: i64) -> anyhow::Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let claims = Claims {
        sub: user,
        exp: now + ttl_secs,
        iat: now,
        jti: format!("load-{:032x}", rand::random::<u128>()),
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )?)
}

/// One user's poll loop state: the sid and the cursor of the last answer.
pub struct Poller {
    sid: String,
    cursor: Option<String>,
}

#[derive(Deserialize)]
struct PollAnswer {
    msg: Vec<PollMessage>,
    cursor: String,
}

#[derive(Deserialize)]
struct PollMessage {
    data: Payload,
}

impl Poller {
    pub fn new(sid: String) -> Self {
        Poller { sid, cursor: None }
    }

    /// One poll: held until news or the hold ends; returns what it carried.
    pub async fn poll(&mut self, conn: &mut Conn) -> anyhow::Result<Vec<Payload>> {
        let mut path = format!("/pns/poll?comeFrom=load&sid={}", self.sid);
        if let Some(c) = &self.cursor {
            path.push_str("&cursor=");
            path.push_str(c);
        }
        let reply = conn
            .request(Method::GET, &path, &[], Bytes::new(), POLL_LIMIT)
            .await?;
        if reply.status != StatusCode::OK {
            anyhow::bail!(
                "poll answered {}: {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        let answer: PollAnswer =
            serde_json::from_slice(&reply.body).context("poll answer is not the expected JSON")?;
        self.cursor = Some(answer.cursor);
        Ok(answer.msg.into_iter().map(|m| m.data).collect())
    }
}

#[derive(Serialize)]
struct Notify<'a> {
    user: &'a str,
    #[serde(rename = "type")]
    kind: i64,
    data: Payload,
}

#[derive(Serialize)]
struct Batch<'a> {
    messages: Vec<Notify<'a>>,
}

/// The internal API, as a delivery agent uses it.
pub struct Internal {
    auth: String,
}

impl Internal {
    pub fn new(token: &str) -> Self {
        Internal {
            auth: format!("Bearer {token}"),
        }
    }

    /// `POST /internal/v1/notify` with one message.
    pub async fn notify(&self, conn: &mut Conn, user: &str, data: Payload) -> anyhow::Result<()> {
        let body = serde_json::to_vec(&Notify {
            user,
            kind: LOAD_TYPE,
            data,
        })?;
        self.post(conn, body).await
    }

    /// `POST /internal/v1/notify` with a batch.
    pub async fn notify_batch(
        &self,
        conn: &mut Conn,
        items: &[(String, Payload)],
    ) -> anyhow::Result<()> {
        let messages = items
            .iter()
            .map(|(user, data)| Notify {
                user,
                kind: LOAD_TYPE,
                data: *data,
            })
            .collect();
        self.post(conn, serde_json::to_vec(&Batch { messages })?)
            .await
    }

    async fn post(&self, conn: &mut Conn, body: Vec<u8>) -> anyhow::Result<()> {
        let reply = conn
            .request(
                Method::POST,
                "/internal/v1/notify",
                &[
                    ("authorization", &self.auth),
                    ("content-type", "application/json"),
                ],
                Bytes::from(body),
                CALL_LIMIT,
            )
            .await?;
        if reply.status != StatusCode::ACCEPTED {
            anyhow::bail!(
                "notify answered {}: {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        Ok(())
    }

    /// Polls held now, from `pns_polls_held` of `GET /metrics`: the stats
    /// also count the store's messages, which took a scan of SQLite's table
    /// before the count was kept in memory (4 ms with 24,000 messages, more
    /// with each round), and the ramp and the waits for every poll held
    /// again ask often.
    pub async fn held(&self, conn: &mut Conn) -> anyhow::Result<u64> {
        conn.count_in("/metrics", "pns_polls_held ", CALL_LIMIT)
            .await
    }
}
