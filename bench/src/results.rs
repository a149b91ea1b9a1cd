//! Everything one benchmark run measured, as written to docs/bench/results.json
//! and rendered into docs/benchmarks.md.

use serde::Serialize;

use loadgen::report::Report;
use loadgen::stats::LatencySummary;

use crate::fork_bench::ForkBench;
use crate::host::Host;

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub schema: &'static str,
    pub host: Host,
    /// 1-minute load average before and after: the machine is shared.
    pub load_before: f64,
    pub load_after: f64,
    pub wall_s: f64,
    pub settings: Settings,
    pub fork: ForkBench,
    /// One point per connection count, in the order run.
    pub kvmfork_exec: Vec<HttpPoint>,
    /// The fork-per-request CPython server, one entry per variant.
    pub fork_servers: Vec<PeerServer>,
    pub kvmfork_health: Vec<HttpPoint>,
    pub nginx: Vec<HttpPoint>,
    pub spawn: Vec<SpawnRow>,
}

pub const SCHEMA: &str = "kvmfork-bench/v1";

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub code: String,
    pub template: String,
    pub fork_iterations: usize,
    /// kvmfork bench fork --max-exec-alive: above this many alive, sandboxes are only forked.
    pub max_exec_alive: usize,
    pub alive: Vec<usize>,
    pub connections: Vec<usize>,
    pub exec_duration_s: f64,
    pub health_duration_s: f64,
    pub warmup_s: f64,
    pub spawn_iterations: usize,
    pub spawn_parallel: usize,
    pub python: String,
    pub python_version: String,
    pub bwrap_version: String,
    pub nginx_version: String,
    pub kvmfork_serve_args: Vec<String>,
    pub fork_server_workers: usize,
    pub fork_server_max_children: usize,
    pub nginx_workers: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerServer {
    pub label: String,
    /// Modules imported before forking.
    pub preload: Vec<String>,
    pub points: Vec<HttpPoint>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpPoint {
    pub connections: usize,
    /// The equivalent loadgen command line.
    pub loadgen: String,
    pub report: Report,
}

impl HttpPoint {
    pub fn errors(&self) -> u64 {
        self.report.errors.total
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SpawnRow {
    /// Short name used in tables and plots.
    pub label: String,
    /// What separates one run from the next.
    pub isolation: String,
    pub argv: Vec<String>,
    /// One spawn at a time.
    pub serial: SpawnStats,
    /// `parallel` spawner threads; absent for slow peers measured serially only.
    pub parallel: Option<SpawnStats>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpawnStats {
    pub parallel: usize,
    pub per_second: f64,
    pub latency: LatencySummary,
}

impl Results {
    /// The kvmfork point with the most successful requests per second.
    pub fn best(points: &[HttpPoint]) -> Option<&HttpPoint> {
        points
            .iter()
            .max_by(|a, b| a.report.ok_rps.total_cmp(&b.report.ok_rps))
    }

    pub fn at(points: &[HttpPoint], connections: usize) -> Option<&HttpPoint> {
        points.iter().find(|p| p.connections == connections)
    }

    /// Requests kvmfork failed anywhere in the run (the table flags them).
    pub fn kvmfork_errors(&self) -> u64 {
        self.kvmfork_exec
            .iter()
            .chain(&self.kvmfork_health)
            .map(HttpPoint::errors)
            .sum()
    }
}
