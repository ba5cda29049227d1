//! HTTP/1.1 spoken over raw sockets. On the public listener: keep-alive,
//! pipelining, HTTP/1.0, `Connection: close`, HEAD, a client that goes away
//! during a held poll, and the requests handed to hyper (bodies, oversized
//! heads). On the internal one: notifies whose bodies come with their heads,
//! later, or after `100 Continue`.

use crate::support::*;
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One answer read off a raw connection.
struct Reply {
    status: u16,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn c_of(&self) -> u64 {
        self.json()["c"].as_u64().unwrap()
    }
}

/// A raw HTTP/1 client connection.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(s: &Server) -> Raw {
        Raw::connect_to(s.public).await
    }

    async fn connect_to(addr: std::net::SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &str) {
        self.stream.write_all(bytes.as_bytes()).await.unwrap();
    }

    /// Read more bytes; false at EOF.
    async fn fill(&mut self, within: Duration) -> bool {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(within, self.stream.read(&mut chunk))
            .await
            .expect("no answer in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Read one answer; `head_only` for the answer to a HEAD request.
    async fn reply_to(&mut self, head_only: bool, within: Duration) -> Reply {
        let end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(self.fill(within).await, "closed before an answer");
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
        let status = status_line[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        let length: usize = if head_only {
            0
        } else {
            headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map(|(_, v)| v.parse().unwrap())
                .expect("a content-length")
        };
        while self.buf.len() < end + length {
            assert!(self.fill(within).await, "closed in a body");
        }
        let body = String::from_utf8(self.buf[end..end + length].to_vec()).unwrap();
        self.buf.drain(..end + length);
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn reply(&mut self) -> Reply {
        self.reply_to(false, Duration::from_secs(10)).await
    }

    /// Whether the server closes the connection (with nothing more sent)
    /// within `within`.
    async fn closes(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let mut chunk = [0u8; 512];
            match tokio::time::timeout_at(deadline.into(), self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return self.buf.is_empty(),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return false,
            }
        }
        false
    }
}

fn poll_request(sid: &str, query: &str) -> String {
    format!("GET /pns/poll?sid={sid}&{query} HTTP/1.1\r\nHost: pns\r\n\r\n")
}

/// The head of a notify with a body of `length` bytes.
fn notify_head(token: &str, length: usize, extra: &str) -> String {
    format!(
        "POST /internal/v1/notify HTTP/1.1\r\nHost: pns\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\n{extra}Content-Length: {length}\r\n\r\n"
    )
}

/// A notify of one mail, head and body.
fn notify_request(token: &str, user: &str, subject: &str) -> String {
    let body = mail(user, subject).to_string();
    format!("{}{body}", notify_head(token, body.len(), ""))
}

/// The subjects of every message `sid`'s session sees, oldest first.
/// Mint the sid before the notifies: a session's news begins at its
/// token's `iat`, a whole second, and one minted after them may begin in
/// the next second.
async fn subjects(s: &Server, sid: &str) -> Vec<String> {
    let answer = s.poll(sid, "timeout=0&cursor=1.0").await;
    answer.body["msg"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"]["subject"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn several_polls_share_one_keep_alive_connection() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let mut raw = Raw::connect(&s).await;
    raw.send(&poll_request(&sid, "timeout=0")).await;
    let first = raw.reply().await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("connection"), None);
    assert!(first.header("date").is_some());
    assert_eq!(first.header("cache-control"), Some("no-store"));
    let cursor = first.json()["cursor"].as_str().unwrap().to_owned();

    // The second poll is held on the same connection and woken by mail.
    raw.send(&poll_request(&sid, &format!("cursor={cursor}&timeout=20")))
        .await;
    s.polls_held_becomes(1).await;
    s.mail("alice@example.com", "one").await;
    let second = raw.reply().await;
    assert_eq!(second.status, 200);
    assert_eq!(second.json()["msg"][0]["data"]["subject"], "one");
    let cursor = second.json()["cursor"].as_str().unwrap().to_owned();

    s.mail("alice@example.com", "two").await;
    raw.send(&poll_request(&sid, &format!("cursor={cursor}&timeout=0")))
        .await;
    let third = raw.reply().await;
    assert_eq!(third.json()["msg"][0]["data"]["subject"], "two");
}

#[tokio::test]
async fn two_pipelined_requests_are_answered_in_order() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let mut raw = Raw::connect(&s).await;
    raw.send(&format!(
        "GET /healthz HTTP/1.1\r\nHost: pns\r\n\r\n{}",
        poll_request(&sid, "timeout=0")
    ))
    .await;
    let health = raw.reply().await;
    assert_eq!(health.json()["status"], "ok");
    let poll = raw.reply().await;
    assert_eq!(poll.status, 200);
    assert_eq!(poll.json()["c"], 0);

    // A request sent while a poll is held waits for the poll's answer.
    raw.send(&poll_request(&sid, "timeout=2")).await;
    s.polls_held_becomes(1).await;
    raw.send("GET /healthz HTTP/1.1\r\nHost: pns\r\n\r\n").await;
    let held = raw.reply().await;
    assert_eq!(held.json()["c"], 0, "{}", held.body);
    let health = raw.reply().await;
    assert_eq!(health.json()["status"], "ok");
}

#[tokio::test]
async fn an_http_1_0_request_is_answered_and_closed() {
    let s = Server::start();
    let mut raw = Raw::connect(&s).await;
    raw.send("GET /healthz HTTP/1.0\r\n\r\n").await;
    let r = raw.reply().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(raw.closes(Duration::from_secs(5)).await);

    // Unless it asks to keep the connection.
    let mut raw = Raw::connect(&s).await;
    raw.send("GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let r = raw.reply().await;
    assert_eq!(r.header("connection"), Some("keep-alive"));
    raw.send("GET /healthz HTTP/1.0\r\n\r\n").await;
    assert_eq!(raw.reply().await.status, 200);
    assert!(raw.closes(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn connection_close_is_honoured() {
    let s = Server::start();
    let mut raw = Raw::connect(&s).await;
    raw.send("GET /healthz HTTP/1.1\r\nHost: pns\r\nConnection: close\r\n\r\n")
        .await;
    let r = raw.reply().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(raw.closes(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_client_closing_during_a_held_poll_releases_it() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let mut raw = Raw::connect(&s).await;
    raw.send(&poll_request(&sid, "timeout=0")).await;
    assert_eq!(raw.reply().await.status, 200);
    raw.send(&poll_request(&sid, "timeout=60")).await;
    s.polls_held_becomes(1).await;
    drop(raw);
    s.polls_held_becomes(0).await;
    // The session polls on, on a new connection.
    s.mail("alice@example.com", "after").await;
    assert_eq!(s.poll(&sid, "timeout=5").await.c(), 1);
}

#[tokio::test]
async fn a_connection_checks_health_then_polls() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let mut raw = Raw::connect(&s).await;
    raw.send("GET /healthz HTTP/1.1\r\nHost: pns\r\n\r\n").await;
    assert_eq!(raw.reply().await.json()["status"], "ok");
    raw.send(&poll_request(&sid, "timeout=20")).await;
    s.polls_held_becomes(1).await;
    s.mail("alice@example.com", "hello").await;
    let r = raw.reply().await;
    assert_eq!(r.json()["msg"][0]["data"]["subject"], "hello");
    s.polls_held_becomes(0).await;
}

#[tokio::test]
async fn a_request_with_a_body_still_gets_413() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let mut raw = Raw::connect(&s).await;
    // A first request served by the lean front, then one handed to hyper.
    raw.send("GET /healthz HTTP/1.1\r\nHost: pns\r\n\r\n").await;
    assert_eq!(raw.reply().await.status, 200);
    raw.send(&format!(
        "GET /pns/poll?sid={sid}&timeout=0 HTTP/1.1\r\nHost: pns\r\nContent-Length: 100\r\n\r\n{}",
        "x".repeat(100)
    ))
    .await;
    let r = raw.reply().await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["errorCode"], "PAYLOAD_TOO_LARGE");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(raw.closes(Duration::from_secs(5)).await);

    // A chunked body likewise.
    let mut raw = Raw::connect(&s).await;
    raw.send(
        "GET /healthz HTTP/1.1\r\nHost: pns\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(raw.reply().await.status, 413);
}

#[tokio::test]
async fn an_oversized_head_gets_431() {
    let s = Server::start();
    let mut raw = Raw::connect(&s).await;
    let filler = "x".repeat(1000);
    let mut head = String::from("GET /healthz HTTP/1.1\r\nHost: pns\r\n");
    for i in 0..40 {
        head.push_str(&format!("X-Filler-{i}: {filler}\r\n"));
    }
    head.push_str("\r\n");
    // The server may stop reading (and close) before all of it is written.
    let _ = raw.stream.write_all(head.as_bytes()).await;
    let r = raw.reply().await;
    assert_eq!(r.status, 431);
    assert_eq!(r.header("connection"), Some("close"));
}

#[tokio::test]
async fn a_head_request_gets_no_body() {
    let s = Server::start();
    let mut raw = Raw::connect(&s).await;
    raw.send("HEAD /healthz HTTP/1.1\r\nHost: pns\r\n\r\n")
        .await;
    let r = raw.reply_to(true, Duration::from_secs(10)).await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    // Nothing of a body follows: the next answer starts right away.
    raw.send("GET /healthz HTTP/1.1\r\nHost: pns\r\n\r\n").await;
    let r = raw.reply().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
}

const AT_COMMIT: &str = "pns_poll_answers_at_commit_total";

/// A poll request with `Origin: origin` when given.
fn poll_from(origin: Option<&str>, sid: &str, query: &str) -> String {
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    format!("GET /pns/poll?sid={sid}&{query} HTTP/1.1\r\nHost: pns\r\n{origin}\r\n")
}

/// The headers but the date, in the order sent.
fn without_date(reply: &Reply) -> Vec<(String, String)> {
    let headers = reply.headers.iter().filter(|(n, _)| n != "date");
    headers.cloned().collect()
}

/// A poll answered where its mail is committed is counted once, as a
/// message: the hold that ends later, unseen, is not counted as a timeout
/// too, nor are its messages delivered twice.
#[tokio::test]
async fn a_poll_answered_at_commit_is_counted_once_when_its_hold_ends_unseen() {
    const TIMEOUT: &str = "pns_poll_answers_total{outcome=\"timeout\"}";
    const MESSAGE: &str = "pns_poll_answers_total{outcome=\"message\"}";
    const DELIVERED: &str = "pns_messages_delivered_total";
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let mut raw = Raw::connect(&s).await;
    raw.send(&poll_from(None, &sid, "timeout=0")).await;
    let cursor = raw.reply().await.json()["cursor"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(metric(&s, TIMEOUT).await, 1.0);

    raw.send(&poll_from(
        None,
        &sid,
        &format!("cursor={cursor}&timeout=1"),
    ))
    .await;
    s.polls_held_becomes(1).await;
    s.mail("alice@example.com", "once").await;
    assert_eq!(raw.reply().await.c_of(), 1);
    assert_eq!(metric(&s, AT_COMMIT).await, 1.0);

    // The hold ends with the connection quiet.
    assert!(!raw.closes(Duration::from_millis(1500)).await);
    assert_eq!(metric(&s, TIMEOUT).await, 1.0);
    assert_eq!(metric(&s, MESSAGE).await, 1.0);
    assert_eq!(metric(&s, DELIVERED).await, 1.0);
    let stats = s.internal_get("/internal/v1/stats").await.body;
    assert_eq!(stats["pollAnswers"]["timeout"], 1, "{stats}");
    assert_eq!(stats["pollAnswers"]["message"], 1, "{stats}");
}

#[tokio::test]
async fn a_held_poll_answered_where_its_mail_is_committed_gets_the_routed_answer_byte_for_byte() {
    let webmail = "https://mail.example.com";
    let s = Server::start_with(&[("PNS_ALLOWED_ORIGINS", webmail)]);
    let sid = s.sid("alice@example.com");
    for (round, origin) in [Some(webmail), None, Some("https://elsewhere.example")]
        .into_iter()
        .enumerate()
    {
        let mut raw = Raw::connect(&s).await;
        raw.send(&poll_from(origin, &sid, "timeout=0")).await;
        let before = raw.reply().await.json()["cursor"]
            .as_str()
            .unwrap()
            .to_owned();

        // Held, then answered by the thread that commits the mail.
        raw.send(&poll_from(
            origin,
            &sid,
            &format!("cursor={before}&timeout=1"),
        ))
        .await;
        s.polls_held_becomes(1).await;
        s.mail("alice@example.com", &format!("round {round}")).await;
        let at_commit = raw.reply().await;
        assert_eq!(metric(&s, AT_COMMIT).await, (round + 1) as f64);
        assert_eq!(at_commit.status, 200);
        assert_eq!(
            at_commit.json()["msg"][0]["data"]["subject"],
            format!("round {round}")
        );
        assert_eq!(
            at_commit.header("access-control-allow-origin"),
            origin.filter(|o| *o == webmail),
            "{origin:?}"
        );

        // The hold of the poll answered ends meanwhile: the connection
        // stays quiet, then serves the next request.
        assert!(!raw.closes(Duration::from_millis(1500)).await);
        assert!(raw.buf.is_empty(), "sent after the answer: {:?}", raw.buf);

        // The same poll again, answered from the store by the router.
        raw.send(&poll_from(
            origin,
            &sid,
            &format!("cursor={before}&timeout=0"),
        ))
        .await;
        let routed = raw.reply().await;
        assert_eq!(metric(&s, AT_COMMIT).await, (round + 1) as f64);
        assert_eq!(routed.body, at_commit.body);
        assert_eq!(
            without_date(&routed),
            without_date(&at_commit),
            "{origin:?}"
        );
    }
}

/// `GET /pns/poll` then `HEAD /pns/poll` with `query` and `origin` on one
/// connection: the poll the front answers itself, and the same poll
/// answered by the router (which serves every HEAD).
async fn direct_and_routed(s: &Server, origin: Option<&str>, query: &str) -> (Reply, Reply) {
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    let mut raw = Raw::connect(s).await;
    raw.send(&format!(
        "GET /pns/poll?{query} HTTP/1.1\r\nHost: pns\r\n{origin}\r\n"
    ))
    .await;
    let direct = raw.reply().await;
    raw.send(&format!(
        "HEAD /pns/poll?{query} HTTP/1.1\r\nHost: pns\r\n{origin}\r\n"
    ))
    .await;
    let routed = raw.reply_to(true, Duration::from_secs(10)).await;
    (direct, routed)
}

#[tokio::test]
async fn a_poll_answered_without_the_router_has_the_routers_head() {
    let webmail = "https://mail.example.com";
    let s = Server::start_with(&[("PNS_ALLOWED_ORIGINS", webmail)]);
    let sid = s.sid("alice@example.com");
    for origin in [Some(webmail), None, Some("https://elsewhere.example")] {
        for (query, status) in [
            (format!("sid={sid}&timeout=0"), 200),
            ("sid=not-a-token&timeout=0".to_owned(), 401),
            (format!("sid={sid}&cursor=zz&timeout=0"), 400),
        ] {
            let (direct, routed) = direct_and_routed(&s, origin, &query).await;
            assert_eq!(direct.status, status, "{origin:?} {query}");
            assert_eq!(
                without_date(&direct),
                without_date(&routed),
                "{origin:?} {query}"
            );
        }
    }
    // A refusal for the session's rate, with its Retry-After.
    let s = Server::start_with(&[
        ("PNS_ALLOWED_ORIGINS", webmail),
        ("PNS_SESSION_POLL_BURST", "1"),
        ("PNS_SESSION_POLL_RATE", "0.01"),
    ]);
    let sid = s.sid("alice@example.com");
    let query = format!("sid={sid}&timeout=0");
    assert_eq!(s.poll(&sid, "timeout=0").await.status, 200);
    let (direct, routed) = direct_and_routed(&s, Some(webmail), &query).await;
    assert_eq!(direct.status, 429);
    assert!(direct.header("retry-after").is_some());
    assert_eq!(without_date(&direct), without_date(&routed));
}

#[tokio::test]
async fn a_poll_without_a_cursor_is_answered_by_its_own_runtime() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let mut raw = Raw::connect(&s).await;
    raw.send(&poll_request(&sid, "timeout=0")).await;
    assert_eq!(raw.reply().await.c_of(), 0);
    // Its position is saved with its answer: not the committing thread's work.
    raw.send(&poll_request(&sid, "timeout=20")).await;
    s.polls_held_becomes(1).await;
    s.mail("alice@example.com", "one").await;
    assert_eq!(raw.reply().await.c_of(), 1);
    assert_eq!(metric(&s, AT_COMMIT).await, 0.0);
}

#[tokio::test]
async fn notifies_written_together_are_answered_in_order_and_delivered() {
    let s = Server::start();
    let token = s.internal_token();
    let (alice, bob) = (s.sid("alice@example.com"), s.sid("bob@example.com"));
    let mut raw = Raw::connect_to(s.internal).await;
    // Two notifies and a health check in one write, each body whole with
    // its head.
    raw.send(&format!(
        "{}{}GET /healthz HTTP/1.1\r\nHost: pns\r\n\r\n",
        notify_request(&token, "alice@example.com", "one"),
        notify_request(&token, "bob@example.com", "two"),
    ))
    .await;
    for _ in 0..2 {
        let r = raw.reply().await;
        assert_eq!(r.status, 202, "{}", r.body);
        assert_eq!(r.json()["accepted"], 1);
        assert_eq!(r.header("connection"), None);
    }
    assert_eq!(raw.reply().await.json()["status"], "ok");
    assert_eq!(subjects(&s, &alice).await, ["one"]);
    assert_eq!(subjects(&s, &bob).await, ["two"]);

    // A bad body is refused with its reason, and the connection goes on.
    let bad = r#"{"user":"alice@example.com","type":70"#;
    raw.send(&format!("{}{bad}", notify_head(&token, bad.len(), "")))
        .await;
    let r = raw.reply().await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["errorCode"], "BAD_REQUEST");
    raw.send(&notify_request(&token, "alice@example.com", "three"))
        .await;
    assert_eq!(raw.reply().await.status, 202);
    assert_eq!(subjects(&s, &alice).await, ["one", "three"]);
}

/// A sender that closes its connection as soon as its notify is written,
/// before its `202`, still has the notify stored and counted: the count
/// is of messages durably stored, whoever waits for them.
#[tokio::test]
async fn a_notify_whose_sender_closes_at_once_is_stored_and_counted() {
    let s = Server::start();
    let user = "alice@example.com";
    let sid = s.sid(user);
    for subject in ["one", "two", "three"] {
        let notify = serde_json::json!({"user": user, "type": 70, "data": {"subject": subject}});
        internal_post_and_leave(&s, "/internal/v1/notify", &notify).await;
    }
    let accepted = "pns_messages_accepted_total{source=\"api\"}";
    metric_becomes(&s, accepted, 3.0).await;
    let mut stored = subjects(&s, &sid).await;
    stored.sort();
    assert_eq!(stored, ["one", "three", "two"]);
}

#[tokio::test]
async fn a_notify_body_that_comes_later_or_after_100_continue_is_read() {
    let s = Server::start();
    let token = s.internal_token();
    let user = "alice@example.com";
    let sid = s.sid(user);

    // The head and the start of the body, then the rest a while later.
    let mut raw = Raw::connect_to(s.internal).await;
    let request = notify_request(&token, user, "late");
    let (first, rest) = request.split_at(request.find("\r\n\r\n").unwrap() + 8);
    raw.send(first).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    raw.send(rest).await;
    assert_eq!(raw.reply().await.status, 202);
    // The connection goes on with a notify in one piece.
    raw.send(&notify_request(&token, user, "next")).await;
    assert_eq!(raw.reply().await.status, 202);

    // A client that waits for `100 Continue` before its body.
    let mut raw = Raw::connect_to(s.internal).await;
    let body = mail(user, "continued").to_string();
    raw.send(&notify_head(&token, body.len(), "Expect: 100-continue\r\n"))
        .await;
    let go_on = raw.reply_to(true, Duration::from_secs(10)).await;
    assert_eq!(go_on.status, 100);
    raw.send(&body).await;
    assert_eq!(raw.reply().await.status, 202);

    assert_eq!(subjects(&s, &sid).await, ["late", "next", "continued"]);
}
