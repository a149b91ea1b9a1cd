//! The run report: a stable JSON schema (`--json`) and a human text form.
//! Schema changes that remove or rename a field bump [`SCHEMA`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::{ErrorCounts, LatencySummary};
use crate::workload::MixEntry;
use crate::{Config, Mode, RunResult};

/// Identifies the JSON layout below.
pub const SCHEMA: &str = "kvmfork-loadgen/v1";

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub config: ConfigReport,
    /// Seconds from the end of warm-up to the end of the last measured request.
    pub elapsed_s: f64,
    /// The run was cut short by SIGINT/SIGTERM.
    pub interrupted: bool,
    pub requests: RequestCounts,
    /// TCP connections opened for measured requests; above `config.connections`
    /// means the server closed connections (or they failed) and loadgen reconnected.
    pub connections_opened: u64,
    /// Complete HTTP responses (any status) per second.
    pub throughput_rps: f64,
    /// 2xx responses per second.
    pub ok_rps: f64,
    /// 2xx latency; open loop: from the intended send time.
    pub latency: LatencySummary,
    /// 2xx latency from the first byte written (equals `latency` in closed loop).
    pub service_time: LatencySummary,
    /// Count of every HTTP status received, keyed by the status code.
    pub status: BTreeMap<String, u64>,
    pub errors: ErrorReport,
    /// One entry per mix entry, in mix order.
    pub by_request: Vec<RequestReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigReport {
    pub target: String,
    /// "closed" or "open".
    pub mode: &'static str,
    /// Open loop: requests per second; null in closed loop.
    pub rate: Option<f64>,
    pub connections: usize,
    pub threads: usize,
    pub duration_s: Option<f64>,
    pub requests: Option<u64>,
    pub warmup_s: f64,
    pub timeout_s: f64,
    pub mix: Vec<MixEntry>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct RequestCounts {
    /// Measured requests issued; each ends as one response or one error.
    pub sent: u64,
    /// Complete HTTP responses, any status.
    pub completed: u64,
    /// 2xx responses.
    pub ok: u64,
    /// Non-2xx responses plus transport errors.
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorReport {
    pub total: u64,
    /// Non-2xx responses keyed by status code.
    pub by_status: BTreeMap<String, u64>,
    /// Requests that got no HTTP response.
    pub by_kind: ErrorCounts,
}

#[derive(Debug, Clone, Serialize)]
pub struct RequestReport {
    pub name: String,
    pub completed: u64,
    pub ok: u64,
    pub failed: u64,
    pub latency: LatencySummary,
}

impl Report {
    pub fn new(config: &Config, result: &RunResult) -> Report {
        let recorder = &result.recorder;
        let elapsed_s = result.elapsed.as_secs_f64();
        let per_second = |count: u64| {
            if elapsed_s > 0.0 {
                count as f64 / elapsed_s
            } else {
                0.0
            }
        };
        let status_errors: BTreeMap<String, u64> = recorder
            .status_errors()
            .into_iter()
            .map(|(status, count)| (status.to_string(), count))
            .collect();
        let status_error_total: u64 = status_errors.values().sum();
        Report {
            schema: SCHEMA,
            config: ConfigReport {
                target: config.target.url.clone(),
                mode: match config.mode {
                    Mode::Closed => "closed",
                    Mode::Open { .. } => "open",
                },
                rate: match config.mode {
                    Mode::Closed => None,
                    Mode::Open { rate } => Some(rate),
                },
                connections: config.connections,
                threads: result.threads,
                duration_s: config.bounds.duration.map(|d| d.as_secs_f64()),
                requests: config.bounds.requests,
                warmup_s: config.warmup.as_secs_f64(),
                timeout_s: config.timeout.as_secs_f64(),
                mix: config.mix.clone(),
            },
            elapsed_s,
            interrupted: result.interrupted,
            requests: RequestCounts {
                sent: recorder.sent,
                completed: recorder.completed,
                ok: recorder.ok,
                failed: recorder.sent - recorder.ok,
            },
            connections_opened: recorder.connections_opened,
            throughput_rps: per_second(recorder.completed),
            ok_rps: per_second(recorder.ok),
            latency: LatencySummary::of(&recorder.latency),
            service_time: LatencySummary::of(&recorder.service_time),
            status: recorder
                .status
                .iter()
                .map(|(status, count)| (status.to_string(), *count))
                .collect(),
            errors: ErrorReport {
                total: status_error_total + recorder.errors.total(),
                by_status: status_errors,
                by_kind: recorder.errors,
            },
            by_request: config
                .mix
                .iter()
                .zip(&recorder.per_request)
                .map(|(entry, stats)| RequestReport {
                    name: entry.name.clone(),
                    completed: stats.completed,
                    ok: stats.ok,
                    failed: stats.failed,
                    latency: LatencySummary::of(&stats.latency),
                })
                .collect(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises")
    }

    /// Human-readable summary.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let mode = match c.rate {
            Some(rate) => format!("open loop at {rate} req/s"),
            None => "closed loop".to_string(),
        };
        let _ = writeln!(
            out,
            "target       {}  ({mode}, {} connections, {} threads)",
            c.target, c.connections, c.threads
        );
        let r = &self.requests;
        if self.interrupted {
            let _ = writeln!(
                out,
                "interrupted  the run was stopped early; counts cover what was sent"
            );
        }
        let _ = writeln!(
            out,
            "requests     sent {}  completed {}  ok {}  failed {}  in {:.2} s  ({} connects)",
            r.sent, r.completed, r.ok, r.failed, self.elapsed_s, self.connections_opened
        );
        let _ = writeln!(
            out,
            "throughput   {:.1} req/s  (ok {:.1} req/s)",
            self.throughput_rps, self.ok_rps
        );
        let _ = writeln!(out, "latency      {}", format_summary(&self.latency));
        if c.rate.is_some() {
            let _ = writeln!(out, "service time {}", format_summary(&self.service_time));
        }
        let kinds = &self.errors.by_kind;
        let mut errors = format!(
            "errors       {}  (connect {}  timeout {}  parse {}  closed {}",
            self.errors.total, kinds.connect, kinds.timeout, kinds.parse, kinds.closed
        );
        for (status, count) in &self.errors.by_status {
            let _ = write!(errors, "  http {status}: {count}");
        }
        errors.push(')');
        let _ = writeln!(out, "{errors}");
        if self.by_request.len() > 1 {
            for request in &self.by_request {
                let _ = writeln!(
                    out,
                    "  {:<10} ok {:>8}  failed {:>6}  {}",
                    request.name,
                    request.ok,
                    request.failed,
                    format_summary(&request.latency)
                );
            }
        }
        out
    }
}

fn format_summary(summary: &LatencySummary) -> String {
    if summary.count == 0 {
        return "no successful responses".to_string();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {})",
        ms(summary.p50_ms),
        ms(summary.p90_ms),
        ms(summary.p99_ms),
        ms(summary.p99_9_ms),
        ms(summary.max_ms),
        ms(summary.mean_ms)
    )
}

fn ms(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.3}ms")
    } else if value < 1000.0 {
        format!("{value:.1}ms")
    } else {
        format!("{:.2}s", value / 1000.0)
    }
}
