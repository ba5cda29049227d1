//! Cluster: several `pns serve` nodes on one PostgreSQL, as an operator runs
//! them behind a load balancer. Each test gets a fresh schema of its own in
//! the test database (`PNS_TEST_POSTGRES`, default
//! postgres://postgres@127.0.0.1:5432/test) and drops it at the end.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::postgres::{PgPool, PgPoolOptions};
use std::collections::HashSet;
use std::time::{Duration, Instant};

const SECRET: &str = "cluster-test-secret-0123456789-abcdefghij";
const TOKEN: &str = "cluster-test-internal-token";

fn postgres_url() -> String {
    std::env::var("PNS_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A schema of the test's own, dropped (with everything in it) on drop.
struct Schema {
    name: String,
    admin: PgPool,
}

impl Schema {
    async fn create() -> Schema {
        let name = format!("pns_test_{:016x}", rand::random::<u64>());
        let admin = PgPoolOptions::new()
            .max_connections(2)
            .connect(&postgres_url())
            .await
            .expect("PostgreSQL for the cluster tests (PNS_TEST_POSTGRES)");
        sqlx::query(&format!("CREATE SCHEMA \"{name}\""))
            .execute(&admin)
            .await
            .unwrap();
        Schema { name, admin }
    }

    /// The database URL of a node: this schema, a small pool (tests run side
    /// by side), and an application name that tells this test's connections
    /// apart in `pg_stat_activity`.
    fn url(&self) -> String {
        format!(
            "{}?schema={}&pool_size=4&application_name={}",
            postgres_url(),
            self.name,
            self.name
        )
    }

    /// Terminate this test's server connections whose application_name is
    /// `name`; returns how many there were.
    async fn terminate(&self, name: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(name)
        .fetch_one(&self.admin)
        .await
        .unwrap()
    }

    fn listener_name(&self) -> String {
        format!("{} listener", self.name)
    }

    /// Connections listening now for this test's nodes.
    async fn listening(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
        )
        .bind(self.listener_name())
        .fetch_one(&self.admin)
        .await
        .unwrap()
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let (url, name) = (postgres_url(), self.name.clone());
        // Drop runs outside async; a thread of its own can block.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let pool = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(&url)
                    .await?;
                sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                    .execute(&pool)
                    .await
            })
        })
        .join();
    }
}

/// A node on `url`, with the cluster's shared secret and token. Poll rate
/// limits are off: these clients poll as fast as answers come.
async fn node_on(url: &str) -> Server {
    Server::start_with(&[
        ("PNS_DATABASE_URL", url),
        ("PNS_JWT_SECRET", SECRET),
        ("PNS_INTERNAL_TOKEN", TOKEN),
        ("PNS_SESSION_POLL_RATE", "0"),
        ("PNS_ADDRESS_POLL_RATE", "0"),
    ])
}

/// `n` nodes on `schema`, each ready (listening for the others).
async fn nodes(schema: &Schema, n: usize) -> Vec<Server> {
    let mut out = Vec::new();
    for _ in 0..n {
        let s = node_on(&schema.url()).await;
        wait_ready(&s).await;
        out.push(s);
    }
    out
}

async fn readyz(s: &Server) -> Answer {
    answer(s.http.get(s.public_url("/readyz")).send().await.unwrap()).await
}

async fn wait_ready(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while readyz(s).await.status != StatusCode::OK {
        assert!(Instant::now() < deadline, "node never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn polls_held(s: &Server) -> u64 {
    s.internal_get("/internal/v1/stats").await.body["pollsHeld"]
        .as_u64()
        .unwrap()
}

/// Wait until `s` holds `n` polls, so that what follows happens while they wait.
async fn until_held(s: &Server, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while polls_held(s).await != n {
        assert!(Instant::now() < deadline, "{n} polls were never held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `jti` of a session token.
fn jti_of(sid: &str) -> String {
    use base64::Engine;
    let claims = sid.split('.').nth(1).unwrap();
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .unwrap();
    let claims: Value = serde_json::from_slice(&claims).unwrap();
    claims["jti"].as_str().unwrap().to_owned()
}

fn ids(a: &Answer) -> Vec<String> {
    a.body["msg"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

/// A delivery agent that closes its connection as soon as its notify is
/// written, before the commit, still has it stored, delivered to the poll
/// held for it, and counted.
#[tokio::test]
async fn a_notify_whose_sender_leaves_at_once_still_wakes_the_held_poll() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 1).await;
    let sid = n[0].sid("alice@example.com");
    let started = Instant::now();
    let poll = n[0].poll(&sid, "timeout=20");
    let send = async {
        until_held(&n[0], 1).await;
        let notify =
            json!({"user": "alice@example.com", "type": 70, "data": {"subject": "left at once"}});
        internal_post_and_leave(&n[0], "/internal/v1/notify", &notify).await;
    };
    let (a, _) = tokio::join!(poll, send);
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.subjects(), ["left at once"]);
    // Woken by the notify, not by the 20 s hold running out.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        started.elapsed()
    );
    metric_becomes(&n[0], "pns_messages_accepted_total{source=\"api\"}", 1.0).await;
}

/// A revocation whose caller gives up while the store is still writing it
/// (its table locked meanwhile) is enforced all the same once written: the
/// held poll ends with 401, and the session is refused from then on.
#[tokio::test]
async fn a_revocation_whose_caller_leaves_midway_is_still_enforced() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 1).await;
    let sid = n[0].sid("alice@example.com");
    let held = n[0].poll(&sid, "timeout=20");
    let revoke = async {
        until_held(&n[0], 1).await;
        let mut lock = schema.admin.begin().await.unwrap();
        let table = format!("\"{}\".revoked_sessions", schema.name);
        sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            .execute(&mut *lock)
            .await
            .unwrap();
        let revoke = json!({ "jti": jti_of(&sid) });
        let caller = internal_post_raw(&n[0], "/internal/v1/sessions/revoke", &revoke).await;
        // The revocation waits for the lock; its caller gives up.
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(caller);
        tokio::time::sleep(Duration::from_millis(500)).await;
        lock.commit().await.unwrap();
    };
    let started = Instant::now();
    let (held, ()) = tokio::join!(held, revoke);
    assert_eq!(held.status, StatusCode::UNAUTHORIZED, "{}", held.body);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        started.elapsed()
    );
    until_refused(&n[0], &sid).await;
}

/// A poll with an opaque sid not yet registered leaves "unknown" in the
/// node's cache for a second; the registration that follows drops it,
/// even when its caller has left by the time the store takes it.
#[tokio::test]
async fn a_registration_whose_caller_leaves_midway_still_clears_the_cached_unknown() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 1).await;
    let sid = "webmail-sess-leaves-3f9a1c7e5d2b";
    let mut lock = schema.admin.begin().await.unwrap();
    let table = format!("\"{}\".opaque_sessions", schema.name);
    // Reads go on; the registration's insert waits.
    sqlx::query(&format!("LOCK TABLE {table} IN SHARE MODE"))
        .execute(&mut *lock)
        .await
        .unwrap();
    let register = json!({"sid": sid, "user": "alice@example.com", "ttlSecs": 3600});
    let caller = internal_post_raw(&n[0], "/internal/v1/sessions", &register).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let unknown = n[0].poll(sid, "timeout=0").await;
    let cached_at = Instant::now();
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED, "{}", unknown.body);
    drop(caller);
    tokio::time::sleep(Duration::from_millis(100)).await;
    lock.commit().await.unwrap();
    // The cached "unknown" would last a second (opaque::NEGATIVE_TTL).
    loop {
        let a = n[0].poll(sid, "timeout=0").await;
        if a.status == StatusCode::OK {
            break;
        }
        assert!(
            cached_at.elapsed() < Duration::from_millis(900),
            "still {} after {:?}: {}",
            a.status,
            cached_at.elapsed(),
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// PostgreSQL syncs its own commits: a node on it has no series of syncs
/// of its own that would read as a disk that never syncs.
#[tokio::test]
async fn a_node_on_postgresql_times_no_syncs_of_its_own() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 1).await;
    n[0].mail("alice@example.com", "one").await;
    let text = metrics(&n[0]).await;
    assert!(text.contains("pns_messages_accepted_total"), "{text}");
    assert!(!text.contains("pns_wal_sync_seconds"), "{text}");
}

#[tokio::test]
async fn a_notify_on_one_node_wakes_polls_held_on_the_others() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 3).await;
    let (s2, s3) = (n[1].sid("alice@example.com"), n[2].sid("alice@example.com"));
    let started = Instant::now();
    let p2 = n[1].poll(&s2, "timeout=20");
    let p3 = n[2].poll(&s3, "timeout=20");
    let send = async {
        until_held(&n[1], 1).await;
        until_held(&n[2], 1).await;
        n[0].mail("alice@example.com", "Hello from node 1").await;
    };
    let (a2, a3, _) = tokio::join!(p2, p3, send);
    for a in [&a2, &a3] {
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert_eq!(a.subjects(), ["Hello from node 1"]);
    }
    assert_eq!(ids(&a2), ids(&a3));
    // Woken by the notify, not by the 20 s hold running out.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_client_alternating_nodes_with_its_cursor_sees_every_message_once_in_order() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 3).await;
    let sid = n[0].sid("alice@example.com");
    let mut cursor = n[0].poll(&sid, "timeout=0").await.cursor();
    let mut seen = Vec::new();
    let mut sent = Vec::new();
    for round in 0..6 {
        for k in 0..2 {
            let subject = format!("m{round}-{k}");
            n[(round + k) % 3].mail("alice@example.com", &subject).await;
            sent.push(subject);
        }
        let a = n[(round + 2) % 3]
            .poll(&sid, &format!("cursor={cursor}&timeout=0"))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        cursor = a.cursor();
        seen.extend(a.subjects());
    }
    assert_eq!(seen, sent);
    // The cursor is valid on every node: none has anything more.
    for s in &n {
        let a = s.poll(&sid, &format!("cursor={cursor}&timeout=0")).await;
        assert_eq!(a.c(), 0);
    }
}

#[tokio::test]
async fn concurrent_notifies_on_every_node_reach_a_cursor_client_without_gaps_or_repeats() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 3).await;
    let sid = n[0].sid("alice@example.com");
    const EACH: usize = 40;
    let senders = async {
        let send = |i: usize| {
            let s = &n[i];
            async move {
                for k in 0..EACH {
                    s.mail("alice@example.com", &format!("n{i}-{k:02}")).await;
                }
            }
        };
        tokio::join!(send(0), send(1), send(2));
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    let reader = async {
        let mut cursor = "1.0".to_owned();
        let mut got: Vec<(String, String)> = Vec::new();
        for k in 0.. {
            let finished = done.load(std::sync::atomic::Ordering::Acquire);
            let a = n[k % 3]
                .poll(&sid, &format!("cursor={cursor}&timeout=1"))
                .await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.body);
            cursor = a.cursor();
            got.extend(ids(&a).into_iter().zip(a.subjects()));
            if finished && a.c() == 0 {
                break;
            }
        }
        got
    };
    let (_, got) = tokio::join!(
        async {
            senders.await;
            done.store(true, std::sync::atomic::Ordering::Release);
        },
        reader
    );
    let unique: HashSet<&String> = got.iter().map(|(id, _)| id).collect();
    assert_eq!(unique.len(), got.len(), "a message came twice");
    assert_eq!(got.len(), 3 * EACH, "messages were skipped");
    // Each sender's messages arrive in the order it sent them.
    for i in 0..3 {
        let mine: Vec<&String> = got
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.starts_with(&format!("n{i}-")))
            .collect();
        let mut sorted = mine.clone();
        sorted.sort();
        assert_eq!(mine, sorted);
    }
}

#[tokio::test]
async fn a_client_without_cursor_alternating_nodes_gets_each_message_once() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 3).await;
    let sid = n[0].sid("alice@example.com");
    n[0].mail("alice@example.com", "one").await;
    assert_eq!(n[1].poll(&sid, "timeout=0").await.subjects(), ["one"]);
    assert_eq!(n[2].poll(&sid, "timeout=0").await.c(), 0);
    n[2].mail("alice@example.com", "two").await;
    n[1].mail("alice@example.com", "three").await;
    assert_eq!(
        n[0].poll(&sid, "timeout=0").await.subjects(),
        ["two", "three"]
    );
    assert_eq!(n[1].poll(&sid, "timeout=0").await.c(), 0);
    assert_eq!(n[2].poll(&sid, "timeout=0").await.c(), 0);
}

#[tokio::test]
async fn revoking_a_session_on_one_node_ends_its_poll_on_another_with_401() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 3).await;
    let sid = n[0].sid("alice@example.com");
    let other = n[0].sid("alice@example.com");
    let started = Instant::now();
    let held = n[1].poll(&sid, "timeout=20");
    let other_held = n[1].poll(&other, "timeout=3");
    let revoke = async {
        until_held(&n[1], 2).await;
        let r = n[0]
            .internal_post("/internal/v1/sessions/revoke", json!({"jti": jti_of(&sid)}))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    };
    let (a, b, _) = tokio::join!(held, other_held, revoke);
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    assert_eq!(a.body["errorCode"], "SESSION_INVALID");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The other session of the user was not touched.
    assert_eq!(b.status, StatusCode::OK);
    // Every node refuses the session from now on.
    for s in &n {
        until_refused(s, &sid).await;
    }
}

/// Other nodes hear of a revocation over NOTIFY: wait a few moments for it.
async fn until_refused(s: &Server, sid: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while s.poll(sid, "timeout=0").await.status != StatusCode::UNAUTHORIZED {
        assert!(
            Instant::now() < deadline,
            "a node still accepts the revoked session"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn revoking_a_user_on_one_node_ends_polls_on_the_others_but_spares_later_sessions() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 3).await;
    let sid = n[0].sid("alice@example.com");
    let held = n[2].poll(&sid, "timeout=20");
    let revoke = async {
        until_held(&n[2], 1).await;
        let r = n[0]
            .internal_post(
                "/internal/v1/sessions/revoke",
                json!({"user": "alice@example.com"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    };
    let (a, _) = tokio::join!(held, revoke);
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    until_refused(&n[1], &sid).await;
    // Token `iat` has second resolution: sign in again in a later second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = n[0].sid("alice@example.com");
    for s in &n {
        assert_eq!(s.poll(&fresh, "timeout=0").await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn a_newer_poll_on_another_node_releases_the_older() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 2).await;
    let sid = n[0].sid("alice@example.com");
    let started = Instant::now();
    let older = n[0].poll(&sid, "timeout=20");
    let newer = async {
        until_held(&n[0], 1).await;
        n[1].poll(&sid, "timeout=1").await
    };
    let (older, newer) = tokio::join!(older, newer);
    assert_eq!(older.status, StatusCode::OK);
    assert_eq!(older.c(), 0);
    assert_eq!(newer.status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the older poll was held for {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn after_the_listening_connections_are_killed_notifies_still_reach_held_polls() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 3).await;
    let sid2 = n[1].sid("alice@example.com");
    let sid3 = n[2].sid("alice@example.com");
    let p2 = n[1].poll(&sid2, "timeout=20");
    let p3 = n[2].poll(&sid3, "timeout=20");
    let cut_and_send = async {
        until_held(&n[1], 1).await;
        until_held(&n[2], 1).await;
        assert_eq!(schema.terminate(&schema.listener_name()).await, 3);
        // At once, before the nodes can have listened again.
        n[0].mail("alice@example.com", "while deaf").await;
    };
    let started = Instant::now();
    let (a2, a3, _) = tokio::join!(p2, p3, cut_and_send);
    assert_eq!(a2.subjects(), ["while deaf"]);
    assert_eq!(a3.subjects(), ["while deaf"]);
    assert!(started.elapsed() < Duration::from_secs(10));

    // Once they listen again, wakeups flow as before.
    let deadline = Instant::now() + Duration::from_secs(20);
    while schema.listening().await != 3 {
        assert!(Instant::now() < deadline, "the nodes never listened again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for s in &n {
        wait_ready(s).await;
    }
    let (c2, c3) = (a2.cursor(), a3.cursor());
    let q2 = format!("cursor={c2}&timeout=20");
    let q3 = format!("cursor={c3}&timeout=20");
    let p2 = n[1].poll(&sid2, &q2);
    let p3 = n[2].poll(&sid3, &q3);
    let send = async {
        until_held(&n[1], 1).await;
        until_held(&n[2], 1).await;
        n[0].mail("alice@example.com", "heard again").await;
    };
    let started = Instant::now();
    let (a2, a3, _) = tokio::join!(p2, p3, send);
    assert_eq!(a2.subjects(), ["heard again"]);
    assert_eq!(a3.subjects(), ["heard again"]);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn after_every_connection_is_killed_the_nodes_carry_on() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 2).await;
    let sid = n[0].sid("alice@example.com");
    n[0].mail("alice@example.com", "before").await;
    assert!(schema.terminate(&schema.name).await >= 2);
    assert_eq!(schema.terminate(&schema.listener_name()).await, 2);
    // Dead pooled connections are noticed and replaced, not reported.
    n[0].mail("alice@example.com", "after").await;
    let a = n[1].poll(&sid, "timeout=0").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.subjects(), ["before", "after"]);
}

#[tokio::test]
async fn a_delayed_message_is_released_once_even_when_its_node_is_gone() {
    let schema = Schema::create().await;
    let mut n = nodes(&schema, 3).await;
    let (sid, sid2) = (n[0].sid("alice@example.com"), n[0].sid("alice@example.com"));
    let a = n[0]
        .notify(json!({"user": "alice@example.com", "type": 70, "data": {"subject": "later"}, "delayMs": 1500}))
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    // The node that took it stops before it is due; the others race to release it.
    drop(n.remove(0));
    let (a1, a2) = tokio::join!(
        n[0].poll(&sid, "cursor=1.0&timeout=20"),
        n[1].poll(&sid2, "cursor=1.0&timeout=20")
    );
    assert_eq!(a1.subjects(), ["later"]);
    assert_eq!(a2.subjects(), ["later"]);
    let all = n[1].poll(&sid, "cursor=1.0&timeout=0").await;
    assert_eq!(all.subjects(), ["later"], "released more than once");
}

#[tokio::test]
async fn a_dedup_key_sent_to_two_nodes_is_stored_once() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 2).await;
    let sid = n[0].sid("alice@example.com");
    let msg = json!({"user": "alice@example.com", "type": 70, "data": {"subject": "once"}, "dedupKey": "k1"});
    let (first, second) = tokio::join!(n[0].notify(msg.clone()), n[1].notify(msg));
    let accepted =
        first.body["accepted"].as_u64().unwrap() + second.body["accepted"].as_u64().unwrap();
    assert_eq!(accepted, 1, "{} {}", first.body, second.body);
    assert_eq!(first.body["ids"][0], second.body["ids"][0]);
    assert_eq!(n[1].poll(&sid, "timeout=0").await.subjects(), ["once"]);
}

#[tokio::test]
async fn an_unreachable_store_answers_503_on_readyz_poll_and_notify() {
    // Nothing listens on port 1: every connection attempt is refused.
    let s = node_on("postgres://postgres@127.0.0.1:1/test").await;
    let sid = s.sid("alice@example.com");
    let ready = readyz(&s).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let internal_ready = answer(s.http.get(s.internal_url("/readyz")).send().await.unwrap()).await;
    assert_eq!(internal_ready.status, StatusCode::SERVICE_UNAVAILABLE);

    let started = Instant::now();
    let poll = s.poll(&sid, "timeout=20").await;
    assert_eq!(
        poll.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        poll.body
    );
    assert_eq!(poll.body["errorCode"], "UNAVAILABLE");
    assert_eq!(poll.body["c"], 0);
    assert_eq!(poll.headers["retry-after"], "120");
    // Answered, not held for the 20 s asked.
    assert!(started.elapsed() < Duration::from_secs(15));

    let notify = s.notify(mail("alice@example.com", "lost?")).await;
    assert_eq!(
        notify.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        notify.body
    );
    assert_eq!(notify.body["errorCode"], "UNAVAILABLE");
}

#[tokio::test]
async fn retention_on_several_nodes_keeps_the_newest_messages_of_each_user() {
    let schema = Schema::create().await;
    let url = schema.url();
    let start = || {
        Server::start_with(&[
            ("PNS_DATABASE_URL", url.as_str()),
            ("PNS_JWT_SECRET", SECRET),
            ("PNS_INTERNAL_TOKEN", TOKEN),
            ("PNS_RETENTION_MAX_MESSAGES", "2"),
            ("PNS_RETENTION_INTERVAL_SECS", "1"),
            ("PNS_SESSION_POLL_RATE", "0"),
        ])
    };
    let n = [start(), start()];
    let sid = n[0].sid("alice@example.com");
    for i in 0..5 {
        n[i % 2].mail("alice@example.com", &format!("m{i}")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let a = n[1].poll(&sid, "cursor=1.0&timeout=0").await;
        if a.subjects() == ["m3", "m4"] {
            break;
        }
        assert!(Instant::now() < deadline, "still kept: {:?}", a.subjects());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A ready node on `schema` with `retention` set, purging every second.
async fn purging_node(schema: &Schema, retention: (&str, &str)) -> Server {
    let url = schema.url();
    let s = Server::start_with(&[
        ("PNS_DATABASE_URL", url.as_str()),
        ("PNS_JWT_SECRET", SECRET),
        ("PNS_INTERNAL_TOKEN", TOKEN),
        retention,
        ("PNS_RETENTION_INTERVAL_SECS", "1"),
    ]);
    wait_ready(&s).await;
    s
}

/// A purge goes through the table in slices of about 16,384 rows, each a
/// transaction of its own; together they keep exactly each user's newest
/// messages: here 5,000 users of 4 messages and one of 17,000 (longer
/// than a slice), 37,000 rows.
#[tokio::test]
async fn retention_on_postgresql_purges_a_large_store_in_slices() {
    let schema = Schema::create().await;
    let small = (0..4).flat_map(|m| {
        (0..5000).map(move |u| mail(&format!("u{u:04}@example.com"), &format!("m{m}")))
    });
    let big = (0..17_000).map(|m| mail("big@example.com", &format!("b{m}")));
    send_in_batches(&schema, small.chain(big)).await;
    let _purging = purging_node(&schema, ("PNS_RETENTION_MAX_MESSAGES", "2")).await;
    until_stored(&schema, 5001 * 2).await;
    let not_newest = stored(
        &schema,
        "WHERE data NOT LIKE '%\"m2\"%' AND data NOT LIKE '%\"m3\"%'
         AND data NOT LIKE '%\"b16998\"%' AND data NOT LIKE '%\"b16999\"%'",
    )
    .await;
    assert_eq!(
        not_newest, 0,
        "kept a message that is not among its user's newest"
    );
}

/// Messages past the retention age go as many at a time as a slice holds,
/// a transaction each, all in one purge: here 17,000, more than one slice,
/// all gone in the node's first purge (counted in its metrics).
#[tokio::test]
async fn retention_on_postgresql_drops_a_large_store_past_the_maximum_age() {
    let schema = Schema::create().await;
    let all = (0..17_000).map(|m| mail(&format!("u{}@example.com", m % 100), "old"));
    send_in_batches(&schema, all).await;
    // All past the maximum age before the purging node's first purge.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let purging = purging_node(&schema, ("PNS_RETENTION_MAX_AGE_SECS", "1")).await;
    assert_eq!(first_purge(&purging, "messages").await, (1.0, 17_000.0));
    assert_eq!(stored(&schema, "").await, 0);
}

/// Store `messages` in `schema`, in batches of 1,000, through a node of its
/// own that does not purge them meanwhile (its first purge is minutes
/// away), so that the purges of the test start on all of them.
async fn send_in_batches(schema: &Schema, messages: impl Iterator<Item = Value>) {
    let s = node_on(&schema.url()).await;
    wait_ready(&s).await;
    let all: Vec<Value> = messages.collect();
    for batch in all.chunks(1000) {
        let a = s.notify(json!({ "messages": batch })).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    }
}

/// The messages stored in `schema` that match `filter` (a WHERE clause).
async fn stored(schema: &Schema, filter: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM \"{}\".messages {filter}", schema.name);
    sqlx::query_scalar(&sql)
        .fetch_one(&schema.admin)
        .await
        .unwrap()
}

/// Wait until the purges have left `n` messages in `schema`.
async fn until_stored(schema: &Schema, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = stored(schema, "").await;
        if now == n {
            return;
        }
        assert!(Instant::now() < deadline, "{now} messages stored, not {n}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn retention_on_postgresql_forgets_dedup_keys_past_the_maximum_age() {
    let schema = Schema::create().await;
    let s = purging_node(&schema, ("PNS_RETENTION_MAX_AGE_SECS", "1")).await;
    let mut keyed = mail("alice@example.com", "keyed");
    keyed["dedupKey"] = json!("k1");
    assert_eq!(s.notify(keyed.clone()).await.body["accepted"], 1);
    resend_until_its_dedup_key_is_forgotten(&s, &keyed).await;
}

#[tokio::test]
async fn a_batch_keeps_its_order_and_stores_a_key_repeated_inside_it_once() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 1).await;
    let sid = n[0].sid("alice@example.com");
    let item = |subject: &str, key: Option<&str>| {
        let mut m = mail("alice@example.com", subject);
        if let Some(k) = key {
            m["dedupKey"] = json!(k);
        }
        m
    };
    let a = n[0]
        .notify(json!({"messages": [item("m0", Some("a")), item("m1", None), item("m2", Some("a")), item("m3", Some("b"))]}))
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    assert_eq!(a.body["accepted"], 3);
    assert_eq!(a.body["duplicates"], 1);
    assert_eq!(a.body["ids"][2], a.body["ids"][0]);
    assert_eq!(
        n[0].poll(&sid, "timeout=0").await.subjects(),
        ["m0", "m1", "m3"]
    );
}

#[tokio::test]
async fn batches_for_the_same_users_in_any_order_on_several_nodes_all_succeed() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 2).await;
    let sid = n[0].sid("b@example.com");
    let users = ["a@example.com", "b@example.com", "c@example.com"];
    let batch = |order: &[usize], tag: &str| {
        let messages: Vec<Value> = order
            .iter()
            .map(|&u| mail(users[u], &format!("{tag}-{u}")))
            .collect();
        json!({ "messages": messages })
    };
    let run = |i: usize, order: &'static [usize]| {
        let s = &n[i];
        async move {
            for round in 0..15 {
                let a = s.notify(batch(order, &format!("r{round}"))).await;
                assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
            }
        }
    };
    tokio::join!(
        run(0, &[0, 1, 2]),
        run(1, &[2, 1, 0]),
        run(0, &[1, 2, 0]),
        run(1, &[2, 0, 1]),
    );
    let a = n[1].poll(&sid, "cursor=1.0&timeout=0").await;
    assert_eq!(a.c(), 60);
}

#[tokio::test]
async fn an_opaque_session_deleted_on_one_node_ends_its_poll_on_another() {
    let schema = Schema::create().await;
    let n = nodes(&schema, 3).await;
    let sid = "webmail-sess-cluster-5b7d4c2a9e8f";
    let r = n[0]
        .internal_post(
            "/internal/v1/sessions",
            json!({"sid": sid, "user": "alice@example.com", "ttlSecs": 3600}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    // Registered on node 1, it polls on node 2.
    let held = n[1].poll(sid, "timeout=20");
    let send = async {
        until_held(&n[1], 1).await;
        n[0].mail("alice@example.com", "for the webmail").await;
    };
    let (a, _) = tokio::join!(held, send);
    assert_eq!(a.subjects(), ["for the webmail"]);

    let started = Instant::now();
    let query = format!("cursor={}&timeout=20", a.cursor());
    let held = n[1].poll(sid, &query);
    let delete = async {
        until_held(&n[1], 1).await;
        let d = n[0]
            .http
            .delete(n[0].internal_url("/internal/v1/sessions"))
            .bearer_auth(n[0].internal_token())
            .json(&json!({"sid": sid}))
            .send()
            .await
            .unwrap();
        assert_eq!(d.status(), StatusCode::OK);
    };
    let (ended, _) = tokio::join!(held, delete);
    assert_eq!(ended.status, StatusCode::UNAUTHORIZED, "{}", ended.body);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        n[2].poll(sid, "timeout=0").await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// A cluster's store is PostgreSQL's to back up: a node says so instead
/// of copying anything.
#[tokio::test]
async fn a_backup_of_a_cluster_node_points_to_postgresql_tools() {
    let schema = Schema::create().await;
    let s = node_on(&schema.url()).await;
    let answer = s.internal_get("/internal/v1/backup").await;
    assert_eq!(answer.status, StatusCode::NOT_IMPLEMENTED);
    assert_eq!(answer.body["errorCode"], "NOT_IMPLEMENTED");
    assert!(
        answer.body["error"].as_str().unwrap().contains("pg_dump"),
        "{}",
        answer.body
    );
}
