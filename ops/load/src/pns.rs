//! The PNS client: session tokens minted here (HS256 with the server's
//! secret, claims sub/exp/iat/jti as `pns token` makes them), long polls that
//! carry the cursor of the previous answer, and the internal API for notifies,
//! the count of held polls and the times of the server's syncs of its log.

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

    /// The syncs of the server's log so far (`pns_wal_sync_seconds` of
    /// `GET /metrics`); none counted on a server without the series.
    pub async fn sync_times(&self, conn: &mut Conn) -> anyhow::Result<SyncTimes> {
        let reply = conn
            .request(Method::GET, "/metrics", &[], Bytes::new(), CALL_LIMIT)
            .await?;
        if reply.status != StatusCode::OK {
            anyhow::bail!("/metrics answered {}", reply.status);
        }
        Ok(SyncTimes::parse(&String::from_utf8_lossy(&reply.body)))
    }
}

/// The histogram of the times of the server's syncs of its log, as one
/// scrape reads it: every bucket counts the syncs at most its bound.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SyncTimes {
    pub count: u64,
    pub sum_s: f64,
    /// (bound in seconds, syncs at most that long), by bound; `+Inf` left
    /// out, since it is `count`.
    pub buckets: Vec<(f64, u64)>,
}

impl SyncTimes {
    fn parse(metrics: &str) -> SyncTimes {
        let mut times = SyncTimes::default();
        for line in metrics.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if series == "pns_wal_sync_seconds_count" {
                times.count = value.parse().unwrap_or(0);
            } else if series == "pns_wal_sync_seconds_sum" {
                times.sum_s = value.parse().unwrap_or(0.0);
            } else if let Some(bound) = series
                .strip_prefix("pns_wal_sync_seconds_bucket{le=\"")
                .and_then(|b| b.strip_suffix("\"}"))
                .and_then(|b| b.parse::<f64>().ok())
                .filter(|b| b.is_finite())
            {
                times.buckets.push((bound, value.parse().unwrap_or(0)));
            }
        }
        times.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        times
    }

    /// What the syncs between `before` and this scrape took.
    pub fn since(&self, before: &SyncTimes) -> LogSyncs {
        let count = self.count.saturating_sub(before.count);
        let within = |bound: f64| -> u64 {
            let at = |t: &SyncTimes| {
                t.buckets
                    .iter()
                    .find(|(b, _)| *b == bound)
                    .map_or(0, |(_, n)| *n)
            };
            at(self).saturating_sub(at(before))
        };
        let longest_at_most_ms = self
            .buckets
            .iter()
            .find(|(bound, _)| within(*bound) == count)
            .map(|(bound, _)| bound * 1000.0);
        // 10 and 100 ms are bounds of the server's histogram
        // (`SYNC_TIME_BUCKETS` in src/store/wal_sync.rs).
        LogSyncs {
            count,
            mean_ms: (self.sum_s - before.sum_s) * 1000.0 / count.max(1) as f64,
            longest_at_most_ms,
            over_10_ms: count - within(0.01).min(count),
            over_100_ms: count - within(0.1).min(count),
        }
    }
}

/// The syncs of the server's log in one phase, which the phase's
/// acknowledgements waited for: the disk's part in them.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct LogSyncs {
    pub count: u64,
    pub mean_ms: f64,
    /// The least bound of the server's histogram that every sync stayed
    /// within; `None` when one took longer than its last bound (2.5 s).
    pub longest_at_most_ms: Option<f64>,
    pub over_10_ms: u64,
    pub over_100_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(count: u64, sum_s: f64, within: [u64; 3]) -> String {
        format!(
            "# TYPE pns_wal_sync_seconds histogram\n\
             pns_wal_sync_seconds_sum {sum_s}\n\
             pns_wal_sync_seconds_count {count}\n\
             pns_wal_sync_seconds_bucket{{le=\"0.001\"}} {}\n\
             pns_wal_sync_seconds_bucket{{le=\"0.01\"}} {}\n\
             pns_wal_sync_seconds_bucket{{le=\"0.1\"}} {}\n\
             pns_wal_sync_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             pns_polls_held 19000\n",
            within[0], within[1], within[2]
        )
    }

    /// A phase's syncs are those between two scrapes: how many, their mean,
    /// and how many the disk held past 10 and 100 ms.
    #[test]
    fn the_syncs_of_a_phase_are_the_difference_of_two_scrapes() {
        let before = SyncTimes::parse(&scrape(100, 0.05, [100, 100, 100]));
        let after = SyncTimes::parse(&scrape(400, 1.05, [350, 397, 399]));
        let phase = after.since(&before);
        assert_eq!(phase.count, 300);
        assert!((phase.mean_ms - 1000.0 / 300.0).abs() < 1e-9, "{phase:?}");
        assert_eq!((phase.over_10_ms, phase.over_100_ms), (3, 1));
        assert_eq!(phase.longest_at_most_ms, None, "one took over 0.1 s");

        let quick = SyncTimes::parse(&scrape(450, 1.06, [390, 447, 399 + 50]));
        let phase = quick.since(&after);
        assert_eq!(
            (phase.count, phase.over_10_ms, phase.over_100_ms),
            (50, 0, 0)
        );
        assert_eq!(phase.longest_at_most_ms, Some(10.0));
    }

    /// A server without the series (PNS on PostgreSQL) counts no syncs.
    #[test]
    fn a_server_without_the_series_counts_no_syncs() {
        let none = SyncTimes::parse("pns_polls_held 5\n");
        assert_eq!(none, SyncTimes::default());
        assert_eq!(none.since(&none).count, 0);
    }
}
