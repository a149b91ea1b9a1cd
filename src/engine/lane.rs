//! The engine as the HTTP server sees it: a [`LaneFactory`] over the loaded
//! templates, and lanes that route each request to the pool of its language.

use std::sync::Arc;

use super::pool::{Pool, PoolConfig};
use crate::api::{ExecFailure, ExecRequest, ExecResult, Lane, LaneFactory, LaneStats, Language};
use crate::template::Template;

pub struct Engine {
    templates: Vec<Arc<Template>>,
    cfg: PoolConfig,
}

impl Engine {
    pub fn new(templates: Vec<Template>, cfg: PoolConfig) -> Engine {
        Engine {
            templates: templates.into_iter().map(Arc::new).collect(),
            cfg,
        }
    }
}

pub struct EngineLane {
    pools: Vec<(Language, Pool)>,
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
        s
    }
}

impl LaneFactory for Engine {
    fn new_lane(&self, _shard: usize) -> Result<Box<dyn Lane>, String> {
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
        Ok(Box::new(EngineLane { pools }))
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
