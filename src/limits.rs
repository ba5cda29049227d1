//! Poll rate limits: a token bucket per key (a session, a client address) in
//! a bounded map.
//!
//! A bucket holds up to `burst` tokens and refills at `per_sec`; each poll
//! takes one, and a poll that finds none is refused with how long until one
//! is back. The map never outgrows its cap: when a shard is full, buckets that
//! have refilled completely are dropped (a full bucket is the same as no
//! bucket), and if none has, the least recently used one goes.

use crate::config::Rate;
use foldhash::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SHARDS: usize = 32;

/// Keys tracked at most by one limiter.
pub const MAX_KEYS: usize = 100_000;

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct RateLimiter<K> {
    rate: Rate,
    shards: Box<[Mutex<HashMap<K, Bucket>>]>,
    hasher: foldhash::fast::RandomState,
    per_shard: usize,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        RateLimiter {
            rate,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
            per_shard: (max_keys / SHARDS).max(1),
        }
    }

    fn enabled(&self) -> bool {
        self.rate.per_sec > 0.0
    }

    /// Take one token for `key`; `Err` says how long until one is back.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        let idx = (self.hasher.hash_one(key) as usize) % self.shards.len();
        let mut shard = self.shards[idx].lock().unwrap_or_else(|p| p.into_inner());
        // A key seen before (every poll but a session's first) is not
        // cloned: for a session, that would be an allocation per poll.
        if let Some(bucket) = shard.get_mut(key) {
            return self.take(bucket, now);
        }
        if shard.len() >= self.per_shard {
            self.make_room(&mut shard, now);
        }
        let bucket = shard.entry(key.clone()).or_insert(Bucket {
            tokens: f64::from(self.rate.burst),
            last: now,
        });
        self.take(bucket, now)
    }

    /// Refill `bucket` for the time since its last poll and take a token.
    fn take(&self, bucket: &mut Bucket, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens =
            (bucket.tokens + elapsed * self.rate.per_sec).min(f64::from(self.rate.burst));
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(secs((1.0 - bucket.tokens) / self.rate.per_sec))
        }
    }

    fn make_room(&self, shard: &mut HashMap<K, Bucket>, now: Instant) {
        let refill = self.refill_time();
        shard.retain(|_, b| now.saturating_duration_since(b.last) < refill);
        if shard.len() >= self.per_shard {
            let oldest = shard
                .iter()
                .min_by_key(|(_, b)| b.last)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                shard.remove(&k);
            }
        }
    }

    /// How long an empty bucket takes to fill.
    fn refill_time(&self) -> Duration {
        secs(f64::from(self.rate.burst) / self.rate.per_sec)
    }

    /// Drop the buckets that have refilled; run now and then.
    pub fn sweep(&self, now: Instant) {
        if !self.enabled() {
            return;
        }
        let refill = self.refill_time();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, b| now.saturating_duration_since(b.last) < refill);
        }
    }

    /// Keys tracked now.
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

/// Seconds as a duration; a rate so small that it overflows waits for ever.
fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

/// Whole seconds for `Retry-After`, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_SESSION_POLL_BURST, DEFAULT_SESSION_POLL_RATE};

    #[test]
    fn a_client_polling_every_500_ms_is_never_limited_by_the_defaults() {
        let limiter = RateLimiter::new(
            Rate {
                per_sec: DEFAULT_SESSION_POLL_RATE,
                burst: DEFAULT_SESSION_POLL_BURST,
            },
            MAX_KEYS,
        );
        let start = Instant::now();
        for i in 0..10_000u64 {
            let now = start + Duration::from_millis(500 * i);
            assert!(limiter.check(&"s1", now).is_ok(), "poll {i} refused");
        }
    }

    #[test]
    fn a_burst_past_the_limit_is_refused_until_a_token_is_back() {
        let limiter = RateLimiter::new(
            Rate {
                per_sec: 2.0,
                burst: 3,
            },
            MAX_KEYS,
        );
        let t = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check(&"s1", t).is_ok());
        }
        let wait = limiter.check(&"s1", t).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
        // Other keys have their own bucket.
        assert!(limiter.check(&"s2", t).is_ok());
        assert!(limiter.check(&"s1", t + wait).is_ok());
    }

    #[test]
    fn the_map_stays_within_its_cap() {
        let limiter = RateLimiter::new(
            Rate {
                per_sec: 1.0,
                burst: 5,
            },
            SHARDS * 4,
        );
        let t = Instant::now();
        for i in 0..10_000u32 {
            let _ = limiter.check(&i, t);
        }
        assert!(limiter.len() <= SHARDS * 4);
        limiter.sweep(t + Duration::from_secs(6));
        assert!(limiter.is_empty());
    }
}
