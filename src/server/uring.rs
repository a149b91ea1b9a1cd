//! The io_uring event loop: multishot accept, multishot receive into a
//! provided-buffer ring, sends with partial writes resumed, an eventfd read
//! for worker completions and a timeout op for timers. Also the start-up
//! probe deciding whether io_uring can be used at all.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use super::bufring::BufRing;
use super::conn::{HttpConn, TimerVerdict};
use super::event::{refuse_connection, tick_interval, Drain, Slab, GENERATION_MASK};
use super::shard::ShardCtx;
use super::workers::{ConnKey, Waker};
use super::LoopError;

/// Submission queue size (the completion queue is twice that).
const RING_ENTRIES: u32 = 1024;
/// Provided receive buffers per shard and their size.
/// Buffers the start-up probe registers (the default shard configuration).
const PROBE_RECV_BUFFERS: u16 = 512;
const RECV_BUFFER_SIZE: usize = 4096;
const BUFFER_GROUP: u16 = 0;

/// Operation kinds, in the top byte of user_data.
const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_WAKE: u64 = 4;
const OP_TIMER: u64 = 5;
const OP_CANCEL: u64 = 6;

fn user_data(op: u64, key: ConnKey) -> u64 {
    (op << 56) | (u64::from(key.generation & GENERATION_MASK) << 32) | u64::from(key.index)
}

fn split_user_data(data: u64) -> (u64, ConnKey) {
    (
        data >> 56,
        ConnKey {
            index: data as u32,
            generation: ((data >> 32) as u32) & GENERATION_MASK,
        },
    )
}

const NO_CONN: ConnKey = ConnKey {
    index: 0,
    generation: 0,
};

/// Checks that this kernel and process can run the io_uring loop: ring
/// creation (fails under `kernel.io_uring_disabled` or seccomp), every opcode
/// used, a provided-buffer ring of the real size (memlock), and multishot
/// receive (kernel 6.0+) on a socket pair. Returns why not on failure.
pub fn probe() -> Result<(), String> {
    let ring = new_ring().map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => {
            format!("io_uring_setup refused ({e}): kernel.io_uring_disabled or a seccomp filter")
        }
        Some(libc::ENOSYS) => format!("io_uring_setup missing ({e}): kernel without io_uring"),
        Some(libc::ENOMEM) => format!("io_uring_setup failed ({e}): RLIMIT_MEMLOCK too small"),
        _ => format!("io_uring_setup failed: {e}"),
    })?;
    let mut ops = Probe::new();
    ring.submitter()
        .register_probe(&mut ops)
        .map_err(|e| format!("IORING_REGISTER_PROBE failed: {e}"))?;
    for (name, code) in [
        ("ACCEPT", opcode::AcceptMulti::CODE),
        ("RECV", opcode::RecvMulti::CODE),
        ("SEND", opcode::Send::CODE),
        ("READ", opcode::Read::CODE),
        ("TIMEOUT", opcode::Timeout::CODE),
        ("ASYNC_CANCEL", opcode::AsyncCancel::CODE),
    ] {
        if !ops.is_supported(code) {
            return Err(format!(
                "io_uring opcode {name} not supported by this kernel"
            ));
        }
    }
    let mut bufs = BufRing::new(PROBE_RECV_BUFFERS, RECV_BUFFER_SIZE, BUFFER_GROUP)
        .map_err(|e| format!("allocating the receive buffer ring: {e}"))?;
    bufs.register(&ring).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOMEM) | Some(libc::ENOBUFS) => {
            format!("registering the provided-buffer ring failed ({e}): RLIMIT_MEMLOCK too small")
        }
        _ => format!("registering a provided-buffer ring failed ({e}): kernel older than 5.19?"),
    })?;
    probe_multishot_recv(ring, &bufs)
}

fn probe_multishot_recv(mut ring: IoUring, bufs: &BufRing) -> Result<(), String> {
    let (a, b) = std::os::unix::net::UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let recv = opcode::RecvMulti::new(types::Fd(a.as_raw_fd()), bufs.group())
        .build()
        .user_data(1);
    // SAFETY: the op writes only into registered provided buffers, which
    // outlive the ring (dropped at the end of this function, before `bufs`).
    unsafe { ring.submission().push(&recv) }.map_err(|_| "submission queue full".to_string())?;
    use std::io::Write as _;
    (&b).write_all(b"x")
        .map_err(|e| format!("socketpair write: {e}"))?;
    ring.submit_and_wait(1)
        .map_err(|e| format!("io_uring_enter: {e}"))?;
    let cqe = ring
        .completion()
        .next()
        .ok_or("no completion from the multishot receive probe")?;
    let supported = cqe.result() == 1 && cqueue::more(cqe.flags());
    if supported {
        // End the receive before the ring goes away: a request cancelled by
        // ring teardown would interrupt this (the caller's) thread's next
        // blocking socket call with EINTR.
        drop(b);
        loop {
            ring.submit_and_wait(1)
                .map_err(|e| format!("io_uring_enter: {e}"))?;
            if ring.completion().any(|c| !cqueue::more(c.flags())) {
                break;
            }
        }
    }
    if !supported {
        return Err(format!(
            "multishot receive unsupported (result {}, kernel older than 6.0?)",
            cqe.result()
        ));
    }
    Ok(())
}

fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_cqsize(RING_ENTRIES * 2)
        .build(RING_ENTRIES)
}

/// A ring with its registered receive buffers, created before the shard
/// thread starts so set-up errors reach the caller of `serve`.
pub struct RingSetup {
    ring: IoUring,
    bufs: BufRing,
}

impl RingSetup {
    pub fn new(recv_buffers: u16) -> io::Result<Self> {
        let ring = new_ring()?;
        let mut bufs = BufRing::new(recv_buffers, RECV_BUFFER_SIZE, BUFFER_GROUP)?;
        bufs.register(&ring)?;
        Ok(RingSetup { ring, bufs })
    }
}

struct Conn {
    stream: TcpStream,
    http: HttpConn,
    recv_armed: bool,
    recv_cancel_sent: bool,
    /// Bytes owned by the in-flight send (the kernel reads them).
    sending: Vec<u8>,
    send_offset: usize,
    send_in_flight: bool,
    /// Shut down; freed once its in-flight operations complete.
    closing: bool,
}

pub struct UringLoop {
    // Field order matters: the ring is dropped (cancelling its operations)
    // before the buffers and timespec those operations point at.
    ring: IoUring,
    bufs: BufRing,
    wake_buf: Box<u64>,
    tick: Box<types::Timespec>,
    listener: Option<TcpListener>,
    accept_armed: bool,
    waker: Arc<Waker>,
    ctx: ShardCtx,
    conns: Slab<Conn>,
    drain: Drain,
    touched: Vec<ConnKey>,
    rearm_recv: Vec<ConnKey>,
    cqes: Vec<(u64, i32, u32)>,
}

impl UringLoop {
    pub fn new(setup: RingSetup, listener: TcpListener, waker: Arc<Waker>, ctx: ShardCtx) -> Self {
        let interval = tick_interval(ctx.config());
        UringLoop {
            ring: setup.ring,
            bufs: setup.bufs,
            wake_buf: Box::new(0),
            tick: Box::new(
                types::Timespec::new()
                    .sec(interval.as_secs())
                    .nsec(interval.subsec_nanos()),
            ),
            listener: Some(listener),
            accept_armed: false,
            waker,
            ctx,
            conns: Slab::default(),
            drain: Drain::default(),
            touched: Vec::new(),
            rearm_recv: Vec::new(),
            cqes: Vec::with_capacity(RING_ENTRIES as usize * 2),
        }
    }

    /// Queues an SQE, submitting first when the submission queue is full.
    ///
    /// # Safety
    /// Every buffer the entry points at must stay valid until its completion.
    unsafe fn push(&mut self, entry: squeue::Entry) -> Result<(), LoopError> {
        loop {
            // SAFETY: forwarded from the caller's contract.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit().map_err(LoopError::Submit)?;
        }
    }

    fn arm_accept(&mut self) -> Result<(), LoopError> {
        let Some(listener) = &self.listener else {
            return Ok(());
        };
        let entry = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(OP_ACCEPT, NO_CONN));
        // SAFETY: multishot accept references no user memory.
        unsafe { self.push(entry)? };
        self.accept_armed = true;
        Ok(())
    }

    fn arm_wake(&mut self) -> Result<(), LoopError> {
        let buf: *mut u64 = &mut *self.wake_buf;
        let entry = opcode::Read::new(types::Fd(self.waker.raw_fd()), buf.cast(), 8)
            .build()
            .user_data(user_data(OP_WAKE, NO_CONN));
        // SAFETY: wake_buf is boxed and owned by self, which outlives the ring.
        unsafe { self.push(entry) }
    }

    fn arm_timer(&mut self) -> Result<(), LoopError> {
        let ts: *const types::Timespec = &*self.tick;
        let entry = opcode::Timeout::new(ts)
            .build()
            .user_data(user_data(OP_TIMER, NO_CONN));
        // SAFETY: the timespec is boxed and owned by self, which outlives the ring.
        unsafe { self.push(entry) }
    }

    /// Serves until the shard has drained, then releases the ring.
    pub fn run(mut self) -> Result<(), LoopError> {
        let served = self.serve();
        let finished = self.finish();
        served.and(finished)
    }

    fn serve(&mut self) -> Result<(), LoopError> {
        self.arm_accept()?;
        self.arm_wake()?;
        self.arm_timer()?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The completion queue is full: reap it before submitting more.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(LoopError::Submit(e)),
            }
            let now = Instant::now();
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(data, result, flags) in &cqes {
                self.on_cqe(data, result, flags, now)?;
            }
            cqes.clear();
            self.cqes = cqes;
            self.lifecycle(now)?;
            self.flush_touched()?;
            if self.drain.is_draining()
                && self.conns.is_empty()
                && self.ctx.jobs_in_flight == 0
                && !self.accept_armed
            {
                return Ok(());
            }
        }
    }

    fn on_cqe(
        &mut self,
        data: u64,
        result: i32,
        flags: u32,
        now: Instant,
    ) -> Result<(), LoopError> {
        let (op, key) = split_user_data(data);
        match op {
            OP_ACCEPT => self.on_accept(result, flags, now)?,
            OP_RECV => self.on_recv(key, result, flags, now),
            OP_SEND => self.on_send(key, result, now)?,
            OP_WAKE => {
                self.completions(now);
                if result < 0 && result != -libc::ECANCELED {
                    return Err(LoopError::Waker(io::Error::from_raw_os_error(-result)));
                }
                self.arm_wake()?;
            }
            OP_TIMER => {
                self.timers(now);
                self.arm_timer()?;
            }
            _ => {} // OP_CANCEL results need no action.
        }
        Ok(())
    }

    fn on_accept(&mut self, result: i32, flags: u32, now: Instant) -> Result<(), LoopError> {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if result >= 0 {
            // SAFETY: a successful accept CQE carries a new descriptor we own.
            let stream = unsafe { TcpStream::from_raw_fd(result) };
            if self.drain.is_draining() {
                return Ok(()); // Dropped: closes the socket.
            }
            // Unknown only if the peer already left; it is then closed soon.
            let peer = stream
                .peer_addr()
                .map(|a| a.ip())
                .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED.into());
            match self.ctx.connection_opened(peer) {
                Err(refusal) => refuse_connection(stream, &refusal),
                Ok(()) => {
                    // Responses are single writes; don't wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    let key = self.conns.insert_with(|key| Conn {
                        stream,
                        http: HttpConn::new(key, peer, now),
                        recv_armed: false,
                        recv_cancel_sent: false,
                        sending: Vec::new(),
                        send_offset: 0,
                        send_in_flight: false,
                        closing: false,
                    });
                    self.touched.push(key);
                }
            }
        } else if result != -libc::ECANCELED {
            eprintln!(
                "kvmfork serve: shard {}: accept failed: {}",
                self.ctx.shard,
                io::Error::from_raw_os_error(-result)
            );
        }
        // Re-armed by the timer after an error (so EMFILE cannot spin).
        if !self.accept_armed && result >= 0 && !self.drain.is_draining() {
            self.arm_accept()?;
        }
        Ok(())
    }

    fn on_recv(&mut self, key: ConnKey, result: i32, flags: u32, now: Instant) {
        let buffer = cqueue::buffer_select(flags);
        let Some(conn) = self.conns.get_mut(key) else {
            if let Some(bid) = buffer {
                self.bufs.recycle(bid);
            }
            return;
        };
        if !cqueue::more(flags) {
            conn.recv_armed = false;
        }
        if let Some(bid) = buffer {
            if result > 0 && !conn.closing {
                conn.http
                    .on_data(&mut self.ctx, self.bufs.data(bid, result as usize), now);
            }
            self.bufs.recycle(bid);
        }
        if !conn.closing {
            match result {
                0 => conn.http.on_peer_closed(&mut self.ctx),
                r if r > 0 => {}
                r if r == -libc::ENOBUFS => {
                    // Every provided buffer was in use; they are all back once
                    // this batch of completions is processed.
                    self.ctx.metrics.stats().recv_buffers_exhausted += 1;
                    self.rearm_recv.push(key);
                }
                r if r == -libc::ECANCELED => {}
                _ => conn.http.on_peer_closed(&mut self.ctx),
            }
        }
        self.touched.push(key);
    }

    fn on_send(&mut self, key: ConnKey, result: i32, now: Instant) -> Result<(), LoopError> {
        let Some(conn) = self.conns.get_mut(key) else {
            return Ok(());
        };
        conn.send_in_flight = false;
        if result < 0 {
            conn.sending.clear();
            conn.send_offset = 0;
            if !conn.closing {
                conn.http.on_peer_closed(&mut self.ctx);
            }
        } else {
            conn.send_offset += result as usize;
            if conn.send_offset >= conn.sending.len() {
                conn.sending.clear();
                conn.send_offset = 0;
            }
            if !conn.closing {
                // May answer pipelined requests that waited for the client
                // to read; sync() sends what they produce.
                let held = conn.sending.len() - conn.send_offset;
                conn.http.on_sent(&mut self.ctx, held, now);
            }
        }
        self.touched.push(key);
        Ok(())
    }

    fn completions(&mut self, now: Instant) {
        while let Some(completion) = self.ctx.pool.try_completion() {
            self.ctx.job_finished(&completion);
            let key = completion.conn;
            if let Some(conn) = self.conns.get_mut(key) {
                if !conn.closing {
                    conn.http.on_completion(&mut self.ctx, completion, now);
                    self.touched.push(key);
                }
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        for key in self.conns.keys() {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.closing {
                continue;
            }
            let send_pending = conn.send_in_flight || !conn.sending.is_empty();
            if conn.http.on_timer(&mut self.ctx, now, send_pending) == TimerVerdict::Close {
                conn.http.on_peer_closed(&mut self.ctx);
            }
            self.touched.push(key);
        }
        if !self.accept_armed && !self.drain.is_draining() && self.listener.is_some() {
            // Accept stopped after an error (EMFILE, ENFILE): try again.
            if let Err(e) = self.arm_accept() {
                eprintln!(
                    "kvmfork serve: shard {}: re-arming accept: {e}",
                    self.ctx.shard
                );
            }
        }
    }

    fn lifecycle(&mut self, now: Instant) -> Result<(), LoopError> {
        let shared = self.ctx.shared.clone();
        let step = self.drain.step(&shared, now);
        if step.begin {
            self.ctx.draining = true;
            if self.accept_armed {
                let cancel = opcode::AsyncCancel::new(user_data(OP_ACCEPT, NO_CONN))
                    .build()
                    .user_data(user_data(OP_CANCEL, NO_CONN));
                // SAFETY: cancel requests reference no user memory.
                unsafe { self.push(cancel)? };
                // Submit now: the accept op holds a reference to the listening
                // socket, which must be gone before idle clients see their
                // connections close (or they might reconnect to this shard).
                self.ring.submit().map_err(LoopError::Submit)?;
            }
            self.listener = None;
            for key in self.conns.keys() {
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.http.on_drain();
                    self.touched.push(key);
                }
            }
        }
        if step.cancel_execs {
            for key in self.conns.keys() {
                if let Some(conn) = self.conns.get_mut(key) {
                    conn.http.cancel_execs();
                }
            }
        }
        if step.abort_connections {
            for key in self.conns.keys() {
                if let Some(conn) = self.conns.get_mut(key) {
                    if !conn.closing {
                        conn.http.on_peer_closed(&mut self.ctx);
                    }
                    self.touched.push(key);
                }
            }
        }
        Ok(())
    }

    /// Starts sends, (re)arms or pauses receives and closes finished
    /// connections for every connection an event touched.
    fn flush_touched(&mut self) -> Result<(), LoopError> {
        let mut touched = std::mem::take(&mut self.touched);
        touched.append(&mut self.rearm_recv);
        touched.sort_unstable_by_key(|k| (k.index, k.generation));
        touched.dedup();
        for &key in &touched {
            self.sync(key)?;
        }
        touched.clear();
        self.touched = touched;
        Ok(())
    }

    fn sync(&mut self, key: ConnKey) -> Result<(), LoopError> {
        let Some(conn) = self.conns.get_mut(key) else {
            return Ok(());
        };
        if !conn.closing
            && !conn.send_in_flight
            && conn.sending.is_empty()
            && !conn.http.out.is_empty()
        {
            std::mem::swap(&mut conn.sending, &mut conn.http.out);
            conn.send_offset = 0;
            conn.http.set_held(conn.sending.len());
        }
        let flushed = conn.sending.is_empty() && !conn.send_in_flight && conn.http.out.is_empty();
        if conn.closing || conn.http.peer_gone() || (conn.http.is_closing() && flushed) {
            return self.close(key);
        }
        let mut entries = Vec::new();
        if !conn.send_in_flight && conn.send_offset < conn.sending.len() {
            let rest = &conn.sending[conn.send_offset..];
            entries.push(
                opcode::Send::new(
                    types::Fd(conn.stream.as_raw_fd()),
                    rest.as_ptr(),
                    rest.len() as u32,
                )
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(user_data(OP_SEND, key)),
            );
            conn.send_in_flight = true;
        }
        let wants_read = conn.http.wants_read(&self.ctx);
        if wants_read && !conn.recv_armed {
            entries.push(
                opcode::RecvMulti::new(types::Fd(conn.stream.as_raw_fd()), self.bufs.group())
                    .build()
                    .user_data(user_data(OP_RECV, key)),
            );
            conn.recv_armed = true;
            conn.recv_cancel_sent = false;
        } else if !wants_read && conn.recv_armed && !conn.recv_cancel_sent {
            // Pipelined input is piling up behind an exec: pause reading.
            entries.push(
                opcode::AsyncCancel::new(user_data(OP_RECV, key))
                    .build()
                    .user_data(user_data(OP_CANCEL, key)),
            );
            conn.recv_cancel_sent = true;
        }
        for entry in entries {
            // SAFETY: a send points into `conn.sending`, whose heap buffer is
            // neither touched nor freed until the send completes (the slot is
            // kept while send_in_flight); receives use provided buffers.
            unsafe { self.push(entry)? };
        }
        Ok(())
    }

    /// Shuts the socket down (ending its pending operations) and frees the
    /// slot once no operation refers to it any more.
    fn close(&mut self, key: ConnKey) -> Result<(), LoopError> {
        let Some(conn) = self.conns.get_mut(key) else {
            return Ok(());
        };
        if !conn.closing {
            conn.closing = true;
            // Shutdown completes the multishot receive (EOF) and fails a
            // pending send, so both report back promptly.
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
            if conn.recv_armed && !conn.recv_cancel_sent {
                conn.recv_cancel_sent = true;
                let cancel = opcode::AsyncCancel::new(user_data(OP_RECV, key))
                    .build()
                    .user_data(user_data(OP_CANCEL, key));
                // SAFETY: cancel requests reference no user memory.
                unsafe { self.push(cancel)? };
            }
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return Ok(());
        };
        if !conn.recv_armed && !conn.send_in_flight {
            let peer = conn.http.peer();
            self.conns.remove(key);
            self.ctx.connection_closed(peer);
        }
        Ok(())
    }

    /// Cancels the loop's own long-lived operations and waits for them, so
    /// the kernel is done with `wake_buf` and `tick` before they are freed.
    fn finish(&mut self) -> Result<(), LoopError> {
        for op in [OP_WAKE, OP_TIMER] {
            let cancel = opcode::AsyncCancel::new(user_data(op, NO_CONN))
                .build()
                .user_data(user_data(OP_CANCEL, NO_CONN));
            // SAFETY: cancel requests reference no user memory.
            unsafe { self.push(cancel)? };
        }
        let mut outstanding = 2;
        while outstanding > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(LoopError::Submit(e)),
            }
            for cqe in self.ring.completion() {
                let (op, _) = split_user_data(cqe.user_data());
                if op == OP_WAKE || op == OP_TIMER {
                    outstanding -= 1;
                }
            }
        }
        Ok(())
    }
}
