//! Fair queueing of one shard's stateless execs across API keys.
//!
//! Execs wait here, one queue per key, instead of in the workers' shared
//! FIFO channel; the shard hands one to the workers only when a worker is
//! free, choosing the key with the fewest execs running on this shard (ties:
//! the key whose oldest waiting exec came first). A key that filled every
//! worker with a 64-item batch therefore gets the next free worker only
//! when no other key is waiting: another key's request starts as soon as
//! any worker frees, instead of after the whole batch (max-min fairness in
//! running execs; every exec counts the same, whatever its length).

use std::collections::{HashMap, VecDeque};

use super::workers::Job;
use crate::api::Owner;

#[derive(Default)]
struct KeyState {
    /// Waiting execs with their arrival numbers.
    waiting: VecDeque<(u64, Job)>,
    /// Execs handed to the workers and not yet completed.
    running: usize,
}

#[derive(Default)]
pub struct FairQueue {
    keys: HashMap<Owner, KeyState>,
    waiting: usize,
    arrivals: u64,
}

impl FairQueue {
    /// Execs waiting (not yet handed to a worker).
    pub fn len(&self) -> usize {
        self.waiting
    }

    pub fn push(&mut self, owner: Owner, job: Job) {
        self.arrivals += 1;
        self.waiting += 1;
        let key = self.keys.entry(owner).or_default();
        key.waiting.push_back((self.arrivals, job));
    }

    /// The next exec to hand to a free worker, counted as running for its
    /// key until [`FairQueue::finished`].
    pub fn pop(&mut self) -> Option<Job> {
        let owner = *self
            .keys
            .iter()
            .filter_map(|(owner, k)| Some((owner, (k.running, k.waiting.front()?.0))))
            .min_by_key(|(_, rank)| *rank)?
            .0;
        let key = self.keys.get_mut(&owner).expect("chosen above");
        let (_, job) = key.waiting.pop_front().expect("has a waiting exec");
        key.running += 1;
        self.waiting -= 1;
        Some(job)
    }

    /// Puts back an exec [`FairQueue::pop`] gave out that could not be
    /// handed over, at the front of its key's queue.
    pub fn unpop(&mut self, owner: Owner, job: Job) {
        let key = self.keys.entry(owner).or_default();
        key.running = key.running.saturating_sub(1);
        // Its original arrival number is gone; 0 puts it first again.
        key.waiting.push_front((0, job));
        self.waiting += 1;
    }

    /// An exec of `owner` handed out by [`FairQueue::pop`] completed.
    pub fn finished(&mut self, owner: Owner) {
        if let Some(key) = self.keys.get_mut(&owner) {
            key.running = key.running.saturating_sub(1);
            if key.running == 0 && key.waiting.is_empty() {
                self.keys.remove(&owner);
            }
        }
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
    use std::time::Duration;

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
            fair_owner: Some(owner),
            counted: None,
        }
    }

    fn pop_owner(q: &mut FairQueue) -> Owner {
        q.pop().unwrap().fair_owner.unwrap()
    }

    #[test]
    fn a_second_key_goes_first_once_a_worker_frees() {
        let (a, b) = (Some(0), Some(1));
        let mut q = FairQueue::default();
        for i in 0..8 {
            q.push(a, job(i, a));
        }
        // Two workers take two of a's.
        assert_eq!(pop_owner(&mut q), a);
        assert_eq!(pop_owner(&mut q), a);
        q.push(b, job(100, b));
        q.push(b, job(101, b));
        q.finished(a);
        // a has 1 running, b none: b's first.
        assert_eq!(pop_owner(&mut q), b);
        q.finished(a);
        // Both have one running: a's oldest waiting came first.
        assert_eq!(pop_owner(&mut q), a);
        assert_eq!(q.len(), 6);
        q.finished(b);
        assert_eq!(pop_owner(&mut q), b);
        // Only a is left waiting.
        q.finished(b);
        q.finished(a);
        q.finished(a);
        while q.pop().is_some() {}
        for _ in 0..5 {
            q.finished(a);
        }
        assert_eq!(q.tracked_keys(), 0, "idle keys are forgotten");
    }

    #[test]
    fn a_job_put_back_goes_out_first() {
        let a = None;
        let mut q = FairQueue::default();
        q.push(a, job(1, a));
        q.push(a, job(2, a));
        let first = q.pop().unwrap();
        assert_eq!(first.slot, 1);
        q.unpop(a, first);
        assert_eq!(q.pop().unwrap().slot, 1);
        assert_eq!(q.pop().unwrap().slot, 2);
        assert!(q.pop().is_none());
    }
}
