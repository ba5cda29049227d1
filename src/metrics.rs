//! Metrics: counters the hot paths bump, rendered as Prometheus text on
//! `GET /metrics` and summarised by `GET /internal/v1/stats`.
//!
//! Every label set is bounded: outcomes, sources and rate-limit scopes are
//! fixed lists, and the client tag (`comeFrom`) breakdown takes the first
//! [`MAX_COME_FROM_LABELS`] distinct values it sees and counts the rest as
//! `other`, so a client cannot grow the scrape without end.

use crate::ingest::Source;
use crate::store::PurgeReport;
use foldhash::HashMap;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, RwLock};

/// Distinct `comeFrom` label values at most; later ones count as `other`.
pub const MAX_COME_FROM_LABELS: usize = 32;
/// The label of polls without a `comeFrom`.
pub const NO_COME_FROM: &str = "none";
/// The label of `comeFrom` values past the cap.
pub const OTHER_COME_FROM: &str = "other";
/// Recent deliveries kept for the latency percentiles of the stats summary.
pub const LATENCY_WINDOW: usize = 4096;

/// How a poll ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    message,
    timeout,
    superseded,
    /// Released because the user held more polls than allowed.
    capped,
    shutdown,
    error,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::message,
        Outcome::timeout,
        Outcome::superseded,
        Outcome::capped,
        Outcome::shutdown,
        Outcome::error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::message => "message",
            Outcome::timeout => "timeout",
            Outcome::superseded => "superseded",
            Outcome::capped => "capped",
            Outcome::shutdown => "shutdown",
            Outcome::error => "error",
        }
    }
}

/// Which rate limit refused a poll.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum LimitScope {
    session,
    address,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabel {
    scope: LimitScope,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComeFromLabel {
    come_from: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum SourceValue {
    api,
    maildir,
    dovecot,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: SourceValue,
}

/// What a purge removes, by the parts of [`PurgeReport`].
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum PurgedValue {
    messages,
    dedup_keys,
    positions,
    revocations,
    opaque_sessions,
}

impl PurgedValue {
    /// In the order of [`Metrics::purged`]'s counts.
    const ALL: [PurgedValue; 5] = [
        PurgedValue::messages,
        PurgedValue::dedup_keys,
        PurgedValue::positions,
        PurgedValue::revocations,
        PurgedValue::opaque_sessions,
    ];
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PurgedLabel {
    what: PurgedValue,
}

pub struct Metrics {
    registry: Registry,
    polls_held: Gauge,
    answers_owed: Gauge,
    rounds_held_for_answers: Counter,
    sessions_active: Gauge,
    poll_answers: Family<OutcomeLabel, Counter>,
    polls_by_come_from: Family<ComeFromLabel, Counter>,
    /// The counters of `polls_by_come_from` by label, each made on first
    /// use, so that counting a poll builds no label.
    come_from_seen: RwLock<HashMap<String, Counter>>,
    rate_limited: Family<ScopeLabel, Counter>,
    accepted: Family<SourceLabel, Counter>,
    pub duplicates: Counter,
    pub delivered: Counter,
    pub answered_at_commit: Counter,
    pub store_errors: Counter,
    purges: Counter,
    purged: Family<PurgedLabel, Counter>,
    /// Seconds; a gauge of f64, which prometheus_client keeps in an AtomicU64.
    last_purge_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub delivery_latency: Histogram,
    /// The latest delivery latencies in ms, newest last.
    latency_window: Mutex<VecDeque<u32>>,
    started: std::time::Instant,
}

/// Delivery latency percentiles over the recent window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    pub p50_ms: u32,
    pub p99_ms: u32,
    pub samples: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Metrics {
    /// The node's metrics, with the times of the store's syncs
    /// ([`crate::store::MessageStore::sync_times`]) where it makes them.
    pub fn new(store_sync_times: Option<Histogram>) -> Self {
        let mut registry = Registry::with_prefix("pns");
        let polls_held = Gauge::default();
        let answers_owed = Gauge::default();
        let rounds_held_for_answers = Counter::default();
        let sessions_active = Gauge::default();
        let poll_answers = Family::<OutcomeLabel, Counter>::default();
        let polls_by_come_from = Family::<ComeFromLabel, Counter>::default();
        let rate_limited = Family::<ScopeLabel, Counter>::default();
        let accepted = Family::<SourceLabel, Counter>::default();
        let duplicates = Counter::default();
        let delivered = Counter::default();
        let answered_at_commit = Counter::default();
        let store_errors = Counter::default();
        let purges = Counter::default();
        let purged = Family::<PurgedLabel, Counter>::default();
        let last_purge_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        // Seconds, from 1 ms to about 16 s.
        let delivery_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
        );
        registry.register(
            "polls_held",
            "Polls held open on this node now",
            polls_held.clone(),
        );
        registry.register(
            "answers_owed",
            "Polls woken with news whose answer has not been made yet",
            answers_owed.clone(),
        );
        registry.register(
            "rounds_held_for_answers",
            "Commits the SQLite writer held back while too many answers were owed",
            rounds_held_for_answers.clone(),
        );
        registry.register(
            "sessions_active",
            "Sessions that polled this node lately and have not expired",
            sessions_active.clone(),
        );
        registry.register(
            "poll_answers",
            "Poll answers by outcome",
            poll_answers.clone(),
        );
        registry.register(
            "polls_by_come_from",
            "Polls by client tag (comeFrom): the first 32 distinct values, the rest as other",
            polls_by_come_from.clone(),
        );
        registry.register(
            "polls_rate_limited",
            "Polls refused with 429, by the limit that refused them",
            rate_limited.clone(),
        );
        registry.register(
            "messages_accepted",
            "Messages durably accepted, by source",
            accepted.clone(),
        );
        registry.register(
            "duplicates",
            "Messages refused as duplicates of a stored dedupKey",
            duplicates.clone(),
        );
        registry.register(
            "messages_delivered",
            "Messages written into poll answers",
            delivered.clone(),
        );
        registry.register(
            "poll_answers_at_commit",
            "Poll answers with messages written by the thread that committed them, without waking the poll",
            answered_at_commit.clone(),
        );
        registry.register(
            "store_errors",
            "Store operations that failed",
            store_errors.clone(),
        );
        registry.register(
            "retention_purges",
            "Retention purges that ended without an error",
            purges.clone(),
        );
        registry.register(
            "retention_purged",
            "What the retention purges removed: messages, dedup keys, positions, revocations, opaque sessions",
            purged.clone(),
        );
        registry.register(
            "retention_last_purge_seconds",
            "How long the last retention purge that ended without an error took",
            last_purge_seconds.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "From a message being accepted (or due, when delayed) to its poll answer",
            delivery_latency.clone(),
        );
        if let Some(sync_times) = store_sync_times {
            registry.register(
                "wal_sync_seconds",
                "How long each sync of the SQLite write-ahead log took: the acknowledgements of the writes it made durable waited for it",
                sync_times,
            );
        }
        // Every series exists from the start, so rates and alerts see zeros.
        for outcome in Outcome::ALL {
            let _ = poll_answers.get_or_create(&OutcomeLabel { outcome });
        }
        for source in [SourceValue::api, SourceValue::maildir, SourceValue::dovecot] {
            let _ = accepted.get_or_create(&SourceLabel { source });
        }
        for scope in [LimitScope::session, LimitScope::address] {
            let _ = rate_limited.get_or_create(&ScopeLabel { scope });
        }
        for what in PurgedValue::ALL {
            let _ = purged.get_or_create(&PurgedLabel { what });
        }
        Metrics {
            registry,
            polls_held,
            answers_owed,
            rounds_held_for_answers,
            sessions_active,
            poll_answers,
            polls_by_come_from,
            come_from_seen: RwLock::default(),
            rate_limited,
            accepted,
            duplicates,
            delivered,
            answered_at_commit,
            store_errors,
            purges,
            purged,
            last_purge_seconds,
            delivery_latency,
            latency_window: Mutex::new(VecDeque::with_capacity(LATENCY_WINDOW)),
            started: std::time::Instant::now(),
        }
    }

    /// A message written into a poll answer `latency_ms` after it was accepted
    /// (or came due).
    pub fn observe_delivery(&self, latency_ms: i64) {
        let ms = latency_ms.max(0);
        self.delivery_latency.observe(ms as f64 / 1000.0);
        let mut w = self
            .latency_window
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if w.len() == LATENCY_WINDOW {
            w.pop_front();
        }
        w.push_back(u32::try_from(ms).unwrap_or(u32::MAX));
    }

    /// p50 and p99 over the last [`LATENCY_WINDOW`] deliveries; `None` before any.
    pub fn latency_summary(&self) -> Option<LatencySummary> {
        let mut v: Vec<u32> = self
            .latency_window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        Some(LatencySummary {
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            samples: v.len(),
        })
    }

    /// Count a poll under its client tag (already sanitised), within the cap.
    pub fn polled_from(&self, come_from: Option<&str>) {
        let label = come_from.unwrap_or(NO_COME_FROM);
        // On every poll: a read lock and a lookup, nothing allocated.
        if let Some(counter) = self
            .come_from_seen
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(label)
        {
            counter.inc();
            return;
        }
        let mut seen = self
            .come_from_seen
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let tags = seen
            .keys()
            .filter(|k| *k != NO_COME_FROM && *k != OTHER_COME_FROM)
            .count();
        let label =
            if come_from.is_none() || seen.contains_key(label) || tags < MAX_COME_FROM_LABELS {
                label
            } else {
                OTHER_COME_FROM
            };
        // Another poll may have made it meanwhile, or it is "other".
        if let Some(counter) = seen.get(label) {
            counter.inc();
            return;
        }
        let counter = self
            .polls_by_come_from
            .get_or_create(&ComeFromLabel {
                come_from: label.to_owned(),
            })
            .clone();
        counter.inc();
        seen.insert(label.to_owned(), counter);
    }

    /// Polls by client tag so far, largest first.
    pub fn come_from_counts(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .come_from_seen
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(label, counter)| (label.clone(), counter.get()))
            .collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out
    }

    pub fn rate_limited(&self, scope: LimitScope) {
        self.rate_limited.get_or_create(&ScopeLabel { scope }).inc();
    }

    pub fn rate_limited_count(&self, scope: LimitScope) -> u64 {
        self.rate_limited.get_or_create(&ScopeLabel { scope }).get()
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    pub fn accepted(&self, source: Source, accepted: u64, duplicates: u64) {
        let source = match source {
            Source::Api => SourceValue::api,
            Source::Maildir => SourceValue::maildir,
            Source::Dovecot => SourceValue::dovecot,
        };
        self.accepted
            .get_or_create(&SourceLabel { source })
            .inc_by(accepted);
        self.duplicates.inc_by(duplicates);
    }

    /// A retention purge that ended without an error, having removed
    /// `report`, in `took`.
    pub fn purged(&self, report: &PurgeReport, took: std::time::Duration) {
        let removed = [
            report.messages,
            report.dedup_keys,
            report.positions,
            report.revocations,
            report.opaque_sessions,
        ];
        for (what, n) in PurgedValue::ALL.into_iter().zip(removed) {
            self.purged.get_or_create(&PurgedLabel { what }).inc_by(n);
        }
        self.last_purge_seconds.set(took.as_secs_f64());
        // Last: a scrape that sees this purge counted sees what it removed.
        self.purges.inc();
    }

    pub fn answered(&self, outcome: Outcome) {
        self.poll_answers
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    pub fn answers(&self, outcome: Outcome) -> u64 {
        self.poll_answers
            .get_or_create(&OutcomeLabel { outcome })
            .get()
    }

    pub fn accepted_total(&self) -> u64 {
        [SourceValue::api, SourceValue::maildir, SourceValue::dovecot]
            .into_iter()
            .map(|source| self.accepted.get_or_create(&SourceLabel { source }).get())
            .sum()
    }

    /// Prometheus text exposition, with what `hub` knows and the active
    /// sessions read at scrape time.
    pub fn render(&self, hub: &crate::hub::Hub, sessions_active: usize) -> String {
        self.polls_held.set(hub.held() as i64);
        self.answers_owed.set(hub.answers_owed() as i64);
        self.rounds_held_for_answers
            .inner()
            .store(hub.rounds_held_for_answers(), Ordering::Relaxed);
        self.sessions_active.set(sessions_active as i64);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn come_from_labels_stop_at_the_cap() {
        let m = Metrics::default();
        for i in 0..100 {
            m.polled_from(Some(&format!("tag{i}")));
        }
        m.polled_from(Some("tag0"));
        m.polled_from(None);
        let counts = m.come_from_counts();
        assert_eq!(counts.len(), MAX_COME_FROM_LABELS + 2);
        assert!(counts.contains(&("other".into(), 100 - MAX_COME_FROM_LABELS as u64)));
        assert!(counts.contains(&("tag0".into(), 2)));
        assert!(counts.contains(&("none".into(), 1)));
        let text = m.render(&crate::hub::Hub::default(), 0);
        assert!(text.contains("pns_polls_by_come_from_total{come_from=\"other\"} 68"));
    }

    #[test]
    fn latency_percentiles_come_from_the_recent_window() {
        let m = Metrics::default();
        assert_eq!(m.latency_summary(), None);
        for ms in 1..=100 {
            m.observe_delivery(ms);
        }
        let s = m.latency_summary().unwrap();
        assert_eq!((s.p50_ms, s.p99_ms, s.samples), (50, 99, 100));
    }
}
