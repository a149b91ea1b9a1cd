//! End-to-end runs against the in-test HTTP server: request accounting,
//! response framing, error kinds, open-loop intended-time accounting.
//! Assertions are on counts and relations, never on how fast things ran.

mod common;

use std::time::Duration;

use clap::Parser;
use common::{chunked_response, close_response, ok_response, status_response, Action, TestServer};
use loadgen::cli::Args;
use loadgen::report::Report;
use loadgen::{run, RunResult};

fn run_args(args: &[&str]) -> (Report, RunResult) {
    let mut argv = vec!["loadgen"];
    argv.extend_from_slice(args);
    let config = Args::parse_from(argv).to_config().expect("valid config");
    let result = run(&config).expect("run succeeds");
    (Report::new(&config, &result), result)
}

/// Counts that must hold for every run: each request ends exactly once.
fn assert_accounting(report: &Report) {
    let r = &report.requests;
    assert_eq!(
        r.sent,
        r.completed
            + report.errors.by_kind.connect
            + report.errors.by_kind.timeout
            + report.errors.by_kind.parse
            + report.errors.by_kind.closed,
        "{report:#?}"
    );
    assert_eq!(r.failed, r.sent - r.ok);
    assert_eq!(report.latency.count, r.ok);
    let per_request_ok: u64 = report.by_request.iter().map(|b| b.ok).sum();
    assert_eq!(per_request_ok, r.ok);
}

#[test]
fn closed_loop_sends_exactly_the_requested_count_over_keep_alive() {
    let server = TestServer::start(|_| Action::Respond(ok_response()));
    let (report, _) = run_args(&["-c", "4", "--threads", "2", "-n", "300", &server.url()]);
    assert_accounting(&report);
    assert_eq!(report.requests.sent, 300);
    assert_eq!(report.requests.ok, 300);
    assert_eq!(report.errors.total, 0);
    assert_eq!(report.status["200"], 300);
    assert_eq!(server.requests(), 300);
    // Keep-alive: never more connections than asked for.
    assert!(server.accepted() <= 4, "accepted {}", server.accepted());
    assert!(
        (1..=4).contains(&report.connections_opened),
        "{}",
        report.connections_opened
    );
    assert!(report.throughput_rps > 0.0);
    assert!(report.latency.p50_ms > 0.0 && report.latency.p50_ms <= report.latency.max_ms);
}

#[test]
fn chunked_slow_and_connection_close_responses_are_parsed() {
    let server = TestServer::start(|n| match n % 4 {
        0 => Action::Respond(chunked_response()),
        1 => Action::RespondSlowly {
            bytes: chunked_response(),
            piece: 3,
        },
        2 => Action::RespondAndClose(close_response()),
        _ => Action::RespondSlowly {
            bytes: ok_response(),
            piece: 5,
        },
    });
    let (report, _) = run_args(&["-c", "3", "-n", "200", "--timeout", "20s", &server.url()]);
    assert_accounting(&report);
    assert_eq!(report.requests.ok, 200, "{report:#?}");
    assert_eq!(report.errors.total, 0);
    // Every "Connection: close" answer forces one reconnect.
    assert!(server.accepted() >= 50, "accepted {}", server.accepted());
    assert!(
        server.accepted() <= 50 + 3,
        "accepted {}",
        server.accepted()
    );
    assert_eq!(report.connections_opened as usize, server.accepted());
}

#[test]
fn non_2xx_statuses_are_errors_by_status() {
    let server = TestServer::start(|n| {
        if n % 3 == 0 {
            Action::Respond(status_response(500))
        } else if n % 3 == 1 {
            Action::Respond(status_response(429))
        } else {
            Action::Respond(ok_response())
        }
    });
    let (report, _) = run_args(&["-c", "2", "--threads", "1", "-n", "300", &server.url()]);
    assert_accounting(&report);
    assert_eq!(report.requests.completed, 300);
    assert_eq!(report.requests.ok, 100);
    assert_eq!(report.errors.by_status["500"], 100);
    assert_eq!(report.errors.by_status["429"], 100);
    assert_eq!(report.errors.total, 200);
    assert_eq!(report.errors.by_kind.total(), 0);
}

#[test]
fn closed_connections_and_garbage_are_counted_by_kind_and_reconnected() {
    let server = TestServer::start(|n| match n % 10 {
        0 => Action::Close,
        5 => Action::Garbage,
        _ => Action::Respond(ok_response()),
    });
    let (report, _) = run_args(&["-c", "4", "-n", "300", &server.url()]);
    assert_accounting(&report);
    assert_eq!(server.requests(), 300);
    assert_eq!(report.errors.by_kind.closed, 30, "{report:#?}");
    assert_eq!(report.errors.by_kind.parse, 30, "{report:#?}");
    assert_eq!(report.requests.ok, 240);
    // Each failure costs the connection; loadgen reconnects.
    assert!(server.accepted() >= 60, "accepted {}", server.accepted());
}

#[test]
fn unanswered_requests_time_out_and_the_run_goes_on() {
    let server = TestServer::start(|n| {
        if n % 25 == 0 {
            Action::Silent
        } else {
            Action::Respond(ok_response())
        }
    });
    let (report, _) = run_args(&["-c", "4", "-n", "100", "--timeout", "2s", &server.url()]);
    assert_accounting(&report);
    assert_eq!(report.errors.by_kind.timeout, 4, "{report:#?}");
    assert_eq!(report.requests.ok, 96);
}

#[test]
fn refused_connections_are_connect_errors() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (report, result) = run_args(&["-c", "2", "-n", "20", &format!("http://127.0.0.1:{port}")]);
    assert_accounting(&report);
    assert_eq!(report.errors.by_kind.connect, 20, "{report:#?}");
    assert_eq!(result.recorder.ok, 0);
}

#[test]
fn warmup_requests_are_sent_but_not_counted() {
    let server = TestServer::start(|_| Action::Respond(ok_response()));
    let (report, _) = run_args(&["-c", "2", "-n", "50", "--warmup", "300ms", &server.url()]);
    assert_accounting(&report);
    assert_eq!(report.requests.sent, 50);
    assert!(server.requests() > 50, "server saw {}", server.requests());
}

#[test]
fn mix_weights_paths_and_api_key_reach_the_server() {
    let server = TestServer::start(|_| Action::Respond(ok_response()));
    let (report, _) = run_args(&[
        "-c",
        "3",
        "--threads",
        "1",
        "-n",
        "100",
        "--mix",
        "print=8,health=1,numpy=1",
        "--api-key",
        "sk-test",
        &server.url(),
    ]);
    assert_accounting(&report);
    let seen = server.seen();
    assert_eq!(seen.len(), 100);
    let exec: Vec<_> = seen.iter().filter(|s| s.path == "/v1/exec").collect();
    assert_eq!(exec.len(), 90);
    assert_eq!(
        seen.iter()
            .filter(|s| s.method == "GET" && s.path == "/v1/health")
            .count(),
        10
    );
    let numpy = exec
        .iter()
        .filter(|s| String::from_utf8_lossy(&s.body).contains("numpy"))
        .count();
    assert_eq!(numpy, 10);
    assert!(seen
        .iter()
        .all(|s| s.authorization.as_deref() == Some("Bearer sk-test")));
    let names: Vec<_> = report
        .by_request
        .iter()
        .map(|b| (b.name.as_str(), b.ok))
        .collect();
    assert_eq!(names, vec![("print", 80), ("health", 10), ("numpy", 10)]);
}

#[test]
fn open_loop_sends_the_scheduled_count() {
    let server = TestServer::start(|_| Action::Respond(ok_response()));
    let (report, _) = run_args(&["--rate", "400", "-d", "1s", "-c", "4", &server.url()]);
    assert_accounting(&report);
    assert_eq!(report.requests.sent, 400);
    assert_eq!(report.requests.ok, 400);
    assert_eq!(server.requests(), 400);
    assert_eq!(report.config.mode, "open");
}

#[test]
fn open_loop_charges_a_server_stall_to_every_request_scheduled_during_it() {
    const STALL_MS: u64 = 600;
    // Request 100 (about 0.5 s in at 200 req/s) stalls the whole server.
    let server = TestServer::start(|n| {
        if n == 100 {
            Action::StallEveryone {
                stall: Duration::from_millis(STALL_MS),
                bytes: ok_response(),
            }
        } else {
            Action::Respond(ok_response())
        }
    });
    let (report, result) = run_args(&[
        "--rate",
        "200",
        "-d",
        "2s",
        "-c",
        "8",
        "--timeout",
        "10s",
        &server.url(),
    ]);
    assert_accounting(&report);
    assert_eq!(report.requests.sent, 400);
    assert_eq!(report.requests.ok, 400);
    let threshold_us = STALL_MS * 1000 / 2;
    let corrected_high = result
        .recorder
        .latency
        .count_between(threshold_us, u64::MAX);
    let service_high = result
        .recorder
        .service_time
        .count_between(threshold_us, u64::MAX);
    // ~60 requests are due in the first half of the stall: each waited at
    // least half the stall counted from its intended send time. Measured from
    // the actual send, only the few in flight when it began look slow.
    assert!(
        corrected_high >= 40,
        "corrected {corrected_high}, service {service_high}"
    );
    assert!(
        service_high <= 16,
        "corrected {corrected_high}, service {service_high}"
    );
    assert!(report.latency.p90_ms > report.service_time.p90_ms);
}

#[test]
fn a_thousand_connections_are_outstanding_at_once() {
    const CONNECTIONS: usize = 1000;
    // Client and server sockets both live in this process.
    let limit = loadgen::raise_nofile_limit().expect("read RLIMIT_NOFILE");
    assert!(
        limit >= 2 * CONNECTIONS as u64 + 100,
        "open-files limit {limit} too low for this test; raise ulimit -n"
    );
    let server = TestServer::start(|_| Action::RespondOnceReceived {
        count: CONNECTIONS,
        bytes: ok_response(),
    });
    let connections = CONNECTIONS.to_string();
    let total = CONNECTIONS.to_string();
    let (report, _) = run_args(&[
        "-c",
        &connections,
        "-n",
        &total,
        "--timeout",
        "60s",
        &server.url(),
    ]);
    assert_accounting(&report);
    // Every response waited for all 1000 requests: they were in flight together.
    assert_eq!(report.requests.ok, CONNECTIONS as u64, "{report:#?}");
    assert_eq!(server.accepted(), CONNECTIONS);
}
