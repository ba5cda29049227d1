//! Benchmark: how long notifies wait while the retention purge runs on a
//! large SQLite store.
//!
//! Fills a database with `--rows` messages over `--mailboxes` mailboxes (all
//! inside the retention age, as on a node in its steady state: each purge
//! reads the whole table and finds little to delete), starts `pns serve`
//! (the release build by default) on it with a purge every
//! `--purge-every` seconds, and sends notifies at `--rate` a second over one
//! connection for `--secs` seconds, each once the last is acknowledged.
//! Prints how long pns took to start on the full store (to listen), how
//! long the acknowledgements took (p50, p99, longest) and how many purges
//! ran meanwhile: a purge that holds the writer shows as the longest. The
//! syncs of the log say whether the disk held one instead.
//!
//! ```text
//! cargo build --release --bin pns --example bench_purge
//! target/release/examples/bench_purge --rows 2000000 --mailboxes 20000
//! ```

mod support;

use sqlx::{Connection, SqliteConnection};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    pns: PathBuf,
    rows: u64,
    mailboxes: u64,
    rate: u64,
    secs: u64,
    purge_every: u64,
}

fn args() -> Args {
    let mut a = Args {
        pns: PathBuf::from("target/release/pns"),
        rows: 2_000_000,
        mailboxes: 20_000,
        rate: 500,
        secs: 15,
        purge_every: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        let number = || value.parse().unwrap_or_else(|_| panic!("{flag} N"));
        match flag.as_str() {
            "--pns" => a.pns = PathBuf::from(&value),
            "--rows" => a.rows = number(),
            "--mailboxes" => a.mailboxes = number(),
            "--rate" => a.rate = number(),
            "--secs" => a.secs = number(),
            "--purge-every" => a.purge_every = number(),
            other => panic!(
                "unknown argument {other}; use --pns PATH --rows N --mailboxes N --rate N --secs N --purge-every N"
            ),
        }
    }
    assert!(a.mailboxes >= 1 && a.rows >= a.mailboxes && a.rate >= 1);
    a
}

/// Start `pns serve` on the database in `data`; the count of purges it
/// has logged so far goes up as it logs them.
fn start(a: &Args, data: &Path) -> (support::Pns, Arc<AtomicUsize>) {
    // With PNS_LOG set, show each purge as pns logs it.
    let verbose = std::env::var_os("PNS_LOG").is_some();
    let env = [
        ("PNS_LOG", "info,pns::retention=debug".to_owned()),
        (
            "PNS_DATABASE_URL",
            format!("sqlite://{}/pns.db", data.display()),
        ),
        ("PNS_DATA_DIR", data.display().to_string()),
        ("PNS_RETENTION_INTERVAL_SECS", a.purge_every.to_string()),
    ];
    let purges = Arc::new(AtomicUsize::new(0));
    let counted = purges.clone();
    let pns = support::start(&a.pns, env, move |line| {
        if line.contains("retention purge") {
            counted.fetch_add(1, Ordering::Relaxed);
            if verbose {
                eprintln!("[pns] {line}");
            }
        }
    });
    (pns, purges)
}

/// Fill the store's tables (made by a first start of pns) with `rows`
/// messages spread over `mailboxes`, visible over the last hours, in one
/// statement.
async fn fill(a: &Args, data: &Path) {
    let url = format!("sqlite://{}/pns.db", data.display());
    let mut conn = SqliteConnection::connect(&url).await.unwrap();
    let now = pns::clock::now_ms();
    let per_mailbox = a.rows / a.mailboxes;
    sqlx::query(
        "WITH RECURSIVE
             u(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM u WHERE i + 1 < ?1),
             m(j) AS (SELECT 0 UNION ALL SELECT j + 1 FROM m WHERE j + 1 < ?2)
         INSERT INTO messages (mailbox, seq, id, type, data, accepted_ms, visible_ms)
         SELECT printf('user%06d@example.com', i), 1 + j * ?1 + i, printf('%016x%016x', i, j), 70,
                '{\"folder\":\"INBOX\",\"unseen\":' || j || ',\"from\":\"someone@example.org\",\"subject\":\"A message of moderate length\"}',
                ?3 - (?2 - j) * 60000, ?3 - (?2 - j) * 60000
         FROM u, m ORDER BY 1, 2",
    )
    .bind(a.mailboxes as i64)
    .bind(per_mailbox as i64)
    .bind(now)
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
}

/// The syncs of the log since the start (`pns_wal_sync_seconds` of
/// `/metrics`): how many, their mean, and how many took over 100 ms, each
/// of which held the acknowledgements waiting for it as long.
async fn log_syncs(http: &reqwest::Client, internal: &str) -> String {
    let metrics = http
        .get(format!("http://{internal}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sample = |series: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    let count = sample("pns_wal_sync_seconds_count");
    let mean_ms = sample("pns_wal_sync_seconds_sum") * 1e3 / count.max(1.0);
    let slow = count - sample("pns_wal_sync_seconds_bucket{le=\"0.1\"}");
    format!("log syncs: {count} (mean {mean_ms:.2} ms, {slow} over 100 ms)")
}

#[tokio::main]
async fn main() {
    let a = args();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().to_path_buf();
    drop(start(&a, &data));
    let t0 = Instant::now();
    fill(&a, &data).await;
    let filled = t0.elapsed();
    let starting = Instant::now();
    let (pns, purges) = start(&a, &data);
    let started = starting.elapsed();
    let token = std::fs::read_to_string(data.join("internal_token")).unwrap();
    let http = reqwest::Client::new();
    let internal = pns.address("internal");
    let url = format!("http://{internal}/internal/v1/notify");
    let every = Duration::from_nanos(1_000_000_000 / a.rate);
    let (purges_before, start) = (purges.load(Ordering::Relaxed), Instant::now());
    let mut acks = Vec::new();
    let mut next = start;
    while start.elapsed() < Duration::from_secs(a.secs) {
        tokio::time::sleep_until(next.into()).await;
        next += every;
        let user = format!("user{:06}@example.com", acks.len() as u64 % a.mailboxes);
        let sent = Instant::now();
        let answer = http
            .post(&url)
            .bearer_auth(token.trim())
            .json(&serde_json::json!({"user": user, "type": 70, "data": {"folder": "INBOX"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 202, "notify refused");
        acks.push(sent.elapsed());
    }
    let ran = purges.load(Ordering::Relaxed) - purges_before;
    // `--purge-every` longer than `--secs` measures the notifies alone.
    assert!(
        ran > 0 || a.purge_every > a.secs,
        "no purge ran in {} s: nothing was measured",
        a.secs
    );
    let syncs = log_syncs(&http, &internal).await;
    acks.sort();
    let at = |q: f64| acks[((acks.len() as f64 * q).ceil() as usize).clamp(1, acks.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "rows: {}  mailboxes: {}  filled in: {:.1} s  started in: {:.2} s  notifies: {}  purges: {}  ack p50/p99/max: {:.2}/{:.2}/{:.1} ms  {syncs}",
        a.rows,
        a.mailboxes,
        filled.as_secs_f64(),
        started.as_secs_f64(),
        acks.len(),
        ran,
        ms(at(0.50)),
        ms(at(0.99)),
        ms(at(1.0)),
    );
}
