//! The message store: where accepted messages, dedup keys, session positions,
//! revocations and opaque sessions live. One trait, [`MessageStore`], with SQLite (the embedded
//! default) and PostgreSQL (the cluster store) behind it.
//!
//! Invariants every implementation keeps:
//! - `accept` answers once its messages are visible to [`MessageStore::fetch`],
//!   with an [`Acceptance`] whose `durable` resolves once they are durable;
//!   nothing acknowledges them before that. A batch is stored whole or not
//!   at all.
//! - Per mailbox, the `seq` of visible messages grows in commit order, so a
//!   reader that has seen `seq = n` never later finds a new message below `n`.
//! - A delayed message gets its `seq` when it becomes due, not when accepted.
//! - A store that several nodes share reports, through [`MessageStore::events`],
//!   what the other nodes did that this node must act on; the rest of the
//!   application never asks which store it runs on.

mod metered;
mod page_cache;
mod positions;
mod postgres;
mod recent;
mod sqlite;
mod sqlite_checkpoint;
mod sqlite_direct;
mod sqlite_lock;
mod sqlite_vfs;
mod wal_sync;

pub use metered::Metered;

pub use sqlite::sqlite_path;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A message as handed to the store by an ingest path, already validated.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub user: String,
    pub kind: i64,
    /// The `data` object, as compact JSON text.
    pub data: String,
    pub dedup_key: Option<String>,
    pub delay_ms: u64,
}

/// What became of one message of an `accept` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Stored; `visible` is false when it waits for its delay.
    Stored { id: String, visible: bool },
    /// The (user, dedupKey) was already stored as message `id`.
    Duplicate { id: String },
}

/// What `accept` answers once the batch is visible.
pub struct Acceptance {
    /// One outcome per message, in order.
    pub outcomes: Vec<Accepted>,
    /// Resolves once the batch is durable: a power loss after that keeps it.
    pub durable: Durable,
}

/// A store's word that a write is, or will be, durable. A store whose
/// commit is durable gives [`Durable::now`]; the SQLite store makes a
/// commit visible before its fsync (see `sqlite`), so that polls are not
/// answered a disk flush late, and resolves this after the fsync.
pub struct Durable(Pin<Box<dyn Future<Output = StoreResult<()>> + Send>>);

impl Durable {
    pub fn now() -> Self {
        Durable(Box::pin(std::future::ready(Ok(()))))
    }

    pub fn when(durable: impl Future<Output = StoreResult<()>> + Send + 'static) -> Self {
        Durable(Box::pin(durable))
    }

    pub async fn wait(self) -> StoreResult<()> {
        self.0.await
    }
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Durable")
    }
}

/// A visible message as read back for a poll answer.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub seq: i64,
    pub id: String,
    pub kind: i64,
    pub accepted_ms: i64,
    pub visible_ms: i64,
    /// The `data` object, as JSON text.
    pub data: String,
}

/// The revocations in force, loaded once at start and then kept in memory.
#[derive(Debug, Default, Clone)]
pub struct Revocations {
    /// (jti, expires_ms)
    pub sessions: Vec<(String, i64)>,
    /// (mailbox, revoked_ms)
    pub mailboxes: Vec<(String, i64)>,
}

/// How long things are kept.
#[derive(Debug, Clone, Copy)]
pub struct RetentionPolicy {
    pub max_messages_per_user: u32,
    pub max_age_ms: i64,
}

/// What another node sharing the store did, as this node hears of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// Visible messages for `user` were committed: wake its polls.
    News { user: String },
    /// A session was revoked until `expires_ms`.
    SessionRevoked { jti: String, expires_ms: i64 },
    /// Every session of `user` started at or before `at_ms` was revoked.
    MailboxRevoked { user: String, at_ms: i64 },
    /// A delayed message was stored: the next due time may be earlier.
    DelayedAccepted,
    /// An opaque session was registered (or registered again), or deleted:
    /// drop what is cached of it; when deleted, end its held polls.
    OpaqueSessionChanged { sid_hash: String, deleted: bool },
    /// A poll of `session` began elsewhere at `at_ms`: older polls of it end.
    PollStarted {
        user: String,
        session: String,
        at_ms: i64,
    },
    /// Events may have been missed (the feed reconnected, or its reader fell
    /// behind): reload the revocations and re-check every held poll.
    Resync,
}

/// What one purge removed.
#[derive(Debug, Default, Clone, Copy)]
pub struct PurgeReport {
    pub messages: u64,
    pub dedup_keys: u64,
    pub positions: u64,
    pub revocations: u64,
    pub opaque_sessions: u64,
}

impl std::ops::AddAssign for PurgeReport {
    fn add_assign(&mut self, other: PurgeReport) {
        self.messages += other.messages;
        self.dedup_keys += other.dedup_keys;
        self.positions += other.positions;
        self.revocations += other.revocations;
        self.opaque_sessions += other.opaque_sessions;
    }
}

/// Register an opaque sid (`$1` its hash, `$2` the mailbox, `$3` now, `$4`
/// its end), in both stores: registered again for the same mailbox before
/// its end, it keeps its start, so what came since stays news to it; for
/// another mailbox, or after its end, it starts anew. Returns the mailbox,
/// the start and the end.
pub(super) const REGISTER_OPAQUE: &str =
    "INSERT INTO opaque_sessions (sid_hash, mailbox, created_ms, expires_ms) VALUES ($1, $2, $3, $4)
     ON CONFLICT (sid_hash) DO UPDATE SET
         created_ms = CASE
             WHEN opaque_sessions.mailbox = excluded.mailbox
              AND opaque_sessions.expires_ms > excluded.created_ms
             THEN opaque_sessions.created_ms ELSE excluded.created_ms END,
         mailbox = excluded.mailbox,
         expires_ms = excluded.expires_ms
     RETURNING mailbox, created_ms, expires_ms";

/// What a purge deletes besides messages, the same in both stores.
pub(super) const PURGED_BESIDE_MESSAGES: [Expiry; 4] = [
    Expiry {
        sql: "DELETE FROM dedup_keys WHERE created_ms < $1",
        count: |r| &mut r.dedup_keys,
        older_than: OlderThan::Retention,
    },
    Expiry {
        sql: "DELETE FROM session_positions WHERE updated_ms < $1",
        count: |r| &mut r.positions,
        older_than: OlderThan::Retention,
    },
    Expiry {
        sql: "DELETE FROM revoked_sessions WHERE expires_ms < $1",
        count: |r| &mut r.revocations,
        older_than: OlderThan::Now,
    },
    Expiry {
        sql: "DELETE FROM opaque_sessions WHERE expires_ms < $1",
        count: |r| &mut r.opaque_sessions,
        older_than: OlderThan::Now,
    },
];

/// What one slice of a purge did ([`purge_slice`]).
#[derive(Debug, Default)]
pub(super) struct PurgeSlice {
    pub report: PurgeReport,
    /// Where the next slice begins; `None` when this one reached the end.
    pub next: Option<String>,
    /// The newest seq deleted.
    pub newest_deleted: Option<i64>,
}

/// The rows a statement changed, in either store.
pub(super) trait RowsAffected {
    fn rows(&self) -> u64;
}

impl RowsAffected for sqlx::sqlite::SqliteQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

impl RowsAffected for sqlx::postgres::PgQueryResult {
    fn rows(&self) -> u64 {
        self.rows_affected()
    }
}

/// Where a store's purge deletes the messages older than the retention.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum PastTheAge {
    /// In each slice, beside those past the cap: the SQLite store, whose
    /// table has no index on their age.
    InEachSlice,
    /// Apart, through the index on their age: the PostgreSQL store.
    Apart,
}

/// One slice of a purge, the same in both stores: in the mailboxes from
/// `from` on, as many as about `rows` rows hold, delete the messages past
/// the newest `max_messages_per_user` of their mailbox, and those older
/// than the retention if `past_the_age` says so; the first slice (`from`
/// `None`) also deletes what [`PURGED_BESIDE_MESSAGES`] names. The caller
/// makes each slice a transaction.
pub(super) async fn purge_slice<DB>(
    conn: &mut DB::Connection,
    policy: RetentionPolicy,
    now_ms: i64,
    from: Option<String>,
    rows: i64,
    past_the_age: PastTheAge,
) -> Result<PurgeSlice, sqlx::Error>
where
    DB: sqlx::Database,
    for<'e> &'e mut DB::Connection: sqlx::Executor<'e, Database = DB>,
    for<'q> DB::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Decode<'q, DB> + sqlx::Type<DB>,
    for<'r> String: sqlx::Decode<'r, DB> + sqlx::Type<DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
    DB::QueryResult: RowsAffected,
{
    let mut slice = PurgeSlice::default();
    if from.is_none() {
        for expiry in PURGED_BESIDE_MESSAGES {
            *(expiry.count)(&mut slice.report) = sqlx::query(expiry.sql)
                .bind(expiry.older_than.ms(policy, now_ms))
                .execute(&mut *conn)
                .await?
                .rows();
        }
    }
    let from = from.unwrap_or_default();
    let from = from.as_str();
    // The first mailbox of the next slice: the one `rows` rows on, or the
    // one after `from` if `from` alone holds that many.
    let mut next: Option<String> = sqlx::query_scalar(
        "SELECT mailbox FROM messages WHERE mailbox >= $1 ORDER BY mailbox, seq LIMIT 1 OFFSET $2",
    )
    .bind(from)
    .bind(rows)
    .fetch_optional(&mut *conn)
    .await?;
    if next.as_deref() == Some(from) {
        next = sqlx::query_scalar(
            "SELECT mailbox FROM messages WHERE mailbox > $1 ORDER BY mailbox LIMIT 1",
        )
        .bind(from)
        .fetch_optional(&mut *conn)
        .await?;
    }
    let (in_slice, bound) = match next {
        Some(_) => ("mailbox >= $1 AND mailbox < $2", "$3"),
        None => ("mailbox >= $1", "$2"),
    };
    let mut deletes = Vec::with_capacity(2);
    if past_the_age == PastTheAge::InEachSlice {
        deletes.push((
            format!("DELETE FROM messages WHERE {in_slice} AND visible_ms < {bound} RETURNING seq"),
            OlderThan::Retention.ms(policy, now_ms),
        ));
    }
    deletes.push((
        format!(
            "DELETE FROM messages WHERE (mailbox, seq) IN (
                SELECT mailbox, seq FROM (
                    SELECT mailbox, seq,
                           row_number() OVER (PARTITION BY mailbox ORDER BY seq DESC) AS rn
                    FROM messages WHERE {in_slice}
                ) AS ranked WHERE rn > {bound}
            ) RETURNING seq"
        ),
        i64::from(policy.max_messages_per_user),
    ));
    for (sql, bound) in deletes {
        let mut delete = sqlx::query_scalar::<DB, i64>(&sql).bind(from);
        if let Some(next) = next.as_deref() {
            delete = delete.bind(next);
        }
        let deleted = delete.bind(bound).fetch_all(&mut *conn).await?;
        slice.report.messages += deleted.len() as u64;
        slice.newest_deleted = slice.newest_deleted.max(deleted.into_iter().max());
    }
    slice.next = next;
    Ok(slice)
}

/// One statement of a purge.
pub(super) struct Expiry {
    /// Written with `$1`, which SQLite takes too.
    pub sql: &'static str,
    /// The report's count it sets.
    pub count: fn(&mut PurgeReport) -> &mut u64,
    /// What `$1` is.
    pub older_than: OlderThan,
}

/// What an [`Expiry`] compares with.
#[derive(Clone, Copy)]
pub(super) enum OlderThan {
    /// Older than the retention allows (dedup keys, positions).
    Retention,
    /// Expired (revocations and opaque sessions, which carry their end).
    Now,
}

impl OlderThan {
    pub(super) fn ms(self, policy: RetentionPolicy, now_ms: i64) -> i64 {
        match self {
            OlderThan::Retention => now_ms - policy.max_age_ms,
            OlderThan::Now => now_ms,
        }
    }
}

/// An opaque session (a webmail sid that is not a JWT), known by the SHA-256
/// of its sid; the sid itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpaqueSession {
    pub user: String,
    /// When it was first registered: where its news begins.
    pub start_ms: i64,
    pub expires_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("store error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store writer stopped")]
    WriterGone,
    #[error(
        "the database {} is in use by another process (pid {pid}): one node per SQLite file, so stop that one first",
        path.display()
    )]
    InUse { path: std::path::PathBuf, pid: i32 },
}

impl StoreError {
    /// Errors that mean "try again later" rather than "this request is wrong".
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) | StoreError::WriterGone => true,
            StoreError::Database(e) => match e {
                sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Io(_)
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(d) => d.code().is_some_and(|c| unavailable_sqlstate(&c)),
                _ => false,
            },
            StoreError::Migrate(_) | StoreError::InUse { .. } => false,
        }
    }
}

/// SQLSTATEs that mean the database cannot serve now, not that the request
/// is wrong: connection exceptions (08), insufficient resources such as too
/// many connections (53), shutdown or start-up in progress (57P01-57P03), and
/// a read-only database, as a standby is right after a failover (25006).
fn unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "57P01" | "57P02" | "57P03" | "25006")
}

pub type StoreResult<T> = Result<T, StoreError>;

#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Store a batch, all or nothing. Answers once it is visible to
    /// [`fetch`](Self::fetch); its `durable` resolves once it is durable.
    async fn accept(&self, batch: Vec<NewMessage>, now_ms: i64) -> StoreResult<Acceptance>;

    /// Visible messages of `user` with `seq > after_seq` and `visible_ms >=
    /// since_ms`, oldest first, at most `limit`.
    async fn fetch(
        &self,
        user: &str,
        after_seq: i64,
        since_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>>;

    /// Make every delayed message due by `now_ms` visible; returns the users
    /// that got news.
    async fn release_due(&self, now_ms: i64) -> StoreResult<Vec<String>>;

    /// When the next delayed message comes due, if any waits.
    async fn next_due(&self) -> StoreResult<Option<i64>>;

    /// The position a cursor-less session has read up to.
    async fn position(&self, session: &str) -> StoreResult<Option<i64>>;
    /// Keep the position of a cursor-less session (the larger one wins). A
    /// store may write it behind: `position` knows it at once, the file
    /// soon after, and surely after [`flush`](Self::flush).
    async fn save_position(
        &self,
        session: &str,
        user: &str,
        seq: i64,
        now_ms: i64,
    ) -> StoreResult<()>;

    async fn revoke_session(&self, jti: &str, expires_ms: i64) -> StoreResult<()>;
    async fn revoke_mailbox(&self, user: &str, revoked_ms: i64) -> StoreResult<()>;
    async fn revocations(&self, now_ms: i64) -> StoreResult<Revocations>;

    /// Register an opaque session by the hex SHA-256 of its sid, until
    /// `expires_ms`. Registering a live session of the same user again only
    /// moves its expiry; otherwise it starts anew at `now_ms`. Returns the
    /// session as stored.
    async fn register_opaque_session(
        &self,
        sid_hash: &str,
        user: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<OpaqueSession>;

    /// The opaque session with this sid hash, expired or not.
    async fn opaque_session(&self, sid_hash: &str) -> StoreResult<Option<OpaqueSession>>;

    /// Remove an opaque session; false when there was none.
    async fn delete_opaque_session(&self, sid_hash: &str) -> StoreResult<bool>;

    /// Apply the retention policy (and drop expired opaque sessions).
    async fn purge(&self, policy: RetentionPolicy, now_ms: i64) -> StoreResult<PurgeReport>;

    /// Count of visible and delayed messages held (for stats).
    async fn message_count(&self) -> StoreResult<i64>;

    /// A consistent copy of the store as one file, already unlinked, for
    /// `GET /internal/v1/backup`. `None` from a store that is backed up
    /// with its own tools (PostgreSQL's).
    async fn backup(&self) -> StoreResult<Option<std::fs::File>> {
        Ok(None)
    }

    /// Cheap round trip, for readiness.
    async fn ping(&self) -> StoreResult<()>;

    /// Write out what the store writes behind (the SQLite store's session
    /// positions); on shutdown, so that a restart repeats no answer.
    async fn flush(&self) -> StoreResult<()> {
        Ok(())
    }

    /// Events from the other nodes sharing this store, for a store that can
    /// be shared; `None` when no other node can write to it (SQLite).
    fn events(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        None
    }

    /// A poll of `session` began on this node at `at_ms`; a shared store tells
    /// the other nodes ([`StoreEvent::PollStarted`]), best effort.
    fn announce_poll(&self, _user: &str, _session: &str, _at_ms: i64) {}

    /// Have the store wake `hub` itself after each commit that makes
    /// messages visible, in commit order, with the rows committed
    /// ([`crate::hub::Hub::wake_after_commit`]); the first hub given is kept.
    /// False for a store that cannot: then whoever stored a message wakes
    /// its user.
    fn wake_after_commits(&self, _hub: Arc<crate::hub::Hub>) -> bool {
        false
    }

    /// How long each of the syncs that acknowledgements wait for took, for
    /// a store that makes them itself (SQLite's of its log); `None` where
    /// the database server does (PostgreSQL's commit).
    fn sync_times(&self) -> Option<prometheus_client::metrics::histogram::Histogram> {
        None
    }
}

pub type SharedStore = Arc<dyn MessageStore>;

fn is_postgres(database_url: &str) -> bool {
    database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")
}

/// Open the store named by a database URL, running its migrations; fails
/// when the database cannot be reached (`pns migrate`).
pub async fn open(database_url: &str) -> StoreResult<SharedStore> {
    if database_url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::open(database_url).await?))
    } else if is_postgres(database_url) {
        let store = PgStore::new(database_url)?;
        store.ready().await?;
        Ok(Arc::new(store))
    } else {
        Err(StoreError::Database(sqlx::Error::Configuration(
            format!(
                "unsupported database URL scheme in {:?}: use sqlite:// or postgres://",
                database_url.split(':').next().unwrap_or_default()
            )
            .into(),
        )))
    }
}

/// Like [`open`], but a PostgreSQL store that cannot be reached yet is
/// returned anyway (`pns serve`): the node starts, answers 503 until the
/// database is back, then migrates on first contact. Any other error fails.
pub async fn connect(database_url: &str) -> StoreResult<SharedStore> {
    if !is_postgres(database_url) {
        return open(database_url).await;
    }
    let store = PgStore::new(database_url)?;
    match store.ready().await {
        Ok(_) => {}
        Err(e) if e.is_unavailable() => {
            tracing::warn!(error = %e, "the database is unreachable; answering 503 until it is back");
        }
        Err(e) => return Err(e),
    }
    Ok(Arc::new(store))
}

/// A fresh message id: 128 random bits, URL-safe.
pub fn new_message_id() -> String {
    use base64::Engine;
    let bytes: [u8; 16] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
