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

fn fresh_cache() -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    std::env::temp_dir().join(format!("kvmfork-serve-cli-{}-{n}", std::process::id()))
}

fn serve_with_broken_node_template(args: &[&str]) -> Serve {
    let cache = fresh_cache();
    let template = cache.join("templates/node-broken");
    std::fs::create_dir_all(&template).unwrap();
    std::fs::write(template.join("state.snap"), b"not a kvmfork state file").unwrap();
    let guest = cache.join("no-guest-sources");
    spawn_serve(args, cache, &guest)
}

fn spawn_serve(args: &[&str], cache: std::path::PathBuf, guest: &std::path::Path) -> Serve {
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
        .env("KVMFORK_GUEST_DIR", guest)
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

/// `Seccomp:` of /proc/<path>/status (0 none, 2 filtered).
fn seccomp_of(path: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{path}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .unwrap_or("gone")
        .trim()
        .to_string()
}

/// The processes whose parent is `pid`, with their command lines.
fn children_of(pid: u32) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (ppid == pid).then_some((p, cmd))
        })
        .collect()
}

/// Whether process `pid` runs (exists and is not a zombie waiting to be
/// reaped by whoever adopted it).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("State:"))
            .is_some_and(|state| !state.trim().starts_with('Z'))
    })
}

/// `serve` building the Python template with guest sources whose kernel
/// script only sleeps, caught in the middle: the server, its builder
/// process and the script the builder runs.
fn serve_mid_build() -> (Serve, u32, u32) {
    let cache = fresh_cache();
    let guest = cache.join("guest");
    std::fs::create_dir_all(guest.join("kernel")).unwrap();
    std::fs::write(guest.join("kernel/build.sh"), "sleep 60\n").unwrap();
    let serve = spawn_serve(&["--language", "python"], cache, &guest);
    let pid = serve.child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let builder = children_of(pid)
            .into_iter()
            .find(|(_, cmd)| cmd.contains("template provide --language python"));
        if let Some((builder, _)) = builder {
            if let Some((script, _)) = children_of(builder)
                .into_iter()
                .find(|(_, cmd)| cmd.contains("kernel/build.sh"))
            {
                return (serve, builder, script);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no builder process running the kernel script under {pid}: {:?}",
            children_of(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits up to 10 s for the builder and its script to be gone; kills what
/// is left (so a failed run leaves no sleeper) and says what outlived the
/// server.
fn assert_build_gone(builder: u32, script: u32, how: &str) {
    let gone = Instant::now() + Duration::from_secs(10);
    while running(builder) || running(script) {
        if Instant::now() > gone {
            let left = (running(builder), running(script));
            for pid in [builder, script] {
                // SAFETY: no memory arguments; these are this test's own
                // builder and sleep script.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            panic!("after {how}, (builder, script) still running: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The template thread of `serve` is filtered, and the build scripts run
/// in a child process that is not (they run bash, make, a compiler, dpkg;
/// filters are inherited across exec). Before the fix the thread built in
/// the server process itself with no filter (`Seccomp: 0`), its build
/// scripts being the server's own children.
#[test]
fn templates_are_built_in_an_unfiltered_child_and_the_template_thread_is_filtered() {
    let (serve, builder, script) = serve_mid_build();
    let pid = serve.child.id();
    let thread = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| t.ok()?.file_name().to_str().map(String::from))
        .find(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|c| c.trim() == "kvmfork-templat")
        })
        .expect("serve has a template thread while building");
    assert_eq!(
        seccomp_of(&format!("{pid}/task/{thread}")),
        "2",
        "the template thread"
    );
    assert_eq!(seccomp_of(&builder.to_string()), "0", "the builder process");
    assert_eq!(seccomp_of(&script.to_string()), "0", "the build script");
    let (_, health) = request(serve.addr, "GET", "/v1/health", "");
    assert_eq!(
        health["templates"]["python"]["state"], "building",
        "{health}"
    );
    drop(serve);
    assert_build_gone(builder, script, "SIGKILL to the server");
}

/// A server killed outright (SIGKILL: no clean-up of its own) takes its
/// builder and the builder's build script with it: the builder's death
/// signal kills its process group. Before the fix only the builder died
/// and the script (a grandchild) ran on.
#[test]
fn a_killed_server_leaves_no_build_running() {
    let (serve, builder, script) = serve_mid_build();
    drop(serve); // SIGKILL
    assert_build_gone(builder, script, "SIGKILL to the server");
}

/// A server stopped by SIGTERM kills the builder's group as it exits.
#[test]
fn a_stopped_server_leaves_no_build_running() {
    let (mut serve, builder, script) = serve_mid_build();
    // SAFETY: no memory arguments; the pid is this test's own server.
    unsafe { libc::kill(serve.child.id() as i32, libc::SIGTERM) };
    let stopped = Instant::now() + Duration::from_secs(30);
    while serve.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < stopped, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_build_gone(builder, script, "SIGTERM to the server");
}
