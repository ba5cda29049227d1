//! The command line and configuration, as an operator uses them.

use crate::support::*;
use reqwest::StatusCode;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

#[tokio::test]
async fn first_start_generates_private_secrets_that_differ_per_install() {
    let a = Server::start();
    let b = Server::start();
    for name in ["jwt_secret", "internal_token"] {
        let mode = std::fs::metadata(a.dir.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name} has mode {mode:o}");
        assert!(a.secret_file(name).len() >= 32);
        assert_ne!(
            a.secret_file(name),
            b.secret_file(name),
            "{name} is the same on two installs"
        );
    }
    // Kept across restarts: a session minted before still works after.
    let sid = a.sid("alice@example.com");
    let a = a.kill9_and_restart();
    assert_eq!(a.poll(&sid, "timeout=0").await.status, StatusCode::OK);
}

#[tokio::test]
async fn token_notify_and_migrate_commands_work_against_a_running_node() {
    let s = Server::start();
    let internal = s.internal.to_string();
    let env = [("PNS_INTERNAL_LISTEN", internal.as_str())];
    let (code, sid, err) = pns(
        &s.dir,
        &["token", "--user", "alice@example.com", "--ttl", "10m"],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    let sid = sid.trim().to_owned();
    let first = s.poll(&sid, "timeout=0").await;
    assert_eq!(first.status, StatusCode::OK);
    let (code, out, err) = pns(
        &s.dir,
        &[
            "notify",
            "--user",
            "alice@example.com",
            "--subject",
            "From the CLI",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"accepted\":1"), "{out}");
    assert_eq!(s.poll(&sid, "timeout=5").await.subjects(), ["From the CLI"]);

    let fresh = tempfile::tempdir().unwrap();
    let (code, out, err) = pns(fresh.path(), &["migrate"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("up to date"));
    assert!(fresh.path().join("pns.db").exists());

    let (code, _, err) = pns(&s.dir, &["token", "--user", "a@x", "--ttl", "soon"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("soon"), "{err}");
}

/// A second node on a running node's SQLite file would answer from its own
/// memory and never wake the first one's polls: it refuses to start, at
/// once, naming the process that has the file.
#[tokio::test]
async fn a_second_node_on_the_same_sqlite_file_refuses_to_start() {
    let mut s = Server::start();
    let holder = format!("in use by another process (pid {})", s.pid());

    let (code, _, err) = pns(&s.dir, &["migrate"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains(&holder), "{err}");
    assert!(err.contains("pns.db"), "{err}");

    let err = refused_start(&s.dir, "127.0.0.1:0").await;
    assert!(err.contains(&holder), "{err}");

    // The first node is unharmed, and once it stops the file is free.
    let sid = s.sid("alice@example.com");
    assert_eq!(s.poll(&sid, "timeout=0").await.status, StatusCode::OK);
    assert_eq!(s.sigterm().0, Some(0));
    let (code, out, err) = pns(&s.dir, &["migrate"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("up to date"));
}

/// A second node on a running node's public address would share its
/// connections if the port were shared: it refuses to start, naming the
/// address and its setting, and the first node goes on.
#[tokio::test]
async fn a_second_node_on_the_same_public_address_refuses_to_start() {
    let s = Server::start();
    let other = tempfile::tempdir().unwrap();
    let err = refused_start(other.path(), &s.public.to_string()).await;
    assert!(
        err.contains(&format!("cannot listen on {} (PNS_LISTEN)", s.public)),
        "{err}"
    );
    assert!(err.contains("in use"), "{err}");
    let sid = s.sid("alice@example.com");
    assert_eq!(s.poll(&sid, "timeout=0").await.status, StatusCode::OK);
}

/// `pns serve` with its store in `dir` and its public listener on
/// `listen`, which must exit with an error within 20 s: what it said.
async fn refused_start(dir: &std::path::Path, listen: &str) -> String {
    let started = Instant::now();
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_pns"))
        .arg("serve")
        .env_clear()
        .env("PNS_LISTEN", listen)
        .env("PNS_INTERNAL_LISTEN", "127.0.0.1:0")
        .env(
            "PNS_DATABASE_URL",
            format!("sqlite://{}/pns.db", dir.display()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            second.kill().unwrap();
            panic!("a second node started");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!exited.success(), "{err}");
    err
}

/// `pns backup` copies a running node's store, which no other process may
/// open meanwhile: a node started on the copy has what was stored before it.
#[tokio::test]
async fn backup_copies_a_running_node_and_a_node_starts_from_the_copy() {
    let s = Server::start();
    let internal = s.internal.to_string();
    let env = [("PNS_INTERNAL_LISTEN", internal.as_str())];
    for subject in ["one", "two", "three"] {
        assert_eq!(
            s.mail("alice@example.com", subject).await.status,
            StatusCode::ACCEPTED
        );
    }
    let copy = tempfile::tempdir().unwrap();
    let out = copy.path().join("pns.db");
    std::fs::write(&out, b"an older copy").unwrap();
    let (code, said, err) = pns(&s.dir, &["backup", "--out", out.to_str().unwrap()], &env);
    assert_eq!(code, 0, "{err}");
    assert!(said.contains("written to"), "{said}");
    // The node goes on, and keeps no copy beside its file.
    assert_eq!(
        s.mail("alice@example.com", "four").await.status,
        StatusCode::ACCEPTED
    );
    let beside: Vec<_> = std::fs::read_dir(&s.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("backup"))
        .collect();
    assert!(beside.is_empty(), "{beside:?}");

    let restored = Server::start_in(copy, &[], &[]);
    let stats = restored.internal_get("/internal/v1/stats").await;
    assert_eq!(stats.body["messagesStored"], 3, "{}", stats.body);

    let refused = s
        .http
        .get(s.internal_url("/internal/v1/backup"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let (code, _, err) = pns(
        &s.dir,
        &["backup", "--out", out.to_str().unwrap()],
        &[
            ("PNS_INTERNAL_LISTEN", internal.as_str()),
            ("PNS_INTERNAL_TOKEN", "not-the-token-of-this-node-at-all"),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("refused the internal token"), "{err}");
}

#[tokio::test]
async fn notify_says_clearly_when_no_node_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = pns(
        dir.path(),
        &["notify", "--user", "a@x", "--subject", "s"],
        &[("PNS_INTERNAL_LISTEN", "127.0.0.1:1")],
    );
    assert_ne!(code, 0);
    assert!(err.contains("is `pns serve` running"), "{err}");
}

/// How long a poll without `timeout` is held: the configured hold.
async fn hold_of(s: &Server) -> Duration {
    let sid = s.sid("alice@example.com");
    let t = Instant::now();
    assert_eq!(s.poll(&sid, "").await.c(), 0);
    t.elapsed()
}

#[tokio::test]
async fn flags_win_over_environment_which_wins_over_the_config_file() {
    let with_file = |hold: u64| {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("pns.toml");
        std::fs::write(
            &file,
            format!("hold_secs = {hold}\nretention_max_messages = 100\n"),
        )
        .unwrap();
        (tmp, file)
    };
    // The file alone.
    let (tmp, file) = with_file(1);
    let s = Server::start_in(tmp, &["--config", file.to_str().unwrap()], &[]);
    let h = hold_of(&s).await;
    assert!(
        h >= Duration::from_millis(900) && h < Duration::from_millis(1900),
        "file: held {h:?}"
    );
    // The environment over the file.
    let (tmp, file) = with_file(1);
    let s = Server::start_in(
        tmp,
        &["--config", file.to_str().unwrap()],
        &[("PNS_HOLD_SECS", "3")],
    );
    let h = hold_of(&s).await;
    assert!(h >= Duration::from_millis(2900), "env: held {h:?}");
    // A flag over both.
    let (tmp, file) = with_file(3);
    let s = Server::start_in(
        tmp,
        &["--config", file.to_str().unwrap(), "--hold-secs", "1"],
        &[("PNS_HOLD_SECS", "3")],
    );
    let h = hold_of(&s).await;
    assert!(h < Duration::from_millis(1900), "flag: held {h:?}");
}

#[tokio::test]
async fn bad_configuration_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pns.toml");
    std::fs::write(&file, "hold_sec = 5\n").unwrap();
    let (code, _, err) = pns(
        dir.path(),
        &["--config", file.to_str().unwrap(), "migrate"],
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("hold_sec"), "{err}");
    let (code, _, err) = pns(dir.path(), &["serve"], &[("PNS_HOLD_SECS", "500")]);
    assert_ne!(code, 0);
    assert!(err.contains("PNS_HOLD_SECS"), "{err}");
    let (code, _, err) = pns(dir.path(), &["serve"], &[("PNS_JWT_SECRET", "short")]);
    assert_ne!(code, 0);
    assert!(err.contains("PNS_JWT_SECRET"), "{err}");
    for threads in ["0", "two"] {
        let (code, _, err) = pns(dir.path(), &["serve"], &[("TOKIO_WORKER_THREADS", threads)]);
        assert_ne!(code, 0);
        assert!(
            err.contains("TOKIO_WORKER_THREADS must be a whole number above 0"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test]
async fn retention_keeps_the_newest_messages_per_user() {
    let s = Server::start_with(&[
        ("PNS_RETENTION_MAX_MESSAGES", "3"),
        ("PNS_RETENTION_INTERVAL_SECS", "1"),
    ]);
    let sid = s.sid("alice@example.com");
    let bob = s.sid("bob@example.com");
    for i in 1..=5 {
        s.mail("alice@example.com", &format!("m{i}")).await;
    }
    s.mail("bob@example.com", "bob's").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = s.poll(&sid, "timeout=0&cursor=1.0").await.subjects();
        if got == ["m3", "m4", "m5"] {
            break;
        }
        assert!(Instant::now() < deadline, "still kept: {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        s.poll(&bob, "timeout=0&cursor=1.0").await.subjects(),
        ["bob's"]
    );
}

/// What the purges removed, and how long the last took, in `/metrics`.
#[tokio::test]
async fn retention_purges_are_counted_in_the_metrics() {
    let s = Server::start_with(&[
        ("PNS_RETENTION_MAX_AGE_SECS", "1"),
        ("PNS_RETENTION_INTERVAL_SECS", "1"),
    ]);
    let purged = |what: &str| format!("pns_retention_purged_total{{what=\"{what}\"}}");
    assert_eq!(metric(&s, &purged("messages")).await, 0.0);
    let mut keyed = mail("alice@example.com", "keyed");
    keyed["dedupKey"] = "k1".into();
    assert_eq!(s.notify(keyed).await.body["accepted"], 1);
    s.mail("alice@example.com", "plain").await;
    s.mail("bob@example.com", "plain").await;
    metric_becomes(&s, &purged("messages"), 3.0).await;
    metric_becomes(&s, &purged("dedup_keys"), 1.0).await;
    let text = metrics(&s).await;
    assert!(
        sample(&text, "pns_retention_purges_total").unwrap() >= 1.0,
        "{text}"
    );
    let took = sample(&text, "pns_retention_last_purge_seconds").unwrap();
    assert!(took > 0.0 && took < 10.0, "{text}");
}

#[tokio::test]
async fn retention_forgets_dedup_keys_past_the_maximum_age() {
    let s = Server::start_with(&[
        ("PNS_RETENTION_MAX_AGE_SECS", "1"),
        ("PNS_RETENTION_INTERVAL_SECS", "1"),
    ]);
    let mut keyed = mail("alice@example.com", "keyed");
    keyed["dedupKey"] = "k1".into();
    assert_eq!(s.notify(keyed.clone()).await.body["accepted"], 1);
    resend_until_its_dedup_key_is_forgotten(&s, &keyed).await;
}

#[tokio::test]
async fn retention_drops_messages_past_the_maximum_age() {
    let s = Server::start_with(&[
        ("PNS_RETENTION_MAX_AGE_SECS", "1"),
        ("PNS_RETENTION_INTERVAL_SECS", "1"),
    ]);
    let sid = s.sid("alice@example.com");
    s.mail("alice@example.com", "old").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.poll(&sid, "timeout=0&cursor=1.0").await.c() != 0 {
        assert!(Instant::now() < deadline, "the old message was not purged");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        s.internal_get("/internal/v1/stats").await.body["messagesStored"],
        0
    );
}
