//! Adversarial tests of the server's memory and descriptor bounds (issue
//! 14 §2), on both event loops: a pipelined flood from a client that never
//! reads, a batch whose outputs would serialise to ~100 MiB, and thousands
//! of idle connections from one address. Each asserts a stated bound (peak
//! RSS growth, response size, connections held) and that other clients are
//! still served. Uses the TEST-ONLY lane factory from `server_support`.

mod server_support;

use std::io::{ErrorKind, Write};
use std::sync::Mutex;
use std::time::Duration;

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
