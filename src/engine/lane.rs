//! The engine as the HTTP server sees it: a [`LaneFactory`] over a registry
//! of per-language template slots, and lanes that route each request to the
//! pool of its language. A slot may still be building when the server starts
//! (`kvmfork serve` builds missing templates in the background); each lane
//! creates a language's pool the first time it sees that template ready.

use std::sync::Arc;

use super::pool::{PoolConfig, PoolSet};
use super::registry::{SlotState, TemplateSlots};
use super::session::{Directory, SessionConfig, SessionTable};
use crate::api::{
    ExecRequest, ExecResult, Lane, LaneFactory, LaneStats, Language, Owner, SessionInfo, SessionOp,
    SessionReply, TemplateAvailability,
};
use crate::template::Template;

/// Most time one tick spends making new VMs for a pool's warm reserve.
const HOUSEKEEPING_BUDGET: std::time::Duration = std::time::Duration::from_millis(50);

/// The shared, read-mostly set of template slots the engine serves.
pub type TemplateRegistry = TemplateSlots<Template>;

pub struct Engine {
    registry: Arc<TemplateRegistry>,
    cfg: PoolConfig,
    /// Set when the templates given to [`Engine::new`] cannot be served
    /// (unknown language, two for one language); lanes then refuse to start.
    invalid: Option<String>,
    sessions: Arc<SessionConfig>,
    directory: Arc<Directory>,
}

impl Engine {
    /// An engine over templates that are all loaded already.
    pub fn new(templates: Vec<Template>, cfg: PoolConfig) -> Engine {
        let mut langs = Vec::with_capacity(templates.len());
        let mut loaded = Vec::with_capacity(templates.len());
        let mut invalid = None;
        for t in templates {
            let Some(lang) = t.language() else {
                invalid.get_or_insert(format!(
                    "template {} has unknown language {}",
                    t.dir.display(),
                    t.meta.language
                ));
                continue;
            };
            if langs.contains(&lang) {
                invalid.get_or_insert(format!(
                    "two templates for language {} (the second is {})",
                    lang.as_str(),
                    t.dir.display()
                ));
                continue;
            }
            langs.push(lang);
            loaded.push((lang, Arc::new(t)));
        }
        let registry = TemplateRegistry::building(&langs);
        for (lang, t) in loaded {
            // Each language was pushed once into a fresh registry: cannot fail.
            let _ = registry.set_ready(lang, t);
        }
        Engine {
            registry: Arc::new(registry),
            cfg,
            invalid,
            sessions: Arc::new(SessionConfig::default()),
            directory: Arc::new(Directory::default()),
        }
    }

    /// An engine over `registry`, whose slots may still be building: their
    /// requests are refused until the slot is ready.
    pub fn with_registry(registry: Arc<TemplateRegistry>, cfg: PoolConfig) -> Engine {
        Engine {
            registry,
            cfg,
            invalid: None,
            sessions: Arc::new(SessionConfig::default()),
            directory: Arc::new(Directory::default()),
        }
    }

    /// Sets the sessions' limits and node name (before lanes are made).
    pub fn with_session_config(mut self, sessions: SessionConfig) -> Engine {
        self.sessions = Arc::new(sessions);
        self
    }
}

pub struct EngineLane {
    pools: PoolSet,
    sessions: SessionTable,
}

impl Lane for EngineLane {
    fn exec(&mut self, req: &ExecRequest) -> ExecResult {
        let started = std::time::Instant::now();
        let had_pool = self.pools.has(req.language);
        match self.pools.get(req.language) {
            Ok(pool) => {
                let mut result = pool.exec(req);
                if !had_pool {
                    // This request waited for the pool (and its pre-created
                    // VMs) to be made: that is part of its fork.
                    let creating = started.elapsed().saturating_sub(result.total_time);
                    result.fork_time += creating;
                    result.total_time += creating;
                }
                result
            }
            Err(failure) => ExecResult {
                exit_code: -1,
                failure: Some(failure),
                ..Default::default()
            },
        }
    }

    fn session(&mut self, op: SessionOp) -> SessionReply {
        self.sessions.handle(&mut self.pools, op)
    }

    fn tick(&mut self) {
        self.sessions.tick(&mut self.pools);
        // Bounded, so a request arriving now waits little.
        for pool in self.pools.iter_mut() {
            pool.housekeep(HOUSEKEEPING_BUDGET);
        }
    }

    fn stats(&self) -> LaneStats {
        let mut s = LaneStats::default();
        for p in self.pools.iter() {
            let p = p.stats();
            s.pooled_vms += p.pooled_vms;
            s.live_vms += p.live_vms;
            s.forks += p.forks;
            s.fresh_vm_forks += p.fresh_vm_forks;
            s.destroyed_vms += p.destroyed_vms;
            s.timeouts += p.timeouts;
            s.guest_errors += p.guest_errors;
        }
        (
            s.sessions,
            s.session_memory_bytes,
            s.checkpoints,
            s.checkpoint_bytes,
        ) = self.sessions.usage();
        s
    }
}

impl LaneFactory for Engine {
    fn new_lane(&self, shard: usize) -> Result<Box<dyn Lane>, String> {
        self.new_worker_lane(shard, 0)
    }

    fn new_worker_lane(&self, shard: usize, worker: usize) -> Result<Box<dyn Lane>, String> {
        if let Some(why) = &self.invalid {
            return Err(why.clone());
        }
        let mut pools = PoolSet::new(self.registry.clone(), self.cfg.clone());
        // Templates ready now get their pools (and pre-created VMs) up front;
        // the others when they become ready.
        for lang in self.registry.languages() {
            if self.registry.ready(lang).is_some() {
                pools
                    .get(lang)
                    .map_err(|f| crate::engine::describe_failure(&f))?;
            }
        }
        let sessions =
            SessionTable::new(shard, worker, self.sessions.clone(), self.directory.clone());
        Ok(Box::new(EngineLane { pools, sessions }))
    }

    fn list_sessions(&self, owner: Owner) -> Vec<SessionInfo> {
        self.directory.list(owner)
    }

    fn node_name(&self) -> String {
        self.sessions.node.clone()
    }

    fn languages(&self) -> Vec<Language> {
        self.registry.languages()
    }

    fn availability(&self, language: Language) -> TemplateAvailability {
        self.registry.state(language).availability()
    }

    fn templates(&self) -> serde_json::Map<String, serde_json::Value> {
        self.registry
            .languages()
            .into_iter()
            .filter_map(|lang| {
                let entry = match self.registry.state(lang) {
                    SlotState::Ready(t) => serde_json::json!({
                        "language": lang.as_str(),
                        "ready": true,
                        "state": "ready",
                        "dir": t.dir.display().to_string(),
                        "ram_bytes": t.meta.ram_size,
                        "snapshot_allocated_bytes": t.meta.memory.allocated_size,
                        "snapshot_nonzero_pages": t.meta.memory.nonzero_pages,
                        "host_kind": t.meta.host_kind.as_str(),
                        "boot_to_ready_seconds": t.meta.boot_to_ready_seconds,
                    }),
                    SlotState::Building(for_how_long) => serde_json::json!({
                        "language": lang.as_str(),
                        "ready": false,
                        "state": "building",
                        // null while it waits for an earlier language's build.
                        "building_seconds": for_how_long.map(|d| d.as_secs()),
                    }),
                    SlotState::Failed(why) => serde_json::json!({
                        "language": lang.as_str(),
                        "ready": false,
                        "state": "failed",
                        "error": why,
                    }),
                    SlotState::NotServed => return None,
                };
                Some((lang.as_str().to_string(), entry))
            })
            .collect()
    }
}
