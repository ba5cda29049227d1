//! The session registry: what this node knows of each session that polls it,
//! for operators (`GET /internal/v1/sessions`, the `sessions_active` gauge).
//!
//! An entry is made or refreshed by each poll and records the session's user,
//! client tag (`comeFrom`), client address, first and last poll and the
//! messages delivered to it. It is in memory only and bounded: an entry
//! expires after a quiet spell longer than two holds (a live client polls
//! again well within one), and at the session's own expiry; when the
//! registry is full, the least recently polled entry of a shard makes room.
//! How many polls a session holds now is the hub's to say, not the registry's.

use crate::session::Session;
use foldhash::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const SHARDS: usize = 16;
/// Added to two holds before a quiet session counts as gone.
pub const IDLE_MARGIN: Duration = Duration::from_secs(30);
/// `comeFrom` values longer than this are cut.
pub const MAX_COME_FROM_LEN: usize = 64;

/// What the registry knows of one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionActivity {
    pub key: String,
    pub user: String,
    pub come_from: Option<String>,
    pub address: Option<IpAddr>,
    pub first_poll_ms: i64,
    pub last_poll_ms: i64,
    pub delivered: u64,
    pub expires_ms: i64,
    pub opaque: bool,
}

pub struct SessionRegistry {
    shards: Box<[Mutex<HashMap<String, SessionActivity>>]>,
    hasher: foldhash::fast::RandomState,
    per_shard: usize,
    idle_ms: i64,
}

impl SessionRegistry {
    /// A registry of at most `max_sessions` entries, each forgotten after
    /// `idle` without a poll.
    pub fn new(max_sessions: usize, idle: Duration) -> Self {
        SessionRegistry {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
            per_shard: max_sessions.div_ceil(SHARDS).max(1),
            idle_ms: i64::try_from(idle.as_millis()).unwrap_or(i64::MAX),
        }
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, HashMap<String, SessionActivity>> {
        let idx = (self.hasher.hash_one(key) as usize) % self.shards.len();
        self.shards[idx].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, a: &SessionActivity, now_ms: i64) -> bool {
        now_ms < a.expires_ms && now_ms - a.last_poll_ms <= self.idle_ms
    }

    /// Note a poll of `session`.
    pub fn polled(
        &self,
        session: &Session,
        opaque: bool,
        come_from: Option<&str>,
        address: Option<IpAddr>,
        now_ms: i64,
    ) {
        let mut shard = self.shard(&session.key);
        if let Some(a) = shard.get_mut(&session.key) {
            if self.live(a, now_ms) {
                a.last_poll_ms = now_ms;
                a.address = address;
                if let Some(c) = come_from.filter(|c| a.come_from.as_deref() != Some(*c)) {
                    a.come_from = Some(c.to_owned());
                }
                return;
            }
        }
        if shard.len() >= self.per_shard && !shard.contains_key(&session.key) {
            shard.retain(|_, a| self.live(a, now_ms));
            if shard.len() >= self.per_shard {
                let quietest = shard
                    .values()
                    .min_by_key(|a| a.last_poll_ms)
                    .map(|a| a.key.clone());
                if let Some(k) = quietest {
                    shard.remove(&k);
                }
            }
        }
        shard.insert(
            session.key.clone(),
            SessionActivity {
                key: session.key.clone(),
                user: session.user.clone(),
                come_from: come_from.map(str::to_owned),
                address,
                first_poll_ms: now_ms,
                last_poll_ms: now_ms,
                delivered: 0,
                expires_ms: session.expires_ms,
                opaque,
            },
        );
    }

    /// Count `n` messages delivered to session `key`.
    pub fn delivered(&self, key: &str, n: u64) {
        if let Some(a) = self.shard(key).get_mut(key) {
            a.delivered += n;
        }
    }

    /// The live sessions of `user`, oldest first.
    pub fn for_user(&self, user: &str, now_ms: i64) -> Vec<SessionActivity> {
        let mut out: Vec<SessionActivity> = self
            .shards
            .iter()
            .flat_map(|s| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                s.values()
                    .filter(|a| a.user == user && self.live(a, now_ms))
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort_by(|a, b| (a.first_poll_ms, &a.key).cmp(&(b.first_poll_ms, &b.key)));
        out
    }

    /// Sessions that polled within the idle time and have not expired.
    pub fn active(&self, now_ms: i64) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                s.values().filter(|a| self.live(a, now_ms)).count()
            })
            .sum()
    }

    /// Forget one session (revoked or deleted).
    pub fn forget_session(&self, key: &str) {
        self.shard(key).remove(key);
    }

    /// Forget every session of `user` (revoked).
    pub fn forget_user(&self, user: &str) {
        for s in self.shards.iter() {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, a| a.user != user);
        }
    }

    /// Drop expired entries; run now and then.
    pub fn sweep(&self, now_ms: i64) {
        for s in self.shards.iter() {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, a| self.live(a, now_ms));
        }
    }

    /// Entries held now, live or not yet swept.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A client tag as it may appear in metrics and listings: letters, digits,
/// `.`, `_` and `-` (anything else becomes `_`), at most
/// [`MAX_COME_FROM_LEN`] characters; `None` when empty.
pub fn sanitize_come_from(raw: &str) -> Option<String> {
    let s: String = raw
        .trim()
        .chars()
        .take(MAX_COME_FROM_LEN)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(key: &str, user: &str) -> Session {
        Session {
            key: key.into(),
            user: user.into(),
            start_ms: 0,
            expires_ms: 1_000_000,
        }
    }

    #[test]
    fn polls_refresh_an_entry_and_quiet_or_expired_ones_are_gone() {
        let r = SessionRegistry::new(100, Duration::from_millis(1000));
        r.polled(&session("s1", "a@x"), false, Some("web"), None, 100);
        r.polled(&session("s1", "a@x"), false, None, None, 600);
        r.delivered("s1", 3);
        let list = r.for_user("a@x", 700);
        assert_eq!(list.len(), 1);
        assert_eq!(
            (
                list[0].first_poll_ms,
                list[0].last_poll_ms,
                list[0].delivered
            ),
            (100, 600, 3)
        );
        assert_eq!(list[0].come_from.as_deref(), Some("web"));
        assert_eq!(r.active(1600), 1);
        assert_eq!(r.active(1601), 0);
        r.polled(&session("s2", "a@x"), false, None, None, 999_900);
        assert_eq!(r.active(999_950), 1);
        assert_eq!(r.active(1_000_000), 0);
        r.sweep(1_000_000);
        assert!(r.is_empty());
    }

    #[test]
    fn a_full_registry_drops_the_quietest_session() {
        let r = SessionRegistry::new(SHARDS, Duration::from_secs(3600));
        for i in 0..1000 {
            r.polled(&session(&format!("s{i}"), "a@x"), false, None, None, i);
        }
        assert!(r.len() <= SHARDS);
        // The newest survives.
        assert!(r.for_user("a@x", 1000).iter().any(|a| a.key == "s999"));
    }

    #[test]
    fn come_from_is_cut_and_cleaned() {
        assert_eq!(
            sanitize_come_from("webmail-2.1"),
            Some("webmail-2.1".into())
        );
        assert_eq!(sanitize_come_from("a b\"c"), Some("a_b_c".into()));
        assert_eq!(sanitize_come_from("  "), None);
        assert_eq!(
            sanitize_come_from(&"x".repeat(200)).map(|s| s.len()),
            Some(MAX_COME_FROM_LEN)
        );
    }
}
