use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Order statistics of a set of latencies, in milliseconds. Percentiles are nearest-rank
/// (rank = ⌈n·p/100⌉), so every reported value is one that was actually observed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Summary {
    pub fn of_durations(samples: &[Duration]) -> Option<Self> {
        let ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        Self::of_ms(&ms)
    }

    pub fn of_ms(samples: &[f64]) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(Self {
            n,
            min: v[0],
            mean: v.iter().sum::<f64>() / n as f64,
            p50: nearest_rank(&v, 50.0),
            p90: nearest_rank(&v, 90.0),
            p95: nearest_rank(&v, 95.0),
            p99: nearest_rank(&v, 99.0),
            max: v[n - 1],
        })
    }
}

/// `sorted` must be sorted ascending and non-empty.
pub fn nearest_rank(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

/// Points of an empirical CDF: `(value, fraction ≤ value)`.
pub fn cdf(samples_ms: &[f64]) -> Vec<(f64, f64)> {
    let mut v: Vec<f64> = samples_ms.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    v.iter()
        .enumerate()
        .map(|(i, x)| (*x, (i + 1) as f64 / n))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Summary::of_ms(&(1..=100).map(f64::from).collect::<Vec<_>>()).unwrap();
        assert_eq!(
            (s.min, s.p50, s.p90, s.p99, s.max),
            (1.0, 50.0, 90.0, 99.0, 100.0)
        );
        let small = Summary::of_ms(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((small.p50, small.p99), (2.0, 3.0));
        assert!(Summary::of_ms(&[]).is_none());
    }

    #[test]
    fn cdf_ends_at_one() {
        let c = cdf(&[5.0, 1.0]);
        assert_eq!(c, vec![(1.0, 0.5), (5.0, 1.0)]);
    }
}
