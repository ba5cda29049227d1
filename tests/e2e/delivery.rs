//! Delivery: what a poller receives, when, and how often.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn held_poll_wakes_when_mail_arrives() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let started = Instant::now();
    let poll = tokio::spawn({
        let url = s.public_url(&format!("/pns/poll?sid={sid}&timeout=20"));
        let http = s.http.clone();
        async move { answer(http.get(url).send().await.unwrap()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.mail("alice@example.com", "Hello").await;
    let a = poll.await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.c(), 1);
    assert_eq!(a.subjects(), ["Hello"]);
    assert_eq!(a.body["msg"][0]["type"], 70);
    assert!(a.body["msg"][0]["id"].is_string());
    assert!(a.body["msg"][0]["time"].is_i64());
    assert_eq!(a.headers["cache-control"], "no-store");
    // Woken by the notify, not by the 20 s hold running out.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "poll answered after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn poll_without_news_answers_empty_when_its_timeout_ends() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let started = Instant::now();
    let a = s.poll(&sid, "timeout=1").await;
    let took = started.elapsed();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["c"], 0);
    assert_eq!(a.body["msg"], json!([]));
    assert!(a.body["cursor"].is_string());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "took {took:?}"
    );
}

#[tokio::test]
async fn timeout_zero_answers_at_once_and_a_bad_timeout_is_refused() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let started = Instant::now();
    let a = s.poll(&sid, "timeout=0").await;
    assert_eq!(a.c(), 0);
    assert!(started.elapsed() < Duration::from_secs(2));
    let bad = s.poll(&sid, "timeout=soon").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.body["errorCode"], "BAD_REQUEST");
    assert!(bad.body["error"].as_str().unwrap().contains("timeout"));
    let bad = s.poll(&sid, "cursor=nonsense&timeout=0").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body["error"].as_str().unwrap().contains("cursor"));
}

#[tokio::test]
async fn every_session_of_the_user_receives_and_other_users_do_not() {
    let s = Server::start();
    let (a1, a2, b) = (
        s.sid("alice@example.com"),
        s.sid("alice@example.com"),
        s.sid("bob@example.com"),
    );
    let (p1, p2, pb) = (
        s.poll(&a1, "timeout=10"),
        s.poll(&a2, "timeout=10"),
        s.poll(&b, "timeout=2"),
    );
    let send = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.mail("alice@example.com", "For Alice").await;
    };
    let (r1, r2, rb, _) = tokio::join!(p1, p2, pb, send);
    assert_eq!(r1.subjects(), ["For Alice"]);
    assert_eq!(r2.subjects(), ["For Alice"]);
    assert_eq!(rb.c(), 0);
}

#[tokio::test]
async fn an_old_cursor_gets_the_same_messages_again_and_the_new_one_nothing() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let first = s.poll(&sid, "timeout=0").await;
    s.mail("alice@example.com", "one").await;
    s.mail("alice@example.com", "two").await;
    let start = first.cursor();
    let a = s.poll(&sid, &format!("cursor={start}&timeout=0")).await;
    assert_eq!(a.subjects(), ["one", "two"]);
    // The answer was "lost": polling again with the old cursor redelivers.
    let again = s.poll(&sid, &format!("cursor={start}&timeout=0")).await;
    assert_eq!(again.subjects(), ["one", "two"]);
    assert_eq!(again.body["msg"][0]["id"], a.body["msg"][0]["id"]);
    let next = s
        .poll(&sid, &format!("cursor={}&timeout=0", a.cursor()))
        .await;
    assert_eq!(next.c(), 0);
}

#[tokio::test]
async fn a_client_without_cursor_gets_each_message_once() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    s.mail("alice@example.com", "one").await;
    assert_eq!(s.poll(&sid, "timeout=0").await.subjects(), ["one"]);
    assert_eq!(s.poll(&sid, "timeout=0").await.c(), 0);
    s.mail("alice@example.com", "two").await;
    s.mail("alice@example.com", "three").await;
    assert_eq!(s.poll(&sid, "timeout=0").await.subjects(), ["two", "three"]);
    assert_eq!(s.poll(&sid, "timeout=0").await.c(), 0);
}

#[tokio::test]
async fn many_pending_messages_come_in_answers_of_100_in_order() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let messages: Vec<_> = (0..250)
        .map(|i| mail("alice@example.com", &format!("m{i:03}")))
        .collect();
    let a = s.notify(json!({ "messages": messages })).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    assert_eq!(a.body["accepted"], 250);
    let mut cursor = String::new();
    let mut all = Vec::new();
    for (expect_c, expect_more) in [(100, true), (100, true), (50, false)] {
        let a = s.poll(&sid, &format!("cursor={cursor}&timeout=0")).await;
        assert_eq!(a.c(), expect_c);
        assert_eq!(a.body["msg"].as_array().unwrap().len() as u64, expect_c);
        assert_eq!(a.body["more"], expect_more);
        cursor = a.cursor();
        all.extend(a.subjects());
    }
    let expected: Vec<String> = (0..250).map(|i| format!("m{i:03}")).collect();
    assert_eq!(all, expected);
}

#[tokio::test]
async fn a_repeated_dedup_key_is_stored_once() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let msg = json!({"user": "alice@example.com", "type": 70, "data": {"subject": "once"}, "dedupKey": "k1"});
    let first = s.notify(msg.clone()).await;
    assert_eq!(first.body["accepted"], 1);
    assert_eq!(first.body["duplicates"], 0);
    let second = s.notify(msg).await;
    assert_eq!(second.status, StatusCode::ACCEPTED);
    assert_eq!(second.body["accepted"], 0);
    assert_eq!(second.body["duplicates"], 1);
    assert_eq!(second.body["ids"][0], first.body["ids"][0]);
    assert_eq!(s.poll(&sid, "timeout=0").await.subjects(), ["once"]);
}

#[tokio::test]
async fn a_batch_with_one_bad_message_stores_nothing() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let bad = s
        .notify(json!({"messages": [
            mail("alice@example.com", "good"),
            {"user": "alice@example.com", "type": "seventy"},
        ]}))
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad.body["errorCode"], "INVALID_FIELD");
    assert!(
        bad.body["error"]
            .as_str()
            .unwrap()
            .contains("messages[1].type"),
        "{}",
        bad.body
    );
    let bad = s
        .notify(json!({"messages": [mail("alice@example.com", "good"), {"user": "", "type": 70}]}))
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        bad.body["error"]
            .as_str()
            .unwrap()
            .contains("messages[1].user"),
        "{}",
        bad.body
    );
    assert_eq!(s.poll(&sid, "timeout=0").await.c(), 0);
}

#[tokio::test]
async fn a_delayed_message_comes_when_due_and_not_before() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let sent = Instant::now();
    let a = s
        .notify(json!({"user": "alice@example.com", "type": 70, "data": {"subject": "later"}, "delayMs": 1500}))
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    assert_eq!(s.poll(&sid, "timeout=0").await.c(), 0);
    let held = s.poll(&sid, "timeout=10").await;
    assert_eq!(held.subjects(), ["later"]);
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(1400),
        "delivered after {took:?}"
    );
    assert!(took < Duration::from_secs(8), "delivered after {took:?}");
}

#[tokio::test]
async fn a_session_does_not_receive_mail_from_before_it_started() {
    let s = Server::start();
    s.mail("alice@example.com", "old news").await;
    // Token `iat` has second resolution: start the session in a later second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let sid = s.sid("alice@example.com");
    assert_eq!(s.poll(&sid, "timeout=0").await.c(), 0);
    s.mail("alice@example.com", "new").await;
    assert_eq!(s.poll(&sid, "timeout=0").await.subjects(), ["new"]);
}

#[tokio::test]
async fn a_newer_poll_of_the_session_releases_the_older() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let started = Instant::now();
    let older = s.poll(&sid, "timeout=20");
    let newer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.poll(&sid, "timeout=1").await
    };
    let (older, _newer) = tokio::join!(older, newer);
    assert_eq!(older.status, StatusCode::OK);
    assert_eq!(older.c(), 0);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn a_vanished_client_leaves_no_poll_held() {
    use tokio::io::AsyncWriteExt;
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let mut raw = tokio::net::TcpStream::connect(s.public).await.unwrap();
    raw.write_all(
        format!("GET /pns/poll?sid={sid}&timeout=30 HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.polls_held().await != 1 {
        assert!(Instant::now() < deadline, "the poll was never held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(raw);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.polls_held().await != 0 {
        assert!(
            Instant::now() < deadline,
            "the poll of a closed connection is still held"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
