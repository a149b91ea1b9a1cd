//! HTTP load through loadgen (linked as a library, configured with the same
//! flags as its command line) so every server is driven by the same client.

use std::time::Duration;

use clap::Parser;
use hdrhistogram::Histogram;
use loadgen::cli::Args;
use loadgen::report::Report;

use crate::BenchError;

/// One closed-loop run.
#[derive(Debug, Clone)]
pub struct LoadSpec<'a> {
    pub url: &'a str,
    /// A loadgen built-in: "print" (POST /v1/exec print(1+1)) or "health" (GET /v1/health).
    pub request: &'a str,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
}

pub struct LoadResult {
    pub report: Report,
    pub latency: Histogram<u64>,
}

impl LoadSpec<'_> {
    /// The loadgen command line this run is equivalent to (shown in the report).
    pub fn argv(&self) -> Vec<String> {
        vec![
            "loadgen".into(),
            "--mix".into(),
            self.request.into(),
            "-c".into(),
            self.connections.to_string(),
            "-d".into(),
            format!("{}ms", self.duration.as_millis()),
            "--warmup".into(),
            format!("{}ms", self.warmup.as_millis()),
            "--timeout".into(),
            "120s".into(),
            self.url.into(),
        ]
    }

    pub fn run(&self) -> Result<LoadResult, BenchError> {
        let what = format!(
            "loadgen {} -c {} {}",
            self.request, self.connections, self.url
        );
        let args = Args::try_parse_from(self.argv()).map_err(|e| BenchError::Load {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        let config = args.to_config().map_err(|e| BenchError::Load {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        let limit = loadgen::raise_nofile_limit().map_err(|e| BenchError::Load {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        if limit < self.connections as u64 + 128 {
            return Err(BenchError::Load {
                what,
                detail: format!(
                    "open-files limit {limit} is too low for {} connections; raise `ulimit -n`",
                    self.connections
                ),
            });
        }
        let result = loadgen::run(&config).map_err(|e| BenchError::Load {
            what,
            detail: e.to_string(),
        })?;
        Ok(LoadResult {
            report: Report::new(&config, &result),
            latency: result.recorder.latency.clone(),
        })
    }
}

/// A keep-alive server answering every request with a fixed 200, for tests.
#[cfg(test)]
pub fn tiny_server() -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut pending = Vec::new();
                loop {
                    let n = match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        if stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drives_a_server_and_keeps_the_histogram() {
        let url = tiny_server();
        let spec = LoadSpec {
            url: &url,
            request: "health",
            connections: 4,
            duration: Duration::from_millis(300),
            warmup: Duration::from_millis(50),
        };
        let result = spec.run().unwrap();
        assert!(result.report.requests.ok > 0);
        assert_eq!(result.report.errors.total, 0);
        assert_eq!(result.latency.len(), result.report.requests.ok);
        assert_eq!(result.report.config.connections, 4);
    }

    #[test]
    fn a_refused_target_is_counted_as_errors() {
        let port = crate::process::free_port().unwrap();
        let url = format!("http://{port}");
        let spec = LoadSpec {
            url: &url,
            request: "print",
            connections: 2,
            duration: Duration::from_millis(200),
            warmup: Duration::ZERO,
        };
        let result = spec.run().unwrap();
        assert_eq!(result.report.requests.ok, 0);
        assert!(result.report.errors.by_kind.connect > 0);
    }
}
