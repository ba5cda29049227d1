//! The outcome of a run: one summary line on stdout, and a JSON file with
//! every figure, the machine it was measured on, and each figure of PNS set
//! against Nchan's.

use crate::bench::BenchArgs;
use crate::stats::{Delivery, Latency};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct Phase {
    /// Messages acknowledged by the server.
    pub messages: u64,
    pub seconds: f64,
    /// Acknowledged messages a second.
    pub per_s: f64,
    pub mode: &'static str,
    /// Notifies that failed.
    pub errors: u64,
    /// Server CPU time spent in the phase (until its messages arrived),
    /// per message, in µs.
    pub server_cpu_us_per_msg: f64,
    pub delivery: Delivery,
    /// Notify due → message in the poller's hands.
    pub latency: Latency,
    /// Request sent → its acknowledgement (a batch's, in batches).
    pub ack_latency: Latency,
}

#[derive(Debug, Serialize)]
pub struct RatePhase {
    pub target_per_s: u32,
    /// The longest a notify left after it was due. Each sender connection
    /// sends its next notify only once the last is acknowledged, so an
    /// acknowledgement slower than the connections' round (64 connections
    /// at 1,000/s: 64 ms) delays the next one; its delivery latency counts
    /// from when it was due, and so includes the delay.
    pub sent_late_max_ms: f64,
    #[serde(flatten)]
    pub phase: Phase,
}

#[derive(Debug, Serialize)]
pub struct TargetReport {
    pub target: &'static str,
    pub users: u32,
    pub workers: u32,
    /// Polls the server said it held at the end of the ramp.
    pub held: u64,
    /// Seconds until every poll was held; `None` if they never all were.
    pub ramp_s: Option<f64>,
    pub rss_idle_kib: u64,
    pub rss_held_kib: u64,
    pub rss_per_poll_kib: f64,
    pub pss_idle_kib: u64,
    pub pss_held_kib: u64,
    pub pss_per_poll_kib: f64,
    /// RSS after the phases, the polls held again: what answering left.
    pub rss_end_kib: u64,
    pub rss_end_per_poll_kib: f64,
    /// Server CPU while the polls wait, percent of one core.
    pub idle_cpu_pct: f64,
    pub single: Phase,
    pub rate: RatePhase,
    pub batch: Phase,
    /// All phases together.
    pub delivery: Delivery,
    pub poll_errors: u64,
    pub first_poll_error: Option<String>,
    pub send_errors: u64,
    pub first_send_error: Option<String>,
}

impl TargetReport {
    /// Every poll held, every notify acknowledged, every message arrived once.
    pub fn passed(&self) -> bool {
        self.ramp_s.is_some() && self.send_errors == 0 && self.delivery.ok()
    }
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: Option<String>,
    pub mem_total_kib: Option<u64>,
    pub kernel: Option<String>,
    pub open_files_hard: u64,
    pub pns_version: Option<String>,
    pub nginx_version: Option<String>,
    pub nchan_version: Option<String>,
}

/// One figure of PNS against Nchan's.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub figure: &'static str,
    pub pns: f64,
    pub nchan: f64,
    /// pns / nchan.
    pub ratio: f64,
    pub lower_is_better: bool,
    /// PNS at least as good as Nchan.
    pub pns_as_good: bool,
}

#[derive(Debug, Serialize)]
pub struct Settings {
    pub users: u32,
    pub senders: usize,
    pub rate: u32,
    pub rate_secs: u32,
    pub batch: u32,
    pub batch_total: u32,
    pub batch_concurrency: usize,
    pub idle_secs: u64,
}

#[derive(Debug, Serialize)]
pub struct Run {
    pub unix_time: u64,
    pub machine: Machine,
    pub settings: Settings,
    pub targets: Vec<TargetReport>,
    pub comparison: Vec<Comparison>,
    pub notes: Vec<String>,
}

impl Run {
    pub fn new(args: &BenchArgs, targets: Vec<TargetReport>, notes: Vec<String>) -> Run {
        let comparison = compare(&targets);
        Run {
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            machine: machine(args),
            settings: Settings {
                users: args.users,
                senders: args.senders,
                rate: args.rate,
                rate_secs: args.rate_secs,
                batch: args.batch,
                batch_total: args.batch_total,
                batch_concurrency: args.batch_concurrency,
                idle_secs: args.idle_secs,
            },
            targets,
            comparison,
            notes,
        }
    }
}

fn compare(targets: &[TargetReport]) -> Vec<Comparison> {
    let (Some(p), Some(n)) = (
        targets.iter().find(|t| t.target == "pns"),
        targets.iter().find(|t| t.target == "nchan"),
    ) else {
        return Vec::new();
    };
    let lost = |t: &TargetReport| t.delivery.lost as f64;
    let rows: Vec<(&'static str, f64, f64, bool)> = vec![
        (
            "ramp_s",
            p.ramp_s.unwrap_or(f64::INFINITY),
            n.ramp_s.unwrap_or(f64::INFINITY),
            true,
        ),
        (
            "rss_per_poll_kib",
            p.rss_per_poll_kib,
            n.rss_per_poll_kib,
            true,
        ),
        (
            "pss_per_poll_kib",
            p.pss_per_poll_kib,
            n.pss_per_poll_kib,
            true,
        ),
        (
            "rss_end_per_poll_kib",
            p.rss_end_per_poll_kib,
            n.rss_end_per_poll_kib,
            true,
        ),
        ("idle_cpu_pct", p.idle_cpu_pct, n.idle_cpu_pct, true),
        ("single_per_s", p.single.per_s, n.single.per_s, false),
        ("batch_per_s", p.batch.per_s, n.batch.per_s, false),
        (
            "single_cpu_us_per_msg",
            p.single.server_cpu_us_per_msg,
            n.single.server_cpu_us_per_msg,
            true,
        ),
        (
            "batch_cpu_us_per_msg",
            p.batch.server_cpu_us_per_msg,
            n.batch.server_cpu_us_per_msg,
            true,
        ),
        (
            "rate_p50_ms",
            p.rate.phase.latency.p50_ms,
            n.rate.phase.latency.p50_ms,
            true,
        ),
        (
            "rate_p99_ms",
            p.rate.phase.latency.p99_ms,
            n.rate.phase.latency.p99_ms,
            true,
        ),
        (
            "rate_max_ms",
            p.rate.phase.latency.max_ms,
            n.rate.phase.latency.max_ms,
            true,
        ),
        ("lost", lost(p), lost(n), true),
    ];
    rows.into_iter()
        .map(|(figure, pns, nchan, lower_is_better)| Comparison {
            figure,
            pns,
            nchan,
            ratio: if nchan == 0.0 { f64::NAN } else { pns / nchan },
            lower_is_better,
            pns_as_good: if lower_is_better {
                pns <= nchan
            } else {
                pns >= nchan
            },
        })
        .collect()
}

fn machine(args: &BenchArgs) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let pns_bin = args
        .pns_bin
        .clone()
        .unwrap_or_else(|| crate::repo_root().join("target/release/pns"));
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu: read("/proc/cpuinfo").and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        }),
        mem_total_kib: read("/proc/meminfo").and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        }),
        kernel: read("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()),
        open_files_hard: lim.rlim_max,
        pns_version: std::process::Command::new(&pns_bin)
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()),
        nginx_version: crate::servers::nginx_version(&args.nginx_bin),
        nchan_version: crate::servers::nchan_version(),
    }
}

pub fn write_json(path: &Path, run: &Run) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(run)?)?;
    Ok(())
}

/// Every target's headline figures on one line.
pub fn summary_line(run: &Run) -> String {
    let parts: Vec<String> = run
        .targets
        .iter()
        .map(|t| {
            let l = &t.rate.phase.latency;
            format!(
                "{}: {} {} held, ramp {}, {:.2} KiB/poll, idle CPU {:.2}%, single {:.0}/s, batch {:.0}/s, \
                 p50/p99/max {:.1}/{:.1}/{:.1} ms at {}/s, lost {}, twice {}",
                t.target,
                if t.passed() { "OK" } else { "FAIL" },
                t.held,
                t.ramp_s.map_or("incomplete".into(), |s| format!("{s:.2} s")),
                t.rss_per_poll_kib,
                t.idle_cpu_pct,
                t.single.per_s,
                t.batch.per_s,
                l.p50_ms,
                l.p99_ms,
                l.max_ms,
                t.rate.target_per_s,
                t.delivery.lost,
                t.delivery.duplicated,
            )
        })
        .collect();
    format!("pns-load: {}", parts.join(" | "))
}
