//! The epoll event loop: the fallback where io_uring is unavailable. Serves
//! exactly like the io_uring loop, on top of the same [`HttpConn`] state
//! machine; level-triggered, non-blocking sockets.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use super::conn::{HttpConn, TimerVerdict};
use super::event::{refuse_connection, tick_interval, Drain, Slab};
use super::shard::ShardCtx;
use super::workers::{ConnKey, Waker};
use super::LoopError;

const LISTENER: u64 = u64::MAX;
const WAKER: u64 = u64::MAX - 1;
/// Bytes read from one socket per readiness event before serving others.
const READ_BUDGET: usize = 256 * 1024;

struct Conn {
    stream: TcpStream,
    http: HttpConn,
    /// The epoll interest currently registered.
    interest: u32,
}

pub struct EpollLoop {
    epoll: OwnedFd,
    listener: Option<TcpListener>,
    waker: Arc<Waker>,
    ctx: ShardCtx,
    conns: Slab<Conn>,
    drain: Drain,
    read_buf: Box<[u8]>,
    touched: Vec<ConnKey>,
}

fn token(key: ConnKey) -> u64 {
    (u64::from(key.generation) << 32) | u64::from(key.index)
}

fn key_of(token: u64) -> ConnKey {
    ConnKey {
        index: token as u32,
        generation: (token >> 32) as u32,
    }
}

impl EpollLoop {
    pub fn new(listener: TcpListener, waker: Arc<Waker>, ctx: ShardCtx) -> Result<Self, LoopError> {
        // SAFETY: epoll_create1 has no memory arguments; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(LoopError::EpollCreate(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we exclusively own.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        listener
            .set_nonblocking(true)
            .map_err(LoopError::Listener)?;
        let this = EpollLoop {
            epoll,
            waker,
            ctx,
            conns: Slab::default(),
            drain: Drain::default(),
            read_buf: vec![0u8; 64 * 1024].into_boxed_slice(),
            touched: Vec::new(),
            listener: None,
        };
        this.ctl(
            libc::EPOLL_CTL_ADD,
            listener.as_raw_fd(),
            libc::EPOLLIN as u32,
            LISTENER,
        )?;
        this.ctl(
            libc::EPOLL_CTL_ADD,
            this.waker.raw_fd(),
            libc::EPOLLIN as u32,
            WAKER,
        )?;
        Ok(EpollLoop {
            listener: Some(listener),
            ..this
        })
    }

    fn ctl(&self, op: i32, fd: RawFd, events: u32, data: u64) -> Result<(), LoopError> {
        let mut ev = libc::epoll_event { events, u64: data };
        // SAFETY: ev is a live epoll_event; the kernel only reads it.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(LoopError::EpollCtl(io::Error::last_os_error()));
        }
        Ok(())
    }

    pub fn run(mut self) -> Result<(), LoopError> {
        let tick = tick_interval(self.ctx.config());
        let mut next_tick = Instant::now() + tick;
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let timeout_ms = next_tick
                .saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128) as i32;
            // SAFETY: events is a live buffer of events.len() entries.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    timeout_ms,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(LoopError::EpollWait(err));
            }
            let now = Instant::now();
            for ev in &events[..n as usize] {
                let (flags, data) = (ev.events, ev.u64);
                match data {
                    LISTENER => self.accept(now),
                    WAKER => {
                        self.waker.drain();
                        self.completions(now);
                    }
                    _ => self.readable_or_writable(key_of(data), flags, now),
                }
            }
            if now >= next_tick {
                next_tick = now + tick;
                self.timers(now);
            }
            self.lifecycle(now);
            self.flush_touched();
            if self.drain.is_draining() && self.conns.is_empty() && self.ctx.jobs_in_flight == 0 {
                return Ok(());
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if let Err(refusal) = self.ctx.connection_opened(peer.ip()) {
                        refuse_connection(stream, &refusal);
                        continue;
                    }
                    // Responses are single writes; don't wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    let fd = stream.as_raw_fd();
                    let key = self.conns.insert_with(|key| Conn {
                        stream,
                        http: HttpConn::new(key, peer.ip(), now),
                        interest: libc::EPOLLIN as u32,
                    });
                    if self
                        .ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, token(key))
                        .is_err()
                    {
                        self.conns.remove(key);
                        self.ctx.connection_closed(peer.ip());
                        continue;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest in the backlog until the next event.
                    eprintln!(
                        "kvmfork serve: shard {}: accept failed: {e}",
                        self.ctx.shard
                    );
                    return;
                }
            }
        }
    }

    fn readable_or_writable(&mut self, key: ConnKey, flags: u32, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let hangup = flags & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
        if flags & libc::EPOLLIN as u32 != 0 || hangup {
            let mut budget = READ_BUDGET;
            loop {
                match conn.stream.read(&mut self.read_buf) {
                    Ok(0) => {
                        conn.http.on_peer_closed(&mut self.ctx);
                        break;
                    }
                    Ok(n) => {
                        conn.http.on_data(&mut self.ctx, &self.read_buf[..n], now);
                        budget = budget.saturating_sub(n);
                        if budget == 0 || !conn.http.wants_read(&self.ctx) {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        conn.http.on_peer_closed(&mut self.ctx);
                        break;
                    }
                }
            }
        }
        self.touched.push(key);
    }

    fn completions(&mut self, now: Instant) {
        while let Some(completion) = self.ctx.pool.try_completion() {
            self.ctx.job_finished(&completion);
            let key = completion.conn;
            if let Some(conn) = self.conns.get_mut(key) {
                conn.http.on_completion(&mut self.ctx, completion, now);
                self.touched.push(key);
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        for key in self.conns.keys() {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            if conn.http.on_timer(&mut self.ctx, now, false) == TimerVerdict::Close {
                conn.http.on_peer_closed(&mut self.ctx);
            }
            self.touched.push(key);
        }
    }

    fn lifecycle(&mut self, now: Instant) {
        let shared = self.ctx.shared.clone();
        let step = self.drain.step(&shared, now);
        if step.begin {
            self.ctx.draining = true;
            if let Some(listener) = self.listener.take() {
                let _ = self.ctl(libc::EPOLL_CTL_DEL, listener.as_raw_fd(), 0, 0);
            }
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
                    conn.http.on_peer_closed(&mut self.ctx);
                    self.touched.push(key);
                }
            }
        }
    }

    /// Writes pending output, closes finished connections and updates interest.
    fn flush_touched(&mut self) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable_by_key(|k| (k.index, k.generation));
        touched.dedup();
        let now = Instant::now();
        for key in touched.drain(..) {
            let Some(conn) = self.conns.get_mut(key) else {
                continue;
            };
            let mut broken = false;
            while !conn.http.out.is_empty() {
                match conn.stream.write(&conn.http.out) {
                    Ok(0) => {
                        broken = true;
                        break;
                    }
                    Ok(n) => {
                        conn.http.out.drain(..n);
                        // May answer pipelined requests that waited for the
                        // client to read, refilling `out`.
                        conn.http.on_sent(&mut self.ctx, 0, now);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        broken = true;
                        break;
                    }
                }
            }
            if broken {
                conn.http.on_peer_closed(&mut self.ctx);
            }
            if conn.http.is_closing() && conn.http.out.is_empty() {
                let _ = conn.stream.shutdown(Shutdown::Write);
                // Dropping the stream closes the fd, which removes it from epoll.
                let peer = conn.http.peer();
                self.conns.remove(key);
                self.ctx.connection_closed(peer);
                continue;
            }
            let mut interest = 0u32;
            if conn.http.wants_read(&self.ctx) {
                interest |= libc::EPOLLIN as u32;
            }
            if !conn.http.out.is_empty() {
                interest |= libc::EPOLLOUT as u32;
            }
            if interest != conn.interest {
                let fd = conn.stream.as_raw_fd();
                conn.interest = interest;
                let _ = self.ctl(libc::EPOLL_CTL_MOD, fd, interest, token(key));
            }
        }
        self.touched = touched;
    }
}
