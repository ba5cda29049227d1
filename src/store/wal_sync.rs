//! The SQLite store's fsync, on a thread of its own (`pns-wal-sync`).
//!
//! The writer commits with `synchronous=NORMAL`: when a commit returns, its
//! frames are in the write-ahead log, in the kernel's page cache. That
//! survives the process being killed, not a power loss. The writer makes
//! each round visible at once, so a poll is answered without waiting for
//! the disk, and hands here what must wait until the round is durable: the
//! notifies' acknowledgements and every other write's answer. This thread
//! syncs the log once for all the rounds handed over since its last sync,
//! which is what `synchronous=FULL` does at each commit, and then answers
//! them. WAL frames are recovered in order, so a synced round is durable
//! with every round before it.
//!
//! A round handed over wakes this thread only when it must: when the
//! thread waits for a first round, when the messages waiting reach
//! [`SYNC_AT_ONCE`], and when only senders in loops wait (below). The
//! rounds in between join the sync without a wake;
//! at 1,000 lone notifies a second each wake had cost both threads a
//! context switch. And while rounds keep coming the thread does not wait
//! for a first round at all: after a sync that served several rounds the
//! next window starts at once, on the thread's own timer, and only a
//! window that passes without a round sends it back to waiting for one
//! (so an idle node sleeps).
//!
//! A first round that comes after a quiet spell (no sync for
//! [`QUIET_SPELL`]) is synced at once: nothing suggests company is coming,
//! and a delivery agent that sends a notify now and then would otherwise
//! wait the whole window each time. Rounds that come more often than that
//! find a recent sync and wait for the window ([`SYNC_DELAY`]), so the
//! syncs a second do not grow: notifies from senders that do not wait on
//! each other lose nothing by waiting but time, and each sync serves more
//! of them.
//!
//! Rounds whose every caller is a sender in a loop ([`crate::closed_loop`]:
//! an agent sending notifies back to back, as Dovecot does, one per
//! recipient, waiting for each answer) have no window: they are synced as
//! soon as the thread is free, and those that come during a sync share the
//! next. Such senders send nothing until their answers come, so company
//! comes only once they are answered: with a window, or a count of
//! messages to wait for, each notify waited for the others of its wave
//! (docs/benchmarks/NOTES.md, ⁴⁶).
//!
//! The answers are run by a task on the writer's thread ([`Answering`]):
//! the callers waiting for them are tasks there, and waking many tasks of
//! a runtime from another thread costs a system call each, while one task
//! that wakes them from inside costs one for the whole sync.
//!
//! After a failed sync the kernel may have dropped the pages it could not
//! write and reports the error only once; so from then on every answer is
//! an error until the node restarts.
//!
//! A sync the disk holds [`SLOW_SYNC`] or longer holds every
//! acknowledgement waiting for it as long, and nothing else on the node
//! shows why: such syncs are logged ([`SlowSyncs`]). Every sync's time goes
//! to a histogram ([`WalSync::sync_times`], `pns_wal_sync_seconds`), where
//! a disk that grows slower shows before its syncs reach the log.

use prometheus_client::metrics::histogram::Histogram;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Rounds committed but not yet synced, at most: the writer waits for a
/// sync beyond. Bounds the rows a power loss can take back after polls were
/// shown them (see `SEQ_JUMP_AT_START` in `sqlite`).
pub const ROUNDS_AWAITING_SYNC: usize = 64;

/// What a round answers once synced: `Ok`, or why the sync failed.
pub type AfterSync = Box<dyn FnOnce(&Result<(), String>) + Send>;

/// A `waiting` for [`WalSync::after_sync`] that starts the sync at once.
pub const SYNC_NOW: usize = SYNC_AT_ONCE;

/// A round's place among the [`ROUNDS_AWAITING_SYNC`].
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

struct Round {
    answer: AfterSync,
    waiters: Waiters,
    _slot: Slot,
}

/// Who waits for a round's sync.
#[derive(Clone, Copy, Debug)]
pub struct Waiters {
    /// Messages (or other writes); [`SYNC_NOW`] for a caller that must not
    /// wait.
    pub messages: usize,
    /// Whether each of their callers is a sender in a loop
    /// ([`crate::closed_loop`]).
    pub in_loops: bool,
}

impl Waiters {
    /// No one: a write nobody waits for.
    pub const NONE: Waiters = Waiters {
        messages: 0,
        in_loops: true,
    };
}

/// How long a sync may wait for more rounds to share it, from the first
/// round handed over (or, while rounds keep coming, from the last sync),
/// while a sender that is not in a loop waits for it. Polls do not wait
/// for syncs, acknowledgements do: such a notify is acknowledged up to
/// this much later, and at a steady stream of notifies each sync (about
/// 100 µs of CPU here, most of it the disk's flush, plus its wake-ups)
/// serves several: at 1,000 a second, 10 ms took 12 % off the server's CPU
/// per notify against 4 ms (`docs/BENCHMARKS.md`).
const SYNC_DELAY: Duration = Duration::from_millis(10);
/// No sync for this long makes the next first round sync at once; after a
/// sync that served several rounds, the thread waits this long on its own
/// timer for the next round before it waits for a wake.
const QUIET_SPELL: Duration = Duration::from_millis(4);
/// How long a sync waits for company: [`SYNC_DELAY`] and [`QUIET_SPELL`]
/// (tests give their own).
#[derive(Clone, Copy)]
struct Windows {
    /// While a sender not in a loop waits.
    others: Duration,
    /// No sync for this long makes the next first round sync at once.
    quiet: Duration,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            others: SYNC_DELAY,
            quiet: QUIET_SPELL,
        }
    }
}

/// Messages waiting that make a sync start at once: a burst is
/// acknowledged as fast as the disk syncs.
const SYNC_AT_ONCE: usize = 32;

/// A sync of the log that takes this long or longer is logged: a sync
/// takes well under a millisecond on an idle disk here, up to a few while
/// the checkpointer syncs the database file beside it.
const SLOW_SYNC: Duration = Duration::from_millis(100);
/// At most one warning of slow syncs in this long, so that a disk that
/// stays slow does not fill the log.
const SLOW_SYNC_WARNING_EVERY: Duration = Duration::from_secs(10);
/// The bounds of the histogram of sync times, in seconds: a sync takes
/// 0.1 to 0.5 ms on an idle disk here, up to tens of ms beside the
/// checkpointer's sync of the database file, and [`SLOW_SYNC`] is a bound.
const SYNC_TIME_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The slow syncs not yet logged, and when the last warning was.
#[derive(Default)]
struct SlowSyncs {
    warned_at: Option<Instant>,
    unlogged: u32,
    longest: Duration,
}

impl SlowSyncs {
    /// Note a sync that took `took` and ended at `now`: the slow syncs to
    /// warn of now (how many, and the longest), if it is time to.
    fn note(&mut self, took: Duration, now: Instant) -> Option<(u32, Duration)> {
        if took < SLOW_SYNC {
            return None;
        }
        self.unlogged += 1;
        self.longest = self.longest.max(took);
        let warned_lately = self
            .warned_at
            .is_some_and(|at| now.duration_since(at) < SLOW_SYNC_WARNING_EVERY);
        if warned_lately {
            return None;
        }
        self.warned_at = Some(now);
        let slow = (self.unlogged, self.longest);
        (self.unlogged, self.longest) = (0, Duration::ZERO);
        Some(slow)
    }
}

pub struct WalSync {
    handover: Arc<Handover>,
    slots: Arc<Semaphore>,
    failed: Arc<AtomicBool>,
    sync_times: Histogram,
}

impl WalSync {
    /// Start the thread that syncs the log at `wal` (the database file's
    /// name with `-wal` appended, which SQLite keeps while a connection is
    /// open), first writing the log full of zeros up to `fill_to` bytes.
    /// Call it before the log is written: SQLite writes the log from its
    /// start again after each checkpoint, so within `fill_to` it then only
    /// overwrites, and a sync writes data without the file size and block
    /// allocations that an append makes the filesystem journal too (about
    /// twice the time of a sync here). Zeros are no valid frame: recovery
    /// stops at them, as at the stale frames an earlier pass left. The
    /// thread syncs once more and ends when this is dropped.
    ///
    /// The answers wait for the returned [`Answering`] to run.
    pub fn start(wal: &Path, fill_to: u64) -> std::io::Result<(WalSync, Answering)> {
        WalSync::start_with_windows(wal, fill_to, Windows::default())
    }

    /// [`WalSync::start`], with `windows` for the constants.
    fn start_with_windows(
        wal: &Path,
        fill_to: u64,
        windows: Windows,
    ) -> std::io::Result<(WalSync, Answering)> {
        let file = File::options().read(true).write(true).open(wal)?;
        fill(&file, fill_to)?;
        let handover = Arc::new(Handover::default());
        let (synced, answering) = tokio::sync::mpsc::unbounded_channel();
        let failed = Arc::new(AtomicBool::new(false));
        let sync_times = Histogram::new(SYNC_TIME_BUCKETS);
        let thread_failed = failed.clone();
        let thread_handover = handover.clone();
        let thread_sync_times = sync_times.clone();
        std::thread::Builder::new()
            .name("pns-wal-sync".to_owned())
            .spawn(move || {
                let _stopped = Stopped(&thread_handover);
                run(
                    file,
                    &thread_handover,
                    windows,
                    &synced,
                    &thread_failed,
                    &thread_sync_times,
                );
            })?;
        let sync = WalSync {
            handover,
            slots: Arc::new(Semaphore::new(ROUNDS_AWAITING_SYNC)),
            failed,
            sync_times,
        };
        Ok((sync, Answering(answering)))
    }

    /// Wait for a round's place; take it before committing the round.
    pub async fn slot(&self) -> Slot {
        match self.slots.clone().acquire_owned().await {
            Ok(permit) => Slot { _permit: permit },
            // The semaphore is never closed.
            Err(_) => unreachable!("the sync slots are never closed"),
        }
    }

    /// Answer with `answer` once everything committed so far is synced,
    /// which `waiters` wait for.
    pub fn after_sync(&self, slot: Slot, waiters: Waiters, answer: AfterSync) {
        let round = Round {
            answer,
            waiters,
            _slot: slot,
        };
        let mut pending = match self.handover.pending.lock() {
            Ok(pending) if !pending.stopped => pending,
            _ => return (round.answer)(&Err("the log's sync thread has stopped".to_owned())),
        };
        if pending.rounds.is_empty() {
            pending.first_at = Some(Instant::now());
        }
        pending.waiting = pending.waiting.saturating_add(round.waiters.messages);
        pending.outside_loops |= round.waiters.messages > 0 && !round.waiters.in_loops;
        pending.rounds.push(round);
        let wake = match pending.thread {
            Thread::WaitsForARound => true,
            Thread::Gathers => pending.waiting >= SYNC_AT_ONCE || pending.only_loops_wait(),
            Thread::Busy => false,
        };
        if wake {
            // It looks at the rounds before it waits again.
            pending.thread = Thread::Busy;
            drop(pending);
            self.handover.wake.notify_one();
        }
    }

    /// False once a sync has failed: the store cannot promise durability
    /// until the node restarts.
    pub fn healthy(&self) -> bool {
        self.health().ok()
    }

    pub fn health(&self) -> SyncHealth {
        SyncHealth(self.failed.clone())
    }

    /// How long each sync of the log took, in seconds: the wait it adds to
    /// every acknowledgement it serves.
    pub fn sync_times(&self) -> Histogram {
        self.sync_times.clone()
    }
}

impl Drop for WalSync {
    /// The thread syncs what was handed over and ends.
    fn drop(&mut self) {
        if let Ok(mut pending) = self.handover.pending.lock() {
            pending.closed = true;
        }
        self.handover.wake.notify_one();
    }
}

/// The rounds handed over to the sync thread, and its wake.
#[derive(Default)]
struct Handover {
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    rounds: Vec<Round>,
    /// The messages the rounds hold.
    waiting: usize,
    /// Whether a caller of the rounds is not a sender in a loop.
    outside_loops: bool,
    /// When the first of the rounds was handed over.
    first_at: Option<Instant>,
    /// What the sync thread is doing, so a round wakes it only when it must.
    thread: Thread,
    /// The store is gone: sync what is left and end.
    closed: bool,
    /// The thread has ended.
    stopped: bool,
}

impl Pending {
    /// Whether someone waits for the rounds, and each a sender in a loop.
    fn only_loops_wait(&self) -> bool {
        !self.outside_loops && self.waiting > 0
    }

    /// How long the sync may wait for company: not at all while only
    /// senders in loops wait for it; `windows.others` while a sender not in
    /// a loop does; else (no one waits yet) `windows.quiet`.
    fn window(&self, windows: Windows) -> Option<Duration> {
        if self.only_loops_wait() {
            None
        } else if self.outside_loops {
            Some(windows.others)
        } else {
            Some(windows.quiet)
        }
    }
}

#[derive(Default, Clone, Copy)]
enum Thread {
    /// Syncing, or woken: it looks at the rounds before it waits again.
    #[default]
    Busy,
    /// Waiting for a first round.
    WaitsForARound,
    /// Waiting for the window to pass, [`SYNC_AT_ONCE`] messages, or a
    /// sender in a loop.
    Gathers,
}

/// Marks the thread ended, however it ends.
struct Stopped<'a>(&'a Handover);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        let mut pending = match self.0.pending.lock() {
            Ok(pending) => pending,
            Err(poisoned) => poisoned.into_inner(),
        };
        pending.stopped = true;
        let rounds = std::mem::take(&mut pending.rounds);
        drop(pending);
        answer(rounds, &Err("the log's sync thread has stopped".to_owned()));
    }
}

/// Whether the log still syncs, for readiness.
#[derive(Clone)]
pub struct SyncHealth(Arc<AtomicBool>);

impl SyncHealth {
    pub fn ok(&self) -> bool {
        !self.0.load(Ordering::Relaxed)
    }
}

/// The rounds of one sync, and its outcome.
type Synced = (Vec<Round>, Result<(), String>);

/// Runs the answers of each sync, in order; spawn it on the thread whose
/// tasks wait for them. It ends once the sync thread has.
pub struct Answering(tokio::sync::mpsc::UnboundedReceiver<Synced>);

impl Answering {
    pub async fn run(mut self) {
        while let Some((rounds, outcome)) = self.0.recv().await {
            answer(rounds, &outcome);
        }
    }
}

fn answer(rounds: Vec<Round>, outcome: &Result<(), String>) {
    for round in rounds {
        (round.answer)(outcome);
    }
}

fn fill(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut at = file.metadata()?.len();
    if at >= len {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_all()
}

fn run(
    wal: File,
    handover: &Handover,
    windows: Windows,
    synced: &tokio::sync::mpsc::UnboundedSender<Synced>,
    failed: &AtomicBool,
    sync_times: &Histogram,
) {
    let mut failure: Option<String> = None;
    // Where the next sync's window starts without waiting for a round:
    // right after a sync that served several rounds.
    let mut cadence = None;
    let mut last_synced: Option<Instant> = None;
    let mut slow_syncs = SlowSyncs::default();
    loop {
        let Some(rounds) = gather(handover, windows, cadence, last_synced) else {
            break;
        };
        if rounds.is_empty() {
            // A window on the cadence passed without a round: the stream
            // has stopped, so wait for the next round (a wake) again.
            cadence = None;
            continue;
        }
        let several = rounds.len() > 1;
        let started = Instant::now();
        let outcome = match &failure {
            Some(why) => Err(why.clone()),
            None => wal.sync_data().map_err(|e| {
                let why = format!("cannot sync the write-ahead log: {e}");
                tracing::error!(error = %e, "cannot sync the write-ahead log; the store refuses writes until the node restarts");
                failed.store(true, Ordering::Relaxed);
                failure = Some(why.clone());
                why
            }),
        };
        let now = Instant::now();
        let took = now - started;
        if failure.is_none() {
            sync_times.observe(took.as_secs_f64());
            if let Some((slow, longest)) = slow_syncs.note(took, now) {
                tracing::warn!(
                    took_ms = took.as_millis() as u64,
                    slow_syncs = slow,
                    longest_ms = longest.as_millis() as u64,
                    "a sync of the write-ahead log was slow, and so were the acknowledgements waiting for it (slow_syncs: since the last such warning)"
                );
            }
        }
        if let Err(tokio::sync::mpsc::error::SendError((rounds, outcome))) =
            synced.send((rounds, outcome))
        {
            // No task answers (its runtime is gone): answer here.
            answer(rounds, &outcome);
        }
        last_synced = Some(now);
        cadence = several.then_some(now);
    }
    if failure.is_none() {
        let _ = wal.sync_data();
    }
}

/// The rounds of the next sync: every round handed over until the window
/// (of `windows`, by who waits; none while only senders in loops do) has
/// passed since it started, or until [`SYNC_AT_ONCE`] messages wait. The
/// window starts at `cadence` when given (a round wakes the thread in it
/// only as [`WalSync::after_sync`] says; empty if none came), else at the
/// first round, which the thread waits for; and a first round that came a
/// quiet spell or more after the last sync (`last_synced`) has no window.
/// `None` once the store is gone and every round is synced.
fn gather(
    handover: &Handover,
    windows: Windows,
    cadence: Option<Instant>,
    last_synced: Option<Instant>,
) -> Option<Vec<Round>> {
    let mut pending = handover.pending.lock().ok()?;
    let since = match cadence {
        Some(since) => since,
        None => {
            while pending.rounds.is_empty() {
                if pending.closed {
                    return None;
                }
                pending.thread = Thread::WaitsForARound;
                pending = handover.wake.wait(pending).ok()?;
            }
            let first_at = pending.first_at.unwrap_or_else(Instant::now);
            let quiet = last_synced
                .is_none_or(|at| first_at.saturating_duration_since(at) >= windows.quiet);
            if quiet {
                return Some(take_rounds(&mut pending));
            }
            first_at
        }
    };
    while pending.waiting < SYNC_AT_ONCE && !pending.closed {
        let Some(left) = pending
            .window(windows)
            .and_then(|window| window.checked_sub(since.elapsed()))
        else {
            break;
        };
        pending.thread = Thread::Gathers;
        pending = handover.wake.wait_timeout(pending, left).ok()?.0;
    }
    if pending.closed && pending.rounds.is_empty() {
        return None;
    }
    Some(take_rounds(&mut pending))
}

/// The rounds waiting, for the sync the thread starts now.
fn take_rounds(pending: &mut Pending) -> Vec<Round> {
    pending.thread = Thread::Busy;
    pending.waiting = 0;
    pending.outside_loops = false;
    pending.first_at = None;
    std::mem::take(&mut pending.rounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One message, from a sender not in a loop.
    const ONE: Waiters = Waiters {
        messages: 1,
        in_loops: false,
    };
    const NOW: Waiters = Waiters {
        messages: SYNC_NOW,
        in_loops: false,
    };

    /// An operator hears of a disk that holds syncs up, once in a while
    /// however long it stays slow, and of every slow sync in between.
    #[test]
    fn slow_syncs_are_logged_at_most_once_in_a_while_with_those_in_between() {
        let mut slow_syncs = SlowSyncs::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let ms = Duration::from_millis;
        assert_eq!(slow_syncs.note(ms(2), at(0)), None);
        assert_eq!(slow_syncs.note(ms(99), at(100)), None);
        assert_eq!(slow_syncs.note(ms(250), at(1_000)), Some((1, ms(250))));
        assert_eq!(slow_syncs.note(ms(400), at(2_000)), None);
        assert_eq!(slow_syncs.note(ms(120), at(9_000)), None);
        assert_eq!(slow_syncs.note(ms(1), at(11_000)), None);
        assert_eq!(slow_syncs.note(ms(100), at(11_500)), Some((3, ms(400))));
        assert_eq!(slow_syncs.note(ms(300), at(30_000)), Some((1, ms(300))));
    }

    fn started() -> (tempfile::TempDir, WalSync) {
        started_with_windows(Windows::default())
    }

    fn started_with_windows(windows: Windows) -> (tempfile::TempDir, WalSync) {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pns.db-wal");
        std::fs::write(&wal, b"").unwrap();
        let (sync, answering) = WalSync::start_with_windows(&wal, 0, windows).unwrap();
        tokio::spawn(answering.run());
        (dir, sync)
    }

    /// The bound `SEQ_JUMP_AT_START` relies on: with every slot taken by a
    /// round not yet synced, the writer cannot start another round.
    #[tokio::test]
    async fn no_more_than_the_bound_of_rounds_await_a_sync() {
        let (_dir, sync) = started();
        let mut held = Vec::new();
        for _ in 0..ROUNDS_AWAITING_SYNC {
            held.push(sync.slot().await);
        }
        let waiting = tokio::time::timeout(Duration::from_millis(200), sync.slot()).await;
        assert!(waiting.is_err(), "a round beyond the bound got a slot");

        let (answered, answer) = tokio::sync::oneshot::channel();
        let first = held.remove(0);
        sync.after_sync(
            first,
            ONE,
            Box::new(move |synced| drop(answered.send(synced.clone()))),
        );
        assert_eq!(answer.await.unwrap(), Ok(()));
        // The synced round gave its slot back.
        tokio::time::timeout(Duration::from_secs(10), sync.slot())
            .await
            .expect("a slot once a round was synced");
    }

    /// A sync that fails (here: a FIFO, which cannot be synced) fails every
    /// round after it too, and marks the store unhealthy.
    #[tokio::test]
    async fn after_a_failed_sync_every_round_fails() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pns.db-wal");
        let path = std::ffi::CString::new(wal.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path of our own.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let (sync, answering) = WalSync::start(&wal, 0).unwrap();
        tokio::spawn(answering.run());
        assert!(sync.healthy());
        for _ in 0..2 {
            let (answered, answer) = tokio::sync::oneshot::channel();
            sync.after_sync(
                sync.slot().await,
                NOW,
                Box::new(move |synced| drop(answered.send(synced.clone()))),
            );
            let why = answer.await.unwrap().unwrap_err();
            assert!(why.contains("cannot sync the write-ahead log"), "{why}");
        }
        assert!(!sync.healthy());
        assert!(!sync.health().ok());
    }

    /// While rounds keep coming the thread gathers on its own timer; once
    /// they stop it goes back to waiting for a wake, so an idle node does
    /// not wake every few milliseconds.
    #[tokio::test]
    async fn after_a_stream_of_rounds_the_thread_waits_for_the_next() {
        let (_dir, sync) = started();
        let mut answers = Vec::new();
        for _ in 0..20 {
            let (answered, answer) = tokio::sync::oneshot::channel();
            sync.after_sync(
                sync.slot().await,
                ONE,
                Box::new(move |synced| drop(answered.send(synced.clone()))),
            );
            answers.push(answer);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for answer in answers {
            assert_eq!(answer.await.unwrap(), Ok(()));
        }
        let waits = || {
            matches!(
                sync.handover.pending.lock().unwrap().thread,
                Thread::WaitsForARound
            )
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !waits() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            waits(),
            "the sync thread still gathers with no round coming"
        );
        // And a round after the pause is still synced and answered.
        let (answered, answer) = tokio::sync::oneshot::channel();
        sync.after_sync(
            sync.slot().await,
            ONE,
            Box::new(move |synced| drop(answered.send(synced.clone()))),
        );
        assert_eq!(answer.await.unwrap(), Ok(()));
    }

    /// A lone round after a quiet spell is synced at once; a round that
    /// follows a sync closely waits for the window (here an hour, so that
    /// only the quiet rule can answer the first, and only the store's end
    /// the second).
    #[tokio::test]
    async fn a_round_after_a_quiet_spell_does_not_wait_for_the_window() {
        let hour = Duration::from_secs(3600);
        let (_dir, sync) = started_with_windows(Windows {
            others: hour,
            quiet: hour,
        });
        let hand_over = |slot| {
            let (answered, answer) = tokio::sync::oneshot::channel();
            sync.after_sync(
                slot,
                ONE,
                Box::new(move |synced| drop(answered.send(synced.clone()))),
            );
            answer
        };

        let lone = hand_over(sync.slot().await);
        let synced = tokio::time::timeout(Duration::from_secs(60), lone).await;
        assert_eq!(synced.expect("the lone round waited").unwrap(), Ok(()));

        let mut close_behind = hand_over(sync.slot().await);
        let early = tokio::time::timeout(Duration::from_millis(200), &mut close_behind).await;
        assert!(
            early.is_err(),
            "a round right after a sync skipped the window"
        );
        // The store's end syncs what is left.
        drop(sync);
        assert_eq!(close_behind.await.unwrap(), Ok(()));
    }

    /// A round whose senders are in loops is synced as soon as the thread
    /// is free, whether the thread waits for a round or gathers others on
    /// its own timer after a sync of several rounds; once a sender not in a
    /// loop waits beside it, it waits the window (here an hour, which only
    /// the store's end cuts short).
    #[tokio::test]
    async fn senders_in_loops_do_not_wait_for_company() {
        let hour = Duration::from_secs(3600);
        let (_dir, sync) = started_with_windows(Windows {
            others: hour,
            quiet: hour,
        });
        let hand_over = |slot, waiters| {
            let (answered, answer) = tokio::sync::oneshot::channel();
            sync.after_sync(
                slot,
                waiters,
                Box::new(move |synced| drop(answered.send(synced.clone()))),
            );
            answer
        };
        let in_a_loop = Waiters {
            messages: 1,
            in_loops: true,
        };
        let within = |answer| tokio::time::timeout(Duration::from_secs(60), answer);

        let lone = hand_over(sync.slot().await, ONE);
        assert_eq!(lone.await.unwrap(), Ok(()), "quiet: synced at once");

        // The thread waits for a round; the last sync was no quiet spell ago.
        let looping = hand_over(sync.slot().await, in_a_loop);
        let synced = within(looping).await.expect("a sender in a loop waited");
        assert_eq!(synced.unwrap(), Ok(()));

        // A sync of several rounds (the second starts it at once) puts the
        // thread on its own timer, gathering for the next.
        let first = hand_over(sync.slot().await, ONE);
        let second = hand_over(sync.slot().await, NOW);
        assert_eq!(first.await.unwrap(), Ok(()));
        assert_eq!(second.await.unwrap(), Ok(()));
        let looping = hand_over(sync.slot().await, in_a_loop);
        let synced = within(looping).await.expect("a sender in a loop waited");
        assert_eq!(synced.unwrap(), Ok(()));

        let looping = hand_over(sync.slot().await, in_a_loop);
        let not_looping = hand_over(sync.slot().await, ONE);
        // The first of these may be synced before the second comes; a
        // round after them waits with the sender not in a loop.
        let mut behind = hand_over(sync.slot().await, in_a_loop);
        let early = tokio::time::timeout(Duration::from_millis(200), &mut behind).await;
        assert!(early.is_err(), "a sender not in a loop waits: so do all");
        drop(sync);
        assert_eq!(looping.await.unwrap(), Ok(()));
        assert_eq!(not_looping.await.unwrap(), Ok(()));
        assert_eq!(behind.await.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn every_round_handed_over_is_answered_in_order() {
        let (_dir, sync) = started();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (all, done) = tokio::sync::oneshot::channel();
        let mut all = Some(all);
        for i in 0..10 {
            let slot = sync.slot().await;
            let order = order.clone();
            let last = if i == 9 { all.take() } else { None };
            sync.after_sync(
                slot,
                ONE,
                Box::new(move |synced| {
                    assert_eq!(synced, &Ok(()));
                    order.lock().unwrap().push(i);
                    if let Some(last) = last {
                        let _ = last.send(());
                    }
                }),
            );
        }
        done.await.unwrap();
        assert_eq!(*order.lock().unwrap(), (0..10).collect::<Vec<_>>());
        assert!(sync.healthy());
    }
}
