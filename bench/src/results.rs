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
    /// The workload suite; absent when the run skipped it (--workload-runs 0).
    pub workloads: Option<Workloads>,
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

/// The workload suite: each snippet through kvmfork, a warm process peer and
/// a fresh process, in one run (see bench/src/workloads.rs).
#[derive(Debug, Clone, Serialize)]
pub struct Workloads {
    /// The run that produced the table: machine, date, commit.
    pub host: Host,
    pub load_before: f64,
    pub load_after: f64,
    pub wall_s: f64,
    /// Checked runs per snippet and path.
    pub runs: usize,
    /// A path stops running a snippet once its runs of it took this long
    /// in total (after at least one); null: no limit.
    pub budget_s: Option<f64>,
    /// The request's timeout_seconds.
    pub timeout_s: f64,
    pub kvmfork_serve_args: Vec<String>,
    /// Optional modules (pandas, matplotlib) the template and the host have.
    pub template_modules: Vec<String>,
    pub host_modules: Vec<String>,
    /// Modules the Python fork server imported before forking.
    pub fork_server_preload: Vec<String>,
    pub python_version: String,
    pub node_version: String,
    pub rows: Vec<WorkloadRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadRow {
    pub name: String,
    /// "python" or "node".
    pub language: String,
    pub code: String,
    /// The exact stdout every run had to print.
    pub expected_stdout: String,
    /// Why the snippet was not run at all ("template lacks pandas").
    pub skipped: Option<String>,
    /// kvmfork's HTTP API.
    pub kvmfork: WorkloadPath,
    /// The warm process peer (fork server, pre-spawned Node).
    pub warm: WorkloadPath,
    /// A fresh process (`python3 -c`, `node -e`).
    pub fresh: WorkloadPath,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadPath {
    pub label: String,
    /// Wall time of each checked run, in the order run.
    pub runs_ms: Vec<f64>,
    pub p50_ms: Option<f64>,
    /// Only with 5 runs or more.
    pub p90_ms: Option<f64>,
    /// The first failure (a wrong answer, an error, a timeout); no run is
    /// made after it.
    pub error: Option<String>,
}

impl WorkloadPath {
    pub fn new(label: &str) -> WorkloadPath {
        WorkloadPath {
            label: label.into(),
            runs_ms: Vec::new(),
            p50_ms: None,
            p90_ms: None,
            error: None,
        }
    }

    /// Fills the percentiles from the runs. A path that failed any run gets
    /// none: its timings are not of a correct run of the whole sample.
    pub fn summarise(&mut self) {
        if self.error.is_some() || self.runs_ms.is_empty() {
            self.p50_ms = None;
            self.p90_ms = None;
            return;
        }
        let mut sorted = self.runs_ms.clone();
        sorted.sort_by(f64::total_cmp);
        self.p50_ms = Some(crate::workloads::percentile(&sorted, 0.5));
        self.p90_ms = (sorted.len() >= 5).then(|| crate::workloads::percentile(&sorted, 0.9));
    }

    /// "p50" or "p50 / p90", or what went wrong.
    pub fn cell(&self) -> String {
        match (&self.error, self.p50_ms, self.p90_ms) {
            (Some(e), _, _) => format!("failed: {}", e.replace('|', "\\|").replace('\n', " ")),
            (None, Some(p50), Some(p90)) => {
                format!("{} / {}", crate::report::ms(p50), crate::report::ms(p90))
            }
            (None, Some(p50), None) => crate::report::ms(p50),
            (None, None, _) => "not run".into(),
        }
    }
}

impl WorkloadPath {
    /// [`cell`](Self::cell), saying how many runs there were when a time
    /// budget made fewer than the `wanted` ones.
    pub fn cell_of(&self, wanted: usize) -> String {
        let n = self.runs_ms.len();
        if self.error.is_none() && n > 0 && n < wanted {
            format!("{} ({n} run{})", self.cell(), if n == 1 { "" } else { "s" })
        } else {
            self.cell()
        }
    }
}

impl Workloads {
    /// Snippets kvmfork failed (wrong output, error, timeout).
    pub fn kvmfork_failures(&self) -> usize {
        self.rows
            .iter()
            .filter(|r| r.kvmfork.error.is_some())
            .count()
    }
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
            .sum::<u64>()
            + self
                .workloads
                .as_ref()
                .map_or(0, |w| w.kvmfork_failures() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_summarises_only_correct_runs() {
        let mut p = WorkloadPath::new("kvmfork");
        p.runs_ms = vec![30.0, 10.0, 20.0];
        p.summarise();
        assert_eq!((p.p50_ms, p.p90_ms), (Some(20.0), None));
        assert_eq!(p.cell(), "20.0 ms");
        p.runs_ms.extend([40.0, 50.0]);
        p.summarise();
        assert_eq!((p.p50_ms, p.p90_ms), (Some(30.0), Some(50.0)));
        assert_eq!(p.cell(), "30.0 ms / 50.0 ms");
        p.error = Some("exit code 1".into());
        p.summarise();
        assert_eq!((p.p50_ms, p.p90_ms), (None, None));
        assert_eq!(p.cell(), "failed: exit code 1");
        assert_eq!(WorkloadPath::new("x").cell(), "not run");
        let mut one = WorkloadPath::new("kvmfork");
        one.runs_ms = vec![102_300.0];
        one.summarise();
        assert_eq!(one.cell_of(3), "102.3 s (1 run)");
        assert_eq!(one.cell_of(1), "102.3 s");
    }

    #[test]
    fn workload_rows_serialise_with_their_schema_fields() {
        let mut kvmfork = WorkloadPath::new("kvmfork");
        kvmfork.runs_ms = vec![1.5];
        kvmfork.summarise();
        let row = WorkloadRow {
            name: "print(1+1)".into(),
            language: "python".into(),
            code: "print(1+1)".into(),
            expected_stdout: "2\n".into(),
            skipped: None,
            kvmfork,
            warm: WorkloadPath::new("fork server"),
            fresh: WorkloadPath::new("`python3 -c`"),
        };
        let json = serde_json::to_value(&row).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "print(1+1)", "language": "python", "code": "print(1+1)",
                "expected_stdout": "2\n", "skipped": null,
                "kvmfork": {"label": "kvmfork", "runs_ms": [1.5], "p50_ms": 1.5, "p90_ms": null, "error": null},
                "warm": {"label": "fork server", "runs_ms": [], "p50_ms": null, "p90_ms": null, "error": null},
                "fresh": {"label": "`python3 -c`", "runs_ms": [], "p50_ms": null, "p90_ms": null, "error": null},
            })
        );
    }
}
