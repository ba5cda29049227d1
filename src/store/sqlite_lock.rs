//! One node per SQLite file. Every connection of the store opens the file
//! through SQLite's `unix-excl` VFS: the first takes a lock of the whole
//! file for the process, and from then on the process's connections
//! coordinate in memory, the WAL index in the heap instead of a `-shm`
//! file. So no commit locks anything in the kernel: before, each made six
//! `fcntl` calls on the WAL index (docs/benchmarks/NOTES.md, ²³).
//!
//! Another process cannot open the file while the node runs. A second node
//! on the same file must not run anyway: each node keeps the newest
//! messages and the session positions in memory, and wakes only its own
//! polls. [`holder`] names the process that has the file, so that such a
//! start fails at once with its pid instead of after the busy timeout.

use std::path::Path;

/// The VFS the store's connections open the file through: the base of
/// [`super::sqlite_vfs`], and what they use when that cannot register.
pub const VFS: &str = "unix-excl";

/// SQLite's lock bytes (`SHARED_FIRST`, `SHARED_SIZE` in `os_unix.c`): a
/// process on `unix-excl` holds a write lock on all of them; a reader on
/// the default VFS, a read lock on one.
const SHARED_FIRST: libc::off_t = 0x4000_0000 + 2;
const SHARED_SIZE: libc::off_t = 510;

/// The pid of another process that holds SQLite's exclusive lock on `path`,
/// if one does (none when the file does not exist yet).
///
/// Call it before the process's first connection to the file: closing any
/// descriptor of a file drops every POSIX lock the process holds on it, so
/// a probe while the store is open would give up the store's lock.
pub fn holder(path: &Path) -> std::io::Result<Option<libc::pid_t>> {
    use std::os::fd::AsRawFd;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // SAFETY: a zeroed flock is a valid value of the C struct; the fields
    // that matter are set below.
    let mut probe: libc::flock = unsafe { std::mem::zeroed() };
    probe.l_type = libc::F_RDLCK as libc::c_short;
    probe.l_whence = libc::SEEK_SET as libc::c_short;
    probe.l_start = SHARED_FIRST;
    probe.l_len = SHARED_SIZE;
    // SAFETY: the descriptor is open for the call, and F_GETLK writes only
    // into the flock it is given.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut probe) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((probe.l_type != libc::F_UNLCK as libc::c_short).then_some(probe.l_pid))
}
