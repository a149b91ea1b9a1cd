//! A lane's pool of pre-created sandboxes for one template.
//!
//! A pool belongs to one worker thread (no locks). Acquiring a sandbox is the
//! "fork": an idle one is reset by dirty-page copy-back (fast path); with none
//! idle a fresh VM is created and restored (fallback). A sandbox that
//! misbehaved (timeout, crash, bad response) is destroyed, never reused.

use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::Kvm;

use super::sandbox::{Checkpoint, ExecMode, Limits, Sandbox, SandboxError};
use crate::api::{ExecFailure, ExecRequest, ExecResult, LaneStats};
use crate::template::Template;
use crate::vmm::kick::ThreadTimer;

#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Most idle sandboxes kept for reuse.
    pub max_idle: usize,
    /// Sandboxes created up front.
    pub prewarm: usize,
    /// Idle sandboxes housekeeping keeps ready (clean, for forks of live
    /// sessions: a fan-out of N children is fastest with N of them).
    pub warm: usize,
    pub limits: Limits,
    /// A released sandbox that holds more guest memory than this apart from
    /// the template after its reset is destroyed rather than reused. Pages
    /// written in long runs are mapped back from the template by the reset
    /// (and so given back); scattered ones stay private and are copied back
    /// on every later reset, so one tenant must not make every later reset
    /// of the VM slower, pin host memory, or show in the next tenant's
    /// `fork_time_ms`. Housekeeping replaces it off the request path.
    pub recycle_dirty_bytes: u64,
}

/// The default [`PoolConfig::recycle_dirty_bytes`]: twice the default
/// memory limit of one exec.
pub const RECYCLE_DIRTY_BYTES: u64 = 128 << 20;

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_idle: 4,
            prewarm: 1,
            warm: 1,
            limits: Limits::default(),
            recycle_dirty_bytes: RECYCLE_DIRTY_BYTES,
        }
    }
}

pub struct Pool {
    kvm: Kvm,
    template: Arc<Template>,
    idle: Vec<Sandbox>,
    /// Kick timer of the thread that runs this pool's vCPUs (made lazily on
    /// that thread, remade if the pool moves to another thread).
    timer: Option<(libc::pid_t, ThreadTimer)>,
    cfg: PoolConfig,
    stats: LaneStats,
    resets: ResetTotals,
}

/// Sum of reset breakdowns (for benchmarks).
#[derive(Clone, Debug, Default)]
pub struct ResetTotals {
    pub count: u64,
    pub pages: u64,
    pub dirty_log: std::time::Duration,
    pub copy: std::time::Duration,
    pub vm_state: std::time::Duration,
    pub vcpu_state: std::time::Duration,
}

impl Pool {
    pub fn new(template: Arc<Template>, cfg: PoolConfig) -> Result<Pool, SandboxError> {
        let kvm = Kvm::new().map_err(|e| SandboxError::Vm(crate::vmm::vm::VmError::CreateVm(e)))?;
        let mut pool = Pool {
            kvm,
            template,
            idle: Vec::new(),
            timer: None,
            cfg,
            stats: LaneStats::default(),
            resets: ResetTotals::default(),
        };
        for _ in 0..pool.cfg.prewarm.min(pool.cfg.max_idle) {
            let sb = Sandbox::fork_fresh(&pool.kvm, &pool.template, true)?;
            pool.idle.push(sb);
        }
        pool.stats.pooled_vms = pool.idle.len();
        pool.stats.live_vms = pool.idle.len();
        Ok(pool)
    }

    pub fn template(&self) -> &Arc<Template> {
        &self.template
    }

    fn timer(&mut self) -> Result<&ThreadTimer, SandboxError> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        if self.timer.as_ref().map(|(t, _)| *t) != Some(tid) {
            self.timer = Some((tid, ThreadTimer::for_current_thread()?));
        }
        Ok(&self.timer.as_ref().expect("set above").1)
    }

    /// Gets a runnable sandbox: reset an idle one, or fork a fresh VM.
    /// Returns it with whether it came from the pool.
    pub fn acquire(&mut self) -> Result<(Sandbox, bool), SandboxError> {
        self.acquire_as(None)
    }

    /// [`Pool::acquire`] for a sandbox that gets `cp`'s state: an idle one is
    /// reverted and given the checkpoint in one pass.
    fn acquire_as(&mut self, cp: Option<&Checkpoint>) -> Result<(Sandbox, bool), SandboxError> {
        if cp.is_some() {
            // A clean sandbox takes a layer without a memory-slot cycle.
            if let Some(i) = self.idle.iter().rposition(Sandbox::clean) {
                let sb = self.idle.remove(i);
                self.idle.push(sb);
            }
        }
        while let Some(mut sb) = self.idle.pop() {
            if let Some(cp) = cp {
                match sb.apply(&self.template, cp) {
                    Ok(()) => return Ok((sb, true)),
                    Err(_) => {
                        self.stats.destroyed_vms += 1;
                        self.stats.live_vms = self.stats.live_vms.saturating_sub(1);
                        continue;
                    }
                }
            }
            if !sb.used() {
                return Ok((sb, true));
            }
            match sb.reset(&self.template) {
                Ok(r) => {
                    let t = &mut self.resets;
                    t.count += 1;
                    t.pages += r.pages as u64;
                    t.dirty_log += r.dirty_log;
                    t.copy += r.copy;
                    t.vm_state += r.vm_state;
                    t.vcpu_state += r.vcpu_state;
                    return Ok((sb, true));
                }
                Err(_) => {
                    // A sandbox that cannot be reset is destroyed; try the next.
                    self.stats.destroyed_vms += 1;
                    self.stats.live_vms = self.stats.live_vms.saturating_sub(1);
                }
            }
        }
        let mut sb = Sandbox::fork_fresh(&self.kvm, &self.template, self.cfg.max_idle > 0)?;
        self.stats.fresh_vm_forks += 1;
        self.stats.live_vms += 1;
        if let Some(cp) = cp {
            if let Err(e) = sb.apply(&self.template, cp) {
                self.stats.destroyed_vms += 1;
                self.stats.live_vms = self.stats.live_vms.saturating_sub(1);
                return Err(e);
            }
        }
        Ok((sb, false))
    }

    /// Returns a sandbox after use: kept if healthy and there is room.
    pub fn release(&mut self, sb: Sandbox) {
        if sb.reusable() && self.idle.len() < self.cfg.max_idle {
            self.idle.push(sb);
        } else {
            drop(sb);
            self.stats.destroyed_vms += 1;
            self.stats.live_vms = self.stats.live_vms.saturating_sub(1);
        }
        self.stats.pooled_vms = self.idle.len();
    }

    /// Housekeeping off the request path (an idle worker's tick): idle
    /// sandboxes whose reset re-creates the memory slot anyway (they held a
    /// session's layer or ran guest-kernel code) are reset now, leaving them clean
    /// for the next fork; those over the recycle threshold are destroyed;
    /// then idle sandboxes are topped up to the warm reserve, spending at
    /// most `budget` on new VMs.
    pub fn housekeep(&mut self, budget: std::time::Duration) {
        let t = self.template.clone();
        let before = self.idle.len();
        let recycle = self.cfg.recycle_dirty_bytes;
        self.idle.retain_mut(|sb| {
            (!sb.needs_slot_cycle() || sb.reset(&t).is_ok())
                // After its reset (which gives long written runs back): one
                // that still holds too much is replaced (see
                // `PoolConfig::recycle_dirty_bytes`).
                && sb.dirty_bytes() <= recycle
        });
        let destroyed = before - self.idle.len();
        self.stats.destroyed_vms += destroyed as u64;
        self.stats.live_vms = self.stats.live_vms.saturating_sub(destroyed);
        let started = Instant::now();
        let target = self.cfg.warm.min(self.cfg.max_idle);
        while self.idle.len() < target && started.elapsed() < budget {
            match Sandbox::fork_fresh(&self.kvm, &self.template, true) {
                Ok(sb) => {
                    self.idle.push(sb);
                    self.stats.live_vms += 1;
                }
                Err(_) => break,
            }
        }
        self.stats.pooled_vms = self.idle.len();
    }

    /// Fork + exec + release, with timings.
    pub fn exec(&mut self, req: &ExecRequest) -> ExecResult {
        let started = Instant::now();
        let mut sb = match self.acquire() {
            Ok((sb, _)) => sb,
            Err(e) => {
                return ExecResult {
                    exit_code: -1,
                    failure: Some(ExecFailure::Internal(format!("fork failed: {e}"))),
                    total_time: started.elapsed(),
                    ..Default::default()
                }
            }
        };
        let fork_time = started.elapsed();
        self.stats.forks += 1;
        let limits = self.cfg.limits;
        let mut result = self.run_in(&mut sb, ExecMode::Stateless, req, &limits);
        self.release(sb);
        result.fork_time = fork_time;
        result.total_time = started.elapsed();
        result
    }

    /// A sandbox for a new session: like a fork, but the caller keeps it
    /// (and gives it back with [`Pool::release`] when the session ends).
    pub fn open_session(&mut self) -> Result<Sandbox, SandboxError> {
        let (sb, _) = self.acquire()?;
        self.stats.forks += 1;
        Ok(sb)
    }

    /// One run in a session's sandbox, with this pool's limits and timer.
    pub fn run_session(
        &mut self,
        sb: &mut Sandbox,
        req: &ExecRequest,
        reseed: bool,
        limits: &Limits,
    ) -> ExecResult {
        let started = Instant::now();
        let mut result = self.run_in(sb, ExecMode::Session { reseed }, req, limits);
        result.total_time = started.elapsed();
        result
    }

    /// One run with this pool's timer, counted in its statistics.
    fn run_in(
        &mut self,
        sb: &mut Sandbox,
        mode: ExecMode,
        req: &ExecRequest,
        limits: &Limits,
    ) -> ExecResult {
        let template = self.template.clone();
        let result = match self.timer() {
            Ok(timer) => sb.exec_in(mode, &template, req, limits, timer),
            Err(e) => ExecResult {
                exit_code: -1,
                failure: Some(ExecFailure::Internal(e.to_string())),
                ..Default::default()
            },
        };
        match &result.failure {
            Some(ExecFailure::Timeout) => self.stats.timeouts += 1,
            Some(ExecFailure::GuestCrashed(_)) | Some(ExecFailure::BadResponse(_)) => {
                self.stats.guest_errors += 1
            }
            _ => {}
        }
        result
    }

    /// The state of a session's sandbox, for forks and rollback.
    pub fn checkpoint(&mut self, sb: &mut Sandbox) -> Result<Checkpoint, SandboxError> {
        let template = self.template.clone();
        sb.checkpoint(&self.kvm, &template)
    }

    /// A new sandbox holding `cp`'s state (a child of a live fork, or a
    /// session started from a checkpoint).
    pub fn sandbox_from(&mut self, cp: &Checkpoint) -> Result<Sandbox, SandboxError> {
        let (sb, _) = self.acquire_as(Some(cp))?;
        self.stats.forks += 1;
        Ok(sb)
    }

    /// Rolls a session's sandbox back to `cp` in place.
    pub fn restore(&mut self, sb: &mut Sandbox, cp: &Checkpoint) -> Result<(), SandboxError> {
        let template = self.template.clone();
        sb.restore(&template, cp)
    }

    /// Changes the warm reserve (raising the idle limit to match).
    pub fn set_warm(&mut self, warm: usize) {
        self.cfg.warm = warm;
        self.cfg.max_idle = self.cfg.max_idle.max(warm);
    }

    pub fn reset_totals(&self) -> ResetTotals {
        self.resets.clone()
    }

    pub fn stats(&self) -> LaneStats {
        self.stats.clone()
    }
}

/// A lane's pools, one per language, each created the first time its
/// language's template is seen ready in the registry.
pub struct PoolSet {
    registry: Arc<super::lane::TemplateRegistry>,
    cfg: PoolConfig,
    pools: Vec<(crate::api::Language, Pool)>,
}

impl PoolSet {
    pub fn new(registry: Arc<super::lane::TemplateRegistry>, cfg: PoolConfig) -> Self {
        PoolSet {
            registry,
            cfg,
            pools: Vec::new(),
        }
    }

    /// Whether the pool for `language` exists already.
    pub fn has(&self, language: crate::api::Language) -> bool {
        self.pools.iter().any(|(l, _)| *l == language)
    }

    /// The pool for `language`, created now if its template is ready.
    pub fn get(&mut self, language: crate::api::Language) -> Result<&mut Pool, ExecFailure> {
        if let Some(i) = self.pools.iter().position(|(l, _)| *l == language) {
            return Ok(&mut self.pools[i].1);
        }
        let template = self
            .registry
            .ready(language)
            .ok_or(ExecFailure::NoTemplate)?;
        let pool = Pool::new(template.clone(), self.cfg.clone()).map_err(|e| {
            ExecFailure::Internal(format!(
                "creating the {} sandbox pool: {e}",
                language.as_str()
            ))
        })?;
        self.pools.push((language, pool));
        Ok(&mut self.pools.last_mut().expect("just pushed").1)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Pool> {
        self.pools.iter().map(|(_, p)| p)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Pool> {
        self.pools.iter_mut().map(|(_, p)| p)
    }
}
