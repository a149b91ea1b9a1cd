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
