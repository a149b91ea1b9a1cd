//! API keys (Bearer tokens) and per-key rate limiting.
//!
//! Keys are compared as SHA-256 digests in constant time, so neither the
//! content nor the length of a stored key leaks through response timing.
//! Rate limits are one per key for the whole server, kept lock-free (one
//! atomic word per key that every shard updates by compare-and-swap).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading API keys file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing API keys file {path} (expected a JSON array of strings or {{\"key\", \"rate_limit\"?, \"rate_burst\"?}} objects): {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("API keys file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum KeyEntryIn {
    Plain(String),
    Detailed {
        key: String,
        rate_limit: Option<f64>,
        rate_burst: Option<f64>,
    },
}

/// Rate of a token bucket: `rate` tokens per second, at most `burst` stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub rate: f64,
    pub burst: f64,
}

struct KeyEntry {
    digest: [u8; 32],
    limit: RateLimit,
}

/// The loaded key set; index into it identifies a key in rate limiting.
pub struct ApiKeys {
    keys: Vec<KeyEntry>,
}

impl ApiKeys {
    /// Loads keys from `path`. A missing file means auth is off (`Ok(None)`);
    /// a file that exists but does not parse is an error.
    pub fn load(path: &Path, default_limit: RateLimit) -> Result<Option<ApiKeys>, AuthError> {
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(AuthError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        let entries: Vec<KeyEntryIn> =
            serde_json::from_slice(&text).map_err(|source| AuthError::Parse {
                path: path.into(),
                source,
            })?;
        let invalid = |reason: &str| AuthError::Invalid {
            path: path.into(),
            reason: reason.into(),
        };
        if entries.is_empty() {
            return Err(invalid(
                "the key list is empty; remove the file to turn auth off",
            ));
        }
        let mut keys = Vec::with_capacity(entries.len());
        for (index, entry) in entries.into_iter().enumerate() {
            let (key, rate, burst) = match entry {
                KeyEntryIn::Plain(key) => (key, None, None),
                KeyEntryIn::Detailed {
                    key,
                    rate_limit,
                    rate_burst,
                } => (key, rate_limit, rate_burst),
            };
            // Entries are named by position: the key itself is a secret.
            if key.trim().is_empty() || key.trim() != key {
                return Err(invalid(&format!(
                    "entry {index}: keys must be non-empty and have no surrounding whitespace"
                )));
            }
            let rate = rate.unwrap_or(default_limit.rate);
            let burst = burst.unwrap_or(if rate == default_limit.rate {
                default_limit.burst
            } else {
                rate.max(1.0)
            });
            if !(rate.is_finite() && rate >= 0.0) {
                return Err(invalid(&format!(
                    "entry {index}: rate_limit must be a finite number > 0 (requests per second) \
                     or 0 (unlimited), got {rate}"
                )));
            }
            if !(burst.is_finite() && burst >= 1.0) {
                return Err(invalid(&format!(
                    "entry {index}: rate_burst must be a finite number >= 1, got {burst}"
                )));
            }
            keys.push(KeyEntry {
                digest: Sha256::digest(key.as_bytes()).into(),
                limit: RateLimit { rate, burst },
            });
        }
        Ok(Some(ApiKeys { keys }))
    }

    #[allow(clippy::len_without_is_empty)] // a loaded key set is never empty
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Index of the key equal to `token`. Every stored key is compared, with
    /// no early exit, so the time taken does not depend on which one matched.
    pub fn lookup(&self, token: &[u8]) -> Option<usize> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        let mut found = u32::MAX;
        for (i, key) in self.keys.iter().enumerate() {
            found.conditional_assign(&(i as u32), key.digest.ct_eq(&digest));
        }
        (found != u32::MAX).then_some(found as usize)
    }

    pub fn limit(&self, index: usize) -> RateLimit {
        self.keys[index].limit
    }
}

/// Whole seconds for a `Retry-After` header: `wait` rounded up, at least 1.
/// Integer arithmetic only, so no wait (up to `Duration::MAX`) can panic.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let round_up = u64::from(wait.subsec_nanos() > 0);
    wait.as_secs().saturating_add(round_up).max(1)
}

/// Longest interval between two requests a rate can ask for (100 years):
/// a tiny rate behaves as "one per century" and the arithmetic stays in
/// range (a burst of more than 5 at such a rate is cut to what fits the
/// 584 years a u64 of nanoseconds holds).
const MAX_INTERVAL_NS: u128 = 100 * 365 * 24 * 3600 * 1_000_000_000;

/// Each key's rate limit, one for the whole server: every shard checks the
/// same per-key state, a single atomic word updated by compare-and-swap
/// (no lock, and no cost to other keys). The algorithm is GCRA, the token
/// bucket written as a "theoretical arrival time": each admitted request
/// moves it one interval (1 / rate) later; a request is admitted while it
/// is at most `burst` intervals ahead of now.
pub struct RateLimiter {
    limits: Vec<RateLimit>,
    /// Per key: the theoretical arrival time, in ns since `epoch`.
    tat: Vec<AtomicU64>,
    epoch: Instant,
}

impl RateLimiter {
    pub fn new(keys: Option<&ApiKeys>) -> Self {
        let limits: Vec<RateLimit> = keys
            .map(|k| (0..k.len()).map(|i| k.limit(i)).collect())
            .unwrap_or_default();
        RateLimiter {
            tat: limits.iter().map(|_| AtomicU64::new(0)).collect(),
            limits,
            epoch: Instant::now(),
        }
    }

    /// Takes one request's worth of `key`'s rate; on refusal returns how
    /// long until one is available. A rate of 0 disables limiting.
    pub fn try_acquire(&self, key: usize, now: Instant) -> Result<(), Duration> {
        let limit = self.limits[key];
        if limit.rate <= 0.0 {
            return Ok(());
        }
        // `as` saturates: a tiny rate gives the longest interval.
        let interval = ((1e9 / limit.rate) as u128).clamp(1, MAX_INTERVAL_NS);
        let allowance = (limit.burst * interval as f64) as u128;
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos();
        let cell = &self.tat[key];
        let mut tat = cell.load(Ordering::Relaxed);
        loop {
            let next = u128::from(tat).max(now_ns) + interval;
            let ahead = next - now_ns;
            if ahead > allowance {
                let wait = u64::try_from(ahead - allowance).unwrap_or(u64::MAX);
                return Err(Duration::from_nanos(wait));
            }
            let Ok(next) = u64::try_from(next) else {
                return Err(Duration::MAX);
            };
            match cell.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

/// Client addresses the throttle has room for (slots of its table; two
/// addresses that hash to one slot share it, the later replacing the
/// earlier, like eviction from a full map).
pub const THROTTLE_TRACKED_ADDRESSES: usize = 4096;

/// Time in the throttle's slots: 10 ms ticks since the throttle was made,
/// kept in [`TICK_BITS`] bits (wrapping after ~31 days; ages are computed
/// modulo that, and windows are capped well below it).
const TICK: Duration = Duration::from_millis(10);
const TICK_BITS: u32 = 28;
const TICK_MASK: u64 = (1 << TICK_BITS) - 1;
const COUNT_BITS: u32 = 16;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// Bits of an address's hash kept in its slot to tell addresses apart.
const TAG_BITS: u32 = 64 - TICK_BITS - COUNT_BITS;

/// The node's throttle of failed authentications per client address (IPv6
/// by /64, since one host holds a whole /64), shared by every shard. After
/// `limit` failures within `window` of the first, the address is refused
/// for `window` without its key being checked, whichever shard its
/// connections land on. A success does not clear the count, so a tenant
/// with a valid key cannot interleave it to keep guessing others'.
///
/// Lock-free: a fixed table of one atomic word per slot (hash tag, window
/// start, count), updated by compare-and-swap; the slot is picked by a
/// keyed hash of the address, so a client cannot choose whose slot it
/// lands in.
pub struct AuthThrottle {
    limit: u64,
    /// In ticks.
    window: u64,
    slots: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
    epoch: Instant,
}

/// The unit an address is throttled and its connections counted by.
pub(crate) fn address_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

/// A slot's word: `tag | since (ticks) | count`; 0 is empty.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Slot {
    tag: u64,
    since: u64,
    count: u64,
}

impl Slot {
    fn unpack(word: u64) -> Self {
        Slot {
            tag: word >> (TICK_BITS + COUNT_BITS),
            since: (word >> COUNT_BITS) & TICK_MASK,
            count: word & COUNT_MASK,
        }
    }

    fn pack(self) -> u64 {
        (self.tag << (TICK_BITS + COUNT_BITS))
            | ((self.since & TICK_MASK) << COUNT_BITS)
            | self.count
    }
}

impl AuthThrottle {
    /// `limit` 0 turns the throttle off; `slots` is rounded up to a power
    /// of two.
    pub fn new(limit: u32, window: Duration, slots: usize) -> Self {
        let window = (window.as_nanos() / TICK.as_nanos()).max(1) as u64;
        AuthThrottle {
            limit: u64::from(limit).min(COUNT_MASK),
            // Far below the wrap, so a live window is never mistaken.
            window: window.min(TICK_MASK / 4),
            slots: (0..slots.max(1).next_power_of_two())
                .map(|_| AtomicU64::new(0))
                .collect(),
            hasher: Default::default(),
            epoch: Instant::now(),
        }
    }

    fn ticks(&self, now: Instant) -> u64 {
        let t = now.saturating_duration_since(self.epoch).as_nanos() / TICK.as_nanos();
        (t as u64) & TICK_MASK
    }

    /// The slot for `addr` and the tag that marks it as `addr`'s (never 0,
    /// so an empty slot matches no address).
    fn slot(&self, addr: IpAddr) -> (&AtomicU64, u64) {
        use std::hash::BuildHasher;
        let hash = self.hasher.hash_one(address_key(addr));
        let index = (hash as usize) & (self.slots.len() - 1);
        let tag = (hash >> (64 - TAG_BITS)).max(1);
        (&self.slots[index], tag)
    }

    fn age(&self, slot: Slot, now: u64) -> u64 {
        now.wrapping_sub(slot.since) & TICK_MASK
    }

    #[cfg(test)]
    fn tracked(&self, now: Instant) -> usize {
        let now = self.ticks(now);
        self.slots
            .iter()
            .map(|w| Slot::unpack(w.load(Ordering::Relaxed)))
            .filter(|s| s.tag != 0 && self.age(*s, now) < self.window)
            .count()
    }

    /// `Err(how long)` while `addr` is throttled.
    pub fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.limit == 0 {
            return Ok(());
        }
        let (word, tag) = self.slot(addr);
        let slot = Slot::unpack(word.load(Ordering::Relaxed));
        let age = self.age(slot, self.ticks(now));
        if slot.tag == tag && age < self.window && slot.count >= self.limit {
            return Err(TICK * (self.window - age) as u32);
        }
        Ok(())
    }

    /// Counts a failed authentication from `addr`.
    pub fn record_failure(&self, addr: IpAddr, now: Instant) {
        if self.limit == 0 {
            return;
        }
        let (word, tag) = self.slot(addr);
        let now = self.ticks(now);
        let mut current = word.load(Ordering::Relaxed);
        loop {
            let slot = Slot::unpack(current);
            let next = if slot.tag != tag || self.age(slot, now) >= self.window {
                // A new window (replacing whatever address held the slot).
                Slot {
                    tag,
                    since: now,
                    count: 1,
                }
            } else if slot.count >= self.limit {
                return; // Already blocked: retries do not extend the block.
            } else {
                Slot {
                    count: slot.count + 1,
                    ..slot
                }
            };
            // The block lasts a whole window from the failure that caused it.
            let next = if next.count == self.limit {
                Slot { since: now, ..next }
            } else {
                next
            };
            match word.compare_exchange_weak(
                current,
                next.pack(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(seen) => current = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: RateLimit = RateLimit {
        rate: 100.0,
        burst: 100.0,
    };

    fn write_keys(text: &str) -> (tempfile_path::TempPath, Result<Option<ApiKeys>, AuthError>) {
        let path = tempfile_path::TempPath::new(text);
        let keys = ApiKeys::load(path.path(), DEFAULT);
        (path, keys)
    }

    /// A file in the temp dir removed on drop (no extra crate for one test).
    mod tempfile_path {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicUsize, Ordering};
        pub struct TempPath(PathBuf);
        impl TempPath {
            pub fn new(text: &str) -> Self {
                static N: AtomicUsize = AtomicUsize::new(0);
                let path = std::env::temp_dir().join(format!(
                    "kvmfork-keys-{}-{}.json",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::write(&path, text).unwrap();
                TempPath(path)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn loads_strings_and_objects() {
        let (_p, keys) = write_keys(r#"["alpha", {"key": "beta", "rate_limit": 5}]"#);
        let keys = keys.unwrap().unwrap();
        assert_eq!(keys.lookup(b"alpha"), Some(0));
        assert_eq!(keys.lookup(b"beta"), Some(1));
        assert_eq!(keys.lookup(b"alph"), None);
        assert_eq!(keys.lookup(b""), None);
        assert_eq!(
            keys.limit(1),
            RateLimit {
                rate: 5.0,
                burst: 5.0
            }
        );
        assert_eq!(keys.limit(0), DEFAULT);
    }

    #[test]
    fn missing_file_turns_auth_off_but_bad_file_is_an_error() {
        let missing = ApiKeys::load(Path::new("/nonexistent/kvmfork-keys.json"), DEFAULT).unwrap();
        assert!(missing.is_none());
        assert!(matches!(
            write_keys("{\"a\":1}").1,
            Err(AuthError::Parse { .. })
        ));
        assert!(matches!(write_keys("[]").1, Err(AuthError::Invalid { .. })));
        assert!(matches!(
            write_keys("[\" a\"]").1,
            Err(AuthError::Invalid { .. })
        ));
    }

    #[test]
    fn bad_rates_are_refused_naming_the_entry() {
        for (text, needle) in [
            (
                r#"["a", {"key": "b", "rate_limit": -1}]"#,
                "entry 1: rate_limit",
            ),
            (
                r#"[{"key": "b", "rate_limit": 1, "rate_burst": 0.5}]"#,
                "entry 0: rate_burst",
            ),
            (r#"["a", "b", " c"]"#, "entry 2: keys must"),
        ] {
            let err = write_keys(text).1.err().expect(text).to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        // 0 still means unlimited.
        let (_p, keys) = write_keys(r#"[{"key": "k", "rate_limit": 0}]"#);
        let limiter = RateLimiter::new(Some(&keys.unwrap().unwrap()));
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(limiter.try_acquire(0, t0).is_ok());
        }
    }

    #[test]
    fn tiny_rates_saturate_the_wait_instead_of_panicking() {
        for rate in ["1e-320", "5e-324", "1e-300", "1e-19"] {
            let text = format!(r#"[{{"key": "k", "rate_limit": {rate}}}]"#);
            let (_p, keys) = write_keys(&text);
            let keys = keys.unwrap().unwrap();
            let limiter = RateLimiter::new(Some(&keys));
            let t0 = Instant::now();
            assert!(limiter.try_acquire(0, t0).is_ok(), "{rate}: the burst");
            let wait = limiter.try_acquire(0, t0).unwrap_err();
            assert!(wait > Duration::from_secs(1 << 30), "{rate}: {wait:?}");
            assert!(retry_after_secs(wait) >= 1 << 30);
        }
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn failed_auths_throttle_the_address_for_a_window() {
        let window = Duration::from_secs(60);
        let t = AuthThrottle::new(3, window, 16);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(t.check(a, t0).is_ok(), "failure {i} not yet throttled");
            t.record_failure(a, t0 + Duration::from_secs(i));
        }
        let wait = t.check(a, t0 + Duration::from_secs(2)).unwrap_err();
        assert_eq!(wait, window, "a window from the third failure");
        assert!(t.check(b, t0).is_ok(), "other addresses are unaffected");
        // Refused retries do not extend the block.
        t.record_failure(a, t0 + Duration::from_secs(30));
        assert_eq!(
            t.check(a, t0 + Duration::from_secs(30)).unwrap_err(),
            Duration::from_secs(32)
        );
        assert!(t.check(a, t0 + Duration::from_secs(62)).is_ok());
        assert_eq!(
            t.tracked(t0 + Duration::from_secs(62)),
            0,
            "an expired entry counts for nothing"
        );
        // Failures spread over more than a window never throttle.
        for i in 0..10 {
            t.record_failure(b, t0 + window * i);
            assert!(t.check(b, t0 + window * i).is_ok());
        }
        // An IPv6 /64 counts as one address; v4-mapped is the v4 address.
        for host in ["2001:db8::1", "2001:db8::2", "2001:db8::ffff:1"] {
            t.record_failure(host.parse().unwrap(), t0);
        }
        assert!(t.check("2001:db8::9".parse().unwrap(), t0).is_err());
        assert!(t.check("2001:db8:0:1::1".parse().unwrap(), t0).is_ok());
        let t = AuthThrottle::new(1, window, 16);
        t.record_failure("::ffff:192.0.2.7".parse().unwrap(), t0);
        assert!(t.check("192.0.2.7".parse().unwrap(), t0).is_err());
        // Limit 0: off.
        let off = AuthThrottle::new(0, window, 16);
        for _ in 0..100 {
            off.record_failure(a, t0);
        }
        assert!(off.check(a, t0).is_ok());
    }

    #[test]
    fn the_throttle_keeps_a_bounded_number_of_addresses() {
        let t = AuthThrottle::new(1, Duration::from_secs(60), 4);
        assert_eq!(t.slots.len(), 4, "fixed memory");
        let t0 = Instant::now();
        for i in 0..100u32 {
            t.record_failure(IpAddr::from(i.to_be_bytes()), t0);
            assert!(t.tracked(t0) <= 4);
            // The newest is always kept (it replaced whoever had its slot).
            assert!(t.check(IpAddr::from(i.to_be_bytes()), t0).is_err());
        }
        let blocked = (0..100u32)
            .filter(|i| t.check(IpAddr::from(i.to_be_bytes()), t0).is_err())
            .count();
        assert!((1..=4).contains(&blocked), "{blocked}");
    }

    /// The shards share one throttle: failures recorded from several
    /// threads at once all count, and the block is seen by every thread.
    /// (Before, each shard kept its own map: an address got `limit x
    /// shards` guesses.)
    #[test]
    fn failures_from_every_shard_count_once_for_the_node() {
        let t = std::sync::Arc::new(AuthThrottle::new(400, Duration::from_secs(60), 64));
        let addr: IpAddr = "198.51.100.4".parse().unwrap();
        let t0 = Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for _ in 0..99 {
                        assert!(t.check(addr, t0).is_ok());
                        t.record_failure(addr, t0);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // 396 of 400: not yet.
        assert!(t.check(addr, t0).is_ok());
        for _ in 0..4 {
            t.record_failure(addr, t0);
        }
        assert!(t.check(addr, t0).is_err());
        let seen = std::thread::spawn({
            let t = t.clone();
            move || t.check(addr, t0).is_err()
        });
        assert!(seen.join().unwrap());
    }

    #[test]
    fn slot_words_round_trip() {
        let s = Slot {
            tag: (1 << TAG_BITS) - 1,
            since: TICK_MASK,
            count: COUNT_MASK,
        };
        assert_eq!(Slot::unpack(s.pack()), s);
        let s = Slot {
            tag: 1,
            since: 12345,
            count: 7,
        };
        assert_eq!(Slot::unpack(s.pack()), s);
    }

    #[test]
    fn one_rate_per_key_holds_across_threads() {
        let (_p, keys) =
            write_keys(r#"[{"key": "k", "rate_limit": 0.001, "rate_burst": 50}, "free"]"#);
        let limiter = RateLimiter::new(Some(&keys.unwrap().unwrap()));
        let t0 = Instant::now();
        let admitted = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if limiter.try_acquire(0, t0).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = limiter.try_acquire(1, t0);
                    }
                });
            }
        });
        // The burst, once, however many threads (shards) share the key.
        assert_eq!(admitted.load(Ordering::Relaxed), 50);
    }

    #[test]
    fn token_bucket_refills_at_the_rate() {
        let (_p, keys) = write_keys(r#"[{"key": "k", "rate_limit": 2, "rate_burst": 2}]"#);
        let keys = keys.unwrap().unwrap();
        let limiter = RateLimiter::new(Some(&keys));
        let t0 = Instant::now();
        assert!(limiter.try_acquire(0, t0).is_ok());
        assert!(limiter.try_acquire(0, t0).is_ok());
        let wait = limiter.try_acquire(0, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(limiter
            .try_acquire(0, t0 + Duration::from_millis(500))
            .is_ok());
        assert!(limiter
            .try_acquire(0, t0 + Duration::from_millis(500))
            .is_err());
    }
}
