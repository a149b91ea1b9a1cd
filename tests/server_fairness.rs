//! Fair shares between API keys (issue 14 §1), on both event loops: one
//! request cannot book worker time without bound. Uses the TEST-ONLY lane
//! factory from `server_support`.

mod server_support;

use std::sync::atomic::Ordering;

use server_support::{for_each_backend, start};

/// Before the fix a batch of 64 x `timeout_seconds: 300` (5 h 20 min of
/// worker time) was admitted for one rate-limit token. Bound: a batch's
/// timeouts add up to at most `--max-batch-seconds` (default 1920 s, 64 x
/// the default timeout); above it the batch is refused whole, before
/// anything runs.
#[test]
fn a_batch_cannot_book_more_than_the_batch_time_cap() {
    for_each_backend(|backend| {
        let server = start(backend, None, |_| {});
        let cap = server.handle().config().max_batch_time;
        assert_eq!(cap.as_secs(), 1920, "the documented default");
        let item = |t: u32| format!(r#"{{"code":"echo:x","timeout_seconds":{t}}}"#);
        let batch = |items: Vec<String>| format!(r#"{{"executions":[{}]}}"#, items.join(","));

        let resp = server.request("POST", "/v1/exec/batch", Some(&batch(vec![item(300); 8])));
        assert_eq!(resp.status, 400);
        assert_eq!(resp.error_code(), "batch_time_exceeded");
        let message = resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.contains("1920 s, got 2400 s"), "{message}");
        assert_eq!(
            server.events.started.load(Ordering::SeqCst),
            0,
            "nothing ran"
        );

        // Items without timeout_seconds count the default (30 s): 8 fit.
        let resp = server.request(
            "POST",
            "/v1/exec/batch",
            Some(&batch(vec![r#"{"code":"echo:x"}"#.to_string(); 8])),
        );
        assert_eq!(resp.status, 200);
        // Exactly at the cap is allowed.
        let resp = server.request("POST", "/v1/exec/batch", Some(&batch(vec![item(240); 8])));
        assert_eq!(resp.status, 200, "{:?}", resp.json());
        assert_eq!(resp.json()["results"].as_array().unwrap().len(), 8);
    });
}

/// A counter or gauge from GET /v1/metrics (not cached, unlike health).
fn metric(server: &server_support::TestServer, name: &str) -> u64 {
    let resp = server.request("GET", "/v1/metrics", None);
    let text = String::from_utf8(resp.body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}

/// Key A fills both workers and queues six more execs (one batch); key B
/// then sends one exec. Before the fix the shard's queue was one FIFO, so
/// B's exec started ninth, after all of A's batch (with 300 s items: five
/// minutes of waiting). Now one of the next free workers takes B's exec: it
/// starts third or fourth, and A's batch still completes in full.
#[test]
fn another_keys_exec_takes_the_next_free_worker_ahead_of_a_queued_batch() {
    for_each_backend(|backend| {
        let server = start(backend, Some(r#"["key-a", "key-b"]"#), |c| {
            c.workers_per_shard = 2;
            c.queue_depth = 16;
        });
        let send = |key: &str, path: &str, body: &str| {
            let mut c = server.connect();
            let auth = format!("Bearer {key}");
            c.send("POST", path, &[("Authorization", &auth)], Some(body));
            c
        };
        let batch = format!(
            r#"{{"executions":[{}]}}"#,
            [r#"{"code":"gate"}"#; 8].join(",")
        );
        let mut a = send("key-a", "/v1/exec/batch", &batch);
        server.events.wait_started(2);
        let mut b = send("key-b", "/v1/exec", r#"{"code":"echo:b"}"#);
        // Both workers are held by the gate; wait until B's exec is queued
        // behind A's six.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while metric(&server, "kvmfork_exec_queue_depth") < 7 {
            assert!(
                std::time::Instant::now() < deadline,
                "B's exec never queued"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        server.events.open_gate();
        assert_eq!(b.read_response().json()["stdout"], "b");
        let results = a.read_response().json()["results"].clone();
        assert_eq!(results.as_array().unwrap().len(), 8);
        assert!(results
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["stdout"] == "gate opened"));
        let log = server.events.log.lock().unwrap().clone();
        let b_started = log.iter().position(|c| c == "echo:b").unwrap();
        // Opening the gate frees both workers at once: B's exec takes one of
        // those two (3rd or 4th start; without the fair queue it was 9th).
        assert!(
            (2..=3).contains(&b_started),
            "B started {}th; start order: {log:?}",
            b_started + 1
        );
    });
}

/// A key's rate limit is one for the whole server. Before the fix each
/// shard kept its own bucket, so a key got `rate x shards` (here 8 requests
/// of a burst of 4, from two connections landing on the two shards). Now
/// every shard updates the key's one lock-free state: 4 in all.
#[test]
fn a_keys_rate_limit_is_shared_by_the_shards() {
    for_each_backend(|backend| {
        let keys = r#"[{"key": "slow", "rate_limit": 0.001, "rate_burst": 4}, {"key": "probe", "rate_limit": 0}]"#;
        let server = start(backend, Some(keys), |c| c.shards = 2);
        let exec = |c: &mut server_support::Client, key: &str, code: &str| {
            let auth = format!("Bearer {key}");
            let body = format!(r#"{{"code":"{code}"}}"#);
            c.send("POST", "/v1/exec", &[("Authorization", &auth)], Some(&body));
            c.read_response()
        };
        // One keep-alive connection on each shard (SO_REUSEPORT spreads
        // connections by their address hash).
        let mut on_shard: [Option<server_support::Client>; 2] = [None, None];
        for _ in 0..200 {
            if on_shard.iter().all(Option::is_some) {
                break;
            }
            let mut c = server.connect();
            let shard: usize = exec(&mut c, "probe", "shard").json()["stdout"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            on_shard[shard].get_or_insert(c);
        }
        let mut admitted = 0;
        for c in on_shard.iter_mut() {
            let c = c.as_mut().expect("a connection on each shard");
            for _ in 0..4 {
                let resp = exec(c, "slow", "echo:x");
                match resp.status {
                    200 => admitted += 1,
                    429 => assert_eq!(resp.error_code(), "rate_limited"),
                    other => panic!("unexpected status {other}"),
                }
            }
        }
        assert_eq!(admitted, 4, "the burst, once for the server");
    });
}

/// A key may hold at most `--max-execs-per-key` execs queued or running on
/// the node, each batch item counted, whichever shard they are on. Before
/// the fix nothing capped it: a key could take every place in every
/// shard's queue (then other keys got `503 queue_full`). Here the cap is 8:
/// key A's 8-item batch holds it, A's next exec is refused on either shard
/// with `429 too_many_execs`, key B is admitted, and A's places come back
/// when its batch completes.
#[test]
fn a_key_holds_at_most_its_execs_in_flight_on_any_shard() {
    for_each_backend(|backend| {
        let server = start(backend, Some(r#"["key-a", "key-b"]"#), |c| {
            c.shards = 2;
            c.queue_depth = 16;
            c.max_batch = 8;
            c.max_execs_per_key = 8;
        });
        let send = |key: &str, path: &str, body: &str| {
            let mut c = server.connect();
            let auth = format!("Bearer {key}");
            c.send("POST", path, &[("Authorization", &auth)], Some(body));
            c
        };
        let batch = format!(
            r#"{{"executions":[{}]}}"#,
            [r#"{"code":"gate"}"#; 8].join(",")
        );
        let mut a = send("key-a", "/v1/exec/batch", &batch);
        server.events.wait_started(2);
        // Fresh connections land on both shards; every one is refused.
        for _ in 0..6 {
            let resp = send("key-a", "/v1/exec", r#"{"code":"echo:more"}"#).read_response();
            assert_eq!(resp.status, 429);
            assert_eq!(resp.error_code(), "too_many_execs");
            assert!(resp.header("retry-after").is_some());
        }
        let mut b = send("key-b", "/v1/exec", r#"{"code":"echo:b"}"#);
        server.events.open_gate();
        assert_eq!(b.read_response().json()["stdout"], "b");
        assert_eq!(
            a.read_response().json()["results"]
                .as_array()
                .unwrap()
                .len(),
            8
        );
        let resp = send("key-a", "/v1/exec", r#"{"code":"echo:again"}"#).read_response();
        assert_eq!(resp.json()["stdout"], "again");
    });
}

/// Sends one request with key `key` on a fresh connection; the response
/// is read later.
fn send(
    server: &server_support::TestServer,
    key: &str,
    path: &str,
    body: &str,
) -> server_support::Client {
    let mut c = server.connect();
    let auth = format!("Bearer {key}");
    c.send("POST", path, &[("Authorization", &auth)], Some(body));
    c
}

/// Waits (bounded) until `n` execs wait in the queue.
fn wait_queued(server: &server_support::TestServer, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while metric(server, "kvmfork_exec_queue_depth") < n {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than {n} execs ever queued"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A new session for `key` (on the one shard's worker the server picks).
fn create_session(server: &server_support::TestServer, key: &str) -> String {
    let resp = send(server, key, "/v1/sandboxes", "{}").read_response();
    assert_eq!(resp.status, 201, "{:?}", resp.json());
    resp.json()["sandbox_id"].as_str().unwrap().to_string()
}

/// Session execs wait in the same per-key fair queue as stateless ones.
/// Before the fix they went to a per-worker channel that the worker served
/// before the fair queue, so key A's queued session execs all ran before
/// key B's stateless exec (B started 6th here, after A's four session
/// execs; and none of them showed in `kvmfork_exec_queue_depth`). Now B,
/// which used no worker time, goes first once the worker frees.
#[test]
fn session_execs_wait_in_the_fair_queue_with_stateless_ones() {
    for_each_backend(|backend| {
        let server = start(backend, Some(r#"["key-a", "key-b"]"#), |c| {
            c.workers_per_shard = 1;
            c.queue_depth = 16;
        });
        let id = create_session(&server, "key-a");
        let mut gate = send(&server, "key-a", "/v1/exec", r#"{"code":"gate"}"#);
        server.events.wait_started(1);
        let path = format!("/v1/sandboxes/{id}/exec");
        let mut sessions: Vec<_> = (0..4)
            .map(|_| send(&server, "key-a", &path, r#"{"code":"echo:s"}"#))
            .collect();
        wait_queued(&server, 4);
        let mut b = send(&server, "key-b", "/v1/exec", r#"{"code":"echo:b"}"#);
        wait_queued(&server, 5);
        server.events.open_gate();
        assert_eq!(b.read_response().json()["stdout"], "b");
        assert_eq!(gate.read_response().status, 200);
        for c in &mut sessions {
            let resp = c.read_response();
            assert_eq!(resp.status, 200, "{:?}", resp.json());
            assert_eq!(resp.json()["stdout"], "s");
        }
        let log = server.events.log.lock().unwrap().clone();
        assert_eq!(log[0], "gate");
        assert_eq!(log[1], "echo:b", "start order: {log:?}");
    });
}

/// A session exec counts towards `--max-execs-per-key` like a stateless
/// one: with key A's 8-item batch holding its cap of 8, A's session exec is
/// refused, and key B's session exec runs.
#[test]
fn session_execs_count_towards_the_keys_exec_cap() {
    for_each_backend(|backend| {
        let server = start(backend, Some(r#"["key-a", "key-b"]"#), |c| {
            c.queue_depth = 16;
            c.max_batch = 8;
            c.max_execs_per_key = 8;
        });
        let a_id = create_session(&server, "key-a");
        let b_id = create_session(&server, "key-b");
        let batch = format!(
            r#"{{"executions":[{}]}}"#,
            [r#"{"code":"gate"}"#; 8].join(",")
        );
        let mut a = send(&server, "key-a", "/v1/exec/batch", &batch);
        server.events.wait_started(1);
        let path = |id: &str| format!("/v1/sandboxes/{id}/exec");
        let resp = send(&server, "key-a", &path(&a_id), r#"{"code":"echo:s"}"#).read_response();
        assert_eq!(resp.status, 429, "{:?}", resp.json());
        assert_eq!(resp.error_code(), "too_many_execs");
        let mut b = send(&server, "key-b", &path(&b_id), r#"{"code":"echo:b"}"#);
        server.events.open_gate();
        assert_eq!(b.read_response().json()["stdout"], "b");
        assert_eq!(a.read_response().status, 200);
        // A's places came back.
        let resp = send(&server, "key-a", &path(&a_id), r#"{"code":"echo:s"}"#).read_response();
        assert_eq!(resp.json()["stdout"], "s");
    });
}

/// Shares are by worker time, not exec count. Key A's one exec held the
/// only worker (a gate, open for as long as the test needs to queue the
/// rest); A then queued one more exec, and key B one after it. Before the
/// fix both keys had zero execs running when the worker freed, so A's went
/// first (older); now A's time on the worker puts B's first.
#[test]
fn the_key_that_used_less_worker_time_goes_first() {
    for_each_backend(|backend| {
        let server = start(backend, Some(r#"["key-a", "key-b"]"#), |c| {
            c.workers_per_shard = 1;
        });
        let mut gate = send(&server, "key-a", "/v1/exec", r#"{"code":"gate"}"#);
        server.events.wait_started(1);
        let mut a = send(&server, "key-a", "/v1/exec", r#"{"code":"echo:a"}"#);
        wait_queued(&server, 1);
        let mut b = send(&server, "key-b", "/v1/exec", r#"{"code":"echo:b"}"#);
        wait_queued(&server, 2);
        server.events.open_gate();
        for (c, out) in [(&mut gate, "gate opened"), (&mut a, "a"), (&mut b, "b")] {
            assert_eq!(c.read_response().json()["stdout"], out);
        }
        let log = server.events.log.lock().unwrap().clone();
        assert_eq!(log, ["gate", "echo:b", "echo:a"]);
    });
}

/// Runs are not preempted, so a key that holds every worker with long runs
/// makes any other key wait for one of them to end (before the fix: key A's
/// 4 gated execs took both workers, and B's exec waited for the gate,
/// here forever). Now, while another key is active (B ran an exec just
/// before), A may hold at most one of the two workers: B's exec starts and
/// completes while A's runs are still held, then A's batch completes.
/// Bound: B's exec starts without waiting for any of A's runs.
#[test]
fn one_worker_stays_free_for_another_active_key() {
    for_each_backend(|backend| {
        let server = start(backend, Some(r#"["key-a", "key-b"]"#), |c| {
            c.workers_per_shard = 2;
            c.queue_depth = 16;
        });
        let warm = send(&server, "key-b", "/v1/exec", r#"{"code":"echo:warm"}"#).read_response();
        assert_eq!(warm.json()["stdout"], "warm");
        let batch = format!(
            r#"{{"executions":[{}]}}"#,
            [r#"{"code":"gate"}"#; 4].join(",")
        );
        let mut a = send(&server, "key-a", "/v1/exec/batch", &batch);
        server.events.wait_started(2);
        wait_queued(&server, 3);
        let mut b = send(&server, "key-b", "/v1/exec", r#"{"code":"echo:b"}"#);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while server.events.finished.load(Ordering::SeqCst) < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "B's exec did not run while A's held a worker; start order: {:?}",
                server.events.log.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(b.read_response().json()["stdout"], "b");
        assert_eq!(
            server.events.started.load(Ordering::SeqCst),
            3,
            "one of A's runs and B's two"
        );
        server.events.open_gate();
        let results = a.read_response().json()["results"].clone();
        assert_eq!(results.as_array().unwrap().len(), 4);
        assert!(results
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["stdout"] == "gate opened"));
    });
}

/// The one-worker reserve holds across shards. Key B ran an exec on shard
/// 1 just now; key A then sends a batch of gates on shard 0, whose two
/// workers it could fill. Before the fix shard 0's queue saw only its own
/// keys, found B inactive there and gave A both workers, so B's next exec
/// landing on shard 0 waited behind the gates (until two of them timed
/// out, 5 s, as the gate only opens after B's answer). Now one worker stays
/// free and B's exec runs at once.
#[test]
fn the_worker_reserve_counts_keys_active_on_other_shards() {
    for_each_backend(|backend| {
        let server = start(backend, Some(r#"["key-a", "key-b"]"#), |c| {
            c.shards = 2;
            c.workers_per_shard = 2;
            c.queue_depth = 16;
        });
        let exec = |c: &mut server_support::Client, key: &str, body: &str, path: &str| {
            let auth = format!("Bearer {key}");
            c.send("POST", path, &[("Authorization", &auth)], Some(body));
        };
        // Keep-alive connections, two on shard 0 and one on shard 1
        // (SO_REUSEPORT spreads connections by their address hash), found
        // by A asking its lane's shard: B is never active on shard 0.
        let mut on_shard: [Vec<server_support::Client>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..400 {
            if on_shard[0].len() >= 2 && !on_shard[1].is_empty() {
                break;
            }
            let mut c = server.connect();
            exec(&mut c, "key-a", r#"{"code":"shard"}"#, "/v1/exec");
            let shard: usize = c.read_response().json()["stdout"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            on_shard[shard].push(c);
        }
        let [mut zero, mut one] = on_shard;
        assert!(zero.len() >= 2 && !one.is_empty(), "connections per shard");
        let mut shard1 = one.remove(0);
        let mut a = zero.remove(0);
        let mut b = zero.remove(0);
        exec(&mut shard1, "key-b", r#"{"code":"echo:b1"}"#, "/v1/exec");
        assert_eq!(shard1.read_response().json()["stdout"], "b1");
        let started = server.events.started.load(Ordering::SeqCst);
        let batch = format!(
            r#"{{"executions":[{}]}}"#,
            [r#"{"code":"gate","timeout_seconds":5}"#; 4].join(",")
        );
        exec(&mut a, "key-a", &batch, "/v1/exec/batch");
        server.events.wait_started(started + 1);
        // Time for a second gate to start if the reserve let it.
        std::thread::sleep(std::time::Duration::from_millis(300));
        exec(&mut b, "key-b", r#"{"code":"echo:b2"}"#, "/v1/exec");
        let resp = b.read_response();
        assert_eq!(resp.json()["stdout"], "b2", "B's exec on shard 0");
        server.events.open_gate();
        // B did not wait for a gate to time out: all four were opened.
        let results = a.read_response().json()["results"].clone();
        assert_eq!(results.as_array().unwrap().len(), 4);
        assert!(
            results
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["stdout"] == "gate opened"),
            "{results}"
        );
    });
}
