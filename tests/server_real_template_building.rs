//! The real fork engine serving a template that becomes ready while the
//! server runs (what `kvmfork serve` does while it builds templates in the
//! background): 503 template_building first, then real runs once the Python
//! template is published; a failed Node slot answers 500 template_failed.
//! Needs /dev/kvm and the built Python template (tests/run.sh builds it).

mod common;
#[path = "server_support/mod.rs"]
mod server_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::real_template::python_template;
use kvmfork::api::Language;
use kvmfork::engine::lane::{Engine, TemplateRegistry};
use kvmfork::engine::pool::PoolConfig;
use kvmfork::server::ServeConfig;
use server_support::Client;

#[test]
fn a_template_published_while_serving_is_served() {
    let template = python_template();
    let registry = Arc::new(TemplateRegistry::building(&[
        Language::Python,
        Language::Node,
    ]));
    let engine = Engine::with_registry(
        registry.clone(),
        PoolConfig {
            max_idle: 1,
            prewarm: 1,
            warm: 0,
            ..Default::default()
        },
    );
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        workers_per_shard: 2,
        api_keys_file: "/nonexistent/kvmfork-test-keys.json".into(),
        ..ServeConfig::default()
    };
    let handle = kvmfork::server::start(config, Arc::new(engine)).expect("server starts");
    let addr = handle.local_addr();
    let request = |method: &str, path: &str, body: Option<&str>| {
        let mut c = Client::connect(addr);
        c.send(method, path, &[], body);
        c.read_response()
    };
    let print = Some(r#"{"code":"print(1 + 1)"}"#);

    let resp = request("POST", "/v1/exec", print);
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (503, "template_building")
    );
    assert_eq!(resp.header("retry-after"), Some("5"));
    let health = request("GET", "/health", None).json();
    assert_eq!(health["templates"]["python"]["state"], "building");
    assert_eq!(health["templates"]["node"]["state"], "building");
    assert_eq!(
        health["pool"]["pooled_vms"], 0,
        "no pool before the template"
    );

    registry.start(Language::Python);
    registry.set_ready(Language::Python, template).unwrap();
    registry
        .set_failed(
            Language::Node,
            "node rootfs: npm exited with status 1".into(),
        )
        .unwrap();

    // Each worker creates its pool on its first request; that request's
    // fork time includes it.
    for _ in 0..4 {
        let resp = request("POST", "/exec", print);
        assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
        let v = resp.json();
        assert_eq!(
            (v["stdout"].as_str(), v["exit_code"].as_i64()),
            (Some("2\n"), Some(0))
        );
        assert!(v["fork_time_ms"].as_f64().unwrap() > 0.0, "{v}");
    }
    let resp = request(
        "POST",
        "/v1/exec",
        Some(r#"{"code":"console.log(1)","language":"node"}"#),
    );
    assert_eq!(
        (resp.status, resp.error_code().as_str()),
        (500, "template_failed")
    );
    assert!(
        String::from_utf8_lossy(&resp.body).contains("npm exited with status 1"),
        "{}",
        String::from_utf8_lossy(&resp.body)
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let health = request("GET", "/v1/health", None).json();
        if health["templates"]["python"]["ready"] == true || Instant::now() > deadline {
            break health;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(health["templates"]["python"]["state"], "ready", "{health}");
    assert!(health["templates"]["python"]["dir"].is_string());
    assert_eq!(health["templates"]["node"]["state"], "failed");
    assert_eq!(
        health["templates"]["node"]["error"],
        "node rootfs: npm exited with status 1"
    );
    assert_eq!(health["languages"], serde_json::json!(["python"]));
    drop(handle);
}
