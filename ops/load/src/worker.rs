//! A worker process: holds the polls of one shard of the users and records
//! what they receive. The driver talks to it in JSON lines over stdin and
//! stdout ([`Cmd`] in, [`Event`] out); a worker whose stdin closes, or that
//! outlives `--max-secs`, exits on its own.
//!
//! Each user is one task with one keep-alive connection from its own source
//! address; it polls again at once after every answer, so it stays held.

use crate::conn::{source_addr, Conn};
use crate::{nchan, pns, Payload, TargetKind};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::Semaphore;

/// The environment variable that hands a worker the session secret.
pub const SECRET_ENV: &str = "PNS_LOAD_JWT_SECRET";
/// Pause after a failed connect or poll before trying again.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[arg(long, value_enum)]
    pub target: TargetKind,
    /// The public address: PNS's public listener, or nginx.
    #[arg(long)]
    pub server: SocketAddr,
    /// Users in the whole run.
    #[arg(long)]
    pub users: u32,
    /// This worker holds the users `u` with `u % n == i`.
    #[arg(long, value_parser = parse_shard)]
    pub shard: (u32, u32),
    /// Connections being opened at once during the ramp.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Exit after this long whatever happens.
    #[arg(long, default_value_t = 1800)]
    pub max_secs: u64,
}

fn parse_shard(s: &str) -> Result<(u32, u32), String> {
    let (i, n) = s.split_once('/').ok_or("shard is i/n, e.g. 0/2")?;
    let (i, n): (u32, u32) = (
        i.parse().map_err(|_| "shard index is not a number")?,
        n.parse().map_err(|_| "shard count is not a number")?,
    );
    if n == 0 || i >= n {
        return Err(format!("shard {i}/{n}: need 0 <= i < n"));
    }
    Ok((i, n))
}

/// What the driver asks.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Cmd {
    /// Open every poll of the shard.
    Hold,
    /// How much arrived so far.
    Count,
    /// Everything recorded.
    Report,
    Quit,
}

/// What a worker says.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "lowercase")]
pub enum Event {
    /// Sessions are minted; ready to hold.
    Ready {
        users: u32,
        open_files: u64,
    },
    Count(Counts),
    Report(Box<WorkerReport>),
}

#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct Counts {
    /// Distinct messages received.
    pub distinct: u64,
    /// Users whose first connection is open.
    pub connected: u64,
    /// Failed connects and polls.
    pub errors: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Every receipt, repeats included.
    pub receipts: Vec<Receipt>,
    pub errors: u64,
    pub first_error: Option<String>,
}

/// One message received.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Receipt {
    /// The message's number.
    pub k: u64,
    /// When its delivery started, as it carries it (CLOCK_MONOTONIC ns).
    pub t: u64,
    /// µs from then until it was received.
    pub us: u32,
}

#[derive(Default)]
struct Recorder {
    receipts: Vec<Receipt>,
    distinct: HashSet<u64>,
    first_error: Option<String>,
}

#[derive(Default)]
struct Shared {
    recorder: Mutex<Recorder>,
    connected: AtomicU64,
    errors: AtomicU64,
}

impl Shared {
    fn record(&self, payloads: &[Payload]) {
        if payloads.is_empty() {
            return;
        }
        let now = crate::mono_ns();
        let mut r = self.recorder.lock().unwrap_or_else(|p| p.into_inner());
        for p in payloads {
            let us = now.saturating_sub(p.t) / 1000;
            r.receipts.push(Receipt {
                k: p.k,
                t: p.t,
                us: u32::try_from(us).unwrap_or(u32::MAX),
            });
            r.distinct.insert(p.k);
        }
    }

    fn error(&self, e: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut r = self.recorder.lock().unwrap_or_else(|p| p.into_inner());
        if r.first_error.is_none() {
            r.first_error = Some(format!("{e:#}"));
        }
    }

    fn counts(&self) -> Counts {
        let r = self.recorder.lock().unwrap_or_else(|p| p.into_inner());
        Counts {
            distinct: r.distinct.len() as u64,
            connected: self.connected.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    fn report(&self) -> WorkerReport {
        let r = self.recorder.lock().unwrap_or_else(|p| p.into_inner());
        WorkerReport {
            receipts: r.receipts.clone(),
            errors: self.errors.load(Ordering::Relaxed),
            first_error: r.first_error.clone(),
        }
    }
}

/// One user's side of the protocol.
enum Holder {
    Pns(pns::Poller),
    Nchan(nchan::Subscriber),
}

impl Holder {
    async fn poll(&mut self, conn: &mut Conn) -> anyhow::Result<Vec<Payload>> {
        match self {
            Holder::Pns(p) => p.poll(conn).await,
            Holder::Nchan(s) => s.poll(conn).await,
        }
    }
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let open_files = crate::raise_open_file_limit();
    let (index, shards) = args.shard;
    let users: Vec<u32> = (index..args.users).step_by(shards as usize).collect();
    let mut holders = Vec::with_capacity(users.len());
    match args.target {
        TargetKind::Pns => {
            let secret =
                std::env::var(SECRET_ENV).with_context(|| format!("{SECRET_ENV} is not set"))?;
            for &u in &users {
                let sid = pns::mint(secret.as_bytes(), &pns::user(u), 24 * 3600)?;
                holders.push((u, Holder::Pns(pns::Poller::new(sid))));
            }
        }
        TargetKind::Nchan => {
            for &u in &users {
                holders.push((u, Holder::Nchan(nchan::Subscriber::new(&nchan::channel(u)))));
            }
        }
    }
    send(&Event::Ready {
        users: users.len() as u32,
        open_files,
    })?;

    let shared = Arc::new(Shared::default());
    let deadline = tokio::time::sleep(Duration::from_secs(args.max_secs));
    tokio::pin!(deadline);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        let line = tokio::select! {
            l = lines.next_line() => l?,
            _ = &mut deadline => {
                eprintln!("pns-load worker {index}: --max-secs reached, exiting");
                return Ok(());
            }
        };
        let Some(line) = line else { return Ok(()) };
        let cmd: Cmd = serde_json::from_str(&line).context("bad command from the driver")?;
        match cmd {
            Cmd::Hold => {
                let connecting = Arc::new(Semaphore::new(args.connect_concurrency));
                for (u, holder) in holders.drain(..) {
                    tokio::spawn(hold_user(
                        u,
                        holder,
                        args.target,
                        args.server,
                        shared.clone(),
                        connecting.clone(),
                    ));
                }
            }
            Cmd::Count => send(&Event::Count(shared.counts()))?,
            Cmd::Report => send(&Event::Report(Box::new(shared.report())))?,
            Cmd::Quit => return Ok(()),
        }
    }
}

/// Keep one poll of user `u` held until the process ends.
async fn hold_user(
    u: u32,
    mut holder: Holder,
    target: TargetKind,
    server: SocketAddr,
    shared: Arc<Shared>,
    connecting: Arc<Semaphore>,
) {
    let source = source_addr(target.source_octet(), u);
    let mut first = true;
    loop {
        let opened = {
            let _permit = connecting.acquire().await;
            Conn::open(source, server).await
        };
        let mut conn = match opened {
            Ok(c) => c,
            Err(e) => {
                shared.error(&e);
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        if first {
            shared.connected.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        loop {
            match holder.poll(&mut conn).await {
                Ok(payloads) => shared.record(&payloads),
                Err(e) => {
                    shared.error(&e);
                    tokio::time::sleep(RETRY_PAUSE).await;
                    break;
                }
            }
        }
    }
}

fn send(event: &Event) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, event)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}
