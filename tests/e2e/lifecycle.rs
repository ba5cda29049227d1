//! Start, crash and stop: nothing acknowledged is lost, nobody is left hanging.

use crate::support::*;
use reqwest::StatusCode;
use std::time::Duration;

#[tokio::test]
async fn a_message_acknowledged_before_kill_9_is_delivered_after_restart() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let a = s.notify(mail("alice@example.com", "survives")).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let s = s.kill9_and_restart();
    let got = s.poll(&sid, "timeout=5").await;
    assert_eq!(got.subjects(), ["survives"]);
    assert_eq!(got.body["msg"][0]["id"], a.body["ids"][0]);
}

#[tokio::test]
async fn a_delayed_message_survives_a_restart_and_still_comes() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let a = s
        .notify(serde_json::json!({"user": "alice@example.com", "type": 70, "data": {"subject": "late"}, "delayMs": 1000}))
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let s = s.kill9_and_restart();
    assert_eq!(s.poll(&sid, "timeout=10").await.subjects(), ["late"]);
}

#[tokio::test]
async fn a_client_without_cursor_is_not_answered_again_after_a_clean_restart() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    s.mail("alice@example.com", "one").await;
    assert_eq!(s.poll(&sid, "timeout=0").await.subjects(), ["one"]);
    let s = s.sigterm_and_restart();
    assert_eq!(s.poll(&sid, "timeout=0").await.c(), 0);
    s.mail("alice@example.com", "two").await;
    assert_eq!(s.poll(&sid, "timeout=0").await.subjects(), ["two"]);
}

#[tokio::test]
async fn after_kill_9_a_client_without_cursor_misses_nothing() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    s.mail("alice@example.com", "one").await;
    assert_eq!(s.poll(&sid, "timeout=0").await.subjects(), ["one"]);
    let s = s.kill9_and_restart();
    s.mail("alice@example.com", "two").await;
    // Its position is written behind, so the last answer may come again
    // (delivery is at least once); what came after it must come.
    let got = s.poll(&sid, "timeout=0").await.subjects();
    assert!(got == ["two"] || got == ["one", "two"], "got {got:?}");
}

#[tokio::test]
async fn after_kill_9_a_client_without_cursor_gets_at_most_its_last_answer_again() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    s.mail("alice@example.com", "one").await;
    assert_eq!(s.poll(&sid, "timeout=0").await.subjects(), ["one"]);
    s.mail("alice@example.com", "two").await;
    // This poll reads the position the first answer left: from now on a
    // restart needs it, and it is written within the write-behind's 100 ms.
    assert_eq!(s.poll(&sid, "timeout=0").await.subjects(), ["two"]);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let s = s.kill9_and_restart();
    s.mail("alice@example.com", "three").await;
    let got = s.poll(&sid, "timeout=0").await.subjects();
    assert!(got == ["three"] || got == ["two", "three"], "got {got:?}");
}

/// [`Server::sigterm`] off the runtime's thread; the server comes back, so
/// that a failing assertion after it still shows its log.
async fn sigterm(mut s: Server) -> (Server, (Option<i32>, Duration)) {
    tokio::task::spawn_blocking(move || {
        let exit = s.sigterm();
        (s, exit)
    })
    .await
    .unwrap()
}

/// A SIGTERM as soon as the node says it listens is a clean shutdown
/// too: it listens for the signal before it says so.
#[tokio::test]
async fn sigterm_right_after_listening_exits_cleanly() {
    for _ in 0..10 {
        let s = Server::start();
        let (_s, (code, _)) = sigterm(s).await;
        assert_eq!(code, Some(0), "pns did not exit cleanly");
    }
}

#[tokio::test]
async fn sigterm_answers_held_polls_at_once_and_exits_cleanly() {
    let s = Server::start();
    let sids: Vec<String> = (0..5)
        .map(|i| s.sid(&format!("u{i}@example.com")))
        .collect();
    let polls: Vec<_> = sids
        .iter()
        .map(|sid| {
            let url = s.public_url(&format!("/pns/poll?sid={sid}&timeout=60"));
            let http = s.http.clone();
            tokio::spawn(async move { answer(http.get(url).send().await.unwrap()).await })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while s.internal_get("/internal/v1/stats").await.body["pollsHeld"] != 5 {
        assert!(std::time::Instant::now() < deadline, "polls were not held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_s, (code, took)) = sigterm(s).await;
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    for p in polls {
        let a = p.await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.c(), 0);
    }
}

#[tokio::test]
async fn a_batch_in_flight_at_sigterm_is_stored_whole_or_not_at_all() {
    let mut s = Server::start();
    let sid = s.sid("alice@example.com");
    let batch: Vec<_> = (0..1000)
        .map(|i| mail("alice@example.com", &format!("m{i}")))
        .collect();
    let req = s
        .http
        .post(s.internal_url("/internal/v1/notify"))
        .bearer_auth(s.internal_token())
        .json(&serde_json::json!({ "messages": batch }));
    let sent = tokio::spawn(async move { req.send().await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut s = tokio::task::spawn_blocking(move || {
        assert_eq!(s.sigterm().0, Some(0));
        s
    })
    .await
    .unwrap();
    let status = sent.await.unwrap();
    s = s.kill9_and_restart();
    let mut cursor = "1.0".to_owned();
    let mut delivered = 0;
    loop {
        let a = s.poll(&sid, &format!("timeout=0&cursor={cursor}")).await;
        delivered += a.c();
        cursor = a.cursor();
        if a.body["more"] != true {
            break;
        }
    }
    match status {
        Ok(StatusCode::ACCEPTED) => assert_eq!(delivered, 1000),
        other => assert!(
            delivered == 0 || delivered == 1000,
            "{other:?}: {delivered} of 1000 stored"
        ),
    }
}
