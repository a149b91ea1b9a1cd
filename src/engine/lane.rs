//! The engine as the HTTP server sees it: a [`LaneFactory`] over the loaded
//! templates, and lanes that route each request to the pool of its language.

use std::sync::Arc;

use super::pool::{Pool, PoolConfig};
use super::session::{Directory, SessionConfig, SessionTable};
use crate::api::{
    ExecFailure, ExecRequest, ExecResult, Lane, LaneFactory, LaneStats, Language, Owner,
    SessionInfo, SessionOp, SessionReply,
};
use crate::template::Template;

pub struct Engine {
    templates: Vec<Arc<Template>>,
    cfg: PoolConfig,
    sessions: Arc<SessionConfig>,
    directory: Arc<Directory>,
}

impl Engine {
    pub fn new(templates: Vec<Template>, cfg: PoolConfig) -> Engine {
        Self::with_sessions(templates, cfg, SessionConfig::default())
    }

    pub fn with_sessions(
        templates: Vec<Template>,
        cfg: PoolConfig,
        sessions: SessionConfig,
    ) -> Engine {
        Engine {
            templates: templates.into_iter().map(Arc::new).collect(),
            cfg,
            sessions: Arc::new(sessions),
            directory: Arc::new(Directory::default()),
        }
    }
}

pub struct EngineLane {
    pools: Vec<(Language, Pool)>,
    sessions: SessionTable,
}

impl Lane for EngineLane {
    fn exec(&mut self, req: &ExecRequest) -> ExecResult {
        match self.pools.iter_mut().find(|(l, _)| *l == req.language) {
            Some((_, pool)) => pool.exec(req),
            None => ExecResult {
                exit_code: -1,
                failure: Some(ExecFailure::NoTemplate),
                ..Default::default()
            },
        }
    }

    fn session(&mut self, op: SessionOp) -> SessionReply {
        self.sessions.handle(&mut self.pools, op)
    }

    fn tick(&mut self) {
        self.sessions.tick(&mut self.pools);
    }

    fn stats(&self) -> LaneStats {
        let mut s = LaneStats::default();
        for (_, p) in &self.pools {
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
        let mut pools = Vec::new();
        for t in &self.templates {
            let lang = t.language().ok_or_else(|| {
                format!(
                    "template {} has unknown language {}",
                    t.dir.display(),
                    t.meta.language
                )
            })?;
            pools.push((
                lang,
                Pool::new(t.clone(), self.cfg.clone()).map_err(|e| e.to_string())?,
            ));
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
        self.templates.iter().filter_map(|t| t.language()).collect()
    }

    fn templates(&self) -> Vec<serde_json::Value> {
        self.templates
            .iter()
            .map(|t| {
                serde_json::json!({
                    "language": t.meta.language,
                    "ready": true,
                    "dir": t.dir.display().to_string(),
                    "ram_bytes": t.meta.ram_size,
                    "snapshot_allocated_bytes": t.meta.memory.allocated_size,
                    "snapshot_nonzero_pages": t.meta.memory.nonzero_pages,
                    "host_kind": t.meta.host_kind.as_str(),
                    "boot_to_ready_seconds": t.meta.boot_to_ready_seconds,
                })
            })
            .collect()
    }
}
