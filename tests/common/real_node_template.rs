//! Access to the real Node.js template for end-to-end tests. The template is
//! built by `tests/run.sh` (`kvmfork template build --language node`) before
//! the tests run; a missing template fails the test loudly, it never skips.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvmfork::api::{CancelToken, ExecRequest, Language};
use kvmfork::engine::pool::{Pool, PoolConfig};
use kvmfork::template::Template;

pub fn node_template() -> Arc<Template> {
    static T: OnceLock<Arc<Template>> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::env::var_os("KVMFORK_NODE_TEMPLATE")
            .map(std::path::PathBuf::from)
            .or_else(|| kvmfork::template::find_cached(Language::Node))
            .unwrap_or_else(|| {
                panic!(
                    "no Node template: run `kvmfork template build --language node` (tests/run.sh does) or set KVMFORK_NODE_TEMPLATE"
                )
            });
        let t = Template::load(&dir).unwrap_or_else(|e| panic!("loading template {}: {e}", dir.display()));
        assert_eq!(t.language(), Some(Language::Node), "{} is not a Node template", dir.display());
        Arc::new(t)
    })
    .clone()
}

pub fn node_pool() -> Pool {
    Pool::new(
        node_template(),
        PoolConfig {
            max_idle: 1,
            prewarm: 1,
            warm: 0,
            ..Default::default()
        },
    )
    .expect("pool on the real Node template")
}

pub fn js(code: &str, timeout: Duration) -> ExecRequest {
    ExecRequest {
        code: code.into(),
        language: Language::Node,
        timeout,
        cancel: CancelToken::new(),
    }
}
