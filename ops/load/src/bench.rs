//! The driver: for each target in turn, start the server, measure it idle,
//! have the workers ramp up one held poll per user, measure it holding them,
//! then run the notify phases and tally what arrived. Before the first
//! round the first target's polls are held once, unmeasured
//! ([`BenchArgs::warm_up`]).
//!
//! The phases, each waiting until its messages arrived and the server
//! holds every poll again before the next:
//!
//! 1. *single*: every user is sent exactly one message, as fast as the
//!    sender connections go (single notifies); its tally is the "all
//!    delivered, none twice" check, its pace the single-notify throughput.
//! 2. *rate*: a fixed rate of single notifies (1,000 a second by default),
//!    each stamped with when it was due; the delivery latency figures.
//! 3. *batch*: messages in batches (500 by default) as fast as they go.
//!    Nchan has no batch publish, so there the same messages go as
//!    concurrent single publishes.

use crate::conn::{source_addr, Conn};
use crate::pns::{LogSyncs, SyncTimes};
use crate::report::{self, Phase, RampCpu, RatePhase, TargetReport};
use crate::servers::{self, Server};
use crate::stats;
use crate::worker::{Cmd, Counts, Event, Receipt, WorkerReport};
use crate::{nchan, pns, Payload, TargetKind};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::task::JoinSet;

/// Polls one worker process holds at most by default: its open-file limit
/// (20,000 on the reference machine) less a margin.
const POLLS_PER_WORKER: u32 = 9_000;
/// Phase numbers, as carried in [`Payload::p`].
const SINGLE: u8 = 1;
const RATE: u8 = 2;
const BATCH: u8 = 3;
/// Message numbers of a phase start at `phase * PHASE_SPAN`.
const PHASE_SPAN: u64 = 100_000_000;

/// The order of the batch phase's users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchOrder {
    /// In no order, as mail comes: message i to user 7,919·i mod N.
    Scattered,
    /// In the order the users' polls connected: message i to user i mod N.
    /// Consecutive users' state then lies together in the server's memory
    /// and database, which flatters a server that keeps it so (the order
    /// of runs 1–101 in docs/BENCHMARKS.md).
    Connected,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// The servers to measure, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "pns,nchan")]
    pub targets: Vec<TargetKind>,
    /// Times each target is measured, taking turns (PNS, Nchan, PNS, …):
    /// the comparison is of each figure's median over the rounds, with how
    /// many rounds went each way, so one noisy phase on a shared machine
    /// does not decide a figure. Five, since a machine whose slow spells
    /// last tens of seconds put two of three rounds of one target in them
    /// (docs/benchmarks/NOTES.md, ⁴¹).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub rounds: u32,
    /// The targets whose failures (a poll not held, a notify refused, a
    /// message lost or received twice) make the exit status non-zero
    /// (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub must_pass: Option<Vec<TargetKind>>,
    /// Users, each holding one long poll.
    #[arg(long, default_value_t = 19_000)]
    pub users: u32,
    /// Worker processes holding the polls (default: one per 9,000 polls).
    #[arg(long)]
    pub workers: Option<u32>,
    /// Connections sending notifies in the single and rate phases.
    #[arg(long, default_value_t = 64)]
    pub senders: usize,
    /// Notifies a second in the rate phase.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// Seconds the rate phase lasts.
    #[arg(long, default_value_t = 10)]
    pub rate_secs: u32,
    /// Messages per batch in the batch phase.
    #[arg(long, default_value_t = 500)]
    pub batch: u32,
    /// Messages in the batch phase (rounded up to whole batches).
    #[arg(long, default_value_t = 50_000)]
    pub batch_total: u32,
    /// Batches in flight at once.
    #[arg(long, default_value_t = 4)]
    pub batch_concurrency: usize,
    /// Which users the batch phase's messages go to, one after another.
    #[arg(long, value_enum, default_value_t = BatchOrder::Scattered)]
    pub batch_order: BatchOrder,
    /// Before the rounds, hold every user's poll on the first target once,
    /// measuring nothing. The first ramp of a run met a machine that had not
    /// held the sockets of 19,000 polls lately: in runs 114–117 it was the
    /// slowest of its target's five each time (docs/BENCHMARKS.md, "The
    /// commands"), and it was always PNS's.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub warm_up: bool,
    /// Seconds over which the idle CPU of the server is measured.
    #[arg(long, default_value_t = 5)]
    pub idle_secs: u64,
    /// Seconds to wait after the last phase before reading the RSS again.
    #[arg(long, default_value_t = 12)]
    pub settle_secs: u64,
    /// Longest wait for a ramp or for a phase's messages to arrive, in seconds.
    #[arg(long, default_value_t = 120)]
    pub phase_limit_secs: u64,
    /// The pns binary (default: target/release/pns of this workspace).
    #[arg(long)]
    pub pns_bin: Option<PathBuf>,
    #[arg(long, default_value = "nginx")]
    pub nginx_bin: PathBuf,
    /// The nginx config template (default: ops/nchan/nginx.conf).
    #[arg(long)]
    pub nchan_conf: Option<PathBuf>,
    #[arg(long, default_value = "/usr/lib/nginx/modules/ngx_nchan_module.so")]
    pub nchan_module: PathBuf,
    /// Skip Nchan, with a note, when nginx or the module is not installed.
    #[arg(long)]
    pub skip_missing_nchan: bool,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/load/report.json")]
    pub out: PathBuf,
    /// Where the servers keep their data (default: the temp dir).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// Also write every message received to this file, a line each (tab
    /// separated, with a header): target, round, phase, when its delivery
    /// started (CLOCK_MONOTONIC ns, the clock of `perf record -k
    /// CLOCK_MONOTONIC`), its latency in µs, and its number; to see when
    /// the slow ones came, and what the machine ran then.
    #[arg(long)]
    pub deliveries: Option<PathBuf>,
}

/// Returns whether every target delivered every message exactly once.
pub async fn run(args: BenchArgs) -> anyhow::Result<bool> {
    crate::raise_open_file_limit();
    let mut kinds = Vec::new();
    let mut notes = Vec::new();
    for &kind in &args.targets {
        if kind == TargetKind::Nchan && !nchan_installed(&args) {
            let note = format!(
                "nchan skipped: {} or {} is missing (apt-get install nginx libnginx-mod-nchan)",
                args.nginx_bin.display(),
                args.nchan_module.display()
            );
            if !args.skip_missing_nchan {
                bail!("{note}");
            }
            eprintln!("pns-load: {note}");
            notes.push(note);
            continue;
        }
        kinds.push(kind);
    }
    if let Some(path) = &args.deliveries {
        start_deliveries(path)?;
    }
    if let Some(&first) = kinds.first().filter(|_| args.warm_up) {
        warm_up(first, &args).await?;
    }
    let mut targets = Vec::new();
    let mut failed = Vec::new();
    for round in 1..=args.rounds {
        if args.rounds > 1 {
            eprintln!("pns-load: round {round} of {}", args.rounds);
        }
        for &kind in &kinds {
            match measure(kind, round, &args).await {
                Ok(report) => targets.push(report),
                Err(failure) => {
                    eprintln!(
                        "pns-load: {}: round {round} failed, the run goes on: {}",
                        failure.target, failure.error
                    );
                    failed.push(failure);
                }
            }
        }
    }
    let run = report::Run::new(&args, targets, failed, notes);
    report::write_json(&args.out, &run)?;
    println!("{}", report::summary_line(&run));
    eprintln!("pns-load: report written to {}", args.out.display());
    Ok(run.passed(|target| {
        args.must_pass
            .as_ref()
            .is_none_or(|kinds| kinds.iter().any(|k| k.name() == target))
    }))
}

fn nchan_installed(args: &BenchArgs) -> bool {
    let on_path = args.nginx_bin.is_absolute() && args.nginx_bin.exists()
        || std::process::Command::new(&args.nginx_bin)
            .arg("-v")
            .stderr(Stdio::null())
            .status()
            .is_ok();
    on_path && args.nchan_module.exists()
}

/// Notifies as the target takes them.
enum Ingest {
    Pns(pns::Internal),
    Nchan,
}

impl Ingest {
    async fn one(&self, conn: &mut Conn, u: u32, data: Payload) -> anyhow::Result<()> {
        match self {
            Ingest::Pns(api) => api.notify(conn, &pns::user(u), data).await,
            Ingest::Nchan => nchan::publish(conn, &nchan::channel(u), data).await,
        }
    }

    async fn held(&self, conn: &mut Conn) -> anyhow::Result<u64> {
        match self {
            Ingest::Pns(api) => api.held(conn).await,
            Ingest::Nchan => nchan::held(conn).await,
        }
    }
}

/// What a group of sender tasks did.
#[derive(Default)]
struct Sent {
    acked: Vec<u64>,
    /// For each request acknowledged, µs from sending it to its answer.
    ack_us: Vec<u32>,
    /// At a fixed rate, the longest a notify left after it was due: a lane
    /// sends its next notify only once the last one is answered.
    late_max_us: u32,
    errors: u64,
    first_error: Option<String>,
}

impl Sent {
    fn merge(&mut self, other: Sent) {
        self.acked.extend(other.acked);
        self.ack_us.extend(other.ack_us);
        self.late_max_us = self.late_max_us.max(other.late_max_us);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// The outcome `r` of a request sent at `sent` for the messages `ks`.
    fn note(&mut self, r: anyhow::Result<()>, ks: impl IntoIterator<Item = u64>, sent: Instant) {
        match r {
            Ok(()) => {
                self.acked.extend(ks);
                self.ack_us.push(micros(sent.elapsed()));
            }
            Err(e) => {
                self.errors += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!("{e:#}"));
                }
            }
        }
    }
}

/// Start the server of `kind`, with its data in the scratch directory it
/// returns.
async fn start(kind: TargetKind, args: &BenchArgs) -> anyhow::Result<(Server, PathBuf)> {
    let scratch = servers::scratch_dir(args.scratch.as_deref(), kind.name());
    let root = crate::repo_root();
    let started = match kind {
        TargetKind::Pns => {
            let bin = args
                .pns_bin
                .clone()
                .unwrap_or_else(|| root.join("target/release/pns"));
            servers::start_pns(&bin, &scratch)
        }
        TargetKind::Nchan => {
            let conf = args
                .nchan_conf
                .clone()
                .unwrap_or_else(|| root.join("ops/nchan/nginx.conf"));
            servers::start_nchan(&args.nginx_bin, &conf, &args.nchan_module, &scratch).await
        }
    };
    match started {
        Ok(server) => Ok((server, scratch)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&scratch);
            Err(e)
        }
    }
}

/// Hold every user's poll on `kind` once, then stop ([`BenchArgs::warm_up`]).
async fn warm_up(kind: TargetKind, args: &BenchArgs) -> anyhow::Result<()> {
    let name = kind.name();
    eprintln!(
        "pns-load: warming up: {} held polls on {name}, not measured",
        args.users
    );
    let (server, scratch) = start(kind, args).await?;
    let held = async {
        let (ingest, mut control, mut workers) = attach(kind, &server, args).await?;
        workers.tell(&Cmd::Hold).await?;
        let limit = Duration::from_secs(args.phase_limit_secs);
        until_all_held(&ingest, &mut control, args.users, limit, RAMP_LOOK_EVERY).await?;
        workers.quit().await;
        anyhow::Ok(())
    }
    .await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&scratch);
    held.with_context(|| format!("warming up {name}"))
}

/// One round of `kind`; a measurement that ended in an error comes back as
/// that round's failure, with what the server logged.
async fn measure(
    kind: TargetKind,
    round: u32,
    args: &BenchArgs,
) -> Result<TargetReport, report::FailedRound> {
    let name = kind.name();
    let failed = |e: anyhow::Error, server_log| report::FailedRound {
        target: name,
        round,
        error: format!("{:#}", e.context(format!("measuring {name}"))),
        server_log,
    };
    let (server, scratch) = match start(kind, args).await {
        Ok(started) => started,
        Err(e) => return Err(failed(e, Default::default())),
    };
    let result = measure_server(kind, round, &server, args).await;
    let log = server.stop().await;
    let _ = std::fs::remove_dir_all(&scratch);
    if log.lines > 0 {
        let dead = match log.workers_died {
            0 => String::new(),
            n => format!(", {n} dead worker(s)"),
        };
        eprintln!(
            "pns-load: {name}: {} line(s) in its log worth a look{dead}",
            log.lines
        );
    }
    match result {
        Ok(mut report) => {
            report.server_log = log;
            Ok(report)
        }
        Err(e) => Err(failed(e, log)),
    }
}

async fn measure_server(
    kind: TargetKind,
    round: u32,
    server: &Server,
    args: &BenchArgs,
) -> anyhow::Result<TargetReport> {
    let name = kind.name();
    let n = args.users;
    let (ingest, mut control, mut workers) = attach(kind, server, args).await?;
    let ingest = Arc::new(ingest);
    let octet = sender_octet(kind);
    let worker_count = workers.procs.len() as u32;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids = server.pids();
    let (rss_idle, pss_idle) = (
        crate::procstat::rss_kib(&pids),
        crate::procstat::pss_kib(&pids),
    );

    // The load tool's own processes: this one (the senders) and the workers.
    let tool_pids: Vec<u32> = std::iter::once(std::process::id())
        .chain(workers.pids())
        .collect();
    // Server and load tool CPU seconds so far, and since. The server's
    // processes are looked up at each reading: nginx replaces a worker
    // that dies (whose time goes to the master's, see `procstat`).
    let cpu = || {
        (
            crate::procstat::cpu_secs(&server.pids()),
            crate::procstat::cpu_secs(&tool_pids),
        )
    };
    let cpu_since = |(server, tool): (f64, f64)| {
        let now = cpu();
        (now.0 - server, now.1 - tool)
    };

    eprintln!("pns-load: {name}: ramping up {n} held polls with {worker_count} worker(s)");
    let (c, overflows) = (cpu(), crate::procstat::listen_overflows());
    workers.tell(&Cmd::Hold).await?;
    let limit = Duration::from_secs(args.phase_limit_secs);
    let (held, ramp) = until_all_held(&ingest, &mut control, n, limit, RAMP_LOOK_EVERY).await?;
    let (server_s, load_tool_s) = cpu_since(c);
    let ramp_dropped = overflows
        .zip(crate::procstat::listen_overflows())
        .map(|(before, after)| after.saturating_sub(before));
    let ramp_cpu = RampCpu {
        server_s,
        load_tool_s,
    };
    if ramp.is_none() {
        let c = workers.counts().await?;
        eprintln!(
            "pns-load: {name}: only {held} of {n} polls held after {limit:?} ({} connected, {} errors)",
            c.connected, c.errors
        );
    }

    // Let the last answers and allocations settle before reading the RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids = server.pids();
    let (rss_held, pss_held) = (
        crate::procstat::rss_kib(&pids),
        crate::procstat::pss_kib(&pids),
    );
    let idle_cpu = crate::procstat::cpu_percent(&pids, Duration::from_secs(args.idle_secs)).await;
    let dropped = match ramp_dropped {
        Some(0) | None => String::new(),
        Some(d) => format!("; {d} connections dropped from a full accept queue"),
    };
    eprintln!(
        "pns-load: {name}: {held} held; RSS {rss_idle} → {rss_held} KiB; idle CPU {idle_cpu:.2}%{dropped}"
    );

    let mut senders = open_senders(octet, server, args.senders).await?;
    let mut expected = 0u64;

    // 1. One message to every user, as fast as it goes.
    let sync_times = sync_times_now(&ingest, server, octet).await?;
    let (t, c) = (Instant::now(), cpu());
    let (conns, single) = send_singles(
        ingest.clone(),
        senders,
        (0..n)
            .map(|u| (u, SINGLE, phase_base(SINGLE) + u64::from(u)))
            .collect(),
        None,
    )
    .await;
    senders = conns;
    let single_secs = t.elapsed().as_secs_f64();
    expected += single.acked.len() as u64;
    workers
        .await_delivery(expected, limit, name, "single")
        .await?;
    let single_held_again = held_again(&ingest, server, octet, n, limit).await?;
    let single_cpu = cpu_since(c);
    let (single_syncs, sync_times) = syncs_since(sync_times, &ingest, server, octet).await?;

    // 2. A fixed rate, each message stamped with when it was due.
    let total = u64::from(args.rate) * u64::from(args.rate_secs);
    let to_user = user_of(n, BatchOrder::Scattered);
    let plan = (0..total)
        .map(|i| (to_user(i), RATE, phase_base(RATE) + i))
        .collect();
    let (t, c) = (Instant::now(), cpu());
    let (conns, rate) = send_singles(ingest.clone(), senders, plan, Some(args.rate)).await;
    senders = conns;
    let rate_secs = t.elapsed().as_secs_f64();
    expected += rate.acked.len() as u64;
    workers
        .await_delivery(expected, limit, name, "rate")
        .await?;
    let rate_held_again = held_again(&ingest, server, octet, n, limit).await?;
    let rate_cpu = cpu_since(c);
    let (rate_syncs, sync_times) = syncs_since(sync_times, &ingest, server, octet).await?;

    // 3. Batches.
    let batch_total = args.batch_total.div_ceil(args.batch.max(1)) * args.batch.max(1);
    let to_user = user_of(n, args.batch_order);
    let plan: Vec<(u32, u8, u64)> = (0..u64::from(batch_total))
        .map(|i| (to_user(i), BATCH, phase_base(BATCH) + i))
        .collect();
    let (t, c) = (Instant::now(), cpu());
    let (batch, batch_mode) = match kind {
        TargetKind::Pns => (send_batches(server, octet, args, plan).await?, "batches"),
        TargetKind::Nchan => {
            let (conns, sent) = send_singles(ingest.clone(), senders, plan, None).await;
            senders = conns;
            (sent, "single publishes (Nchan has no batch publish)")
        }
    };
    let batch_secs = t.elapsed().as_secs_f64();
    expected += batch.acked.len() as u64;
    workers
        .await_delivery(expected, limit, name, "batch")
        .await?;
    let batch_held_again = held_again(&ingest, server, octet, n, limit).await?;
    let batch_cpu = cpu_since(c);
    let (batch_syncs, _) = syncs_since(sync_times, &ingest, server, octet).await?;
    drop(senders);
    // The polls are held again by now; what answering them left behind,
    // once the allocators had time to hand back what the bursts used.
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let rss_end = crate::procstat::rss_kib(&server.pids());

    let reports = workers.reports().await?;
    workers.quit().await;

    let mut receipts = Vec::new();
    let mut latency: [Vec<u32>; 4] = Default::default();
    let (mut poll_errors, mut first_poll_error) = (0, None);
    for r in &reports {
        for receipt in &r.receipts {
            receipts.push(receipt.k);
            if let Some(slot) = latency.get_mut(phase_of(receipt.k)) {
                slot.push(receipt.us);
            }
        }
        poll_errors += r.errors;
        first_poll_error = first_poll_error.or(r.first_error.clone());
    }
    if let Some(path) = &args.deliveries {
        append_deliveries(path, name, round, &reports)?;
    }
    let seen = stats::count(&receipts);
    let in_phase = |p: u8| move |k: u64| phase_of(k) == usize::from(p);
    let mut all_acked = single.acked.clone();
    all_acked.extend(&rate.acked);
    all_acked.extend(&batch.acked);
    let mut phase = |sent: &Sent,
                     secs: f64,
                     held_again_s: Option<f64>,
                     cpu: (f64, f64),
                     p: u8,
                     mode: &'static str,
                     log_syncs: Option<LogSyncs>| {
        let per_msg = |secs: f64| secs * 1e6 / (sent.acked.len().max(1) as f64);
        Phase {
            messages: sent.acked.len() as u64,
            held_again_s,
            server_cpu_us_per_msg: per_msg(cpu.0),
            load_tool_cpu_us_per_msg: per_msg(cpu.1),
            seconds: secs,
            per_s: sent.acked.len() as f64 / secs.max(1e-9),
            mode,
            errors: sent.errors,
            delivery: stats::tally(&sent.acked, &seen, in_phase(p)),
            latency: stats::latency(std::mem::take(&mut latency[usize::from(p)])),
            ack_latency: stats::latency(sent.ack_us.clone()),
            log_syncs,
        }
    };
    let single_phase = phase(
        &single,
        single_secs,
        single_held_again,
        single_cpu,
        SINGLE,
        "single notifies",
        single_syncs,
    );
    let rate_phase = phase(
        &rate,
        rate_secs,
        rate_held_again,
        rate_cpu,
        RATE,
        "single notifies at a fixed rate",
        rate_syncs,
    );
    let batch_phase = phase(
        &batch,
        batch_secs,
        batch_held_again,
        batch_cpu,
        BATCH,
        batch_mode,
        batch_syncs,
    );
    let first_send_error = single
        .first_error
        .clone()
        .or(rate.first_error.clone())
        .or(batch.first_error.clone());
    let per_poll =
        |idle: u64, held_kib: u64| (held_kib.saturating_sub(idle)) as f64 / f64::from(n.max(1));
    Ok(TargetReport {
        target: name,
        round,
        users: n,
        workers: worker_count,
        held,
        ramp_s: ramp,
        ramp_cpu,
        ramp_dropped,
        rss_idle_kib: rss_idle,
        rss_held_kib: rss_held,
        rss_per_poll_kib: per_poll(rss_idle, rss_held),
        pss_idle_kib: pss_idle,
        pss_held_kib: pss_held,
        pss_per_poll_kib: per_poll(pss_idle, pss_held),
        rss_end_kib: rss_end,
        rss_end_per_poll_kib: per_poll(rss_idle, rss_end),
        idle_cpu_pct: idle_cpu,
        single: single_phase,
        rate: RatePhase {
            target_per_s: args.rate,
            sent_late_max_ms: f64::from(rate.late_max_us) / 1000.0,
            phase: rate_phase,
        },
        batch: batch_phase,
        delivery: stats::tally(&all_acked, &seen, |_| true),
        poll_errors,
        first_poll_error,
        send_errors: single.errors + rate.errors + batch.errors,
        first_send_error,
        // Filled in once the server has stopped.
        server_log: servers::ServerLog::default(),
    })
}

/// `d` in whole µs, saturating.
fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// The phase a message number belongs to.
fn phase_of(k: u64) -> usize {
    usize::try_from(k / PHASE_SPAN).unwrap_or(usize::MAX)
}

/// Start the file of `--deliveries` with its header.
fn start_deliveries(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(
        path,
        "target\tround\tphase\tstart_ns\tlatency_us\tmessage\n",
    )
    .with_context(|| format!("cannot write {}", path.display()))
}

/// Add the messages `reports` received to the file of `--deliveries`.
fn append_deliveries(
    path: &Path,
    target: &str,
    round: u32,
    reports: &[WorkerReport],
) -> anyhow::Result<()> {
    let mut out = String::new();
    for receipt in reports.iter().flat_map(|r| &r.receipts) {
        let phase = match u8::try_from(phase_of(receipt.k)) {
            Ok(SINGLE) => "single",
            Ok(RATE) => "rate",
            Ok(BATCH) => "batch",
            _ => "other",
        };
        let Receipt { k, t, us } = receipt;
        out.push_str(&format!("{target}\t{round}\t{phase}\t{t}\t{us}\t{k}\n"));
    }
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("cannot append to {}", path.display()))?;
    std::io::Write::write_all(&mut file, out.as_bytes())
        .with_context(|| format!("cannot append to {}", path.display()))
}

fn phase_base(p: u8) -> u64 {
    u64::from(p) * PHASE_SPAN
}

async fn open_senders(octet: u8, server: &Server, count: usize) -> anyhow::Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(count);
    for i in 0..count {
        conns.push(Conn::open(source_addr(octet, i as u32), server.ingest).await?);
    }
    Ok(conns)
}

/// The times of the server's syncs of its log so far, on a connection of
/// its own (the ramp's may have been idle too long): PNS's; `None` for
/// Nchan.
async fn sync_times_now(
    ingest: &Ingest,
    server: &Server,
    octet: u8,
) -> anyhow::Result<Option<SyncTimes>> {
    let Ingest::Pns(api) = ingest else {
        return Ok(None);
    };
    let mut conn = Conn::open(source_addr(octet, 997), server.ingest).await?;
    Ok(Some(api.sync_times(&mut conn).await?))
}

/// The syncs of the server's log since `before` (a phase's), and the
/// times so far, for the next phase.
async fn syncs_since(
    before: Option<SyncTimes>,
    ingest: &Ingest,
    server: &Server,
    octet: u8,
) -> anyhow::Result<(Option<LogSyncs>, Option<SyncTimes>)> {
    let now = sync_times_now(ingest, server, octet).await?;
    let since = before.zip(now.as_ref()).map(|(b, n)| n.since(&b));
    Ok((since, now))
}

/// After a phase's messages arrived, wait until the server holds all `n`
/// polls again (each poller polls again at once after an answer, and the
/// server takes a while to park thousands of them): the next phase then
/// starts from the state the first did, rather than measuring what is left
/// of this one. Returns how long that took, or `None` if it did not
/// happen within `limit` (noted, and the run goes on).
async fn held_again(
    ingest: &Ingest,
    server: &Server,
    octet: u8,
    n: u32,
    limit: Duration,
) -> anyhow::Result<Option<f64>> {
    // A connection of its own: the ramp's has been idle for longer than
    // PNS keeps an idle connection open.
    let mut control = Conn::open(source_addr(octet, 998), server.ingest).await?;
    let (held, took) =
        until_all_held(ingest, &mut control, n, limit, Duration::from_millis(5)).await?;
    if took.is_none() {
        eprintln!("pns-load: only {held} of {n} polls held again after {limit:?}");
    }
    Ok(took)
}

/// How often the ramp asks the server how many polls it holds: the ramp's
/// time is known to this much at best. A count takes either server under
/// 0.1 ms, under 2 % of the ramp's server CPU at this pace; at 50 ms the
/// rounds of one server spread over whole steps of it.
const RAMP_LOOK_EVERY: Duration = Duration::from_millis(10);

/// The source octet of the tool's own connections to `kind`'s ingest side.
fn sender_octet(kind: TargetKind) -> u8 {
    kind.source_octet() + 5
}

/// What talks to `server`: how notifies go in, a connection that asks how
/// many polls it holds, and the workers that will hold them, ready.
async fn attach(
    kind: TargetKind,
    server: &Server,
    args: &BenchArgs,
) -> anyhow::Result<(Ingest, Conn, Workers)> {
    let ingest = match kind {
        TargetKind::Pns => Ingest::Pns(pns::Internal::new(&server.token)),
        TargetKind::Nchan => Ingest::Nchan,
    };
    let control = Conn::open(source_addr(sender_octet(kind), 999), server.ingest).await?;
    let worker_count = args
        .workers
        .unwrap_or_else(|| args.users.div_ceil(POLLS_PER_WORKER))
        .max(1);
    let workers = Workers::spawn(kind, server, args.users, worker_count).await?;
    Ok((ingest, control, workers))
}

/// Ask the server every `every` how many polls it holds, until all `n` or
/// `limit`: the last count, and the seconds until all were held.
async fn until_all_held(
    ingest: &Ingest,
    control: &mut Conn,
    n: u32,
    limit: Duration,
    every: Duration,
) -> anyhow::Result<(u64, Option<f64>)> {
    let t0 = Instant::now();
    let mut held = 0;
    while t0.elapsed() < limit {
        held = ingest.held(control).await?;
        if held >= u64::from(n) {
            return Ok((held, Some(t0.elapsed().as_secs_f64())));
        }
        tokio::time::sleep(every).await;
    }
    Ok((held, None))
}

/// Send `plan` (user, phase, message number) as single notifies over the
/// sender connections, lane `j` taking every `conns.len()`-th message; with
/// `rate`, message `i` is due at `i / rate` seconds and stamped with that time.
async fn send_singles(
    ingest: Arc<Ingest>,
    conns: Vec<Conn>,
    plan: Vec<(u32, u8, u64)>,
    rate: Option<u32>,
) -> (Vec<Conn>, Sent) {
    let lanes = conns.len().max(1);
    let plan = Arc::new(plan);
    let start = tokio::time::Instant::now();
    let start_ns = crate::mono_ns();
    let mut tasks = JoinSet::new();
    for (lane, mut conn) in conns.into_iter().enumerate() {
        let (ingest, plan) = (ingest.clone(), plan.clone());
        tasks.spawn(async move {
            let mut sent = Sent::default();
            for i in (lane..plan.len()).step_by(lanes) {
                let (u, p, k) = plan[i];
                let t = match rate {
                    Some(r) => {
                        let offset = Duration::from_nanos(i as u64 * 1_000_000_000 / u64::from(r));
                        let due = start + offset;
                        let held_back = tokio::time::Instant::now() >= due;
                        tokio::time::sleep_until(due).await;
                        let late = micros(due.elapsed());
                        sent.late_max_us = sent.late_max_us.max(late);
                        stamp(held_back, start_ns + offset.as_nanos() as u64)
                    }
                    None => crate::mono_ns(),
                };
                let at = Instant::now();
                let r = ingest.one(&mut conn, u, Payload { k, p, t }).await;
                sent.note(r, [k], at);
            }
            (conn, sent)
        });
    }
    let mut conns = Vec::with_capacity(lanes);
    let mut sent = Sent::default();
    while let Some(done) = tasks.join_next().await {
        if let Ok((conn, s)) = done {
            conns.push(conn);
            sent.merge(s);
        }
    }
    (conns, sent)
}

/// What a notify of the rate phase is stamped with, its delivery's start:
/// when it was due, if the lane was still waiting for the last notify's
/// acknowledgement then (the server held it back, and the delay is the
/// server's); else when it leaves. The wait for the due time ends on the
/// timer's next millisecond tick, and with every notify due at whole
/// milliseconds from the phase's start, all of a phase's waits overran by
/// about the same fraction of a millisecond, which differed from phase to
/// phase: counted from the due time, that put up to a millisecond of the
/// tool's own into every delivery, and a different one into each round.
fn stamp(held_back: bool, due_ns: u64) -> u64 {
    if held_back {
        due_ns
    } else {
        crate::mono_ns()
    }
}

/// Send `plan` in batches of `args.batch`, `args.batch_concurrency` at once
/// (PNS only).
async fn send_batches(
    server: &Server,
    octet: u8,
    args: &BenchArgs,
    plan: Vec<(u32, u8, u64)>,
) -> anyhow::Result<Sent> {
    let api = Arc::new(pns::Internal::new(&server.token));
    let batches: Arc<Vec<Vec<(u32, u8, u64)>>> = Arc::new(
        plan.chunks(args.batch.max(1) as usize)
            .map(<[_]>::to_vec)
            .collect(),
    );
    let lanes = args.batch_concurrency.max(1);
    let mut tasks = JoinSet::new();
    for lane in 0..lanes {
        let mut conn = Conn::open(source_addr(octet, 500 + lane as u32), server.ingest).await?;
        let (api, batches) = (api.clone(), batches.clone());
        tasks.spawn(async move {
            let mut sent = Sent::default();
            for b in batches.iter().skip(lane).step_by(lanes) {
                let t = crate::mono_ns();
                let items: Vec<(String, Payload)> = b
                    .iter()
                    .map(|&(u, p, k)| (pns::user(u), Payload { k, p, t }))
                    .collect();
                let at = Instant::now();
                let r = api.notify_batch(&mut conn, &items).await;
                sent.note(r, b.iter().map(|m| m.2), at);
            }
            sent
        });
    }
    let mut sent = Sent::default();
    while let Some(done) = tasks.join_next().await {
        if let Ok(s) = done {
            sent.merge(s);
        }
    }
    Ok(sent)
}

/// The worker processes of one target.
struct Workers {
    procs: Vec<WorkerProc>,
}

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Workers {
    async fn spawn(
        kind: TargetKind,
        server: &Server,
        users: u32,
        count: u32,
    ) -> anyhow::Result<Workers> {
        let exe = std::env::current_exe()?;
        let mut procs = Vec::new();
        for i in 0..count {
            let mut child = tokio::process::Command::new(&exe)
                .arg("worker")
                .arg("--target")
                .arg(kind.name())
                .arg("--server")
                .arg(server.public.to_string())
                .arg("--users")
                .arg(users.to_string())
                .arg("--shard")
                .arg(format!("{i}/{count}"))
                .env(crate::worker::SECRET_ENV, &server.secret)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start a worker")?;
            let stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            procs.push(WorkerProc {
                child,
                stdin,
                lines: BufReader::new(stdout).lines(),
            });
        }
        let mut workers = Workers { procs };
        for p in &mut workers.procs {
            match p.next().await? {
                Event::Ready { open_files, users } if u64::from(users) + 64 > open_files => {
                    bail!("a worker may open {open_files} files, too few for {users} polls: add --workers")
                }
                Event::Ready { .. } => {}
                other => bail!("worker said {other:?} before it was ready"),
            }
        }
        Ok(workers)
    }

    async fn tell(&mut self, cmd: &Cmd) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(cmd)?;
        line.push(b'\n');
        for p in &mut self.procs {
            p.stdin.write_all(&line).await.context("worker is gone")?;
            p.stdin.flush().await?;
        }
        Ok(())
    }

    /// The workers' process ids (those still running).
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(|p| p.child.id()).collect()
    }

    async fn counts(&mut self) -> anyhow::Result<Counts> {
        self.tell(&Cmd::Count).await?;
        let mut sum = Counts::default();
        for p in &mut self.procs {
            match p.next().await? {
                Event::Count(c) => {
                    sum.distinct += c.distinct;
                    sum.connected += c.connected;
                    sum.errors += c.errors;
                }
                other => bail!("worker answered {other:?} to count"),
            }
        }
        Ok(sum)
    }

    /// Wait until `expected` distinct messages arrived, or `limit` passed.
    async fn await_delivery(
        &mut self,
        expected: u64,
        limit: Duration,
        target: &str,
        phase: &str,
    ) -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            let c = self.counts().await?;
            if c.distinct >= expected {
                return Ok(());
            }
            if t.elapsed() > limit {
                eprintln!(
                    "pns-load: {target}: {phase}: {} of {expected} messages arrived within {limit:?}",
                    c.distinct
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn reports(&mut self) -> anyhow::Result<Vec<WorkerReport>> {
        self.tell(&Cmd::Report).await?;
        let mut out = Vec::new();
        for p in &mut self.procs {
            match p.next().await? {
                Event::Report(r) => out.push(*r),
                other => bail!("worker answered {other:?} to report"),
            }
        }
        Ok(out)
    }

    async fn quit(mut self) {
        let _ = self.tell(&Cmd::Quit).await;
        for p in &mut self.procs {
            let waited = tokio::time::timeout(Duration::from_secs(10), p.child.wait()).await;
            if waited.is_err() {
                let _ = p.child.kill().await;
            }
        }
    }
}

impl WorkerProc {
    async fn next(&mut self) -> anyhow::Result<Event> {
        let line = tokio::time::timeout(Duration::from_secs(120), self.lines.next_line())
            .await
            .context("worker did not answer in time")??
            .context("worker exited")?;
        serde_json::from_str(&line).context("bad line from a worker")
    }
}

/// The user of a phase's message `i`, of `n`: scattered (`i` times a
/// step that shares no factor with `n`, so that any n messages in a row
/// still reach n users), or in the order the users connected. The rate
/// phase always scatters; the batch phase as `--batch-order` says.
fn user_of(n: u32, order: BatchOrder) -> impl Fn(u64) -> u32 {
    let n = u64::from(n.max(1));
    let step = match order {
        BatchOrder::Scattered => (7_919..).find(|&m| gcd(m, n) == 1).unwrap_or(1),
        BatchOrder::Connected => 1,
    };
    move |i| (i.wrapping_mul(step) % n) as u32
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In order or scattered, the first n messages go to n different users;
    /// scattered, consecutive messages go to users far apart.
    #[test]
    fn the_batch_phase_reaches_every_user_in_either_order() {
        for n in [1, 2, 7_919, 15_838, 19_000] {
            for order in [BatchOrder::Scattered, BatchOrder::Connected] {
                let to_user = user_of(n, order);
                let mut seen = vec![false; n as usize];
                for i in 0..u64::from(n) {
                    seen[to_user(i) as usize] = true;
                }
                assert!(seen.iter().all(|&s| s), "n {n}, {order:?}");
            }
        }
        let (in_order, scattered) = (
            user_of(19_000, BatchOrder::Connected),
            user_of(19_000, BatchOrder::Scattered),
        );
        assert_eq!((in_order(1), in_order(2)), (1, 2));
        assert_eq!((scattered(1), scattered(2)), (7_919, 15_838));
    }

    /// A notify the server held back counts from when it was due; one that
    /// left on time, from when it left.
    #[test]
    fn a_notify_is_stamped_with_its_due_time_only_when_held_back() {
        let due = crate::mono_ns() - 5_000_000;
        assert_eq!(stamp(true, due), due);
        let before = crate::mono_ns();
        let t = stamp(false, due);
        assert!(t >= before && t <= crate::mono_ns(), "{t} not when it left");
    }

    /// The deliveries file has a line for every receipt, repeats included,
    /// after its header, round after round.
    #[test]
    fn every_receipt_is_a_line_of_the_deliveries_file() {
        let path = std::env::temp_dir().join(format!("pns-load-deliveries-{}", std::process::id()));
        let receipt = |k, us| Receipt { k, t: 7, us };
        let one = WorkerReport {
            receipts: vec![
                receipt(phase_base(SINGLE) + 3, 10),
                receipt(phase_base(RATE), 20),
            ],
            ..WorkerReport::default()
        };
        let other = WorkerReport {
            receipts: vec![
                receipt(phase_base(BATCH) + 1, 30),
                receipt(phase_base(BATCH) + 1, 31),
            ],
            ..WorkerReport::default()
        };
        start_deliveries(&path).unwrap();
        append_deliveries(&path, "pns", 1, &[one, other]).unwrap();
        append_deliveries(&path, "nchan", 2, &[]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "target\tround\tphase\tstart_ns\tlatency_us\tmessage",
                "pns\t1\tsingle\t7\t10\t100000003",
                "pns\t1\trate\t7\t20\t200000000",
                "pns\t1\tbatch\t7\t30\t300000001",
                "pns\t1\tbatch\t7\t31\t300000001",
            ]
        );
    }

    /// Each acknowledged request adds its acknowledgement time, a refused
    /// one none; lanes merged keep the latest send of all.
    #[test]
    fn sent_keeps_acknowledgement_times_and_the_latest_send() {
        let long_ago = Instant::now() - Duration::from_millis(30);
        let mut lane = Sent {
            late_max_us: 5_000,
            ..Sent::default()
        };
        lane.note(Ok(()), [1, 2], long_ago);
        lane.note(Err(anyhow::anyhow!("refused")), [3], long_ago);
        let mut all = Sent {
            late_max_us: 7_000,
            ..Sent::default()
        };
        all.merge(lane);
        assert_eq!(all.acked, [1, 2]);
        assert_eq!(all.ack_us.len(), 1);
        assert!(all.ack_us[0] >= 30_000, "{:?}", all.ack_us);
        assert_eq!(all.late_max_us, 7_000);
        assert_eq!(all.errors, 1);
    }
}
