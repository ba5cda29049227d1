//! The servers under test, run as children of the driver on loopback ports
//! with their data in a scratch directory: `pns serve` on SQLite, and nginx
//! with the Nchan module in the foreground (`daemon off`) from the config
//! template in `ops/nchan/`. Both are stopped when the driver is done with
//! them, and killed if they do not stop in time.

use crate::TargetKind;
use anyhow::{bail, Context};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to come up, and to stop.
const START_LIMIT: Duration = Duration::from_secs(30);
const STOP_LIMIT: Duration = Duration::from_secs(20);

pub struct Server {
    pub kind: TargetKind,
    child: Child,
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
    pub async fn stop(mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < STOP_LIMIT {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "pns-load: {} did not stop in time; killing it",
            self.kind.name()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let (tx, rx) = std::sync::mpsc::channel();
    // Passes the listening line on, then echoes warnings and errors.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("pns listening") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(line);
                    continue;
                }
            }
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("[pns] {line}");
            }
        }
    });
    let mut server = Server {
        kind: TargetKind::Pns,
        child,
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
    let child = Command::new(nginx)
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
        .spawn()
        .with_context(|| format!("cannot start {}", nginx.display()))?;
    let mut server = Server {
        kind: TargetKind::Nchan,
        child,
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
