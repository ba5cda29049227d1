//! The hub: where held polls wait, and what wakes them.
//!
//! A held poll *parks* in an in-memory registry keyed by user and waits on a
//! oneshot channel; the accept path *wakes* a user after the store commit. A
//! parked poll costs no CPU while it waits, and the registry is the only place
//! that knows who is waiting, so nothing ever scans the store for news.
//!
//! A poll parks *before* it reads the store, so a message committed between the
//! read and the wait still wakes it. Dropping the [`Parked`] handle (the poll
//! answered, or its client vanished and the request future was dropped)
//! removes its entry, so the registry never outgrows the polls really held.
//!
//! The registry is split into shards by user, so that wakes for different
//! users rarely contend on one lock.
//!
//! Wakes come from the ingest thread, and the polls run on the main
//! runtime. Waking a task of a runtime from another thread costs a system
//! call each time, so [`Hub::wake`] takes the user's entry at once but
//! hands the wakes to one task on the polls' runtime ([`Hub::relay_wakes`]),
//! which is woken once for all the wakes that came meanwhile.
//!
//! A store that commits in this process (SQLite) wakes the hub itself,
//! right after each commit ([`Hub::wake_after_commit`]). Then a poll parked
//! with an [`AnswerAtCommit`] is answered there, on the committing thread,
//! from the store's memory, without waking its task.
//!
//! Acknowledging a notify does not wait for its delivery, so a burst can
//! be accepted faster than its polls are answered, and its deliveries
//! would then wait behind the rest of the burst (tens to hundreds of ms).
//! The hub counts the answers it owes: polls woken with news whose task
//! has not run yet. The SQLite writer waits before its next round while
//! more than [`MAX_ANSWERS_OWED`] are owed ([`Hub::answers_caught_up`]),
//! so the notifies of a burst queue at the door instead, where the next
//! round takes them together.
//!
//! A user holds at most `user_cap` polls at once: parking one more releases
//! that user's oldest with [`Wake::Capped`], so a runaway client (or many tabs
//! without the shared poll) cannot pin sockets without end.
//!
//! The hub also remembers, per user, what the last poll's store read proved
//! ("nothing visible after seq N since M"), so that the poll that follows an
//! answer at once, with that answer's cursor, can wait without reading the
//! store again. The proof holds only until the user's next wake: every commit
//! that makes a message visible, here or on another node, is followed by
//! [`Hub::wake`] (or [`Hub::wake_all`] when wakes may have been missed), which
//! drops the user's entry and with it the proof; and each entry carries a
//! generation that is never reused, so a read that raced with a wake never
//! records anything.

use crate::store::StoredMessage;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

const SHARDS: usize = 64;
/// Users a commit wakes at most for all their polls to be answered on the
/// committing thread. Past that, the polls' runtime is handed most of them
/// first, so that its threads start at once, and the committing thread
/// answers an even share ([`Hub::wake_after_commit`]).
pub const MAX_USERS_ANSWERED_AT_COMMIT: usize = 16;
/// Answers owed (polls woken with news that have not run yet) beyond
/// which the SQLite writer waits before its next round: a fraction of a
/// millisecond of the polls' thread. With 16, 32, 64 and 256 the single
/// notifies of the benchmark went equally fast, and their delivery p99
/// took about 5.3, 5.6, 7.4 and 15 ms (docs/benchmarks/NOTES.md, ²⁴).
pub const MAX_ANSWERS_OWED: usize = 16;
/// The longest the writer waits for the answers owed, so that notifies are
/// still stored and acknowledged if the polls' runtime stalls. Unit tests
/// wait longer, so that a slow machine never reaches it by chance.
const ANSWERS_WAIT_CAP: Duration = if cfg!(test) {
    Duration::from_secs(60)
} else {
    Duration::from_millis(250)
};
/// Users per shard beyond which an entry that only holds a read proof is
/// not kept (it would linger until the user's next wake).
const PROOFS_PER_SHARD: usize = 4096;

/// Why a parked poll was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The user may have news: read the store again.
    News,
    /// A newer poll of the same session took over; answer empty at once.
    Superseded,
    /// The session was revoked; answer 401.
    Revoked,
    /// The node is shutting down; answer empty at once.
    ShuttingDown,
    /// The user holds too many polls and this is the oldest; answer empty.
    Capped,
}

/// What a parked poll is sent: why it is woken, and for news, its share
/// of the answers owed, paid when the poll runs or is dropped.
pub struct Woken {
    why: Wake,
    _owed: Option<Owed>,
}

impl From<Wake> for Woken {
    fn from(why: Wake) -> Self {
        Woken { why, _owed: None }
    }
}

/// Where a parked poll's [`Woken`] is sent.
pub type WakeSender = oneshot::Sender<Woken>;

/// One answer owed; dropping it pays it.
struct Owed(Arc<Backlog>);

impl Drop for Owed {
    fn drop(&mut self) {
        let before = self.0.owed.fetch_sub(1, Ordering::AcqRel);
        if before == MAX_ANSWERS_OWED + 1 {
            self.0.caught_up.notify_one();
        }
    }
}

/// The answers owed, and who waits for them.
#[derive(Default)]
struct Backlog {
    owed: AtomicUsize,
    /// Notified when the answers owed fall to [`MAX_ANSWERS_OWED`].
    caught_up: tokio::sync::Notify,
    /// Rounds the writer held back for them, since start.
    rounds_held: AtomicU64,
}

/// Reads, from a store's memory, the messages of a user (the first
/// argument) after a seq, visible since a time in ms, at most so many:
/// what a poll's read of the store would find; `None` when memory cannot
/// tell.
pub type ReadNews<'a> = &'a dyn Fn(&str, i64, i64, u32) -> Option<Vec<StoredMessage>>;

/// A parked poll that can be answered where its news is committed.
pub trait AnswerAtCommit: Send {
    /// Answer the poll of `session` of `user` with what `read` finds for it;
    /// `wake` back if this poll cannot be answered so (it is then woken as
    /// any other).
    fn answer(
        self: Box<Self>,
        user: &str,
        session: &str,
        read: ReadNews<'_>,
        wake: WakeSender,
    ) -> Result<(), WakeSender>;
}

struct Waiter {
    id: u64,
    session: Arc<str>,
    at_commit: Option<Box<dyn AnswerAtCommit>>,
    /// Wall-clock ms when parked, to compare with polls begun on other nodes.
    parked_ms: i64,
    wake: WakeSender,
}

/// What the hub knows of one user.
struct UserState {
    waiters: Vec<Waiter>,
    /// Unique to this entry: a wake removes the entry, so a later entry of
    /// the same user never has the same generation.
    generation: u64,
    /// No visible message after `after` with `visible_ms >= since_ms`
    /// exists, as of this entry's generation.
    proof: Option<Proof>,
}

#[derive(Clone, Copy)]
struct Proof {
    after: i64,
    since_ms: i64,
}

/// Worker threads of the runtime the hub is built on, the polls' runtime
/// ([`crate::app`] builds it there); one outside any runtime.
fn polls_runtime_threads() -> usize {
    tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers())
}

#[derive(Default)]
struct Shard {
    users: foldhash::HashMap<Arc<str>, UserState>,
}

pub struct Hub {
    shards: Box<[Mutex<Shard>]>,
    relay: Relay,
    backlog: Arc<Backlog>,
    hasher: foldhash::fast::RandomState,
    /// Parked polls' ids and user entries' generations, from one counter.
    next_id: AtomicU64,
    held: AtomicUsize,
    closed: AtomicBool,
    user_cap: usize,
    /// Threads that answer polls: the polls' runtime's, and the committing
    /// thread. A commit that brings news to many users answers one share
    /// of them itself.
    answering_threads: usize,
}

/// Wakes on their way to the polls' runtime.
#[derive(Default)]
struct Relay {
    /// Whether a [`Hub::relay_wakes`] task runs; without one, wakes are
    /// sent where they happen.
    running: AtomicBool,
    waiting: Mutex<Vec<(WakeSender, Woken)>>,
    /// Notified when `waiting` stops being empty.
    filled: tokio::sync::Notify,
}

/// A poll's place in the hub; await [`Parked::woken`], drop to leave.
pub struct Parked {
    hub: Arc<Hub>,
    user: Arc<str>,
    id: u64,
    /// The generation of the user's entry when this poll parked.
    generation: u64,
    /// The store holds nothing new for this poll: no need to read it.
    nothing_new: bool,
    rx: oneshot::Receiver<Woken>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            relay: Relay::default(),
            backlog: Arc::default(),
            hasher: Default::default(),
            next_id: AtomicU64::new(1),
            held: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            user_cap: usize::MAX,
            answering_threads: polls_runtime_threads() + 1,
        }
    }
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Hub::default())
    }

    /// A hub that lets each user hold at most `cap` polls.
    pub fn with_user_cap(cap: usize) -> Arc<Self> {
        Arc::new(Hub {
            user_cap: cap.max(1),
            ..Hub::default()
        })
    }

    fn shard(&self, user: &str) -> MutexGuard<'_, Shard> {
        let idx = (self.hasher.hash_one(user) as usize) % self.shards.len();
        // A panic while holding a shard lock leaves plain data behind; keep going.
        self.shards[idx].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Park a poll of `session` for `user` that wants the messages after seq
    /// `after` visible since `since_ms`, to be answered by `at_commit` if a
    /// commit of this node's store brings its news. An older poll of the
    /// same session is released with [`Wake::Superseded`].
    pub fn park(
        self: &Arc<Self>,
        user: &str,
        session: &str,
        after: i64,
        since_ms: i64,
        at_commit: Option<Box<dyn AnswerAtCommit>>,
    ) -> Parked {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let user: Arc<str> = Arc::from(user);
        if self.closed.load(Ordering::Acquire) {
            let _ = tx.send(Wake::ShuttingDown.into());
            return Parked {
                hub: self.clone(),
                user,
                id,
                generation: 0,
                nothing_new: false,
                rx,
            };
        }
        let mut shard = self.shard(&user);
        let state = shard
            .users
            .entry(user.clone())
            .or_insert_with(|| UserState {
                // Most users hold one poll: room for more only when needed.
                waiters: Vec::with_capacity(1),
                generation: self.next_id.fetch_add(1, Ordering::Relaxed),
                proof: None,
            });
        let generation = state.generation;
        let nothing_new = state
            .proof
            .is_some_and(|p| after >= p.after && since_ms >= p.since_ms);
        let waiters = &mut state.waiters;
        let mut released = 0;
        waiters.retain_mut(|w| {
            if &*w.session == session {
                released += 1;
                // Replace the sender so the old one can be consumed.
                let (dummy, _) = oneshot::channel();
                let old = std::mem::replace(&mut w.wake, dummy);
                let _ = old.send(Wake::Superseded.into());
                false
            } else {
                true
            }
        });
        if waiters.len() >= self.user_cap {
            // Ids grow with time, so the smallest is the oldest.
            if let Some(oldest) = waiters
                .iter()
                .enumerate()
                .min_by_key(|(_, w)| w.id)
                .map(|(i, _)| i)
            {
                let w = waiters.swap_remove(oldest);
                let _ = w.wake.send(Wake::Capped.into());
                released += 1;
            }
        }
        waiters.push(Waiter {
            id,
            session: Arc::from(session),
            at_commit,
            parked_ms: crate::clock::now_ms(),
            wake: tx,
        });
        drop(shard);
        self.held.fetch_add(1, Ordering::Relaxed);
        self.held.fetch_sub(released, Ordering::Relaxed);
        Parked {
            hub: self.clone(),
            user,
            id,
            generation,
            nothing_new,
            rx,
        }
    }

    /// Record what `parked`'s store read proved: nothing visible after seq
    /// `after` since `since_ms`. Kept only if the user was not woken since
    /// `parked` parked (the read may have missed what the wake announced).
    pub fn note_read(&self, parked: &Parked, after: i64, since_ms: i64) {
        let mut shard = self.shard(&parked.user);
        if let Some(state) = shard.users.get_mut(&parked.user) {
            if state.generation == parked.generation {
                state.proof = Some(Proof { after, since_ms });
            }
        }
    }

    /// Wake every poll parked for `user`, and forget what the hub knew of
    /// the user's messages.
    pub fn wake(&self, user: &str) {
        if let Some(waiters) = self.take_waiters(user) {
            self.send_news(waiters.into_iter().map(|w| w.wake));
        }
    }

    /// [`Hub::wake`] `users`, whom a commit just brought news, once `read`
    /// finds the commit's messages. A poll parked with an [`AnswerAtCommit`]
    /// is answered here, with what `read` finds for it. When the commit
    /// brought news to more than [`MAX_USERS_ANSWERED_AT_COMMIT`] users,
    /// the polls' runtime is sent all but an even share of them first, and
    /// this thread answers that share meanwhile. Otherwise it would only
    /// wait for those answers ([`Hub::answers_caught_up`]), and its next
    /// insert then ran alone on one core while the other had nothing to do
    /// (batches of 500 with two runtime threads: 28,157 → 32,091 messages
    /// a second at the median of six pairs, docs/benchmarks/NOTES.md, ⁴²).
    pub fn wake_after_commit(&self, users: &[String], read: ReadNews<'_>) {
        let here = if users.len() <= MAX_USERS_ANSWERED_AT_COMMIT {
            users.len()
        } else {
            users.len() / self.answering_threads
        };
        let (here, elsewhere) = users.split_at(here);
        if !elsewhere.is_empty() {
            // Taken before `send_news` locks the relay's queue.
            let waiters: Vec<Waiter> = elsewhere
                .iter()
                .filter_map(|user| self.take_waiters(user))
                .flatten()
                .collect();
            self.send_news(waiters.into_iter().map(|w| w.wake));
        }
        let mut news = Vec::new();
        for user in here {
            for w in self.take_waiters(user).unwrap_or_default() {
                let Some(answer) = w.at_commit else {
                    news.push(w.wake);
                    continue;
                };
                if let Err(wake) = answer.answer(user, &w.session, read, w.wake) {
                    news.push(wake);
                }
            }
        }
        self.send_news(news);
    }

    /// Takes `user`'s entry and the polls parked in it, for their wakes.
    fn take_waiters(&self, user: &str) -> Option<Vec<Waiter>> {
        let state = self.shard(user).users.remove(user)?;
        self.held.fetch_sub(state.waiters.len(), Ordering::Relaxed);
        Some(state.waiters)
    }

    /// [`Wake::News`], owing its answer until the poll runs.
    fn news(&self) -> Woken {
        self.backlog.owed.fetch_add(1, Ordering::AcqRel);
        Woken {
            why: Wake::News,
            _owed: Some(Owed(self.backlog.clone())),
        }
    }

    /// Send [`Wake::News`] through the relay when it runs.
    fn send_news(&self, wakes: impl IntoIterator<Item = WakeSender>) {
        if !self.relay.running.load(Ordering::Acquire) {
            for wake in wakes {
                let _ = wake.send(self.news());
            }
            return;
        }
        let mut waiting = self.relay.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let was_empty = waiting.is_empty();
        waiting.extend(wakes.into_iter().map(|wake| (wake, self.news())));
        let filled = was_empty && !waiting.is_empty();
        drop(waiting);
        // The relay takes all there is when it runs: one notification
        // per filling covers every wake added before it runs.
        if filled {
            self.relay.filled.notify_one();
        }
    }

    /// Send the wakes that [`Hub::wake`] hands over; run it on the polls'
    /// runtime for as long as the hub serves. Once it is dropped, wakes
    /// are sent where they happen again.
    pub async fn relay_wakes(self: Arc<Self>) {
        /// Sends what is waiting, now and when dropped.
        struct Relaying(Arc<Hub>);
        impl Relaying {
            fn send_waiting(&self) {
                let relay = &self.0.relay;
                let taken =
                    std::mem::take(&mut *relay.waiting.lock().unwrap_or_else(|p| p.into_inner()));
                for (wake, news) in taken {
                    let _ = wake.send(news);
                }
            }
        }
        impl Drop for Relaying {
            fn drop(&mut self) {
                self.0.relay.running.store(false, Ordering::Release);
                self.send_waiting();
            }
        }
        if self.relay.running.swap(true, Ordering::AcqRel) {
            return; // one relay is enough
        }
        let relaying = Relaying(self);
        loop {
            relaying.0.relay.filled.notified().await;
            relaying.send_waiting();
        }
    }

    /// Wake every poll held on this node, to re-check the store: for when
    /// wakeups may have been missed.
    /// Every read proof is dropped with them.
    pub fn wake_all(&self) {
        for shard in self.shards.iter() {
            let users = std::mem::take(&mut shard.lock().unwrap_or_else(|p| p.into_inner()).users);
            for (_, state) in users {
                self.held.fetch_sub(state.waiters.len(), Ordering::Relaxed);
                for w in state.waiters {
                    let _ = w.wake.send(self.news());
                }
            }
        }
    }

    /// A poll of `session` began on another node at `at_ms`: release this
    /// node's polls of it parked until then with [`Wake::Superseded`].
    pub fn supersede(&self, user: &str, session: &str, at_ms: i64) {
        let mut shard = self.shard(user);
        let Some(state) = shard.users.get_mut(user) else {
            return;
        };
        let waiters = &mut state.waiters;
        let mut released = Vec::new();
        let mut i = 0;
        while i < waiters.len() {
            if &*waiters[i].session == session && waiters[i].parked_ms <= at_ms {
                released.push(waiters.swap_remove(i));
            } else {
                i += 1;
            }
        }
        if waiters.is_empty() && state.proof.is_none() {
            shard.users.remove(user);
        }
        drop(shard);
        self.held.fetch_sub(released.len(), Ordering::Relaxed);
        for w in released {
            let _ = w.wake.send(Wake::Superseded.into());
        }
    }

    /// End every poll of `user` with [`Wake::Revoked`].
    pub fn revoke_user(&self, user: &str) {
        for w in self.take_waiters(user).unwrap_or_default() {
            let _ = w.wake.send(Wake::Revoked.into());
        }
    }

    /// End every poll of session `session` with [`Wake::Revoked`]. Rare, so a
    /// walk over all shards is fine.
    pub fn revoke_session(&self, session: &str) {
        self.release_where(|w| &*w.session == session, Wake::Revoked);
    }

    /// Answer every held poll with [`Wake::ShuttingDown`]; polls parked from
    /// now on are answered at once.
    pub fn shut_down(&self) {
        self.closed.store(true, Ordering::Release);
        self.release_where(|_| true, Wake::ShuttingDown);
    }

    fn release_where(&self, pred: impl Fn(&Waiter) -> bool, why: Wake) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let mut released = Vec::new();
            shard.users.retain(|_, state| {
                let waiters = &mut state.waiters;
                let mut i = 0;
                while i < waiters.len() {
                    if pred(&waiters[i]) {
                        released.push(waiters.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
                !waiters.is_empty() || state.proof.is_some()
            });
            drop(shard);
            self.held.fetch_sub(released.len(), Ordering::Relaxed);
            for w in released {
                let _ = w.wake.send(why.into());
            }
        }
    }

    /// Polls parked now on this node.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Polls woken with news that have not run yet.
    pub fn answers_owed(&self) -> usize {
        self.backlog.owed.load(Ordering::Acquire)
    }

    /// Rounds [`Hub::answers_caught_up`] held back since start.
    pub fn rounds_held_for_answers(&self) -> u64 {
        self.backlog.rounds_held.load(Ordering::Relaxed)
    }

    /// Resolves once at most [`MAX_ANSWERS_OWED`] answers are owed, or
    /// after [`ANSWERS_WAIT_CAP`]; at once, without a wake-up, when so
    /// few are owed already (then false: it did not wait). The SQLite
    /// writer awaits it before each round.
    pub async fn answers_caught_up(&self) -> bool {
        let backlog = &self.backlog;
        if backlog.owed.load(Ordering::Acquire) <= MAX_ANSWERS_OWED {
            return false;
        }
        backlog.rounds_held.fetch_add(1, Ordering::Relaxed);
        let cap = tokio::time::Instant::now() + ANSWERS_WAIT_CAP;
        loop {
            // Made before the check: a payment in between leaves a permit.
            let caught_up = backlog.caught_up.notified();
            if backlog.owed.load(Ordering::Acquire) <= MAX_ANSWERS_OWED {
                return true;
            }
            if tokio::time::timeout_at(cap, caught_up).await.is_err() {
                tracing::warn!(
                    owed = backlog.owed.load(Ordering::Relaxed),
                    "the polls' runtime answers too slowly; storing without waiting for it"
                );
                return true;
            }
        }
    }

    /// Polls parked now for `user` on this node, by session.
    pub fn held_by_session(&self, user: &str) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        if let Some(state) = self.shard(user).users.get(user) {
            for w in &state.waiters {
                *out.entry(w.session.to_string()).or_default() += 1;
            }
        }
        out
    }

    fn leave(&self, user: &str, id: u64) {
        let mut shard = self.shard(user);
        let crowded = shard.users.len() > PROOFS_PER_SHARD;
        if let Some(state) = shard.users.get_mut(user) {
            if let Some(pos) = state.waiters.iter().position(|w| w.id == id) {
                state.waiters.swap_remove(pos);
                self.held.fetch_sub(1, Ordering::Relaxed);
            }
            if state.waiters.is_empty() && (state.proof.is_none() || crowded) {
                shard.users.remove(user);
            }
        }
    }
}

impl Parked {
    /// Whether the hub already knows the store holds nothing new for this
    /// poll (see [`Hub::note_read`]); then the poll may wait without reading.
    pub fn nothing_new(&self) -> bool {
        self.nothing_new
    }

    /// Wait until woken. A sender dropped without a word counts as news, so
    /// the poll re-reads the store rather than hang.
    pub async fn woken(&mut self) -> Wake {
        (&mut self.rx).await.map_or(Wake::News, |woken| woken.why)
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.hub.leave(&self.user, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wake_reaches_only_that_user_and_entries_are_removed() {
        let hub = Hub::new();
        let mut a = hub.park("a@x", "s1", 0, 0, None);
        let b = hub.park("b@x", "s2", 0, 0, None);
        assert_eq!(hub.held(), 2);
        hub.wake("a@x");
        assert_eq!(a.woken().await, Wake::News);
        assert_eq!(hub.held(), 1);
        drop(b);
        assert_eq!(hub.held(), 0);
        drop(a);
        assert_eq!(hub.held(), 0);
        assert!(hub
            .shards
            .iter()
            .all(|s| s.lock().unwrap().users.is_empty()));
    }

    /// Wakes from another thread go through the relay while it runs, and
    /// straight to the polls once it has stopped; none is lost either way.
    #[tokio::test]
    async fn wakes_from_another_thread_reach_the_polls_with_or_without_the_relay() {
        let hub = Hub::new();
        let relay = tokio::spawn(hub.clone().relay_wakes());
        tokio::task::yield_now().await;
        assert!(hub.relay.running.load(Ordering::Acquire));
        let mut polls: Vec<_> = (0..50)
            .map(|i| hub.park(&format!("u{i}"), "s", 0, 0, None))
            .collect();
        let from = hub.clone();
        std::thread::spawn(move || (0..50).for_each(|i| from.wake(&format!("u{i}"))))
            .join()
            .unwrap();
        for poll in &mut polls {
            assert_eq!(poll.woken().await, Wake::News);
        }
        relay.abort();
        let _ = relay.await;
        assert!(!hub.relay.running.load(Ordering::Acquire));
        let mut late = hub.park("late", "s", 0, 0, None);
        let from = hub.clone();
        std::thread::spawn(move || from.wake("late"))
            .join()
            .unwrap();
        assert_eq!(late.woken().await, Wake::News);
        assert_eq!(hub.held(), 0);
    }

    #[tokio::test]
    async fn newer_poll_of_a_session_supersedes_the_older() {
        let hub = Hub::new();
        let mut old = hub.park("a@x", "s1", 0, 0, None);
        let _other = hub.park("a@x", "s2", 0, 0, None);
        let _new = hub.park("a@x", "s1", 0, 0, None);
        assert_eq!(old.woken().await, Wake::Superseded);
        assert_eq!(hub.held(), 2);
    }

    #[tokio::test]
    async fn a_poll_begun_elsewhere_supersedes_only_older_polls_of_its_session() {
        let hub = Hub::new();
        let mut old = hub.park("a@x", "s1", 0, 0, None);
        let mut other = hub.park("a@x", "s2", 0, 0, None);
        hub.supersede("a@x", "s1", crate::clock::now_ms() - 60_000);
        assert_eq!(hub.held(), 2, "a poll parked after the other began stays");
        hub.supersede("a@x", "s1", crate::clock::now_ms());
        assert_eq!(old.woken().await, Wake::Superseded);
        assert_eq!(hub.held(), 1);
        hub.wake_all();
        assert_eq!(other.woken().await, Wake::News);
        assert_eq!(hub.held(), 0);
    }

    #[tokio::test]
    async fn a_user_past_the_cap_loses_the_oldest_poll() {
        let hub = Hub::with_user_cap(2);
        let mut first = hub.park("a@x", "s1", 0, 0, None);
        let _second = hub.park("a@x", "s2", 0, 0, None);
        let _other_user = hub.park("b@x", "s9", 0, 0, None);
        let _third = hub.park("a@x", "s3", 0, 0, None);
        assert_eq!(first.woken().await, Wake::Capped);
        assert_eq!(hub.held(), 3);
        assert_eq!(hub.held_by_session("a@x").len(), 2);
    }

    #[tokio::test]
    async fn a_read_proof_spares_the_next_read_until_a_wake() {
        let hub = Hub::new();
        let first = hub.park("a@x", "s1", 0, 100, None);
        assert!(!first.nothing_new());
        hub.note_read(&first, 7, 100);
        drop(first);
        let next = hub.park("a@x", "s1", 7, 100, None);
        assert!(next.nothing_new());
        // An older cursor, or an earlier session start, needs a read.
        assert!(!hub.park("a@x", "s2", 6, 100, None).nothing_new());
        assert!(!hub.park("a@x", "s3", 7, 99, None).nothing_new());
        hub.wake("a@x");
        assert!(!hub.park("a@x", "s1", 7, 100, None).nothing_new());
    }

    #[tokio::test]
    async fn a_read_that_raced_a_wake_proves_nothing() {
        let hub = Hub::new();
        let mut p = hub.park("a@x", "s1", 0, 0, None);
        hub.wake("a@x");
        hub.note_read(&p, 7, 0);
        assert_eq!(p.woken().await, Wake::News);
        drop(p);
        assert!(!hub.park("a@x", "s1", 7, 0, None).nothing_new());
    }

    #[tokio::test]
    async fn waking_everyone_drops_every_read_proof() {
        let hub = Hub::new();
        let p = hub.park("a@x", "s1", 0, 0, None);
        hub.note_read(&p, 7, 0);
        drop(p);
        hub.wake_all();
        assert!(!hub.park("a@x", "s1", 7, 0, None).nothing_new());
    }

    #[tokio::test]
    async fn shutdown_releases_everyone_and_later_parks() {
        let hub = Hub::new();
        let mut a = hub.park("a@x", "s1", 0, 0, None);
        hub.shut_down();
        assert_eq!(a.woken().await, Wake::ShuttingDown);
        let mut late = hub.park("a@x", "s1", 0, 0, None);
        assert_eq!(late.woken().await, Wake::ShuttingDown);
        assert_eq!(hub.held(), 0);
    }

    #[tokio::test]
    async fn news_is_owed_until_its_poll_runs_and_a_writer_waits_while_too_much_is() {
        let hub = Hub::new();
        let users: Vec<String> = (0..=MAX_ANSWERS_OWED).map(|i| format!("u{i}")).collect();
        let mut parked: Vec<Parked> = users.iter().map(|u| hub.park(u, "s", 0, 0, None)).collect();
        assert!(!hub.answers_caught_up().await, "nothing owed: no wait");
        for user in &users {
            hub.wake(user);
        }
        assert_eq!(hub.answers_owed(), MAX_ANSWERS_OWED + 1);
        let writer = {
            let hub = hub.clone();
            tokio::spawn(async move { hub.answers_caught_up().await })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!writer.is_finished());
        // A poll whose client went away pays what it owed.
        drop(parked.pop());
        assert_eq!(hub.answers_owed(), MAX_ANSWERS_OWED);
        assert!(writer.await.unwrap(), "the writer waited");
        assert_eq!(parked[0].woken().await, Wake::News);
        assert_eq!(hub.answers_owed(), MAX_ANSWERS_OWED - 1);
        // Other wakes owe nothing.
        let mut other = hub.park("v", "s", 0, 0, None);
        hub.shut_down();
        assert_eq!(other.woken().await, Wake::ShuttingDown);
        assert_eq!(hub.answers_owed(), MAX_ANSWERS_OWED - 1);
        assert_eq!(hub.rounds_held_for_answers(), 1);
    }

    /// What [`Answers`] answered, and the wakes it kept (as an answer
    /// slot does).
    #[derive(Default)]
    struct Answered {
        got: Mutex<Vec<(String, Vec<i64>)>>,
        kept: Mutex<Vec<WakeSender>>,
    }

    /// Answers with the seqs `read` finds after seq 1, or declines.
    struct Answers {
        to: Arc<Answered>,
        decline: bool,
    }

    impl AnswerAtCommit for Answers {
        fn answer(
            self: Box<Self>,
            user: &str,
            _session: &str,
            read: ReadNews<'_>,
            wake: WakeSender,
        ) -> Result<(), WakeSender> {
            if self.decline {
                return Err(wake);
            }
            let found = read(user, 1, 0, 100).unwrap_or_default();
            let seqs = found.iter().map(|m| m.seq).collect();
            self.to.got.lock().unwrap().push((user.to_owned(), seqs));
            self.to.kept.lock().unwrap().push(wake);
            Ok(())
        }
    }

    impl Answered {
        fn answers(self: &Arc<Self>, decline: bool) -> Option<Box<dyn AnswerAtCommit>> {
            Some(Box::new(Answers {
                to: self.clone(),
                decline,
            }))
        }

        fn got(&self) -> Vec<(String, Vec<i64>)> {
            self.got.lock().unwrap().clone()
        }
    }

    /// Reads two messages of each user, seqs 1 and 2.
    fn two_each(
        _user: &str,
        after: i64,
        _since_ms: i64,
        _limit: u32,
    ) -> Option<Vec<StoredMessage>> {
        let message = |seq| StoredMessage {
            seq,
            id: format!("m{seq}"),
            kind: 70,
            accepted_ms: 0,
            visible_ms: 0,
            data: "{}".into(),
        };
        Some(
            [1, 2]
                .into_iter()
                .filter(|s| *s > after)
                .map(message)
                .collect(),
        )
    }

    fn not_woken(p: &mut Parked) -> bool {
        matches!(p.rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
    }

    #[tokio::test]
    async fn a_commit_answers_its_users_polls_that_can_be_and_wakes_the_rest() {
        let hub = Hub::new();
        let answered = Arc::new(Answered::default());
        let mut at_commit = hub.park("a@x", "s1", 0, 0, answered.answers(false));
        let mut plain = hub.park("a@x", "s2", 0, 0, None);
        let mut declines = hub.park("a@x", "s3", 0, 0, answered.answers(true));
        let mut other = hub.park("b@x", "s4", 0, 0, answered.answers(false));
        hub.wake_after_commit(&["a@x".into(), "c@x".into()], &two_each);
        assert_eq!(answered.got(), vec![("a@x".to_owned(), vec![2])]);
        assert!(not_woken(&mut at_commit));
        assert_eq!(plain.woken().await, Wake::News);
        assert_eq!(declines.woken().await, Wake::News);
        assert!(not_woken(&mut other));
        assert_eq!(hub.held(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_for_many_users_answers_an_even_share_and_hands_the_rest_to_the_polls() {
        let hub = Hub::new();
        let answered = Arc::new(Answered::default());
        let users: Vec<String> = (0..30).map(|i| format!("u{i:02}")).collect();
        assert!(users.len() > MAX_USERS_ANSWERED_AT_COMMIT);
        let mut parked: Vec<Parked> = users
            .iter()
            .map(|u| hub.park(u, "s", 0, 0, answered.answers(false)))
            .collect();
        hub.wake_after_commit(&users, &two_each);
        // Two runtime threads and the committing thread: a third here.
        let here: Vec<String> = answered.got().into_iter().map(|(u, _)| u).collect();
        assert_eq!(here, users[..10].to_vec());
        for p in &mut parked[..10] {
            assert!(not_woken(p));
        }
        for p in &mut parked[10..] {
            assert_eq!(p.woken().await, Wake::News);
        }
        assert_eq!(hub.held(), 0);
    }
}
