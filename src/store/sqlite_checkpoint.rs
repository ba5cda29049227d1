//! The SQLite store's checkpointer: copies the write-ahead log into the
//! database file beside the writer, on a connection of its own, and has the
//! log start over without the writer checkpointing it.
//!
//! SQLite starts the log over at a commit that finds every frame of it
//! copied into the database file; until then it appends. A passive
//! checkpoint never holds a commit up, but while commits keep coming (at
//! 1,000 notifies a second, one a millisecond) a pass never ends with every
//! frame copied: the commits made during it add frames. The log then grew
//! to the writer's own checkpoint (`CHECKPOINT_PAGES` in `sqlite`), which
//! copies the rest and syncs both files on the writer's thread, the ingest
//! thread: every notify and every answer made at a commit waited behind it
//! (5–15 ms every few seconds, far more when the disk stalls; the longest
//! deliveries at 1,000 notifies a second).
//!
//! So once a pass finds the log [`RESTART_AT`] frames long, the checkpointer
//! makes another pass at once, for the frames committed during the first
//! (at saturation, thousands), then asks the writer for a pause between two
//! rounds ([`Pauses::ask`]), copies the few frames left and syncs, and lets
//! the writer go on: its next commit starts the log over. The pause is
//! about two syncs with next to nothing to write; the writer waits for it
//! at most [`PAUSE_AT_MOST`], so a sync held up by the disk costs that
//! restart, tried again at the next pass, not the deliveries. The writer's
//! own checkpoint stays, for a log that cannot start over (a read holding
//! a snapshot of it every time).

use sqlx::SqliteConnection;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};

/// How often the checkpointer copies the log into the database file.
/// Often in tests, whose commits to have the log start over may all be
/// over within 250 ms on a fast disk.
pub const CHECKPOINT_EVERY: Duration = if cfg!(test) {
    Duration::from_millis(10)
} else {
    Duration::from_millis(250)
};
/// Frames in the log that make the checkpointer have it start over: at
/// 1,000 lone notifies a second (about two frames each) a pause every two
/// seconds, of a millisecond or two. Small in tests, whose writes must
/// stay far below the writer's own checkpoint.
pub const RESTART_AT: i64 = if cfg!(test) { 64 } else { 4_000 };
/// The longest the writer waits for the checkpointer in a pause: at
/// 1,000 notifies a second, a notify or two wait up to this every couple
/// of seconds. Long in tests, whose checks of the restart must not depend
/// on the speed of the disk.
pub const PAUSE_AT_MOST: Duration = if cfg!(test) {
    Duration::from_millis(500)
} else {
    Duration::from_millis(2)
};

/// The checkpointer's side of the pauses: it asks, the writer grants.
pub struct Pauses(mpsc::Sender<Pause>);

/// A pause the checkpointer asked for; the writer grants it with
/// [`Pause::hold`].
pub struct Pause {
    /// Told once the writer is between rounds.
    paused: oneshot::Sender<()>,
    /// Ends (its sender dropped) once the checkpointer's pass is over.
    over: oneshot::Receiver<()>,
}

/// The writer's side: where the pauses asked for wait.
pub type PauseAsks = mpsc::Receiver<Pause>;

pub fn pauses() -> (Pauses, PauseAsks) {
    let (ask, asks) = mpsc::channel(1);
    (Pauses(ask), asks)
}

impl Pauses {
    /// Wait until the writer is between rounds and holds still; it goes on
    /// once the returned sender is dropped or [`PAUSE_AT_MOST`] passed.
    /// `None` if the writer is gone.
    async fn ask(&self) -> Option<oneshot::Sender<()>> {
        let (paused, granted) = oneshot::channel();
        let (pass_over, over) = oneshot::channel();
        self.0.send(Pause { paused, over }).await.ok()?;
        granted.await.ok()?;
        Some(pass_over)
    }
}

impl Pause {
    /// Hold the writer until the checkpointer's pass is over, or at most
    /// [`PAUSE_AT_MOST`].
    pub async fn hold(self) {
        if self.paused.send(()).is_ok() {
            let _ = tokio::time::timeout(PAUSE_AT_MOST, self.over).await;
        }
    }
}

/// Copies the log into the database file [`CHECKPOINT_EVERY`] after the
/// writer `wrote`, and has it start over once it is [`RESTART_AT`] frames
/// long. Nothing runs while nothing is written. Ends once the writer has
/// (its [`PauseAsks`] dropped).
pub async fn run(mut conn: SqliteConnection, wrote: Arc<Notify>, pauses: Pauses) {
    loop {
        wrote.notified().await;
        tokio::time::sleep(CHECKPOINT_EVERY).await;
        if pauses.0.is_closed() {
            return;
        }
        let Some(log) = checkpoint(&mut conn).await else {
            continue;
        };
        if log >= RESTART_AT && checkpoint(&mut conn).await.is_some() {
            let Some(_pause) = pauses.ask().await else {
                return;
            };
            checkpoint(&mut conn).await;
        }
    }
}

/// A passive checkpoint; the frames in the log, when it worked.
async fn checkpoint(conn: &mut SqliteConnection) -> Option<i64> {
    match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(conn)
        .await
    {
        Ok((_busy, log, _copied)) => Some(log),
        Err(e) => {
            tracing::warn!(error = %e, "cannot checkpoint the write-ahead log; the writer will");
            None
        }
    }
}
