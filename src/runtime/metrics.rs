//! Prometheus metrics: counted locally in each loop, flushed once per batch.
//!
//! The hot path increments plain `u64` fields of [`Counts`]; [`Metrics::flush`]
//! adds them to the `metrics` facade handles (one atomic add per non-zero
//! counter per batch, not per datagram) and resets them. Handles with the
//! same name and labels are the same series, so several loops in one
//! process add up; the `udphub_clients` gauge is moved by each loop's
//! change since its last flush, never set, so loops don't overwrite each
//! other. The HTTP endpoint is [`crate::runtime::exporter`].
//!
//! Accounting (checked from a live scrape by `tests/metrics.rs`):
//! `sum(udphub_datagrams_received_total) = heartbeat + quit + message +
//! join + dropped`, where `dropped = sum(udphub_dropped_total)`, and
//! `udphub_fanout_recipients_total = udphub_deliveries_total +
//! sum(udphub_delivery_dropped_total)` (reasons `backlog_full`, `shutdown`, `buffer_full`,
//! `send_error` and, with `--threads`, `shard_queue_full`).

use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit,
};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use crate::core::counts::{Counts, DeliveryDrop, Refusal};
use crate::core::token::TokenError;
use crate::core::DropReason;

/// Whether the process has logged a token that was not looked at (a relay
/// without a room secret): once per process, whatever the loops, since
/// every further one says the same (the count goes on).
static TOKEN_IGNORED_TOLD: AtomicBool = AtomicBool::new(false);

/// Held while histogram samples are recorded, and while the exporter
/// drains them (its upkeep and every render). The recorder's lock-free
/// sample buffer (metrics-util's `AtomicBucket`) loses samples recorded
/// while it is being drained: a unit test below lost 13 of 1,000,000, and
/// a clean-clone CI run lost 1,793 of 16,000 fan-out samples. Counters are
/// plain atomics and need no such care.
static SAMPLES: Mutex<()> = Mutex::new(());

/// The most samples a loop holds back when the exporter is draining at the
/// moment it flushes; past that it waits for the exporter (a render takes
/// milliseconds), so what is held stays bounded.
const HELD_SAMPLES_MAX: usize = 65_536;

/// Runs `f` (the exporter's upkeep or render) while no loop records
/// histogram samples; see [`SAMPLES`].
pub fn draining<R>(f: impl FnOnce() -> R) -> R {
    let _gate = SAMPLES.lock().unwrap_or_else(PoisonError::into_inner);
    f()
}

/// How often a busy loop publishes its histogram samples (counters go out
/// with every flush): the gate is then touched at most this often, not once
/// a batch. A loop about to sleep publishes what it holds at once
/// ([`Metrics::flush_all`]), so an idle relay's scrape is complete.
const SAMPLES_EVERY: Duration = Duration::from_millis(20);

/// Held samples past which a flush publishes them without waiting for
/// [`SAMPLES_EVERY`] (a bound on the loop's memory, not a timing).
const SAMPLES_SOON: usize = 4_096;

/// The samples gate for a flush holding `held` samples: taken if free;
/// waited for only when the loop already holds too many (a loop never
/// waits on a scrape otherwise: its samples go out with the next flush).
fn samples_gate(held: usize) -> Option<MutexGuard<'static, ()>> {
    match SAMPLES.try_lock() {
        Ok(gate) => Some(gate),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) if held > HELD_SAMPLES_MAX => {
            Some(SAMPLES.lock().unwrap_or_else(PoisonError::into_inner))
        }
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Handles to every udphub metric, plus one loop's local counts.
pub struct Metrics {
    /// What the loop counts between flushes.
    pub counts: Counts,
    received_heartbeat: Counter,
    received_quit: Counter,
    received_message: Counter,
    received_join: Counter,
    received_dropped: Counter,
    joins_accepted: Counter,
    joins_refused: [Counter; Refusal::COUNT],
    token_refused: [Counter; TokenError::COUNT],
    tokens_ignored: Counter,
    rooms: Gauge,
    /// This loop's room count at the last flush (its share of the gauge).
    rooms_reported: usize,
    dropped: [Counter; DropReason::COUNT],
    recipients: Counter,
    deliveries: Counter,
    delivery_dropped: [Counter; DeliveryDrop::COUNT],
    clients_joined: Counter,
    clients_expired: Counter,
    clients_left: Counter,
    kernel_rx_dropped: Counter,
    recv_errors: Counter,
    local_addr_overflow: Counter,
    fanouts_parked: Counter,
    send_buffer_full: Counter,
    replies_parked: Counter,
    clients: Gauge,
    /// This loop's client count at the last flush (its share of the gauge).
    clients_reported: usize,
    fanout_seconds: Histogram,
    batch_size: Histogram,
    loop_seconds: Histogram,
    /// With several loops: this loop's clients, labelled with its index
    /// (how evenly the kernel spreads sources over the loops).
    shard_clients: Option<Gauge>,
    /// When this loop last published its histogram samples.
    samples_published: Instant,
}

/// Buckets for `udphub_fanout_duration_seconds`: 5 µs (a small loopback
/// fan-out) to 250 ms (a million-client fan-out), roughly ×2.5 apart.
pub const FANOUT_BUCKETS: [f64; 14] = [
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.025, 0.1, 0.25,
];

/// Buckets for `udphub_loop_iteration_seconds`: 10 µs to 100 ms; the
/// 5 ms bucket is the "never stall the loop" line.
pub const LOOP_BUCKETS: [f64; 10] = [
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1,
];

/// Buckets for `udphub_recv_batch_size`: powers of two up to the batch size.
pub const BATCH_BUCKETS: [f64; 7] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Every histogram and its buckets, for the exporter.
pub const HISTOGRAMS: [(&str, &[f64]); 3] = [
    ("udphub_fanout_duration_seconds", &FANOUT_BUCKETS),
    ("udphub_recv_batch_size", &BATCH_BUCKETS),
    ("udphub_loop_iteration_seconds", &LOOP_BUCKETS),
];

impl Metrics {
    /// Registers (and describes) every metric with the installed recorder;
    /// without one the handles are no-ops.
    pub fn register() -> Metrics {
        describe();
        let received = |kind: &'static str| metrics::counter!("udphub_datagrams_received_total", "kind" => kind);
        Metrics {
            counts: Counts::default(),
            received_heartbeat: received("heartbeat"),
            received_quit: received("quit"),
            received_message: received("message"),
            received_join: received("join"),
            received_dropped: received("dropped"),
            joins_accepted: metrics::counter!("udphub_room_joins_total"),
            joins_refused: std::array::from_fn(
                |i| metrics::counter!("udphub_room_join_refused_total", "reason" => Refusal::ALL[i].label()),
            ),
            token_refused: std::array::from_fn(
                |i| metrics::counter!("udphub_room_token_refused_total", "reason" => TokenError::ALL[i].label()),
            ),
            tokens_ignored: metrics::counter!("udphub_room_tokens_ignored_total"),
            rooms: metrics::gauge!("udphub_rooms"),
            rooms_reported: 0,
            dropped: std::array::from_fn(
                |i| metrics::counter!("udphub_dropped_total", "reason" => DropReason::ALL[i].label()),
            ),
            recipients: metrics::counter!("udphub_fanout_recipients_total"),
            deliveries: metrics::counter!("udphub_deliveries_total"),
            delivery_dropped: std::array::from_fn(
                |i| metrics::counter!("udphub_delivery_dropped_total", "reason" => DeliveryDrop::ALL[i].label()),
            ),
            clients_joined: metrics::counter!("udphub_clients_joined_total"),
            clients_expired: metrics::counter!("udphub_clients_expired_total"),
            clients_left: metrics::counter!("udphub_clients_left_total"),
            kernel_rx_dropped: metrics::counter!("udphub_kernel_rx_dropped_total"),
            recv_errors: metrics::counter!("udphub_recv_errors_total"),
            local_addr_overflow: metrics::counter!("udphub_local_address_overflow_total"),
            fanouts_parked: metrics::counter!("udphub_fanouts_parked_total"),
            send_buffer_full: metrics::counter!("udphub_send_buffer_full_total"),
            replies_parked: metrics::counter!("udphub_replies_parked_total"),
            clients: metrics::gauge!("udphub_clients"),
            clients_reported: 0,
            fanout_seconds: metrics::histogram!("udphub_fanout_duration_seconds"),
            batch_size: metrics::histogram!("udphub_recv_batch_size"),
            loop_seconds: metrics::histogram!("udphub_loop_iteration_seconds"),
            shard_clients: None,
            samples_published: Instant::now(),
        }
    }

    /// Marks this loop as shard `index` of several: its clients are also
    /// reported on their own (`udphub_shard_clients{shard}`).
    pub fn set_shard(&mut self, index: usize) {
        describe_gauge!(
            "udphub_shard_clients",
            "With --threads above 1: clients of each loop (the kernel spreads sources over the loops' sockets by a hash)"
        );
        self.shard_clients =
            Some(metrics::gauge!("udphub_shard_clients", "shard" => index.to_string()));
    }

    /// Publishes the local counts and this loop's client and room counts,
    /// then resets the counts; histogram samples go out at most every
    /// [`SAMPLES_EVERY`] (or when many are held).
    pub fn flush(&mut self, clients: usize, rooms: usize) {
        self.flush_counts(clients, rooms);
        let c = &self.counts;
        let held = c.fanout_seconds.len() + c.batch_sizes.len() + c.loop_seconds.len();
        if held >= SAMPLES_SOON || self.samples_published.elapsed() >= SAMPLES_EVERY {
            self.flush_samples(held);
        }
    }

    /// [`flush`](Self::flush), with every held sample published now: for a
    /// loop about to sleep, hand over or stop.
    pub fn flush_all(&mut self, clients: usize, rooms: usize) {
        self.flush_counts(clients, rooms);
        let c = &self.counts;
        let held = c.fanout_seconds.len() + c.batch_sizes.len() + c.loop_seconds.len();
        self.flush_samples(held);
    }

    /// Records the held histogram samples, if the gate is free (or too
    /// many are held to wait).
    fn flush_samples(&mut self, held: usize) {
        if held == 0 {
            return;
        }
        let c = &mut self.counts;
        if let Some(_gate) = samples_gate(held) {
            for s in c.fanout_seconds.drain(..) {
                self.fanout_seconds.record(s);
            }
            for s in c.batch_sizes.drain(..) {
                self.batch_size.record(s);
            }
            for s in c.loop_seconds.drain(..) {
                self.loop_seconds.record(s);
            }
            self.samples_published = Instant::now();
        }
    }

    /// Publishes the counters and gauges (plain atomics, no gate).
    fn flush_counts(&mut self, clients: usize, rooms: usize) {
        let c = &mut self.counts;
        let add = |counter: &Counter, v: &mut u64| {
            if *v > 0 {
                counter.increment(*v);
                *v = 0;
            }
        };
        // received{kind="dropped"} is the sum of the per-reason drops.
        add(&self.received_dropped, &mut c.dropped.iter().sum());
        add(&self.received_heartbeat, &mut c.heartbeats);
        add(&self.received_quit, &mut c.quits);
        add(&self.received_message, &mut c.messages);
        add(&self.received_join, &mut c.join_requests);
        add(&self.joins_accepted, &mut c.joins_accepted);
        for (counter, v) in self.joins_refused.iter().zip(c.joins_refused.iter_mut()) {
            add(counter, v);
        }
        for (counter, v) in self.token_refused.iter().zip(c.token_refused.iter_mut()) {
            add(counter, v);
        }
        if c.tokens_ignored > 0 && !TOKEN_IGNORED_TOLD.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                event = "tokens_ignored",
                "a client joined a room with a token, but this relay has no --room-secret-file: tokens are not checked and every room is open to anyone; set --room-secret-file to make rooms private (further ones are counted in udphub_room_tokens_ignored_total, not logged)"
            );
        }
        add(&self.tokens_ignored, &mut c.tokens_ignored);
        for (counter, v) in self.dropped.iter().zip(c.dropped.iter_mut()) {
            add(counter, v);
        }
        add(&self.recipients, &mut c.recipients);
        add(&self.deliveries, &mut c.delivered);
        for (counter, v) in self
            .delivery_dropped
            .iter()
            .zip(c.delivery_dropped.iter_mut())
        {
            add(counter, v);
        }
        add(&self.clients_joined, &mut c.clients_joined);
        add(&self.clients_expired, &mut c.clients_expired);
        add(&self.clients_left, &mut c.clients_left);
        add(&self.kernel_rx_dropped, &mut c.kernel_rx_dropped);
        add(&self.recv_errors, &mut c.recv_errors);
        add(&self.local_addr_overflow, &mut c.local_addr_overflow);
        add(&self.fanouts_parked, &mut c.fanouts_parked);
        add(&self.send_buffer_full, &mut c.send_buffer_full);
        add(&self.replies_parked, &mut c.replies_parked);
        move_gauge(&self.clients, &mut self.clients_reported, clients);
        if let Some(g) = &self.shard_clients {
            g.set(clients as f64);
        }
        move_gauge(&self.rooms, &mut self.rooms_reported, rooms);
    }
}

/// Moves a gauge by this loop's change since its last report (a delta, not
/// a set, so that several loops' shares add up).
fn move_gauge(gauge: &Gauge, reported: &mut usize, now: usize) {
    if now > *reported {
        gauge.increment((now - *reported) as f64);
    } else if now < *reported {
        gauge.decrement((*reported - now) as f64);
    }
    *reported = now;
}

fn describe() {
    describe_counter!(
        "udphub_datagrams_received_total",
        Unit::Count,
        "Datagrams read from the socket, by what they were: heartbeat, quit, message, join, or dropped (see udphub_dropped_total)."
    );
    describe_counter!(
        "udphub_dropped_total",
        Unit::Count,
        "Datagrams dropped unrelayed, by reason."
    );
    describe_counter!(
        "udphub_fanout_recipients_total",
        Unit::Count,
        "Deliveries attempted (messages, replies and the shutdown bye): delivered + delivery_dropped."
    );
    describe_counter!(
        "udphub_deliveries_total",
        Unit::Count,
        "Deliveries handed to the kernel."
    );
    describe_counter!(
        "udphub_delivery_dropped_total",
        Unit::Count,
        "Deliveries dropped, by reason: backlog_full (a fan-out or a reply had to wait and its share of --send-backlog was full), buffer_full (EAGAIN/ENOBUFS where nothing waits: the bye), send_error, shard_queue_full (--threads: another loop's queue was full; counted once for that loop's members), or shutdown (still parked at stop)."
    );
    describe_gauge!(
        "udphub_rooms",
        Unit::Count,
        "Named rooms now (the lobby not counted; summed over the relay's loops)."
    );
    describe_counter!(
        "udphub_room_joins_total",
        Unit::Count,
        "Joins accepted (^join^ answered ^room^)."
    );
    describe_counter!(
        "udphub_room_join_refused_total",
        Unit::Count,
        "Joins refused, by reason: token, full (--max-rooms, --max-room-clients), name."
    );
    describe_counter!(
        "udphub_room_token_refused_total",
        Unit::Count,
        "Joins refused for their token (reason=\"token\" above), by why: missing, lobby_closed, malformed, algorithm, crit, signature, no_room, no_exp, milliseconds, bad_time, room, expired, not_yet, never_valid."
    );
    describe_counter!(
        "udphub_room_tokens_ignored_total",
        Unit::Count,
        "Joins that carried a token to a relay without --room-secret-file: not checked, the room is open to anyone."
    );
    describe_counter!(
        "udphub_recv_errors_total",
        Unit::Count,
        "recvmmsg calls that failed with an error other than EAGAIN (the loop backs off and retries)."
    );
    describe_counter!(
        "udphub_fanouts_parked_total",
        Unit::Count,
        "Fan-outs finished on later loop passes: larger than --fanout-slice, queued behind their room's, or stopped by a full send buffer."
    );
    describe_counter!(
        "udphub_send_buffer_full_total",
        Unit::Count,
        "Times the send buffer was full mid fan-out or mid reply batch: the rest waited (parked) for the socket to be writable."
    );
    describe_counter!(
        "udphub_replies_parked_total",
        Unit::Count,
        "Replies (^room^, ^denied^, ^timeout^, ^cookie^, echoes) that waited for room in the send buffer: stopped by a full buffer, or queued behind waiting ones."
    );
    describe_counter!(
        "udphub_local_address_overflow_total",
        Unit::Count,
        "Bound to a wildcard address: datagrams to a local address beyond the 64 each loop tells apart; answers to them leave from whatever address the route picks."
    );
    describe_gauge!(
        "udphub_clients",
        Unit::Count,
        "Clients registered now (summed over the relay's loops)."
    );
    describe_counter!(
        "udphub_clients_joined_total",
        Unit::Count,
        "Clients registered: a new source's first admitted heartbeat, message or join (room joins are udphub_room_joins_total)."
    );
    describe_counter!(
        "udphub_clients_expired_total",
        Unit::Count,
        "Clients expired after --timeout of silence."
    );
    describe_counter!(
        "udphub_clients_left_total",
        Unit::Count,
        "Clients that sent quit."
    );
    describe_counter!(
        "udphub_kernel_rx_dropped_total",
        Unit::Count,
        "Datagrams the kernel dropped because the socket receive buffer was full (SO_RXQ_OVFL)."
    );
    describe_histogram!(
        "udphub_fanout_duration_seconds",
        Unit::Seconds,
        "From a message's receipt to its last delivery handed to the kernel."
    );
    describe_histogram!(
        "udphub_recv_batch_size",
        Unit::Count,
        "Datagrams returned per recvmmsg call."
    );
    describe_histogram!(
        "udphub_loop_iteration_seconds",
        Unit::Seconds,
        "Busy time of one loop iteration (drain, fan-out, expiry), excluding the wait in poll."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Two loops in one process: counters and the clients gauge are sums
    /// of both loops' shares, whatever order they flush in.
    #[test]
    fn loops_add_up_instead_of_overwriting_each_other() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let mut a = Metrics::register();
            let mut b = Metrics::register();
            a.counts.messages = 2;
            b.counts.messages = 3;
            a.flush(10, 0);
            b.flush(4, 3);
            b.flush(1, 2);
            a.flush(12, 1);
        });
        let text = handle.render();
        assert_eq!(sample(&text, "udphub_clients"), Some(13.0), "{text}");
        assert_eq!(sample(&text, "udphub_rooms"), Some(3.0), "{text}");
        assert_eq!(
            sample(&text, "udphub_datagrams_received_total{kind=\"message\"}"),
            Some(5.0),
            "{text}"
        );
    }

    /// The exporter drains histogram samples (upkeep every 250 ms, and
    /// every render) on its own thread while the loops record them: no
    /// sample may be lost in between.
    #[test]
    fn samples_recorded_while_the_exporter_drains_are_all_counted() {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("udphub_fanout_duration_seconds".into()),
                &FANOUT_BUCKETS,
            )
            .expect("buckets")
            .build_recorder();
        let handle = recorder.handle();
        let mut m = metrics::with_local_recorder(&recorder, Metrics::register);
        const FLUSHES: usize = 20_000;
        const PER_FLUSH: usize = 50;
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let drainer = {
            let (handle, done) = (handle.clone(), std::sync::Arc::clone(&done));
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    draining(|| handle.run_upkeep());
                }
            })
        };
        for _ in 0..FLUSHES {
            m.counts.fanout_seconds.extend([1e-5; PER_FLUSH]);
            m.flush(0, 0);
        }
        done.store(true, Ordering::Relaxed);
        drainer.join().expect("the drainer");
        m.flush_all(0, 0); // what was held back while the drainer held the gate
        let text = handle.render();
        assert_eq!(
            sample(&text, "udphub_fanout_duration_seconds_count"),
            Some((FLUSHES * PER_FLUSH) as f64),
        );
    }
}
