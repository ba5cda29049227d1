//! The session positions of the SQLite store that can be known without a
//! read of the database file: the ones saved since the store opened, and,
//! through a Bloom filter of the sessions that had one before, the fact that
//! a session has none.
//!
//! A cursor-less poll asks for its session's position before anything else;
//! almost always the session is new and has none. SQLite's one writer is in
//! this process, so every position saved since the store opened passed
//! through here; the ones saved earlier are summed up by a filter built at
//! open that may answer "maybe" but never "no" wrongly. Only a "maybe"
//! costs a read.
//!
//! It also holds the positions saved and not yet written. A position is
//! *held back* until its session reads it: most clients (the bundled one
//! among them) poll without a cursor only once, and from the answer on with
//! the answer's cursor, so their positions are never read again and need
//! not be written but at a clean shutdown. A position read by a poll
//! without a cursor is *waiting*: the writer takes the waiting ones now and
//! then and writes them together (see [`super::sqlite`]). So the file lags
//! a client without a cursor by at most its last answer, which a `kill -9`
//! may repeat, as delivery at least once allows.

use foldhash::fast::RandomState;
use foldhash::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;

/// Positions kept in the map at most; past it, their sessions go into the
/// filter and the map starts again.
pub const MAX_KEPT: usize = 200_000;
/// The filter's size: 8 Mi bits (1 MiB), about 2 % false "maybe" with a
/// million sessions in it.
const FILTER_BITS: usize = 1 << 23;
const FILTER_HASHES: u64 = 4;

pub struct Positions {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Sessions that may have a row the map does not hold.
    older: BloomFilter,
    /// Positions saved since open (or since the map last started again).
    kept: HashMap<String, i64>,
    /// Positions saved and not yet read: written only at a flush.
    held_back: HashMap<String, Unwritten>,
    /// Positions read (or saved after a read) and not yet taken by the
    /// writer.
    unwritten: HashMap<String, Unwritten>,
}

/// How many positions wait for the writer, before and after a call that
/// may have added some; the writer hears of the first and of a full
/// statement's worth, not of each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiting {
    pub before: usize,
    pub after: usize,
}

/// A position to write: the session's user, its `seq`, and when it was saved.
#[derive(Debug, PartialEq, Eq)]
pub struct Unwritten {
    pub user: String,
    pub seq: i64,
    pub saved_ms: i64,
}

/// What memory knows of a session's position.
#[derive(Debug, PartialEq, Eq)]
pub enum Known {
    Saved(i64),
    None,
    /// Only the database can tell.
    AskTheFile,
}

impl Positions {
    /// Start with the sessions that have a position in the file.
    pub fn new<'a>(in_file: impl IntoIterator<Item = &'a str>) -> Self {
        let mut older = BloomFilter::new();
        for session in in_file {
            older.insert(session);
        }
        Positions {
            inner: Mutex::new(Inner {
                older,
                kept: HashMap::default(),
                held_back: HashMap::default(),
                unwritten: HashMap::default(),
            }),
        }
    }

    /// What memory knows of `session`'s position, without reading it: see
    /// [`Positions::read`].
    #[cfg(test)]
    pub fn get(&self, session: &str) -> Known {
        self.lock().get(session)
    }

    /// A poll without a cursor reads its session's position: one held back
    /// is now needed after a restart too, and waits for the writer.
    pub fn read(&self, session: &str) -> (Known, Waiting) {
        let mut inner = self.lock();
        let before = inner.unwritten.len();
        if let Some((session, u)) = inner.held_back.remove_entry(session) {
            let seq = u.seq;
            inner.unwritten.insert(session, u);
            return (Known::Saved(seq), inner.waiting(before));
        }
        (inner.get(session), inner.waiting(before))
    }

    /// Save a position (the larger one wins, here and in the file). It is
    /// held back until read, unless its session read one that still waits.
    pub fn save(&self, session: &str, user: &str, seq: i64, saved_ms: i64) -> Waiting {
        let mut inner = self.lock();
        let before = inner.unwritten.len();
        if inner.kept.len() >= MAX_KEPT && !inner.kept.contains_key(session) {
            inner.forget_all();
        }
        let kept = inner.kept.entry(session.to_owned()).or_insert(seq);
        *kept = (*kept).max(seq);
        let seq = *kept;
        let inner = &mut *inner;
        let place = if inner.unwritten.contains_key(session) {
            &mut inner.unwritten
        } else {
            &mut inner.held_back
        };
        match place.get_mut(session) {
            Some(u) => {
                u.seq = u.seq.max(seq);
                u.saved_ms = u.saved_ms.max(saved_ms);
            }
            None => {
                let u = Unwritten {
                    user: user.to_owned(),
                    seq,
                    saved_ms,
                };
                place.insert(session.to_owned(), u);
            }
        }
        // Bounded like the map: past it, what is held back gets written.
        if inner.held_back.len() > MAX_KEPT {
            inner.release_held_back();
        }
        inner.waiting(before)
    }

    /// Every position held back waits for the writer: at a flush.
    pub fn release_held_back(&self) {
        self.lock().release_held_back();
    }

    /// The positions waiting to be written, by session; none wait after.
    pub fn take_unwritten(&self) -> HashMap<String, Unwritten> {
        std::mem::take(&mut self.lock().unwritten)
    }

    /// Rows may have been deleted: ask the file about every known session.
    pub fn forget_all(&self) {
        self.lock().forget_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Each method leaves the data whole between statements that can panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn get(&self, session: &str) -> Known {
        // A saved position is never lower than the one in the file: the
        // file's was read before anything newer could be saved, and saving
        // keeps the larger.
        // One held back or unwritten is the newest: the map may have
        // forgotten it, and the file does not have it yet.
        if let Some(u) = self.unwritten.get(session) {
            return Known::Saved(u.seq);
        }
        if let Some(u) = self.held_back.get(session) {
            return Known::Saved(u.seq);
        }
        match self.kept.get(session) {
            Some(seq) => Known::Saved(*seq),
            None if self.older.may_contain(session) => Known::AskTheFile,
            None => Known::None,
        }
    }

    fn waiting(&self, before: usize) -> Waiting {
        Waiting {
            before,
            after: self.unwritten.len(),
        }
    }

    fn release_held_back(&mut self) {
        // No session is in both maps: a save goes to `unwritten` while its
        // session waits there, and a read moves it out of `held_back`.
        let held_back = std::mem::take(&mut self.held_back);
        self.unwritten.extend(held_back);
    }

    fn forget_all(&mut self) {
        for session in self.kept.keys() {
            self.older.insert(session);
        }
        self.kept.clear();
    }
}

/// A Bloom filter over strings: `may_contain` is true for everything
/// inserted, and for a few others.
struct BloomFilter {
    bits: Vec<u64>,
    hasher: RandomState,
}

impl BloomFilter {
    fn new() -> Self {
        BloomFilter {
            bits: vec![0; FILTER_BITS / 64],
            hasher: RandomState::default(),
        }
    }

    /// The filter's bit positions for `key` (double hashing).
    fn positions(&self, key: &str) -> impl Iterator<Item = usize> {
        let h = self.hasher.hash_one(key);
        let (a, b) = (h, h.rotate_left(32) | 1);
        (0..FILTER_HASHES).map(move |i| (a.wrapping_add(i.wrapping_mul(b)) as usize) % FILTER_BITS)
    }

    fn insert(&mut self, key: &str) {
        for bit in self.positions(key).collect::<Vec<_>>() {
            self.bits[bit / 64] |= 1 << (bit % 64);
        }
    }

    fn may_contain(&self, key: &str) -> bool {
        self.positions(key)
            .all(|bit| self.bits[bit / 64] & (1 << (bit % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_with_a_row_in_the_file_are_asked_about_and_new_ones_are_not() {
        let positions = Positions::new(["old-1", "old-2"]);
        assert_eq!(positions.get("old-1"), Known::AskTheFile);
        assert_eq!(positions.get("old-2"), Known::AskTheFile);
        let unknown = (0..1000)
            .filter(|i| positions.get(&format!("new-{i}")) == Known::AskTheFile)
            .count();
        assert!(unknown < 5, "{unknown} of 1000 new sessions were a maybe");
        assert!((0..1000).any(|i| positions.get(&format!("new-{i}")) == Known::None));
    }

    #[test]
    fn saved_positions_are_answered_and_only_grow() {
        let positions = Positions::new([]);
        positions.save("s", "u", 5, 0);
        positions.save("s", "u", 3, 0);
        assert_eq!(positions.get("s"), Known::Saved(5));
        positions.save("s", "u", 9, 0);
        assert_eq!(positions.get("s"), Known::Saved(9));
    }

    #[test]
    fn forgotten_positions_are_asked_of_the_file() {
        let positions = Positions::new([]);
        positions.save("s", "u", 5, 0);
        positions.release_held_back();
        positions.take_unwritten();
        positions.forget_all();
        assert_eq!(positions.get("s"), Known::AskTheFile);
    }

    #[test]
    fn a_position_waits_for_the_writer_only_once_read_or_flushed() {
        let positions = Positions::new([]);
        let none_waiting = Waiting {
            before: 0,
            after: 0,
        };
        assert_eq!(positions.save("s", "u", 5, 10), none_waiting);
        assert!(positions.take_unwritten().is_empty());
        let (known, waiting) = positions.read("s");
        assert_eq!(known, Known::Saved(5));
        assert_eq!(
            waiting,
            Waiting {
                before: 0,
                after: 1
            }
        );
        // Saved again before the writer took it: it still waits, the newest.
        let one_waiting = Waiting {
            before: 1,
            after: 1,
        };
        assert_eq!(positions.save("s", "u", 7, 20), one_waiting);
        assert_eq!(positions.read("s"), (Known::Saved(7), one_waiting));
        let taken = positions.take_unwritten();
        assert_eq!(taken.len(), 1);
        assert_eq!(taken["s"].seq, 7);
        // Saved after the writer took it: held back again.
        assert_eq!(positions.save("s", "u", 9, 30), none_waiting);
        assert_eq!(positions.save("t", "v", 3, 30), none_waiting);
        assert!(positions.take_unwritten().is_empty());
        assert_eq!(positions.get("t"), Known::Saved(3));
        positions.release_held_back();
        let taken = positions.take_unwritten();
        assert_eq!(taken.len(), 2);
        assert_eq!((taken["s"].seq, taken["t"].seq), (9, 3));
    }

    #[test]
    fn unwritten_positions_outlive_forgetting_and_are_taken_once() {
        let positions = Positions::new([]);
        positions.save("s", "u", 5, 10);
        positions.save("s", "u", 3, 20);
        positions.save("t", "v", 1, 30);
        assert_eq!(positions.read("s").1.after, 1);
        assert_eq!(positions.read("t").1.after, 2);
        positions.forget_all();
        assert_eq!(positions.get("s"), Known::Saved(5));
        let taken = positions.take_unwritten();
        let s = Unwritten {
            user: "u".into(),
            seq: 5,
            saved_ms: 20,
        };
        assert_eq!(taken.get("s"), Some(&s));
        assert_eq!(taken.len(), 2);
        assert!(positions.take_unwritten().is_empty());
        assert_eq!(positions.get("s"), Known::AskTheFile);
    }

    /// Positions held back are bounded like the map: past the bound they
    /// all wait for the writer, so memory does not grow without end with
    /// sessions that never poll without a cursor again.
    #[test]
    fn too_many_positions_held_back_all_wait_for_the_writer() {
        let positions = Positions::new([]);
        for i in 0..MAX_KEPT {
            let waiting = positions.save(&format!("s{i}"), "u", 1, 0);
            assert_eq!(waiting.after, 0);
        }
        let waiting = positions.save("one-more", "u", 1, 0);
        assert_eq!(waiting.before, 0);
        assert_eq!(waiting.after, MAX_KEPT + 1);
        // The map started again, yet memory answers until the writer took
        // them; then the file does.
        assert_eq!(positions.get("s0"), Known::Saved(1));
        assert_eq!(positions.take_unwritten().len(), MAX_KEPT + 1);
        assert_eq!(positions.get("s0"), Known::AskTheFile);
        assert_eq!(positions.get("one-more"), Known::Saved(1));
    }

    #[test]
    fn a_full_map_starts_again_without_losing_a_position() {
        let positions = Positions::new([]);
        for i in 0..MAX_KEPT {
            positions.save(&format!("s{i}"), "u", 1, 0);
        }
        positions.release_held_back();
        positions.take_unwritten();
        positions.save("one-more", "u", 2, 0);
        assert_eq!(positions.get("one-more"), Known::Saved(2));
        assert_eq!(positions.get("s0"), Known::AskTheFile);
        assert_eq!(
            positions.get(&format!("s{}", MAX_KEPT - 1)),
            Known::AskTheFile
        );
    }
}
