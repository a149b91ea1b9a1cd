//! Environment settings. Every variable is `KVMFORK_<NAME>`; the names from
//! before the rename (`FORKD_<NAME>`) are still read for one release, with a
//! deprecation warning on stderr the first time each is used.

use std::collections::HashSet;
use std::ffi::OsString;
use std::sync::Mutex;

/// Prefix of every environment variable kvmfork reads.
pub const PREFIX: &str = "KVMFORK_";
/// Deprecated prefix, read when the `KVMFORK_` variable is unset.
pub const LEGACY_PREFIX: &str = "FORKD_";

static WARNED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// `KVMFORK_<name>`, else the deprecated `FORKD_<name>` (warned once).
pub fn var_os(name: &str) -> Option<OsString> {
    lookup(name, |key| std::env::var_os(key), warn_once)
}

/// Like [`var_os`], as UTF-8 (a non-UTF-8 value counts as unset).
pub fn var(name: &str) -> Option<String> {
    var_os(name).and_then(|v| v.into_string().ok())
}

/// The full name of setting `name` (for messages and child processes).
pub fn full_name(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn lookup(
    name: &str,
    get: impl Fn(&str) -> Option<OsString>,
    warn: impl Fn(&str, &str),
) -> Option<OsString> {
    let current = format!("{PREFIX}{name}");
    if let Some(v) = get(&current) {
        return Some(v);
    }
    let legacy = format!("{LEGACY_PREFIX}{name}");
    let v = get(&legacy)?;
    warn(&legacy, &current);
    Some(v)
}

fn warn_once(legacy: &str, current: &str) {
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned
        .get_or_insert_with(HashSet::new)
        .insert(legacy.to_string())
    {
        eprintln!("kvmfork: warning: {legacy} is deprecated and will stop working in the next release; set {current} instead");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn the_new_name_wins_and_is_not_warned_about() {
        let warned = RefCell::new(Vec::new());
        let v = lookup(
            "CACHE_DIR",
            env(&[("KVMFORK_CACHE_DIR", "/new"), ("FORKD_CACHE_DIR", "/old")]),
            |l, _| warned.borrow_mut().push(l.to_string()),
        );
        assert_eq!(v.as_deref(), Some("/new".as_ref()));
        assert!(warned.borrow().is_empty());
    }

    #[test]
    fn the_legacy_name_is_read_with_a_warning() {
        let warned = RefCell::new(Vec::new());
        let v = lookup("CACHE_DIR", env(&[("FORKD_CACHE_DIR", "/old")]), |l, c| {
            warned.borrow_mut().push(format!("{l}->{c}"))
        });
        assert_eq!(v.as_deref(), Some("/old".as_ref()));
        assert_eq!(
            *warned.borrow(),
            vec!["FORKD_CACHE_DIR->KVMFORK_CACHE_DIR".to_string()]
        );
    }

    #[test]
    fn unset_is_none() {
        assert_eq!(
            lookup("CACHE_DIR", env(&[]), |_, _| panic!("no warning for unset")),
            None
        );
    }
}
