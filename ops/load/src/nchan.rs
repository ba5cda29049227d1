//! The Nchan client: long-poll subscribers on `/sub/<channel>` that continue
//! where they were with `If-Modified-Since` and `If-None-Match` (the
//! `Last-Modified` and `Etag` of the previous answer, as Nchan's own client
//! does), publishers on `/pub/<channel>`, and the subscriber count from
//! `nchan_stub_status`.

use crate::conn::Conn;
use crate::Payload;
use anyhow::Context;
use bytes::Bytes;
use http::header::{ETAG, LAST_MODIFIED};
use http::{Method, StatusCode};
use std::time::Duration;

/// The subscriber timeout in ops/nchan/nginx.conf, as PNS's hold.
const HOLD_SECS: u64 = crate::pns::HOLD_SECS;
const POLL_LIMIT: Duration = Duration::from_secs(HOLD_SECS + 20);
const CALL_LIMIT: Duration = Duration::from_secs(60);

/// The channel of load user `u`.
pub fn channel(u: u32) -> String {
    format!("u{u}")
}

/// One subscriber's state: where it is in its channel.
pub struct Subscriber {
    path: String,
    last_modified: Option<String>,
    etag: Option<String>,
}

impl Subscriber {
    pub fn new(channel: &str) -> Self {
        Subscriber {
            path: format!("/sub/{channel}"),
            last_modified: None,
            etag: None,
        }
    }

    /// One long poll; Nchan answers one message at a time.
    pub async fn poll(&mut self, conn: &mut Conn) -> anyhow::Result<Vec<Payload>> {
        let mut headers = Vec::with_capacity(2);
        if let Some(lm) = &self.last_modified {
            headers.push(("if-modified-since", lm.as_str()));
        }
        if let Some(tag) = &self.etag {
            headers.push(("if-none-match", tag.as_str()));
        }
        let reply = conn
            .request(Method::GET, &self.path, &headers, Bytes::new(), POLL_LIMIT)
            .await?;
        match reply.status {
            StatusCode::OK => {
                let text = |h| {
                    reply
                        .headers
                        .get(h)
                        .and_then(|v: &http::header::HeaderValue| v.to_str().ok())
                        .map(str::to_owned)
                };
                self.last_modified = text(LAST_MODIFIED);
                self.etag = text(ETAG);
                let payload: Payload = serde_json::from_slice(&reply.body)
                    .context("subscriber got a message that is not a load message")?;
                Ok(vec![payload])
            }
            // The subscriber timeout ended the poll without news: ask again
            // from the same place.
            StatusCode::NOT_MODIFIED | StatusCode::REQUEST_TIMEOUT => Ok(Vec::new()),
            other => anyhow::bail!(
                "subscriber answered {other}: {}",
                String::from_utf8_lossy(&reply.body)
            ),
        }
    }
}

/// `POST /pub/<channel>` with the message as its body.
pub async fn publish(conn: &mut Conn, channel: &str, data: Payload) -> anyhow::Result<()> {
    let reply = conn
        .request(
            Method::POST,
            &format!("/pub/{channel}"),
            &[("content-type", "application/json")],
            Bytes::from(serde_json::to_vec(&data)?),
            CALL_LIMIT,
        )
        .await?;
    if !reply.status.is_success() {
        anyhow::bail!(
            "publish answered {}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
    }
    Ok(())
}

/// Subscribers connected now, from the `subscribers: N` line of
/// `nchan_stub_status`.
pub async fn held(conn: &mut Conn) -> anyhow::Result<u64> {
    conn.count_in("/nchan_status", "subscribers:", CALL_LIMIT)
        .await
}
