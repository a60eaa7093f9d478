//! The `/metrics` endpoint: the Prometheus recorder, and a small HTTP
//! server on its own thread that renders it.
//!
//! Why not metrics-exporter-prometheus' `http-listener`: it runs hyper on
//! a tokio runtime and binds inside that runtime, so the process cannot
//! learn the port it got for `--metrics 127.0.0.1:0` nor report a taken
//! port before it says it is ready. Answering a scrape is a few lines of
//! HTTP/1.0 on a std `TcpListener` we bind ourselves, off the relay's loop:
//! a slow scraper holds only its own short-lived connection thread.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::Error;
use crate::runtime::metrics::HISTOGRAMS;

/// Scrapes answered at once; more are refused with 503 (Prometheus
/// scrapes one target serially; a handful covers several scrapers).
const MAX_CONNECTIONS: usize = 8;
/// How long a connection may take to send its request or read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read (a scrape's is ~200 bytes).
const MAX_REQUEST: usize = 8 * 1024;
/// How often histogram samples are folded into their buckets (the crate's
/// "upkeep"), so the recorder's buffers stay small. Under a flood that
/// arrives in tiny batches the loop records ~340,000 samples a second (one
/// per pass and per `recvmmsg`); buffered for 5 s that was ~15 MB of RSS,
/// for 250 ms it is under 1 MB.
const UPKEEP_INTERVAL: Duration = Duration::from_millis(250);

/// A running metrics endpoint.
#[derive(Debug)]
pub struct Exporter {
    /// Where it listens (port 0 resolved).
    pub local_addr: SocketAddr,
}

/// Binds `addr`, installs the Prometheus recorder as the process's global
/// one, and serves `/metrics` from a thread. Call once per process, before
/// any loop registers its metrics.
pub fn start(addr: SocketAddr) -> Result<Exporter, Error> {
    let bind_error = |reason: String| Error::Bind {
        what: "metrics listener",
        addr,
        reason,
    };
    let listener = TcpListener::bind(addr).map_err(|e| bind_error(e.to_string()))?;
    let local_addr = listener
        .local_addr()
        .map_err(|e| Error::io("metrics listener address", e))?;
    // accept() honours SO_RCVTIMEO: it wakes the thread for upkeep.
    socket2::SockRef::from(&listener)
        .set_read_timeout(Some(UPKEEP_INTERVAL))
        .map_err(|e| Error::io("metrics listener timeout", e))?;
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in HISTOGRAMS {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(name.to_string()), buckets)
            .map_err(|e| bind_error(e.to_string()))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| bind_error(e.to_string()))?;
    thread::Builder::new()
        .name("udphub-metrics".into())
        .spawn(move || serve(listener, handle))
        .map_err(|e| Error::io("start the metrics thread", e))?;
    Ok(Exporter { local_addr })
}

/// Accepts scrapes until the process ends.
fn serve(listener: TcpListener, handle: PrometheusHandle) {
    let busy = Arc::new(AtomicUsize::new(0));
    let mut last_upkeep = Instant::now();
    loop {
        if last_upkeep.elapsed() >= UPKEEP_INTERVAL {
            handle.run_upkeep();
            last_upkeep = Instant::now();
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and friends: pause rather than spin.
                tracing::warn!("metrics listener: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            busy.fetch_sub(1, Ordering::AcqRel);
            let _ = respond(&stream, "503 Service Unavailable", b"busy\n");
            continue;
        }
        let handle = handle.clone();
        let busy_here = Arc::clone(&busy);
        let spawned = thread::Builder::new()
            .name("udphub-scrape".into())
            .spawn(move || {
                let _ = answer(stream, &handle);
                busy_here.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Reads one request and answers it.
fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST {
            return respond(&stream, "431 Request Header Fields Too Large", b"");
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    match (method, path) {
        (b"GET", b"/metrics") => respond(&stream, "200 OK", handle.render().as_bytes()),
        (b"GET", b"/") => respond(&stream, "200 OK", b"udphub: metrics are at /metrics\n"),
        (b"GET", _) => respond(&stream, "404 Not Found", b"not found; try /metrics\n"),
        _ => respond(&stream, "405 Method Not Allowed", b"GET only\n"),
    }
}

/// Writes a whole HTTP/1.0 response and closes.
fn respond(mut stream: &TcpStream, status: &str, body: &[u8]) -> io::Result<()> {
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}
