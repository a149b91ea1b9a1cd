//! Fair scheduling of one shard's work across API keys, by worker time.
//!
//! Everything a shard's workers run waits here: stateless execs (any worker
//! may take them) and session operations (pinned to the worker whose lane
//! holds the session), one queue per key. A free worker takes, among the
//! keys with a job it may run, the key that used the least worker time
//! recently: its runs in progress so far plus its finished runs' time,
//! halved every [`USAGE_HALF_LIFE`] (ties: the oldest waiting job first).
//! A key whose long runs held the workers therefore goes after a key that
//! only ran `print(1)`, however few execs each sent.
//!
//! Runs are not preempted, so time shares alone cannot help a key that
//! arrives while another holds every worker. Hence a reserve: while another
//! key is active anywhere on the node (see [`KeyActivity`]: a stateless
//! exec queued or running on any shard, or one finished within [`RECENT`])
//! or waits for this very worker, no key may take the last free worker of
//! a shard (when it has two or more) for a stateless exec; one stays free
//! for the others. A key alone on the node may use them all. Session
//! operations are exempt: they can run only on their session's worker.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::workers::Job;
use crate::api::Owner;

/// Finished run time counts half after this long.
pub const USAGE_HALF_LIFE: Duration = Duration::from_secs(5);
/// A key counts as active for the reserve this long after its last job.
pub const RECENT: Duration = Duration::from_secs(10);

/// Node-wide (shared by every shard's queue, lock-free): each key's
/// stateless execs queued or running on any shard, and when it last pushed
/// or finished one. The reserve looks here, so a key busy on one shard
/// keeps a worker free for it on the others, where its next connection may
/// land. Session operations are not counted: they cannot use another
/// worker.
pub struct KeyActivity {
    /// Ticks are milliseconds since this instant (an hour before creation,
    /// so instants a little older than the record still count).
    epoch: Instant,
    /// By owner: slot 0 is the unauthenticated owner, key `k` is `k + 1`.
    slots: Vec<Slot>,
}

#[derive(Default)]
struct Slot {
    jobs: AtomicUsize,
    /// 0: never active.
    last_tick: AtomicU64,
}

impl KeyActivity {
    /// A record for `keys` API keys (plus the unauthenticated owner).
    pub fn new(keys: usize) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(KeyActivity {
            epoch: now.checked_sub(Duration::from_secs(3600)).unwrap_or(now),
            slots: (0..=keys).map(|_| Slot::default()).collect(),
        })
    }

    fn slot(&self, owner: Owner) -> Option<&Slot> {
        self.slots.get(owner.map_or(0, |k| k + 1))
    }

    fn tick(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    fn touch(&self, slot: &Slot, now: Instant) {
        slot.last_tick.fetch_max(self.tick(now), Ordering::Relaxed);
    }

    /// A stateless exec of `owner` was queued.
    fn queued(&self, owner: Owner, now: Instant) {
        if let Some(slot) = self.slot(owner) {
            slot.jobs.fetch_add(1, Ordering::Relaxed);
            self.touch(slot, now);
        }
    }

    /// A stateless exec of `owner` finished (or left the queue unrun).
    fn done(&self, owner: Owner, now: Instant) {
        if let Some(slot) = self.slot(owner) {
            // Never below 0, whatever the order of updates.
            let _ = slot
                .jobs
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            self.touch(slot, now);
        }
    }

    /// Whether a key other than `owner` has stateless execs queued or
    /// running on the node, or finished one within [`RECENT`].
    fn others_active(&self, owner: Owner, now: Instant) -> bool {
        let own = owner.map_or(0, |k| k + 1);
        let recent = self.tick(now).saturating_sub(RECENT.as_millis() as u64);
        self.slots.iter().enumerate().any(|(i, slot)| {
            i != own
                && (slot.jobs.load(Ordering::Relaxed) > 0
                    || slot.last_tick.load(Ordering::Relaxed) > recent)
        })
    }
}

struct Waiting {
    arrival: u64,
    /// The one worker that may run it (a session's), or any.
    worker: Option<usize>,
    job: Job,
}

struct KeyState {
    waiting: VecDeque<Waiting>,
    /// Finished run time, decayed to `stamp`, in seconds.
    used: f64,
    stamp: Instant,
    /// Last push or finish.
    last_active: Instant,
}

impl KeyState {
    fn new(now: Instant) -> Self {
        KeyState {
            waiting: VecDeque::new(),
            used: 0.0,
            stamp: now,
            last_active: now,
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.used * 0.5f64.powf(dt / USAGE_HALF_LIFE.as_secs_f64())
    }

    /// The first waiting job `worker` may run (`pinned_only`: only one
    /// pinned to it).
    fn eligible(&self, worker: usize, pinned_only: bool) -> Option<usize> {
        self.waiting.iter().position(|w| match w.worker {
            Some(pin) => pin == worker,
            None => !pinned_only,
        })
    }
}

pub struct FairQueue {
    keys: HashMap<Owner, KeyState>,
    /// What each worker runs: its key, since when, and whether it is a
    /// stateless exec (counted in `activity`).
    busy: Vec<Option<(Owner, Instant, bool)>>,
    activity: Arc<KeyActivity>,
    /// Waiting jobs any worker may take.
    waiting_any: usize,
    /// Waiting jobs pinned to each worker.
    waiting_pinned: Vec<usize>,
    arrivals: u64,
}

impl FairQueue {
    pub fn new(workers: usize, activity: Arc<KeyActivity>) -> Self {
        FairQueue {
            keys: HashMap::new(),
            busy: vec![None; workers],
            activity,
            waiting_any: 0,
            waiting_pinned: vec![0; workers],
            arrivals: 0,
        }
    }

    pub fn workers(&self) -> usize {
        self.busy.len()
    }

    /// Waiting jobs any worker may take.
    pub fn waiting_any(&self) -> usize {
        self.waiting_any
    }

    /// Waiting jobs pinned to `worker`.
    pub fn waiting_pinned(&self, worker: usize) -> usize {
        self.waiting_pinned[worker]
    }

    /// Queues `job` of `owner`, for `worker` only or (None) any worker.
    pub fn push(&mut self, owner: Owner, worker: Option<usize>, job: Job, now: Instant) {
        self.arrivals += 1;
        match worker {
            Some(w) => self.waiting_pinned[w] += 1,
            None => {
                self.waiting_any += 1;
                self.activity.queued(owner, now);
            }
        }
        let key = self.keys.entry(owner).or_insert_with(|| KeyState::new(now));
        key.last_active = now;
        key.waiting.push_back(Waiting {
            arrival: self.arrivals,
            worker,
            job,
        });
    }

    /// `owner`'s recent worker time: finished runs (decayed) plus runs in
    /// progress so far; and how many workers it holds.
    fn usage(&self, owner: Owner, key: &KeyState, now: Instant) -> (f64, usize) {
        let mut used = key.decayed(now);
        let mut held = 0;
        for (o, since, _) in self.busy.iter().flatten() {
            if *o == owner {
                used += now.saturating_duration_since(*since).as_secs_f64();
                held += 1;
            }
        }
        (used, held)
    }

    /// Whether a key other than `owner` could use free worker `worker`:
    /// active on the node ([`KeyActivity`]), or with a session job waiting
    /// for this worker. Jobs pinned to other workers do not count: they
    /// cannot run here.
    fn others_active(&self, owner: Owner, worker: usize, now: Instant) -> bool {
        self.activity.others_active(owner, now)
            || self
                .keys
                .iter()
                .any(|(o, k)| *o != owner && k.waiting.iter().any(|w| w.worker == Some(worker)))
    }

    /// The next job for free worker `worker`, which then counts as running
    /// for its key until [`FairQueue::finished`]. `draining`: the reserve
    /// is off (everything left must run).
    pub fn pop(&mut self, worker: usize, now: Instant, draining: bool) -> Option<Job> {
        debug_assert!(self.busy[worker].is_none(), "worker {worker} is busy");
        let workers = self.busy.len();
        let mut best: Option<(Owner, usize, (f64, u64))> = None;
        for (owner, key) in &self.keys {
            if key.eligible(worker, false).is_none() {
                continue;
            }
            let (used, held) = self.usage(*owner, key, now);
            // The reserve: not the last free worker, unless for a job that
            // can run nowhere else.
            let reserved = !draining
                && workers >= 2
                && held + 1 >= workers
                && self.others_active(*owner, worker, now);
            let Some(index) = key.eligible(worker, reserved) else {
                continue;
            };
            let rank = (used, key.waiting[index].arrival);
            let better = match &best {
                None => true,
                Some((_, _, b)) => rank.0.total_cmp(&b.0).then(rank.1.cmp(&b.1)).is_lt(),
            };
            if better {
                best = Some((*owner, index, rank));
            }
        }
        let (owner, index, _) = best?;
        let key = self.keys.get_mut(&owner).expect("chosen above");
        let waiting = key.waiting.remove(index).expect("index is in range");
        match waiting.worker {
            Some(w) => self.waiting_pinned[w] -= 1,
            None => self.waiting_any -= 1,
        }
        self.busy[worker] = Some((owner, now, waiting.worker.is_none()));
        Some(waiting.job)
    }

    /// Worker `worker`'s run ended: its time is added to its key's usage.
    pub fn finished(&mut self, worker: usize, now: Instant) {
        if let Some((owner, since, stateless)) = self.busy[worker].take() {
            if stateless {
                self.activity.done(owner, now);
            }
            let key = self.keys.entry(owner).or_insert_with(|| KeyState::new(now));
            key.used = key.decayed(now) + now.saturating_duration_since(since).as_secs_f64();
            key.stamp = now;
            key.last_active = now;
        }
        self.forget_idle(now);
    }

    /// Takes every job waiting for `worker` only (its thread is gone: they
    /// can run nowhere).
    pub fn take_pinned(&mut self, worker: usize) -> Vec<Job> {
        let mut taken = Vec::new();
        for key in self.keys.values_mut() {
            let (mine, rest) = std::mem::take(&mut key.waiting)
                .into_iter()
                .partition(|w| w.worker == Some(worker));
            key.waiting = rest;
            taken.extend(mine.into_iter().map(|w: Waiting| w.job));
        }
        self.waiting_pinned[worker] = 0;
        taken
    }

    /// Drops keys with nothing queued or running whose last job is older
    /// than [`RECENT`] (their usage has halved twice by then).
    fn forget_idle(&mut self, now: Instant) {
        let busy = &self.busy;
        self.keys.retain(|owner, k| {
            !k.waiting.is_empty()
                || busy.iter().flatten().any(|(o, _, _)| o == owner)
                || now.saturating_duration_since(k.last_active) < RECENT
        });
    }

    #[cfg(test)]
    fn tracked_keys(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CancelToken, ExecRequest, Language};
    use crate::server::workers::{ConnKey, Work};

    fn job(tag: usize, owner: Owner) -> Job {
        Job {
            conn: ConnKey {
                index: tag as u32,
                generation: 0,
            },
            slot: tag,
            work: Work::Exec(ExecRequest {
                code: String::new(),
                language: Language::Python,
                timeout: Duration::from_secs(1),
                cancel: CancelToken::new(),
            }),
            reply: None,
            owner,
            worker: None,
            counted: None,
        }
    }

    fn pop_owner(q: &mut FairQueue, worker: usize, now: Instant) -> Owner {
        q.pop(worker, now, false).expect("a job").owner
    }

    #[test]
    fn a_second_key_goes_first_once_a_worker_frees() {
        let t = Instant::now();
        let (a, b) = (Some(0), Some(1));
        let mut q = FairQueue::new(2, KeyActivity::new(4));
        for i in 0..8 {
            q.push(a, None, job(i, a), t);
        }
        // Alone, a may take both workers.
        assert_eq!(pop_owner(&mut q, 0, t), a);
        assert_eq!(pop_owner(&mut q, 1, t), a);
        let t1 = t + Duration::from_millis(10);
        q.push(b, None, job(100, b), t1);
        q.push(b, None, job(101, b), t1);
        q.finished(0, t1);
        // a used 20 ms, b nothing: b's first.
        assert_eq!(pop_owner(&mut q, 0, t1), b);
        assert_eq!(q.waiting_any(), 7);
    }

    /// By time, not by count: a key whose one run took 10 s goes after a
    /// key that ran ten 10 ms execs.
    #[test]
    fn the_key_with_less_recent_worker_time_goes_first() {
        let t = Instant::now();
        let (long, short) = (Some(0), Some(1));
        let mut q = FairQueue::new(1, KeyActivity::new(4));
        q.push(long, None, job(0, long), t);
        assert_eq!(pop_owner(&mut q, 0, t), long);
        let mut now = t + Duration::from_secs(10);
        q.finished(0, now);
        for i in 0..10 {
            q.push(short, None, job(i, short), now);
            assert_eq!(pop_owner(&mut q, 0, now), short);
            now += Duration::from_millis(10);
            q.finished(0, now);
        }
        q.push(long, None, job(1, long), now);
        q.push(short, None, job(11, short), now);
        // long's job is older, but long used ~10 s to short's 0.1 s.
        assert_eq!(pop_owner(&mut q, 0, now), short);
        q.finished(0, now);
        assert_eq!(pop_owner(&mut q, 0, now), long);
        // Usage halves every half-life.
        let key = &q.keys[&short];
        let later = key.stamp + USAGE_HALF_LIFE;
        assert!((key.decayed(later) - key.used / 2.0).abs() < 1e-9);
    }

    /// The count-based queue let a key that arrived alone hold every
    /// worker; with another key recently active it keeps one free.
    #[test]
    fn one_worker_stays_free_for_other_active_keys() {
        let t = Instant::now();
        let (a, b) = (Some(0), Some(1));
        let mut q = FairQueue::new(2, KeyActivity::new(4));
        q.push(b, None, job(0, b), t);
        assert_eq!(pop_owner(&mut q, 0, t), b);
        q.finished(0, t);
        for i in 0..4 {
            q.push(a, None, job(i, a), t);
        }
        assert_eq!(pop_owner(&mut q, 0, t), a);
        // b finished just now: a may not take the last worker.
        assert!(q.pop(1, t, false).is_none());
        // b's next exec gets it at once.
        q.push(b, None, job(1, b), t);
        assert_eq!(pop_owner(&mut q, 1, t), b);
        q.finished(1, t);
        // Once b has been idle for RECENT, a may use both again.
        let later = t + RECENT;
        assert_eq!(pop_owner(&mut q, 1, later), a);
        // Draining ignores the reserve.
        q.finished(1, later);
        q.push(b, None, job(2, b), later);
        q.finished(0, later);
        assert!(q.pop(0, later, true).is_some());
        assert!(q.pop(1, later, true).is_some());
    }

    #[test]
    fn pinned_jobs_run_only_on_their_worker_in_fair_order() {
        let t = Instant::now();
        let (a, b) = (Some(0), Some(1));
        let mut q = FairQueue::new(1, KeyActivity::new(4));
        // a has a long stateless run going, then queues session execs.
        q.push(a, None, job(0, a), t);
        assert_eq!(pop_owner(&mut q, 0, t), a);
        let t1 = t + Duration::from_secs(1);
        for i in 1..5 {
            q.push(a, Some(0), job(i, a), t1);
        }
        q.push(b, None, job(10, b), t1);
        q.finished(0, t1);
        assert_eq!(q.waiting_pinned(0), 4);
        // b's stateless exec goes ahead of a's session execs.
        assert_eq!(pop_owner(&mut q, 0, t1), b);
        q.finished(0, t1);
        assert_eq!(pop_owner(&mut q, 0, t1), a);
        assert_eq!(q.waiting_pinned(0), 3);
        // A job pinned to worker 1 is not worker 0's.
        let mut q = FairQueue::new(2, KeyActivity::new(4));
        q.push(a, Some(1), job(0, a), t);
        assert!(q.pop(0, t, false).is_none());
        assert_eq!(q.pop(1, t, false).unwrap().slot, 0);
    }

    /// The reserve is node-wide. Before the fix each shard's queue saw
    /// only its own keys: b active on shard 1 did not stop a from taking
    /// both of shard 0's workers.
    #[test]
    fn a_key_active_on_another_shard_keeps_a_worker_free_here() {
        let t = Instant::now();
        let (a, b) = (Some(0), Some(1));
        let activity = KeyActivity::new(2);
        let mut shard0 = FairQueue::new(2, activity.clone());
        let mut shard1 = FairQueue::new(2, activity);
        shard1.push(b, None, job(0, b), t);
        assert_eq!(pop_owner(&mut shard1, 0, t), b);
        for i in 0..4 {
            shard0.push(a, None, job(i, a), t);
        }
        assert_eq!(pop_owner(&mut shard0, 0, t), a);
        // b runs on shard 1: a may not take shard 0's last worker.
        assert!(shard0.pop(1, t, false).is_none());
        shard1.finished(0, t);
        assert!(shard0.pop(1, t, false).is_none(), "b finished just now");
        // b's next exec, landing on shard 0, finds the worker.
        shard0.push(b, None, job(1, b), t);
        assert_eq!(pop_owner(&mut shard0, 1, t), b);
        shard0.finished(1, t);
        // b idle for RECENT on every shard: a may use both.
        assert_eq!(pop_owner(&mut shard0, 1, t + RECENT), a);
    }

    /// Jobs pinned to another (busy) worker cannot use this one, so they do
    /// not hold the reserve. Before the fix b's session exec, waiting for
    /// worker 0, kept worker 1 idle while a had work for it.
    #[test]
    fn jobs_pinned_elsewhere_do_not_idle_a_worker() {
        let t = Instant::now();
        let (a, b) = (Some(0), Some(1));
        let mut q = FairQueue::new(2, KeyActivity::new(2));
        q.push(a, None, job(0, a), t);
        assert_eq!(pop_owner(&mut q, 0, t), a);
        q.push(b, Some(0), job(1, b), t);
        q.push(a, None, job(2, a), t);
        assert_eq!(pop_owner(&mut q, 1, t), a);
        // b's session exec runs when its worker frees.
        q.finished(0, t);
        assert_eq!(q.pop(0, t, false).unwrap().slot, 1);
    }

    /// A session job can run only on its worker: the reserve does not hold
    /// it back, while the same key's stateless exec still waits.
    #[test]
    fn pinned_jobs_are_exempt_from_the_reserve() {
        let t = Instant::now();
        let (a, b) = (Some(0), Some(1));
        let mut q = FairQueue::new(2, KeyActivity::new(2));
        q.push(b, None, job(0, b), t);
        assert_eq!(pop_owner(&mut q, 0, t), b);
        q.finished(0, t);
        q.push(a, None, job(1, a), t);
        assert_eq!(pop_owner(&mut q, 0, t), a);
        q.push(a, None, job(2, a), t);
        q.push(a, Some(1), job(3, a), t);
        // b was active just now: not a's stateless exec, but its session's.
        assert_eq!(q.pop(1, t, false).unwrap().slot, 3);
        q.finished(1, t);
        assert!(q.pop(1, t, false).is_none());
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let t = Instant::now();
        let mut q = FairQueue::new(1, KeyActivity::new(4));
        q.push(Some(3), None, job(0, Some(3)), t);
        q.pop(0, t, false).unwrap();
        q.finished(0, t);
        assert_eq!(q.tracked_keys(), 1);
        q.finished(0, t + RECENT);
        assert_eq!(q.tracked_keys(), 0);
    }
}
