//! SQLite's own page cache, with a trim that looks before it walks.
//!
//! At the end of every write transaction SQLite trims its page cache to
//! the database's size (`xTruncate`). Its cache remembers the highest page
//! number it has held since the last trim, and when that is far beyond the
//! database's end it walks its whole hash table for pages to drop. A split
//! of a B-tree leaf that puts the new pages in order moves one of them, for
//! a moment, to the number of the lock page (524,289 with 2 KiB pages), so
//! after about one commit in five at 1,000 notifies a second the trim
//! walked every page the cache held: 2,048 buckets in the benchmark, 8,192
//! once the writer's 16 MB cache is full (`docs/BENCHMARKS.md`).
//!
//! This cache wraps SQLite's default one and keeps its own bound on the
//! page numbers cached: the highest number fetched, and the numbers pages
//! were moved to above it and not moved away from since. A trim that no
//! cached page can reach is not passed on, since it would drop nothing;
//! every other call goes to SQLite's cache unchanged.

use libsqlite3_sys as ffi;
use std::os::raw::{c_int, c_uint};
use std::sync::OnceLock;

/// SQLite's default page cache, which every call ends in.
struct SqliteCache(ffi::sqlite3_pcache_methods2);

// SAFETY: the methods are plain functions; `pArg` is SQLite's own and only
// passed back to them.
unsafe impl Send for SqliteCache {}
unsafe impl Sync for SqliteCache {}

static DEFAULT: OnceLock<SqliteCache> = OnceLock::new();

/// Make this the page cache of every SQLite connection of the process.
/// Call it before the process opens any: SQLite takes a page cache only
/// before it starts. Returns whether this cache is in place; when SQLite
/// had started without it, its own cache stays, which costs only the walks.
pub fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let mut default = std::mem::MaybeUninit::<ffi::sqlite3_pcache_methods2>::zeroed();
        // SAFETY: GETPCACHE2 fills the struct it is given; SQLITE_MISUSE
        // once SQLite has started, and then nothing changes.
        let got =
            unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, default.as_mut_ptr()) };
        if got != ffi::SQLITE_OK {
            return false;
        }
        // SAFETY: filled by SQLite above.
        let default = DEFAULT.get_or_init(|| SqliteCache(unsafe { default.assume_init() }));
        let methods = ffi::sqlite3_pcache_methods2 {
            iVersion: 1,
            pArg: default.0.pArg,
            xInit: default.0.xInit,
            xShutdown: default.0.xShutdown,
            xCreate: Some(create),
            xCachesize: Some(cachesize),
            xPagecount: Some(pagecount),
            xFetch: Some(fetch),
            xUnpin: Some(unpin),
            xRekey: Some(rekey),
            xTruncate: Some(truncate),
            xDestroy: Some(destroy),
            xShrink: Some(shrink),
        };
        // SAFETY: SQLite copies the struct; it has not started (above).
        unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &methods) == ffi::SQLITE_OK }
    })
}

/// One cache (one connection's pager): SQLite's, and the bound.
struct Cache {
    default: *mut ffi::sqlite3_pcache,
    /// No page with a higher number is cached, but at `moved_up`.
    highest: c_uint,
    /// Numbers above `highest` that pages were moved to and not from since.
    moved_up: Vec<c_uint>,
}

impl Cache {
    /// Whether a trim to `limit` (dropping every page numbered `limit` or
    /// more) could drop a page.
    fn trim_reaches(&self, limit: c_uint) -> bool {
        limit <= self.highest || self.moved_up.iter().any(|&k| k >= limit)
    }

    /// After a trim to `limit`: no page numbered `limit` or more is left.
    fn trimmed(&mut self, limit: c_uint) {
        let below = self.moved_up.iter().copied().filter(|&k| k < limit).max();
        self.highest = self
            .highest
            .min(limit.saturating_sub(1))
            .max(below.unwrap_or(0));
        self.moved_up.clear();
    }

    fn fetched(&mut self, key: c_uint) {
        self.highest = self.highest.max(key);
    }

    fn moved(&mut self, from: c_uint, to: c_uint) {
        self.moved_up.retain(|&k| k != from);
        if to > self.highest {
            self.moved_up.push(to);
        }
    }
}

fn methods() -> &'static ffi::sqlite3_pcache_methods2 {
    // Set before SQLite is given any of the functions below.
    &DEFAULT
        .get()
        .expect("the page cache is used only once installed")
        .0
}

/// # Safety
/// `cache` is one that `create` returned and `destroy` has not freed;
/// SQLite calls a cache's methods one at a time.
unsafe fn cache<'a>(cache: *mut ffi::sqlite3_pcache) -> &'a mut Cache {
    unsafe { &mut *cache.cast::<Cache>() }
}

unsafe extern "C" fn create(
    page: c_int,
    extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    let Some(create) = methods().xCreate else {
        return std::ptr::null_mut();
    };
    let default = unsafe { create(page, extra, purgeable) };
    if default.is_null() {
        return default;
    }
    let cache = Box::new(Cache {
        default,
        highest: 0,
        moved_up: Vec::new(),
    });
    Box::into_raw(cache).cast()
}

unsafe extern "C" fn cachesize(p: *mut ffi::sqlite3_pcache, pages: c_int) {
    let c = unsafe { cache(p) };
    if let Some(f) = methods().xCachesize {
        unsafe { f(c.default, pages) }
    }
}

unsafe extern "C" fn pagecount(p: *mut ffi::sqlite3_pcache) -> c_int {
    let c = unsafe { cache(p) };
    methods().xPagecount.map_or(0, |f| unsafe { f(c.default) })
}

unsafe extern "C" fn fetch(
    p: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    let c = unsafe { cache(p) };
    let Some(f) = methods().xFetch else {
        return std::ptr::null_mut();
    };
    let page = unsafe { f(c.default, key, create) };
    if !page.is_null() {
        c.fetched(key);
    }
    page
}

unsafe extern "C" fn unpin(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    let c = unsafe { cache(p) };
    if let Some(f) = methods().xUnpin {
        unsafe { f(c.default, page, discard) }
    }
}

unsafe extern "C" fn rekey(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    from: c_uint,
    to: c_uint,
) {
    let c = unsafe { cache(p) };
    if let Some(f) = methods().xRekey {
        unsafe { f(c.default, page, from, to) }
    }
    c.moved(from, to);
}

unsafe extern "C" fn truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    let c = unsafe { cache(p) };
    if !c.trim_reaches(limit) {
        #[cfg(test)]
        tests::SKIPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    }
    if let Some(f) = methods().xTruncate {
        unsafe { f(c.default, limit) }
    }
    c.trimmed(limit);
}

unsafe extern "C" fn destroy(p: *mut ffi::sqlite3_pcache) {
    // SAFETY: made by `create`; SQLite calls nothing on it after this.
    let c = unsafe { Box::from_raw(p.cast::<Cache>()) };
    if let Some(f) = methods().xDestroy {
        unsafe { f(c.default) }
    }
}

unsafe extern "C" fn shrink(p: *mut ffi::sqlite3_pcache) {
    let c = unsafe { cache(p) };
    if let Some(f) = methods().xShrink {
        unsafe { f(c.default) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// Trims not passed on, in this process.
    pub(super) static SKIPPED: AtomicU64 = AtomicU64::new(0);

    fn cache() -> Cache {
        Cache {
            default: std::ptr::null_mut(),
            highest: 0,
            moved_up: Vec::new(),
        }
    }

    /// What B-tree balancing does when it puts two new pages in order: one
    /// goes to the lock page's number for a moment.
    #[test]
    fn a_swap_through_the_lock_page_leaves_nothing_for_the_trim() {
        let mut c = cache();
        for key in 1..=1_400 {
            c.fetched(key);
        }
        let lock_page = 0x4000_0000 / 2048 + 1;
        c.moved(1_117, lock_page);
        c.moved(44, 1_117);
        c.moved(lock_page, 44);
        assert!(!c.trim_reaches(1_401));
        assert!(c.trim_reaches(1_400), "page 1,400 is cached");
    }

    #[test]
    fn a_page_moved_past_the_end_and_left_there_is_trimmed() {
        let mut c = cache();
        for key in 1..=10 {
            c.fetched(key);
        }
        c.moved(3, 50);
        assert!(c.trim_reaches(11));
        c.trimmed(11);
        assert_eq!((c.highest, c.moved_up.len()), (10, 0));
        assert!(!c.trim_reaches(11));
    }

    #[test]
    fn after_a_trim_the_bound_is_what_may_remain() {
        let mut c = cache();
        for key in 1..=100 {
            c.fetched(key);
        }
        // A rollback: the database is back to 60 pages.
        c.trimmed(61);
        assert_eq!(c.highest, 60);
        assert!(!c.trim_reaches(61));
        assert!(c.trim_reaches(60));
        // A page moved above the bound but under the trim's limit stays.
        c.moved(5, 70);
        c.trimmed(80);
        assert_eq!(c.highest, 70);
        assert!(c.trim_reaches(70));
    }

    /// The store on this cache: rows for many mailboxes split the messages
    /// table's leaves many times, a refused round rolls back, and the file
    /// is sound and holds every row accepted.
    #[tokio::test]
    async fn the_store_on_this_cache_keeps_every_row_and_a_sound_file() {
        use crate::store::{MessageStore, NewMessage, SqliteStore};
        use sqlx::Connection;
        assert!(install(), "SQLite started before the page cache");
        let skipped_before = SKIPPED.load(std::sync::atomic::Ordering::Relaxed);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("pns.db").display());
        let store = SqliteStore::open(&url).await.unwrap();
        let message = |user: u32, n: u32| NewMessage {
            user: format!("user{user}@example.com"),
            kind: 70,
            data: format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(60)),
            dedup_key: None,
            delay_ms: 0,
        };
        let users = 300;
        for round in 0..200 {
            let batch = (0..5)
                .map(|i| message((round * 7 + i * 61) % users, round))
                .collect();
            store.accept(batch, 1_000).await.unwrap();
        }
        let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.data LIKE '%\"n\":999,%'
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        )
        .execute(&mut other)
        .await
        .unwrap();
        let refused = (0..50)
            .map(|u| message(u, 998))
            .chain([message(1, 999)])
            .collect();
        assert!(store.accept(refused, 2_000).await.is_err());
        let mut stored = 0;
        for user in 0..users {
            stored += store
                .fetch_from_file(&format!("user{user}@example.com"), 0, 0, 1_000)
                .await
                .unwrap()
                .len();
        }
        assert_eq!(stored, 1_000);
        let check: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut other)
            .await
            .unwrap();
        assert_eq!(check, "ok");
        let skipped = SKIPPED.load(std::sync::atomic::Ordering::Relaxed) - skipped_before;
        assert!(skipped > 100, "{skipped} trims skipped");
    }
}
