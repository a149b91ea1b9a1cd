//! Cancellation and shutdown: a client leaving mid-exec cancels its run (and
//! a queued run never starts); draining finishes in-flight requests, refuses
//! new ones and stops; the drain deadline cancels what still runs; a real
//! SIGTERM drains a server running `serve()` in a child process.

mod server_support;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmfork::server::ServeConfig;
use server_support::{for_each_backend, python_ready, start, TestFactory};

const EXEC: &str = "/v1/exec";

fn metric(server: &server_support::TestServer, line_prefix: &str) -> f64 {
    let text = String::from_utf8(server.request("GET", "/v1/metrics", None).body).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(line_prefix)
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

#[test]
fn client_disconnect_cancels_running_and_queued_execs() {
    for_each_backend(|backend| {
        let server = start(backend, None, |c| c.workers_per_shard = 1);
        let mut running = server.connect();
        running.send("POST", EXEC, &[], Some(r#"{"code":"block"}"#));
        server.events.wait_started(1);
        drop(running);
        server.events.wait_cancelled(1);

        // A job still in the queue when its client leaves is never run.
        let mut holder = server.connect();
        holder.send("POST", EXEC, &[], Some(r#"{"code":"gate"}"#));
        server.events.wait_started(2);
        let mut queued = server.connect();
        queued.send("POST", EXEC, &[], Some(r#"{"code":"echo:never"}"#));
        // Wait until the server has queued it, then leave.
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&server, "kvmfork_exec_queue_depth ") < 1.0 {
            assert!(
                Instant::now() < deadline,
                "the second exec never reached the queue"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(queued);
        std::thread::sleep(Duration::from_millis(100)); // let the server see the EOF
        server.events.open_gate();
        assert_eq!(holder.read_response().json()["stdout"], "gate opened");
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&server, "kvmfork_execs_in_flight ") > 0.0 {
            assert!(Instant::now() < deadline, "execs never finished");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            server.events.started.load(Ordering::SeqCst),
            2,
            "the abandoned queued exec did not run"
        );
        assert_eq!(metric(&server, "kvmfork_exec_cancelled_total "), 2.0);
        assert_eq!(
            metric(
                &server,
                "kvmfork_http_requests_total{endpoint=\"/v1/exec\",status=\"499\"} "
            ),
            2.0
        );
        assert_eq!(
            metric(&server, "kvmfork_http_requests_in_flight "),
            1.0,
            "only the scrape itself"
        );
    });
}

#[test]
fn drain_finishes_in_flight_requests_and_refuses_new_ones() {
    for_each_backend(|backend| {
        let mut server = start(backend, None, |_| {});
        let mut busy = server.connect();
        busy.send("POST", EXEC, &[], Some(r#"{"code":"gate"}"#));
        server.events.wait_started(1);
        let mut idle = server.connect();
        idle.send("GET", "/v1/health", &[], None);
        assert_eq!(idle.read_response().status, 200);

        server.handle().shutdown();
        assert!(idle.at_eof(), "idle keep-alive connections close at once");
        let refused = TcpStream::connect(server.addr);
        assert!(refused.is_err(), "the listener is closed while draining");

        server.events.open_gate();
        let resp = busy.read_response();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.json()["stdout"], "gate opened");
        assert!(
            resp.closes(),
            "answers during the drain close their connection"
        );
        assert!(busy.at_eof());
        server
            .handle
            .take()
            .unwrap()
            .wait()
            .expect("clean exit after draining");
    });
}

#[test]
fn drain_deadline_cancels_running_execs() {
    for_each_backend(|backend| {
        let mut server = start(backend, None, |c| {
            c.drain_timeout = Duration::from_millis(200)
        });
        let mut busy = server.connect();
        busy.send(
            "POST",
            "/v1/exec/batch",
            &[],
            Some(r#"{"executions":[{"code":"block"},{"code":"echo:done"}]}"#),
        );
        server.events.wait_started(2);
        server.handle().shutdown();
        let resp = busy.read_response();
        assert_eq!(resp.status, 200);
        let results = resp.json()["results"].clone();
        assert_eq!(results[0]["error"]["code"], "cancelled");
        assert_eq!(results[1]["stdout"], "done");
        assert!(resp.closes());
        server.events.wait_cancelled(1);
        server.handle.take().unwrap().wait().expect("clean exit");
    });
}

#[test]
fn requests_arriving_while_draining_get_503() {
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        // Mid-way through a request head when the drain starts: the
        // connection stays, and the request is refused once complete.
        let mut late = server.connect();
        late.write(b"POST /v1/exec HTTP/1.1\r\n");
        let deadline = Instant::now() + Duration::from_secs(10);
        while metric(&server, "kvmfork_http_connections_open ") < 1.0 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50)); // let the shard read the partial head
        server.handle().shutdown();
        std::thread::sleep(Duration::from_millis(50));
        late.write(b"Content-Length: 17\r\n\r\n{\"code\":\"echo:x\"}");
        let resp = late.read_response();
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (503, "shutting_down")
        );
        assert_eq!(resp.header("retry-after"), Some("1"));
        assert!(resp.closes());
        assert_eq!(server.events.started.load(Ordering::SeqCst), 0);
    });
}

const CHILD_ENV: &str = "KVMFORK_SERVER_TEST_CHILD";

/// Runs `serve()` (with real signal handling) for `sigterm_drains_a_served_process`.
#[test]
#[ignore = "entry point of the child process started by sigterm_drains_a_served_process"]
fn child_serve_until_signal() {
    let backend =
        std::env::var(CHILD_ENV).expect("only run as the child of sigterm_drains_a_served_process");
    let events = Arc::new(server_support::Events::default());
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        workers_per_shard: 2,
        api_keys_file: "/nonexistent/keys.json".into(),
        force_epoll: backend == "epoll",
        ..ServeConfig::default()
    };
    let watcher_events = events.clone();
    std::thread::spawn(move || {
        watcher_events.wait_started(1);
        eprintln!("child: exec started");
    });
    let factory = TestFactory {
        events,
        slots: python_ready(),
    };
    kvmfork::server::serve(config, Arc::new(factory)).expect("serve drains cleanly");
}

#[test]
fn sigterm_drains_a_served_process() {
    for_each_backend(|backend| {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "child_serve_until_signal",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, backend.name())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut next_line = |what: &str| -> String {
            for line in lines.by_ref() {
                let line = line.unwrap();
                eprintln!("child> {line}");
                if line.contains(what) {
                    return line;
                }
            }
            panic!("child exited before printing {what:?}");
        };
        let listening = next_line("listening on http://");
        assert!(listening.contains(backend.name()), "{listening}");
        let addr = listening
            .split("http://")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let mut c = server_support::Client::connect(addr);
        c.send("POST", EXEC, &[], Some(r#"{"code":"sleep:400"}"#));
        next_line("child: exec started");
        // SAFETY: kill sends a signal to the child we spawned; no memory involved.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        next_line("draining");
        let resp = c.read_response();
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.json()["stdout"],
            "slept",
            "the in-flight exec finished"
        );
        assert!(resp.closes());
        next_line("drained, exiting");
        for line in lines {
            eprintln!("child> {}", line.unwrap());
        }
        let status = child.wait().unwrap();
        assert!(status.success(), "child exit: {status}");
    });
}
