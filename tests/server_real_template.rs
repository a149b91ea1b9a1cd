//! The HTTP server in front of the real fork engine and Python template:
//! every endpoint, error statuses, keep-alive and pipelining, a client that
//! disconnects mid-exec (the sandbox is reclaimed), and draining on shutdown.
//! Needs /dev/kvm and the built template (tests/run.sh builds it).

mod common;
#[path = "server_support/mod.rs"]
mod server_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::real_template::python_template;
use kvmfork::engine::lane::Engine;
use kvmfork::engine::pool::PoolConfig;
use kvmfork::server::{ServeConfig, ServerHandle};
use server_support::{Client, TempFile};

struct Live {
    handle: Option<ServerHandle>,
    addr: SocketAddr,
    _keys: TempFile,
}

const KEY: &str = "real-template-test-key";

fn start_live() -> Live {
    let t = python_template();
    // Share the loaded template: the engine takes templates by value, so load a second copy from its directory.
    let template = kvmfork::template::Template::load(&t.dir).expect("template loads");
    let keys = TempFile::new(&format!("[\"{KEY}\"]"));
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        workers_per_shard: 2,
        queue_depth: 8,
        max_batch: 8,
        api_keys_file: keys.path.clone(),
        rate_limit: 0.0,
        ..ServeConfig::default()
    };
    let engine = Engine::new(
        vec![template],
        PoolConfig {
            max_idle: 1,
            prewarm: 1,
            warm: 0,
            ..Default::default()
        },
    );
    let handle = kvmfork::server::start(config, Arc::new(engine)).expect("server starts");
    Live {
        addr: handle.local_addr(),
        handle: Some(handle),
        _keys: keys,
    }
}

fn text(r: &server_support::HttpResponse) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn auth() -> String {
    format!("Bearer {KEY}")
}

fn exec(c: &mut Client, body: &str) -> server_support::HttpResponse {
    let a = auth();
    c.send(
        "POST",
        "/v1/exec",
        &[
            ("Authorization", a.as_str()),
            ("Content-Type", "application/json"),
        ],
        Some(body),
    );
    c.read_response()
}

#[test]
fn endpoints_work_against_the_real_engine() {
    let live = start_live();
    let mut c = Client::connect(live.addr);
    // Keep-alive: several requests on one connection.
    let r = exec(&mut c, r#"{"code": "print(1 + 1)"}"#);
    assert_eq!(r.status, 200, "{}", text(&r));
    let j = r.json();
    assert_eq!(j["stdout"], "2\n");
    assert_eq!(j["output"], "2\n");
    assert_eq!(j["exit_code"], 0);
    for field in [
        "id",
        "fork_time_ms",
        "exec_time_ms",
        "total_time_ms",
        "duration_ms",
    ] {
        assert!(!j[field].is_null(), "missing {field}: {j}");
    }
    let r = exec(
        &mut c,
        r#"{"code": "import numpy as np\nprint(np.arange(10).mean())", "language": "python"}"#,
    );
    assert_eq!(r.json()["stdout"], "4.5\n");
    let r = exec(&mut c, r#"{"code": "import sys; sys.exit(4)"}"#);
    assert_eq!(r.json()["exit_code"], 4);
    let r = exec(
        &mut c,
        r#"{"code": "while True: pass", "timeout_seconds": 1}"#,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["timed_out"], true);
    // Batch, in order.
    let a = auth();
    c.send(
        "POST",
        "/v1/exec/batch",
        &[("Authorization", a.as_str())],
        Some(r#"{"executions": [{"code": "print('a')"}, {"code": "print('b')"}, {"code": "raise ValueError('x')"}]}"#),
    );
    let r = c.read_response();
    assert_eq!(r.status, 200, "{}", text(&r));
    let results = r.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["stdout"], "a\n");
    assert_eq!(results[1]["stdout"], "b\n");
    assert_eq!(results[2]["exit_code"], 1);
    // Health and metrics.
    c.send("GET", "/v1/health", &[], None);
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert!(text(&r).contains("python"), "{}", text(&r));
    c.send("GET", "/v1/metrics", &[], None);
    let r = c.read_response();
    assert!(
        text(&r).contains("kvmfork_fork_seconds_bucket"),
        "{}",
        text(&r)
    );
    // Errors.
    let r = exec(&mut c, r#"{"code": "print(1)", "language": "cobol"}"#);
    assert_eq!(
        (r.status, r.error_code()),
        (400, "unknown_language".to_string())
    );
    let r = exec(&mut c, r#"{"code": "#);
    assert_eq!(r.status, 400);
    let mut anon = Client::connect(live.addr);
    anon.send("POST", "/v1/exec", &[], Some(r#"{"code": "print(1)"}"#));
    assert_eq!(anon.read_response().status, 401);
    let mut c2 = Client::connect(live.addr);
    c2.send("GET", "/v1/nope", &[], None);
    assert_eq!(c2.read_response().status, 404);
    drop(live);
}

#[test]
fn pipelined_execs_answer_in_order() {
    let live = start_live();
    let mut c = Client::connect(live.addr);
    let a = auth();
    let mut raw = String::new();
    for i in 0..3 {
        let body = format!("{{\"code\": \"print({i})\"}}");
        raw.push_str(&format!(
            "POST /v1/exec HTTP/1.1\r\nHost: x\r\nAuthorization: {a}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    }
    c.write(raw.as_bytes());
    for i in 0..3 {
        let r = c.read_response();
        assert_eq!(r.json()["stdout"], format!("{i}\n"));
    }
}

#[test]
fn disconnect_mid_exec_reclaims_the_sandbox_and_shutdown_drains() {
    let live = start_live();
    {
        let mut c = Client::connect(live.addr);
        let a = auth();
        c.send(
            "POST",
            "/v1/exec",
            &[("Authorization", a.as_str())],
            Some(r#"{"code": "while True: pass", "timeout_seconds": 120}"#),
        );
        std::thread::sleep(Duration::from_millis(500));
        // Dropping the client closes the connection mid-exec.
    }
    // The cancelled sandbox is destroyed and the lane serves again well before the 120 s timeout.
    let started = Instant::now();
    let mut c = Client::connect(live.addr);
    loop {
        let r = exec(&mut c, r#"{"code": "print('next')"}"#);
        if r.status == 200 && r.json()["stdout"] == "next\n" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "server did not recover: {} {}",
            r.status,
            text(&r)
        );
    }
    let mut m = Client::connect(live.addr);
    m.send("GET", "/v1/metrics", &[], None);
    let metrics = text(&m.read_response());
    assert!(
        metrics.contains("cancel"),
        "no cancellation metric: {metrics}"
    );

    // Draining: an exec in flight when shutdown starts still gets its answer.
    let addr = live.addr;
    let inflight = std::thread::spawn(move || {
        let mut c = Client::connect(addr);
        exec(
            &mut c,
            r#"{"code": "x = 0\nfor i in range(3_000_000): x += i\nprint(x)"}"#,
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut live = live;
    let handle = live.handle.take().unwrap();
    handle.shutdown();
    let r = inflight.join().unwrap();
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(r.json()["stdout"], "4499998500000\n");
    handle.wait().expect("server drains and exits cleanly");
}
