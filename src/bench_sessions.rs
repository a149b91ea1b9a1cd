//! `kvmfork bench sessions`: live sessions measured in-process on the real
//! template — a session exec, live fork of sessions holding 1 / 16 / N MiB of
//! their own state, 100 children from one session, checkpoint and restore —
//! each next to the slow way measured in the same run: a fresh VM restored
//! from the session's snapshot (new VM + template mapping + the session's
//! pages copied in + full machine state), what snapshot-restore engines do
//! per fork.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kvm_ioctls::Kvm;

use crate::api::{CancelToken, ExecRequest, ExecResult, Language};
use crate::bench::{fmt_us, hist, meminfo_available_kb, us};
use crate::engine::pool::{Pool, PoolConfig};
use crate::engine::sandbox::{Limits, Sandbox};
use crate::engine::session::COMPACT_MIN_DELTA_RUNS;
use crate::template::Template;

pub struct SessionBenchOptions {
    pub iterations: usize,
    /// MiB of state (a written numpy array) per measured session size.
    pub state_mib: Vec<usize>,
    /// Children made at once from one session.
    pub fan_out: usize,
    /// Live sessions held at once (0: skip that row).
    pub hold: usize,
}

fn ratio(slow: u64, fast: u64) -> String {
    let r = slow as f64 / fast.max(1) as f64;
    if r >= 10.0 {
        format!("{r:.0}×")
    } else {
        format!("{r:.1}×")
    }
}

fn req(code: &str) -> ExecRequest {
    ExecRequest {
        code: code.into(),
        language: Language::Python,
        timeout: Duration::from_secs(600),
        cancel: CancelToken::new(),
    }
}

fn check(r: &ExecResult, what: &str) -> Result<(), String> {
    if r.failure.is_some() || r.exit_code != 0 {
        return Err(format!(
            "{what}: {:?} exit {}: {}",
            r.failure,
            r.exit_code,
            String::from_utf8_lossy(&r.stderr)
        ));
    }
    Ok(())
}

struct Row {
    name: String,
    fast: Histogram<u64>,
    slow: Option<Histogram<u64>>,
}

/// One HTTP/1.1 request on a keep-alive connection: (status, body).
fn http(
    conn: &mut std::net::TcpStream,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, serde_json::Value), String> {
    use std::io::{Read, Write};
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes())
        .map_err(|e| format!("sending {method} {path}: {e}"))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn
            .read(&mut chunk)
            .map_err(|e| format!("reading the answer to {method} {path}: {e}"))?;
        if n == 0 {
            return Err(format!(
                "the server closed the connection on {method} {path}"
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head:?}"))?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = conn
            .read(&mut chunk)
            .map_err(|e| format!("reading the body of {method} {path}: {e}"))?;
        if n == 0 {
            return Err(format!("the body of {method} {path} was cut short"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let v =
        serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(serde_json::Value::Null);
    Ok((status, v))
}

/// `x += 1; x` over HTTP: a real `kvmfork serve` (one shard, one worker, on
/// loopback) in this process, one keep-alive connection.
fn http_session_exec(
    t: &Template,
    iterations: usize,
) -> Result<(Histogram<u64>, Histogram<u64>), String> {
    use crate::engine::lane::Engine;
    use crate::server::ServeConfig;
    let template = Template::load(&t.dir).map_err(|e| e.to_string())?;
    let engine = Engine::new(
        vec![template],
        PoolConfig {
            max_idle: 2,
            prewarm: 1,
            warm: 0,
            limits: Limits::default(),
            ..PoolConfig::default()
        },
    );
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse().expect("literal address"),
        shards: 1,
        workers_per_shard: 1,
        // Loopback with no keys file: auth off (nothing else listens).
        api_keys_file: std::path::PathBuf::from("/nonexistent/kvmfork-bench-sessions-keys"),
        require_auth: Some(false),
        rate_limit: 0.0,
        ..ServeConfig::default()
    };
    let handle = crate::server::start(config, Arc::new(engine)).map_err(|e| e.to_string())?;
    let mut conn = std::net::TcpStream::connect(handle.local_addr())
        .map_err(|e| format!("connecting to the bench server: {e}"))?;
    conn.set_nodelay(true).ok();
    let (status, v) = http(
        &mut conn,
        "POST",
        "/v1/sandboxes",
        r#"{"language": "python"}"#,
    )?;
    let id = v["sandbox_id"]
        .as_str()
        .filter(|_| status == 201)
        .ok_or_else(|| format!("creating a session over HTTP: {status} {v}"))?
        .to_string();
    let path = format!("/v1/sandboxes/{id}/exec");
    let (status, v) = http(&mut conn, "POST", &path, r#"{"code": "x = 0"}"#)?;
    if status != 200 {
        return Err(format!("session exec over HTTP: {status} {v}"));
    }
    let mut h = hist();
    for i in 0..iterations {
        let t0 = Instant::now();
        let (status, v) = http(&mut conn, "POST", &path, r#"{"code": "x += 1; x"}"#)?;
        h.record(us(t0.elapsed())).ok();
        let want = (i + 1).to_string();
        if status != 200 || v["result"]["text"].as_str() != Some(want.as_str()) {
            return Err(format!("session exec over HTTP #{}: {status} {v}", i + 1));
        }
    }
    // The same connection and server, stateless: a fresh fork per exec.
    let mut stateless = hist();
    for _ in 0..iterations {
        let t0 = Instant::now();
        let (status, v) = http(&mut conn, "POST", "/v1/exec", r#"{"code": "x = 1"}"#)?;
        stateless.record(us(t0.elapsed())).ok();
        if status != 200 || v["exit_code"] != 0 {
            return Err(format!("stateless exec over HTTP: {status} {v}"));
        }
    }
    let (status, _) = http(&mut conn, "DELETE", &format!("/v1/sandboxes/{id}"), "")?;
    if status != 200 && status != 204 {
        return Err(format!("deleting the session over HTTP: {status}"));
    }
    drop(conn);
    handle.shutdown();
    Ok((h, stateless))
}

fn line(r: &Row) -> String {
    let p = |h: &Histogram<u64>, q: f64| fmt_us(h.value_at_quantile(q));
    match &r.slow {
        Some(s) => format!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            p(&r.fast, 0.5),
            p(&r.fast, 0.99),
            p(s, 0.5),
            p(s, 0.99),
            ratio(s.value_at_quantile(0.5), r.fast.value_at_quantile(0.5))
        ),
        None => format!(
            "| {} | {} | {} | — | — | — |",
            r.name,
            p(&r.fast, 0.5),
            p(&r.fast, 0.99)
        ),
    }
}

/// Runs the benchmark on `t` (a Python template) and returns the report.
pub fn run_session_bench(t: Arc<Template>, opts: &SessionBenchOptions) -> Result<String, String> {
    if t.language() != Some(Language::Python) {
        return Err("bench sessions needs the Python template".into());
    }
    let iterations = opts.iterations.max(1);
    let mut pool = Pool::new(
        t.clone(),
        PoolConfig {
            max_idle: opts.fan_out + 2,
            prewarm: 1,
            warm: 0,
            limits: Limits {
                max_dirty_pages: 1 << 20,
                ..Limits::default()
            },
            ..PoolConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let limits = Limits {
        max_dirty_pages: 1 << 20,
        ..Limits::default()
    };
    let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    // 1. A session exec that keeps state: `x += 1; x`.
    let mut session = pool.open_session().map_err(|e| e.to_string())?;
    check(
        &pool.run_session(&mut session, &req("x = 0"), true, &limits),
        "session setup",
    )?;
    let mut h = hist();
    for i in 0..iterations.max(50) {
        let r = pool.run_session(&mut session, &req("x += 1; x"), false, &limits);
        check(&r, "session exec")?;
        if r.result.as_deref() != Some(&(i + 1).to_string()) {
            return Err(format!(
                "session exec: expected {} got {:?}",
                i + 1,
                r.result
            ));
        }
        h.record(us(r.total_time)).ok();
    }
    rows.push(Row {
        name: "session exec `x += 1; x` (engine, no HTTP)".into(),
        fast: h,
        slow: None,
    });
    pool.release(session);
    let (over_http, stateless_http) = http_session_exec(&t, iterations.max(200))?;
    rows.push(Row {
        name: "session exec `x += 1; x` over HTTP (one keep-alive connection)".into(),
        fast: over_http,
        slow: None,
    });
    rows.push(Row {
        name: "  for comparison: stateless exec `x = 1` on that connection (fresh fork each)"
            .into(),
        fast: stateless_http,
        slow: None,
    });

    // 2. Live fork of sessions holding their own state, vs the slow way.
    for &mib in &opts.state_mib {
        let mut parent = pool.open_session().map_err(|e| e.to_string())?;
        let started = Instant::now();
        let code = format!(
            "import numpy as np\nstate = np.full({}, 7, dtype=np.uint8)\nint(state[-1])",
            mib << 20
        );
        check(
            &pool.run_session(&mut parent, &req(&code), true, &limits),
            "making the session's state",
        )?;
        notes.push(format!(
            "- making {mib} MiB of session state took {:.1} s of guest time",
            started.elapsed().as_secs_f64()
        ));
        let mut fork = hist();
        let mut after_run = hist();
        let mut pause = hist();
        let mut slow = hist();
        for _ in 0..iterations {
            // A fork right after the session ran: the capture (the parent's
            // pause) plus a runnable child.
            check(
                &pool.run_session(&mut parent, &req("pass"), false, &limits),
                "session run before a fork",
            )?;
            let t0 = Instant::now();
            let cp = pool.checkpoint(&mut parent).map_err(|e| e.to_string())?;
            let t1 = Instant::now();
            let child = pool.sandbox_from(&cp).map_err(|e| e.to_string())?;
            let t2 = Instant::now();
            pause.record(us(t1 - t0)).ok();
            after_run.record(us(t2 - t0)).ok();
            pool.release(child);
            // The server's idle tick: the released child is reset off the
            // request path, clean for the next fork, and the idle session's
            // checkpoint is compacted into one layer.
            pool.housekeep(Duration::from_secs(1));
            parent
                .compact(COMPACT_MIN_DELTA_RUNS)
                .map_err(|e| e.to_string())?;
            // Another fork of the now idle session: its layer is reused.
            let t3 = Instant::now();
            let cp = pool.checkpoint(&mut parent).map_err(|e| e.to_string())?;
            let child = pool.sandbox_from(&cp).map_err(|e| e.to_string())?;
            fork.record(us(t3.elapsed())).ok();
            pool.release(child);
            pool.housekeep(Duration::from_secs(1));
            // The slow way: a fresh VM restored from the session's snapshot
            // (the capture measured above, the new VM, the pages copied in).
            let s0 = Instant::now();
            let mut fresh = Sandbox::fork_fresh(&kvm, &t, true).map_err(|e| e.to_string())?;
            fresh.apply_by_copy(&t, &cp).map_err(|e| e.to_string())?;
            slow.record(us(s0.elapsed() + (t1 - t0))).ok();
            drop(fresh);
        }
        // Children really continue from the state.
        let cp = pool.checkpoint(&mut parent).map_err(|e| e.to_string())?;
        let mut child = pool.sandbox_from(&cp).map_err(|e| e.to_string())?;
        let r = pool.run_session(
            &mut child,
            &req("int(state.sum() // len(state))"),
            true,
            &limits,
        );
        check(&r, "child exec")?;
        if r.result.as_deref() != Some("7") {
            return Err(format!(
                "child of the {mib} MiB session lost its state: {:?}",
                r.result
            ));
        }
        pool.release(child);
        notes.push(format!(
            "- {mib} MiB session: checkpoint holds {} KiB in {} runs (one mapping each in a child)",
            cp.dirty_bytes() >> 10,
            cp.runs()
        ));
        rows.push(Row {
            name: format!("live fork of an idle session holding {mib} MiB (child runnable)"),
            fast: fork,
            slow: Some(slow.clone()),
        });
        rows.push(Row {
            name: format!("live fork right after a run, {mib} MiB (capture + child)"),
            fast: after_run,
            slow: Some(slow),
        });
        rows.push(Row {
            name: format!("  of which the parent's pause, {mib} MiB"),
            fast: pause,
            slow: None,
        });
        if mib == 16 || opts.state_mib.len() == 1 {
            // 3. Checkpoint and restore in place.
            let mut ck = hist();
            let mut rs = hist();
            for _ in 0..iterations {
                check(
                    &pool.run_session(&mut parent, &req("pass"), false, &limits),
                    "session run before a checkpoint",
                )?;
                let t0 = Instant::now();
                let cp = pool.checkpoint(&mut parent).map_err(|e| e.to_string())?;
                ck.record(us(t0.elapsed())).ok();
                check(
                    &pool.run_session(&mut parent, &req("y = 1"), false, &limits),
                    "session run before a restore",
                )?;
                let t1 = Instant::now();
                pool.restore(&mut parent, &cp).map_err(|e| e.to_string())?;
                rs.record(us(t1.elapsed())).ok();
            }
            rows.push(Row {
                name: format!("checkpoint of a {mib} MiB session"),
                fast: ck,
                slow: None,
            });
            rows.push(Row {
                name: format!("restore in place, {mib} MiB session"),
                fast: rs,
                slow: None,
            });
            // 4. Fan-out: many children from one session, first with no VM
            // ready (each child a new VM), then onto a warm reserve of as
            // many clean VMs (`kvmfork serve --warm-sandboxes`).
            for (warm, idle) in [(false, false), (true, false), (true, true)] {
                if idle {
                    // The server's idle tick compacts the session's checkpoint.
                    parent
                        .compact(COMPACT_MIN_DELTA_RUNS)
                        .map_err(|e| e.to_string())?;
                } else {
                    check(
                        &pool.run_session(&mut parent, &req("pass"), false, &limits),
                        "session run before a fan-out",
                    )?;
                }
                let cp = pool.checkpoint(&mut parent).map_err(|e| e.to_string())?;
                if warm {
                    pool.set_warm(opts.fan_out);
                    pool.housekeep(Duration::from_secs(600));
                }
                let before_kb = meminfo_available_kb();
                let t0 = Instant::now();
                let mut children = Vec::with_capacity(opts.fan_out);
                for _ in 0..opts.fan_out {
                    children.push(pool.sandbox_from(&cp).map_err(|e| e.to_string())?);
                }
                let total = t0.elapsed();
                let after_kb = meminfo_available_kb();
                notes.push(format!(
                    "- {} children of the {mib} MiB session, {}, {}: {:.1} ms in total ({} mappings each); host memory per child before it runs ≈ {} KiB (MemAvailable drop / children)",
                    opts.fan_out,
                    if idle { "idle (after the server's tick compacted it)" } else { "right after a run" },
                    if warm { "onto as many warm VMs" } else { "no VM ready (a new VM each)" },
                    total.as_secs_f64() * 1e3,
                    cp.runs(),
                    before_kb.saturating_sub(after_kb) / opts.fan_out.max(1) as u64
                ));
                for c in children {
                    drop(c);
                }
            }
            pool.set_warm(0);
        }
        pool.release(parent);
    }

    // 5. Many live sessions at once.
    if opts.hold > 0 {
        let before_kb = meminfo_available_kb();
        let t0 = Instant::now();
        let mut held = Vec::with_capacity(opts.hold);
        for i in 0..opts.hold {
            let mut s = pool
                .open_session()
                .map_err(|e| format!("session {i}: {e}"))?;
            check(
                &pool.run_session(&mut s, &req("x = 1"), true, &limits),
                "a held session's first run",
            )?;
            held.push(s);
            if (i + 1) % 250 == 0 {
                eprintln!("bench sessions: {} live sessions", i + 1);
            }
        }
        let made = t0.elapsed();
        let used_kb = before_kb.saturating_sub(meminfo_available_kb());
        let mut h = hist();
        for (i, s) in held.iter_mut().enumerate() {
            let r = pool.run_session(s, &req("x += 1; x"), false, &limits);
            check(&r, "an exec on a held session")?;
            if r.result.as_deref() != Some("2") {
                return Err(format!("held session {i} lost its state: {:?}", r.result));
            }
            h.record(us(r.total_time)).ok();
        }
        notes.push(format!(
            "- {} live sessions held at once: made (VM + first run) in {:.1} s; host memory {} MiB in all, {} KiB each (MemAvailable drop); every one answered an exec afterwards",
            opts.hold,
            made.as_secs_f64(),
            used_kb >> 10,
            used_kb / opts.hold as u64
        ));
        rows.push(Row {
            name: format!(
                "session exec, {} sessions live at once (one exec on each)",
                opts.hold
            ),
            fast: h,
            slow: None,
        });
        drop(held);
    }

    let mut out = String::new();
    out.push_str(&format!(
        "kvmfork bench sessions: template {} ({} host), {} iterations per row\n\n",
        t.dir.display(),
        t.meta.host_kind.as_str(),
        iterations
    ));
    out.push_str("| operation | p50 | p99 | slow way p50 | slow way p99 | slow / kvmfork |\n|---|---|---|---|---|---|\n");
    for r in &rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out.push_str("\nslow way = a fresh VM restored from the session's snapshot (new VM, template mapped, the session's pages copied in, full machine state), plus the same capture.\n");
    for n in notes {
        out.push_str(&n);
        out.push('\n');
    }
    Ok(out)
}
