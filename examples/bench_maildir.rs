//! Benchmark: how many Maildir files a second the watcher turns into
//! messages a poller has received.
//!
//! Starts `pns serve` (the release build by default) on SQLite in a temp
//! dir with the Maildir watcher on, writes N messages into `tmp/` of one or
//! more mailboxes, renames them all into `new/` at once, and polls (with the
//! cursor, as the bundled client does) until every one has arrived.
//!
//! ```text
//! cargo build --release --bin pns --example bench_maildir
//! target/release/examples/bench_maildir --files 10000 --mailboxes 1
//! ```

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Args {
    pns: PathBuf,
    files: usize,
    mailboxes: usize,
}

fn args() -> Args {
    let mut a = Args {
        pns: PathBuf::from("target/release/pns"),
        files: 10_000,
        mailboxes: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--pns" => a.pns = PathBuf::from(value),
            "--files" => a.files = value.parse().expect("--files N"),
            "--mailboxes" => a.mailboxes = value.parse().expect("--mailboxes N"),
            other => panic!("unknown argument {other}; use --pns PATH --files N --mailboxes N"),
        }
    }
    assert!(a.mailboxes >= 1 && a.files >= a.mailboxes);
    a
}

fn start(pns: &Path, data: &Path, root: &Path) -> (support::Pns, String) {
    // With PNS_LOG set, show every line pns logs.
    let verbose = std::env::var_os("PNS_LOG").is_some();
    let log = std::env::var("PNS_LOG").unwrap_or_else(|_| "info".into());
    let env = [
        ("PNS_LOG", log),
        (
            "PNS_DATABASE_URL",
            format!("sqlite://{}/pns.db", data.display()),
        ),
        ("PNS_MAILDIR_ROOT", root.display().to_string()),
    ];
    let pns = support::start(pns, env, move |line| {
        if verbose && !(line.contains("WARN") || line.contains("ERROR")) {
            eprintln!("[pns] {line}");
        }
    });
    let public = pns.address("public");
    (pns, public)
}

fn maildir(root: &Path, i: usize) -> PathBuf {
    let dir = root.join(format!("example.com/user{i}/Maildir"));
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    dir
}

fn message(i: usize) -> String {
    format!(
        "Return-Path: <sender@example.org>\r\n\
         From: =?UTF-8?B?5byg5LiJ?= <sender@example.org>\r\n\
         To: user@example.com\r\n\
         Subject: =?UTF-8?Q?Benchmark_message_n=C2=B0{i}?=\r\n\
         Date: Tue, 1 Jul 2025 10:52:37 +0200\r\n\
         Message-ID: <bench.{i}@example.org>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n\
         Hello, this is message {i} of the benchmark. It has a few lines of text,\r\n\
         like a short mail would, so that the snippet has something to take.\r\n"
    )
}

/// Poll one user's session until `want` messages came; returns the cursor.
async fn drain(
    http: &reqwest::Client,
    public: &str,
    sid: &str,
    mut cursor: String,
    want: usize,
) -> (usize, String) {
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while got < want && Instant::now() < deadline {
        let url = if cursor.is_empty() {
            format!("http://{public}/pns/poll?sid={sid}&timeout=10")
        } else {
            format!("http://{public}/pns/poll?sid={sid}&cursor={cursor}&timeout=10")
        };
        let body: serde_json::Value = http.get(url).send().await.unwrap().json().await.unwrap();
        got += body["c"].as_u64().unwrap_or(0) as usize;
        cursor = body["cursor"].as_str().unwrap_or_default().to_owned();
    }
    (got, cursor)
}

#[tokio::main]
async fn main() {
    let a = args();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let root = tmp.path().join("mail");
    std::fs::create_dir_all(&data).unwrap();
    let boxes: Vec<PathBuf> = (0..a.mailboxes).map(|i| maildir(&root, i)).collect();
    let (_pns, public) = start(&a.pns, &data, &root);
    let secret = std::fs::read_to_string(data.join("jwt_secret")).unwrap();
    let sids: Vec<String> = (0..a.mailboxes)
        .map(|i| {
            pns::session::mint(
                secret.trim().as_bytes(),
                &format!("user{i}@example.com"),
                3600,
                None,
            )
            .unwrap()
        })
        .collect();
    let http = reqwest::Client::new();

    // One probe per mailbox: the watcher is up and every session has a cursor.
    let mut cursors = Vec::new();
    for (i, dir) in boxes.iter().enumerate() {
        std::fs::write(dir.join("tmp/probe"), message(0)).unwrap();
        std::fs::rename(dir.join("tmp/probe"), dir.join("new/probe")).unwrap();
        let (got, cursor) = drain(&http, &public, &sids[i], String::new(), 1).await;
        assert_eq!(got, 1, "the probe did not arrive");
        cursors.push(cursor);
    }

    // Written into tmp/ beforehand (not timed), as an MDA would have.
    let mut names: Vec<Vec<String>> = vec![Vec::new(); a.mailboxes];
    for i in 0..a.files {
        let b = i % a.mailboxes;
        let name = format!("1751360000.M{i}P1.bench,S=400");
        std::fs::write(boxes[b].join("tmp").join(&name), message(i + 1)).unwrap();
        names[b].push(name);
    }

    let t0 = Instant::now();
    for (b, list) in names.iter().enumerate() {
        for name in list {
            std::fs::rename(
                boxes[b].join("tmp").join(name),
                boxes[b].join("new").join(name),
            )
            .unwrap();
        }
    }
    let renamed = t0.elapsed();
    let mut pollers = Vec::new();
    for (b, cursor) in cursors.into_iter().enumerate() {
        let http = http.clone();
        let public = public.clone();
        let sid = sids[b].clone();
        let want = names[b].len();
        pollers.push(tokio::spawn(async move {
            drain(&http, &public, &sid, cursor, want).await.0
        }));
    }
    let mut received = 0;
    for p in pollers {
        received += p.await.unwrap();
    }
    let took = t0.elapsed();
    println!(
        "files: {}  mailboxes: {}  received: {}  renames took: {:.3} s  all received after: {:.3} s  rate: {:.0} files/s",
        a.files,
        a.mailboxes,
        received,
        renamed.as_secs_f64(),
        took.as_secs_f64(),
        a.files as f64 / took.as_secs_f64()
    );
    assert_eq!(received, a.files, "not every file arrived");
}
