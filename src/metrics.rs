//! Metrics: counters the hot paths bump, rendered as Prometheus text on
//! `GET /metrics` and summarised by `GET /internal/v1/stats`.

use crate::ingest::Source;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// How a poll ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    message,
    timeout,
    superseded,
    shutdown,
    error,
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

pub struct Metrics {
    registry: Registry,
    polls_held: Gauge,
    poll_answers: Family<OutcomeLabel, Counter>,
    accepted: Family<SourceLabel, Counter>,
    pub duplicates: Counter,
    pub delivered: Counter,
    pub store_errors: Counter,
    pub delivery_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pns");
        let polls_held = Gauge::default();
        let poll_answers = Family::<OutcomeLabel, Counter>::default();
        let accepted = Family::<SourceLabel, Counter>::default();
        let duplicates = Counter::default();
        let delivered = Counter::default();
        let store_errors = Counter::default();
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
            "poll_answers",
            "Poll answers by outcome",
            poll_answers.clone(),
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
            "store_errors",
            "Store operations that failed",
            store_errors.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "From a message becoming visible to its poll answer",
            delivery_latency.clone(),
        );
        // Every series exists from the start, so rates and alerts see zeros.
        for source in [SourceValue::api, SourceValue::maildir, SourceValue::dovecot] {
            let _ = accepted.get_or_create(&SourceLabel { source });
        }
        for outcome in [
            Outcome::message,
            Outcome::timeout,
            Outcome::superseded,
            Outcome::shutdown,
            Outcome::error,
        ] {
            let _ = poll_answers.get_or_create(&OutcomeLabel { outcome });
        }
        Metrics {
            registry,
            polls_held,
            poll_answers,
            accepted,
            duplicates,
            delivered,
            store_errors,
            delivery_latency,
        }
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

    /// Prometheus text exposition, with `polls_held` read at scrape time.
    pub fn render(&self, polls_held: usize) -> String {
        self.polls_held.set(polls_held as i64);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}
