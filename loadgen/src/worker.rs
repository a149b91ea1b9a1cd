//! One load thread: an edge-triggered epoll loop (mio) driving its share of
//! the connections. Each connection carries at most one request at a time
//! (no pipelining); it connects lazily when a request needs it, reconnects
//! after the server closes, and fails a request on timeout.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use thiserror::Error;

use crate::http::ResponseParser;
use crate::schedule::{closed_next, Arrival, ClosedNext, OpenSchedule, Phases, Tickets};
use crate::stats::{ErrorKind, Recorder};
use crate::timer::{minimize_timer_slack, ArrivalTimer};
use crate::workload::{Picker, Template};

/// Wait before reusing a connection slot whose connect failed, so a dead
/// server does not turn the loop into a busy spin.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Timeouts are checked by sweeping at most this often.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_millis(10);
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(1);

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error("cannot create epoll instance: {0}")]
    CreatePoll(io::Error),
    #[error("epoll_wait failed: {0}")]
    Poll(io::Error),
    #[error("cannot register a socket with epoll: {0}")]
    Register(io::Error),
    #[error("cannot set up the open-loop arrival timer: {0}")]
    Timer(io::Error),
}

/// Everything a worker needs; shared parts are behind `Arc`.
pub struct WorkerSetup {
    pub addr: SocketAddr,
    pub templates: Arc<[Template]>,
    pub weights: Arc<[u32]>,
    pub connections: usize,
    pub timeout: Duration,
    pub phases: Phases,
    pub load: Load,
    /// Set (e.g. by SIGINT) to stop sending; in-flight requests still finish.
    pub stop: Arc<AtomicBool>,
}

/// Closed loop shares a ticket budget; open loop owns a slice of the schedule.
pub enum Load {
    Closed(Arc<Tickets>),
    Open(OpenSchedule),
}

/// What one worker measured.
pub struct WorkerOutcome {
    pub recorder: Recorder,
    /// When the last measured request ended (response or error).
    pub last_measured_end: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request. Connected if `stream` is set.
    Free,
    Connecting,
    Writing,
    Reading,
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    kind: usize,
    /// Latency origin: intended time (open loop) or first write (closed loop).
    origin: Option<Instant>,
    sent_at: Option<Instant>,
    deadline: Instant,
    measured: bool,
}

struct Conn {
    stream: Option<TcpStream>,
    /// Bumped on every new socket so events of a closed socket are ignored.
    generation: u32,
    phase: Phase,
    request: Option<InFlight>,
    written: usize,
    /// A readable edge arrived while still writing; read once writing ends.
    readable_pending: bool,
    parser: ResponseParser,
}

/// Connection tokens never reach this value (index and generation are 32-bit each
/// but the index is far below 2^32 - 1).
const TIMER_TOKEN: Token = Token(usize::MAX);

fn token(index: usize, generation: u32) -> Token {
    Token(index | (generation as usize) << 32)
}

fn split_token(token: Token) -> (usize, u32) {
    (token.0 & 0xffff_ffff, (token.0 >> 32) as u32)
}

/// How a request ended.
enum Finish {
    Response { status: u16, keep_alive: bool },
    Failed(ErrorKind),
}

pub struct Worker {
    setup: WorkerSetup,
    poll: Poll,
    conns: Vec<Conn>,
    /// Connected, no request.
    idle: Vec<usize>,
    /// Not connected, no request, ready to connect.
    disconnected: Vec<usize>,
    /// Not connected, waiting out [`CONNECT_BACKOFF`].
    backoff: VecDeque<(Instant, usize)>,
    busy: usize,
    /// Open loop: due requests waiting for a free connection.
    backlog: VecDeque<(Arrival, usize)>,
    picker: Picker,
    recorder: Recorder,
    last_measured_end: Option<Instant>,
    read_buffer: Vec<u8>,
    closed_loop_done: bool,
    /// Open loop only: wakes the loop exactly when the next arrival is due.
    arrival_timer: Option<ArrivalTimer>,
}

impl Worker {
    pub fn new(setup: WorkerSetup) -> Result<Worker, WorkerError> {
        let poll = Poll::new().map_err(WorkerError::CreatePoll)?;
        let conns = (0..setup.connections)
            .map(|_| Conn {
                stream: None,
                generation: 0,
                phase: Phase::Free,
                request: None,
                written: 0,
                readable_pending: false,
                parser: ResponseParser::new(),
            })
            .collect();
        // Reverse so connection 0 is used first.
        let disconnected = (0..setup.connections).rev().collect();
        let picker = Picker::new(&setup.weights);
        let recorder = Recorder::new(setup.templates.len());
        let arrival_timer = match setup.load {
            Load::Open(_) => {
                minimize_timer_slack();
                Some(ArrivalTimer::new(poll.registry(), TIMER_TOKEN).map_err(WorkerError::Timer)?)
            }
            Load::Closed(_) => None,
        };
        Ok(Worker {
            setup,
            poll,
            conns,
            idle: Vec::new(),
            disconnected,
            backoff: VecDeque::new(),
            busy: 0,
            backlog: VecDeque::new(),
            picker,
            recorder,
            last_measured_end: None,
            read_buffer: vec![0; READ_BUFFER_BYTES],
            closed_loop_done: false,
            arrival_timer,
        })
    }

    pub fn run(mut self) -> Result<WorkerOutcome, WorkerError> {
        let mut events = Events::with_capacity(1024);
        let sweep_interval =
            (self.setup.timeout / 20).clamp(MIN_SWEEP_INTERVAL, MAX_SWEEP_INTERVAL);
        let mut next_sweep = Instant::now() + sweep_interval;
        loop {
            let now = Instant::now();
            if self.setup.stop.load(Ordering::Relaxed) {
                self.stop_sending();
            }
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + sweep_interval;
            }
            self.start_requests(now)?;
            if self.finished() {
                break;
            }
            let mut wake = next_sweep;
            if let (Load::Open(schedule), Some(timer)) = (&self.setup.load, &mut self.arrival_timer)
            {
                if let Some(due) = schedule.next_due() {
                    timer.arm(due, Instant::now()).map_err(WorkerError::Timer)?;
                    wake = wake.min(due);
                }
            }
            let timeout = wake.saturating_duration_since(Instant::now());
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WorkerError::Poll(e)),
            }
            for event in events.iter() {
                if event.token() == TIMER_TOKEN {
                    if let Some(timer) = &mut self.arrival_timer {
                        timer.acknowledge();
                    }
                    continue;
                }
                let (index, generation) = split_token(event.token());
                if self.conns[index].generation == generation && self.conns[index].stream.is_some()
                {
                    self.on_event(
                        index,
                        event.is_readable() || event.is_read_closed() || event.is_error(),
                    )?;
                }
            }
        }
        Ok(WorkerOutcome {
            recorder: self.recorder,
            last_measured_end: self.last_measured_end,
        })
    }

    /// No new requests; queued ones were never sent and are dropped uncounted.
    fn stop_sending(&mut self) {
        self.closed_loop_done = true;
        if let Load::Open(schedule) = &mut self.setup.load {
            schedule.stop();
        }
        self.backlog.clear();
    }

    fn finished(&self) -> bool {
        let generating = match &self.setup.load {
            Load::Closed(_) => !self.closed_loop_done,
            Load::Open(schedule) => !schedule.finished(),
        };
        !generating && self.backlog.is_empty() && self.busy == 0
    }

    /// Hands new requests to free connections.
    fn start_requests(&mut self, now: Instant) -> Result<(), WorkerError> {
        let tickets = match &mut self.setup.load {
            Load::Closed(tickets) => Some(Arc::clone(tickets)),
            Load::Open(schedule) => {
                while let Some(arrival) = schedule.pop_due(now) {
                    let kind = self.picker.next_index();
                    self.backlog.push_back((arrival, kind));
                }
                None
            }
        };
        if let Some(tickets) = tickets {
            while !self.closed_loop_done {
                let Some(index) = self.idle.pop().or_else(|| self.disconnected.pop()) else {
                    break;
                };
                match closed_next(&self.setup.phases, &tickets, now) {
                    ClosedNext::Send { measured } => {
                        let kind = self.picker.next_index();
                        let request = InFlight {
                            kind,
                            origin: None,
                            sent_at: None,
                            deadline: now + self.setup.timeout,
                            measured,
                        };
                        self.attach(index, request, now)?;
                    }
                    ClosedNext::Stop => {
                        self.closed_loop_done = true;
                        self.release(index);
                    }
                }
            }
        }
        while !self.backlog.is_empty() {
            let Some(index) = self.idle.pop().or_else(|| self.disconnected.pop()) else {
                break;
            };
            let (arrival, kind) = self.backlog.pop_front().expect("backlog checked non-empty");
            let request = InFlight {
                kind,
                origin: Some(arrival.intended),
                sent_at: None,
                // The caller gives up `timeout` after it wanted to send.
                deadline: arrival.intended + self.setup.timeout,
                measured: arrival.measured,
            };
            self.attach(index, request, now)?;
        }
        Ok(())
    }

    /// Puts a connection that got no request back on its free list.
    fn release(&mut self, index: usize) {
        if self.conns[index].stream.is_some() {
            self.idle.push(index);
        } else {
            self.disconnected.push(index);
        }
    }

    fn attach(&mut self, index: usize, request: InFlight, now: Instant) -> Result<(), WorkerError> {
        if request.measured {
            self.recorder.sent += 1;
        }
        self.busy += 1;
        let conn = &mut self.conns[index];
        conn.request = Some(request);
        conn.written = 0;
        conn.readable_pending = false;
        conn.parser
            .reset(self.setup.templates[request.kind].is_head);
        if conn.stream.is_some() {
            conn.phase = Phase::Writing;
            return self.write(index, now);
        }
        match TcpStream::connect(self.setup.addr) {
            Ok(mut stream) => {
                conn.generation = conn.generation.wrapping_add(1);
                self.poll
                    .registry()
                    .register(
                        &mut stream,
                        token(index, conn.generation),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .map_err(WorkerError::Register)?;
                conn.stream = Some(stream);
                conn.phase = Phase::Connecting;
                Ok(())
            }
            Err(_) => {
                self.finish(index, Finish::Failed(ErrorKind::Connect), now);
                Ok(())
            }
        }
    }

    fn on_event(&mut self, index: usize, readable: bool) -> Result<(), WorkerError> {
        let now = Instant::now();
        match self.conns[index].phase {
            Phase::Connecting => {
                let stream = self.conns[index]
                    .stream
                    .as_ref()
                    .expect("connecting conn has a stream");
                match stream.take_error() {
                    Ok(None) => {}
                    Ok(Some(_)) | Err(_) => {
                        self.finish(index, Finish::Failed(ErrorKind::Connect), now);
                        return Ok(());
                    }
                }
                match stream.peer_addr() {
                    Ok(_) => {
                        // Small requests must not wait for Nagle.
                        let _ = stream.set_nodelay(true);
                        if self.conns[index].request.is_some_and(|r| r.measured) {
                            self.recorder.connections_opened += 1;
                        }
                        self.conns[index].phase = Phase::Writing;
                        self.write(index, now)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(_) => self.finish(index, Finish::Failed(ErrorKind::Connect), now),
                }
            }
            Phase::Writing => {
                if readable {
                    self.conns[index].readable_pending = true;
                }
                self.write(index, now)?;
            }
            Phase::Reading => {
                if readable {
                    self.read(index);
                }
            }
            Phase::Free => {
                if readable {
                    self.drain_idle(index);
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, index: usize, now: Instant) -> Result<(), WorkerError> {
        let conn = &mut self.conns[index];
        let request = conn.request.as_mut().expect("writing conn has a request");
        let bytes = &self.setup.templates[request.kind].bytes;
        if request.sent_at.is_none() {
            // Fresh clock: `now` is shared by a whole batch of writes, and
            // a late write must not be charged for the ones before it.
            request.sent_at = Some(Instant::now());
        }
        let stream = conn.stream.as_mut().expect("writing conn has a stream");
        while conn.written < bytes.len() {
            match stream.write(&bytes[conn.written..]) {
                Ok(0) => {
                    self.finish(index, Finish::Failed(ErrorKind::Closed), now);
                    return Ok(());
                }
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.finish(index, Finish::Failed(ErrorKind::Closed), now);
                    return Ok(());
                }
            }
        }
        conn.phase = Phase::Reading;
        if conn.readable_pending {
            conn.readable_pending = false;
            self.read(index);
        }
        Ok(())
    }

    fn read(&mut self, index: usize) {
        loop {
            let conn = &mut self.conns[index];
            let stream = conn.stream.as_mut().expect("reading conn has a stream");
            let outcome = match stream.read(&mut self.read_buffer) {
                Ok(0) => match conn.parser.finish_on_eof() {
                    Ok(Some(response)) => Finish::Response {
                        status: response.status,
                        keep_alive: false,
                    },
                    // Closed before a byte of the response: a keep-alive race or a crash.
                    Ok(None) | Err(_) => Finish::Failed(ErrorKind::Closed),
                },
                Ok(n) => match conn.parser.feed(&self.read_buffer[..n]) {
                    Ok(Some(response)) => Finish::Response {
                        status: response.status,
                        keep_alive: response.keep_alive,
                    },
                    Ok(None) => continue,
                    Err(_) => Finish::Failed(ErrorKind::Parse),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => Finish::Failed(ErrorKind::Closed),
            };
            self.finish(index, outcome, Instant::now());
            return;
        }
    }

    /// A free keep-alive connection became readable: normally the server
    /// closing it. Either way it cannot carry a request any more.
    fn drain_idle(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        let stream = conn.stream.as_mut().expect("idle conn has a stream");
        match stream.read(&mut self.read_buffer) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            // EOF, unsolicited bytes, or an error.
            _ => {}
        }
        self.close(index);
        // Move it from the idle list to the disconnected list.
        if let Some(position) = self.idle.iter().position(|&i| i == index) {
            self.idle.swap_remove(position);
            self.disconnected.push(index);
        }
    }

    fn close(&mut self, index: usize) {
        let conn = &mut self.conns[index];
        // Dropping the socket closes it, which also removes it from epoll.
        conn.stream = None;
        conn.generation = conn.generation.wrapping_add(1);
        conn.phase = Phase::Free;
    }

    fn finish(&mut self, index: usize, finish: Finish, now: Instant) {
        let conn = &mut self.conns[index];
        let request = conn.request.take().expect("finished conn had a request");
        self.busy -= 1;
        let connect_failed = matches!(finish, Finish::Failed(ErrorKind::Connect));
        if request.measured {
            match finish {
                Finish::Response { status, .. } => {
                    let sent_at = request.sent_at.unwrap_or(now);
                    let origin = request.origin.unwrap_or(sent_at);
                    self.recorder.record_response(
                        request.kind,
                        status,
                        now.saturating_duration_since(origin),
                        now.saturating_duration_since(sent_at),
                    );
                }
                Finish::Failed(kind) => self.recorder.record_error(request.kind, kind),
            }
            self.last_measured_end = Some(self.last_measured_end.map_or(now, |t| t.max(now)));
        }
        let keep = matches!(
            finish,
            Finish::Response {
                keep_alive: true,
                ..
            }
        );
        if keep {
            conn.phase = Phase::Free;
            self.idle.push(index);
        } else {
            self.close(index);
            if connect_failed {
                self.backoff.push_back((now + CONNECT_BACKOFF, index));
            } else {
                self.disconnected.push(index);
            }
        }
    }

    /// Fails overdue requests, expires stale backlog, ends connect backoffs.
    fn sweep(&mut self, now: Instant) {
        for index in 0..self.conns.len() {
            let conn = &self.conns[index];
            if let Some(request) = conn.request {
                if now >= request.deadline {
                    let kind = if conn.phase == Phase::Connecting {
                        ErrorKind::Connect
                    } else {
                        ErrorKind::Timeout
                    };
                    self.finish(index, Finish::Failed(kind), now);
                }
            }
        }
        while let Some(&(arrival, kind)) = self.backlog.front() {
            if now < arrival.intended + self.setup.timeout {
                break;
            }
            self.backlog.pop_front();
            if arrival.measured {
                self.recorder.sent += 1;
                self.recorder.record_error(kind, ErrorKind::Timeout);
                self.last_measured_end = Some(self.last_measured_end.map_or(now, |t| t.max(now)));
            }
        }
        while let Some(&(ready_at, index)) = self.backoff.front() {
            if now < ready_at {
                break;
            }
            self.backoff.pop_front();
            self.disconnected.push(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for (index, generation) in [(0, 0), (999, 1), (5, u32::MAX)] {
            assert_eq!(split_token(token(index, generation)), (index, generation));
        }
    }
}
