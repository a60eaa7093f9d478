//! `udphub echo --tcp`: seed 001's concurrent TCP echo server
//! (`socketserver.ThreadingTCPServer`), as one mio loop instead of a thread
//! per connection.
//!
//! The seed's semantics: whatever a read returns is sent back (ASCII
//! upper-cased with `--upper`); a connection ends at EOF or on an error,
//! and one bad connection never affects the others. What the seed lacks
//! and a server needs: a cap on connections (beyond it, a new one is
//! accepted and closed at once, and counted), an idle timeout (counted from
//! the last bytes received: a client that only reads is idle), bounded
//! buffers, a fair share of the loop for each connection, and metrics for
//! all of it.
//!
//! **Buffers.** A read is written straight back; only what the client's
//! socket does not take is kept: at most [`MAX_PENDING`] bytes for one
//! connection (then that client is not read until it reads: TCP's own flow
//! control pushes back on it, and on no one else), and at most
//! `--max-buffer-bytes` for all of them together ([`Memory`]: then no
//! connection is read until memory frees). Nothing is dropped: what is not
//! read waits in the kernel, and the client's writes block.
//!
//! **Fairness.** Each connection reads at most [`READS_PER_PASS`] times per
//! pass of the loop. mio is edge-triggered, so a connection whose share ran
//! out before its socket did gets no new event: it stays on a ready list
//! and is pumped again on the next pass, after a poll that does not wait
//! has picked up everyone else's events. Connections stopped by the memory
//! cap wait on a second list and are put back on the ready list, oldest
//! first, as memory frees.
//!
//! [`Conn`] is the per-connection state machine, tested without sockets;
//! [`run`] owns the sockets and the poll.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use metrics::{counter, describe_counter, describe_gauge, gauge, Counter, Gauge};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};
use signal_hook::consts::{SIGHUP, SIGUSR2};
use slab::Slab;

use crate::error::Error;
use crate::runtime::event_loop::RateLimitedLog;

/// The listening socket.
const LISTENER: Token = Token(usize::MAX - 1);
/// SIGINT/SIGTERM/SIGHUP/SIGUSR2.
const SIGNALS: Token = Token(usize::MAX - 2);
/// Bytes one read takes (the seed's `recv(1024)`, larger: the echo is per
/// read either way).
const READ_CHUNK: usize = 16 * 1024;
/// Reads one connection gets per pass of the loop (64 KiB at most) before
/// the others get their turn: a client that sends and reads as fast as it
/// can would otherwise keep its socket readable, and the loop on it, for
/// ever.
pub const READS_PER_PASS: usize = 4;
/// Connections accepted per pass: a burst of connects waits its turn like
/// a busy connection does.
const ACCEPTS_PER_PASS: usize = 256;
/// Bytes waiting to go back to one client before the server stops reading
/// from it.
pub const MAX_PENDING: usize = 64 * 1024;
/// The smallest `--max-buffer-bytes`: one connection's full buffer.
pub const MIN_BUFFER_BYTES: usize = MAX_PENDING;
/// `--max-buffer-bytes` by default: a full buffer for 1,024 connections.
pub const DEFAULT_BUFFER_BYTES: usize = 64 * 1024 * 1024;
/// How often idle connections are looked for.
const SWEEP: Duration = Duration::from_millis(250);
/// How long to wait before accepting again after accept failed (out of
/// descriptors): the listener stays ready, so retrying at once would spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// `udphub echo --tcp` settings.
#[derive(Debug, Clone)]
pub struct TcpEchoConfig {
    /// Where to listen.
    pub bind: SocketAddr,
    /// Upper-case the replies.
    pub upper: bool,
    /// Most connections at once.
    pub max_connections: usize,
    /// Close a connection that sent nothing for this long.
    pub idle_timeout: Duration,
    /// Most bytes all connections' buffers may hold together.
    pub max_buffer_bytes: usize,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client closed its side, and everything was sent back.
    Eof,
    /// A read or write failed (reset, broken pipe, …).
    Error,
    /// Sent nothing for the idle timeout.
    Idle,
    /// The server is shutting down.
    Shutdown,
}

impl Closed {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Closed::Eof => "eof",
            Closed::Error => "error",
            Closed::Idle => "idle",
            Closed::Shutdown => "shutdown",
        }
    }
}

/// What a connection waits for after [`Conn::pump`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pumped {
    /// Its socket: a read or a write would block, so an event will come.
    Wait,
    /// Its next turn: it used its share of this pass ([`READS_PER_PASS`])
    /// with more perhaps left to read, and no event will say so.
    More,
    /// Memory: it has room of its own but [`Memory`] is spent, so it is
    /// not read until other connections' buffers drain.
    Starved,
    /// Nothing: the connection is over.
    Closed(Closed),
}

/// The buffer memory all connections share (`--max-buffer-bytes`), counted
/// by allocation rather than content: a buffer half drained still holds
/// its memory until it is empty and released.
#[derive(Debug)]
pub struct Memory {
    /// The most all buffers may hold.
    cap: usize,
    /// What they hold now.
    used: usize,
}

impl Memory {
    /// `cap` bytes for all connections' buffers together.
    pub fn new(cap: usize) -> Memory {
        Memory { cap, used: 0 }
    }

    /// Bytes the buffers hold now.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Bytes the buffers may still grow by.
    pub fn available(&self) -> usize {
        self.cap.saturating_sub(self.used)
    }
}

/// One connection's echo state: what is owed back to the client, and
/// whether its side is closed. Does no I/O of its own: [`Conn::pump`] takes
/// the stream as any `Read + Write`.
#[derive(Debug, Default)]
pub struct Conn {
    /// Bytes read and not yet written back are `owed[start..]`, in order.
    /// Allocated only while something is owed, and charged to [`Memory`].
    owed: Vec<u8>,
    /// Where the bytes still owed begin in `owed`.
    start: usize,
    /// The capacity of `owed` charged to [`Memory`] (given back when it
    /// is released).
    charged: usize,
    /// The client sent EOF.
    eof: bool,
    /// Bytes read from the client in all.
    pub received: u64,
    /// Bytes written back in all.
    pub sent: u64,
}

impl Conn {
    /// Writes back what is owed, then reads what the client sent and
    /// writes it back, at most [`READS_PER_PASS`] times, while there is
    /// room to keep what the client's socket does not take: at most
    /// [`MAX_PENDING`] owed, within what `memory` has left. Says what the
    /// connection waits for next.
    pub fn pump<S: Read + Write>(
        &mut self,
        stream: &mut S,
        upper: bool,
        memory: &mut Memory,
    ) -> Pumped {
        let mut buf = [0u8; READ_CHUNK];
        let mut reads = 0;
        loop {
            if let Err(closed) = self.flush(stream, memory) {
                return Pumped::Closed(closed);
            }
            if self.eof {
                return if self.pending() == 0 {
                    Pumped::Closed(Closed::Eof)
                } else {
                    Pumped::Wait
                };
            }
            if self.pending() >= MAX_PENDING {
                // The flush would block: a writable event will come.
                return Pumped::Wait;
            }
            if reads == READS_PER_PASS {
                return Pumped::More;
            }
            let room = READ_CHUNK
                .min(MAX_PENDING - self.pending())
                .min(self.storable(memory));
            if room == 0 {
                return Pumped::Starved;
            }
            match stream.read(&mut buf[..room]) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    reads += 1;
                    self.received += n as u64;
                    let chunk = &mut buf[..n];
                    if upper {
                        chunk.make_ascii_uppercase();
                    }
                    // Straight back when nothing is owed (else the flush
                    // above would block, and so would this).
                    let direct = if self.pending() == 0 {
                        match write_some(stream, chunk, &mut self.sent) {
                            Ok(written) => written,
                            Err(closed) => return Pumped::Closed(closed),
                        }
                    } else {
                        0
                    };
                    self.store(&chunk[direct..], memory);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Pumped::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Pumped::Closed(Closed::Error),
            }
        }
    }

    /// Writes as much of what is owed as the stream takes; an empty buffer
    /// gives its memory back.
    fn flush<S: Write>(&mut self, stream: &mut S, memory: &mut Memory) -> Result<(), Closed> {
        if self.pending() > 0 {
            self.start += write_some(stream, &self.owed[self.start..], &mut self.sent)?;
        }
        if self.pending() == 0 && self.owed.capacity() > 0 {
            self.release(memory);
        }
        Ok(())
    }

    /// Bytes a read may bring without the buffer outgrowing `memory`:
    /// its own free space, and what `memory` has left.
    fn storable(&self, memory: &Memory) -> usize {
        self.owed.capacity() - self.pending() + memory.available()
    }

    /// Keeps `data` to write later; the caller made sure it fits
    /// ([`Conn::storable`]).
    fn store(&mut self, data: &[u8], memory: &mut Memory) {
        if data.is_empty() {
            return;
        }
        if self.owed.len() + data.len() > self.owed.capacity() && self.start > 0 {
            self.owed.drain(..self.start);
            self.start = 0;
        }
        let need = self.owed.len() + data.len();
        if need > self.owed.capacity() {
            // Doubling, so a client sending a byte at a time costs no
            // quadratic copying; never past the cap or what memory has.
            let target = (self.owed.capacity() * 2)
                .min(MAX_PENDING)
                .min(self.owed.capacity() + memory.available())
                .max(need);
            self.owed.reserve_exact(target - self.owed.len());
            self.recharge(memory);
        }
        self.owed.extend_from_slice(data);
    }

    /// Drops what is owed and gives its memory back (an emptied buffer, or
    /// a closed connection).
    pub fn release(&mut self, memory: &mut Memory) {
        self.owed = Vec::new();
        self.start = 0;
        self.recharge(memory);
    }

    /// Charges `memory` for the buffer's capacity now.
    fn recharge(&mut self, memory: &mut Memory) {
        memory.used = memory.used.saturating_sub(self.charged) + self.owed.capacity();
        self.charged = self.owed.capacity();
    }

    /// Bytes owed to the client.
    pub fn pending(&self) -> usize {
        self.owed.len() - self.start
    }
}

/// Writes as much of `data` as the stream takes now, counting it in `sent`.
fn write_some<S: Write>(stream: &mut S, data: &[u8], sent: &mut u64) -> Result<usize, Closed> {
    let mut done = 0;
    while done < data.len() {
        match stream.write(&data[done..]) {
            Ok(0) => return Err(Closed::Error),
            Ok(n) => {
                done += n;
                *sent += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(Closed::Error),
        }
    }
    Ok(done)
}

/// A live connection.
struct Live {
    stream: TcpStream,
    conn: Conn,
    /// When bytes were last read from it: idleness counts from here, and
    /// nothing else (a writable socket, a client that only reads) resets it.
    last_read: Instant,
    /// On [`Server::ready`].
    queued: bool,
    /// On [`Server::starved`].
    starved: bool,
}

/// The loop's connections, which of them have work, and the memory they
/// share.
struct Server {
    /// Open connections; the key is the mio token.
    conns: Slab<Live>,
    /// Connections to pump on this pass: an event came, or their share of
    /// the last pass ran out. Each key at most once (`Live::queued`).
    ready: Vec<usize>,
    /// Connections not read because [`Memory`] is spent, oldest first.
    /// Each key at most once (`Live::starved`).
    starved: VecDeque<usize>,
    /// All buffers' memory.
    memory: Memory,
    /// `--upper`.
    upper: bool,
    /// `udphub_tcp_connections`.
    open: Gauge,
    /// `udphub_tcp_received_bytes_total`, counted as bytes are read.
    received: Counter,
    /// `udphub_tcp_sent_bytes_total`, counted as bytes are written.
    sent: Counter,
}

impl Server {
    /// Puts `key` on the ready list unless it is there.
    fn mark_ready(&mut self, key: usize) {
        if let Some(live) = self.conns.get_mut(key) {
            if !live.queued {
                live.queued = true;
                self.ready.push(key);
            }
        }
    }

    /// Pumps every connection on the ready list once; those with work left
    /// go on the next pass's list (`batch` is scratch space kept between
    /// passes).
    fn pump_ready(&mut self, batch: &mut Vec<usize>, now: Instant, registry: &Registry) {
        std::mem::swap(&mut self.ready, batch);
        for key in batch.drain(..) {
            let Some(live) = self.conns.get_mut(key) else {
                continue;
            };
            if !live.queued {
                continue;
            }
            live.queued = false;
            let (received, sent) = (live.conn.received, live.conn.sent);
            let pumped = live
                .conn
                .pump(&mut live.stream, self.upper, &mut self.memory);
            if live.conn.received != received {
                live.last_read = now;
                self.received.increment(live.conn.received - received);
            }
            self.sent.increment(live.conn.sent - sent);
            match pumped {
                Pumped::Wait => {}
                Pumped::More => {
                    live.queued = true;
                    self.ready.push(key);
                }
                Pumped::Starved => {
                    if !live.starved {
                        live.starved = true;
                        self.starved.push_back(key);
                        counter!("udphub_tcp_buffer_limit_total").increment(1);
                    }
                }
                Pumped::Closed(why) => self.close(key, why, registry),
            }
        }
    }

    /// Puts starved connections back on the ready list, oldest first, one
    /// for each read's worth of memory free (so they do not all wake to
    /// find it spent again).
    fn resume(&mut self) {
        let mut wake = self.memory.available() / READ_CHUNK;
        while wake > 0 {
            let Some(key) = self.starved.pop_front() else {
                return;
            };
            if let Some(live) = self.conns.get_mut(key) {
                live.starved = false;
                wake -= 1;
                self.mark_ready(key);
            }
        }
    }

    /// Accepts up to [`ACCEPTS_PER_PASS`] connections.
    fn accept(
        &mut self,
        listener: &TcpListener,
        registry: &Registry,
        max_connections: usize,
        now: Instant,
        errors: &mut RateLimitedLog,
    ) -> Accepted {
        for _ in 0..ACCEPTS_PER_PASS {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    if self.conns.len() >= max_connections {
                        counter!("udphub_tcp_refused_total", "reason" => "max_connections")
                            .increment(1);
                        continue;
                    }
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    if let Err(e) = registry.register(
                        &mut stream,
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        errors.warn("register a connection", &e);
                        counter!("udphub_tcp_refused_total", "reason" => "accept_error")
                            .increment(1);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    entry.insert(Live {
                        stream,
                        conn: Conn::default(),
                        last_read: now,
                        queued: false,
                        starved: false,
                    });
                    counter!("udphub_tcp_accepted_total").increment(1);
                    self.open.increment(1.0);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Accepted::Drained,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // Out of descriptors (EMFILE/ENFILE) or memory: the
                    // connection waits in the backlog.
                    errors.warn("accept", &e);
                    counter!("udphub_tcp_refused_total", "reason" => "accept_error").increment(1);
                    return Accepted::Failed;
                }
            }
        }
        Accepted::More
    }

    /// Closes connections that sent nothing for `idle_timeout`.
    fn sweep(&mut self, now: Instant, idle_timeout: Duration, registry: &Registry) {
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, l)| now.saturating_duration_since(l.last_read) >= idle_timeout)
            .map(|(k, _)| k)
            .collect();
        for key in idle {
            self.close(key, Closed::Idle, registry);
        }
    }

    /// Deregisters and closes connection `key`, counting why, and gives its
    /// memory back.
    fn close(&mut self, key: usize, why: Closed, registry: &Registry) {
        let Some(mut live) = self.conns.try_remove(key) else {
            return;
        };
        if live.queued {
            self.ready.retain(|&k| k != key);
        }
        if live.starved {
            self.starved.retain(|&k| k != key);
        }
        live.conn.release(&mut self.memory);
        let _ = registry.deregister(&mut live.stream);
        counter!("udphub_tcp_closed_total", "reason" => why.label()).increment(1);
        self.open.decrement(1.0);
    }
}

/// How a pass's accepting ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accepted {
    /// The backlog is empty: the next connection brings an event.
    Drained,
    /// The pass's share ran out: accept again on the next pass.
    More,
    /// accept failed (out of descriptors): try again after [`ACCEPT_RETRY`].
    Failed,
}

/// Registers the metrics' help text.
fn describe() {
    describe_gauge!("udphub_tcp_connections", "TCP echo connections open now");
    describe_counter!(
        "udphub_tcp_accepted_total",
        "TCP echo connections accepted and served"
    );
    describe_counter!(
        "udphub_tcp_refused_total",
        "TCP echo connections refused, by reason: max_connections (accepted and closed at once) or accept_error (e.g. out of file descriptors)"
    );
    describe_counter!(
        "udphub_tcp_closed_total",
        "TCP echo connections closed, by reason: eof, error, idle (sent nothing for --idle-timeout), shutdown"
    );
    describe_counter!(
        "udphub_tcp_received_bytes_total",
        "Bytes read from TCP echo clients"
    );
    describe_counter!(
        "udphub_tcp_sent_bytes_total",
        "Bytes written back to TCP echo clients"
    );
    describe_gauge!(
        "udphub_tcp_buffered_bytes",
        "Memory the TCP echo connections' buffers hold now (at most --max-buffer-bytes)"
    );
    describe_counter!(
        "udphub_tcp_buffer_limit_total",
        "Times a TCP echo connection stopped being read because all buffers together reached --max-buffer-bytes (it is read again as memory frees; nothing is dropped)"
    );
}

/// Binds, writes the ready file (`tcp=ADDR`, `metrics=ADDR|off`), and
/// echoes until SIGINT/SIGTERM; then closes every connection. A second
/// signal exits at once.
pub fn run(
    config: &TcpEchoConfig,
    metrics: Option<SocketAddr>,
    ready_file: Option<&Path>,
) -> Result<(), Error> {
    let mut signals = crate::runtime::supervisor::install_signals()?;
    describe();
    raise_fd_limit(config.max_connections);
    let mut poll = Poll::new().map_err(|e| Error::io("create poll", e))?;
    let mut listener = TcpListener::bind(config.bind).map_err(|e| Error::Bind {
        addr: config.bind,
        what: "TCP echo socket",
        reason: e.to_string(),
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| Error::io("local address", e))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| Error::io("register listener", e))?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)
        .map_err(|e| Error::io("register signals", e))?;
    tracing::info!(
        event = "start",
        addr = %local,
        upper = config.upper,
        max_connections = config.max_connections,
        idle_timeout_ms = config.idle_timeout.as_millis() as u64,
        max_buffer_bytes = config.max_buffer_bytes,
        "udphub echo on tcp://{local}{} (max {} connections, idle timeout {}, max {} buffered bytes)",
        if config.upper { " (upper-casing)" } else { "" },
        config.max_connections,
        humantime::format_duration(config.idle_timeout),
        config.max_buffer_bytes,
    );
    if let Some(path) = ready_file {
        crate::runtime::supervisor::write_ready_file(path, "tcp", local, metrics)?;
    }

    let mut server = Server {
        conns: Slab::new(),
        ready: Vec::new(),
        starved: VecDeque::new(),
        memory: Memory::new(config.max_buffer_bytes),
        upper: config.upper,
        open: gauge!("udphub_tcp_connections"),
        received: counter!("udphub_tcp_received_bytes_total"),
        sent: counter!("udphub_tcp_sent_bytes_total"),
    };
    let buffered = gauge!("udphub_tcp_buffered_bytes");
    counter!("udphub_tcp_buffer_limit_total").increment(0);
    let mut batch = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut accept_errors = RateLimitedLog::default();
    let mut accepted = Accepted::Drained;
    let mut swept = Instant::now();
    loop {
        // Work left from the last pass: look for events without waiting.
        let timeout = if !server.ready.is_empty() || accepted == Accepted::More {
            Duration::ZERO
        } else if accepted == Accepted::Failed {
            ACCEPT_RETRY
        } else {
            SWEEP
        };
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("poll", e)),
        }
        let now = Instant::now();
        let mut accept = accepted != Accepted::Drained;
        let mut stop = false;
        for event in events.iter() {
            match event.token() {
                LISTENER => accept = true,
                SIGNALS => {
                    for sig in signals.pending() {
                        if sig == SIGHUP {
                            tracing::info!("SIGHUP: the echo server has no settings to reload");
                        } else if sig == SIGUSR2 {
                            tracing::info!("SIGUSR2: the echo server cannot hand over; ignored");
                        } else {
                            tracing::info!(event = "signal", signal = %sig, connections = server.conns.len(), "received signal {sig}; closing {} connections (again to exit at once)", server.conns.len());
                            stop = true;
                        }
                    }
                }
                Token(key) => server.mark_ready(key),
            }
        }
        if stop {
            let keys: Vec<usize> = server.conns.iter().map(|(k, _)| k).collect();
            for key in keys {
                server.close(key, Closed::Shutdown, poll.registry());
            }
            return Ok(());
        }
        accepted = if accept {
            server.accept(
                &listener,
                poll.registry(),
                config.max_connections,
                now,
                &mut accept_errors,
            )
        } else {
            Accepted::Drained
        };
        server.pump_ready(&mut batch, now, poll.registry());
        if now.saturating_duration_since(swept) >= SWEEP {
            swept = now;
            server.sweep(now, config.idle_timeout, poll.registry());
        }
        server.resume();
        buffered.set(server.memory.used() as f64);
    }
}

/// Raises the soft limit on open files towards the hard limit, enough for
/// `max_connections` (plus a margin), and says so if it cannot.
fn raise_fd_limit(max_connections: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let want = (max_connections as u64).saturating_add(64);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= want {
        return;
    }
    let target = want.min(hard);
    let got = match setrlimit(Resource::RLIMIT_NOFILE, target, hard) {
        Ok(()) => target,
        Err(_) => soft,
    };
    if got < want {
        tracing::warn!(
            event = "open_files_limited",
            limit = got,
            want,
            "open files limited to {got} (want {want} for --max-connections {max_connections}); raise LimitNOFILE or `ulimit -n`"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that reads from a script and writes into a sink that
    /// takes at most `take` bytes per call and blocks after `budget`.
    struct Fake {
        input: VecDeque<io::Result<Vec<u8>>>,
        written: Vec<u8>,
        budget: usize,
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.input.pop_front() {
                None => Err(io::ErrorKind::WouldBlock.into()),
                Some(Err(e)) => Err(e),
                Some(Ok(mut data)) => {
                    let n = data.len().min(buf.len());
                    buf[..n].copy_from_slice(&data[..n]);
                    if n < data.len() {
                        self.input.push_front(Ok(data.split_off(n)));
                    }
                    Ok(n)
                }
            }
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.budget);
            self.budget -= n;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn fake(input: Vec<io::Result<Vec<u8>>>, budget: usize) -> Fake {
        Fake {
            input: input.into(),
            written: Vec::new(),
            budget,
        }
    }

    /// Pumps until the connection waits for something other than its
    /// next turn (bounded).
    fn settle(c: &mut Conn, s: &mut Fake, memory: &mut Memory) -> Pumped {
        for _ in 0..1000 {
            match c.pump(s, false, memory) {
                Pumped::More => {}
                other => return other,
            }
        }
        panic!("never settled");
    }

    fn plenty() -> Memory {
        Memory::new(DEFAULT_BUFFER_BYTES)
    }

    #[test]
    fn each_read_is_sent_back_upper_cased_and_eof_closes() {
        let mut s = fake(
            vec![Ok(b"hello".to_vec()), Ok(b" w\xc3\xa9".to_vec())],
            1 << 20,
        );
        let mut c = Conn::default();
        let mut m = plenty();
        assert_eq!(c.pump(&mut s, true, &mut m), Pumped::Wait);
        assert_eq!(s.written, b"HELLO W\xc3\xa9");
        assert_eq!(m.used(), 0, "written straight back: nothing kept");
        s.input.push_back(Ok(Vec::new()));
        assert_eq!(c.pump(&mut s, true, &mut m), Pumped::Closed(Closed::Eof));
        assert_eq!((c.received, c.sent), (9, 9));
    }

    #[test]
    fn a_client_that_does_not_read_is_not_read_from_beyond_the_cap() {
        let big = vec![b'a'; 4 * MAX_PENDING];
        let mut s = fake(vec![Ok(big), Ok(Vec::new())], 1000);
        let mut c = Conn::default();
        let mut m = plenty();
        assert_eq!(settle(&mut c, &mut s, &mut m), Pumped::Wait);
        assert_eq!(s.written.len(), 1000);
        assert_eq!(c.pending(), MAX_PENDING, "reading stopped at the cap");
        assert_eq!(m.used(), MAX_PENDING, "the buffer is charged");
        // The client reads: everything comes back, then the EOF closes,
        // and the memory is given back.
        s.budget = usize::MAX;
        assert_eq!(settle(&mut c, &mut s, &mut m), Pumped::Closed(Closed::Eof));
        assert_eq!(s.written.len(), 4 * MAX_PENDING);
        assert_eq!(c.pending(), 0);
        assert_eq!(m.used(), 0);
    }

    #[test]
    fn a_pass_reads_a_bounded_share_and_says_there_may_be_more() {
        let input = (0..20).map(|_| Ok(vec![b'f'; READ_CHUNK])).collect();
        let mut s = fake(input, usize::MAX);
        let mut c = Conn::default();
        let mut m = plenty();
        assert_eq!(c.pump(&mut s, false, &mut m), Pumped::More);
        assert_eq!(c.received, (READS_PER_PASS * READ_CHUNK) as u64);
        assert_eq!(c.pump(&mut s, false, &mut m), Pumped::More);
        assert_eq!(settle(&mut c, &mut s, &mut m), Pumped::Wait);
        assert_eq!(
            (c.received, c.sent),
            (20 * READ_CHUNK as u64, 20 * READ_CHUNK as u64)
        );
    }

    #[test]
    fn shared_memory_stops_reading_without_dropping_and_frees_on_drain() {
        let cap = MIN_BUFFER_BYTES;
        let mut m = Memory::new(cap);
        // A takes all the memory: its client does not read.
        let mut a_s = fake(vec![Ok(vec![b'a'; 2 * cap])], 0);
        let mut a = Conn::default();
        assert_eq!(settle(&mut a, &mut a_s, &mut m), Pumped::Wait);
        assert_eq!((a.pending(), m.used()), (cap, cap));
        // B, with something to say, is not read at all.
        let mut b_s = fake(vec![Ok(b"hi".to_vec())], 100);
        let mut b = Conn::default();
        assert_eq!(b.pump(&mut b_s, false, &mut m), Pumped::Starved);
        assert_eq!((b.received, b_s.input.len()), (0, 1), "left in the socket");
        // A's client reads half: the buffer keeps its memory while owed.
        a_s.budget = cap / 2;
        assert_eq!(settle(&mut a, &mut a_s, &mut m), Pumped::Wait);
        assert!(m.used() <= cap, "{} > {cap}", m.used());
        // A's client reads it all; A's buffer is released, B is served.
        a_s.budget = usize::MAX;
        assert_eq!(settle(&mut a, &mut a_s, &mut m), Pumped::Wait);
        assert_eq!(a.sent, 2 * cap as u64);
        assert_eq!(m.used(), 0);
        assert_eq!(b.pump(&mut b_s, false, &mut m), Pumped::Wait);
        assert_eq!(b_s.written, b"hi");
        // A closed connection gives its buffer back.
        let mut c_s = fake(vec![Ok(vec![b'c'; 100])], 10);
        let mut c = Conn::default();
        assert_eq!(c.pump(&mut c_s, false, &mut m), Pumped::Wait);
        assert!(m.used() >= 90);
        c.release(&mut m);
        assert_eq!(m.used(), 0);
    }

    #[test]
    fn a_byte_at_a_time_grows_the_buffer_by_doubling_within_the_cap() {
        let input = (0..3000).map(|_| Ok(vec![b'x'])).collect();
        let mut s = fake(input, 0);
        let mut c = Conn::default();
        let mut m = plenty();
        assert_eq!(settle(&mut c, &mut s, &mut m), Pumped::Wait);
        assert_eq!(c.pending(), 3000);
        assert!(m.used() >= 3000 && m.used() <= 2 * 3000, "{}", m.used());
    }

    #[test]
    fn eof_waits_for_what_is_owed_and_errors_close() {
        let mut m = plenty();
        let mut s = fake(vec![Ok(b"x".repeat(10)), Ok(Vec::new())], 4);
        let mut c = Conn::default();
        assert_eq!(
            c.pump(&mut s, false, &mut m),
            Pumped::Wait,
            "6 bytes still owed"
        );
        s.budget = 100;
        assert_eq!(c.pump(&mut s, false, &mut m), Pumped::Closed(Closed::Eof));
        let mut s = fake(vec![Err(io::ErrorKind::ConnectionReset.into())], 100);
        assert_eq!(
            Conn::default().pump(&mut s, false, &mut m),
            Pumped::Closed(Closed::Error)
        );
        let mut s = fake(vec![Ok(b"x".to_vec())], 100);
        s.budget = 0;
        let mut broken = Conn::default();
        assert_eq!(broken.pump(&mut s, false, &mut m), Pumped::Wait);
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        assert_eq!(
            broken.pump(&mut Broken, false, &mut m),
            Pumped::Closed(Closed::Error)
        );
    }
}
