//! The SQLite writer's hot path, run on the writer's own thread.
//!
//! sqlx runs each connection on a worker thread of its own and hands it
//! every statement over a channel, so each round of the writer cost two
//! hand-offs between threads, and at 1,000 notifies a second each notify is
//! a round of its own, so those hand-offs stood in the way of every
//! delivery. sqlx also lends the connection's handle out of its worker
//! (`SqliteConnection::lock_handle`) for direct calls. While the writer
//! holds that handle, its rounds of plain messages and its session
//! positions, the writes that come in by the thousand, are prepared
//! statements stepped here, a row at a time, in one transaction. Everything
//! else goes through sqlx as before (see `sqlite::run_writer`).

use super::StoredMessage;
use libsqlite3_sys as ffi;
use sqlx::sqlite::LockedSqliteHandle;
use std::ffi::{c_int, CStr};
use std::marker::PhantomData;
use std::ptr::NonNull;

const INSERT_MESSAGE: &CStr =
    c"INSERT INTO messages (id, mailbox, type, data, accepted_ms, visible_ms, seq)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
const UPSERT_POSITION: &CStr = c"INSERT INTO session_positions (session, mailbox, seq, updated_ms)
     VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT (session) DO UPDATE
     SET seq = max(seq, excluded.seq), updated_ms = excluded.updated_ms";

/// The writer's prepared statements, usable while the handle stays lent:
/// they borrow it, and are finalized before it goes back to sqlx (which
/// refuses to close a connection with statements still open).
pub struct Direct<'h> {
    begin: Statement,
    commit: Statement,
    rollback: Statement,
    insert_message: Statement,
    upsert_position: Statement,
    _lent: PhantomData<&'h mut ()>,
}

/// A position to store: session, mailbox, seq, when it was saved.
pub type PositionRow<'a> = (&'a str, &'a str, i64, i64);

impl<'h> Direct<'h> {
    pub fn prepare(handle: &'h mut LockedSqliteHandle<'_>) -> Result<Self, String> {
        let db = handle.as_raw_handle();
        Ok(Direct {
            begin: Statement::prepare(db, c"BEGIN")?,
            commit: Statement::prepare(db, c"COMMIT")?,
            rollback: Statement::prepare(db, c"ROLLBACK")?,
            insert_message: Statement::prepare(db, INSERT_MESSAGE)?,
            upsert_position: Statement::prepare(db, UPSERT_POSITION)?,
            _lent: PhantomData,
        })
    }

    /// Store `rows` (mailbox, message, its `seq` given) in one
    /// transaction. All or nothing.
    pub fn insert_messages(&mut self, rows: &[(String, StoredMessage)]) -> Result<(), String> {
        self.in_transaction(rows.len(), |d| {
            for (mailbox, m) in rows {
                let s = &mut d.insert_message;
                s.bind_text(1, &m.id)?;
                s.bind_text(2, mailbox)?;
                s.bind_i64(3, m.kind)?;
                s.bind_text(4, &m.data)?;
                s.bind_i64(5, m.accepted_ms)?;
                s.bind_i64(6, m.visible_ms)?;
                s.bind_i64(7, m.seq)?;
                s.run()?;
            }
            Ok(())
        })
    }

    /// Store `positions` in one transaction, each keeping the larger seq.
    pub fn upsert_positions(&mut self, positions: &[PositionRow<'_>]) -> Result<(), String> {
        self.in_transaction(positions.len(), |d| {
            for &(session, mailbox, seq, saved_ms) in positions {
                let s = &mut d.upsert_position;
                s.bind_text(1, session)?;
                s.bind_text(2, mailbox)?;
                s.bind_i64(3, seq)?;
                s.bind_i64(4, saved_ms)?;
                s.run()?;
            }
            Ok(())
        })
    }

    /// Run `body`; in a transaction when it writes more than one row, as a
    /// single statement is atomic by itself.
    fn in_transaction(
        &mut self,
        rows: usize,
        body: impl FnOnce(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        if rows <= 1 {
            return body(self);
        }
        self.begin.run()?;
        let outcome = body(self).and_then(|()| self.commit.run());
        if outcome.is_err() {
            // Still in the transaction when the failure was before COMMIT,
            // or COMMIT failed and left it open; else this fails harmlessly.
            let _ = self.rollback.run();
        }
        outcome
    }
}

/// One prepared statement on the lent handle.
struct Statement {
    db: NonNull<ffi::sqlite3>,
    raw: NonNull<ffi::sqlite3_stmt>,
}

impl Statement {
    fn prepare(db: NonNull<ffi::sqlite3>, sql: &CStr) -> Result<Statement, String> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: `db` is the lent handle; `sql` is NUL-terminated.
        let code = unsafe {
            ffi::sqlite3_prepare_v3(
                db.as_ptr(),
                sql.as_ptr(),
                -1,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut raw,
                std::ptr::null_mut(),
            )
        };
        match NonNull::new(raw) {
            Some(raw) if code == ffi::SQLITE_OK => Ok(Statement { db, raw }),
            _ => Err(failure(db, code, "prepare")),
        }
    }

    fn bind_text(&mut self, index: c_int, text: &str) -> Result<(), String> {
        let len = c_int::try_from(text.len()).map_err(|_| "a text too long for SQLite")?;
        // SAFETY: SQLITE_TRANSIENT makes SQLite copy the text before this
        // returns, so it never points at memory freed later.
        let code = unsafe {
            ffi::sqlite3_bind_text(
                self.raw.as_ptr(),
                index,
                text.as_ptr().cast(),
                len,
                ffi::SQLITE_TRANSIENT(),
            )
        };
        self.check(code, "bind")
    }

    fn bind_i64(&mut self, index: c_int, value: i64) -> Result<(), String> {
        // SAFETY: a prepared statement of the lent handle.
        let code = unsafe { ffi::sqlite3_bind_int64(self.raw.as_ptr(), index, value) };
        self.check(code, "bind")
    }

    /// Step a statement that returns no rows to its end, and reset it.
    fn run(&mut self) -> Result<(), String> {
        // SAFETY: a prepared statement of the lent handle.
        let code = unsafe { ffi::sqlite3_step(self.raw.as_ptr()) };
        // The step's error, if any, is also what reset returns; the error
        // message is read before reset.
        let outcome = match code {
            ffi::SQLITE_DONE => Ok(()),
            code => Err(failure(self.db, code, "step")),
        };
        // SAFETY: as above.
        unsafe { ffi::sqlite3_reset(self.raw.as_ptr()) };
        outcome
    }

    fn check(&self, code: c_int, what: &str) -> Result<(), String> {
        match code {
            ffi::SQLITE_OK => Ok(()),
            code => Err(failure(self.db, code, what)),
        }
    }
}

impl Drop for Statement {
    fn drop(&mut self) {
        // SAFETY: the statement's `Direct` still borrows the lent handle.
        unsafe { ffi::sqlite3_finalize(self.raw.as_ptr()) };
    }
}

/// SQLite's own words for a failure, with its extended code.
fn failure(db: NonNull<ffi::sqlite3>, code: c_int, what: &str) -> String {
    // SAFETY: the lent handle; sqlite3_errmsg always returns a C string,
    // valid until the next call on the handle, and it is copied at once.
    let message = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(db.as_ptr())) };
    // SAFETY: as above.
    let extended = unsafe { ffi::sqlite3_extended_errcode(db.as_ptr()) };
    format!(
        "sqlite {what} failed: {} (code {code}, extended {extended})",
        message.to_string_lossy()
    )
}

// SAFETY: sqlx opens the connection in SQLite's multi-thread mode, where a
// connection may move between threads as long as one thread at a time uses
// it; the lent handle, which `Direct` borrows, guarantees that.
unsafe impl Send for Direct<'_> {}
