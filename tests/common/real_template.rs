//! Access to the real Python template for end-to-end tests. The template is
//! built by `tests/run.sh` (`kvmfork template build`) before the tests run; a
//! missing template fails the test loudly, it never skips.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvmfork::api::{CancelToken, ExecRequest, ExecResult, Language};
use kvmfork::engine::pool::{Pool, PoolConfig};
use kvmfork::template::Template;

pub fn python_template() -> Arc<Template> {
    static T: OnceLock<Arc<Template>> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::env::var_os("KVMFORK_TEMPLATE")
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
            .or_else(|| kvmfork::template::find_cached(Language::Python))
            .unwrap_or_else(|| {
                panic!("no Python template: run `kvmfork template build` (tests/run.sh does) or set KVMFORK_TEMPLATE")
            });
        Arc::new(Template::load(&dir).unwrap_or_else(|e| panic!("loading template {}: {e}", dir.display())))
    })
    .clone()
}

pub fn pool() -> Pool {
    pool_with_limits(kvmfork::engine::sandbox::Limits::default())
}

/// A one-VM pool on the real template with these per-exec limits.
pub fn pool_with_limits(limits: kvmfork::engine::sandbox::Limits) -> Pool {
    Pool::new(
        python_template(),
        PoolConfig {
            max_idle: 1,
            prewarm: 1,
            warm: 0,
            limits,
            ..Default::default()
        },
    )
    .expect("pool on the real template")
}

pub fn py(code: &str, timeout: Duration) -> ExecRequest {
    ExecRequest {
        code: code.into(),
        language: Language::Python,
        timeout,
        cancel: CancelToken::new(),
    }
}

pub fn out(r: &ExecResult) -> String {
    String::from_utf8_lossy(&r.stdout).into_owned()
}

pub fn err(r: &ExecResult) -> String {
    String::from_utf8_lossy(&r.stderr).into_owned()
}
