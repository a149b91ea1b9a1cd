//! Per-thread measurement: HDR latency histograms, status counts and error
//! counts by kind. Each worker owns one [`Recorder`]; they are merged once
//! at the end, so the hot path takes no lock.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Histograms count microseconds, from 1 µs to one hour, 3 significant digits.
const HIST_LOW_US: u64 = 1;
const HIST_HIGH_US: u64 = 3_600_000_000;
const HIST_SIGFIG: u8 = 3;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(HIST_LOW_US, HIST_HIGH_US, HIST_SIGFIG)
        .expect("static histogram bounds are valid")
}

/// Why a request got no HTTP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The TCP connection could not be established (refused, unreachable,
    /// or the request timed out while connecting).
    Connect,
    /// No complete response within `--timeout`.
    Timeout,
    /// The response was not valid HTTP/1.x.
    Parse,
    /// The server closed or reset the connection mid-request.
    Closed,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ErrorCounts {
    pub connect: u64,
    pub timeout: u64,
    pub parse: u64,
    pub closed: u64,
}

impl ErrorCounts {
    pub fn add(&mut self, kind: ErrorKind) {
        match kind {
            ErrorKind::Connect => self.connect += 1,
            ErrorKind::Timeout => self.timeout += 1,
            ErrorKind::Parse => self.parse += 1,
            ErrorKind::Closed => self.closed += 1,
        }
    }

    pub fn total(&self) -> u64 {
        self.connect + self.timeout + self.parse + self.closed
    }

    fn merge(&mut self, other: &ErrorCounts) {
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.parse += other.parse;
        self.closed += other.closed;
    }
}

/// Counts for one request kind of the mix.
#[derive(Debug, Clone)]
pub struct RequestKindStats {
    pub completed: u64,
    pub ok: u64,
    pub failed: u64,
    pub latency: Histogram<u64>,
}

impl RequestKindStats {
    fn new() -> Self {
        RequestKindStats {
            completed: 0,
            ok: 0,
            failed: 0,
            latency: new_histogram(),
        }
    }
}

/// Everything one worker measured during the measured phase.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// Latency of successful (2xx) responses. Closed loop: from the first
    /// byte written. Open loop: from the intended send time (corrects
    /// coordinated omission).
    pub latency: Histogram<u64>,
    /// Successful responses, from the first byte written (never corrected).
    pub service_time: Histogram<u64>,
    pub per_request: Vec<RequestKindStats>,
    /// Every HTTP status received, including 2xx.
    pub status: BTreeMap<u16, u64>,
    pub errors: ErrorCounts,
    /// Requests started (each ends as a response or an error).
    pub sent: u64,
    /// Complete HTTP responses, any status.
    pub completed: u64,
    /// 2xx responses.
    pub ok: u64,
    /// TCP connections established for measured requests (1 per connection
    /// with keep-alive; more means the server closed connections).
    pub connections_opened: u64,
}

impl Recorder {
    pub fn new(request_kinds: usize) -> Recorder {
        Recorder {
            latency: new_histogram(),
            service_time: new_histogram(),
            per_request: (0..request_kinds)
                .map(|_| RequestKindStats::new())
                .collect(),
            status: BTreeMap::new(),
            errors: ErrorCounts::default(),
            sent: 0,
            completed: 0,
            ok: 0,
            connections_opened: 0,
        }
    }

    pub fn record_response(
        &mut self,
        kind: usize,
        status: u16,
        latency: Duration,
        service_time: Duration,
    ) {
        self.completed += 1;
        *self.status.entry(status).or_insert(0) += 1;
        let stats = &mut self.per_request[kind];
        stats.completed += 1;
        if (200..300).contains(&status) {
            self.ok += 1;
            stats.ok += 1;
            let latency_us = micros(latency);
            self.latency.saturating_record(latency_us);
            stats.latency.saturating_record(latency_us);
            self.service_time.saturating_record(micros(service_time));
        } else {
            stats.failed += 1;
        }
    }

    pub fn record_error(&mut self, kind: usize, error: ErrorKind) {
        self.errors.add(error);
        self.per_request[kind].failed += 1;
    }

    pub fn merge(&mut self, other: &Recorder) {
        self.latency
            .add(&other.latency)
            .expect("histograms share bounds");
        self.service_time
            .add(&other.service_time)
            .expect("histograms share bounds");
        for (mine, theirs) in self.per_request.iter_mut().zip(&other.per_request) {
            mine.completed += theirs.completed;
            mine.ok += theirs.ok;
            mine.failed += theirs.failed;
            mine.latency
                .add(&theirs.latency)
                .expect("histograms share bounds");
        }
        for (status, count) in &other.status {
            *self.status.entry(*status).or_insert(0) += count;
        }
        self.errors.merge(&other.errors);
        self.sent += other.sent;
        self.completed += other.completed;
        self.ok += other.ok;
        self.connections_opened += other.connections_opened;
    }

    /// Non-2xx responses.
    pub fn status_errors(&self) -> BTreeMap<u16, u64> {
        self.status
            .iter()
            .filter(|(status, _)| !(200..300).contains(*status))
            .map(|(s, c)| (*s, *c))
            .collect()
    }
}

/// A duration as a histogram value (whole microseconds, at least the lowest bucket).
pub fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros())
        .unwrap_or(u64::MAX)
        .max(HIST_LOW_US)
}

/// Percentile summary of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub stdev_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p99_9_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    pub fn of(histogram: &Histogram<u64>) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        if histogram.is_empty() {
            return LatencySummary {
                count: 0,
                min_ms: 0.0,
                mean_ms: 0.0,
                stdev_ms: 0.0,
                p50_ms: 0.0,
                p90_ms: 0.0,
                p99_ms: 0.0,
                p99_9_ms: 0.0,
                max_ms: 0.0,
            };
        }
        LatencySummary {
            count: histogram.len(),
            min_ms: ms(histogram.min()),
            mean_ms: histogram.mean() / 1000.0,
            stdev_ms: histogram.stdev() / 1000.0,
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p99_9_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64) -> bool {
        // HDR keeps 3 significant digits: relative error below 0.1%.
        (actual - expected).abs() <= expected * 0.001 + 1e-9
    }

    #[test]
    fn percentiles_of_uniform_values() {
        let mut recorder = Recorder::new(1);
        for ms in 1..=1000u64 {
            let latency = Duration::from_millis(ms);
            recorder.record_response(0, 200, latency, latency);
        }
        let summary = LatencySummary::of(&recorder.latency);
        assert_eq!(summary.count, 1000);
        assert!(close(summary.min_ms, 1.0), "{summary:?}");
        assert!(close(summary.p50_ms, 500.0), "{summary:?}");
        assert!(close(summary.p90_ms, 900.0), "{summary:?}");
        assert!(close(summary.p99_ms, 990.0), "{summary:?}");
        assert!(close(summary.p99_9_ms, 999.0), "{summary:?}");
        assert!(close(summary.max_ms, 1000.0), "{summary:?}");
        assert!(close(summary.mean_ms, 500.5), "{summary:?}");
    }

    #[test]
    fn one_outlier_only_shows_at_the_top() {
        let mut recorder = Recorder::new(1);
        for _ in 0..999 {
            recorder.record_response(
                0,
                200,
                Duration::from_micros(100),
                Duration::from_micros(100),
            );
        }
        recorder.record_response(0, 200, Duration::from_secs(2), Duration::from_secs(2));
        let summary = LatencySummary::of(&recorder.latency);
        assert!(close(summary.p99_ms, 0.1), "{summary:?}");
        assert!(close(summary.p99_9_ms, 0.1), "{summary:?}");
        assert!(close(summary.max_ms, 2000.0), "{summary:?}");
    }

    #[test]
    fn non_2xx_and_errors_are_counted_not_timed() {
        let mut recorder = Recorder::new(2);
        recorder.record_response(0, 200, Duration::from_millis(1), Duration::from_millis(1));
        recorder.record_response(1, 500, Duration::from_millis(1), Duration::from_millis(1));
        recorder.record_response(1, 429, Duration::from_millis(1), Duration::from_millis(1));
        recorder.record_error(0, ErrorKind::Timeout);
        recorder.record_error(1, ErrorKind::Closed);
        assert_eq!(recorder.completed, 3);
        assert_eq!(recorder.ok, 1);
        assert_eq!(recorder.latency.len(), 1);
        assert_eq!(
            recorder.status_errors(),
            BTreeMap::from([(429, 1), (500, 1)])
        );
        assert_eq!(
            recorder.errors,
            ErrorCounts {
                connect: 0,
                timeout: 1,
                parse: 0,
                closed: 1
            }
        );
        assert_eq!(recorder.per_request[1].failed, 3);
    }

    #[test]
    fn merge_adds_everything() {
        let mut a = Recorder::new(1);
        let mut b = Recorder::new(1);
        a.sent = 2;
        b.sent = 3;
        a.record_response(0, 200, Duration::from_millis(1), Duration::from_millis(1));
        b.record_response(0, 200, Duration::from_millis(3), Duration::from_millis(3));
        b.record_error(0, ErrorKind::Parse);
        a.merge(&b);
        assert_eq!(a.sent, 5);
        assert_eq!(a.completed, 2);
        assert_eq!(a.latency.len(), 2);
        assert_eq!(a.per_request[0].latency.len(), 2);
        assert_eq!(a.errors.parse, 1);
        assert_eq!(a.status[&200], 2);
    }

    #[test]
    fn empty_histogram_summary_is_zero() {
        let summary = LatencySummary::of(&new_histogram());
        assert_eq!(summary.count, 0);
        assert_eq!(summary.max_ms, 0.0);
    }
}
