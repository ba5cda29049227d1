//! The Maildir watcher: mail written into Maildirs the way delivery agents
//! write it (into `tmp/`, then renamed into `new/`) reaches the mailbox's
//! pollers, decoded, once.

use crate::support::*;
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A Maildir tree in a temp dir.
pub struct Tree {
    pub root: tempfile::TempDir,
}

static DELIVERED: AtomicUsize = AtomicUsize::new(0);

impl Tree {
    pub fn new() -> Tree {
        Tree {
            root: tempfile::tempdir().unwrap(),
        }
    }

    pub fn root(&self) -> String {
        self.root.path().display().to_string()
    }

    /// Create a Maildir (`new`, `cur`, `tmp`) at `rel` below the root.
    pub fn maildir(&self, rel: &str) -> PathBuf {
        let dir = self.root.path().join(rel);
        make_maildir(&dir);
        dir
    }
}

pub fn make_maildir(dir: &Path) {
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
}

/// A Maildir unique name like delivery agents make them.
pub fn unique(size: usize) -> String {
    let n = DELIVERED.fetch_add(1, Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    format!(
        "{}.M{}P{}Q{n}.testhost,S={size}",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id()
    )
}

/// Deliver like an MDA: write into `tmp/`, then rename into `new/`.
/// Returns the file name.
pub fn deliver(folder: &Path, raw: &[u8]) -> String {
    let name = unique(raw.len());
    let tmp = folder.join("tmp").join(&name);
    std::fs::write(&tmp, raw).unwrap();
    std::fs::rename(&tmp, folder.join("new").join(&name)).unwrap();
    name
}

fn data(m: &Value) -> &Value {
    &m["data"]
}

async fn one(s: &Server, sid: &str, cursor: &str) -> (Value, String) {
    let (got, cursor) = s.collect(sid, cursor, 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "expected one message, got {got:?}");
    (got.into_iter().next().unwrap(), cursor)
}

/// Nothing more arrives within a couple of seconds.
async fn nothing_more(s: &Server, sid: &str, cursor: &str) {
    let a = s.poll(sid, &format!("cursor={cursor}&timeout=2")).await;
    assert_eq!(a.c(), 0, "unexpected messages: {}", a.body);
}

const LATIN1_QP: &[u8] = b"Return-Path: <joerg@example.de>\r\n\
From: =?iso-8859-1?q?J=F6rg_M=FCller?= <joerg@example.de>\r\n\
To: alice@example.com\r\n\
Subject: =?ISO-8859-1?Q?Gr=FC=DFe_aus_M=FCnchen?=\r\n\
Date: Tue, 1 Jul 2003 10:52:37 +0200\r\n\
Message-ID: <latin1.1@example.de>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=iso-8859-1\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
Hallo Alice,\r\n\
anbei die Unterlagen f=FCr Dienstag.\r\n\
Viele Gr=FC=DFe\r\n";

const RUSSIAN_MULTIPART: &[u8] = b"From: =?koi8-r?B?6dfBziDwxdTSz9c=?= <ivan@example.ru>\n\
To: alice@example.com\n\
Subject: =?utf-8?B?0J/RgNC40LLQtdGCINC40Lcg0JzQvtGB0LrQstGL?=\n\
Message-ID: <ru.2@example.ru>\n\
MIME-Version: 1.0\n\
Content-Type: multipart/alternative; boundary=\"b1\"\n\
\n\
This is a multi-part message in MIME format.\n\
--b1\n\
Content-Type: text/plain; charset=utf-8\n\
Content-Transfer-Encoding: base64\n\
\n\
0JTQvtCx0YDRi9C5INC00LXQvdGMISDQktGB0YLRgNC10YfQsCDQsiDQv9GP0YLQvdC40YbRgyDQsiAxNTowMC4K\n\
--b1\n\
Content-Type: text/html; charset=utf-8\n\
\n\
<p>HTML version</p>\n\
--b1--\n";

const JAPANESE_HTML_ONLY: &[u8] = b"From: =?iso-2022-jp?B?GyRCRURDZkJATzobKEI=?= <tanaka@example.jp>\r\n\
To: alice@example.com\r\n\
Subject: =?shift_jis?B?ie+LY4LMjI8=?=\r\n\
Message-ID: <jp.3@example.jp>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/html; charset=utf-8\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
PGh0bWw+PGhlYWQ+PHN0eWxlPnAge2NvbG9yOiByZWR9PC9zdHlsZT48L2hlYWQ+PGJvZHk+PHA+5piO5pel44GuPGI+5Lya6K2wPC9iPuOBrzEw5pmC44GL44KJ44Gn44GZ44CCPC9wPjwvYm9keT48L2h0bWw+Cg==\r\n";

const BROKEN: &[u8] = b"\x00\x01\x02\xff\xfe this is no mail message at all";

const CHINESE_GB2312: &[u8] = b"From: =?gbk?B?wO7A1w==?= <li@example.cn>\n\
Subject: =?gb2312?B?xOO6w6OsysC95w==?=\n\
Message-ID: <cn.5@example.cn>\n\
\n\
Short body.\n";

#[tokio::test]
async fn mail_delivered_into_a_maildir_reaches_the_poller_decoded() {
    let tree = Tree::new();
    let inbox = tree.maildir("example.com/alice/Maildir");
    // Before the first start: one message already waiting in new/ (taken
    // as known, not notified), one seen and one unseen in cur/.
    let old = inbox.join("new").join(unique(10));
    std::fs::write(&old, b"Subject: old\n\nold\n").unwrap();
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(an_hour_ago)
        .unwrap();
    std::fs::write(inbox.join("cur").join(format!("{}:2,S", unique(10))), b"x").unwrap();
    std::fs::write(inbox.join("cur").join(format!("{}:2,", unique(10))), b"x").unwrap();
    let s = Server::start_with(&[("PNS_MAILDIR_ROOT", &tree.root())]);
    let sid = s.sid("alice@example.com");
    // Minted before the mail: a session sees only what came after its
    // token's second, so a later one would see none of it anyway.
    let bob = s.sid("bob@example.com");

    deliver(&inbox, LATIN1_QP);
    let (m, cursor) = one(&s, &sid, "").await;
    assert_eq!(m["type"], 70);
    let d = data(&m);
    assert_eq!(d["folder"], "INBOX");
    assert_eq!(d["from"], "Jörg Müller <joerg@example.de>");
    assert_eq!(d["subject"], "Grüße aus München");
    assert_eq!(
        d["snippet"],
        "Hallo Alice, anbei die Unterlagen für Dienstag. Viele Grüße"
    );
    assert_eq!(d["messageId"], "latin1.1@example.de");
    assert_eq!(d["date"], "2003-07-01T10:52:37+02:00");
    // The old one in new/, the unseen one in cur/, this one.
    assert_eq!(d["unseen"], 3);

    deliver(&inbox, RUSSIAN_MULTIPART);
    let (m, cursor) = one(&s, &sid, &cursor).await;
    let d = data(&m);
    assert_eq!(d["from"], "Иван Петров <ivan@example.ru>");
    assert_eq!(d["subject"], "Привет из Москвы");
    assert_eq!(d["snippet"], "Добрый день! Встреча в пятницу в 15:00.");
    assert_eq!(d["messageId"], "ru.2@example.ru");
    assert_eq!(d["unseen"], 4);

    deliver(&inbox, JAPANESE_HTML_ONLY);
    let (m, cursor) = one(&s, &sid, &cursor).await;
    let d = data(&m);
    assert_eq!(d["from"], "田中太郎 <tanaka@example.jp>");
    assert_eq!(d["subject"], "会議の件");
    assert_eq!(d["snippet"], "明日の会議は10時からです。");
    assert_eq!(d["unseen"], 5);

    // The broken file gives no message; the one after it comes, and the
    // broken file still counts as unseen (a mail client would show it).
    deliver(&inbox, BROKEN);
    deliver(&inbox, CHINESE_GB2312);
    let (m, cursor) = one(&s, &sid, &cursor).await;
    let d = data(&m);
    assert_eq!(d["from"], "李雷 <li@example.cn>");
    assert_eq!(d["subject"], "你好，世界");
    assert_eq!(d["snippet"], "Short body.");
    assert_eq!(d["unseen"], 7);
    assert!(d.get("date").is_none(), "no Date header, no date: {d}");
    nothing_more(&s, &sid, &cursor).await;

    // Another user's poller saw none of it.
    assert_eq!(s.poll(&bob, "timeout=0").await.c(), 0);
}

#[tokio::test]
async fn subfolders_and_mailboxes_made_after_start_are_watched_with_their_names_decoded() {
    let tree = Tree::new();
    let alice = tree.maildir("example.com/alice/Maildir");
    let s = Server::start_with(&[("PNS_MAILDIR_ROOT", &tree.root())]);
    let sid = s.sid("alice@example.com");
    // Once this has come, the watcher is running: what follows is found
    // by filesystem events (the rescan is a minute away).
    deliver(&alice, b"Subject: Probe\n\nx\n");
    let (_, cursor) = one(&s, &sid, "").await;

    // A Maildir++ subfolder made the way Dovecot makes one: the folder
    // first, its new/ cur/ tmp/ after. `&ZeVnLIqe-` is modified UTF-7.
    let sub = alice.join(".&ZeVnLIqe-.2024");
    std::fs::create_dir(&sub).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    make_maildir(&sub);
    deliver(
        &sub,
        b"From: x@example.com\nSubject: Filed\n\nIn a subfolder.\n",
    );
    let (m, cursor) = one(&s, &sid, &cursor).await;
    assert_eq!(data(&m)["folder"], "日本語/2024");
    assert_eq!(data(&m)["subject"], "Filed");
    assert_eq!(data(&m)["unseen"], 1);

    // A whole new mailbox, made and delivered to at once (as a delivery
    // agent does on the first mail of a user).
    let bob_sid = s.sid("bob@example.org");
    let bob = tree.root.path().join("example.org/bob/Maildir");
    make_maildir(&bob);
    deliver(&bob, b"From: x@example.com\nSubject: Welcome Bob\n\nHi.\n");
    let (m, _) = one(&s, &bob_sid, "").await;
    assert_eq!(data(&m)["folder"], "INBOX");
    assert_eq!(data(&m)["subject"], "Welcome Bob");
    nothing_more(&s, &sid, &cursor).await;
}

#[tokio::test]
async fn the_user_pattern_takes_whole_addresses_and_bare_names_with_the_default_domain() {
    let tree = Tree::new();
    let carol = tree.maildir("carol/Maildir");
    let dave = tree.maildir("dave@example.org/Maildir");
    tree.maildir("not a user/Maildir");
    let s = Server::start_with(&[
        ("PNS_MAILDIR_ROOT", &tree.root()),
        ("PNS_MAILDIR_PATTERN", "{user}/Maildir"),
        ("PNS_MAILDIR_DEFAULT_DOMAIN", "example.net"),
    ]);
    let carol_sid = s.sid("carol@example.net");
    let dave_sid = s.sid("dave@example.org");
    deliver(&carol, b"Subject: For Carol\n\nHello.\n");
    deliver(&dave, b"Subject: For Dave\n\nHello.\n");
    let (m, _) = one(&s, &carol_sid, "").await;
    assert_eq!(data(&m)["subject"], "For Carol");
    let (m, _) = one(&s, &dave_sid, "").await;
    assert_eq!(data(&m)["subject"], "For Dave");
}

#[tokio::test]
async fn a_restart_a_rescan_or_the_move_into_cur_notify_nothing_twice() {
    let tree = Tree::new();
    let inbox = tree.maildir("example.com/alice/Maildir");
    // Rescans every second, so that several run during the test.
    let s = Server::start_with(&[
        ("PNS_MAILDIR_ROOT", &tree.root()),
        ("PNS_MAILDIR_RESCAN_SECS", "1"),
    ]);
    let sid = s.sid("alice@example.com");
    let mut names = Vec::new();
    for i in 0..3 {
        let raw = format!("Subject: Before restart {i}\n\nBody {i}.\n");
        names.push(deliver(&inbox, raw.as_bytes()));
    }
    let (got, cursor) = s.collect(&sid, "", 3, Duration::from_secs(20)).await;
    let subjects: HashSet<String> = got
        .iter()
        .map(|m| data(m)["subject"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(subjects.len(), 3);

    // A mail client reads one: new/ → cur/ with the seen flag.
    std::fs::rename(
        inbox.join("new").join(&names[0]),
        inbox.join("cur").join(format!("{}:2,S", names[0])),
    )
    .unwrap();
    // Two rescans pass; still nothing new.
    nothing_more(&s, &sid, &cursor).await;

    let s = s.kill9_and_restart();
    // The files still in new/ are looked at again after the restart; none
    // is notified a second time. A mail delivered now is.
    deliver(&inbox, b"Subject: After restart\n\nNew.\n");
    let (got, cursor) = s.collect(&sid, &cursor, 1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(data(&got[0])["subject"], "After restart");
    // unseen: two left in new/ from before, the new one.
    assert_eq!(data(&got[0])["unseen"], 3);
    nothing_more(&s, &sid, &cursor).await;
}

#[tokio::test]
async fn mail_delivered_while_pns_was_down_is_notified_after_the_restart() {
    let tree = Tree::new();
    let inbox = tree.maildir("example.com/alice/Maildir");
    let mut s = Server::start_with(&[("PNS_MAILDIR_ROOT", &tree.root())]);
    let sid = s.sid("alice@example.com");
    deliver(&inbox, b"Subject: While up\n\nA.\n");
    let (_, cursor) = one(&s, &sid, "").await;
    let (code, _) = s.sigterm();
    assert_eq!(code, Some(0));
    deliver(&inbox, b"Subject: While down\n\nB.\n");
    let s = s.kill9_and_restart();
    let (m, cursor) = one(&s, &sid, &cursor).await;
    assert_eq!(data(&m)["subject"], "While down");
    nothing_more(&s, &sid, &cursor).await;
}

#[tokio::test]
async fn a_thousand_files_dropped_at_once_arrive_as_a_thousand_messages() {
    const N: usize = 1000;
    let tree = Tree::new();
    let inbox = tree.maildir("example.com/alice/Maildir");
    let s = Server::start_with(&[
        ("PNS_MAILDIR_ROOT", &tree.root()),
        ("PNS_MAILDIR_RESCAN_SECS", "1"),
    ]);
    let sid = s.sid("alice@example.com");
    // All written to tmp/ first, then all renamed into new/ in one go.
    let names: Vec<String> = (0..N)
        .map(|i| {
            let raw = format!("From: bulk@example.com\nSubject: Bulk {i}\n\nNumber {i}.\n");
            let name = unique(raw.len());
            std::fs::write(inbox.join("tmp").join(&name), raw).unwrap();
            name
        })
        .collect();
    for name in &names {
        std::fs::rename(inbox.join("tmp").join(name), inbox.join("new").join(name)).unwrap();
    }
    let (got, cursor) = s.collect(&sid, "", N, Duration::from_secs(60)).await;
    let ids: HashSet<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    let subjects: HashSet<&str> = got
        .iter()
        .map(|m| data(m)["subject"].as_str().unwrap())
        .collect();
    assert_eq!(got.len(), N);
    assert_eq!(ids.len(), N, "a message came twice");
    let expected: HashSet<String> = (0..N).map(|i| format!("Bulk {i}")).collect();
    assert_eq!(
        subjects,
        expected.iter().map(String::as_str).collect::<HashSet<_>>()
    );
    nothing_more(&s, &sid, &cursor).await;
}

#[tokio::test]
async fn past_the_inotify_watch_limit_mail_still_arrives_through_the_rescan() {
    // A user namespace of its own gets its own inotify limit: 6 watches,
    // enough for the root, the domain and one mailbox (user, Maildir, new/)
    // of the four.
    const LIMIT: &str = "echo 6 > /proc/sys/user/max_inotify_watches && exec \"$0\" \"$@\"";
    let probe = std::process::Command::new("unshare")
        .args(["-U", "-r", "-m", "sh", "-c", LIMIT, "true"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!(
            "SKIP past_the_inotify_watch_limit_…: cannot make a user namespace with its own \
             inotify limit here (unshare -U -r)"
        );
        return;
    }
    let tree = Tree::new();
    let users = ["a", "b", "c", "d"];
    for u in users {
        tree.maildir(&format!("example.com/{u}/Maildir"));
    }
    let s = Server::start_wrapped(
        &["unshare", "-U", "-r", "-m", "sh", "-c", LIMIT],
        &[
            ("PNS_MAILDIR_ROOT", &tree.root()),
            ("PNS_MAILDIR_RESCAN_SECS", "1"),
        ],
    );
    let sids: Vec<String> = users
        .iter()
        .map(|u| s.sid(&format!("{u}@example.com")))
        .collect();
    // Let the first scan pass, so that the mail below is found by events
    // (one mailbox) or by the rescans (the others), not by that scan.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for u in users {
        let inbox = tree.root.path().join(format!("example.com/{u}/Maildir"));
        deliver(
            &inbox,
            format!("Subject: Past the limit, {u}\n\nHi.\n").as_bytes(),
        );
    }
    for (u, sid) in users.iter().zip(&sids) {
        let (m, _) = one(&s, sid, "").await;
        assert_eq!(data(&m)["subject"], format!("Past the limit, {u}"));
    }
}
