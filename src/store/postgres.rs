//! PostgreSQL store, for several nodes sharing one database (the cluster).
//!
//! Writes are plain transactions on a pool; every write that other nodes must
//! hear of issues a `NOTIFY` inside its own transaction, so the notification
//! goes out exactly when (and only if) the write commits. One connection per
//! node `LISTEN`s and turns what it hears into [`StoreEvent`]s (see
//! [`PgStore::events`]); the application applies them to the hub, the session
//! validator and the delay scheduler without knowing where they came from.
//!
//! Ordering. A sequence hands out numbers in call order, but concurrent
//! transactions may commit in another order: if 11 commits before 10, a reader
//! that saw 11 would skip 10 for good. So inserts into one mailbox are
//! serialized: a transaction takes `pg_advisory_xact_lock` on each mailbox it
//! writes before drawing any `seq`, and holds it until commit. Chosen over a
//! per-mailbox counter row (a table the SQLite store does not have, and a hot
//! row rewritten on every message) and over SERIALIZABLE (retries on the hot
//! path); the lock needs no table, vanishes with the transaction, and only
//! writers to the same mailbox wait for each other. Keys are computed here
//! (from SHA-256, not `hashtext`) so that a batch can take its locks in
//! ascending order, which rules out deadlocks between batches; a collision
//! between two mailboxes only makes them wait for each other.
//!
//! Connection URL: `postgres://user@host:port/db`, plus two parameters of our
//! own, removed before the URL is handed to the driver:
//! - `schema=NAME` puts the tables in schema NAME (created when missing), so
//!   several deployments or tests can share a database. Plain
//!   `options=-c search_path=NAME` works too, for a schema that exists.
//! - `pool_size=N`, the connections a node keeps for requests (default 10).
//!
//! A node holds `pool_size + 1` connections: the pool and the listener, whose
//! `application_name` is the pool's with ` listener` appended (default
//! `pns` and `pns listener`; set `application_name=` in the URL to tell nodes
//! apart in `pg_stat_activity`).
//!
//! Faults. Acquiring a connection gives up after [`ACQUIRE_TIMEOUT`], and the
//! error counts as "unavailable" (503 with `Retry-After`), so nothing hangs on
//! a dead database. The node starts even when the database is unreachable and
//! runs the migrations on first contact. The listener reconnects with backoff;
//! once it listens again it emits [`StoreEvent::Resync`], so wakeups that went
//! out while it was deaf are not lost. A heartbeat it sends to itself finds a
//! listening connection that died without a word.

use super::{
    new_message_id, Acceptance, Accepted, Durable, MessageStore, NewMessage, OpaqueSession,
    PurgeReport, RetentionPolicy, Revocations, StoreError, StoreEvent, StoreResult, StoredMessage,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Connections a node keeps for requests, unless `pool_size=` says otherwise.
pub const DEFAULT_POOL_SIZE: u32 = 10;
/// How long a request waits for a connection (or for the database to answer
/// a connect) before it is told the store is unavailable.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a request waits for the schema to be prepared by another caller.
const REQUEST_PATIENCE: Duration = Duration::from_millis(3500);
/// The `application_name` of the pool when the URL sets none.
pub const DEFAULT_APPLICATION_NAME: &str = "pns";
/// PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
const PAYLOAD_MAX: usize = 7900;
/// Events buffered for a slow consumer before it is told it lagged.
const EVENT_BACKLOG: usize = 65_536;
/// Delayed messages moved per transaction.
const RELEASE_ROUND: i64 = 1000;
/// Poll announcements gathered into one notification.
const ANNOUNCE_WINDOW: Duration = Duration::from_millis(50);
/// Poll announcements kept at most while the database is slow; more are dropped.
const ANNOUNCE_BACKLOG: usize = 10_000;
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// Rows a slice of a purge goes through, about, each slice a transaction
/// of its own, so that a purge after a long stop or a lowered retention
/// is not one huge transaction. Larger than the SQLite store's
/// (`PURGE_SLICE_ROWS` in `sqlite`, where the writes wait for each slice):
/// here no write waits for a slice, and each slice costs a read of where
/// the next begins. With 2 million rows and nothing to delete a purge
/// took 1.7–2.2 s in slices of 16,384, 2.3–2.8 s in slices of 2,048, and
/// 1.1–1.4 s in one piece (docs/OPERATIONS.md, Retention).
const PURGE_SLICE_ROWS: i64 = 16_384;
/// A heartbeat not heard back within this means the listener is deaf.
const HEARTBEAT_LIMIT: Duration = Duration::from_secs(25);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// A listener that stayed up this long reconnects at once when it drops.
const STABLE_FOR: Duration = Duration::from_secs(10);

pub struct PgStore {
    pool: PgPool,
    shared: Arc<Shared>,
    _stop: DropGuard,
}

/// What the store's background tasks share with it.
struct Shared {
    /// Tells this node's own notifications apart from the others'.
    node: String,
    /// The schema named by `schema=`, created if missing.
    schema: Option<String>,
    listener_options: PgConnectOptions,
    /// The notification channel, known once the schema is migrated.
    ready: OnceLock<String>,
    /// A task is preparing the schema now.
    preparing: AtomicBool,
    /// Bumped each time a preparation ends.
    prepared: watch::Sender<u64>,
    /// Why the last preparation failed: (unavailable, reason).
    prepare_failure: Mutex<Option<(bool, String)>>,
    events: broadcast::Sender<StoreEvent>,
    feed_started: AtomicBool,
    feed_up: AtomicBool,
    polls: Mutex<Vec<(String, String, i64)>>,
    polls_nudge: Notify,
    stop: CancellationToken,
}

/// A notification as sent between nodes: `{"n": node, "k": kind, …}`.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    n: String,
    #[serde(flatten)]
    e: Wire,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
enum Wire {
    News { u: Vec<String> },
    Session { j: String, x: i64 },
    Mailbox { u: String, t: i64 },
    Opaque { h: String, d: bool },
    Delayed,
    Polls { p: Vec<(String, String, i64)> },
    Beat,
    Resync,
}

/// A connection URL split into what the driver takes and what we take.
struct PgUrl {
    options: PgConnectOptions,
    schema: Option<String>,
    pool_size: u32,
}

fn config_error(msg: String) -> StoreError {
    StoreError::Database(sqlx::Error::Configuration(msg.into()))
}

fn parse_url(url: &str) -> StoreResult<PgUrl> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut kept = Vec::new();
    let mut schema = None;
    let mut pool_size = DEFAULT_POOL_SIZE;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "schema" => {
                let valid = value
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                    && value.len() <= 63
                    && value
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if !valid {
                    return Err(config_error(format!(
                        "schema={value:?} in the database URL: use lower-case letters, digits and _ (at most 63)"
                    )));
                }
                schema = Some(value.to_owned());
            }
            "pool_size" => {
                pool_size = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        config_error(format!(
                            "pool_size={value:?} in the database URL: use a number from 1 to 1000"
                        ))
                    })?;
            }
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let options: PgConnectOptions = rest.parse()?;
    Ok(PgUrl {
        options,
        schema,
        pool_size,
    })
}

/// The notification channel of a schema. Channels are per database, not per
/// schema, so deployments in different schemas must not share one.
fn channel_name(schema: &str) -> String {
    if schema == "public" {
        return "pns_events".to_owned();
    }
    let name = format!("pns_events:{schema}");
    // Channel names are identifiers: 63 bytes at most.
    if name.len() <= 63 {
        name
    } else {
        format!("pns_events:{:016x}", lock_key(schema))
    }
}

/// The advisory lock key of a mailbox (or of any name).
fn lock_key(name: &str) -> i64 {
    let digest = Sha256::digest(name.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

fn migrate_error(e: MigrateError) -> StoreError {
    match e {
        // Not reaching the database is not a broken migration.
        MigrateError::Execute(e) => StoreError::Database(e),
        other => StoreError::Migrate(other),
    }
}

fn payload(node: &str, e: Wire) -> String {
    serde_json::to_string(&Envelope {
        n: node.to_owned(),
        e,
    })
    .unwrap_or_default()
}

/// One payload, or a `resync` when it would be too long to send.
fn single_payload(node: &str, e: Wire) -> String {
    let p = payload(node, e);
    if p.len() < PAYLOAD_MAX {
        p
    } else {
        payload(node, Wire::Resync)
    }
}

/// Payloads carrying `items`, as few as fit under PostgreSQL's size limit. An
/// item too long to fit alone becomes a `resync` when `resync_oversize`, and
/// is dropped otherwise.
fn list_payloads<T: Serialize>(
    node: &str,
    items: Vec<T>,
    wrap: impl Fn(Vec<T>) -> Wire,
    resync_oversize: bool,
) -> Vec<String> {
    let overhead = payload(node, wrap(Vec::new())).len();
    let mut out = Vec::new();
    let mut chunk = Vec::new();
    let mut size = overhead;
    for item in items {
        let len = serde_json::to_string(&item).map_or(PAYLOAD_MAX, |s| s.len()) + 1;
        if overhead + len >= PAYLOAD_MAX {
            if resync_oversize {
                out.push(payload(node, Wire::Resync));
            }
            continue;
        }
        if size + len >= PAYLOAD_MAX {
            out.push(payload(node, wrap(std::mem::take(&mut chunk))));
            size = overhead;
        }
        chunk.push(item);
        size += len;
    }
    if !chunk.is_empty() {
        out.push(payload(node, wrap(chunk)));
    }
    out
}

/// Send `payloads` on `channel`; inside a transaction they go out at commit.
async fn notify(conn: &mut PgConnection, channel: &str, payloads: &[String]) -> StoreResult<()> {
    if payloads.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
        .bind(channel)
        .bind(payloads)
        .execute(conn)
        .await?;
    Ok(())
}

/// Send `payloads` in a transaction of their own that does not wait for its
/// WAL flush. Notifying commits take a server-wide lock one at a time, held
/// through the flush: announcements and heartbeats need no durability, and
/// should not make the accepts that do wait longer.
async fn notify_lightly(pool: &PgPool, channel: &str, payloads: &[String]) -> StoreResult<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    notify(&mut tx, channel, payloads).await?;
    tx.commit().await?;
    Ok(())
}

/// Take the advisory lock of each mailbox, in ascending key order so that two
/// transactions sharing mailboxes cannot deadlock. Held until commit.
async fn lock_mailboxes<'a>(
    conn: &mut PgConnection,
    mailboxes: impl Iterator<Item = &'a str>,
) -> StoreResult<()> {
    let mut keys: Vec<i64> = mailboxes.map(lock_key).collect();
    keys.sort_unstable();
    keys.dedup();
    if keys.is_empty() {
        return Ok(());
    }
    // A function scan yields the array in order, so the locks are taken in it.
    sqlx::query("SELECT pg_advisory_xact_lock(k) FROM unnest($1::int8[]) AS k")
        .bind(&keys)
        .execute(conn)
        .await?;
    Ok(())
}

/// Create the schema if asked, run the migrations, and name the channel.
async fn prepare(pool: &PgPool, schema: Option<&str>) -> StoreResult<String> {
    if let Some(schema) = schema {
        // Nodes starting together race to create it; losing is fine.
        match sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .execute(pool)
            .await
        {
            Ok(_) => {}
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("23505" | "42P06")) => {}
            Err(e) => return Err(e.into()),
        }
    }
    MIGRATOR.run(pool).await.map_err(migrate_error)?;
    let current: Option<String> = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(pool)
        .await?;
    let current = current.ok_or_else(|| {
        config_error("the database URL's search_path names no existing schema".into())
    })?;
    Ok(channel_name(&current))
}

/// The channel once the schema is ready, preparing it first if need be.
///
/// One task at a time prepares, in the background, so that a request can give
/// up after `patience` without cancelling a migration half-way (it holds a
/// session lock), and so that requests do not queue behind each other's
/// attempts while the database is away. Without `patience`, waits for the
/// attempt to end (each attempt gives up connecting after [`ACQUIRE_TIMEOUT`]).
async fn ready<'a>(
    pool: &PgPool,
    shared: &'a Arc<Shared>,
    patience: Option<Duration>,
) -> StoreResult<&'a str> {
    if let Some(channel) = shared.ready.get() {
        return Ok(channel);
    }
    let mut done = shared.prepared.subscribe();
    // An attempt may have ended between the check above and the subscription.
    if let Some(channel) = shared.ready.get() {
        return Ok(channel);
    }
    if !shared.preparing.swap(true, Ordering::AcqRel) {
        let (pool, task) = (pool.clone(), shared.clone());
        tokio::spawn(async move {
            let outcome = prepare(&pool, task.schema.as_deref()).await;
            let mut failure = task
                .prepare_failure
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match outcome {
                Ok(channel) => {
                    let _ = task.ready.set(channel);
                    *failure = None;
                }
                Err(e) => {
                    if e.is_unavailable() {
                        tracing::debug!(error = %e, "could not prepare the schema");
                    } else {
                        tracing::error!(error = %e, "could not prepare the schema");
                    }
                    *failure = Some((e.is_unavailable(), e.to_string()));
                }
            }
            drop(failure);
            task.preparing.store(false, Ordering::Release);
            task.prepared.send_modify(|n| *n += 1);
        });
    }
    let waited = match patience {
        Some(p) => tokio::time::timeout(p, done.changed()).await.is_ok(),
        None => {
            let _ = done.changed().await;
            true
        }
    };
    if let Some(channel) = shared.ready.get() {
        return Ok(channel);
    }
    let failure = shared
        .prepare_failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Err(match (waited, failure) {
        (true, Some((false, why))) => StoreError::Database(sqlx::Error::Protocol(format!(
            "cannot prepare the schema: {why}"
        ))),
        _ => StoreError::Unavailable(sqlx::Error::PoolTimedOut),
    })
}

impl PgStore {
    /// A transaction for the next slice of a purge, if this node's turn:
    /// every node runs the purge, one at a time does the work (the others
    /// skip their turn rather than fight over the same rows), and the lock
    /// is taken with each slice, so a node that finds it taken in the
    /// middle leaves the rest to the node that has it.
    async fn purge_turn(
        &self,
        lock: i64,
    ) -> StoreResult<Option<sqlx::Transaction<'_, sqlx::Postgres>>> {
        let mut tx = self.pool.begin().await?;
        let ours: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(lock)
            .fetch_one(&mut *tx)
            .await?;
        Ok(ours.then_some(tx))
    }

    /// A store on `url`, without contacting the database yet; see [`PgStore::ready`].
    pub fn new(url: &str) -> StoreResult<Self> {
        let PgUrl {
            options,
            schema,
            pool_size,
        } = parse_url(url)?;
        let app_name = options
            .get_application_name()
            .unwrap_or(DEFAULT_APPLICATION_NAME)
            .to_owned();
        // Notices ("already exists, skipping") are not worth a log line.
        let mut options = options
            .application_name(&app_name)
            .options([("client_min_messages", "warning")]);
        if let Some(schema) = &schema {
            options = options.options([("search_path", schema)]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.clone());
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            node: new_message_id(),
            schema,
            listener_options: options.application_name(&format!("{app_name} listener")),
            ready: OnceLock::new(),
            preparing: AtomicBool::new(false),
            prepared: watch::channel(0).0,
            prepare_failure: Mutex::new(None),
            events: broadcast::channel(EVENT_BACKLOG).0,
            feed_started: AtomicBool::new(false),
            feed_up: AtomicBool::new(false),
            polls: Mutex::new(Vec::new()),
            polls_nudge: Notify::new(),
            stop: stop.clone(),
        });
        tokio::spawn(announce_polls(pool.clone(), shared.clone()));
        Ok(PgStore {
            pool,
            shared,
            _stop: stop.drop_guard(),
        })
    }

    /// Reach the database: create the schema if asked, run the migrations,
    /// however long they take.
    pub async fn ready(&self) -> StoreResult<&str> {
        ready(&self.pool, &self.shared, None).await
    }

    /// [`PgStore::ready`] for a request: every operation does this first, so a
    /// node that started while the database was away catches up on first
    /// contact, but a request waits no longer than for a connection.
    async fn prepared(&self) -> StoreResult<&str> {
        ready(&self.pool, &self.shared, Some(REQUEST_PATIENCE)).await
    }

    async fn insert_visible(
        conn: &mut PgConnection,
        rows: &[(&str, &str, i64, &str)],
        accepted_ms: Option<&[i64]>,
        visible_ms: i64,
    ) -> StoreResult<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = rows.iter().map(|r| r.0).collect();
        let users: Vec<&str> = rows.iter().map(|r| r.1).collect();
        let kinds: Vec<i64> = rows.iter().map(|r| r.2).collect();
        let data: Vec<&str> = rows.iter().map(|r| r.3).collect();
        let accepted: Vec<i64> = match accepted_ms {
            Some(a) => a.to_vec(),
            None => vec![visible_ms; rows.len()],
        };
        // ORDER BY n: `seq` defaults are drawn above the sort, in batch order.
        sqlx::query(
            "INSERT INTO messages (id, mailbox, type, data, accepted_ms, visible_ms)
             SELECT i, m, k, d, a, $6
             FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[])
                  WITH ORDINALITY AS t(i, m, k, d, a, n)
             ORDER BY n",
        )
        .bind(&ids)
        .bind(&users)
        .bind(&kinds)
        .bind(&data)
        .bind(&accepted)
        .bind(visible_ms)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// News payloads for the distinct `users`.
    fn news(&self, mut users: Vec<String>) -> Vec<String> {
        users.sort_unstable();
        users.dedup();
        list_payloads(&self.shared.node, users, |u| Wire::News { u }, true)
    }
}

#[async_trait]
impl MessageStore for PgStore {
    async fn accept(&self, batch: Vec<NewMessage>, now_ms: i64) -> StoreResult<Acceptance> {
        let channel = self.prepared().await?;
        let ids: Vec<String> = batch.iter().map(|_| new_message_id()).collect();
        let mut out: Vec<Option<Accepted>> = vec![None; batch.len()];
        let mut tx = self.pool.begin().await?;
        // Every mailbox of the batch, delayed or not: two transactions on one
        // mailbox then never meet on a dedup key either.
        lock_mailboxes(&mut tx, batch.iter().map(|m| m.user.as_str())).await?;

        let keyed: Vec<usize> = (0..batch.len())
            .filter(|&i| batch[i].dedup_key.is_some())
            .collect();
        if !keyed.is_empty() {
            let users: Vec<&str> = keyed.iter().map(|&i| batch[i].user.as_str()).collect();
            let keys: Vec<&str> = keyed
                .iter()
                .map(|&i| batch[i].dedup_key.as_deref().unwrap_or_default())
                .collect();
            let key_ids: Vec<&str> = keyed.iter().map(|&i| ids[i].as_str()).collect();
            // In batch order, so that of two equal keys in one batch the first wins.
            let fresh: Vec<String> = sqlx::query_scalar(
                "INSERT INTO dedup_keys (mailbox, dedup_key, id, created_ms)
                 SELECT m, k, i, $4
                 FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS t(m, k, i, n)
                 ORDER BY n
                 ON CONFLICT DO NOTHING
                 RETURNING id",
            )
            .bind(&users)
            .bind(&keys)
            .bind(&key_ids)
            .bind(now_ms)
            .fetch_all(&mut *tx)
            .await?;
            let fresh: HashSet<String> = fresh.into_iter().collect();
            let dups: Vec<usize> = keyed
                .into_iter()
                .filter(|&i| !fresh.contains(&ids[i]))
                .collect();
            if !dups.is_empty() {
                let users: Vec<&str> = dups.iter().map(|&i| batch[i].user.as_str()).collect();
                let keys: Vec<&str> = dups
                    .iter()
                    .map(|&i| batch[i].dedup_key.as_deref().unwrap_or_default())
                    .collect();
                let rows: Vec<(String, String, String)> = sqlx::query_as(
                    "SELECT d.mailbox, d.dedup_key, d.id
                     FROM dedup_keys d JOIN unnest($1::text[], $2::text[]) AS t(m, k)
                       ON d.mailbox = t.m AND d.dedup_key = t.k",
                )
                .bind(&users)
                .bind(&keys)
                .fetch_all(&mut *tx)
                .await?;
                let known: HashMap<(String, String), String> =
                    rows.into_iter().map(|(m, k, id)| ((m, k), id)).collect();
                for i in dups {
                    let key = (
                        batch[i].user.clone(),
                        batch[i].dedup_key.clone().unwrap_or_default(),
                    );
                    let id = known.get(&key).cloned().ok_or_else(|| {
                        StoreError::Database(sqlx::Error::Protocol(
                            "a dedup key in conflict was gone when read back".into(),
                        ))
                    })?;
                    out[i] = Some(Accepted::Duplicate { id });
                }
            }
        }

        let mut visible = Vec::new();
        let mut delayed = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            if m.delay_ms == 0 {
                visible.push(i);
            } else {
                delayed.push(i);
            }
            out[i] = Some(Accepted::Stored {
                id: ids[i].clone(),
                visible: m.delay_ms == 0,
            });
        }
        let rows: Vec<(&str, &str, i64, &str)> = visible
            .iter()
            .map(|&i| {
                let m = &batch[i];
                (ids[i].as_str(), m.user.as_str(), m.kind, m.data.as_str())
            })
            .collect();
        Self::insert_visible(&mut tx, &rows, None, now_ms).await?;
        if !delayed.is_empty() {
            let d_ids: Vec<&str> = delayed.iter().map(|&i| ids[i].as_str()).collect();
            let d_users: Vec<&str> = delayed.iter().map(|&i| batch[i].user.as_str()).collect();
            let d_data: Vec<&str> = delayed.iter().map(|&i| batch[i].data.as_str()).collect();
            let d_kinds: Vec<i64> = delayed.iter().map(|&i| batch[i].kind).collect();
            let d_due: Vec<i64> = delayed
                .iter()
                .map(|&i| {
                    now_ms.saturating_add(i64::try_from(batch[i].delay_ms).unwrap_or(i64::MAX))
                })
                .collect();
            sqlx::query(
                "INSERT INTO delayed_messages (id, mailbox, type, data, accepted_ms, due_ms)
                 SELECT i, m, k, d, $5, u
                 FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $6::int8[])
                      AS t(i, m, k, d, u)",
            )
            .bind(&d_ids)
            .bind(&d_users)
            .bind(&d_kinds)
            .bind(&d_data)
            .bind(now_ms)
            .bind(&d_due)
            .execute(&mut *tx)
            .await?;
        }

        let mut payloads = self.news(visible.iter().map(|&i| batch[i].user.clone()).collect());
        if !delayed.is_empty() {
            payloads.push(payload(&self.shared.node, Wire::Delayed));
        }
        notify(&mut tx, channel, &payloads).await?;
        // A PostgreSQL commit is durable when it returns.
        tx.commit().await?;
        Ok(Acceptance {
            outcomes: out.into_iter().flatten().collect(),
            durable: Durable::now(),
        })
    }

    async fn fetch(
        &self,
        user: &str,
        after_seq: i64,
        since_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        self.prepared().await?;
        let rows: Vec<(i64, String, i64, i64, i64, String)> = sqlx::query_as(
            "SELECT seq, id, type, accepted_ms, visible_ms, data FROM messages
             WHERE mailbox = $1 AND seq > $2 AND visible_ms >= $3 ORDER BY seq LIMIT $4",
        )
        .bind(user)
        .bind(after_seq)
        .bind(since_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(seq, id, kind, accepted_ms, visible_ms, data)| StoredMessage {
                    seq,
                    id,
                    kind,
                    accepted_ms,
                    visible_ms,
                    data,
                },
            )
            .collect())
    }

    async fn release_due(&self, now_ms: i64) -> StoreResult<Vec<String>> {
        let channel = self.prepared().await?;
        let mut users = Vec::new();
        loop {
            let mut tx = self.pool.begin().await?;
            // Several nodes release at once: DELETE … RETURNING hands each due
            // row to exactly one of them, and SKIP LOCKED keeps them from
            // waiting for each other.
            let mut rows: Vec<(String, String, i64, String, i64, i64)> = sqlx::query_as(
                "DELETE FROM delayed_messages WHERE id IN (
                     SELECT id FROM delayed_messages WHERE due_ms <= $1
                     ORDER BY due_ms, accepted_ms LIMIT $2
                     FOR UPDATE SKIP LOCKED)
                 RETURNING id, mailbox, type, data, accepted_ms, due_ms",
            )
            .bind(now_ms)
            .bind(RELEASE_ROUND)
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                break;
            }
            rows.sort_by(|a, b| (a.5, a.4, &a.0).cmp(&(b.5, b.4, &b.0)));
            lock_mailboxes(&mut tx, rows.iter().map(|r| r.1.as_str())).await?;
            let insert: Vec<(&str, &str, i64, &str)> = rows
                .iter()
                .map(|r| (r.0.as_str(), r.1.as_str(), r.2, r.3.as_str()))
                .collect();
            let accepted: Vec<i64> = rows.iter().map(|r| r.4).collect();
            Self::insert_visible(&mut tx, &insert, Some(&accepted), now_ms).await?;
            let round: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
            notify(&mut tx, channel, &self.news(round.clone())).await?;
            tx.commit().await?;
            users.extend(round);
            if (rows.len() as i64) < RELEASE_ROUND {
                break;
            }
        }
        users.sort_unstable();
        users.dedup();
        Ok(users)
    }

    async fn next_due(&self) -> StoreResult<Option<i64>> {
        self.prepared().await?;
        Ok(
            sqlx::query_scalar("SELECT min(due_ms) FROM delayed_messages")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn position(&self, session: &str) -> StoreResult<Option<i64>> {
        self.prepared().await?;
        Ok(
            sqlx::query_scalar("SELECT seq FROM session_positions WHERE session = $1")
                .bind(session)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn save_position(
        &self,
        session: &str,
        user: &str,
        seq: i64,
        now_ms: i64,
    ) -> StoreResult<()> {
        self.prepared().await?;
        sqlx::query(
            "INSERT INTO session_positions (session, mailbox, seq, updated_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (session) DO UPDATE
             SET seq = GREATEST(session_positions.seq, excluded.seq), updated_ms = excluded.updated_ms",
        )
        .bind(session)
        .bind(user)
        .bind(seq)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn revoke_session(&self, jti: &str, expires_ms: i64) -> StoreResult<()> {
        let channel = self.prepared().await?;
        let event = single_payload(
            &self.shared.node,
            Wire::Session {
                j: jti.to_owned(),
                x: expires_ms,
            },
        );
        // One statement, one transaction: the notification leaves with the row.
        sqlx::query(
            "WITH r AS (
                 INSERT INTO revoked_sessions (jti, expires_ms) VALUES ($1, $2)
                 ON CONFLICT (jti) DO UPDATE
                 SET expires_ms = GREATEST(revoked_sessions.expires_ms, excluded.expires_ms)
                 RETURNING 1)
             SELECT pg_notify($3, $4) FROM r",
        )
        .bind(jti)
        .bind(expires_ms)
        .bind(channel)
        .bind(event)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn revoke_mailbox(&self, user: &str, revoked_ms: i64) -> StoreResult<()> {
        let channel = self.prepared().await?;
        let event = single_payload(
            &self.shared.node,
            Wire::Mailbox {
                u: user.to_owned(),
                t: revoked_ms,
            },
        );
        sqlx::query(
            "WITH r AS (
                 INSERT INTO revoked_mailboxes (mailbox, revoked_ms) VALUES ($1, $2)
                 ON CONFLICT (mailbox) DO UPDATE
                 SET revoked_ms = GREATEST(revoked_mailboxes.revoked_ms, excluded.revoked_ms)
                 RETURNING 1)
             SELECT pg_notify($3, $4) FROM r",
        )
        .bind(user)
        .bind(revoked_ms)
        .bind(channel)
        .bind(event)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn revocations(&self, now_ms: i64) -> StoreResult<Revocations> {
        self.prepared().await?;
        let sessions =
            sqlx::query_as("SELECT jti, expires_ms FROM revoked_sessions WHERE expires_ms >= $1")
                .bind(now_ms)
                .fetch_all(&self.pool)
                .await?;
        let mailboxes = sqlx::query_as("SELECT mailbox, revoked_ms FROM revoked_mailboxes")
            .fetch_all(&self.pool)
            .await?;
        Ok(Revocations {
            sessions,
            mailboxes,
        })
    }

    async fn register_opaque_session(
        &self,
        sid_hash: &str,
        user: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<OpaqueSession> {
        let channel = self.prepared().await?;
        let event = single_payload(
            &self.shared.node,
            Wire::Opaque {
                h: sid_hash.to_owned(),
                d: false,
            },
        );
        let mut tx = self.pool.begin().await?;
        let (user, start_ms, expires_ms): (String, i64, i64) =
            sqlx::query_as(super::REGISTER_OPAQUE)
                .bind(sid_hash)
                .bind(user)
                .bind(now_ms)
                .bind(expires_ms)
                .fetch_one(&mut *tx)
                .await?;
        // Other nodes may have cached the sid as unknown a moment ago.
        notify(&mut tx, channel, &[event]).await?;
        tx.commit().await?;
        Ok(OpaqueSession {
            user,
            start_ms,
            expires_ms,
        })
    }

    async fn opaque_session(&self, sid_hash: &str) -> StoreResult<Option<OpaqueSession>> {
        self.prepared().await?;
        let row: Option<(String, i64, i64)> = sqlx::query_as(
            "SELECT mailbox, created_ms, expires_ms FROM opaque_sessions WHERE sid_hash = $1",
        )
        .bind(sid_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(user, start_ms, expires_ms)| OpaqueSession {
            user,
            start_ms,
            expires_ms,
        }))
    }

    async fn delete_opaque_session(&self, sid_hash: &str) -> StoreResult<bool> {
        let channel = self.prepared().await?;
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM opaque_sessions WHERE sid_hash = $1")
            .bind(sid_hash)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if deleted {
            let event = single_payload(
                &self.shared.node,
                Wire::Opaque {
                    h: sid_hash.to_owned(),
                    d: true,
                },
            );
            notify(&mut tx, channel, &[event]).await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn purge(&self, policy: RetentionPolicy, now_ms: i64) -> StoreResult<PurgeReport> {
        let channel = self.prepared().await?;
        let lock = lock_key(&format!("{channel}/purge"));
        let mut report = PurgeReport::default();
        // What is past the retention age, found through its index.
        let cutoff = super::OlderThan::Retention.ms(policy, now_ms);
        loop {
            let Some(mut tx) = self.purge_turn(lock).await? else {
                return Ok(report);
            };
            let deleted = sqlx::query(
                "DELETE FROM messages WHERE seq IN (
                    SELECT seq FROM messages WHERE visible_ms < $1 LIMIT $2
                )",
            )
            .bind(cutoff)
            .bind(PURGE_SLICE_ROWS)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            report.messages += deleted;
            if deleted < PURGE_SLICE_ROWS as u64 {
                break;
            }
        }
        // What is past each user's cap, and everything beside the messages.
        let mut from = None;
        loop {
            let Some(mut tx) = self.purge_turn(lock).await? else {
                return Ok(report);
            };
            let slice = super::purge_slice::<sqlx::Postgres>(
                &mut tx,
                policy,
                now_ms,
                from.take(),
                PURGE_SLICE_ROWS,
                super::PastTheAge::Apart,
            )
            .await?;
            tx.commit().await?;
            report += slice.report;
            match slice.next {
                Some(next) => from = Some(next),
                None => return Ok(report),
            }
        }
    }

    async fn message_count(&self) -> StoreResult<i64> {
        self.prepared().await?;
        Ok(sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM messages) + (SELECT count(*) FROM delayed_messages)",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    async fn ping(&self) -> StoreResult<()> {
        self.prepared().await?;
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(StoreError::Unavailable)?;
        // A node that cannot hear the others would hold polls past their news.
        if self.shared.feed_started.load(Ordering::Acquire)
            && !self.shared.feed_up.load(Ordering::Acquire)
        {
            return Err(StoreError::Unavailable(sqlx::Error::Io(
                std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "not listening to the other nodes yet",
                ),
            )));
        }
        Ok(())
    }

    fn events(&self) -> Option<broadcast::Receiver<StoreEvent>> {
        let rx = self.shared.events.subscribe();
        if !self.shared.feed_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(follow_feed(self.pool.clone(), self.shared.clone()));
        }
        Some(rx)
    }

    fn announce_poll(&self, user: &str, session: &str, at_ms: i64) {
        let mut polls = self.shared.polls.lock().unwrap_or_else(|p| p.into_inner());
        // Best effort: when the database lags, announcements are dropped.
        if polls.len() < ANNOUNCE_BACKLOG {
            polls.push((user.to_owned(), session.to_owned(), at_ms));
        }
        drop(polls);
        self.shared.polls_nudge.notify_one();
    }
}

/// Tells the other nodes which sessions began a poll here, so they release
/// their older polls of those sessions. One notification per short window
/// carries every poll begun in it, so the cost does not grow with the poll
/// rate as one NOTIFY per poll would.
async fn announce_polls(pool: PgPool, shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.polls_nudge.notified() => {}
            _ = shared.stop.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(ANNOUNCE_WINDOW) => {}
            _ = shared.stop.cancelled() => return,
        }
        let polls = std::mem::take(&mut *shared.polls.lock().unwrap_or_else(|p| p.into_inner()));
        let Some(channel) = shared.ready.get() else {
            continue;
        };
        if polls.is_empty() {
            continue;
        }
        let payloads = list_payloads(&shared.node, polls, |p| Wire::Polls { p }, false);
        if let Err(e) = notify_lightly(&pool, channel, &payloads).await {
            tracing::debug!(error = %e, "could not announce polls to the other nodes");
        }
    }
}

enum FeedEnd {
    Stopped,
    Lost(String),
}

/// Keeps one connection listening, reconnecting with backoff, and relays
/// what it hears as [`StoreEvent`]s.
async fn follow_feed(pool: PgPool, shared: Arc<Shared>) {
    let listen_pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(shared.listener_options.clone());
    let mut backoff = RECONNECT_MIN;
    let mut was_lost = false;
    loop {
        let attempt = tokio::select! {
            r = subscribe(&pool, &listen_pool, &shared) => r,
            _ = shared.stop.cancelled() => return,
        };
        let wait = match attempt {
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "cannot listen for the other nodes' events; retrying");
                true
            }
            Ok(listener) => {
                let since = Instant::now();
                shared.feed_up.store(true, Ordering::Release);
                if was_lost {
                    tracing::info!("listening for the other nodes' events again");
                }
                // Whatever was sent while nobody listened is re-checked now.
                let _ = shared.events.send(StoreEvent::Resync);
                let end = relay(listener, &pool, &shared).await;
                shared.feed_up.store(false, Ordering::Release);
                match end {
                    FeedEnd::Stopped => return,
                    FeedEnd::Lost(why) => {
                        tracing::warn!(reason = %why, "lost the connection listening for the other nodes' events; reconnecting");
                        was_lost = true;
                    }
                }
                if since.elapsed() >= STABLE_FOR {
                    backoff = RECONNECT_MIN;
                    false
                } else {
                    true
                }
            }
        };
        if wait {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shared.stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
    }
}

async fn subscribe(
    pool: &PgPool,
    listen_pool: &PgPool,
    shared: &Arc<Shared>,
) -> StoreResult<PgListener> {
    let channel = ready(pool, shared, None).await?;
    let mut listener = PgListener::connect_with(listen_pool).await?;
    // Reconnecting is ours to do, so that a Resync follows every reconnect.
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    listener.listen(channel).await?;
    Ok(listener)
}

async fn relay(mut listener: PgListener, pool: &PgPool, shared: &Shared) -> FeedEnd {
    let Some(channel) = shared.ready.get() else {
        return FeedEnd::Lost("the schema is not ready".into());
    };
    let beat = payload(&shared.node, Wire::Beat);
    let mut ticks = tokio::time::interval(HEARTBEAT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the oldest heartbeat not yet heard back was sent.
    let mut unanswered: Option<Instant> = None;
    loop {
        tokio::select! {
            received = listener.try_recv() => match received {
                Ok(Some(n)) => {
                    unanswered = None;
                    dispatch(shared, n.payload());
                }
                Ok(None) => return FeedEnd::Lost("the connection closed".into()),
                Err(e) => return FeedEnd::Lost(e.to_string()),
            },
            _ = ticks.tick() => {
                if unanswered.is_some_and(|t| t.elapsed() > HEARTBEAT_LIMIT) {
                    return FeedEnd::Lost("a heartbeat did not come back".into());
                }
                let sent = tokio::time::timeout(
                    ACQUIRE_TIMEOUT,
                    notify_lightly(pool, channel, std::slice::from_ref(&beat)),
                )
                .await;
                // Only a heartbeat that left can be missed.
                if matches!(sent, Ok(Ok(()))) && unanswered.is_none() {
                    unanswered = Some(Instant::now());
                }
            }
            _ = shared.stop.cancelled() => return FeedEnd::Stopped,
        }
    }
}

/// Turn one notification into events; this node's own are already applied.
fn dispatch(shared: &Shared, text: &str) {
    let envelope: Envelope = match serde_json::from_str(text) {
        Ok(e) => e,
        Err(e) => {
            tracing::debug!(error = %e, "ignoring a notification that is not a PNS event");
            return;
        }
    };
    if envelope.n == shared.node {
        return;
    }
    let send = |e: StoreEvent| {
        // No receiver: nobody on this node needs events.
        let _ = shared.events.send(e);
    };
    match envelope.e {
        Wire::News { u } => u
            .into_iter()
            .for_each(|user| send(StoreEvent::News { user })),
        Wire::Session { j, x } => send(StoreEvent::SessionRevoked {
            jti: j,
            expires_ms: x,
        }),
        Wire::Mailbox { u, t } => send(StoreEvent::MailboxRevoked { user: u, at_ms: t }),
        Wire::Opaque { h, d } => send(StoreEvent::OpaqueSessionChanged {
            sid_hash: h,
            deleted: d,
        }),
        Wire::Delayed => send(StoreEvent::DelayedAccepted),
        Wire::Polls { p } => p.into_iter().for_each(|(user, session, at_ms)| {
            send(StoreEvent::PollStarted {
                user,
                session,
                at_ms,
            })
        }),
        Wire::Beat => {}
        Wire::Resync => send(StoreEvent::Resync),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_url_parameters_are_taken_out_and_checked() {
        let u =
            parse_url("postgres://u@h:5/db?schema=t_1&pool_size=3&application_name=n1").unwrap();
        assert_eq!(u.schema.as_deref(), Some("t_1"));
        assert_eq!(u.pool_size, 3);
        assert_eq!(u.options.get_application_name(), Some("n1"));
        assert_eq!(u.options.get_database(), Some("db"));
        assert!(parse_url("postgres://h/db?schema=Bad-Name").is_err());
        assert!(parse_url("postgres://h/db?pool_size=0").is_err());
    }

    #[test]
    fn long_lists_are_split_under_the_payload_limit() {
        let users: Vec<String> = (0..2000).map(|i| format!("user{i}@example.com")).collect();
        let payloads = list_payloads("node", users.clone(), |u| Wire::News { u }, true);
        assert!(payloads.len() > 1);
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() < PAYLOAD_MAX);
            match serde_json::from_str::<Envelope>(p).unwrap().e {
                Wire::News { u } => back.extend(u),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(back, users);
    }

    #[test]
    fn an_item_too_long_for_a_notification_becomes_a_resync() {
        let huge = "x".repeat(PAYLOAD_MAX);
        let p = list_payloads("node", vec![huge.clone()], |u| Wire::News { u }, true);
        assert!(matches!(
            serde_json::from_str::<Envelope>(&p[0]).unwrap().e,
            Wire::Resync
        ));
        let p = single_payload("node", Wire::Session { j: huge, x: 1 });
        assert!(matches!(
            serde_json::from_str::<Envelope>(&p).unwrap().e,
            Wire::Resync
        ));
    }

    #[test]
    fn channel_names_fit_an_identifier() {
        assert_eq!(channel_name("public"), "pns_events");
        assert_eq!(channel_name("t1"), "pns_events:t1");
        assert!(channel_name(&"s".repeat(63)).len() <= 63);
    }
}
