//! kvmfork's HTTP/1.1 load generator: closed loop (N connections back to back)
//! or open loop (fixed arrival rate, latency from the intended send time so
//! coordinated omission is corrected), one epoll thread per core.

pub mod cli;
pub mod http;
pub mod plot;
pub mod report;
pub mod schedule;
pub mod stats;
pub mod target;
pub mod timer;
pub mod worker;
pub mod workload;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::schedule::{Bounds, OpenSchedule, Phases, Tickets};
use crate::stats::Recorder;
use crate::target::Target;
use crate::worker::{Load, Worker, WorkerError, WorkerSetup};
use crate::workload::{MixEntry, Template};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Every connection sends its next request as soon as a response arrives.
    Closed,
    /// Requests arrive at `rate` per second whatever the server does.
    Open { rate: f64 },
}

/// A fully validated run description.
#[derive(Debug, Clone)]
pub struct Config {
    pub target: Target,
    /// One template per mix entry, same order.
    pub templates: Vec<Template>,
    pub mix: Vec<MixEntry>,
    pub connections: usize,
    pub threads: usize,
    pub mode: Mode,
    pub bounds: Bounds,
    pub warmup: Duration,
    pub timeout: Duration,
    /// Setting this ends the run early: no new requests, in-flight ones finish.
    pub stop: Arc<AtomicBool>,
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot start load thread {thread}: {source}")]
    Spawn {
        thread: usize,
        source: std::io::Error,
    },
    #[error("load thread {thread} failed: {source}")]
    Worker { thread: usize, source: WorkerError },
    #[error("load thread {thread} panicked")]
    Panicked { thread: usize },
}

/// Merged measurements of a run.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub recorder: Recorder,
    /// From the end of warm-up to the end of the last measured request.
    pub elapsed: Duration,
    /// Threads actually used (never more than connections).
    pub threads: usize,
    /// The run was stopped through [`Config::stop`].
    pub interrupted: bool,
}

impl Config {
    fn validate(&self) -> Result<(), RunError> {
        let fail = |message: &str| Err(RunError::Config(message.to_string()));
        if self.connections == 0 {
            return fail("--connections must be at least 1");
        }
        if self.threads == 0 {
            return fail("--threads must be at least 1");
        }
        if self.templates.is_empty() || self.templates.len() != self.mix.len() {
            return fail("every mix entry needs exactly one request template");
        }
        if self.bounds.duration.is_none() && self.bounds.requests.is_none() {
            return fail("set --duration and/or --requests");
        }
        if self.bounds.duration == Some(Duration::ZERO) || self.bounds.requests == Some(0) {
            return fail("--duration and --requests must be positive");
        }
        if self.timeout.is_zero() {
            return fail("--timeout must be positive");
        }
        if let Mode::Open { rate } = self.mode {
            if !(rate.is_finite() && rate > 0.0) {
                return fail("--rate must be a positive number");
            }
        }
        Ok(())
    }
}

/// Runs the load and returns the merged measurements.
pub fn run(config: &Config) -> Result<RunResult, RunError> {
    config.validate()?;
    let threads = config.threads.min(config.connections);
    let templates: Arc<[Template]> = config.templates.clone().into();
    let weights: Arc<[u32]> = config.mix.iter().map(|entry| entry.weight).collect();
    let tickets = Arc::new(Tickets::new(config.bounds.requests));
    let start = Instant::now();
    let phases = Phases::new(start, config.warmup, config.bounds.duration);
    let mut handles = Vec::with_capacity(threads);
    for thread in 0..threads {
        let connections =
            config.connections / threads + usize::from(thread < config.connections % threads);
        let load = match config.mode {
            Mode::Closed => Load::Closed(Arc::clone(&tickets)),
            Mode::Open { rate } => Load::Open(OpenSchedule::new(
                start,
                rate,
                config.warmup,
                config.bounds,
                thread,
                threads,
            )),
        };
        let setup = WorkerSetup {
            addr: config.target.addr,
            templates: Arc::clone(&templates),
            weights: Arc::clone(&weights),
            connections,
            timeout: config.timeout,
            phases,
            load,
            stop: Arc::clone(&config.stop),
        };
        let handle = std::thread::Builder::new()
            .name(format!("loadgen-{thread}"))
            .spawn(move || Worker::new(setup)?.run())
            .map_err(|source| RunError::Spawn { thread, source })?;
        handles.push(handle);
    }
    let mut merged = Recorder::new(config.templates.len());
    let mut last_end: Option<Instant> = None;
    let mut first_error = None;
    for (thread, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(outcome)) => {
                merged.merge(&outcome.recorder);
                last_end = last_end.max(outcome.last_measured_end);
            }
            Ok(Err(source)) => {
                first_error.get_or_insert(RunError::Worker { thread, source });
            }
            Err(_) => {
                first_error.get_or_insert(RunError::Panicked { thread });
            }
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    let end = last_end.unwrap_or_else(Instant::now);
    Ok(RunResult {
        recorder: merged,
        elapsed: end.saturating_duration_since(phases.measure_start),
        threads,
        interrupted: config.stop.load(Ordering::Relaxed),
    })
}

static INTERRUPT_FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

extern "C" fn on_interrupt(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    if let Some(flag) = INTERRUPT_FLAG.get() {
        flag.store(true, Ordering::Relaxed);
    }
}

/// Makes the first SIGINT/SIGTERM set `flag` (the run winds down and still
/// reports); the handler resets itself, so a second one kills as usual.
pub fn stop_on_interrupt(flag: &Arc<AtomicBool>) -> std::io::Result<()> {
    let _ = INTERRUPT_FLAG.set(Arc::clone(flag));
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: zeroed sigaction is a valid "no flags, empty mask" value we then fill in.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_interrupt as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESETHAND | libc::SA_RESTART;
        // SAFETY: installs a handler that only does an atomic store; `action` is valid.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard limit (1000 connections need
/// more than the usual 1024 soft limit once stdio and epoll are counted).
/// Returns the resulting soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid rlimit we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the valid rlimit we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}
