//! The HTTP front end: a thread-per-core server for the /v1 API.
//!
//! Each shard is a thread pinned to a core with its own `SO_REUSEPORT`
//! listener, its own event loop (io_uring, or epoll where io_uring is
//! unavailable), its own exec workers (each owning a [`Lane`]) and its own
//! statistics. Execs go to the shard's bounded queue; workers run them and
//! post completions back through an eventfd the loop waits on, so a guest run
//! never blocks the loop. Nothing on the request path locks across shards:
//! metrics scrapes lock each shard's statistics briefly, health answers
//! from a per-shard snapshot refreshed at most once a second, a key's rate
//! limit is one atomic word all shards update, and the connection caps are
//! locked only on accept and close.
//!
//! [`Lane`]: crate::api::Lane

mod auth;
mod bufring;
mod config;
mod conn;
mod connlimit;
mod epoll;
mod event;
mod fair;
mod http;
mod metrics;
mod sessions;
mod shard;
mod uring;
mod wire;
mod workers;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

pub use auth::{AuthError, RateLimit};
pub use config::{ServeArgs, ServeConfig, API_KEYS_ENV};
pub use shard::Backend;
pub use workers::WorkerError;

use crate::api::LaneFactory;
use auth::ApiKeys;
use metrics::ShardMetrics;
use shard::{ShardCtx, Shared};
use wire::DecodeRules;
use workers::{Waker, WorkerPool};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(
        "auth is required (listening on {listen}) but there is no API keys file at {}: \
         create it (a JSON array of keys; set {API_KEYS_ENV} or --api-keys-file to put it \
         elsewhere), or pass --require-auth=false to serve without auth",
        path.display()
    )]
    AuthRequired { listen: SocketAddr, path: PathBuf },
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("creating the wake-up eventfd: {0}")]
    Waker(io::Error),
    #[error("setting up io_uring for shard {shard}: {source}")]
    Ring { shard: usize, source: io::Error },
    #[error("setting up the event loop of shard {shard}: {source}")]
    LoopSetup { shard: usize, source: LoopError },
    #[error(transparent)]
    Workers(#[from] WorkerError),
    #[error("spawning the thread of shard {shard}: {source}")]
    Spawn { shard: usize, source: io::Error },
    #[error("installing SIGTERM/SIGINT handlers: {0}")]
    Signals(io::Error),
    #[error("event loop of shard {shard} failed: {source}")]
    Loop { shard: usize, source: LoopError },
    #[error("the thread of shard {0} panicked")]
    ShardPanicked(usize),
    #[error("--user: {0}")]
    User(String),
    #[error(
        "refusing to run exec workers as root: pass --user NAME to switch to an \
         unprivileged user (in group kvm) once the listeners are bound, or \
         --allow-root to run them as root anyway"
    )]
    Root,
    #[error("shard {shard}: {source}")]
    Seccomp {
        shard: usize,
        source: crate::seccomp::SeccompError,
    },
}

/// Failures of a running event loop.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("epoll_create1: {0}")]
    EpollCreate(io::Error),
    #[error("epoll_ctl: {0}")]
    EpollCtl(io::Error),
    #[error("epoll_wait: {0}")]
    EpollWait(io::Error),
    #[error("configuring the listener: {0}")]
    Listener(io::Error),
    #[error("io_uring_enter: {0}")]
    Submit(io::Error),
    #[error("reading the wake-up eventfd: {0}")]
    Waker(io::Error),
}

enum ShardLoop {
    Uring(Box<uring::UringLoop>),
    Epoll(Box<epoll::EpollLoop>),
}

impl ShardLoop {
    fn run(self) -> Result<(), LoopError> {
        match self {
            ShardLoop::Uring(l) => l.run(),
            ShardLoop::Epoll(l) => l.run(),
        }
    }
}

/// A running server. Dropping it without [`ServerHandle::wait`] stops the
/// server immediately (cancelling in-flight execs).
pub struct ServerHandle {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    threads: Vec<JoinHandle<Result<(), LoopError>>>,
}

impl ServerHandle {
    /// The bound address (with the real port when the config asked for 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn backend(&self) -> Backend {
        self.shared.backend
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> &ServeConfig {
        &self.shared.config
    }

    /// Starts draining: stop accepting, finish in-flight requests (cancelling
    /// execs still running after the drain timeout), then the shards exit.
    pub fn shutdown(&self) {
        self.shared.request_shutdown(false);
    }

    /// Cancels in-flight execs and closes every connection now.
    pub fn force_shutdown(&self) {
        self.shared.request_shutdown(true);
    }

    /// Blocks until every shard has exited.
    pub fn wait(mut self) -> Result<(), ServerError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), ServerError> {
        let mut first_error = None;
        for (shard, thread) in self.threads.drain(..).enumerate() {
            let outcome = match thread.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(source)) => Err(ServerError::Loop { shard, source }),
                Err(_) => Err(ServerError::ShardPanicked(shard)),
            };
            if let Err(e) = outcome {
                // Take the others down too rather than serve with a hole.
                self.shared.request_shutdown(true);
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.request_shutdown(true);
            let _ = self.join();
        }
    }
}

/// Runs the server until SIGTERM or SIGINT, then drains and returns.
/// A second signal cancels what is still running.
pub fn serve(config: ServeConfig, factory: Arc<dyn LaneFactory>) -> Result<(), ServerError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(ServerError::Signals)?;
    let signal_handle = signals.handle();
    let seccomp = config.seccomp;
    let server = start(config, factory)?;
    let shared = server.shared.clone();
    let watcher = std::thread::Builder::new()
        .name("kvmfork-signals".into())
        .spawn(move || {
            if let Err(e) = crate::seccomp::install(crate::seccomp::ThreadKind::Helper, seccomp) {
                eprintln!("kvmfork serve: {e}: stopping");
                shared.request_shutdown(true);
                return;
            }
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    eprintln!("kvmfork serve: signal {signal}: draining (send again to stop now)");
                    shared.request_shutdown(false);
                } else {
                    eprintln!("kvmfork serve: signal {signal}: cancelling in-flight executions");
                    shared.request_shutdown(true);
                }
            }
        })
        .map_err(ServerError::Signals)?;
    let result = server.wait();
    signal_handle.close();
    let _ = watcher.join();
    if result.is_ok() {
        eprintln!("kvmfork serve: drained, exiting");
    }
    result
}

/// Starts the server in background threads and returns once it accepts
/// connections.
pub fn start(
    config: ServeConfig,
    factory: Arc<dyn LaneFactory>,
) -> Result<ServerHandle, ServerError> {
    config.validate().map_err(ServerError::Config)?;
    let keys = load_keys(&config)?;
    match &keys {
        Some(keys) => eprintln!(
            "kvmfork serve: auth on: {} API key(s) from {} (rate limit {}/s, burst {}, per key)",
            keys.len(),
            config.api_keys_file.display(),
            config.rate_limit,
            config.rate_burst
        ),
        None => eprintln!(
            "kvmfork serve: WARNING: auth OFF: no API keys file at {} (set {} or --api-keys-file)",
            config.api_keys_file.display(),
            API_KEYS_ENV
        ),
    }
    let backend = choose_backend(config.force_epoll);
    let languages = factory.languages();
    if languages.is_empty() {
        eprintln!("kvmfork serve: WARNING: no language is served; every exec will be refused");
    }
    let listeners = bind_listeners(config.listen, config.shards)?;
    // Privileges go once the ports are bound and before any filtered thread
    // exists. The pools open /dev/kvm as the new user: check it can.
    if let Some(name) = &config.user {
        let user = crate::privileges::lookup(name).map_err(ServerError::User)?;
        crate::privileges::drop_to(&user).map_err(ServerError::User)?;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| {
                ServerError::User(format!(
                    "user {} cannot open /dev/kvm ({e}): add it to the kvm group",
                    user.name
                ))
            })?;
        eprintln!(
            "kvmfork serve: running as user {} (uid {}, gid {})",
            user.name, user.uid, user.gid
        );
    }
    if config.refuse_root && crate::privileges::is_root() {
        return Err(ServerError::Root);
    }
    let local_addr = listeners[0]
        .local_addr()
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;

    let metrics: Vec<Arc<ShardMetrics>> = (0..config.shards)
        .map(|_| ShardMetrics::new(config.workers_per_shard))
        .collect();
    let wakers = (0..config.shards)
        .map(|_| Waker::new(backend == Backend::Epoll).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ServerError::Waker)?;
    let rules = DecodeRules {
        default_timeout: config.default_timeout,
        max_timeout: config.max_timeout,
        max_batch: config.max_batch,
        max_batch_time: config.max_batch_time,
        languages,
    };
    let rate = auth::RateLimiter::new(keys.as_ref());
    let keys_len = keys.as_ref().map_or(0, |k| k.len());
    let key_execs = (0..keys_len)
        .map(|_| std::sync::atomic::AtomicUsize::new(0))
        .collect();
    let shared = Arc::new(Shared {
        rate,
        auth_throttle: auth::AuthThrottle::new(
            config.auth_fail_limit,
            config.auth_fail_window,
            auth::THROTTLE_TRACKED_ADDRESSES,
        ),
        key_execs,
        config: config.clone(),
        factory: factory.clone(),
        keys,
        shards: metrics.clone(),
        wakers: wakers.clone(),
        backend,
        rules,
        started: Instant::now(),
        shutdown: AtomicBool::new(false),
        force: AtomicBool::new(false),
        schedulers: std::sync::OnceLock::new(),
        conns: connlimit::ConnLimiter::new(
            config.connection_limit(),
            config.max_connections_per_address,
        ),
    });

    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut handle = ServerHandle {
        shared: shared.clone(),
        local_addr,
        threads: Vec::with_capacity(config.shards),
    };
    // Every shard's workers first: any shard may hand a session request to
    // any other shard's worker.
    let mut pools = Vec::with_capacity(config.shards);
    let activity = fair::KeyActivity::new(keys_len);
    for shard in 0..config.shards {
        pools.push(WorkerPool::start(
            shard,
            config.workers_per_shard,
            config.seccomp,
            workers::QueueSettings {
                depth: config.queue_depth,
                activity: activity.clone(),
            },
            factory.clone(),
            metrics[shard].clone(),
            wakers[shard].clone(),
        )?);
    }
    let schedulers = pools.iter().map(WorkerPool::scheduler).collect();
    let _ = shared.schedulers.set(schedulers);
    for ((shard, listener), pool) in listeners.into_iter().enumerate().zip(pools) {
        let ctx = ShardCtx::new(shard, shared.clone(), pool);
        let waker = wakers[shard].clone();
        let recv_buffers = config.recv_buffers;
        let seccomp = config.seccomp;
        let core = (!cores.is_empty()).then(|| cores[shard % cores.len()]);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), ServerError>>(1);
        let thread = std::thread::Builder::new()
            .name(format!("kvmfork-shard{shard}"))
            .spawn(move || {
                if let Some(core) = core {
                    if !core_affinity::set_for_current(core) {
                        eprintln!(
                            "kvmfork serve: shard {shard}: could not pin to core {}",
                            core.id
                        );
                    }
                }
                // The filter goes on before the loop exists, so nothing this
                // thread does with a client's bytes runs unfiltered.
                if let Err(source) =
                    crate::seccomp::install(crate::seccomp::ThreadKind::EventLoop, seccomp)
                {
                    let _ = ready_tx.send(Err(ServerError::Seccomp { shard, source }));
                    return Ok(());
                }
                // The ring is created by the thread that uses it: io_uring
                // ties completion work to the submitting task.
                let shard_loop = match backend {
                    Backend::IoUring => uring::RingSetup::new(recv_buffers)
                        .map(|setup| {
                            ShardLoop::Uring(Box::new(uring::UringLoop::new(
                                setup, listener, waker, ctx,
                            )))
                        })
                        .map_err(|source| ServerError::Ring { shard, source }),
                    Backend::Epoll => epoll::EpollLoop::new(listener, waker, ctx)
                        .map(|l| ShardLoop::Epoll(Box::new(l)))
                        .map_err(|source| ServerError::LoopSetup { shard, source }),
                };
                match shard_loop {
                    Ok(shard_loop) => {
                        let _ = ready_tx.send(Ok(()));
                        shard_loop.run()
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        Ok(())
                    }
                }
            })
            .map_err(|source| ServerError::Spawn { shard, source })?;
        handle.threads.push(thread);
        // Dropping `handle` on error stops the shards already running.
        ready_rx
            .recv()
            .map_err(|_| ServerError::ShardPanicked(shard))??;
    }
    eprintln!(
        "kvmfork serve: listening on http://{local_addr} ({}, {} shard(s) x {} worker(s), queue {} per shard, at most {} connections, {} per address)",
        backend.name(),
        config.shards,
        config.workers_per_shard,
        config.queue_depth,
        shared.conns.total_cap(),
        config.max_connections_per_address
    );
    Ok(handle)
}

/// Loads the API keys, refusing to go without them where auth is required.
fn load_keys(config: &ServeConfig) -> Result<Option<ApiKeys>, ServerError> {
    let keys = ApiKeys::load(&config.api_keys_file, config.rate())?;
    if keys.is_none() && config.auth_required() {
        return Err(ServerError::AuthRequired {
            listen: config.listen,
            path: config.api_keys_file.clone(),
        });
    }
    Ok(keys)
}

/// The checks [`start`] makes of the configuration and the API keys file,
/// for callers with slow work to do first (building templates) that should
/// fail early on a bad configuration.
pub fn preflight(config: &ServeConfig) -> Result<(), ServerError> {
    config.validate().map_err(ServerError::Config)?;
    load_keys(config)?;
    if config.refuse_root && config.user.is_none() && crate::privileges::is_root() {
        return Err(ServerError::Root);
    }
    Ok(())
}

/// Probes io_uring once per process start and says why when falling back.
fn choose_backend(force_epoll: bool) -> Backend {
    if force_epoll {
        eprintln!("kvmfork serve: using epoll (--force-epoll)");
        return Backend::Epoll;
    }
    // Probed on a thread of its own so that no io_uring work is ever tied
    // to the caller's thread.
    let probed = std::thread::Builder::new()
        .name("kvmfork-uring-probe".into())
        .spawn(uring::probe)
        .map_err(|e| format!("spawning the probe thread: {e}"))
        .and_then(|t| {
            t.join()
                .unwrap_or_else(|_| Err("the io_uring probe panicked".into()))
        });
    match probed {
        Ok(()) => Backend::IoUring,
        Err(reason) => {
            eprintln!("kvmfork serve: io_uring unavailable ({reason}); serving with epoll");
            Backend::Epoll
        }
    }
}

/// One `SO_REUSEPORT` listener per shard on the same address; with port 0
/// the first listener's port is reused for the rest.
fn bind_listeners(addr: SocketAddr, shards: usize) -> Result<Vec<TcpListener>, ServerError> {
    let mut listeners = Vec::with_capacity(shards);
    let mut bound = addr;
    for _ in 0..shards {
        let listener = bind_reuseport(bound).map_err(|source| ServerError::Bind {
            addr: bound,
            source,
        })?;
        if bound.port() == 0 {
            bound = listener
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?;
        }
        listeners.push(listener);
    }
    Ok(listeners)
}

fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}
