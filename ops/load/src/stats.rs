//! Turning raw observations into figures: latency percentiles, and the
//! delivery tally that says whether every acknowledged message arrived
//! exactly once.

use serde::Serialize;
use std::collections::HashMap;

/// Latency percentiles of one phase: of deliveries (notify due → message in
/// the poller's hands), or of acknowledgements.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Percentiles of `micros` (nearest rank).
pub fn latency(mut micros: Vec<u32>) -> Latency {
    if micros.is_empty() {
        return Latency::default();
    }
    micros.sort_unstable();
    let rank = |q: f64| {
        let i = ((q * micros.len() as f64).ceil() as usize).clamp(1, micros.len()) - 1;
        f64::from(micros[i]) / 1000.0
    };
    Latency {
        samples: micros.len(),
        p50_ms: rank(0.50),
        p99_ms: rank(0.99),
        max_ms: f64::from(micros[micros.len() - 1]) / 1000.0,
    }
}

/// Whether what was acknowledged arrived, once.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Delivery {
    /// Messages the server acknowledged.
    pub sent: u64,
    /// Of those, how many arrived at least once.
    pub delivered: u64,
    /// Acknowledged but never received.
    pub lost: u64,
    /// Received more than once.
    pub duplicated: u64,
    /// Received but never acknowledged (a notify that failed on the way
    /// back, yet was stored): not an error, shown for completeness.
    pub unacknowledged: u64,
}

impl Delivery {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0
    }
}

/// Count receipts per message number.
pub fn count(receipts: &[u64]) -> HashMap<u64, u32> {
    let mut seen = HashMap::with_capacity(receipts.len());
    for k in receipts {
        *seen.entry(*k).or_insert(0u32) += 1;
    }
    seen
}

/// The tally of the messages `acked`, given how often each number was seen.
/// `in_scope` says which message numbers this tally is about.
pub fn tally(acked: &[u64], seen: &HashMap<u64, u32>, in_scope: impl Fn(u64) -> bool) -> Delivery {
    let mut d = Delivery {
        sent: acked.len() as u64,
        ..Delivery::default()
    };
    let acked_set: std::collections::HashSet<u64> = acked.iter().copied().collect();
    for k in acked {
        match seen.get(k).copied().unwrap_or(0) {
            0 => d.lost += 1,
            1 => d.delivered += 1,
            _ => {
                d.delivered += 1;
                d.duplicated += 1;
            }
        }
    }
    d.unacknowledged = seen
        .keys()
        .filter(|k| in_scope(**k) && !acked_set.contains(k))
        .count() as u64;
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let l = latency((1..=100).map(|ms| ms * 1000).collect());
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (50.0, 99.0, 100.0));
    }

    #[test]
    fn tally_finds_lost_twice_and_unacknowledged() {
        let seen = count(&[1, 2, 2, 9]);
        let d = tally(&[1, 2, 3], &seen, |_| true);
        assert_eq!((d.delivered, d.lost, d.duplicated), (2, 1, 1));
        assert_eq!(d.unacknowledged, 1);
        assert!(!d.ok());
    }
}
