//! Prometheus metrics: counted locally in the loop, flushed once per batch.
//!
//! The hot path increments plain `u64` fields of [`Counts`]; [`Metrics::flush`]
//! adds them to the `metrics` facade handles (one atomic add per non-zero
//! counter per batch, not per datagram) and resets them. The exporter
//! (`metrics-exporter-prometheus` with its `http-listener` feature) serves
//! `/metrics` from its own thread running a small current-thread tokio
//! runtime, so rendering a scrape — or a slow scraper — never runs on the
//! relay's loop.
//!
//! Accounting (checked by `tests/accounting.rs` from a live scrape):
//! `sum(udphub_datagrams_received_total) = heartbeat + quit + message +
//! sum(udphub_dropped_total)` and `udphub_fanout_recipients_total =
//! udphub_deliveries_total + sum(udphub_delivery_dropped_total)`.

use std::net::SocketAddr;

use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::error::Error;

/// Why a datagram was dropped (`udphub_dropped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Longer than `--max-datagram`.
    Oversize,
    /// From a new client while the table is at `--max-clients`.
    TableFull,
    /// The kernel reported a source address that is not IPv4/IPv6.
    BadSource,
}

impl DropReason {
    /// Every reason, for registration.
    pub const ALL: [DropReason; 3] = [
        DropReason::Oversize,
        DropReason::TableFull,
        DropReason::BadSource,
    ];

    /// The `reason` label value.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Oversize => "oversize",
            DropReason::TableFull => "table_full",
            DropReason::BadSource => "bad_source",
        }
    }
}

/// Counts gathered by the loop between two flushes.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    /// Heartbeats and empty keepalives.
    pub heartbeats: u64,
    /// `quit`s (also from senders that were not clients).
    pub quits: u64,
    /// Messages fanned out.
    pub messages: u64,
    /// Datagram drops, indexed like [`DropReason::ALL`].
    pub dropped: [u64; 3],
    /// Deliveries the fan-outs attempted.
    pub recipients: u64,
    /// Deliveries handed to the kernel.
    pub delivered: u64,
    /// Deliveries dropped: socket buffer full.
    pub delivery_buffer_full: u64,
    /// Deliveries dropped: other send error.
    pub delivery_send_error: u64,
    /// Clients that joined.
    pub joined: u64,
    /// Clients expired by the wheel.
    pub expired: u64,
    /// Clients that sent `quit`.
    pub left: u64,
    /// Datagrams the kernel dropped before we read them (SO_RXQ_OVFL delta).
    pub kernel_rx_dropped: u64,
    /// Fan-out durations (seconds) since the last flush.
    pub fanout_seconds: Vec<f64>,
    /// recvmmsg batch sizes since the last flush.
    pub batch_sizes: Vec<f64>,
    /// Loop iteration durations (seconds) since the last flush.
    pub loop_seconds: Vec<f64>,
}

impl Counts {
    /// Counts one dropped datagram.
    pub fn drop(&mut self, reason: DropReason) {
        self.dropped[reason as usize] += 1;
    }
}

/// Handles to every udphub metric, plus the local counts.
pub struct Metrics {
    /// What the loop counts between flushes.
    pub counts: Counts,
    received_heartbeat: Counter,
    received_quit: Counter,
    received_message: Counter,
    received_dropped: Counter,
    dropped: [Counter; 3],
    recipients: Counter,
    deliveries: Counter,
    delivery_buffer_full: Counter,
    delivery_send_error: Counter,
    joined: Counter,
    expired: Counter,
    left: Counter,
    kernel_rx_dropped: Counter,
    clients: Gauge,
    fanout_seconds: Histogram,
    batch_size: Histogram,
    loop_seconds: Histogram,
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

/// Installs the Prometheus recorder and starts its HTTP listener thread.
pub fn install_exporter(addr: SocketAddr) -> Result<(), Error> {
    let bind_error = |reason: String| Error::Bind {
        what: "metrics listener",
        addr,
        reason,
    };
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full("udphub_fanout_duration_seconds".into()),
            &FANOUT_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("udphub_recv_batch_size".into()),
                &BATCH_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("udphub_loop_iteration_seconds".into()),
                &LOOP_BUCKETS,
            )
        })
        .map_err(|e| bind_error(e.to_string()))?
        .install()
        .map_err(|e| bind_error(e.to_string()))
}

impl Metrics {
    /// Registers (and describes) every metric with the installed recorder;
    /// without one the handles are no-ops.
    pub fn register() -> Metrics {
        describe();
        let received = |kind: &'static str| metrics::counter!("udphub_datagrams_received_total", "kind" => kind);
        let delivery_dropped = |reason: &'static str| metrics::counter!("udphub_delivery_dropped_total", "reason" => reason);
        Metrics {
            counts: Counts::default(),
            received_heartbeat: received("heartbeat"),
            received_quit: received("quit"),
            received_message: received("message"),
            received_dropped: received("dropped"),
            dropped: DropReason::ALL
                .map(|r| metrics::counter!("udphub_dropped_total", "reason" => r.label())),
            recipients: metrics::counter!("udphub_fanout_recipients_total"),
            deliveries: metrics::counter!("udphub_deliveries_total"),
            delivery_buffer_full: delivery_dropped("buffer_full"),
            delivery_send_error: delivery_dropped("send_error"),
            joined: metrics::counter!("udphub_clients_joined_total"),
            expired: metrics::counter!("udphub_clients_expired_total"),
            left: metrics::counter!("udphub_clients_left_total"),
            kernel_rx_dropped: metrics::counter!("udphub_kernel_rx_dropped_total"),
            clients: metrics::gauge!("udphub_clients"),
            fanout_seconds: metrics::histogram!("udphub_fanout_duration_seconds"),
            batch_size: metrics::histogram!("udphub_recv_batch_size"),
            loop_seconds: metrics::histogram!("udphub_loop_iteration_seconds"),
        }
    }

    /// Publishes the local counts and the current client count, then
    /// resets the counts.
    pub fn flush(&mut self, clients: usize) {
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
        for (counter, v) in self.dropped.iter().zip(c.dropped.iter_mut()) {
            add(counter, v);
        }
        add(&self.recipients, &mut c.recipients);
        add(&self.deliveries, &mut c.delivered);
        add(&self.delivery_buffer_full, &mut c.delivery_buffer_full);
        add(&self.delivery_send_error, &mut c.delivery_send_error);
        add(&self.joined, &mut c.joined);
        add(&self.expired, &mut c.expired);
        add(&self.left, &mut c.left);
        add(&self.kernel_rx_dropped, &mut c.kernel_rx_dropped);
        for s in c.fanout_seconds.drain(..) {
            self.fanout_seconds.record(s);
        }
        for s in c.batch_sizes.drain(..) {
            self.batch_size.record(s);
        }
        for s in c.loop_seconds.drain(..) {
            self.loop_seconds.record(s);
        }
        self.clients.set(clients as f64);
    }
}

fn describe() {
    describe_counter!(
        "udphub_datagrams_received_total",
        Unit::Count,
        "Datagrams read from the socket, by what they were: heartbeat, quit, message, or dropped (see udphub_dropped_total)."
    );
    describe_counter!(
        "udphub_dropped_total",
        Unit::Count,
        "Datagrams dropped unrelayed, by reason."
    );
    describe_counter!(
        "udphub_fanout_recipients_total",
        Unit::Count,
        "Deliveries attempted by fan-outs (messages and the shutdown bye): delivered + delivery_dropped."
    );
    describe_counter!(
        "udphub_deliveries_total",
        Unit::Count,
        "Deliveries handed to the kernel."
    );
    describe_counter!(
        "udphub_delivery_dropped_total",
        Unit::Count,
        "Deliveries dropped, by reason: buffer_full (EAGAIN/ENOBUFS) or send_error."
    );
    describe_gauge!("udphub_clients", Unit::Count, "Clients in the table now.");
    describe_counter!(
        "udphub_clients_joined_total",
        Unit::Count,
        "Clients that joined."
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
