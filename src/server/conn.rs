//! The HTTP/1.1 connection state machine, independent of the event loop:
//! bytes in, response bytes out. One request is processed at a time;
//! pipelined requests wait in the input buffer, so responses go out in order.

use std::time::Instant;

use super::http::{self, HeadLimits, Method, RequestHead, Response};
use super::metrics::Endpoint;
use super::shard::{self, Dispatch, PendingExec, Route, ShardCtx, STATUS_CLIENT_CLOSED};
use super::wire::ApiError;
use super::workers::{Completion, ConnKey};

enum State {
    /// Waiting for (the rest of) a request head.
    Head,
    /// Head accepted; waiting until `head.content_length` body bytes are buffered.
    Body { head: RequestHead, route: Route },
    /// A refused request's body is being skipped so the connection stays usable.
    Discard { remaining: u64 },
    /// Executions are queued or running for the current request.
    Exec { head: RequestHead, pending: PendingExec },
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
}

impl HttpConn {
    pub fn new(key: ConnKey, now: Instant) -> Self {
        HttpConn {
            key,
            inbuf: Vec::new(),
            out: Vec::new(),
            state: State::Head,
            last_activity: now,
            last_send_progress: now,
            request_started: None,
            peer_gone: false,
        }
    }

    /// True once the connection should be closed as soon as `out` (and any
    /// send the event loop has in progress) is flushed.
    pub fn is_closing(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Whether the event loop should keep reading. Reading continues during an
    /// exec (to notice a client that leaves) until pipelined input piles up.
    pub fn wants_read(&self, ctx: &ShardCtx) -> bool {
        match self.state {
            State::Closed => false,
            State::Exec { .. } => self.inbuf.len() <= ctx.config().max_head_bytes + ctx.config().max_body_bytes,
            _ => true,
        }
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

    /// The socket accepted response bytes.
    pub fn on_sent(&mut self, now: Instant) {
        self.last_send_progress = now;
    }

    /// The peer closed or reset the connection: cancel whatever runs for it.
    pub fn on_peer_closed(&mut self, ctx: &mut ShardCtx) {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Exec { pending, .. } => {
                pending.cancel();
                ctx.request_done(pending.endpoint, STATUS_CLIENT_CLOSED, true);
            }
            State::Body { route, .. } => ctx.request_done(shard::route_endpoint(route), STATUS_CLIENT_CLOSED, true),
            _ => {}
        }
        self.out.clear();
        self.peer_gone = true;
    }

    pub fn on_completion(&mut self, ctx: &mut ShardCtx, completion: Completion, now: Instant) {
        let State::Exec { pending, .. } = &mut self.state else { return };
        let Some(slot) = pending.results.get_mut(completion.slot) else { return };
        if slot.replace(completion.result).is_none() {
            pending.remaining -= 1;
        }
        if pending.remaining > 0 {
            return;
        }
        let State::Exec { head, pending } = std::mem::replace(&mut self.state, State::Head) else { unreachable!() };
        let endpoint = pending.endpoint;
        let response = ctx.finish(pending);
        self.respond(ctx, &head, endpoint, response, true, now);
        self.advance(ctx, now);
    }

    /// Server shutdown began: an idle connection closes now; others finish
    /// their current request (answered with `Connection: close`).
    pub fn on_drain(&mut self) {
        if matches!(self.state, State::Head) && self.inbuf.is_empty() && self.request_started.is_none() {
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
    pub fn on_timer(&mut self, ctx: &mut ShardCtx, now: Instant, send_pending: bool) -> TimerVerdict {
        let config = ctx.config();
        let (idle, request, send) = (config.idle_timeout, config.request_timeout, config.send_timeout);
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
                        let err = ApiError::new(408, "request_timeout", "the request was not received in time");
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
                    let State::Body { head, route } = std::mem::replace(&mut self.state, State::Head) else {
                        unreachable!()
                    };
                    let dispatch = ctx.dispatch(route, &self.inbuf[..len], self.key, now);
                    self.inbuf.drain(..len);
                    self.request_started = None;
                    match dispatch {
                        Dispatch::Respond(response) => {
                            self.respond(ctx, &head, shard::route_endpoint(route), response, true, now)
                        }
                        Dispatch::Pending(pending) => self.state = State::Exec { head, pending },
                    }
                }
                State::Head => {
                    if self.inbuf.is_empty() {
                        return;
                    }
                    self.request_started.get_or_insert(now);
                    let limits = HeadLimits {
                        max_head_bytes: ctx.config().max_head_bytes,
                        max_headers: ctx.config().max_headers,
                    };
                    match http::parse_head(&self.inbuf, limits) {
                        Ok(None) => {
                            if http::head_too_large(&self.inbuf, limits) {
                                let err = http::HeadError::TooLarge(limits.max_head_bytes);
                                self.respond_error(ctx, None, &ApiError::new(err.status(), err.code(), err.to_string()));
                            }
                            return;
                        }
                        Err(err) => {
                            self.respond_error(ctx, None, &ApiError::new(err.status(), err.code(), err.to_string()));
                            return;
                        }
                        Ok(Some(head)) => {
                            self.inbuf.drain(..head.head_len);
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
        let route = match ctx.admit(&head, now) {
            Ok(route) => route,
            Err((endpoint, response)) => {
                self.refuse(ctx, head, endpoint, response, now);
                return;
            }
        };
        if head.content_length > max_body {
            let err = ApiError::new(413, "body_too_large", format!("request bodies are limited to {max_body} bytes"));
            // The body is not read, so the connection cannot continue.
            self.respond(ctx, &head, shard::route_endpoint(route), shard::error_response(&err), false, now);
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
    fn refuse(&mut self, ctx: &mut ShardCtx, head: RequestHead, endpoint: Endpoint, response: Response, now: Instant) {
        let unread = head.content_length.saturating_sub(self.inbuf.len() as u64);
        let skippable = !head.expect_continue || unread == 0;
        let keep_alive = skippable && head.content_length <= ctx.config().max_body_bytes as u64;
        let remaining = head.content_length;
        self.respond(ctx, &head, endpoint, response, keep_alive, now);
        if keep_alive && remaining > 0 {
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
        ctx.request_done(endpoint.unwrap_or(Endpoint::Other), err.status, endpoint.is_some());
        shard::error_response(err).write_to(&mut self.out, false, false);
        self.state = State::Closed;
        self.inbuf.clear();
    }
}
