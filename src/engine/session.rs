//! Live sessions: sandboxes kept between execs, forked live, checkpointed
//! and rolled back.
//!
//! A session belongs to the lane (worker thread) that created it, so running
//! it takes no lock and its vCPU never migrates between threads (KVM pays an
//! RCU grace period when a vCPU's thread changes). Ids name the lane (see
//! [`SessionId`]); the server hands each request to the owning worker. The
//! only shared piece is the [`Directory`]: per-key counts for the limits and
//! the listing, touched on create, delete and expiry, never on exec.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::pool::{Pool, PoolSet};
use super::sandbox::{fill_random, Checkpoint, Limits, Sandbox};
use crate::api::{
    CancelToken, ExecFailure, ExecRequest, ExecResult, Language, Owner, SessionError, SessionId,
    SessionInfo, SessionOp, SessionReply, SessionSpec,
};

/// How long an ended session's id keeps answering why it ended.
const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);
/// Most time one tick spends compacting idle sessions' checkpoints.
const COMPACT_BUDGET: Duration = Duration::from_millis(50);
/// An idle session whose current checkpoint's delta has more runs than this
/// is compacted into one base layer (each run is one mapping per fork).
pub const COMPACT_MIN_DELTA_RUNS: usize = 4;
/// Most children one fork or batch makes.
pub const MAX_FORK_COUNT: usize = 100;

/// Limits and defaults for sessions (shared by all lanes).
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// This node's name in ids (`[a-z0-9-]`, ≤ 32).
    pub node: String,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub max_per_key: usize,
    pub max_total: usize,
    /// Checkpoint memory one key may hold.
    pub checkpoint_bytes_per_key: u64,
    /// Limits of every session run; `max_dirty_pages` bounds the session's
    /// whole memory apart from its template, across runs.
    pub limits: Limits,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            node: "n0".into(),
            default_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(24 * 3600),
            max_per_key: 100,
            max_total: 1000,
            checkpoint_bytes_per_key: 1 << 30,
            limits: Limits {
                max_dirty_pages: 256 << 8,
                ..Limits::default()
            },
        }
    }
}

/// What every lane shares: live session descriptions per key.
#[derive(Default)]
pub struct Directory {
    inner: Mutex<DirectoryInner>,
}

#[derive(Default)]
struct DirectoryInner {
    sessions: HashMap<String, (Owner, SessionInfo)>,
    per_owner: HashMap<Owner, usize>,
    checkpoint_bytes: HashMap<Owner, u64>,
}

impl Directory {
    fn lock(&self) -> std::sync::MutexGuard<'_, DirectoryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes up to `wanted` places for `owner`; how many it got, or why none.
    fn reserve(
        &self,
        cfg: &SessionConfig,
        owner: Owner,
        wanted: usize,
    ) -> Result<usize, SessionError> {
        let mut d = self.lock();
        let total: usize = d.per_owner.values().sum();
        let mine = d.per_owner.get(&owner).copied().unwrap_or(0);
        let room = cfg
            .max_total
            .saturating_sub(total)
            .min(cfg.max_per_key.saturating_sub(mine));
        if room == 0 {
            return Err(if mine >= cfg.max_per_key {
                SessionError::new(
                    429,
                    "too_many_sandboxes",
                    format!("this API key already holds {mine} live sandboxes (the limit is {}); delete some first", cfg.max_per_key),
                )
            } else {
                SessionError::new(
                    429,
                    "server_sandbox_limit",
                    format!(
                        "the server holds its maximum of {} live sandboxes; retry later",
                        cfg.max_total
                    ),
                )
            });
        }
        let got = room.min(wanted);
        *d.per_owner.entry(owner).or_default() += got;
        Ok(got)
    }

    fn unreserve(&self, owner: Owner, n: usize) {
        let mut d = self.lock();
        if let Some(c) = d.per_owner.get_mut(&owner) {
            *c = c.saturating_sub(n);
        }
    }

    fn insert(&self, owner: Owner, info: &SessionInfo) {
        self.lock()
            .sessions
            .insert(info.sandbox_id.clone(), (owner, info.clone()));
    }

    fn update(&self, info: &SessionInfo) {
        if let Some(entry) = self.lock().sessions.get_mut(&info.sandbox_id) {
            entry.1 = info.clone();
        }
    }

    /// The counters a listing shows, after an exec.
    fn touch(&self, id: &str, execution_count: u64, memory_bytes: u64) {
        if let Some((_, info)) = self.lock().sessions.get_mut(id) {
            info.execution_count = execution_count;
            info.memory_bytes = memory_bytes;
        }
    }

    fn remove(&self, id: &str) {
        let mut d = self.lock();
        if let Some((owner, _)) = d.sessions.remove(id) {
            if let Some(c) = d.per_owner.get_mut(&owner) {
                *c = c.saturating_sub(1);
            }
        }
    }

    fn charge_checkpoint(
        &self,
        cfg: &SessionConfig,
        owner: Owner,
        bytes: u64,
    ) -> Result<(), SessionError> {
        let mut d = self.lock();
        let used = d.checkpoint_bytes.entry(owner).or_default();
        if *used + bytes > cfg.checkpoint_bytes_per_key {
            return Err(SessionError::new(
                429,
                "checkpoint_budget_exceeded",
                format!(
                    "this checkpoint holds {bytes} bytes; the key already holds {used} of its {} byte checkpoint budget; delete checkpoints first",
                    cfg.checkpoint_bytes_per_key
                ),
            ));
        }
        *used += bytes;
        Ok(())
    }

    fn refund_checkpoint(&self, owner: Owner, bytes: u64) {
        if let Some(used) = self.lock().checkpoint_bytes.get_mut(&owner) {
            *used = used.saturating_sub(bytes);
        }
    }

    /// Live sessions of `owner`, oldest first.
    pub fn list(&self, owner: Owner) -> Vec<SessionInfo> {
        let mut out: Vec<SessionInfo> = self
            .lock()
            .sessions
            .values()
            .filter(|(o, _)| *o == owner)
            .map(|(_, i)| i.clone())
            .collect();
        out.sort_by(|a, b| {
            a.created_at
                .total_cmp(&b.created_at)
                .then_with(|| a.sandbox_id.cmp(&b.sandbox_id))
        });
        out
    }

    /// Live sessions on this node.
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Session {
    sandbox: Sandbox,
    owner: Owner,
    info: SessionInfo,
    expires: Instant,
    /// The next run reseeds user-space RNGs (first run after create/fork/restore).
    reseed_next: bool,
}

struct StoredCheckpoint {
    checkpoint: Checkpoint,
    owner: Owner,
    language: Language,
    metadata: serde_json::Value,
}

/// Why an id that once existed answers 404.
struct Tombstone {
    code: &'static str,
    message: String,
    at: Instant,
}

/// One lane's sessions and checkpoints.
pub struct SessionTable {
    shard: usize,
    worker: usize,
    cfg: Arc<SessionConfig>,
    dir: Arc<Directory>,
    sessions: HashMap<String, Session>,
    checkpoints: HashMap<String, StoredCheckpoint>,
    tombstones: HashMap<String, Tombstone>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn nonce() -> u128 {
    let mut b = [0u8; 16];
    fill_random(&mut b);
    u128::from_le_bytes(b)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl SessionTable {
    pub fn new(shard: usize, worker: usize, cfg: Arc<SessionConfig>, dir: Arc<Directory>) -> Self {
        SessionTable {
            shard,
            worker,
            cfg,
            dir,
            sessions: HashMap::new(),
            checkpoints: HashMap::new(),
            tombstones: HashMap::new(),
        }
    }

    fn new_id(&self, prefix: &str) -> SessionId {
        SessionId::new(prefix, &self.cfg.node, self.shard, self.worker, nonce())
    }

    fn ttl(&self, asked: Option<Duration>) -> Result<Duration, SessionError> {
        let ttl = asked.unwrap_or(self.cfg.default_ttl);
        if ttl.is_zero() || ttl > self.cfg.max_ttl {
            return Err(SessionError::new(
                400,
                "invalid_ttl",
                format!(
                    "ttl_seconds must be between 1 and {} on this server",
                    self.cfg.max_ttl.as_secs()
                ),
            ));
        }
        Ok(ttl)
    }

    /// The live session `id` of `owner`, or the 404 that says why not.
    fn lookup(&mut self, id: &SessionId, owner: Owner) -> Result<&mut Session, SessionError> {
        if self
            .sessions
            .get(&id.text)
            .is_some_and(|s| s.expires <= Instant::now())
        {
            // tick() gives expired VMs back to the pool; this one is dropped.
            drop(self.end(&id.text, "sandbox_expired", expired_message(&id.text)));
        }
        match self.sessions.get_mut(&id.text) {
            Some(s) if s.owner == owner => Ok(s),
            Some(_) => Err(SessionError::not_found(&id.text)),
            None => Err(match self.tombstones.get(&id.text) {
                Some(t) => SessionError::new(404, t.code, t.message.clone()),
                None => SessionError::not_found(&id.text),
            }),
        }
    }

    /// Removes a session, leaving a tombstone; returns its sandbox.
    fn end(&mut self, id: &str, code: &'static str, message: String) -> Option<Sandbox> {
        let s = self.sessions.remove(id)?;
        self.dir.remove(id);
        self.tombstones.insert(
            id.to_string(),
            Tombstone {
                code,
                message,
                at: Instant::now(),
            },
        );
        Some(s.sandbox)
    }

    fn pool(pools: &mut PoolSet, language: Language) -> Result<&mut Pool, SessionError> {
        pools.get(language).map_err(|f| match f {
            ExecFailure::NoTemplate => SessionError::new(
                400,
                "no_template",
                format!("no {} template is ready on this server", language.as_str()),
            ),
            other => SessionError::new(500, "internal", crate::engine::describe_failure(&other)),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        sandbox: Sandbox,
        owner: Owner,
        language: Language,
        ttl: Duration,
        fork_time: Duration,
        metadata: serde_json::Value,
        pool: &Pool,
    ) -> SessionInfo {
        let id = self.new_id(SessionId::SANDBOX);
        let now = unix_now();
        let info = SessionInfo {
            sandbox_id: id.text.clone(),
            language,
            template: pool
                .template()
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            created_at: now,
            expires_at: now + ttl.as_secs_f64(),
            fork_time_ms: ms(fork_time),
            execution_count: 0,
            memory_bytes: sandbox.dirty_bytes(),
            metadata,
        };
        self.dir.insert(owner, &info);
        self.sessions.insert(
            id.text,
            Session {
                sandbox,
                owner,
                info: info.clone(),
                expires: Instant::now() + ttl,
                reseed_next: true,
            },
        );
        info
    }

    /// Runs `op`; `pools` are the lane's pools, one per language.
    pub fn handle(&mut self, pools: &mut PoolSet, op: SessionOp) -> SessionReply {
        match self.try_handle(pools, op) {
            Ok(reply) => reply,
            Err(e) => SessionReply::Error(e),
        }
    }

    fn try_handle(
        &mut self,
        pools: &mut PoolSet,
        op: SessionOp,
    ) -> Result<SessionReply, SessionError> {
        match op {
            SessionOp::Create {
                owner,
                spec,
                from_checkpoint,
                count,
            } => self.create(pools, owner, spec, from_checkpoint, count),
            SessionOp::Get { id, owner } => {
                Ok(SessionReply::Info(self.lookup(&id, owner)?.info.clone()))
            }
            SessionOp::Exec {
                id,
                owner,
                req,
                language,
            } => self.exec(pools, &id, owner, req, language),
            SessionOp::Fork {
                id,
                owner,
                count,
                ttl,
            } => self.fork(pools, &id, owner, count, ttl),
            SessionOp::SetTimeout { id, owner, ttl } => {
                let ttl = self.ttl(Some(ttl))?;
                let s = self.lookup(&id, owner)?;
                s.expires = Instant::now() + ttl;
                s.info.expires_at = unix_now() + ttl.as_secs_f64();
                let info = s.info.clone();
                self.dir.update(&info);
                Ok(SessionReply::Info(info))
            }
            SessionOp::Delete { id, owner } => {
                self.lookup(&id, owner)?;
                let language = self.sessions[&id.text].info.language;
                let sb = self.end(
                    &id.text,
                    "sandbox_not_found",
                    format!("sandbox {} was deleted", id.text),
                );
                if let (Some(sb), Ok(pool)) = (sb, Self::pool(pools, language)) {
                    pool.release(sb);
                }
                Ok(SessionReply::Deleted)
            }
            SessionOp::Checkpoint { id, owner } => self.checkpoint(pools, &id, owner),
            SessionOp::Restore {
                id,
                owner,
                checkpoint,
            } => self.restore(pools, &id, owner, &checkpoint),
            SessionOp::DeleteCheckpoint { id, owner } => match self.checkpoints.get(&id.text) {
                Some(c) if c.owner == owner => {
                    let c = self.checkpoints.remove(&id.text).expect("present");
                    self.dir
                        .refund_checkpoint(owner, c.checkpoint.dirty_bytes());
                    Ok(SessionReply::Deleted)
                }
                _ => Err(checkpoint_not_found(&id.text)),
            },
            SessionOp::Batch { id, owner, reqs } => self.batch(pools, &id, owner, reqs),
        }
    }

    /// Starts `count` sessions of `owner` from the template (`cp` None) or a
    /// checkpoint: one result each, a 429 entry for each place beyond the
    /// key's or the server's limit.
    #[allow(clippy::too_many_arguments)]
    fn start(
        &mut self,
        pools: &mut PoolSet,
        owner: Owner,
        language: Language,
        ttl: Duration,
        metadata: &serde_json::Value,
        cp: Option<&Checkpoint>,
        count: usize,
    ) -> Result<Vec<Result<SessionInfo, SessionError>>, SessionError> {
        // A missing template refuses the request before any place is taken.
        Self::pool(pools, language)?;
        let granted = self.dir.reserve(&self.cfg, owner, count)?;
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            if i >= granted {
                out.push(Err(SessionError::new(
                    429,
                    "too_many_sandboxes",
                    "this API key or the server reached its live sandbox limit",
                )));
                continue;
            }
            let started = Instant::now();
            let made = Self::pool(pools, language).and_then(|pool| {
                match cp {
                    Some(cp) => pool.sandbox_from(cp),
                    None => pool.open_session(),
                }
                .map_err(|e| {
                    SessionError::new(
                        500,
                        "fork_failed",
                        format!("could not start the sandbox: {e}"),
                    )
                })
            });
            match made {
                Ok(sb) => {
                    // The place reserved above is now the session's (remove() frees it).
                    let pool = Self::pool(pools, language)?;
                    out.push(Ok(self.insert(
                        sb,
                        owner,
                        language,
                        ttl,
                        started.elapsed(),
                        metadata.clone(),
                        pool,
                    )));
                }
                Err(e) => {
                    self.dir.unreserve(owner, 1);
                    out.push(Err(e));
                }
            }
        }
        Ok(out)
    }

    fn create(
        &mut self,
        pools: &mut PoolSet,
        owner: Owner,
        spec: SessionSpec,
        from_checkpoint: Option<SessionId>,
        count: usize,
    ) -> Result<SessionReply, SessionError> {
        if count == 0 || count > MAX_FORK_COUNT {
            return Err(SessionError::new(
                400,
                "invalid_count",
                format!("count must be between 1 and {MAX_FORK_COUNT}"),
            ));
        }
        let ttl = self.ttl(spec.ttl)?;
        let (language, metadata) = match &from_checkpoint {
            Some(cid) => match self.checkpoints.get(&cid.text) {
                Some(c) if c.owner == owner => (
                    c.language,
                    if spec.metadata.is_null() {
                        c.metadata.clone()
                    } else {
                        spec.metadata.clone()
                    },
                ),
                _ => return Err(checkpoint_not_found(&cid.text)),
            },
            None => (spec.language, spec.metadata.clone()),
        };
        let out = match &from_checkpoint {
            Some(cid) => {
                // Out of the map while children are made from it (they need
                // `&mut self`); put back whatever happens.
                let stored = self.checkpoints.remove(&cid.text).expect("looked up above");
                let out = self.start(
                    pools,
                    owner,
                    language,
                    ttl,
                    &metadata,
                    Some(&stored.checkpoint),
                    count,
                );
                self.checkpoints.insert(cid.text.clone(), stored);
                out?
            }
            None => self.start(pools, owner, language, ttl, &metadata, None, count)?,
        };
        Ok(SessionReply::Created(out))
    }

    fn exec(
        &mut self,
        pools: &mut PoolSet,
        id: &SessionId,
        owner: Owner,
        mut req: ExecRequest,
        language: Option<Language>,
    ) -> Result<SessionReply, SessionError> {
        let limits = self.cfg.limits;
        let s = self.lookup(id, owner)?;
        match language {
            Some(l) if l != s.info.language => {
                return Err(SessionError::new(
                    400,
                    "language_mismatch",
                    format!(
                        "sandbox {} runs {}, not {}",
                        id.text,
                        s.info.language.as_str(),
                        l.as_str()
                    ),
                ))
            }
            _ => req.language = s.info.language,
        }
        // A client that goes away does not end the session's run half-way.
        req.cancel = CancelToken::new();
        let reseed = std::mem::take(&mut s.reseed_next);
        let pool = Self::pool(pools, s.info.language)?;
        let result = pool.run_session(&mut s.sandbox, &req, reseed, &limits);
        s.info.execution_count += 1;
        s.info.memory_bytes = s.sandbox.dirty_bytes();
        let info = s.info.clone();
        let poisoned = s.sandbox.poisoned();
        let interrupt_failure = s.sandbox.interrupt_failure().map(str::to_string);
        self.dir
            .touch(&id.text, info.execution_count, info.memory_bytes);
        if poisoned {
            let why = match &result.failure {
                Some(ExecFailure::Timeout) => format!(
                    "the run timed out and could not be interrupted ({}), so the sandbox was stopped",
                    interrupt_failure.as_deref().unwrap_or("no reason recorded")
                ),
                Some(f) => format!(
                    "the sandbox was stopped: {}",
                    crate::engine::describe_failure(f)
                ),
                None => "the sandbox was stopped".to_string(),
            };
            self.end(
                &id.text,
                "sandbox_ended",
                format!("sandbox {} ended: {why}", id.text),
            );
        }
        Ok(SessionReply::Exec { info, result })
    }

    fn capture(
        &mut self,
        pools: &mut PoolSet,
        id: &SessionId,
        owner: Owner,
    ) -> Result<(Checkpoint, Language, serde_json::Value, Duration), SessionError> {
        let s = self.lookup(id, owner)?;
        let started = Instant::now();
        let pool = Self::pool(pools, s.info.language)?;
        let cp = pool.checkpoint(&mut s.sandbox).map_err(|e| {
            SessionError::new(
                500,
                "checkpoint_failed",
                format!("could not capture the sandbox: {e}"),
            )
        })?;
        // Pages the capture folded in are now in the sandbox's own accounting.
        s.info.memory_bytes = s.sandbox.dirty_bytes();
        Ok((
            cp,
            s.info.language,
            s.info.metadata.clone(),
            started.elapsed(),
        ))
    }

    fn fork(
        &mut self,
        pools: &mut PoolSet,
        id: &SessionId,
        owner: Owner,
        count: usize,
        ttl: Option<Duration>,
    ) -> Result<SessionReply, SessionError> {
        if count == 0 || count > MAX_FORK_COUNT {
            return Err(SessionError::new(
                400,
                "invalid_count",
                format!("count must be between 1 and {MAX_FORK_COUNT}"),
            ));
        }
        let ttl = self.ttl(ttl)?;
        let (cp, language, metadata, pause) = self.capture(pools, id, owner)?;
        let forks = self.start(pools, owner, language, ttl, &metadata, Some(&cp), count)?;
        Ok(SessionReply::Forked {
            source_id: id.text.clone(),
            pause,
            forks,
        })
    }

    fn checkpoint(
        &mut self,
        pools: &mut PoolSet,
        id: &SessionId,
        owner: Owner,
    ) -> Result<SessionReply, SessionError> {
        let (cp, language, metadata, pause) = self.capture(pools, id, owner)?;
        let bytes = cp.dirty_bytes();
        self.dir.charge_checkpoint(&self.cfg, owner, bytes)?;
        let cid = self.new_id(SessionId::CHECKPOINT);
        self.checkpoints.insert(
            cid.text.clone(),
            StoredCheckpoint {
                checkpoint: cp,
                owner,
                language,
                metadata,
            },
        );
        Ok(SessionReply::Checkpointed {
            checkpoint_id: cid.text,
            dirty_bytes: bytes,
            pause,
        })
    }

    fn restore(
        &mut self,
        pools: &mut PoolSet,
        id: &SessionId,
        owner: Owner,
        checkpoint: &SessionId,
    ) -> Result<SessionReply, SessionError> {
        let language = self.lookup(id, owner)?.info.language;
        let stored = match self.checkpoints.get(&checkpoint.text) {
            Some(c) if c.owner == owner => c,
            _ => return Err(checkpoint_not_found(&checkpoint.text)),
        };
        if stored.language != language {
            return Err(SessionError::new(
                400,
                "checkpoint_mismatch",
                format!(
                    "checkpoint {} is of a {} sandbox",
                    checkpoint.text,
                    stored.language.as_str()
                ),
            ));
        }
        let started = Instant::now();
        let pool = Self::pool(pools, language)?;
        let s = self.sessions.get_mut(&id.text).expect("looked up above");
        match pool.restore(&mut s.sandbox, &stored.checkpoint) {
            Ok(()) => {
                s.reseed_next = false;
                s.info.memory_bytes = s.sandbox.dirty_bytes();
                let info = s.info.clone();
                Ok(SessionReply::Restored {
                    info,
                    restore: started.elapsed(),
                })
            }
            Err(e) => {
                let message = format!(
                    "sandbox {} ended: restoring checkpoint {} failed: {e}",
                    id.text, checkpoint.text
                );
                self.end(&id.text, "sandbox_ended", message.clone());
                Err(SessionError::new(500, "restore_failed", message))
            }
        }
    }

    fn batch(
        &mut self,
        pools: &mut PoolSet,
        id: &SessionId,
        owner: Owner,
        reqs: Vec<(ExecRequest, Option<Language>)>,
    ) -> Result<SessionReply, SessionError> {
        if reqs.is_empty() || reqs.len() > MAX_FORK_COUNT {
            return Err(SessionError::new(
                400,
                "invalid_batch",
                format!("a batch from a sandbox has 1 to {MAX_FORK_COUNT} executions"),
            ));
        }
        let limits = self.cfg.limits;
        let (cp, language, _, _) = self.capture(pools, id, owner)?;
        let mut results = Vec::with_capacity(reqs.len());
        for (mut req, named) in reqs {
            let pool = Self::pool(pools, language)?;
            match named {
                Some(l) if l != language => {
                    results.push(failed(ExecFailure::Rejected(format!(
                        "the sandbox runs {}, not {}",
                        language.as_str(),
                        l.as_str()
                    ))));
                    continue;
                }
                _ => req.language = language,
            }
            let started = Instant::now();
            match pool.sandbox_from(&cp) {
                Ok(mut child) => {
                    let fork_time = started.elapsed();
                    let mut r = pool.run_session(&mut child, &req, true, &limits);
                    r.fork_time = fork_time;
                    r.total_time = started.elapsed();
                    pool.release(child);
                    results.push(r);
                }
                Err(e) => results.push(failed(ExecFailure::Internal(format!("fork failed: {e}")))),
            }
        }
        Ok(SessionReply::Batch(results))
    }

    /// Ends expired sessions and gives their VMs back to the pools.
    pub fn tick(&mut self, pools: &mut PoolSet) {
        let languages: Vec<(String, Language)> = self
            .sessions
            .iter()
            .map(|(k, s)| (k.clone(), s.info.language))
            .collect();
        let now = Instant::now();
        for (id, language) in languages {
            if self.sessions.get(&id).is_some_and(|s| s.expires <= now) {
                if let (Some(sb), Ok(pool)) = (
                    self.end(&id, "sandbox_expired", expired_message(&id)),
                    Self::pool(pools, language),
                ) {
                    pool.release(sb);
                }
            }
        }
        self.tombstones
            .retain(|_, t| now.duration_since(t.at) < TOMBSTONE_TTL);
        // Idle sessions forked since their last run: later forks of them map
        // one base layer instead of a base and a delta.
        let started = Instant::now();
        for s in self.sessions.values_mut() {
            if started.elapsed() >= COMPACT_BUDGET {
                break;
            }
            if s.sandbox.compact(COMPACT_MIN_DELTA_RUNS).is_err() {
                // The capture failed (host memory): forks keep using the
                // uncompacted checkpoint, which is still exact.
                continue;
            }
        }
    }

    /// (sessions, their memory, checkpoints, their memory) in this lane.
    pub fn usage(&self) -> (usize, u64, usize, u64) {
        let memory = self.sessions.values().map(|s| s.info.memory_bytes).sum();
        let cp_bytes = self
            .checkpoints
            .values()
            .map(|c| c.checkpoint.dirty_bytes())
            .sum();
        (
            self.sessions.len(),
            memory,
            self.checkpoints.len(),
            cp_bytes,
        )
    }

    /// Live sessions in this lane.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

fn expired_message(id: &str) -> String {
    format!("sandbox {id} reached the end of its TTL and was stopped (extend a sandbox's TTL with POST /v1/sandboxes/{{id}}/timeout before it expires)")
}

fn checkpoint_not_found(id: &str) -> SessionError {
    SessionError::new(
        404,
        "checkpoint_not_found",
        format!(
            "no checkpoint {id} (it never existed, was deleted, or belongs to another API key)"
        ),
    )
}

fn failed(f: ExecFailure) -> ExecResult {
    ExecResult {
        exit_code: -1,
        failure: Some(f),
        ..Default::default()
    }
}

/// `kvmfork serve` options for sessions.
#[derive(clap::Args, Clone, Debug)]
pub struct SessionArgs {
    /// This node's name in sandbox ids (`[a-z0-9-]`, ≤ 32 characters); a
    /// load balancer routes `/v1/sandboxes/{id}/…` by it.
    #[arg(long, default_value = "n0")]
    pub node_id: String,
    /// Live sandboxes one API key may hold.
    #[arg(long, default_value_t = 100)]
    pub max_sandboxes_per_key: usize,
    /// Live sandboxes this server holds in all.
    #[arg(long, default_value_t = 1000)]
    pub max_sandboxes: usize,
    /// TTL of a sandbox created without `ttl_seconds`.
    #[arg(long, default_value_t = 300)]
    pub sandbox_ttl_seconds: u64,
    /// Longest `ttl_seconds` accepted.
    #[arg(long, default_value_t = 86400)]
    pub sandbox_max_ttl_seconds: u64,
    /// Guest memory one sandbox may hold apart from its template, in MiB.
    #[arg(long, default_value_t = 256)]
    pub sandbox_memory_mib: usize,
    /// Checkpoint memory one API key may hold, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub checkpoint_memory_mib_per_key: u64,
}

impl SessionArgs {
    /// The configuration, with the server's output caps for every run.
    pub fn to_config(&self, output_cap: u32) -> Result<SessionConfig, String> {
        if !crate::api::valid_node_name(&self.node_id) {
            return Err(format!(
                "--node-id {:?}: use 1 to 32 characters of [a-z0-9-]",
                self.node_id
            ));
        }
        if self.sandbox_ttl_seconds == 0 || self.sandbox_ttl_seconds > self.sandbox_max_ttl_seconds
        {
            return Err(
                "--sandbox-ttl-seconds must be between 1 and --sandbox-max-ttl-seconds".into(),
            );
        }
        if self.max_sandboxes == 0 || self.max_sandboxes_per_key == 0 {
            return Err("--max-sandboxes and --max-sandboxes-per-key must be at least 1".into());
        }
        Ok(SessionConfig {
            node: self.node_id.clone(),
            default_ttl: Duration::from_secs(self.sandbox_ttl_seconds),
            max_ttl: Duration::from_secs(self.sandbox_max_ttl_seconds),
            max_per_key: self.max_sandboxes_per_key,
            max_total: self.max_sandboxes,
            checkpoint_bytes_per_key: self.checkpoint_memory_mib_per_key << 20,
            limits: Limits {
                stdout_cap: output_cap,
                stderr_cap: output_cap,
                max_dirty_pages: self.sandbox_memory_mib * 256,
            },
        })
    }
}
