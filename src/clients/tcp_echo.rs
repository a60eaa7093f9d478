//! `udphub echo --tcp`: seed 001's concurrent TCP echo server
//! (`socketserver.ThreadingTCPServer`), as one mio loop instead of a thread
//! per connection.
//!
//! The seed's semantics: whatever a read returns is sent back (ASCII
//! upper-cased with `--upper`); a connection ends at EOF or on an error,
//! and one bad connection never affects the others. What the seed lacks
//! and a server needs: a cap on connections (beyond it, a new one is
//! accepted and closed at once, and counted), an idle timeout, bounded
//! buffers (a client that sends without reading stops being read until it
//! reads: TCP's own flow control pushes back on it, and on no one else),
//! and metrics for all of it.
//!
//! [`Conn`] is the per-connection state machine, tested without sockets;
//! [`run`] owns the sockets and the poll.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use metrics::{counter, describe_counter, describe_gauge, gauge};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::SIGHUP;
use slab::Slab;

use crate::error::Error;
use crate::runtime::event_loop::RateLimitedLog;

/// The listening socket.
const LISTENER: Token = Token(usize::MAX - 1);
/// SIGINT/SIGTERM/SIGHUP.
const SIGNALS: Token = Token(usize::MAX - 2);
/// Bytes one read takes (the seed's `recv(1024)`, larger: the echo is per
/// read either way).
const READ_CHUNK: usize = 16 * 1024;
/// Bytes waiting to go back to one client before the server stops reading
/// from it.
pub const MAX_PENDING: usize = 64 * 1024;
/// How often idle connections are looked for.
const SWEEP: Duration = Duration::from_millis(250);

/// `udphub echo --tcp` settings.
#[derive(Debug, Clone)]
pub struct TcpEchoConfig {
    /// Where to listen.
    pub bind: SocketAddr,
    /// Upper-case the replies.
    pub upper: bool,
    /// Most connections at once.
    pub max_connections: usize,
    /// Close a connection silent for this long.
    pub idle_timeout: Duration,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client closed its side, and everything was sent back.
    Eof,
    /// A read or write failed (reset, broken pipe, …).
    Error,
    /// Silent for the idle timeout.
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

/// One connection's echo state: what is owed back to the client, and
/// whether its side is closed. Does no I/O of its own: [`Conn::pump`] takes
/// the stream as any `Read + Write`.
#[derive(Debug, Default)]
pub struct Conn {
    /// Bytes read and not yet written back, in order.
    pending: VecDeque<u8>,
    /// The client sent EOF.
    eof: bool,
    /// Bytes read from the client in all.
    pub received: u64,
    /// Bytes written back in all.
    pub sent: u64,
}

impl Conn {
    /// Reads what the client sent and writes back what it can, until the
    /// stream would block or [`MAX_PENDING`] bytes are owed (then the
    /// client's reads must make room first). Returns `Some` when the
    /// connection is over.
    pub fn pump<S: Read + Write>(&mut self, stream: &mut S, upper: bool) -> Option<Closed> {
        let mut buf = [0u8; READ_CHUNK];
        loop {
            if let Err(closed) = self.flush(stream) {
                return Some(closed);
            }
            if self.eof {
                return self.pending.is_empty().then_some(Closed::Eof);
            }
            if self.pending.len() >= MAX_PENDING {
                // Wait for a writable event.
                return None;
            }
            let room = (MAX_PENDING - self.pending.len()).min(READ_CHUNK);
            match stream.read(&mut buf[..room]) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.received += n as u64;
                    let chunk = &mut buf[..n];
                    if upper {
                        chunk.make_ascii_uppercase();
                    }
                    self.pending.extend(chunk.iter());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Some(Closed::Error),
            }
        }
    }

    /// Writes as much of what is owed as the stream takes.
    fn flush<S: Write>(&mut self, stream: &mut S) -> Result<(), Closed> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            match stream.write(front) {
                Ok(0) => return Err(Closed::Error),
                Ok(n) => {
                    self.sent += n as u64;
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Closed::Error),
            }
        }
        Ok(())
    }

    /// Bytes owed to the client.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// A live connection.
struct Live {
    stream: TcpStream,
    conn: Conn,
    last_active: Instant,
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
        "TCP echo connections closed, by reason: eof, error, idle, shutdown"
    );
    describe_counter!(
        "udphub_tcp_received_bytes_total",
        "Bytes read from TCP echo clients"
    );
    describe_counter!(
        "udphub_tcp_sent_bytes_total",
        "Bytes written back to TCP echo clients"
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
        "udphub echo on tcp://{local}{} (max {} connections, idle timeout {})",
        if config.upper { " (upper-casing)" } else { "" },
        config.max_connections,
        humantime::format_duration(config.idle_timeout)
    );
    if let Some(path) = ready_file {
        write_ready(path, local, metrics)?;
    }

    let mut conns: Slab<Live> = Slab::new();
    let mut events = Events::with_capacity(1024);
    let mut accept_errors = RateLimitedLog::default();
    let mut retry_accept = false;
    let mut swept = Instant::now();
    let open = gauge!("udphub_tcp_connections");
    loop {
        let timeout = if retry_accept {
            Duration::from_millis(50)
        } else {
            SWEEP
        };
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io("poll", e)),
        }
        let mut accept = std::mem::take(&mut retry_accept);
        let mut stop = false;
        for event in events.iter() {
            match event.token() {
                LISTENER => accept = true,
                SIGNALS => {
                    for sig in signals.pending() {
                        if sig == SIGHUP {
                            tracing::info!("SIGHUP: the echo server has no settings to reload");
                        } else {
                            tracing::info!("received signal {sig}; closing {} connections (again to exit at once)", conns.len());
                            stop = true;
                        }
                    }
                }
                Token(key) => {
                    let Some(live) = conns.get_mut(key) else {
                        continue;
                    };
                    live.last_active = Instant::now();
                    let result = live.conn.pump(&mut live.stream, config.upper);
                    if let Some(why) = result {
                        close(&mut conns, key, why, &poll);
                        open.decrement(1.0);
                    }
                }
            }
        }
        if stop {
            let keys: Vec<usize> = conns.iter().map(|(k, _)| k).collect();
            for key in keys {
                close(&mut conns, key, Closed::Shutdown, &poll);
                open.decrement(1.0);
            }
            return Ok(());
        }
        if accept {
            loop {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        if conns.len() >= config.max_connections {
                            counter!("udphub_tcp_refused_total", "reason" => "max_connections")
                                .increment(1);
                            drop(stream);
                            continue;
                        }
                        let entry = conns.vacant_entry();
                        let token = Token(entry.key());
                        if let Err(e) = poll.registry().register(
                            &mut stream,
                            token,
                            Interest::READABLE | Interest::WRITABLE,
                        ) {
                            accept_errors.warn("register a connection", &e);
                            counter!("udphub_tcp_refused_total", "reason" => "accept_error")
                                .increment(1);
                            continue;
                        }
                        let _ = stream.set_nodelay(true);
                        entry.insert(Live {
                            stream,
                            conn: Conn::default(),
                            last_active: Instant::now(),
                        });
                        counter!("udphub_tcp_accepted_total").increment(1);
                        open.increment(1.0);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                    Err(e) => {
                        // Out of descriptors (EMFILE/ENFILE) or memory: the
                        // connection waits in the backlog; try again soon
                        // rather than spin on a listener that stays ready.
                        accept_errors.warn("accept", &e);
                        counter!("udphub_tcp_refused_total", "reason" => "accept_error")
                            .increment(1);
                        retry_accept = true;
                        break;
                    }
                }
            }
        }
        if swept.elapsed() >= SWEEP {
            swept = Instant::now();
            let idle: Vec<usize> = conns
                .iter()
                .filter(|(_, l)| l.last_active.elapsed() >= config.idle_timeout)
                .map(|(k, _)| k)
                .collect();
            for key in idle {
                close(&mut conns, key, Closed::Idle, &poll);
                open.decrement(1.0);
            }
        }
    }
}

/// Deregisters and closes connection `key`, counting why and its bytes.
fn close(conns: &mut Slab<Live>, key: usize, why: Closed, poll: &Poll) {
    if let Some(mut live) = conns.try_remove(key) {
        let _ = poll.registry().deregister(&mut live.stream);
        counter!("udphub_tcp_closed_total", "reason" => why.label()).increment(1);
        counter!("udphub_tcp_received_bytes_total").increment(live.conn.received);
        counter!("udphub_tcp_sent_bytes_total").increment(live.conn.sent);
    }
}

/// Writes `tcp=ADDR` and `metrics=ADDR|off`, like the UDP servers' ready
/// file (written to a temporary file and renamed).
fn write_ready(path: &Path, tcp: SocketAddr, metrics: Option<SocketAddr>) -> Result<(), Error> {
    let metrics = metrics.map_or("off".to_string(), |a| a.to_string());
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let fail =
        |e: io::Error| Error::Config(format!("cannot write --ready-file {}: {e}", path.display()));
    std::fs::write(&tmp, format!("tcp={tcp}\nmetrics={metrics}\n")).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
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

    #[test]
    fn each_read_is_sent_back_upper_cased_and_eof_closes() {
        let mut s = fake(
            vec![Ok(b"hello".to_vec()), Ok(b" w\xc3\xa9".to_vec())],
            1 << 20,
        );
        let mut c = Conn::default();
        assert_eq!(c.pump(&mut s, true), None);
        assert_eq!(s.written, b"HELLO W\xc3\xa9");
        s.input.push_back(Ok(Vec::new()));
        assert_eq!(c.pump(&mut s, true), Some(Closed::Eof));
        assert_eq!((c.received, c.sent), (9, 9));
    }

    #[test]
    fn a_client_that_does_not_read_is_not_read_from_beyond_the_cap() {
        let big = vec![b'a'; 4 * MAX_PENDING];
        let mut s = fake(vec![Ok(big), Ok(Vec::new())], 1000);
        let mut c = Conn::default();
        assert_eq!(c.pump(&mut s, false), None);
        assert_eq!(s.written.len(), 1000);
        assert_eq!(c.pending(), MAX_PENDING, "reading stopped at the cap");
        // The client reads: everything comes back, then the EOF closes.
        s.budget = usize::MAX;
        assert_eq!(c.pump(&mut s, false), Some(Closed::Eof));
        assert_eq!(s.written.len(), 4 * MAX_PENDING);
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn eof_waits_for_what_is_owed_and_errors_close() {
        let mut s = fake(vec![Ok(b"x".repeat(10)), Ok(Vec::new())], 4);
        let mut c = Conn::default();
        assert_eq!(c.pump(&mut s, false), None, "6 bytes still owed");
        s.budget = 100;
        assert_eq!(c.pump(&mut s, false), Some(Closed::Eof));
        let mut s = fake(vec![Err(io::ErrorKind::ConnectionReset.into())], 100);
        assert_eq!(Conn::default().pump(&mut s, false), Some(Closed::Error));
        let mut s = fake(vec![Ok(b"x".to_vec())], 100);
        s.budget = 0;
        let mut broken = Conn::default();
        assert_eq!(broken.pump(&mut s, false), None);
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
        assert_eq!(broken.pump(&mut Broken, false), Some(Closed::Error));
    }
}
