//! Runs `kvmfork bench fork` (fork-to-runnable, fork + exec, fresh VM per fork,
//! memory per live sandbox) and reads the table it prints.
//!
//! The text table is kvmfork's only output format today; every row the report
//! needs is looked up by its exact label, so a renamed row is an error here,
//! never a silently missing number.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::BenchError;

/// Percentiles of one method, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    pub n: u64,
}

/// Host memory per sandbox with `alive` of them alive at once, in KiB.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AliveRow {
    pub alive: u64,
    /// Just forked (runnable): the drop in MemAvailable, and kvmfork's RSS growth.
    pub forked_mem_available_kib: f64,
    pub forked_rss_kib: f64,
    /// After each has run the code once; None where kvmfork skipped the execs
    /// (above its --max-exec-alive).
    pub exec_mem_available_kib: Option<f64>,
    pub exec_rss_kib: Option<f64>,
    /// Creating all of them (and running the execs, if any).
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ForkBench {
    pub pooled_fork: Percentiles,
    pub fresh_fork: Percentiles,
    pub pooled_exec_only: Percentiles,
    pub pooled_total: Percentiles,
    pub fresh_total: Percentiles,
    pub alive: Vec<AliveRow>,
    /// The command's full output, kept in the JSON results for reference.
    pub raw: String,
}

const POOLED_FORK: &str = "fork to runnable, pooled reset";
const FRESH_FORK: &str = "fork to runnable, fresh VM";
const POOLED_EXEC: &str = "exec only (guest run), pooled";
const POOLED_TOTAL: &str = "fork + exec, pooled reset";
const FRESH_TOTAL: &str = "fork + exec, fresh VM";

/// Runs the benchmark binary and parses its report.
pub fn run(
    kvmfork: &Path,
    template: &Path,
    iterations: usize,
    alive: &[usize],
    max_exec_alive: usize,
) -> Result<ForkBench, BenchError> {
    let output = Command::new(kvmfork)
        .args(command_args(iterations, alive, max_exec_alive))
        .arg("--template")
        .arg(template)
        .output()
        .map_err(|source| BenchError::Spawn {
            what: "kvmfork bench fork".into(),
            source,
        })?;
    if !output.status.success() {
        return Err(BenchError::ForkBenchFailed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    parse(&String::from_utf8_lossy(&output.stdout))
}

/// `kvmfork bench fork` arguments (without --template).
pub fn command_args(iterations: usize, alive: &[usize], max_exec_alive: usize) -> Vec<String> {
    let alive_list = alive
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",");
    [
        "bench",
        "fork",
        "--iterations",
        &iterations.to_string(),
        "--alive",
        &alive_list,
        "--max-exec-alive",
        &max_exec_alive.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Parses `kvmfork bench fork` output (see src/bench.rs in kvmfork).
pub fn parse(text: &str) -> Result<ForkBench, BenchError> {
    let row = |label: &str| -> Result<Percentiles, BenchError> {
        let line = text
            .lines()
            .find(|l| l.starts_with(label) && l[label.len()..].starts_with(' '))
            .ok_or_else(|| BenchError::ParseForkBench(format!("no row {label:?}")))?;
        parse_row(&line[label.len()..])
            .map_err(|e| BenchError::ParseForkBench(format!("row {label:?}: {e}")))
    };
    let alive = parse_alive(text)?;
    Ok(ForkBench {
        pooled_fork: row(POOLED_FORK)?,
        fresh_fork: row(FRESH_FORK)?,
        pooled_exec_only: row(POOLED_EXEC)?,
        pooled_total: row(POOLED_TOTAL)?,
        fresh_total: row(FRESH_TOTAL)?,
        alive,
        raw: text.to_string(),
    })
}

/// "  35µs  40µs  52µs  1.2ms... (n=500)": p50 p90 p99 max mean, then the count.
fn parse_row(cells: &str) -> Result<Percentiles, String> {
    let tokens: Vec<&str> = cells.split_whitespace().collect();
    if tokens.len() != 6 {
        return Err(format!("expected 5 times and (n=N), got {tokens:?}"));
    }
    let n = tokens[5]
        .strip_prefix("(n=")
        .and_then(|t| t.strip_suffix(')'))
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("bad count {:?}", tokens[5]))?;
    let t = |i: usize| parse_time_us(tokens[i]);
    Ok(Percentiles {
        p50_us: t(0)?,
        p90_us: t(1)?,
        p99_us: t(2)?,
        max_us: t(3)?,
        mean_us: t(4)?,
        n,
    })
}

/// "35µs" -> 35, "12.3ms" -> 12300, "1.5s" -> 1500000.
fn parse_time_us(token: &str) -> Result<f64, String> {
    let (number, scale) = if let Some(v) = token
        .strip_suffix("µs")
        .or_else(|| token.strip_suffix("us"))
    {
        (v, 1.0)
    } else if let Some(v) = token.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = token.strip_suffix('s') {
        (v, 1e6)
    } else {
        return Err(format!("no unit in {token:?}"));
    };
    number
        .parse::<f64>()
        .map(|v| v * scale)
        .map_err(|_| format!("bad number in {token:?}"))
}

/// The table after the "alive" header, one row per alive count:
/// `N  forked-MemAvail KiB  forked-RSS KiB  exec-MemAvail KiB|(not run)  exec-RSS KiB|(not run)  secs s`.
fn parse_alive(text: &str) -> Result<Vec<AliveRow>, BenchError> {
    let mut lines = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("alive"));
    if lines.next().is_none() {
        return Err(BenchError::ParseForkBench(
            "no memory table (header \"alive\")".into(),
        ));
    }
    let mut rows = Vec::new();
    for line in lines {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        if tokens.is_empty() {
            continue;
        }
        let bad = || BenchError::ParseForkBench(format!("memory row {line:?}"));
        if tokens.len() != 10 {
            return Err(bad());
        }
        // A "123 KiB" cell, or "(not run)" where optional.
        let kib = |i: usize| -> Option<Option<f64>> {
            match (tokens[i], tokens[i + 1]) {
                ("(not", "run)") => Some(None),
                (v, "KiB") => v.parse().ok().map(Some),
                _ => None,
            }
        };
        let required = |i: usize| kib(i).flatten().ok_or_else(bad);
        rows.push(AliveRow {
            alive: tokens[0].parse().map_err(|_| bad())?,
            forked_mem_available_kib: required(1)?,
            forked_rss_kib: required(3)?,
            exec_mem_available_kib: kib(5).ok_or_else(bad)?,
            exec_rss_kib: kib(7).ok_or_else(bad)?,
            seconds: tokens[9]
                .strip_suffix('s')
                .and_then(|v| v.parse().ok())
                .ok_or_else(bad)?,
        });
    }
    if rows.is_empty() {
        return Err(BenchError::ParseForkBench(
            "memory table has no rows".into(),
        ));
    }
    Ok(rows)
}

/// Output of `kvmfork bench fork` as src/bench.rs prints it, for tests.
#[cfg(test)]
pub const SAMPLE: &str = "kvmfork bench fork — template /root/.cache/kvmfork/templates/python-ab12 (python), host KVM: pvm
code: \"print(1+1)\", 500 iterations per method

                                               p50       p90       p99       max      mean
fork to runnable, pooled reset                38µs      45µs      90µs    1.2ms      41µs  (n=500)
fork to runnable, fresh VM                   812µs     950µs    2100µs   15.5ms     850µs  (n=500)
exec only (guest run), pooled                120µs     140µs     300µs   22.0ms     130µs  (n=500)
fork + exec, pooled reset                    170µs     200µs     420µs   23.1ms     180µs  (n=500)
fork + exec, fresh VM                       12.5ms    14.0ms    30.2ms   80.0ms    13.1ms  (n=500)

fresh VM / pooled, p50: fork 21.4x, fork+exec 73.5x   (pool: 501 forks, 0 fresh fallbacks)
pooled reset, mean: 290 pages copied back; dirty log 15.3µs, copy 204.1µs, VM state 10.7µs, vCPU state 171.8µs

host memory per live sandbox (MemAvailable delta includes KVM's kernel memory; RSS counts shared template pages too)
alive      forked: MemAvail        forked: RSS  after exec: MemAv    after exec: RSS       time
1                   900 KiB           1200 KiB           2300 KiB           6100 KiB       0.0s
100                 760 KiB           1100 KiB           2200 KiB           5900 KiB      16.4s
1000                740 KiB           1050 KiB          (not run)          (not run)       2.3s
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_row_and_the_memory_table() {
        let bench = parse(SAMPLE).unwrap();
        assert_eq!(
            bench.pooled_fork,
            Percentiles {
                p50_us: 38.0,
                p90_us: 45.0,
                p99_us: 90.0,
                max_us: 1200.0,
                mean_us: 41.0,
                n: 500
            }
        );
        assert_eq!(bench.fresh_fork.p99_us, 2100.0);
        assert_eq!(bench.pooled_exec_only.max_us, 22_000.0);
        assert_eq!(bench.pooled_total.p50_us, 170.0);
        assert_eq!(bench.fresh_total.p50_us, 12_500.0);
        assert_eq!(bench.fresh_total.mean_us, 13_100.0);
        assert_eq!(bench.alive.len(), 3);
        assert_eq!(
            bench.alive[1],
            AliveRow {
                alive: 100,
                forked_mem_available_kib: 760.0,
                forked_rss_kib: 1100.0,
                exec_mem_available_kib: Some(2200.0),
                exec_rss_kib: Some(5900.0),
                seconds: 16.4
            }
        );
        assert_eq!(
            bench.alive[2],
            AliveRow {
                alive: 1000,
                forked_mem_available_kib: 740.0,
                forked_rss_kib: 1050.0,
                exec_mem_available_kib: None,
                exec_rss_kib: None,
                seconds: 2.3
            }
        );
    }

    #[test]
    fn a_missing_or_renamed_row_is_an_error() {
        let renamed = SAMPLE.replace("fork to runnable, fresh VM", "fork to runnable, new VM");
        let err = parse(&renamed).unwrap_err().to_string();
        assert!(err.contains("fork to runnable, fresh VM"), "{err}");
        let no_memory = SAMPLE.split("\nalive").next().unwrap();
        assert!(parse(no_memory).is_err());
    }

    #[test]
    fn malformed_cells_are_errors() {
        let bad_unit = SAMPLE.replace("38µs", "38");
        assert!(parse(&bad_unit).is_err());
        let bad_count = SAMPLE.replace("41µs  (n=500)", "41µs  (n=?)");
        assert!(parse(&bad_count).is_err());
        let bad_memory = SAMPLE.replace("1050 KiB", "1050 MiB");
        assert!(parse(&bad_memory).is_err());
        // Only the after-exec cells may be "(not run)".
        let not_run_forked = SAMPLE.replace("  740 KiB", "(not run)");
        assert!(parse(&not_run_forked).is_err());
    }

    #[test]
    fn time_units() {
        assert_eq!(parse_time_us("7µs"), Ok(7.0));
        assert_eq!(parse_time_us("10.5ms"), Ok(10_500.0));
        assert_eq!(parse_time_us("2s"), Ok(2_000_000.0));
        assert!(parse_time_us("ms").is_err());
    }

    /// Real output of kvmfork (commit 46013c9) on the PVM development machine.
    const REAL: &str = r#"kvmfork bench fork — template /tmp/lead/pytpl (python), host KVM: pvm
code: "print(1+1)", 20 iterations per method

                                               p50       p90       p99       max      mean
fork to runnable, pooled reset               218µs     339µs    6607µs    6607µs     734µs  (n=20)
fork to runnable, fresh VM                  6371µs    7739µs    14.1ms    14.1ms    7106µs  (n=20)
exec only (guest run), pooled                247µs     288µs    4307µs    4307µs     457µs  (n=20)
fork + exec, pooled reset                    473µs    4391µs    6871µs    6871µs    1195µs  (n=20)
fork + exec, fresh VM                      831.5ms   947.2ms  1131.5ms  1131.5ms   669.7ms  (n=20)

fresh VM / pooled, p50: fork 29.2x, fork+exec 1757.9x   (pool: 21 forks, 0 fresh fallbacks)
pooled reset, mean: 345 pages copied back; dirty log 15.6µs, copy 165.6µs, VM state 329.1µs, vCPU state 223.9µs

host memory per live sandbox (MemAvailable delta includes KVM's kernel memory; RSS counts shared template pages too)
alive      forked: MemAvail        forked: RSS  after exec: MemAv    after exec: RSS       time
1                     0 KiB             36 KiB           2140 KiB          17016 KiB       0.8s
5                  1166 KiB             38 KiB          (not run)          (not run)       0.1s
"#;

    #[test]
    fn parses_real_kvmfork_output() {
        let bench = parse(REAL).unwrap();
        assert_eq!(bench.fresh_total.p50_us, 831_500.0);
        assert_eq!(bench.pooled_fork.n, 20);
        assert_eq!(bench.alive.len(), 2);
        assert_eq!(bench.alive[0].exec_rss_kib, Some(17_016.0));
        assert_eq!(bench.alive[1].exec_mem_available_kib, None);
        assert_eq!(bench.alive[1].forked_mem_available_kib, 1166.0);
    }
}
