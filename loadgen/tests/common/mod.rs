//! A tiny HTTP/1.1 server for tests: std::net, one thread per connection,
//! each request answered by a test-chosen [`Action`].

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the server does with request number `n` (0-based, across connections).
pub enum Action {
    /// Write these bytes and keep the connection.
    Respond(Vec<u8>),
    /// Write these bytes in pieces of `piece` bytes with a pause between.
    RespondSlowly { bytes: Vec<u8>, piece: usize },
    /// Write these bytes, then close.
    RespondAndClose(Vec<u8>),
    /// Close without answering.
    Close,
    /// Write non-HTTP bytes, then close.
    Garbage,
    /// Never answer; hold the connection until the client closes it.
    Silent,
    /// Make every connection wait `stall` before answering (this one too), then respond.
    StallEveryone { stall: Duration, bytes: Vec<u8> },
    /// Hold the answer until `count` requests are in (or 30 s passed): proves
    /// that many requests were outstanding at once.
    RespondOnceReceived { count: usize, bytes: Vec<u8> },
}

pub fn ok_response() -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok".to_vec()
}

pub fn status_response(status: u16) -> Vec<u8> {
    format!("HTTP/1.1 {status} Whatever\r\nContent-Length: 5\r\n\r\nerror").into_bytes()
}

pub fn chunked_response() -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\n{\"a\"\r\n2\r\n:1\r\n1\r\n}\r\n0\r\n\r\n".to_vec()
}

pub fn close_response() -> Vec<u8> {
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok".to_vec()
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

type Behavior = dyn Fn(usize) -> Action + Send + Sync;

struct Shared {
    behavior: Box<Behavior>,
    requests: AtomicUsize,
    accepted: AtomicUsize,
    stop: AtomicBool,
    stall_until: Mutex<Option<Instant>>,
    seen: Mutex<Vec<Seen>>,
}

pub struct TestServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(behavior: impl Fn(usize) -> Action + Send + Sync + 'static) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test server");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            behavior: Box::new(behavior),
            requests: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            stall_until: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
        });
        let acceptor_shared = Arc::clone(&shared);
        let acceptor = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if acceptor_shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                acceptor_shared.accepted.fetch_add(1, Ordering::SeqCst);
                let shared = Arc::clone(&acceptor_shared);
                // Small stacks: some tests hold 1000 connections.
                std::thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || serve(stream, &shared))
                    .expect("spawn test server connection thread");
            }
        });
        TestServer {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the acceptor sees the stop flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn serve(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let mut buffer: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Read one full request (head + Content-Length body).
        let (seen, used) = loop {
            if let Some(parsed) = parse_request(&buffer) {
                break parsed;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        };
        buffer.drain(..used);
        shared.seen.lock().unwrap().push(seen);
        let n = shared.requests.fetch_add(1, Ordering::SeqCst);
        let action = (shared.behavior)(n);
        if let Action::StallEveryone { stall, .. } = &action {
            *shared.stall_until.lock().unwrap() = Some(Instant::now() + *stall);
        }
        let stall_until = *shared.stall_until.lock().unwrap();
        if let Some(until) = stall_until {
            let now = Instant::now();
            if until > now {
                std::thread::sleep(until - now);
            }
        }
        let keep = match action {
            Action::Respond(bytes) | Action::StallEveryone { bytes, .. } => {
                stream.write_all(&bytes).is_ok()
            }
            Action::RespondOnceReceived { count, bytes } => {
                let deadline = Instant::now() + Duration::from_secs(30);
                while shared.requests.load(Ordering::SeqCst) < count && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                stream.write_all(&bytes).is_ok()
            }
            Action::RespondSlowly { bytes, piece } => bytes.chunks(piece).all(|part| {
                let ok = stream.write_all(part).and_then(|_| stream.flush()).is_ok();
                std::thread::sleep(Duration::from_millis(1));
                ok
            }),
            Action::RespondAndClose(bytes) => {
                let _ = stream.write_all(&bytes);
                false
            }
            Action::Close => false,
            Action::Garbage => {
                let _ = stream.write_all(b"\x16\x03\x01 this is not http\r\n\r\n");
                false
            }
            Action::Silent => {
                // Hold until the client gives up and closes.
                while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
                false
            }
        };
        if !keep {
            return;
        }
    }
}

fn parse_request(buffer: &[u8]) -> Option<(Seen, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buffer) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return None,
        Err(e) => panic!(
            "loadgen sent an invalid request: {e}: {:?}",
            String::from_utf8_lossy(buffer)
        ),
    };
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_string())
    };
    let length: usize = header("content-length")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    if buffer.len() < head_len + length {
        return None;
    }
    let seen = Seen {
        method: request.method.unwrap().to_string(),
        path: request.path.unwrap().to_string(),
        authorization: header("authorization"),
        body: buffer[head_len..head_len + length].to_vec(),
    };
    Some((seen, head_len + length))
}
