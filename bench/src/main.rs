//! `cargo run --release -p bench` (or `bench/run`): kvmfork's one-command
//! benchmark. Measures kvmfork's fork and exec paths and, in the same run on
//! the same machine, the alternatives a user would otherwise pick, then writes
//! docs/benchmarks.md, docs/bench/*.png and docs/bench/results.json.

mod fork_bench;
mod host;
mod load;
mod peers;
mod plots;
mod process;
mod report;
mod results;
mod spawn;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use loadgen::stats::LatencySummary;
use thiserror::Error;

use crate::load::LoadSpec;
use crate::results::{HttpPoint, PeerServer, Results, Settings, SpawnRow, SpawnStats, Workloads};
use crate::spawn::SpawnPeer;

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("no kvmfork binary at {0}: build it with `cargo build --release -p kvmfork` (or pass --kvmfork)")]
    MissingKvmfork(PathBuf),
    #[error("no Python template in {0}: build it once with `target/release/kvmfork template build` (minutes on PVM hosts), or pass --template")]
    MissingTemplate(PathBuf),
    #[error("no Node template in {0}: build it once with `target/release/kvmfork template build --language node` (minutes on PVM hosts), or pass --node-template")]
    MissingNodeTemplate(PathBuf),
    #[error("{0}")]
    Usage(String),
    #[error("no Python interpreter at {0} (Debian: apt-get install python3)")]
    MissingPython(String),
    #[error("cannot install the peers' packages: {0}")]
    Install(String),
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} did not come up: {detail}")]
    NotReady { what: String, detail: String },
    #[error("{what} answered wrongly: {detail}")]
    Probe { what: String, detail: String },
    #[error("`kvmfork bench fork` failed ({status}): {stderr}")]
    ForkBenchFailed { status: String, stderr: String },
    #[error("cannot read `kvmfork bench fork` output: {0}")]
    ParseForkBench(String),
    #[error("{what}: {detail}")]
    Load { what: String, detail: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot draw {path}: {message}")]
    Plot { path: PathBuf, message: String },
}

/// Execs each fork-server worker runs at once (kvmfork runs 2 per shard).
const FORK_SERVER_MAX_CHILDREN: usize = 2;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ lives in the workspace")
        .to_path_buf()
}

/// A comma-separated list of counts ("1,16,256,1000").
#[derive(Debug, Clone)]
struct Counts(Vec<usize>);

fn parse_list(raw: &str) -> Result<Counts, String> {
    let list = raw
        .split(',')
        .map(|s| s.trim().parse::<usize>().map_err(|e| format!("{s:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if list.is_empty() || list.contains(&0) {
        return Err("a comma-separated list of positive numbers".into());
    }
    Ok(Counts(list))
}

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "kvmfork's benchmark: fork and exec latency, HTTP exec load, memory per sandbox, and the peers \
(python3 -c, bubblewrap, a fork-per-request CPython server, nginx) in one run. Writes docs/benchmarks.md, \
docs/bench/*.png and docs/bench/results.json. Needs /dev/kvm, a built kvmfork and its Python template; \
installs bubblewrap, nginx-light and fonts-dejavu-core with apt-get when run as root."
)]
struct Args {
    /// Directory for benchmarks.md (plots and results.json go to its bench/ subdirectory).
    #[arg(long, default_value_os_t = workspace().join("docs"))]
    out_dir: PathBuf,
    /// kvmfork binary [default: $CARGO_TARGET_DIR or <workspace>/target, then release/kvmfork].
    #[arg(long)]
    kvmfork: Option<PathBuf>,
    /// Template directory [default: the newest cached Python template].
    #[arg(long)]
    template: Option<PathBuf>,
    /// Iterations per method of `kvmfork bench fork` (fresh-VM forks dominate its
    /// run time: ~25 ms each with the cached template on PVM).
    #[arg(long, default_value_t = 500)]
    fork_iterations: usize,
    /// Sandboxes alive at once for the memory table.
    #[arg(long, default_value = "1,10,100,1000", value_parser = parse_list)]
    alive: Counts,
    /// Largest alive count at which each sandbox also runs the snippet (fresh-VM
    /// execs cost tens of ms each on PVM).
    #[arg(long, default_value_t = 100)]
    max_exec_alive: usize,
    /// HTTP connection counts.
    #[arg(long, default_value = "1,16,256,1000", value_parser = parse_list)]
    connections: Counts,
    /// Measured time per HTTP exec point.
    #[arg(long, default_value = "10s", value_parser = loadgen::cli::parse_duration)]
    duration: Duration,
    /// Measured time per raw-HTTP (health, nginx) point.
    #[arg(long, default_value = "5s", value_parser = loadgen::cli::parse_duration)]
    health_duration: Duration,
    /// Unmeasured load before each HTTP point.
    #[arg(long, default_value = "2s", value_parser = loadgen::cli::parse_duration)]
    warmup: Duration,
    /// Runs per process peer (each serially, then again one per core at once).
    #[arg(long, default_value_t = 200)]
    spawn_iterations: usize,
    /// CPython for the peers (Debian's, like the guest's).
    #[arg(long, default_value = "/usr/bin/python3")]
    python: String,
    /// kvmfork serve --queue-depth: execs queued per shard before 503.
    #[arg(long, default_value_t = 2048)]
    queue_depth: usize,
    /// Checked runs per snippet and path in the workload suite (0 skips the
    /// suite). PVM snippets that grow memory take tens of seconds each.
    #[arg(long, default_value_t = 3)]
    workload_runs: usize,
    /// Time budget per snippet and path in the workload suite: after the run
    /// that takes a path's total for a snippet past it, that path makes no
    /// further run of it (0s: no budget). Keeps the default run within
    /// minutes while PVM's guest page faults make the big snippets take
    /// minutes each through kvmfork.
    #[arg(long, default_value = "30s", value_parser = loadgen::cli::parse_duration)]
    workload_budget: Duration,
    /// Run only the workload suite: replaces its section of benchmarks.md and
    /// its entry in bench/results.json, leaving the other measurements as they are.
    #[arg(long)]
    workloads_only: bool,
    /// Run only the snippets whose names (as in the table) contain NAME,
    /// case-insensitive (repeatable): `--workload np.ones --workload sort`.
    #[arg(long = "workload", value_name = "NAME")]
    workload: Vec<String>,
    /// Node template directory for the suite [default: the newest cached Node template].
    #[arg(long)]
    node_template: Option<PathBuf>,
    /// Node for the Node peers (Debian's, like the guest's).
    #[arg(long, default_value = "/usr/bin/node")]
    node: String,
}

impl Args {
    fn kvmfork_path(&self) -> PathBuf {
        self.kvmfork.clone().unwrap_or_else(|| {
            std::env::var_os("KVMFORK_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    let target = std::env::var_os("CARGO_TARGET_DIR")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| workspace().join("target"));
                    target.join("release/kvmfork")
                })
        })
    }
}

struct Progress {
    start: Instant,
}

impl Progress {
    fn step(&self, what: &str) {
        eprintln!("[{:>6.1}s] {what}", self.start.elapsed().as_secs_f64());
    }
}

/// Latency histograms of one server, by connection count.
type Series = Vec<(usize, Histogram<u64>)>;

/// Histograms kept for the plots (results.json has the summaries).
#[derive(Default)]
struct Curves {
    kvmfork_exec: Series,
    /// Per fork-server variant, its label and points.
    fork_servers: Vec<(String, Series)>,
    kvmfork_health: Series,
    nginx: Series,
    spawn: Vec<(String, Histogram<u64>)>,
}

fn version_of(argv: &[&str]) -> String {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown version".into())
}

fn http_series(
    progress: &Progress,
    server: &process::Server,
    request: &str,
    connections: &[usize],
    duration: Duration,
    warmup: Duration,
    curves: &mut Vec<(usize, Histogram<u64>)>,
) -> Result<Vec<HttpPoint>, BenchError> {
    let url = server.url();
    let mut points = Vec::new();
    for &c in connections {
        let spec = LoadSpec {
            url: &url,
            request,
            connections: c,
            duration,
            warmup,
        };
        let result = spec.run()?;
        let r = &result.report;
        progress.step(&format!(
            "  {} {request} c={c}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, errors {}",
            server.name, r.ok_rps, r.latency.p50_ms, r.latency.p99_ms, r.errors.total
        ));
        curves.push((c, result.latency.clone()));
        points.push(HttpPoint {
            connections: c,
            loadgen: spec.argv().join(" "),
            report: result.report,
        });
    }
    Ok(points)
}

fn spawn_stats(result: &spawn::SpawnResult) -> SpawnStats {
    SpawnStats {
        parallel: result.parallel,
        per_second: result.per_second(),
        latency: LatencySummary::of(&result.latency),
    }
}

/// The kvmfork binary and the Python template, checked.
fn kvmfork_and_template(args: &Args) -> Result<(PathBuf, PathBuf), BenchError> {
    let kvmfork = args.kvmfork_path();
    if !kvmfork.is_file() {
        return Err(BenchError::MissingKvmfork(kvmfork));
    }
    let template = match &args.template {
        Some(t) => t.clone(),
        None => peers::find_template("python").ok_or_else(|| {
            BenchError::MissingTemplate(peers::kvmfork_cache_dir().join("templates"))
        })?,
    };
    if !template.join("state.snap").is_file() {
        return Err(BenchError::MissingTemplate(template));
    }
    if !Path::new(&args.python).is_file() {
        return Err(BenchError::MissingPython(args.python.clone()));
    }
    Ok((kvmfork, template))
}

fn scratch_dir() -> Result<tempfile::TempDir, BenchError> {
    tempfile::Builder::new()
        .prefix("kvmfork-bench-")
        .tempdir()
        .map_err(|source| BenchError::Write {
            path: std::env::temp_dir(),
            source,
        })
}

/// What the workload suite needs beyond the Python template: the host's
/// numpy (and node), and the Node template when Node snippets are selected.
/// Checked before any measurement so a missing piece fails in a second,
/// not after the other phases ran.
fn workload_node_template(
    args: &Args,
    snippets: &[&'static workloads::Snippet],
) -> Result<Option<PathBuf>, BenchError> {
    let with_node = snippets
        .iter()
        .any(|s| s.language == workloads::Language::Node);
    let mut needs = vec![peers::NUMPY];
    if with_node {
        needs.push(peers::NODE);
    }
    peers::ensure_installed(&needs)?;
    if !with_node {
        return Ok(None);
    }
    let t = match &args.node_template {
        Some(t) => t.clone(),
        None => peers::find_template("node").ok_or_else(|| {
            BenchError::MissingNodeTemplate(peers::kvmfork_cache_dir().join("templates"))
        })?,
    };
    if !t.join("state.snap").is_file() {
        return Err(BenchError::MissingNodeTemplate(t));
    }
    Ok(Some(t))
}

/// The workload suite (bench/src/workloads.rs): one kvmfork server with the
/// Python and Node templates, the fork server and the Node peer, each
/// snippet through all three paths.
fn run_workloads(
    args: &Args,
    progress: &Progress,
    kvmfork: &Path,
    template: &Path,
    snippets: &[&'static workloads::Snippet],
) -> Result<Workloads, BenchError> {
    let started = Instant::now();
    // Probed now: the commit is the one whose code runs (the tree may
    // change during a long run).
    let host = host::Host::probe(&workspace());
    let load_before = host::load_average();
    let node_template = workload_node_template(args, snippets)?;
    let workdir = scratch_dir()?;
    let mut templates = vec![template];
    templates.extend(node_template.as_deref());
    let extra = vec![
        "--max-sandbox-dirty-mib".to_string(),
        workloads::MAX_SANDBOX_DIRTY_MIB.to_string(),
    ];
    progress.step(&format!(
        "workload suite: {} snippets × {} runs; kvmfork serve with {}",
        snippets.len(),
        args.workload_runs,
        templates
            .iter()
            .map(|t| t.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    ));
    let (server, serve_args) = peers::start_kvmfork_with(
        kvmfork,
        &templates,
        workdir.path(),
        args.queue_depth,
        &extra,
    )?;
    let modules = workloads::Modules {
        template: workloads::probe_template(server.addr)?,
        host: workloads::probe_host(&args.python),
    };
    progress.step(&format!(
        "  optional modules: template {:?}, host {:?}",
        modules.template, modules.host
    ));
    // The fork server preloads what kvmfork's template has imported: numpy,
    // and the optional modules both sides have.
    let mut preload = vec!["numpy"];
    preload.extend(workloads::OPTIONAL_MODULES.iter().copied().filter(|m| {
        modules.template.iter().any(|t| t == m) && modules.host.iter().any(|h| h == m)
    }));
    let script = workspace().join("bench/peers/fork_server.py");
    let fork_server =
        peers::start_fork_server(&args.python, &script, 1, 1, &preload, workdir.path())?;
    let node_server = if node_template.is_some() {
        let script = workspace().join("bench/peers/node_fork_server.js");
        // Two spares: one boots while the other runs.
        Some(peers::start_node_fork_server(
            &args.node,
            &script,
            2,
            workdir.path(),
        )?)
    } else {
        None
    };
    let http = |label: &str, addr| workloads::Path3 {
        label: label.into(),
        runner: Ok(workloads::Runner::Http { addr }),
    };
    let fresh = |language| {
        let argv = workloads::fresh_argv(language, &args.python, &args.node);
        workloads::Path3 {
            label: format!("`{}`", argv.join(" ")),
            runner: Ok(workloads::Runner::Spawn { argv }),
        }
    };
    let python_paths = workloads::Paths {
        kvmfork: http("kvmfork", server.addr),
        warm: http(
            &format!("fork server (os.fork, {} preloaded)", preload.join(", ")),
            fork_server.addr,
        ),
        fresh: fresh(workloads::Language::Python),
    };
    let node_paths = workloads::Paths {
        kvmfork: http("kvmfork", server.addr),
        warm: match &node_server {
            Some(s) => http("pre-spawned node process", s.addr),
            None => workloads::Path3 {
                label: "pre-spawned node process".into(),
                runner: Err("not started".into()),
            },
        },
        fresh: fresh(workloads::Language::Node),
    };
    let budget = (!args.workload_budget.is_zero()).then_some(args.workload_budget);
    let rows = workloads::run_suite(
        snippets,
        args.workload_runs,
        budget,
        &python_paths,
        &node_paths,
        &modules,
        &|line| progress.step(line),
    );
    server.stop(Duration::from_secs(30));
    fork_server.stop(Duration::from_secs(10));
    if let Some(s) = node_server {
        s.stop(Duration::from_secs(10));
    }
    Ok(Workloads {
        host,
        load_before,
        load_after: host::load_average(),
        wall_s: started.elapsed().as_secs_f64(),
        runs: args.workload_runs,
        budget_s: budget.map(|b| b.as_secs_f64()),
        timeout_s: workloads::EXEC_TIMEOUT_S,
        kvmfork_serve_args: serve_args,
        template_modules: modules.template,
        host_modules: modules.host,
        fork_server_preload: preload.iter().map(|m| m.to_string()).collect(),
        python_version: version_of(&[&args.python, "--version"]),
        node_version: format!("Node {}", version_of(&[&args.node, "--version"])),
        rows,
    })
}

fn run(
    args: &Args,
    snippets: &[&'static workloads::Snippet],
) -> Result<(Results, Curves), BenchError> {
    let progress = Progress {
        start: Instant::now(),
    };
    let (kvmfork, template) = kvmfork_and_template(args)?;
    peers::ensure_installed(&[peers::BWRAP, peers::NGINX, peers::FONT])?;
    if args.workload_runs > 0 {
        workload_node_template(args, snippets)?;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workdir = scratch_dir()?;
    let host = host::Host::probe(&workspace());
    let load_before = host::load_average();
    progress.step(&format!(
        "{} × {}, kernel {}, KVM {}, load {load_before:.2}; template {}",
        host.cores,
        host.cpu_model,
        host.kernel,
        host.kvm_kind,
        template.display()
    ));
    let mut curves = Curves::default();

    progress.step(&format!(
        "kvmfork bench fork ({} iterations, alive {:?})",
        args.fork_iterations, args.alive.0
    ));
    let fork = fork_bench::run(
        &kvmfork,
        &template,
        args.fork_iterations,
        &args.alive.0,
        args.max_exec_alive,
    )?;
    progress.step(&format!(
        "  pooled fork p50 {:.0} µs, fork+exec p50 {:.0} µs; fresh VM fork p50 {:.0} µs",
        fork.pooled_fork.p50_us, fork.pooled_total.p50_us, fork.fresh_fork.p50_us
    ));

    progress.step("kvmfork serve");
    let (server, kvmfork_serve_args) =
        peers::start_kvmfork(&kvmfork, &template, workdir.path(), args.queue_depth)?;
    let kvmfork_exec = http_series(
        &progress,
        &server,
        "print",
        &args.connections.0,
        args.duration,
        args.warmup,
        &mut curves.kvmfork_exec,
    )?;
    let kvmfork_health = http_series(
        &progress,
        &server,
        "health",
        &args.connections.0,
        args.health_duration,
        args.warmup / 2,
        &mut curves.kvmfork_health,
    )?;
    server.stop(Duration::from_secs(30));

    // Two fork servers: one with what kvmfork's template has (numpy imported
    // before the fork, which makes every fork copy a bigger process), and the
    // bare interpreter, the cheapest fork there is.
    let numpy = Command::new(&args.python)
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    let mut variants: Vec<(&str, Vec<&str>)> = Vec::new();
    if numpy {
        variants.push(("fork server, numpy preloaded", vec!["numpy"]));
    }
    variants.push(("fork server, bare CPython", Vec::new()));
    let script = workspace().join("bench/peers/fork_server.py");
    let mut fork_servers = Vec::new();
    for (label, preload) in variants {
        progress.step(&format!(
            "{label} ({cores} workers, {FORK_SERVER_MAX_CHILDREN} execs at once each)"
        ));
        let server = peers::start_fork_server(
            &args.python,
            &script,
            cores,
            FORK_SERVER_MAX_CHILDREN,
            &preload,
            workdir.path(),
        )?;
        let mut series = Vec::new();
        let points = http_series(
            &progress,
            &server,
            "print",
            &args.connections.0,
            args.duration,
            args.warmup,
            &mut series,
        )?;
        server.stop(Duration::from_secs(10));
        curves.fork_servers.push((label.to_string(), series));
        fork_servers.push(PeerServer {
            label: label.into(),
            preload: preload.iter().map(|m| m.to_string()).collect(),
            points,
        });
    }

    progress.step(&format!("nginx ({cores} workers)"));
    let server = peers::start_nginx(workdir.path(), cores)?;
    let nginx = http_series(
        &progress,
        &server,
        "health",
        &args.connections.0,
        args.health_duration,
        args.warmup / 2,
        &mut curves.nginx,
    )?;
    server.stop(Duration::from_secs(10));

    let code = "print(1+1)";
    let mut spawn_peers = vec![
        (
            SpawnPeer::python(report::PYTHON_C, &args.python, code, "2\n"),
            "none (a new process)",
            true,
        ),
        (
            SpawnPeer::bubblewrap(report::BWRAP, peers::BWRAP.path, &args.python, code, "2\n"),
            "namespaces (bubblewrap)",
            true,
        ),
    ];
    if numpy {
        // kvmfork's template has numpy imported; a fresh process pays for the import.
        spawn_peers.push((
            SpawnPeer::python(
                report::PYTHON_C_NUMPY,
                &args.python,
                "import numpy; print(1+1)",
                "2\n",
            ),
            "none (a new process)",
            false,
        ));
    }
    let mut spawn = Vec::new();
    for (peer, isolation, with_parallel) in spawn_peers {
        let iterations = if with_parallel {
            args.spawn_iterations
        } else {
            (args.spawn_iterations / 4).max(10)
        };
        progress.step(&format!("{} ({iterations} runs serially)", peer.label));
        let serial = peer.measure(iterations, 1, 3)?;
        let parallel = if with_parallel {
            progress.step(&format!(
                "{} ({iterations} runs, {cores} at once)",
                peer.label
            ));
            Some(spawn_stats(&peer.measure(iterations, cores, 0)?))
        } else {
            None
        };
        progress.step(&format!(
            "  p50 {:.1} ms{}",
            LatencySummary::of(&serial.latency).p50_ms,
            parallel.as_ref().map_or(String::new(), |p| format!(
                ", {:.0} runs/s at {cores} at once",
                p.per_second
            ))
        ));
        curves
            .spawn
            .push((peer.label.clone(), serial.latency.clone()));
        spawn.push(SpawnRow {
            label: peer.label.clone(),
            isolation: isolation.into(),
            argv: peer.argv.clone(),
            serial: spawn_stats(&serial),
            parallel,
        });
    }

    let workloads = if args.workload_runs > 0 {
        Some(run_workloads(
            args, &progress, &kvmfork, &template, snippets,
        )?)
    } else {
        None
    };

    let settings = Settings {
        code: code.into(),
        template: template.display().to_string(),
        fork_iterations: args.fork_iterations,
        max_exec_alive: args.max_exec_alive,
        alive: args.alive.0.clone(),
        connections: args.connections.0.clone(),
        exec_duration_s: args.duration.as_secs_f64(),
        health_duration_s: args.health_duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        spawn_iterations: args.spawn_iterations,
        spawn_parallel: cores,
        python: args.python.clone(),
        python_version: version_of(&[&args.python, "--version"]),
        bwrap_version: version_of(&[peers::BWRAP.path, "--version"]),
        nginx_version: version_of(&[peers::NGINX.path, "-v"])
            .trim_start_matches("nginx version: ")
            .to_string(),
        kvmfork_serve_args,
        fork_server_workers: cores,
        fork_server_max_children: FORK_SERVER_MAX_CHILDREN,
        nginx_workers: cores,
    };
    let results = Results {
        schema: results::SCHEMA,
        host,
        load_before,
        load_after: host::load_average(),
        wall_s: progress.start.elapsed().as_secs_f64(),
        settings,
        fork,
        kvmfork_exec,
        fork_servers,
        kvmfork_health,
        nginx,
        spawn,
        workloads,
    };
    Ok((results, curves))
}

fn find(series: &[(usize, Histogram<u64>)], connections: usize) -> Option<&Histogram<u64>> {
    series
        .iter()
        .find(|(c, _)| *c == connections)
        .map(|(_, h)| h)
}

/// Draws the plots; returns (title, path relative to benchmarks.md).
fn draw_plots(
    results: &Results,
    curves: &Curves,
    plot_dir: &Path,
) -> Result<Vec<(String, String)>, BenchError> {
    let mut drawn = Vec::new();
    let mut one_at_a_time = Vec::new();
    if let Some(h) = find(&curves.kvmfork_exec, 1) {
        one_at_a_time.push(plots::Curve {
            label: "kvmfork HTTP exec (1 connection)".into(),
            histogram: h,
        });
    }
    for (label, series) in &curves.fork_servers {
        if let Some(h) = find(series, 1) {
            one_at_a_time.push(plots::Curve {
                label: format!("{label} HTTP exec (1 connection)"),
                histogram: h,
            });
        }
    }
    for (label, h) in &curves.spawn {
        one_at_a_time.push(plots::Curve {
            label: format!("{label} (spawn to exit)"),
            histogram: h,
        });
    }
    let title = format!("{}, one at a time", results.settings.code);
    plots::render(&plot_dir.join("one-at-a-time.png"), &title, &one_at_a_time)?;
    drawn.push((title, "bench/one-at-a-time.png".to_string()));
    for &c in &results.settings.connections {
        let mut named: Vec<(String, &Series)> = vec![("kvmfork exec".into(), &curves.kvmfork_exec)];
        named.extend(
            curves
                .fork_servers
                .iter()
                .map(|(label, series)| (format!("{label} exec"), series)),
        );
        named.push(("kvmfork GET /v1/health".into(), &curves.kvmfork_health));
        named.push(("nginx return 200".into(), &curves.nginx));
        let lines: Vec<plots::Curve> = named
            .into_iter()
            .filter_map(|(label, series)| {
                find(series, c).map(|h| plots::Curve {
                    label,
                    histogram: h,
                })
            })
            .collect();
        let title = format!(
            "HTTP, {c} connection{}, closed loop",
            if c == 1 { "" } else { "s" }
        );
        let file = format!("http-c{c}.png");
        plots::render(&plot_dir.join(&file), &title, &lines)?;
        drawn.push((title, format!("bench/{file}")));
    }
    Ok(drawn)
}

fn write(path: &Path, contents: &str) -> Result<(), BenchError> {
    std::fs::write(path, contents).map_err(|source| BenchError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// `--workloads-only`: runs the suite and replaces its section of
/// benchmarks.md and its entry in results.json.
fn workloads_only(args: &Args, snippets: &[&'static workloads::Snippet]) -> ExitCode {
    let progress = Progress {
        start: Instant::now(),
    };
    let done = kvmfork_and_template(args).and_then(|(kvmfork, template)| {
        run_workloads(args, &progress, &kvmfork, &template, snippets)
    });
    let w = match done {
        Ok(w) => w,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let section = report::workloads_section(&w);
    let plot_dir = args.out_dir.join("bench");
    let page_path = args.out_dir.join("benchmarks.md");
    let json_path = plot_dir.join("results.json");
    let written = std::fs::create_dir_all(&plot_dir)
        .map_err(|source| BenchError::Write {
            path: plot_dir.clone(),
            source,
        })
        .and_then(|()| {
            let page = std::fs::read_to_string(&page_path).unwrap_or_default();
            write(&page_path, &report::splice_workloads(&page, &section))?;
            // Keep results.json in step with the page: the other phases' numbers stay.
            let mut json = std::fs::read_to_string(&json_path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .filter(|v| v.is_object())
                .unwrap_or_else(|| serde_json::json!({ "schema": results::SCHEMA }));
            json["workloads"] = serde_json::to_value(&w).expect("results serialise");
            write(
                &json_path,
                &(serde_json::to_string_pretty(&json).expect("results serialise") + "\n"),
            )
        });
    if let Err(e) = written {
        eprintln!("bench: {e}");
        return ExitCode::from(2);
    }
    println!("{section}");
    eprintln!(
        "bench: wrote the workload section of {} and {}",
        page_path.display(),
        json_path.display()
    );
    if w.kvmfork_failures() > 0 {
        eprintln!(
            "bench: kvmfork failed {} snippets (see the table)",
            w.kvmfork_failures()
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.workloads_only && args.workload_runs == 0 {
        eprintln!("bench: --workloads-only needs --workload-runs of at least 1");
        return ExitCode::from(2);
    }
    // Names are checked before any measurement: a typo fails in a second, not after the run.
    let snippets = match workloads::select(&args.workload) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench: {}", BenchError::Usage(e));
            return ExitCode::from(2);
        }
    };
    if args.workloads_only {
        return workloads_only(&args, &snippets);
    }
    let (results, curves) = match run(&args, &snippets) {
        Ok(done) => done,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let plot_dir = args.out_dir.join("bench");
    let outputs = std::fs::create_dir_all(&plot_dir)
        .map_err(|source| BenchError::Write {
            path: plot_dir.clone(),
            source,
        })
        .and_then(|()| draw_plots(&results, &curves, &plot_dir))
        .and_then(|plots| {
            let json = serde_json::to_string_pretty(&results).expect("results serialise") + "\n";
            write(&plot_dir.join("results.json"), &json)?;
            // The rows the README quotes, ready to paste or include.
            write(&plot_dir.join("headline.md"), &report::headline(&results))?;
            write(
                &args.out_dir.join("benchmarks.md"),
                &report::render(&results, &plots),
            )
        });
    if let Err(e) = outputs {
        eprintln!("bench: {e}");
        return ExitCode::from(2);
    }
    println!("{}", report::headline(&results));
    if let Some(w) = &results.workloads {
        println!("{}", report::workloads_section(w));
    }
    eprintln!(
        "bench: wrote {} and {}",
        args.out_dir.join("benchmarks.md").display(),
        plot_dir.display()
    );
    let errors = results.kvmfork_errors();
    if errors > 0 {
        eprintln!(
            "bench: kvmfork failed {errors} requests during the run (see the errors columns)"
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
