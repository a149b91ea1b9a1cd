//! Command-line interface: flags, their documentation, and the conversion to
//! a validated [`Config`].

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use thiserror::Error;

use crate::schedule::Bounds;
use crate::target::{Target, TargetError};
use crate::workload::{self, Headers, RequestSpec, WorkloadError, CUSTOM_NAME};
use crate::{Config, Mode};

const DEFAULT_DURATION: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "HTTP/1.1 keep-alive load generator for kvmfork (epoll, one thread per core).",
    long_about = "HTTP/1.1 keep-alive load generator for kvmfork (epoll, one thread per core).\n\n\
Closed loop (default): every connection sends its next request as soon as the previous response \
arrives; latency is measured from the first byte written.\n\
Open loop (--rate R): requests are due at a fixed rate whatever the server does; a due request waits \
for a free connection, and latency is measured from its INTENDED send time, so a server stall shows \
up in the latencies of every request scheduled during it (coordinated omission corrected). \
Service time (from the first byte written) is reported beside it.\n\n\
Latency percentiles count 2xx responses only; other statuses and transport errors (connect, \
timeout, parse, closed) are counted separately. Only loopback targets are allowed unless \
--allow-remote is given.",
    after_help = "Examples:\n  \
loadgen -c 256 -d 30s http://127.0.0.1:8080\n  \
loadgen --rate 200 -c 64 -d 60s --warmup 5s --mix print=8,numpy=1,health=1 --api-key KEY --json\n  \
loadgen -n 1000 --body-file req.json --path /v1/exec/batch --plot latency.png\n\n\
Exit status: 0 after a run with at least one 2xx response, 1 if none succeeded, 2 on a usage or setup error."
)]
pub struct Args {
    /// Base URL of the server (http only; loopback only unless --allow-remote).
    #[arg(default_value = "http://127.0.0.1:8080")]
    pub url: String,

    /// Concurrent keep-alive connections (open loop: the pool due requests wait for).
    #[arg(short = 'c', long, default_value_t = 16)]
    pub connections: usize,

    /// Load threads, each with its own epoll loop [default: CPU count, at most --connections].
    #[arg(long)]
    pub threads: Option<usize>,

    /// Open loop: requests per second across all threads. Without it the run is closed loop.
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,

    /// Measured run length, e.g. 30s, 500ms, 2m [default: 10s unless --requests is given].
    #[arg(short = 'd', long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Measured request count; with --duration, whichever comes first ends the run.
    #[arg(short = 'n', long)]
    pub requests: Option<u64>,

    /// Load sent before measuring starts (not counted anywhere), e.g. 5s.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub warmup: Duration,

    /// Per-request timeout, counted from the send (closed loop) or the intended send time (open loop).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub timeout: Duration,

    /// Weighted request mix: built-ins print (POST /v1/exec print(1+1)), numpy (a numpy
    /// snippet), cpu (a CPU-bound loop), health (GET /v1/health), and custom (the
    /// --body-file/--method/--path request). [default: custom if one is described, else print]
    #[arg(long, value_name = "NAME=WEIGHT,...")]
    pub mix: Option<String>,

    /// Body of the custom request, read once at start.
    #[arg(long, value_name = "FILE")]
    pub body_file: Option<PathBuf>,

    /// Method of the custom request [default: POST with --body-file, else GET].
    #[arg(long)]
    pub method: Option<String>,

    /// Path of the custom request.
    #[arg(long, default_value = "/v1/exec")]
    pub path: String,

    /// Content-Type of the custom request body (ignored if --header sets one).
    #[arg(long, default_value = "application/json")]
    pub content_type: String,

    /// Extra header for every request, "Name: value" (repeatable). Host, Content-Length,
    /// Transfer-Encoding and Connection are managed by loadgen.
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,

    /// Sends "Authorization: Bearer KEY" with every request.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,

    /// Print the report as JSON (schema "kvmfork-loadgen/v1", see README) instead of text.
    #[arg(long)]
    pub json: bool,

    /// Also write the latency-by-percentile curve to this PNG file.
    #[arg(long, value_name = "FILE.png")]
    pub plot: Option<PathBuf>,

    /// TrueType font for --plot [default: DejaVu Sans or another common system font].
    #[arg(long, value_name = "FILE.ttf")]
    pub plot_font: Option<PathBuf>,

    /// Allow a target that is not loopback (127.0.0.0/8, ::1, localhost).
    #[arg(long)]
    pub allow_remote: bool,
}

#[derive(Debug, Error)]
pub enum CliError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("{0}")]
    Invalid(String),
}

/// Parses `250ms`, `30s`, `2m`, `1h`, or a bare number of seconds (`1.5`).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(raw.len());
    let (number, unit) = raw.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 30s or 250ms"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "us" => value / 1_000_000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{raw:?}: {e}"))
}

impl Args {
    /// Resolves the target and builds the request templates.
    pub fn to_config(&self) -> Result<Config, CliError> {
        let target = Target::resolve(&self.url, self.allow_remote)?;
        let custom = self.custom_request()?;
        let mix_text = match (&self.mix, &custom) {
            (Some(mix), _) => mix.clone(),
            (None, Some(_)) => CUSTOM_NAME.to_string(),
            (None, None) => "print".to_string(),
        };
        let mix = workload::parse_mix(&mix_text)?;
        let specs = workload::resolve_mix(&mix, custom.as_ref())?;
        let headers = Headers {
            host: target.host_header.clone(),
            api_key: self.api_key.clone(),
            extra: self
                .headers
                .iter()
                .map(|h| workload::parse_header(h))
                .collect::<Result<_, _>>()?,
        };
        let templates = specs
            .iter()
            .map(|spec| workload::build_template(spec, &headers))
            .collect::<Result<_, _>>()?;
        let mode = match self.rate {
            Some(rate) if rate.is_finite() && rate > 0.0 => Mode::Open { rate },
            Some(rate) => {
                return Err(CliError::Invalid(format!(
                    "--rate {rate} must be a positive number"
                )))
            }
            None => Mode::Closed,
        };
        let duration = match (self.duration, self.requests) {
            (None, None) => Some(DEFAULT_DURATION),
            (duration, _) => duration,
        };
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Ok(Config {
            target,
            templates,
            mix,
            connections: self.connections,
            threads: self.threads.unwrap_or(cores).min(self.connections.max(1)),
            mode,
            bounds: Bounds {
                duration,
                requests: self.requests,
            },
            warmup: self.warmup,
            timeout: self.timeout,
            stop: Default::default(),
        })
    }

    /// The custom request, if any custom flag was given.
    fn custom_request(&self) -> Result<Option<RequestSpec>, CliError> {
        let described =
            self.body_file.is_some() || self.method.is_some() || self.path != "/v1/exec";
        if !described {
            return Ok(None);
        }
        let body = match &self.body_file {
            Some(path) => std::fs::read(path).map_err(|source| WorkloadError::BodyFile {
                path: path.clone(),
                source,
            })?,
            None => Vec::new(),
        };
        let method = self
            .method
            .clone()
            .unwrap_or_else(|| if body.is_empty() { "GET" } else { "POST" }.to_string());
        Ok(Some(RequestSpec {
            name: CUSTOM_NAME.to_string(),
            method: method.to_ascii_uppercase(),
            path: self.path.clone(),
            body,
            content_type: Some(self.content_type.clone()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn defaults_are_closed_loop_print_for_ten_seconds() {
        let args = Args::parse_from(["loadgen"]);
        let config = args.to_config().unwrap();
        assert_eq!(config.mode, Mode::Closed);
        assert_eq!(
            config.bounds,
            Bounds {
                duration: Some(DEFAULT_DURATION),
                requests: None
            }
        );
        assert_eq!(config.mix.len(), 1);
        assert_eq!(config.mix[0].name, "print");
        assert_eq!(config.target.addr.port(), 8080);
    }

    #[test]
    fn requests_alone_means_no_duration_bound() {
        let config = Args::parse_from(["loadgen", "-n", "5", "--rate", "10"])
            .to_config()
            .unwrap();
        assert_eq!(
            config.bounds,
            Bounds {
                duration: None,
                requests: Some(5)
            }
        );
        assert_eq!(config.mode, Mode::Open { rate: 10.0 });
    }

    #[test]
    fn custom_request_from_flags() {
        let config = Args::parse_from(["loadgen", "--method", "delete", "--path", "/x"])
            .to_config()
            .unwrap();
        assert_eq!(config.mix[0].name, "custom");
        assert!(config.templates[0]
            .bytes
            .starts_with(b"DELETE /x HTTP/1.1\r\n"));
        let missing =
            Args::parse_from(["loadgen", "--body-file", "/nonexistent/body.json"]).to_config();
        assert!(matches!(
            missing,
            Err(CliError::Workload(WorkloadError::BodyFile { .. }))
        ));
    }

    #[test]
    fn bad_rate_and_remote_target_are_refused() {
        assert!(Args::parse_from(["loadgen", "--rate", "0"])
            .to_config()
            .is_err());
        let remote = Args::parse_from(["loadgen", "http://10.9.8.7:80"]).to_config();
        assert!(matches!(
            remote,
            Err(CliError::Target(TargetError::NotLoopback { .. }))
        ));
        assert!(
            Args::parse_from(["loadgen", "--allow-remote", "http://10.9.8.7:80"])
                .to_config()
                .is_ok()
        );
    }
}
