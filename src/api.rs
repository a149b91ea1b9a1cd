//! Types shared by the fork engine and its front ends (HTTP server, CLI,
//! benches). The HTTP layer talks to sandboxes only through [`LaneFactory`]
//! and [`Lane`]; the one product implementation is the KVM fork engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Languages a template can run. `javascript` is an alias of `node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    Python,
    Node,
}

impl Language {
    /// Parses the wire name (`python`, `node`, `javascript`, `js`).
    pub fn from_wire(name: &str) -> Option<Language> {
        match name {
            "python" | "python3" | "py" => Some(Language::Python),
            "node" | "javascript" | "js" | "nodejs" => Some(Language::Node),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Node => "node",
        }
    }

    /// The language id written into the mailbox (see guest/contract.h).
    pub fn contract_id(self) -> u32 {
        match self {
            Language::Python => crate::contract::LANG_PYTHON as u32,
            Language::Node => crate::contract::LANG_NODE as u32,
        }
    }
}

/// Set by a front end when nobody waits for the answer any more (client gone,
/// server draining); the engine stops the guest at its next watchdog check.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// One piece of code to run in a fresh fork.
#[derive(Clone, Debug)]
pub struct ExecRequest {
    pub code: String,
    pub language: Language,
    /// Wall-clock limit for the guest run, enforced by the VMM.
    pub timeout: Duration,
    pub cancel: CancelToken,
}

/// Why a run ended without a normal exit code from the guest's runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecFailure {
    /// The wall-clock timeout fired; the sandbox was stopped.
    Timeout,
    /// The front end cancelled the run (client disconnected).
    Cancelled,
    /// The guest died: kernel panic, triple fault, init exited, emulation failure.
    GuestCrashed(String),
    /// The guest wrote a response the host refused (bad lengths, bad status).
    BadResponse(String),
    /// The sandbox wrote more copy-on-write pages than its limit allows.
    MemoryLimit,
    /// The request itself was refused before running (e.g. code too large).
    Rejected(String),
    /// No template for this language is loaded.
    NoTemplate,
    /// Host-side failure (KVM ioctl error, out of memory).
    Internal(String),
}

/// The answer for one [`ExecRequest`].
#[derive(Clone, Debug, Default)]
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// `python -c` semantics; -1 when `failure` is set.
    pub exit_code: i32,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub failure: Option<ExecFailure>,
    /// Time to get a runnable sandbox (pool reset or fresh VM + restore).
    pub fork_time: Duration,
    /// Time the guest ran the code (host-measured, vCPU resume to doorbell).
    pub exec_time: Duration,
    /// Fork + exec + response decoding.
    pub total_time: Duration,
}

/// Counters a lane reports for /v1/health and /v1/metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LaneStats {
    pub pooled_vms: usize,
    pub live_vms: usize,
    pub forks: u64,
    pub fresh_vm_forks: u64,
    pub destroyed_vms: u64,
    pub timeouts: u64,
    pub guest_errors: u64,
}

/// A single-threaded executor owning its own VM pool. Each worker thread of a
/// shard owns one lane, so running a request takes no lock shared with other
/// threads.
pub trait Lane: Send {
    /// Runs one request in a fresh fork; blocks the calling thread until the
    /// guest answers, times out, is cancelled or dies.
    fn exec(&mut self, req: &ExecRequest) -> ExecResult;
    fn stats(&self) -> LaneStats;
}

/// Whether requests for a language can run now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateAvailability {
    /// The template is loaded; requests run.
    Ready,
    /// The template is still being built or loaded; retry later.
    Building,
    /// Building or loading the template failed; the text says why.
    Failed(String),
    /// This server does not serve the language at all.
    NotServed,
}

/// Creates lanes; shared (read-only) by all shards.
pub trait LaneFactory: Send + Sync {
    fn new_lane(&self, shard: usize) -> Result<Box<dyn Lane>, String>;
    /// Languages this server serves, whatever the state of their template
    /// (ready, still building, or failed).
    fn languages(&self) -> Vec<Language>;
    /// The state of `language`'s template. Called for every exec request, so
    /// implementations keep it cheap and lock-free. The default suits
    /// factories whose templates are all loaded up front.
    fn availability(&self, language: Language) -> TemplateAvailability {
        if self.languages().contains(&language) {
            TemplateAvailability::Ready
        } else {
            TemplateAvailability::NotServed
        }
    }
    /// Template descriptions for /v1/health: one JSON object per served
    /// language, keyed by its wire name (`"python"`, `"node"`), each with at
    /// least `"ready"` (bool) and `"state"` (`"ready"`, `"building"` or
    /// `"failed"`, the latter with an `"error"` text).
    fn templates(&self) -> serde_json::Map<String, serde_json::Value>;
}
