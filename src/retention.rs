//! Retention: the background purge that keeps the store to its policy (per
//! user the newest N messages, none older than the maximum age), and drops
//! dedup keys, positions, revocations and opaque sessions that have outlived
//! it. Each purge that ends without an error is counted in the metrics, with
//! what it removed and how long it took.

use crate::metrics::Metrics;
use crate::session::SessionValidator;
use crate::shutdown::Shutdown;
use crate::store::{RetentionPolicy, SharedStore};
use std::sync::Arc;
use std::time::Duration;

pub async fn run(
    store: SharedStore,
    sessions: Arc<SessionValidator>,
    metrics: Arc<Metrics>,
    policy: RetentionPolicy,
    every: Duration,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
        let now = crate::clock::now_ms();
        let began = std::time::Instant::now();
        match store.purge(policy, now).await {
            Ok(r) => {
                let took = began.elapsed();
                metrics.purged(&r, took);
                tracing::debug!(
                    took_ms = took.as_millis() as u64,
                    messages = r.messages,
                    dedup_keys = r.dedup_keys,
                    positions = r.positions,
                    revocations = r.revocations,
                    opaque_sessions = r.opaque_sessions,
                    "retention purge"
                );
            }
            Err(e) => tracing::warn!(error = %e, "retention purge failed"),
        }
        sessions.forget_expired(now);
    }
}
