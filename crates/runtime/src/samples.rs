use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Unit of a [`BenchmarkSample`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleUnit {
    Milliseconds,
    Bytes,
    Count,
}

impl fmt::Display for SampleUnit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SampleUnit::Milliseconds => "ms",
            SampleUnit::Bytes => "bytes",
            SampleUnit::Count => "count",
        })
    }
}

/// One measurement: a metric name, a unit and a value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchmarkSample {
    metric: String,
    unit: SampleUnit,
    value: f64,
}

impl BenchmarkSample {
    pub fn new(metric: impl Into<String>, unit: SampleUnit, value: f64) -> Self {
        Self {
            metric: metric.into(),
            unit,
            value,
        }
    }

    /// A latency in milliseconds, with sub-millisecond precision.
    pub fn latency(metric: impl Into<String>, elapsed: Duration) -> Self {
        Self::new(
            metric,
            SampleUnit::Milliseconds,
            elapsed.as_secs_f64() * 1000.0,
        )
    }

    pub fn metric(&self) -> &str {
        &self.metric
    }

    pub fn unit(&self) -> SampleUnit {
        self.unit
    }

    pub fn value(&self) -> f64 {
        self.value
    }
}

impl fmt::Display for BenchmarkSample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={:.3} {}", self.metric, self.value, self.unit)
    }
}
