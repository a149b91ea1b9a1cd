//! `kvmfork bench fork`: fork-to-runnable and fork+exec latency of the pooled
//! copy-back reset against the fresh-VM-per-fork method (Zeroboot's), measured
//! side by side in one run, plus host memory per live sandbox.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kvm_ioctls::Kvm;

use crate::api::{CancelToken, ExecRequest, Language};
use crate::engine::pool::{Pool, PoolConfig};
use crate::engine::sandbox::{Limits, Sandbox};
use crate::template::Template;
use crate::vmm::kick::ThreadTimer;

pub struct BenchOptions {
    pub iterations: usize,
    pub alive_counts: Vec<usize>,
    pub code: String,
    pub language: Language,
    /// Largest alive count at which every sandbox also runs the code.
    pub max_exec_alive: usize,
}

pub(crate) fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub(crate) fn us(d: Duration) -> u64 {
    (d.as_nanos() / 1000).max(1) as u64
}

fn row(name: &str, h: &Histogram<u64>) -> String {
    format!(
        "{name:<40} {:>9} {:>9} {:>9} {:>9} {:>9}  (n={})",
        fmt_us(h.value_at_quantile(0.5)),
        fmt_us(h.value_at_quantile(0.9)),
        fmt_us(h.value_at_quantile(0.99)),
        fmt_us(h.max()),
        fmt_us(h.mean() as u64),
        h.len()
    )
}

pub(crate) fn fmt_us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1}ms", v as f64 / 1000.0)
    } else {
        format!("{v}µs")
    }
}

pub(crate) fn meminfo_available_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Raises the open-file limit to its hard maximum (each live sandbox holds
/// a VM fd, a vCPU fd and an eventfd).
pub fn raise_nofile_limit() {
    // SAFETY: plain getrlimit/setrlimit on a stack struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Runs the benchmark and returns the report text.
pub fn run_fork_bench(t: Arc<Template>, opts: &BenchOptions) -> Result<String, String> {
    raise_nofile_limit();
    let mut out = String::new();
    use std::fmt::Write;
    let req = || ExecRequest {
        code: opts.code.clone(),
        language: opts.language,
        timeout: Duration::from_secs(30),
        cancel: CancelToken::new(),
    };
    let _ = writeln!(
        out,
        "kvmfork bench fork — template {} ({}), host KVM: {}",
        t.dir.display(),
        t.meta.language,
        t.meta.host_kind.as_str()
    );
    let _ = writeln!(out, "host: {}", t.caps.describe());
    let _ = writeln!(
        out,
        "code: {:?}, {} iterations per method\n",
        opts.code, opts.iterations
    );
    let _ = writeln!(
        out,
        "{:<40} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "", "p50", "p90", "p99", "max", "mean"
    );

    // Pooled: one pre-created VM, reset by dirty-page copy-back each round.
    let mut pool = Pool::new(
        t.clone(),
        PoolConfig {
            max_idle: 1,
            prewarm: 1,
            warm: 0,
            limits: Limits::default(),
            ..PoolConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let first = pool.exec(&req());
    if first.failure.is_some() || first.exit_code != 0 {
        return Err(format!(
            "warm-up exec failed: {:?} exit {} stderr {}",
            first.failure,
            first.exit_code,
            String::from_utf8_lossy(&first.stderr)
        ));
    }
    let (mut pool_fork, mut pool_total, mut pool_exec) = (hist(), hist(), hist());
    for _ in 0..opts.iterations {
        let r = pool.exec(&req());
        if r.failure.is_some() {
            return Err(format!("pooled exec failed: {:?}", r.failure));
        }
        let _ = pool_fork.record(us(r.fork_time));
        let _ = pool_exec.record(us(r.exec_time));
        let _ = pool_total.record(us(r.total_time));
    }
    let stats = pool.stats();
    let resets = pool.reset_totals();
    drop(pool);

    // Fresh VM per fork: create VM + vCPU, map the template, restore state.
    let kvm = Kvm::new().map_err(|e| e.to_string())?;
    let timer = ThreadTimer::for_current_thread().map_err(|e| e.to_string())?;
    let (mut fresh_fork, mut fresh_total) = (hist(), hist());
    for _ in 0..opts.iterations {
        let start = Instant::now();
        let mut sb = Sandbox::fork_fresh(&kvm, &t, false).map_err(|e| e.to_string())?;
        let forked = start.elapsed();
        let r = sb.exec(&t, &req(), &Limits::default(), &timer);
        let total = start.elapsed();
        if r.failure.is_some() {
            return Err(format!("fresh-VM exec failed: {:?}", r.failure));
        }
        let _ = fresh_fork.record(us(forked));
        let _ = fresh_total.record(us(total));
        drop(sb);
    }
    let _ = writeln!(out, "{}", row("fork to runnable, pooled reset", &pool_fork));
    let _ = writeln!(out, "{}", row("fork to runnable, fresh VM", &fresh_fork));
    let _ = writeln!(out, "{}", row("exec only (guest run), pooled", &pool_exec));
    let _ = writeln!(out, "{}", row("fork + exec, pooled reset", &pool_total));
    let _ = writeln!(out, "{}", row("fork + exec, fresh VM", &fresh_total));
    let ratio = |a: &Histogram<u64>, b: &Histogram<u64>| {
        a.value_at_quantile(0.5) as f64 / b.value_at_quantile(0.5).max(1) as f64
    };
    let _ = writeln!(
        out,
        "\nfresh VM / pooled, p50: fork {:.1}x, fork+exec {:.1}x   (pool: {} forks, {} fresh fallbacks)",
        ratio(&fresh_fork, &pool_fork),
        ratio(&fresh_total, &pool_total),
        stats.forks,
        stats.fresh_vm_forks
    );

    if resets.count > 0 {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / resets.count as f64;
        let _ = writeln!(
            out,
            "pooled reset, mean: {:.0} pages copied back; dirty log {:.1}µs, copy {:.1}µs, VM state {:.1}µs, vCPU state {:.1}µs",
            resets.pages as f64 / resets.count as f64,
            per(resets.dirty_log),
            per(resets.copy),
            per(resets.vm_state),
            per(resets.vcpu_state)
        );
    }

    // Memory per live sandbox: N sandboxes alive at once, first just forked
    // (runnable), then after each has run the code (its copy-on-write pages).
    let _ = writeln!(
        out,
        "\nhost memory per live sandbox (MemAvailable delta includes KVM's kernel memory; RSS counts shared template pages too)"
    );
    let _ = writeln!(
        out,
        "{:<8} {:>18} {:>18} {:>18} {:>18} {:>10}",
        "alive", "forked: MemAvail", "forked: RSS", "after exec: MemAv", "after exec: RSS", "time"
    );
    for &n in &opts.alive_counts {
        let avail0 = meminfo_available_kb();
        let rss0 = rss_kb();
        let start = Instant::now();
        let mut alive = Vec::with_capacity(n);
        for i in 0..n {
            alive.push(
                Sandbox::fork_fresh(&kvm, &t, true)
                    .map_err(|e| format!("sandbox {i} of {n}: {e}"))?,
            );
        }
        let forked_avail = avail0.saturating_sub(meminfo_available_kb());
        let forked_rss = rss_kb().saturating_sub(rss0);
        let forked_time = start.elapsed();
        let per = |kb: u64| format!("{:.0} KiB", kb as f64 / n as f64);
        if n > opts.max_exec_alive {
            // A fresh VM's first exec builds its shadow page tables and copies
            // its working set: tens of ms each on PVM hosts, so past this count
            // only the forked (runnable) state is measured.
            let _ = writeln!(
                out,
                "{:<8} {:>18} {:>18} {:>18} {:>18} {:>9.1}s",
                n,
                per(forked_avail),
                per(forked_rss),
                "(not run)",
                "(not run)",
                forked_time.as_secs_f64()
            );
            drop(alive);
            continue;
        }
        for (i, sb) in alive.iter_mut().enumerate() {
            let r = sb.exec(&t, &req(), &Limits::default(), &timer);
            if r.failure.is_some() {
                return Err(format!("sandbox {i} of {n}: exec failed: {:?}", r.failure));
            }
        }
        let took = start.elapsed();
        let exec_avail = avail0.saturating_sub(meminfo_available_kb());
        let exec_rss = rss_kb().saturating_sub(rss0);
        let _ = writeln!(
            out,
            "{:<8} {:>18} {:>18} {:>18} {:>18} {:>9.1}s",
            n,
            per(forked_avail),
            per(forked_rss),
            per(exec_avail),
            per(exec_rss),
            took.as_secs_f64()
        );
        drop(alive);
    }
    Ok(out)
}
