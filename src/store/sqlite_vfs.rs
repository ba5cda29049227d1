//! The VFS the store opens its file through: SQLite's `unix-excl`
//! ([`super::sqlite_lock`]), with the frames a commit appends to the
//! write-ahead log written in one system call.
//!
//! SQLite writes each frame of the log in two calls, its 24-byte header
//! and then its page, and a commit of one notify appends one to four
//! frames (a B-tree leaf, and on a split its sibling, its parent and the
//! file's first page). Each `pwrite64` to ext4 costs a few microseconds
//! whatever its size, so at 1,000 lone notifies a second the writer made
//! about four of them a notify. Here the log file keeps the frames a
//! transaction appends in a buffer and writes them in one call once the
//! commit frame's page is in, before SQLite goes on to publish the commit
//! to readers. So nothing held back is ever part of a commit that
//! someone can see: the commit is published after the write, and a
//! process that dies before it had not committed.
//!
//! Only appends are held: a frame's header written where the previous
//! frame ended, and the page right after it. Any other call on the log
//! (a frame overwritten in place, a checksum rewritten, the log's own
//! header, a read, a sync, a truncate, a close) first writes what is held,
//! so the file sees every write in SQLite's order. Files other than the
//! log are `unix-excl`'s own, untouched.

use libsqlite3_sys as ffi;
use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

/// The name connections give to open the store through this VFS.
pub const NAME: &CStr = c"pns-unix-excl";

/// Bytes held that make the next whole frame write them. The base writes
/// at most 128 KiB less a byte in a call (`seekAndWriteFd` masks the
/// length), and a frame is at most 64 KiB and its header, so what is held
/// stays below that: a batch of 500 messages, a few hundred frames of
/// 2 KiB, is written 30 frames a call.
const HOLD_AT_MOST: usize = 60 * 1024;

/// The size of a frame's header in the log (`WAL_FRAME_HDRSIZE`).
const FRAME_HEADER: usize = 24;

/// `unix-excl`, which every call ends in.
struct Base(*mut ffi::sqlite3_vfs);

// SAFETY: SQLite's VFS objects are process-wide and never freed; their
// methods may be called from any thread.
unsafe impl Send for Base {}
unsafe impl Sync for Base {}

static BASE: OnceLock<Base> = OnceLock::new();

/// Register this VFS, once. Returns the name to open the store with:
/// [`NAME`], or `unix-excl` itself when SQLite has no such VFS or refuses
/// the registration.
pub fn install() -> &'static str {
    static INSTALLED: OnceLock<&'static str> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        // Finding the base starts SQLite, after which it takes no page cache.
        super::page_cache::install();
        let fallback = super::sqlite_lock::VFS;
        let Ok(base_name) = std::ffi::CString::new(fallback) else {
            return fallback;
        };
        // SAFETY: a nul-terminated name; SQLite initialises itself here.
        let base = unsafe { ffi::sqlite3_vfs_find(base_name.as_ptr()) };
        if base.is_null() {
            tracing::warn!("SQLite has no unix-excl VFS; the store opens its file as SQLite does");
            return fallback;
        }
        BASE.get_or_init(|| Base(base));
        // SAFETY: `base` is SQLite's and lives as long as the process.
        let mut vfs = unsafe { *base };
        vfs.pNext = std::ptr::null_mut();
        vfs.zName = NAME.as_ptr();
        vfs.szOsFile = (std::mem::size_of::<LogFile>() as c_int).saturating_add(vfs.szOsFile);
        vfs.xOpen = Some(open);
        // Every other method is the base's, called with this VFS: none of
        // `os_unix.c`'s reads the VFS it is given but `xOpen`, which gets
        // the base's own (`open`).
        let vfs = Box::leak(Box::new(vfs));
        // SAFETY: SQLite keeps the pointer, which is never freed.
        if unsafe { ffi::sqlite3_vfs_register(vfs, 0) } != ffi::SQLITE_OK {
            tracing::warn!(
                "cannot register the store's VFS; the log's frames go out as SQLite writes them"
            );
            return fallback;
        }
        match NAME.to_str() {
            Ok(name) => name,
            Err(_) => fallback,
        }
    })
}

/// The log file as SQLite sees it: the base's file right after it.
#[repr(C)]
struct LogFile {
    file: ffi::sqlite3_file,
    base: *mut ffi::sqlite3_file,
    held: *mut Held,
}

/// The frames appended and not yet written.
struct Held {
    bytes: Vec<u8>,
    /// Where `bytes` start in the file.
    at: i64,
    /// The last held header waits for its page.
    wants_page: bool,
    /// That header is a commit's.
    commits: bool,
    /// Where the next frame goes if it follows the last one written.
    next_frame: Option<i64>,
    /// Calls of the base's write.
    #[cfg(test)]
    writes: usize,
}

impl Held {
    fn end(&self) -> i64 {
        self.at + self.bytes.len() as i64
    }

    /// Where a header must be written to be held: right after what is held,
    /// or where the next frame goes.
    fn append_at(&self) -> Option<i64> {
        if self.bytes.is_empty() {
            self.next_frame
        } else if self.wants_page {
            None
        } else {
            Some(self.end())
        }
    }
}

static LOG_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let Some(Base(base)) = BASE.get() else {
        return ffi::SQLITE_ERROR;
    };
    let base = *base;
    // SAFETY: the base VFS is SQLite's; `file` has room for its file (and
    // ours), as `szOsFile` says.
    let Some(base_open) = (unsafe { (*base).xOpen }) else {
        return ffi::SQLITE_ERROR;
    };
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // Not the log: the base's file, in place, with its own methods.
        // SAFETY: as above.
        return unsafe { base_open(base, name, file, flags, out_flags) };
    }
    let log = file.cast::<LogFile>();
    // SAFETY: `file` has room for a LogFile and the base's file after it.
    let inner = unsafe { file.cast::<u8>().add(std::mem::size_of::<LogFile>()) }
        .cast::<ffi::sqlite3_file>();
    // SAFETY: as above.
    let rc = unsafe { base_open(base, name, inner, flags, out_flags) };
    if rc != ffi::SQLITE_OK {
        // SQLite calls no method of a file whose open failed, nor xClose.
        // SAFETY: `log` points into the memory SQLite gave.
        unsafe { (*log).file.pMethods = std::ptr::null() };
        return rc;
    }
    let held = Box::into_raw(Box::new(Held {
        bytes: Vec::new(),
        at: 0,
        wants_page: false,
        commits: false,
        next_frame: None,
        #[cfg(test)]
        writes: 0,
    }));
    // SAFETY: `log` points into the memory SQLite gave for this file.
    unsafe {
        log.write(LogFile {
            file: ffi::sqlite3_file {
                pMethods: &LOG_METHODS,
            },
            base: inner,
            held,
        });
    }
    ffi::SQLITE_OK
}

/// The base's file and methods, and what is held, of a file this VFS
/// opened as a log.
///
/// # Safety
/// `file` is a [`LogFile`] that [`open`] filled and that is not closed.
unsafe fn parts<'a>(
    file: *mut ffi::sqlite3_file,
) -> (
    *mut ffi::sqlite3_file,
    &'a ffi::sqlite3_io_methods,
    &'a mut Held,
) {
    let log = file.cast::<LogFile>();
    // SAFETY: as the caller promises; the base's methods are set by its
    // successful open and are never freed.
    unsafe {
        let base = (*log).base;
        (base, &*(*base).pMethods, &mut *(*log).held)
    }
}

/// Write what is held.
fn flush(
    base: *mut ffi::sqlite3_file,
    methods: &ffi::sqlite3_io_methods,
    held: &mut Held,
) -> c_int {
    if held.bytes.is_empty() {
        return ffi::SQLITE_OK;
    }
    let Some(write) = methods.xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let Ok(len) = c_int::try_from(held.bytes.len()) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    #[cfg(test)]
    {
        held.writes += 1;
    }
    // SAFETY: the base's own file and method; the buffer is alive for the call.
    let rc = unsafe { write(base, held.bytes.as_ptr().cast(), len, held.at) };
    held.bytes.clear();
    held.wants_page = false;
    held.commits = false;
    rc
}

/// The base's file and methods of a log file, once what it holds is
/// written; the write's error if that failed.
///
/// # Safety
/// As [`parts`].
unsafe fn flushed<'a>(
    file: *mut ffi::sqlite3_file,
) -> Result<(*mut ffi::sqlite3_file, &'a ffi::sqlite3_io_methods), c_int> {
    // SAFETY: as the caller promises.
    let (base, methods, held) = unsafe { parts(file) };
    match flush(base, methods, held) {
        ffi::SQLITE_OK => Ok((base, methods)),
        rc => Err(rc),
    }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite calls this on a log file this VFS opened.
    let (base, methods, held) = unsafe { parts(file) };
    let Ok(len) = usize::try_from(amount) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    // SAFETY: SQLite passes `amount` readable bytes.
    let bytes = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
    if len == FRAME_HEADER && held.append_at() == Some(offset) {
        // A new frame's header; bytes 4..8 are the database's size after a
        // commit, zero in every other frame.
        if held.bytes.is_empty() {
            held.at = offset;
        }
        held.bytes.extend_from_slice(bytes);
        held.wants_page = true;
        held.commits = bytes[4..8] != [0, 0, 0, 0];
        return ffi::SQLITE_OK;
    }
    if held.wants_page && offset == held.end() {
        held.bytes.extend_from_slice(bytes);
        held.wants_page = false;
        held.next_frame = Some(held.end());
        if held.commits || held.bytes.len() >= HOLD_AT_MOST {
            return flush(base, methods, held);
        }
        return ffi::SQLITE_OK;
    }
    let rc = flush(base, methods, held);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    let Some(base_write) = methods.xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    #[cfg(test)]
    {
        held.writes += 1;
    }
    // SAFETY: the base's own file and method, with SQLite's arguments.
    let rc = unsafe { base_write(base, data, amount, offset) };
    // The log's header (32 bytes at 0) puts the first frame right after it;
    // a page written through, the next frame after it. A header written
    // through (a checksum rewritten) says nothing of where frames go next.
    if len != FRAME_HEADER {
        held.next_frame = Some(offset.saturating_add(amount as i64));
    }
    rc
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    let log = file.cast::<LogFile>();
    // SAFETY: SQLite calls this once, on a log file this VFS opened.
    let (base, methods, held) = unsafe { parts(file) };
    let flushed = flush(base, methods, held);
    // SAFETY: the base's own file and method.
    let closed = match methods.xClose {
        Some(close) => unsafe { close(base) },
        None => ffi::SQLITE_OK,
    };
    // SAFETY: made by Box::into_raw in `open`, freed only here.
    drop(unsafe { Box::from_raw((*log).held) });
    // SAFETY: as above; nothing calls the file after its close.
    unsafe { (*log).held = std::ptr::null_mut() };
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        closed
    }
}

unsafe extern "C" fn read(
    file: *mut ffi::sqlite3_file,
    data: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite calls this on a log file this VFS opened.
    let (base, methods) = match unsafe { flushed(file) } {
        Ok(parts) => parts,
        Err(rc) => return rc,
    };
    match methods.xRead {
        // SAFETY: the base's own file and method, with SQLite's arguments.
        Some(read) => unsafe { read(base, data, amount, offset) },
        None => ffi::SQLITE_IOERR_READ,
    }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: SQLite calls this on a log file this VFS opened.
    let (base, methods) = match unsafe { flushed(file) } {
        Ok(parts) => parts,
        Err(rc) => return rc,
    };
    match methods.xTruncate {
        // SAFETY: the base's own file and method.
        Some(truncate) => unsafe { truncate(base, size) },
        None => ffi::SQLITE_IOERR_TRUNCATE,
    }
}

unsafe extern "C" fn sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    // SAFETY: SQLite calls this on a log file this VFS opened.
    let (base, methods) = match unsafe { flushed(file) } {
        Ok(parts) => parts,
        Err(rc) => return rc,
    };
    match methods.xSync {
        // SAFETY: the base's own file and method.
        Some(sync) => unsafe { sync(base, flags) },
        None => ffi::SQLITE_IOERR_FSYNC,
    }
}

unsafe extern "C" fn file_size(file: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    // SAFETY: SQLite calls this on a log file this VFS opened.
    let (base, methods) = match unsafe { flushed(file) } {
        Ok(parts) => parts,
        Err(rc) => return rc,
    };
    match methods.xFileSize {
        // SAFETY: the base's own file and method, with SQLite's pointer.
        Some(file_size) => unsafe { file_size(base, size) },
        None => ffi::SQLITE_IOERR_FSTAT,
    }
}

unsafe extern "C" fn file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: SQLite calls this on a log file this VFS opened.
    let (base, methods) = match unsafe { flushed(file) } {
        Ok(parts) => parts,
        Err(rc) => return rc,
    };
    match methods.xFileControl {
        // SAFETY: the base's own file and method, with SQLite's arguments.
        Some(file_control) => unsafe { file_control(base, op, arg) },
        None => ffi::SQLITE_NOTFOUND,
    }
}

unsafe extern "C" fn lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: SQLite calls this on a log file this VFS opened.
    let (base, methods, _) = unsafe { parts(file) };
    match methods.xLock {
        // SAFETY: the base's own file and method.
        Some(lock) => unsafe { lock(base, level) },
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    // SAFETY: SQLite calls this on a log file this VFS opened.
    let (base, methods, _) = unsafe { parts(file) };
    match methods.xUnlock {
        // SAFETY: the base's own file and method.
        Some(unlock) => unsafe { unlock(base, level) },
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    // SAFETY: SQLite calls this on a log file this VFS opened.
    let (base, methods, _) = unsafe { parts(file) };
    match methods.xCheckReservedLock {
        // SAFETY: the base's own file and method, with SQLite's pointer.
        Some(check) => unsafe { check(base, out) },
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls this on a log file this VFS opened.
    let (base, methods, _) = unsafe { parts(file) };
    match methods.xSectorSize {
        // SAFETY: the base's own file and method.
        Some(sector_size) => unsafe { sector_size(base) },
        None => 4096,
    }
}

unsafe extern "C" fn device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: SQLite calls this on a log file this VFS opened.
    let (base, methods, _) = unsafe { parts(file) };
    match methods.xDeviceCharacteristics {
        // SAFETY: the base's own file and method.
        Some(characteristics) => unsafe { characteristics(base) },
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    use sqlx::{Connection, SqliteConnection};
    use std::path::Path;

    const PAGE: u64 = 2048;
    const FRAME: u64 = 24 + PAGE;

    async fn open(path: &Path, vfs: &'static str) -> SqliteConnection {
        let mut conn = SqliteConnection::connect_with(
            &SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .page_size(PAGE as u32)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .vfs(vfs),
        )
        .await
        .unwrap();
        // The log only grows: every frame written stays to be looked at.
        sqlx::query("PRAGMA wal_autocheckpoint = 0")
            .execute(&mut conn)
            .await
            .unwrap();
        conn
    }

    /// Calls of the base's write on `conn`'s log so far.
    async fn log_writes(conn: &mut SqliteConnection) -> usize {
        let mut handle = conn.lock_handle().await.unwrap();
        let db = handle.as_raw_handle().as_ptr();
        let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
        // SAFETY: a live handle; JOURNAL_POINTER writes the log's file
        // pointer, which this VFS opened, into `file`.
        let rc = unsafe {
            ffi::sqlite3_file_control(
                db,
                c"main".as_ptr(),
                ffi::SQLITE_FCNTL_JOURNAL_POINTER,
                (&mut file as *mut *mut ffi::sqlite3_file).cast(),
            )
        };
        assert_eq!(rc, ffi::SQLITE_OK);
        assert!(!file.is_null());
        // SAFETY: the log is open while the connection is, and nothing
        // else uses it while the handle is locked.
        unsafe {
            assert!(std::ptr::eq((*file).pMethods, &LOG_METHODS));
            (*(*file.cast::<LogFile>()).held).writes
        }
    }

    fn log_len(db: &Path) -> u64 {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
    }

    async fn insert(conn: &mut SqliteConnection, rows: std::ops::Range<i64>, bytes: usize) {
        let mut tx = conn.begin().await.unwrap();
        for k in rows {
            sqlx::query("INSERT INTO t (k, v) VALUES (?, ?)")
                .bind(k)
                .bind(vec![(k % 251) as u8; bytes])
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }

    /// The frames of a commit reach the log in one write, and a commit of
    /// more than the buffer holds in one write per ~60 KiB.
    #[tokio::test]
    async fn a_commits_frames_reach_the_log_in_one_write() {
        assert_eq!(install(), NAME.to_str().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("gather.db");
        let mut conn = open(&db, install()).await;
        sqlx::query("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        // The first frame after the open tells where the next ones go.
        insert(&mut conn, 0..1, 10).await;

        let (writes, len) = (log_writes(&mut conn).await, log_len(&db));
        insert(&mut conn, 1..21, 1000).await;
        let frames = (log_len(&db) - len) / FRAME;
        assert!(frames >= 10, "20 rows of 1,000 bytes took {frames} frames");
        assert_eq!(log_writes(&mut conn).await - writes, 1, "{frames} frames");

        let (writes, len) = (log_writes(&mut conn).await, log_len(&db));
        insert(&mut conn, 21..321, 1000).await;
        let frames = (log_len(&db) - len) / FRAME;
        let per_write = HOLD_AT_MOST as u64 / FRAME + 1;
        let expected = frames.div_ceil(per_write) as usize;
        assert!(frames > 2 * per_write, "300 rows took {frames} frames");
        assert_eq!(
            log_writes(&mut conn).await - writes,
            expected,
            "{frames} frames"
        );
    }

    /// What the log holds once each commit returned is a whole log: a copy
    /// taken then, recovered by plain SQLite, has every committed row and
    /// none of a rolled-back transaction, through pages spilled before a
    /// commit, frames overwritten in place and their checksums rewritten.
    #[tokio::test]
    async fn the_log_after_each_commit_is_recovered_whole() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("whole.db");
        let mut conn = open(&db, install()).await;
        // A tiny cache: a big transaction spills pages into the log before
        // its commit and then writes some of them again.
        sqlx::query("PRAGMA cache_size = 8")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        for k in 0..50 {
            insert(&mut conn, k..k + 1, 300).await;
        }
        insert(&mut conn, 50..1050, 1500).await;
        {
            let mut tx = conn.begin().await.unwrap();
            for k in 2000..2600 {
                sqlx::query("INSERT INTO t (k, v) VALUES (?, ?)")
                    .bind(k)
                    .bind(vec![7u8; 1500])
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            sqlx::query("UPDATE t SET v = zeroblob(10) WHERE k < 50")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.rollback().await.unwrap();
        }
        for k in 3000..3020 {
            insert(&mut conn, k..k + 1, 300).await;
        }
        sqlx::query("UPDATE t SET v = zeroblob(20) WHERE k >= 1000 AND k < 1050")
            .execute(&mut conn)
            .await
            .unwrap();
        assert!(log_writes(&mut conn).await > 0);

        let copy = dir.path().join("copy.db");
        std::fs::copy(&db, &copy).unwrap();
        let (mut wal, mut copy_wal) = (db.into_os_string(), copy.clone().into_os_string());
        wal.push("-wal");
        copy_wal.push("-wal");
        std::fs::copy(&wal, &copy_wal).unwrap();

        let mut plain =
            SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&copy))
                .await
                .unwrap();
        let check: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut plain)
            .await
            .unwrap();
        assert_eq!(check, "ok");
        let (rows, bytes, outside): (i64, i64, i64) =
            sqlx::query_as("SELECT count(*), sum(length(v)), sum(k >= 2000 AND k < 2600) FROM t")
                .fetch_one(&mut plain)
                .await
                .unwrap();
        assert_eq!(rows, 50 + 1000 + 20);
        assert_eq!(bytes, 50 * 300 + 950 * 1500 + 50 * 20 + 20 * 300);
        assert_eq!(outside, 0, "rows of the rolled-back transaction");
        let mismatched: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM t WHERE length(v) > 20 AND
                 hex(v) != replace(hex(zeroblob(length(v))), '00', printf('%02X', k % 251))",
        )
        .fetch_one(&mut plain)
        .await
        .unwrap();
        assert_eq!(mismatched, 0);
    }
}
