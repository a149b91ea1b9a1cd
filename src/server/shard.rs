//! Per-shard application state: routing, auth, rate limits, admission to
//! the worker queue and building responses. Shared by both event loops;
//! owned and used by the shard's thread only.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::{retry_after_secs, ApiKeys, AuthThrottle, RateLimiter};
use super::config::ServeConfig;
use super::http::{Method, RequestHead, Response, PROMETHEUS_TEXT};
use super::metrics::{self, Endpoint, ShardMetrics};
use super::sessions::{self, SessionRoute};
use super::wire::{self, ApiError, DecodeRules, ExecSpec};
use super::workers::{Completion, ConnKey, Job, Refused, Scheduler, Waker, Work, WorkerPool};
use crate::api::{
    CancelToken, ExecFailure, ExecRequest, ExecResult, LaneFactory, Owner, SessionReply,
    TemplateAvailability,
};

/// Which event loop serves requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    IoUring,
    Epoll,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::IoUring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// Read-only state common to all shards, plus the shutdown flags.
pub struct Shared {
    pub config: ServeConfig,
    pub factory: Arc<dyn LaneFactory>,
    pub keys: Option<ApiKeys>,
    pub shards: Vec<Arc<ShardMetrics>>,
    pub wakers: Vec<Arc<Waker>>,
    pub backend: Backend,
    pub rules: DecodeRules,
    pub started: Instant,
    /// Stop accepting and drain.
    pub shutdown: AtomicBool,
    /// Cancel whatever is still running and exit now.
    pub force: AtomicBool,
    /// Every shard's run queue, by shard; set once all shards' workers
    /// run. A session request goes to the queue of its session's shard.
    pub schedulers: std::sync::OnceLock<Vec<Arc<Scheduler>>>,
    /// Open connections, total and per client address.
    pub conns: super::connlimit::ConnLimiter,
    /// Each API key's rate limit, shared by the shards (lock-free).
    pub rate: RateLimiter,
    /// Failed authentications per client address, shared by the shards
    /// (lock-free).
    pub auth_throttle: AuthThrottle,
    /// Each API key's execs queued or running, all shards (lock-free).
    pub key_execs: Vec<std::sync::atomic::AtomicUsize>,
}

impl Shared {
    pub fn request_shutdown(&self, force: bool) {
        if force {
            self.force.store(true, Ordering::Release);
        }
        self.shutdown.store(true, Ordering::Release);
        for waker in &self.wakers {
            waker.wake();
        }
    }
}

/// What the server routes a request to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Exec,
    ExecBatch,
    Health,
    Metrics,
    /// A `/v1/sandboxes…` or `/v1/checkpoints/…` route, for the API key `owner`.
    Session {
        route: SessionRoute,
        owner: Owner,
    },
}

/// Executions of one request that are queued or running.
pub struct PendingExec {
    pub endpoint: Endpoint,
    pub batch: bool,
    /// Set for a session operation; its answer arrives in `session_reply`.
    pub session: Option<SessionRoute>,
    pub session_reply: Option<SessionReply>,
    pub results: Vec<Option<ExecResult>>,
    pub remaining: usize,
    pub tokens: Vec<CancelToken>,
}

impl PendingExec {
    pub fn cancel(&self) {
        for token in &self.tokens {
            token.cancel();
        }
    }
}

/// A request's answer: now, or once its executions complete.
// Returned once per request and consumed at once: not worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Dispatch {
    Respond(Response),
    Pending(PendingExec),
}

/// `Retry-After` (seconds) of a `503 template_building` answer.
pub const TEMPLATE_BUILDING_RETRY_AFTER_SECS: u64 = 5;

/// The HTTP status used in metrics for a request whose client left first.
pub const STATUS_CLIENT_CLOSED: u16 = 499;

pub struct ShardCtx {
    pub shard: usize,
    pub shared: Arc<Shared>,
    pub metrics: Arc<ShardMetrics>,
    pub pool: WorkerPool,
    ids: IdGenerator,
    health_cache: Option<(Instant, Vec<u8>)>,
    /// Jobs submitted whose completion has not come back yet.
    pub jobs_in_flight: usize,
    pub draining: bool,
}

impl ShardCtx {
    pub fn new(shard: usize, shared: Arc<Shared>, pool: WorkerPool) -> Self {
        let metrics = shared.shards[shard].clone();
        ShardCtx {
            shard,
            metrics,
            pool,
            ids: IdGenerator::new(shard),
            health_cache: None,
            jobs_in_flight: 0,
            draining: false,
            shared,
        }
    }

    pub fn config(&self) -> &ServeConfig {
        &self.shared.config
    }

    /// Routes a parsed head and applies auth and rate limits before the body
    /// is read, so refused clients need not send it.
    pub fn admit(
        &mut self,
        head: &RequestHead,
        peer: IpAddr,
        now: Instant,
    ) -> Result<Route, (Endpoint, Response)> {
        if let Some(matched) = sessions::route(&head.path, head.method.as_str()) {
            let endpoint = Endpoint::Sandboxes;
            let route = match matched {
                Ok(route) => route,
                Err(allow) => {
                    let err = ApiError::new(
                        405,
                        "method_not_allowed",
                        format!("{} allows {allow}", head.path),
                    );
                    return Err((endpoint, error_response(&err).with_header("Allow", allow)));
                }
            };
            let owner = self.authorize(head, peer, endpoint, now)?;
            return Ok(Route::Session { route, owner });
        }
        let (route, allow) = match head.path.as_str() {
            "/v1/exec" => (Route::Exec, "POST"),
            "/v1/exec/batch" => (Route::ExecBatch, "POST"),
            "/v1/health" => (Route::Health, "GET, HEAD"),
            // Zeroboot's unversioned aliases (same handlers, auth and limits;
            // counted under the /v1 endpoint labels).
            "/exec" => (Route::Exec, "POST"),
            "/health" => (Route::Health, "GET, HEAD"),
            "/v1/metrics" => (Route::Metrics, "GET, HEAD"),
            _ => {
                let err = ApiError::new(404, "not_found", format!("no route for {}", head.path));
                return Err((Endpoint::Other, error_response(&err)));
            }
        };
        let endpoint = endpoint_of(route);
        let method_ok = match route {
            Route::Exec | Route::ExecBatch => head.method == Method::Post,
            Route::Health | Route::Metrics => matches!(head.method, Method::Get | Method::Head),
            Route::Session { .. } => unreachable!("matched above"),
        };
        if !method_ok {
            let err = ApiError::new(
                405,
                "method_not_allowed",
                format!("{} allows {allow}", head.path),
            );
            return Err((endpoint, error_response(&err).with_header("Allow", allow)));
        }
        if matches!(route, Route::Exec | Route::ExecBatch) {
            self.authorize(head, peer, endpoint, now)?;
        }
        Ok(route)
    }

    /// Auth, rate limit and drain checks for routes that run code; the
    /// caller's key index (None with auth off).
    fn authorize(
        &mut self,
        head: &RequestHead,
        peer: IpAddr,
        endpoint: Endpoint,
        now: Instant,
    ) -> Result<Owner, (Endpoint, Response)> {
        let mut owner = None;
        {
            if let Some(keys) = &self.shared.keys {
                // A throttled address is refused whatever key it sends: the
                // key is not even checked, so guessing learns nothing.
                if let Err(wait) = self.shared.auth_throttle.check(peer, now) {
                    let err = ApiError::new(
                        429,
                        "auth_throttled",
                        "too many failed authentications from this address; retry later",
                    );
                    let secs = retry_after_secs(wait);
                    return Err((
                        endpoint,
                        error_response(&err).with_header("Retry-After", secs.to_string()),
                    ));
                }
                let Some(key) = head.bearer.as_deref().and_then(|token| keys.lookup(token)) else {
                    self.shared.auth_throttle.record_failure(peer, now);
                    let err = ApiError::new(
                        401,
                        "unauthorized",
                        "missing or invalid API key (Authorization: Bearer <key>)",
                    );
                    return Err((
                        endpoint,
                        error_response(&err).with_header("WWW-Authenticate", "Bearer"),
                    ));
                };
                owner = Some(key);
                if let Err(wait) = self.shared.rate.try_acquire(key, now) {
                    let err =
                        ApiError::new(429, "rate_limited", "rate limit exceeded for this API key");
                    let secs = retry_after_secs(wait);
                    return Err((
                        endpoint,
                        error_response(&err).with_header("Retry-After", secs.to_string()),
                    ));
                }
            }
            if self.draining {
                return Err((
                    endpoint,
                    self.busy("shutting_down", "the server is shutting down"),
                ));
            }
        }
        Ok(owner)
    }

    /// Handles a complete request.
    pub fn dispatch(
        &mut self,
        route: Route,
        head: &RequestHead,
        body: &[u8],
        conn: ConnKey,
        now: Instant,
    ) -> Dispatch {
        match route {
            Route::Session { route, owner } => {
                self.dispatch_session(route, owner, head, body, conn)
            }
            Route::Health => Dispatch::Respond(self.health(now)),
            Route::Metrics => {
                let text = metrics::render(&self.shared.shards, self.shared.backend.name());
                Dispatch::Respond(Response {
                    status: 200,
                    content_type: PROMETHEUS_TEXT,
                    headers: Vec::new(),
                    body: text.into_bytes(),
                })
            }
            Route::Exec => match wire::decode_exec(body, &self.shared.rules) {
                Ok(spec) => match self.unavailable(std::slice::from_ref(&spec), false) {
                    Some(refusal) => Dispatch::Respond(refusal),
                    None => {
                        let owner = owner_of_batch(head, &self.shared);
                        self.submit(Endpoint::Exec, false, vec![spec], conn, owner)
                    }
                },
                Err(err) => Dispatch::Respond(error_response(&err)),
            },
            Route::ExecBatch if sessions::batch_source(body).is_some() => self.dispatch_session(
                SessionRoute::Batch,
                owner_of_batch(head, &self.shared),
                head,
                body,
                conn,
            ),
            Route::ExecBatch => match wire::decode_batch(body, &self.shared.rules) {
                Ok(specs) if specs.is_empty() => {
                    Dispatch::Respond(Response::json(200, br#"{"results":[]}"#.to_vec()))
                }
                Ok(specs) => match self.unavailable(&specs, true) {
                    Some(refusal) => Dispatch::Respond(refusal),
                    None => {
                        let owner = owner_of_batch(head, &self.shared);
                        self.submit(Endpoint::ExecBatch, true, specs, conn, owner)
                    }
                },
                Err(err) => Dispatch::Respond(error_response(&err)),
            },
        }
    }

    fn dispatch_session(
        &mut self,
        route: SessionRoute,
        owner: Owner,
        head: &RequestHead,
        body: &[u8],
        conn: ConnKey,
    ) -> Dispatch {
        if route == SessionRoute::List {
            let list = self.shared.factory.list_sessions(owner);
            return Dispatch::Respond(Response::json(200, sessions::list_json(&list)));
        }
        let node = self.shared.factory.node_name();
        let op = match sessions::decode(route, &head.path, body, owner, &node, &self.shared.rules) {
            Ok(op) => op,
            Err(err) => return Dispatch::Respond(error_response(&err)),
        };
        if let crate::api::SessionOp::Create {
            spec,
            from_checkpoint: None,
            ..
        } = &op
        {
            let spec = ExecSpec {
                code: String::new(),
                language: spec.language,
                timeout: Duration::ZERO,
            };
            if let Some(refusal) = self.unavailable(std::slice::from_ref(&spec), false) {
                return Dispatch::Respond(refusal);
            }
        }
        let target = sessions::target(&op);
        // A session exec counts once, a batch from a sandbox once per item.
        let execs = match &op {
            crate::api::SessionOp::Exec { .. } => 1,
            crate::api::SessionOp::Batch { reqs, .. } => reqs.len(),
            _ => 0,
        };
        let counted = match self.take_execs(owner, execs) {
            Ok(counted) => counted,
            Err(refusal) => return Dispatch::Respond(refusal),
        };
        let job = Job {
            conn,
            slot: 0,
            work: Work::Session(op),
            reply: None,
            owner,
            worker: target.map(|(_, worker)| worker),
            counted,
        };
        if let Err(refusal) = self.send_session(job, target, head) {
            self.release_execs(counted);
            return Dispatch::Respond(refusal);
        }
        self.jobs_in_flight += 1;
        self.metrics.stats().execs_in_flight += 1;
        Dispatch::Pending(PendingExec {
            endpoint: Endpoint::Sandboxes,
            batch: false,
            session: Some(route),
            session_reply: None,
            results: vec![None],
            remaining: 1,
            // Session runs outlive a client that goes away.
            tokens: Vec::new(),
        })
    }

    /// Queues a session job for its worker, on the shard whose lane holds
    /// the session (or for any worker of this shard, for a new session), in
    /// that shard's fair queue like stateless execs; or the refusal.
    fn send_session(
        &mut self,
        job: Job,
        target: Option<(usize, usize)>,
        head: &RequestHead,
    ) -> Result<(), Response> {
        let refused = match target {
            None => {
                if self.room() == 0 {
                    return Err(self.busy(
                        "queue_full",
                        "all workers are busy and the queue is full; retry later",
                    ));
                }
                self.pool.submit(job)
            }
            Some((shard, _)) => {
                let scheduler = self.shared.schedulers.get().and_then(|s| s.get(shard));
                let Some(scheduler) = scheduler else {
                    return Err(self.no_sandbox(head));
                };
                let job = Job {
                    reply: Some(self.pool.reply()),
                    ..job
                };
                scheduler.submit(job)
            }
        };
        match refused {
            Ok(()) => Ok(()),
            Err(Refused::NoWorker(_)) => Err(self.no_sandbox(head)),
            Err(Refused::Full(_)) if target.is_some() => Err(self.busy(
                "sandbox_busy",
                "too many requests are queued for this sandbox; retry later",
            )),
            Err(Refused::Full(_)) => Err(self.busy(
                "queue_full",
                "all workers are busy and the queue is full; retry later",
            )),
            Err(Refused::Closed(_)) => {
                Err(self.busy("shutting_down", "the server is shutting down"))
            }
        }
    }

    fn no_sandbox(&self, head: &RequestHead) -> Response {
        let text = sessions::path_sandbox_text(&head.path);
        error_response(&ApiError::new(
            404,
            "sandbox_not_found",
            format!("no sandbox {text} on this node"),
        ))
    }

    /// Counts `n` execs against `owner`'s cap on execs in flight (all
    /// shards: one atomic counter per key, no lock), or the `429
    /// too_many_execs` refusal. Without auth (no key) nothing is counted.
    fn take_execs(&self, owner: Owner, n: usize) -> Result<Option<(usize, usize)>, Response> {
        let Some(key) = owner else { return Ok(None) };
        if n == 0 {
            return Ok(None);
        }
        let cap = self.config().max_execs_per_key;
        let counter = &self.shared.key_execs[key];
        let mut current = counter.load(Ordering::Relaxed);
        loop {
            if current + n > cap {
                let err = ApiError::new(
                    429,
                    "too_many_execs",
                    format!(
                        "this API key has {current} executions queued or running \
                         (at most {cap}); retry when some finish"
                    ),
                );
                return Err(error_response(&err)
                    .with_header("Retry-After", self.config().retry_after_busy.to_string()));
            }
            match counter.compare_exchange_weak(
                current,
                current + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(Some((key, n))),
                Err(now) => current = now,
            }
        }
    }

    fn release_execs(&self, counted: Option<(usize, usize)>) {
        if let Some((key, n)) = counted {
            self.shared.key_execs[key].fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// The refusal for the first spec whose language's template is not
    /// ready: `503 template_building` (with `Retry-After`) while it is being
    /// built, `500 template_failed` naming the failure if its build failed.
    fn unavailable(&self, specs: &[ExecSpec], batch: bool) -> Option<Response> {
        specs.iter().enumerate().find_map(|(i, spec)| {
            let availability = self.shared.factory.availability(spec.language);
            if availability == TemplateAvailability::Ready {
                return None;
            }
            let lang = spec.language.as_str();
            let prefix = if batch {
                format!("executions[{i}]: ")
            } else {
                String::new()
            };
            match availability {
                TemplateAvailability::Ready => None,
                TemplateAvailability::Building => {
                    let err = ApiError::new(
                        503,
                        "template_building",
                        format!(
                            "{prefix}the {lang} template is still being built or loaded; \
                             retry later (GET /v1/health shows its state)"
                        ),
                    );
                    Some(error_response(&err).with_header(
                        "Retry-After",
                        TEMPLATE_BUILDING_RETRY_AFTER_SECS.to_string(),
                    ))
                }
                TemplateAvailability::Failed(why) => Some(error_response(&ApiError::new(
                    500,
                    "template_failed",
                    format!("{prefix}the {lang} template failed to build or load: {why}"),
                ))),
                TemplateAvailability::NotServed => Some(error_response(&ApiError::new(
                    400,
                    "unknown_language",
                    format!("{prefix}this server does not serve language `{lang}`"),
                ))),
            }
        })
    }

    /// Room for more stateless execs in this shard's queue (at most
    /// `queue_depth` wait).
    fn room(&self) -> usize {
        self.pool.room()
    }

    /// Admits a request's execs into the fair queue (all or none); free
    /// workers take them in fair order.
    fn submit(
        &mut self,
        endpoint: Endpoint,
        batch: bool,
        specs: Vec<ExecSpec>,
        conn: ConnKey,
        owner: Owner,
    ) -> Dispatch {
        if self.room() < specs.len() {
            return Dispatch::Respond(self.busy(
                "queue_full",
                "all workers are busy and the queue is full; retry later",
            ));
        }
        let n = specs.len();
        let counted = match self.take_execs(owner, n) {
            Ok(counted) => counted,
            Err(refusal) => return Dispatch::Respond(refusal),
        };
        let mut tokens = Vec::with_capacity(n);
        let mut not_queued = Vec::new();
        for (slot, spec) in specs.into_iter().enumerate() {
            let cancel = CancelToken::new();
            tokens.push(cancel.clone());
            let req = ExecRequest {
                code: spec.code,
                language: spec.language,
                timeout: spec.timeout,
                cancel,
            };
            let job = Job {
                conn,
                slot,
                work: Work::Exec(req),
                reply: None,
                owner,
                worker: None,
                // Each item is released as it completes.
                counted: counted.map(|(key, _)| (key, 1)),
            };
            if let Err(refused) = self.pool.submit(job) {
                // Only this thread adds stateless jobs and room was checked,
                // so only shutdown refuses: the earlier items run and are
                // counted; the others are answered as cancelled.
                let job = match refused {
                    Refused::Full(job) | Refused::Closed(job) | Refused::NoWorker(job) => job,
                };
                self.release_execs(job.counted);
                tokens.last().expect("pushed above").cancel();
                not_queued.push(slot);
            }
        }
        let queued = n - not_queued.len();
        if queued == 0 {
            return Dispatch::Respond(self.busy("shutting_down", "the server is shutting down"));
        }
        self.jobs_in_flight += queued;
        self.metrics.stats().execs_in_flight += queued as u64;
        let mut results = vec![None; n];
        for slot in not_queued {
            results[slot] = Some(ExecResult {
                exit_code: -1,
                failure: Some(ExecFailure::Cancelled),
                ..Default::default()
            });
        }
        Dispatch::Pending(PendingExec {
            endpoint,
            batch,
            session: None,
            session_reply: None,
            results,
            remaining: queued,
            tokens,
        })
    }

    /// Accounts for a finished job, whether or not its connection is still open.
    pub fn job_finished(&mut self, completion: &Completion) {
        self.jobs_in_flight -= 1;
        self.release_execs(completion.counted);
        let mut stats = self.metrics.stats();
        stats.execs_in_flight = stats.execs_in_flight.saturating_sub(1);
        let ran_code = match &completion.session {
            None => true,
            Some(reply) => matches!(reply, SessionReply::Exec { .. }),
        };
        if let Some(reply) = &completion.session {
            stats.record_session(reply);
        }
        if completion.ran && ran_code {
            stats.record_exec(&completion.result);
        } else if completion.ran {
            // A session operation that ran no code.
        } else {
            stats.cancelled += 1;
        }
    }

    /// Builds the response once all of a request's executions are back.
    pub fn finish(&mut self, mut pending: PendingExec) -> Response {
        if pending.session.is_some() {
            let reply = pending.session_reply.take().unwrap_or_else(|| {
                SessionReply::Error(crate::api::SessionError::new(
                    500,
                    "internal",
                    "the worker sent no answer",
                ))
            });
            let ids = &mut self.ids;
            let cap = self.shared.config.max_response_output_bytes;
            let (status, body) = sessions::encode(&reply, &mut || ids.next(), cap);
            return Response::json(status, body);
        }
        let results: Vec<ExecResult> = pending
            .results
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        if !pending.batch {
            let result = &results[0];
            // Failures that are about the request rather than the run.
            let refused = match &result.failure {
                Some(ExecFailure::Rejected(m)) => Some(ApiError::new(400, "rejected", m.clone())),
                Some(ExecFailure::NoTemplate) => Some(ApiError::new(
                    400,
                    "unknown_language",
                    "no template is loaded for this language",
                )),
                Some(ExecFailure::Internal(m)) => Some(ApiError::new(
                    500,
                    "internal",
                    wire::internal_error(&self.ids.next(), m),
                )),
                _ => None,
            };
            if let Some(err) = refused {
                return error_response(&err);
            }
            let cap = self.config().max_response_output_bytes;
            let mut body = Vec::with_capacity(256 + result.stdout.len() * 2 + result.stderr.len());
            wire::write_exec_result(&mut body, &self.ids.next(), result, cap);
            return Response::json(200, body);
        }
        let cap = self.config().max_response_output_bytes;
        let mut body = Vec::with_capacity(256 * results.len());
        let ids = &mut self.ids;
        wire::write_batch(&mut body, &results, &mut || ids.next(), cap);
        Response::json(200, body)
    }

    pub fn request_started(&mut self) {
        self.metrics.stats().requests_in_flight += 1;
    }

    /// Counts an answered request; `started` says whether
    /// [`ShardCtx::request_started`] was called for it.
    pub fn request_done(&mut self, endpoint: Endpoint, status: u16, started: bool) {
        let mut stats = self.metrics.stats();
        *stats.requests.entry((endpoint, status)).or_default() += 1;
        if started {
            stats.requests_in_flight = stats.requests_in_flight.saturating_sub(1);
        }
    }

    /// Admits a just-accepted connection from `peer` under the connection
    /// caps, or returns the complete response that refuses it (`503
    /// too_many_connections`, `Connection: close`) for the caller to write
    /// before closing the socket.
    pub fn connection_opened(&mut self, peer: IpAddr) -> Result<(), Vec<u8>> {
        if let Err(refusal) = self.shared.conns.try_open(peer) {
            self.metrics.stats().connections_refused += 1;
            let err = ApiError::new(503, "too_many_connections", refusal.message());
            let mut out = Vec::with_capacity(320);
            error_response(&err)
                .with_header("Retry-After", self.config().retry_after_busy.to_string())
                .write_to(&mut out, false, false);
            return Err(out);
        }
        let mut stats = self.metrics.stats();
        stats.connections_open += 1;
        stats.connections_accepted += 1;
        Ok(())
    }

    /// A connection admitted by [`ShardCtx::connection_opened`] closed.
    pub fn connection_closed(&mut self, peer: IpAddr) {
        self.shared.conns.close(peer);
        let mut stats = self.metrics.stats();
        stats.connections_open = stats.connections_open.saturating_sub(1);
    }

    fn busy(&self, code: &'static str, message: &str) -> Response {
        let err = ApiError::new(503, code, message);
        error_response(&err).with_header("Retry-After", self.config().retry_after_busy.to_string())
    }

    /// Health is cached for a second per shard so that frequent probes do
    /// not lock every shard's statistics on each request.
    fn health(&mut self, now: Instant) -> Response {
        let status = if self.draining { 503 } else { 200 };
        if let Some((at, body)) = &self.health_cache {
            if now.saturating_duration_since(*at) < Duration::from_secs(1) && status == 200 {
                return Response::json(status, body.clone());
            }
        }
        let snap = metrics::snapshot(&self.shared.shards);
        let body = serde_json::json!({
            "status": if self.draining { "draining" } else { "ok" },
            "io_backend": self.shared.backend.name(),
            "uptime_seconds": now.saturating_duration_since(self.shared.started).as_secs(),
            "auth": self.shared.keys.is_some(),
            "languages": self.shared.rules.languages.iter()
                .filter(|&&l| self.shared.factory.availability(l) == TemplateAvailability::Ready)
                .map(|l| l.as_str()).collect::<Vec<_>>(),
            "templates": self.shared.factory.templates(),
            "pool": snap.lanes,
            "queue": {
                "queued": snap.queued,
                "execs_in_flight": snap.stats.execs_in_flight,
                "capacity_per_shard": self.config().queue_depth,
                "workers_per_shard": self.config().workers_per_shard,
            },
            "connections_open": snap.stats.connections_open,
            "connections_refused": snap.stats.connections_refused,
            "shards": snap.per_shard,
        });
        let body = serde_json::to_vec(&body).expect("serialising a JSON value cannot fail");
        self.health_cache = Some((now, body.clone()));
        Response::json(status, body)
    }
}

/// The key of an already-authorised exec or batch request (auth ran in `admit`).
fn owner_of_batch(head: &RequestHead, shared: &Shared) -> Owner {
    shared
        .keys
        .as_ref()
        .and_then(|keys| head.bearer.as_deref().and_then(|t| keys.lookup(t)))
}

fn endpoint_of(route: Route) -> Endpoint {
    match route {
        Route::Exec => Endpoint::Exec,
        Route::ExecBatch => Endpoint::ExecBatch,
        Route::Health => Endpoint::Health,
        Route::Metrics => Endpoint::Metrics,
        Route::Session { .. } => Endpoint::Sandboxes,
    }
}

pub fn route_endpoint(route: Route) -> Endpoint {
    endpoint_of(route)
}

pub fn error_response(err: &ApiError) -> Response {
    Response::json(err.status, err.to_json())
}

/// Unique, unguessable-enough exec ids shaped like UUIDs: a random per-shard
/// prefix and a bijective scramble of a counter.
struct IdGenerator {
    prefix: u64,
    salt: u64,
    counter: u64,
}

impl IdGenerator {
    fn new(shard: usize) -> Self {
        let mut seed = [0u64; 2];
        // SAFETY: getrandom writes at most 16 bytes into the live array.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), 16, 0) };
        if n != 16 {
            // Uniqueness still holds (shard + counter); only guessability suffers.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            seed = [nanos, nanos.rotate_left(17) ^ std::process::id() as u64];
        }
        // The shard number in the top byte keeps shards' ids apart.
        IdGenerator {
            prefix: (seed[0] >> 8) | ((shard as u64 & 0xff) << 56),
            salt: seed[1],
            counter: 0,
        }
    }

    fn next(&mut self) -> String {
        self.counter += 1;
        let lo = splitmix64(self.counter ^ self.salt);
        let hi = self.prefix;
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xffff,
            hi & 0xffff,
            lo >> 48,
            lo & 0xffff_ffff_ffff
        )
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_uuid_shaped() {
        let mut ids = IdGenerator::new(3);
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }
}
