//! The Maildir watcher: a file that appears in `new/` of any folder of any
//! mailbox under `PNS_MAILDIR_ROOT` becomes a type 70 ("new mail") message
//! for that mailbox's user, handed to [`Ingest::accept`] like every other
//! way in.
//!
//! How it finds mail:
//! - Mailboxes are found by walking the tree along a [`Pattern`]
//!   (`{domain}/{localpart}/Maildir` by default). Every directory on the way
//!   is watched (inotify, through the `notify` crate), so a new domain, user,
//!   mailbox or folder is picked up as soon as it is created.
//! - In each mailbox the folders are INBOX (the Maildir itself) and the
//!   Maildir++ subfolders `.Name` (`.Sent.2024` is the folder `Sent/2024`,
//!   each level decoded from IMAP modified UTF-7). Their `new/` directories
//!   are watched; a file created in or renamed into one is news.
//! - A full rescan every `PNS_MAILDIR_RESCAN_SECS` catches what events missed
//!   (an overflowing event queue, the inotify watch limit, a mailbox created
//!   between two looks) and forgets what is gone.
//!
//! Invariants:
//! - Each file is notified once. Its dedup key is the folder and the Maildir
//!   unique name (the file name before `:2,`), so the rename into `cur/`, a
//!   rescan or a restart finds the key already stored; in memory, names
//!   already handled are not even read again.
//! - What arrives together is stored together: paths are collected for a few
//!   milliseconds and accepted up to 1000 at a time.
//! - A file is news when its modification time (the delivery time, for an
//!   MDA) is not older than the watch: on the very first start (no state
//!   file), what already sits in `new/` is taken as known, not notified;
//!   after a restart, files delivered since shortly before the previous
//!   run's last full scan are looked at again (the store drops the
//!   duplicates), so mail delivered while PNS was down is notified. Old mail
//!   moved into `new/` later (a migration, a restore) is not notified.
//! - A file that cannot be read or is no mail message is logged and skipped;
//!   nothing here panics or stops the watcher. Mail content (subjects) is
//!   logged at debug level only.

use super::mime::{self, MailSummary, MimeError};
use super::{Ingest, Source};
use crate::shutdown::Shutdown;
use crate::store::NewMessage;
use notify::event::{ModifyKind, RenameMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};
use tokio::runtime::Handle;

/// Where mailboxes are under the root, unless `PNS_MAILDIR_PATTERN` says otherwise.
pub const DEFAULT_PATTERN: &str = "{domain}/{localpart}/Maildir";
/// Seconds between two full rescans, unless `PNS_MAILDIR_RESCAN_SECS` says otherwise.
pub const DEFAULT_RESCAN_SECS: u64 = 60;
/// The file in the data directory that remembers the last full scan.
pub const STATE_FILE: &str = "maildir-watcher.json";
/// Bytes read of one message file at most: the header and the first text
/// part fit, attachments further down are not needed for a snippet.
pub const MAX_READ_BYTES: u64 = 256 * 1024;
/// How long paths are collected after the first one before a batch is made.
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// Messages per `accept` call at most (the internal API's batch limit too).
const MAX_BATCH: usize = crate::wire::MAX_BATCH;
/// After a restart, files this much older than the last full scan are looked
/// at again: clocks, timestamp granularity and the scan's own duration.
const CATCH_UP_MARGIN_MS: i64 = 120_000;
/// Paths queued between the event thread and the worker; past this the
/// worker is told to rescan rather than the event thread blocking.
const QUEUE: usize = 65_536;
/// How often the worker looks at the shutdown token while idle.
const IDLE_TICK: Duration = Duration::from_millis(250);
/// Retries of a batch the store refused start at this delay and double.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Longest dedup key the internal API takes; longer ones are hashed.
const MAX_DEDUP_KEY_LEN: usize = 256;
/// Longest user (mailbox address) taken, as in the internal API.
const MAX_USER_LEN: usize = 320;

// ---------------------------------------------------------------------------
// Configuration

/// One path component of a [`Pattern`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Domain,
    Localpart,
    User,
}

/// Where a mailbox's Maildir lies below the root, e.g.
/// `{domain}/{localpart}/Maildir` or `{user}/Maildir`.
///
/// Each `/`-separated component is either a literal name or exactly one of
/// the placeholders `{domain}`, `{localpart}` or `{user}`. A pattern has
/// `{localpart}` (with or without `{domain}`) or `{user}` (alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    parts: Vec<Part>,
    text: String,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let trimmed = text.trim().trim_end_matches('/');
        if trimmed.is_empty() {
            return Err("the pattern is empty".into());
        }
        if trimmed.starts_with('/') {
            return Err(format!(
                "{trimmed:?} must be relative to PNS_MAILDIR_ROOT (no leading /)"
            ));
        }
        let mut parts = Vec::new();
        for comp in trimmed.split('/') {
            let part = match comp {
                "" | "." | ".." => {
                    return Err(format!(
                        "{trimmed:?}: {comp:?} is not allowed as a path component"
                    ))
                }
                "{domain}" => Part::Domain,
                "{localpart}" => Part::Localpart,
                "{user}" => Part::User,
                other if other.contains(['{', '}']) => {
                    return Err(format!(
                        "{trimmed:?}: a placeholder ({{domain}}, {{localpart}} or {{user}}) must be a whole path component, not {other:?}"
                    ))
                }
                other => Part::Literal(other.to_owned()),
            };
            if !matches!(part, Part::Literal(_)) && parts.contains(&part) {
                return Err(format!("{trimmed:?}: {comp} appears twice"));
            }
            parts.push(part);
        }
        let has = |p: Part| parts.contains(&p);
        match (has(Part::User), has(Part::Localpart), has(Part::Domain)) {
            (true, false, false) | (false, true, _) => {}
            (true, _, _) => {
                return Err(format!(
                    "{trimmed:?}: {{user}} is the whole address; do not combine it with {{localpart}} or {{domain}}"
                ))
            }
            (false, false, _) => {
                return Err(format!(
                    "{trimmed:?} needs {{localpart}} or {{user}} to tell whose mailbox it is"
                ))
            }
        }
        Ok(Pattern {
            parts,
            text: trimmed.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Default for Pattern {
    fn default() -> Self {
        // The default is a literal known to parse.
        Pattern::parse(DEFAULT_PATTERN).unwrap_or(Pattern {
            parts: vec![Part::User],
            text: "{user}".into(),
        })
    }
}

/// The watcher's settings, resolved by [`crate::config`].
#[derive(Debug, Clone)]
pub struct MaildirConfig {
    pub root: PathBuf,
    pub pattern: Pattern,
    /// Appended to a bare `{user}` or a `{localpart}` without `{domain}`.
    pub default_domain: Option<String>,
    pub rescan: Duration,
    /// Where the time of the last full scan is kept, to catch up after a restart.
    pub state_file: PathBuf,
}

// ---------------------------------------------------------------------------
// Mailbox names

/// The values the placeholders took on the way down to a mailbox.
#[derive(Debug, Clone, Default)]
struct Bindings {
    domain: Option<String>,
    localpart: Option<String>,
    user: Option<String>,
}

impl Bindings {
    fn with(&self, part: &Part, value: &str) -> Bindings {
        let mut b = self.clone();
        match part {
            Part::Domain => b.domain = Some(value.to_owned()),
            Part::Localpart => b.localpart = Some(value.to_owned()),
            Part::User => b.user = Some(value.to_owned()),
            Part::Literal(_) => {}
        }
        b
    }

    /// The user the mailbox belongs to, `None` when the names do not make a
    /// usable address.
    fn user(&self, default_domain: Option<&str>) -> Option<String> {
        let user = match (&self.user, &self.localpart) {
            (Some(u), _) if u.contains('@') => u.clone(),
            (Some(u), _) => match default_domain {
                Some(d) => format!("{u}@{d}"),
                None => u.clone(),
            },
            (None, Some(l)) => match self.domain.as_deref().or(default_domain) {
                Some(d) => format!("{l}@{d}"),
                None => l.clone(),
            },
            (None, None) => return None,
        };
        let usable = !user.is_empty()
            && user.len() <= MAX_USER_LEN
            && !user.chars().any(|c| c.is_control() || c.is_whitespace());
        usable.then_some(user)
    }
}

/// The IMAP name of a Maildir++ subfolder directory: `.Sent.2024` →
/// `Sent/2024`, each level decoded from modified UTF-7
/// (`.&ZeVnLIqe-` → `日本語`).
pub fn folder_name(dir_name: &str) -> String {
    let inner = dir_name.strip_prefix('.').unwrap_or(dir_name);
    inner
        .split('.')
        .map(mime::decode_modified_utf7)
        .collect::<Vec<_>>()
        .join("/")
}

/// The Maildir unique name of a file: its name without the `:2,…` info.
pub fn unique_name(file_name: &str) -> &str {
    file_name.split(':').next().unwrap_or(file_name)
}

/// The dedup key of a file: folder and unique name, hashed when too long.
pub fn dedup_key(folder: &str, unique: &str) -> String {
    let key = format!("maildir:{folder}:{unique}");
    if key.len() <= MAX_DEDUP_KEY_LEN {
        return key;
    }
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{folder}\0{unique}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("maildir:sha256:{hex}")
}

/// Unseen messages of a folder: every file in `new/`, and the files in
/// `cur/` whose info (after `:2,`) has no `S` (seen) flag.
pub fn count_unseen(folder_dir: &Path) -> u64 {
    let names = |sub: &str| -> Vec<String> {
        std::fs::read_dir(folder_dir.join(sub))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    };
    let new = names("new").len() as u64;
    let cur = names("cur")
        .iter()
        .filter(|n| {
            !n.split_once(":2,")
                .is_some_and(|(_, flags)| flags.contains('S'))
        })
        .count() as u64;
    new + cur
}

/// Parse a message file's bytes; a header with no body after it (or cut off
/// at [`MAX_READ_BYTES`]) is read as a message without body.
fn summarize(raw: &[u8]) -> Result<MailSummary, MimeError> {
    match mime::summarize(raw) {
        Err(MimeError::NoSeparator) => {
            let mut whole = raw.to_vec();
            whole.extend_from_slice(b"\n\n");
            mime::summarize(&whole)
        }
        other => other,
    }
}

/// The `data` of the type 70 message for one file.
fn message_data(folder: &str, summary: &MailSummary, unseen: u64) -> String {
    let mut data = serde_json::Map::new();
    data.insert("folder".into(), folder.into());
    let mut put = |key: &str, value: &Option<String>| {
        if let Some(v) = value {
            data.insert(key.into(), v.as_str().into());
        }
    };
    put("from", &summary.from);
    put("subject", &summary.subject);
    put("messageId", &summary.message_id);
    put("date", &summary.date);
    data.insert("snippet".into(), summary.snippet.as_str().into());
    data.insert("unseen".into(), unseen.into());
    serde_json::Value::Object(data).to_string()
}

/// The first [`MAX_READ_BYTES`] of a message file, and its modification time.
fn read_head(path: &Path) -> std::io::Result<(Vec<u8>, Option<i64>)> {
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_millis()).ok());
    let mut raw = Vec::new();
    file.take(MAX_READ_BYTES).read_to_end(&mut raw)?;
    Ok((raw, mtime))
}

fn is_dir(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_dir())
}

fn mtime_ms(path: &Path) -> Option<i64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    let d = modified.duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(d.as_millis()).ok()
}

/// Names of the entries of `dir` that are valid UTF-8.
fn entry_names(dir: &Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect())
}

// ---------------------------------------------------------------------------
// The state kept across restarts

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct State {
    root: PathBuf,
    pattern: String,
    /// When the last full scan that left nothing pending started.
    scanned_ms: i64,
}

/// From when on a file found in a folder the watcher had not seen yet counts
/// as new: shortly before the last full scan of the previous run, or on the
/// very first start, the start itself.
fn catch_up_since(cfg: &MaildirConfig, started_ms: i64) -> i64 {
    let previous = std::fs::read(&cfg.state_file)
        .ok()
        .and_then(|b| serde_json::from_slice::<State>(&b).ok())
        .filter(|s| s.root == cfg.root && s.pattern == cfg.pattern.as_str());
    match previous {
        Some(s) => {
            tracing::info!(
                since_ms = s.scanned_ms - CATCH_UP_MARGIN_MS,
                "maildir watcher: catching up on mail delivered since the last run"
            );
            s.scanned_ms - CATCH_UP_MARGIN_MS
        }
        None => {
            tracing::info!(
                "maildir watcher: first start here; mail already in new/ is taken as known, not notified"
            );
            // File times lag the wall clock by a few ms: take what the
            // first moments of this start delivered as new.
            started_ms - 1000
        }
    }
}

// ---------------------------------------------------------------------------
// The watcher

/// What the event thread tells the worker.
enum Msg {
    /// A file or directory was created in, or renamed into, a watched directory.
    Created(PathBuf),
    /// A watched directory may be gone.
    Removed(PathBuf),
    /// Events were lost: look at everything again.
    Rescan,
}

/// Run the watcher until shutdown. The work (directory walks, file reads) is
/// blocking and runs on a thread of its own; batches are stored through the
/// runtime.
pub async fn run(cfg: MaildirConfig, ingest: Ingest, started_ms: i64, shutdown: Shutdown) {
    let rt = Handle::current();
    let worker = tokio::task::spawn_blocking(move || {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let lost = Arc::new(AtomicBool::new(false));
        let fs = start_events(tx.clone(), lost.clone());
        let since_ms = catch_up_since(&cfg, started_ms);
        Worker {
            cfg,
            ingest,
            rt,
            shutdown,
            rx,
            _tx: tx,
            lost,
            fs,
            watched: HashSet::new(),
            limit_warned: false,
            root_warned: false,
            state_warned: false,
            dirs: HashMap::new(),
            folders: HashMap::new(),
            since_ms,
            retry: Vec::new(),
            retry_at: None,
            retry_delay: RETRY_FIRST,
        }
        .run()
    });
    if let Err(e) = worker.await {
        tracing::error!(error = %e, "the maildir watcher stopped unexpectedly");
    }
}

/// The inotify watcher, feeding `tx`. Its callback never blocks: when the
/// queue is full it marks events as lost, which makes the worker rescan.
fn start_events(tx: SyncSender<Msg>, lost: Arc<AtomicBool>) -> Option<RecommendedWatcher> {
    let handler = move |res: notify::Result<Event>| {
        let event = match res {
            Ok(event) => event,
            Err(e) => {
                tracing::debug!(error = %e, "filesystem event error; rescanning");
                lost.store(true, Ordering::Relaxed);
                let _ = tx.try_send(Msg::Rescan);
                return;
            }
        };
        if event.need_rescan() {
            lost.store(true, Ordering::Relaxed);
            let _ = tx.try_send(Msg::Rescan);
            return;
        }
        let msg = match event.kind {
            EventKind::Create(_)
            | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Any)) => {
                event.paths.into_iter().next().map(Msg::Created)
            }
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
                event.paths.into_iter().next().map(Msg::Removed)
            }
            _ => None,
        };
        if let Some(msg) = msg {
            if let Err(TrySendError::Full(_)) = tx.try_send(msg) {
                lost.store(true, Ordering::Relaxed);
            }
        }
    };
    match notify::recommended_watcher(handler) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(
                error = %e,
                "maildir watcher: no filesystem events (is fs.inotify.max_user_instances reached?); \
                 new mail is found by the periodic rescan only"
            );
            None
        }
    }
}

/// A directory on the way down to mailboxes, and what is known there.
#[derive(Debug, Clone)]
struct Level {
    /// Index into the pattern's parts; `parts.len()` is a Maildir itself,
    /// one more a `.Name` subfolder that has no `new/` yet.
    depth: usize,
    bindings: Bindings,
    /// Resolved at the Maildir level.
    user: Option<String>,
}

#[derive(Debug)]
struct Folder {
    user: String,
    /// IMAP name: `INBOX`, `Sent/2024`.
    name: String,
    /// The directory holding `new/` and `cur/`.
    dir: PathBuf,
}

#[derive(Debug)]
struct FolderState {
    folder: Arc<Folder>,
    /// Unique names of the files in `new/` already handled.
    known: HashSet<String>,
    unreadable_warned: bool,
}

/// What a walk found.
#[derive(Default)]
struct Scan {
    dirs: HashSet<PathBuf>,
    /// `new/` directories of every folder found.
    folders: Vec<PathBuf>,
}

struct Worker {
    cfg: MaildirConfig,
    ingest: Ingest,
    rt: Handle,
    shutdown: Shutdown,
    rx: Receiver<Msg>,
    /// Keeps the channel open when there is no event thread.
    _tx: SyncSender<Msg>,
    lost: Arc<AtomicBool>,
    fs: Option<RecommendedWatcher>,
    /// Directories with an inotify watch.
    watched: HashSet<PathBuf>,
    limit_warned: bool,
    root_warned: bool,
    state_warned: bool,
    /// Directories on the way to (and including) Maildirs, watched for new children.
    dirs: HashMap<PathBuf, Level>,
    /// Folders, by their `new/` directory.
    folders: HashMap<PathBuf, FolderState>,
    /// Files modified before this are not news: on the very first start
    /// the start itself, after a restart shortly before the previous run's
    /// last full scan. Old mail moved into `new/` (a migration, a restore)
    /// is not notified.
    since_ms: i64,
    /// Files whose batch the store could not take, to try again.
    retry: Vec<PathBuf>,
    retry_at: Option<Instant>,
    retry_delay: Duration,
}

impl Worker {
    fn run(mut self) {
        self.full_scan();
        tracing::info!(
            root = %self.cfg.root.display(),
            pattern = self.cfg.pattern.as_str(),
            folders = self.folders.len(),
            watches = self.watched.len(),
            "maildir watcher started"
        );
        let mut next_scan = Instant::now() + self.cfg.rescan;
        while !self.shutdown.is_triggered() {
            let now = Instant::now();
            if now >= next_scan || self.lost.swap(false, Ordering::Relaxed) {
                self.drain_queue();
                self.full_scan();
                next_scan = Instant::now() + self.cfg.rescan;
                continue;
            }
            if self.retry_at.is_some_and(|at| now >= at) {
                self.retry_at = None;
                let paths = std::mem::take(&mut self.retry);
                self.handle(paths, Vec::new());
                continue;
            }
            let mut wake = next_scan.min(now + IDLE_TICK);
            if let Some(at) = self.retry_at {
                wake = wake.min(at);
            }
            match self.rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(first) => {
                    let mut created = Vec::new();
                    let mut removed = Vec::new();
                    sort(first, &mut created, &mut removed, &self.lost);
                    let until = Instant::now() + BATCH_WINDOW;
                    while created.len() < MAX_BATCH {
                        let left = until.saturating_duration_since(Instant::now());
                        match self.rx.recv_timeout(left) {
                            Ok(msg) => sort(msg, &mut created, &mut removed, &self.lost),
                            Err(_) => break,
                        }
                    }
                    self.handle(created, removed);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(IDLE_TICK),
            }
        }
        tracing::debug!("maildir watcher stopped");
    }

    /// Drop queued events: a full scan is about to look at everything.
    fn drain_queue(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            if let Msg::Removed(path) = msg {
                self.forget(&path);
            }
        }
    }

    /// Events for watched directories that disappeared: forget them, so that
    /// a directory created again under the same name is watched again.
    fn forget(&mut self, path: &Path) {
        if self.watched.remove(path) {
            self.dirs.remove(path);
            self.folders.remove(path);
        }
    }

    /// Handle a batch of created paths: new directories extend the tree, new
    /// files in `new/` become messages.
    fn handle(&mut self, created: Vec<PathBuf>, removed: Vec<PathBuf>) {
        for path in &removed {
            self.forget(path);
        }
        let mut files = Vec::new();
        let mut scan = Scan::default();
        for path in created {
            let Some(parent) = path.parent() else {
                continue;
            };
            if self.folders.contains_key(parent) {
                files.push(path);
            } else if let Some(level) = self.dirs.get(parent).cloned() {
                self.child(parent.to_path_buf(), &level, &path, &mut scan);
            }
        }
        for new_dir in scan.folders {
            files.extend(self.listing(&new_dir, false));
        }
        self.process(files);
    }

    /// Walk the whole tree: watch what is new, list every `new/`, forget
    /// what is gone, and save the scan's time when nothing is left pending.
    fn full_scan(&mut self) {
        let started_ms = crate::clock::now_ms();
        let mut scan = Scan::default();
        let root = self.cfg.root.clone();
        if is_dir(&root) {
            self.root_warned = false;
            let level = Level {
                depth: 0,
                bindings: Bindings::default(),
                user: None,
            };
            self.walk(root, level, &mut scan);
        } else if !self.root_warned {
            tracing::warn!(
                root = %root.display(),
                "PNS_MAILDIR_ROOT is not a directory (yet); looking again at each rescan"
            );
            self.root_warned = true;
        }
        let found: HashSet<&PathBuf> = scan.folders.iter().collect();
        self.dirs.retain(|d, _| scan.dirs.contains(d));
        self.folders.retain(|d, _| found.contains(d));
        let gone: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|d| !scan.dirs.contains(*d) && !found.contains(d))
            .cloned()
            .collect();
        for dir in gone {
            self.watched.remove(&dir);
            if let Some(fs) = self.fs.as_mut() {
                let _ = fs.unwatch(&dir);
            }
        }
        let mut files = Vec::new();
        for new_dir in &scan.folders {
            files.extend(self.listing(new_dir, true));
        }
        let pending_before = !self.retry.is_empty();
        let ok = self.process(files) && !pending_before;
        if ok {
            self.save_state(started_ms);
        }
    }

    /// Go down one directory of the pattern.
    fn walk(&mut self, dir: PathBuf, level: Level, scan: &mut Scan) {
        let n = self.cfg.pattern.parts.len();
        self.watch(&dir);
        self.dirs.insert(dir.clone(), level.clone());
        scan.dirs.insert(dir.clone());
        if level.depth >= n {
            self.maildir(&dir, &level, scan);
            return;
        }
        let part = self.cfg.pattern.parts[level.depth].clone();
        match &part {
            Part::Literal(name) => {
                let child = dir.join(name);
                if is_dir(&child) {
                    let next = Level {
                        depth: level.depth + 1,
                        ..level.clone()
                    };
                    self.descend(child, next, scan);
                }
            }
            placeholder => {
                let names = match entry_names(&dir) {
                    Ok(names) => names,
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "cannot list a Maildir directory");
                        return;
                    }
                };
                for name in names {
                    if name.starts_with('.') {
                        continue;
                    }
                    let child = dir.join(&name);
                    if is_dir(&child) {
                        let next = Level {
                            depth: level.depth + 1,
                            bindings: level.bindings.with(placeholder, &name),
                            user: None,
                        };
                        self.descend(child, next, scan);
                    }
                }
            }
        }
    }

    /// Enter a directory one level down; at the Maildir level, resolve the user.
    fn descend(&mut self, dir: PathBuf, mut level: Level, scan: &mut Scan) {
        if level.depth == self.cfg.pattern.parts.len() {
            level.user = level.bindings.user(self.cfg.default_domain.as_deref());
            if level.user.is_none() {
                tracing::debug!(dir = %dir.display(), "not a mailbox: its names make no usable address");
                return;
            }
        }
        self.walk(dir, level, scan);
    }

    /// A Maildir: INBOX is the Maildir itself, `.Name` directories are subfolders.
    fn maildir(&mut self, dir: &Path, level: &Level, scan: &mut Scan) {
        let Some(user) = level.user.clone() else {
            return;
        };
        if level.depth > self.cfg.pattern.parts.len() {
            // A subfolder that had no new/ when last looked at.
            if let Some(name) = dir.file_name().and_then(|n| n.to_str()) {
                if is_dir(&dir.join("new")) {
                    self.add_folder(dir, &user, folder_name(name), scan);
                }
            }
            return;
        }
        if is_dir(&dir.join("new")) {
            self.add_folder(dir, &user, "INBOX".into(), scan);
        }
        let names = match entry_names(dir) {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot list a Maildir");
                return;
            }
        };
        for name in names {
            if name.starts_with('.') && name != "." && name != ".." {
                let sub = dir.join(&name);
                if is_dir(&sub) {
                    self.subfolder(&sub, &name, &user, level, scan);
                }
            }
        }
    }

    fn subfolder(&mut self, dir: &Path, name: &str, user: &str, level: &Level, scan: &mut Scan) {
        if is_dir(&dir.join("new")) {
            self.add_folder(dir, user, folder_name(name), scan);
        } else {
            // Watch it until its new/ is made.
            self.watch(dir);
            scan.dirs.insert(dir.to_path_buf());
            self.dirs.insert(
                dir.to_path_buf(),
                Level {
                    depth: self.cfg.pattern.parts.len() + 1,
                    ..level.clone()
                },
            );
        }
    }

    /// A directory appeared in a watched directory of the tree.
    fn child(&mut self, parent: PathBuf, level: &Level, path: &Path, scan: &mut Scan) {
        let n = self.cfg.pattern.parts.len();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return;
        };
        if !is_dir(path) {
            return;
        }
        if level.depth < n {
            match &self.cfg.pattern.parts[level.depth] {
                Part::Literal(lit) if lit == name => {
                    let next = Level {
                        depth: level.depth + 1,
                        ..level.clone()
                    };
                    self.descend(path.to_path_buf(), next, scan);
                }
                Part::Literal(_) => {}
                placeholder if !name.starts_with('.') => {
                    let next = Level {
                        depth: level.depth + 1,
                        bindings: level.bindings.with(placeholder, name),
                        user: None,
                    };
                    self.descend(path.to_path_buf(), next, scan);
                }
                _ => {}
            }
            return;
        }
        let Some(user) = level.user.clone() else {
            return;
        };
        if level.depth == n {
            if name == "new" {
                self.add_folder(&parent, &user, "INBOX".into(), scan);
            } else if name.starts_with('.') {
                self.subfolder(path, name, &user, level, scan);
            }
        } else if name == "new" {
            if let Some(dir_name) = parent.file_name().and_then(|n| n.to_str()) {
                let folder = folder_name(dir_name);
                self.add_folder(&parent, &user, folder, scan);
            }
        }
    }

    fn add_folder(&mut self, dir: &Path, user: &str, name: String, scan: &mut Scan) {
        let new_dir = dir.join("new");
        // Watch before listing, so that no file falls between the two.
        self.watch(&new_dir);
        scan.folders.push(new_dir.clone());
        if let std::collections::hash_map::Entry::Vacant(slot) = self.folders.entry(new_dir) {
            tracing::debug!(user, folder = %name, "maildir folder found");
            slot.insert(FolderState {
                folder: Arc::new(Folder {
                    user: user.to_owned(),
                    name,
                    dir: dir.to_path_buf(),
                }),
                known: HashSet::new(),
                unreadable_warned: false,
            });
        }
    }

    /// The files of `new/` not handled yet; those older than the catch-up
    /// time are taken as known without being read. With `prune`, names no
    /// longer in `new/` are forgotten.
    fn listing(&mut self, new_dir: &Path, prune: bool) -> Vec<PathBuf> {
        let since_ms = self.since_ms;
        let Some(state) = self.folders.get_mut(new_dir) else {
            return Vec::new();
        };
        let names = match entry_names(new_dir) {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!(dir = %new_dir.display(), error = %e, "cannot list a Maildir folder");
                return Vec::new();
            }
        };
        if prune {
            let present: HashSet<&str> = names.iter().map(|n| unique_name(n)).collect();
            state.known.retain(|u| present.contains(u.as_str()));
        }
        let mut files = Vec::new();
        for name in names {
            if name.starts_with('.') {
                continue;
            }
            let unique = unique_name(&name);
            if state.known.contains(unique) {
                continue;
            }
            let path = new_dir.join(&name);
            if mtime_ms(&path).is_some_and(|t| t < since_ms) {
                state.known.insert(unique.to_owned());
                continue;
            }
            files.push(path);
        }
        files
    }

    /// Read, parse and store files of `new/` directories; false when some
    /// could not be read or stored (they are tried again later).
    fn process(&mut self, files: Vec<PathBuf>) -> bool {
        let mut all_ok = true;
        // Group by folder, keeping the order of arrival.
        let mut order: Vec<PathBuf> = Vec::new();
        let mut groups: HashMap<PathBuf, Vec<String>> = HashMap::new();
        for path in files {
            let (Some(dir), Some(name)) =
                (path.parent(), path.file_name().and_then(|n| n.to_str()))
            else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let names = groups.entry(dir.to_path_buf()).or_insert_with(|| {
                order.push(dir.to_path_buf());
                Vec::new()
            });
            names.push(name.to_owned());
        }
        let mut pending: Vec<(NewMessage, PathBuf, String)> = Vec::new();
        for new_dir in order {
            let names = groups.remove(&new_dir).unwrap_or_default();
            let Some(state) = self.folders.get_mut(&new_dir) else {
                continue;
            };
            let folder = state.folder.clone();
            let mut in_cur: Option<HashMap<String, String>> = None;
            let mut taken: HashSet<String> = HashSet::new();
            let mut summaries = Vec::new();
            for name in names {
                let unique = unique_name(&name).to_owned();
                if state.known.contains(&unique) || !taken.insert(unique.clone()) {
                    continue;
                }
                let path = new_dir.join(&name);
                let (raw, mtime) = match read_head(&path) {
                    Ok(read) => read,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        // Already moved to cur/ (an IMAP client had the
                        // folder open): still news, read it there.
                        let index = in_cur.get_or_insert_with(|| cur_index(&folder.dir));
                        match index
                            .get(&unique)
                            .map(|n| read_head(&folder.dir.join("cur").join(n)))
                        {
                            Some(Ok(read)) => read,
                            _ => continue,
                        }
                    }
                    Err(e) => {
                        if !state.unreadable_warned {
                            tracing::warn!(
                                file = %path.display(),
                                error = %e,
                                "cannot read a new message file (PNS needs read access to the Maildirs); \
                                 skipped, tried again at the next rescan"
                            );
                            state.unreadable_warned = true;
                        }
                        all_ok = false;
                        continue;
                    }
                };
                if mtime.is_some_and(|t| t < self.since_ms) {
                    // Old mail moved in (a migration, a restore): not news.
                    state.known.insert(unique);
                    continue;
                }
                match summarize(&raw) {
                    Ok(summary) => {
                        state.unreadable_warned = false;
                        tracing::debug!(
                            user = folder.user,
                            folder = folder.name,
                            subject = summary.subject.as_deref().unwrap_or(""),
                            "new mail in a Maildir"
                        );
                        summaries.push((unique, summary));
                    }
                    Err(e) => {
                        tracing::warn!(file = %path.display(), error = %e, "skipping a file in new/ that is no mail message");
                        state.known.insert(unique);
                    }
                }
            }
            if summaries.is_empty() {
                continue;
            }
            let unseen = count_unseen(&folder.dir);
            for (unique, summary) in summaries {
                let message = NewMessage {
                    user: folder.user.clone(),
                    kind: crate::wire::TYPE_NEW_MAIL,
                    data: message_data(&folder.name, &summary, unseen),
                    dedup_key: Some(dedup_key(&folder.name, &unique)),
                    delay_ms: 0,
                };
                pending.push((message, new_dir.clone(), unique));
            }
        }
        while !pending.is_empty() {
            let rest = pending.split_off(pending.len().min(MAX_BATCH));
            let chunk = std::mem::replace(&mut pending, rest);
            let (batch, done): (Vec<NewMessage>, Vec<(PathBuf, String)>) =
                chunk.into_iter().map(|(m, d, u)| (m, (d, u))).unzip();
            match self.rt.block_on(self.ingest.accept(batch, Source::Maildir)) {
                Ok(report) => {
                    tracing::debug!(
                        accepted = report.accepted,
                        duplicates = report.duplicates,
                        "maildir batch stored"
                    );
                    for (dir, unique) in done {
                        if let Some(state) = self.folders.get_mut(&dir) {
                            state.known.insert(unique);
                        }
                    }
                    self.retry_delay = RETRY_FIRST;
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        messages = done.len(),
                        retry_in_secs = self.retry_delay.as_secs(),
                        "cannot store new Maildir mail; trying again"
                    );
                    all_ok = false;
                    self.retry
                        .extend(done.into_iter().map(|(dir, unique)| dir.join(unique)));
                    self.retry_at = Some(Instant::now() + self.retry_delay);
                    self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
                }
            }
        }
        all_ok
    }

    fn watch(&mut self, dir: &Path) {
        if self.watched.contains(dir) {
            return;
        }
        let Some(fs) = self.fs.as_mut() else {
            return;
        };
        match fs.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                self.watched.insert(dir.to_path_buf());
            }
            Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                if !self.limit_warned {
                    tracing::warn!(
                        dir = %dir.display(),
                        watches = self.watched.len(),
                        rescan_secs = self.cfg.rescan.as_secs(),
                        "maildir watcher: the system's inotify watch limit is reached; folders without a \
                         watch get their new mail at the next rescan only. Raise the limit, e.g. \
                         `sysctl fs.inotify.max_user_watches=1048576` (and in /etc/sysctl.d/ to keep it)"
                    );
                    self.limit_warned = true;
                }
            }
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot watch a Maildir directory");
            }
        }
    }

    fn save_state(&mut self, scanned_ms: i64) {
        let state = State {
            root: self.cfg.root.clone(),
            pattern: self.cfg.pattern.as_str().to_owned(),
            scanned_ms,
        };
        let path = &self.cfg.state_file;
        let tmp = path.with_extension("json.tmp");
        let result = serde_json::to_vec(&state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, path));
        match result {
            Ok(()) => self.state_warned = false,
            Err(e) if !self.state_warned => {
                tracing::warn!(
                    file = %path.display(),
                    error = %e,
                    "cannot save the maildir watcher's state; after a restart, mail delivered while \
                     PNS was down may not be notified"
                );
                self.state_warned = true;
            }
            Err(_) => {}
        }
    }
}

/// Put one message from the event thread where it belongs.
fn sort(msg: Msg, created: &mut Vec<PathBuf>, removed: &mut Vec<PathBuf>, lost: &AtomicBool) {
    match msg {
        Msg::Created(p) => created.push(p),
        Msg::Removed(p) => removed.push(p),
        Msg::Rescan => lost.store(true, Ordering::Relaxed),
    }
}

/// File names in `cur/` by unique name.
fn cur_index(folder_dir: &Path) -> HashMap<String, String> {
    entry_names(&folder_dir.join("cur"))
        .unwrap_or_default()
        .into_iter()
        .map(|n| (unique_name(&n).to_owned(), n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_take_whole_placeholders_and_need_a_user() {
        assert!(Pattern::parse("{domain}/{localpart}/Maildir").is_ok());
        assert!(Pattern::parse("{user}/Maildir").is_ok());
        assert!(Pattern::parse("{user}").is_ok());
        assert!(Pattern::parse("vmail/{localpart}/").is_ok());
        let err = |p: &str| Pattern::parse(p).unwrap_err();
        assert!(err("{domain}/Maildir").contains("{localpart} or {user}"));
        assert!(err("{user}/{domain}").contains("do not combine"));
        assert!(err("/var/{user}").contains("relative"));
        assert!(err("{user}.d/Maildir").contains("whole path component"));
        assert!(err("{user}/../x").contains("not allowed"));
        assert!(err("{localpart}/{localpart}").contains("twice"));
        assert!(err("  ").contains("empty"));
    }

    #[test]
    fn users_are_whole_addresses_or_get_the_default_domain() {
        let b = Bindings::default();
        let full = b.with(&Part::User, "alice@example.com");
        assert_eq!(full.user(Some("other.org")).unwrap(), "alice@example.com");
        let bare = b.with(&Part::User, "bob");
        assert_eq!(bare.user(Some("example.org")).unwrap(), "bob@example.org");
        assert_eq!(bare.user(None).unwrap(), "bob");
        let split = b
            .with(&Part::Domain, "example.com")
            .with(&Part::Localpart, "carol");
        assert_eq!(split.user(Some("x.org")).unwrap(), "carol@example.com");
        let spaced = b.with(&Part::User, "no body");
        assert_eq!(spaced.user(None), None);
    }

    #[test]
    fn subfolder_names_become_imap_names() {
        assert_eq!(folder_name(".Sent"), "Sent");
        assert_eq!(folder_name(".Sent.2024"), "Sent/2024");
        assert_eq!(folder_name(".&ZeVnLIqe-"), "日本語");
        assert_eq!(folder_name(".Archiv.&AMk-t&AOk-"), "Archiv/Été");
    }

    #[test]
    fn unique_names_drop_the_info_and_long_keys_are_hashed() {
        assert_eq!(
            unique_name("1700.M1P2.host,S=42:2,RS"),
            "1700.M1P2.host,S=42"
        );
        assert_eq!(unique_name("1700.M1P2.host"), "1700.M1P2.host");
        assert_eq!(dedup_key("INBOX", "1.M2.h"), "maildir:INBOX:1.M2.h");
        let long = dedup_key("INBOX", &"x".repeat(300));
        assert!(long.starts_with("maildir:sha256:") && long.len() <= MAX_DEDUP_KEY_LEN);
        assert_ne!(long, dedup_key("Sent", &"x".repeat(300)));
    }

    #[test]
    fn unseen_counts_new_and_unflagged_cur() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["new", "cur", "tmp"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        for name in [
            "new/1.a.h",
            "new/2.a.h",
            "cur/3.a.h:2,S",
            "cur/4.a.h:2,",
            "cur/5.a.h:2,FRS",
            "cur/6.a.h:2,F",
            "cur/7.a.h",
            "tmp/8.a.h",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(count_unseen(dir.path()), 5);
    }

    #[test]
    fn a_header_without_body_is_still_a_message() {
        let s = summarize(b"From: a@example.com\nSubject: only a header\n").unwrap();
        assert_eq!(s.subject.as_deref(), Some("only a header"));
        assert!(summarize(b"\x00\x01 not mail at all").is_err());
        assert!(summarize(b"").is_err());
    }
}
