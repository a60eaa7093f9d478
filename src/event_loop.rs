//! The event loop: one thread, one UDP socket, one mio `Poll`, shared by
//! every udphub server (the chat relay, the echo server).
//!
//! What differs between servers is a [`Service`]: what to do with each
//! datagram, what timers it has, what to say at shutdown. Everything else is
//! here, once: batched reads, the drop accounting that happens before a
//! service sees a datagram, signals, metrics flushing.
//!
//! Each pass of [`EventLoop::run`]:
//!
//! 1. polls, with a timeout of the service's next timer (at most
//!    [`KERNEL_DROPS_INTERVAL`]), or zero when work is left over;
//! 2. drains the socket with `recvmmsg` batches until `WouldBlock` — mio is
//!    edge-triggered, so a socket left undrained would never be reported
//!    readable again (mio's `Poll` docs, "Draining readiness") — but at most
//!    [`MAX_BATCHES_PER_PASS`] batches, so a flood can't starve timers and
//!    signals; the rest is read on the next pass, which then doesn't wait;
//! 3. drops (and counts) oversize datagrams and unknown sources, and hands
//!    the rest to the service;
//! 4. runs the service's timers;
//! 5. flushes the counts to the metrics facade (also after every batch).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::addr::RawAddr;
use crate::batch_io::{self, RecvBatch};
use crate::error::Error;
use crate::metrics::{Counts, DropReason, Metrics};
use crate::socket::Bound;

/// The UDP socket's token.
const SOCKET: Token = Token(0);
/// SIGINT/SIGTERM, via signal-hook-mio's self-pipe.
const SIGNALS: Token = Token(1);
/// A [`ShutdownHandle`] was triggered.
const WAKER: Token = Token(2);

/// Datagrams per `recvmmsg`. 64 amortises the syscall well (the gain
/// flattens past ~32) while the buffers (64 × 1472 B ≈ 94 KiB) stay cache-sized.
pub const RECV_BATCH: usize = 64;
/// `recvmmsg` calls per loop pass before timers and signals get a turn
/// (64 × 64 = 4096 datagrams, about a millisecond of work).
pub const MAX_BATCHES_PER_PASS: usize = 64;
/// Consecutive unexpected `recvmmsg` errors after which the loop gives up.
const MAX_RECV_ERRORS: u32 = 100;
/// How often the loop reads the kernel's drop counter with SO_MEMINFO
/// (besides what SO_RXQ_OVFL reports with each datagram), and the longest
/// it sleeps, so a flood's final drops are counted within a second.
pub const KERNEL_DROPS_INTERVAL: Duration = Duration::from_secs(1);
/// At most one log line per this interval for per-datagram errors.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// What a server does with its datagrams. The loop calls it; it never
/// polls or reads by itself.
pub trait Service {
    /// Handles one datagram (already checked: not oversize, known source).
    fn handle(&mut self, data: &[u8], source: RawAddr, io: &mut Io<'_>);

    /// Called after each batch, e.g. to send replies gathered in `handle`.
    fn end_batch(&mut self, _io: &mut Io<'_>) {}

    /// Runs due timers. Returns `true` if work is left for the next pass.
    fn on_timer(&mut self, _counts: &mut Counts) -> bool {
        false
    }

    /// When the next timer is due, if any.
    fn next_timer(&self) -> Option<Instant> {
        None
    }

    /// Says goodbye at shutdown.
    fn shutdown(&mut self, _io: &mut Io<'_>) {}

    /// Clients now, for the `udphub_clients` gauge.
    fn clients(&self) -> usize {
        0
    }
}

/// What a [`Service`] may use while handling datagrams.
pub struct Io<'a> {
    /// The socket, for sending.
    pub fd: BorrowedFd<'a>,
    /// The counts to add to.
    pub counts: &'a mut Counts,
    /// When the current batch was read.
    pub received_at: Instant,
}

/// Stops a running loop from another thread, as SIGTERM would.
#[derive(Clone)]
pub struct ShutdownHandle {
    /// Set before waking the loop.
    requested: Arc<AtomicBool>,
    /// Wakes the loop's poll.
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    /// Asks the loop to run the service's shutdown and return from `run`.
    pub fn shutdown(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            tracing::error!("cannot wake the loop: {e}");
        }
    }
}

/// Logs an error at most once per [`ERROR_LOG_INTERVAL`], saying how many
/// were suppressed in between.
#[derive(Debug, Default)]
pub(crate) struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub(crate) fn warn(&mut self, what: &str, err: &io::Error) {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < ERROR_LOG_INTERVAL => self.suppressed += 1,
            _ => {
                tracing::warn!(
                    "{what}: {err} ({} similar errors suppressed since the last report)",
                    self.suppressed
                );
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}

/// A bound socket, a [`Service`], and the loop that joins them.
pub struct EventLoop<S> {
    poll: Poll,
    events: Events,
    socket: mio::net::UdpSocket,
    local_addr: SocketAddr,
    signals: Option<Signals>,
    shutdown: ShutdownHandle,
    recv: RecvBatch,
    metrics: Metrics,
    /// Last value of the kernel's cumulative drop counter seen.
    kernel_drops_seen: u32,
    /// When the drop counter was last read with SO_MEMINFO.
    kernel_drops_checked: Instant,
    /// The server.
    service: S,
}

impl<S: Service> EventLoop<S> {
    /// Wraps a bound socket. Datagrams longer than `max_datagram` are
    /// dropped as oversize. Metrics go to whatever recorder is installed.
    pub fn new(bound: Bound, max_datagram: usize, service: S) -> Result<EventLoop<S>, Error> {
        let poll = Poll::new().map_err(|e| Error::io("create poll", e))?;
        let mut socket = bound.socket;
        poll.registry()
            .register(&mut socket, SOCKET, Interest::READABLE)
            .map_err(|e| Error::io("register socket", e))?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(|e| Error::io("create waker", e))?;
        Ok(EventLoop {
            poll,
            events: Events::with_capacity(64),
            socket,
            local_addr: bound.local_addr,
            signals: None,
            shutdown: ShutdownHandle {
                requested: Arc::new(AtomicBool::new(false)),
                waker: Arc::new(waker),
            },
            recv: RecvBatch::new(RECV_BATCH, max_datagram),
            metrics: Metrics::register(),
            kernel_drops_seen: 0,
            kernel_drops_checked: Instant::now(),
            service,
        })
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops [`run`](EventLoop::run) from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Makes SIGINT/SIGTERM shut the loop down gracefully; a second signal
    /// during shutdown exits the process at once (status 130).
    pub fn handle_signals(&mut self) -> Result<(), Error> {
        let second = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&second))
                .map_err(|e| Error::io("install signal handler", e))?;
            // Arms the conditional shutdown above once the first signal is in.
            signal_hook::flag::register(sig, Arc::clone(&second))
                .map_err(|e| Error::io("install signal handler", e))?;
        }
        let mut signals =
            Signals::new([SIGINT, SIGTERM]).map_err(|e| Error::io("install signal handler", e))?;
        self.poll
            .registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| Error::io("register signals", e))?;
        self.signals = Some(signals);
        Ok(())
    }

    /// Runs until a signal or a [`ShutdownHandle`] stops it; then lets the
    /// service say goodbye, flushes the metrics and returns.
    pub fn run(mut self) -> Result<(), Error> {
        self.flush();
        // Datagrams may have arrived before registration: drain first.
        let mut read_pending = true;
        let mut timers_pending = false;
        loop {
            let timeout = if read_pending || timers_pending {
                Some(Duration::ZERO)
            } else {
                Some(self.sleep_limit())
            };
            match self.poll.poll(&mut self.events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("poll", e)),
            }
            let busy_since = Instant::now();
            let mut stop = false;
            for event in self.events.iter() {
                match event.token() {
                    SOCKET => read_pending = true,
                    SIGNALS => {
                        if let Some(signals) = &mut self.signals {
                            for sig in signals.pending() {
                                tracing::info!(
                                    "received signal {sig}; shutting down (again to exit at once)"
                                );
                                stop = true;
                            }
                        }
                    }
                    WAKER => stop |= self.shutdown.requested.load(Ordering::SeqCst),
                    // Spurious events are allowed by mio's contract.
                    token => tracing::debug!("event for unknown token {token:?}"),
                }
            }
            if read_pending {
                read_pending = self.drain()?;
            }
            timers_pending = self.service.on_timer(&mut self.metrics.counts);
            self.check_kernel_drops();
            let counts = &mut self.metrics.counts;
            counts.loop_seconds.push(busy_since.elapsed().as_secs_f64());
            self.flush();
            if stop {
                let mut io = Io {
                    fd: self.socket.as_fd(),
                    counts: &mut self.metrics.counts,
                    received_at: Instant::now(),
                };
                self.service.shutdown(&mut io);
                self.flush();
                return Ok(());
            }
        }
    }

    /// How long poll may sleep: until the next timer or drop-counter check.
    fn sleep_limit(&self) -> Duration {
        let check = KERNEL_DROPS_INTERVAL.saturating_sub(self.kernel_drops_checked.elapsed());
        match self.service.next_timer() {
            Some(at) => at.saturating_duration_since(Instant::now()).min(check),
            None => check,
        }
    }

    /// Reads and handles datagrams until `WouldBlock` or the per-pass cap.
    /// Returns whether datagrams may remain (cap reached).
    fn drain(&mut self) -> Result<bool, Error> {
        let mut errors = 0;
        for _ in 0..MAX_BATCHES_PER_PASS {
            match self.recv.recv(self.socket.as_fd()) {
                Ok(n) => {
                    errors = 0;
                    self.handle_batch(n);
                    self.flush();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => {
                    errors += 1;
                    tracing::warn!("recvmmsg: {e}");
                    if errors >= MAX_RECV_ERRORS {
                        return Err(Error::io("recvmmsg keeps failing", e));
                    }
                }
            }
        }
        Ok(true)
    }

    fn handle_batch(&mut self, n: usize) {
        let EventLoop {
            recv,
            metrics,
            service,
            socket,
            kernel_drops_seen,
            ..
        } = self;
        let mut io = Io {
            fd: socket.as_fd(),
            counts: &mut metrics.counts,
            received_at: Instant::now(),
        };
        io.counts.batch_sizes.push(n as f64);
        for i in 0..n {
            let d = recv.get(i);
            if let Some(total) = d.kernel_drops {
                observe_kernel_drops(kernel_drops_seen, total, io.counts);
            }
            let Some(source) = d.source else {
                io.counts.drop(DropReason::BadSource);
                continue;
            };
            if d.truncated {
                io.counts.drop(DropReason::Oversize);
                continue;
            }
            service.handle(d.data, source, &mut io);
        }
        service.end_batch(&mut io);
    }

    /// Reads the drop counter with SO_MEMINFO, at most once per interval.
    fn check_kernel_drops(&mut self) {
        if self.kernel_drops_checked.elapsed() < KERNEL_DROPS_INTERVAL {
            return;
        }
        self.kernel_drops_checked = Instant::now();
        if let Ok(total) = batch_io::socket_drops(self.socket.as_fd()) {
            observe_kernel_drops(&mut self.kernel_drops_seen, total, &mut self.metrics.counts);
        }
    }

    fn flush(&mut self) {
        self.metrics.flush(self.service.clients());
    }
}

/// Counts the growth of the kernel's cumulative (wrapping u32) drop counter.
/// A value older than one already seen (a datagram stamped before the last
/// SO_MEMINFO read) looks like a huge jump: ignored.
fn observe_kernel_drops(seen: &mut u32, total: u32, counts: &mut Counts) {
    let new = total.wrapping_sub(*seen);
    if new > 0 && new < 1 << 31 {
        counts.kernel_rx_dropped += u64::from(new);
        *seen = total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_drop_counter_deltas() {
        let mut counts = Counts::default();
        let mut seen = 0;
        observe_kernel_drops(&mut seen, 5, &mut counts);
        observe_kernel_drops(&mut seen, 3, &mut counts); // stale stamp
        observe_kernel_drops(&mut seen, 5, &mut counts);
        observe_kernel_drops(&mut seen, 9, &mut counts);
        assert_eq!(counts.kernel_rx_dropped, 9);
        let mut seen = u32::MAX - 1;
        observe_kernel_drops(&mut seen, 2, &mut counts); // wrapped
        assert_eq!(counts.kernel_rx_dropped, 13);
    }
}
