//! Operators: Prometheus metrics, the session list and stats, opaque
//! sessions, abuse limits and `pns stats`, each driven by a scripted scenario
//! against the real server.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// A poll running in the background.
fn spawn_poll(s: &Server, sid: &str, query: &str) -> JoinHandle<Answer> {
    let url = s.public_url(&format!("/pns/poll?sid={sid}&{query}"));
    let http = s.http.clone();
    tokio::spawn(async move { answer(http.get(url).send().await.unwrap()).await })
}

/// The `jti` claim of a token minted by the harness.
fn jti(token: &str) -> String {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: Value = serde_json::from_slice(&bytes).unwrap();
    claims["jti"].as_str().unwrap().to_owned()
}

async fn sessions_of(s: &Server, user: &str) -> Vec<Value> {
    let a = s
        .internal_get(&format!("/internal/v1/sessions?user={user}"))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["user"], user);
    a.body["sessions"].as_array().unwrap().clone()
}

async fn internal_delete(s: &Server, path: &str, body: Option<Value>) -> Answer {
    let mut r = s
        .http
        .delete(s.internal_url(path))
        .bearer_auth(s.internal_token());
    if let Some(b) = body {
        r = r.json(&b);
    }
    answer(r.send().await.unwrap()).await
}

fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn metrics_follow_polls_answers_and_deliveries() {
    let s = Server::start();
    let text = metrics(&s).await;
    for series in [
        "pns_polls_held",
        "pns_answers_owed",
        "pns_rounds_held_for_answers_total",
        "pns_sessions_active",
        "pns_poll_answers_total{outcome=\"message\"}",
        "pns_poll_answers_total{outcome=\"timeout\"}",
        "pns_poll_answers_total{outcome=\"superseded\"}",
        "pns_poll_answers_total{outcome=\"error\"}",
        "pns_poll_answers_total{outcome=\"shutdown\"}",
        "pns_messages_accepted_total{source=\"api\"}",
        "pns_messages_accepted_total{source=\"maildir\"}",
        "pns_messages_accepted_total{source=\"dovecot\"}",
        "pns_messages_delivered_total",
        "pns_duplicates_total",
        "pns_store_errors_total",
        "pns_delivery_latency_seconds_count",
    ] {
        assert_eq!(sample(&text, series), Some(0.0), "{series} in\n{text}");
    }

    // A held poll shows; mail answers it.
    let sid = s.sid("alice@example.com");
    let held = spawn_poll(&s, &sid, "timeout=20&comeFrom=webmail");
    metric_becomes(&s, "pns_polls_held", 1.0).await;
    assert_eq!(metric(&s, "pns_sessions_active").await, 1.0);
    s.mail("alice@example.com", "one").await;
    assert_eq!(held.await.unwrap().subjects(), ["one"]);
    let text = metrics(&s).await;
    assert_eq!(sample(&text, "pns_polls_held"), Some(0.0));
    assert_eq!(
        sample(&text, "pns_poll_answers_total{outcome=\"message\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "pns_messages_accepted_total{source=\"api\"}"),
        Some(1.0)
    );
    assert_eq!(sample(&text, "pns_messages_delivered_total"), Some(1.0));
    assert_eq!(
        sample(&text, "pns_delivery_latency_seconds_count"),
        Some(1.0)
    );

    // A repeated dedupKey is refused as a duplicate.
    let keyed = json!({"user": "alice@example.com", "type": 70, "data": {}, "dedupKey": "k"});
    s.notify(keyed.clone()).await;
    s.notify(keyed).await;
    assert_eq!(metric(&s, "pns_duplicates_total").await, 1.0);
    assert_eq!(
        metric(&s, "pns_messages_accepted_total{source=\"api\"}").await,
        2.0
    );

    // Timeout, superseded, error.
    let cursor = s.poll(&sid, "timeout=0").await.cursor();
    assert_eq!(
        metric(&s, "pns_poll_answers_total{outcome=\"message\"}").await,
        2.0
    );
    let older = spawn_poll(&s, &sid, &format!("cursor={cursor}&timeout=20"));
    metric_becomes(&s, "pns_polls_held", 1.0).await;
    let newer = s
        .poll(
            &sid,
            &format!("cursor={cursor}&timeout=0&comeFrom=my%20app!"),
        )
        .await;
    assert_eq!(newer.c(), 0);
    assert_eq!(older.await.unwrap().c(), 0);
    assert_eq!(s.poll("forged", "timeout=0").await.status, 401);
    let text = metrics(&s).await;
    assert_eq!(
        sample(&text, "pns_poll_answers_total{outcome=\"timeout\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "pns_poll_answers_total{outcome=\"superseded\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "pns_poll_answers_total{outcome=\"error\"}"),
        Some(1.0)
    );
    // By client tag: cleaned, and "none" without one.
    assert_eq!(
        sample(&text, "pns_polls_by_come_from_total{come_from=\"webmail\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "pns_polls_by_come_from_total{come_from=\"my_app_\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "pns_polls_by_come_from_total{come_from=\"none\"}"),
        Some(2.0)
    );
    assert_eq!(sample(&text, "pns_store_errors_total"), Some(0.0));
    assert!(text.trim_end().ends_with("# EOF"));
}

/// An operator sees how long the disk takes to sync the log the
/// acknowledgements wait for, sync by sync, and so a disk that grows slow.
#[tokio::test]
async fn the_syncs_that_acknowledgements_wait_for_are_timed() {
    let s = Server::start();
    let before = metric(&s, "pns_wal_sync_seconds_count").await;
    for subject in ["one", "two", "three"] {
        // Each 202 comes after a sync of the log that holds the message.
        s.mail("alice@example.com", subject).await;
    }
    let text = metrics(&s).await;
    let count = sample(&text, "pns_wal_sync_seconds_count").unwrap();
    assert!(count > before, "{count} syncs timed, {before} before");
    assert!(sample(&text, "pns_wal_sync_seconds_sum").unwrap() > 0.0);
    assert_eq!(
        sample(&text, "pns_wal_sync_seconds_bucket{le=\"+Inf\"}"),
        Some(count)
    );
    // A slow sync falls in the buckets at and above the warning's 100 ms.
    assert!(sample(&text, "pns_wal_sync_seconds_bucket{le=\"0.1\"}").is_some());
}

#[tokio::test]
async fn the_come_from_breakdown_keeps_32_values_and_counts_the_rest_as_other() {
    let s = Server::start_with(&[("PNS_SESSION_POLL_RATE", "0")]);
    let sid = s.sid("alice@example.com");
    for i in 0..40 {
        let a = s.poll(&sid, &format!("timeout=0&comeFrom=client{i}")).await;
        assert_eq!(a.status, StatusCode::OK);
    }
    let text = metrics(&s).await;
    let tags = text
        .lines()
        .filter(|l| l.starts_with("pns_polls_by_come_from_total{"))
        .count();
    assert_eq!(tags, 33, "{text}");
    assert_eq!(
        sample(&text, "pns_polls_by_come_from_total{come_from=\"client0\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "pns_polls_by_come_from_total{come_from=\"other\"}"),
        Some(8.0)
    );
}

#[tokio::test]
async fn the_session_list_shows_each_session_and_revocation_ends_it() {
    let s = Server::start();
    let (web, mobile) = (s.sid("alice@example.com"), s.sid("alice@example.com"));
    let before = pns::clock::now_ms();
    let first = spawn_poll(&s, &web, "timeout=20&comeFrom=webmail");
    metric_becomes(&s, "pns_polls_held", 1.0).await;
    assert_eq!(s.poll(&mobile, "timeout=0&comeFrom=mobile").await.c(), 0);
    s.mail("alice@example.com", "one").await;
    assert_eq!(first.await.unwrap().c(), 1);
    let again = spawn_poll(&s, &web, "timeout=20&comeFrom=webmail");
    metric_becomes(&s, "pns_polls_held", 1.0).await;

    let list = sessions_of(&s, "alice@example.com").await;
    assert_eq!(list.len(), 2, "{list:?}");
    let find = |jti: &str| list.iter().find(|x| x["jti"] == jti).unwrap().clone();
    let w = find(&self::jti(&web));
    assert_eq!(w["user"], "alice@example.com");
    assert_eq!(w["kind"], "jwt");
    assert_eq!(w["comeFrom"], "webmail");
    assert_eq!(w["address"], "127.0.0.1");
    assert_eq!(w["pollsHeld"], 1);
    assert_eq!(w["messagesDelivered"], 1);
    let (first_ms, last_ms) = (
        w["firstPollMs"].as_i64().unwrap(),
        w["lastPollMs"].as_i64().unwrap(),
    );
    assert!(before <= first_ms && first_ms <= last_ms, "{w}");
    assert!(last_ms <= pns::clock::now_ms());
    let m = find(&self::jti(&mobile));
    assert_eq!(m["comeFrom"], "mobile");
    assert_eq!(m["pollsHeld"], 0);
    assert_eq!(m["messagesDelivered"], 0);
    assert!(sessions_of(&s, "bob@example.com").await.is_empty());

    let no_user = s.internal_get("/internal/v1/sessions").await;
    assert_eq!(no_user.status, StatusCode::BAD_REQUEST);
    assert!(no_user.body["error"].as_str().unwrap().contains("user"));
    let no_token = s
        .http
        .get(s.internal_url("/internal/v1/sessions?user=alice@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), StatusCode::UNAUTHORIZED);

    // Revoking one session ends its held poll with 401 and drops it.
    let r = s
        .internal_post(
            "/internal/v1/sessions/revoke",
            json!({"jti": self::jti(&web)}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let ended = again.await.unwrap();
    assert_eq!(ended.status, StatusCode::UNAUTHORIZED);
    assert_eq!(ended.body["errorCode"], "SESSION_INVALID");
    let list = sessions_of(&s, "alice@example.com").await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["jti"], self::jti(&mobile));
    // Revoking the user ends the rest.
    let r = s
        .internal_post(
            "/internal/v1/sessions/revoke",
            json!({"user": "alice@example.com"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(sessions_of(&s, "alice@example.com").await.is_empty());
    assert_eq!(s.poll(&mobile, "timeout=0").await.status, 401);
    assert_eq!(metric(&s, "pns_sessions_active").await, 0.0);
}

#[tokio::test]
async fn forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    for (trusted, expected) in [("127.0.0.1", "203.0.113.7"), ("10.0.0.0/8", "127.0.0.1")] {
        let s = Server::start_with(&[("PNS_TRUSTED_PROXIES", trusted)]);
        let sid = s.sid("alice@example.com");
        let r = s
            .http
            .get(s.public_url(&format!("/pns/poll?sid={sid}&timeout=0")))
            .header("X-Forwarded-For", "198.51.100.1, 203.0.113.7")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let list = sessions_of(&s, "alice@example.com").await;
        assert_eq!(list[0]["address"], expected, "trusting {trusted}");
    }
}

#[tokio::test]
async fn stats_summarise_sessions_deliveries_and_latency() {
    let s = Server::start();
    let st = s.internal_get("/internal/v1/stats").await;
    assert_eq!(st.status, StatusCode::OK);
    assert_eq!(st.body["sessionsActive"], 0);
    assert_eq!(st.body["deliveryLatencyMs"]["samples"], 0);
    assert!(st.body["deliveryLatencyMs"]["p50"].is_null());
    assert!(st.body["deliveryLatencyMs"]["p99"].is_null());

    let sid = s.sid("alice@example.com");
    let held = spawn_poll(&s, &sid, "timeout=20");
    metric_becomes(&s, "pns_polls_held", 1.0).await;
    let st = s.internal_get("/internal/v1/stats").await;
    assert_eq!(st.body["pollsHeld"], 1);
    assert_eq!(st.body["sessionsActive"], 1);
    for subject in ["one", "two", "three"] {
        s.mail("alice@example.com", subject).await;
    }
    let got = held.await.unwrap().c() + s.poll(&sid, "timeout=0").await.c();
    assert_eq!(got, 3);
    let st = s.internal_get("/internal/v1/stats").await;
    let b = &st.body;
    assert_eq!(b["pollsHeld"], 0);
    assert_eq!(b["messagesAccepted"], 3);
    assert_eq!(b["messagesStored"], 3);
    assert_eq!(b["messagesDelivered"], 3);
    assert!(b["pollAnswers"]["message"].as_u64().unwrap() >= 1, "{b}");
    assert_eq!(b["deliveryLatencyMs"]["samples"], 3);
    let p50 = b["deliveryLatencyMs"]["p50"].as_u64().unwrap();
    let p99 = b["deliveryLatencyMs"]["p99"].as_u64().unwrap();
    assert!(p50 <= p99, "{b}");
    assert_eq!(b["holdSecs"], 30);
    assert!(b["version"].is_string());
}

#[tokio::test]
async fn an_opaque_session_gets_mail_from_its_registration_on_until_deleted() {
    let s = Server::start();
    let sid = "webmail-sess-6f1c2a9b8e7d4c30";
    s.mail("alice@example.com", "before").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = s
        .internal_post(
            "/internal/v1/sessions",
            json!({"sid": sid, "user": "alice@example.com", "ttlSecs": 3600}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["jti"], sha256_hex(sid));
    assert_eq!(r.body["user"], "alice@example.com");
    let start = r.body["startMs"].as_i64().unwrap();
    assert_eq!(r.body["expiresMs"].as_i64().unwrap(), start + 3_600_000);

    // Older mail is not news to it; mail after registration is.
    assert_eq!(s.poll(sid, "timeout=0").await.c(), 0);
    let held = spawn_poll(&s, sid, "timeout=20&comeFrom=legacy");
    metric_becomes(&s, "pns_polls_held", 1.0).await;
    s.mail("alice@example.com", "after").await;
    assert_eq!(held.await.unwrap().subjects(), ["after"]);
    let list = sessions_of(&s, "alice@example.com").await;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["jti"], sha256_hex(sid));
    assert_eq!(list[0]["kind"], "opaque");
    assert_eq!(list[0]["messagesDelivered"], 1);
    // Registering it again while it lives moves only its expiry.
    let again = s
        .internal_post(
            "/internal/v1/sessions",
            json!({"sid": sid, "user": "alice@example.com", "ttlSecs": 7200}),
        )
        .await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body["startMs"].as_i64().unwrap(), start);
    assert!(again.body["expiresMs"].as_i64().unwrap() >= start + 7_200_000);
    // The cookie works as for tokens.
    let by_cookie = s
        .http
        .get(s.public_url("/pns/poll?timeout=0"))
        .header("Cookie", format!("pns_sid={sid}"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_cookie.status(), StatusCode::OK);

    // Deleting it ends its held poll and refuses it from then on.
    let held = spawn_poll(&s, sid, "timeout=20");
    metric_becomes(&s, "pns_polls_held", 1.0).await;
    let d = internal_delete(&s, "/internal/v1/sessions", Some(json!({"sid": sid}))).await;
    assert_eq!(d.status, StatusCode::OK);
    assert_eq!(d.body["deleted"], true);
    let ended = held.await.unwrap();
    assert_eq!(ended.status, StatusCode::UNAUTHORIZED);
    let after = s.poll(sid, "timeout=0").await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);
    assert_eq!(after.body["errorCode"], "SESSION_INVALID");
    assert!(sessions_of(&s, "alice@example.com").await.is_empty());
    let again = internal_delete(&s, "/internal/v1/sessions", Some(json!({"sid": sid}))).await;
    assert_eq!(again.body["deleted"], false);

    // An unknown opaque sid is refused, not looked up as a JWT.
    let unknown = s.poll("never-registered-0123456789", "timeout=0").await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert!(unknown.body["error"]
        .as_str()
        .unwrap()
        .contains("not known"));
}

#[tokio::test]
async fn an_opaque_session_expires_after_its_ttl_and_can_be_deleted_by_id() {
    let s = Server::start();
    let sid = "short-lived-session-0001";
    let r = s
        .internal_post(
            "/internal/v1/sessions",
            json!({"sid": sid, "user": "alice@example.com", "ttlSecs": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(s.poll(sid, "timeout=0").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let expired = s.poll(sid, "timeout=0").await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    assert!(
        expired.body["error"].as_str().unwrap().contains("expired"),
        "{}",
        expired.body
    );

    let other = "another-session-00000002";
    s.internal_post(
        "/internal/v1/sessions",
        json!({"sid": other, "user": "alice@example.com", "ttlSecs": 60}),
    )
    .await;
    assert_eq!(s.poll(other, "timeout=0").await.status, StatusCode::OK);
    let d = internal_delete(
        &s,
        &format!("/internal/v1/sessions/{}", sha256_hex(other)),
        None,
    )
    .await;
    assert_eq!(d.status, StatusCode::OK, "{}", d.body);
    assert_eq!(d.body["deleted"], true);
    assert_eq!(s.poll(other, "timeout=0").await.status, 401);
    let bad_id = internal_delete(&s, "/internal/v1/sessions/not-a-hash", None).await;
    assert_eq!(bad_id.status, StatusCode::BAD_REQUEST);

    // Bad registrations name the field.
    for (body, field) in [
        (
            json!({"sid": sid, "user": "alice@example.com", "ttlSecs": 0}),
            "ttlSecs",
        ),
        (
            json!({"sid": "abc", "user": "alice@example.com", "ttlSecs": 60}),
            "sid",
        ),
        (
            json!({"sid": s.sid("alice@example.com"), "user": "alice@example.com", "ttlSecs": 60}),
            "sid",
        ),
        (json!({"sid": sid, "user": "", "ttlSecs": 60}), "user"),
        (json!({"sid": sid, "ttlSecs": 60}), "user"),
    ] {
        let r = s.internal_post("/internal/v1/sessions", body.clone()).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(
            r.body["error"].as_str().unwrap().contains(field),
            "{body} -> {}",
            r.body
        );
    }
}

#[tokio::test]
async fn polls_past_a_rate_limit_get_429_with_retry_after() {
    let s = Server::start_with(&[
        ("PNS_SESSION_POLL_RATE", "0.1"),
        ("PNS_SESSION_POLL_BURST", "2"),
    ]);
    let sid = s.sid("alice@example.com");
    assert_eq!(s.poll(&sid, "timeout=0").await.status, StatusCode::OK);
    assert_eq!(s.poll(&sid, "timeout=0").await.status, StatusCode::OK);
    let limited = s.poll(&sid, "timeout=0").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.body["errorCode"], "RATE_LIMITED");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "Retry-After {retry}");
    // Another session of the same user has its own allowance.
    let other = s.sid("alice@example.com");
    assert_eq!(s.poll(&other, "timeout=0").await.status, StatusCode::OK);
    assert_eq!(
        metric(&s, "pns_polls_rate_limited_total{scope=\"session\"}").await,
        1.0
    );

    let s = Server::start_with(&[
        ("PNS_SESSION_POLL_RATE", "0"),
        ("PNS_ADDRESS_POLL_RATE", "0.1"),
        ("PNS_ADDRESS_POLL_BURST", "3"),
    ]);
    for _ in 0..3 {
        let sid = s.sid("alice@example.com");
        assert_eq!(s.poll(&sid, "timeout=0").await.status, StatusCode::OK);
    }
    let sid = s.sid("bob@example.com");
    let limited = s.poll(&sid, "timeout=0").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.headers.contains_key("retry-after"));
    assert_eq!(
        metric(&s, "pns_polls_rate_limited_total{scope=\"address\"}").await,
        1.0
    );
}

#[tokio::test]
async fn a_user_past_the_held_poll_cap_loses_the_oldest_poll() {
    let s = Server::start_with(&[("PNS_MAX_POLLS_PER_USER", "2")]);
    let started = Instant::now();
    let oldest = spawn_poll(&s, &s.sid("alice@example.com"), "timeout=20");
    metric_becomes(&s, "pns_polls_held", 1.0).await;
    let second = spawn_poll(&s, &s.sid("alice@example.com"), "timeout=20");
    metric_becomes(&s, "pns_polls_held", 2.0).await;
    let bob = spawn_poll(&s, &s.sid("bob@example.com"), "timeout=20");
    metric_becomes(&s, "pns_polls_held", 3.0).await;
    let third = spawn_poll(&s, &s.sid("alice@example.com"), "timeout=20");
    let released = oldest.await.unwrap();
    assert_eq!(released.status, StatusCode::OK);
    assert_eq!(released.c(), 0);
    assert!(started.elapsed() < Duration::from_secs(15));
    metric_becomes(&s, "pns_polls_held", 3.0).await;
    assert_eq!(
        metric(&s, "pns_poll_answers_total{outcome=\"capped\"}").await,
        1.0
    );
    // The two newer polls are still held and get the mail.
    s.mail("alice@example.com", "hi").await;
    assert_eq!(second.await.unwrap().subjects(), ["hi"]);
    assert_eq!(third.await.unwrap().subjects(), ["hi"]);
    assert!(!bob.is_finished());
    bob.abort();
}

#[tokio::test]
async fn long_urls_and_oversized_bodies_are_refused() {
    let s = Server::start_with(&[("PNS_MAX_BODY_BYTES", "2048")]);
    let sid = s.sid("alice@example.com");
    let long = s
        .http
        .get(s.public_url(&format!(
            "/pns/poll?sid={sid}&timeout=0&comeFrom={}",
            "x".repeat(9000)
        )))
        .send()
        .await
        .unwrap();
    let long = answer(long).await;
    assert_eq!(long.status, StatusCode::URI_TOO_LONG);
    assert_eq!(long.body["errorCode"], "URI_TOO_LONG");

    let with_body = s
        .http
        .get(s.public_url(&format!("/pns/poll?sid={sid}&timeout=0")))
        .body("x".repeat(100))
        .send()
        .await
        .unwrap();
    let with_body = answer(with_body).await;
    assert_eq!(with_body.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(with_body.body["errorCode"], "PAYLOAD_TOO_LARGE");

    let big = s
        .notify(
            json!({"user": "alice@example.com", "type": 70, "data": {"subject": "x".repeat(4000)}}),
        )
        .await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(big.body["error"].as_str().unwrap().contains("2048"));
    // A body within the limit still goes through.
    s.mail("alice@example.com", "small").await;
}

/// Send a raw request head (and maybe part of a body) and read what comes back
/// until the server closes the connection.
async fn read_to_close(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut buf)).await;
    match read {
        Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn an_internal_body_that_stalls_gets_408_and_the_connection_closes() {
    let s = Server::start_with(&[("PNS_BODY_TIMEOUT_SECS", "1")]);
    // Minted first: a session sees only what came after its token's second.
    let sid = s.sid("alice@example.com");
    let mut raw = tokio::net::TcpStream::connect(s.internal).await.unwrap();
    let head = format!(
        "POST /internal/v1/notify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"user\":",
        s.internal_token()
    );
    raw.write_all(head.as_bytes()).await.unwrap();
    let reply = read_to_close(&mut raw, Duration::from_secs(8))
        .await
        .expect("the stalled request was not answered and closed");
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("REQUEST_TIMEOUT"), "{reply}");
    // Nothing was stored.
    assert_eq!(s.poll(&sid, "timeout=0").await.c(), 0);
    assert_eq!(
        s.internal_get("/internal/v1/stats").await.body["messagesStored"],
        0
    );
}

#[tokio::test]
async fn a_client_sending_headers_slowly_is_cut_off_on_both_listeners() {
    let s = Server::start_with(&[("PNS_HEADER_TIMEOUT_SECS", "2")]);
    let trickle = |addr| async move {
        let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = b"GET /healthz HTTP/1.1\r\nHost: example\r\nUser-Agent: slow-client/1.0\r\n\r\n";
        let started = Instant::now();
        for byte in head {
            if raw.write_all(&[*byte]).await.is_err() {
                return started.elapsed();
            }
            // Check whether the server has closed (EOF) while we wait a second.
            let mut one = [0u8; 512];
            match tokio::time::timeout(Duration::from_secs(1), raw.read(&mut one)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => {
                    // An error answer before the close is fine; wait for EOF.
                    let _ = read_to_close(&mut raw, Duration::from_secs(5)).await;
                    return started.elapsed();
                }
                Err(_) => {}
            }
        }
        panic!("the whole slow head was taken: {:?}", started.elapsed());
    };
    let (public, internal) = tokio::join!(trickle(s.public), trickle(s.internal));
    // Cut off around the 2 s timeout, long before the ~70 s the head takes.
    for took in [public, internal] {
        assert!(took < Duration::from_secs(8), "cut off after {took:?}");
    }
}

#[tokio::test]
async fn pns_stats_prints_a_summary_of_a_running_node() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    s.poll(&sid, "timeout=0&comeFrom=webmail").await;
    s.mail("alice@example.com", "one").await;
    assert_eq!(s.poll(&sid, "timeout=0").await.c(), 1);
    let run = |args: &[&str], internal: String| {
        let mut argv = vec!["stats"];
        argv.extend_from_slice(args);
        pns(&s.dir, &argv, &[("PNS_INTERNAL_LISTEN", &internal)])
    };
    let (code, text, err) = run(&[], s.internal.to_string());
    assert_eq!(code, 0, "{err}");
    let labels = [
        "sessions active",
        "polls held",
        "messages stored",
        "messages delivered",
        "delivery latency",
        "poll answers",
        "store errors",
        "comeFrom",
    ];
    let mut columns = Vec::new();
    for label in labels {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} in\n{text}"));
        // Values line up in one column.
        let value_at = label.len() + line.find(label).unwrap();
        let rest = &line[value_at..];
        columns.push(value_at + (rest.len() - rest.trim_start().len()));
    }
    assert!(columns.windows(2).all(|w| w[0] == w[1]), "{text}");
    let line = |label: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap()
            .to_owned()
    };
    assert!(line("sessions active").ends_with(" 1"), "{text}");
    assert!(line("messages delivered").ends_with(" 1"), "{text}");
    assert!(line("delivery latency").contains("p50"), "{text}");
    assert!(line("delivery latency").contains("ms"), "{text}");
    assert!(line("comeFrom").contains("webmail 1"), "{text}");

    let (_, out, _) = run(&["--json"], s.internal.to_string());
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["messagesDelivered"], 1);

    // No node there: a clear error, not a hang.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let (code, _, err) = run(&[], addr.to_string());
    assert_ne!(code, 0);
    assert!(err.contains("cannot reach"), "{err}");
}
