//! A shard's exec workers: threads that each own one [`Lane`] and run jobs
//! from the shard's bounded queue. Results go back to the shard through a
//! channel plus an eventfd the shard's event loop waits on, so the loop never
//! blocks on a guest.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};

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
    /// The key a fair-queued exec was scheduled for (see `fair.rs`); None
    /// for work that bypasses the fair queue (session operations).
    pub fair_owner: Option<crate::api::Owner>,
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
    /// [`Job::fair_owner`], handed back.
    pub fair_owner: Option<crate::api::Owner>,
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

/// The shard side of its worker threads.
pub struct WorkerPool {
    jobs: Option<Sender<Job>>,
    /// One queue per worker for the sessions its lane owns.
    direct: Vec<Sender<Job>>,
    completions: Receiver<Completion>,
    reply: Reply,
    capacity: usize,
    metrics: Arc<ShardMetrics>,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    /// Starts `workers` threads, each creating its lane on its own thread;
    /// fails if any lane cannot be created.
    pub fn start(
        shard: usize,
        workers: usize,
        seccomp: crate::seccomp::Mode,
        queue_depth: usize,
        factory: Arc<dyn LaneFactory>,
        metrics: Arc<ShardMetrics>,
        waker: Arc<Waker>,
    ) -> Result<Self, WorkerError> {
        let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(queue_depth);
        let (done_tx, done_rx) = crossbeam_channel::unbounded::<Completion>();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded::<Result<(), String>>(workers);
        let reply = Reply {
            done: done_tx.clone(),
            waker: waker.clone(),
        };
        let mut threads = Vec::with_capacity(workers);
        let mut direct = Vec::with_capacity(workers);
        for worker in 0..workers {
            let (factory, metrics, waker) = (factory.clone(), metrics.clone(), waker.clone());
            let (job_rx, done_tx, ready_tx) = (job_rx.clone(), done_tx.clone(), ready_tx.clone());
            let (direct_tx, direct_rx) = crossbeam_channel::bounded::<Job>(queue_depth.max(1));
            direct.push(direct_tx);
            let handle = std::thread::Builder::new()
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
                    let queues = Queues {
                        shared: &job_rx,
                        direct: &direct_rx,
                    };
                    run_worker(
                        shard, worker, lane, &*factory, queues, &done_tx, &metrics, &waker,
                    );
                })
                .map_err(WorkerError::Spawn)?;
            threads.push(handle);
        }
        drop(ready_tx);
        let mut pool = WorkerPool {
            jobs: Some(job_tx),
            direct,
            completions: done_rx,
            reply,
            capacity: queue_depth,
            metrics,
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

    /// Free places in the queue. Only the shard thread sends, and workers only
    /// take, so the room can grow but not shrink before the shard sends.
    pub fn room(&self) -> usize {
        self.jobs
            .as_ref()
            .map_or(0, |tx| self.capacity.saturating_sub(tx.len()))
    }

    /// Queues a job; call only after checking [`WorkerPool::room`]. The job
    /// comes back on refusal (it is the caller's to answer).
    #[allow(clippy::result_large_err)]
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        let Some(tx) = &self.jobs else {
            return Err(job);
        };
        self.metrics.queued.fetch_add(1, Ordering::Relaxed);
        tx.try_send(job).map_err(|e| {
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            match e {
                TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
            }
        })
    }

    /// The per-worker session queues (for every shard's use).
    pub fn direct_queues(&self) -> Vec<Sender<Job>> {
        self.direct.clone()
    }

    /// Where other shards send this shard's completions.
    pub fn reply(&self) -> Reply {
        self.reply.clone()
    }

    pub fn try_completion(&self) -> Option<Completion> {
        self.completions.try_recv().ok()
    }

    /// Closes the queue and waits for the workers to finish their jobs and exit.
    pub fn shutdown(&mut self) {
        self.jobs = None;
        self.direct.clear();
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

struct Queues<'a> {
    shared: &'a Receiver<Job>,
    direct: &'a Receiver<Job>,
}

#[allow(clippy::too_many_arguments)]
fn run_worker(
    shard: usize,
    worker: usize,
    mut lane: Box<dyn Lane>,
    factory: &dyn LaneFactory,
    queues: Queues,
    done: &Sender<Completion>,
    metrics: &ShardMetrics,
    waker: &Waker,
) {
    loop {
        // Session jobs first: they are the owner's and cannot go elsewhere.
        let job = match queues.direct.try_recv() {
            Ok(job) => job,
            Err(_) => {
                crossbeam_channel::select! {
                    recv(queues.direct) -> job => match job { Ok(job) => job, Err(_) => return },
                    recv(queues.shared) -> job => match job {
                        Ok(job) => {
                            metrics.queued.fetch_sub(1, Ordering::Relaxed);
                            job
                        }
                        // The shard closed its queue: shut down.
                        Err(_) => return,
                    },
                    default(TICK) => {
                        lane.tick();
                        continue;
                    }
                }
            }
        };
        let (result, session, ran) = match job.work {
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
        metrics.set_lane_stats(worker, lane.stats());
        let completion = Completion {
            conn: job.conn,
            slot: job.slot,
            result,
            session,
            ran,
            fair_owner: job.fair_owner,
            counted: job.counted,
        };
        match &job.reply {
            Some(reply) => {
                // The receiving shard may be gone (shutdown): nothing to do.
                if reply.done.send(completion).is_ok() {
                    reply.waker.wake();
                }
            }
            None => {
                if done.send(completion).is_err() {
                    return;
                }
                waker.wake();
            }
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
