//! The delay scheduler: makes delayed messages visible when they come due.
//!
//! It sleeps until the earliest due time the store knows of, releases what is
//! due and wakes those users. A newly accepted delayed message nudges it to
//! look again, so it never polls the store in a loop; after a restart it
//! starts by releasing whatever fell due while the node was down.

use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::store::SharedStore;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How long to wait before retrying after a store error.
const RETRY: Duration = Duration::from_secs(1);
/// The longest sleep; a safety net if a nudge were ever lost.
const MAX_SLEEP: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct DelayScheduler {
    nudge: Notify,
}

impl DelayScheduler {
    pub fn new() -> Arc<Self> {
        Arc::new(DelayScheduler::default())
    }

    /// A delayed message was stored: recompute the next due time.
    pub fn reschedule(&self) {
        self.nudge.notify_one();
    }

    pub async fn run(self: Arc<Self>, store: SharedStore, hub: Arc<Hub>, shutdown: Shutdown) {
        // A store that wakes the hub after its commits wakes the users
        // whose messages it released; a second wake here would cost each
        // of their polls, held again by then, a read for nothing.
        let wakes = (!store.wake_after_commits(hub.clone())).then_some(&*hub);
        loop {
            let now = crate::clock::now_ms();
            let sleep = match release_and_peek(&store, wakes, now).await {
                Ok(Some(due)) => {
                    Duration::from_millis(u64::try_from(due - now).unwrap_or(0)).min(MAX_SLEEP)
                }
                Ok(None) => MAX_SLEEP,
                Err(e) => {
                    tracing::warn!(error = %e, "delay scheduler: store error, retrying");
                    RETRY
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.nudge.notified() => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

/// Release what is due, waking its users on `wakes` if given; then the
/// next due time.
async fn release_and_peek(
    store: &SharedStore,
    wakes: Option<&Hub>,
    now: i64,
) -> crate::store::StoreResult<Option<i64>> {
    let released = store.release_due(now).await?;
    if let Some(hub) = wakes {
        for user in released {
            hub.wake(&user);
        }
    }
    store.next_due().await
}
