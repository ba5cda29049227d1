//! A store that counts the failures of the store it wraps, so that
//! `pns_store_errors_total` sees every failed operation (a poll's read, the
//! scheduler's release, a purge) and not only the ones an ingest path noticed.
//! Every method delegates; a new trait method must be added here too.

use super::{
    Acceptance, Durable, MessageStore, NewMessage, OpaqueSession, PurgeReport, RetentionPolicy,
    Revocations, SharedStore, StoreResult, StoredMessage,
};
use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;

pub struct Metered {
    inner: SharedStore,
    errors: Counter,
}

impl Metered {
    pub fn new(inner: SharedStore, errors: Counter) -> Self {
        Metered { inner, errors }
    }

    fn count<T>(&self, r: StoreResult<T>) -> StoreResult<T> {
        if r.is_err() {
            self.errors.inc();
        }
        r
    }
}

#[async_trait]
impl MessageStore for Metered {
    async fn accept(&self, batch: Vec<NewMessage>, now_ms: i64) -> StoreResult<Acceptance> {
        let acceptance = self.count(self.inner.accept(batch, now_ms).await)?;
        let errors = self.errors.clone();
        let durable = acceptance.durable;
        Ok(Acceptance {
            outcomes: acceptance.outcomes,
            durable: Durable::when(async move {
                let r = durable.wait().await;
                if r.is_err() {
                    errors.inc();
                }
                r
            }),
        })
    }

    async fn fetch(
        &self,
        user: &str,
        after_seq: i64,
        since_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.count(self.inner.fetch(user, after_seq, since_ms, limit).await)
    }

    async fn release_due(&self, now_ms: i64) -> StoreResult<Vec<String>> {
        self.count(self.inner.release_due(now_ms).await)
    }

    async fn next_due(&self) -> StoreResult<Option<i64>> {
        self.count(self.inner.next_due().await)
    }

    async fn position(&self, session: &str) -> StoreResult<Option<i64>> {
        self.count(self.inner.position(session).await)
    }

    async fn save_position(
        &self,
        session: &str,
        user: &str,
        seq: i64,
        now_ms: i64,
    ) -> StoreResult<()> {
        self.count(self.inner.save_position(session, user, seq, now_ms).await)
    }

    async fn revoke_session(&self, jti: &str, expires_ms: i64) -> StoreResult<()> {
        self.count(self.inner.revoke_session(jti, expires_ms).await)
    }

    async fn revoke_mailbox(&self, user: &str, revoked_ms: i64) -> StoreResult<()> {
        self.count(self.inner.revoke_mailbox(user, revoked_ms).await)
    }

    async fn revocations(&self, now_ms: i64) -> StoreResult<Revocations> {
        self.count(self.inner.revocations(now_ms).await)
    }

    async fn register_opaque_session(
        &self,
        sid_hash: &str,
        user: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<OpaqueSession> {
        self.count(
            self.inner
                .register_opaque_session(sid_hash, user, now_ms, expires_ms)
                .await,
        )
    }

    async fn opaque_session(&self, sid_hash: &str) -> StoreResult<Option<OpaqueSession>> {
        self.count(self.inner.opaque_session(sid_hash).await)
    }

    async fn delete_opaque_session(&self, sid_hash: &str) -> StoreResult<bool> {
        self.count(self.inner.delete_opaque_session(sid_hash).await)
    }

    async fn purge(&self, policy: RetentionPolicy, now_ms: i64) -> StoreResult<PurgeReport> {
        self.count(self.inner.purge(policy, now_ms).await)
    }

    async fn message_count(&self) -> StoreResult<i64> {
        self.count(self.inner.message_count().await)
    }

    async fn backup(&self) -> StoreResult<Option<std::fs::File>> {
        self.count(self.inner.backup().await)
    }

    async fn ping(&self) -> StoreResult<()> {
        self.count(self.inner.ping().await)
    }

    async fn flush(&self) -> StoreResult<()> {
        self.count(self.inner.flush().await)
    }

    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<super::StoreEvent>> {
        self.inner.events()
    }

    fn announce_poll(&self, user: &str, session: &str, at_ms: i64) {
        self.inner.announce_poll(user, session, at_ms)
    }

    fn wake_after_commits(&self, hub: std::sync::Arc<crate::hub::Hub>) -> bool {
        self.inner.wake_after_commits(hub)
    }

    fn sync_times(&self) -> Option<prometheus_client::metrics::histogram::Histogram> {
        self.inner.sync_times()
    }
}
