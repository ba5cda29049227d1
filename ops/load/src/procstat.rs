//! What the kernel says about a server's processes: resident memory (VmRSS,
//! and the proportional Pss, which counts shared pages once across a process
//! tree such as nginx's master and workers) and CPU time used.

use std::time::{Duration, Instant};

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    // Walk breadth first over a snapshot of /proc: bounded by the process count.
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, stat_fields(p)?.get(1)?.parse().ok()?)))
        .collect();
    while i < all.len() {
        let parent = all[i];
        all.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    all
}

/// The fields of /proc/PID/stat after the command name (field 3 onwards).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// A `Key:   123 kB` line of a /proc status-like file, in KiB.
fn kib_field(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Summed VmRSS of `pids`, in KiB.
pub fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| kib_field(&format!("/proc/{p}/status"), "VmRSS:"))
        .sum()
}

/// Summed Pss of `pids`, in KiB.
pub fn pss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| kib_field(&format!("/proc/{p}/smaps_rollup"), "Pss:"))
        .sum()
}

/// Connections the kernel has dropped so far because a listening socket's
/// accept queue was full (`TcpExtListenOverflows` of this network
/// namespace, every listener's); `None` where it cannot be read.
pub fn listen_overflows() -> Option<u64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    tcp_ext(&netstat, "ListenOverflows")
}

/// The counter `name` of the `TcpExt:` lines of `/proc/net/netstat`: a line
/// of names, then one of values.
fn tcp_ext(netstat: &str, name: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// User plus system CPU time of `pids`, in seconds, with that of their
/// children that exited and were waited for: an nginx worker that dies
/// in a phase leaves the tree, and its time goes to the master's.
pub fn cpu_secs(pids: &[u32]) -> f64 {
    cpu_ticks(pids) as f64 / clock_ticks_per_sec()
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a constant.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// User plus system CPU time of `pids` and of their children waited
/// for, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| {
            let f = stat_fields(*p)?;
            // utime, stime, cutime and cstime are fields 14 to 17; f[0] is
            // field 3.
            f.get(11..15)?
                .iter()
                .map(|t| t.parse::<u64>().ok())
                .sum::<Option<u64>>()
        })
        .sum()
}

/// CPU used by `pids` over `span`, in percent of one core.
pub async fn cpu_percent(pids: &[u32], span: Duration) -> f64 {
    let hz = clock_ticks_per_sec();
    let (t0, c0) = (Instant::now(), cpu_ticks(pids));
    tokio::time::sleep(span).await;
    let (secs, c1) = (t0.elapsed().as_secs_f64(), cpu_ticks(pids));
    (c1.saturating_sub(c0)) as f64 / hz / secs * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_ext_counter_is_read_by_its_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                       TcpExt: 0 2400 2401\n\
                       IpExt: InNoRoutes ListenOverflows\n\
                       IpExt: 7 9\n";
        assert_eq!(tcp_ext(netstat, "ListenOverflows"), Some(2400));
        assert_eq!(tcp_ext(netstat, "ListenDrops"), Some(2401));
        assert_eq!(tcp_ext(netstat, "NoSuchCounter"), None);
        assert!(
            listen_overflows().is_some(),
            "this machine's /proc/net/netstat"
        );
    }

    /// A child that used CPU and was waited for still counts in its
    /// parent's time, as a dead nginx worker in its master's.
    #[test]
    fn the_time_of_a_child_that_exited_counts_in_its_parent() {
        let me = [std::process::id()];
        let before = cpu_ticks(&me);
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let used = || cpu_ticks(&[child.id()]);
        while used() < 20 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let child_used = used();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            cpu_ticks(&me) - before >= child_used,
            "the child used {child_used} ticks"
        );
    }
}
