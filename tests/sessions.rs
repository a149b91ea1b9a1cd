//! Live sessions over HTTP on the real Python template: state that persists
//! between execs, final-expression results, timeouts that keep the session,
//! live fork, checkpoints and rollback, TTLs, ownership, limits, and every
//! route's malformed, unauthorised and wrong-owner cases. Needs /dev/kvm and
//! the built template (tests/run.sh builds it); fails loudly without them.

mod common;
#[path = "server_support/mod.rs"]
mod server_support;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::real_template::python_template;
use kvmfork::engine::lane::Engine;
use kvmfork::engine::pool::PoolConfig;
use kvmfork::engine::session::SessionConfig;
use kvmfork::server::{ServeConfig, ServerHandle};
use server_support::{Client, HttpResponse, TempFile};

const KEY_A: &str = "sessions-test-key-a";
const KEY_B: &str = "sessions-test-key-b";

struct Live {
    _handle: ServerHandle,
    addr: SocketAddr,
    _keys: TempFile,
}

fn start(sessions: SessionConfig) -> Live {
    start_with(sessions, 2, 2)
}

fn start_with(sessions: SessionConfig, shards: usize, workers_per_shard: usize) -> Live {
    let t = python_template();
    let template = kvmfork::template::Template::load(&t.dir).expect("template loads");
    let keys = TempFile::new(&format!("[\"{KEY_A}\", \"{KEY_B}\"]"));
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        // Two shards: requests for a session often land on the shard that
        // does not own it and must be handed over.
        shards,
        workers_per_shard,
        queue_depth: 16,
        max_batch: 8,
        api_keys_file: keys.path.clone(),
        rate_limit: 0.0,
        max_timeout: Duration::from_secs(60),
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
    )
    .with_session_config(sessions);
    let handle = kvmfork::server::start(config, Arc::new(engine)).expect("server starts");
    Live {
        addr: handle.local_addr(),
        _handle: handle,
        _keys: keys,
    }
}

fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(|| {
        start(SessionConfig {
            node: "n0".into(),
            ..SessionConfig::default()
        })
    })
}

fn call(
    addr: SocketAddr,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> HttpResponse {
    let mut c = Client::connect(addr);
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    c.send(method, path, &headers, body);
    c.read_response()
}

fn ok(r: HttpResponse, status: u16) -> serde_json::Value {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    if r.body.is_empty() {
        serde_json::Value::Null
    } else {
        r.json()
    }
}

fn create(addr: SocketAddr, key: &str, body: &str) -> String {
    let v = ok(
        call(addr, Some(key), "POST", "/v1/sandboxes", Some(body)),
        201,
    );
    v["sandbox_id"].as_str().expect("sandbox_id").to_string()
}

fn exec(addr: SocketAddr, key: &str, id: &str, code: &str) -> serde_json::Value {
    let body = serde_json::json!({ "code": code, "timeout_seconds": 30 }).to_string();
    ok(
        call(
            addr,
            Some(key),
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(&body),
        ),
        200,
    )
}

fn result_text(v: &serde_json::Value) -> Option<String> {
    v["result"]["text"].as_str().map(str::to_string)
}

fn delete(addr: SocketAddr, key: &str, id: &str) {
    ok(
        call(
            addr,
            Some(key),
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            None,
        ),
        204,
    );
}

#[test]
fn state_persists_between_execs_and_the_final_expression_is_the_result() {
    let l = live();
    let id = create(l.addr, KEY_A, r#"{"metadata": {"task": "t1"}}"#);
    let v = exec(
        l.addr,
        KEY_A,
        &id,
        "x = 1\nimport numpy as np\narr = np.arange(1000)",
    );
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(
        v["result"],
        serde_json::Value::Null,
        "an assignment has no value"
    );
    let v = exec(l.addr, KEY_A, &id, "x += 1; x");
    assert_eq!(result_text(&v).as_deref(), Some("2"), "{v}");
    assert_eq!(v["execution_count"], 2);
    assert_eq!(v["sandbox_id"], id.as_str());
    let v = exec(
        l.addr,
        KEY_A,
        &id,
        "def f(n):\n    return n * x\nprint(arr.sum())\nf(21)",
    );
    assert_eq!(v["stdout"], "499500\n");
    assert_eq!(result_text(&v).as_deref(), Some("42"));
    // An exception keeps the namespace.
    let v = exec(l.addr, KEY_A, &id, "y = 5\nraise ValueError('boom')");
    assert_eq!(v["exit_code"], 1);
    assert!(
        v["stderr"].as_str().unwrap().contains("ValueError: boom"),
        "{v}"
    );
    let v = exec(l.addr, KEY_A, &id, "(x, y, 'z')");
    assert_eq!(result_text(&v).as_deref(), Some("(2, 5, 'z')"));
    let info = ok(
        call(
            l.addr,
            Some(KEY_A),
            "GET",
            &format!("/v1/sandboxes/{id}"),
            None,
        ),
        200,
    );
    assert_eq!(info["execution_count"], 5);
    assert_eq!(info["metadata"]["task"], "t1");
    delete(l.addr, KEY_A, &id);
}

#[test]
fn a_timeout_interrupts_the_run_and_keeps_the_session() {
    let l = live();
    let id = create(l.addr, KEY_A, "{}");
    exec(l.addr, KEY_A, &id, "counter = 7");
    let body = r#"{"code": "while True:\n    counter += 0", "timeout_seconds": 1}"#;
    let v = ok(
        call(
            l.addr,
            Some(KEY_A),
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(body),
        ),
        200,
    );
    assert_eq!(v["timed_out"], true, "{v}");
    if !v["stderr"].as_str().unwrap().contains("KeyboardInterrupt") {
        let after = call(
            l.addr,
            Some(KEY_A),
            "GET",
            &format!("/v1/sandboxes/{id}"),
            None,
        );
        panic!(
            "no KeyboardInterrupt: {v}; the sandbox now: {}",
            String::from_utf8_lossy(&after.body)
        );
    }
    let v = exec(l.addr, KEY_A, &id, "counter + 1");
    assert_eq!(
        result_text(&v).as_deref(),
        Some("8"),
        "the session survived: {v}"
    );
    delete(l.addr, KEY_A, &id);
}

#[test]
fn live_fork_children_continue_diverge_and_have_their_own_randomness() {
    let l = live();
    let id = create(l.addr, KEY_A, "{}");
    exec(
        l.addr,
        KEY_A,
        &id,
        "import random\nstate = ['parent']\nopen('/tmp/note', 'w').write('from parent')",
    );
    let v = ok(
        call(
            l.addr,
            Some(KEY_A),
            "POST",
            &format!("/v1/sandboxes/{id}/fork"),
            Some(r#"{"count": 3}"#),
        ),
        201,
    );
    assert_eq!(v["source_id"], id.as_str());
    assert!(v["pause_ms"].as_f64().unwrap() >= 0.0);
    let children: Vec<String> = v["forks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["sandbox_id"].as_str().expect("child id").to_string())
        .collect();
    assert_eq!(children.len(), 3);
    let mut randoms = Vec::new();
    for (i, child) in children.iter().enumerate() {
        let v = exec(
            l.addr,
            KEY_A,
            child,
            &format!("state.append({i})\nprint(open('/tmp/note').read())\nrandom.random()"),
        );
        assert_eq!(v["stdout"], "from parent\n", "{v}");
        randoms.push(result_text(&v).expect("a float"));
        let v = exec(l.addr, KEY_A, child, "state");
        assert_eq!(result_text(&v), Some(format!("['parent', {i}]")));
    }
    randoms.sort();
    randoms.dedup();
    assert_eq!(
        randoms.len(),
        3,
        "children must not share random streams: {randoms:?}"
    );
    let v = exec(l.addr, KEY_A, &id, "state");
    assert_eq!(
        result_text(&v).as_deref(),
        Some("['parent']"),
        "the parent is unchanged"
    );
    for c in children.iter().chain([&id]) {
        delete(l.addr, KEY_A, c);
    }
}

#[test]
fn a_checkpoint_rolls_back_heap_and_files_and_starts_new_sessions() {
    let l = live();
    let id = create(l.addr, KEY_A, "{}");
    exec(
        l.addr,
        KEY_A,
        &id,
        "data = list(range(100000))\nopen('/tmp/f', 'w').write('v1')",
    );
    let cp = ok(
        call(
            l.addr,
            Some(KEY_A),
            "POST",
            &format!("/v1/sandboxes/{id}/checkpoints"),
            None,
        ),
        201,
    );
    let cid = cp["checkpoint_id"].as_str().unwrap().to_string();
    assert!(cp["dirty_bytes"].as_u64().unwrap() > 0, "{cp}");
    exec(
        l.addr,
        KEY_A,
        &id,
        "data.clear()\nopen('/tmp/f', 'w').write('v2')\nextra = 1",
    );
    let body = serde_json::json!({ "checkpoint_id": cid }).to_string();
    ok(
        call(
            l.addr,
            Some(KEY_A),
            "POST",
            &format!("/v1/sandboxes/{id}/restore"),
            Some(&body),
        ),
        200,
    );
    let v = exec(
        l.addr,
        KEY_A,
        &id,
        "(len(data), open('/tmp/f').read(), 'extra' in globals())",
    );
    assert_eq!(
        result_text(&v).as_deref(),
        Some("(100000, 'v1', False)"),
        "{v}"
    );
    // New sessions from the checkpoint.
    let body = serde_json::json!({ "from_checkpoint": cid, "count": 2 }).to_string();
    let v = ok(
        call(l.addr, Some(KEY_A), "POST", "/v1/sandboxes", Some(&body)),
        201,
    );
    let made: Vec<String> = v["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sandbox_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(made.len(), 2, "{v}");
    for m in &made {
        let v = exec(l.addr, KEY_A, m, "len(data)");
        assert_eq!(result_text(&v).as_deref(), Some("100000"));
        delete(l.addr, KEY_A, m);
    }
    // Another key cannot use or delete the checkpoint.
    let body = serde_json::json!({ "from_checkpoint": cid }).to_string();
    let r = call(l.addr, Some(KEY_B), "POST", "/v1/sandboxes", Some(&body));
    assert_eq!(
        (r.status, r.error_code()),
        (404, "checkpoint_not_found".to_string())
    );
    let r = call(
        l.addr,
        Some(KEY_B),
        "DELETE",
        &format!("/v1/checkpoints/{cid}"),
        None,
    );
    assert_eq!(r.status, 404);
    ok(
        call(
            l.addr,
            Some(KEY_A),
            "DELETE",
            &format!("/v1/checkpoints/{cid}"),
            None,
        ),
        204,
    );
    let r = call(
        l.addr,
        Some(KEY_A),
        "DELETE",
        &format!("/v1/checkpoints/{cid}"),
        None,
    );
    assert_eq!(r.status, 404);
    delete(l.addr, KEY_A, &id);
}

#[test]
fn a_batch_runs_each_item_in_a_throwaway_fork_of_the_session() {
    let l = live();
    let id = create(l.addr, KEY_A, "{}");
    exec(l.addr, KEY_A, &id, "base = 10");
    let body = serde_json::json!({
        "from_sandbox": id,
        "executions": [{"code": "base += 1\nprint(base)"}, {"code": "base += 2\nprint(base)"}],
    })
    .to_string();
    let v = ok(
        call(l.addr, Some(KEY_A), "POST", "/v1/exec/batch", Some(&body)),
        200,
    );
    let outs: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["stdout"].as_str().unwrap())
        .collect();
    assert_eq!(outs, ["11\n", "12\n"], "{v}");
    let v = exec(l.addr, KEY_A, &id, "base");
    assert_eq!(
        result_text(&v).as_deref(),
        Some("10"),
        "the source is unchanged"
    );
    delete(l.addr, KEY_A, &id);
}

#[test]
fn sessions_belong_to_their_key_and_unknown_or_deleted_ids_are_not_found() {
    let l = live();
    let id = create(l.addr, KEY_A, "{}");
    for (method, path, body) in [
        ("GET", format!("/v1/sandboxes/{id}"), None),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            Some(r#"{"code": "1"}"#),
        ),
        ("POST", format!("/v1/sandboxes/{id}/fork"), Some("{}")),
        ("POST", format!("/v1/sandboxes/{id}/checkpoints"), None),
        (
            "POST",
            format!("/v1/sandboxes/{id}/timeout"),
            Some(r#"{"ttl_seconds": 60}"#),
        ),
        ("DELETE", format!("/v1/sandboxes/{id}"), None),
    ] {
        let r = call(l.addr, Some(KEY_B), method, &path, body);
        assert_eq!(
            (r.status, r.error_code()),
            (404, "sandbox_not_found".to_string()),
            "{method} {path}"
        );
        let r = call(l.addr, None, method, &path, body);
        assert_eq!(r.status, 401, "{method} {path} without a key");
    }
    let mine = ok(call(l.addr, Some(KEY_A), "GET", "/v1/sandboxes", None), 200);
    assert!(mine["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["sandbox_id"] == id.as_str()));
    let theirs = ok(call(l.addr, Some(KEY_B), "GET", "/v1/sandboxes", None), 200);
    assert!(!theirs["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["sandbox_id"] == id.as_str()));
    delete(l.addr, KEY_A, &id);
    let r = call(
        l.addr,
        Some(KEY_A),
        "GET",
        &format!("/v1/sandboxes/{id}"),
        None,
    );
    assert_eq!(
        (r.status, r.error_code()),
        (404, "sandbox_not_found".to_string())
    );
    for bad in [
        "nope",
        "sbx_n0_0_0_zz",
        "sbx_n0_9_9_00000000000000000000000000000000",
    ] {
        let r = call(
            l.addr,
            Some(KEY_A),
            "GET",
            &format!("/v1/sandboxes/{bad}"),
            None,
        );
        assert_eq!(
            (r.status, r.error_code()),
            (404, "sandbox_not_found".to_string()),
            "{bad}"
        );
    }
}

#[test]
fn malformed_and_oversized_requests_get_clear_errors() {
    let l = live();
    let id = create(l.addr, KEY_A, "{}");
    let exec_path = format!("/v1/sandboxes/{id}/exec");
    for (path, body, status, code) in [
        ("/v1/sandboxes".to_string(), "{", 400, "invalid_json"),
        (
            "/v1/sandboxes".to_string(),
            r#"{"ttl_seconds": -1}"#,
            400,
            "invalid_ttl",
        ),
        (
            "/v1/sandboxes".to_string(),
            r#"{"language": "cobol"}"#,
            400,
            "unknown_language",
        ),
        (
            "/v1/sandboxes".to_string(),
            r#"{"count": 1000}"#,
            400,
            "invalid_count",
        ),
        (
            "/v1/sandboxes".to_string(),
            r#"{"unknown_field": 1}"#,
            400,
            "invalid_json",
        ),
        (exec_path.clone(), "{}", 400, "missing_code"),
        (
            exec_path.clone(),
            r#"{"code": "1", "timeout_seconds": 0}"#,
            400,
            "invalid_timeout",
        ),
        (
            exec_path.clone(),
            r#"{"code": "1", "language": "node"}"#,
            400,
            "unknown_language",
        ),
        (
            format!("/v1/sandboxes/{id}/fork"),
            r#"{"count": 0}"#,
            400,
            "invalid_count",
        ),
        (
            format!("/v1/sandboxes/{id}/restore"),
            "{}",
            400,
            "missing_checkpoint_id",
        ),
        (
            format!("/v1/sandboxes/{id}/timeout"),
            "{}",
            400,
            "missing_ttl",
        ),
    ] {
        let r = call(l.addr, Some(KEY_A), "POST", &path, Some(body));
        assert_eq!(
            (r.status, r.error_code()),
            (status, code.to_string()),
            "{path} {body}"
        );
    }
    let big = serde_json::json!({ "code": "x".repeat((1 << 20) + 1) }).to_string();
    let r = call(l.addr, Some(KEY_A), "POST", &exec_path, Some(&big));
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    let r = call(
        l.addr,
        Some(KEY_A),
        "PUT",
        &format!("/v1/sandboxes/{id}"),
        None,
    );
    assert_eq!(r.status, 405);
    // None of that hurt the session.
    let v = exec(l.addr, KEY_A, &id, "1 + 1");
    assert_eq!(result_text(&v).as_deref(), Some("2"));
    delete(l.addr, KEY_A, &id);
}

#[test]
fn a_client_that_disconnects_mid_exec_does_not_end_the_session() {
    let l = live();
    let id = create(l.addr, KEY_A, "{}");
    {
        let mut c = Client::connect(l.addr);
        let auth = format!("Bearer {KEY_A}");
        let body = r#"{"code": "import time\ntime.sleep(1)\nlate = 5"}"#;
        c.send(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            &[("Authorization", auth.as_str())],
            Some(body),
        );
        // Dropped here, before the answer.
    }
    std::thread::sleep(Duration::from_millis(200));
    let v = exec(l.addr, KEY_A, &id, "late");
    assert_eq!(result_text(&v).as_deref(), Some("5"), "{v}");
    delete(l.addr, KEY_A, &id);
}

#[test]
fn ttl_expiry_says_expired_and_limits_answer_429() {
    let l = start(SessionConfig {
        node: "n0".into(),
        max_per_key: 2,
        max_total: 3,
        default_ttl: Duration::from_secs(60),
        ..SessionConfig::default()
    });
    let short = create(l.addr, KEY_A, r#"{"ttl_seconds": 1}"#);
    let keep = create(l.addr, KEY_A, "{}");
    let r = call(l.addr, Some(KEY_A), "POST", "/v1/sandboxes", Some("{}"));
    assert_eq!(
        (r.status, r.error_code()),
        (429, "too_many_sandboxes".to_string())
    );
    let other = create(l.addr, KEY_B, "{}");
    let r = call(l.addr, Some(KEY_B), "POST", "/v1/sandboxes", Some("{}"));
    assert_eq!(
        (r.status, r.error_code()),
        (429, "server_sandbox_limit".to_string())
    );
    // A fork over the limit gets a per-child error, not a silent shortfall.
    let v = ok(
        call(
            l.addr,
            Some(KEY_B),
            "POST",
            &format!("/v1/sandboxes/{other}/fork"),
            Some(r#"{"count": 1}"#),
        ),
        429,
    );
    assert_eq!(v["error"]["code"], "server_sandbox_limit");
    // Extending a TTL works; the short one expires.
    ok(
        call(
            l.addr,
            Some(KEY_A),
            "POST",
            &format!("/v1/sandboxes/{keep}/timeout"),
            Some(r#"{"ttl_seconds": 120}"#),
        ),
        200,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = call(
            l.addr,
            Some(KEY_A),
            "POST",
            &format!("/v1/sandboxes/{short}/exec"),
            Some(r#"{"code": "1"}"#),
        );
        if r.status == 404 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        (r.status, r.error_code()),
        (404, "sandbox_expired".to_string())
    );
    // The expired one no longer counts.
    let again = create(l.addr, KEY_A, "{}");
    for (k, id) in [(KEY_A, &keep), (KEY_A, &again), (KEY_B, &other)] {
        delete(l.addr, k, id);
    }
}

#[test]
fn deleting_a_session_gives_its_vm_back() {
    // One worker: its pool keeps one idle VM, so deleting four sessions
    // must destroy at least two VMs.
    let l = start_with(
        SessionConfig {
            node: "n0".into(),
            ..SessionConfig::default()
        },
        1,
        1,
    );
    let health = |l: &Live| ok(call(l.addr, None, "GET", "/v1/health", None), 200);
    let ids: Vec<String> = (0..4).map(|_| create(l.addr, KEY_A, "{}")).collect();
    for id in &ids {
        exec(l.addr, KEY_A, id, "blob = b'x' * (4 << 20)");
    }
    let metrics =
        String::from_utf8_lossy(&call(l.addr, None, "GET", "/v1/metrics", None).body).into_owned();
    assert!(metrics.contains("kvmfork_sandboxes_live 4\n"), "{metrics}");
    let memory: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kvmfork_sandbox_memory_bytes "))
        .and_then(|v| v.parse().ok())
        .expect("memory gauge");
    assert!(
        memory >= 4 * (4 << 20),
        "each session holds its 4 MiB: {memory}"
    );
    let destroyed_before = health(&l)["pool"]["destroyed_vms"].as_u64().unwrap();
    for id in &ids {
        delete(l.addr, KEY_A, id);
    }
    // The pools keep at most one idle VM per worker: the rest are destroyed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let h = health(&l);
        let destroyed = h["pool"]["destroyed_vms"].as_u64().unwrap();
        if destroyed >= destroyed_before + 2 {
            break;
        }
        assert!(Instant::now() < deadline, "VMs not destroyed: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics =
        String::from_utf8_lossy(&call(l.addr, None, "GET", "/v1/metrics", None).body).into_owned();
    assert!(metrics.contains("kvmfork_sandboxes_live 0\n"), "{metrics}");
}

#[test]
fn node_sessions_keep_their_global_scope_and_fork() {
    let t = common::real_node_template::node_template();
    let template = kvmfork::template::Template::load(&t.dir).expect("node template loads");
    let keys = TempFile::new(&format!("[\"{KEY_A}\"]"));
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        workers_per_shard: 1,
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
    )
    .with_session_config(SessionConfig {
        node: "n0".into(),
        ..SessionConfig::default()
    });
    let handle = kvmfork::server::start(config, Arc::new(engine)).expect("server starts");
    let addr = handle.local_addr();
    let id = create(addr, KEY_A, r#"{"language": "node"}"#);
    let v = exec(
        addr,
        KEY_A,
        &id,
        "let x = 1; const seen = []; function bump() { return ++x; }",
    );
    assert_eq!(v["exit_code"], 0, "{v}");
    let v = exec(addr, KEY_A, &id, "bump(); x");
    assert_eq!(result_text(&v).as_deref(), Some("2"), "{v}");
    let v = exec(
        addr,
        KEY_A,
        &id,
        "await new Promise((r) => setTimeout(r, 10)); seen.push('a'); seen",
    );
    assert_eq!(result_text(&v).as_deref(), Some("[ 'a' ]"), "{v}");
    let v = ok(
        call(
            addr,
            Some(KEY_A),
            "POST",
            &format!("/v1/sandboxes/{id}/fork"),
            Some(r#"{"count": 2}"#),
        ),
        201,
    );
    let children: Vec<String> = v["forks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["sandbox_id"].as_str().expect("child").to_string())
        .collect();
    let mut randoms = Vec::new();
    for child in &children {
        let v = exec(addr, KEY_A, child, "bump(); [x, Math.random()]");
        let text = result_text(&v).expect("a result");
        assert!(text.starts_with("[ 3, "), "{text}");
        randoms.push(text);
    }
    assert_ne!(
        randoms[0], randoms[1],
        "children must not share Math.random"
    );
    let v = exec(addr, KEY_A, &id, "x");
    assert_eq!(
        result_text(&v).as_deref(),
        Some("2"),
        "the parent is unchanged"
    );
    for c in children.iter().chain([&id]) {
        delete(addr, KEY_A, c);
    }
    drop(handle);
}
