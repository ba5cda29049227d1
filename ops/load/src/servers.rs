//! The servers under test, run as children of the driver on loopback ports
//! with their data in a scratch directory: `pns serve` on SQLite, and nginx
//! with the Nchan module in the foreground (`daemon off`) from the config
//! template in `ops/nchan/`. Both are stopped when the driver is done with
//! them, and killed if they do not stop in time. What each writes to its log
//! that an operator would look at is echoed and tallied ([`ServerLog`]), so
//! the report tells when a server complained or a worker died.

use crate::TargetKind;
use anyhow::{bail, Context};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a server may take to come up, and to stop.
const START_LIMIT: Duration = Duration::from_secs(30);
const STOP_LIMIT: Duration = Duration::from_secs(20);

pub struct Server {
    pub kind: TargetKind,
    child: Child,
    log: Arc<Mutex<ServerLog>>,
    /// The thread reading the child's stderr; done once every process
    /// holding it has exited.
    log_reader: Option<JoinHandle<()>>,
    /// Where pollers connect.
    pub public: SocketAddr,
    /// Where notifies go: PNS's internal listener, or nginx itself.
    pub ingest: SocketAddr,
    /// PNS: the session secret and the internal token.
    pub secret: String,
    pub token: String,
}

impl Server {
    /// The server's processes: the child and anything it forked.
    pub fn pids(&self) -> Vec<u32> {
        crate::procstat::tree(self.child.id())
    }

    /// SIGTERM, then SIGKILL if it has not stopped within [`STOP_LIMIT`].
    /// Returns what it logged from its start until it stopped.
    pub async fn stop(mut self) -> ServerLog {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        let mut stopped = false;
        while t.elapsed() < STOP_LIMIT {
            if let Ok(Some(_)) = self.child.try_wait() {
                stopped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !stopped {
            eprintln!(
                "pns-load: {} did not stop in time; killing it",
                self.kind.name()
            );
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The last lines may still be in the pipe.
        if let Some(reader) = self.log_reader.take() {
            let t = Instant::now();
            while !reader.is_finished() && t.elapsed() < LOG_DRAIN_LIMIT {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.clone()
    }
}

/// How long [`Server::stop`] waits for the last of the log.
const LOG_DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// What a server logged, from its start until it stopped, that an operator
/// would look at: PNS's warnings and errors; everything nginx logs, which the
/// config sets to alerts and worse (a worker's death among them).
#[derive(Debug, Default, Clone, Serialize)]
pub struct ServerLog {
    /// Lines of that kind.
    pub lines: u64,
    /// nginx's workers that died (`exited on signal`); the master starts
    /// another, and the dead one's connections are gone.
    pub workers_died: u64,
    /// PNS's warnings that the disk held a sync of its log (`slow_syncs=`
    /// in the line), and with it the acknowledgements: the machine's
    /// doing rather than the server's. Counted in `lines` too.
    pub slow_syncs: u64,
    /// The first such line.
    pub first: Option<String>,
}

impl ServerLog {
    /// Count `line` if it is worth an operator's look for a server of `kind`.
    fn tally(&mut self, kind: TargetKind, line: &str) {
        let counted = match kind {
            TargetKind::Pns => line.contains("WARN") || line.contains("ERROR"),
            TargetKind::Nchan => !line.trim().is_empty(),
        };
        if !counted {
            return;
        }
        self.lines += 1;
        if kind == TargetKind::Nchan && line.contains("exited on signal") {
            self.workers_died += 1;
        }
        if kind == TargetKind::Pns && line.contains("slow_syncs=") {
            self.slow_syncs += 1;
        }
        if self.first.is_none() {
            self.first = Some(line.to_owned());
        }
    }
}

/// Lines of a server's log echoed at most; the rest are only counted.
const ECHOED_LINES: u64 = 10;

/// Read the child's stderr on a thread: tally what counts, echo the first
/// [`ECHOED_LINES`] of it, and hand the first line containing `ready` (if
/// any) to the returned receiver.
fn read_log(
    kind: TargetKind,
    stderr: ChildStderr,
    ready: Option<&'static str>,
) -> (
    Arc<Mutex<ServerLog>>,
    JoinHandle<()>,
    std::sync::mpsc::Receiver<String>,
) {
    let log = Arc::new(Mutex::new(ServerLog::default()));
    let (tx, rx) = std::sync::mpsc::channel();
    let tally = log.clone();
    let reader = std::thread::spawn(move || {
        let mut tx = ready.map(|r| (r, tx));
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some((ready, sender)) = &tx {
                if line.contains(ready) {
                    let _ = sender.send(line);
                    tx = None;
                    continue;
                }
            }
            let mut log = tally.lock().unwrap_or_else(|p| p.into_inner());
            let before = log.lines;
            log.tally(kind, &line);
            // nginx may log the same alert hundreds of times in a round.
            if log.lines > before && before < ECHOED_LINES {
                eprintln!("[{}] {line}", kind.name());
            }
        }
    });
    (log, reader, rx)
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Start `pns serve` on loopback ports with its database in `dir`.
pub fn start_pns(bin: &Path, dir: &Path) -> anyhow::Result<Server> {
    std::fs::create_dir_all(dir)?;
    let secret = random_hex(32);
    let token = random_hex(24);
    let mut child = Command::new(bin)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PNS_LOG", "info")
        .env("PNS_LISTEN", "127.0.0.1:0")
        .env("PNS_INTERNAL_LISTEN", "127.0.0.1:0")
        .env(
            "PNS_DATABASE_URL",
            format!("sqlite://{}/pns.db", dir.display()),
        )
        .env("PNS_DATA_DIR", dir)
        .env("PNS_JWT_SECRET", &secret)
        .env("PNS_INTERNAL_TOKEN", &token)
        .env("PNS_HOLD_SECS", crate::pns::HOLD_SECS.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stderr = child.stderr.take().context("pns stderr")?;
    let (log, reader, rx) = read_log(TargetKind::Pns, stderr, Some("pns listening"));
    let mut server = Server {
        kind: TargetKind::Pns,
        child,
        log,
        log_reader: Some(reader),
        public: SocketAddr::from(([127, 0, 0, 1], 0)),
        ingest: SocketAddr::from(([127, 0, 0, 1], 0)),
        secret,
        token,
    };
    let line = rx
        .recv_timeout(START_LIMIT)
        .context("pns did not report listening in time")?;
    let addr = |key: &str| -> anyhow::Result<SocketAddr> {
        let at = line.find(key).context("address in the listening line")? + key.len();
        Ok(line[at..]
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .parse()?)
    };
    server.public = addr("public=")?;
    server.ingest = addr("internal=")?;
    Ok(server)
}

/// A free loopback port (the kernel's pick, released at once).
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Start nginx with the Nchan module from the config template `conf`, its
/// prefix (pid file, temp files) in `dir`.
pub async fn start_nchan(
    nginx: &Path,
    conf: &Path,
    module: &Path,
    dir: &Path,
) -> anyhow::Result<Server> {
    std::fs::create_dir_all(dir)?;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let template =
        std::fs::read_to_string(conf).with_context(|| format!("cannot read {}", conf.display()))?;
    let text = template
        .replace("@LISTEN@", &listen.to_string())
        .replace("@PREFIX@", &dir.display().to_string())
        .replace("@MODULE@", &module.display().to_string());
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, text)?;
    let mut child = Command::new(nginx)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg("stderr")
        .arg("-g")
        .arg("daemon off;")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", nginx.display()))?;
    let stderr = child.stderr.take().context("nginx stderr")?;
    let (log, reader, _) = read_log(TargetKind::Nchan, stderr, None);
    let mut server = Server {
        kind: TargetKind::Nchan,
        child,
        log,
        log_reader: Some(reader),
        public: listen,
        ingest: listen,
        secret: String::new(),
        token: String::new(),
    };
    let t = Instant::now();
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            bail!("nginx exited at start ({status}); see its messages above");
        }
        let up = async {
            let mut c = crate::conn::Conn::open([127, 0, 0, 1].into(), listen).await?;
            crate::nchan::held(&mut c).await
        };
        if up.await.is_ok() {
            return Ok(server);
        }
        if t.elapsed() > START_LIMIT {
            bail!("nginx did not answer on {listen} in time");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `nginx -v`, for the report.
pub fn nginx_version(nginx: &Path) -> Option<String> {
    let out = Command::new(nginx).arg("-v").output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr);
    Some(text.trim().trim_start_matches("nginx version: ").to_owned())
}

/// The installed Nchan package's version, where dpkg knows it.
pub fn nchan_version() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "libnginx-mod-nchan"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A scratch directory of this run.
pub fn scratch_dir(base: Option<&Path>, name: &str) -> PathBuf {
    let base = base
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("pns-load-{}-{name}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_alerts_are_counted_and_a_dead_worker_named() {
        let mut log = ServerLog::default();
        log.tally(
            TargetKind::Nchan,
            "2026/12/06 23:01:02 [alert] 811#811: worker process 812 exited on signal 11",
        );
        log.tally(
            TargetKind::Nchan,
            "2026/12/06 23:01:03 [alert] 813#813: ngx_slab_free(): chunk is already free",
        );
        log.tally(TargetKind::Nchan, "");
        assert_eq!((log.lines, log.workers_died), (2, 1));
        assert!(log
            .first
            .as_deref()
            .is_some_and(|l| l.contains("signal 11")));
    }

    #[test]
    fn only_warnings_and_errors_of_pns_count() {
        let mut log = ServerLog::default();
        log.tally(TargetKind::Pns, "2026-12-06T23:01:02Z  INFO pns: held");
        log.tally(
            TargetKind::Pns,
            "2026-12-06T23:01:03Z  WARN pns::store::wal_sync: a sync of the write-ahead log was slow, and so were the acknowledgements waiting for it (slow_syncs: since the last such warning) took_ms=241 slow_syncs=1 longest_ms=241",
        );
        log.tally(
            TargetKind::Pns,
            "2026-12-06T23:01:04Z ERROR pns: store failed",
        );
        assert_eq!((log.lines, log.workers_died, log.slow_syncs), (2, 0, 1));
        assert!(log.first.as_deref().is_some_and(|l| l.contains("was slow")));
    }
}
