//! The HTTP/1.1 connection state machine, independent of the event loop:
//! bytes in, response bytes out. One request is processed at a time;
//! pipelined requests wait in the input buffer, so responses go out in order.

use std::net::IpAddr;
use std::time::Instant;

use super::http::{self, HeadLimits, HeadScan, Method, RequestHead, Response};
use super::metrics::Endpoint;
use super::shard::{self, Dispatch, PendingExec, Route, ShardCtx, STATUS_CLIENT_CLOSED};
use super::wire::ApiError;
use super::workers::{Completion, ConnKey};

// One per connection, replaced in place: boxing the large variant would add
// an allocation per request for no saving.
#[allow(clippy::large_enum_variant)]
enum State {
    /// Waiting for (the rest of) a request head.
    Head,
    /// Head accepted; waiting until `head.content_length` body bytes are buffered.
    Body { head: RequestHead, route: Route },
    /// A refused request's body is being skipped so the connection stays usable.
    Discard { remaining: u64 },
    /// Executions are queued or running for the current request.
    Exec {
        head: RequestHead,
        pending: PendingExec,
    },
    /// No further requests are read; close once the output is flushed.
    Closed,
}

/// What the event loop should do with a connection after a timer check.
#[derive(Debug, PartialEq, Eq)]
pub enum TimerVerdict {
    Keep,
    Close,
}

pub struct HttpConn {
    key: ConnKey,
    inbuf: Vec<u8>,
    /// Response bytes not yet handed to the socket; the event loop takes them.
    pub out: Vec<u8>,
    state: State,
    /// Last time a byte arrived or a response was produced (idle timeout).
    last_activity: Instant,
    /// Last time the socket accepted response bytes (send timeout).
    last_send_progress: Instant,
    /// First byte of the request being read (slow-client timeout).
    request_started: Option<Instant>,
    /// The peer left (or must be dropped): close without flushing.
    peer_gone: bool,
    /// The client's address (failed-authentication throttle, connection caps).
    peer: IpAddr,
    /// Progress of the search for the end of the head being received.
    head_scan: HeadScan,
    /// The request line of that head was already parsed once (so that a
    /// client sending no HTTP is refused before its head is complete).
    request_line_checked: bool,
    /// Response bytes the event loop took from `out` and has not sent yet.
    held: usize,
    /// Work done on request heads: parser runs and bytes they were given
    /// (the unit tests check it stays linear in the bytes received).
    head_parses: u64,
    head_bytes_parsed: u64,
}

impl HttpConn {
    pub fn new(key: ConnKey, peer: IpAddr, now: Instant) -> Self {
        HttpConn {
            key,
            peer,
            inbuf: Vec::new(),
            out: Vec::new(),
            state: State::Head,
            last_activity: now,
            last_send_progress: now,
            request_started: None,
            peer_gone: false,
            head_scan: HeadScan::default(),
            request_line_checked: false,
            held: 0,
            head_parses: 0,
            head_bytes_parsed: 0,
        }
    }

    pub fn peer(&self) -> IpAddr {
        self.peer
    }

    /// Response bytes not yet sent: in `out` plus what the event loop holds.
    fn unsent(&self) -> usize {
        self.out.len() + self.held
    }

    /// True while unsent output is over the limit: no further request is
    /// started and nothing more is read until the client reads.
    fn output_full(&self, ctx: &ShardCtx) -> bool {
        self.unsent() > ctx.config().max_pending_output_bytes
    }

    /// True once the connection should be closed as soon as `out` (and any
    /// send the event loop has in progress) is flushed.
    pub fn is_closing(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Whether the event loop should keep reading. Reading continues during an
    /// exec (to notice a client that leaves) until pipelined input piles up.
    /// Reading also stops while the client does not read its responses
    /// (output over `max_pending_output_bytes`), so a pipelined flood cannot
    /// grow either buffer without bound.
    pub fn wants_read(&self, ctx: &ShardCtx) -> bool {
        let input_full =
            self.inbuf.len() > ctx.config().max_head_bytes + ctx.config().max_body_bytes;
        !matches!(self.state, State::Closed) && !input_full && !self.output_full(ctx)
    }

    /// True when the connection is to be dropped without flushing output.
    pub fn peer_gone(&self) -> bool {
        self.peer_gone
    }

    /// Feeds received bytes and processes every complete request they finish.
    pub fn on_data(&mut self, ctx: &mut ShardCtx, data: &[u8], now: Instant) {
        if matches!(self.state, State::Closed) {
            return;
        }
        self.last_activity = now;
        self.inbuf.extend_from_slice(data);
        self.advance(ctx, now);
    }

    /// The event loop took response bytes from `out`: `held` of them are
    /// not sent yet.
    pub fn set_held(&mut self, held: usize) {
        self.held = held;
    }

    /// The socket accepted response bytes; `held` are still unsent in the
    /// event loop. Pipelined requests that waited for the client to read
    /// are processed once the output is under its limit again.
    pub fn on_sent(&mut self, ctx: &mut ShardCtx, held: usize, now: Instant) {
        self.held = held;
        self.last_send_progress = now;
        if !self.output_full(ctx) && !self.inbuf.is_empty() {
            self.advance(ctx, now);
        }
    }

    /// The peer closed or reset the connection: cancel whatever runs for it.
    pub fn on_peer_closed(&mut self, ctx: &mut ShardCtx) {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Exec { pending, .. } => {
                pending.cancel();
                ctx.request_done(pending.endpoint, STATUS_CLIENT_CLOSED, true);
            }
            State::Body { route, .. } => {
                ctx.request_done(shard::route_endpoint(route), STATUS_CLIENT_CLOSED, true)
            }
            _ => {}
        }
        self.out.clear();
        self.peer_gone = true;
    }

    pub fn on_completion(&mut self, ctx: &mut ShardCtx, completion: Completion, now: Instant) {
        let State::Exec { pending, .. } = &mut self.state else {
            return;
        };
        if pending.session.is_some() {
            pending.session_reply = completion.session;
        }
        let Some(slot) = pending.results.get_mut(completion.slot) else {
            return;
        };
        if slot.replace(completion.result).is_none() {
            pending.remaining -= 1;
        }
        if pending.remaining > 0 {
            return;
        }
        let State::Exec { head, pending } = std::mem::replace(&mut self.state, State::Head) else {
            unreachable!()
        };
        let endpoint = pending.endpoint;
        let response = ctx.finish(pending);
        self.respond(ctx, &head, endpoint, response, true, now);
        self.advance(ctx, now);
    }

    /// Server shutdown began: an idle connection closes now; others finish
    /// their current request (answered with `Connection: close`).
    pub fn on_drain(&mut self) {
        if matches!(self.state, State::Head)
            && self.inbuf.is_empty()
            && self.request_started.is_none()
        {
            self.state = State::Closed;
        }
    }

    /// The drain deadline passed: stop the executions of this connection.
    pub fn cancel_execs(&self) {
        if let State::Exec { pending, .. } = &self.state {
            pending.cancel();
        }
    }

    /// Applies idle, slow-client and send timeouts. `send_pending` tells
    /// whether the event loop still holds unsent response bytes.
    pub fn on_timer(
        &mut self,
        ctx: &mut ShardCtx,
        now: Instant,
        send_pending: bool,
    ) -> TimerVerdict {
        let config = ctx.config();
        let (idle, request, send) = (
            config.idle_timeout,
            config.request_timeout,
            config.send_timeout,
        );
        let sending = send_pending || !self.out.is_empty();
        if sending && now.saturating_duration_since(self.last_send_progress) > send {
            return TimerVerdict::Close;
        }
        match &self.state {
            State::Head | State::Body { .. } | State::Discard { .. } => {
                if let Some(started) = self.request_started {
                    if now.saturating_duration_since(started) > request {
                        let endpoint = match &self.state {
                            State::Body { route, .. } => Some(shard::route_endpoint(*route)),
                            _ => None,
                        };
                        let err = ApiError::new(
                            408,
                            "request_timeout",
                            "the request was not received in time",
                        );
                        self.respond_error(ctx, endpoint, &err);
                        return TimerVerdict::Keep;
                    }
                } else if !sending && now.saturating_duration_since(self.last_activity) > idle {
                    return TimerVerdict::Close;
                }
            }
            State::Exec { .. } | State::Closed => {}
        }
        TimerVerdict::Keep
    }

    fn advance(&mut self, ctx: &mut ShardCtx, now: Instant) {
        loop {
            match &mut self.state {
                State::Closed | State::Exec { .. } => return,
                State::Discard { remaining } => {
                    let take = (*remaining).min(self.inbuf.len() as u64) as usize;
                    self.inbuf.drain(..take);
                    *remaining -= take as u64;
                    if *remaining > 0 {
                        return;
                    }
                    self.state = State::Head;
                    self.request_started = None;
                }
                State::Body { head, .. } => {
                    let len = head.content_length as usize;
                    if self.inbuf.len() < len {
                        return;
                    }
                    let State::Body { head, route } =
                        std::mem::replace(&mut self.state, State::Head)
                    else {
                        unreachable!()
                    };
                    let dispatch = ctx.dispatch(route, &head, &self.inbuf[..len], self.key, now);
                    self.inbuf.drain(..len);
                    self.request_started = None;
                    match dispatch {
                        Dispatch::Respond(response) => self.respond(
                            ctx,
                            &head,
                            shard::route_endpoint(route),
                            response,
                            true,
                            now,
                        ),
                        Dispatch::Pending(pending) => self.state = State::Exec { head, pending },
                    }
                }
                State::Head => {
                    if self.head_scan.scanned == 0 {
                        let blank = http::leading_blank_lines(&self.inbuf);
                        self.inbuf.drain(..blank);
                    }
                    if self.inbuf.is_empty() {
                        if ctx.draining {
                            // Idle after finishing (or skipping) a request while draining.
                            self.state = State::Closed;
                        }
                        return;
                    }
                    if self.output_full(ctx) {
                        // The client is not reading its answers: the next
                        // request waits (resumed from `on_sent`; the send
                        // timeout ends a client that never reads).
                        return;
                    }
                    self.request_started.get_or_insert(now);
                    let limits = HeadLimits {
                        max_head_bytes: ctx.config().max_head_bytes,
                        max_headers: ctx.config().max_headers,
                    };
                    // The parser runs when the head is complete, and once
                    // when its request line is (to refuse non-HTTP early):
                    // never again for each byte that arrives.
                    let end = self.head_scan.find_end(&self.inbuf);
                    let check_line =
                        end.is_none() && self.head_scan.line_end_seen && !self.request_line_checked;
                    let parsed = if end.is_some() || check_line {
                        self.request_line_checked = true;
                        let upto = end.unwrap_or(self.inbuf.len());
                        self.head_parses += 1;
                        self.head_bytes_parsed += upto as u64;
                        http::parse_head(&self.inbuf[..upto], limits)
                    } else {
                        Ok(None)
                    };
                    match parsed {
                        Ok(None) => {
                            if http::head_too_large(&self.inbuf, limits) {
                                let err = http::HeadError::TooLarge(limits.max_head_bytes);
                                self.respond_error(
                                    ctx,
                                    None,
                                    &ApiError::new(err.status(), err.code(), err.to_string()),
                                );
                            }
                            return;
                        }
                        Err(err) => {
                            self.respond_error(
                                ctx,
                                None,
                                &ApiError::new(err.status(), err.code(), err.to_string()),
                            );
                            return;
                        }
                        Ok(Some(head)) => {
                            self.inbuf.drain(..head.head_len);
                            self.head_scan = HeadScan::default();
                            self.request_line_checked = false;
                            self.on_head(ctx, head, now);
                        }
                    }
                }
            }
        }
    }

    fn on_head(&mut self, ctx: &mut ShardCtx, head: RequestHead, now: Instant) {
        ctx.request_started();
        let max_body = ctx.config().max_body_bytes as u64;
        let route = match ctx.admit(&head, self.peer, now) {
            Ok(route) => route,
            Err((endpoint, response)) => {
                self.refuse(ctx, head, endpoint, response, now);
                return;
            }
        };
        if head.content_length > max_body {
            let err = ApiError::new(
                413,
                "body_too_large",
                format!("request bodies are limited to {max_body} bytes"),
            );
            // The body is not read, so the connection cannot continue.
            self.respond(
                ctx,
                &head,
                shard::route_endpoint(route),
                shard::error_response(&err),
                false,
                now,
            );
            return;
        }
        if head.expect_continue && (self.inbuf.len() as u64) < head.content_length {
            self.out.extend_from_slice(http::CONTINUE_100);
        }
        self.state = State::Body { head, route };
    }

    /// Answers a request refused from its head alone, then skips its body
    /// (or closes, when the client is waiting for 100-continue or the body is
    /// too large to bother with).
    fn refuse(
        &mut self,
        ctx: &mut ShardCtx,
        head: RequestHead,
        endpoint: Endpoint,
        response: Response,
        now: Instant,
    ) {
        let unread = head.content_length.saturating_sub(self.inbuf.len() as u64);
        let skippable = !head.expect_continue || unread == 0;
        let keep_alive = skippable && head.content_length <= ctx.config().max_body_bytes as u64;
        let remaining = head.content_length;
        self.respond(ctx, &head, endpoint, response, keep_alive, now);
        if !self.is_closing() && remaining > 0 {
            self.state = State::Discard { remaining };
            self.request_started = Some(now);
        }
    }

    /// Writes a response for a request whose head was parsed.
    fn respond(
        &mut self,
        ctx: &mut ShardCtx,
        head: &RequestHead,
        endpoint: Endpoint,
        response: Response,
        allow_keep_alive: bool,
        now: Instant,
    ) {
        let keep_alive = allow_keep_alive && head.keep_alive && !ctx.draining;
        ctx.request_done(endpoint, response.status, true);
        response.write_to(&mut self.out, keep_alive, head.method == Method::Head);
        self.last_activity = now;
        if !keep_alive {
            self.state = State::Closed;
        }
    }

    /// Answers an error that ends the connection (unparsable input, timeouts).
    fn respond_error(&mut self, ctx: &mut ShardCtx, endpoint: Option<Endpoint>, err: &ApiError) {
        ctx.request_done(
            endpoint.unwrap_or(Endpoint::Other),
            err.status,
            endpoint.is_some(),
        );
        shard::error_response(err).write_to(&mut self.out, false, false);
        self.state = State::Closed;
        self.inbuf.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::api::{ExecRequest, ExecResult, Lane, LaneFactory, LaneStats, Language};
    use crate::server::config::ServeConfig;
    use crate::server::metrics::ShardMetrics;
    use crate::server::shard::{Backend, Shared};
    use crate::server::wire::DecodeRules;
    use crate::server::workers::{Waker, WorkerPool};

    /// TEST-ONLY lanes that echo the code back.
    struct EchoFactory;
    struct EchoLane;
    impl Lane for EchoLane {
        fn exec(&mut self, req: &ExecRequest) -> ExecResult {
            ExecResult {
                stdout: req.code.clone().into_bytes(),
                ..Default::default()
            }
        }
        fn stats(&self) -> LaneStats {
            LaneStats::default()
        }
    }
    impl LaneFactory for EchoFactory {
        fn new_lane(&self, _shard: usize) -> Result<Box<dyn Lane>, String> {
            Ok(Box::new(EchoLane))
        }
        fn languages(&self) -> Vec<Language> {
            vec![Language::Python]
        }
        fn templates(&self) -> serde_json::Map<String, serde_json::Value> {
            serde_json::Map::new()
        }
    }

    fn test_ctx() -> ShardCtx {
        let config = ServeConfig {
            max_head_bytes: 512,
            max_headers: 16,
            max_body_bytes: 256,
            queue_depth: 4,
            max_batch: 4,
            max_pending_output_bytes: 4096,
            api_keys_file: "/nonexistent/kvmfork-keys.json".into(),
            ..ServeConfig::default()
        };
        let factory: Arc<dyn LaneFactory> = Arc::new(EchoFactory);
        let metrics = vec![ShardMetrics::new(1)];
        let waker = Arc::new(Waker::new(true).unwrap());
        let rules = DecodeRules {
            default_timeout: config.default_timeout,
            max_timeout: config.max_timeout,
            max_batch: config.max_batch,
            max_batch_time: config.max_batch_time,
            languages: vec![Language::Python],
        };
        let pool = WorkerPool::start(
            0,
            1,
            crate::seccomp::Mode::Off,
            crate::server::workers::QueueSettings {
                depth: config.queue_depth,
                activity: crate::server::fair::KeyActivity::new(0),
            },
            factory.clone(),
            metrics[0].clone(),
            waker.clone(),
        )
        .unwrap();
        let shared = Arc::new(Shared {
            config,
            factory,
            keys: None,
            shards: metrics,
            wakers: vec![waker],
            backend: Backend::Epoll,
            rules,
            started: Instant::now(),
            shutdown: AtomicBool::new(false),
            force: AtomicBool::new(false),
            schedulers: std::sync::OnceLock::new(),
            conns: crate::server::connlimit::ConnLimiter::new(16, 16),
            rate: crate::server::auth::RateLimiter::new(None),
            auth_throttle: crate::server::auth::AuthThrottle::new(0, Duration::from_secs(1), 1),
            key_execs: Vec::new(),
        });
        ShardCtx::new(0, shared, pool)
    }

    const KEY: ConnKey = ConnKey {
        index: 0,
        generation: 1,
    };

    /// Feeds `chunks`, delivering completions as they arrive; returns the output.
    fn run(ctx: &mut ShardCtx, chunks: &[Vec<u8>], wait_for_execs: bool) -> (HttpConn, Vec<u8>) {
        let now = Instant::now();
        let mut conn = HttpConn::new(KEY, IpAddr::from([127, 0, 0, 1]), now);
        let mut out = Vec::new();
        for chunk in chunks {
            conn.on_data(ctx, chunk, now);
            out.append(&mut conn.out);
            while let Some(c) = ctx.pool.try_completion() {
                ctx.job_finished(&c);
                conn.on_completion(ctx, c, now);
                out.append(&mut conn.out);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while wait_for_execs && ctx.jobs_in_flight > 0 && Instant::now() < deadline {
            if let Some(c) = ctx.pool.try_completion() {
                ctx.job_finished(&c);
                conn.on_completion(ctx, c, now);
                out.append(&mut conn.out);
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        (conn, out)
    }

    #[test]
    fn pipelined_requests_in_odd_chunks_answer_in_order() {
        let mut ctx = test_ctx();
        let mut stream = Vec::new();
        for i in 0..6 {
            let body = format!(r#"{{"code":"c{i}"}}"#);
            stream.extend(
                format!(
                    "POST /v1/exec HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .bytes(),
            );
        }
        let chunks: Vec<Vec<u8>> = stream.chunks(7).map(<[u8]>::to_vec).collect();
        let (_, out) = run(&mut ctx, &chunks, true);
        let text = String::from_utf8(out).unwrap();
        let positions: Vec<usize> = (0..6)
            .map(|i| text.find(&format!(r#""stdout":"c{i}""#)).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 6);
    }

    #[test]
    fn a_head_trickled_byte_by_byte_is_parsed_in_linear_work() {
        let mut ctx = test_ctx();
        let now = Instant::now();
        let mut conn = HttpConn::new(KEY, IpAddr::from([127, 0, 0, 1]), now);
        let mut head = String::from("\r\nGET /v1/health HTTP/1.1\r\n");
        for i in 0..12 {
            head.push_str(&format!("X-Filler-{i}: {}\r\n", "v".repeat(20)));
        }
        head.push_str("\r\n");
        let len = head.len() as u64;
        for byte in head.bytes() {
            conn.on_data(&mut ctx, &[byte], now);
        }
        assert!(
            conn.out.starts_with(b"HTTP/1.1 200 "),
            "{}",
            String::from_utf8_lossy(&conn.out)
        );
        // Once at the end of the request line, once at the end of the head
        // (it was once per byte, ~len passes over ~len/2 bytes each).
        assert_eq!(conn.head_parses, 2);
        assert!(
            conn.head_bytes_parsed <= 2 * len,
            "{} > 2 x {len}",
            conn.head_bytes_parsed
        );
        // A second head on the same connection starts afresh.
        for byte in b"GET /v1/health HTTP/1.1\n\n" {
            conn.on_data(&mut ctx, &[*byte], now);
        }
        assert_eq!(conn.head_parses, 4);
        assert_eq!(
            String::from_utf8_lossy(&conn.out)
                .matches("HTTP/1.1 200 ")
                .count(),
            2
        );
    }

    #[test]
    fn a_request_line_that_is_not_http_is_refused_before_the_head_ends() {
        let mut ctx = test_ctx();
        let now = Instant::now();
        let mut conn = HttpConn::new(KEY, IpAddr::from([127, 0, 0, 1]), now);
        conn.on_data(&mut ctx, b"\x16\x03\x01 not http\r\nHost", now);
        assert!(conn.out.starts_with(b"HTTP/1.1 400 "));
        assert!(conn.is_closing());
    }

    #[test]
    fn pipelined_requests_wait_while_the_client_does_not_read() {
        let mut ctx = test_ctx();
        let limit = ctx.config().max_pending_output_bytes;
        let now = Instant::now();
        let mut conn = HttpConn::new(KEY, IpAddr::from([127, 0, 0, 1]), now);
        let request = b"GET /v1/health HTTP/1.1\r\n\r\n";
        let mut flood = Vec::new();
        for _ in 0..400 {
            flood.extend_from_slice(request);
        }
        conn.on_data(&mut ctx, &flood, now);
        let one = {
            let text = String::from_utf8_lossy(&conn.out).into_owned();
            text.find("HTTP/1.1 200 ").unwrap();
            text[1..].find("HTTP/1.1 200 ").unwrap() + 1
        };
        // At most the limit plus the response that crossed it.
        assert!(conn.out.len() <= limit + one, "{} bytes", conn.out.len());
        assert!(!conn.wants_read(&ctx));
        let mut answered = 0;
        let mut rounds = 0;
        while !conn.out.is_empty() {
            // The event loop takes it all; the socket accepts it in one or two sends.
            let taken = std::mem::take(&mut conn.out);
            answered += String::from_utf8_lossy(&taken)
                .matches("HTTP/1.1 200 ")
                .count();
            conn.set_held(taken.len());
            assert!(!conn.wants_read(&ctx) || conn.inbuf.is_empty());
            if taken.len() > limit {
                // A partial send that leaves it over the limit starts nothing.
                conn.on_sent(&mut ctx, limit + 1, now);
                assert!(conn.out.is_empty(), "still over the limit");
            }
            conn.on_sent(&mut ctx, 0, now);
            rounds += 1;
            assert!(conn.out.len() <= limit + one);
        }
        assert_eq!(answered, 400);
        assert!(rounds > 1);
        assert!(conn.wants_read(&ctx));
    }

    /// A request and whether its Content-Length is honest.
    #[test]
    fn a_connection_skipping_a_body_closes_after_it_when_draining() {
        let mut ctx = test_ctx();
        let now = Instant::now();
        let mut conn = HttpConn::new(KEY, IpAddr::from([127, 0, 0, 1]), now);
        conn.on_data(
            &mut ctx,
            b"POST /nope HTTP/1.1\r\nContent-Length: 5\r\n\r\nhe",
            now,
        );
        assert!(conn.out.starts_with(b"HTTP/1.1 404 "));
        assert!(!conn.is_closing());
        ctx.draining = true;
        conn.on_drain();
        assert!(!conn.is_closing(), "still skipping the body");
        conn.on_data(&mut ctx, b"llo", now);
        assert!(conn.is_closing());
    }

    fn request_like() -> impl Strategy<Value = (Vec<u8>, bool)> {
        let method = prop_oneof![Just("GET"), Just("POST"), Just("HEAD"), Just("PUT")];
        let path = prop_oneof![
            Just("/v1/exec"),
            Just("/v1/exec/batch"),
            Just("/v1/health"),
            Just("/x")
        ];
        let body = prop_oneof![
            Just(r#"{"code":"x"}"#.to_string()),
            Just(r#"{"executions":[{"code":"a"},{"code":"b"}]}"#.to_string()),
            "[ -~]{0,40}",
        ];
        let extra = prop_oneof![
            Just(String::new()),
            Just("Expect: 100-continue\r\n".to_string()),
            Just("Connection: close\r\n".to_string()),
            Just("Transfer-Encoding: chunked\r\n".to_string()),
        ];
        (method, path, body, extra, any::<i8>()).prop_map(|(m, p, b, e, skew)| {
            // Content-Length sometimes lies, to exercise framing errors.
            let len = (b.len() as i64 + i64::from(skew % 3)).max(0);
            let honest = len as usize == b.len();
            (
                format!("{m} {p} HTTP/1.1\r\n{e}Content-Length: {len}\r\n\r\n{b}").into_bytes(),
                honest,
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let mut ctx = test_ctx();
            let (mut conn, out) = run(&mut ctx, &chunks, false);
            prop_assert!(out.is_empty() || out.starts_with(b"HTTP/1.1 "));
            let later = Instant::now() + Duration::from_secs(3600);
            let _ = conn.on_timer(&mut ctx, later, false);
            conn.on_drain();
            conn.cancel_execs();
            conn.on_peer_closed(&mut ctx);
        }

        #[test]
        fn request_streams_never_panic(
            requests in proptest::collection::vec(request_like(), 1..6),
            split in 1usize..64,
        ) {
            let mut ctx = test_ctx();
            let stream: Vec<u8> = requests.iter().flat_map(|(r, _)| r.clone()).collect();
            let honest = requests.iter().all(|(_, honest)| *honest);
            let chunks: Vec<Vec<u8>> = stream.chunks(split).map(<[u8]>::to_vec).collect();
            let (_, out) = run(&mut ctx, &chunks, true);
            // Empty when the first body is still incomplete (a lying length).
            prop_assert!(out.is_empty() || out.starts_with(b"HTTP/1.1 "), "{}", String::from_utf8_lossy(&out));
            let text = String::from_utf8_lossy(&out);
            let finals = text.matches("HTTP/1.1 ").count() - text.matches("HTTP/1.1 100 Continue").count();
            // A lying length makes the rest of the stream look like more requests.
            prop_assert!(!honest || finals <= requests.len(), "more answers than requests: {text}");
        }
    }
}
