//! `pns-load`: holds many long polls against PNS and against nginx with the
//! Nchan module, in the same run on the same machine, and measures what a
//! push service is judged by: how fast the polls ramp up, server memory per
//! held poll, server CPU while the polls wait, notify throughput (single and
//! batched), delivery latency at a fixed notify rate, and whether every
//! message arrived exactly once.
//!
//! # Layout
//!
//! - [`bench`]: the driver (`pns-load bench`): starts a server, spawns the
//!   workers, runs the phases, collects the figures.
//! - [`worker`]: a child process (`pns-load worker`) that holds one shard of
//!   the polls and records what they receive; several of them pass the
//!   per-process open-file limit.
//! - [`servers`]: starts and stops `pns serve` and nginx, and knows their pids.
//! - [`pns`] and [`nchan`]: the two clients: poll or subscribe, notify or
//!   publish, count held polls.
//! - [`conn`]: one HTTP/1.1 connection from a chosen loopback source address.
//! - [`procstat`]: RSS and CPU time of a process tree from `/proc`.
//! - [`stats`]: latency percentiles and the delivery tally.
//! - [`report`]: the summary line and the JSON file.
//!
//! Traffic goes only to loopback addresses, every loop is bounded in count
//! and time, and workers exit when their driver goes away.

mod bench;
mod conn;
mod nchan;
mod pns;
mod procstat;
mod report;
mod servers;
mod stats;
mod worker;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// jemalloc, as the server. With glibc's allocator the tool took more of
/// the cores the servers are measured on, and more in PNS's ramps than in
/// Nchan's: over five pairs of rounds its CPU in PNS's ramps went from
/// 1.06 to 0.85 s with jemalloc, in Nchan's from 0.93 to 0.87 s
/// (docs/benchmarks/NOTES.md, ³⁷).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "pns-load", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the benchmark against each target in turn and report.
    Bench(Box<bench::BenchArgs>),
    /// One shard of held polls (started by `bench`; talks JSON lines on stdio).
    #[command(hide = true)]
    Worker(worker::WorkerArgs),
}

/// The servers the tool can measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Pns,
    Nchan,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Pns => "pns",
            TargetKind::Nchan => "nchan",
        }
    }

    /// The second octet of the client source addresses, so that the two
    /// targets of one run never compete for the same source ports.
    fn source_octet(self) -> u8 {
        match self {
            TargetKind::Pns => 10,
            TargetKind::Nchan => 20,
        }
    }
}

/// Where the load tool finds things by default: the workspace root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from("."))
}

/// Raise the soft open-file limit to the hard one; returns the new limit.
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            }
        }
    }
    lim.rlim_cur
}

/// A clock shared by every process of the machine (CLOCK_MONOTONIC), in ns:
/// the driver stamps a message with it, a worker subtracts on receipt.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What every load message carries, as its data (PNS) or body (Nchan).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Payload {
    /// The message number, unique in a run of one target.
    pub k: u64,
    /// The phase that sent it.
    pub p: u8,
    /// When it was due to be sent, [`mono_ns`].
    pub t: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pns-load: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Bench(args) => bench::run(*args).await,
            Command::Worker(args) => worker::run(args).await.map(|()| true),
        }
    });
    // Held connections and spawned tasks need not be torn down one by one.
    runtime.shutdown_background();
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("pns-load: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
