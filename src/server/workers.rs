//! A shard's exec workers: threads that each own one [`Lane`] and run jobs
//! from the shard's bounded fair queue ([`Scheduler`]). Results go back to the shard through a
//! channel plus an eventfd the shard's event loop waits on, so the loop never
//! blocks on a guest.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};

use super::fair::{FairQueue, KeyActivity};
use super::metrics::ShardMetrics;
use crate::api::{
    ExecFailure, ExecRequest, ExecResult, Lane, LaneFactory, SessionOp, SessionReply,
};

/// How often an idle worker lets its lane do housekeeping (expire sessions).
const TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// Identifies a connection slot and its incarnation, so a completion for a
/// connection that has since closed (and whose slot was reused) is dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnKey {
    pub index: u32,
    pub generation: u32,
}

/// What a worker is asked to do.
pub enum Work {
    /// A stateless run in a throwaway fork.
    Exec(ExecRequest),
    /// An operation on a live session this worker's lane owns.
    Session(SessionOp),
}

/// Where a completion goes: the shard that received the request (which may
/// not be the shard whose worker ran it).
#[derive(Clone)]
pub struct Reply {
    done: Sender<Completion>,
    waker: Arc<Waker>,
}

pub struct Job {
    pub conn: ConnKey,
    /// Position in a batch (0 for single execs).
    pub slot: usize,
    pub work: Work,
    /// None: the worker's own shard.
    pub reply: Option<Reply>,
    /// The API key it is queued and its run time accounted for (see
    /// `fair.rs`).
    pub owner: crate::api::Owner,
    /// The one worker that may run it (the one whose lane holds its
    /// session), or None for any worker of the shard.
    pub worker: Option<usize>,
    /// (API key index, execs) this job counts against the key's cap on
    /// execs in flight; handed back so the count is released.
    pub counted: Option<(usize, usize)>,
}

pub struct Completion {
    pub conn: ConnKey,
    pub slot: usize,
    /// The run's result (a session exec's too; default for other session ops).
    pub result: ExecResult,
    /// The answer to a session operation.
    pub session: Option<SessionReply>,
    /// False when the job was cancelled before a worker started it.
    pub ran: bool,
    /// [`Job::counted`], handed back.
    pub counted: Option<(usize, usize)>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("creating the shard eventfd: {0}")]
    EventFd(io::Error),
    #[error("spawning worker thread: {0}")]
    Spawn(io::Error),
    #[error("creating a lane for shard {shard}: {message}")]
    NewLane { shard: usize, message: String },
    #[error("a worker of shard {0} exited during start-up")]
    StartupLost(usize),
}

/// An eventfd that workers (and shutdown) write to wake the shard's loop.
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// `nonblocking` for the epoll loop; the io_uring loop reads it with a
    /// blocking read op the kernel completes when it is signalled.
    pub fn new(nonblocking: bool) -> io::Result<Self> {
        let flags = libc::EFD_CLOEXEC | if nonblocking { libc::EFD_NONBLOCK } else { 0 };
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            // SAFETY: fd is a fresh descriptor we exclusively own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. Failure (counter saturated)
        // means a wake-up is already pending, which is all we need.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Clears the counter (epoll loop; non-blocking fd).
    pub fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Why [`Scheduler::submit`] gave a job back.
pub enum Refused {
    /// The queue it would wait in is full.
    Full(Job),
    /// The pool is shutting down.
    Closed(Job),
    /// No such worker (a session id naming a worker that does not exist).
    NoWorker(Job),
}

struct SchedState {
    queue: FairQueue,
    closed: bool,
    /// Workers whose thread died (a panic outside a run): jobs for them
    /// are refused.
    dead: Vec<bool>,
}

/// One shard's run queue: the fair queue of every job for its workers
/// (stateless and session), shared by the shards that submit and the
/// workers that take. Held only to push, pick or account one job (no run
/// happens under it).
pub struct Scheduler {
    state: Mutex<SchedState>,
    /// Workers wait here for work; woken on every push and finish (a finish
    /// can release the reserve of [`FairQueue::pop`]).
    ready: Condvar,
    queue_depth: usize,
    metrics: Arc<ShardMetrics>,
}

impl Scheduler {
    fn new(workers: usize, queue: QueueSettings, metrics: Arc<ShardMetrics>) -> Self {
        let queue_depth = queue.depth;
        Scheduler {
            state: Mutex::new(SchedState {
                queue: FairQueue::new(workers, queue.activity),
                closed: false,
                dead: vec![false; workers],
            }),
            ready: Condvar::new(),
            queue_depth,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SchedState> {
        // A panic under the lock leaves the queue consistent (each method
        // updates it in one step): keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Free places for jobs any worker may take.
    pub fn room(&self) -> usize {
        self.queue_depth
            .saturating_sub(self.lock().queue.waiting_any())
    }

    /// Queues a job for the worker [`Job::worker`] names (or any), in its
    /// key's fair queue. At most `queue_depth` jobs wait for any worker,
    /// and as many again for each one worker.
    #[allow(clippy::result_large_err)]
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed(job));
        }
        let waiting = match job.worker {
            Some(w) if w >= state.queue.workers() || state.dead[w] => {
                return Err(Refused::NoWorker(job))
            }
            Some(w) => state.queue.waiting_pinned(w),
            None => state.queue.waiting_any(),
        };
        if waiting >= self.queue_depth {
            return Err(Refused::Full(job));
        }
        let (owner, worker) = (job.owner, job.worker);
        state.queue.push(owner, worker, job, Instant::now());
        // Under the lock, before a worker can take it (and decrement).
        self.metrics.queued.fetch_add(1, Ordering::Relaxed);
        drop(state);
        self.ready.notify_all();
        Ok(())
    }

    /// The next job for `worker`, waiting for one; runs `tick` whenever
    /// the worker has waited [`TICK`]. None once the pool closed and
    /// nothing is left for this worker.
    fn take(&self, worker: usize, mut tick: impl FnMut()) -> Option<Job> {
        let mut state = self.lock();
        let mut next_tick = Instant::now() + TICK;
        loop {
            let now = Instant::now();
            let closed = state.closed;
            if let Some(job) = state.queue.pop(worker, now, closed) {
                self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
                return Some(job);
            }
            if closed {
                return None;
            }
            if now >= next_tick {
                drop(state);
                tick();
                state = self.lock();
                next_tick = Instant::now() + TICK;
                continue;
            }
            state = self
                .ready
                .wait_timeout(state, next_tick - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// `worker`'s run ended: accounts its time to its key.
    fn finished(&self, worker: usize) {
        self.lock().queue.finished(worker, Instant::now());
        self.ready.notify_all();
    }

    /// `worker`'s thread is gone: no job may be queued for it, and those
    /// waiting for it are handed back (to be answered).
    fn worker_died(&self, worker: usize) -> Vec<Job> {
        let mut state = self.lock();
        state.dead[worker] = true;
        state.queue.finished(worker, Instant::now());
        let jobs = state.queue.take_pinned(worker);
        self.metrics.queued.fetch_sub(jobs.len(), Ordering::Relaxed);
        drop(state);
        self.ready.notify_all();
        jobs
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// A shard's run queue: its depth ([`Scheduler::submit`]) and the
/// node-wide key activity its reserve looks at (`fair.rs`).
pub struct QueueSettings {
    pub depth: usize,
    pub activity: Arc<KeyActivity>,
}

/// The shard side of its worker threads.
pub struct WorkerPool {
    scheduler: Arc<Scheduler>,
    completions: Receiver<Completion>,
    reply: Reply,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Starts `workers` threads, each creating its lane on its own thread;
    /// fails if any lane cannot be created.
    pub fn start(
        shard: usize,
        workers: usize,
        seccomp: crate::seccomp::Mode,
        queue: QueueSettings,
        factory: Arc<dyn LaneFactory>,
        metrics: Arc<ShardMetrics>,
        waker: Arc<Waker>,
    ) -> Result<Self, WorkerError> {
        let scheduler = Arc::new(Scheduler::new(workers, queue, metrics.clone()));
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Completion>();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), String>>(workers);
        let reply = Reply {
            done: done_tx.clone(),
            waker: waker.clone(),
        };
        let mut threads = Vec::with_capacity(workers);
        for worker in 0..workers {
            let (factory, metrics, waker) = (factory.clone(), metrics.clone(), waker.clone());
            let (sched, done_tx, ready_tx) = (scheduler.clone(), done_tx.clone(), ready_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("kvmfork-s{shard}-w{worker}"))
                .spawn(move || {
                    // First, before the lane's VMs exist: every guest this
                    // thread runs, and every VM it creates later (pool
                    // refills), is under the worker filter.
                    if let Err(e) =
                        crate::seccomp::install(crate::seccomp::ThreadKind::Worker, seccomp)
                    {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                    let lane = match factory.new_worker_lane(shard, worker) {
                        Ok(lane) => lane,
                        Err(message) => {
                            let _ = ready_tx.send(Err(message));
                            return;
                        }
                    };
                    metrics.set_lane_stats(worker, lane.stats());
                    let _ = ready_tx.send(Ok(()));
                    drop(ready_tx);
                    let ran = catch_unwind(AssertUnwindSafe(|| {
                        run_worker(
                            shard, worker, lane, &*factory, &sched, &done_tx, &metrics, &waker,
                        )
                    }));
                    if ran.is_err() {
                        // Without this, jobs pinned to this worker (its
                        // sessions') would wait forever.
                        eprintln!(
                            "kvmfork serve: shard {shard} worker {worker}: thread panicked; \
                             its sessions are gone"
                        );
                        for job in sched.worker_died(worker) {
                            answer(job.split().1, internal_failure(), false, &done_tx, &waker);
                        }
                    }
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    scheduler.close();
                    for handle in threads {
                        let _ = handle.join();
                    }
                    return Err(WorkerError::Spawn(e));
                }
            }
        }
        drop(ready_tx);
        let mut pool = WorkerPool {
            scheduler,
            completions: done_rx,
            reply,
            threads,
        };
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(message)) => {
                    pool.shutdown();
                    return Err(WorkerError::NewLane { shard, message });
                }
                Err(_) => {
                    pool.shutdown();
                    return Err(WorkerError::StartupLost(shard));
                }
            }
        }
        Ok(pool)
    }

    /// Free places for stateless jobs in this shard's queue.
    pub fn room(&self) -> usize {
        self.scheduler.room()
    }

    /// Queues a job on this shard; the job comes back on refusal (it is
    /// the caller's to answer).
    #[allow(clippy::result_large_err)]
    pub fn submit(&self, job: Job) -> Result<(), Refused> {
        self.scheduler.submit(job)
    }

    /// This shard's run queue (for every shard's session requests).
    pub fn scheduler(&self) -> Arc<Scheduler> {
        self.scheduler.clone()
    }

    /// Where other shards send this shard's completions.
    pub fn reply(&self) -> Reply {
        self.reply.clone()
    }

    pub fn try_completion(&self) -> Option<Completion> {
        self.completions.try_recv().ok()
    }

    /// Closes the queue and waits for the workers to finish the jobs queued
    /// for them and exit.
    pub fn shutdown(&mut self) {
        self.scheduler.close();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[allow(clippy::too_many_arguments)]
fn run_worker(
    shard: usize,
    worker: usize,
    mut lane: Box<dyn Lane>,
    factory: &dyn LaneFactory,
    scheduler: &Scheduler,
    done: &Sender<Completion>,
    metrics: &ShardMetrics,
    waker: &Waker,
) {
    loop {
        let next = scheduler.take(worker, || {
            if catch_unwind(AssertUnwindSafe(|| lane.tick())).is_err() {
                // As for a run's panic below: the lane's state is unknown.
                eprintln!(
                    "kvmfork serve: shard {shard} worker {worker}: lane tick panicked; replacing it"
                );
                match factory.new_worker_lane(shard, worker) {
                    Ok(fresh) => lane = fresh,
                    Err(e) => eprintln!(
                        "kvmfork serve: shard {shard} worker {worker}: new lane failed: {e}"
                    ),
                }
            }
        });
        let Some(job) = next else {
            return;
        };
        let (work, to) = job.split();
        let (result, session, ran) = match work {
            Work::Exec(req) if req.cancel.is_cancelled() => (cancelled_before_start(), None, false),
            work => match catch_unwind(AssertUnwindSafe(|| match work {
                Work::Exec(req) => (lane.exec(&req), None),
                Work::Session(op) => match lane.session(op) {
                    SessionReply::Exec { info, result } => {
                        (result.clone(), Some(SessionReply::Exec { info, result }))
                    }
                    reply => (ExecResult::default(), Some(reply)),
                },
            })) {
                Ok((result, session)) => (result, session, true),
                Err(_) => {
                    // The lane's state is unknown after a panic: replace it
                    // (its sessions are lost with it).
                    eprintln!(
                        "kvmfork serve: shard {shard} worker {worker}: lane panicked; replacing it"
                    );
                    match factory.new_worker_lane(shard, worker) {
                        Ok(fresh) => lane = fresh,
                        Err(e) => eprintln!(
                            "kvmfork serve: shard {shard} worker {worker}: new lane failed: {e}"
                        ),
                    }
                    let failure = ExecFailure::Internal("the executor panicked".into());
                    let result = ExecResult {
                        exit_code: -1,
                        failure: Some(failure),
                        ..Default::default()
                    };
                    let session = Some(SessionReply::Error(crate::api::SessionError::new(
                        500,
                        "internal",
                        "the executor failed; the sandboxes it held are gone",
                    )));
                    (result, session, true)
                }
            },
        };
        scheduler.finished(worker);
        metrics.set_lane_stats(worker, lane.stats());
        if !answer(to, (result, session), ran, done, waker) {
            return; // the shard is gone
        }
    }
}

/// A job a dead worker can no longer run.
fn internal_failure() -> (ExecResult, Option<SessionReply>) {
    let result = ExecResult {
        exit_code: -1,
        failure: Some(ExecFailure::Internal("the executor failed".into())),
        ..Default::default()
    };
    let session = Some(SessionReply::Error(crate::api::SessionError::new(
        500,
        "internal",
        "the executor failed; the sandboxes it held are gone",
    )));
    (result, session)
}

/// Where a job's answer goes: the fields of `Job` besides its work.
struct ReturnAddress {
    conn: ConnKey,
    slot: usize,
    reply: Option<Reply>,
    counted: Option<(usize, usize)>,
}

impl Job {
    fn split(self) -> (Work, ReturnAddress) {
        let Job {
            conn,
            slot,
            work,
            reply,
            counted,
            ..
        } = self;
        (
            work,
            ReturnAddress {
                conn,
                slot,
                reply,
                counted,
            },
        )
    }
}

/// Sends a job's answer to the shard that waits for it. False only when the
/// worker's own shard is gone (shutdown); another shard that is gone is
/// nothing to do.
fn answer(
    to: ReturnAddress,
    (result, session): (ExecResult, Option<SessionReply>),
    ran: bool,
    done: &Sender<Completion>,
    waker: &Waker,
) -> bool {
    let completion = Completion {
        conn: to.conn,
        slot: to.slot,
        result,
        session,
        ran,
        counted: to.counted,
    };
    match &to.reply {
        Some(reply) => {
            if reply.done.send(completion).is_ok() {
                reply.waker.wake();
            }
            true
        }
        None => {
            let sent = done.send(completion).is_ok();
            if sent {
                waker.wake();
            }
            sent
        }
    }
}

fn cancelled_before_start() -> ExecResult {
    ExecResult {
        exit_code: -1,
        failure: Some(ExecFailure::Cancelled),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CancelToken, ExecRequest, Language};

    fn job(tag: usize, worker: Option<usize>) -> Job {
        Job {
            conn: ConnKey {
                index: tag as u32,
                generation: 0,
            },
            slot: tag,
            work: Work::Exec(ExecRequest {
                code: String::new(),
                language: Language::Python,
                timeout: std::time::Duration::from_secs(1),
                cancel: CancelToken::new(),
            }),
            reply: None,
            owner: Some(0),
            worker,
            counted: None,
        }
    }

    /// Before the fix a worker thread that died left the jobs pinned to it
    /// waiting forever, and new ones were queued for it. Now they come back
    /// to be answered, the gauge with them, and the worker takes no more.
    #[test]
    fn a_dead_workers_jobs_are_handed_back_and_refused_after() {
        let metrics = ShardMetrics::new(2);
        let queue = QueueSettings {
            depth: 4,
            activity: KeyActivity::new(1),
        };
        let sched = Scheduler::new(2, queue, metrics.clone());
        for tag in 0..3 {
            assert!(sched.submit(job(tag, Some(1))).is_ok());
        }
        assert!(sched.submit(job(9, None)).is_ok());
        assert_eq!(metrics.queued.load(Ordering::Relaxed), 4);
        let back = sched.worker_died(1);
        assert_eq!(
            back.iter().map(|j| j.slot).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert_eq!(metrics.queued.load(Ordering::Relaxed), 1);
        assert!(matches!(
            sched.submit(job(3, Some(1))),
            Err(Refused::NoWorker(_))
        ));
        // The stateless job is still there for the live worker.
        assert_eq!(sched.take(0, || {}).map(|j| j.slot), Some(9));
        assert_eq!(metrics.queued.load(Ordering::Relaxed), 0);
    }
}
