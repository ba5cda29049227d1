//! The outcome of a run: one summary line on stdout, and a JSON file with
//! every figure, the machine it was measured on, and each figure of PNS set
//! against Nchan's.

use crate::bench::BenchArgs;
use crate::stats::{Delivery, Latency};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Default, Serialize)]
pub struct Phase {
    /// Messages acknowledged by the server.
    pub messages: u64,
    pub seconds: f64,
    /// Acknowledged messages a second.
    pub per_s: f64,
    pub mode: &'static str,
    /// Notifies that failed.
    pub errors: u64,
    /// From the last message's arrival until the server held every poll
    /// again (the pollers poll again at once after each answer); `None` if
    /// it did not within the phase limit.
    pub held_again_s: Option<f64>,
    /// Server CPU time spent in the phase (until its messages arrived and
    /// every poll was held again), per message, in µs.
    pub server_cpu_us_per_msg: f64,
    /// The load tool's CPU time in the same span, per message, in µs: the
    /// tool shares the machine's cores with the server, so what it spends
    /// bounds the server's throughput too.
    pub load_tool_cpu_us_per_msg: f64,
    pub delivery: Delivery,
    /// Notify sent (or due, when the server held it back) → message in
    /// the poller's hands.
    pub latency: Latency,
    /// Request sent → its acknowledgement (a batch's, in batches).
    pub ack_latency: Latency,
    /// The server's syncs of its log from the phase's start until every
    /// poll was held again, which its acknowledgements waited for: PNS on
    /// SQLite; `None` for Nchan, which syncs nothing.
    pub log_syncs: Option<crate::pns::LogSyncs>,
}

#[derive(Debug, Default, Serialize)]
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

/// CPU time spent from the start of the ramp until every poll was held.
#[derive(Debug, Default, Serialize)]
pub struct RampCpu {
    pub server_s: f64,
    pub load_tool_s: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct TargetReport {
    pub target: &'static str,
    /// Which of the run's rounds (from 1) this measurement was.
    pub round: u32,
    pub users: u32,
    pub workers: u32,
    /// Polls the server said it held at the end of the ramp.
    pub held: u64,
    /// Seconds until every poll was held; `None` if they never all were.
    pub ramp_s: Option<f64>,
    pub ramp_cpu: RampCpu,
    /// Connections the kernel dropped from a full accept queue during the
    /// ramp, each of which tried again a second later (every listener's on
    /// the machine; `None` where the counter cannot be read).
    pub ramp_dropped: Option<u64>,
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
    /// What the server logged in the round that an operator would look at.
    pub server_log: crate::servers::ServerLog,
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

/// One figure of PNS against Nchan's: the medians over the rounds.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub figure: &'static str,
    pub pns: f64,
    pub nchan: f64,
    /// pns / nchan.
    pub ratio: f64,
    pub lower_is_better: bool,
    /// PNS's median at least as good as Nchan's.
    pub pns_as_good: bool,
    /// Rounds in which both were measured.
    pub rounds: u32,
    /// Rounds in which PNS's figure was at least as good as Nchan's.
    pub rounds_pns_as_good: u32,
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
    pub batch_order: crate::bench::BatchOrder,
    pub idle_secs: u64,
    pub rounds: u32,
}

#[derive(Debug, Serialize)]
pub struct Run {
    pub unix_time: u64,
    pub machine: Machine,
    pub settings: Settings,
    /// Every measurement, in the order taken (round by round).
    pub targets: Vec<TargetReport>,
    pub comparison: Vec<Comparison>,
    /// Measurements that ended in an error: the run goes on without them,
    /// so that a reference server's crash in one round (nginx's workers
    /// dying by the hundred, run 128 of docs/BENCHMARKS.md) costs that
    /// round, not the run.
    pub failed: Vec<FailedRound>,
    pub notes: Vec<String>,
}

/// A round of a target whose measurement ended in an error.
#[derive(Debug, Serialize)]
pub struct FailedRound {
    pub target: &'static str,
    pub round: u32,
    pub error: String,
    pub server_log: crate::servers::ServerLog,
}

impl Run {
    pub fn new(
        args: &BenchArgs,
        targets: Vec<TargetReport>,
        failed: Vec<FailedRound>,
        notes: Vec<String>,
    ) -> Run {
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
                batch_order: args.batch_order,
                idle_secs: args.idle_secs,
                rounds: args.rounds,
            },
            targets,
            comparison,
            failed,
            notes,
        }
    }

    /// Whether every round of the targets `judged` passes was measured and
    /// passed.
    pub fn passed(&self, judged: impl Fn(&str) -> bool) -> bool {
        self.targets
            .iter()
            .filter(|t| judged(t.target))
            .all(TargetReport::passed)
            && !self.failed.iter().any(|f| judged(f.target))
    }
}

/// A figure: its name, how to read it off a measurement, and whether lower
/// is better.
type Figure = (&'static str, fn(&TargetReport) -> f64, bool);

/// The figures compared, in the order reported. The batch phase's
/// latency is reported but not compared: PNS has four batches of 500 in
/// flight, Nchan (which has no batch publish) 64 single publishes, and a
/// message's latency is mostly its wait behind those in flight.
const FIGURES: &[Figure] = &[
    ("ramp_s", |t| t.ramp_s.unwrap_or(f64::INFINITY), true),
    ("rss_per_poll_kib", |t| t.rss_per_poll_kib, true),
    ("pss_per_poll_kib", |t| t.pss_per_poll_kib, true),
    ("rss_end_per_poll_kib", |t| t.rss_end_per_poll_kib, true),
    ("idle_cpu_pct", |t| t.idle_cpu_pct, true),
    ("single_per_s", |t| t.single.per_s, false),
    ("batch_per_s", |t| t.batch.per_s, false),
    (
        "single_cpu_us_per_msg",
        |t| t.single.server_cpu_us_per_msg,
        true,
    ),
    (
        "batch_cpu_us_per_msg",
        |t| t.batch.server_cpu_us_per_msg,
        true,
    ),
    (
        "rate_cpu_us_per_msg",
        |t| t.rate.phase.server_cpu_us_per_msg,
        true,
    ),
    ("rate_p50_ms", |t| t.rate.phase.latency.p50_ms, true),
    ("rate_p99_ms", |t| t.rate.phase.latency.p99_ms, true),
    ("rate_max_ms", |t| t.rate.phase.latency.max_ms, true),
    ("single_p50_ms", |t| t.single.latency.p50_ms, true),
    ("single_p99_ms", |t| t.single.latency.p99_ms, true),
    ("lost", |t| t.delivery.lost as f64, true),
];

/// Each figure of PNS against Nchan's: medians over the rounds in which
/// both were measured, and the rounds that went PNS's way.
fn compare(targets: &[TargetReport]) -> Vec<Comparison> {
    let pairs: Vec<(&TargetReport, &TargetReport)> = targets
        .iter()
        .filter(|p| p.target == "pns")
        .filter_map(|p| {
            targets
                .iter()
                .find(|n| n.target == "nchan" && n.round == p.round)
                .map(|n| (p, n))
        })
        .collect();
    if pairs.is_empty() {
        return Vec::new();
    }
    let as_good = |pns: f64, nchan: f64, lower_is_better: bool| {
        if lower_is_better {
            pns <= nchan
        } else {
            pns >= nchan
        }
    };
    FIGURES
        .iter()
        .map(|&(figure, read, lower_is_better)| {
            let pns = median(pairs.iter().map(|(p, _)| read(p)).collect());
            let nchan = median(pairs.iter().map(|(_, n)| read(n)).collect());
            Comparison {
                figure,
                pns,
                nchan,
                ratio: if nchan == 0.0 { f64::NAN } else { pns / nchan },
                lower_is_better,
                pns_as_good: as_good(pns, nchan, lower_is_better),
                rounds: pairs.len() as u32,
                rounds_pns_as_good: pairs
                    .iter()
                    .filter(|(p, n)| as_good(read(p), read(n), lower_is_better))
                    .count() as u32,
            }
        })
        .collect()
}

/// The middle value (the mean of the two middle ones for an even count);
/// NaN for none.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
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

/// Every target's headline figures on one line: with several rounds, each
/// figure is the median over them, and the target is OK only if every
/// round was.
pub fn summary_line(run: &Run) -> String {
    let mut kinds: Vec<&'static str> = Vec::new();
    let measured = run.targets.iter().map(|t| t.target);
    for target in measured.chain(run.failed.iter().map(|f| f.target)) {
        if !kinds.contains(&target) {
            kinds.push(target);
        }
    }
    let parts: Vec<String> = kinds
        .into_iter()
        .map(|target| {
            let runs: Vec<&TargetReport> =
                run.targets.iter().filter(|t| t.target == target).collect();
            let failed: Vec<&FailedRound> =
                run.failed.iter().filter(|f| f.target == target).collect();
            let failures = match failed.first() {
                None => String::new(),
                Some(first) => format!(
                    ", {} round(s) failed (round {}: {})",
                    failed.len(),
                    first.round,
                    first.error
                ),
            };
            if runs.is_empty() {
                return format!("{target}: FAIL{failures}");
            }
            let mid = |read: fn(&TargetReport) -> f64| median(runs.iter().map(|t| read(t)).collect());
            let all_held = runs.iter().all(|t| t.ramp_s.is_some());
            let ramp = mid(|t| t.ramp_s.unwrap_or(f64::INFINITY));
            format!(
                "{}: {} {} held, ramp {}, {:.2} KiB/poll, idle CPU {:.2}%, single {:.0}/s, batch {:.0}/s, \
                 p50/p99/max {:.1}/{:.1}/{:.1} ms at {}/s, lost {}, twice {}{}{}{}",
                target,
                if failed.is_empty() && runs.iter().all(|t| t.passed()) { "OK" } else { "FAIL" },
                runs.iter().map(|t| t.held).min().unwrap_or_default(),
                if all_held { format!("{ramp:.2} s") } else { "incomplete".into() },
                mid(|t| t.rss_per_poll_kib),
                mid(|t| t.idle_cpu_pct),
                mid(|t| t.single.per_s),
                mid(|t| t.batch.per_s),
                mid(|t| t.rate.phase.latency.p50_ms),
                mid(|t| t.rate.phase.latency.p99_ms),
                mid(|t| t.rate.phase.latency.max_ms),
                run.settings.rate,
                runs.iter().map(|t| t.delivery.lost).sum::<u64>(),
                runs.iter().map(|t| t.delivery.duplicated).sum::<u64>(),
                logged(&runs),
                failures,
                if runs.len() > 1 {
                    format!(" (medians of {} rounds)", runs.len())
                } else {
                    String::new()
                },
            )
        })
        .collect();
    format!("pns-load: {}", parts.join(" | "))
}

/// The log lines worth a look over a target's rounds, when there were any.
fn logged(runs: &[&TargetReport]) -> String {
    let lines: u64 = runs.iter().map(|t| t.server_log.lines).sum();
    let died: u64 = runs.iter().map(|t| t.server_log.workers_died).sum();
    let slow_syncs: u64 = runs.iter().map(|t| t.server_log.slow_syncs).sum();
    match (lines, died, slow_syncs) {
        (0, _, _) => String::new(),
        (_, 0, 0) => format!(", {lines} log lines"),
        (_, 0, _) => format!(", {lines} log lines ({slow_syncs} of them slow-sync warnings)"),
        _ => format!(", {lines} log lines ({died} dead workers)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(target: &'static str, round: u32, ramp_s: f64, single_per_s: f64) -> TargetReport {
        let mut t = TargetReport {
            target,
            round,
            ramp_s: Some(ramp_s),
            ..TargetReport::default()
        };
        t.single.per_s = single_per_s;
        t
    }

    /// `pns-load bench`'s arguments when none are given.
    fn default_args() -> BenchArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BenchArgs,
        }
        <Cli as clap::Parser>::parse_from(["bench"]).args
    }

    fn row<'a>(rows: &'a [Comparison], figure: &str) -> &'a Comparison {
        rows.iter().find(|c| c.figure == figure).unwrap()
    }

    #[test]
    fn figures_are_compared_by_their_medians_over_the_rounds() {
        let targets = vec![
            measured("pns", 1, 1.0, 100.0),
            measured("nchan", 1, 2.0, 300.0),
            measured("pns", 2, 3.0, 200.0),
            measured("nchan", 2, 1.5, 100.0),
            measured("pns", 3, 1.2, 150.0),
            measured("nchan", 3, 1.1, 200.0),
            // A round without its Nchan measurement is not compared.
            measured("pns", 4, 0.1, 1e9),
        ];
        let rows = compare(&targets);
        let ramp = row(&rows, "ramp_s");
        assert_eq!((ramp.pns, ramp.nchan), (1.2, 1.5));
        assert!(ramp.pns_as_good && ramp.lower_is_better);
        assert_eq!((ramp.rounds, ramp.rounds_pns_as_good), (3, 1));
        let single = row(&rows, "single_per_s");
        assert_eq!((single.pns, single.nchan), (150.0, 200.0));
        assert!(!single.pns_as_good && !single.lower_is_better);
        assert_eq!(single.rounds_pns_as_good, 1);
    }

    /// A round that failed (nginx's workers dying, say) leaves the
    /// others compared, marks its target FAIL with the error, and fails
    /// the run only when that target is judged.
    #[test]
    fn a_failed_round_is_reported_and_judged_with_its_target() {
        let args = default_args();
        let targets = vec![
            measured("pns", 1, 1.0, 100.0),
            measured("nchan", 1, 2.0, 300.0),
            measured("pns", 2, 3.0, 200.0),
        ];
        let failed = vec![FailedRound {
            target: "nchan",
            round: 2,
            error: "measuring nchan: Connection reset by peer".into(),
            server_log: crate::servers::ServerLog {
                lines: 386,
                workers_died: 386,
                ..Default::default()
            },
        }];
        let run = Run::new(&args, targets, failed, Vec::new());
        assert_eq!(row(&run.comparison, "single_per_s").rounds, 1);
        let line = summary_line(&run);
        let nchan = line.split(" | ").nth(1).unwrap();
        assert!(nchan.starts_with("nchan: FAIL"), "{line}");
        assert!(
            nchan
                .contains("1 round(s) failed (round 2: measuring nchan: Connection reset by peer)"),
            "{line}"
        );
        assert!(run.passed(|t| t == "pns"));
        assert!(!run.passed(|_| true));

        let only_failures = Run::new(&args, Vec::new(), run.failed, Vec::new());
        assert_eq!(
            summary_line(&only_failures),
            "pns-load: nchan: FAIL, 1 round(s) failed (round 2: measuring nchan: Connection reset by peer)"
        );
    }

    /// A disk that held PNS's syncs is named as such, not left among
    /// the server's own warnings.
    #[test]
    fn warnings_of_slow_syncs_are_named_in_the_summary() {
        let args = default_args();
        let mut targets = vec![measured("pns", 1, 1.0, 100.0)];
        targets[0].server_log = crate::servers::ServerLog {
            lines: 3,
            slow_syncs: 2,
            ..Default::default()
        };
        let line = summary_line(&Run::new(&args, targets, Vec::new(), Vec::new()));
        assert!(
            line.contains(", 3 log lines (2 of them slow-sync warnings)"),
            "{line}"
        );
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![5.0]), 5.0);
        assert!(median(Vec::new()).is_nan());
    }
}
