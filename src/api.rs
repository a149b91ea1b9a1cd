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
    /// repr of a session run's final expression (`None`: no value).
    pub result: Option<String>,
    pub result_truncated: bool,
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
    /// Live sessions this lane holds, and their guest memory apart from the template.
    pub sessions: usize,
    pub session_memory_bytes: u64,
    /// Checkpoints held, and their memory.
    pub checkpoints: usize,
    pub checkpoint_bytes: u64,
}

/// A single-threaded executor owning its own VM pool. Each worker thread of a
/// shard owns one lane, so running a request takes no lock shared with other
/// threads.
pub trait Lane: Send {
    /// Runs one request in a fresh fork; blocks the calling thread until the
    /// guest answers, times out, is cancelled or dies.
    fn exec(&mut self, req: &ExecRequest) -> ExecResult;
    fn stats(&self) -> LaneStats;
    /// Runs an operation on the live sessions this lane owns.
    fn session(&mut self, op: SessionOp) -> SessionReply {
        let _ = op;
        SessionReply::Error(SessionError::new(
            501,
            "sessions_unsupported",
            "this executor keeps no sessions",
        ))
    }
    /// Housekeeping (expired sessions), called about once a second when idle.
    fn tick(&mut self) {}
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
    /// The lane of worker `worker` of `shard` (session ids name it).
    fn new_worker_lane(&self, shard: usize, worker: usize) -> Result<Box<dyn Lane>, String> {
        let _ = worker;
        self.new_lane(shard)
    }
    /// Live sessions of `owner`, across all lanes.
    fn list_sessions(&self, owner: Owner) -> Vec<SessionInfo> {
        let _ = owner;
        Vec::new()
    }
    /// This node's name in session ids.
    fn node_name(&self) -> String {
        "n0".into()
    }
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

/// The API key a session belongs to (its index in the keys file; `None`
/// when the server runs without auth).
pub type Owner = Option<usize>;

/// What a new session starts from.
#[derive(Clone, Debug)]
pub struct SessionSpec {
    pub language: Language,
    /// None: the server's default.
    pub ttl: Option<Duration>,
    pub metadata: serde_json::Value,
}

/// An operation on live sessions, run by the lane that owns the session
/// (ids name it: see [`SessionId`]).
#[derive(Clone, Debug)]
pub enum SessionOp {
    /// `count` new sessions: fresh from the template, or from a checkpoint.
    Create {
        owner: Owner,
        spec: SessionSpec,
        from_checkpoint: Option<SessionId>,
        count: usize,
    },
    Get {
        id: SessionId,
        owner: Owner,
    },
    /// `language`: the one the request named (None: the session's own).
    Exec {
        id: SessionId,
        owner: Owner,
        req: ExecRequest,
        language: Option<Language>,
    },
    /// Live fork: `count` children that continue from the session's state.
    Fork {
        id: SessionId,
        owner: Owner,
        count: usize,
        ttl: Option<Duration>,
    },
    SetTimeout {
        id: SessionId,
        owner: Owner,
        ttl: Duration,
    },
    Delete {
        id: SessionId,
        owner: Owner,
    },
    Checkpoint {
        id: SessionId,
        owner: Owner,
    },
    Restore {
        id: SessionId,
        owner: Owner,
        checkpoint: SessionId,
    },
    DeleteCheckpoint {
        id: SessionId,
        owner: Owner,
    },
    /// Runs each item in a throwaway child of the session; the session is unchanged.
    /// Each request with the language it named (None: the session's own).
    Batch {
        id: SessionId,
        owner: Owner,
        reqs: Vec<(ExecRequest, Option<Language>)>,
    },
}

/// A session as the API describes it.
#[derive(Clone, Debug, Serialize)]
pub struct SessionInfo {
    pub sandbox_id: String,
    pub language: Language,
    pub template: String,
    /// Unix time, seconds.
    pub created_at: f64,
    pub expires_at: f64,
    /// Time to get the session's VM (fork or restore), milliseconds.
    pub fork_time_ms: f64,
    pub execution_count: u64,
    /// Guest memory the session holds apart from its template.
    pub memory_bytes: u64,
    pub metadata: serde_json::Value,
}

/// A refused or failed session operation, with the HTTP status it maps to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl SessionError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        SessionError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn not_found(id: &str) -> Self {
        Self::new(
            404,
            "sandbox_not_found",
            format!(
                "no sandbox {id} (it never existed, was deleted, or belongs to another API key)"
            ),
        )
    }
}

/// The answer to a [`SessionOp`].
#[derive(Debug)]
pub enum SessionReply {
    Created(Vec<Result<SessionInfo, SessionError>>),
    Info(SessionInfo),
    Exec {
        info: SessionInfo,
        result: ExecResult,
    },
    Forked {
        source_id: String,
        pause: Duration,
        forks: Vec<Result<SessionInfo, SessionError>>,
    },
    Deleted,
    Checkpointed {
        checkpoint_id: String,
        dirty_bytes: u64,
        pause: Duration,
    },
    Restored {
        info: SessionInfo,
        restore: Duration,
    },
    Batch(Vec<ExecResult>),
    Error(SessionError),
}

/// Names a session or checkpoint and the lane that holds it:
/// `{prefix}_{node}_{shard}_{worker}_{nonce}` (`sbx` or `ckpt`). The node
/// part lets a load balancer route by id; shard and worker let any shard
/// hand the request to the owning worker's queue.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionId {
    pub text: String,
    pub node: String,
    pub shard: usize,
    pub worker: usize,
}

impl SessionId {
    pub const SANDBOX: &'static str = "sbx";
    pub const CHECKPOINT: &'static str = "ckpt";

    pub fn new(prefix: &str, node: &str, shard: usize, worker: usize, nonce: u128) -> Self {
        SessionId {
            text: format!("{prefix}_{node}_{shard}_{worker}_{nonce:032x}"),
            node: node.to_string(),
            shard,
            worker,
        }
    }

    /// Parses an id of kind `prefix`; None for anything malformed.
    pub fn parse(prefix: &str, text: &str) -> Option<Self> {
        if text.len() > 128 {
            return None;
        }
        let mut parts = text.split('_');
        let (p, node, shard, worker, nonce) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        if p != prefix || parts.next().is_some() || !valid_node_name(node) {
            return None;
        }
        if nonce.len() != 32
            || !nonce
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return None;
        }
        let shard: usize = shard.parse().ok().filter(|_| shard.len() <= 4)?;
        let worker: usize = worker.parse().ok().filter(|_| worker.len() <= 4)?;
        Some(SessionId {
            text: text.to_string(),
            node: node.to_string(),
            shard,
            worker,
        })
    }
}

/// Node names go into ids and load-balancer rules: short, `[a-z0-9-]`.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod session_id_tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_name_their_lane() {
        let id = SessionId::new(SessionId::SANDBOX, "n1", 1, 3, 0xabc);
        let parsed = SessionId::parse(SessionId::SANDBOX, &id.text).unwrap();
        assert_eq!(parsed, id);
        assert_eq!(
            (parsed.node.as_str(), parsed.shard, parsed.worker),
            ("n1", 1, 3)
        );
        assert_eq!(
            SessionId::parse(SessionId::CHECKPOINT, &id.text),
            None,
            "wrong kind"
        );
    }

    #[test]
    fn malformed_ids_are_refused() {
        let nonce = "0".repeat(32);
        for bad in [
            String::new(),
            "sbx".into(),
            format!("sbx_n1_0_0_{}", &nonce[1..]),
            format!("sbx_N1_0_0_{nonce}"),
            format!("sbx_n1_-1_0_{nonce}"),
            format!("sbx_n1_0_0_{nonce}_x"),
            format!("sbx_n1_0_0_{}", "G".repeat(32)),
            format!("sbx_n1_99999_0_{nonce}"),
            format!("sbx_{}_0_0_{nonce}", "a".repeat(200)),
        ] {
            assert_eq!(SessionId::parse("sbx", &bad), None, "{bad}");
        }
    }
}
