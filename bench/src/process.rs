//! Servers the driver starts: a guard that stops them on every exit path,
//! a free loopback port, and the tiny HTTP client used to check that a server
//! is up and answers correctly before it is measured.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::BenchError;

/// A running server process; SIGTERM on drop, SIGKILL if it lingers.
pub struct Server {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    log: std::path::PathBuf,
}

impl Server {
    /// Starts `command` with its output in `log` and waits until GET `ready_path`
    /// answers 200 (servers that build or load things first get `patience`).
    pub fn start(
        name: &str,
        mut command: Command,
        addr: SocketAddr,
        ready_path: &str,
        log: std::path::PathBuf,
        patience: Duration,
    ) -> Result<Server, BenchError> {
        let log_file = std::fs::File::create(&log).map_err(|source| BenchError::Write {
            path: log.clone(),
            source,
        })?;
        let log_err = log_file.try_clone().map_err(|source| BenchError::Write {
            path: log.clone(),
            source,
        })?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(|source| BenchError::Spawn {
                what: name.into(),
                source,
            })?;
        let mut server = Server {
            name: name.into(),
            addr,
            child,
            log,
        };
        let deadline = Instant::now() + patience;
        loop {
            if let Ok(response) = http_request(addr, "GET", ready_path, None) {
                if response.status == 200 {
                    return Ok(server);
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(BenchError::NotReady {
                    what: name.into(),
                    detail: format!("exited ({status}); {}", server.log_tail()),
                });
            }
            if Instant::now() > deadline {
                return Err(BenchError::NotReady {
                    what: name.into(),
                    detail: format!(
                        "no 200 from GET {ready_path} within {patience:?}; {}",
                        server.log_tail()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "last log lines ({}):\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    /// Asks the server to stop and waits; SIGKILL after `grace`.
    pub fn stop(mut self, grace: Duration) {
        self.terminate(grace);
    }

    fn terminate(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signals our own child, which has not been reaped yet (try_wait above).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(10));
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<SocketAddr, BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| BenchError::Spawn {
        what: "port probe".into(),
        source,
    })?;
    listener.local_addr().map_err(|source| BenchError::Spawn {
        what: "port probe".into(),
        source,
    })
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection with `Connection: close`; reads to EOF.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<&str>,
) -> std::io::Result<Response> {
    http_request_with_timeout(addr, method, path, json_body, Duration::from_secs(60))
}

/// [`http_request`] waiting up to `read_timeout` for each read (a workload
/// snippet may run for minutes before the answer's first byte).
pub fn http_request_with_timeout(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json_body: Option<&str>,
    read_timeout: Duration,
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(read_timeout))?;
    let body = json_body.unwrap_or("");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if json_body.is_some() {
        request += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    request += "\r\n";
    request += body;
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response")
    })
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect::<Vec<_>>();
    let mut body = raw[end + 4..].to_vec();
    if let Some(len) = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Some(Response {
        status,
        headers,
        body,
    })
}

/// Sends `print(1+1)` once and checks the answer is a 200 whose stdout is "2\n":
/// a server is only measured after it has shown it computes the right thing.
pub fn check_exec(server: &Server) -> Result<(), BenchError> {
    let fail = |detail: String| BenchError::Probe {
        what: server.name.clone(),
        detail,
    };
    let response = http_request(
        server.addr,
        "POST",
        "/v1/exec",
        Some(r#"{"code":"print(1+1)","language":"python","timeout_seconds":30}"#),
    )
    .map_err(|e| fail(format!("POST /v1/exec: {e}")))?;
    let body = String::from_utf8_lossy(&response.body);
    if response.status != 200 {
        return Err(fail(format!(
            "POST /v1/exec answered {}: {body}",
            response.status
        )));
    }
    let json: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| fail(format!("response is not JSON ({e}): {body}")))?;
    if json["stdout"] != "2\n" || json["exit_code"] != 0 {
        return Err(fail(format!(
            "print(1+1) did not print 2 with exit code 0: {body}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response_and_trims_the_body_to_its_length() {
        let raw = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 3\r\n\r\nok\nextra";
        let r = parse_response(raw).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("server"), Some("nginx"));
        assert_eq!(r.body, b"ok\n");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_none());
        assert!(parse_response(b"garbage\r\n\r\n").is_none());
    }

    #[test]
    fn request_round_trip_against_a_tiny_server() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"{}") {
                let n = stream.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nhi")
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let response = http_request(addr, "POST", "/v1/x", Some("{}")).unwrap();
        assert_eq!(
            (response.status, response.body.as_slice()),
            (201, &b"hi"[..])
        );
        let request = server.join().unwrap();
        assert!(request.starts_with("POST /v1/x HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("Content-Length: 2\r\n"), "{request}");
        assert!(request.contains("Connection: close\r\n"), "{request}");
    }

    #[test]
    fn free_port_is_bindable() {
        let addr = free_port().unwrap();
        assert!(addr.ip().is_loopback());
        TcpListener::bind(addr).unwrap();
    }
}
