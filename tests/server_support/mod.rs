//! Shared helpers for the `server_*` integration tests: a TEST-ONLY lane
//! factory whose "code" is a tiny command language, server start-up for
//! either event loop, and a raw HTTP/1.1 client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvmfork::api::{
    ExecFailure, ExecRequest, ExecResult, Lane, LaneFactory, LaneStats, Language, SessionError,
    SessionId, SessionInfo, SessionOp, SessionReply, TemplateAvailability,
};
use kvmfork::engine::registry::{SlotState, TemplateSlots};
use kvmfork::server::{Backend, ServeConfig, ServerHandle};

/// What the test lanes observed, shared with the test.
#[derive(Default)]
pub struct Events {
    pub started: AtomicUsize,
    pub cancelled: AtomicUsize,
    pub finished: AtomicUsize,
    /// The code of every exec, in the order they started.
    pub log: Mutex<Vec<String>>,
    /// `gate` commands wait until this opens.
    gate: Mutex<bool>,
    gate_cv: Condvar,
    /// Arrivals at the `barrier:N` rendezvous.
    arrivals: Mutex<usize>,
    arrivals_cv: Condvar,
}

impl Events {
    pub fn open_gate(&self) {
        *self.gate.lock().unwrap() = true;
        self.gate_cv.notify_all();
    }

    /// Waits (bounded) until `n` execs have started.
    pub fn wait_started(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.started.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} execs started",
                self.started.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn wait_cancelled(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.cancelled.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} execs saw cancellation",
                self.cancelled.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// TEST-ONLY factory: lanes interpret `code` as a command:
/// `echo:TEXT`, `exit:N`, `crash`, `big:N` (N bytes of stdout), `ctl:N`
/// (N control bytes of stdout),
/// `sleep:MS` (honours timeout and cancel), `block` (until cancelled),
/// `gate` (until [`Events::open_gate`] or cancelled), `barrier:N` (until N
/// execs are inside at once; proves they run in parallel).
/// Which languages it serves, and whether their "template" is ready, is kept
/// in the product's template slots (`slots`), which a test may publish into.
pub struct TestFactory {
    pub events: Arc<Events>,
    pub slots: Arc<TemplateSlots<()>>,
}

/// Slots for Python only, ready (what most tests serve).
pub fn python_ready() -> Arc<TemplateSlots<()>> {
    let slots = TemplateSlots::building(&[Language::Python]);
    slots.set_ready(Language::Python, Arc::new(())).unwrap();
    Arc::new(slots)
}

impl LaneFactory for TestFactory {
    fn new_lane(&self, shard: usize) -> Result<Box<dyn Lane>, String> {
        self.new_worker_lane(shard, 0)
    }
    fn new_worker_lane(&self, shard: usize, worker: usize) -> Result<Box<dyn Lane>, String> {
        Ok(Box::new(TestLane {
            events: self.events.clone(),
            shard,
            worker,
            sessions: 0,
            stats: LaneStats {
                pooled_vms: 1,
                ..Default::default()
            },
        }))
    }
    fn languages(&self) -> Vec<Language> {
        self.slots.languages()
    }
    fn availability(&self, language: Language) -> TemplateAvailability {
        self.slots.state(language).availability()
    }
    fn templates(&self) -> serde_json::Map<String, serde_json::Value> {
        self.slots
            .languages()
            .into_iter()
            .map(|l| {
                let entry = match self.slots.state(l) {
                    SlotState::Ready(_) => serde_json::json!(
                        {"language": l.as_str(), "ready": true, "state": "ready", "memory_mib": 1}
                    ),
                    SlotState::Building(_) => serde_json::json!(
                        {"language": l.as_str(), "ready": false, "state": "building"}
                    ),
                    SlotState::Failed(why) => serde_json::json!(
                        {"language": l.as_str(), "ready": false, "state": "failed", "error": why}
                    ),
                    SlotState::NotServed => unreachable!("listed languages are served"),
                };
                (l.as_str().to_string(), entry)
            })
            .collect()
    }
}

struct TestLane {
    events: Arc<Events>,
    shard: usize,
    worker: usize,
    /// Sessions created so far (their ids' nonces); a session's "state" is
    /// nothing: its execs run the command language like stateless ones.
    sessions: u128,
    stats: LaneStats,
}

fn test_session_info(id: &SessionId) -> SessionInfo {
    SessionInfo {
        sandbox_id: id.text.clone(),
        language: Language::Python,
        template: "test".into(),
        created_at: 0.0,
        expires_at: 0.0,
        fork_time_ms: 0.0,
        execution_count: 0,
        memory_bytes: 0,
        metadata: serde_json::Value::Null,
    }
}

fn ok(stdout: impl Into<Vec<u8>>) -> ExecResult {
    ExecResult {
        stdout: stdout.into(),
        fork_time: Duration::from_micros(120),
        exec_time: Duration::from_millis(2),
        total_time: Duration::from_micros(2300),
        ..Default::default()
    }
}

fn failed(failure: ExecFailure) -> ExecResult {
    ExecResult {
        exit_code: -1,
        failure: Some(failure),
        ..ok(Vec::new())
    }
}

impl TestLane {
    /// Waits until `done` holds, the request is cancelled or times out.
    fn wait(
        &self,
        req: &ExecRequest,
        limit: Duration,
        mut done: impl FnMut() -> bool,
    ) -> Result<(), ExecFailure> {
        let start = Instant::now();
        loop {
            if done() {
                return Ok(());
            }
            if req.cancel.is_cancelled() {
                self.events.cancelled.fetch_add(1, Ordering::SeqCst);
                return Err(ExecFailure::Cancelled);
            }
            if start.elapsed() >= req.timeout {
                return Err(ExecFailure::Timeout);
            }
            if start.elapsed() >= limit {
                return Err(ExecFailure::Internal("test lane safety limit".into()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Lane for TestLane {
    fn exec(&mut self, req: &ExecRequest) -> ExecResult {
        self.events.log.lock().unwrap().push(req.code.clone());
        self.events.started.fetch_add(1, Ordering::SeqCst);
        self.stats.forks += 1;
        let (cmd, arg) = req.code.split_once(':').unwrap_or((req.code.as_str(), ""));
        let result = match cmd {
            "echo" => ok(arg),
            "exit" => ExecResult {
                exit_code: arg.parse().unwrap(),
                stderr: b"bye".to_vec(),
                ..ok("")
            },
            "crash" => {
                self.stats.guest_errors += 1;
                failed(ExecFailure::GuestCrashed("triple fault".into()))
            }
            "big" => ok(vec![b'x'; arg.parse().unwrap()]),
            // N control bytes: each is escaped to six in JSON (`\u0001`).
            "ctl" => ok(vec![1u8; arg.parse().unwrap()]),
            // A host-side failure whose text must not reach the client.
            "internal" => failed(ExecFailure::Internal(arg.into())),
            "shard" => ok(self.shard.to_string()),
            "sleep" => {
                let until = Instant::now() + Duration::from_millis(arg.parse().unwrap());
                match self.wait(req, Duration::from_secs(60), || Instant::now() >= until) {
                    Ok(()) => ok("slept"),
                    Err(ExecFailure::Timeout) => {
                        self.stats.timeouts += 1;
                        ExecResult {
                            stdout: b"partial".to_vec(),
                            ..failed(ExecFailure::Timeout)
                        }
                    }
                    Err(f) => failed(f),
                }
            }
            "block" => match self.wait(req, Duration::from_secs(60), || false) {
                Ok(()) => ok(""),
                Err(f) => failed(f),
            },
            "gate" => {
                let events = self.events.clone();
                match self.wait(req, Duration::from_secs(60), || {
                    *events.gate.lock().unwrap()
                }) {
                    Ok(()) => ok("gate opened"),
                    Err(f) => failed(f),
                }
            }
            "barrier" => {
                let n: usize = arg.parse().unwrap();
                let mut arrived = self.events.arrivals.lock().unwrap();
                *arrived += 1;
                self.events.arrivals_cv.notify_all();
                let (arrived, timeout) = self
                    .events
                    .arrivals_cv
                    .wait_timeout_while(arrived, Duration::from_secs(20), |a| *a < n)
                    .unwrap();
                if timeout.timed_out() {
                    failed(ExecFailure::Internal(format!(
                        "only {} of {n} execs ran together",
                        *arrived
                    )))
                } else {
                    ok("met")
                }
            }
            other => failed(ExecFailure::Rejected(format!(
                "unknown test command {other}"
            ))),
        };
        self.events.finished.fetch_add(1, Ordering::SeqCst);
        result
    }

    fn stats(&self) -> LaneStats {
        self.stats.clone()
    }

    /// Minimal sessions: create (ids naming this lane's shard and worker)
    /// and exec (the command language); other operations are refused.
    fn session(&mut self, op: SessionOp) -> SessionReply {
        match op {
            SessionOp::Create { count, .. } => SessionReply::Created(
                (0..count)
                    .map(|_| {
                        self.sessions += 1;
                        let id = SessionId::new(
                            SessionId::SANDBOX,
                            "n0",
                            self.shard,
                            self.worker,
                            self.sessions,
                        );
                        Ok(test_session_info(&id))
                    })
                    .collect(),
            ),
            SessionOp::Exec { id, req, .. } => {
                let result = self.exec(&req);
                SessionReply::Exec {
                    info: test_session_info(&id),
                    result,
                }
            }
            _ => SessionReply::Error(SessionError::new(
                501,
                "sessions_unsupported",
                "the test lane only creates sessions and runs in them",
            )),
        }
    }
}

pub const BACKENDS: [Backend; 2] = [Backend::IoUring, Backend::Epoll];

pub struct TestServer {
    pub handle: Option<ServerHandle>,
    pub addr: SocketAddr,
    pub events: Arc<Events>,
    _keys: Option<TempFile>,
}

impl TestServer {
    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// One request on a fresh connection.
    pub fn request(&self, method: &str, path: &str, body: Option<&str>) -> HttpResponse {
        let mut c = self.connect();
        c.send(method, path, &[], body);
        c.read_response()
    }
}

/// A server on 127.0.0.1:<free port> with the given backend. `keys` (JSON
/// text) turns auth on. Fails loudly if io_uring was asked for but the
/// server fell back.
pub fn start(
    backend: Backend,
    keys: Option<&str>,
    tweak: impl FnOnce(&mut ServeConfig),
) -> TestServer {
    start_with_slots(backend, keys, python_ready(), tweak)
}

/// Like [`start`], serving the languages of `slots` in whatever state they are.
pub fn start_with_slots(
    backend: Backend,
    keys: Option<&str>,
    slots: Arc<TemplateSlots<()>>,
    tweak: impl FnOnce(&mut ServeConfig),
) -> TestServer {
    let events = Arc::new(Events::default());
    let keys_file = keys.map(TempFile::new);
    let mut config = ServeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        workers_per_shard: 2,
        queue_depth: 8,
        max_batch: 8,
        api_keys_file: keys_file
            .as_ref()
            .map(|f| f.path.clone())
            .unwrap_or_else(|| PathBuf::from("/nonexistent/kvmfork-test-keys.json")),
        force_epoll: backend == Backend::Epoll,
        ..ServeConfig::default()
    };
    tweak(&mut config);
    let handle = kvmfork::server::start(
        config,
        Arc::new(TestFactory {
            events: events.clone(),
            slots,
        }),
    )
    .expect("server starts");
    assert_eq!(
        handle.backend(),
        backend,
        "the server did not use the requested event loop"
    );
    TestServer {
        addr: handle.local_addr(),
        handle: Some(handle),
        events,
        _keys: keys_file,
    }
}

pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(text: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kvmfork-test-{}-{}.json",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&path, text).unwrap();
        TempFile { path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {:?}", self.json()))
            .to_string()
    }

    pub fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// A blocking HTTP/1.1 client over one connection, with a read buffer so
/// pipelined responses can be read one by one.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Self {
        Self::from_stream(TcpStream::connect(addr).expect("connect"))
    }

    /// A client connecting from the loopback address `source` (any of
    /// 127/8 works on Linux), to look like another host.
    pub fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> Self {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::new(source, 0).into())
            .expect("bind the client's source address");
        socket.connect(&addr.into()).expect("connect");
        Self::from_stream(socket.into())
    }

    pub fn from_stream(stream: TcpStream) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn request_bytes(
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Vec<u8> {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        for (n, v) in headers {
            raw.push_str(&format!("{n}: {v}\r\n"));
        }
        if let Some(body) = body {
            raw.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        raw.push_str("\r\n");
        if let Some(body) = body {
            raw.push_str(body);
        }
        raw.into_bytes()
    }

    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) {
        self.write(&Self::request_bytes(method, path, headers, body));
    }

    pub fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write request");
    }

    /// Reads until `pred` holds on the buffer, or EOF.
    fn fill_until(&mut self, mut pred: impl FnMut(&[u8]) -> bool) -> bool {
        let mut chunk = [0u8; 16384];
        while !pred(&self.buf) {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!(
                    "read failed: {e} (buffered: {:?})",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
        true
    }

    pub fn read_response(&mut self) -> HttpResponse {
        self.try_read_response().unwrap_or_else(|| {
            panic!(
                "connection closed before a full response (buffered: {:?})",
                String::from_utf8_lossy(&self.buf)
            )
        })
    }

    /// Reads the answer to a HEAD request (headers only, whatever Content-Length says).
    pub fn read_head_response(&mut self) -> HttpResponse {
        self.read(true).expect("a response head")
    }

    /// None when the server closed the connection before a full response.
    pub fn try_read_response(&mut self) -> Option<HttpResponse> {
        self.read(false)
    }

    fn read(&mut self, head_only: bool) -> Option<HttpResponse> {
        let mut head_len = 0;
        if !self.fill_until(|b| {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(b) {
                Ok(httparse::Status::Complete(n)) => {
                    head_len = n;
                    true
                }
                Ok(httparse::Status::Partial) => false,
                Err(e) => panic!("bad response head: {e}: {:?}", String::from_utf8_lossy(b)),
            }
        }) {
            return None;
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        resp.parse(&self.buf).unwrap();
        let status = resp.code.unwrap();
        let headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).to_string(),
                )
            })
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let length = if status == 100 || head_only {
            0
        } else {
            length
        };
        let body = if length == 0 {
            Vec::new()
        } else {
            if !self.fill_until(|b| b.len() >= head_len + length) {
                return None;
            }
            self.buf[head_len..head_len + length].to_vec()
        };
        let consumed = head_len + length;
        self.buf.drain(..consumed);
        Some(HttpResponse {
            status,
            headers,
            body,
        })
    }

    /// True when the server has closed the connection (EOF with nothing buffered).
    pub fn at_eof(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => true,
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// Runs `scenario` against each event loop, naming the failing one.
pub fn for_each_backend(scenario: impl Fn(Backend)) {
    for backend in BACKENDS {
        eprintln!("--- backend {}", backend.name());
        scenario(backend);
    }
}
