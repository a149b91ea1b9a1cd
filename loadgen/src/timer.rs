//! A one-shot timerfd for open-loop arrivals. epoll_wait's timeout has
//! millisecond resolution (and mio rounds it up), which would add up to 1 ms
//! of fake latency to every request measured from its intended send time; a
//! timerfd in the same epoll set wakes the loop with microsecond precision.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

pub struct ArrivalTimer {
    fd: OwnedFd,
    armed_for: Option<Instant>,
}

impl ArrivalTimer {
    pub fn new(registry: &Registry, token: Token) -> io::Result<ArrivalTimer> {
        // SAFETY: plain syscall with constant flags; the result is checked below.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        registry.register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)?;
        Ok(ArrivalTimer {
            fd,
            armed_for: None,
        })
    }

    /// Makes the timer fire at `due` (no-op if already armed for it).
    pub fn arm(&mut self, due: Instant, now: Instant) -> io::Result<()> {
        if self.armed_for == Some(due) {
            return Ok(());
        }
        // A zero it_value would disarm the timer; 1 ns fires at once.
        let wait = due
            .saturating_duration_since(now)
            .max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: wait.as_secs() as libc::time_t,
                tv_nsec: wait.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `fd` is our open timerfd and `spec` is a valid itimerspec.
        if unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
        self.armed_for = Some(due);
        Ok(())
    }

    /// Consumes the expiration so the next one raises a new edge.
    pub fn acknowledge(&mut self) {
        let mut expirations = 0u64;
        // SAFETY: reads at most 8 bytes into a local u64; EAGAIN is harmless.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut expirations as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// Asks the kernel to fire this thread's timers without the default 50 µs
/// of slack, so arrivals start on time.
pub fn minimize_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only this thread.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};

    #[test]
    fn fires_once_armed_and_can_be_rearmed() {
        let mut poll = Poll::new().unwrap();
        let mut timer = ArrivalTimer::new(poll.registry(), Token(7)).unwrap();
        let mut events = Events::with_capacity(4);
        for _ in 0..2 {
            let now = Instant::now();
            timer.arm(now + Duration::from_millis(2), now).unwrap();
            // Generous bound: only checks that the event arrives at all.
            poll.poll(&mut events, Some(Duration::from_secs(10)))
                .unwrap();
            assert!(events.iter().any(|e| e.token() == Token(7)));
            assert!(Instant::now() >= now + Duration::from_millis(2));
            timer.acknowledge();
        }
    }
}
