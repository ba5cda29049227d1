//! SQLite store, the embedded default.
//!
//! SQLite allows one writer at a time, so every write goes through one task
//! that owns the write connection. It takes whatever writes are queued and
//! runs them in a single transaction (each in a savepoint of its own, so one
//! bad write does not sink its neighbours). The commit does not wait for the
//! disk (`synchronous=NORMAL`): the round is shown to polls at once, and
//! [`WalSync`] answers its writers once the write-ahead log is synced, one
//! sync for all the rounds committed meanwhile. Plain messages (no dedup key, no
//! delay), which no constraint can refuse, skip the savepoints: the plain
//! notifies queued together go in together, all or none. The writes that
//! come by the thousand, plain messages and positions, also skip sqlx's
//! worker thread: the writer borrows the connection's handle and runs them
//! itself ([`Direct`]). Reads use a separate pool of connections, which WAL
//! mode lets run beside the writer, and a checkpointer copies the log into
//! the database file beside it and has the log start over
//! ([`super::sqlite_checkpoint`]). After each commit the writer hands the new
//! rows to [`Recent`], which answers most polls' reads from memory.
//! The connections run on SQLite's page cache wrapped by
//! [`super::page_cache`], which spares a commit after a B-tree split a walk
//! of the whole cache, and open the file through the VFS of
//! [`super::sqlite_vfs`]: SQLite's `unix-excl` ([`super::sqlite_lock`]), so
//! the node has the file to itself and its commits take no locks in the
//! kernel, with the frames of a commit written to the log in one call.
//!
//! Session positions are written behind: a position saved waits in
//! [`Positions`], which answers for it at once. It is written only once a
//! poll without a cursor has read it (most clients send the answer's cursor
//! from their second poll on, and never need it) or at a clean shutdown;
//! the writer stores the positions read within 100 ms together, after a
//! round's answers went out. A poll's answer never waits for a commit of
//! its own; a crash can lose a session's last position, and delivery is at
//! least once: the sessions concerned get their last answer again.

use super::positions::{Known, Positions, Waiting};
use super::recent::Recent;
use super::sqlite_checkpoint::{self as checkpoint, Pause, PauseAsks};
use super::sqlite_direct::{Direct, PositionRow};
use super::wal_sync::{SyncHealth, Waiters, WalSync, SYNC_NOW};
use super::{
    new_message_id, Acceptance, Accepted, Durable, MessageStore, NewMessage, OpaqueSession,
    PurgeReport, PurgeSlice, RetentionPolicy, Revocations, StoreError, StoreResult, StoredMessage,
};
use async_trait::async_trait;
use prometheus_client::metrics::histogram::Histogram;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Row};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

/// Writes waiting at most in the writer's queue before callers wait their turn.
const WRITE_QUEUE: usize = 4096;
/// Writes committed together at most.
const WRITES_PER_COMMIT: usize = 512;
/// About how many rows of messages one slice of a purge goes through
/// ([`super::purge_slice`]). Each slice is a round of the writer's own,
/// and the notifies that came meanwhile go in before the next. A purge in
/// one piece held every notify up for as long as it took to read the
/// whole table: 1.9–2.0 s with 2 million rows (`examples/bench_purge.rs`,
/// docs/BENCHMARKS.md). In slices of 2,048 the longest acknowledgement
/// was 16–44 ms, and the purge took 2.4–3.1 s instead of about 2; slices
/// of 1,024 made it 3 s, of 16,384 held notifies up to 54 ms.
const PURGE_SLICE_ROWS: i64 = if cfg!(test) { 16 } else { 2_048 };

/// Pages in the write-ahead log that make a commit checkpoint it into the
/// database file. A checkpoint syncs both files on the writer's thread,
/// which holds up the rounds behind it, so this is only the fallback: the
/// checkpointer has the log start over long before
/// ([`checkpoint::RESTART_AT`]), unless reads keep it from doing so or
/// frames come faster than it copies them (batches to scattered users at
/// 15,000 a second and more, a frame each, reach this every second or
/// so; a fallback four times as far off freed the writer of it and gave
/// no more batches, docs/benchmarks/NOTES.md, ⁴⁸). The log takes up to
/// about 22 MiB on disk (43 MiB with 4 KiB pages).
const CHECKPOINT_PAGES: u64 = 10_000;
/// The page size of a new database file. A message is one row of the
/// messages table, kept in mailbox order, so the rows of one commit for
/// different mailboxes each dirty a page of their own, and each such page
/// is one frame of the write-ahead log: the writer copies, checksums and
/// writes it, and the sync thread syncs it. Half of SQLite's 4 KiB halves
/// those bytes per message; single notifies at saturation went about 20 %
/// faster (`docs/BENCHMARKS.md`), while 1 KiB pages, with more splits of
/// fuller pages, halved the rate of batches. A database made with another
/// page size keeps it: the size of a file in WAL mode cannot change.
const PAGE_SIZE: u32 = 2048;
/// How far the message sequence jumps at every start. A round is visible
/// before it is durable (see [`WalSync`]), so a power loss can take back
/// rows that polls were shown, seqs included; were those seqs given again
/// to other messages, a client whose cursor had passed them would skip
/// those. The jump is far more than the rows of the rounds that may await
/// a sync at once (`ROUNDS_AWAITING_SYNC` of at most `WRITES_PER_COMMIT`
/// batches of 1,000).
const SEQ_JUMP_AT_START: i64 = 1 << 32;

/// The seqs the writer gives, one after another in commit order. SQLite's
/// AUTOINCREMENT did this at the cost of a page of `sqlite_sequence`
/// written with every commit; the floor in `seq_floor`, raised at every
/// start and before every purge, keeps them from going back as it did.
struct Seqs {
    next: i64,
}

impl Seqs {
    fn take(&mut self) -> i64 {
        let seq = self.next;
        self.next += 1;
        seq
    }

    /// The largest seq given out, or the floor.
    fn highest_given(&self) -> i64 {
        self.next - 1
    }
}

pub struct SqliteStore {
    /// The database file.
    path: PathBuf,
    /// How the writer connects; a backup connects so too, since the
    /// readers may not write even the copy.
    options: SqliteConnectOptions,
    reads: SqlitePool,
    writes: mpsc::Sender<Queued>,
    memory: Arc<InMemory>,
    sync_health: SyncHealth,
    sync_times: Histogram,
}

/// What the readers can learn without a read of the file; only the writer
/// updates it, after each commit.
struct InMemory {
    recent: Recent,
    positions: Positions,
    /// Woken after each commit, in commit order, once given
    /// ([`MessageStore::wake_after_commits`]).
    hub: std::sync::OnceLock<Arc<crate::hub::Hub>>,
    /// The messages in the file, visible and delayed: counted once at
    /// start, then kept by the writer, so that the stats need no scan of
    /// the table.
    stored: std::sync::atomic::AtomicI64,
}

/// Rows made visible, with their mailboxes.
type Rows = Vec<(String, StoredMessage)>;

/// What a round changed that [`InMemory`] learns once the round has committed.
#[derive(Default)]
struct Fresh {
    rows: Rows,
    /// Messages stored, visible or delayed, less those purged.
    stored: i64,
    /// The newest seq a purge deleted: memory forgets every message up to it.
    purged_through: Option<i64>,
    /// A purge deleted session positions: memory asks the file again.
    purged_positions: bool,
}

impl InMemory {
    fn learn(&self, fresh: Fresh) {
        self.stored
            .fetch_add(fresh.stored, std::sync::atomic::Ordering::Relaxed);
        if let Some(seq) = fresh.purged_through {
            self.recent.forget_through(seq);
        }
        if fresh.purged_positions {
            self.positions.forget_all();
        }
        let Some(hub) = self.hub.get() else {
            return self.recent.record(fresh.rows);
        };
        let mut users: Vec<&str> = fresh.rows.iter().map(|(user, _)| user.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        let users: Vec<String> = users.into_iter().map(str::to_owned).collect();
        // Woken once the rows can be read, so that a poll that parks
        // meanwhile either reads them or is woken.
        self.recent.record(fresh.rows);
        hub.wake_after_commit(&users, &|user, after, since_ms, limit| {
            self.recent.fetch(user, after, since_ms, limit)
        });
    }
}

type AcceptReply = oneshot::Sender<StoreResult<Acceptance>>;

enum WriteOp {
    Accept {
        batch: Vec<NewMessage>,
        now_ms: i64,
        reply: AcceptReply,
    },
    ReleaseDue {
        now_ms: i64,
        reply: oneshot::Sender<StoreResult<Vec<String>>>,
    },
    RevokeSession {
        jti: String,
        expires_ms: i64,
        reply: oneshot::Sender<StoreResult<()>>,
    },
    RevokeMailbox {
        user: String,
        revoked_ms: i64,
        reply: oneshot::Sender<StoreResult<()>>,
    },
    /// One slice of a purge: the mailboxes from `from` on (from the first
    /// when `None`, with everything else the purge deletes), as many as
    /// about [`PURGE_SLICE_ROWS`] rows hold.
    Purge {
        policy: RetentionPolicy,
        now_ms: i64,
        from: Option<String>,
        reply: oneshot::Sender<StoreResult<PurgeSlice>>,
    },
    RegisterOpaque {
        sid_hash: String,
        user: String,
        now_ms: i64,
        expires_ms: i64,
        reply: oneshot::Sender<StoreResult<OpaqueSession>>,
    },
    DeleteOpaque {
        sid_hash: String,
        reply: oneshot::Sender<StoreResult<bool>>,
    },
}

/// What the writer's queue carries.
enum Queued {
    /// A write its caller waits for, committed in the next round, and
    /// whether that caller is a sender in a loop ([`crate::closed_loop`]).
    Write { op: WriteOp, in_a_loop: bool },
    /// Positions wait in memory to be written (see the module comment):
    /// the first of them (`now: false`, written within
    /// [`POSITIONS_LINGER`]), or enough for a statement (`now: true`).
    PositionsWaiting { now: bool },
    /// Answered once every position saved before it is in the file.
    Flush {
        reply: oneshot::Sender<StoreResult<()>>,
    },
}

/// The file path inside `sqlite://path`, `sqlite:///abs/path` or `sqlite:path`.
pub fn sqlite_path(url: &str) -> PathBuf {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let rest = rest.split('?').next().unwrap_or(rest);
    PathBuf::from(rest)
}

impl SqliteStore {
    pub async fn open(url: &str) -> StoreResult<Self> {
        // Before the first connection: SQLite takes a page cache only then.
        if !super::page_cache::install() {
            tracing::debug!("SQLite had started: its page cache stays");
        }
        let path = sqlite_path(url);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
        }
        let held = super::sqlite_lock::holder(&path).map_err(|e| {
            let named = format!("cannot open the database {}: {e}", path.display());
            StoreError::Unavailable(sqlx::Error::Io(std::io::Error::new(e.kind(), named)))
        })?;
        if let Some(pid) = held {
            return Err(StoreError::InUse { path, pid });
        }
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .page_size(PAGE_SIZE)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL while the store opens: the migrations and the sequence
            // floor are on disk before any poll is answered. The writer
            // switches to NORMAL below, and WalSync syncs behind it.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .vfs(super::sqlite_vfs::install())
            .pragma("temp_store", "memory")
            .pragma("cache_size", "-16000");
        let mut writer = SqliteConnection::connect_with(&options).await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut writer)
            .await?;
        // One pass over the messages gives the top seq, the newest time and
        // the count: each of these reads the whole table (its key begins
        // with the mailbox), about 0.12 s a million rows, and a count of its
        // own read it a second time.
        let (top_seq, top_visible_ms, visible, floor, delayed): (i64, i64, i64, i64, i64) =
            sqlx::query_as(
                "SELECT coalesce(max(seq), 0), coalesce(max(visible_ms), 0), count(*),
                        coalesce((SELECT seq FROM seq_floor WHERE id = 1), 0),
                        (SELECT count(*) FROM delayed_messages)
                 FROM messages",
            )
            .fetch_one(&mut writer)
            .await?;
        let floor = top_seq.max(floor).saturating_add(SEQ_JUMP_AT_START);
        // Still with synchronous=FULL: durable before any poll is answered.
        sqlx::query(
            "INSERT INTO seq_floor (id, seq) VALUES (1, ?)
             ON CONFLICT (id) DO UPDATE SET seq = excluded.seq",
        )
        .bind(floor)
        .execute(&mut writer)
        .await?;
        // From here a commit is visible at once and durable once WalSync
        // has synced the log.
        sqlx::query("PRAGMA synchronous = NORMAL")
            .execute(&mut writer)
            .await?;
        sqlx::query(&format!("PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES}"))
            .execute(&mut writer)
            .await?;
        let page_size: i64 = sqlx::query_scalar("PRAGMA page_size")
            .fetch_one(&mut writer)
            .await?;
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        // The WAL header, and a frame (a header and a page) for each page
        // written until the checkpoint, with room for a round that crosses it.
        let fill_to = 32 + (CHECKPOINT_PAGES + 1_000) * (24 + page_size.max(512) as u64);
        let (sync, answering) = WalSync::start(Path::new(&wal), fill_to).map_err(|e| {
            StoreError::Unavailable(sqlx::Error::Io(std::io::Error::new(
                e.kind(),
                format!(
                    "cannot open the write-ahead log {}: {e}",
                    Path::new(&wal).display()
                ),
            )))
        })?;
        // query_only rather than a read-only open: a file opened read-only
        // takes locks in the kernel of its own (see sqlite_lock), and a
        // process's POSIX locks replace each other.
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options.clone().pragma("query_only", "true"))
            .await?;
        let with_position: Vec<String> =
            sqlx::query_scalar("SELECT session FROM session_positions")
                .fetch_all(&mut writer)
                .await?;
        let stored = visible + delayed;
        let memory = Arc::new(InMemory {
            recent: Recent::new(top_seq, top_visible_ms),
            positions: Positions::new(with_position.iter().map(String::as_str)),
            hub: std::sync::OnceLock::new(),
            stored: stored.into(),
        });
        drop(with_position);
        let sync_health = sync.health();
        let sync_times = sync.sync_times();
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let writer_memory = memory.clone();
        // On the ingest thread: see crate::threads. The writer ends when the
        // store is dropped, after writing the positions still waiting; the
        // answers after syncs go to the tasks there, the internal API's.
        fn on_ingest(task: impl Future<Output = ()> + Send + 'static) -> StoreResult<()> {
            crate::threads::on_ingest_thread(task)
                .map(drop)
                .map_err(|e| {
                    StoreError::Unavailable(sqlx::Error::Io(std::io::Error::other(format!(
                        "{e:#}"
                    ))))
                })
        }
        let checkpointer = SqliteConnection::connect_with(&options).await?;
        let wrote = Arc::new(Notify::new());
        let writer_wrote = wrote.clone();
        let (pauses, pause_asks) = checkpoint::pauses();
        on_ingest(async move {
            let seqs = Seqs { next: floor + 1 };
            run_writer(
                writer,
                rx,
                pause_asks,
                writer_memory,
                seqs,
                sync,
                &writer_wrote,
            )
            .await;
            // The store is gone: the checkpointer ends too.
            writer_wrote.notify_one();
        })?;
        on_ingest(answering.run())?;
        on_ingest(checkpoint::run(checkpointer, wrote, pauses))?;
        Ok(SqliteStore {
            path,
            options,
            reads,
            writes: tx,
            memory,
            sync_health,
            sync_times,
        })
    }

    /// [`MessageStore::fetch`] from the database file, whatever is in memory.
    pub(super) async fn fetch_from_file(
        &self,
        user: &str,
        after_seq: i64,
        since_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        let rows = sqlx::query(
            "SELECT seq, id, type, accepted_ms, visible_ms, data FROM messages
             WHERE mailbox = ? AND seq > ? AND visible_ms >= ? ORDER BY seq LIMIT ?",
        )
        .bind(user)
        .bind(after_seq)
        .bind(since_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(StoredMessage {
                    seq: r.try_get(0)?,
                    id: r.try_get(1)?,
                    kind: r.try_get(2)?,
                    accepted_ms: r.try_get(3)?,
                    visible_ms: r.try_get(4)?,
                    data: r.try_get(5)?,
                })
            })
            .collect()
    }

    /// A write, answered after the commit of its round.
    async fn write<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<StoreResult<T>>) -> WriteOp,
    ) -> StoreResult<T> {
        let in_a_loop = crate::closed_loop::in_a_loop();
        self.ask(|reply| Queued::Write {
            op: op(reply),
            in_a_loop,
        })
        .await
    }

    async fn ask<T>(
        &self,
        queued: impl FnOnce(oneshot::Sender<StoreResult<T>>) -> Queued,
    ) -> StoreResult<T> {
        let (reply, answer) = oneshot::channel();
        self.writes
            .send(queued(reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        answer.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Tell the writer of the first position waiting, and of enough for a
    /// statement; not of each.
    async fn positions_waiting(&self, waiting: Waiting) -> StoreResult<()> {
        let now = if waiting.before < ROWS_PER_INSERT && waiting.after >= ROWS_PER_INSERT {
            true
        } else if waiting.before == 0 && waiting.after > 0 {
            false
        } else {
            return Ok(());
        };
        self.writes
            .send(Queued::PositionsWaiting { now })
            .await
            .map_err(|_| StoreError::WriterGone)
    }
}

/// The single writer: drains the queue into one transaction per round, makes
/// it visible, and hands to `sync` what waits for the round to be durable.
///
/// While the rounds hold nothing but plain messages (and positions), the
/// writer keeps the connection's handle lent from sqlx's worker thread and
/// runs them on its own thread ([`Direct`]); a round with any other write
/// hands the connection back and goes through sqlx.
async fn run_writer(
    mut conn: SqliteConnection,
    rx: mpsc::Receiver<Queued>,
    pauses: PauseAsks,
    memory: Arc<InMemory>,
    seqs: Seqs,
    sync: WalSync,
    wrote: &Notify,
) {
    let mut writer = Writer {
        rx,
        pauses,
        memory,
        seqs,
        sync,
        wrote,
        ops: Vec::with_capacity(WRITES_PER_COMMIT),
        positions_due: None,
    };
    // False once lending the handle failed: sqlx does everything then.
    let mut lend = true;
    let mut event = writer.next_event().await;
    loop {
        if lend && !writer.needs_sqlx(&event) {
            match conn.lock_handle().await {
                Err(e) => {
                    tracing::error!(error = %e, "cannot lend the SQLite handle to the writer");
                    lend = false;
                }
                Ok(mut handle) => match Direct::prepare(&mut handle) {
                    Err(e) => {
                        tracing::error!(error = %e, "cannot prepare the writer's statements");
                        lend = false;
                    }
                    Ok(mut direct) => loop {
                        if !writer.handle(&mut Exec::Direct(&mut direct), event).await {
                            return;
                        }
                        event = writer.next_event().await;
                        if writer.needs_sqlx(&event) {
                            break;
                        }
                    },
                },
            }
            if lend {
                // The handle went back to sqlx for `event`.
                continue;
            }
        }
        if !writer.handle(&mut Exec::Sqlx(&mut conn), event).await {
            return;
        }
        event = writer.next_event().await;
    }
}

/// Where a round's statements run.
enum Exec<'a, 'h> {
    /// Through sqlx, on its worker thread: any write.
    Sqlx(&'a mut SqliteConnection),
    /// On the writer's thread, through the lent handle: plain messages and
    /// positions only.
    Direct(&'a mut Direct<'h>),
}

/// What the writer's queue gave.
enum Event {
    /// Writes, in [`Writer::ops`].
    Ops,
    /// The waiting positions are due to be written.
    PositionsDue,
    /// The checkpointer asks the writer to hold still between rounds.
    Pause(Pause),
    /// The store is gone.
    Closed,
}

/// The writer's state between rounds.
struct Writer<'w> {
    rx: mpsc::Receiver<Queued>,
    /// The checkpointer's asks to hold still ([`checkpoint`]).
    pauses: PauseAsks,
    /// Told after every round and write of positions (the checkpointer).
    wrote: &'w Notify,
    memory: Arc<InMemory>,
    seqs: Seqs,
    sync: WalSync,
    /// The round being taken from the queue.
    ops: Vec<Queued>,
    /// When the waiting positions must be written.
    positions_due: Option<Instant>,
}

impl Writer<'_> {
    async fn next_event(&mut self) -> Event {
        // `recv_many` is cancel-safe: a timeout or a pause loses nothing.
        let receive = self.rx.recv_many(&mut self.ops, WRITES_PER_COMMIT);
        let due = self.positions_due;
        let receive = async move {
            match due {
                None => Some(receive.await),
                Some(due) => tokio::time::timeout_at(due, receive).await.ok(),
            }
        };
        let received = tokio::select! {
            biased;
            Some(pause) = self.pauses.recv() => return Event::Pause(pause),
            received = receive => received,
        };
        let Some(received) = received else {
            self.positions_due = None;
            return Event::PositionsDue;
        };
        if received == 0 {
            return Event::Closed;
        }
        // While the polls' runtime is behind with the answers of earlier
        // rounds, the notifies wait here rather than behind those answers
        // (`crate::hub` says why); what queued meanwhile joins the round.
        if let Some(hub) = self.memory.hub.get() {
            if hub.answers_caught_up().await {
                while self.ops.len() < WRITES_PER_COMMIT {
                    let Ok(queued) = self.rx.try_recv() else {
                        break;
                    };
                    self.ops.push(queued);
                }
            }
        }
        Event::Ops
    }

    /// Whether `event` holds a write that only sqlx carries out.
    fn needs_sqlx(&self, event: &Event) -> bool {
        matches!(event, Event::Ops)
            && self.ops.iter().any(|q| match q {
                Queued::Write {
                    op: WriteOp::Accept { batch, .. },
                    ..
                } => !is_plain(batch),
                Queued::Write { .. } => true,
                Queued::PositionsWaiting { .. } | Queued::Flush { .. } => false,
            })
    }

    /// Carry out `event`; false once the writer is done.
    async fn handle(&mut self, exec: &mut Exec<'_, '_>, event: Event) -> bool {
        // A pause writes nothing for the checkpointer to copy.
        if !matches!(event, Event::Pause(_)) {
            self.wrote.notify_one();
        }
        match event {
            Event::Pause(pause) => pause.hold().await,
            Event::Ops => self.round(exec).await,
            Event::PositionsDue => {
                let slot = self.sync.slot().await;
                let _ = write_positions(exec, &self.memory).await;
                self.sync.after_sync(slot, Waiters::NONE, Box::new(|_| {}));
            }
            Event::Closed => {
                // Write out what is left (`sync`, dropped after this, syncs it).
                self.memory.positions.release_held_back();
                let _ = write_positions(exec, &self.memory).await;
                return false;
            }
        }
        true
    }

    /// Commit the writes in [`Writer::ops`] as one round.
    async fn round(&mut self, exec: &mut Exec<'_, '_>) {
        let (memory, sync, seqs) = (&*self.memory, &self.sync, &mut self.seqs);
        // Taken before the commit: at most ROUNDS_AWAITING_SYNC rounds are
        // visible and not yet durable.
        let slot = sync.slot().await;
        let mut flushes = Vec::new();
        let mut written = Ok(());
        let mut round = Vec::with_capacity(self.ops.len());
        // Whether every caller of the round is a sender in a loop.
        let mut in_loops = true;
        for op in self.ops.drain(..) {
            match op {
                Queued::Write { op, in_a_loop } => {
                    in_loops &= in_a_loop;
                    round.push(op);
                }
                Queued::PositionsWaiting { now: true } => {
                    self.positions_due = Some(Instant::now());
                }
                Queued::PositionsWaiting { now: false } => {
                    self.positions_due
                        .get_or_insert_with(|| Instant::now() + POSITIONS_LINGER);
                }
                Queued::Flush { reply } => flushes.push(reply),
            }
        }
        if !sync.healthy() {
            // Nothing can be made durable: refuse rather than show polls
            // what no caller may be told is stored.
            let why = Err(
                "the store cannot sync its log since a failed sync; restart the node".to_owned(),
            );
            for op in round {
                Done::refused(op).send(&why);
            }
            for reply in flushes {
                Done::Unit(reply, Ok(())).send(&why);
            }
            return;
        }
        // A flush is a shutdown waiting; a batch is as many messages waiting.
        let waiting = if flushes.is_empty() {
            round
                .iter()
                .map(|op| match op {
                    WriteOp::Accept { batch, .. } => batch.len(),
                    _ => 1,
                })
                .sum()
        } else {
            SYNC_NOW
        };
        let mut after_sync = Vec::new();
        let commit = |(done, outcome): (Vec<Done>, Result<(), String>), after_sync: &mut _| {
            for d in done {
                Done::on_commit(d, &outcome, after_sync);
            }
        };
        // A slice of a purge gets a round of its own, so that its failure
        // fails no notify, after the positions are written (a purge may
        // delete positions; memory then asks the file for them again).
        if let Some(pos) = round
            .iter()
            .position(|op| matches!(op, WriteOp::Purge { .. }))
        {
            let rest = round.split_off(pos + 1);
            let purge = round.pop();
            if !round.is_empty() {
                commit(
                    commit_round(exec, std::mem::take(&mut round), memory, seqs).await,
                    &mut after_sync,
                );
            }
            if let Err(e) = write_positions(exec, memory).await {
                written = Err(e);
            }
            if let Some(purge) = purge {
                commit(
                    commit_round(exec, vec![purge], memory, seqs).await,
                    &mut after_sync,
                );
            }
            round = rest;
        }
        if !round.is_empty() {
            commit(
                commit_round(exec, round, memory, seqs).await,
                &mut after_sync,
            );
        }
        if !flushes.is_empty() || self.positions_due.is_some_and(|due| due <= Instant::now()) {
            self.positions_due = None;
            if !flushes.is_empty() {
                memory.positions.release_held_back();
            }
            if let Err(e) = write_positions(exec, memory).await {
                written = Err(e);
            }
        }
        for reply in flushes {
            let answer = match &written {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Database(sqlx::Error::Protocol(format!(
                    "cannot store session positions: {e}"
                )))),
            };
            after_sync.push(Done::Unit(reply, answer));
        }
        sync.after_sync(
            slot,
            Waiters {
                messages: waiting,
                in_loops,
            },
            Box::new(move |synced| {
                for d in after_sync {
                    d.send(synced);
                }
            }),
        );
    }
}

/// How long a position that a poll read waits at most for others to be
/// written with. A statement per round would cost about as much as the
/// round's messages.
const POSITIONS_LINGER: Duration = Duration::from_millis(100);

/// Write the positions waiting in memory: through the lent handle in one
/// transaction, or through sqlx a multi-row statement per
/// [`ROWS_PER_INSERT`]. A failure is logged: the sessions concerned get
/// their last answer again, which at-least-once delivery allows.
async fn write_positions(exec: &mut Exec<'_, '_>, memory: &InMemory) -> StoreResult<()> {
    let waiting: Vec<_> = memory.positions.take_unwritten().into_iter().collect();
    if waiting.is_empty() {
        return Ok(());
    }
    let conn = match exec {
        Exec::Sqlx(conn) => conn,
        Exec::Direct(direct) => {
            let rows: Vec<PositionRow<'_>> = waiting
                .iter()
                .map(|(session, u)| (session.as_str(), u.user.as_str(), u.seq, u.saved_ms))
                .collect();
            return direct.upsert_positions(&rows).map_err(|e| {
                tracing::error!(error = %e, positions = rows.len(), "cannot store session positions");
                StoreError::Database(sqlx::Error::Protocol(e))
            });
        }
    };
    let mut outcome = Ok(());
    for chunk in waiting.chunks(ROWS_PER_INSERT) {
        let mut sql = String::from(
            "INSERT INTO session_positions (session, mailbox, seq, updated_ms) VALUES ",
        );
        for i in 0..chunk.len() {
            sql.push_str(if i == 0 { "(?,?,?,?)" } else { ",(?,?,?,?)" });
        }
        sql.push_str(
            " ON CONFLICT (session) DO UPDATE
             SET seq = max(seq, excluded.seq), updated_ms = excluded.updated_ms",
        );
        let mut q = sqlx::query(&sql);
        for (session, u) in chunk {
            q = q.bind(session).bind(&u.user).bind(u.seq).bind(u.saved_ms);
        }
        if let Err(e) = q.execute(&mut **conn).await {
            tracing::error!(error = %e, positions = chunk.len(), "cannot store session positions");
            outcome = Err(StoreError::from(e));
        }
    }
    outcome
}

/// A reply held back until the round's commit is known.
enum Done {
    Accept(AcceptReply, StoreResult<Vec<Accepted>>),
    Users(
        oneshot::Sender<StoreResult<Vec<String>>>,
        StoreResult<Vec<String>>,
    ),
    Unit(oneshot::Sender<StoreResult<()>>, StoreResult<()>),
    Purge(
        oneshot::Sender<StoreResult<PurgeSlice>>,
        StoreResult<PurgeSlice>,
    ),
    Opaque(
        oneshot::Sender<StoreResult<OpaqueSession>>,
        StoreResult<OpaqueSession>,
    ),
    Flag(oneshot::Sender<StoreResult<bool>>, StoreResult<bool>),
}

impl Done {
    /// `op`, not carried out, to be answered with a failure.
    fn refused(op: WriteOp) -> Done {
        match op {
            WriteOp::Accept { reply, .. } => Done::Accept(reply, Ok(Vec::new())),
            WriteOp::ReleaseDue { reply, .. } => Done::Users(reply, Ok(Vec::new())),
            WriteOp::RevokeSession { reply, .. } | WriteOp::RevokeMailbox { reply, .. } => {
                Done::Unit(reply, Ok(()))
            }
            WriteOp::Purge { reply, .. } => Done::Purge(reply, Ok(PurgeSlice::default())),
            WriteOp::RegisterOpaque { reply, .. } => {
                Done::Opaque(reply, Err(StoreError::WriterGone))
            }
            WriteOp::DeleteOpaque { reply, .. } => Done::Flag(reply, Ok(false)),
        }
    }

    /// Once the round's commit is known: answer what may be answered while
    /// the round is visible but not yet synced (an accept's outcomes and a
    /// release, and any failure); put what must wait for the sync in
    /// `after_sync`, an accept's word that it is durable among them.
    fn on_commit(self, commit: &Result<(), String>, after_sync: &mut Vec<Done>) {
        if commit.is_err() {
            return self.send(commit);
        }
        match self {
            Done::Accept(tx, Ok(outcomes)) => {
                let (durable_tx, durable_rx) = oneshot::channel();
                let durable =
                    Durable::when(
                        async move { durable_rx.await.map_err(|_| StoreError::WriterGone)? },
                    );
                drop(tx.send(Ok(Acceptance { outcomes, durable })));
                after_sync.push(Done::Unit(durable_tx, Ok(())));
            }
            // A refused accept stored nothing. A release moves rows that are
            // durable as delayed messages: lost with a power loss, it is
            // made again. So is a slice of a purge, and the next slice
            // need not wait for the sync.
            done @ (Done::Accept(_, Err(_)) | Done::Users(..) | Done::Purge(..)) => {
                done.send(commit)
            }
            done => after_sync.push(done),
        }
    }

    /// Answer; `outcome` is the round's commit or sync, `Err` saying why it
    /// failed.
    fn send(self, outcome: &Result<(), String>) {
        fn pick<T>(r: StoreResult<T>, outcome: &Result<(), String>) -> StoreResult<T> {
            match outcome {
                Ok(()) => r,
                Err(e) => Err(StoreError::Database(sqlx::Error::Protocol(e.clone()))),
            }
        }
        // A caller that went away no longer needs its answer.
        match self {
            // Reached with a failure only: `on_commit` answers a stored accept.
            Done::Accept(tx, r) => drop(tx.send(pick(r, outcome).map(|outcomes| Acceptance {
                outcomes,
                durable: Durable::now(),
            }))),
            Done::Users(tx, r) => drop(tx.send(pick(r, outcome))),
            Done::Unit(tx, r) => drop(tx.send(pick(r, outcome))),
            Done::Purge(tx, r) => drop(tx.send(pick(r, outcome))),
            Done::Opaque(tx, r) => drop(tx.send(pick(r, outcome))),
            Done::Flag(tx, r) => drop(tx.send(pick(r, outcome))),
        }
    }
}

/// One transaction for `ops`; then `memory` learns what it changed, before
/// any caller hears of it, so a poll woken by an answer finds the rows
/// there. Returns the answers, for [`Done::on_commit`].
async fn commit_round(
    exec: &mut Exec<'_, '_>,
    ops: Vec<WriteOp>,
    memory: &InMemory,
    seqs: &mut Seqs,
) -> (Vec<Done>, Result<(), String>) {
    let conn = match exec {
        Exec::Sqlx(conn) => &mut **conn,
        Exec::Direct(direct) => return commit_direct(direct, ops, memory, seqs),
    };
    let mut done = Vec::with_capacity(ops.len());
    let mut fresh = Fresh::default();
    if only_plain_accepts(&ops) {
        // Reached only when the handle could not be lent (`run_writer`).
        // One statement commits by itself: no BEGIN and COMMIT round trips.
        let group = ops.into_iter().filter_map(|op| match op {
            WriteOp::Accept {
                batch,
                now_ms,
                reply,
            } => Some((batch, now_ms, reply)),
            _ => None,
        });
        insert_plain_group(conn, group.collect(), seqs, &mut done, &mut fresh).await;
        memory.learn(fresh);
        return (done, Ok(()));
    }
    let commit = match conn.begin().await {
        Err(e) => Err(e.to_string()),
        Ok(mut tx) => {
            let mut ops = ops.into_iter().peekable();
            while let Some(op) = ops.next() {
                let WriteOp::Accept {
                    batch,
                    now_ms,
                    reply,
                } = op
                else {
                    done.push(apply_in_savepoint(&mut tx, op, seqs, &mut fresh).await);
                    continue;
                };
                if !is_plain(&batch) {
                    let op = WriteOp::Accept {
                        batch,
                        now_ms,
                        reply,
                    };
                    done.push(apply_in_savepoint(&mut tx, op, seqs, &mut fresh).await);
                    continue;
                }
                // Plain accepts queued one after another go in together.
                let mut rows = batch.len();
                let mut group = vec![(batch, now_ms, reply)];
                while let Some(WriteOp::Accept { batch, .. }) = ops.peek() {
                    if !is_plain(batch) || rows + batch.len() > ROWS_PER_INSERT {
                        break;
                    }
                    rows += batch.len();
                    if let Some(WriteOp::Accept {
                        batch,
                        now_ms,
                        reply,
                    }) = ops.next()
                    {
                        group.push((batch, now_ms, reply));
                    }
                }
                insert_plain_group(&mut tx, group, seqs, &mut done, &mut fresh).await;
            }
            tx.commit().await.map_err(|e| e.to_string())
        }
    };
    match &commit {
        Ok(()) => memory.learn(fresh),
        Err(e) => tracing::error!(error = %e, "sqlite commit failed"),
    }
    (done, commit.map_err(|e| format!("commit failed: {e}")))
}

/// Apply `op` in a savepoint of its own; what it changed joins `fresh` only
/// when it succeeded.
async fn apply_in_savepoint(
    conn: &mut SqliteConnection,
    op: WriteOp,
    seqs: &mut Seqs,
    fresh: &mut Fresh,
) -> Done {
    fn keep<T>(r: StoreResult<(T, Rows)>, fresh: &mut Fresh) -> StoreResult<T> {
        r.map(|(v, rows)| {
            fresh.rows.extend(rows);
            v
        })
    }
    // Runs `$body` (an expression using the connection `$c`) in a savepoint.
    macro_rules! in_savepoint {
        ($c:ident => $body:expr) => {{
            match conn.begin().await {
                Err(e) => Err(StoreError::from(e)),
                Ok(mut sp) => {
                    let $c: &mut SqliteConnection = &mut sp;
                    let result: StoreResult<_> = $body.await;
                    match result {
                        Ok(v) => sp.commit().await.map(|_| v).map_err(StoreError::from),
                        Err(e) => {
                            let _ = sp.rollback().await;
                            Err(e)
                        }
                    }
                }
            }
        }};
    }
    match op {
        WriteOp::Accept {
            batch,
            now_ms,
            reply,
        } => {
            let outcomes = keep(
                in_savepoint!(c => insert_batch(c, batch, now_ms, seqs)),
                fresh,
            );
            if let Ok(outcomes) = &outcomes {
                let stored = outcomes
                    .iter()
                    .filter(|o| matches!(o, Accepted::Stored { .. }))
                    .count();
                fresh.stored += stored as i64;
            }
            Done::Accept(reply, outcomes)
        }
        WriteOp::ReleaseDue { now_ms, reply } => Done::Users(
            reply,
            keep(in_savepoint!(c => release_due(c, now_ms, seqs)), fresh),
        ),
        WriteOp::RevokeSession {
            jti,
            expires_ms,
            reply,
        } => {
            let q = sqlx::query(
                "INSERT INTO revoked_sessions (jti, expires_ms) VALUES (?, ?)
                 ON CONFLICT (jti) DO UPDATE SET expires_ms = max(expires_ms, excluded.expires_ms)",
            )
            .bind(jti)
            .bind(expires_ms);
            Done::Unit(reply, in_savepoint!(c => execute(c, q)))
        }
        WriteOp::RevokeMailbox {
            user,
            revoked_ms,
            reply,
        } => {
            let q = sqlx::query(
                "INSERT INTO revoked_mailboxes (mailbox, revoked_ms) VALUES (?, ?)
                 ON CONFLICT (mailbox) DO UPDATE SET revoked_ms = max(revoked_ms, excluded.revoked_ms)",
            )
            .bind(user)
            .bind(revoked_ms);
            Done::Unit(reply, in_savepoint!(c => execute(c, q)))
        }
        WriteOp::Purge {
            policy,
            now_ms,
            from,
            reply,
        } => {
            let highest_given = seqs.highest_given();
            let slice = in_savepoint!(c => purge_slice(c, policy, now_ms, highest_given, from));
            if let Ok(slice) = &slice {
                fresh.stored -= slice.report.messages as i64;
                fresh.purged_through = fresh.purged_through.max(slice.newest_deleted);
                fresh.purged_positions |= slice.report.positions > 0;
            }
            Done::Purge(reply, slice)
        }
        WriteOp::RegisterOpaque {
            sid_hash,
            user,
            now_ms,
            expires_ms,
            reply,
        } => Done::Opaque(
            reply,
            in_savepoint!(c => register_opaque(c, sid_hash, user, now_ms, expires_ms)),
        ),
        WriteOp::DeleteOpaque { sid_hash, reply } => {
            let q = sqlx::query("DELETE FROM opaque_sessions WHERE sid_hash = ?").bind(sid_hash);
            Done::Flag(reply, in_savepoint!(c => execute_counted(c, q)))
        }
    }
}

async fn execute_counted(conn: &mut SqliteConnection, query: SqliteQuery<'_>) -> StoreResult<bool> {
    Ok(query.execute(conn).await?.rows_affected() > 0)
}

async fn register_opaque(
    conn: &mut SqliteConnection,
    sid_hash: String,
    user: String,
    now_ms: i64,
    expires_ms: i64,
) -> StoreResult<OpaqueSession> {
    let (user, start_ms, expires_ms): (String, i64, i64) = sqlx::query_as(super::REGISTER_OPAQUE)
        .bind(sid_hash)
        .bind(user)
        .bind(now_ms)
        .bind(expires_ms)
        .fetch_one(&mut *conn)
        .await?;
    Ok(OpaqueSession {
        user,
        start_ms,
        expires_ms,
    })
}

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

async fn execute(conn: &mut SqliteConnection, query: SqliteQuery<'_>) -> StoreResult<()> {
    query.execute(conn).await?;
    Ok(())
}

/// Whether a round is nothing but plain accepts that fit one statement.
fn only_plain_accepts(ops: &[WriteOp]) -> bool {
    let mut rows = 0;
    ops.iter().all(|op| match op {
        WriteOp::Accept { batch, .. } if is_plain(batch) => {
            rows += batch.len();
            rows <= ROWS_PER_INSERT
        }
        _ => false,
    })
}

/// Rows one multi-row INSERT carries at most (7 parameters each, well
/// under SQLite's 32,766).
const ROWS_PER_INSERT: usize = 1000;

/// A batch with no dedup keys and no delays: every message becomes a row of
/// `messages`, so the batch can go in as one multi-row INSERT.
fn is_plain(batch: &[NewMessage]) -> bool {
    batch.len() <= ROWS_PER_INSERT
        && batch
            .iter()
            .all(|m| m.dedup_key.is_none() && m.delay_ms == 0)
}

/// Store plain batches, each with its accept time, as one statement. A
/// single statement is atomic by itself, so it needs no savepoint; and the
/// notifies that queued up while the last round committed cost one round
/// trip to the database thread together instead of three each. Plain
/// messages cannot fail one by one (no constraint can refuse them), so
/// sharing the statement sinks no neighbour that would have gone in alone.
/// `seq` follows the queue order.
async fn insert_plain_group(
    conn: &mut SqliteConnection,
    group: PlainGroup,
    seqs: &mut Seqs,
    done: &mut Vec<Done>,
    fresh: &mut Fresh,
) {
    let count: usize = group.iter().map(|(b, _, _)| b.len()).sum();
    let mut sql = String::with_capacity(100 + count * 16);
    sql.push_str(
        "INSERT INTO messages (id, mailbox, type, data, accepted_ms, visible_ms, seq) VALUES ",
    );
    for i in 0..count {
        sql.push_str(if i == 0 {
            "(?,?,?,?,?,?,?)"
        } else {
            ",(?,?,?,?,?,?,?)"
        });
    }
    let (rows, mut outcomes) = plain_rows(group, seqs);
    let mut q = sqlx::query(&sql);
    for (mailbox, m) in &rows {
        q = q
            .bind(&m.id)
            .bind(mailbox)
            .bind(m.kind)
            .bind(&m.data)
            .bind(m.accepted_ms)
            .bind(m.visible_ms)
            .bind(m.seq);
    }
    match q.execute(&mut *conn).await {
        Ok(_) => {
            fresh.stored += rows.len() as i64;
            fresh.rows.extend(rows);
            done.extend(
                outcomes
                    .into_iter()
                    .map(|(reply, ids)| Done::Accept(reply, Ok(ids))),
            );
        }
        Err(e) if outcomes.len() == 1 => {
            if let Some((reply, _)) = outcomes.pop() {
                done.push(Done::Accept(reply, Err(StoreError::from(e))));
            }
        }
        Err(e) => {
            let why = e.to_string();
            done.extend(outcomes.into_iter().map(|(reply, _)| {
                Done::Accept(
                    reply,
                    Err(StoreError::Database(sqlx::Error::Protocol(why.clone()))),
                )
            }));
        }
    }
}

/// Plain batches that go in together.
type PlainGroup = Vec<(Vec<NewMessage>, i64, AcceptReply)>;

/// The rows of a plain group, in queue order with their seqs, and each
/// batch's reply with the outcomes it gets once they are stored.
fn plain_rows(group: PlainGroup, seqs: &mut Seqs) -> (Rows, Vec<(AcceptReply, Vec<Accepted>)>) {
    let count: usize = group.iter().map(|(b, _, _)| b.len()).sum();
    let mut rows: Rows = Vec::with_capacity(count);
    let mut outcomes = Vec::with_capacity(group.len());
    for (batch, now_ms, reply) in group {
        let mut ids = Vec::with_capacity(batch.len());
        for m in batch {
            let id = new_message_id();
            ids.push(Accepted::Stored {
                id: id.clone(),
                visible: true,
            });
            let row = StoredMessage {
                seq: seqs.take(),
                id,
                kind: m.kind,
                accepted_ms: now_ms,
                visible_ms: now_ms,
                data: m.data,
            };
            rows.push((m.user, row));
        }
        outcomes.push((reply, ids));
    }
    (rows, outcomes)
}

/// A round of plain accepts through the lent handle, in one transaction;
/// then `memory` learns the rows, as in [`commit_round`]. As with one
/// multi-row INSERT, all batches go in or none: plain messages cannot fail
/// one by one.
fn commit_direct(
    direct: &mut Direct<'_>,
    ops: Vec<WriteOp>,
    memory: &InMemory,
    seqs: &mut Seqs,
) -> (Vec<Done>, Result<(), String>) {
    let mut done = Vec::with_capacity(ops.len());
    let mut group = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            WriteOp::Accept {
                batch,
                now_ms,
                reply,
            } if is_plain(&batch) => group.push((batch, now_ms, reply)),
            // `Writer::needs_sqlx` sends every other write through sqlx.
            op => Done::refused(op).send(&Err("not a plain write".to_owned())),
        }
    }
    let (rows, outcomes) = plain_rows(group, seqs);
    match direct.insert_messages(&rows) {
        Ok(()) => {
            let stored = rows.len() as i64;
            memory.learn(Fresh {
                rows,
                stored,
                ..Fresh::default()
            });
            done.extend(
                outcomes
                    .into_iter()
                    .map(|(reply, ids)| Done::Accept(reply, Ok(ids))),
            );
        }
        Err(why) => {
            tracing::error!(error = %why, "sqlite insert failed");
            done.extend(outcomes.into_iter().map(|(reply, _)| {
                Done::Accept(
                    reply,
                    Err(StoreError::Database(sqlx::Error::Protocol(why.clone()))),
                )
            }));
        }
    }
    (done, Ok(()))
}

async fn insert_batch(
    conn: &mut SqliteConnection,
    batch: Vec<NewMessage>,
    now_ms: i64,
    seqs: &mut Seqs,
) -> StoreResult<(Vec<Accepted>, Rows)> {
    let mut out = Vec::with_capacity(batch.len());
    let mut fresh = Rows::new();
    for m in batch {
        let id = new_message_id();
        if let Some(key) = &m.dedup_key {
            let fresh = sqlx::query(
                "INSERT INTO dedup_keys (mailbox, dedup_key, id, created_ms) VALUES (?, ?, ?, ?)
                 ON CONFLICT DO NOTHING",
            )
            .bind(&m.user)
            .bind(key)
            .bind(&id)
            .bind(now_ms)
            .execute(&mut *conn)
            .await?
            .rows_affected()
                == 1;
            if !fresh {
                let existing: String = sqlx::query_scalar(
                    "SELECT id FROM dedup_keys WHERE mailbox = ? AND dedup_key = ?",
                )
                .bind(&m.user)
                .bind(key)
                .fetch_one(&mut *conn)
                .await?;
                out.push(Accepted::Duplicate { id: existing });
                continue;
            }
        }
        if m.delay_ms == 0 {
            let seq = seqs.take();
            sqlx::query(
                "INSERT INTO messages (id, mailbox, type, data, accepted_ms, visible_ms, seq)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&id)
            .bind(&m.user)
            .bind(m.kind)
            .bind(&m.data)
            .bind(now_ms)
            .bind(now_ms)
            .bind(seq)
            .execute(&mut *conn)
            .await?;
            out.push(Accepted::Stored {
                id: id.clone(),
                visible: true,
            });
            let row = StoredMessage {
                seq,
                id,
                kind: m.kind,
                accepted_ms: now_ms,
                visible_ms: now_ms,
                data: m.data,
            };
            fresh.push((m.user, row));
        } else {
            let due = now_ms.saturating_add(i64::try_from(m.delay_ms).unwrap_or(i64::MAX));
            sqlx::query(
                "INSERT INTO delayed_messages (id, mailbox, type, data, accepted_ms, due_ms) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&id)
            .bind(&m.user)
            .bind(m.kind)
            .bind(&m.data)
            .bind(now_ms)
            .bind(due)
            .execute(&mut *conn)
            .await?;
            out.push(Accepted::Stored { id, visible: false });
        }
    }
    Ok((out, fresh))
}

async fn release_due(
    conn: &mut SqliteConnection,
    now_ms: i64,
    seqs: &mut Seqs,
) -> StoreResult<(Vec<String>, Rows)> {
    // Due messages take the next seqs in the order they fell due.
    let released: Vec<(i64, String, String, i64, String, i64)> = sqlx::query_as(
        "INSERT INTO messages (id, mailbox, type, data, accepted_ms, visible_ms, seq)
         SELECT id, mailbox, type, data, accepted_ms, ?,
                ? + row_number() OVER (ORDER BY due_ms, accepted_ms, id) - 1
         FROM delayed_messages WHERE due_ms <= ?
         RETURNING seq, id, mailbox, type, data, accepted_ms",
    )
    .bind(now_ms)
    .bind(seqs.next)
    .bind(now_ms)
    .fetch_all(&mut *conn)
    .await?;
    if let Some(top) = released.iter().map(|r| r.0).max() {
        seqs.next = top + 1;
    }
    let fresh = released
        .into_iter()
        .map(|(seq, id, mailbox, kind, data, accepted_ms)| {
            let row = StoredMessage {
                seq,
                id,
                kind,
                accepted_ms,
                visible_ms: now_ms,
                data,
            };
            (mailbox, row)
        })
        .collect();
    let users: Vec<String> =
        sqlx::query_scalar("DELETE FROM delayed_messages WHERE due_ms <= ? RETURNING mailbox")
            .bind(now_ms)
            .fetch_all(&mut *conn)
            .await?;
    let mut users = users;
    users.sort_unstable();
    users.dedup();
    Ok((users, fresh))
}

/// One slice of a purge ([`super::purge_slice`]). The
/// newest messages may go too (with a cap of 0, even those stored since
/// the purge began), so a slice that deletes messages raises the seq
/// floor to `highest_given` in the same transaction: no seq is given
/// twice, even across a restart. A slice that deletes nothing writes
/// nothing.
async fn purge_slice(
    conn: &mut SqliteConnection,
    policy: RetentionPolicy,
    now_ms: i64,
    highest_given: i64,
    from: Option<String>,
) -> StoreResult<PurgeSlice> {
    let slice = super::purge_slice::<sqlx::Sqlite>(
        &mut *conn,
        policy,
        now_ms,
        from,
        PURGE_SLICE_ROWS,
        super::PastTheAge::InEachSlice,
    )
    .await?;
    if slice.newest_deleted.is_some() {
        sqlx::query("UPDATE seq_floor SET seq = max(seq, ?) WHERE id = 1")
            .bind(highest_given)
            .execute(&mut *conn)
            .await?;
    }
    Ok(slice)
}

#[async_trait]
impl MessageStore for SqliteStore {
    async fn accept(&self, batch: Vec<NewMessage>, now_ms: i64) -> StoreResult<Acceptance> {
        self.write(|reply| WriteOp::Accept {
            batch,
            now_ms,
            reply,
        })
        .await
    }

    async fn fetch(
        &self,
        user: &str,
        after_seq: i64,
        since_ms: i64,
        limit: u32,
    ) -> StoreResult<Vec<StoredMessage>> {
        match self.memory.recent.fetch(user, after_seq, since_ms, limit) {
            Some(found) => Ok(found),
            None => self.fetch_from_file(user, after_seq, since_ms, limit).await,
        }
    }

    async fn release_due(&self, now_ms: i64) -> StoreResult<Vec<String>> {
        self.write(|reply| WriteOp::ReleaseDue { now_ms, reply })
            .await
    }

    async fn next_due(&self) -> StoreResult<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT min(due_ms) FROM delayed_messages")
                .fetch_one(&self.reads)
                .await?,
        )
    }

    async fn position(&self, session: &str) -> StoreResult<Option<i64>> {
        let (known, waiting) = self.memory.positions.read(session);
        self.positions_waiting(waiting).await?;
        match known {
            Known::Saved(seq) => Ok(Some(seq)),
            Known::None => Ok(None),
            Known::AskTheFile => Ok(sqlx::query_scalar(
                "SELECT seq FROM session_positions WHERE session = ?",
            )
            .bind(session)
            .fetch_optional(&self.reads)
            .await?),
        }
    }

    async fn save_position(
        &self,
        session: &str,
        user: &str,
        seq: i64,
        now_ms: i64,
    ) -> StoreResult<()> {
        let waiting = self.memory.positions.save(session, user, seq, now_ms);
        self.positions_waiting(waiting).await
    }

    async fn flush(&self) -> StoreResult<()> {
        self.ask(|reply| Queued::Flush { reply }).await
    }

    async fn revoke_session(&self, jti: &str, expires_ms: i64) -> StoreResult<()> {
        let jti = jti.to_owned();
        self.write(|reply| WriteOp::RevokeSession {
            jti,
            expires_ms,
            reply,
        })
        .await
    }

    async fn revoke_mailbox(&self, user: &str, revoked_ms: i64) -> StoreResult<()> {
        let user = user.to_owned();
        self.write(|reply| WriteOp::RevokeMailbox {
            user,
            revoked_ms,
            reply,
        })
        .await
    }

    async fn revocations(&self, now_ms: i64) -> StoreResult<Revocations> {
        let sessions =
            sqlx::query_as("SELECT jti, expires_ms FROM revoked_sessions WHERE expires_ms >= ?")
                .bind(now_ms)
                .fetch_all(&self.reads)
                .await?;
        let mailboxes = sqlx::query_as("SELECT mailbox, revoked_ms FROM revoked_mailboxes")
            .fetch_all(&self.reads)
            .await?;
        Ok(Revocations {
            sessions,
            mailboxes,
        })
    }

    async fn purge(&self, policy: RetentionPolicy, now_ms: i64) -> StoreResult<PurgeReport> {
        let mut report = PurgeReport::default();
        let mut from = None;
        loop {
            let slice = self
                .write(|reply| WriteOp::Purge {
                    policy,
                    now_ms,
                    from: from.take(),
                    reply,
                })
                .await?;
            report += slice.report;
            match slice.next {
                Some(next) => from = Some(next),
                None => return Ok(report),
            }
        }
    }

    async fn register_opaque_session(
        &self,
        sid_hash: &str,
        user: &str,
        now_ms: i64,
        expires_ms: i64,
    ) -> StoreResult<OpaqueSession> {
        let (sid_hash, user) = (sid_hash.to_owned(), user.to_owned());
        self.write(|reply| WriteOp::RegisterOpaque {
            sid_hash,
            user,
            now_ms,
            expires_ms,
            reply,
        })
        .await
    }

    async fn opaque_session(&self, sid_hash: &str) -> StoreResult<Option<OpaqueSession>> {
        let row: Option<(String, i64, i64)> = sqlx::query_as(
            "SELECT mailbox, created_ms, expires_ms FROM opaque_sessions WHERE sid_hash = ?",
        )
        .bind(sid_hash)
        .fetch_optional(&self.reads)
        .await?;
        Ok(row.map(|(user, start_ms, expires_ms)| OpaqueSession {
            user,
            start_ms,
            expires_ms,
        }))
    }

    async fn delete_opaque_session(&self, sid_hash: &str) -> StoreResult<bool> {
        let sid_hash = sid_hash.to_owned();
        self.write(|reply| WriteOp::DeleteOpaque { sid_hash, reply })
            .await
    }

    async fn message_count(&self) -> StoreResult<i64> {
        Ok(self
            .memory
            .stored
            .load(std::sync::atomic::Ordering::Relaxed))
    }

    /// `VACUUM INTO` a new file beside the database, on a connection of
    /// its own (the readers are `query_only`, which refuses it): the
    /// writer goes on meanwhile, and the copy is of one moment. Another
    /// process cannot read the file while the node runs (`sqlite_lock`),
    /// so this is how the node is backed up without stopping it.
    async fn backup(&self) -> StoreResult<Option<std::fs::File>> {
        // The positions waiting in memory go into the copy too.
        self.flush().await?;
        static TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        // The path came from the URL, a string: `display` is exact.
        let copy = format!(
            "{}.backup-{}-{}",
            self.path.display(),
            std::process::id(),
            TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let io = |e: std::io::Error| StoreError::Unavailable(sqlx::Error::Io(e));
        let mut conn = SqliteConnection::connect_with(&self.options).await?;
        let vacuumed = sqlx::query("VACUUM INTO ?")
            .bind(&copy)
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
        let opened = vacuumed
            .map_err(StoreError::from)
            .and_then(|_| std::fs::File::open(&copy).map_err(io));
        // Unlinked at once: the answer reads it through the descriptor,
        // and a node that stops meanwhile leaves no copy behind.
        let removed = std::fs::remove_file(&copy);
        let file = opened?;
        removed.map_err(io)?;
        Ok(Some(file))
    }

    fn wake_after_commits(&self, hub: Arc<crate::hub::Hub>) -> bool {
        // The writer is in this process and commits one round at a time.
        let _ = self.memory.hub.set(hub);
        true
    }

    fn sync_times(&self) -> Option<Histogram> {
        Some(self.sync_times.clone())
    }

    async fn ping(&self) -> StoreResult<()> {
        if !self.sync_health.ok() {
            return Err(StoreError::Unavailable(sqlx::Error::Io(
                std::io::Error::other("a sync of the write-ahead log failed; restart the node"),
            )));
        }
        sqlx::query("SELECT 1")
            .execute(&self.reads)
            .await
            .map(|_| ())
            .map_err(StoreError::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(user: &str, n: usize) -> NewMessage {
        NewMessage {
            user: user.into(),
            kind: 70,
            data: format!("{{\"n\":{n}}}"),
            dedup_key: None,
            delay_ms: 0,
        }
    }

    fn summary(found: Vec<StoredMessage>) -> Vec<(i64, String, i64, i64, i64, String)> {
        found
            .into_iter()
            .map(|m| (m.seq, m.id, m.kind, m.accepted_ms, m.visible_ms, m.data))
            .collect()
    }

    /// Every way a row becomes visible (concurrent plain notifies sharing an
    /// INSERT, batches, dedup keys, delayed messages coming due), and what
    /// memory answers is what the file holds.
    #[tokio::test]
    async fn reads_from_memory_match_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        let store = Arc::new(SqliteStore::open(&url).await.unwrap());
        let users = ["a", "b", "c"];
        let mut tasks = Vec::new();
        for i in 0..60 {
            let store = store.clone();
            let batch = (0..1 + i % 4)
                .map(|k| plain(users[(i + k) % 3], i * 10 + k))
                .collect();
            tasks.push(tokio::spawn(
                async move { store.accept(batch, 1_000).await },
            ));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let mut keyed = plain("a", 1000);
        keyed.dedup_key = Some("k".into());
        let mut delayed = plain("b", 1001);
        delayed.delay_ms = 5;
        store
            .accept(vec![keyed.clone(), delayed, keyed, plain("c", 1002)], 2_000)
            .await
            .unwrap();
        assert_eq!(
            store.release_due(2_010).await.unwrap(),
            vec!["b".to_owned()]
        );
        store.accept(vec![plain("a", 1003)], 3_000).await.unwrap();
        for user in users {
            for (after, since) in [(0, 0), (5, 0), (40, 0), (0, 2_000), (0, 2_010)] {
                let memory = store.memory.recent.fetch(user, after, since, 1000);
                let file = store
                    .fetch_from_file(user, after, since, 1000)
                    .await
                    .unwrap();
                assert!(!file.is_empty() || after > 0 || since > 0, "{user}");
                assert_eq!(
                    memory.map(summary),
                    Some(summary(file)),
                    "{user} after {after} since {since}"
                );
            }
        }
        assert_eq!(store.message_count().await.unwrap(), scanned(&store).await);
    }

    /// A round waits while the polls' runtime owes the answers of earlier
    /// rounds, and goes once they are given.
    #[tokio::test]
    async fn a_round_waits_for_the_answers_owed() {
        use crate::hub::{Hub, MAX_ANSWERS_OWED};
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        let store = Arc::new(SqliteStore::open(&url).await.unwrap());
        let hub = Hub::new();
        assert!(store.wake_after_commits(hub.clone()));
        let users: Vec<String> = (0..=MAX_ANSWERS_OWED).map(|i| format!("u{i}")).collect();
        let parked: Vec<_> = users.iter().map(|u| hub.park(u, "s", 0, 0, None)).collect();
        let burst = users.iter().enumerate().map(|(i, u)| plain(u, i)).collect();
        store.accept(burst, 1_000).await.unwrap();
        assert_eq!(hub.answers_owed(), MAX_ANSWERS_OWED + 1);
        let next = {
            let store = store.clone();
            tokio::spawn(async move { store.accept(vec![plain("late", 0)], 2_000).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!next.is_finished(), "the round went with the answers owed");
        drop(parked);
        next.await.unwrap().unwrap();
        assert_eq!(hub.rounds_held_for_answers(), 1);
    }

    /// A store opened on a file counts what the file holds, visible and
    /// delayed, and goes on counting from there.
    #[tokio::test]
    async fn a_reopened_store_counts_the_messages_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        let mut later = plain("b", 9);
        later.delay_ms = 3_600_000;
        let first = vec![plain("a", 1), plain("a", 2), plain("b", 3), later];
        store.accept(first, 1_000).await.unwrap();
        drop(store);
        let store = SqliteStore::open(&url).await.unwrap();
        assert_eq!(store.message_count().await.unwrap(), 4);
        store.accept(vec![plain("c", 4)], 2_000).await.unwrap();
        assert_eq!(store.message_count().await.unwrap(), 5);
        assert_eq!(scanned(&store).await, 5);
    }

    /// What the file holds, visible and delayed, counted by a scan.
    async fn scanned(store: &SqliteStore) -> i64 {
        sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM messages) + (SELECT count(*) FROM delayed_messages)",
        )
        .fetch_one(&store.reads)
        .await
        .unwrap()
    }

    /// A new store has pages of `PAGE_SIZE`; a store made before, with
    /// SQLite's 4 KiB, opens with its own and takes messages.
    #[tokio::test]
    async fn a_new_store_has_small_pages_and_an_old_one_keeps_its_own() {
        async fn page_size(url: &str) -> i64 {
            let mut conn = SqliteConnection::connect(url).await.unwrap();
            sqlx::query_scalar("PRAGMA page_size")
                .fetch_one(&mut conn)
                .await
                .unwrap()
        }
        let dir = tempfile::tempdir().unwrap();
        let new = format!("sqlite://{}", dir.path().join("new.db").display());
        let store = SqliteStore::open(&new).await.unwrap();
        store.accept(vec![plain("a", 1)], 1_000).await.unwrap();
        drop(store);
        assert_eq!(page_size(&new).await, i64::from(PAGE_SIZE));

        let old = format!("sqlite://{}", dir.path().join("old.db").display());
        let made_before = SqliteConnectOptions::new()
            .filename(dir.path().join("old.db"))
            .create_if_missing(true)
            .page_size(4096)
            .journal_mode(SqliteJournalMode::Wal);
        let mut conn = SqliteConnection::connect_with(&made_before).await.unwrap();
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let store = SqliteStore::open(&old).await.unwrap();
        store.accept(vec![plain("a", 2)], 1_000).await.unwrap();
        assert_eq!(store.fetch_from_file("a", 0, 0, 10).await.unwrap().len(), 1);
        drop(store);
        assert_eq!(page_size(&old).await, 4096);
    }

    /// A plain round that fails part way, here at a trigger another
    /// connection added after the writer prepared its statements, stores
    /// nothing and refuses its callers; the next round goes in.
    #[tokio::test]
    async fn a_failed_plain_round_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        store.accept(vec![plain("a", 1)], 1_000).await.unwrap();
        let mut other = SqliteConnection::connect(&url).await.unwrap();
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.data = '{\"n\":3}'
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        )
        .execute(&mut other)
        .await
        .unwrap();
        let refused = store
            .accept(vec![plain("a", 2), plain("b", 3), plain("a", 4)], 2_000)
            .await;
        let why = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(why.contains("refused by the test"), "{why}");
        let file = |user| store.fetch_from_file(user, 0, 0, 10);
        assert_eq!(file("a").await.unwrap().len(), 1, "only the first round");
        assert!(file("b").await.unwrap().is_empty());
        let from_memory = store.memory.recent.fetch("a", 0, 0, 10).map(summary);
        assert_eq!(from_memory, Some(summary(file("a").await.unwrap())));
        store.accept(vec![plain("a", 5)], 3_000).await.unwrap();
        let data: Vec<String> = file("a")
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.data)
            .collect();
        assert_eq!(data, ["{\"n\":1}", "{\"n\":5}"]);
    }

    /// The checkpointer copies the log into the database file long before
    /// the writer's own threshold.
    #[tokio::test]
    async fn the_log_reaches_the_database_file_without_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pns.db");
        let store = SqliteStore::open(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let size = || std::fs::metadata(&db).unwrap().len();
        let before = size();
        let batch: Vec<_> = (0..1000).map(|n| plain("a", n)).collect();
        let accepted = store.accept(batch, 1_000).await.unwrap();
        accepted.durable.wait().await.unwrap();
        let waited = std::time::Instant::now();
        while size() == before && waited.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(checkpoint::CHECKPOINT_EVERY).await;
        }
        assert!(
            size() > before,
            "the database file still has {before} bytes"
        );
    }

    /// While commits keep coming, the checkpointer has the log start over
    /// well before it is long enough for the writer's own checkpoint.
    #[tokio::test]
    async fn the_log_starts_over_while_commits_keep_coming() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("pns.db");
        let wal = dir.path().join("pns.db-wal");
        let store = Arc::new(
            SqliteStore::open(&format!("sqlite://{}", db.display()))
                .await
                .unwrap(),
        );
        // The log's header counts the times it started over.
        let restarts = || {
            let mut head = [0u8; 16];
            std::fs::File::open(&wal)
                .unwrap()
                .read_exact(&mut head)
                .unwrap();
            u32::from_be_bytes([head[12], head[13], head[14], head[15]])
        };
        let before = restarts();
        // One mailbox: each commit adds about one frame (more at a split),
        // so these stay far below the writer's CHECKPOINT_PAGES.
        const MESSAGES: usize = 8_000;
        let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let senders: Vec<_> = (0..4)
            .map(|_| {
                let (store, sent) = (store.clone(), sent.clone());
                tokio::spawn(async move {
                    while sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < MESSAGES {
                        store.accept(vec![plain("a", 1)], 1_000).await.unwrap();
                    }
                })
            })
            .collect();
        let mut started_over = false;
        while !started_over && sent.load(std::sync::atomic::Ordering::Relaxed) < MESSAGES {
            tokio::time::sleep(Duration::from_millis(5)).await;
            started_over = restarts() > before;
        }
        for sender in senders {
            sender.await.unwrap();
        }
        assert!(
            started_over,
            "the log did not start over within {MESSAGES} commits"
        );
    }

    #[tokio::test]
    async fn after_a_restart_older_rows_are_read_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        {
            let store = SqliteStore::open(&url).await.unwrap();
            store.accept(vec![plain("a", 1)], 1_000).await.unwrap();
        }
        let store = SqliteStore::open(&url).await.unwrap();
        assert_eq!(store.fetch("a", 0, 0, 10).await.unwrap().len(), 1);
        assert!(store.memory.recent.fetch("a", 0, 0, 10).is_none());
        // A session that began after the last row: nothing, from memory.
        assert_eq!(
            store
                .memory
                .recent
                .fetch("a", 0, 1_001, 10)
                .map(|f| f.len()),
            Some(0)
        );
    }

    /// Rows are visible before they are synced, so a power loss could take
    /// back seqs that polls were shown: each start begins far above them.
    #[tokio::test]
    async fn the_sequence_jumps_at_every_start() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        async fn seq_of_new(store: &SqliteStore, user: &str) -> i64 {
            store.fetch(user, 0, 0, 10).await.unwrap()[0].seq
        }
        let first = {
            let store = SqliteStore::open(&url).await.unwrap();
            let accepted = store.accept(vec![plain("a", 1)], 1_000).await.unwrap();
            accepted.durable.wait().await.unwrap();
            seq_of_new(&store, "a").await
        };
        assert!(
            first > SEQ_JUMP_AT_START,
            "a fresh file starts past the jump"
        );
        let store = SqliteStore::open(&url).await.unwrap();
        let accepted = store.accept(vec![plain("b", 2)], 2_000).await.unwrap();
        accepted.durable.wait().await.unwrap();
        let second = seq_of_new(&store, "b").await;
        assert!(
            second > first + SEQ_JUMP_AT_START,
            "seq {second} after a restart, {first} before"
        );
        // A cursor from before the restart still finds what came after it.
        let after: Vec<i64> = store
            .fetch("b", first, 0, 10)
            .await
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect();
        assert_eq!(after, vec![second]);
    }

    /// A purge goes through the table in slices of about
    /// `PURGE_SLICE_ROWS` rows (16 in tests), each a round of the writer's
    /// own; together they delete exactly what one pass would: here 31
    /// mailboxes, one of them longer than a slice, 250 rows.
    #[tokio::test]
    async fn a_purge_in_slices_deletes_what_retention_no_longer_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        let small: Vec<String> = (0..30).map(|i| format!("m{i:02}")).collect();
        let old: Vec<NewMessage> = small.iter().map(|u| plain(u, 0)).collect();
        store.accept(old, 1_000).await.unwrap();
        let mut new: Vec<NewMessage> = (1..=4)
            .flat_map(|n| small.iter().map(move |u| plain(u, n)))
            .collect();
        new.extend((1..=40).map(|n| plain("big", n)));
        store.accept(new, 50_000).await.unwrap();
        let policy = RetentionPolicy {
            max_messages_per_user: 3,
            max_age_ms: 10_000,
        };
        let purged = store.purge(policy, 55_000).await.unwrap();
        // 30 too old, and past the newest 3: one of each small mailbox's
        // 4 new ones and 37 of big's 40.
        assert_eq!(purged.messages, 30 + 30 + 37);
        assert_eq!(store.message_count().await.unwrap(), 30 * 3 + 3);
        assert_eq!(scanned(&store).await, 30 * 3 + 3);
        let data = |found: Vec<StoredMessage>| -> Vec<String> {
            found.into_iter().map(|m| m.data).collect()
        };
        let newest =
            |n: usize| -> Vec<String> { (n - 2..=n).map(|i| format!("{{\"n\":{i}}}")).collect() };
        for user in small.iter().map(String::as_str).chain(["big"]) {
            let kept = data(store.fetch(user, 0, 0, 100).await.unwrap());
            let n = if user == "big" { 40 } else { 4 };
            assert_eq!(kept, newest(n), "{user}");
        }
        // What comes after the purge is answered as before.
        store.accept(vec![plain("big", 41)], 56_000).await.unwrap();
        let all = store.fetch("big", 0, 0, 100).await.unwrap();
        let last = all[all.len() - 2].seq;
        assert_eq!(
            data(store.fetch("big", last, 0, 100).await.unwrap()),
            newest(41)[2..]
        );
    }

    /// A purge may delete the newest messages; their seqs are never given
    /// again, in the same run or after a restart, so a cursor that passed
    /// them still finds what comes next.
    #[tokio::test]
    async fn a_purge_of_the_newest_messages_gives_no_seq_again() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        let everything = RetentionPolicy {
            max_messages_per_user: 1,
            max_age_ms: 0,
        };
        let seqs_of = |found: Vec<StoredMessage>| found.iter().map(|m| m.seq).collect::<Vec<_>>();
        let store = SqliteStore::open(&url).await.unwrap();
        store
            .accept(vec![plain("a", 1), plain("a", 2)], 1_000)
            .await
            .unwrap();
        let cursor = *seqs_of(store.fetch("a", 0, 0, 10).await.unwrap())
            .last()
            .unwrap();
        let purged = store.purge(everything, 5_000).await.unwrap();
        assert_eq!(purged.messages, 2);
        assert_eq!(store.message_count().await.unwrap(), 0);
        store.accept(vec![plain("a", 3)], 6_000).await.unwrap();
        let next = seqs_of(store.fetch("a", cursor, 0, 10).await.unwrap());
        assert_eq!(
            next.len(),
            1,
            "the message after the purge, past the cursor"
        );
        store.purge(everything, 9_000).await.unwrap();
        store.flush().await.unwrap();
        drop(store);
        // Without the floor, the first seq after the restart would be the
        // jump above the largest seq left in the file, none.
        let store = SqliteStore::open(&url).await.unwrap();
        store.accept(vec![plain("a", 4)], 10_000).await.unwrap();
        assert_eq!(store.message_count().await.unwrap(), 1);
        assert_eq!(scanned(&store).await, 1);
        let after_restart = seqs_of(store.fetch("a", next[0], 0, 10).await.unwrap());
        assert_eq!(after_restart.len(), 1);
        assert!(
            after_restart[0] > next[0] + SEQ_JUMP_AT_START,
            "seq {} after the restart, {} before",
            after_restart[0],
            next[0]
        );
    }

    /// A file made before messages were kept by mailbox keeps its rows and
    /// seqs, and gives no seq that AUTOINCREMENT had given, even one whose
    /// row is gone.
    #[tokio::test]
    async fn a_file_from_before_seq_floor_keeps_its_rows_and_sequence() {
        // As the store would: SQLite must not start beside the install.
        crate::store::page_cache::install();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        {
            let mut old = SqliteConnection::connect_with(
                &SqliteConnectOptions::new()
                    .filename(sqlite_path(&url))
                    .create_if_missing(true),
            )
            .await
            .unwrap();
            let mut before = sqlx::migrate!("./migrations/sqlite");
            let kept: Vec<_> = before
                .migrations
                .iter()
                .filter(|m| m.version < 4)
                .cloned()
                .collect();
            assert_eq!(kept.len(), 3);
            before.migrations = kept.into();
            before.run(&mut old).await.unwrap();
            for (seq, user) in [(7, "a"), (8, "b"), (900, "a")] {
                sqlx::query(
                    "INSERT INTO messages (seq, id, mailbox, type, data, accepted_ms, visible_ms)
                     VALUES (?, ?, ?, 70, '{}', 1000, 1000)",
                )
                .bind(seq)
                .bind(format!("m{seq}"))
                .bind(user)
                .execute(&mut old)
                .await
                .unwrap();
            }
            sqlx::query("DELETE FROM messages WHERE seq = 900")
                .execute(&mut old)
                .await
                .unwrap();
        }
        let store = SqliteStore::open(&url).await.unwrap();
        let a = store.fetch("a", 0, 0, 10).await.unwrap();
        assert_eq!(
            a.iter().map(|m| (m.seq, m.id.as_str())).collect::<Vec<_>>(),
            [(7, "m7")]
        );
        assert_eq!(store.fetch("b", 7, 0, 10).await.unwrap()[0].seq, 8);
        store.accept(vec![plain("a", 1)], 2_000).await.unwrap();
        let new = store.fetch("a", 7, 0, 10).await.unwrap();
        assert!(new[0].seq > 900 + SEQ_JUMP_AT_START, "seq {}", new[0].seq);
    }

    /// Positions are written behind, many to a statement, the larger of
    /// each session kept; after a flush the file holds every one.
    #[tokio::test]
    async fn positions_written_behind_are_in_the_file_after_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        let sessions = ROWS_PER_INSERT + 5;
        for s in 0..sessions {
            let session = format!("s{s}");
            store.save_position(&session, "a", 10, 1_000).await.unwrap();
            store.save_position(&session, "a", 7, 1_001).await.unwrap();
            if s % 100 == 0 {
                store.accept(vec![plain("a", 1)], 1_000).await.unwrap();
            }
        }
        store.save_position("s0", "a", 12, 1_002).await.unwrap();
        store.flush().await.unwrap();
        let in_file: Vec<(String, i64)> =
            sqlx::query_as("SELECT session, seq FROM session_positions ORDER BY session")
                .fetch_all(&store.reads)
                .await
                .unwrap();
        assert_eq!(in_file.len(), sessions);
        for (session, seq) in in_file {
            assert_eq!(seq, if session == "s0" { 12 } else { 10 }, "{session}");
        }
    }

    /// A position that no poll without a cursor read is held back until a
    /// flush; one that such a poll read is written within the linger.
    #[tokio::test]
    async fn only_positions_read_again_are_written_before_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        store.save_position("read", "a", 5, 1_000).await.unwrap();
        store.save_position("unread", "a", 6, 1_000).await.unwrap();
        assert_eq!(store.position("read").await.unwrap(), Some(5));
        let in_file = || async {
            sqlx::query_scalar::<_, String>("SELECT session FROM session_positions ORDER BY 1")
                .fetch_all(&store.reads)
                .await
                .unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while in_file().await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the position read was not written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(in_file().await, ["read"]);
        store.flush().await.unwrap();
        assert_eq!(in_file().await, ["read", "unread"]);
        assert_eq!(store.position("unread").await.unwrap(), Some(6));
    }

    #[tokio::test]
    async fn positions_are_known_in_memory_and_read_from_the_file_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        {
            let store = SqliteStore::open(&url).await.unwrap();
            store.save_position("s1", "a", 5, 1_000).await.unwrap();
            store.save_position("s1", "a", 3, 1_001).await.unwrap();
            assert_eq!(store.memory.positions.get("s1"), Known::Saved(5));
            assert_eq!(store.position("s1").await.unwrap(), Some(5));
            assert_eq!(store.memory.positions.get("s2"), Known::None);
            store.flush().await.unwrap();
        }
        let store = SqliteStore::open(&url).await.unwrap();
        assert_eq!(store.memory.positions.get("s1"), Known::AskTheFile);
        assert_eq!(store.position("s1").await.unwrap(), Some(5));
        assert_eq!(store.memory.positions.get("s2"), Known::None);
        assert_eq!(store.position("s2").await.unwrap(), None);
        store.save_position("s1", "a", 7, 2_000).await.unwrap();
        assert_eq!(store.position("s1").await.unwrap(), Some(7));
    }
}
