//! Caps on open client connections, all shards together and per client
//! address, so that idle sockets cannot use up the descriptors the VMs
//! need. Checked on accept and released on close: a lock shared by the
//! shards is taken then, never on the request path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use super::auth::address_key;

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The server holds its maximum of connections.
    Total(usize),
    /// The client's address (IPv6: its /64) holds its maximum.
    Address(usize),
}

impl Refusal {
    pub fn message(self) -> String {
        match self {
            Refusal::Total(n) => {
                format!("the server holds its maximum of {n} connections; retry later")
            }
            Refusal::Address(n) => format!(
                "too many connections from this address (at most {n}); \
                 close idle ones or retry later"
            ),
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

pub struct ConnLimiter {
    total_cap: usize,
    per_address_cap: usize,
    counts: Mutex<Counts>,
}

impl ConnLimiter {
    pub fn new(total_cap: usize, per_address_cap: usize) -> Self {
        ConnLimiter {
            total_cap,
            per_address_cap,
            counts: Mutex::new(Counts::default()),
        }
    }

    pub fn total_cap(&self) -> usize {
        self.total_cap
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent whatever panicked while holding them.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a new connection from `addr`, or says why it is refused.
    pub fn try_open(&self, addr: IpAddr) -> Result<(), Refusal> {
        let key = address_key(addr);
        let mut counts = self.counts();
        if counts.total >= self.total_cap {
            return Err(Refusal::Total(self.total_cap));
        }
        let from_addr = counts.per_address.entry(key).or_default();
        if *from_addr >= self.per_address_cap {
            return Err(Refusal::Address(self.per_address_cap));
        }
        *from_addr += 1;
        counts.total += 1;
        Ok(())
    }

    /// A connection admitted by [`ConnLimiter::try_open`] closed.
    pub fn close(&self, addr: IpAddr) {
        let key = address_key(addr);
        let mut counts = self.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_address.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                counts.per_address.remove(&key);
            }
        }
    }

    #[cfg(test)]
    fn tracked_addresses(&self) -> usize {
        self.counts().per_address.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_total_and_per_address_and_forgets_closed_ones() {
        let limiter = ConnLimiter::new(5, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(limiter.try_open(a), Ok(()));
        assert_eq!(limiter.try_open(a), Ok(()));
        assert_eq!(limiter.try_open(a), Err(Refusal::Address(2)));
        // An IPv6 /64 is one address; v4-mapped is the v4 address.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(limiter.try_open(v6("2001:db8::1")), Ok(()));
        assert_eq!(limiter.try_open(v6("2001:db8::2")), Ok(()));
        assert_eq!(
            limiter.try_open(v6("2001:db8::3")),
            Err(Refusal::Address(2))
        );
        assert_eq!(
            limiter.try_open(v6("::ffff:192.0.2.1")),
            Err(Refusal::Address(2))
        );
        assert_eq!(limiter.try_open(b), Ok(()));
        assert_eq!(limiter.try_open(b), Err(Refusal::Total(5)));
        limiter.close(a);
        assert_eq!(limiter.try_open(b), Ok(()));
        for addr in [a, b, b, v6("2001:db8::1"), v6("2001:db8::9")] {
            limiter.close(addr);
        }
        assert_eq!(limiter.tracked_addresses(), 0);
        assert_eq!(limiter.try_open(a), Ok(()));
    }
}
