//! The /v1 API over real sockets, on both event loops (io_uring and the
//! epoll fallback): every endpoint, every error status, keep-alive,
//! pipelining, 100-continue and timeouts. Uses the TEST-ONLY lane factory
//! from `server_support`; real-template tests live elsewhere.

mod server_support;

use std::io::Write;
use std::time::Duration;

use kvmfork::server::Backend;
use server_support::{for_each_backend, start, Client};

const EXEC: &str = "/v1/exec";

#[test]
fn health_reports_backend_templates_and_pools() {
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        let resp = server.request("GET", "/v1/health", None);
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("application/json"));
        let health = resp.json();
        assert_eq!(health["status"], "ok");
        assert_eq!(health["io_backend"], backend.name());
        assert_eq!(health["auth"], false);
        assert_eq!(health["languages"], serde_json::json!(["python"]));
        assert_eq!(health["templates"]["python"]["ready"], true);
        assert_eq!(health["templates"]["python"]["state"], "ready");
        assert_eq!(health["templates"].as_object().unwrap().len(), 1);
        assert_eq!(
            health["pool"]["pooled_vms"], 2,
            "two workers, one pooled VM each"
        );
        assert_eq!(health["shards"].as_array().unwrap().len(), 1);

        let mut c = server.connect();
        c.send("HEAD", "/v1/health", &[], None);
        let head = c.read_head_response();
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        let length: usize = head.header("content-length").unwrap().parse().unwrap();
        assert!(length > 0, "HEAD announces the GET body length");
    });
}

#[test]
fn exec_returns_the_zeroboot_shape() {
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        let resp = server.request(
            "POST",
            EXEC,
            Some(r#"{"code":"echo:hello\n","language":"python"}"#),
        );
        assert_eq!(resp.status, 200);
        let v = resp.json();
        assert_eq!(v["stdout"], "hello\n");
        assert_eq!(v["output"], v["stdout"]);
        assert_eq!(v["stderr"], "");
        assert_eq!(v["exit_code"], 0);
        assert_eq!(v["fork_time_ms"], 0.12);
        assert_eq!(v["exec_time_ms"], 2.0);
        assert_eq!(v["total_time_ms"], 2.3);
        assert_eq!(v["duration_ms"], v["total_time_ms"]);
        assert_eq!(v["timed_out"], false);
        assert_eq!(v["stdout_truncated"], false);
        assert_eq!(v["stderr_truncated"], false);
        assert!(v["error"].is_null());
        assert_eq!(v["id"].as_str().unwrap().len(), 36);

        let exit = server
            .request("POST", EXEC, Some(r#"{"code":"exit:3"}"#))
            .json();
        assert_eq!(
            (exit["exit_code"].as_i64(), exit["stderr"].as_str()),
            (Some(3), Some("bye"))
        );

        let big = server
            .request("POST", EXEC, Some(r#"{"code":"big:300000"}"#))
            .json();
        assert_eq!(
            big["stdout"].as_str().unwrap().len(),
            300_000,
            "large responses survive partial sends"
        );
    });
}

#[test]
fn timeouts_and_guest_errors_are_normal_responses() {
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        let resp = server.request(
            "POST",
            EXEC,
            Some(r#"{"code":"sleep:5000","timeout_seconds":0.05}"#),
        );
        assert_eq!(resp.status, 200);
        let v = resp.json();
        assert_eq!(v["timed_out"], true);
        assert_eq!(v["exit_code"], -1);
        assert_eq!(v["stdout"], "partial");
        assert_eq!(v["error"]["code"], "timeout");

        let crash = server.request("POST", EXEC, Some(r#"{"code":"crash"}"#));
        assert_eq!(crash.status, 200);
        let v = crash.json();
        assert_eq!(v["error"]["code"], "guest_crashed");
        assert_eq!(v["error"]["message"], "triple fault");
        assert_eq!(v["exit_code"], -1);
        assert_eq!(v["timed_out"], false);

        let rejected = server.request("POST", EXEC, Some(r#"{"code":"nonsense"}"#));
        assert_eq!(
            (rejected.status, rejected.error_code().as_str()),
            (400, "rejected")
        );
    });
}

#[test]
fn batch_runs_in_parallel_and_answers_in_order() {
    for_each_backend(|backend| {
        let server = start(backend, None, |c| c.workers_per_shard = 3);
        // barrier:3 only completes if all three run at the same time.
        let body = r#"{"executions":[{"code":"barrier:3"},{"code":"barrier:3"},{"code":"barrier:3"},{"code":"echo:last"}]}"#;
        let resp = server.request("POST", "/v1/exec/batch", Some(body));
        assert_eq!(resp.status, 200);
        let results = resp.json()["results"].as_array().unwrap().clone();
        assert_eq!(results.len(), 4);
        for r in &results[..3] {
            assert_eq!(r["stdout"], "met", "{r}");
        }
        assert_eq!(results[3]["stdout"], "last");
        let ids: std::collections::HashSet<_> = results
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids.len(), 4, "ids are unique");

        let empty = server.request("POST", "/v1/exec/batch", Some(r#"{"executions":[]}"#));
        assert_eq!(
            (
                empty.status,
                empty.json()["results"].as_array().unwrap().len()
            ),
            (200, 0)
        );
        let bad = server.request(
            "POST",
            "/v1/exec/batch",
            Some(r#"{"executions":[{"code":"echo:a"},{"language":"python"}]}"#),
        );
        assert_eq!(
            (bad.status, bad.error_code().as_str()),
            (400, "missing_code")
        );
        let too_many = format!(
            r#"{{"executions":[{}]}}"#,
            [r#"{"code":"echo:a"}"#; 9].join(",")
        );
        let resp = server.request("POST", "/v1/exec/batch", Some(&too_many));
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (400, "batch_too_large")
        );
    });
}

#[test]
fn request_validation_errors() {
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        for (body, code) in [
            ("{not json", "invalid_json"),
            (r#"{"code": 5}"#, "invalid_json"),
            (r#"{"language":"python"}"#, "missing_code"),
            (
                r#"{"code":"echo:x","language":"cobol"}"#,
                "unknown_language",
            ),
            (r#"{"code":"echo:x","language":"node"}"#, "unknown_language"),
            (
                r#"{"code":"echo:x","timeout_seconds":0}"#,
                "invalid_timeout",
            ),
            (
                r#"{"code":"echo:x","timeout_seconds":-3}"#,
                "invalid_timeout",
            ),
            (
                r#"{"code":"echo:x","timeout_seconds":100000}"#,
                "invalid_timeout",
            ),
        ] {
            let resp = server.request("POST", EXEC, Some(body));
            assert_eq!(resp.status, 400, "{body}");
            assert_eq!(resp.error_code(), code, "{body}");
            assert!(resp.json()["error"]["message"].is_string());
            assert!(!resp.closes(), "a 400 keeps the connection");
        }
    });
}

#[test]
fn routing_errors_404_405() {
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        let resp = server.request("GET", "/v2/nothing", None);
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (404, "not_found")
        );
        let resp = server.request("GET", EXEC, None);
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (405, "method_not_allowed")
        );
        assert_eq!(resp.header("allow"), Some("POST"));
        let resp = server.request("POST", "/v1/health", Some("{}"));
        assert_eq!(resp.status, 405);
        assert_eq!(resp.header("allow"), Some("GET, HEAD"));
        let resp = server.request("DELETE", "/v1/metrics", None);
        assert_eq!(resp.status, 405);

        // A refused request's body is skipped: the connection stays usable.
        let mut c = server.connect();
        c.send("POST", "/nope", &[], Some(r#"{"code":"echo:skipped"}"#));
        assert_eq!(c.read_response().status, 404);
        c.send("POST", EXEC, &[], Some(r#"{"code":"echo:after"}"#));
        assert_eq!(c.read_response().json()["stdout"], "after");
    });
}

#[test]
fn auth_401_and_rate_limit_429() {
    for_each_backend(|backend| {
        let keys = r#"["good-key", {"key": "slow-key", "rate_limit": 0.5, "rate_burst": 2}]"#;
        let server = start(backend, Some(keys), |_| {});
        let body = r#"{"code":"echo:hi"}"#;
        let mut c = server.connect();
        c.send("POST", EXEC, &[], Some(body));
        let resp = c.read_response();
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (401, "unauthorized")
        );
        assert_eq!(resp.header("www-authenticate"), Some("Bearer"));
        c.send(
            "POST",
            EXEC,
            &[("Authorization", "Bearer wrong-key")],
            Some(body),
        );
        assert_eq!(c.read_response().status, 401);
        c.send(
            "POST",
            EXEC,
            &[("Authorization", "Bearer good-key")],
            Some(body),
        );
        assert_eq!(c.read_response().json()["stdout"], "hi");
        c.send(
            "POST",
            EXEC,
            &[("Authorization", "Basic Z29vZC1rZXk=")],
            Some(body),
        );
        assert_eq!(c.read_response().status, 401, "only Bearer is accepted");
        // Health and metrics stay open for probes and scrapers.
        assert_eq!(
            server.request("GET", "/v1/health", None).json()["auth"],
            true
        );
        assert_eq!(server.request("GET", "/v1/metrics", None).status, 200);

        let slow = [("Authorization", "Bearer slow-key")];
        for _ in 0..2 {
            c.send("POST", EXEC, &slow, Some(body));
            assert_eq!(c.read_response().status, 200, "within the burst");
        }
        c.send("POST", EXEC, &slow, Some(body));
        let limited = c.read_response();
        assert_eq!(
            (limited.status, limited.error_code().as_str()),
            (429, "rate_limited")
        );
        let retry: u64 = limited.header("retry-after").unwrap().parse().unwrap();
        assert!(
            (1..=2).contains(&retry),
            "0.5 req/s -> retry within 2 s, got {retry}"
        );
        // Other keys are unaffected.
        c.send(
            "POST",
            EXEC,
            &[("Authorization", "Bearer good-key")],
            Some(body),
        );
        assert_eq!(c.read_response().status, 200);
    });
}

#[test]
fn queue_full_503_with_retry_after() {
    for_each_backend(|backend| {
        let server = start(backend, None, |c| {
            c.workers_per_shard = 1;
            c.queue_depth = 1;
            c.max_batch = 1;
        });
        let mut running = server.connect();
        running.send("POST", EXEC, &[], Some(r#"{"code":"gate"}"#));
        server.events.wait_started(1);
        let mut queued = server.connect();
        queued.send("POST", EXEC, &[], Some(r#"{"code":"echo:queued"}"#));
        // The queued job sits in the queue; wait until the server has it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let resp = server.request("POST", EXEC, Some(r#"{"code":"echo:x"}"#));
            if resp.status == 503 {
                assert_eq!(resp.error_code(), "queue_full");
                assert_eq!(resp.header("retry-after"), Some("1"));
                break;
            }
            // Raced ahead of the queued request: it ran nothing (gate holds the worker).
            assert!(
                std::time::Instant::now() < deadline,
                "never saw 503, last {}",
                resp.status
            );
        }
        server.events.open_gate();
        assert_eq!(running.read_response().json()["stdout"], "gate opened");
        assert_eq!(queued.read_response().json()["stdout"], "queued");
    });
}

#[test]
fn keep_alive_and_connection_close() {
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        let mut c = server.connect();
        for i in 0..20 {
            c.send(
                "POST",
                EXEC,
                &[],
                Some(&format!(r#"{{"code":"echo:{i}"}}"#)),
            );
            let resp = c.read_response();
            assert_eq!(resp.json()["stdout"], i.to_string());
            assert!(!resp.closes());
        }
        c.send("GET", "/v1/health", &[("Connection", "close")], None);
        let last = c.read_response();
        assert!(last.closes());
        assert!(c.at_eof(), "server closes after Connection: close");

        // HTTP/1.0 without keep-alive closes too.
        let mut old = server.connect();
        old.write(b"GET /v1/health HTTP/1.0\r\n\r\n");
        assert!(old.read_response().closes());
        assert!(old.at_eof());
    });
}

#[test]
fn pipelined_requests_answer_in_order() {
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        let mut c = server.connect();
        let mut burst = Vec::new();
        burst.extend(Client::request_bytes(
            "POST",
            EXEC,
            &[],
            Some(r#"{"code":"sleep:50"}"#),
        ));
        burst.extend(Client::request_bytes("GET", "/v1/health", &[], None));
        burst.extend(Client::request_bytes(
            "POST",
            EXEC,
            &[],
            Some(r#"{"code":"echo:third"}"#),
        ));
        burst.extend(Client::request_bytes("GET", "/missing", &[], None));
        burst.extend(Client::request_bytes(
            "POST",
            "/v1/exec/batch",
            &[],
            Some(r#"{"executions":[{"code":"echo:b"}]}"#),
        ));
        c.write(&burst);
        assert_eq!(c.read_response().json()["stdout"], "slept");
        assert_eq!(c.read_response().json()["status"], "ok");
        assert_eq!(c.read_response().json()["stdout"], "third");
        assert_eq!(c.read_response().status, 404);
        assert_eq!(c.read_response().json()["results"][0]["stdout"], "b");

        // Byte-at-a-time delivery parses the same.
        let mut slow = server.connect();
        for byte in Client::request_bytes("POST", EXEC, &[], Some(r#"{"code":"echo:drip"}"#)) {
            slow.stream.write_all(&[byte]).unwrap();
        }
        assert_eq!(slow.read_response().json()["stdout"], "drip");
    });
}

#[test]
fn expect_100_continue() {
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        let body = r#"{"code":"echo:continued"}"#;
        let mut c = server.connect();
        let head = format!(
            "POST {EXEC} HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        c.write(head.as_bytes());
        assert_eq!(c.read_response().status, 100);
        c.write(body.as_bytes());
        assert_eq!(c.read_response().json()["stdout"], "continued");

        // Refused before the body: the final status comes instead of 100, then close.
        let mut c = server.connect();
        c.write(b"POST /nope HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n");
        let resp = c.read_response();
        assert_eq!(resp.status, 404);
        assert!(resp.closes());

        let mut c = server.connect();
        c.write(b"POST /v1/exec HTTP/1.1\r\nExpect: teapot\r\nContent-Length: 2\r\n\r\n{}");
        let resp = c.read_response();
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (417, "expectation_failed")
        );
    });
}

#[test]
fn size_limits_413_431_and_chunked_411() {
    for_each_backend(|backend| {
        let server = start(backend, None, |c| {
            c.max_body_bytes = 1024;
            c.max_head_bytes = 1024;
        });
        // Declared too large: refused without reading the body.
        let mut c = server.connect();
        c.write(b"POST /v1/exec HTTP/1.1\r\nContent-Length: 5000\r\n\r\n");
        let resp = c.read_response();
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (413, "body_too_large")
        );
        assert!(resp.closes());
        assert!(c.at_eof());

        let mut c = server.connect();
        let mut head = b"GET /v1/health HTTP/1.1\r\n".to_vec();
        head.extend(format!("X-Padding: {}\r\n\r\n", "a".repeat(2000)).bytes());
        c.write(&head);
        let resp = c.read_response();
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (431, "headers_too_large")
        );
        assert!(resp.closes());

        let mut c = server.connect();
        c.write(
            b"POST /v1/exec HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        );
        let resp = c.read_response();
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (411, "length_required")
        );
        assert!(resp.closes());

        let mut c = server.connect();
        c.write(b"\x16\x03\x01 this is not http\r\n\r\n");
        let resp = c.read_response();
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (400, "bad_request")
        );
    });
}

#[test]
fn slow_and_idle_clients_are_timed_out() {
    for_each_backend(|backend| {
        let server = start(backend, None, |c| {
            c.request_timeout = Duration::from_millis(300);
            c.idle_timeout = Duration::from_millis(300);
        });
        // Half a request head, then silence: 408 and close.
        let mut c = server.connect();
        c.write(b"POST /v1/exec HTTP/1.1\r\nContent-Le");
        let resp = c.read_response();
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (408, "request_timeout")
        );
        assert!(resp.closes());
        assert!(c.at_eof());

        // A body that never completes: 408 as well.
        let mut c = server.connect();
        c.write(b"POST /v1/exec HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"co");
        assert_eq!(c.read_response().status, 408);

        // An idle keep-alive connection is closed silently.
        let mut c = server.connect();
        c.send("GET", "/v1/health", &[], None);
        assert_eq!(c.read_response().status, 200);
        assert!(c.at_eof(), "idle connection closed");

        // An exec longer than the timeouts is not cut off by them.
        let resp = server.request("POST", EXEC, Some(r#"{"code":"sleep:700"}"#));
        assert_eq!(resp.json()["stdout"], "slept");
    });
}

#[test]
fn io_uring_receive_rearms_when_provided_buffers_run_out() {
    // Two 4 KiB buffers for a 256 KiB body: the multishot receive runs out
    // of buffers (ENOBUFS) again and again and must be re-armed each time.
    let server = start(Backend::IoUring, None, |c| {
        c.recv_buffers = 2;
        c.max_body_bytes = 1 << 20;
    });
    let text = "y".repeat(256 * 1024);
    let body = format!(r#"{{"code":"echo:{text}"}}"#);
    let mut c = server.connect();
    for _ in 0..3 {
        c.send("POST", EXEC, &[], Some(&body));
        let resp = c.read_response();
        assert_eq!(resp.status, 200);
        assert!(
            resp.json()["stdout"].as_str().unwrap() == text,
            "body arrived intact"
        );
    }
    let metrics = String::from_utf8(server.request("GET", "/v1/metrics", None).body).unwrap();
    let exhausted: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kvmfork_io_recv_buffers_exhausted_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(exhausted > 0, "the test did not exhaust the buffer ring");
}

#[test]
fn shards_share_the_port() {
    let server = start(Backend::IoUring, None, |c| c.shards = 2);
    let health = server.request("GET", "/v1/health", None).json();
    assert_eq!(health["shards"].as_array().unwrap().len(), 2);
    // SO_REUSEPORT spreads connections by hash; enough of them reach both shards.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..64 {
        let v = server
            .request("POST", EXEC, Some(r#"{"code":"shard"}"#))
            .json();
        seen.insert(v["stdout"].as_str().unwrap().to_string());
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "both shards served requests");
}

#[test]
fn zeroboot_unversioned_exec_and_health_aliases() {
    for_each_backend(|backend| {
        let server = start(backend, Some(r#"["zb-key"]"#), |_| {});
        let auth = [("Authorization", "Bearer zb-key")];

        // POST /exec: the same handler, shape, auth and method rules as /v1/exec.
        let mut c = server.connect();
        c.send("POST", "/exec", &auth, Some(r#"{"code":"echo:zb\n"}"#));
        let resp = c.read_response();
        assert_eq!(resp.status, 200);
        let v = resp.json();
        for field in [
            "id",
            "stdout",
            "stderr",
            "exit_code",
            "fork_time_ms",
            "exec_time_ms",
            "total_time_ms",
        ] {
            assert!(v.get(field).is_some(), "/exec answer lacks {field}: {v}");
        }
        assert_eq!(
            (v["stdout"].as_str(), v["exit_code"].as_i64()),
            (Some("zb\n"), Some(0))
        );
        let resp = server.request("POST", "/exec", Some(r#"{"code":"echo:x"}"#));
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (401, "unauthorized")
        );
        c.send("POST", "/exec", &auth, Some(r#"{"language":"python"}"#));
        assert_eq!(c.read_response().error_code(), "missing_code");
        let resp = server.request("GET", "/exec", None);
        assert_eq!(resp.status, 405);
        assert_eq!(resp.header("allow"), Some("POST"));

        // GET/HEAD /health: the /v1/health body, templates keyed by language.
        let v1 = server.request("GET", "/v1/health", None).json();
        let resp = server.request("GET", "/health", None);
        assert_eq!(resp.status, 200);
        let health = resp.json();
        assert_eq!(health["status"], "ok");
        assert_eq!(health["templates"]["python"]["ready"], true);
        assert_eq!(
            health.as_object().unwrap().keys().collect::<Vec<_>>(),
            v1.as_object().unwrap().keys().collect::<Vec<_>>()
        );
        c.send("HEAD", "/health", &[], None);
        let head = c.read_head_response();
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        let resp = server.request("POST", "/health", Some("{}"));
        assert_eq!(resp.status, 405);
        assert_eq!(resp.header("allow"), Some("GET, HEAD"));

        // Counted under the /v1/exec endpoint label.
        let metrics = String::from_utf8(server.request("GET", "/v1/metrics", None).body).unwrap();
        assert!(
            metrics
                .lines()
                .any(|l| l.contains(r#"endpoint="/v1/exec""#) && l.contains(r#"status="200""#)),
            "{metrics}"
        );
    });
}
