//! The harness: starts the real `pns` binary on ephemeral ports with its data
//! in a temp dir, and talks to it over HTTP like users do.

#![allow(dead_code)]

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The server's last log lines kept, shown when a test fails.
const LOG_LINES_KEPT: usize = 100;

pub struct Server {
    child: Child,
    pub public: SocketAddr,
    pub internal: SocketAddr,
    pub dir: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
    /// A command `pns` is run through (e.g. `unshare …`), if any.
    wrap: Vec<String>,
    pub http: reqwest::Client,
    _tmp: Option<tempfile::TempDir>,
    /// The last [`LOG_LINES_KEPT`] lines the server logged.
    log: Arc<Mutex<VecDeque<String>>>,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Server {
    /// A server on SQLite in a fresh temp dir, with default settings.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// A server with extra `PNS_*` environment variables.
    pub fn start_with(env: &[(&str, &str)]) -> Server {
        Server::start_in(tempfile::tempdir().expect("tempdir"), &[], env)
    }

    /// A server with extra `pns serve` arguments and environment, with its data in `tmp`.
    pub fn start_in(tmp: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_through(&[], tmp, args, env)
    }

    /// A server run through `wrap` (a command that ends by exec'ing its
    /// arguments, e.g. `unshare … sh -c '…; exec "$0" "$@"'`), with extra
    /// environment variables.
    pub fn start_wrapped(wrap: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_through(wrap, tempfile::tempdir().expect("tempdir"), &[], env)
    }

    fn start_through(
        wrap: &[&str],
        tmp: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        let dir = tmp.path().to_path_buf();
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let args = args.iter().map(|a| a.to_string()).collect();
        let wrap = wrap.iter().map(|w| w.to_string()).collect();
        let mut s = Server::spawn(dir, env, args, wrap);
        s._tmp = Some(tmp);
        s
    }

    fn spawn(
        dir: PathBuf,
        env: Vec<(String, String)>,
        args: Vec<String>,
        wrap: Vec<String>,
    ) -> Server {
        let pns = env!("CARGO_BIN_EXE_pns");
        let mut cmd = match wrap.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(pns);
                c
            }
            None => Command::new(pns),
        };
        cmd.arg("serve")
            .args(&args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PNS_LOG", "info")
            .env("PNS_LISTEN", "127.0.0.1:0")
            .env("PNS_INTERNAL_LISTEN", "127.0.0.1:0")
            .env(
                "PNS_DATABASE_URL",
                format!("sqlite://{}/pns.db", dir.display()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start pns");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("PNS_TEST_LOG").is_some() {
                    eprintln!("[pns] {line}");
                }
                if !sent && line.contains("pns listening") {
                    let _ = tx.send(line.clone());
                    sent = true;
                }
                let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
                if kept.len() == LOG_LINES_KEPT {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("pns did not start listening");
        let addr = |key: &str| -> SocketAddr {
            let at = line.find(key).expect("address in log") + key.len();
            line[at..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        Server {
            public: addr("public="),
            internal: addr("internal="),
            child,
            dir,
            env,
            args,
            wrap,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            _tmp: None,
            log,
        }
    }

    /// Stop with SIGKILL and start again on the same data.
    pub fn kill9_and_restart(mut self) -> Server {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.start_again()
    }

    /// Stop with SIGTERM, as a clean shutdown, and start again on the same data.
    pub fn sigterm_and_restart(mut self) -> Server {
        assert_eq!(self.sigterm().0, Some(0), "pns did not exit cleanly");
        self.start_again()
    }

    fn start_again(mut self) -> Server {
        let tmp = self._tmp.take();
        let mut s = Server::spawn(
            self.dir.clone(),
            self.env.clone(),
            self.args.clone(),
            self.wrap.clone(),
        );
        s._tmp = tmp;
        s
    }

    /// The server process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send SIGTERM; returns the exit code and how long the exit took.
    pub fn sigterm(&mut self) -> (Option<i32>, Duration) {
        let t = Instant::now();
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        (status.code(), t.elapsed())
    }

    pub fn secret_file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name))
            .unwrap()
            .trim()
            .to_owned()
    }

    /// A setting this server was started with.
    fn env_value(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The configured internal token, else the generated one.
    pub fn internal_token(&self) -> String {
        match self.env_value("PNS_INTERNAL_TOKEN") {
            Some(list) => list.split(',').next().unwrap().trim().to_owned(),
            None => self.secret_file("internal_token"),
        }
    }

    /// A session token for `user`, minted like `pns token` does (with the
    /// configured secret, else the generated one).
    pub fn sid(&self, user: &str) -> String {
        let secret = match self.env_value("PNS_JWT_SECRET") {
            Some(s) => s.to_owned(),
            None => self.secret_file("jwt_secret"),
        };
        pns::session::mint(secret.as_bytes(), user, 3600, None).unwrap()
    }

    pub fn public_url(&self, path: &str) -> String {
        format!("http://{}{}", self.public, path)
    }

    pub fn internal_url(&self, path: &str) -> String {
        format!("http://{}{}", self.internal, path)
    }

    /// `GET /pns/poll?sid=…&<query>`
    pub async fn poll(&self, sid: &str, query: &str) -> Answer {
        let url = self.public_url(&format!("/pns/poll?sid={sid}&{query}"));
        answer(self.http.get(url).send().await.unwrap()).await
    }

    /// `POST /internal/v1/notify` with the internal token.
    pub async fn notify(&self, body: Value) -> Answer {
        self.internal_post("/internal/v1/notify", body).await
    }

    pub async fn internal_post(&self, path: &str, body: Value) -> Answer {
        let r = self
            .http
            .post(self.internal_url(path))
            .bearer_auth(self.internal_token())
            .json(&body)
            .send()
            .await
            .unwrap();
        answer(r).await
    }

    pub async fn internal_get(&self, path: &str) -> Answer {
        let r = self
            .http
            .get(self.internal_url(path))
            .bearer_auth(self.internal_token())
            .send()
            .await
            .unwrap();
        answer(r).await
    }

    /// `pollsHeld` of `/internal/v1/stats`.
    pub async fn polls_held(&self) -> u64 {
        self.internal_get("/internal/v1/stats").await.body["pollsHeld"]
            .as_u64()
            .unwrap()
    }

    /// Wait until `pollsHeld` reads `want`.
    pub async fn polls_held_becomes(&self, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = self.polls_held().await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pollsHeld stayed {got}, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Poll from `cursor` ("" for a first poll) until `want` messages have
    /// come or `within` has passed; the messages and the last cursor.
    pub async fn collect(
        &self,
        sid: &str,
        cursor: &str,
        want: usize,
        within: Duration,
    ) -> (Vec<Value>, String) {
        let deadline = Instant::now() + within;
        let mut cursor = cursor.to_owned();
        let mut got = Vec::new();
        while got.len() < want && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now()).as_secs();
            let timeout = left.clamp(1, 10);
            let query = if cursor.is_empty() {
                format!("timeout={timeout}")
            } else {
                format!("cursor={cursor}&timeout={timeout}")
            };
            let a = self.poll(sid, &query).await;
            assert_eq!(a.status, StatusCode::OK, "poll failed: {}", a.body);
            got.extend(a.body["msg"].as_array().cloned().unwrap_or_default());
            cursor = a.cursor();
        }
        (got, cursor)
    }

    /// A new-mail message for `user` with `subject`.
    pub async fn mail(&self, user: &str, subject: &str) -> Answer {
        let a = self.notify(mail(user, subject)).await;
        assert_eq!(a.status, StatusCode::ACCEPTED, "notify failed: {}", a.body);
        a
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what the server said (all of it with
        // PNS_TEST_LOG set).
        if std::thread::panicking() && std::env::var_os("PNS_TEST_LOG").is_none() {
            let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            eprintln!("pns's last {} log lines:", log.len());
            for line in log.iter() {
                eprintln!("[pns] {line}");
            }
        }
    }
}

/// One request on a fresh connection to `addr`: the answer's status line
/// and headers but the date, in the order sent.
pub async fn raw_head(addr: SocketAddr, request: &str) -> Vec<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("no answer in time")
            .unwrap();
        assert!(n > 0, "closed before an answer");
        got.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap();
    head.split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("date:"))
        .map(str::to_owned)
        .collect()
}

pub fn mail(user: &str, subject: &str) -> Value {
    json!({"user": user, "type": 70, "data": {"folder": "INBOX", "subject": subject}})
}

/// Send `keyed`, a message with a dedupKey sent once before, once right
/// away (a duplicate: the key holds within the retention's maximum age),
/// then until it is stored again: past that age the purge forgot the key.
pub async fn resend_until_its_dedup_key_is_forgotten(s: &Server, keyed: &Value) {
    let again = s.notify(keyed.clone()).await;
    assert_eq!(again.body["duplicates"], 1, "{}", again.body);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let a = s.notify(keyed.clone()).await;
        assert_eq!(a.status, reqwest::StatusCode::ACCEPTED, "{}", a.body);
        if a.body["accepted"] == 1 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dedup key was never forgotten"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

pub async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        headers,
        body,
    }
}

impl Answer {
    /// The subjects of the messages in a poll answer, in order.
    pub fn subjects(&self) -> Vec<String> {
        self.body["msg"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| m["data"]["subject"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn cursor(&self) -> String {
        self.body["cursor"].as_str().unwrap_or_default().to_owned()
    }

    pub fn c(&self) -> u64 {
        self.body["c"].as_u64().unwrap()
    }
}

pub fn dir_exists(p: &Path) -> bool {
    p.is_dir()
}

/// Run `pns ARGS` to completion with the data of `dir`; returns (exit code, stdout, stderr).
pub fn pns(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pns"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "PNS_DATABASE_URL",
            format!("sqlite://{}/pns.db", dir.display()),
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run pns");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `GET /metrics` on the internal listener, without a token.
pub async fn metrics(s: &Server) -> String {
    let r = s.http.get(s.internal_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    r.text().await.unwrap()
}

/// The value of the sample `series` (name with labels, exactly as written).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().unwrap())
    })
}

pub async fn metric(s: &Server, series: &str) -> f64 {
    let text = metrics(s).await;
    sample(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// `POST path` with the JSON `body` on the internal listener, over a
/// connection closed as soon as the request is written, before any answer:
/// a client that gives up at once.
pub async fn internal_post_and_leave(s: &Server, path: &str, body: &serde_json::Value) {
    use tokio::io::AsyncWriteExt;
    let mut stream = internal_post_raw(s, path, body).await;
    stream.shutdown().await.unwrap();
}

/// `POST path` with the JSON `body` and the internal token, written to a
/// new connection to the internal listener, which is returned unread.
pub async fn internal_post_raw(
    s: &Server,
    path: &str,
    body: &serde_json::Value,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let (body, token) = (body.to_string(), s.internal_token());
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: pns\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(s.internal).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// What the node's first retention purge removed, as `pns_retention_purged_total`
/// of `what` (`messages`, `dedup_keys`, …) reads in the first scrape that
/// counts a purge, and the purges that scrape counts (scraped every 50 ms,
/// so 1 unless the purges come faster).
pub async fn first_purge(s: &Server, what: &str) -> (f64, f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let text = metrics(s).await;
        let purges = sample(&text, "pns_retention_purges_total").unwrap_or(0.0);
        if purges >= 1.0 {
            let series = format!("pns_retention_purged_total{{what=\"{what}\"}}");
            let removed =
                sample(&text, &series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
            return (purges, removed);
        }
        assert!(std::time::Instant::now() < deadline, "no purge ended");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Wait until `series` reads `want`.
pub async fn metric_becomes(s: &Server, series: &str, want: f64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = metric(s, series).await;
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} stayed {got}, expected {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
