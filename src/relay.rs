//! The event loop: one thread, one UDP socket, one mio `Poll`.
//!
//! Each iteration of [`Relay::run`]:
//!
//! 1. polls, with a timeout of the wheel's next due tick (or none when there
//!    are no clients, or zero when work is left over from the last pass);
//! 2. drains the socket with `recvmmsg` batches until `WouldBlock` — mio is
//!    edge-triggered, so a socket left undrained would never be reported
//!    readable again (mio's `Poll` docs, "Draining readiness") — but at most
//!    [`MAX_BATCHES_PER_PASS`] batches, so a flood can't starve expiry and
//!    signals; the rest is read on the next pass, which then doesn't wait;
//! 3. for each datagram: classify, update the table, fan messages out;
//! 4. advances the timer wheel, expiring at most [`EXPIRY_BUDGET`] clients;
//! 5. flushes the counts to the metrics facade.
//!
//! Data flows one way: socket → batch → classify → table → fan-out → socket.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::addr::RawAddr;
use crate::batch_io::{Datagram, RecvBatch};
use crate::config::Config;
use crate::error::Error;
use crate::fanout::{Fanout, Outcome};
use crate::metrics::{DropReason, Metrics};
use crate::protocol::{self, Kind, Template};
use crate::socket;
use crate::table::{Due, Table, Touch};
use crate::wheel::{Entry, Wheel};

/// The relay socket's token.
const SOCKET: Token = Token(0);
/// SIGINT/SIGTERM, via signal-hook-mio's self-pipe.
const SIGNALS: Token = Token(1);
/// A [`ShutdownHandle`] was triggered.
const WAKER: Token = Token(2);

/// Datagrams per `recvmmsg`. 64 amortises the syscall well (the gain
/// flattens past ~32) while the buffers (64 × 1472 B ≈ 94 KiB) stay cache-sized.
pub const RECV_BATCH: usize = 64;
/// `recvmmsg` calls per loop pass before expiry and signals get a turn
/// (64 × 64 = 4096 datagrams, about a millisecond of work).
pub const MAX_BATCHES_PER_PASS: usize = 64;
/// Wheel entries settled per loop pass. Removing a client costs ~100 ns, so
/// 8192 keeps a mass expiry to ~1 ms slices between batches of datagrams.
pub const EXPIRY_BUDGET: usize = 8192;
/// Consecutive unexpected `recvmmsg` errors after which the relay gives up.
const MAX_RECV_ERRORS: u32 = 100;
/// How often the loop reads the kernel's drop counter with SO_MEMINFO
/// (besides what SO_RXQ_OVFL reports with each datagram), and the longest
/// it sleeps, so a flood's final drops are counted within a second.
const KERNEL_DROPS_INTERVAL: Duration = Duration::from_secs(1);
/// At most one log line per this interval for per-datagram errors.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Stops a running relay from another thread, as SIGTERM would.
#[derive(Clone)]
pub struct ShutdownHandle {
    /// Set before waking the loop.
    requested: Arc<AtomicBool>,
    /// Wakes the loop's poll.
    waker: Arc<Waker>,
}

impl ShutdownHandle {
    /// Asks the relay to say `bye` to its clients and return from `run`.
    pub fn shutdown(&self) {
        self.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            tracing::error!("cannot wake the relay loop: {e}");
        }
    }
}

/// Maps wall-clock instants to wheel ticks.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// Tick 0.
    start: Instant,
    /// Length of one tick.
    tick: Duration,
}

impl Clock {
    /// A tick of 1/256 of the timeout (so expiry is at most 0.4 % late),
    /// but no finer than 1 ms (pointless wake-ups) and no coarser than
    /// 100 ms. Returns the clock and the timeout in ticks.
    fn for_timeout(timeout: Duration) -> (Clock, u64) {
        let tick = (timeout / 256).clamp(Duration::from_millis(1), Duration::from_millis(100));
        let ticks = timeout.as_nanos().div_ceil(tick.as_nanos()).max(1) as u64;
        (
            Clock {
                start: Instant::now(),
                tick,
            },
            ticks,
        )
    }

    fn tick_at(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.start).as_nanos() / self.tick.as_nanos()) as u64
    }

    fn now(&self) -> u64 {
        self.tick_at(Instant::now())
    }

    fn instant_of(&self, tick: u64) -> Instant {
        let nanos = u128::from(tick) * self.tick.as_nanos();
        self.start + Duration::from_nanos(nanos.min(u128::from(u64::MAX)) as u64)
    }
}

/// Logs an error at most once per [`ERROR_LOG_INTERVAL`], saying how many
/// were suppressed in between.
#[derive(Debug, Default)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn warn(&mut self, what: &str, err: &io::Error) {
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

/// Everything the loop decides with: the sans-I/O parts plus fan-out.
struct Core {
    /// Live clients.
    table: Table,
    /// Their expiry deadlines.
    wheel: Wheel,
    /// Instants → ticks.
    clock: Clock,
    /// `sendmmsg` state.
    fanout: Fanout,
    /// `--format`.
    template: Template,
    /// Whether senders get their own messages.
    echo: bool,
    /// Reused buffer the template renders each message into.
    rendered: Vec<u8>,
    /// Reused buffer of wheel entries that came due.
    due: Vec<Entry>,
    /// Counters and their handles.
    metrics: Metrics,
    /// Last value of the kernel's cumulative drop counter seen.
    kernel_drops_seen: u32,
    /// When the drop counter was last read with SO_MEMINFO.
    kernel_drops_checked: Instant,
    /// Throttles send-error logging.
    send_errors: RateLimitedLog,
}

/// A bound relay, ready to [`run`](Relay::run).
pub struct Relay {
    poll: Poll,
    events: Events,
    socket: mio::net::UdpSocket,
    local_addr: SocketAddr,
    signals: Option<Signals>,
    shutdown: ShutdownHandle,
    recv: RecvBatch,
    core: Core,
}

impl Relay {
    /// Binds the socket and prepares the loop (without signal handling; see
    /// [`Relay::handle_signals`]). Metrics go to whatever recorder is
    /// installed, or nowhere.
    pub fn bind(config: &Config) -> Result<Relay, Error> {
        config.validate()?;
        let bound = socket::bind(config.bind, config.recv_buffer, config.send_buffer)?;
        let poll = Poll::new().map_err(|e| Error::io("create poll", e))?;
        let mut socket = bound.socket;
        poll.registry()
            .register(&mut socket, SOCKET, Interest::READABLE)
            .map_err(|e| Error::io("register socket", e))?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(|e| Error::io("create waker", e))?;
        let (clock, timeout_ticks) = Clock::for_timeout(config.timeout);
        // One turn of the ring covers the timeout, so an entry is looked at
        // about once per timeout; capped to bound the ring's memory.
        let slots = (timeout_ticks as usize + 2).min(1 << 16);
        tracing::info!(
            "udphub relaying on {} (timeout {}, echo {}, max datagram {} B, max clients {}); SO_RCVBUF {} B, SO_SNDBUF {} B",
            bound.local_addr,
            humantime::format_duration(config.timeout),
            config.echo,
            config.max_datagram,
            config.max_clients,
            bound.recv_buffer,
            bound.send_buffer,
        );
        Ok(Relay {
            poll,
            events: Events::with_capacity(64),
            socket,
            local_addr: bound.local_addr,
            signals: None,
            shutdown: ShutdownHandle {
                requested: Arc::new(AtomicBool::new(false)),
                waker: Arc::new(waker),
            },
            recv: RecvBatch::new(RECV_BATCH, config.max_datagram),
            core: Core {
                table: Table::new(config.max_clients, timeout_ticks),
                wheel: Wheel::new(slots, 0),
                clock,
                fanout: Fanout::default(),
                template: config.format.clone(),
                echo: config.echo,
                rendered: Vec::with_capacity(config.max_datagram + 64),
                due: Vec::with_capacity(EXPIRY_BUDGET),
                metrics: Metrics::register(),
                kernel_drops_seen: 0,
                kernel_drops_checked: Instant::now(),
                send_errors: RateLimitedLog::default(),
            },
        })
    }

    /// The address the relay is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle that stops [`run`](Relay::run) from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Makes SIGINT/SIGTERM shut the relay down gracefully; a second signal
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

    /// Runs until a signal or a [`ShutdownHandle`] stops it; then says `bye`
    /// to every live client, flushes the metrics and returns.
    pub fn run(mut self) -> Result<(), Error> {
        // Datagrams may have arrived before registration: drain first.
        let mut read_pending = true;
        let mut expiry_pending = false;
        loop {
            let timeout = if read_pending || expiry_pending {
                Some(Duration::ZERO)
            } else {
                self.core.next_wakeup()
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
            expiry_pending = self.core.expire();
            self.core.check_kernel_drops(self.socket.as_fd());
            let counts = &mut self.core.metrics.counts;
            counts.loop_seconds.push(busy_since.elapsed().as_secs_f64());
            self.core.flush();
            if stop {
                self.core.say_bye(self.socket.as_fd());
                self.core.flush();
                return Ok(());
            }
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
                    let received_at = Instant::now();
                    self.core
                        .handle_batch(&self.recv, n, received_at, self.socket.as_fd());
                    self.core.flush();
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
}

impl Core {
    /// How long poll may sleep: until the wheel's next due tick, or the
    /// next drop-counter check, whichever is sooner.
    fn next_wakeup(&self) -> Option<Duration> {
        let check = KERNEL_DROPS_INTERVAL.saturating_sub(self.kernel_drops_checked.elapsed());
        let Some(tick) = self.wheel.next_wakeup() else {
            return Some(check);
        };
        let due = self
            .clock
            .instant_of(tick)
            .saturating_duration_since(Instant::now());
        Some(due.min(check))
    }

    fn handle_batch(
        &mut self,
        batch: &RecvBatch,
        n: usize,
        received_at: Instant,
        fd: std::os::fd::BorrowedFd<'_>,
    ) {
        let now = self.clock.tick_at(received_at);
        self.metrics.counts.batch_sizes.push(n as f64);
        for i in 0..n {
            self.handle(batch.get(i), now, received_at, fd);
        }
    }

    /// One datagram: counted exactly once, as a heartbeat, quit, message or drop.
    fn handle(
        &mut self,
        d: Datagram<'_>,
        now: u64,
        received_at: Instant,
        fd: std::os::fd::BorrowedFd<'_>,
    ) {
        if let Some(total) = d.kernel_drops {
            self.observe_kernel_drops(total);
        }
        let Some(source) = d.source else {
            self.metrics.counts.drop(DropReason::BadSource);
            return;
        };
        if d.truncated {
            self.metrics.counts.drop(DropReason::Oversize);
            return;
        }
        match protocol::classify(d.data) {
            Kind::Heartbeat => {
                if self.join_or_refresh(source, now).is_some() {
                    self.metrics.counts.heartbeats += 1;
                }
            }
            Kind::Quit => {
                self.metrics.counts.quits += 1;
                if self.table.remove(&source) {
                    self.metrics.counts.left += 1;
                }
            }
            Kind::Message(body) => {
                if let Some(sender) = self.join_or_refresh(source, now) {
                    self.metrics.counts.messages += 1;
                    self.fan_out(body, &source, sender, now, fd);
                    self.metrics
                        .counts
                        .fanout_seconds
                        .push(received_at.elapsed().as_secs_f64());
                }
            }
        }
    }

    /// Counts the growth of the kernel's cumulative (wrapping u32) drop
    /// counter. A value older than one already seen (a datagram stamped
    /// before the last SO_MEMINFO read) looks like a huge jump: ignored.
    fn observe_kernel_drops(&mut self, total: u32) {
        let new = total.wrapping_sub(self.kernel_drops_seen);
        if new > 0 && new < 1 << 31 {
            self.metrics.counts.kernel_rx_dropped += u64::from(new);
            self.kernel_drops_seen = total;
        }
    }

    /// Reads the drop counter with SO_MEMINFO, at most once per interval.
    fn check_kernel_drops(&mut self, fd: std::os::fd::BorrowedFd<'_>) {
        if self.kernel_drops_checked.elapsed() < KERNEL_DROPS_INTERVAL {
            return;
        }
        self.kernel_drops_checked = Instant::now();
        if let Ok(total) = crate::batch_io::socket_drops(fd) {
            self.observe_kernel_drops(total);
        }
    }

    /// Registers or refreshes `addr`; `None` (and a counted drop) when the
    /// table is full.
    fn join_or_refresh(&mut self, addr: RawAddr, now: u64) -> Option<u32> {
        match self.table.touch(addr, now) {
            Touch::Joined {
                key,
                generation,
                due,
            } => {
                self.wheel.schedule(key, generation, due);
                self.metrics.counts.joined += 1;
                tracing::debug!("{addr} joined");
                Some(key)
            }
            Touch::Refreshed { key } => Some(key),
            Touch::Full => {
                self.metrics.counts.drop(DropReason::TableFull);
                None
            }
        }
    }

    /// Renders the message once and sends it to every live client.
    fn fan_out(
        &mut self,
        body: &[u8],
        from: &RawAddr,
        sender: u32,
        now: u64,
        fd: std::os::fd::BorrowedFd<'_>,
    ) {
        let Core {
            table,
            fanout,
            template,
            rendered,
            echo,
            ..
        } = self;
        let payload: &[u8] = if template.is_raw() {
            body
        } else {
            template.render(body, from, rendered);
            rendered
        };
        let echo = *echo;
        let dests = table
            .recipients(now)
            .filter(move |(key, _)| echo || *key != sender)
            .map(|(_, addr)| addr);
        let outcome = fanout.send(fd, payload, dests);
        self.count(outcome);
    }

    fn count(&mut self, outcome: Outcome) {
        let c = &mut self.metrics.counts;
        c.recipients += outcome.recipients;
        c.delivered += outcome.delivered;
        c.delivery_buffer_full += outcome.buffer_full;
        c.delivery_send_error += outcome.send_error;
        if let Some(e) = outcome.first_error {
            self.send_errors.warn("sendmmsg", &e);
        }
    }

    /// Settles due wheel entries. Returns whether the budget ran out.
    fn expire(&mut self) -> bool {
        let now = self.clock.now();
        self.due.clear();
        let more = self.wheel.advance(now, EXPIRY_BUDGET, &mut self.due);
        for entry in self.due.drain(..) {
            match self.table.settle(entry, now) {
                Due::Stale => {}
                Due::Expired(addr) => {
                    self.metrics.counts.expired += 1;
                    tracing::debug!("{addr} expired");
                }
                Due::Reschedule(tick) => self.wheel.schedule(entry.key, entry.generation, tick),
            }
        }
        more
    }

    /// Sends `bye` to every live client and empties the table.
    fn say_bye(&mut self, fd: std::os::fd::BorrowedFd<'_>) {
        let now = self.clock.now();
        let dests = self.table.recipients(now).map(|(_, addr)| addr);
        let outcome = self.fanout.send(fd, protocol::BYE, dests);
        tracing::info!(
            "said bye to {} clients ({} not delivered)",
            outcome.delivered,
            outcome.buffer_full + outcome.send_error
        );
        self.count(outcome);
        self.table.clear();
    }

    fn flush(&mut self) {
        self.metrics.flush(self.table.len());
    }
}

/// Runs `udphub serve`: binds, starts the metrics endpoint, handles signals,
/// and relays until told to stop.
pub fn serve(config: &Config) -> Result<(), Error> {
    config.validate()?;
    // The recorder must exist before the relay registers its metrics.
    if let Some(addr) = config.metrics {
        crate::metrics::install_exporter(addr)?;
    }
    let mut relay = Relay::bind(config)?;
    if let Some(addr) = config.metrics {
        tracing::info!("metrics on http://{addr}/metrics");
    }
    relay.core.flush();
    relay.handle_signals()?;
    relay.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_ticks_scale_with_the_timeout() {
        let (c, t) = Clock::for_timeout(Duration::from_secs(10));
        assert_eq!(c.tick, Duration::from_nanos(39_062_500));
        assert_eq!(t, 256);
        let (c, t) = Clock::for_timeout(Duration::from_millis(50));
        assert_eq!(c.tick, Duration::from_millis(1));
        assert_eq!(t, 50);
        let (c, t) = Clock::for_timeout(Duration::from_secs(3600));
        assert_eq!(c.tick, Duration::from_millis(100));
        assert_eq!(t, 36_000);
        assert_eq!(c.tick_at(c.instant_of(1234)), 1234);
    }
}
