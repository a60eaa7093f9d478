//! The `/metrics` endpoint: the Prometheus recorder, and a small HTTP
//! server on its own thread that renders it; beside it the probes,
//! `/healthz` (the loops are running) and `/readyz` (the relay serves),
//! read from the relay's [`Readiness`] (atomics: a probe never waits on a
//! loop), and the `udphub_build_info{version}` gauge.
//!
//! Why not metrics-exporter-prometheus' `http-listener`: it runs hyper on
//! a tokio runtime and binds inside that runtime, so the process cannot
//! learn the port it got for `--metrics 127.0.0.1:0` nor report a taken
//! port before it says it is ready. Answering a scrape is a few lines of
//! HTTP/1.0 on a listener we bind ourselves, off the relay's loop.
//!
//! One thread serves every connection from a small non-blocking mio loop,
//! so a slow client holds nothing but its own slot, never the thread: each
//! connection has [`DEADLINE`] in all to send its request and take the
//! answer (a whole-request deadline, not a per-read timeout, which a byte
//! every few seconds would satisfy for ever); at most [`MAX_CONNECTIONS`]
//! are open, and one more closes the oldest.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::error::Error;
use crate::runtime::event_loop::RateLimitedLog;
use crate::runtime::metrics::HISTOGRAMS;
use crate::runtime::readiness::Readiness;

/// The listening socket.
const LISTENER: Token = Token(usize::MAX - 1);
/// Connections open at once. Prometheus scrapes a target serially, so a
/// handful covers several scrapers; at the cap a new connection closes the
/// oldest (the likeliest to be stalled), so to keep a scrape out a client
/// must open connections faster than a scrape completes, not merely hold
/// them open.
const MAX_CONNECTIONS: usize = 32;
/// Connections accepted per pass of the loop before the open ones get
/// their turn.
const ACCEPTS_PER_PASS: usize = 64;
/// How long a connection may take, from accept to the last byte of the
/// answer (a scrape takes milliseconds; Prometheus' default scrape timeout
/// is 10 s, and it reconnects for every scrape).
pub const DEADLINE: Duration = Duration::from_secs(5);
/// The longest request head read (a scrape's is ~200 bytes).
const MAX_REQUEST: usize = 8 * 1024;
/// How often histogram samples are folded into their buckets (the crate's
/// "upkeep"), so the recorder's buffers stay small. Under a flood that
/// arrives in tiny batches the loop records ~340,000 samples a second (one
/// per pass and per `recvmmsg`); buffered for 5 s that was ~15 MB of RSS,
/// for 250 ms it is under 1 MB.
const UPKEEP_INTERVAL: Duration = Duration::from_millis(250);
/// How long to wait before accepting again after accept failed (out of
/// descriptors): the listener stays ready, so retrying at once would spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// A running metrics endpoint.
#[derive(Debug)]
pub struct Exporter {
    /// Where it listens (port 0 resolved).
    pub local_addr: SocketAddr,
}

/// Binds `addr`, installs the Prometheus recorder as the process's global
/// one, and serves `/metrics` from a thread. Call once per process, before
/// any loop registers its metrics. A server without probes (`udphub
/// echo`) answers `/healthz` and `/readyz` with 404; see [`start_with`].
pub fn start(addr: SocketAddr) -> Result<Exporter, Error> {
    start_with(addr, None)
}

/// [`start`], with `/healthz` and `/readyz` answered from `health`.
pub fn start_with(addr: SocketAddr, health: Option<Readiness>) -> Result<Exporter, Error> {
    // Bound first, so a taken port is reported before anything else.
    let listener = bind(addr)?;
    let recorder = install(addr)?;
    spawn(listener, recorder, health)
}

/// The installed recorder, waiting for its endpoint ([`serve_at`]).
pub struct Recorder(PrometheusHandle);

/// Installs the Prometheus recorder as the process's global one, without
/// an endpoint yet: a process taking over from another installs it before
/// its loops register their metrics, and binds `addr` (which the other
/// may still hold) once that one has let go ([`serve_at`]).
pub fn install(addr: SocketAddr) -> Result<Recorder, Error> {
    let fail = |reason: String| Error::Bind {
        what: "metrics listener",
        addr,
        reason,
    };
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in HISTOGRAMS {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
            .map_err(|e| fail(e.to_string()))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| fail(e.to_string()))?;
    Ok(Recorder(handle))
}

/// Binds `addr` for `recorder`'s endpoint, retrying while the address is
/// in use for up to `patience` (the process handing over lets go of it
/// as it exits), and serves `/metrics` from a thread.
pub fn serve_at(
    addr: SocketAddr,
    recorder: Recorder,
    patience: Duration,
    health: Option<Readiness>,
) -> Result<Exporter, Error> {
    let deadline = Instant::now() + patience;
    let listener = loop {
        match bind(addr) {
            Ok(l) => break l,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e),
        }
    };
    spawn(listener, recorder, health)
}

fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).map_err(|e| Error::Bind {
        what: "metrics listener",
        addr,
        reason: e.to_string(),
    })
}

fn spawn(
    mut listener: TcpListener,
    Recorder(handle): Recorder,
    health: Option<Readiness>,
) -> Result<Exporter, Error> {
    let local_addr = listener
        .local_addr()
        .map_err(|e| Error::io("metrics listener address", e))?;
    let poll = Poll::new().map_err(|e| Error::io("create the metrics poll", e))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| Error::io("register the metrics listener", e))?;
    describe_counter!(
        "udphub_metrics_connections_dropped_total",
        "Connections to the metrics endpoint closed unanswered, by reason: deadline (request and answer not done within 5 s), max_connections (the oldest, closed to make room for a new one)"
    );
    for reason in ["deadline", "max_connections"] {
        counter!("udphub_metrics_connections_dropped_total", "reason" => reason).increment(0);
    }
    describe_gauge!(
        "udphub_build_info",
        "Always 1; its version label is the running binary's version (Cargo.toml)"
    );
    gauge!("udphub_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    thread::Builder::new()
        .name("udphub-metrics".into())
        .spawn(move || serve(poll, listener, handle, health))
        .map_err(|e| Error::io("start the metrics thread", e))?;
    Ok(Exporter { local_addr })
}

/// One connection to the endpoint.
struct Scrape {
    stream: TcpStream,
    /// When it is closed, answered or not.
    deadline: Instant,
    /// The request head read so far.
    request: Vec<u8>,
    /// The whole answer once the request is read, and how much of it is
    /// written.
    answer: Option<(Vec<u8>, usize)>,
}

/// Serves scrapes until the process ends.
fn serve(
    mut poll: Poll,
    listener: TcpListener,
    handle: PrometheusHandle,
    health: Option<Readiness>,
) {
    let mut scrapes: Slab<Scrape> = Slab::with_capacity(MAX_CONNECTIONS);
    let mut events = Events::with_capacity(MAX_CONNECTIONS + 1);
    let mut errors = RateLimitedLog::default();
    let mut next_upkeep = Instant::now();
    // Accept without an event: the last pass's share ran out, or accept
    // failed and is retried after ACCEPT_RETRY.
    let mut accept_again: Option<Duration> = None;
    loop {
        let now = Instant::now();
        if now >= next_upkeep {
            crate::runtime::metrics::draining(|| handle.run_upkeep());
            next_upkeep = now + UPKEEP_INTERVAL;
        }
        let wake = scrapes
            .iter()
            .map(|(_, s)| s.deadline)
            .fold(next_upkeep, Instant::min);
        let mut timeout = wake.saturating_duration_since(now);
        if let Some(retry) = accept_again {
            timeout = timeout.min(retry);
        }
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                errors.warn("metrics poll", &e);
                thread::sleep(ACCEPT_RETRY);
            }
            continue;
        }
        let mut accept = accept_again.take().is_some();
        for event in events.iter() {
            match event.token() {
                LISTENER => accept = true,
                Token(key) => {
                    let Some(scrape) = scrapes.get_mut(key) else {
                        continue;
                    };
                    let page = |path: Page| match path {
                        Page::Metrics => Some((
                            "200 OK",
                            crate::runtime::metrics::draining(|| handle.render()),
                        )),
                        Page::Health => probe(health.as_ref(), Readiness::healthy),
                        Page::Ready => probe(health.as_ref(), Readiness::ready),
                    };
                    if advance(scrape, page) {
                        close(&mut scrapes, key, &poll, None);
                    }
                }
            }
        }
        if accept {
            accept_again = accept_some(&listener, &mut scrapes, &poll, &mut errors);
        }
        let now = Instant::now();
        let expired: Vec<usize> = scrapes
            .iter()
            .filter(|(_, s)| s.deadline <= now)
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            close(&mut scrapes, key, &poll, Some("deadline"));
        }
    }
}

/// Accepts up to [`ACCEPTS_PER_PASS`] connections, closing the oldest one
/// for each beyond [`MAX_CONNECTIONS`]. Returns when to accept again
/// without an event, if at all.
fn accept_some(
    listener: &TcpListener,
    scrapes: &mut Slab<Scrape>,
    poll: &Poll,
    errors: &mut RateLimitedLog,
) -> Option<Duration> {
    for _ in 0..ACCEPTS_PER_PASS {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                // EMFILE and friends: the connection waits in the backlog.
                errors.warn("metrics listener", &e);
                return Some(ACCEPT_RETRY);
            }
        };
        if scrapes.len() >= MAX_CONNECTIONS {
            let oldest = scrapes
                .iter()
                .min_by_key(|(_, s)| s.deadline)
                .map(|(k, _)| k);
            if let Some(key) = oldest {
                close(scrapes, key, poll, Some("max_connections"));
            }
        }
        let entry = scrapes.vacant_entry();
        if let Err(e) = poll.registry().register(
            &mut stream,
            Token(entry.key()),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            errors.warn("metrics connection", &e);
            continue;
        }
        entry.insert(Scrape {
            stream,
            deadline: Instant::now() + DEADLINE,
            request: Vec::new(),
            answer: None,
        });
    }
    Some(Duration::ZERO)
}

/// Closes connection `key`; `dropped` says why it goes unanswered, if it
/// does. One that has not begun its answer is told why (`408` past its
/// deadline, `503` closed to make room), if its socket takes it at once.
fn close(scrapes: &mut Slab<Scrape>, key: usize, poll: &Poll, dropped: Option<&'static str>) {
    let Some(mut scrape) = scrapes.try_remove(key) else {
        return;
    };
    let _ = poll.registry().deregister(&mut scrape.stream);
    // Read what it sent beyond its request head (a bounded amount): a
    // close with unread bytes is a reset, which could overtake the answer.
    let mut buf = [0u8; 1024];
    for _ in 0..MAX_REQUEST / buf.len() {
        if !matches!(scrape.stream.read(&mut buf), Ok(n) if n > 0) {
            break;
        }
    }
    if let Some(reason) = dropped {
        if scrape.answer.is_none() {
            let answer = if reason == "deadline" {
                response("408 Request Timeout", b"request too slow\n")
            } else {
                response("503 Service Unavailable", b"busy\n")
            };
            let _ = scrape.stream.write(&answer);
        }
        counter!("udphub_metrics_connections_dropped_total", "reason" => reason).increment(1);
    }
}

/// Moves a connection on as far as its socket allows: reads the request
/// until its head is whole, answers it, writes the answer. True when the
/// connection is done (answered, or failed).
fn advance(scrape: &mut Scrape, render: impl FnOnce(Page) -> Option<Reply>) -> bool {
    if scrape.answer.is_none() {
        let mut buf = [0u8; 1024];
        loop {
            match scrape.stream.read(&mut buf) {
                // The client stopped sending: answer what it sent.
                Ok(0) => break,
                Ok(n) => {
                    scrape.request.extend_from_slice(&buf[..n]);
                    if head_is_whole(&scrape.request) || scrape.request.len() > MAX_REQUEST {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return true,
            }
        }
        scrape.answer = Some((answer(&scrape.request, render), 0));
    }
    let Some((answer, written)) = scrape.answer.as_mut() else {
        return true;
    };
    while *written < answer.len() {
        match scrape.stream.write(&answer[*written..]) {
            Ok(0) => return true,
            Ok(n) => *written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    true
}

/// The request head ends with an empty line.
fn head_is_whole(request: &[u8]) -> bool {
    request.windows(4).any(|w| w == b"\r\n\r\n") || request.windows(2).any(|w| w == b"\n\n")
}

/// The pages a GET may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    /// `/metrics`: the Prometheus text.
    Metrics,
    /// `/healthz`: liveness.
    Health,
    /// `/readyz`: readiness.
    Ready,
}

/// A page's status line and body; `None`: this server has no such page.
type Reply = (&'static str, String);

/// A probe's answer: 200 with the phase when `check` holds, 503 with it
/// when not; `None` on a server without probes.
fn probe(health: Option<&Readiness>, check: fn(&Readiness) -> bool) -> Option<Reply> {
    let r = health?;
    let phase = r.phase().name();
    Some(if check(r) {
        ("200 OK", format!("ok: {phase}\n"))
    } else if r.healthy() {
        ("503 Service Unavailable", format!("not ready: {phase}\n"))
    } else {
        (
            "503 Service Unavailable",
            format!("not running: {phase}, the loops are not all running\n"),
        )
    })
}

/// The whole HTTP/1.0 answer to `request`; `render` makes the page.
fn answer(request: &[u8], render: impl FnOnce(Page) -> Option<Reply>) -> Vec<u8> {
    if request.len() > MAX_REQUEST {
        return response("431 Request Header Fields Too Large", b"");
    }
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let page = match (method, path) {
        (b"GET", b"/metrics") => Page::Metrics,
        (b"GET", b"/healthz") => Page::Health,
        (b"GET", b"/readyz") => Page::Ready,
        (b"GET", b"/") => {
            return response(
                "200 OK",
                b"udphub: metrics are at /metrics, probes at /healthz and /readyz\n",
            )
        }
        (b"GET", _) => return response("404 Not Found", b"not found; try /metrics\n"),
        _ => return response("405 Method Not Allowed", b"GET only\n"),
    };
    match render(page) {
        Some((status, body)) => response(status, body.as_bytes()),
        None => response("404 Not Found", b"no probes on this server; try /metrics\n"),
    }
}

/// A whole HTTP/1.0 response; the connection closes after it.
fn response(status: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(p: Page) -> Option<Reply> {
        (p == Page::Metrics).then(|| ("200 OK", "page\n".to_string()))
    }

    fn status(request: &[u8]) -> String {
        let out = answer(request, page);
        let out = String::from_utf8(out).unwrap();
        out.lines().next().unwrap().to_string()
    }

    #[test]
    fn requests_are_routed_by_method_and_path() {
        assert_eq!(status(b"GET /metrics HTTP/1.0\r\n\r\n"), "HTTP/1.0 200 OK");
        assert_eq!(status(b"GET /metrics?x=1 HTTP/1.1\r\n"), "HTTP/1.0 200 OK");
        assert_eq!(status(b"GET / HTTP/1.0\r\n\r\n"), "HTTP/1.0 200 OK");
        assert_eq!(
            status(b"GET /nope HTTP/1.0\r\n\r\n"),
            "HTTP/1.0 404 Not Found"
        );
        assert_eq!(
            status(b"POST /metrics HTTP/1.0\r\n\r\n"),
            "HTTP/1.0 405 Method Not Allowed"
        );
        assert_eq!(status(b""), "HTTP/1.0 405 Method Not Allowed");
        assert_eq!(
            status(&vec![b'a'; MAX_REQUEST + 1]),
            "HTTP/1.0 431 Request Header Fields Too Large"
        );
        // No probes on this server.
        assert_eq!(
            status(b"GET /readyz HTTP/1.0\r\n\r\n"),
            "HTTP/1.0 404 Not Found"
        );
        let page = answer(b"GET /metrics HTTP/1.0\r\n\r\n", page);
        assert!(page.ends_with(b"Content-Length: 5\r\nConnection: close\r\n\r\npage\n"));
    }

    #[test]
    fn the_probes_follow_the_relay_phase() {
        let r = Readiness::default();
        let ask = |path: &str| {
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            let out = answer(request.as_bytes(), |p| match p {
                Page::Metrics => None,
                Page::Health => probe(Some(&r), Readiness::healthy),
                Page::Ready => probe(Some(&r), Readiness::ready),
            });
            String::from_utf8(out).unwrap()
        };
        assert!(ask("/healthz").starts_with("HTTP/1.0 503"));
        assert!(ask("/readyz").ends_with("not running: starting, the loops are not all running\n"));
        r.expect_loops(1);
        r.loop_started();
        assert!(ask("/healthz").starts_with("HTTP/1.0 200"));
        let ready = ask("/readyz");
        assert!(ready.starts_with("HTTP/1.0 503") && ready.ends_with("not ready: starting\n"));
        r.loop_polled();
        assert!(ask("/readyz").ends_with("\r\n\r\nok: serving\n"));
        r.hand_over_started();
        assert!(ask("/readyz").ends_with("not ready: handing_over\n"));
        assert!(ask("/healthz?verbose").starts_with("HTTP/1.0 200"));
        r.hand_over_ended(true);
        r.shutting_down();
        assert!(ask("/readyz").ends_with("not ready: shutting_down\n"));
        r.loop_ended();
        assert!(ask("/healthz").starts_with("HTTP/1.0 503"));
    }

    #[test]
    fn a_head_is_whole_at_its_empty_line() {
        assert!(!head_is_whole(b"GET /metrics HTTP/1.0\r\nHost: a\r\n"));
        assert!(head_is_whole(b"GET /metrics HTTP/1.0\r\nHost: a\r\n\r\n"));
        assert!(head_is_whole(b"GET /metrics HTTP/1.0\n\n"));
    }
}
