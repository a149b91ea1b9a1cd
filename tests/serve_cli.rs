//! `kvmfork serve` as a user starts it: the served languages (`--language`),
//! and a template that cannot be had being impossible to miss (health, log,
//! requests). Runs as an installed binary would, without guest sources
//! (`KVMFORK_GUEST_DIR` points nowhere), over a private cache holding one
//! unusable Node template, so nothing is built and no guest is booted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Serve {
    child: Child,
    addr: SocketAddr,
    log: mpsc::Receiver<String>,
    /// Lines printed up to the listening address.
    early: Vec<String>,
    cache: std::path::PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.cache);
    }
}

impl Serve {
    /// Log lines seen so far plus those arriving within `wait`.
    fn log_until(&self, wait: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut seen = self.early.clone();
        if seen.iter().any(|l| pred(l)) {
            return seen;
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    let done = pred(&line);
                    seen.push(line);
                    if done {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        seen
    }
}

fn serve_with_broken_node_template(args: &[&str]) -> Serve {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let cache = std::env::temp_dir().join(format!("kvmfork-serve-cli-{}-{n}", std::process::id()));
    let template = cache.join("templates/node-broken");
    std::fs::create_dir_all(&template).unwrap();
    std::fs::write(template.join("state.snap"), b"not a kvmfork state file").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmfork"))
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "1"])
        // The suites run as root (tests/run.sh needs it for apt).
        .env("KVMFORK_ALLOW_ROOT", "1")
        .args([
            "--api-keys-file",
            "/nonexistent/kvmfork-serve-cli-keys.json",
        ])
        .args(args)
        .env("KVMFORK_CACHE_DIR", &cache)
        .env("KVMFORK_GUEST_DIR", cache.join("no-guest-sources"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kvmfork starts");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("serve| {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut early = Vec::new();
    let addr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("kvmfork serve prints its listening address");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
        early.push(line);
    };
    Serve {
        child,
        addr,
        log: rx,
        early,
        cache,
    }
}

/// One request on a fresh connection: (status, JSON body).
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a full response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).expect("a JSON body"))
}

#[test]
fn language_restricts_the_set_and_a_failed_template_cannot_be_missed() {
    let serve = serve_with_broken_node_template(&["--language", "node"]);
    let log = serve.log_until(Duration::from_secs(60), |l| {
        l.contains("ERROR") && l.contains("node template failed")
    });
    assert!(
        log.iter()
            .any(|l| l.contains("ERROR") && l.contains("node template failed")),
        "the log must say the node template failed: {log:#?}"
    );

    // Health lists only the served language, failed, with the reason.
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let (status, health) = request(serve.addr, "GET", "/v1/health", "");
        assert_eq!(status, 200);
        if health["templates"]["node"]["state"] == "failed" || Instant::now() > deadline {
            break health;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let templates = health["templates"].as_object().unwrap();
    assert_eq!(
        templates.keys().collect::<Vec<_>>(),
        vec!["node"],
        "{health}"
    );
    assert_eq!(templates["node"]["ready"], false);
    assert_eq!(templates["node"]["state"], "failed");
    let error = templates["node"]["error"].as_str().unwrap();
    assert!(error.contains("node-broken"), "{error}");
    assert_eq!(health["languages"], serde_json::json!([]));

    let (status, body) = request(
        serve.addr,
        "POST",
        "/v1/exec",
        r#"{"code":"console.log(1)","language":"node"}"#,
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (500, Some("template_failed"))
    );
    assert!(body["error"]["message"].as_str().unwrap().contains(error));
    let (status, body) = request(serve.addr, "POST", "/exec", r#"{"code":"print(1)"}"#);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("unknown_language"))
    );
}

#[test]
fn unknown_languages_and_conflicting_flags_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvmfork"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--language",
            "python,cobol",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown language \"cobol\""), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_kvmfork"))
        .args(["serve", "--language", "node", "--template", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn without_guest_sources_a_missing_template_fails_with_what_to_do() {
    let serve = serve_with_broken_node_template(&["--language", "python,node"]);
    let log = serve.log_until(Duration::from_secs(60), |l| {
        l.contains("ERROR") && l.contains("node template failed")
    });
    assert!(
        log.iter().any(|l| l.contains("ERROR")
            && l.contains("python template failed")
            && l.contains("kvmfork template build --language python")),
        "{log:#?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let health = loop {
        let (_, health) = request(serve.addr, "GET", "/health", "");
        let t = &health["templates"];
        if (t["python"]["state"] == "failed" && t["node"]["state"] == "failed")
            || Instant::now() > deadline
        {
            break health;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let python = health["templates"]["python"]["error"].as_str().unwrap();
    assert!(
        python.contains("no python template in") && python.contains("no guest sources"),
        "{health}"
    );
    let (status, body) = request(serve.addr, "POST", "/exec", r#"{"code":"print(1)"}"#);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (500, Some("template_failed"))
    );
}
