//! The newest messages of the SQLite store, kept in memory so that most
//! polls are answered without a read of the database file.
//!
//! SQLite has one writer, and it is in this process: every message that
//! becomes visible passes through it. So after a commit the writer hands the
//! new rows here, and from then on this module knows *every* message above
//! a floor `seq`. A poll's read that cannot be touched by anything at or
//! below the floor (its cursor is at or above it, or its session began after
//! the newest message at or below it became visible) is answered from
//! memory, exactly as the database would answer it: same rows, same order.
//! Every other read goes to the database.
//!
//! The oldest messages are let go first when the bounds are passed; the
//! floor rises with them. A retention purge raises the floor to the newest
//! message it deleted, letting go of every message up to it.

use super::StoredMessage;
use foldhash::HashMap;
use std::collections::VecDeque;
use std::sync::Mutex;

/// Messages kept at most.
pub const MAX_MESSAGES: usize = 50_000;
/// Bytes of message data kept at most.
pub const MAX_DATA_BYTES: usize = 16 * 1024 * 1024;

pub struct Recent {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Every visible message with `seq > floor` is in `by_mailbox`.
    floor: i64,
    /// The largest `visible_ms` of any message at or below the floor.
    floor_visible_ms: i64,
    /// The newest `seq` and `visible_ms` recorded (or found at start).
    top: i64,
    top_visible_ms: i64,
    by_mailbox: HashMap<String, VecDeque<StoredMessage>>,
    /// (seq, mailbox) of every message kept, oldest first: the eviction order.
    order: VecDeque<(i64, String)>,
    data_bytes: usize,
    /// Set for good when a row came out of order (see [`Recent::record`]).
    broken: bool,
}

impl Recent {
    /// Start knowing nothing at or below `top_seq`, whose messages became
    /// visible at `top_visible_ms` at the latest.
    pub fn new(top_seq: i64, top_visible_ms: i64) -> Self {
        Recent {
            inner: Mutex::new(Inner {
                floor: top_seq,
                floor_visible_ms: top_visible_ms,
                top: top_seq,
                top_visible_ms,
                by_mailbox: HashMap::default(),
                order: VecDeque::new(),
                data_bytes: 0,
                broken: false,
            }),
        }
    }

    /// The answer the database would give to [`super::MessageStore::fetch`],
    /// or `None` when only the database can tell.
    pub fn fetch(
        &self,
        mailbox: &str,
        after_seq: i64,
        since_ms: i64,
        limit: u32,
    ) -> Option<Vec<StoredMessage>> {
        let inner = self.lock();
        if inner.broken || (after_seq < inner.floor && since_ms <= inner.floor_visible_ms) {
            return None;
        }
        let Some(kept) = inner.by_mailbox.get(mailbox) else {
            return Some(Vec::new());
        };
        // Kept in seq order: skip to the first one after the cursor.
        let start = kept.partition_point(|m| m.seq <= after_seq);
        Some(
            kept.range(start..)
                .filter(|m| m.visible_ms >= since_ms)
                .take(limit as usize)
                .cloned()
                .collect(),
        )
    }

    /// Messages made visible by a commit that succeeded, with their
    /// mailboxes, in any order.
    pub fn record(&self, mut committed: Vec<(String, StoredMessage)>) {
        if committed.is_empty() {
            return;
        }
        committed.sort_unstable_by_key(|(_, m)| m.seq);
        let mut inner = self.lock();
        if inner.broken {
            return;
        }
        for (mailbox, m) in committed {
            if m.seq <= inner.top {
                // Only the writer records, in commit order, with the seq the
                // database gave: anything else is a bug, and answering from
                // memory could then hide a message. Stop answering instead.
                tracing::error!(
                    seq = m.seq,
                    top = inner.top,
                    "a message was recorded out of order; polls read the database from now on"
                );
                inner.broken = true;
                inner.forget_all();
                return;
            }
            inner.top = m.seq;
            inner.top_visible_ms = inner.top_visible_ms.max(m.visible_ms);
            inner.data_bytes += m.data.len();
            inner.order.push_back((m.seq, mailbox.clone()));
            inner.by_mailbox.entry(mailbox).or_default().push_back(m);
        }
        while inner.order.len() > MAX_MESSAGES || inner.data_bytes > MAX_DATA_BYTES {
            inner.evict_oldest();
        }
    }

    /// A purge deleted rows, the newest of them `seq`: let go of every
    /// message up to it, so that a read that could find a deleted row goes
    /// to the database. Every message above the floor was known here, so
    /// the ones above `seq` are still as the database has them.
    pub fn forget_through(&self, seq: i64) {
        let mut inner = self.lock();
        while inner
            .order
            .front()
            .is_some_and(|&(oldest, _)| oldest <= seq)
        {
            inner.evict_oldest();
        }
        inner.floor = inner.floor.max(seq);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The data stays consistent whatever panicked while holding the lock:
        // every method leaves it whole between statements that can panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.lock().order.len()
    }
}

impl Inner {
    fn forget_all(&mut self) {
        self.floor = self.top;
        self.floor_visible_ms = self.top_visible_ms;
        self.by_mailbox.clear();
        self.order.clear();
        self.data_bytes = 0;
    }

    fn evict_oldest(&mut self) {
        let Some((seq, mailbox)) = self.order.pop_front() else {
            return;
        };
        if let Some(kept) = self.by_mailbox.get_mut(&mailbox) {
            if let Some(m) = kept.pop_front() {
                debug_assert_eq!(m.seq, seq);
                self.data_bytes -= m.data.len();
                self.floor_visible_ms = self.floor_visible_ms.max(m.visible_ms);
            }
            if kept.is_empty() {
                self.by_mailbox.remove(&mailbox);
            }
        }
        self.floor = seq;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: i64, mailbox: &str, visible_ms: i64) -> (String, StoredMessage) {
        let m = StoredMessage {
            seq,
            id: format!("id{seq}"),
            kind: 70,
            accepted_ms: visible_ms,
            visible_ms,
            data: "{}".into(),
        };
        (mailbox.into(), m)
    }

    fn seqs(found: Option<Vec<StoredMessage>>) -> Option<Vec<i64>> {
        found.map(|f| f.into_iter().map(|m| m.seq).collect())
    }

    #[test]
    fn reads_that_older_rows_could_answer_go_to_the_database() {
        let recent = Recent::new(10, 1_000);
        // Cursor below the floor, session older than the floor's newest row.
        assert_eq!(seqs(recent.fetch("a", 5, 900, 10)), None);
        // Cursor at the floor, or a session that began after it: nothing new.
        assert_eq!(seqs(recent.fetch("a", 10, 0, 10)), Some(vec![]));
        assert_eq!(seqs(recent.fetch("a", 0, 1_001, 10)), Some(vec![]));
    }

    #[test]
    fn recorded_rows_are_answered_in_seq_order_with_the_database_filters() {
        let recent = Recent::new(0, 0);
        recent.record(vec![msg(3, "a", 300), msg(1, "a", 100), msg(2, "b", 200)]);
        recent.record(vec![msg(4, "a", 400)]);
        assert_eq!(seqs(recent.fetch("a", 0, 0, 10)), Some(vec![1, 3, 4]));
        assert_eq!(seqs(recent.fetch("a", 1, 0, 10)), Some(vec![3, 4]));
        assert_eq!(seqs(recent.fetch("a", 0, 300, 10)), Some(vec![3, 4]));
        assert_eq!(seqs(recent.fetch("a", 0, 0, 2)), Some(vec![1, 3]));
        assert_eq!(seqs(recent.fetch("b", 0, 0, 10)), Some(vec![2]));
        assert_eq!(seqs(recent.fetch("c", 0, 0, 10)), Some(vec![]));
    }

    #[test]
    fn evicting_the_oldest_raises_the_floor() {
        let recent = Recent::new(0, 0);
        let many: Vec<_> = (1..=MAX_MESSAGES as i64 + 2)
            .map(|s| msg(s, if s % 2 == 0 { "a" } else { "b" }, s * 10))
            .collect();
        recent.record(many);
        assert_eq!(recent.kept(), MAX_MESSAGES);
        // seq 1 and 2 are gone: a read that could see them goes to the database.
        assert_eq!(seqs(recent.fetch("a", 0, 0, 10)), None);
        assert_eq!(seqs(recent.fetch("a", 0, 20, 10)), None);
        assert_eq!(seqs(recent.fetch("a", 0, 21, 2)), Some(vec![4, 6]));
        assert_eq!(seqs(recent.fetch("a", 2, 0, 2)), Some(vec![4, 6]));
    }

    #[test]
    fn after_a_purge_only_the_rows_above_what_it_deleted_are_known() {
        let recent = Recent::new(0, 0);
        recent.record(vec![msg(1, "a", 100), msg(2, "b", 200), msg(3, "a", 300)]);
        // The purge deleted seq 2 (and perhaps 1).
        recent.forget_through(2);
        assert_eq!(seqs(recent.fetch("a", 0, 0, 10)), None);
        assert_eq!(seqs(recent.fetch("b", 0, 0, 10)), None);
        assert_eq!(seqs(recent.fetch("a", 2, 0, 10)), Some(vec![3]));
        assert_eq!(seqs(recent.fetch("a", 0, 201, 10)), Some(vec![3]));
        recent.record(vec![msg(4, "b", 400)]);
        assert_eq!(seqs(recent.fetch("b", 2, 0, 10)), Some(vec![4]));
        // A purge of rows below the floor changes nothing.
        recent.forget_through(1);
        assert_eq!(seqs(recent.fetch("a", 2, 0, 10)), Some(vec![3]));
    }

    #[test]
    fn a_row_out_of_order_makes_it_stop_answering_rather_than_answer_wrong() {
        let recent = Recent::new(0, 0);
        recent.record(vec![msg(5, "a", 500)]);
        recent.record(vec![msg(4, "a", 400)]);
        assert_eq!(seqs(recent.fetch("a", 0, 0, 10)), None);
        assert_eq!(seqs(recent.fetch("a", 5, 0, 10)), None);
        recent.record(vec![msg(6, "a", 600)]);
        assert_eq!(seqs(recent.fetch("a", 5, 0, 10)), None);
        // A seq the database did not give (left at 0) counts the same.
        let fresh = Recent::new(0, 0);
        fresh.record(vec![msg(0, "a", 100)]);
        assert_eq!(seqs(fresh.fetch("a", 0, 0, 10)), None);
    }
}
