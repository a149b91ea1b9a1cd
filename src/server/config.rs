//! Server configuration and its command-line form.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::auth::RateLimit;

/// Everything `serve` needs besides the lane factory.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Event-loop threads, each with its own listener, ring and workers.
    pub shards: usize,
    /// Threads per shard running execs (each owns one lane).
    pub workers_per_shard: usize,
    /// Execs a shard accepts beyond its busy workers before answering 503.
    pub queue_depth: usize,
    /// Most executions in one batch request.
    pub max_batch: usize,
    /// Most wall time one batch may ask for, its items' timeouts added up.
    pub max_batch_time: Duration,
    /// Execs one API key may have queued or running on the node (batch
    /// items and session execs each count); at least `max_batch`.
    pub max_execs_per_key: usize,
    /// Requests per second per API key (0 = unlimited), one bucket per key
    /// shared by the shards.
    pub rate_limit: f64,
    pub rate_burst: f64,
    /// JSON array of keys; a missing file turns auth off unless auth is
    /// required (see [`ServeConfig::auth_required`]).
    pub api_keys_file: PathBuf,
    /// Refuse to start without a keys file: `None` = required unless
    /// `listen` is a loopback address.
    pub require_auth: Option<bool>,
    /// Failed authentications from one client address (IPv6: /64) within
    /// `auth_fail_window` after which it gets 429 for a window (0 = off);
    /// counted once for the node (all shards).
    pub auth_fail_limit: u32,
    pub auth_fail_window: Duration,
    pub force_epoll: bool,
    /// The seccomp filters each event-loop and exec-worker thread installs
    /// as it starts (see [`crate::seccomp`]).
    pub seccomp: crate::seccomp::Mode,
    /// Switch to this user (its uid, gid and groups) once the listeners are
    /// bound, before any event-loop or worker thread starts.
    pub user: Option<String>,
    /// Refuse to start exec workers as root (uid 0 after `user`). Off for
    /// library callers; `kvmfork serve` sets it unless `--allow-root`.
    pub refuse_root: bool,
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: usize,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    /// A connection with no request in progress is closed after this long.
    pub idle_timeout: Duration,
    /// A request's head and body must arrive within this long of its first byte.
    pub request_timeout: Duration,
    /// A response that makes no progress towards the client for this long
    /// closes the connection.
    pub send_timeout: Duration,
    /// On shutdown, in-flight execs get this long before they are cancelled.
    pub drain_timeout: Duration,
    /// Seconds sent in `Retry-After` with 503 (queue full / draining).
    pub retry_after_busy: u32,
    /// Provided receive buffers (4 KiB each) per io_uring shard; a power of two.
    pub recv_buffers: u16,
    /// A connection whose unsent response bytes exceed this is not read
    /// from, and its pipelined requests wait, until the client reads.
    pub max_pending_output_bytes: usize,
    /// The JSON-escaped `stdout`, `output` and `stderr` strings of one exec
    /// or batch response together are at most this long; beyond it outputs
    /// are truncated (fair shares across a batch's items) and flagged.
    pub max_response_output_bytes: usize,
    /// Open client connections, all shards together; `0` = half the
    /// process's open-file limit, at most [`AUTO_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// Open client connections from one address (IPv6: one /64).
    pub max_connections_per_address: usize,
}

/// Most connections the automatic `max_connections` allows.
pub const AUTO_MAX_CONNECTIONS: usize = 16384;

/// The environment variable naming the API keys file (`FORKD_API_KEYS_FILE`
/// is still read, deprecated: see [`crate::settings`]).
pub const API_KEYS_ENV: &str = "KVMFORK_API_KEYS_FILE";

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            shards: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            workers_per_shard: 2,
            queue_depth: 64,
            max_batch: 64,
            max_batch_time: Duration::from_secs(64 * 30),
            max_execs_per_key: 128,
            rate_limit: 100.0,
            rate_burst: 100.0,
            api_keys_file: default_api_keys_file(),
            require_auth: None,
            auth_fail_limit: 10,
            auth_fail_window: Duration::from_secs(60),
            force_epoll: false,
            seccomp: crate::seccomp::Mode::Enforce,
            user: None,
            refuse_root: false,
            max_head_bytes: 16 * 1024,
            max_headers: 64,
            max_body_bytes: 4 * 1024 * 1024,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            send_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(60),
            retry_after_busy: 1,
            recv_buffers: 512,
            max_pending_output_bytes: 1024 * 1024,
            max_response_output_bytes: 16 * 1024 * 1024,
            max_connections: 0,
            max_connections_per_address: 1024,
        }
    }
}

impl ServeConfig {
    pub fn rate(&self) -> RateLimit {
        RateLimit {
            rate: self.rate_limit,
            burst: self.rate_burst,
        }
    }

    /// Whether `serve` must refuse to start without an API keys file: as
    /// asked with `--require-auth`, else whenever the listen address is
    /// reachable from other hosts (not loopback).
    pub fn auth_required(&self) -> bool {
        self.require_auth.unwrap_or(!self.listen.ip().is_loopback())
    }

    /// Checks values that would make the server misbehave rather than fail.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == 0 || self.workers_per_shard == 0 || self.queue_depth == 0 {
            return Err("shards, workers-per-shard and queue-depth must be at least 1".into());
        }
        if self.max_batch == 0 || self.max_batch > self.queue_depth {
            // A larger batch could never be admitted whole.
            return Err(format!(
                "max batch must be between 1 and queue-depth ({})",
                self.queue_depth
            ));
        }
        if !(self.rate_limit.is_finite()
            && self.rate_limit >= 0.0
            && self.rate_burst.is_finite()
            && self.rate_burst >= 1.0)
        {
            return Err("rate-limit must be >= 0 and rate-burst >= 1".into());
        }
        if self.max_execs_per_key < self.max_batch {
            return Err(format!(
                "max-execs-per-key must be at least the batch limit ({})",
                self.max_batch
            ));
        }
        if self.max_batch_time < self.default_timeout {
            return Err("max-batch-seconds must be at least the default exec timeout".into());
        }
        if self.default_timeout.is_zero() || self.default_timeout > self.max_timeout {
            return Err("the default exec timeout must be > 0 and <= the maximum".into());
        }
        if !self.recv_buffers.is_power_of_two() {
            return Err("the receive buffer count must be a power of two".into());
        }
        if self.max_head_bytes < 256 || self.max_headers == 0 {
            return Err("header limits are too small".into());
        }
        if self.max_pending_output_bytes < 4096 {
            return Err("max-pending-output-bytes must be at least 4096".into());
        }
        if self.max_response_output_bytes < 4096 {
            return Err("max-response-output-bytes must be at least 4096".into());
        }
        if self.max_connections_per_address == 0 {
            return Err("max-connections-per-address must be at least 1".into());
        }
        Ok(())
    }

    /// The connection cap in force: `max_connections`, or when that is 0
    /// half the soft open-file limit (each connection is one descriptor, and
    /// VMs, memfds and eventfds need the rest), at most
    /// [`AUTO_MAX_CONNECTIONS`] and at least 64.
    pub fn connection_limit(&self) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit into the live stack value.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        let soft = if rc == 0 {
            usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
        } else {
            1024
        };
        (soft / 2).clamp(64, AUTO_MAX_CONNECTIONS)
    }
}

fn default_api_keys_file() -> PathBuf {
    crate::settings::var_os("API_KEYS_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("api_keys.json"))
}

/// `kvmfork serve` options; flatten into the CLI with `#[command(flatten)]`.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Address to listen on (every shard binds it with SO_REUSEPORT).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Event-loop shards, one pinned thread each [default: number of cores].
    #[arg(long)]
    pub shards: Option<usize>,
    /// Exec worker threads per shard; each owns a VM pool.
    #[arg(long, default_value_t = 2)]
    pub workers_per_shard: usize,
    /// Queued execs per shard beyond busy workers before answering 503.
    #[arg(long, default_value_t = 64)]
    pub queue_depth: usize,
    /// Requests per second per API key (0 = unlimited); one bucket per key for the whole node, shared by its shards.
    #[arg(long, default_value_t = 100.0)]
    pub rate_limit: f64,
    /// Token-bucket burst per API key [default: the rate limit].
    #[arg(long)]
    pub rate_burst: Option<f64>,
    /// JSON array of API keys [default: $KVMFORK_API_KEYS_FILE, else api_keys.json]; no file = auth off (on loopback only, see --require-auth).
    #[arg(long)]
    pub api_keys_file: Option<PathBuf>,
    /// Refuse to start without the API keys file [default: true unless --listen is a loopback address]; --require-auth=false serves without auth anywhere.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "BOOL")]
    pub require_auth: Option<bool>,
    /// Failed authentications per client address (IPv6: per /64) within the window before it gets 429 auth_throttled for a window (0 = off); counted once for the whole node, whichever shard a connection lands on.
    #[arg(long, default_value_t = 10)]
    pub auth_fail_limit: u32,
    /// Length of the failed-authentication window and of the block that follows.
    #[arg(long, default_value_t = 60.0)]
    pub auth_fail_window_seconds: f64,
    /// Serve with epoll even where io_uring works.
    #[arg(long)]
    pub force_epoll: bool,
    /// Seccomp filters kvmfork installs on its own threads (default deny, one allow-list per thread kind): enforce kills the process on a call off the list, log allows it and reports it in the kernel log (audit type 1326), off installs none.
    #[arg(long, value_enum, default_value_t = crate::seccomp::Mode::Enforce)]
    pub seccomp: crate::seccomp::Mode,
    /// Once /dev/kvm opens and the listeners are bound, switch to this user (name or uid; its group and supplementary groups, which need `kvm`) before serving.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Run exec workers as root; without it (or KVMFORK_ALLOW_ROOT=1) `serve` on a non-loopback address refuses to start as root (after --user); on loopback it warns.
    #[arg(long, env = "KVMFORK_ALLOW_ROOT", action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_root: bool,
    /// Largest request body in bytes (413 above).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest accepted timeout_seconds.
    #[arg(long, default_value_t = 300.0)]
    pub max_timeout_seconds: f64,
    /// Most wall time one batch may book: its items' timeout_seconds added up (400 batch_time_exceeded above); 64 x the default timeout.
    #[arg(long, default_value_t = 1920.0)]
    pub max_batch_seconds: f64,
    /// Execs one API key may have queued or running on this node, batch items and session execs each counted (429 too_many_execs above); at least the batch limit (64).
    #[arg(long, default_value_t = 128)]
    pub max_execs_per_key: usize,
    /// Seconds in-flight execs get to finish after SIGTERM.
    #[arg(long, default_value_t = 60.0)]
    pub drain_timeout_seconds: f64,
    /// Unsent response bytes after which a connection is not read from (its pipelined requests wait) until the client reads.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_pending_output_bytes: usize,
    /// Cap on the JSON-escaped stdout + output + stderr of one exec or batch response; larger outputs are truncated (fair shares per batch item) and flagged *_truncated.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_response_output_bytes: usize,
    /// Open connections, all shards together (more are answered 503 too_many_connections and closed) [default: half the open-file limit, at most 16384].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Open connections from one client address (IPv6: per /64); more are answered 503 too_many_connections and closed.
    #[arg(long, default_value_t = 1024)]
    pub max_connections_per_address: usize,
}

impl ServeArgs {
    pub fn to_config(&self) -> Result<ServeConfig, String> {
        let mut config = ServeConfig {
            listen: self.listen,
            ..ServeConfig::default()
        };
        if let Some(shards) = self.shards {
            config.shards = shards;
        }
        config.workers_per_shard = self.workers_per_shard;
        config.queue_depth = self.queue_depth;
        config.max_batch = config.max_batch.min(self.queue_depth.max(1));
        config.rate_limit = self.rate_limit;
        config.rate_burst = self.rate_burst.unwrap_or(self.rate_limit.max(1.0));
        if let Some(path) = &self.api_keys_file {
            config.api_keys_file = path.clone();
        }
        config.require_auth = self.require_auth;
        config.auth_fail_limit = self.auth_fail_limit;
        config.auth_fail_window =
            seconds("auth-fail-window-seconds", self.auth_fail_window_seconds)?;
        config.force_epoll = self.force_epoll;
        config.seccomp = self.seccomp;
        config.user = self.user.clone();
        // Root on loopback (a developer's machine, the README's command) is
        // allowed with a warning; listening for the network it must be asked for.
        config.refuse_root = !self.allow_root && !self.listen.ip().is_loopback();
        if !self.allow_root
            && self.listen.ip().is_loopback()
            && crate::privileges::is_root()
            && self.user.is_none()
        {
            eprintln!("kvmfork serve: WARNING: exec workers run as root (allowed on loopback; use --user, or --allow-root to silence this)");
        }
        config.max_body_bytes = self.max_body_bytes;
        config.max_timeout = seconds("max-timeout-seconds", self.max_timeout_seconds)?;
        config.default_timeout = config.default_timeout.min(config.max_timeout);
        config.max_batch_time = seconds("max-batch-seconds", self.max_batch_seconds)?;
        config.max_execs_per_key = self.max_execs_per_key;
        config.drain_timeout = seconds("drain-timeout-seconds", self.drain_timeout_seconds)?;
        config.max_pending_output_bytes = self.max_pending_output_bytes;
        config.max_response_output_bytes = self.max_response_output_bytes;
        if let Some(n) = self.max_connections {
            if n == 0 {
                return Err("--max-connections must be at least 1".into());
            }
            config.max_connections = n;
        }
        config.max_connections_per_address = self.max_connections_per_address;
        config.validate()?;
        Ok(config)
    }
}

fn seconds(name: &str, value: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--{name} must be a positive number of seconds"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn defaults_are_valid() {
        ServeConfig::default().validate().unwrap();
        let cli = Cli::parse_from(["kvmfork"]);
        let config = cli.serve.to_config().unwrap();
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(config.rate_burst, 100.0);
    }

    #[test]
    fn auth_is_required_off_loopback_unless_overridden() {
        let required = |args: &[&str]| {
            let mut argv = vec!["kvmfork"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv)
                .unwrap()
                .serve
                .to_config()
                .unwrap()
                .auth_required()
        };
        assert!(!required(&[]));
        assert!(!required(&["--listen", "[::1]:80"]));
        assert!(required(&["--listen", "0.0.0.0:8080"]));
        assert!(required(&["--listen", "10.1.2.3:8080"]));
        assert!(required(&["--listen", "[::]:8080"]));
        assert!(!required(&[
            "--listen",
            "0.0.0.0:8080",
            "--require-auth=false"
        ]));
        assert!(required(&["--require-auth"]));
        assert!(required(&["--require-auth=true"]));
        assert!(Cli::try_parse_from(["kvmfork", "--require-auth=maybe"]).is_err());
    }

    #[test]
    fn root_is_refused_off_loopback_unless_allowed() {
        let refuses = |args: &[&str]| {
            let mut argv = vec!["kvmfork"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv)
                .unwrap()
                .serve
                .to_config()
                .unwrap()
                .refuse_root
        };
        // Loopback (the README's command) is allowed, with a warning.
        assert!(!refuses(&[]));
        assert!(!refuses(&["--listen", "[::1]:80"]));
        assert!(!refuses(&["--listen", "0.0.0.0:8080", "--allow-root"]));
        // tests/run.sh exports KVMFORK_ALLOW_ROOT=1, which clap reads too.
        let from_env = std::env::var_os("KVMFORK_ALLOW_ROOT").is_some();
        assert_eq!(refuses(&["--listen", "0.0.0.0:8080"]), !from_env);
    }

    #[test]
    fn flags_reach_the_config() {
        let cli = Cli::parse_from([
            "kvmfork",
            "--listen",
            "127.0.0.1:0",
            "--shards",
            "3",
            "--workers-per-shard",
            "4",
            "--queue-depth",
            "8",
            "--rate-limit",
            "5",
            "--rate-burst",
            "10",
            "--api-keys-file",
            "/k.json",
            "--force-epoll",
            "--auth-fail-limit",
            "4",
            "--auth-fail-window-seconds",
            "2.5",
        ]);
        let config = cli.serve.to_config().unwrap();
        assert_eq!(
            (config.shards, config.workers_per_shard, config.queue_depth),
            (3, 4, 8)
        );
        assert_eq!(config.max_batch, 8);
        assert_eq!((config.rate_limit, config.rate_burst), (5.0, 10.0));
        assert_eq!(config.api_keys_file, PathBuf::from("/k.json"));
        assert!(config.force_epoll);
        assert_eq!(
            (config.auth_fail_limit, config.auth_fail_window),
            (4, Duration::from_millis(2500))
        );
        assert!(
            Cli::parse_from(["kvmfork", "--auth-fail-window-seconds", "0"])
                .serve
                .to_config()
                .is_err()
        );
        assert!(Cli::parse_from(["kvmfork", "--shards", "0"])
            .serve
            .to_config()
            .is_err());
    }
}
