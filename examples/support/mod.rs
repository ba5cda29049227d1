//! What the benchmarks in `examples/` share: a `pns serve` of their own.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `pns serve`, killed when dropped.
pub struct Pns {
    child: Child,
    /// The line it logged when it began to listen.
    listening: String,
}

impl Pns {
    /// The address of its `public` or `internal` listener.
    pub fn address(&self, listener: &str) -> String {
        let name = format!("{listener}=");
        let at = self.listening.find(&name).expect("a listener of pns") + name.len();
        let rest = &self.listening[at..];
        rest.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Drop for Pns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `bin serve` on loopback ports with `env` besides, and wait until
/// it listens. Each line it logs goes to `on_line`; warnings and errors are
/// shown.
pub fn start<K, V>(
    bin: &Path,
    env: impl IntoIterator<Item = (K, V)>,
    mut on_line: impl FnMut(&str) + Send + 'static,
) -> Pns
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let mut child = Command::new(bin)
        .arg("serve")
        .env("PNS_LISTEN", "127.0.0.1:0")
        .env("PNS_INTERNAL_LISTEN", "127.0.0.1:0")
        .envs(env)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pns (build it with cargo build --release --bin pns)");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut listening = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("pns listening") {
                listening = true;
                let _ = tx.send(line.clone());
            }
            if !listening {
                eprintln!("[pns] {line}");
            }
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("[pns] {line}");
            }
            on_line(&line);
        }
    });
    let listening = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("pns did not start");
    Pns { child, listening }
}
