//! kvmfork's own seccomp filters, in a child process: a forbidden syscall
//! made by an exec worker thread of a running server kills the whole
//! process (SIGSYS), a forbidden ioctl request kills it too (a KVM request
//! kvmfork never makes included), while the KVM ioctls the worker needs and everything the server does to answer are
//! allowed. With `--seccomp=log` the same calls are only reported.
//!
//! The child is this test binary run again with `--ignored --exact
//! child_server` and `KVMFORK_SECCOMP_CHILD` set to the mode: it starts a
//! server whose lane turns the exec's code into a syscall, prints its
//! address and waits to be killed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmfork::api::{ExecRequest, ExecResult, Lane, LaneFactory, LaneStats, Language};
use kvmfork::seccomp::Mode;
use kvmfork::server::ServeConfig;

const CHILD_ENV: &str = "KVMFORK_SECCOMP_CHILD";

/// A lane whose "code" names a syscall to make on the worker thread.
struct SyscallLane;

impl Lane for SyscallLane {
    fn exec(&mut self, req: &ExecRequest) -> ExecResult {
        let stdout = match req.code.as_str() {
            // Not on the worker's list: a worker has no business with sockets.
            "socket" => {
                // SAFETY: no memory arguments; the descriptor, if any, is closed.
                let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
                if fd >= 0 {
                    // SAFETY: fd was just returned to us and is not used again.
                    unsafe { libc::close(fd) };
                }
                format!("socket={fd}")
            }
            // ioctl is on the list, but only with KVM requests: TCGETS is not.
            "tcgets" => {
                let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
                // SAFETY: TCGETS writes one termios into the live buffer.
                let r = unsafe { libc::ioctl(0, libc::TCGETS, termios.as_mut_ptr()) };
                format!("tcgets={r}")
            }
            // A KVM request the worker needs: allowed in every mode.
            "kvm" => {
                let kvm = std::fs::File::open("/dev/kvm").expect("opening /dev/kvm");
                // KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03), of KVM_CAP_IRQCHIP (0).
                // SAFETY: this request reads its integer argument only.
                let v =
                    unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&kvm), 0xAE03 as _, 0) };
                format!("kvm={v}")
            }
            // A KVM request kvmfork never makes: only the exact list of
            // requests it uses is allowed, not KVM's whole type byte.
            "kvm_unused" => {
                let kvm = std::fs::File::open("/dev/kvm").expect("opening /dev/kvm");
                // KVM_GET_API_VERSION = _IO(KVMIO, 0x00).
                // SAFETY: this request takes no argument and touches no memory.
                let v =
                    unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&kvm), 0xAE00 as _, 0) };
                format!("kvm_unused={v}")
            }
            other => format!("unknown {other}"),
        };
        ExecResult {
            stdout: stdout.into_bytes(),
            ..Default::default()
        }
    }
    fn stats(&self) -> LaneStats {
        LaneStats::default()
    }
}

struct SyscallFactory;

impl LaneFactory for SyscallFactory {
    fn new_lane(&self, _shard: usize) -> Result<Box<dyn Lane>, String> {
        Ok(Box::new(SyscallLane))
    }
    fn languages(&self) -> Vec<Language> {
        vec![Language::Python]
    }
    fn templates(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert(
            "python".into(),
            serde_json::json!({"language": "python", "ready": true, "state": "ready"}),
        );
        m
    }
}

/// The child's body (run only by [`spawn_child`]).
#[test]
#[ignore = "run by the other tests of this file in a child process"]
fn child_server() {
    let mode = match std::env::var(CHILD_ENV).as_deref() {
        Ok("log") => Mode::Log,
        Ok("enforce") => Mode::Enforce,
        other => panic!("{CHILD_ENV} must be log or enforce, not {other:?}"),
    };
    let config = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        workers_per_shard: 1,
        queue_depth: 4,
        max_batch: 4,
        api_keys_file: "/nonexistent/kvmfork-test-keys.json".into(),
        seccomp: mode,
        ..ServeConfig::default()
    };
    let handle = kvmfork::server::start(config, Arc::new(SyscallFactory)).expect("server starts");
    println!("ADDR {}", handle.local_addr());
    // The parent kills this process; a minute is a bound, not a wait.
    std::thread::sleep(Duration::from_secs(60));
    panic!("the parent did not stop the child");
}

struct ChildServer {
    child: Child,
    addr: std::net::SocketAddr,
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_child(mode: &str) -> ChildServer {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "child_server", "--nocapture"])
        .env(CHILD_ENV, mode)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawning the child test process");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the child exited before printing its address")
            .unwrap();
        if let Some(addr) = line.strip_prefix("ADDR ") {
            break addr.parse().unwrap();
        }
    };
    ChildServer { child, addr }
}

/// One request on its own connection (`Connection: close`): the status and
/// the JSON body, or None when the connection ends without an answer.
fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Option<(u16, serde_json::Value)> {
    let mut stream = std::net::TcpStream::connect(addr).expect("connecting to the child");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    // A reset (the process died with the request unread) is no answer too.
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, serde_json::from_str(body).ok()?))
}

fn exec(addr: std::net::SocketAddr, code: &str) -> Option<(u16, serde_json::Value)> {
    let body = format!(r#"{{"code":"{code}","language":"python"}}"#);
    request(addr, "POST", "/v1/exec", &body)
}

/// Waits for the child to exit by itself (within 20 s).
fn wait_exit(child: &mut ChildServer) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the child is still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_forbidden_syscall_from_an_exec_worker_kills_the_process() {
    let mut child = spawn_child("enforce");
    // The server serves, and the worker's KVM ioctls are allowed.
    let (status, health) = request(child.addr, "GET", "/v1/health", "").expect("health");
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok");
    let (status, kvm) = exec(child.addr, "kvm").expect("an answer to the KVM ioctl");
    assert_eq!(status, 200, "{kvm}");
    assert_eq!(
        kvm["stdout"], "kvm=1",
        "KVM_CHECK_EXTENSION(KVM_CAP_IRQCHIP)"
    );
    // socket(2) on the worker thread: no answer, the process is gone.
    assert!(
        exec(child.addr, "socket").is_none(),
        "answered after socket()"
    );
    let status = wait_exit(&mut child);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
}

#[test]
fn an_ioctl_request_outside_kvm_kills_the_process() {
    let mut child = spawn_child("enforce");
    assert!(
        exec(child.addr, "tcgets").is_none(),
        "answered after TCGETS"
    );
    let status = wait_exit(&mut child);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
}

/// Before the fix the worker's ioctl rule matched KVM's type byte (0xAE),
/// so any KVM request passed, KVM_GET_API_VERSION among them (it answered
/// `kvm_unused=12`). Now only the requests kvmfork makes pass.
#[test]
fn a_kvm_request_kvmfork_never_makes_kills_the_process() {
    let mut child = spawn_child("enforce");
    let (status, kvm) = exec(child.addr, "kvm").expect("an answer to a used KVM ioctl");
    assert_eq!(status, 200, "{kvm}");
    assert!(
        exec(child.addr, "kvm_unused").is_none(),
        "answered after KVM_GET_API_VERSION"
    );
    let status = wait_exit(&mut child);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");
}

#[test]
fn log_mode_reports_and_allows_the_same_calls() {
    let mut child = spawn_child("log");
    for (code, want) in [
        ("socket", "socket="),
        ("tcgets", "tcgets="),
        ("kvm", "kvm=1"),
        ("kvm_unused", "kvm_unused=12"),
    ] {
        let (status, resp) = exec(child.addr, code).expect("log mode answers");
        assert_eq!(status, 200, "{resp}");
        let stdout = resp["stdout"].as_str().unwrap().to_string();
        assert!(stdout.starts_with(want), "{code}: {stdout}");
        if code == "socket" {
            assert!(!stdout.starts_with("socket=-"), "socket() failed: {stdout}");
        }
    }
    assert!(child.child.try_wait().unwrap().is_none(), "the child died");
}
