//! Adversarial tests of the server's memory and descriptor bounds (issue
//! 14 §2), on both event loops: a pipelined flood from a client that never
//! reads, a batch whose outputs would serialise to ~100 MiB, and thousands
//! of idle connections from one address. Each asserts a stated bound (peak
//! RSS growth, response size, connections held) and that other clients are
//! still served. Uses the TEST-ONLY lane factory from `server_support`.

mod server_support;

use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use server_support::{for_each_backend, start, Client};

/// The tests here measure the process's peak RSS: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A field of /proc/self/status in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} missing from /proc/self/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// Resets the peak RSS (VmHWM) to the current RSS and returns it.
fn reset_peak_rss() -> u64 {
    // "5" resets the peak resident set size (proc(5), clear_refs).
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting VmHWM");
    status_bytes("VmRSS")
}

const MIB: u64 = 1024 * 1024;

/// A client pipelines requests without reading a single answer. Before the
/// fix the server answered all of them into an unbounded buffer (~15 bytes
/// of response per byte of request: 32 MiB of requests made ~500 MiB).
/// Bound: the process's peak RSS grows by less than 48 MiB while the
/// client writes as fast as it can, and another client is served
/// meanwhile.
#[test]
fn a_pipelined_flood_from_a_client_that_never_reads_keeps_memory_bounded() {
    let _serial = serial();
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        assert_eq!(server.request("GET", "/v1/health", None).status, 200);
        let base = reset_peak_rss();

        let mut flood = server.connect();
        flood
            .stream
            .set_write_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let request = Client::request_bytes("GET", "/v1/health", &[], None);
        let chunk = request.repeat(64 * 1024 / request.len());
        let limit = 32 * MIB as usize;
        let mut written = 0;
        while written < limit {
            match flood.stream.write(&chunk) {
                Ok(n) => written += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => panic!("flood write failed: {e}"),
            }
        }
        let grown = status_bytes("VmHWM").saturating_sub(base);
        eprintln!(
            "{}: wrote {} MiB of pipelined requests, peak RSS +{} MiB",
            backend.name(),
            written as u64 / MIB,
            grown / MIB
        );
        assert!(
            (written as u64) < 32 * MIB,
            "the server kept reading a client that reads nothing"
        );
        assert!(grown < 48 * MIB, "peak RSS grew by {} MiB", grown / MIB);

        // Another client is served while the flood connection is stuck.
        let resp = server.request("POST", "/v1/exec", Some(r#"{"code":"echo:other"}"#));
        assert_eq!(resp.status, 200);
        assert_eq!(resp.json()["stdout"], "other");

        // The flooding client still gets its answers, in order, once it reads.
        for _ in 0..100 {
            assert_eq!(flood.read_response().json()["status"], "ok");
        }
    });
}

/// A batch whose 8 items each print 1 MiB of control characters: escaped
/// six-fold and written twice (`stdout` and `output`) that was a ~96 MiB
/// response before the fix. Bound: the body is at most the default
/// `max_response_output_bytes` (16 MiB) plus 2 KiB per item, every item
/// keeps a fair share and says it was cut, and the process's peak RSS
/// grows by less than 100 MiB: the lanes' 8 MiB of raw output, the body
/// and its copy in the connection's output buffer, and the in-process
/// client's read buffer and copy of the body (~380 MiB before the fix).
#[test]
fn a_huge_output_batch_is_cut_to_the_response_output_cap() {
    let _serial = serial();
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        let cap = server.handle().config().max_response_output_bytes as u64;
        assert_eq!(cap, 16 * MIB, "the documented default");
        let item = r#"{"code":"ctl:1048576"}"#;
        let body = format!(r#"{{"executions":[{}]}}"#, [item; 8].join(","));
        let base = reset_peak_rss();
        let resp = server.request("POST", "/v1/exec/batch", Some(&body));
        let grown = status_bytes("VmHWM").saturating_sub(base);
        assert_eq!(resp.status, 200);
        let len = resp.body.len() as u64;
        eprintln!(
            "{}: batch response {} KiB, peak RSS +{} MiB",
            backend.name(),
            len / 1024,
            grown / MIB
        );
        assert!(len <= cap + 8 * 2048, "{len} bytes");
        let results = resp.json()["results"].as_array().unwrap().clone();
        assert_eq!(results.len(), 8);
        for r in &results {
            let stdout = r["stdout"].as_str().unwrap();
            assert_eq!(r["output"], r["stdout"]);
            assert_eq!(r["stdout_truncated"], true);
            // An eighth of the cap each, a sixth of it as raw bytes, halved
            // for the copy in `output`: ~170 000 characters.
            assert!(
                stdout.len() as u64 >= cap / 8 / 6 / 2 - 16,
                "{}",
                stdout.len()
            );
            assert!(stdout.bytes().all(|b| b == 1));
        }
        assert!(grown < 100 * MIB, "peak RSS grew by {} MiB", grown / MIB);

        // Outputs under the cap are untouched.
        let resp = server.request(
            "POST",
            "/v1/exec/batch",
            Some(r#"{"executions":[{"code":"big:100000"},{"code":"echo:small"}]}"#),
        );
        let results = resp.json()["results"].clone();
        assert_eq!(results[0]["stdout"].as_str().unwrap().len(), 100_000);
        assert_eq!(results[0]["stdout_truncated"], false);
        assert_eq!(results[1]["stdout"], "small");
    });
}

/// A counter or gauge from GET /v1/metrics (not cached, unlike health).
fn metric(server: &server_support::TestServer, from: IpAddr, name: &str) -> u64 {
    let mut c = Client::connect_from(from, server.addr);
    c.send("GET", "/v1/metrics", &[], None);
    let resp = c.read_response();
    assert_eq!(resp.status, 200);
    let text = String::from_utf8(resp.body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

/// Polls `metric` until `pred` holds on it (bounded: 30 s).
fn wait_metric(
    server: &server_support::TestServer,
    from: IpAddr,
    name: &str,
    pred: impl Fn(u64) -> bool,
) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = metric(server, from, name);
        if pred(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} stuck at {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Raises this process's soft open-file limit to the hard one: the test
/// holds both ends of thousands of connections.
fn raise_nofile(needed: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one live stack value.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur >= needed,
        "this test needs {needed} open files; the hard limit is {}",
        lim.rlim_cur
    );
}

fn assert_refused(c: &mut Client, needle: &str) {
    let resp = c.read_response();
    assert_eq!(resp.status, 503);
    assert_eq!(resp.error_code(), "too_many_connections");
    assert!(resp.closes());
    assert!(resp.header("retry-after").is_some());
    let message = resp.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains(needle), "{message}");
    assert!(c.at_eof(), "a refused connection is closed");
}

/// 5 000 idle connections from one address. Before the fix every one was
/// accepted and held (a descriptor each, as many as the client liked).
/// Bound: the address holds at most `max_connections_per_address` (1024 by
/// default); the rest get `503 too_many_connections` and are closed; an
/// admitted connection and another address are still served; closed
/// connections give their places back.
#[test]
fn thousands_of_idle_connections_from_one_address_are_capped() {
    let _serial = serial();
    raise_nofile(5000 + 1024 + 512);
    let attacker: IpAddr = "127.0.0.1".parse().unwrap();
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        let per = server.handle().config().max_connections_per_address;
        assert_eq!(per, 1024, "the documented default");
        let n = 5000;
        let mut idle: Vec<Client> = (0..n)
            .map(|_| Client::connect_from(attacker, server.addr))
            .collect();
        let refused = wait_metric(
            &server,
            other,
            "kvmfork_http_connections_refused_total",
            |v| v >= (n - per) as u64,
        );
        assert_eq!(refused, (n - per) as u64);
        let open = metric(&server, other, "kvmfork_http_connections_open");
        assert_eq!(
            open,
            per as u64 + 1,
            "the idle ones and the metrics request"
        );

        // One address's share is held; a later one was refused, and said why.
        assert_refused(idle.last_mut().unwrap(), "from this address (at most 1024)");
        // An admitted connection and another address are served.
        idle[0].send("POST", "/v1/exec", &[], Some(r#"{"code":"echo:admitted"}"#));
        assert_eq!(idle[0].read_response().json()["stdout"], "admitted");
        let mut c = Client::connect_from(other, server.addr);
        c.send("POST", "/v1/exec", &[], Some(r#"{"code":"echo:other"}"#));
        assert_eq!(c.read_response().json()["stdout"], "other");
        drop(c);

        // Closing the idle connections gives their places back.
        idle.clear();
        wait_metric(&server, other, "kvmfork_http_connections_open", |v| v == 1);
        let mut c = Client::connect_from(attacker, server.addr);
        c.send("POST", "/v1/exec", &[], Some(r#"{"code":"echo:back"}"#));
        assert_eq!(c.read_response().json()["stdout"], "back");
    });
}

/// The total cap (all shards, all addresses), with a small setting.
#[test]
fn the_total_connection_cap_refuses_every_address() {
    let _serial = serial();
    let a: IpAddr = "127.0.0.3".parse().unwrap();
    let b: IpAddr = "127.0.0.4".parse().unwrap();
    for_each_backend(|backend| {
        let server = start(backend, None, |c| {
            c.max_connections = 8;
            c.shards = 2;
        });
        let mut held: Vec<Client> = (0..8)
            .map(|_| Client::connect_from(a, server.addr))
            .collect();
        // Each connection is admitted once its shard has accepted it.
        for c in &mut held {
            c.send("GET", "/v1/health", &[], None);
            assert_eq!(c.read_response().status, 200);
        }
        let mut late = Client::connect_from(b, server.addr);
        assert_refused(&mut late, "maximum of 8 connections");
        held.pop();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut c = Client::connect_from(b, server.addr);
            c.send("POST", "/v1/exec", &[], Some(r#"{"code":"echo:in"}"#));
            let resp = c.read_response();
            if resp.status == 200 {
                assert_eq!(resp.json()["stdout"], "in");
                break;
            }
            assert_eq!(resp.error_code(), "too_many_connections");
            assert!(
                Instant::now() < deadline,
                "the closed place never came back"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}
