//! The chat relay: the [`Service`] behind `udphub serve`.
//!
//! For each datagram: classify it, update the client table, and fan
//! messages out to every live client; expire silent clients from the timer
//! wheel; say `bye` to everyone at shutdown. The loop around it (batched
//! reads, signals, metrics) is [`EventLoop`].
//!
//! Data flows one way: socket → batch → classify → table → fan-out → socket.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use crate::addr::RawAddr;
use crate::config::Config;
use crate::error::Error;
use crate::event_loop::{EventLoop, Io, RateLimitedLog, Service};
use crate::fanout::{Fanout, Outcome};
use crate::metrics::{Counts, DropReason};
use crate::protocol::{self, Kind, Template};
use crate::socket;
use crate::table::{Due, Table, Touch};
use crate::wheel::{Entry, Wheel};

pub use crate::event_loop::ShutdownHandle;

/// Wheel entries settled between two looks at the clock.
pub const EXPIRY_CHUNK: usize = 256;
/// The longest a loop pass spends expiring clients before it goes back to
/// datagrams. Settling one costs 0.1–1 µs (cache misses in a big table), so
/// a million expiring at once take many passes, none of them long.
pub const EXPIRY_SLICE: Duration = Duration::from_millis(1);

/// The chat relay: an [`EventLoop`] running a [`Hub`].
pub type Relay = EventLoop<Hub>;

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

    /// Runs once per datagram: plain u64 division (u128 would be a
    /// library call); u64 nanoseconds last 584 years.
    fn tick_at(&self, t: Instant) -> u64 {
        let elapsed = t.saturating_duration_since(self.start).as_nanos() as u64;
        elapsed / (self.tick.as_nanos() as u64).max(1)
    }

    fn now(&self) -> u64 {
        self.tick_at(Instant::now())
    }

    fn instant_of(&self, tick: u64) -> Instant {
        let nanos = u128::from(tick) * self.tick.as_nanos();
        self.start + Duration::from_nanos(nanos.min(u128::from(u64::MAX)) as u64)
    }
}

/// The relay's state: clients, their deadlines, and how to fan out.
pub struct Hub {
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
    /// Throttles send-error logging.
    send_errors: RateLimitedLog,
}

impl EventLoop<Hub> {
    /// Binds the relay socket and prepares the loop (without signal
    /// handling; see [`EventLoop::handle_signals`]).
    pub fn bind(config: &Config) -> Result<Relay, Error> {
        config.validate()?;
        let bound = socket::bind(config.bind, config.recv_buffer, config.send_buffer)?;
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
        EventLoop::new(bound, config.max_datagram, Hub::new(config))
    }
}

impl Hub {
    /// An empty relay with these settings.
    pub fn new(config: &Config) -> Hub {
        let (clock, timeout_ticks) = Clock::for_timeout(config.timeout);
        // One turn of the ring covers the timeout, so an entry is looked at
        // about once per timeout; capped to bound the ring's memory.
        let slots = (timeout_ticks as usize + 2).min(1 << 16);
        Hub {
            table: Table::with_capacity(config.max_clients, timeout_ticks, config.expect_clients),
            wheel: Wheel::new(slots, 0),
            clock,
            fanout: Fanout::default(),
            template: config.format.clone(),
            echo: config.echo,
            rendered: Vec::with_capacity(config.max_datagram + 64),
            due: Vec::with_capacity(EXPIRY_CHUNK),
            send_errors: RateLimitedLog::default(),
        }
    }

    /// Registers or refreshes `addr`; `None` (and a counted drop) when the
    /// table is full.
    fn join_or_refresh(&mut self, addr: RawAddr, now: u64, counts: &mut Counts) -> Option<u32> {
        match self.table.touch(addr, now) {
            Touch::Joined {
                key,
                generation,
                due,
            } => {
                self.wheel.schedule(key, generation, due);
                counts.joined += 1;
                tracing::debug!("{addr} joined");
                Some(key)
            }
            Touch::Refreshed { key } => Some(key),
            Touch::Full => {
                counts.drop(DropReason::TableFull);
                None
            }
        }
    }

    /// Renders the message once and sends it to every live client.
    fn fan_out(&mut self, body: &[u8], from: &RawAddr, sender: u32, now: u64, io: &mut Io<'_>) {
        let Hub {
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
        let outcome = fanout.send(io.fd, payload, dests);
        self.count(outcome, io.counts);
    }

    fn count(&mut self, outcome: Outcome, c: &mut Counts) {
        c.recipients += outcome.recipients;
        c.delivered += outcome.delivered;
        c.delivery_buffer_full += outcome.buffer_full;
        c.delivery_send_error += outcome.send_error;
        if let Some(e) = outcome.first_error {
            self.send_errors.warn("sendmmsg", &e);
        }
    }

    fn say_bye(&mut self, fd: BorrowedFd<'_>, counts: &mut Counts) {
        let now = self.clock.now();
        let dests = self.table.recipients(now).map(|(_, addr)| addr);
        let outcome = self.fanout.send(fd, protocol::BYE, dests);
        tracing::info!(
            "said bye to {} clients ({} not delivered)",
            outcome.delivered,
            outcome.buffer_full + outcome.send_error
        );
        self.count(outcome, counts);
        self.table.clear();
    }
}

impl Service for Hub {
    /// One datagram: counted exactly once, as a heartbeat, quit, message or drop.
    fn handle(&mut self, data: &[u8], source: RawAddr, io: &mut Io<'_>) {
        let now = self.clock.tick_at(io.received_at);
        match protocol::classify(data) {
            Kind::Heartbeat => {
                if self.join_or_refresh(source, now, io.counts).is_some() {
                    io.counts.heartbeats += 1;
                }
            }
            Kind::Quit => {
                io.counts.quits += 1;
                if self.table.remove(&source) {
                    io.counts.left += 1;
                }
            }
            Kind::Message(body) => {
                if let Some(sender) = self.join_or_refresh(source, now, io.counts) {
                    io.counts.messages += 1;
                    self.fan_out(body, &source, sender, now, io);
                    io.counts
                        .fanout_seconds
                        .push(io.received_at.elapsed().as_secs_f64());
                }
            }
        }
    }

    /// Settles due wheel entries, in chunks of [`EXPIRY_CHUNK`], for at
    /// most [`EXPIRY_SLICE`]. Returns whether due entries remain.
    fn on_timer(&mut self, counts: &mut Counts) -> bool {
        let now = self.clock.now();
        let started = Instant::now();
        loop {
            self.due.clear();
            let more = self.wheel.advance(now, EXPIRY_CHUNK, &mut self.due);
            for entry in self.due.drain(..) {
                match self.table.settle(entry, now) {
                    Due::Stale => {}
                    Due::Expired(addr) => {
                        counts.expired += 1;
                        tracing::debug!("{addr} expired");
                    }
                    Due::Reschedule(tick) => self.wheel.schedule(entry.key, entry.generation, tick),
                }
            }
            if !more {
                return false;
            }
            if started.elapsed() >= EXPIRY_SLICE {
                return true;
            }
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        self.wheel
            .next_wakeup()
            .map(|tick| self.clock.instant_of(tick))
    }

    /// Sends `bye` to every live client and empties the table.
    fn shutdown(&mut self, io: &mut Io<'_>) {
        self.say_bye(io.fd, io.counts);
    }

    fn clients(&self) -> usize {
        self.table.len()
    }
}

/// Runs `udphub serve`: starts the metrics endpoint, binds, handles
/// signals, and relays until told to stop.
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
