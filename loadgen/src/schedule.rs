//! When requests start. Closed loop: every connection sends again as soon as
//! its response arrives, with a shared ticket counter for `--requests`.
//! Open loop: a fixed arrival schedule (arrival `g` is due at `start + g/R`)
//! shared out round-robin across threads, independent of how fast the server
//! answers — latency is then measured from these intended times.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long the run lasts after warm-up; at least one bound is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
}

/// Phase boundaries shared by all workers.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    pub start: Instant,
    /// End of warm-up: requests starting (closed) or due (open) from here on are measured.
    pub measure_start: Instant,
    /// No request starts (closed) or is due (open) at or after this instant.
    pub end: Option<Instant>,
}

impl Phases {
    pub fn new(start: Instant, warmup: Duration, duration: Option<Duration>) -> Phases {
        let measure_start = start + warmup;
        Phases {
            start,
            measure_start,
            end: duration.map(|d| measure_start + d),
        }
    }
}

/// Closed-loop request budget shared by all workers.
#[derive(Debug)]
pub struct Tickets {
    limit: Option<u64>,
    taken: AtomicU64,
}

impl Tickets {
    pub fn new(limit: Option<u64>) -> Tickets {
        Tickets {
            limit,
            taken: AtomicU64::new(0),
        }
    }

    /// Takes one measured request from the budget; false once it is spent.
    pub fn take(&self) -> bool {
        match self.limit {
            None => true,
            // Relaxed: only the count matters, nothing is published through it.
            Some(limit) => self.taken.fetch_add(1, Ordering::Relaxed) < limit,
        }
    }
}

/// What a closed-loop connection should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedNext {
    Send {
        measured: bool,
    },
    /// Measured phase over (time or budget): the connection stays idle.
    Stop,
}

pub fn closed_next(phases: &Phases, tickets: &Tickets, now: Instant) -> ClosedNext {
    if now < phases.measure_start {
        return ClosedNext::Send { measured: false };
    }
    if phases.end.is_some_and(|end| now >= end) {
        return ClosedNext::Stop;
    }
    if tickets.take() {
        ClosedNext::Send { measured: true }
    } else {
        ClosedNext::Stop
    }
}

/// One due open-loop request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub intended: Instant,
    pub measured: bool,
}

/// This thread's share of the open-loop schedule: arrivals
/// `thread, thread + threads, thread + 2*threads, ...`.
#[derive(Debug, Clone)]
pub struct OpenSchedule {
    start: Instant,
    rate: f64,
    stride: u64,
    next: u64,
    /// Arrivals with index below this are warm-up.
    warmup_arrivals: u64,
    /// Arrivals with index at or above this are never sent.
    end_arrival: u64,
}

impl OpenSchedule {
    pub fn new(
        start: Instant,
        rate: f64,
        warmup: Duration,
        bounds: Bounds,
        thread: usize,
        threads: usize,
    ) -> OpenSchedule {
        assert!(rate > 0.0 && rate.is_finite(), "rate must be positive");
        let arrivals_within = |seconds: f64| (seconds * rate - 1e-9).ceil().max(0.0) as u64;
        let warmup_arrivals = arrivals_within(warmup.as_secs_f64());
        let by_duration = bounds
            .duration
            .map(|d| warmup_arrivals + arrivals_within(d.as_secs_f64()));
        let by_count = bounds.requests.map(|n| warmup_arrivals + n);
        let end_arrival = match (by_duration, by_count) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => u64::MAX,
        };
        OpenSchedule {
            start,
            rate,
            stride: threads as u64,
            next: thread as u64,
            warmup_arrivals,
            end_arrival,
        }
    }

    fn intended(&self, index: u64) -> Instant {
        self.start + Duration::from_secs_f64(index as f64 / self.rate)
    }

    /// When the next arrival is due, if any remain.
    pub fn next_due(&self) -> Option<Instant> {
        (self.next < self.end_arrival).then(|| self.intended(self.next))
    }

    pub fn finished(&self) -> bool {
        self.next >= self.end_arrival
    }

    /// Ends the schedule early (the run was interrupted).
    pub fn stop(&mut self) {
        self.end_arrival = self.next;
    }

    /// Pops the next arrival if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Arrival> {
        let due = self.next_due()?;
        if due > now {
            return None;
        }
        let arrival = Arrival {
            intended: due,
            measured: self.next >= self.warmup_arrivals,
        };
        self.next += self.stride;
        Some(arrival)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(schedule: &mut OpenSchedule, now: Instant) -> Vec<Arrival> {
        std::iter::from_fn(|| schedule.pop_due(now)).collect()
    }

    #[test]
    fn open_schedule_counts_are_exact_and_split_across_threads() {
        let start = Instant::now();
        let bounds = Bounds {
            duration: Some(Duration::from_secs(2)),
            requests: None,
        };
        let far = start + Duration::from_secs(100);
        let mut total = 0;
        let mut measured = 0;
        let mut all: Vec<Instant> = Vec::new();
        for thread in 0..3 {
            let mut schedule =
                OpenSchedule::new(start, 100.0, Duration::from_millis(500), bounds, thread, 3);
            let arrivals = drain(&mut schedule, far);
            assert!(schedule.finished());
            total += arrivals.len();
            measured += arrivals.iter().filter(|a| a.measured).count();
            all.extend(arrivals.iter().map(|a| a.intended));
        }
        assert_eq!(total, 250);
        assert_eq!(measured, 200);
        all.sort();
        // Evenly spaced at 10 ms.
        for pair in all.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_micros(9_999) && gap <= Duration::from_micros(10_001),
                "{gap:?}"
            );
        }
    }

    #[test]
    fn open_schedule_releases_only_due_arrivals() {
        let start = Instant::now();
        let bounds = Bounds {
            duration: None,
            requests: Some(1000),
        };
        let mut schedule = OpenSchedule::new(start, 1000.0, Duration::ZERO, bounds, 0, 1);
        // At start + 10 ms exactly arrivals 0..=10 are due.
        assert_eq!(
            drain(&mut schedule, start + Duration::from_millis(10)).len(),
            11
        );
        assert_eq!(schedule.next_due(), Some(start + Duration::from_millis(11)));
        assert_eq!(
            drain(&mut schedule, start + Duration::from_secs(10)).len(),
            989
        );
        assert!(schedule.finished());
        assert_eq!(schedule.next_due(), None);
    }

    #[test]
    fn request_bound_wins_when_smaller() {
        let start = Instant::now();
        let bounds = Bounds {
            duration: Some(Duration::from_secs(10)),
            requests: Some(7),
        };
        let mut schedule = OpenSchedule::new(start, 50.0, Duration::ZERO, bounds, 0, 1);
        assert_eq!(
            drain(&mut schedule, start + Duration::from_secs(100)).len(),
            7
        );
    }

    #[test]
    fn tickets_limit_measured_closed_loop_requests() {
        let start = Instant::now();
        let phases = Phases::new(start, Duration::from_secs(1), None);
        let tickets = Tickets::new(Some(3));
        // Warm-up requests never use tickets.
        for _ in 0..10 {
            assert_eq!(
                closed_next(&phases, &tickets, start),
                ClosedNext::Send { measured: false }
            );
        }
        let later = start + Duration::from_secs(2);
        for _ in 0..3 {
            assert_eq!(
                closed_next(&phases, &tickets, later),
                ClosedNext::Send { measured: true }
            );
        }
        assert_eq!(closed_next(&phases, &tickets, later), ClosedNext::Stop);
    }

    #[test]
    fn duration_ends_closed_loop() {
        let start = Instant::now();
        let phases = Phases::new(start, Duration::ZERO, Some(Duration::from_secs(1)));
        let tickets = Tickets::new(None);
        assert_eq!(
            closed_next(&phases, &tickets, start),
            ClosedNext::Send { measured: true }
        );
        assert_eq!(
            closed_next(&phases, &tickets, start + Duration::from_secs(1)),
            ClosedNext::Stop
        );
    }
}
