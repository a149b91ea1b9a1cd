//! Pieces both event loops share: the connection slab and the shutdown
//! sequence.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::config::ServeConfig;
use super::shard::Shared;
use super::workers::ConnKey;

use std::sync::atomic::Ordering;

/// Connection storage with generation-checked keys (a completion for a
/// closed connection must not reach the slot's next occupant).
pub struct Slab<T> {
    slots: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

/// Generations wrap inside 24 bits so that (kind, generation, index) fits
/// in an io_uring user_data word.
pub const GENERATION_MASK: u32 = 0x00ff_ffff;

impl<T> Slab<T> {
    pub fn insert_with(&mut self, make: impl FnOnce(ConnKey) -> T) -> ConnKey {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push((0, None));
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.0 = (slot.0 + 1) & GENERATION_MASK;
        let key = ConnKey {
            index,
            generation: slot.0,
        };
        slot.1 = Some(make(key));
        self.len += 1;
        key
    }

    pub fn get_mut(&mut self, key: ConnKey) -> Option<&mut T> {
        match self.slots.get_mut(key.index as usize) {
            Some((generation, Some(value))) if *generation == key.generation => Some(value),
            _ => None,
        }
    }

    pub fn remove(&mut self, key: ConnKey) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.0 != key.generation {
            return None;
        }
        let value = slot.1.take()?;
        self.free.push(key.index);
        self.len -= 1;
        Some(value)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn keys(&self) -> Vec<ConnKey> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, (_, value))| value.is_some())
            .map(|(i, (generation, _))| ConnKey {
                index: i as u32,
                generation: *generation,
            })
            .collect()
    }
}

/// What the shutdown sequence asks of the loop at this moment.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DrainStep {
    /// Stop accepting; close idle connections; answer the rest with `Connection: close`.
    pub begin: bool,
    /// The drain deadline passed: cancel running executions.
    pub cancel_execs: bool,
    /// Cancelled executions had their grace period: drop every connection.
    pub abort_connections: bool,
}

/// Tracks SIGTERM draining: drain, then cancel at the deadline, then abort.
#[derive(Default)]
pub struct Drain {
    started: Option<Instant>,
    cancelled: bool,
    aborted: bool,
}

/// After cancelling, how long cancelled executions get to report back
/// before their connections are dropped.
const ABORT_GRACE: Duration = Duration::from_secs(5);

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.started.is_some()
    }

    pub fn step(&mut self, shared: &Shared, now: Instant) -> DrainStep {
        let mut step = DrainStep::default();
        if self.started.is_none() {
            if !shared.shutdown.load(Ordering::Acquire) {
                return step;
            }
            self.started = Some(now);
            step.begin = true;
        }
        let started = self.started.unwrap_or(now);
        let force = shared.force.load(Ordering::Acquire);
        let deadline = started + shared.config.drain_timeout;
        if !self.cancelled && (force || now >= deadline) {
            self.cancelled = true;
            step.cancel_execs = true;
        }
        if self.cancelled && !self.aborted && (force || now >= deadline + ABORT_GRACE) {
            self.aborted = true;
            step.abort_connections = true;
        }
        step
    }
}

/// How often a loop checks timeouts: fine enough for the shortest one.
pub fn tick_interval(config: &ServeConfig) -> Duration {
    let shortest = config
        .idle_timeout
        .min(config.request_timeout)
        .min(config.send_timeout)
        .min(config.drain_timeout);
    (shortest / 4).clamp(Duration::from_millis(10), Duration::from_millis(500))
}

/// Answers a connection refused by the connection caps with `response`
/// and closes it, without ever blocking the event loop: a fresh socket's
/// send buffer takes a few hundred bytes at once. What the client already
/// sent is read first so that closing does not reset the connection
/// (which could discard the answer before the client reads it).
pub fn refuse_connection(mut stream: TcpStream, response: &[u8]) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = stream.read(&mut sink);
    let _ = stream.write(response);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_rejects_stale_keys() {
        let mut slab = Slab::default();
        let a = slab.insert_with(|_| "a");
        assert_eq!(slab.remove(a), Some("a"));
        let b = slab.insert_with(|_| "b");
        assert_eq!(a.index, b.index);
        assert_ne!(a.generation, b.generation);
        assert!(slab.get_mut(a).is_none());
        assert_eq!(slab.get_mut(b), Some(&mut "b"));
        assert_eq!(slab.keys(), vec![b]);
        assert!(!slab.is_empty());
    }
}
