//! /v1/metrics against real Prometheus tooling: `promtool check metrics` on
//! the scraped text, and a real Prometheus server scraping a live kvmfork.
//! Needs Debian's `prometheus` package (promtool and prometheus binaries);
//! the tests fail, never skip, when it is missing.

mod server_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvmfork::server::Backend;
use server_support::{for_each_backend, start, TestServer};

fn tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin", "/usr/local/bin"])
    {
        let candidate = Path::new(dir).join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{name}` not found: install the Debian package `prometheus` (provides promtool and prometheus)");
}

/// Some traffic that touches every metric family.
fn exercise(server: &TestServer) {
    for body in [
        r#"{"code":"echo:a"}"#,
        r#"{"code":"sleep:10","timeout_seconds":0.001}"#,
        r#"{"code":"crash"}"#,
        r#"{"code":"nonsense"}"#,
        r#"{bad json"#,
    ] {
        server.request("POST", "/v1/exec", Some(body));
    }
    server.request(
        "POST",
        "/v1/exec/batch",
        Some(r#"{"executions":[{"code":"echo:1"},{"code":"echo:2"}]}"#),
    );
    server.request("GET", "/v1/health", None);
    server.request("GET", "/nowhere", None);
}

#[test]
fn promtool_accepts_the_exposition() {
    let promtool = tool("promtool");
    for_each_backend(|backend| {
        let server = start(backend, None, |c| c.shards = 2);
        exercise(&server);
        let resp = server.request("GET", "/v1/metrics", None);
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        let text = String::from_utf8(resp.body).unwrap();

        let mut check = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = check.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && report.trim().is_empty(),
            "promtool check metrics:\n{report}\n---\n{text}"
        );

        // Content: 6 execs ran (the bad-JSON request never reached a worker).
        for expected in [
            "kvmfork_fork_seconds_count 6\n",
            "kvmfork_fork_seconds_bucket{le=\"+Inf\"} 6\n",
            "kvmfork_fork_seconds_bucket{le=\"0.00005\"} 0\n",
            "kvmfork_fork_seconds_bucket{le=\"0.00025\"} 6\n",
            "kvmfork_exec_seconds_bucket{le=\"30\"} 6\n",
            "kvmfork_total_seconds_count 6\n",
            "kvmfork_exec_timeouts_total 1\n",
            "kvmfork_guest_errors_total 1\n",
            "kvmfork_http_requests_total{endpoint=\"/v1/exec\",status=\"200\"} 3\n",
            "kvmfork_http_requests_total{endpoint=\"/v1/exec\",status=\"400\"} 2\n",
            "kvmfork_http_requests_total{endpoint=\"/v1/exec/batch\",status=\"200\"} 1\n",
            "kvmfork_http_requests_total{endpoint=\"other\",status=\"404\"} 1\n",
            "kvmfork_pool_vms{state=\"pooled\"} 4\n",
            "kvmfork_pool_forks_total 6\n",
            "kvmfork_shards 2\n",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(text.contains(&format!(
            "kvmfork_io_backend_info{{backend=\"{}\"}} 1\n",
            backend.name()
        )));
    });
}

/// A Prometheus server killed when the test ends.
struct PrometheusProcess {
    child: Child,
    dir: PathBuf,
}

impl Drop for PrometheusProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET over a fresh connection with `Connection: close`; returns the body.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Some(dechunk(body));
    }
    Some(body.to_string())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

#[test]
fn real_prometheus_scrapes_the_fork_histogram() {
    let prometheus = tool("prometheus");
    let server = start(Backend::IoUring, None, |_| {});
    exercise(&server);

    let dir = std::env::temp_dir().join(format!("kvmfork-prometheus-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: kvmfork\n    metrics_path: /v1/metrics\n    static_configs:\n      - targets: ['{}']\n",
        server.addr
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let process = PrometheusProcess {
        child: Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
        dir: dir.clone(),
    };

    let query = |q: &str| -> Option<serde_json::Value> {
        let body = http_get(web, &format!("/api/v1/query?query={q}"))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["status"] == "success").then_some(v)
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let count = loop {
        if let Some(v) = query("kvmfork_fork_seconds_count") {
            if let Some(sample) = v["data"]["result"].as_array().and_then(|r| r.first()) {
                break sample["value"][1].as_str().unwrap().parse::<f64>().unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped kvmfork_fork_seconds_count; its log:\n{}",
            std::fs::read_to_string(process.dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(count, 6.0);
    let v = query("kvmfork_fork_seconds_bucket").expect("bucket query");
    let buckets = v["data"]["result"].as_array().unwrap();
    assert_eq!(buckets.len(), 19, "18 bounds plus +Inf: {v}");
    assert!(buckets.iter().any(|b| b["metric"]["le"] == "+Inf"));
    let up = query("up").expect("up query");
    assert_eq!(
        up["data"]["result"][0]["value"][1], "1",
        "the scrape target is healthy"
    );
    let quantile =
        query("histogram_quantile(0.5,kvmfork_fork_seconds_bucket)").expect("quantile query");
    let median: f64 = quantile["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        median > 0.0001 && median <= 0.00025,
        "the test lane forks in 120 µs: median {median}"
    );
}
