//! docs/benchmarks.md: a headline table (the rows the README quotes), then
//! every measurement, the plots and how each number was taken.

use std::fmt::Write;

use loadgen::stats::LatencySummary;

use crate::fork_bench::Percentiles;
use crate::results::{HttpPoint, Results, SpawnRow, WorkloadPath, Workloads};

/// Milliseconds, with a unit that keeps 2-3 significant digits.
pub fn ms(value_ms: f64) -> String {
    if value_ms < 1.0 {
        format!("{:.0} µs", value_ms * 1000.0)
    } else if value_ms < 10.0 {
        format!("{value_ms:.2} ms")
    } else if value_ms < 100.0 {
        format!("{value_ms:.1} ms")
    } else if value_ms < 10_000.0 {
        format!("{value_ms:.0} ms")
    } else {
        format!("{:.1} s", value_ms / 1000.0)
    }
}

fn us(value_us: f64) -> String {
    ms(value_us / 1000.0)
}

/// Requests per second, rounded to what the noise allows.
pub fn rps(value: f64) -> String {
    if value >= 1000.0 {
        let rounded = (value / 10.0).round() as u64 * 10;
        let digits = rounded.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(' ');
            }
            out.push(c);
        }
        out
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// How kvmfork's latency compares with a peer's ("12× faster", "1.5× slower").
pub fn latency_ratio(kvmfork_ms: f64, peer_ms: f64) -> String {
    if kvmfork_ms <= 0.0 || peer_ms <= 0.0 {
        return "n/a".into();
    }
    // Two decimals near parity, so 1.05 does not read as "1.0× slower".
    let factor = |r: f64| {
        if r >= 10.0 {
            format!("{r:.0}")
        } else if r >= 2.0 {
            format!("{r:.1}")
        } else {
            format!("{r:.2}")
        }
    };
    if kvmfork_ms <= peer_ms {
        format!("kvmfork {}× faster", factor(peer_ms / kvmfork_ms))
    } else {
        format!("kvmfork {}× slower", factor(kvmfork_ms / peer_ms))
    }
}

/// kvmfork's throughput as a multiple of a peer's.
pub fn throughput_ratio(kvmfork_rps: f64, peer_rps: f64) -> String {
    if peer_rps <= 0.0 {
        return "n/a".into();
    }
    let r = kvmfork_rps / peer_rps;
    if r >= 10.0 {
        format!("{r:.0}× the req/s")
    } else {
        format!("{r:.2}× the req/s")
    }
}

fn errors_cell(point: &HttpPoint) -> String {
    let e = &point.report.errors;
    if e.total == 0 {
        return "0".into();
    }
    let mut parts: Vec<String> = e
        .by_status
        .iter()
        .map(|(s, n)| format!("{n}×{s}"))
        .collect();
    let k = &e.by_kind;
    for (name, n) in [
        ("connect", k.connect),
        ("timeout", k.timeout),
        ("parse", k.parse),
        ("closed", k.closed),
    ] {
        if n > 0 {
            parts.push(format!("{n} {name}"));
        }
    }
    format!("**{}** ({})", e.total, parts.join(", "))
}

fn spawn_for<'a>(results: &'a Results, label: &str) -> Option<&'a SpawnRow> {
    results.spawn.iter().find(|s| s.label == label)
}

pub const PYTHON_C: &str = "python3 -c";
pub const PYTHON_C_NUMPY: &str = "python3 -c, import numpy";
pub const BWRAP: &str = "bwrap + python3 -c";

/// The rows the README quotes. Every row names kvmfork's number, the peer's and the ratio.
pub fn headline(results: &Results) -> String {
    let mut out = String::new();
    let f = &results.fork;
    let _ = writeln!(
        out,
        "| measurement ({}) | kvmfork | peer | kvmfork vs peer |",
        results.settings.code.replace('|', "\\|")
    );
    let _ = writeln!(out, "|---|---|---|---|");
    let _ = writeln!(
        out,
        "| fork to runnable, p50 | {} (pooled VM, copy-back reset) | {} (fresh VM per fork) | {} |",
        us(f.pooled_fork.p50_us),
        us(f.fresh_fork.p50_us),
        latency_ratio(f.pooled_fork.p50_us, f.fresh_fork.p50_us)
    );
    let _ = writeln!(
        out,
        "| fork + exec, in-process, p50 | {} | {} (fresh VM per fork) | {} |",
        us(f.pooled_total.p50_us),
        us(f.fresh_total.p50_us),
        latency_ratio(f.pooled_total.p50_us, f.fresh_total.p50_us)
    );
    if let Some(kvmfork1) = Results::at(&results.kvmfork_exec, 1) {
        let kvmfork_p50 = kvmfork1.report.latency.p50_ms;
        for server in &results.fork_servers {
            if let Some(peer) = Results::at(&server.points, 1) {
                let _ = writeln!(
                    out,
                    "| HTTP exec, 1 connection, p50 | {} | {} ({}, no isolation) | {} |",
                    ms(kvmfork_p50),
                    ms(peer.report.latency.p50_ms),
                    server.label,
                    latency_ratio(kvmfork_p50, peer.report.latency.p50_ms)
                );
            }
        }
        for label in [PYTHON_C, BWRAP, PYTHON_C_NUMPY] {
            if let Some(peer) = spawn_for(results, label) {
                let _ = writeln!(
                    out,
                    "| HTTP exec, 1 connection, p50 vs a process per run | {} | {} (`{}`, spawn to exit) | {} |",
                    ms(kvmfork_p50),
                    ms(peer.serial.latency.p50_ms),
                    label,
                    latency_ratio(kvmfork_p50, peer.serial.latency.p50_ms)
                );
            }
        }
    }
    for server in &results.fork_servers {
        if let (Some(kvmfork), Some(peer)) = (
            Results::best(&results.kvmfork_exec),
            Results::best(&server.points),
        ) {
            let _ = writeln!(
                out,
                "| HTTP exec, best throughput | {} req/s ({} conn.) | {} req/s ({} conn., {}) | {} |",
                rps(kvmfork.report.ok_rps),
                kvmfork.connections,
                rps(peer.report.ok_rps),
                peer.connections,
                server.label,
                throughput_ratio(kvmfork.report.ok_rps, peer.report.ok_rps)
            );
        }
    }
    if let Some(kvmfork) = Results::best(&results.kvmfork_exec) {
        for label in [PYTHON_C, BWRAP] {
            if let Some(par) = spawn_for(results, label).and_then(|s| s.parallel.as_ref()) {
                let _ = writeln!(
                    out,
                    "| exec throughput vs processes | {} req/s | {} runs/s (`{}`, {} at once) | {} |",
                    rps(kvmfork.report.ok_rps),
                    rps(par.per_second),
                    label,
                    par.parallel,
                    throughput_ratio(kvmfork.report.ok_rps, par.per_second)
                );
            }
        }
    }
    let top = results
        .settings
        .connections
        .iter()
        .max()
        .copied()
        .unwrap_or(0);
    for server in &results.fork_servers {
        if let (Some(kvmfork), Some(peer)) = (
            Results::at(&results.kvmfork_exec, top),
            Results::at(&server.points, top),
        ) {
            let _ = writeln!(
                out,
                "| HTTP exec, {top} connections: p50 / p99, errors | {} / {}, {} errors | {} / {}, {} errors ({}) | {} (p50) |",
                ms(kvmfork.report.latency.p50_ms),
                ms(kvmfork.report.latency.p99_ms),
                kvmfork.errors(),
                ms(peer.report.latency.p50_ms),
                ms(peer.report.latency.p99_ms),
                peer.errors(),
                server.label,
                latency_ratio(kvmfork.report.latency.p50_ms, peer.report.latency.p50_ms)
            );
        }
    }
    if let (Some(kvmfork), Some(peer)) = (
        Results::best(&results.kvmfork_health),
        Results::best(&results.nginx),
    ) {
        let _ = writeln!(
            out,
            "| GET /v1/health, best throughput | {} req/s ({} conn.) | {} req/s ({} conn., nginx `return 200`) | {} |",
            rps(kvmfork.report.ok_rps),
            kvmfork.connections,
            rps(peer.report.ok_rps),
            peer.connections,
            throughput_ratio(kvmfork.report.ok_rps, peer.report.ok_rps)
        );
    }
    if let Some(row) = f.alive.iter().max_by_key(|r| r.alive) {
        let _ = writeln!(
            out,
            "| host memory per live sandbox, {} alive, forked (runnable) | {:.0} KiB (drop in MemAvailable) | — | — |",
            row.alive, row.forked_mem_available_kib
        );
    }
    if let Some((row, kib)) = f
        .alive
        .iter()
        .filter_map(|r| r.exec_mem_available_kib.map(|k| (r, k)))
        .max_by_key(|(r, _)| r.alive)
    {
        let _ = writeln!(
            out,
            "| host memory per live sandbox, {} alive, after each ran the snippet | {kib:.0} KiB (drop in MemAvailable) | — | — |",
            row.alive
        );
    }
    out
}

fn percentiles_row(name: &str, p: &Percentiles) -> String {
    format!(
        "| {name} | {} | {} | {} | {} | {} | {} |",
        us(p.p50_us),
        us(p.p90_us),
        us(p.p99_us),
        us(p.max_us),
        us(p.mean_us),
        p.n
    )
}

fn latency_cells(l: &LatencySummary) -> String {
    format!(
        "{} | {} | {} | {} | {}",
        ms(l.p50_ms),
        ms(l.p90_ms),
        ms(l.p99_ms),
        ms(l.p99_9_ms),
        ms(l.max_ms)
    )
}

/// kvmfork's row per connection count, then each peer's with kvmfork's ratio to it.
fn http_table(out: &mut String, kvmfork: &[HttpPoint], peers: &[(&str, &[HttpPoint])]) {
    let _ = writeln!(out, "| connections | server | req/s | p50 | p90 | p99 | p99.9 | max | errors | kvmfork vs this server |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for point in kvmfork {
        let _ = writeln!(
            out,
            "| {} | kvmfork | {} | {} | {} | |",
            point.connections,
            rps(point.report.ok_rps),
            latency_cells(&point.report.latency),
            errors_cell(point)
        );
        for (name, points) in peers {
            if let Some(p) = Results::at(points, point.connections) {
                let _ = writeln!(
                    out,
                    "| {} | {name} | {} | {} | {} | {}, p50 {} |",
                    p.connections,
                    rps(p.report.ok_rps),
                    latency_cells(&p.report.latency),
                    errors_cell(p),
                    throughput_ratio(point.report.ok_rps, p.report.ok_rps),
                    latency_ratio(point.report.latency.p50_ms, p.report.latency.p50_ms)
                );
            }
        }
    }
}

/// kvmfork's time as a multiple of a peer's ("578×", "1.4×", "0.45×"),
/// bold past `target` (the issue's goal for that column).
pub fn workload_ratio(kvmfork: &WorkloadPath, peer: &WorkloadPath, target: f64) -> String {
    let (Some(k), Some(p)) = (kvmfork.p50_ms, peer.p50_ms) else {
        return "—".into();
    };
    if k <= 0.0 || p <= 0.0 {
        return "—".into();
    }
    let r = k / p;
    let text = if r >= 10.0 {
        format!("{r:.0}×")
    } else if r >= 1.0 {
        format!("{r:.1}×")
    } else {
        format!("{r:.2}×")
    };
    if r > target {
        format!("**{text}**")
    } else {
        text
    }
}

/// Marks around the workload section of benchmarks.md, so a workloads-only
/// run (`bench/run --workloads-only`) can replace just that section.
pub const WORKLOADS_BEGIN: &str = "<!-- workloads:begin -->";
pub const WORKLOADS_END: &str = "<!-- workloads:end -->";

/// The workload table with its provenance, between the markers.
pub fn workloads_section(w: &Workloads) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{WORKLOADS_BEGIN}");
    let _ = writeln!(
        out,
        "## Workload suite: real snippets, kvmfork against processes
"
    );
    let h = &w.host;
    let _ = writeln!(
        out,
        "Run {} on commit {} ({} × {}, KVM {}, load {:.2} before, {:.2} after, {:.0} s). \
         After {} unmeasured `print(1+1)` / `console.log(1+1)` per server (one per fresh-process path), each snippet ran {} time{} on each path{}, \
         the three paths interleaved per snippet (order rotated each round) \
         so they share the machine's noise; every run's stdout was checked against the value in the snippet's row of \
         [bench/src/workloads.rs](../bench/src/workloads.rs) — a wrong answer is a failure, not a timing. \
         Times are client-side wall time: HTTP connect to answer for kvmfork and the warm peers, spawn to exit for a fresh process.\n",
        h.date,
        h.commit,
        h.cores,
        h.cpu_model,
        h.kvm_kind,
        w.load_before,
        w.load_after,
        w.wall_s,
        crate::workloads::WARMUP_RUNS_HTTP,
        w.runs,
        if w.runs == 1 { "" } else { "s" },
        w.budget_s.map_or(String::new(), |b| format!(
            " (a path stops repeating a snippet once its runs of it took {b:.0} s in total; those cells say how many runs they had)"
        )),
    );
    let what = if w.runs >= 5 { "p50 / p90" } else { "p50" };
    let _ = writeln!(
        out,
        "| snippet | language | kvmfork HTTP, {what} | warm process ¹, {what} | fresh process ², {what} | kvmfork ÷ warm (p50) | kvmfork ÷ fresh (p50) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for row in &w.rows {
        if let Some(why) = &row.skipped {
            let _ = writeln!(
                out,
                "| {} | {} | skipped: {why} | | | | |",
                row.name, row.language
            );
            continue;
        }
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.name,
            row.language,
            row.kvmfork.cell_of(w.runs),
            row.warm.cell_of(w.runs),
            row.fresh.cell_of(w.runs),
            workload_ratio(&row.kvmfork, &row.warm, 3.0),
            workload_ratio(&row.kvmfork, &row.fresh, 1.0)
        );
    }
    let labels = |language: &str, pick: fn(&crate::results::WorkloadRow) -> &WorkloadPath| {
        w.rows
            .iter()
            .find(|r| r.language == language && r.skipped.is_none())
            .map(|r| pick(r).label.clone())
    };
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "¹ Python: {}; Node: {}. ² Python: {}; Node: {}. Ratios above the issue's targets (≤ 3× the warm peer, ≤ 1× a fresh process) are bold.\n",
        labels("python", |r| &r.warm).unwrap_or_else(|| "not run".into()),
        labels("node", |r| &r.warm).unwrap_or_else(|| "not run".into()),
        labels("python", |r| &r.fresh).unwrap_or_else(|| "not run".into()),
        labels("node", |r| &r.fresh).unwrap_or_else(|| "not run".into()),
    );
    let _ = writeln!(
        out,
        "The warm peers isolate nothing beyond a process: the fork server (`bench/peers/fork_server.py`, \
         modules preloaded: {}) `os.fork()`s a warm CPython per run; the Node peer (`bench/peers/node_fork_server.js`) \
         hands each run to a Node process it started ahead of time (Node cannot fork a warm process), so Node's boot is not \
         in its times. Template modules found: {}; host modules found: {}. kvmfork: `kvmfork {}` (each request \
         `timeout_seconds` {:.0}). Interpreters on the host: {}, {}.",
        w.fork_server_preload.join(", "),
        if w.template_modules.is_empty() { "numpy only".to_string() } else { format!("numpy, {}", w.template_modules.join(", ")) },
        if w.host_modules.is_empty() { "numpy only".to_string() } else { format!("numpy, {}", w.host_modules.join(", ")) },
        w.kvmfork_serve_args.join(" "),
        w.timeout_s,
        w.python_version,
        w.node_version
    );
    let _ = writeln!(out, "{WORKLOADS_END}");
    out
}

/// `page` with its workload section replaced by `section` (appended when it
/// has none).
pub fn splice_workloads(page: &str, section: &str) -> String {
    if let (Some(start), Some(end)) = (page.find(WORKLOADS_BEGIN), page.find(WORKLOADS_END)) {
        if start < end {
            let mut tail = &page[end + WORKLOADS_END.len()..];
            tail = tail.strip_prefix('\n').unwrap_or(tail);
            return format!("{}{section}{tail}", &page[..start]);
        }
    }
    let mut out = page.to_string();
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push_str(if out.ends_with('\n') { "\n" } else { "\n\n" });
    }
    out + section
}

/// The whole page.
pub fn render(results: &Results, plots: &[(String, String)]) -> String {
    let h = &results.host;
    let s = &results.settings;
    let f = &results.fork;
    let mut out = String::new();
    let _ = writeln!(out, "# kvmfork benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `bench/run` (`cargo run --release -p bench`) — do not edit by hand; rerun it.\n"
    );
    let _ = writeln!(out, "| machine | |\n|---|---|");
    let _ = writeln!(out, "| CPU | {} × {} |", h.cores, h.cpu_model);
    let _ = writeln!(out, "| memory | {:.1} GiB |", h.memory_gib);
    let _ = writeln!(out, "| kernel | {} |", h.kernel);
    let kvm_note = if h.kvm_kind == "PVM" {
        "PVM (`kvm_pvm`: guest ring 0 is emulated, ~1000× slower than hardware KVM; guest user mode is native)"
    } else {
        "hardware (VT-x / AMD-V)"
    };
    let _ = writeln!(out, "| KVM | {kvm_note} |");
    let _ = writeln!(out, "| date | {} |", h.date);
    let _ = writeln!(out, "| kvmfork commit | {} |", h.commit);
    let _ = writeln!(
        out,
        "| load average (1 min) | {:.2} before, {:.2} after — the machine is shared, so treat tails as noisy |",
        results.load_before, results.load_after
    );
    let _ = writeln!(out, "| run time | {:.0} s |", results.wall_s);
    let _ = writeln!(out, "| snippet | `{}` |\n", s.code);

    let _ = writeln!(out, "## Headline\n");
    if results.kvmfork_errors() > 0 {
        let _ = writeln!(
            out,
            "**kvmfork failed {} requests in this run; see the tables below.**\n",
            results.kvmfork_errors()
        );
    }
    out += &headline(results);

    let _ = writeln!(out, "\n## Fork (in-process, `kvmfork bench fork`)\n");
    let _ = writeln!(
        out,
        "{} iterations per method, no HTTP. *Pooled*: one pre-created VM reset by copying back its dirty pages; \
         *fresh VM*: a new KVM VM + vCPU per fork with the template mapped copy-on-write (Zeroboot's method).\n",
        s.fork_iterations
    );
    let _ = writeln!(
        out,
        "| | p50 | p90 | p99 | max | mean | n |\n|---|---|---|---|---|---|---|"
    );
    for (name, p) in [
        ("fork to runnable, pooled reset", &f.pooled_fork),
        ("fork to runnable, fresh VM", &f.fresh_fork),
        ("exec only (guest run), pooled", &f.pooled_exec_only),
        ("fork + exec, pooled reset", &f.pooled_total),
        ("fork + exec, fresh VM", &f.fresh_total),
    ] {
        let _ = writeln!(out, "{}", percentiles_row(name, p));
    }
    let _ = writeln!(
        out,
        "\nFresh VM ÷ pooled at p50: fork {:.1}×, fork + exec {:.1}×.\n",
        f.fresh_fork.p50_us / f.pooled_fork.p50_us.max(1.0),
        f.fresh_total.p50_us / f.pooled_total.p50_us.max(1.0)
    );
    let _ = writeln!(out, "### Host memory per live sandbox\n");
    let _ = writeln!(
        out,
        "N sandboxes alive at once, first just forked (runnable), then after each has run the snippet once \
         (kvmfork skips the execs above {} alive: a fresh VM's first exec costs tens of ms on PVM). \
         The drop in the host's MemAvailable is the real cost: the sandboxes' private (copied-on-write) pages plus \
         kernel memory (KVM's per-VM structures, page tables). kvmfork's RSS growth overstates it: a template page \
         that N sandboxes map counts N times in RSS but exists once.\n",
        s.max_exec_alive
    );
    let _ = writeln!(
        out,
        "| alive | forked: MemAvailable drop / sandbox | forked: RSS / sandbox | after exec: MemAvailable drop / sandbox | after exec: RSS / sandbox | time for all |\n|---|---|---|---|---|---|"
    );
    let kib = |v: Option<f64>| v.map_or("not run".to_string(), |v| format!("{v:.0} KiB"));
    for row in &f.alive {
        let _ = writeln!(
            out,
            "| {} | {:.0} KiB | {:.0} KiB | {} | {} | {:.1} s |",
            row.alive,
            row.forked_mem_available_kib,
            row.forked_rss_kib,
            kib(row.exec_mem_available_kib),
            kib(row.exec_rss_kib),
            row.seconds
        );
    }

    let _ = writeln!(
        out,
        "\n## One run at a time: kvmfork against a process per run\n"
    );
    let _ = writeln!(
        out,
        "kvmfork rows are HTTP round trips through `kvmfork serve` (loadgen, 1 connection), so they include HTTP \
         and JSON; the process rows are spawn-to-exit of the command, timed by the driver, with no HTTP at all.\n"
    );
    let _ = writeln!(out, "| method | isolation | p50 | p90 | p99 | p99.9 | max | n | kvmfork vs it (p50) |\n|---|---|---|---|---|---|---|---|---|");
    let kvmfork1 = Results::at(&results.kvmfork_exec, 1);
    if let Some(p) = kvmfork1 {
        let _ = writeln!(
            out,
            "| kvmfork HTTP exec | KVM VM (copy-on-write fork) | {} | {} | |",
            latency_cells(&p.report.latency),
            p.report.latency.count
        );
    }
    for server in &results.fork_servers {
        if let Some(p) = Results::at(&server.points, 1) {
            let _ = writeln!(
                out,
                "| {} HTTP exec | none (os.fork of a warm CPython) | {} | {} | {} |",
                server.label,
                latency_cells(&p.report.latency),
                p.report.latency.count,
                kvmfork1.map_or("n/a".into(), |f| latency_ratio(
                    f.report.latency.p50_ms,
                    p.report.latency.p50_ms
                ))
            );
        }
    }
    for row in &results.spawn {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            row.label,
            row.isolation,
            latency_cells(&row.serial.latency),
            row.serial.latency.count,
            kvmfork1.map_or("n/a".into(), |f| latency_ratio(
                f.report.latency.p50_ms,
                row.serial.latency.p50_ms
            ))
        );
    }
    let parallel: Vec<&SpawnRow> = results
        .spawn
        .iter()
        .filter(|r| r.parallel.is_some())
        .collect();
    if !parallel.is_empty() {
        let _ = writeln!(
            out,
            "\nProcesses spawned {} at a time (one per core):\n",
            parallel[0].parallel.as_ref().map_or(0, |p| p.parallel)
        );
        let _ = writeln!(out, "| method | runs/s | p50 | p90 | p99 | p99.9 | max | kvmfork best exec req/s vs it |\n|---|---|---|---|---|---|---|---|");
        let best = Results::best(&results.kvmfork_exec);
        for row in parallel {
            let par = row.parallel.as_ref().expect("filtered");
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} |",
                row.label,
                rps(par.per_second),
                latency_cells(&par.latency),
                best.map_or("n/a".into(), |b| throughput_ratio(
                    b.report.ok_rps,
                    par.per_second
                ))
            );
        }
    }

    let _ = writeln!(
        out,
        "\n## HTTP exec under load: kvmfork against the fork servers\n"
    );
    let _ = writeln!(
        out,
        "loadgen closed loop, `print(1+1)` as POST /v1/exec, {:.0} s per point after {:.0} s of warm-up; \
         loadgen, the server and everything else share the {} cores.\n",
        s.exec_duration_s, s.warmup_s, h.cores
    );
    let peers: Vec<(&str, &[HttpPoint])> = results
        .fork_servers
        .iter()
        .map(|s| (s.label.as_str(), s.points.as_slice()))
        .collect();
    http_table(&mut out, &results.kvmfork_exec, &peers);

    let _ = writeln!(
        out,
        "\n## Raw HTTP: kvmfork GET /v1/health against nginx `return 200`\n"
    );
    let _ = writeln!(
        out,
        "loadgen closed loop, {:.0} s per point.\n",
        s.health_duration_s
    );
    http_table(
        &mut out,
        &results.kvmfork_health,
        &[("nginx", results.nginx.as_slice())],
    );

    if let Some(w) = &results.workloads {
        let _ = writeln!(out);
        out += &workloads_section(w);
    }

    if !plots.is_empty() {
        let _ = writeln!(out, "\n## Plots\n");
        for (title, file) in plots {
            let _ = writeln!(out, "{title}:\n\n![{title}]({file})\n");
        }
    }

    let _ = writeln!(out, "## How each number was measured\n");
    let _ = writeln!(
        out,
        "- **kvmfork fork**: `kvmfork {} --template {}`.",
        crate::fork_bench::command_args(s.fork_iterations, &s.alive, s.max_exec_alive).join(" "),
        s.template
    );
    let _ = writeln!(out, "- **kvmfork HTTP**: `kvmfork {}` (auth off, rate limit off, a queue deep enough that 1000 connections wait instead of getting 503).", s.kvmfork_serve_args.join(" "));
    for server in &results.fork_servers {
        let _ = writeln!(
            out,
            "- **{}**: `bench/peers/fork_server.py --workers {} --max-children {}{}` under {} ({}): pre-forked CPython workers with epoll loops; \
             each exec `os.fork()`s the worker, runs the code with output captured in memory, and returns kvmfork's JSON shape. \
             No isolation at all: the floor a process sandbox could reach.",
            server.label,
            s.fork_server_workers,
            s.fork_server_max_children,
            server.preload.iter().map(|m| format!(" --preload {m}")).collect::<String>(),
            s.python,
            s.python_version
        );
    }
    let _ = writeln!(out, "- **`python3 -c`**: `{} -c 'print(1+1)'` spawned and waited for by the driver (Rust `std::process::Command`), output checked.", s.python);
    let _ = writeln!(
        out,
        "- **bubblewrap**: {} with read-only /usr, fresh /proc, /dev, /tmp, every namespace unshared (`--unshare-all`, no network), `--die-with-parent --new-session`.",
        s.bwrap_version
    );
    let _ = writeln!(
        out,
        "- **nginx**: {} with `worker_processes {}`, `return 200` from memory, access log off.",
        s.nginx_version, s.nginx_workers
    );
    let _ = writeln!(
        out,
        "- Every server is checked before it is measured (`print(1+1)` must return stdout `2`), measured alone, and stopped; \
         latency counts successful (2xx) responses only and every other outcome is in the errors column. \
         The raw numbers are in [bench/results.json](bench/results.json)."
    );
    let _ = writeln!(
        out,
        "\n<details><summary>kvmfork bench fork output</summary>\n\n```text\n{}```\n</details>",
        f.raw
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{tiny_server, LoadSpec};
    use crate::results::{PeerServer, Settings, SpawnStats};
    use std::time::Duration;

    fn point(url: &str, connections: usize) -> HttpPoint {
        let spec = LoadSpec {
            url,
            request: "health",
            connections,
            duration: Duration::from_millis(200),
            warmup: Duration::ZERO,
        };
        let result = spec.run().unwrap();
        HttpPoint {
            connections,
            loadgen: spec.argv().join(" "),
            report: result.report,
        }
    }

    fn spawn_row(label: &str, ms: u64, parallel: bool) -> SpawnRow {
        let mut h = loadgen::stats::new_histogram();
        for i in 0..100 {
            h.record(ms * 1000 + i).unwrap();
        }
        let stats = |parallel| SpawnStats {
            parallel,
            per_second: 1000.0 / ms as f64 * parallel as f64,
            latency: LatencySummary::of(&h),
        };
        SpawnRow {
            label: label.into(),
            isolation: "none".into(),
            argv: vec![label.into()],
            serial: stats(1),
            parallel: parallel.then(|| stats(2)),
        }
    }

    fn sample_results() -> Results {
        let up = tiny_server();
        let refused = format!("http://{}", crate::process::free_port().unwrap());
        Results {
            schema: crate::results::SCHEMA,
            host: crate::host::Host {
                cpu_model: "Test CPU".into(),
                cores: 2,
                memory_gib: 23.5,
                kernel: "6.1.0-test".into(),
                kvm_kind: "PVM",
                date: "2026-11-28T12:00:00Z".into(),
                commit: "abc123".into(),
            },
            load_before: 1.5,
            load_after: 2.5,
            wall_s: 600.0,
            settings: Settings {
                code: "print(1+1)".into(),
                template: "/cache/python-x".into(),
                fork_iterations: 500,
                max_exec_alive: 100,
                alive: vec![1, 1000],
                connections: vec![1, 2],
                exec_duration_s: 10.0,
                health_duration_s: 5.0,
                warmup_s: 2.0,
                spawn_iterations: 200,
                spawn_parallel: 2,
                python: "/usr/bin/python3".into(),
                python_version: "Python 3.11.2".into(),
                bwrap_version: "bubblewrap 0.8.0".into(),
                nginx_version: "nginx version: nginx/1.22.1".into(),
                kvmfork_serve_args: vec!["serve".into(), "--rate-limit".into(), "0".into()],
                fork_server_workers: 2,
                fork_server_max_children: 2,
                nginx_workers: 2,
            },
            fork: crate::fork_bench::parse(crate::fork_bench::SAMPLE).unwrap(),
            // The 2-connection kvmfork point hits a closed port: every request fails.
            kvmfork_exec: vec![point(&up, 1), point(&refused, 2)],
            fork_servers: vec![
                PeerServer {
                    label: "fork server, numpy preloaded".into(),
                    preload: vec!["numpy".into()],
                    points: vec![point(&up, 1), point(&up, 2)],
                },
                PeerServer {
                    label: "fork server, bare CPython".into(),
                    preload: vec![],
                    points: vec![point(&up, 1)],
                },
            ],
            kvmfork_health: vec![point(&up, 1), point(&up, 2)],
            nginx: vec![point(&up, 1), point(&up, 2)],
            spawn: vec![
                spawn_row(PYTHON_C, 20, true),
                spawn_row(BWRAP, 30, true),
                spawn_row(PYTHON_C_NUMPY, 200, false),
            ],
            workloads: Some(sample_workloads(3)),
        }
    }

    fn path(label: &str, runs: &[f64], error: Option<&str>) -> WorkloadPath {
        let mut p = WorkloadPath::new(label);
        p.runs_ms = runs.to_vec();
        p.error = error.map(str::to_string);
        p.summarise();
        p
    }

    fn sample_workloads(runs: usize) -> Workloads {
        let row = |name: &str, language: &str, k: &[f64], w: &[f64], f: &[f64]| {
            crate::results::WorkloadRow {
                name: name.into(),
                language: language.into(),
                code: "code".into(),
                expected_stdout: "2\n".into(),
                skipped: None,
                kvmfork: path("kvmfork", k, None),
                warm: path(
                    if language == "node" {
                        "pre-spawned node process"
                    } else {
                        "fork server (os.fork, numpy preloaded)"
                    },
                    w,
                    None,
                ),
                fresh: path(
                    if language == "node" {
                        "`node -e`"
                    } else {
                        "`python3 -c`"
                    },
                    f,
                    None,
                ),
            }
        };
        let mut failed = row(
            "np.ones(10**7) (80 MB)",
            "python",
            &[],
            &[48.0, 50.0, 52.0],
            &[90.0, 95.0, 99.0],
        );
        failed.kvmfork = path(
            "kvmfork",
            &[],
            Some("error {\"code\":\"memory_limit\"}|x\ny"),
        );
        let mut skipped = row("pandas group-by 10**6 rows", "python", &[], &[], &[]);
        skipped.skipped = Some("template lacks pandas".into());
        Workloads {
            host: crate::host::Host {
                cpu_model: "Test CPU".into(),
                cores: 2,
                memory_gib: 23.5,
                kernel: "6.1.0-test".into(),
                kvm_kind: "PVM",
                date: "2026-12-04T19:00:00Z".into(),
                commit: "def456".into(),
            },
            load_before: 3.0,
            load_after: 4.0,
            wall_s: 420.0,
            runs,
            budget_s: Some(120.0),
            timeout_s: 300.0,
            kvmfork_serve_args: vec![
                "serve".into(),
                "--max-sandbox-dirty-mib".into(),
                "448".into(),
            ],
            template_modules: vec![],
            host_modules: vec![],
            fork_server_preload: vec!["numpy".into()],
            python_version: "Python 3.11.2".into(),
            node_version: "Node v20.19.2".into(),
            rows: vec![
                row(
                    "print(1+1)",
                    "python",
                    &[0.5, 0.4, 0.6],
                    &[4.0, 5.0, 6.0],
                    &[20.0, 21.0, 22.0],
                ),
                failed,
                skipped,
                row(
                    "console.log(1+1)",
                    "node",
                    &[1.0, 1.2, 1.1],
                    &[0.25, 0.3, 0.35],
                    &[40.0, 41.0, 39.0],
                ),
            ],
        }
    }

    #[test]
    fn workload_table_has_every_path_and_both_ratios() {
        let section = workloads_section(&sample_workloads(3));
        assert!(section.starts_with(WORKLOADS_BEGIN), "{section}");
        assert!(section.trim_end().ends_with(WORKLOADS_END), "{section}");
        for needle in [
            "Run 2026-12-04T19:00:00Z on commit def456",
            "each snippet ran 3 times on each path",
            "| snippet | language | kvmfork HTTP, p50 | warm process ¹, p50 | fresh process ², p50 | kvmfork ÷ warm (p50) | kvmfork ÷ fresh (p50) |",
            // 0.5 ms against 5 ms and 21 ms.
            "| print(1+1) | python | 500 µs | 5.00 ms | 21.0 ms | 0.10× | 0.02× |",
            // Over the targets: bold (1.1 / 0.3 = 3.7× the warm peer).
            "| console.log(1+1) | node | 1.10 ms | 300 µs | 40.0 ms | **3.7×** | 0.03× |",
            // A failure is a failure, not a timing; the cell stays one table cell.
            "| np.ones(10**7) (80 MB) | python | failed: error {\"code\":\"memory_limit\"}\\|x y | 50.0 ms | 95.0 ms | — | — |",
            "| pandas group-by 10**6 rows | python | skipped: template lacks pandas | | | | |",
            "¹ Python: fork server (os.fork, numpy preloaded); Node: pre-spawned node process. ² Python: `python3 -c`; Node: `node -e`.",
            "`kvmfork serve --max-sandbox-dirty-mib 448`",
        ] {
            assert!(section.contains(needle), "missing {needle:?} in:\n{section}");
        }
        for line in section.lines().filter(|l| l.starts_with("| ")) {
            assert_eq!(line.replace("\\|", "").matches('|').count(), 8, "{line}");
        }
    }

    #[test]
    fn workload_table_shows_p90_from_five_runs() {
        let mut w = sample_workloads(5);
        w.rows[0].kvmfork = path("kvmfork", &[1.0, 2.0, 3.0, 4.0, 50.0], None);
        let section = workloads_section(&w);
        assert!(section.contains("kvmfork HTTP, p50 / p90"), "{section}");
        assert!(
            section.contains("| print(1+1) | python | 3.00 ms / 50.0 ms |"),
            "{section}"
        );
    }

    #[test]
    fn workload_ratio_formats_and_bolds_past_the_target() {
        let p = |ms: f64| path("x", &[ms], None);
        assert_eq!(workload_ratio(&p(27_800.0), &p(48.0), 3.0), "**579×**");
        assert_eq!(workload_ratio(&p(1360.0), &p(990.0), 3.0), "1.4×");
        assert_eq!(workload_ratio(&p(1.0), &p(2.0), 1.0), "0.50×");
        assert_eq!(workload_ratio(&p(2.0), &p(1.0), 1.0), "**2.0×**");
        assert_eq!(
            workload_ratio(&path("x", &[], Some("e")), &p(1.0), 3.0),
            "—"
        );
    }

    #[test]
    fn splice_replaces_only_the_workload_section() {
        let old = format!(
            "# page\n\nbefore\n\n{WORKLOADS_BEGIN}\nold table\n{WORKLOADS_END}\n\n## Plots\n"
        );
        let new_section = format!("{WORKLOADS_BEGIN}\nnew table\n{WORKLOADS_END}\n");
        let page = splice_workloads(&old, &new_section);
        assert_eq!(
            page,
            format!("# page\n\nbefore\n\n{new_section}\n## Plots\n")
        );
        assert_eq!(splice_workloads(&page, &new_section), page, "idempotent");
        let appended = splice_workloads("# page\n", &new_section);
        assert_eq!(appended, format!("# page\n\n{new_section}"));
        assert_eq!(splice_workloads("", &new_section), new_section);
    }

    #[test]
    fn full_page_includes_the_workload_section() {
        let page = render(&sample_results(), &[]);
        assert!(page.contains("## Workload suite"), "{page}");
        let mut none = sample_results();
        none.workloads = None;
        assert!(!render(&none, &[]).contains(WORKLOADS_BEGIN));
    }

    #[test]
    fn page_states_the_machine_and_every_section() {
        let results = sample_results();
        let plots = vec![(
            "HTTP, 1 connection".to_string(),
            "bench/http-c1.png".to_string(),
        )];
        let page = render(&results, &plots);
        for needle in [
            "| CPU | 2 × Test CPU |",
            "| memory | 23.5 GiB |",
            "| kernel | 6.1.0-test |",
            "| KVM | PVM",
            "| date | 2026-11-28T12:00:00Z |",
            "1.50 before, 2.50 after",
            "## Headline",
            "| fork to runnable, pooled reset | 38 µs | 45 µs | 90 µs | 1.20 ms | 41 µs | 500 |",
            "Fresh VM ÷ pooled at p50: fork 21.4×, fork + exec 73.5×.",
            "| 100 | 760 KiB | 1100 KiB | 2200 KiB | 5900 KiB | 16.4 s |",
            "| 1000 | 740 KiB | 1050 KiB | not run | not run | 2.3 s |",
            "`kvmfork bench fork --iterations 500 --alive 1,1000 --max-exec-alive 100 --template /cache/python-x`",
            "| `python3 -c` | none |",
            "| `python3 -c, import numpy` | none |",
            "![HTTP, 1 connection](bench/http-c1.png)",
            "--max-children 2 --preload numpy`",
            "| fork server, bare CPython HTTP exec | none",
            "| 2 | fork server, numpy preloaded |",
            "```text\nkvmfork bench fork",
        ] {
            assert!(page.contains(needle), "missing {needle:?} in:\n{page}");
        }
    }

    #[test]
    fn headline_rows_carry_kvmfork_the_peer_and_a_ratio() {
        let results = sample_results();
        let headline = headline(&results);
        let rows: Vec<&str> = headline.lines().skip(2).collect();
        assert!(rows.len() >= 9, "{headline}");
        for row in &rows {
            assert_eq!(row.matches(" | ").count(), 3, "{row}");
        }
        assert!(headline.contains("| fork to runnable, p50 | 38 µs (pooled VM, copy-back reset) | 812 µs (fresh VM per fork) | kvmfork 21× faster |"), "{headline}");
        assert!(headline.contains("| fork + exec, in-process, p50 | 170 µs | 12.5 ms (fresh VM per fork) | kvmfork 74× faster |"), "{headline}");
        assert!(
            headline.contains("(`bwrap + python3 -c`, spawn to exit)"),
            "{headline}"
        );
        assert!(headline.contains("(`python3 -c`, 2 at once)"), "{headline}");
        assert!(headline.contains("| host memory per live sandbox, 1000 alive, forked (runnable) | 740 KiB (drop in MemAvailable) |"), "{headline}");
        assert!(headline.contains("| host memory per live sandbox, 100 alive, after each ran the snippet | 2200 KiB (drop in MemAvailable) |"), "{headline}");
    }

    #[test]
    fn kvmfork_errors_are_flagged() {
        let results = sample_results();
        assert!(results.kvmfork_errors() > 0);
        let page = render(&results, &[]);
        assert!(page.contains("**kvmfork failed"), "{page}");
        assert!(page.contains(" connect)"), "{page}");
        let mut clean = results.clone();
        clean.kvmfork_exec.truncate(1);
        // The sample suite has one snippet kvmfork failed: it counts too.
        assert_eq!(clean.kvmfork_errors(), 1);
        clean.workloads = None;
        assert_eq!(clean.kvmfork_errors(), 0);
        assert!(!render(&clean, &[]).contains("**kvmfork failed"));
    }

    #[test]
    fn number_formats() {
        assert_eq!(ms(0.0421), "42 µs");
        assert_eq!(ms(1.234), "1.23 ms");
        assert_eq!(ms(12.34), "12.3 ms");
        assert_eq!(ms(123.4), "123 ms");
        assert_eq!(ms(12_345.0), "12.3 s");
        assert_eq!(rps(12.34), "12.3");
        assert_eq!(rps(123.4), "123");
        assert_eq!(rps(1234.0), "1 230");
        assert_eq!(rps(1_234_567.0), "1 234 570");
    }

    #[test]
    fn ratios_say_which_way() {
        assert_eq!(latency_ratio(1.0, 40.0), "kvmfork 40× faster");
        assert_eq!(latency_ratio(2.0, 3.0), "kvmfork 1.50× faster");
        assert_eq!(latency_ratio(3.0, 2.0), "kvmfork 1.50× slower");
        assert_eq!(latency_ratio(22.0, 21.0), "kvmfork 1.05× slower");
        assert_eq!(latency_ratio(1.0, 3.25), "kvmfork 3.2× faster");
        assert_eq!(latency_ratio(0.0, 2.0), "n/a");
        assert_eq!(throughput_ratio(500.0, 250.0), "2.00× the req/s");
        assert_eq!(throughput_ratio(5000.0, 250.0), "20× the req/s");
        assert_eq!(throughput_ratio(1.0, 0.0), "n/a");
    }
}
