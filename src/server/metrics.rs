//! Per-shard statistics and their Prometheus text exposition.
//!
//! Each shard records into its own [`ShardMetrics`] (its mutex is only ever
//! contended by a scrape); a scrape locks each shard in turn, merges the HDR
//! histograms and renders text format 0.0.4.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::api::{ExecFailure, ExecResult, LaneStats};

/// Upper bounds of the exported latency buckets, in seconds (50 µs .. 30 s).
pub const BUCKETS_SECONDS: [f64; 18] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// Which API endpoint a request hit (a closed set, so label cardinality is bounded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    Exec,
    ExecBatch,
    Health,
    Metrics,
    /// Every `/v1/sandboxes…` and `/v1/checkpoints/…` route.
    Sandboxes,
    Other,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Exec => "/v1/exec",
            Endpoint::ExecBatch => "/v1/exec/batch",
            Endpoint::Health => "/v1/health",
            Endpoint::Metrics => "/v1/metrics",
            Endpoint::Sandboxes => "/v1/sandboxes",
            Endpoint::Other => "other",
        }
    }
}

/// Latencies in microseconds plus their exact sum.
#[derive(Clone)]
pub struct LatencyHistogram {
    hist: Histogram<u64>,
    sum_micros: u128,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            // 1 µs .. 1 h at 3 significant digits.
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"),
            sum_micros: 0,
        }
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, d: Duration) {
        let micros = d.as_micros();
        self.hist
            .saturating_record(micros.clamp(1, u128::from(u64::MAX)) as u64);
        self.sum_micros += micros;
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.sum_micros += other.sum_micros;
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Cumulative counts for each of [`BUCKETS_SECONDS`].
    fn cumulative(&self) -> [u64; BUCKETS_SECONDS.len()] {
        let mut out = [0u64; BUCKETS_SECONDS.len()];
        for v in self.hist.iter_recorded() {
            // A recorded value stands for its whole HDR bucket (0.1% wide); place
            // it by the bucket's low end so values exactly on a bound count in it.
            let seconds = self.hist.lowest_equivalent(v.value_iterated_to()) as f64 / 1e6;
            for (slot, &le) in out.iter_mut().zip(BUCKETS_SECONDS.iter()) {
                if seconds <= le {
                    *slot += v.count_at_value();
                }
            }
        }
        out
    }
}

/// What a shard's event loop records.
#[derive(Clone, Default)]
pub struct ShardStats {
    pub fork: LatencyHistogram,
    pub exec: LatencyHistogram,
    pub total: LatencyHistogram,
    /// How long a live fork held its parent (state capture).
    pub sandbox_fork_pause: LatencyHistogram,
    /// Time to start one child of a live fork (or a session from a checkpoint).
    pub sandbox_child_start: LatencyHistogram,
    pub sandbox_checkpoint: LatencyHistogram,
    pub sandbox_restore: LatencyHistogram,
    pub sandboxes_created: u64,
    pub requests: BTreeMap<(Endpoint, u16), u64>,
    pub requests_in_flight: u64,
    pub connections_open: u64,
    pub connections_accepted: u64,
    /// Connections refused by the connection caps.
    pub connections_refused: u64,
    pub execs_in_flight: u64,
    pub timeouts: u64,
    pub guest_errors: u64,
    pub cancelled: u64,
    /// io_uring receives that found no free provided buffer (then re-armed).
    pub recv_buffers_exhausted: u64,
}

impl ShardStats {
    /// Records what a session operation cost.
    pub fn record_session(&mut self, reply: &crate::api::SessionReply) {
        use crate::api::SessionReply;
        let ms = |v: f64| std::time::Duration::from_secs_f64(v / 1e3);
        match reply {
            SessionReply::Created(list) => {
                for info in list.iter().flatten() {
                    self.sandboxes_created += 1;
                    self.sandbox_child_start.record(ms(info.fork_time_ms));
                }
            }
            SessionReply::Forked { pause, forks, .. } => {
                self.sandbox_fork_pause.record(*pause);
                for info in forks.iter().flatten() {
                    self.sandboxes_created += 1;
                    self.sandbox_child_start.record(ms(info.fork_time_ms));
                }
            }
            SessionReply::Checkpointed { pause, .. } => self.sandbox_checkpoint.record(*pause),
            SessionReply::Restored { restore, .. } => self.sandbox_restore.record(*restore),
            _ => {}
        }
    }

    /// Records the outcome of one exec that a worker ran.
    pub fn record_exec(&mut self, result: &ExecResult) {
        match &result.failure {
            Some(ExecFailure::Timeout) => self.timeouts += 1,
            Some(ExecFailure::Cancelled) => self.cancelled += 1,
            Some(
                ExecFailure::GuestCrashed(_)
                | ExecFailure::BadResponse(_)
                | ExecFailure::MemoryLimit,
            ) => self.guest_errors += 1,
            _ => {}
        }
        self.fork.record(result.fork_time);
        self.exec.record(result.exec_time);
        self.total.record(result.total_time);
    }

    pub fn merge(&mut self, other: &ShardStats) {
        self.fork.merge(&other.fork);
        self.exec.merge(&other.exec);
        self.total.merge(&other.total);
        self.sandbox_fork_pause.merge(&other.sandbox_fork_pause);
        self.sandbox_child_start.merge(&other.sandbox_child_start);
        self.sandbox_checkpoint.merge(&other.sandbox_checkpoint);
        self.sandbox_restore.merge(&other.sandbox_restore);
        self.sandboxes_created += other.sandboxes_created;
        for (k, v) in &other.requests {
            *self.requests.entry(*k).or_default() += v;
        }
        self.requests_in_flight += other.requests_in_flight;
        self.connections_open += other.connections_open;
        self.connections_accepted += other.connections_accepted;
        self.connections_refused += other.connections_refused;
        self.execs_in_flight += other.execs_in_flight;
        self.timeouts += other.timeouts;
        self.guest_errors += other.guest_errors;
        self.cancelled += other.cancelled;
        self.recv_buffers_exhausted += other.recv_buffers_exhausted;
    }
}

/// One shard's statistics, readable by scrapes on other shards.
pub struct ShardMetrics {
    stats: Mutex<ShardStats>,
    /// Latest [`LaneStats`] of each worker, written by the worker after each exec.
    lanes: Vec<Mutex<LaneStats>>,
    /// Jobs sent to the shard's queue that no worker has taken yet.
    pub queued: AtomicUsize,
    pub workers: usize,
}

impl ShardMetrics {
    pub fn new(workers: usize) -> Arc<Self> {
        Arc::new(ShardMetrics {
            stats: Mutex::new(ShardStats::default()),
            lanes: (0..workers)
                .map(|_| Mutex::new(LaneStats::default()))
                .collect(),
            queued: AtomicUsize::new(0),
            workers,
        })
    }

    /// Locks this shard's stats. Poisoning is ignored: the stats are plain
    /// counters, valid even if a holder panicked.
    pub fn stats(&self) -> MutexGuard<'_, ShardStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_lane_stats(&self, worker: usize, stats: LaneStats) {
        *self.lanes[worker].lock().unwrap_or_else(|e| e.into_inner()) = stats;
    }

    pub fn lane_totals(&self) -> LaneStats {
        let mut total = LaneStats::default();
        for lane in &self.lanes {
            add_lane_stats(&mut total, &lane.lock().unwrap_or_else(|e| e.into_inner()));
        }
        total
    }
}

pub fn add_lane_stats(total: &mut LaneStats, s: &LaneStats) {
    total.pooled_vms += s.pooled_vms;
    total.live_vms += s.live_vms;
    total.forks += s.forks;
    total.fresh_vm_forks += s.fresh_vm_forks;
    total.destroyed_vms += s.destroyed_vms;
    total.timeouts += s.timeouts;
    total.guest_errors += s.guest_errors;
    total.sessions += s.sessions;
    total.session_memory_bytes += s.session_memory_bytes;
    total.checkpoints += s.checkpoints;
    total.checkpoint_bytes += s.checkpoint_bytes;
}

/// A consistent-enough view of all shards, taken one shard at a time.
pub struct Snapshot {
    pub stats: ShardStats,
    pub lanes: LaneStats,
    pub queued: usize,
    pub per_shard: Vec<ShardSummary>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ShardSummary {
    pub shard: usize,
    pub workers: usize,
    pub queued: usize,
    pub execs_in_flight: u64,
    pub requests_in_flight: u64,
    pub connections_open: u64,
    pub pool: LaneStats,
}

pub fn snapshot(shards: &[Arc<ShardMetrics>]) -> Snapshot {
    let mut stats = ShardStats::default();
    let mut lanes = LaneStats::default();
    let mut queued = 0;
    let mut per_shard = Vec::with_capacity(shards.len());
    for (i, shard) in shards.iter().enumerate() {
        let s = shard.stats();
        stats.merge(&s);
        let pool = shard.lane_totals();
        add_lane_stats(&mut lanes, &pool);
        let q = shard.queued.load(Ordering::Relaxed);
        queued += q;
        per_shard.push(ShardSummary {
            shard: i,
            workers: shard.workers,
            queued: q,
            execs_in_flight: s.execs_in_flight,
            requests_in_flight: s.requests_in_flight,
            connections_open: s.connections_open,
            pool,
        });
    }
    Snapshot {
        stats,
        lanes,
        queued,
        per_shard,
    }
}

/// Renders the Prometheus text exposition (format 0.0.4).
pub fn render(shards: &[Arc<ShardMetrics>], backend: &str) -> String {
    let snap = snapshot(shards);
    let s = &snap.stats;
    let mut out = String::with_capacity(8192);
    histogram(
        &mut out,
        "kvmfork_fork_seconds",
        "Time to get a runnable sandbox (pooled reset or fresh VM restore).",
        &s.fork,
    );
    histogram(
        &mut out,
        "kvmfork_exec_seconds",
        "Time the guest ran the code.",
        &s.exec,
    );
    histogram(
        &mut out,
        "kvmfork_total_seconds",
        "Fork plus exec plus response decoding, per execution.",
        &s.total,
    );

    header(
        &mut out,
        "kvmfork_http_requests_total",
        "counter",
        "HTTP requests answered, by endpoint and status.",
    );
    for ((endpoint, status), count) in &s.requests {
        let _ = writeln!(
            out,
            "kvmfork_http_requests_total{{endpoint=\"{}\",status=\"{}\"}} {}",
            endpoint.label(),
            status,
            count
        );
    }
    gauge(
        &mut out,
        "kvmfork_http_requests_in_flight",
        "Requests received but not yet answered.",
        s.requests_in_flight,
    );
    gauge(
        &mut out,
        "kvmfork_http_connections_open",
        "Open client connections.",
        s.connections_open,
    );
    counter(
        &mut out,
        "kvmfork_http_connections_accepted_total",
        "Client connections accepted.",
        s.connections_accepted,
    );
    counter(
        &mut out,
        "kvmfork_http_connections_refused_total",
        "Client connections refused by --max-connections or --max-connections-per-address (answered 503 too_many_connections and closed).",
        s.connections_refused,
    );
    gauge(
        &mut out,
        "kvmfork_execs_in_flight",
        "Executions admitted and not yet finished (queued or running).",
        s.execs_in_flight,
    );
    gauge(
        &mut out,
        "kvmfork_exec_queue_depth",
        "Executions waiting for a worker.",
        snap.queued as u64,
    );
    counter(
        &mut out,
        "kvmfork_exec_timeouts_total",
        "Executions stopped by their timeout.",
        s.timeouts,
    );
    counter(
        &mut out,
        "kvmfork_guest_errors_total",
        "Executions that ended in a guest failure (crash, bad response, memory limit).",
        s.guest_errors,
    );
    counter(
        &mut out,
        "kvmfork_exec_cancelled_total",
        "Executions cancelled because the client left or the server drained.",
        s.cancelled,
    );
    counter(
        &mut out,
        "kvmfork_io_recv_buffers_exhausted_total",
        "io_uring receives that found every provided buffer in use and were re-armed.",
        s.recv_buffers_exhausted,
    );

    header(
        &mut out,
        "kvmfork_pool_vms",
        "gauge",
        "VMs held by the worker pools, by state.",
    );
    let _ = writeln!(
        out,
        "kvmfork_pool_vms{{state=\"pooled\"}} {}",
        snap.lanes.pooled_vms
    );
    let _ = writeln!(
        out,
        "kvmfork_pool_vms{{state=\"live\"}} {}",
        snap.lanes.live_vms
    );
    gauge(
        &mut out,
        "kvmfork_sandboxes_live",
        "Live sessions (sandboxes kept between execs).",
        snap.lanes.sessions as u64,
    );
    gauge(
        &mut out,
        "kvmfork_sandbox_memory_bytes",
        "Guest memory the live sessions hold apart from their templates.",
        snap.lanes.session_memory_bytes,
    );
    gauge(
        &mut out,
        "kvmfork_checkpoints",
        "Checkpoints held in memory.",
        snap.lanes.checkpoints as u64,
    );
    gauge(
        &mut out,
        "kvmfork_checkpoint_memory_bytes",
        "Guest memory the checkpoints hold.",
        snap.lanes.checkpoint_bytes,
    );
    counter(
        &mut out,
        "kvmfork_sandboxes_created_total",
        "Sessions started (new, from a checkpoint, or children of a live fork).",
        s.sandboxes_created,
    );
    histogram(
        &mut out,
        "kvmfork_sandbox_fork_pause_seconds",
        "How long a live fork held its parent sandbox to capture its state.",
        &s.sandbox_fork_pause,
    );
    histogram(
        &mut out,
        "kvmfork_sandbox_start_seconds",
        "Time to start one session: a new one, one from a checkpoint, or a child of a live fork.",
        &s.sandbox_child_start,
    );
    histogram(
        &mut out,
        "kvmfork_sandbox_checkpoint_seconds",
        "Time to capture a checkpoint of a session.",
        &s.sandbox_checkpoint,
    );
    histogram(
        &mut out,
        "kvmfork_sandbox_restore_seconds",
        "Time to roll a session back to a checkpoint.",
        &s.sandbox_restore,
    );
    counter(
        &mut out,
        "kvmfork_pool_forks_total",
        "Forks served by the worker pools.",
        snap.lanes.forks,
    );
    counter(
        &mut out,
        "kvmfork_pool_fresh_vm_forks_total",
        "Forks that needed a fresh VM.",
        snap.lanes.fresh_vm_forks,
    );
    counter(
        &mut out,
        "kvmfork_pool_destroyed_vms_total",
        "VMs destroyed by the worker pools.",
        snap.lanes.destroyed_vms,
    );
    gauge(
        &mut out,
        "kvmfork_shards",
        "Event-loop shards.",
        shards.len() as u64,
    );
    header(
        &mut out,
        "kvmfork_io_backend_info",
        "gauge",
        "The event-loop backend in use.",
    );
    let _ = writeln!(out, "kvmfork_io_backend_info{{backend=\"{backend}\"}} 1");
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    header(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &LatencyHistogram) {
    header(out, name, "histogram", help);
    for (le, count) in BUCKETS_SECONDS.iter().zip(h.cumulative()) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count());
    let _ = writeln!(out, "{name}_sum {}", h.sum_micros as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {}", h.count());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_count() {
        let mut h = LatencyHistogram::default();
        for micros in [10, 60, 900, 1_000, 40_000, 2_000_000, 40_000_000] {
            h.record(Duration::from_micros(micros));
        }
        let c = h.cumulative();
        assert_eq!(c[0], 1, "10µs <= 50µs");
        assert_eq!(c[1], 2, "60µs <= 100µs");
        assert_eq!(c[4], 4, "900µs and 1ms <= 1ms");
        assert!(c.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(c[BUCKETS_SECONDS.len() - 1], 6, "40 s is only in +Inf");
        assert_eq!(h.count(), 7);
    }

    #[test]
    fn render_merges_shards() {
        let shards = vec![ShardMetrics::new(1), ShardMetrics::new(2)];
        let result = ExecResult {
            fork_time: Duration::from_micros(300),
            ..Default::default()
        };
        shards[0].stats().record_exec(&result);
        shards[1].stats().record_exec(&ExecResult {
            failure: Some(ExecFailure::Timeout),
            ..result.clone()
        });
        shards[1].stats().requests.insert((Endpoint::Exec, 200), 3);
        shards[1].set_lane_stats(
            1,
            LaneStats {
                pooled_vms: 4,
                ..Default::default()
            },
        );
        let text = render(&shards, "epoll");
        assert!(
            text.contains("kvmfork_fork_seconds_bucket{le=\"0.0005\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("kvmfork_fork_seconds_count 2\n"));
        assert!(text.contains("kvmfork_fork_seconds_sum 0.0006\n"));
        assert!(text.contains("kvmfork_exec_timeouts_total 1\n"));
        assert!(
            text.contains("kvmfork_http_requests_total{endpoint=\"/v1/exec\",status=\"200\"} 3\n")
        );
        assert!(text.contains("kvmfork_pool_vms{state=\"pooled\"} 4\n"));
        assert!(text.contains("kvmfork_io_backend_info{backend=\"epoll\"} 1\n"));
    }
}
