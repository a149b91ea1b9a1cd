//! The `loadgen` binary: help text, loopback guard, JSON schema, PNG plot.

mod common;

use std::process::Command;

use common::{ok_response, status_response, Action, TestServer};

fn loadgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .output()
        .expect("run loadgen binary")
}

#[test]
fn help_documents_every_flag() {
    let output = loadgen(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for flag in [
        "--connections",
        "--threads",
        "--rate",
        "--duration",
        "--requests",
        "--warmup",
        "--timeout",
        "--mix",
        "--body-file",
        "--method",
        "--path",
        "--content-type",
        "--header",
        "--api-key",
        "--json",
        "--plot",
        "--plot-font",
        "--allow-remote",
        "coordinated omission",
        "print",
        "numpy",
        "cpu",
        "health",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
}

#[test]
fn remote_target_is_refused_before_any_connection() {
    let output = loadgen(&["-n", "1", "http://10.255.255.1:80"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("not a loopback address") && stderr.contains("--allow-remote"),
        "{stderr}"
    );
}

#[test]
fn json_report_follows_the_documented_schema() {
    let server = TestServer::start(|n| {
        if n % 10 == 0 {
            Action::Respond(status_response(503))
        } else {
            Action::Respond(ok_response())
        }
    });
    let output = loadgen(&["-c", "2", "-n", "50", "--json", &server.url()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("stdout is one JSON document");
    assert_eq!(json["schema"], "kvmfork-loadgen/v1");
    assert_eq!(json["config"]["mode"], "closed");
    assert_eq!(json["config"]["connections"], 2);
    assert_eq!(json["config"]["requests"], 50);
    assert_eq!(json["config"]["mix"][0]["name"], "print");
    assert_eq!(json["requests"]["sent"], 50);
    assert_eq!(json["requests"]["completed"], 50);
    assert_eq!(json["requests"]["ok"], 45);
    assert_eq!(json["requests"]["failed"], 5);
    assert_eq!(json["status"]["503"], 5);
    assert_eq!(json["errors"]["total"], 5);
    assert_eq!(json["errors"]["by_status"]["503"], 5);
    for kind in ["connect", "timeout", "parse", "closed"] {
        assert_eq!(json["errors"]["by_kind"][kind], 0, "{kind}");
    }
    for field in [
        "count", "min_ms", "mean_ms", "stdev_ms", "p50_ms", "p90_ms", "p99_ms", "p99_9_ms",
        "max_ms",
    ] {
        assert!(json["latency"][field].is_number(), "latency.{field}");
        assert!(
            json["service_time"][field].is_number(),
            "service_time.{field}"
        );
    }
    assert_eq!(json["latency"]["count"], 45);
    assert!(json["throughput_rps"].as_f64().unwrap() > 0.0);
    assert!(json["elapsed_s"].as_f64().unwrap() > 0.0);
    assert!((1..=2).contains(&json["connections_opened"].as_u64().unwrap()));
    assert_eq!(json["by_request"][0]["ok"], 45);
}

#[test]
fn all_failures_exit_nonzero() {
    let server = TestServer::start(|_| Action::Respond(status_response(500)));
    let output = loadgen(&["-c", "1", "-n", "5", &server.url()]);
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("http 500: 5"), "{text}");
}

/// Needs a TrueType font (Debian: fonts-dejavu-core); fails loudly without one.
#[test]
fn plot_writes_a_png() {
    let server = TestServer::start(|_| Action::Respond(ok_response()));
    let path = std::env::temp_dir().join(format!("loadgen-plot-test-{}.png", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let output = loadgen(&[
        "-c",
        "4",
        "--rate",
        "500",
        "-d",
        "1s",
        "--plot",
        path.to_str().unwrap(),
        &server.url(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let png = std::fs::read(&path).expect("plot file written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // 1200x720 in the IHDR chunk.
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 1200);
    assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 720);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn sigint_ends_the_run_early_with_a_report() {
    let server = TestServer::start(|_| Action::Respond(ok_response()));
    let child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "-c",
            "2",
            "--rate",
            "200",
            "-d",
            "120s",
            "--json",
            &server.url(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start loadgen");
    // Wait until load is flowing, then interrupt.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.requests() < 20 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: signals our own child process by its pid.
    let killed = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(killed, 0);
    let output = child.wait_with_output().expect("loadgen exits");
    assert!(output.status.success(), "{:?}", output.status);
    let json: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("a JSON report after SIGINT");
    assert_eq!(json["interrupted"], true);
    let sent = json["requests"]["sent"].as_u64().unwrap();
    assert!((20..200 * 120).contains(&sent), "sent {sent}");
    assert_eq!(json["requests"]["ok"].as_u64().unwrap(), sent);
}
