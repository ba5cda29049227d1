//! Dovecot's `push_notification` OX driver: its requests, byte for byte as a
//! real Dovecot sends them, and a real Dovecot delivering over LMTP.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USER: &str = "dovecot";
const PASSWORD: &str = "push-notify-secret-4711";
const PATH: &str = "/preliminary/http-notify/v1/notify";

/// The body a real Dovecot 2.3 sent for a Chinese test mail.
const CHINESE: &str = r#"{"user":"alice@example.com","event":"messageNew","folder":"INBOX","imap-uidvalidity":1795301655,"imap-uid":2,"from":"=?UTF-8?B?5byg5LiJ?= <zhangsan@example.org>","subject":"=?UTF-8?B?5L2g5aW977yM5LiW55WM77ya5rWL6K+V6YKu5Lu2?=","snippet":"你好 Alice， 这是一封包含中文的测试邮件。","unseen":2}"#;

fn server() -> Server {
    Server::start_with(&[
        ("PNS_DOVECOT_USER", USER),
        ("PNS_DOVECOT_PASSWORD", PASSWORD),
    ])
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// An HTTP answer read off a raw connection.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

/// Send `method PATH` the way Dovecot does (same headers, same order,
/// keep-alive) and read the answer.
fn dovecot_request(addr: SocketAddr, method: &str, auth: Option<&str>, body: &str) -> Raw {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut head = format!(
        "{method} {PATH} HTTP/1.1\r\nHost: {addr}\r\nDate: Sun, 22 Nov 2026 00:11:32 GMT\r\n"
    );
    if let Some(auth) = auth {
        head.push_str(&format!("Authorization: Basic {auth}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: Keep-Alive\r\nContent-Type: application/json; charset=utf-8\r\n\r\n",
        body.len()
    ));
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(body.as_bytes()).unwrap();
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut bytes = vec![0; len];
    reader.read_exact(&mut bytes).unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Raw {
        status,
        headers,
        body,
    }
}

fn put(s: &Server, body: &str) -> Raw {
    dovecot_request(s.internal, "PUT", Some(&basic(USER, PASSWORD)), body)
}

#[tokio::test]
async fn the_request_dovecot_sends_gives_the_poller_decoded_mail() {
    let s = server();
    let sid = s.sid("alice@example.com");
    let a = put(&s, CHINESE);
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.body["accepted"], 1);
    let (got, _) = s.collect(&sid, "", 1, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m["type"], 70);
    let d = &m["data"];
    assert_eq!(d["from"], "张三 <zhangsan@example.org>");
    assert_eq!(d["subject"], "你好，世界：测试邮件");
    assert_eq!(d["snippet"], "你好 Alice， 这是一封包含中文的测试邮件。");
    assert_eq!(d["folder"], "INBOX");
    assert_eq!(d["uid"], 2);
    assert_eq!(d["uidValidity"], 1795301655u64);
    assert_eq!(d["unseen"], 2);
    let metrics = s.http.get(s.internal_url("/metrics")).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("pns_messages_accepted")
            && l.contains("dovecot")
            && l.ends_with(" 1")),
        "no dovecot count in metrics:\n{text}"
    );
}

#[tokio::test]
async fn post_works_like_put_and_absent_keys_stay_absent() {
    let s = server();
    let sid = s.sid("bob@example.com");
    let body = r#"{"user":"bob@example.com","event":"MessageNew","folder":"INBOX","imap-uidvalidity":5,"imap-uid":9,"snippet":""}"#;
    let a = dovecot_request(s.internal, "POST", Some(&basic(USER, PASSWORD)), body);
    assert_eq!(a.status, 202, "{}", a.body);
    let (got, _) = s.collect(&sid, "", 1, Duration::from_secs(10)).await;
    let d = &got[0]["data"];
    assert_eq!(d["uid"], 9);
    assert!(d.get("from").is_none() && d.get("subject").is_none() && d.get("unseen").is_none());
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_refused_with_401() {
    let s = server();
    let sid = s.sid("alice@example.com");
    for auth in [
        Some(basic(USER, "wrong-password-wrong")),
        Some(basic("someone", PASSWORD)),
        None,
    ] {
        let a = dovecot_request(s.internal, "PUT", auth.as_deref(), CHINESE);
        assert_eq!(a.status, 401, "{}", a.body);
        assert_eq!(a.body["errorCode"], "UNAUTHORIZED");
        assert!(a
            .headers
            .iter()
            .any(|(k, v)| k == "www-authenticate" && v.starts_with("Basic")));
    }
    // The internal API's bearer token is not a way in here.
    let r = s
        .http
        .put(s.internal_url(PATH))
        .bearer_auth(s.internal_token())
        .header("content-type", "application/json")
        .body(CHINESE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(s.poll(&sid, "timeout=0").await.c(), 0);
}

#[tokio::test]
async fn without_configured_credentials_the_endpoint_says_what_to_set() {
    let s = Server::start();
    let a = put(&s, CHINESE);
    assert_eq!(a.status, 401);
    let error = a.body["error"].as_str().unwrap();
    assert!(
        error.contains("PNS_DOVECOT_USER") && error.contains("PNS_DOVECOT_PASSWORD"),
        "{error}"
    );
}

#[tokio::test]
async fn a_retried_request_is_stored_once() {
    let s = server();
    let sid = s.sid("alice@example.com");
    let first = put(&s, CHINESE);
    let again = put(&s, CHINESE);
    assert_eq!(first.status, 202);
    assert_eq!(again.status, 202);
    assert_eq!(again.body["accepted"], 0);
    assert_eq!(again.body["duplicates"], 1);
    assert_eq!(again.body["ids"], first.body["ids"]);
    let (got, cursor) = s.collect(&sid, "", 2, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    // The same UID in another folder is another message.
    let other = CHINESE.replace("\"INBOX\"", "\"Spam\"");
    assert_eq!(put(&s, &other).body["accepted"], 1);
    let (got, _) = s.collect(&sid, &cursor, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0]["data"]["folder"], "Spam");
}

#[tokio::test]
async fn other_events_are_acknowledged_and_store_nothing() {
    let s = server();
    let sid = s.sid("alice@example.com");
    for event in ["messageRead", "FlagsSet", "mailboxCreate"] {
        let body = CHINESE.replace("messageNew", event);
        let a = put(&s, &body);
        assert_eq!(a.status, 204, "{event}: {}", a.body);
    }
    assert_eq!(s.poll(&sid, "timeout=1").await.c(), 0);
}

#[tokio::test]
async fn bad_json_is_refused_with_400_saying_so() {
    let s = server();
    let a = put(&s, r#"{"user":"alice@example.com","event":"messageNew","#);
    assert_eq!(a.status, 400);
    assert_eq!(a.body["errorCode"], "BAD_REQUEST");
    assert!(a.body["error"].as_str().unwrap().contains("JSON"));
    let a = put(&s, r#"{"event":"messageNew","folder":"INBOX"}"#);
    assert_eq!(a.status, 422);
    assert!(a.body["error"].as_str().unwrap().contains("user"));
    let a = put(
        &s,
        r#"{"user":"alice@example.com","event":"messageNew","imap-uid":"two"}"#,
    );
    assert_eq!(a.status, 422);
    assert!(a.body["error"].as_str().unwrap().contains("imap-uid"));
}

// ---------------------------------------------------------------------------
// A real Dovecot

fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin", "/sbin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found
}

/// `dovecot` and `doveadm`, or `None` when the test is to be skipped: only
/// when they are not installed and `PNS_REQUIRE_DOVECOT` is not set.
fn dovecot_binaries(test: &str) -> Option<(PathBuf, PathBuf)> {
    let required = std::env::var("PNS_REQUIRE_DOVECOT").is_ok_and(|v| !v.is_empty() && v != "0");
    match (find_binary("dovecot"), find_binary("doveadm")) {
        (Some(dovecot), Some(doveadm)) => Some((dovecot, doveadm)),
        _ => {
            assert!(
                !required,
                "PNS_REQUIRE_DOVECOT is set but dovecot/doveadm are not installed \
                 (apt-get install dovecot-core dovecot-lmtpd)"
            );
            eprintln!(
                "SKIP {test}: dovecot is not installed (apt-get install dovecot-core \
                 dovecot-lmtpd; set PNS_REQUIRE_DOVECOT=1 to make this an error)"
            );
            None
        }
    }
}

/// A Dovecot master running the LMTP service with a config of its own in a
/// temp dir; stopped (with its children) when dropped.
struct Dovecot {
    child: Child,
    log: PathBuf,
    conf: PathBuf,
    doveadm: PathBuf,
    port: u16,
}

impl Dovecot {
    /// Start Dovecot with everything under `dir`: one user, `alice@example.com`,
    /// whose mail goes to `dir/home/alice@example.com/Maildir`, and the
    /// push_notification driver pointed at `pns_internal`.
    fn start(dir: &Path, bins: (PathBuf, PathBuf), pns_internal: SocketAddr) -> Dovecot {
        let (dovecot_bin, doveadm) = bins;
        let (uid, gid, account) = mail_account();
        let home = dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        use std::os::unix::fs::PermissionsExt;
        // The mail user must get through the temp dir into its home.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
        std::fs::write(dir.join("passwd"), "alice@example.com:{PLAIN}secret:::::\n").unwrap();
        let port = free_port();
        let log = dir.join("dovecot.log");
        let conf = dir.join("dovecot.conf");
        std::fs::write(
            &conf,
            format!(
                r#"base_dir = {dir}/run
state_dir = {dir}/state
log_path = {log}
info_log_path = {log}
debug_log_path = {log}
protocols = lmtp
listen = 127.0.0.1
ssl = no
default_internal_user = {account}
default_login_user = {account}
first_valid_uid = {uid}
first_valid_gid = {gid}
mail_uid = {uid}
mail_gid = {gid}
mail_home = {dir}/home/%u
mail_location = maildir:~/Maildir
mail_attribute_dict = file:%h/dovecot-attributes
passdb {{
  driver = passwd-file
  args = {dir}/passwd
}}
userdb {{
  driver = passwd-file
  args = {dir}/passwd
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
}}
protocol lmtp {{
  mail_plugins = $mail_plugins notify push_notification
}}
plugin {{
  push_notification_driver = ox:url=http://{USER}:{PASSWORD}@{pns_internal}{PATH}
}}
"#,
                dir = dir.display(),
                log = log.display(),
            ),
        )
        .unwrap();
        let child = Command::new(&dovecot_bin)
            .arg("-F")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let dovecot = Dovecot {
            child,
            log,
            conf,
            doveadm,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "Dovecot's LMTP did not come up:\n{}",
                dovecot.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        dovecot
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The per-user switch: without it Dovecot skips the user.
    fn enable_push(&self, user: &str) {
        let out = Command::new(&self.doveadm)
            .arg("-c")
            .arg(&self.conf)
            .args(["mailbox", "metadata", "set", "-u", user, "-s", ""])
            .arg("/private/vendor/vendor.dovecot/http-notify")
            .arg(format!("user={user}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "doveadm metadata set failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// Deliver `mail` (CRLF lines, no final dot) to `rcpt` over LMTP.
    fn deliver(&self, rcpt: &str, mail: &str) {
        let conn = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut r = BufReader::new(conn);
        let greeting = lmtp(&mut r, None);
        assert!(greeting.starts_with("220"), "{greeting}");
        assert!(lmtp(&mut r, Some("LHLO pns.test")).starts_with("250"));
        assert!(lmtp(&mut r, Some("MAIL FROM:<zhangsan@example.org>")).starts_with("250"));
        let reply = lmtp(&mut r, Some(&format!("RCPT TO:<{rcpt}>")));
        assert!(reply.starts_with("250"), "{reply}\n{}", self.log());
        assert!(lmtp(&mut r, Some("DATA")).starts_with("354"));
        r.get_mut().write_all(mail.as_bytes()).unwrap();
        r.get_mut().write_all(b".\r\n").unwrap();
        let saved = lmtp(&mut r, None);
        assert!(saved.starts_with("250"), "{saved}\n{}", self.log());
        let _ = lmtp(&mut r, Some("QUIT"));
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The uid, gid and name mail is delivered as: `nobody` when running as
/// root (Dovecot refuses mail access as root), else ourselves.
fn mail_account() -> (u32, u32, String) {
    unsafe {
        let uid = libc::getuid();
        let pw = if uid == 0 {
            libc::getpwnam(c"nobody".as_ptr())
        } else {
            libc::getpwuid(uid)
        };
        assert!(!pw.is_null(), "no passwd entry for the mail user");
        let name = std::ffi::CStr::from_ptr((*pw).pw_name)
            .to_string_lossy()
            .into_owned();
        ((*pw).pw_uid, (*pw).pw_gid, name)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Say one LMTP command, read the (possibly multi-line) reply.
fn lmtp(reader: &mut BufReader<TcpStream>, command: Option<&str>) -> String {
    if let Some(c) = command {
        reader
            .get_mut()
            .write_all(format!("{c}\r\n").as_bytes())
            .unwrap();
    }
    let mut reply = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        reply.push_str(&line);
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            return reply;
        }
    }
}

const LMTP_MAIL: &str = "From: =?UTF-8?B?5byg5LiJ?= <zhangsan@example.org>\r\n\
To: alice@example.com\r\n\
Subject: =?UTF-8?B?5L2g5aW977yM5LiW55WM77ya5rWL6K+V6YKu5Lu2?=\r\n\
Message-ID: <lmtp.1@example.org>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
你好 Alice，\r\n\
这是一封包含中文的测试邮件。\r\n";

#[tokio::test]
async fn a_real_dovecot_delivering_over_lmtp_notifies_the_poller() {
    let Some(bins) = dovecot_binaries("a_real_dovecot_delivering_over_lmtp_notifies_the_poller")
    else {
        return;
    };
    let s = server();
    let user = "alice@example.com";
    let sid = s.sid(user);
    let tmp = tempfile::tempdir().unwrap();
    let dovecot = Dovecot::start(tmp.path(), bins, s.internal);
    dovecot.enable_push(user);
    dovecot.deliver(user, LMTP_MAIL);

    let (got, _) = s.collect(&sid, "", 1, Duration::from_secs(20)).await;
    assert_eq!(
        got.len(),
        1,
        "no notification came; Dovecot's log:\n{}",
        dovecot.log()
    );
    let d = &got[0]["data"];
    assert_eq!(d["from"], "张三 <zhangsan@example.org>");
    assert_eq!(d["subject"], "你好，世界：测试邮件");
    assert_eq!(d["folder"], "INBOX");
    assert_eq!(d["uid"], 1);
    assert!(d["uidValidity"].as_u64().unwrap() > 0);
    assert_eq!(d["unseen"], 1);
    assert!(
        d["snippet"].as_str().unwrap().contains("测试邮件"),
        "{}",
        d["snippet"]
    );
}

#[tokio::test]
async fn the_maildir_watcher_sees_what_a_real_dovecot_delivers() {
    let Some(bins) = dovecot_binaries("the_maildir_watcher_sees_what_a_real_dovecot_delivers")
    else {
        return;
    };
    // Dovecot makes the mailbox itself on the first delivery; PNS watches
    // the homes with the `{user}/Maildir` pattern. No push switch is set, so
    // only the watcher speaks.
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let root = home.display().to_string();
    let s = Server::start_with(&[
        ("PNS_MAILDIR_ROOT", &root),
        ("PNS_MAILDIR_PATTERN", "{user}/Maildir"),
    ]);
    let user = "alice@example.com";
    let sid = s.sid(user);
    let dovecot = Dovecot::start(tmp.path(), bins, s.internal);
    dovecot.deliver(user, LMTP_MAIL);

    let (got, cursor) = s.collect(&sid, "", 1, Duration::from_secs(20)).await;
    assert_eq!(
        got.len(),
        1,
        "no notification; Dovecot's log:\n{}",
        dovecot.log()
    );
    let d = &got[0]["data"];
    assert_eq!(d["folder"], "INBOX");
    assert_eq!(d["from"], "张三 <zhangsan@example.org>");
    assert_eq!(d["subject"], "你好，世界：测试邮件");
    assert_eq!(d["messageId"], "lmtp.1@example.org");
    assert_eq!(d["snippet"], "你好 Alice， 这是一封包含中文的测试邮件。");
    assert_eq!(d["unseen"], 1);
    let a = s.poll(&sid, &format!("cursor={cursor}&timeout=1")).await;
    assert_eq!(a.c(), 0, "{}", a.body);
}

/// The heads below are what the internal router answered when it served
/// Dovecot's endpoint itself, before the front took it over
/// (`server::DirectRoute`).
#[tokio::test]
async fn dovecot_answers_have_the_heads_of_the_internal_router() {
    let s = Server::start_with(&[
        ("PNS_DOVECOT_USER", USER),
        ("PNS_DOVECOT_PASSWORD", PASSWORD),
        ("PNS_MAX_BODY_BYTES", "4096"),
    ]);
    let good = basic(USER, PASSWORD);
    let wrong = basic(USER, "wrong-password-wrong");
    let send = |method: &str, auth: Option<&str>, content_type: &str, body: &str| {
        let auth = auth.map_or(String::new(), |a| format!("Authorization: Basic {a}\r\n"));
        format!(
            "{method} {PATH} HTTP/1.1\r\nHost: pns\r\n{auth}Content-Length: {}\r\n\
             Connection: Keep-Alive\r\nContent-Type: {content_type}\r\n\r\n{body}",
            body.len()
        )
    };
    let json = "application/json; charset=utf-8";
    let read = r#"{"user":"alice@example.com","event":"messageRead","folder":"INBOX"}"#;
    let no_user = r#"{"event":"messageNew","folder":"INBOX","imap-uidvalidity":1,"imap-uid":1}"#;
    let json_answer = |status: &str, extra: &[&str], length: u32| {
        let mut head = vec![
            format!("HTTP/1.1 {status}"),
            "content-type: application/json".to_owned(),
        ];
        head.extend(extra.iter().map(|h| (*h).to_owned()));
        head.push("cache-control: no-store".into());
        head.push(format!("content-length: {length}"));
        head
    };
    let basic_realm = r#"www-authenticate: Basic realm="pns", charset="UTF-8""#;
    for (request, expected) in [
        (
            send("PUT", Some(&good), json, CHINESE),
            json_answer("202 Accepted", &[], 62),
        ),
        // The same message again: a duplicate.
        (
            send("POST", Some(&good), json, CHINESE),
            json_answer("202 Accepted", &[], 62),
        ),
        (
            send("PUT", Some(&good), json, read),
            vec![
                "HTTP/1.1 204 No Content".to_owned(),
                "cache-control: no-store".to_owned(),
            ],
        ),
        (
            send("PUT", None, json, CHINESE),
            json_answer("401 Unauthorized", &[basic_realm], 132),
        ),
        (
            send("PUT", Some(&wrong), json, CHINESE),
            json_answer("401 Unauthorized", &[basic_realm], 102),
        ),
        (
            send("PUT", Some(&good), json, "{"),
            json_answer("400 Bad Request", &[], 131),
        ),
        (
            send("PUT", Some(&good), json, no_user),
            json_answer("422 Unprocessable Entity", &[], 68),
        ),
        (
            send("PUT", Some(&good), "text/plain", CHINESE),
            json_answer("415 Unsupported Media Type", &[], 117),
        ),
        (
            send("PUT", Some(&good), json, &"x".repeat(5000)),
            json_answer("413 Payload Too Large", &["connection: close"], 97),
        ),
    ] {
        assert_eq!(raw_head(s.internal, &request).await, expected);
    }
}
