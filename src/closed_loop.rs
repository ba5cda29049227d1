//! Whether a request comes from a sender in a closed loop: one that waits
//! for each answer before it sends again, as a delivery agent notifying
//! for one recipient after another does.
//!
//! Each request of the internal listener (whoever speaks HTTP for it: our
//! own front, or hyper) and each request the public listener hands to hyper
//! marks its task ([`Connection::answer`]): in a loop when the connection's
//! previous answer was ready less than [`LOOP_GAP`] before the request
//! came. The SQLite store reads the mark ([`in_a_loop`]) for its log's
//! sync, which waits for more notifies to share it only while a sender
//! not in a loop waits: none of these senders sends again before its
//! answer, so their notifies are synced as soon as the log's thread is
//! free (`store::wal_sync`).
//!
//! A task-local, not an argument: the mark is about the connection, and it
//! reaches the store through the ingest path and the store trait, which
//! the Maildir watcher and the CLI also take, where there is no such loop.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The longest pause between an answer and the same connection's next
/// request that still counts as a loop. As long as the log's quiet spell:
/// a sender slower than that finds the last sync a quiet spell ago, and
/// its notify is synced at once anyway (`store::wal_sync`).
pub const LOOP_GAP: Duration = Duration::from_millis(4);

tokio::task_local! {
    static IN_A_LOOP: bool;
}

/// Whether the request this task answers comes from a sender in a loop
/// (false outside a request).
pub fn in_a_loop() -> bool {
    IN_A_LOOP.try_with(|v| *v).unwrap_or(false)
}

/// One connection's answers, to tell whether its next request is in a loop.
pub struct Connection {
    /// When the last answer was ready, in microseconds since the first call
    /// of [`micros_now`] plus one; 0 before the first.
    answered_at: AtomicU64,
    gap: Duration,
}

impl Default for Connection {
    fn default() -> Self {
        Connection::with_gap(LOOP_GAP)
    }
}

impl Connection {
    fn with_gap(gap: Duration) -> Self {
        Connection {
            answered_at: AtomicU64::new(0),
            gap,
        }
    }

    /// Answer a request of this connection with `answering`, its task
    /// marked with whether it is in a loop.
    pub fn answer<F: Future>(self: Arc<Self>, answering: F) -> impl Future<Output = F::Output> {
        let at = self.answered_at.load(Ordering::Relaxed);
        let looping = at != 0 && micros_now().saturating_sub(at - 1) < self.gap.as_micros() as u64;
        async move {
            let out = IN_A_LOOP.scope(looping, answering).await;
            self.answered_at.store(micros_now() + 1, Ordering::Relaxed);
            out
        }
    }
}

fn micros_now() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn marked(conn: &Arc<Connection>) -> bool {
        conn.clone().answer(async { in_a_loop() }).await
    }

    #[tokio::test]
    async fn a_request_soon_after_the_last_answer_is_in_a_loop() {
        // A gap of an hour: "soon" whatever the machine's load.
        let conn = Arc::new(Connection::with_gap(Duration::from_secs(3600)));
        assert!(!marked(&conn).await, "a connection's first request");
        assert!(marked(&conn).await);
        assert!(marked(&conn).await);
        assert!(!in_a_loop(), "outside a request");
    }

    #[tokio::test]
    async fn a_request_after_a_pause_is_not_in_a_loop() {
        let conn = Arc::new(Connection::with_gap(Duration::from_millis(1)));
        assert!(!marked(&conn).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!marked(&conn).await);
    }
}
