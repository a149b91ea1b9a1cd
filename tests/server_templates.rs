//! Languages whose template is not ready: `503 template_building` (with
//! `Retry-After`) while it builds, success once it is published, `500
//! template_failed` naming the failure if its build failed, `400
//! unknown_language` for a language the server does not serve; and
//! `/v1/health` showing each template's state. Uses the TEST-ONLY lane
//! factory from `server_support` over the product's template slots.

mod server_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmfork::api::Language;
use kvmfork::engine::registry::TemplateSlots;
use server_support::{for_each_backend, start_with_slots, TestServer};

/// Python ready, Node still building.
fn node_building() -> Arc<TemplateSlots<()>> {
    let slots = TemplateSlots::building(&[Language::Python, Language::Node]);
    slots.set_ready(Language::Python, Arc::new(())).unwrap();
    Arc::new(slots)
}

/// Waits (bounded) until /v1/health, cached up to a second per shard, says
/// `language`'s template is in `state`.
fn wait_health_state(server: &TestServer, language: &str, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = server.request("GET", "/v1/health", None).json();
        if health["templates"][language]["state"] == state {
            return health;
        }
        assert!(
            Instant::now() < deadline,
            "{language} never became {state}: {health}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_building_template_answers_503_until_it_is_ready() {
    for_each_backend(|backend| {
        let slots = node_building();
        let server = start_with_slots(backend, None, slots.clone(), |_| {});

        let health = server.request("GET", "/v1/health", None).json();
        assert_eq!(health["status"], "ok");
        assert_eq!(health["languages"], serde_json::json!(["python"]));
        assert_eq!(health["templates"]["python"]["ready"], true);
        assert_eq!(health["templates"]["node"]["ready"], false);
        assert_eq!(health["templates"]["node"]["state"], "building");

        let node = r#"{"code":"echo:from node","language":"node"}"#;
        let resp = server.request("POST", "/v1/exec", Some(node));
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (503, "template_building")
        );
        assert_eq!(resp.header("retry-after"), Some("5"));
        let message = resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            message.contains("node template is still being built") && !message.contains("  "),
            "{message}"
        );
        // The unversioned alias and batches are refused the same way; a
        // batch names its item and runs nothing.
        let resp = server.request("POST", "/exec", Some(node));
        assert_eq!(resp.error_code(), "template_building");
        let batch = format!(r#"{{"executions":[{{"code":"echo:py"}},{node}]}}"#);
        let resp = server.request("POST", "/v1/exec/batch", Some(&batch));
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (503, "template_building")
        );
        let message = resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.starts_with("executions[1]: "), "{message}");
        assert_eq!(
            server
                .events
                .started
                .load(std::sync::atomic::Ordering::SeqCst),
            0,
            "nothing may run while a requested template is building"
        );
        // Python is served meanwhile.
        let resp = server.request("POST", "/v1/exec", Some(r#"{"code":"echo:py"}"#));
        assert_eq!(
            (resp.status, resp.json()["stdout"].clone()),
            (200, "py".into())
        );

        slots.set_ready(Language::Node, Arc::new(())).unwrap();
        let resp = server.request("POST", "/v1/exec", Some(node));
        assert_eq!(
            resp.status,
            200,
            "{:?}",
            String::from_utf8_lossy(&resp.body)
        );
        assert_eq!(resp.json()["stdout"], "from node");
        let resp = server.request("POST", "/v1/exec/batch", Some(&batch));
        assert_eq!(resp.status, 200);
        let health = wait_health_state(&server, "node", "ready");
        assert_eq!(health["templates"]["node"]["ready"], true);
        assert_eq!(health["languages"], serde_json::json!(["python", "node"]));
    });
}

#[test]
fn a_failed_template_is_reported_by_health_and_requests() {
    for_each_backend(|backend| {
        let slots = node_building();
        let server = start_with_slots(backend, None, slots.clone(), |_| {});
        let why = "building the root filesystem: apt-get exited with status 100";
        slots.set_failed(Language::Node, why.into()).unwrap();

        let resp = server.request(
            "POST",
            "/v1/exec",
            Some(r#"{"code":"echo:x","language":"javascript"}"#),
        );
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (500, "template_failed")
        );
        let message = resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            message.contains("node template failed") && message.contains(why),
            "{message}"
        );
        let health = wait_health_state(&server, "node", "failed");
        assert_eq!(health["templates"]["node"]["ready"], false);
        assert_eq!(health["templates"]["node"]["error"], why);
        assert_eq!(health["languages"], serde_json::json!(["python"]));
        // Python is unaffected.
        let resp = server.request("POST", "/v1/exec", Some(r#"{"code":"echo:ok"}"#));
        assert_eq!(resp.status, 200);
    });
}

#[test]
fn a_language_not_served_is_unknown() {
    for_each_backend(|backend| {
        let slots = TemplateSlots::building(&[Language::Node]);
        slots.set_ready(Language::Node, Arc::new(())).unwrap();
        let server = start_with_slots(backend, None, Arc::new(slots), |_| {});
        let resp = server.request("POST", "/v1/exec", Some(r#"{"code":"echo:x"}"#));
        assert_eq!(
            (resp.status, resp.error_code().as_str()),
            (400, "unknown_language")
        );
        let message = resp.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            message.contains("does not serve language `python`"),
            "{message}"
        );
        let health = server.request("GET", "/v1/health", None).json();
        assert_eq!(
            health["templates"]
                .as_object()
                .unwrap()
                .keys()
                .collect::<Vec<_>>(),
            vec!["node"]
        );
        let resp = server.request(
            "POST",
            "/v1/exec",
            Some(r#"{"code":"echo:js","language":"node"}"#),
        );
        assert_eq!(resp.json()["stdout"], "js");
    });
}
